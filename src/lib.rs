//! pgsplit: a transparent PostgreSQL wire-protocol proxy that sends writes, transactions and
//! session-bound work to the primary and spreads plain reads over streaming replicas.
//!
//! `main.rs` only parses arguments and calls [`server::Server`]; tests start the same server
//! in-process on port 0. Module layers: `protocol`, `config` and `router` are pure leaves;
//! `backend` and `auth` build on leaves; `session` combines them; `server` wires it up.

pub mod admin;
mod alloc;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod config;
pub mod error;
pub mod hex;
pub mod memo;
pub mod metrics;
pub mod protocol;
pub mod reload;
pub mod router;
pub mod server;
pub mod session;
pub mod state;
pub mod stats;
pub mod tls;

pub use error::{Error, Result};

#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;
