//! Integration tests against a real primary + 2 streaming replicas + Redis, through an
//! in-process pgsplit. One test binary so the whole run shares one cluster.

mod common;

mod auth;
mod bad_input;
mod cache;
mod chaos;
mod clients;
mod compose;
mod demo;
mod extended;
mod failover;
mod ops;
mod pooling;
mod protocol_edges;
mod routing;
mod session_state;
mod tls;
