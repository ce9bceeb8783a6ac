//! Counters and latency histograms per route (primary, replica, cache), and the registry of
//! connected clients: what SHOW STATS, SHOW CLIENTS and /metrics report.
//!
//! Recording a query is a few relaxed atomic adds plus one histogram record under a lock
//! that only the sessions of one shard share; histograms are preallocated, so nothing
//! allocates per query.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;

use crate::state::lock;

/// Where a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Primary = 0,
    Replica = 1,
    Cache = 2,
}

impl RouteKind {
    pub const ALL: [RouteKind; 3] = [RouteKind::Primary, RouteKind::Replica, RouteKind::Cache];

    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Primary => "primary",
            RouteKind::Replica => "replica",
            RouteKind::Cache => "cache",
        }
    }
}

const SHARDS: usize = 8;
/// Latencies are recorded in microseconds up to this (longer ones count as this long).
const MAX_LATENCY_US: u64 = 3_600_000_000;

struct RouteCounters {
    queries: AtomicU64,
    transactions: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
}

impl RouteCounters {
    fn new() -> RouteCounters {
        RouteCounters {
            queries: AtomicU64::new(0),
            transactions: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            latency: (0..SHARDS)
                .map(|_| {
                    Mutex::new(
                        Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                            .expect("static histogram bounds are valid"),
                    )
                })
                .collect(),
        }
    }
}

/// Figures for one route.
#[derive(Debug, Clone)]
pub struct RouteSnapshot {
    pub route: RouteKind,
    pub queries: u64,
    pub transactions: u64,
    pub errors: u64,
    pub retries: u64,
    /// All latencies recorded, merged over the shards (microseconds).
    pub latency: Histogram<u64>,
}

pub struct Stats {
    routes: [RouteCounters; 3],
    /// Clients that logged in, and logins refused.
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    pub clients: ClientRegistry,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            routes: [
                RouteCounters::new(),
                RouteCounters::new(),
                RouteCounters::new(),
            ],
            logins: AtomicU64::new(0),
            login_failures: AtomicU64::new(0),
            clients: ClientRegistry::default(),
        }
    }
}

impl Stats {
    /// One request answered via `route` in `elapsed`; `shard` spreads sessions over the
    /// histogram locks (any stable number per session).
    pub fn record(&self, route: RouteKind, elapsed: Duration, failed: bool, shard: usize) {
        let r = &self.routes[route as usize];
        r.queries.fetch_add(1, Ordering::Relaxed);
        if failed {
            r.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = (elapsed.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        let _ = lock(&r.latency[shard % SHARDS]).record(us);
    }

    pub fn transaction(&self, route: RouteKind) {
        self.routes[route as usize]
            .transactions
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self, route: RouteKind) {
        self.routes[route as usize]
            .retries
            .fetch_add(1, Ordering::Relaxed);
    }

    /// An error reported to the client before any server ran the request.
    pub fn error(&self, route: RouteKind) {
        self.routes[route as usize]
            .errors
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<RouteSnapshot> {
        RouteKind::ALL
            .iter()
            .map(|&route| {
                let r = &self.routes[route as usize];
                let mut latency = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                    .expect("static histogram bounds are valid");
                for shard in &r.latency {
                    let _ = latency.add(&*lock(shard));
                }
                RouteSnapshot {
                    route,
                    queries: r.queries.load(Ordering::Relaxed),
                    transactions: r.transactions.load(Ordering::Relaxed),
                    errors: r.errors.load(Ordering::Relaxed),
                    retries: r.retries.load(Ordering::Relaxed),
                    latency,
                }
            })
            .collect()
    }
}

/// What a connected client is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Idle = 0,
    Active = 1,
    InTransaction = 2,
}

/// One logged-in client, for SHOW CLIENTS.
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub user: String,
    pub database: String,
    pub connected_at: SystemTime,
    state: AtomicU8,
    /// The backend id + 1 of the server connection in use, 0 for none.
    backend: AtomicU32,
    pub queries: AtomicU64,
}

impl ClientInfo {
    pub fn set_state(&self, s: ClientState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(Ordering::Relaxed) {
            1 => ClientState::Active,
            2 => ClientState::InTransaction,
            _ => ClientState::Idle,
        }
    }

    pub fn set_backend(&self, id: Option<u32>) {
        self.backend
            .store(id.map_or(0, |i| i + 1), Ordering::Relaxed);
    }

    pub fn backend(&self) -> Option<u32> {
        self.backend.load(Ordering::Relaxed).checked_sub(1)
    }
}

#[derive(Default)]
pub struct ClientRegistry {
    map: Mutex<HashMap<i32, Arc<ClientInfo>>>,
}

impl ClientRegistry {
    pub fn register(
        &self,
        id: i32,
        peer: SocketAddr,
        user: &str,
        database: &str,
    ) -> Arc<ClientInfo> {
        let info = Arc::new(ClientInfo {
            peer,
            user: user.to_owned(),
            database: database.to_owned(),
            connected_at: SystemTime::now(),
            state: AtomicU8::new(0),
            backend: AtomicU32::new(0),
            queries: AtomicU64::new(0),
        });
        lock(&self.map).insert(id, info.clone());
        info
    }

    pub fn unregister(&self, id: i32) {
        lock(&self.map).remove(&id);
    }

    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (id, info) sorted by id.
    pub fn list(&self) -> Vec<(i32, Arc<ClientInfo>)> {
        let mut v: Vec<_> = lock(&self.map)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merge_over_shards() {
        let s = Stats::default();
        for i in 0..100u64 {
            s.record(
                RouteKind::Replica,
                Duration::from_micros(i * 10),
                i % 10 == 0,
                i as usize,
            );
        }
        s.transaction(RouteKind::Primary);
        s.retry(RouteKind::Replica);
        let snap = s.snapshot();
        let replica = &snap[RouteKind::Replica as usize];
        assert_eq!(replica.queries, 100);
        assert_eq!(replica.errors, 10);
        assert_eq!(replica.retries, 1);
        assert_eq!(replica.latency.len(), 100);
        let p50 = replica.latency.value_at_quantile(0.5);
        assert!((480..=520).contains(&p50), "{p50}");
        assert_eq!(snap[RouteKind::Primary as usize].transactions, 1);
        assert_eq!(snap[RouteKind::Cache as usize].queries, 0);
    }

    #[test]
    fn clients_register_and_leave() {
        let r = ClientRegistry::default();
        let peer: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let c = r.register(7, peer, "app", "appdb");
        c.set_state(ClientState::InTransaction);
        c.set_backend(Some(0));
        assert_eq!(r.list()[0].1.state(), ClientState::InTransaction);
        assert_eq!(r.list()[0].1.backend(), Some(0));
        r.unregister(7);
        assert!(r.is_empty());
    }
}
