//! Integration tests against a real primary + 2 streaming replicas + Redis, through an
//! in-process pgsplit. One test binary so the whole run shares one cluster.

mod common;

mod auth;
mod bad_input;
mod clients;
mod extended;
mod pooling;
mod routing;
mod session_state;
