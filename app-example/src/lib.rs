//! The album demo for pgsplit: albums with songs behind a JSON API and one HTML page.
//!
//! The app knows one database setting, `DATABASE_URL`, and that URL points at pgsplit. It
//! holds no replica list, no routing and no cache code: pgsplit sends its transactions to
//! the primary, its plain reads to the replicas, and answers the reads that `proxy.toml`
//! whitelists from Redis. What the app does to stay cacheable is only to keep its reads
//! simple and stable (the same SQL text every time, outside transactions, no `now()`).
//!
//! - `api`: the JSON endpoints under `/api`.
//! - `page`: the server-rendered page at `/` with its form.
//! - `store`: every SQL statement the app runs, and the schema migration.
//! - `input`: validation shared by the API and the form.
//! - `error`: the error type and its JSON answer.

mod api;
mod error;
mod input;
mod page;
mod store;

use std::str::FromStr;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

pub use error::ApiError;
pub use input::{AlbumInput, MAX_PER_PAGE, MAX_SONGS, MAX_TITLE_CHARS};
pub use store::migrate;

/// Connections the app keeps to the database (through pgsplit, which pools the servers).
pub const POOL_SIZE: usize = 16;

/// A connection pool for `database_url` (a `postgres://` URL or a libpq key=value string).
/// Connections are opened on first use, so this does not wait for the database.
pub fn pool(database_url: &str) -> anyhow::Result<Pool> {
    let config = tokio_postgres::Config::from_str(database_url)
        .context("DATABASE_URL is not a valid PostgreSQL connection string")?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .build()
        .context("building the connection pool")
}

/// Serve the app on `listener` until `shutdown` completes (then finish open requests).
pub async fn serve(
    listener: tokio::net::TcpListener,
    pool: Pool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(pool))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The whole app: the page at `/` and the JSON API under `/api`.
pub fn router(pool: Pool) -> Router {
    Router::new()
        .route("/", get(page::show).post(page::add))
        .route("/api/albums", get(api::list))
        .route("/api/album", axum::routing::post(api::create))
        .route(
            "/api/album/{id}",
            get(api::read).put(api::update).delete(api::delete),
        )
        .with_state(pool)
}
