//! The session's server connections: getting one for a route (connecting in session mode,
//! borrowing from a pool in transaction mode), bringing it to the session's settings, and
//! giving pooled ones back when no transaction or session-bound state holds them.

use tracing::{debug, warn};

use super::cached::WriteSet;
use super::client::ClientConn;
use super::relay::{Refusal, replica_cannot_serve};
use super::{Consistency, Session};
use crate::backend::{BackendError, BackendId, CheckoutError, Lent, Place, Pool, Role, ServerConn};
use crate::config::{PoolMode, ReadYourWrites};
use crate::error::{Error, Result};
use crate::protocol::TxStatus;
use crate::router::Route;
use crate::state::SessionSlot;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The commit-facts query the relay sent behind a request that ends a writing
/// transaction, so that it costs no round trip of its own, and its answer.
#[derive(Default)]
pub(super) enum CommitRead {
    #[default]
    NotSent,
    Sent,
    /// Boxed: every session carries this field, and an error is large.
    Answer(Box<std::result::Result<Vec<Option<String>>, BackendError>>),
}

/// What the primary said right after a commit.
pub(super) struct CommitFacts {
    pub lsn: u64,
    /// Tables a foreign key's ON DELETE / ON UPDATE action may have changed along with the
    /// written ones (transitively).
    pub dependents: Vec<String>,
    /// A user trigger sits on a written or dependent table: it may have written anything.
    pub triggers: bool,
}

/// Where a commit just acknowledged ends in the primary's WAL, as text: the *insert*
/// position, not the written one (with `synchronous_commit = off` a COMMIT returns before
/// its record is written, and a replica that reached the write position could lack it).
/// At a page boundary the insert position points past the next page's header (24 bytes,
/// 40 at a segment start), where no record ends and no replica's replay position stops:
/// such a position is taken back to the boundary.
pub(super) const COMMIT_POSITION_SQL: &str = "(SELECT (CASE \
    WHEN o % pg_catalog.current_setting('wal_block_size')::numeric = 24 THEN l - 24 \
    WHEN o % pg_catalog.pg_size_bytes(pg_catalog.current_setting('wal_segment_size')) = 40 \
      THEN l - 40 \
    ELSE l END)::text \
  FROM (SELECT l, l - '0/0'::pg_lsn \
        FROM (SELECT pg_catalog.pg_current_wal_insert_lsn()) i(l)) x(l, o))";

impl Session {
    /// A connection for `route`, connected and carrying the session's settings.
    pub(super) async fn acquire(&mut self, route: Route) -> Result<BackendId> {
        match route {
            Route::Transaction => {
                let id = self
                    .tx_conn
                    .filter(|b| self.conns[b.0 as usize].is_some())
                    .ok_or_else(|| {
                        Error::NoServer("the transaction's server connection was lost".into())
                    })?;
                Ok(id)
            }
            Route::Primary => {
                if self.runtime.backends.primary.health.role() == Role::Standby {
                    return Err(Error::PrimaryInRecovery);
                }
                // A pinned session's connection from before holds its state (not one it is
                // about to pin: that one is fresh from the pool).
                let holds_state = self.pinned && self.conns[0].is_some();
                self.ensure_conn(BackendId::PRIMARY).await?;
                self.sync_settings(BackendId::PRIMARY, holds_state).await?;
                Ok(BackendId::PRIMARY)
            }
            Route::Replica => {
                let runtime = self.runtime.clone();
                let need = self.required_lsn();
                // Session mode: the first replica found with no place free.
                let mut busy = None;
                for _ in 0..runtime.backends.replicas.len() {
                    let Some(id) = runtime.backends.pick_replica(need) else {
                        break;
                    };
                    if !self.may_take_replica(id) {
                        busy.get_or_insert(id);
                        continue;
                    }
                    match self.prepare_replica(id).await {
                        Ok(()) => {
                            self.last_replica = Some(id);
                            return Ok(id);
                        }
                        Err(_) if self.replicas_refused => {
                            return Box::pin(self.acquire(Route::Primary)).await;
                        }
                        // A busy replica is not an unusable one: the read waits for it (one
                        // checkout timeout in all) rather than take the next replica's turn
                        // or the primary's connections, which writes need.
                        Err(e @ (Error::PoolTimeout(_) | Error::Canceled | Error::ClientGone)) => {
                            return Err(e);
                        }
                        Err(e) => {
                            if let Some(b) = runtime.backends.get(id) {
                                warn!(backend = %b.name(), error = ?e.to_string(), "replica unusable, trying another");
                                if matches!(e, Error::NoServer(_)) {
                                    b.mark_down();
                                }
                            }
                        }
                    }
                }
                if let Some(first_busy) = busy {
                    // Session mode, the replicas' places all taken: a server the session
                    // holds a place on serves the read. Only a session holding none it can
                    // read from waits, for the first one's.
                    let id = match self.read_fallback(need) {
                        Some(BackendId::PRIMARY) => {
                            return Box::pin(self.acquire(Route::Primary)).await;
                        }
                        Some(held) => held,
                        None => first_busy,
                    };
                    match self.prepare_replica(id).await {
                        Ok(()) => {}
                        // The health checks found the replica waited for down (its wait
                        // ended for that): the read goes where it would have gone had it
                        // come a moment later, which is no longer that replica.
                        Err(Error::NoServer(_))
                            if runtime
                                .backends
                                .get(id)
                                .is_some_and(|b| b.checks_say_down()) =>
                        {
                            return Box::pin(self.acquire(Route::Replica)).await;
                        }
                        Err(e) => return Err(e),
                    }
                    self.last_replica = Some(id);
                    return Ok(id);
                }
                let replica_up = runtime.backends.replicas.iter().any(|r| r.is_available());
                if runtime.config.routing.fallback_to_primary || (need > 0 && replica_up) {
                    // No replica has replayed this session's last write yet: the primary has.
                    Box::pin(self.acquire(Route::Primary)).await
                } else {
                    Err(Error::NoServer(
                        "no replica is available for reads and fallback_to_primary is off".into(),
                    ))
                }
            }
        }
    }

    async fn prepare_replica(&mut self, id: BackendId) -> Result<()> {
        self.ensure_conn(id).await?;
        if let Err(e) = self.sync_settings(id, false).await {
            // A setting the replica refuses (e.g. read-write defaults during recovery):
            // this connection cannot serve the session.
            self.release(id, false);
            if let Error::SettingsRefused(fields) = &e
                && replica_cannot_serve(fields) == Some(Refusal::Session)
            {
                // No replica will: a serializable default of the role or database made the
                // replay fail. The session's reads go to the primary.
                debug!(backend = ?id, "replicas refuse this session's default isolation; its reads go to the primary");
                self.replicas_refused = true;
            }
            return Err(e);
        }
        Ok(())
    }

    /// The replica used last, when it is still available; else the next one. Requests that
    /// only prepare or describe go here, so they do not use up a turn of the round robin.
    pub(super) async fn acquire_last_replica(&mut self) -> Result<BackendId> {
        let need = self.required_lsn();
        if let Some(id) = self.last_replica
            && self
                .runtime
                .backends
                .get(id)
                .is_some_and(|b| b.is_available() && b.health.lsn() >= need)
            && self.may_take_replica(id)
            && self.prepare_replica(id).await.is_ok()
        {
            return Ok(id);
        }
        self.acquire(Route::Replica).await
    }

    /// Make sure `conns[id]` holds a live connection.
    async fn ensure_conn(&mut self, id: BackendId) -> Result<()> {
        self.ensure_live_conn(id).await?;
        // One that reported backslash escapes at its login (a role default changed since
        // the session's) counts as if this session had turned them on.
        if self.conns[id.0 as usize]
            .as_ref()
            .is_some_and(|c| c.backslash_escapes)
        {
            self.backslash_escapes_on(id);
        }
        Ok(())
    }

    async fn ensure_live_conn(&mut self, id: BackendId) -> Result<()> {
        let slot = id.0 as usize;
        if let Some(conn) = self.conns[slot].as_mut() {
            // Only a pinned primary connection may hold unread messages (notifications).
            let expect_messages = id.is_primary() && self.pinned;
            if crate::backend::is_alive(conn, expect_messages) {
                return Ok(());
            }
            self.conns[slot] = None;
            // A session keeps its place for the connection that replaces this one.
            if self.mode == PoolMode::Transaction {
                self.permits[slot] = None;
            }
            if id.is_primary() && self.pinned {
                self.pinned_state_lost = true;
            }
        }
        if id.is_primary() && self.pinned_state_lost {
            // A fresh connection would not hold what the client believes it holds: the
            // session ends, as its direct connection would have.
            return Err(Error::NoServer(
                "the primary connection holding this session's state (temporary tables, LISTEN, locks) was lost".into(),
            ));
        }
        match self.mode {
            PoolMode::Session => {
                // A session holds its place in a server's pool from its first use of that
                // server to its end (whatever happens to the connections in between); the
                // first time, it may have to wait for another session to end.
                if self.permits[slot].is_none() {
                    self.permits[slot] = Some(self.take_place(id).await?);
                }
                let left = self.pools[slot]
                    .as_ref()
                    .and_then(|pool| pool.take_owned(&self.connect.startup, self.clock));
                if let Some(conn) = left {
                    debug!(backend = ?id, pid = conn.cancel_key.pid, "reusing a server connection a session left behind");
                    self.conns[slot] = Some(conn);
                    return Ok(());
                }
                // The generation of before the login (see `Pool::connect`).
                let generation = self.pools[slot].as_ref().map(|p| p.generation());
                let mut conn = self.connect_backend(id).await?;
                if let Some(pool) = &self.pools[slot] {
                    pool.note_connected();
                    conn.generation = generation.unwrap_or_default();
                }
                self.conns[slot] = Some(conn);
            }
            PoolMode::Transaction => {
                let lent = self.checkout(id).await?;
                self.conns[slot] = Some(lent.conn);
                self.permits[slot] = Some(lent.permit);
            }
        }
        Ok(())
    }

    /// Session mode: a place for this session in `id`'s pool, waiting for another session
    /// to end if need be. Not for a server the health checks find down, before or during
    /// the wait: sessions whose connections died with it may hold every place without
    /// knowing yet, and a login can go on to a replica (`login_server_params`), a read to
    /// another server.
    async fn take_place(&mut self, id: BackendId) -> Result<Place> {
        let pool = self.pool_of(id)?;
        let runtime = self.runtime.clone();
        let backend = runtime
            .backends
            .get(id)
            .ok_or_else(|| Error::NoServer(format!("unknown backend {id:?}")))?;
        if backend.checks_say_down() {
            return pool
                .try_reserve()
                .ok_or_else(|| self.checkout_error(id, CheckoutError::ServerDown));
        }
        let stop = checkout_stop(&self.slot, &mut self.client, false);
        let stop = async {
            let went_down = async {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if backend.checks_say_down() {
                        return CheckoutError::ServerDown;
                    }
                }
            };
            tokio::select! {
                e = stop => e,
                e = went_down => e,
            }
        };
        let reserved = pool.reserve(self.clock, stop).await;
        Ok(reserved.map_err(|e| self.checkout_error(id, e))?.0)
    }

    /// Session mode: whether a read may use replica `id` without waiting for a place in its
    /// pool (a place taken here is kept for the connection [`Session::ensure_conn`] opens).
    /// A session that holds a place it can read from never waits for another: the sessions
    /// waiting for places may be the ones holding all of this replica's.
    fn may_take_replica(&mut self, id: BackendId) -> bool {
        let slot = id.0 as usize;
        if self.mode != PoolMode::Session
            || self.conns[slot].is_some()
            || self.permits[slot].is_some()
        {
            return true;
        }
        let Ok(pool) = self.pool_of(id) else {
            return true;
        };
        self.permits[slot] = pool.try_reserve();
        self.permits[slot].is_some()
    }

    /// Session mode: a server the session holds a place on that can serve a read needing
    /// `need` now: a replica in rotation that has replayed it, else a primary that is up
    /// (and not in recovery, where the read would fail).
    fn read_fallback(&self, need: u64) -> Option<BackendId> {
        let backends = &self.runtime.backends;
        let held = |id: BackendId| self.permits.get(id.0 as usize).is_some_and(Option::is_some);
        backends
            .replicas
            .iter()
            .map(|r| r.id)
            .filter(|&id| held(id))
            .find(|&id| {
                backends
                    .get(id)
                    .is_some_and(|b| b.is_available() && b.health.lsn() >= need)
            })
            .or_else(|| {
                (held(BackendId::PRIMARY)
                    && !backends.primary.is_unreachable()
                    && backends.primary.health.role() != Role::Standby)
                    .then_some(BackendId::PRIMARY)
            })
    }

    /// The pool of `id` for this session's login, looked up once.
    fn pool_of(&mut self, id: BackendId) -> Result<Arc<Pool>> {
        let slot = id.0 as usize;
        if let Some(p) = &self.pools[slot] {
            return Ok(p.clone());
        }
        let p = self
            .runtime
            .pool(id, &self.connect)
            .ok_or_else(|| Error::NoServer(format!("unknown backend {id:?}")))?;
        self.pools[slot] = Some(p.clone());
        Ok(p)
    }

    fn checkout_error(&self, id: BackendId, e: CheckoutError) -> Error {
        match e {
            e @ CheckoutError::Timeout { .. } => Error::PoolTimeout(e.to_string()),
            CheckoutError::Connect(e) => self.connect_error(id, e),
            CheckoutError::Canceled => Error::Canceled,
            CheckoutError::ClientGone => Error::ClientGone,
            CheckoutError::ServerDown => {
                let name = self.runtime.backends.get(id).map(|b| b.name());
                Error::NoServer(format!(
                    "{} is down, and its pool's places are all held",
                    name.unwrap_or_default()
                ))
            }
        }
    }

    /// Borrow a connection from the pool of `id` (transaction mode).
    pub(super) async fn checkout(&mut self, id: BackendId) -> Result<Lent> {
        let pool = self.pool_of(id)?;
        let backend = self.runtime.backends.get(id);
        let stop = checkout_stop(&self.slot, &mut self.client, self.checkout_no_wait);
        match pool.checkout(self.clock, stop).await {
            Ok(lent) => {
                if let Some(b) = backend {
                    b.mark_up();
                }
                Ok(lent)
            }
            Err(e) => Err(self.checkout_error(id, e)),
        }
    }
    /// Open a connection owned by this session alone (session mode).
    pub(super) async fn connect_backend(&self, id: BackendId) -> Result<Box<ServerConn>> {
        let backend = self
            .runtime
            .backends
            .get(id)
            .ok_or_else(|| Error::NoServer(format!("unknown backend {id:?}")))?;
        let timeout = self.runtime.config.pool.connect_timeout();
        let max = self.runtime.config.proxy.max_message_bytes;
        let addr = backend.address();
        // Boxed, as in the pool: rare, and large inline.
        let connect = ServerConn::connect(id, &addr, &self.connect, max);
        let result = Box::pin(tokio::time::timeout(timeout, connect))
            .await
            .unwrap_or(Err(BackendError::Timeout));
        match result {
            Ok(mut c) => {
                // Pooled at the session's end, it ages like a transaction-mode one.
                let lifetime = self.runtime.config.pool.max_lifetime_ms;
                c.expires = std::time::Instant::now()
                    .checked_add(std::time::Duration::from_millis(lifetime));
                backend.mark_up();
                debug!(backend = %backend.name(), pid = c.cancel_key.pid, "server connection opened");
                Ok(c)
            }
            Err(e) => Err(self.connect_error(id, e)),
        }
    }

    fn connect_error(&self, id: BackendId, e: BackendError) -> Error {
        let Some(backend) = self.runtime.backends.get(id) else {
            return Error::Backend(e);
        };
        if e.is_connection_failure() {
            backend.mark_down();
            self.discard_idle(id);
        }
        if e.is_local_exhaustion() {
            // Not NoServer, which marks a replica down where it is caught.
            warn!(backend = %backend.name(), error = %e, "pgsplit is out of file descriptors: raise its open-file limit or lower max_client_connections");
            return Error::OutOfDescriptors(e.to_string());
        }
        match e {
            BackendError::Server(_) => Error::Backend(e),
            other => Error::NoServer(format!("{}: {other}", backend.name())),
        }
    }

    /// Replay the session's settings on a connection that does not have them yet. A
    /// connection that turns out dead at the replay (ended while idle in the pool: a server
    /// timeout such as a previous client's `idle_session_timeout`, an administrator's
    /// pg_terminate_backend) is replaced once: none of the request was sent, and one dead
    /// connection says nothing about the server.
    /// `holds_state`: the connection holds the session's state (pinned), which a fresh one
    /// would not.
    pub(super) async fn sync_settings(&mut self, id: BackendId, holds_state: bool) -> Result<()> {
        // The usual case, the connection is current, without the replay's state machine.
        match self.conns[id.0 as usize].as_ref() {
            None => return Ok(()),
            Some(c)
                if c.settings_generation
                    .is_some_and(|g| self.settings.is_current(g)) =>
            {
                return Ok(());
            }
            Some(_) => {}
        }
        match self.try_sync_settings(id).await? {
            None => Ok(()),
            Some(e) if holds_state => {
                // It held the session's state (temporary tables, LISTEN, locks), which a
                // fresh connection would not: the session ends, as for any such loss.
                self.pinned_state_lost = true;
                Err(self.connect_error(id, e))
            }
            Some(e) => {
                debug!(backend = ?id, error = %e, "server connection found dead at the settings replay; taking another");
                self.ensure_conn(id).await?;
                match self.try_sync_settings(id).await? {
                    None => Ok(()),
                    Some(e) => Err(self.connect_error(id, e)),
                }
            }
        }
    }

    /// [`sync_settings`](Self::sync_settings) once: `Some` with the failure when the
    /// connection was lost (it is closed).
    async fn try_sync_settings(&mut self, id: BackendId) -> Result<Option<BackendError>> {
        let max = self.runtime.config.proxy.max_message_bytes;
        let Some(conn) = self.conns[id.0 as usize].as_mut() else {
            return Ok(None);
        };
        // A connection's tag names the settings it has. One naming these settings keeps its
        // tag: that way the tags in a pool settle on the few generations that replayed onto
        // fresh connections, which every session soon knows (see `remember_equal`).
        if let Some(generation) = conn.settings_generation
            && self.settings.is_current(generation)
        {
            return Ok(None);
        }
        // No difference means the connection has exactly the session's settings already
        // (the usual case: sessions of one application share their startup settings), so
        // nothing is copied; only a replay changes them.
        match self.settings.diff_sql(&conn.settings) {
            None => match conn.settings_generation {
                Some(generation) => self.settings.remember_equal(generation),
                None => conn.settings_generation = Some(self.settings.generation),
            },
            Some(sql) => {
                debug!(backend = ?id, "replaying session settings");
                // Bounded: a server that stopped answering must not hold the session.
                let limit = self.runtime.config.pool.connect_timeout();
                let result = tokio::time::timeout(limit, conn.run_internal(&sql, max))
                    .await
                    .unwrap_or(Err(BackendError::Timeout));
                if let Err(e) = result {
                    // Which settings the connection has now is unknown, or (refused by the
                    // server, the replay rolled back whole) the refusal may come from
                    // something on this very connection: it serves no one else.
                    self.release(id, false);
                    return match e {
                        // The server ending the connection (57P05 idle-session timeout,
                        // 57P01 terminated), not refusing a setting, which is an ERROR.
                        BackendError::Server(fields) if fields.severity == "FATAL" => {
                            Ok(Some(BackendError::Server(fields)))
                        }
                        BackendError::Server(fields) => Err(Error::SettingsRefused(fields)),
                        // Not a timeout: a server that stopped answering would be waited for
                        // twice.
                        e @ (BackendError::Io(_) | BackendError::Closed)
                            if e.is_connection_failure() =>
                        {
                            Ok(Some(e))
                        }
                        e if e.is_connection_failure() => Err(self.connect_error(id, e)),
                        e => Err(Error::Backend(e)),
                    };
                }
                conn.settings = self.settings.effective();
                conn.settings_generation = Some(self.settings.generation);
            }
        }
        Ok(None)
    }

    /// Give back the connections nothing holds any more (transaction mode, between
    /// transactions): all but a pinned session's primary connection.
    pub(super) fn release_idle(&mut self) {
        if self.mode != PoolMode::Transaction || self.tx != TxStatus::Idle {
            return;
        }
        for slot in 0..self.conns.len() {
            if slot == 0 && self.pinned {
                continue;
            }
            let reusable = !std::mem::take(&mut self.tainted[slot]);
            self.release(BackendId(slot as u32), reusable);
        }
    }

    /// Return (`reusable`; in session mode: keep) or close the connection in `id`'s slot.
    pub(super) fn release(&mut self, id: BackendId, reusable: bool) {
        let slot = id.0 as usize;
        if self.mode == PoolMode::Session {
            // A session keeps its place in the pool for the connection that replaces this
            // one: a waiting login must not take it and leave this session to queue for
            // its own next statement.
            if !reusable {
                self.conns[slot] = None;
            }
            return;
        }
        let conn = self.conns[slot].take();
        let permit = self.permits[slot].take();
        if let (Some(conn), Some(permit), Some(pool), true) =
            (conn, permit, &self.pools[slot], reusable)
        {
            let lent = Lent { conn, permit };
            // A cancel request of this session still on its way would reach the next
            // client's query (the set_cancel_target(None) before made sure no new one can
            // start): the connection, and its pool slot, wait until it has been delivered,
            // as PgBouncer holds such a connection back; closed if that takes too long.
            if lent.conn.cancels.load(Ordering::SeqCst) > 0 {
                debug!(backend = ?id, "a cancel request is on its way: connection held back");
                let pool = pool.clone();
                let limit = self.runtime.config.pool.connect_timeout();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + limit;
                    while lent.conn.cancels.load(Ordering::SeqCst) > 0 {
                        if tokio::time::Instant::now() >= deadline {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                    pool.checkin(lent, std::time::Instant::now());
                });
                return;
            }
            pool.checkin(lent, self.clock);
        }
    }
}

impl Session {
    /// Session mode, at the session's end: reset each connection it leaves at rest and keep
    /// it, and its place, for the next session with the same startup parameters (see
    /// [`Pool::checkin_owned`]). Those it does not keep are closed by the caller.
    pub(super) async fn leave_owned(&mut self) {
        // Inside a transaction block the server refuses DISCARD ALL (and the block's work
        // must be rolled back by closing); a shutdown does not wait for resets. A custom
        // setting's name would stay defined as `''` (a new connection has none): a policy's
        // `current_setting('app.tenant', true)::uuid` would fail in the next session.
        if self.mode != PoolMode::Session
            || self.tx != TxStatus::Idle
            || self.shared.is_draining()
            || self.state_outlives_reset
        {
            return;
        }
        let max = self.runtime.config.proxy.max_message_bytes;
        let limit = self.runtime.config.pool.connect_timeout();
        for slot in 0..self.conns.len() {
            // What DISCARD ALL cannot take back (a LOADed library, dblink connections) is
            // on the primary connection. A cancel request still on its way could reach the
            // next session's query.
            let kept_state = self.tainted[slot] || (slot == 0 && self.pinned_for_good);
            let canceling = self.conns[slot]
                .as_ref()
                .is_some_and(|c| c.cancels.load(Ordering::SeqCst) > 0);
            if kept_state || canceling {
                continue;
            }
            let (Some(pool), Some(place)) = (self.pools[slot].clone(), self.permits[slot].take())
            else {
                continue;
            };
            let Some(mut conn) = self.conns[slot].take() else {
                continue;
            };
            let reset = tokio::time::timeout(limit, conn.reset_session(max)).await;
            match reset {
                Ok(Ok(())) => {
                    let startup = self.connect.startup.clone();
                    pool.checkin_owned(conn, place, startup, std::time::Instant::now());
                }
                Ok(Err(e)) => {
                    debug!(backend = slot, error = %e, "server connection not kept: its reset failed")
                }
                Err(_) => debug!(
                    backend = slot,
                    "server connection not kept: its reset timed out"
                ),
            }
        }
    }

    /// The connection in `id`'s slot was lost (it went with the request in flight): its
    /// pool slot goes with it in transaction mode; a session keeps its place (see
    /// [`Session::release`]).
    pub(super) fn connection_lost(&mut self, id: BackendId) {
        if self.mode == PoolMode::Transaction {
            self.permits[id.0 as usize] = None;
        }
    }

    /// Drop the idle pooled connections to `id` after one of them failed.
    pub(super) fn discard_idle(&self, id: BackendId) {
        if let Some(pool) = &self.pools[id.0 as usize] {
            pool.discard_idle();
        }
    }

    /// The WAL position a replica must have replayed to serve this session's reads.
    /// How far a replica must have replayed to serve this session's next read: its own last
    /// write (read-your-writes), and for a cache fill the last write to the cached tables.
    pub(super) fn required_lsn(&self) -> u64 {
        let own = match self.consistency {
            Consistency::ReadYourWrites => self.own_write_lsn(),
            Consistency::Eventual => 0,
        };
        let user = match &self.user_writes {
            Some(floor) if self.shares_writes() => floor.load(Ordering::Relaxed),
            _ => 0,
        };
        own.max(user).max(self.read_floor)
    }

    /// Whether this session's reads must see, and its commits tell, the writes of every
    /// session of its user and database (`read_your_writes = "user"`).
    pub(super) fn shares_writes(&self) -> bool {
        self.consistency == Consistency::ReadYourWrites
            && self.runtime.config.routing.read_your_writes == ReadYourWrites::User
            && self.user_writes.is_some()
    }

    /// The position of this session's last write. When it could not be read (the
    /// connection broke right after a COMMIT), replicas wait for a position the health
    /// checker read after that moment: a check that started after it.
    fn own_write_lsn(&self) -> u64 {
        match self.min_lsn_unknown_since {
            Some(samples) if self.min_lsn == u64::MAX => {
                let health = &self.runtime.backends.primary.health;
                if health.lsn_samples() >= samples + 2 {
                    health.lsn()
                } else {
                    u64::MAX
                }
            }
            _ => self.min_lsn,
        }
    }

    /// The query that learns what a commit of `writes` needs known: where the primary's
    /// WAL is (read-your-writes) and, for the cache, which other tables the write may have
    /// changed. `None` when nothing needs it.
    pub(super) fn commit_facts_query(&self, writes: &WriteSet) -> Option<String> {
        let ryw = self.consistency == Consistency::ReadYourWrites;
        let cache = self.shared.cache.is_some() && self.any_cache_rules();
        // A pinned session reads from the primary anyway (DISCARD ALL, which can unpin
        // it, holds its replica reads back for a while instead: see settle_session_ops);
        // its user's other sessions may not.
        if !cache && (!ryw || (self.pinned && !self.shares_writes())) {
            return None;
        }
        Some(if cache && !writes.raw_tables.is_empty() {
            super::cached::commit_facts_sql(&writes.raw_tables, writes.local_search_path)
        } else {
            format!("SELECT {COMMIT_POSITION_SQL}")
        })
    }

    /// After a committed write: run `sql` (from [`commit_facts_query`](Self::commit_facts_query))
    /// on the primary connection, unless the relay already sent it behind the request, and
    /// keep what it says. `None` when the position could not be read.
    pub(super) async fn learn_commit(&mut self, sql: &str) -> Option<CommitFacts> {
        let ryw = self.consistency == Consistency::ReadYourWrites;
        let result = match std::mem::take(&mut self.commit_read) {
            CommitRead::Answer(answer) => *answer,
            // No primary connection: the request lost it and already reported that.
            CommitRead::NotSent => self.query_commit_facts(sql).await?,
            // Sent but never answered: the request ended without its connection.
            CommitRead::Sent => return None,
        };
        match result {
            Ok(row) => {
                let lsn = row
                    .first()
                    .cloned()
                    .flatten()
                    .and_then(|t| crate::backend::health::parse_lsn(&t))?;
                if ryw {
                    // A position unknown before is an earlier commit's: this one is past it.
                    self.min_lsn = match self.own_write_lsn() {
                        u64::MAX => lsn,
                        known => known.max(lsn),
                    };
                    self.min_lsn_unknown_since = None;
                }
                if let Some(floor) = self.user_writes.as_ref().filter(|_| self.shares_writes()) {
                    floor.fetch_max(lsn, Ordering::Relaxed);
                }
                Some(CommitFacts {
                    lsn,
                    dependents: row
                        .get(1)
                        .cloned()
                        .flatten()
                        .map(|d| d.split(',').map(str::to_owned).collect())
                        .unwrap_or_default(),
                    triggers: row.get(2).cloned().flatten().is_some_and(|n| n != "0"),
                })
            }
            Err(e) => {
                debug!(error = ?e.to_string(), "could not read the commit position; reads go to the primary");
                if ryw {
                    self.min_lsn = u64::MAX;
                    self.min_lsn_unknown_since =
                        Some(self.runtime.backends.primary.health.lsn_samples());
                }
                if e.is_connection_failure() {
                    self.pinned_state_lost |= self.pinned;
                    self.release(BackendId::PRIMARY, false);
                }
                None
            }
        }
    }

    /// The commit-facts query as a round trip of its own on the primary connection.
    async fn query_commit_facts(
        &mut self,
        sql: &str,
    ) -> Option<std::result::Result<Vec<Option<String>>, BackendError>> {
        let max = self.runtime.config.proxy.max_message_bytes;
        let conn = self.conns[0].as_mut()?;
        let mut notifications = Vec::new();
        // Bounded like the settings replay: a primary that stopped answering must not hold
        // the session (a timeout counts as a lost connection, which is then dropped).
        let limit = self.runtime.config.pool.connect_timeout();
        let result = tokio::time::timeout(limit, conn.query_row(sql, max, &mut notifications))
            .await
            .unwrap_or(Err(BackendError::Timeout));
        for n in notifications {
            n.encode_into(&mut self.out);
        }
        Some(result)
    }
}

/// What ends a wait for a place in a pool. A request that may be cancelled before it starts
/// (see `dispatch_items`) stops waiting when its cancel request comes, not when a place
/// frees up; any request stops waiting when its client leaves (a client that gave up must
/// not take a connection from those still waiting, and its query must not run).
fn checkout_stop<'a>(
    slot: &'a SessionSlot,
    client: &'a mut ClientConn,
    no_wait: bool,
) -> impl Future<Output = CheckoutError> + 'a {
    let cancellable = slot.waiting.load(Ordering::Relaxed);
    async move {
        // Polled only when no connection is free: then none is taken.
        if no_wait {
            return CheckoutError::Canceled;
        }
        let canceled = async {
            if cancellable {
                slot.wait_for(&slot.cancel_requested).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            () = canceled => CheckoutError::Canceled,
            () = client.gone() => CheckoutError::ClientGone,
        }
    }
}
