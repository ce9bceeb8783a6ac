//! Pools: server connections per (backend, server user, database), lent to one client for
//! one transaction (or one statement outside a transaction) and returned. In session mode
//! a pool only counts places: each session opens its own connections, holding a place for
//! each, so that the pool's `size` bounds them too.
//!
//! A semaphore of `size` permits bounds the connections lent out at once; idle ones wait in
//! a stack (the most recently used first, so surplus connections age out). New connections
//! are opened only when no idle one is left, so lent + idle never exceeds `size`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

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
}

pub struct Pool {
    pub backend: BackendId,
    address: String,
    name: String,
    params: ConnectParams,
    limits: PoolLimits,
    permits: Arc<Semaphore>,
    /// Permits over `size` still to be taken out of `permits` as they come back (a reload
    /// lowered the size while they were in use). Shared, like `permits`, with the pools
    /// this one succeeded or is succeeded by.
    excess: Arc<AtomicUsize>,
    idle: Mutex<Vec<Idle>>,
    /// ParameterStatus values of the first connection: what a client is told at login.
    server_params: OnceLock<Vec<(String, String)>>,
    reached: AtomicBool,
}

/// A pool's permits, handed from a pool to its successor at a reload.
pub struct Places {
    permits: Arc<Semaphore>,
    excess: Arc<AtomicUsize>,
    /// The pool's size: the permits number `size + excess` in all.
    size: usize,
    /// The pool had logged in to its server (see [`Pool::has_connected`]).
    reached: bool,
}

impl Places {
    /// Bring the permits to `size` in all: at once when that adds some (clients waiting for
    /// one get theirs now); when it removes some, those free now go at once and the rest as
    /// they come back (see [`Place`]).
    pub fn resize(&mut self, size: usize) {
        // Taken over whole: a place dropped meanwhile goes back as usual, and is counted in.
        let total = self.size + self.excess.swap(0, Ordering::Relaxed);
        if total <= size {
            self.permits.add_permits(size - total);
        } else {
            let surplus = total - size;
            let forgotten = self.permits.forget_permits(surplus);
            self.excess
                .fetch_add(surplus - forgotten, Ordering::Relaxed);
        }
        self.size = size;
    }
}

/// A place in a pool. Dropped, it goes back to the pool, or out of it while the pool has
/// more permits than its size (after a reload lowered it), so that the lower size holds
/// also while clients queue for places.
pub struct Place {
    permit: Option<OwnedSemaphorePermit>,
    excess: Arc<AtomicUsize>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take()
            && self
                .excess
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        {
            permit.forget();
        }
    }
}

/// A connection lent from a pool; give it back with [`Pool::checkin`].
pub struct Lent {
    pub conn: Box<ServerConn>,
    pub permit: Place,
}

impl Pool {
    /// `places`: the permits of the pool this one succeeds at a reload (see
    /// [`Pool::places`]), so that connections the old pool's clients still hold count
    /// against this one's `size`.
    pub fn new(
        backend: BackendId,
        address: String,
        name: String,
        params: ConnectParams,
        limits: PoolLimits,
        places: Option<Places>,
    ) -> Arc<Pool> {
        let (permits, excess, reached) = match places {
            None => (
                Arc::new(Semaphore::new(limits.size)),
                Arc::new(AtomicUsize::new(0)),
                false,
            ),
            Some(mut places) => {
                places.resize(limits.size);
                (places.permits, places.excess, places.reached)
            }
        };
        Arc::new(Pool {
            backend,
            address,
            name,
            params,
            permits,
            excess,
            limits,
            idle: Mutex::new(Vec::new()),
            server_params: OnceLock::new(),
            reached: AtomicBool::new(reached),
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

    pub fn server_params(&self) -> Option<&[(String, String)]> {
        self.server_params.get().map(Vec::as_slice)
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
            if conn.expires.is_none_or(|at| now < at) && super::is_alive(&mut conn, false) {
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
        let wait = tokio::time::timeout_at(deadline.into(), self.permits.clone().acquire_owned());
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
        self.reached.store(true, Ordering::Relaxed);
    }

    /// A connection of this pool's server, user and database has logged in: the role and
    /// database exist.
    pub fn has_connected(&self) -> bool {
        self.reached.load(Ordering::Relaxed)
    }

    /// What a successor of this pool takes over (see [`Pool::new`]).
    pub fn places(&self) -> Places {
        Places {
            permits: self.permits.clone(),
            excess: self.excess.clone(),
            size: self.limits.size,
            reached: self.has_connected(),
        }
    }

    /// Whether `place` is a place in this pool (or in one it succeeded).
    pub fn holds(&self, place: &Place) -> bool {
        place
            .permit
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p.semaphore(), &self.permits))
    }

    /// A place in the pool if one is free now.
    pub fn try_reserve(&self) -> Option<Place> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.place(permit))
    }

    fn place(&self, permit: OwnedSemaphorePermit) -> Place {
        Place {
            permit: Some(permit),
            excess: self.excess.clone(),
        }
    }

    async fn connect(&self) -> Result<Box<ServerConn>, BackendError> {
        // Boxed: opening a connection is rare, and its state machine (~1.5 KB) inline would
        // make every request's future that large, with its allocation and copies.
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
        let _ = self.server_params.set(conn.params.clone());
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
        if lent.conn.expires.is_some_and(|at| now >= at) {
            return;
        }
        lock(&self.idle).push(Idle {
            conn: lent.conn,
            since: now,
        });
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
            && self.permits.available_permits() > lock(&self.idle).len()
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
                    if idle.len() > self.permits.available_permits() {
                        break;
                    }
                    idle.insert(
                        0,
                        Idle {
                            conn,
                            since: Instant::now(),
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
        let total = self.limits.size + self.excess.load(Ordering::Relaxed);
        (total.saturating_sub(self.permits.available_permits()), idle)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only pushes and pops happen under this lock: a panic cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload hands a pool's permits to its successor: a larger size adds the difference
    /// at once; a smaller one takes out what is free now, and the rest as places in use
    /// are dropped, even with clients queued for them.
    #[test]
    fn places_resize_to_the_new_size() {
        let permits = Arc::new(Semaphore::new(3));
        let excess = Arc::new(AtomicUsize::new(0));
        let place = |permits: &Arc<Semaphore>| Place {
            permit: Some(permits.clone().try_acquire_owned().unwrap()),
            excess: excess.clone(),
        };
        let held = [place(&permits), place(&permits)];
        let mut places = Places {
            permits: permits.clone(),
            excess: excess.clone(),
            size: 3,
            reached: true,
        };
        places.resize(5);
        assert_eq!(permits.available_permits(), 3);
        // Down to 1 with 2 in use: the 3 free go, and 1 of those in use is one too many.
        places.resize(1);
        assert_eq!(
            (permits.available_permits(), excess.load(Ordering::Relaxed)),
            (0, 1)
        );
        let [first, second] = held;
        drop(first);
        assert_eq!(permits.available_permits(), 0, "the first one back goes");
        drop(second);
        assert_eq!(permits.available_permits(), 1, "the next one is the size");
        places.resize(2);
        assert_eq!(permits.available_permits(), 2);
    }
}
