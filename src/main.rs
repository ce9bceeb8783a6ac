//! The `pgsplit` binary: arguments, logging, configuration, runtime; then the server.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use pgsplit::config::Config;
use pgsplit::server::Server;
use pgsplit::state::{Runtime, Shared};

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
    let filter = args
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).context("invalid --log filter")?,
        )
        .init();

    let config =
        Config::load(&args.config).with_context(|| format!("loading {}", args.config.display()))?;
    if let Some(Command::Check) = args.command {
        Runtime::new(config)?;
        println!("{}: configuration is valid", args.config.display());
        return Ok(());
    }
    let listen = config.proxy.listen;
    let runtime = Runtime::new(config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let shared = Shared::new(runtime);
            let server = Server::bind(shared, listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_stop_signal().await;
                tracing::info!("shutting down: no new clients; waiting for sessions to end");
                signal.cancel();
                wait_for_stop_signal().await;
                tracing::info!("second signal: exiting now");
                std::process::exit(0);
            });
            server.run(shutdown).await;
            Ok(())
        })
}

/// SIGINT or SIGTERM.
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
