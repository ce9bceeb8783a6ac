//! Pools: server connections per (backend, server user, database), lent to one client for
//! one transaction (or one statement outside a transaction) and returned. In session mode
//! a session holds a place in the pool for each server it uses, for its whole life, so that
//! the pool's `size` bounds its connections too; a connection it leaves behind reset (see
//! [`Pool::checkin_owned`]) waits for the next session with the same startup parameters.
//!
//! A semaphore of `size` permits bounds the connections lent out at once; idle ones wait in
//! a stack (the most recently used first, so surplus connections age out). New connections
//! are opened only when no idle one is left, so lent + idle never exceeds `size`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use super::places::{Place, Places};
use super::{BackendError, BackendId, ConnectParams, ServerConn};

/// The limits of one pool, from `[pool]`.
#[derive(Debug, Clone)]
pub struct PoolLimits {
    pub size: usize,
    pub min_idle: usize,
    pub checkout_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_lifetime: Duration,
    pub idle_timeout: Duration,
    pub max_message: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(
        "no server connection to {backend} became free within {waited_ms} ms (pool size {size})"
    )]
    Timeout {
        backend: String,
        waited_ms: u128,
        size: usize,
    },
    #[error("{0}")]
    Connect(#[from] BackendError),
    /// The caller's `stop` fired while it waited for a free connection: a cancel request.
    #[error("canceled while waiting for a server connection")]
    Canceled,
    /// The caller's `stop` fired while it waited for a free connection: its client left.
    #[error("the client left while waiting for a server connection")]
    ClientGone,
    /// The caller's `stop` fired while it waited for a free connection: the server went down.
    #[error("the server went down while waiting for a server connection")]
    ServerDown,
}

struct Idle {
    conn: Box<ServerConn>,
    since: Instant,
    /// Session mode: the startup parameters the connection was opened with, which its
    /// reset returns it to (empty in transaction mode, whose connections all start bare).
    startup: Vec<(String, String)>,
}

/// Parameter values as the server reports them, by lower-case name and value given.
#[derive(Default)]
struct Spellings(Mutex<HashMap<(String, String), String>>);

impl Spellings {
    fn get(&self, name: &str, given: &str) -> Option<String> {
        lock(&self.0)
            .get(&(name.to_owned(), given.to_owned()))
            .cloned()
    }

    fn learn(&self, name: &str, given: &str, reported: &str) {
        // Bounded in count and size (a startup value can be 10 KB long).
        if name.len() + given.len() + reported.len() > MAX_SPELLING_BYTES {
            return;
        }
        let mut spellings = lock(&self.0);
        // Full (clients giving ever new values, such as an application_name per process):
        // start over rather than keep the first comers for good.
        if spellings.len() >= MAX_SPELLINGS {
            spellings.clear();
        }
        spellings.insert((name.to_owned(), given.to_owned()), reported.to_owned());
    }
}

pub struct Pool {
    pub backend: BackendId,
    address: String,
    name: String,
    params: ConnectParams,
    limits: PoolLimits,
    /// Shared with the pools for the same server, user and database of the other
    /// configurations a reload left running.
    places: Places,
    idle: Mutex<Vec<Idle>>,
    /// ParameterStatus values of the latest connection opened: what a client is told at
    /// login (after a RECONNECT, once a connection of the new generation has opened: a
    /// login does not wait for a server connection to learn them).
    server_params: arc_swap::ArcSwapOption<Vec<(String, String)>>,
    /// Replaced by a reload: connections coming back are closed, not kept idle.
    retired: AtomicBool,
    /// Bumped by the admin console's RECONNECT: connections opened before are closed when
    /// they come back.
    generation: AtomicU64,
    /// How the server reports values logins give in a spelling of their own (TimeZone
    /// `asia/tokyo` is `Asia/Tokyo`, client_encoding `utf-8` is `UTF8`), keyed by the
    /// lower-case name and the value given: learned from a connection they were set on, so
    /// that later logins with the same values are told the server's spelling without a
    /// server round trip.
    spellings: Spellings,
}

/// Spellings a pool remembers at most (then it forgets them all and learns anew).
const MAX_SPELLINGS: usize = 1024;
/// Longest parameter name, value given and value reported a pool remembers, together.
const MAX_SPELLING_BYTES: usize = 256;

/// A connection lent from a pool; give it back with [`Pool::checkin`].
pub struct Lent {
    pub conn: Box<ServerConn>,
    pub permit: Place,
}

impl Pool {
    /// `places`: from [`super::PlaceSets::get`] for this pool's server, user and database.
    pub fn new(
        backend: BackendId,
        address: String,
        name: String,
        params: ConnectParams,
        limits: PoolLimits,
        places: Places,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            backend,
            address,
            name,
            params,
            places,
            limits,
            idle: Mutex::new(Vec::new()),
            server_params: arc_swap::ArcSwapOption::empty(),
            retired: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            spellings: Spellings::default(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// What its connections are opened with.
    pub fn params(&self) -> &ConnectParams {
        &self.params
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn user(&self) -> &str {
        &self.params.user
    }

    pub fn database(&self) -> &str {
        &self.params.database
    }

    pub fn size(&self) -> usize {
        self.limits.size
    }

    pub fn server_params(&self) -> Option<Arc<Vec<(String, String)>>> {
        self.server_params.load_full()
    }

    /// How the server reports parameter `name` (lower case) set to `given`, once learned.
    pub fn spelling(&self, name: &str, given: &str) -> Option<String> {
        self.spellings.get(name, given)
    }

    /// Remember that the server reports parameter `name` (lower case) set to `given` as
    /// `reported`.
    pub fn learn_spelling(&self, name: &str, given: &str, reported: &str) {
        self.spellings.learn(name, given, reported);
    }

    /// Lend a connection: an idle live one, or a new one while under `size`. `now` is a
    /// recent clock reading of the caller's (the start of its request): a lifetime needs no
    /// fresher one, and the clock is read enough per request already. The wait for a free
    /// connection ends `checkout_timeout` after `now`, so a request that tries several
    /// pools waits that long in all, not in each. `stop` ends that wait early with its
    /// error (a cancel request, the client gone); it is not polled when one is free.
    pub async fn checkout(
        &self,
        now: Instant,
        stop: impl Future<Output = CheckoutError>,
    ) -> Result<Lent, CheckoutError> {
        let (permit, now) = self.reserve(now, stop).await?;
        while let Some(idle) = self.pop_idle() {
            let mut conn = idle.conn;
            // (One from before a RECONNECT can be checked in just after it.)
            if self.keeps(&conn, now) && super::is_alive(&mut conn, false) {
                return Ok(Lent { conn, permit });
            }
            debug!(backend = %self.name, "dropping a dead or expired idle server connection");
        }
        let conn = self.connect().await?;
        Ok(Lent { conn, permit })
    }

    /// A place in the pool, waiting for one as [`Pool::checkout`] does (its deadline,
    /// `stop`), with the clock reading to go on with. Session mode holds one for each
    /// connection a session owns, so that sessions, too, use at most `size` connections of
    /// a server at once.
    pub async fn reserve(
        &self,
        now: Instant,
        stop: impl Future<Output = CheckoutError>,
    ) -> Result<(Place, Instant), CheckoutError> {
        // A free permit needs no timer (and the semaphore hands released permits to queued
        // waiters first, so taking one here jumps no queue).
        if let Some(place) = self.try_reserve() {
            return Ok((place, now));
        }
        let deadline = now + self.limits.checkout_timeout;
        let wait =
            tokio::time::timeout_at(deadline.into(), self.places.permits.clone().acquire_owned());
        let waited = tokio::select! {
            biased;
            waited = wait => waited,
            stopped = stop => return Err(stopped),
        };
        let acquired = waited.map_err(|_| CheckoutError::Timeout {
            backend: self.name.clone(),
            waited_ms: self.limits.checkout_timeout.as_millis(),
            size: self.limits.size,
        })?;
        let permit = acquired.expect("pool semaphores are never closed");
        // It waited (up to checkout_timeout): the caller's reading is stale now.
        Ok((self.place(permit), Instant::now()))
    }

    /// A session-mode connection of this pool's server, user and database logged in. (Its
    /// ParameterStatus values are not the pool's: its client's startup settings made them.)
    pub fn note_connected(&self) {
        self.places.reached.store(true, Ordering::Relaxed);
    }

    /// A connection of this pool's server, user and database has logged in: the role and
    /// database exist.
    pub fn has_connected(&self) -> bool {
        self.places.reached.load(Ordering::Relaxed)
    }

    /// Whether `place` is a place in this pool's set (shared across reloads).
    pub fn holds(&self, place: &Place) -> bool {
        place
            .permit
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p.semaphore(), &self.places.permits))
    }

    /// A place in the pool if one is free now.
    pub fn try_reserve(&self) -> Option<Place> {
        let permit = self.places.permits.clone().try_acquire_owned().ok()?;
        Some(self.place(permit))
    }

    fn place(&self, permit: OwnedSemaphorePermit) -> Place {
        Place {
            permit: Some(permit),
            excess: self.places.excess.clone(),
        }
    }

    /// Connections opened from now on carry this; older ones are not reused.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// RECONNECT: the idle connections close now, and those lent out (or owned by a
    /// session) when they come back, so that new ones pick up what PostgreSQL fixes at a
    /// login (a role's attributes and defaults, pg_hba).
    pub fn reconnect(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.discard_idle();
    }

    /// Whether `conn` may wait idle here: not past its lifetime, nor from before a
    /// RECONNECT, nor coming back to a pool a reload replaced.
    fn keeps(&self, conn: &ServerConn, now: Instant) -> bool {
        conn.expires.is_none_or(|at| now < at)
            && conn.generation == self.generation()
            && !self.retired.load(Ordering::Relaxed)
    }

    /// A reload replaced this pool: its idle connections close now, and those still lent
    /// out close when they come back (clients still on the old configuration keep using
    /// it, with new connections).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.discard_idle();
    }

    async fn connect(&self) -> Result<Box<ServerConn>, BackendError> {
        // Boxed: opening a connection is rare, and its state machine (~1.5 KB) inline would
        // make every request's future that large, with its allocation and copies.
        // The generation of before the login: a RECONNECT while it runs may follow a role
        // change this login did not see.
        let generation = self.generation();
        let mut conn = Box::pin(tokio::time::timeout(
            self.limits.connect_timeout,
            ServerConn::connect(
                self.backend,
                &self.address,
                &self.params,
                self.limits.max_message,
            ),
        ))
        .await
        .unwrap_or(Err(BackendError::Timeout))?;
        conn.expires = Instant::now().checked_add(self.limits.max_lifetime);
        conn.generation = generation;
        if generation == self.generation() {
            self.server_params
                .store(Some(Arc::new(conn.params.clone())));
        }
        self.note_connected();
        debug!(backend = %self.name, pid = conn.cancel_key.pid, "pooled server connection opened");
        Ok(conn)
    }

    fn pop_idle(&self) -> Option<Idle> {
        lock(&self.idle).pop()
    }

    /// Take a lent connection back. One past its lifetime is closed instead. `now`: the
    /// caller's latest clock reading, taken when its request's answer was complete (the
    /// bookkeeping after it, at most a round trip, may make the idle time look that much
    /// longer).
    pub fn checkin(&self, lent: Lent, now: Instant) {
        if !self.keeps(&lent.conn, now) {
            return;
        }
        lock(&self.idle).push(Idle {
            conn: lent.conn,
            since: now,
            startup: Vec::new(),
        });
    }

    /// Session mode: keep a connection its session left behind, reset (`DISCARD ALL`) to
    /// the state its `startup` parameters gave it, for the next session with the same
    /// ones; and give back the session's `place`. Both under the idle lock, so that
    /// [`Pool::take_owned`] never counts the connection and its place at once.
    pub fn checkin_owned(
        &self,
        conn: Box<ServerConn>,
        place: Place,
        startup: Vec<(String, String)>,
        now: Instant,
    ) {
        let mut idle = lock(&self.idle);
        // A place given back while a lowered size is still exceeded goes out of the set
        // (see `Place`): its connection goes too.
        let shrinking = self.places.excess.load(Ordering::Relaxed) > 0;
        if !self.keeps(&conn, now) || shrinking {
            return;
        }
        idle.push(Idle {
            conn,
            since: now,
            startup,
        });
        drop(place);
    }

    /// Session mode, for a session that has just taken its place: the live idle connection
    /// last left by a session with the same `startup` parameters, if any. Idle connections
    /// count against `size` beside the places held: as many as the places held leave no
    /// room for are closed, the oldest first, so that a session opening its own connection
    /// never makes them more than `size`.
    pub fn take_owned(
        &self,
        startup: &[(String, String)],
        now: Instant,
    ) -> Option<Box<ServerConn>> {
        let mut idle = lock(&self.idle);
        let mut taken = None;
        while let Some(at) = idle.iter().rposition(|i| i.startup == startup) {
            let mut conn = idle.remove(at).conn;
            if self.keeps(&conn, now) && super::is_alive(&mut conn, false) {
                taken = Some(conn);
                break;
            }
            debug!(backend = %self.name, "dropping a dead or expired idle server connection");
        }
        // With one taken too: a reload that lowered the size can leave more idle than room.
        let room = self
            .places
            .permits
            .available_permits()
            .saturating_sub(self.places.excess.load(Ordering::Relaxed));
        if idle.len() > room {
            let surplus = idle.len() - room;
            idle.drain(..surplus);
        }
        taken
    }

    /// Close idle connections past `idle_timeout` (keeping `min_idle`), then open
    /// connections up to `min_idle`. Run periodically by the owner of the pools.
    pub async fn maintain(&self) {
        {
            let mut idle = lock(&self.idle);
            let keep = self.limits.min_idle;
            let timeout = self.limits.idle_timeout;
            // Mostly oldest first from the bottom (warm connections go in there too), so
            // every expired one is looked at, not just those below the first fresh one.
            let mut excess = idle.len().saturating_sub(keep);
            idle.retain(|i| {
                let drop = excess > 0 && i.since.elapsed() >= timeout;
                excess -= usize::from(drop);
                !drop
            });
        }
        while lock(&self.idle).len() < self.limits.min_idle
            && self.places.permits.available_permits() > lock(&self.idle).len()
        {
            // Held while connecting: sessions that take the other permits meanwhile and
            // open connections of their own must not push lent + idle past `size`.
            let Some(permit) = self.try_reserve() else {
                break;
            };
            match self.connect().await {
                Ok(conn) => {
                    let mut idle = lock(&self.idle);
                    // Lent by sessions: size - available - 1 (this permit).
                    if idle.len() > self.places.permits.available_permits() {
                        break;
                    }
                    idle.insert(
                        0,
                        Idle {
                            conn,
                            since: Instant::now(),
                            startup: Vec::new(),
                        },
                    );
                    drop(permit);
                }
                Err(e) => {
                    warn!(backend = %self.name, error = %e, "cannot open warm server connections");
                    break;
                }
            }
        }
    }

    /// Close every idle connection: after one to this server failed, the others (opened
    /// before the same failure) are most likely dead too.
    pub fn discard_idle(&self) {
        lock(&self.idle).clear();
    }

    /// Connections lent out now and idle now (for tests and the admin console).
    pub fn counts(&self) -> (usize, usize) {
        let idle = lock(&self.idle).len();
        let total = self.limits.size + self.places.excess.load(Ordering::Relaxed);
        (
            total.saturating_sub(self.places.permits.available_permits()),
            idle,
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only pushes and pops happen under this lock: a panic cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_are_bounded_in_size_and_count() {
        let s = Spellings::default();
        s.learn("timezone", "asia/tokyo", "Asia/Tokyo");
        assert_eq!(
            s.get("timezone", "asia/tokyo").as_deref(),
            Some("Asia/Tokyo")
        );
        assert_eq!(s.get("timezone", "Asia/Tokyo"), None);
        let long = "x".repeat(MAX_SPELLING_BYTES);
        s.learn("application_name", &long, &long);
        assert_eq!(s.get("application_name", &long), None);
        for i in 0..MAX_SPELLINGS {
            s.learn("application_name", &format!("app {i}"), &format!("app {i}"));
        }
        // Full at the last one: it started over, keeping the newest.
        let last = format!("app {}", MAX_SPELLINGS - 1);
        assert_eq!(
            s.get("application_name", &last).as_deref(),
            Some(last.as_str())
        );
        assert_eq!(s.get("timezone", "asia/tokyo"), None);
        assert!(lock(&s.0).len() < MAX_SPELLINGS);
    }
}
