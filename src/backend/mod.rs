//! The PostgreSQL servers behind the proxy: connecting to them as a client, their
//! availability, and choosing a replica for a read.
//!
//! Imports only leaves (protocol, config). Knows nothing of client sessions: a session asks
//! for "a connection to backend X" and owns what it gets.

mod balancer;
mod conn;
pub mod health;
mod places;
mod pool;
mod prepared;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use balancer::Balancer;
pub use conn::{CancelKey, ConnectParams, ServerAddr, ServerConn, send_cancel};
pub use health::{HealthState, Role};
pub use places::{Place, PlaceSets, Places, PlacesKey};
pub use pool::{CheckoutError, Lent, Pool, PoolLimits};
pub use prepared::{PreparedNames, PreparedSet};

use crate::config::{BackendConfig, Config};
use crate::protocol::ErrorFields;

/// Index of a backend: 0 is the primary, 1.. are the replicas in config order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u32);

impl BackendId {
    pub const PRIMARY: BackendId = BackendId(0);

    pub fn is_primary(self) -> bool {
        self == BackendId::PRIMARY
    }

    /// Position in `Backends::replicas`, for a replica.
    pub fn replica_index(self) -> Option<usize> {
        (self.0 > 0).then(|| self.0 as usize - 1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("server connection failed: {0}")]
    Io(std::io::Error),
    #[error("server closed the connection")]
    Closed,
    #[error("timed out connecting to the server")]
    Timeout,
    #[error("server protocol error: {0}")]
    Protocol(&'static str),
    #[error("{0}")]
    AuthUnsupported(String),
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(ErrorFields),
}

impl BackendError {
    /// A failure of the server or the path to it (as opposed to the server refusing
    /// something): the node is suspect and the work may be retried elsewhere.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            BackendError::Io(_) | BackendError::Closed | BackendError::Timeout
        ) && !self.is_local_exhaustion()
    }

    /// pgsplit itself ran out of file descriptors or socket buffers: no server is to blame.
    pub fn is_local_exhaustion(&self) -> bool {
        // Linux's EMFILE, ENFILE and ENOBUFS.
        const EXHAUSTION: [i32; 3] = [24, 23, 105];
        matches!(self, BackendError::Io(e) if e.raw_os_error().is_some_and(|c| EXHAUSTION.contains(&c)))
    }
}

/// One configured server and what the proxy currently believes about it.
#[derive(Debug)]
pub struct Backend {
    pub id: BackendId,
    pub config: BackendConfig,
    /// Until when (ms since `epoch`) this node is skipped after a failed connect.
    down_until_ms: AtomicU64,
    epoch: Instant,
    /// The health checker's findings; carried over a config reload for the same address.
    pub health: Arc<HealthState>,
}

/// How long a node that refused a connection stays out of rotation before it is tried again.
const DOWN_BACKOFF: Duration = Duration::from_millis(1000);

impl Backend {
    fn new(
        id: BackendId,
        config: BackendConfig,
        epoch: Instant,
        health: Option<Arc<HealthState>>,
    ) -> Backend {
        Backend {
            id,
            config,
            down_until_ms: AtomicU64::new(0),
            epoch,
            health: health.unwrap_or_default(),
        }
    }

    pub fn address(&self) -> String {
        self.config.address()
    }

    pub fn name(&self) -> String {
        self.config.display_name()
    }

    /// In rotation: healthy by the checker and not just refused a connection.
    /// Not answering: out of rotation after failed checks that got no answer, or a
    /// connection to it failed. (A node banned, or over the lag limit, still answers: what
    /// runs there may finish.)
    pub fn is_unreachable(&self) -> bool {
        self.is_marked_down() || (!self.health.healthy() && !self.health.answering())
    }

    /// Down by the health checks alone: out of rotation after failed checks that got no
    /// answer. (Not the short backoff after one failed or lost connection, which one
    /// terminated query sets.)
    pub fn checks_say_down(&self) -> bool {
        !self.health.healthy() && !self.health.answering()
    }

    /// In rotation as the health checks and the operator's bans have it: what `/health`,
    /// the metrics and SHOW BACKENDS report. Routing also skips a server for a second
    /// after a lost connection ([`is_available`](Self::is_available)), which one client
    /// terminating its own backend causes: no reason to call a server down.
    pub fn in_rotation(&self) -> bool {
        self.health.healthy() && !self.health.banned()
    }

    pub fn is_available(&self) -> bool {
        self.health.healthy() && !self.health.banned() && !self.is_marked_down()
    }

    /// Within the backoff after a refused connection. Nothing marked (0), the usual case,
    /// needs no clock read: this runs at every routing decision.
    fn is_marked_down(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.epoch.elapsed().as_millis() as u64 >= until {
            // Over: back to the cheap case. Only this expired mark is cleared: a mark_down or
            // mark_up in between changed the value, and the exchange leaves theirs.
            let _ =
                self.down_until_ms
                    .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Take the node out of rotation for a short while after a connection failure.
    pub fn mark_down(&self) {
        let until = (self.epoch.elapsed() + DOWN_BACKOFF).as_millis() as u64;
        self.down_until_ms.store(until, Ordering::Relaxed);
    }

    pub fn mark_up(&self) {
        self.down_until_ms.store(0, Ordering::Relaxed);
    }
}

/// All servers of one configuration.
#[derive(Debug)]
pub struct Backends {
    pub primary: Backend,
    pub replicas: Vec<Backend>,
    pub balancer: Balancer,
}

impl Backends {
    pub fn from_config(cfg: &Config) -> Backends {
        Backends::from_config_reusing(cfg, None)
    }

    /// The backends of `cfg`; a server at the same address as one of `old` keeps what the
    /// health checker (and an operator's BAN) found about it, so a reload does not send
    /// reads to a node known to be down, or away from one known to be up.
    pub fn from_config_reusing(cfg: &Config, old: Option<&Backends>) -> Backends {
        let epoch = Instant::now();
        let health = |c: &BackendConfig| {
            old.and_then(|o| {
                std::iter::once(&o.primary)
                    .chain(&o.replicas)
                    .find(|b| b.address() == c.address())
                    .map(|b| b.health.clone())
            })
        };
        Backends {
            primary: Backend::new(
                BackendId::PRIMARY,
                cfg.primary.clone(),
                epoch,
                health(&cfg.primary),
            ),
            replicas: cfg
                .replicas
                .iter()
                .enumerate()
                .map(|(i, r)| Backend::new(BackendId(i as u32 + 1), r.clone(), epoch, health(r)))
                .collect(),
            balancer: Balancer::new(&cfg.replicas.iter().map(|r| r.weight).collect::<Vec<_>>()),
        }
    }

    /// The server configured at `address`.
    pub fn id_of(&self, address: &str) -> Option<BackendId> {
        std::iter::once(&self.primary)
            .chain(&self.replicas)
            .find(|b| b.address() == address)
            .map(|b| b.id)
    }

    pub fn get(&self, id: BackendId) -> Option<&Backend> {
        match id.replica_index() {
            None => Some(&self.primary),
            Some(i) => self.replicas.get(i),
        }
    }

    /// The next replica for a read, honouring weights and skipping unavailable nodes and
    /// nodes known to have replayed less than `min_lsn` (0: any).
    pub fn pick_replica(&self, min_lsn: u64) -> Option<BackendId> {
        self.balancer
            .pick(|i| self.replicas[i].is_available() && self.replicas[i].health.lsn() >= min_lsn)
            .map(|i| self.replicas[i].id)
    }
}

/// Whether an idle server connection is still open: a closed one has EOF (or a FATAL
/// message) waiting to be read, which non-blocking reads see at once. `expect_messages`: the
/// connection may legitimately have unread messages (a pinned session's notifications);
/// otherwise any byte on an idle connection means the server is going away (a shutdown
/// sends a notice or an error, then closes).
pub fn is_alive(conn: &mut ServerConn, expect_messages: bool) -> bool {
    loop {
        conn.rbuf.reserve(1024);
        match conn.rd.try_read_buf(&mut conn.rbuf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return false,
        }
    }
    match conn.rbuf.first() {
        None => true,
        Some(&t) => expect_messages && t != crate::protocol::tag::ERROR_RESPONSE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_not_the_servers_fault() {
        for code in [24, 23, 105] {
            let e = BackendError::Io(std::io::Error::from_raw_os_error(code));
            assert!(e.is_local_exhaustion(), "{e}");
            assert!(!e.is_connection_failure(), "{e}");
        }
        let refused = BackendError::Io(std::io::Error::from_raw_os_error(111));
        assert!(refused.is_connection_failure() && !refused.is_local_exhaustion());
        assert!(BackendError::Timeout.is_connection_failure());
    }

    #[test]
    fn a_refused_node_is_skipped_for_the_backoff_then_tried_again() {
        let epoch = Instant::now()
            .checked_sub(Duration::from_secs(5))
            .expect("uptime over 5 s");
        let config = BackendConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            weight: 1,
            name: None,
        };
        let b = Backend::new(BackendId(1), config, epoch, None);
        assert!(!b.is_marked_down());
        b.mark_down();
        assert!(b.is_marked_down(), "within the backoff");
        // A backoff that ended (1 ms after the epoch, 5 s ago) is cleared on sight.
        b.down_until_ms.store(1, Ordering::Relaxed);
        assert!(!b.is_marked_down());
        assert_eq!(b.down_until_ms.load(Ordering::Relaxed), 0);
        b.mark_down();
        b.mark_up();
        assert!(!b.is_marked_down());
    }
}
