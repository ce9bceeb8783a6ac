//! The HTTP endpoint on `metrics_listen`: `/metrics` in the Prometheus text format and
//! `/health` for a load balancer. A few lines of HTTP/1.1 (one request per connection)
//! are all either needs.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::state::{Shared, lock};

/// Histogram bucket bounds, in seconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Scrapes and health probes answered at once; more connections are closed unanswered, so
/// that slow or silent ones cannot pile up.
const MAX_CONCURRENT: usize = 256;

/// A request (head and answer) must be done within this: a silent connection gives its
/// slot back soon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(&shared, stream)).await;
            drop(slot);
        });
    }
}

async fn answer(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(shared),
        ),
        ("GET", "/health") => {
            let (ok, text) = health(shared);
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "text/plain; charset=utf-8",
                text,
            )
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Healthy while pgsplit accepts clients and some server can answer them.
pub fn health(shared: &Shared) -> (bool, String) {
    if shared.is_draining() {
        return (false, "shutting down\n".into());
    }
    let rt = shared.runtime.load();
    let primary = rt.backends.primary.in_rotation();
    let replicas = rt
        .backends
        .replicas
        .iter()
        .filter(|r| r.in_rotation())
        .count();
    match (primary, replicas) {
        (true, _) => (
            true,
            format!("ok: primary up, {replicas} replica(s) in rotation\n"),
        ),
        (false, n) if n > 0 => (
            true,
            format!("degraded: primary down, reads only ({n} replica(s) in rotation)\n"),
        ),
        _ => (false, "no server available\n".into()),
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Everything in the Prometheus text exposition format (version 0.0.4).
pub fn render(shared: &Shared) -> String {
    let mut o = Out(String::with_capacity(8192));
    let routes = shared.stats.snapshot();
    for (name, help, get) in [
        (
            "pgsplit_queries_total",
            "Requests answered, by route.",
            (|r: &crate::stats::RouteSnapshot| r.queries) as fn(&_) -> u64,
        ),
        (
            "pgsplit_transactions_total",
            "Transaction blocks ended, by route.",
            |r| r.transactions,
        ),
        (
            "pgsplit_errors_total",
            "Requests that ended in an error, by route.",
            |r| r.errors,
        ),
        (
            "pgsplit_retries_total",
            "Reads run again elsewhere, by the route that failed them.",
            |r| r.retries,
        ),
    ] {
        o.family(name, "counter", help);
        for r in &routes {
            o.sample(name, &[("route", r.route.name())], get(r));
        }
    }
    let name = "pgsplit_query_duration_seconds";
    o.family(
        name,
        "histogram",
        "Request latency from the first message to the last byte of the answer.",
    );
    for r in &routes {
        let route = r.route.name();
        for le in BUCKETS {
            let below = r.latency.count_between(0, (le * 1e6) as u64);
            o.sample(
                &format!("{name}_bucket"),
                &[("route", route), ("le", &le.to_string())],
                below,
            );
        }
        o.sample(
            &format!("{name}_bucket"),
            &[("route", route), ("le", "+Inf")],
            r.latency.len(),
        );
        let sum_us: f64 = r
            .latency
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            // Not `sum()`, whose empty sum is -0, printed as "-0".
            .fold(0.0, |a, b| a + b);
        o.sample(&format!("{name}_sum"), &[("route", route)], sum_us / 1e6);
        o.sample(
            &format!("{name}_count"),
            &[("route", route)],
            r.latency.len(),
        );
    }

    let stats = &shared.stats;
    o.family("pgsplit_clients", "gauge", "Clients logged in now.");
    o.sample("pgsplit_clients", &[], stats.clients.len());
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    o.family(
        "pgsplit_logins_total",
        "counter",
        "Client logins accepted by pgsplit and by the primary.",
    );
    o.sample("pgsplit_logins_total", &[], stats.logins.load(relaxed));
    o.family(
        "pgsplit_login_failures_total",
        "counter",
        "Client logins refused (bad password, unknown user, or by the primary: unknown database, server credentials, no primary).",
    );
    o.sample(
        "pgsplit_login_failures_total",
        &[],
        stats.login_failures.load(relaxed),
    );

    let rt = shared.runtime.load_full();
    o.family(
        "pgsplit_backend_healthy",
        "gauge",
        "1 when the health checker finds the server usable.",
    );
    o.family(
        "pgsplit_backend_in_rotation",
        "gauge",
        "1 when the server takes queries (healthy, not banned, within the lag limit).",
    );
    o.family(
        "pgsplit_backend_lag_bytes",
        "gauge",
        "Replication lag of a replica behind the primary, in WAL bytes.",
    );
    for b in std::iter::once(&rt.backends.primary).chain(&rt.backends.replicas) {
        let name = b.name();
        let role = if b.id.is_primary() {
            "primary"
        } else {
            "replica"
        };
        let labels = [("backend", name.as_str()), ("role", role)];
        o.sample(
            "pgsplit_backend_healthy",
            &labels,
            u8::from(b.health.healthy()),
        );
        o.sample(
            "pgsplit_backend_in_rotation",
            &labels,
            u8::from(b.in_rotation()),
        );
        if let Some(lag) = b.health.lag_bytes() {
            o.sample("pgsplit_backend_lag_bytes", &labels, lag);
        }
    }
    o.family(
        "pgsplit_pool_connections",
        "gauge",
        "Server connections of a pool, by state.",
    );
    for p in rt.pools() {
        let (in_use, idle) = p.counts();
        for (state, n) in [("in_use", in_use), ("idle", idle)] {
            o.sample(
                "pgsplit_pool_connections",
                &[
                    ("backend", p.name()),
                    ("user", p.user()),
                    ("database", p.database()),
                    ("state", state),
                ],
                n,
            );
        }
    }

    if let Some(c) = &shared.cache {
        let s = c.snapshot();
        for (name, help, v) in [
            (
                "pgsplit_cache_hits_total",
                "Reads answered from Redis.",
                s.hits,
            ),
            (
                "pgsplit_cache_misses_total",
                "Cacheable reads not in Redis.",
                s.misses,
            ),
            (
                "pgsplit_cache_stores_total",
                "Answers stored in Redis.",
                s.stores,
            ),
            (
                "pgsplit_cache_too_large_total",
                "Answers over max_entry_bytes, not stored.",
                s.too_large,
            ),
            (
                "pgsplit_cache_invalidations_total",
                "Version bumps after committed writes.",
                s.invalidations,
            ),
            (
                "pgsplit_cache_errors_total",
                "Redis calls that failed or timed out.",
                s.errors,
            ),
            (
                "pgsplit_cache_bypassed_total",
                "Lookups skipped while Redis was unavailable.",
                s.bypassed,
            ),
        ] {
            o.family(name, "counter", help);
            o.sample(name, &[], v);
        }
        o.family(
            "pgsplit_cache_redis_available",
            "gauge",
            "1 while the cache is in use, 0 while it is bypassed.",
        );
        o.sample(
            "pgsplit_cache_redis_available",
            &[],
            u8::from(s.redis_available),
        );
    }

    let reload = lock(&shared.reload).clone();
    o.family(
        "pgsplit_config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
    );
    o.sample(
        "pgsplit_config_reloads_total",
        &[("result", "applied")],
        reload.applied,
    );
    o.sample(
        "pgsplit_config_reloads_total",
        &[("result", "rejected")],
        reload.failed,
    );
    o.family(
        "pgsplit_config_last_reload_failed",
        "gauge",
        "1 when the last reload attempt was rejected (the previous configuration is running).",
    );
    o.sample(
        "pgsplit_config_last_reload_failed",
        &[],
        u8::from(reload.last_error.is_some()),
    );
    o.0
}
