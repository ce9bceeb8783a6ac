//! The accept loop: one task per client, a cap on client connections, graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::health::{CheckerConfig, run_checker};
use crate::backend::{BackendId, ConnectParams};
use crate::state::Shared;

/// A running proxy listener, as tests and `main` hold it.
pub struct Server {
    pub shared: Arc<Shared>,
    listener: TcpListener,
    /// `/metrics` and `/health`, when `metrics_listen` is set.
    metrics: Option<TcpListener>,
}

impl Server {
    pub async fn bind(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let metrics_addr = shared.runtime.load().config.proxy.metrics_listen;
        let metrics =
            match metrics_addr {
                Some(a) => Some(TcpListener::bind(a).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("metrics_listen {a}: {e}"))
                })?),
                None => None,
            };
        Ok(Server {
            shared,
            listener,
            metrics,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// Accept clients until `shutdown` is cancelled; then wait for running sessions.
    pub async fn run(self, shutdown: CancellationToken) {
        let max = self
            .shared
            .runtime
            .load()
            .config
            .proxy
            .max_client_connections;
        let limit = Arc::new(Semaphore::new(max));
        // Past the limit a client still gets its FATAL 53300, once its startup packet came
        // (it may ask for TLS first): as many again may wait for that; more are closed at
        // once, so that silent sockets cannot pile up (PostgreSQL's postmaster also stops
        // at twice its connection slots).
        let overflow = Arc::new(Semaphore::new(max));
        let tracker = TaskTracker::new();
        info!(addr = %self.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
        let maintenance = tokio::spawn(maintain_pools(self.shared.clone(), shutdown.clone()));
        let watcher = tokio::spawn(crate::reload::watch_file(
            self.shared.clone(),
            shutdown.clone(),
        ));
        // Metrics stay up through the shutdown: /health says so to the load balancer.
        let metrics_stop = CancellationToken::new();
        if let Some(m) = self.metrics {
            info!(addr = %m.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
            tokio::spawn(crate::metrics::serve(
                self.shared.clone(),
                m,
                metrics_stop.clone(),
            ));
        }
        restart_health_checkers(&self.shared);
        let mut accept_warned: Option<std::time::Instant> = None;
        let mut accept_failures = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning, and say so
                    // once per ten seconds, not at every retry.
                    let now = std::time::Instant::now();
                    if accept_warned.is_none_or(|at| now.duration_since(at).as_secs() >= 10) {
                        warn!(error = %e, failed_since_last_warning = accept_failures, "accept failed (out of file descriptors? raise the open-file limit)");
                        accept_warned = Some(now);
                        accept_failures = 0;
                    } else {
                        accept_failures += 1;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the limit, the client still gets a proper FATAL 53300 from its session.
            let (permit, over_limit) = match limit.clone().try_acquire_owned() {
                Ok(p) => (p, false),
                Err(_) => match overflow.clone().try_acquire_owned() {
                    Ok(p) => (p, true),
                    Err(_) => {
                        debug!(%peer, "connection closed: twice max_client_connections reached");
                        continue;
                    }
                },
            };
            let shared = self.shared.clone();
            tracker.spawn(async move {
                crate::session::run(shared, stream, peer, over_limit).await;
                drop(permit);
            });
        }
        // New clients are refused from here on, not left waiting in the listen backlog.
        drop(self.listener);
        tracker.close();
        // Idle sessions end now, the others at the end of their transaction; what is still
        // running after the timeout is cut off when the process exits.
        let shared = self.shared;
        shared.begin_draining();
        let timeout = shared.runtime.load().config.proxy.shutdown_timeout();
        if tokio::time::timeout(timeout, tracker.wait()).await.is_err() {
            warn!(
                sessions = tracker.len(),
                "shutdown timeout reached; closing the remaining sessions"
            );
        }
        maintenance.abort();
        watcher.abort();
        metrics_stop.cancel();
        for c in std::mem::take(&mut *crate::state::lock(&shared.checkers)) {
            c.abort();
        }
    }
}

/// Stop the health checkers of the previous configuration and start one per backend of the
/// current one (their findings live on in the backends' shared health states).
pub fn restart_health_checkers(shared: &Arc<Shared>) {
    let new = spawn_health_checkers(shared);
    let old = std::mem::replace(&mut *crate::state::lock(&shared.checkers), new);
    for c in old {
        c.abort();
    }
}

/// One health checker per backend of the current configuration.
fn spawn_health_checkers(shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let runtime = shared.runtime.load_full();
    let cfg = &runtime.config;
    let (user, password) = cfg.health_login();
    let checker = CheckerConfig {
        interval: cfg.health.interval(),
        timeout: cfg.health.timeout(),
        failures: cfg.health.failures,
        successes: cfg.health.successes,
        max_lag_bytes: cfg.routing.max_replica_lag_bytes,
        connect: ConnectParams {
            user,
            password,
            database: cfg.health.database.clone(),
            startup: vec![("application_name".into(), "pgsplit health check".into())],
            max_prepared: 1,
            tls: runtime.server_tls.clone(),
        },
        max_message: cfg.proxy.max_message_bytes,
    };
    let ids = std::iter::once(BackendId::PRIMARY)
        .chain(runtime.backends.replicas.iter().map(|r| r.id))
        .collect::<Vec<_>>();
    ids.into_iter()
        .map(|id| {
            let runtime = runtime.clone();
            let checker = checker.clone();
            tokio::spawn(async move {
                let backends = &runtime.backends;
                let Some(b) = backends.get(id) else { return };
                run_checker(
                    id,
                    b.name(),
                    b.address(),
                    &b.health,
                    &backends.primary.health,
                    checker,
                )
                .await
            })
        })
        .collect()
}

/// Close idle server connections past their timeout and keep `min_idle` warm, once a second.
async fn maintain_pools(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let runtime = shared.runtime.load_full();
        for pool in runtime.pools() {
            pool.maintain().await;
        }
    }
}
