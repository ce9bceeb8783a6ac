//! The `pgsplit` binary: arguments, logging, configuration, runtime; then the server.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use pgsplit::config::Config;
use pgsplit::server::Server;
use pgsplit::state::{Runtime, Shared};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Transparent PostgreSQL proxy: writes and transactions to the primary, reads to replicas.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Configuration file (see proxy.toml in the repository for every setting).
    #[arg(short, long, default_value = "proxy.toml", global = true)]
    config: PathBuf,
    /// Log filter, e.g. `info`, `pgsplit=debug` (overrides RUST_LOG).
    #[arg(long)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration file and exit (non-zero with the errors if invalid).
    Check,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Read as reloads read it (absolute): relative certificate paths then resolve the same
    // way, and the first reload reports no change that is none.
    let config_path = pgsplit::reload::config_path(&args.config);
    let loaded = Config::load(&config_path);
    // The log filter: --log, else RUST_LOG, else the config's `[proxy] log`.
    let (filter, source) = match (&args.log, std::env::var("RUST_LOG"), &loaded) {
        (Some(log), _, _) => (log.clone(), "--log"),
        (None, Ok(env), _) => (env, "RUST_LOG"),
        (None, Err(_), Ok(c)) => (c.proxy.log.clone(), "[proxy] log"),
        (None, Err(_), Err(_)) => ("info".into(), "the default"),
    };
    let (filter_layer, filter_handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::try_new(&filter)
            .with_context(|| format!("invalid log filter {filter:?} (from {source})"))?,
    );
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();

    let config = loaded.with_context(|| format!("loading {}", args.config.display()))?;
    if let Some(Command::Check) = args.command {
        Runtime::new(config)?;
        println!("{}: configuration is valid", args.config.display());
        return Ok(());
    }
    warn_if_readable_secrets(&args.config, &config);
    raise_open_file_limit(&config);
    let listen = config.proxy.listen;
    let runtime = Runtime::new(config)?;
    let mut builder = match runtime.config.proxy.worker_threads {
        // One thread: no cross-thread wakeups, which cost more than they bring when the
        // proxy shares few cores with the database.
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    builder.enable_all().build()?.block_on(async move {
        let shared = Shared::new(runtime);
        let _ = shared.config_path.set(config_path);
        let _ = shared.log_filter.set(Box::new(move |f: &str| {
            let filter = tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
            filter_handle.reload(filter).map_err(|e| e.to_string())
        }));
        let server = Server::bind(shared.clone(), listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let mut stops = StopSignals::new().context("installing signal handlers")?;
        tokio::spawn(async move {
            stops.next().await;
            tracing::info!("shutting down: no new clients; running transactions may finish");
            signal.cancel();
            stops.next().await;
            tracing::info!("second signal: exiting now");
            std::process::exit(0);
        });
        let hup_shared = shared.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = pgsplit::reload::reload(&hup_shared);
            }
        });
        server.run(shutdown).await;
        Ok(())
    })
}

/// Plain passwords in a file others can read deserve a word.
fn warn_if_readable_secrets(path: &std::path::Path, config: &Config) {
    use std::os::unix::fs::PermissionsExt;
    let plain = |p: &Option<String>| {
        p.as_deref()
            .is_some_and(|p| !pgsplit::config::is_verifier(p))
    };
    let has_plain = config
        .users
        .iter()
        .any(|u| plain(&u.password) || plain(&u.server_password))
        || plain(&config.proxy.admin_password);
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if has_plain && mode & 0o044 != 0 {
        tracing::warn!(
            path = %path.display(),
            "the config holds plain passwords and other users can read it (chmod 600, or use SCRAM verifiers)"
        );
    }
}

/// SIGINT and SIGTERM, registered once: a second registration made after the first signal
/// arrived would report that same signal again.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// Every client and server connection is a file descriptor, and the soft limit a shell or
/// service manager gives is often 1024, under the default `max_client_connections`: raise
/// it to the hard limit, and say so when even that is short of what the config allows.
fn raise_open_file_limit(config: &Config) {
    let servers = 1 + config.replicas.len() as u64;
    let clients = config.proxy.max_client_connections as u64;
    // Server connections: one pool per server, user and database (one database per user
    // counted); in session mode also at most one per client and server.
    let pooled = servers * config.pool.size as u64 * config.users.len() as u64;
    let server_conns = match config.proxy.pool_mode {
        pgsplit::config::PoolMode::Session => pooled.min(clients * servers),
        pgsplit::config::PoolMode::Transaction => pooled,
    };
    // And health checks, listeners, Redis, files.
    let wanted = clients + server_conns + servers + 64;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "the open-file limit is below what max_client_connections and the pools may use; raise its hard limit (LimitNOFILE=, ulimit -Hn)"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
