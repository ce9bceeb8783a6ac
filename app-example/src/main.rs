//! `app-example`: the album demo server.
//!
//! Settings (environment): `DATABASE_URL` (required; pgsplit's address, e.g.
//! `postgres://app:app_pw@127.0.0.1:6432/appdb`), `LISTEN_ADDR` (default `127.0.0.1:8080`),
//! `RUST_LOG` (default `info`).

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// How long start-up waits for the database (pgsplit may still be starting).
const DATABASE_WAIT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let url = std::env::var("DATABASE_URL").context(
        "DATABASE_URL is not set (pgsplit's address, e.g. postgres://app:app_pw@127.0.0.1:6432/appdb)",
    )?;
    let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".to_owned());
    let pool = app_example::pool(&url)?;

    let deadline = Instant::now() + DATABASE_WAIT;
    loop {
        match app_example::migrate(&pool).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                warn!(
                    error = format!("{e:#}"),
                    "schema migration failed; retrying"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.context("schema migration")),
        }
    }

    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {listen}"))?;
    info!(addr = %listener.local_addr()?, "listening");
    app_example::serve(listener, pool, shutdown()).await?;
    info!("stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
