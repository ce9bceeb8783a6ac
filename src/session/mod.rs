//! One client session: startup and authentication, then the request loop that routes each
//! request to a backend connection and relays the answer.
//!
//! The only module that combines protocol, router, backend and state. Session mode: the
//! session owns one connection per backend it has used (opened lazily), and asks for them
//! through `acquire`, the seam transaction pooling will replace.

mod backends;
mod cached;
pub(crate) mod client;
mod relay;
mod request;
mod startup;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::backend::{BackendError, BackendId, ConnectParams, Pool, ServerConn, send_cancel};
use crate::config::PoolMode;
use crate::error::{Error, Result, Side};
use crate::protocol::{self, Frame, Severity, TxStatus, tag};
use crate::router::{Classification, PinKinds, Route, SessionFacts, SessionOp};
use crate::state::{Runtime, SessionSlot, Shared, lock};
use crate::stats::{ClientInfo, ClientState, RouteKind};

use client::ClientConn;
use request::Item;
use startup::{Login, Opening};
use state::{Settings, Statements, startup_settings, startup_value};

/// Serve one accepted client connection to its end.
///
/// Every phase after the socket setup runs boxed, so this task's own future stays a few
/// hundred bytes: spawning and finishing a task copies its whole future several times, and an
/// idle client's task holds no space for phases it is not in.
pub async fn run(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, over_limit: bool) {
    let _ = stream.set_nodelay(true);
    let runtime = shared.runtime.load_full();
    let max_message = runtime.config.proxy.max_message_bytes;
    let (rd, wr) = crate::tls::split_plain(stream);
    // Until the client has logged in, no message it may send is large: a small limit keeps
    // thousands of unauthenticated connections from costing much memory.
    let mut client = ClientConn::new(
        rd,
        wr,
        max_message.min(PRE_AUTH_MAX_MESSAGE),
        runtime.config.proxy.client_write_timeout(),
    );
    let span =
        info_span!("session", %peer, user = tracing::field::Empty, db = tracing::field::Empty);
    async move {
        let opening = Box::pin(tokio::time::timeout(
            runtime.config.proxy.client_login_timeout(),
            startup::open(&mut client, &runtime, over_limit),
        ))
        .await
        .unwrap_or(Err(Error::LoginTimeout));
        match opening {
            Ok(Opening::Cancel { pid, secret }) => {
                if let Some((key, _in_flight)) = shared.sessions.cancel_target(pid, secret) {
                    debug!(backend = %key.addr, "forwarding cancel request");
                    // Bounded: a server that is gone must not hold a client slot.
                    let limit = runtime.config.pool.connect_timeout();
                    match tokio::time::timeout(limit, Box::pin(send_cancel(key))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            warn!(error = ?e.to_string(), "cancel request could not reach the server")
                        }
                        Err(_) => warn!("cancel request: no answer from the server in time"),
                    }
                }
            }
            Ok(Opening::Login(login)) => {
                let span = tracing::Span::current();
                span.record("user", login.user.config.name.as_str());
                span.record("db", login.database.as_str());
                client.max_message = max_message;
                Box::pin(live(Session::new(shared, runtime, client, login, peer))).await;
            }
            Ok(Opening::Admin(login)) => {
                tracing::Span::current().record("user", "(admin console)");
                client.max_message = max_message;
                if let Err(e) = Box::pin(crate::admin::serve(&shared, &mut client, &login)).await
                    && !matches!(e, Error::ClientGone | Error::ClientIo(_))
                {
                    let _ = Box::pin(client.send(&[e.to_error_response(Severity::Fatal)])).await;
                }
            }
            Err(Error::ClientGone) => {}
            Err(e) => Box::pin(refuse(&shared, &runtime, &mut client, e)).await,
        }
    }
    .instrument(span)
    .await
}

/// A logged-in session, from its first request to its last.
async fn live(mut session: Session) {
    // Boxed: start's state is gone once it has run, and serve's only while it runs.
    // A login counts once the server accepted it too: one the primary refuses (an unknown
    // database, wrong server credentials) failed, whatever pgsplit thought of the password.
    let result = match Box::pin(session.start()).await {
        Ok(()) => {
            session.shared.stats.logins.fetch_add(1, Ordering::Relaxed);
            // Only for a login the primary accepted: made-up database names leave nothing.
            session.user_writes = Some(
                session
                    .shared
                    .user_writes(&session.info.user, &session.info.database),
            );
            Box::pin(session.serve()).await
        }
        Err(e) => {
            session.forget_failed_login();
            if !matches!(e, Error::ClientGone | Error::ClientIo(_)) {
                session
                    .shared
                    .stats
                    .login_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
        }
    };
    session.close(result).await;
}

/// Client-given text for a log line: cut to 100 characters, to be logged with `?`, which
/// escapes line breaks.
fn short(s: &str) -> String {
    s.chars().take(100).collect()
}

/// Tell a client why its startup failed (the caller then drops the connection).
async fn refuse(shared: &Shared, runtime: &Runtime, client: &mut ClientConn, e: Error) {
    if matches!(e, Error::BadPassword(_) | Error::AuthRejected(_)) {
        // Every refused login is logged (with the peer, from the span) so that
        // guessing shows up; the user name the client sent is escaped and cut
        // short, so it cannot forge log lines or flood the log.
        match &e {
            // A wrong password, or a user pgsplit does not know.
            Error::BadPassword(u) => {
                warn!(user = ?short(u), "login refused: password authentication failed")
            }
            other => warn!(reason = ?short(&other.to_string()), "login refused"),
        }
        shared.stats.login_failures.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(runtime.config.proxy.auth_failure_delay()).await;
    } else {
        // Escaped and cut short too: the text can hold what the client sent (a SASL
        // mechanism name), before any authentication.
        debug!(error = ?short(&e.to_string()), "startup failed");
    }
    let _ = client.send(&[e.to_error_response(Severity::Fatal)]).await;
}

/// Largest message accepted before authentication (PostgreSQL allows about as much for
/// password and SASL messages).
const PRE_AUTH_MAX_MESSAGE: usize = 64 * 1024;

/// How fresh a session's reads must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// After the session's own committed write, its reads see it.
    ReadYourWrites,
    /// Any replica in rotation may answer.
    Eventual,
}

impl Consistency {
    /// `pgsplit.consistency` among the startup parameters (directly or in `options`),
    /// else the configured default.
    fn from_startup(
        params: &[(String, String)],
        read_your_writes: crate::config::ReadYourWrites,
    ) -> Consistency {
        let default = match read_your_writes {
            crate::config::ReadYourWrites::Off => Consistency::Eventual,
            _ => Consistency::ReadYourWrites,
        };
        startup_value(params, CONSISTENCY_SETTING)
            .and_then(|value| Consistency::from_sql(&value))
            .unwrap_or(default)
    }

    /// The value in a statement that sets `pgsplit.consistency` (or the bare value).
    fn from_sql(sql: &str) -> Option<Consistency> {
        let lower = sql.to_ascii_lowercase();
        if lower.contains("read_your_writes") {
            Some(Consistency::ReadYourWrites)
        } else if lower.contains("eventual") {
            Some(Consistency::Eventual)
        } else {
            None
        }
    }
}

/// The stats route of a request that ran on `conn`.
fn backend_kind(conn: BackendId) -> RouteKind {
    if conn.is_primary() {
        RouteKind::Primary
    } else {
        RouteKind::Replica
    }
}

/// The stats route of a request that found no server for `route`.
fn route_kind(route: Route) -> RouteKind {
    match route {
        Route::Replica => RouteKind::Replica,
        Route::Primary | Route::Transaction => RouteKind::Primary,
    }
}

/// The session setting that chooses a [`Consistency`].
const CONSISTENCY_SETTING: &str = "pgsplit.consistency";

/// What the request loop does after a client message. Taking a message is synchronous:
/// most of them (Parse, Bind, Describe, Execute) only join the batch, and an `async fn`
/// per message would build and tear down a future for each.
enum Flow {
    Continue,
    Terminate,
    /// The message ended a request (Sync, Query, function call; Flush when `flush`).
    Dispatch {
        flush: bool,
    },
    /// The Sync that ends skipping after an error: answer it with ReadyForQuery.
    EndSkip,
}

/// A request's message list and statement map up to this capacity are kept for the next.
const KEPT_BATCH_ITEMS: usize = 16;

/// Extended-protocol messages held back for their Sync: past this many with nothing more of
/// the request to read yet, or past the `HARD` count or the bytes at once, the batch goes
/// on to the primary unfinished, as a Flush would send it, and the rest follows it there.
/// A server takes each message as it comes; a proxy that held them all would grow without
/// bound for a client that never sends its Sync. (Far above what a request of a few
/// statements holds, even with large parameters, whose routing must not change.)
const PENDING_BATCH_ITEMS: usize = 4096;
const PENDING_BATCH_BYTES: usize = 64 << 20;
const PENDING_BATCH_ITEMS_HARD: usize = 64 * 1024;

pub struct Session {
    shared: Arc<Shared>,
    /// The configuration this session started with; re-read between requests once reload
    /// exists.
    runtime: Arc<Runtime>,
    client: ClientConn,
    connect: ConnectParams,
    /// The client's startup parameters (besides user and database).
    login_params: Vec<(String, String)>,
    mode: PoolMode,
    /// Server connections held now, by backend id (0 = primary).
    conns: Vec<Option<Box<ServerConn>>>,
    /// Pool places of the connections in `conns`: lent ones in transaction mode, owned
    /// ones in session mode (where one may be held a moment before its connection opens).
    permits: Vec<Option<crate::backend::Place>>,
    /// The pool of each backend, looked up once.
    pools: Vec<Option<Arc<Pool>>>,
    /// Connections that ran session-bound work (e.g. a session advisory lock inside a
    /// read-only transaction on a replica) or whose settings pgsplit cannot know: closed,
    /// never pooled.
    tainted: Vec<bool>,
    tx: TxStatus,
    /// The backend the open transaction runs on.
    tx_conn: Option<BackendId>,
    /// Session-bound work happened: everything goes to the primary from now on.
    pinned: bool,
    /// The pinning left state that DISCARD ALL does not reset: it never unpins.
    pinned_for_good: bool,
    /// What kinds of state the session pinned for: when statements have taken back every
    /// kind (`UNLISTEN *` a LISTEN, `pg_advisory_unlock_all()` a lock, ...), it is free.
    pin_kinds: PinKinds,
    /// Something ran that a reset would not take back (see
    /// `Classification::outlives_reset`; a custom setting is also replayed onto the
    /// session's other connections), or standard_conforming_strings was off: session mode
    /// hands none of its connections on.
    state_outlives_reset: bool,
    /// A replica refused this session (not a statement): its reads go to the primary.
    replicas_refused: bool,
    /// The request in flight pins the session (a LISTEN behind a DISCARD ALL in one
    /// pipeline must leave it pinned; the order inside a request is not tracked).
    pinned_in_request: bool,
    /// The pinned primary connection, and the state on it, is gone.
    pinned_state_lost: bool,
    /// A checkout takes a free connection or none, never waits (a login learning how
    /// the server spells its parameters: not worth a wait on a busy pool).
    checkout_no_wait: bool,
    /// Read-your-writes or eventual consistency for this session's reads.
    consistency: Consistency,
    /// The commit position of the last write of any session of this user and database
    /// (see [`Shared::user_writes`]); set once the login is accepted.
    user_writes: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The primary's WAL position after this session's last committed write: replicas
    /// serve its reads only once they replayed this far (0: never wrote).
    min_lsn: u64,
    /// `min_lsn` is unknown since the primary's health checks numbered this many.
    min_lsn_unknown_since: Option<u64>,
    /// What was written since the last commit (read-your-writes, cache invalidation).
    writes: cached::WriteSet,
    /// The request in flight ran a COMMIT (the server's tag, so not a failed block's): with
    /// a block open again after it (COMMIT AND CHAIN, `COMMIT; BEGIN`), the cache must still
    /// learn of the commit before the client does.
    committed: bool,
    /// The commit-facts query sent behind the current request, and its answer.
    commit_read: backends::CommitRead,
    /// The client's BEGIN was answered by the proxy and goes to the primary with the
    /// session's next request (see [`request::deferrable_begin`]).
    deferred_begin: bool,
    /// ... and it is this read-only BEGIN, which goes where that request's statements can
    /// run (`None`: a plain BEGIN, for the primary).
    deferred_read_only: Option<Box<str>>,
    /// The proxy user this session logged in as (part of cache keys).
    login_user: String,
    /// Extra replay position the current request's replica must have reached: a cache fill
    /// must not come from before the last write to the cached tables.
    read_floor: u64,
    /// The answer of the current request, recorded for the cache.
    capture: Option<cached::Capture>,
    /// Digest of the session's settings for cache keys, by settings generation.
    settings_digest: Option<(u64, [u8; 32])>,
    /// This client in the registry SHOW CLIENTS lists.
    info: Arc<ClientInfo>,
    /// The last request ended in an error the server reported.
    last_failed: bool,
    /// The one timer of the session's held replica reads (see `relay`), created at the
    /// first; it fires once per health interval while a read is held.
    hold_tick: Option<relay::HoldTick>,
    /// The replica of the last read: requests that only prepare or describe stay there,
    /// so preparing a statement does not use up a turn of the round robin.
    last_replica: Option<BackendId>,
    settings: Settings,
    /// Session operations of the open transaction, applied at COMMIT.
    tx_ops: Vec<SessionOp>,
    statements: Statements,
    /// Extended-protocol messages received since the last Sync.
    batch: Vec<Item>,
    /// What `batch` holds, about (see [`PENDING_BATCH_BYTES`]).
    batch_bytes: usize,
    /// The open batch now dispatched was sent on for its size, not by the client's Flush:
    /// it goes to the primary, even as a read-only block's start (its first messages do
    /// not tell what the rest will do).
    overflowed: bool,
    /// A cancel request came while the request's long statement was being classified:
    /// the request ends before it runs (see `classify_aside`).
    canceled_early: bool,
    /// Statements parsed in the current batch, which shadow the session's.
    batch_local: Statements,
    /// After a failure before an unsynced batch reached a server: drop client messages up
    /// to the Sync, then report ReadyForQuery, as PostgreSQL does.
    skip_until_sync: bool,
    /// Staging buffer for bytes going to the client.
    out: bytes::BytesMut,
    /// Staging buffer for bytes going to a server.
    wbuf: bytes::BytesMut,
    cancel_pid: i32,
    cancel_secret: i32,
    slot: Arc<SessionSlot>,
    /// The session's latest clock reading: its request's start, then the moment its answer
    /// was complete. Pool lifetimes and idle times go by it, so a request reads the clock
    /// twice, not four times (a pool that made it wait reads its own).
    clock: std::time::Instant,
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        runtime: Arc<Runtime>,
        client: ClientConn,
        login: Login,
        peer: SocketAddr,
    ) -> Self {
        let (cancel_pid, cancel_secret, slot) = shared.sessions.register();
        let info = shared.stats.clients.register(
            cancel_pid,
            peer,
            &login.user.config.name,
            &login.database,
        );
        let backends = 1 + runtime.backends.replicas.len();
        let mode = runtime.config.proxy.pool_mode;
        let consistency =
            Consistency::from_startup(&login.params, runtime.config.routing.read_your_writes);
        // Session mode passes the client's startup parameters to each of its own server
        // connections; pooled connections start bare and get them as session settings.
        let (startup, baseline) = match mode {
            PoolMode::Session => (login.params.clone(), Vec::new()),
            PoolMode::Transaction => (Vec::new(), startup_settings(&login.params)),
        };
        let connect = ConnectParams {
            user: login.user.config.server_user().to_owned(),
            password: login.user.config.server_password().map(str::to_owned),
            database: login.database.clone(),
            startup,
            max_prepared: runtime.config.pool.max_prepared_statements,
            tls: runtime.server_tls.clone(),
        };
        let mut session = Session {
            shared,
            mode,
            client,
            connect,
            conns: (0..backends).map(|_| None).collect(),
            permits: (0..backends).map(|_| None).collect(),
            pools: (0..backends).map(|_| None).collect(),
            tainted: vec![false; backends],
            login_params: login.params,
            runtime,
            tx: TxStatus::Idle,
            tx_conn: None,
            pinned: false,
            replicas_refused: false,
            pinned_for_good: false,
            pin_kinds: PinKinds::NONE,
            state_outlives_reset: false,
            pinned_in_request: false,
            pinned_state_lost: false,
            checkout_no_wait: false,
            hold_tick: None,
            last_replica: None,
            consistency,
            user_writes: None,
            min_lsn: 0,
            min_lsn_unknown_since: None,
            writes: cached::WriteSet::default(),
            committed: false,
            commit_read: backends::CommitRead::NotSent,
            deferred_begin: false,
            deferred_read_only: None,
            login_user: login.user.config.name.clone(),
            read_floor: 0,
            capture: None,
            settings_digest: None,
            info,
            last_failed: false,
            settings: Settings::with_baseline(baseline),
            tx_ops: Vec::new(),
            statements: Statements::default(),
            batch: Vec::new(),
            batch_bytes: 0,
            overflowed: false,
            canceled_early: false,
            batch_local: Statements::default(),
            skip_until_sync: false,
            // Allocated at first use: a client that logs in and idles never needs them.
            out: bytes::BytesMut::new(),
            wbuf: bytes::BytesMut::new(),
            cancel_pid,
            cancel_secret,
            slot,
            clock: std::time::Instant::now(),
        };
        session.pinned = session.replicas_unfit();
        // See `backslash_escapes_on`.
        session.pinned_for_good = session.pinned;
        session.state_outlives_reset = session.pinned;
        session
            .statements
            .set_context(session.settings.parse_context());
        session
    }

    /// Finish the login: a primary connection is used first, so a bad database or role
    /// fails the login as on a direct connection and the client sees the primary's
    /// ParameterStatus values (with its own startup settings where it chose them).
    /// The login failed: a pool it made for a role or database the server does not know
    /// goes (and its set of places), so that made-up names leave nothing behind. The
    /// session's own places and pools go first: nobody else using them is what counts.
    fn forget_failed_login(&mut self) {
        self.permits.iter_mut().for_each(|p| *p = None);
        self.pools.iter_mut().for_each(|p| *p = None);
        self.runtime
            .forget_unconnected_pool(BackendId::PRIMARY, &self.connect);
    }

    async fn start(&mut self) -> Result<()> {
        // A reload since the client connected: its login takes the current pools (whose
        // idle connections count against the places the login takes).
        self.adopt_new_runtime(true).await?;
        // A pool that connected before knows the server's parameters (and that this role and
        // database work): the login then needs no server connection at all. (Session mode
        // connects anyway, and reports that connection's values.)
        let pool = match self.mode {
            PoolMode::Transaction => self.runtime.pool(BackendId::PRIMARY, &self.connect),
            PoolMode::Session => None,
        };
        let from_pool = pool.as_ref().and_then(|p| p.server_params());
        // What the server applies: the last of a parameter given twice, one given on its own
        // over one in `options`. (Session mode reports the server's own.)
        let mut given = match self.mode {
            PoolMode::Transaction => state::startup_values(&self.login_params),
            PoolMode::Session => Vec::new(),
        };
        let from_server;
        let server_params: &[(String, String)] = match &from_pool {
            Some(params) => {
                if let Some(pool) = &pool {
                    self.spell_as_server(pool, params, &mut given).await?;
                }
                params
            }
            None => {
                // The connection asked has the session's settings (the replay that
                // `acquire` makes), and reports them as the server spells them.
                from_server = self.login_server_params().await?;
                if let Some(pool) = &pool {
                    learn_spellings(pool, &from_server, &given);
                }
                given.clear();
                &from_server
            }
        };
        // Encoded straight into one buffer: a login is a dozen ParameterStatus messages,
        // and connection churn pays for every allocation here.
        let mut greeting = bytes::BytesMut::with_capacity(256);
        protocol::auth_ok().encode_into(&mut greeting);
        if state::value_in(server_params, "standard_conforming_strings")
            .is_some_and(|v| !crate::router::keeps_on(v))
        {
            self.backslash_escapes_on(BackendId::PRIMARY);
        }
        for (k, v) in server_params {
            let chosen =
                state::value_in(&given, k).map(|c| match k.eq_ignore_ascii_case("DateStyle") {
                    true => state::reported_datestyle(c, v).unwrap_or_else(|| c.to_owned()),
                    false => c.to_owned(),
                });
            protocol::put_parameter_status(&mut greeting, k, chosen.as_deref().unwrap_or(v));
        }
        protocol::backend_key_data(self.cancel_pid, self.cancel_secret).encode_into(&mut greeting);
        protocol::ready_for_query(TxStatus::Idle).encode_into(&mut greeting);
        self.clock = std::time::Instant::now();
        self.release_idle();
        self.client.write(&greeting).await
    }

    /// Transaction mode, a login whose pool knows the server's parameters: replace each
    /// reported value in `given` that the server may spell its own way (TimeZone
    /// `asia/tokyo` is `Asia/Tokyo`, client_encoding `utf-8` is `UTF8`, IntervalStyle
    /// `SQL_STANDARD` is `sql_standard`; drivers compare them) with the server's spelling.
    /// The pool remembers spellings; one it does not know yet takes a primary connection
    /// with the session's settings replayed, as the first request would, so a value the
    /// server refuses fails the login as on a direct connection. With no connection to be
    /// had, the value is reported as given.
    async fn spell_as_server(
        &mut self,
        pool: &Pool,
        server_params: &[(String, String)],
        given: &mut [(String, String)],
    ) -> Result<()> {
        let mut unknown = false;
        for (name, value) in given.iter_mut() {
            let Some(current) = state::value_in(server_params, name) else {
                continue; // not a parameter the server reports
            };
            if value == current || state::reported_as_given(name, value) {
                continue;
            }
            match pool.spelling(&name.to_ascii_lowercase(), value) {
                Some(spelled) => *value = spelled,
                None => unknown = true,
            }
        }
        // Not worth a wait: a primary the checks or a failed connection say is down.
        if !unknown || !self.runtime.backends.primary.is_available() {
            return Ok(());
        }
        self.checkout_no_wait = true;
        let acquired = self.acquire(Route::Primary).await;
        self.checkout_no_wait = false;
        match acquired {
            Ok(id) => {
                if let Some(conn) = self.conns[id.0 as usize].as_ref() {
                    learn_spellings(pool, &conn.params, given);
                    for (name, value) in given.iter_mut() {
                        if let Some(spelled) = state::value_in(&conn.params, name) {
                            spelled.clone_into(value);
                        }
                    }
                }
                Ok(())
            }
            Err(e @ (Error::SettingsRefused(_) | Error::ClientGone)) => Err(e),
            Err(e) => {
                debug!(error = %e, "no server connection to learn how the server spells the login's parameters; reporting them as given");
                Ok(())
            }
        }
    }

    /// The ParameterStatus values a client is told at login when no pool knows them yet:
    /// from a primary connection (a bad database or role fails the login as on a direct
    /// connection), else from a replica's presented as writable.
    async fn login_server_params(&mut self) -> Result<Vec<(String, String)>> {
        Ok(match self.acquire(Route::Primary).await {
            Ok(id) => self.conns[id.0 as usize]
                .as_ref()
                .map(|c| c.params.clone())
                .unwrap_or_default(),
            // With the primary down, reads can still be served: log in on a replica's
            // parameters, presented as a writable server (which pgsplit is).
            Err(e @ (Error::NoServer(_) | Error::PrimaryInRecovery)) => {
                let Ok(id) = self.acquire(Route::Replica).await else {
                    return Err(e);
                };
                if id.is_primary() {
                    return Err(e);
                }
                warn!(error = ?e.to_string(), "primary unavailable at login; only reads will work");
                let mut params = self.conns[id.0 as usize]
                    .as_ref()
                    .map(|c| c.params.clone())
                    .unwrap_or_default();
                // (A default_transaction_read_only the client gave is its own: the replay
                // set it on the replica, which reports it.)
                let own_read_only =
                    startup_value(&self.login_params, "default_transaction_read_only").is_some();
                for (k, v) in params.iter_mut() {
                    if k == "in_hot_standby"
                        || (k == "default_transaction_read_only" && !own_read_only)
                    {
                        *v = "off".into();
                    }
                }
                params
            }
            Err(e) => return Err(e),
        })
    }

    async fn close(&mut self, result: Result<()>) {
        match result {
            Ok(()) | Err(Error::ClientGone) | Err(Error::ClientIo(_)) => {}
            // A client that does not read would not read its FATAL either.
            Err(e @ Error::ClientWriteTimeout(_)) => warn!(error = %e, "disconnecting the client"),
            Err(e @ Error::ServerLostMidMessage(_)) => {
                warn!(error = ?e.to_string(), "closing the session")
            }
            Err(e) => {
                // Debug-formatted (escaped): a server's error can quote what the client
                // sent (a startup parameter's value), line breaks included.
                if matches!(
                    &e,
                    Error::Backend(BackendError::Server(_)) | Error::SettingsRefused(_)
                ) {
                    // The server refused the session (an unknown database, a setting).
                    info!(error = ?e.to_string(), "session refused by the server");
                } else if e.side() == Side::Backend {
                    warn!(error = ?e.to_string(), "session lost its server");
                } else {
                    debug!(error = ?short(&e.to_string()), "closing session");
                }
                let _ = self
                    .client
                    .send(&[e.to_error_response(Severity::Fatal)])
                    .await;
            }
        }
        // Pooled connections go back only when nothing of this session is left on them.
        if !self.pinned {
            self.clock = std::time::Instant::now();
            self.release_idle();
        }
        self.leave_owned().await;
        for conn in self.conns.iter_mut().filter_map(Option::take) {
            conn.terminate().await;
        }
        self.shared.sessions.unregister(self.cancel_pid);
        self.shared.stats.clients.unregister(self.cancel_pid);
    }

    /// The request loop.
    async fn serve(&mut self) -> Result<()> {
        loop {
            if self.shared.is_draining() && self.at_rest() {
                return Err(Error::ShuttingDown);
            }
            while let Some(frame) = self.client.try_session_frame()? {
                if self.copy_follows_execute(&frame) {
                    // COPY data sent right behind the Execute that starts the COPY (no
                    // Sync or Flush between): it belongs to that COPY, so the batch goes
                    // now and the relay forwards the data after it, this frame first.
                    self.client.unread(&frame);
                    Box::pin(self.dispatch_batch(true)).await?;
                    continue;
                }
                let classified = match request::is_large_sql(&frame) && !self.skip_until_sync {
                    true => self.classify_aside(&frame).await,
                    false => None,
                };
                match self.take_client_frame(frame, classified)? {
                    Flow::Continue => {}
                    Flow::Terminate => return Ok(()),
                    // Boxed: a request's state machine is large, and inline it would be part
                    // of every session's future, idle or not, for the session's whole life.
                    Flow::Dispatch { flush: true } => Box::pin(self.dispatch_flush()).await?,
                    Flow::Dispatch { flush: false } => Box::pin(self.dispatch_batch(false)).await?,
                    Flow::EndSkip => {
                        self.client
                            .send(&[protocol::ready_for_query(self.tx)])
                            .await?
                    }
                }
            }
            if self.batch.len() > PENDING_BATCH_ITEMS || self.batch_bytes > PENDING_BATCH_BYTES {
                // No whole message is left in the buffer. The Sync may be in the socket
                // already (a pipeline sent in one write): read on, up to the hard bounds.
                // (The bytes are bounded at once: the batch is copied for sending.)
                let hard = self.batch.len() > PENDING_BATCH_ITEMS_HARD
                    || self.batch_bytes > PENDING_BATCH_BYTES;
                if !hard && self.client.try_fill()? {
                    continue;
                }
                self.overflowed = true;
                Box::pin(self.dispatch_batch(true)).await?;
                continue;
            }
            // A client waiting on an Execute without Sync or Flush (COPY FROM STDIN through
            // the extended protocol does this) must not wait for us. A write split right
            // after an Execute has its rest here already: that batch is not sent open (to
            // the primary, past the cache).
            if self.client.buf.is_empty() && self.batch.iter().any(Item::is_execute) {
                if self.client.try_fill()? {
                    continue;
                }
                Box::pin(self.dispatch_batch(true)).await?;
                continue;
            }
            self.wait_idle().await?;
        }
    }

    /// Whether `frame` is COPY data (or its end) behind an Execute not yet sent.
    fn copy_follows_execute(&self, frame: &Frame) -> bool {
        matches!(frame.tag, tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL)
            && !self.skip_until_sync
            && self.batch.iter().any(Item::is_execute)
    }

    /// Between requests, outside a transaction: the session may end or change
    /// configuration here without losing anything.
    fn at_rest(&self) -> bool {
        self.tx == TxStatus::Idle && self.batch.is_empty() && !self.client.has_frame()
    }

    /// Wait for client bytes; a pinned session also forwards what its primary connection
    /// says unprompted (LISTEN notifications, notices). A shutdown ends an idle session.
    async fn wait_idle(&mut self) -> Result<()> {
        let watch = self.pinned && self.tx == TxStatus::Idle;
        let (shared, slot) = (&self.shared, &self.slot);
        let drain = async {
            if self.tx == TxStatus::Idle && self.batch.is_empty() {
                slot.wait_for(&shared.draining).await
            } else {
                std::future::pending().await
            }
        };
        let Some(conn) = self.conns[0].as_mut().filter(|_| watch) else {
            return tokio::select! {
                biased;
                r = self.client.fill() => r,
                _ = drain => Err(Error::ShuttingDown),
            };
        };
        tokio::select! {
            biased;
            _ = drain => Err(Error::ShuttingDown),
            r = self.client.fill() => r,
            r = conn.fill() => match r {
                Ok(()) => self.forward_unprompted().await,
                Err(e) => {
                    self.conns[0] = None;
                    Err(Error::Backend(e))
                }
            },
        }
    }

    /// Relay whole NotificationResponse / NoticeResponse / ParameterStatus frames that an
    /// idle primary connection sent.
    async fn forward_unprompted(&mut self) -> Result<()> {
        let max = self.runtime.config.proxy.max_message_bytes;
        let Some(conn) = self.conns[0].as_mut() else {
            return Ok(());
        };
        let mut frames = Vec::new();
        while let Some(f) = protocol::decode_frame(&mut conn.rbuf, max)
            .map_err(|_| Error::Backend(BackendError::Protocol("bad frame from server")))?
        {
            if f.tag == tag::ERROR_RESPONSE {
                // The server is closing this connection (e.g. terminated by an admin).
                self.conns[0] = None;
                return Err(Error::Backend(BackendError::Server(
                    protocol::ErrorFields::parse(&f.body),
                )));
            }
            frames.push(f);
        }
        self.client.send(&frames).await
    }

    /// Classify a long statement text (see [`request::LARGE_SQL`]) on the blocking pool, one
    /// at a time across the proxy: the event loop goes on serving the other sessions, and
    /// the parser's working memory (several times the text) is spent on one text at once.
    /// No query runs meanwhile: a cancel request then ends the request before it runs, as
    /// a server would cancel it while it parses.
    async fn classify_aside(&mut self, frame: &Frame) -> Option<Arc<Classification>> {
        static ONE_AT_A_TIME: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
        let watch = lock(&self.slot.cancel_target).is_none();
        if watch {
            self.slot.begin_wait();
        }
        let runtime = self.runtime.clone();
        let (t, body) = (frame.tag, frame.body.clone());
        let classified = async {
            let _turn = ONE_AT_A_TIME.acquire().await.ok()?;
            tokio::task::spawn_blocking(move || {
                request::classify_large(t, &body, &runtime.classify)
            })
            .await
            .ok()
            .flatten()
        }
        .await;
        if watch {
            self.canceled_early |= self.slot.end_wait();
        }
        classified
    }

    fn take_client_frame(
        &mut self,
        frame: Frame,
        classified: Option<Arc<Classification>>,
    ) -> Result<Flow> {
        if self.skip_until_sync {
            if frame.tag == tag::SYNC {
                self.skip_until_sync = false;
                return Ok(Flow::EndSkip);
            }
            return Ok(Flow::Continue);
        }
        match frame.tag {
            tag::QUERY
            | tag::FUNCTION_CALL
            | tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::SYNC
            | tag::FLUSH => {
                let held = frame.body.len() + std::mem::size_of::<Item>();
                if let Some(failure) = request::trailing_body_failure(&frame) {
                    self.batch.push(failure);
                }
                // Decoded on arrival, so a malformed message is refused at once.
                let item = request::decode(
                    frame,
                    &self.runtime.classify,
                    &self.statements,
                    &mut self.batch_local,
                    classified,
                )?;
                if matches!(item, Item::Query { .. }) && self.batch.is_empty() {
                    // PostgreSQL drops the unnamed statement at every simple Query, before
                    // parsing it; the session follows even when no server sees the Query
                    // (answered from the cache, or by pgsplit itself). A Query behind
                    // extended messages of the same batch drops it only if the server runs
                    // it (not behind an error): the relay sees to that.
                    self.statements.remove("");
                }
                let flow = match item {
                    Item::Query { .. } | Item::Forwarded(_) | Item::Sync => {
                        Flow::Dispatch { flush: false }
                    }
                    Item::Flush => Flow::Dispatch { flush: true },
                    _ => Flow::Continue,
                };
                self.batch.push(item);
                self.batch_bytes += held;
                return Ok(flow);
            }
            tag::TERMINATE => return Ok(Flow::Terminate),
            // Leftovers of a COPY that failed: PostgreSQL ignores them too.
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {}
            other => {
                return Err(Error::Protocol(format!(
                    "invalid frontend message type {}",
                    other
                )));
            }
        }
        Ok(Flow::Continue)
    }

    fn facts(&self) -> SessionFacts {
        SessionFacts {
            in_transaction: self.tx != TxStatus::Idle,
            pinned: self.pinned,
            replicas_refused: self.replicas_refused || self.serializable_default(),
        }
    }

    /// A batch that ends with Flush (the client waits for answers without a Sync).
    async fn dispatch_flush(&mut self) -> Result<()> {
        if self.batch.iter().all(|i| matches!(i, Item::Flush)) {
            // Nothing is pending anywhere: nothing to flush.
            self.batch.clear();
            self.batch_bytes = 0;
            return Ok(());
        }
        let describe_only = self.batch.iter().all(|i| {
            matches!(
                i,
                Item::Parse(_) | Item::DescribeStatement { .. } | Item::Flush
            )
        });
        if describe_only && self.tx == TxStatus::Idle {
            // Preparing (asyncpg always prepares with Parse, Describe, Flush) need not hold a
            // connection open until the client's Sync: close it with a Sync of our own, so
            // the statement is prepared where reads run and later messages route freely.
            self.batch.push(Item::HiddenSync);
            self.last_failed = false;
            self.dispatch_batch(false).await?;
            if self.last_failed {
                // After an error the server skips what the client sends up to its Sync;
                // the proxy's own Sync ended that on the server, so the session skips.
                self.skip_until_sync = true;
            }
            return Ok(());
        }
        self.dispatch_batch(true).await
    }

    /// Decode, route and run one request. `open`: the batch has no Sync yet and the rest
    /// of it follows the same connection.
    async fn dispatch_batch(&mut self, open: bool) -> Result<()> {
        self.adopt_new_runtime(false).await?;
        let mut items = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let mut local = std::mem::take(&mut self.batch_local);
        let result = self.dispatch_items(&mut items, &local, open).await;
        self.overflowed = false;
        self.canceled_early = false;
        // The next request reuses the allocations, unless an unusually long batch grew them
        // (an idle session should not keep that). Nothing refills the fields meanwhile (an
        // open batch's later messages go to the request in flight); the check is a guard.
        if self.batch.capacity() == 0 && items.capacity() <= KEPT_BATCH_ITEMS {
            items.clear();
            self.batch = items;
        }
        if self.batch_local.capacity() == 0 && local.capacity() <= KEPT_BATCH_ITEMS {
            local.clear();
            self.batch_local = local;
        }
        result
    }

    async fn dispatch_items(
        &mut self,
        items: &mut [Item],
        local: &Statements,
        open: bool,
    ) -> Result<()> {
        self.pinned_in_request = false;
        // Set by a COMMIT of this request only (an abandoned attempt's must not count).
        self.committed = false;
        if let Some(reply) = self.local_reply(items) {
            return self.client.send(&reply).await;
        }
        let started = std::time::Instant::now();
        self.clock = started;
        let in_transaction = self.tx != TxStatus::Idle
            || items
                .iter()
                .any(|i| i.class().is_some_and(|c| c.begins_tx.is_some()));
        self.info.set_state(ClientState::Active);
        self.info.queries.fetch_add(1, Ordering::Relaxed);
        if self.serve_from_cache(items, open).await? {
            self.record(RouteKind::Cache, started, false);
            return Ok(());
        }
        let mut route = crate::router::route(
            items.iter().filter_map(Item::class).map(|c| &**c),
            self.facts(),
        );
        if self.deferred_begin {
            // The transaction's first request, its BEGIN sent ahead of it: on the primary (a
            // plain BEGIN is read-write), or, read only, on a replica when the request is
            // plain reads or acts only on the transaction in ways a standby takes (SET
            // LOCAL, SAVEPOINT, COMMIT, ...); anything else the primary must run or would
            // answer unlike a standby (probes, locks, txid_current, LISTEN, what pins the
            // session, a SET TRANSACTION to serializable) takes the block to the primary.
            let facts = self.facts();
            let replica_can_start = || {
                let mut classes = items.iter().filter_map(Item::class).peekable();
                classes.peek().is_some()
                    && classes.all(|c| {
                        !c.pins_session
                            && !c.standby_refuses
                            && (c.target == crate::router::Target::Replica
                                || (c.tx_local && c.statement_count == 1))
                    })
            };
            route = match self.deferred_read_only {
                Some(_) if !facts.pinned && !facts.replicas_refused && replica_can_start() => {
                    Route::Replica
                }
                _ => Route::Primary,
            };
        }
        // A read-only block that starts with this request is judged by its first statement
        // (what follows it in the block can neither write nor change the block).
        let read_only_start =
            self.deferred_begin && self.deferred_read_only.is_some() && !self.overflowed;
        if route == Route::Replica
            && !read_only_start
            && (open || items.iter().any(|i| matches!(i, Item::Forwarded(_))))
        {
            // The rest of the batch is unknown yet, or a fast-path call names its function
            // by OID, which the classifier cannot judge: it might write.
            route = Route::Primary;
        }
        // Restored if the request does not run, or fails in a way that undoes what pinned.
        let pins_before = (self.pinned, self.pinned_for_good, self.state_outlives_reset);
        let kinds_before = self.pin_kinds;
        for c in items.iter().filter_map(Item::class) {
            if c.pins_session && !self.pinned {
                debug!("session pinned to the primary");
                self.pinned = true;
            }
            self.pin_kinds |= c.pins;
            self.pinned_in_request |= c.pins_session;
            self.pinned_for_good |= c.pins_for_good;
            self.state_outlives_reset |= c.outlives_reset;
        }
        if self.pinned && items.iter().any(Item::may_hide_session_state) {
            // What it leaves on the pinned connection only DISCARD ALL takes back.
            self.pin_kinds |= PinKinds::OTHER;
        }
        let executes = items
            .iter()
            .any(|i| i.is_execute() || matches!(i, Item::Query { .. } | Item::Forwarded(_)));
        for item in items.iter() {
            self.note_writes(item);
        }
        // A read may run again if nothing of its answer reached the client: once more on
        // another replica after a connection failure, then on the primary.
        let mut attempts_left = 2;
        loop {
            // Outside a transaction the wait for a pooled connection can be long: a cancel
            // request meanwhile ends the request before it starts, as the server would end
            // it, and at once (`checkout` stops waiting). (Inside one, the request's
            // connection is at hand, and an error pgsplit made up would leave the server's
            // transaction unfailed.)
            let cancellable = route != Route::Transaction;
            if cancellable {
                self.slot.begin_wait();
            }
            let acquired = if route == Route::Replica && !executes {
                self.acquire_last_replica().await
            } else {
                self.acquire(route).await
            };
            let acquired = if cancellable {
                let canceled = self.slot.end_wait() || std::mem::take(&mut self.canceled_early);
                match acquired {
                    Ok(conn) if canceled => {
                        // Only the session's settings ran on it (a pinned connection stays;
                        // not one this request was to pin, which never ran).
                        if !(conn.is_primary() && pins_before.0) {
                            self.release(conn, true);
                        }
                        Err(Error::Canceled)
                    }
                    other => other,
                }
            } else {
                acquired
            };
            let conn = match acquired {
                Ok(c) => c,
                Err(e) => {
                    self.capture = None;
                    self.read_floor = 0;
                    self.record(route_kind(route), started, true);
                    // Nothing of it ran: what it would have pinned is not there.
                    (self.pinned, self.pinned_for_good, self.state_outlives_reset) = pins_before;
                    self.pin_kinds = kinds_before;
                    return self.report_unavailable(e, items, open).await;
                }
            };
            debug!(?route, backend = conn.0, "routed");
            // SHOW CLIENTS names the server a running query is on.
            self.info.set_backend(Some(conn.0));
            if conn.is_primary()
                && items
                    .iter()
                    .any(|i| i.class().is_some_and(|c| c.calls_user_functions))
            {
                // Somebody's own function on the primary may write anything.
                self.writes.note_unknown();
            }
            if !conn.is_primary()
                && items
                    .iter()
                    .any(|i| i.class().is_some_and(|c| c.pins_session))
            {
                self.tainted[conn.0 as usize] = true;
            }
            // On the replica it was routed to: a read that fell back to the primary may be
            // a write the classifier missed, and must not run there twice.
            // Not a read-only block's first request: its BEGIN went with it.
            let retryable = route == Route::Replica
                && !conn.is_primary()
                && !open
                && !self.deferred_begin
                && attempts_left > 0;
            match self
                .run_request(conn, items, local, open, retryable)
                .await?
            {
                relay::Outcome::Done => {
                    if self.last_failed
                        && !pins_before.0
                        && !in_transaction
                        && self.tx == TxStatus::Idle
                        && failure_undoes_pin(items)
                    {
                        // Its failure undid what it pinned for (a CREATE TEMP TABLE that
                        // failed created nothing): the session stays free. (What else it
                        // ran may have left traces all the same, such as a custom setting's
                        // name: `state_outlives_reset` stays.)
                        debug!("pinning statement failed: session left unpinned");
                        self.pinned = false;
                        self.pin_kinds = kinds_before;
                    }
                    if !self.last_failed && !in_transaction && self.tx == TxStatus::Idle {
                        self.take_back_pins(items);
                    }
                    self.record(backend_kind(conn), started, self.last_failed);
                    if in_transaction && self.tx == TxStatus::Idle {
                        self.shared.stats.transaction(backend_kind(conn));
                    }
                    return self.after_request(conn).await;
                }
                relay::Outcome::Retry { on_replica } => {
                    self.shared.stats.retry(backend_kind(conn));
                    // The retry's wait for a pooled connection counts from now, not from
                    // the first attempt's start.
                    self.clock = std::time::Instant::now();
                    attempts_left -= 1;
                    if !on_replica || attempts_left == 0 {
                        route = Route::Primary;
                    }
                    if !on_replica {
                        // The refusal taught the classifier about these statements: the
                        // ones this request prepares register with what it learned.
                        self.reclassify_parses(items);
                    }
                }
            }
        }
    }

    /// Give the statements `items` parse the classification the classifier now has for
    /// their SQL.
    fn reclassify_parses(&self, items: &mut [Item]) {
        for item in items {
            if let Item::Parse(stmt) = item {
                let class = self.runtime.classify.get(&stmt.parse.sql);
                if !Arc::ptr_eq(&class, &stmt.class) {
                    *stmt = Arc::new(stmt.with_class(class));
                }
            }
        }
    }

    /// A reloaded configuration applies from the login, then from the first request that
    /// finds the session outside a transaction and holding no server connection it must
    /// keep (a pinned session stays with the configuration it pinned under, unless it is
    /// only logging in: pinned by its startup settings, it holds nothing yet).
    async fn adopt_new_runtime(&mut self, at_login: bool) -> Result<()> {
        // A guard, not a clone: this runs before every request and almost always finds
        // nothing new.
        if Arc::ptr_eq(&self.shared.runtime.load(), &self.runtime) || self.tx != TxStatus::Idle {
            return Ok(());
        }
        let current = self.shared.runtime.load_full();
        if !current.users.contains_key(&self.login_user) {
            // Removing a user revokes its access: its sessions end at their next request
            // outside a transaction, pinned or not.
            return Err(Error::AuthRejected(format!(
                "user \"{}\" was removed from pgsplit's configuration",
                self.login_user
            )));
        }
        if self.pinned && !at_login {
            return Ok(());
        }
        match self.mode {
            PoolMode::Transaction if self.conns.iter().any(Option::is_some) => return Ok(()),
            PoolMode::Transaction => {}
            // Own connections are reopened under the new configuration as they are needed
            // (settings are replayed as usual).
            PoolMode::Session => {
                for conn in self.conns.iter_mut().filter_map(Option::take) {
                    conn.terminate().await;
                }
            }
        }
        let backends = 1 + current.backends.replicas.len();
        self.conns = (0..backends).map(|_| None).collect();
        let places = std::mem::replace(&mut self.permits, (0..backends).map(|_| None).collect());
        let old_pools = std::mem::replace(&mut self.pools, (0..backends).map(|_| None).collect());
        self.tainted = vec![false; backends];
        self.last_replica = None;
        if let Some(user) = current.users.get(&self.login_user) {
            self.connect.user = user.config.server_user().to_owned();
            self.connect.password = user.config.server_password().map(str::to_owned);
        }
        self.connect.max_prepared = current.config.pool.max_prepared_statements;
        self.connect.tls = current.server_tls.clone();
        // A session keeps its places in the pools of the servers that are still there (the
        // new pool took the old one's places over), so that a login waiting for one does
        // not take it at the reload.
        for (permit, pool) in places.into_iter().zip(old_pools) {
            let (Some(permit), Some(pool)) = (permit, pool) else {
                continue;
            };
            let Some(id) = current.backends.id_of(pool.address()) else {
                continue;
            };
            if let Some(new_pool) = current.pool(id, &self.connect)
                && new_pool.holds(&permit)
            {
                self.permits[id.0 as usize] = Some(permit);
                self.pools[id.0 as usize] = Some(new_pool);
            }
        }
        self.client.write_timeout = current.config.proxy.client_write_timeout();
        self.settings_digest = None;
        debug!("session now uses the reloaded configuration");
        self.runtime = current;
        Ok(())
    }

    /// Count a request and its latency; the client is idle (or in its transaction) again.
    fn record(&mut self, route: RouteKind, started: std::time::Instant, failed: bool) {
        self.clock = std::time::Instant::now();
        let elapsed = self.clock.saturating_duration_since(started);
        self.shared
            .stats
            .record(route, elapsed, failed, self.cancel_pid as usize);
        self.info.set_state(if self.tx == TxStatus::Idle {
            ClientState::Idle
        } else {
            ClientState::InTransaction
        });
        // Between requests: the connection the session holds, if any (its transaction's,
        // or a pinned or session-mode session's primary connection).
        let holds_primary =
            (self.pinned || self.mode == PoolMode::Session) && self.conns[0].is_some();
        let held = self.tx_conn.or(holds_primary.then_some(BackendId::PRIMARY));
        self.info.set_backend(held.map(|b| b.0));
    }

    /// Bookkeeping once a request completed: store a captured answer, learn the commit
    /// position of a write and invalidate what it changed, then pooled connections go back
    /// and the client gets the rest of the answer (held back until the cache knew of the
    /// commit).
    async fn after_request(&mut self, conn: BackendId) -> Result<()> {
        self.finish_capture();
        self.settle_writes(conn).await;
        self.release_idle();
        if !self.out.is_empty() {
            self.client.write(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Requests the proxy answers itself: a lone Sync, Closes of statements, DEALLOCATE of
    /// a protocol-level statement in a simple Query of its own (its server-side name
    /// differs, and other backends may hold it too).
    fn local_reply(&mut self, items: &[Item]) -> Option<Vec<Frame>> {
        if let [closes @ .., Item::Sync] = items
            && !closes.is_empty()
            && closes
                .iter()
                .all(|i| matches!(i, Item::CloseStatement { known, .. } if *known || !self.pinned))
        {
            // Closing statements (tokio-postgres does after every query with a string):
            // the server's statements stay shared, so no server takes part.
            let mut reply = Vec::with_capacity(closes.len() + 1);
            for close in closes {
                if let Item::CloseStatement { name, .. } = close {
                    self.statements.remove(name);
                    reply.push(protocol::close_complete());
                }
            }
            reply.push(protocol::ready_for_query(self.tx));
            return Some(reply);
        }
        if self.deferred_begin && self.tx == TxStatus::Failed {
            let (reply, ended) = request::answer_in_failed_block(items)?;
            if ended {
                // A ROLLBACK parsed in the same request is the session's statement now.
                for item in items {
                    if let Item::Parse(stmt) = item {
                        self.statements
                            .insert(stmt.parse.name.clone(), stmt.clone());
                    }
                }
                self.deferred_begin = false;
                self.tx = TxStatus::Idle;
                self.info.set_state(ClientState::Idle);
            } else if !reply.iter().any(|f| f.tag == tag::READY_FOR_QUERY) {
                // A Flush-ended batch: the rest of it up to the Sync is dropped, as the
                // server would.
                self.skip_until_sync = true;
            }
            return Some(reply);
        }
        if self.tx == TxStatus::Idle
            && let Some((reply, read_only)) = request::deferrable_begin(items)
        {
            self.tx = TxStatus::InTransaction;
            self.deferred_begin = true;
            self.deferred_read_only = read_only;
            self.info.set_state(ClientState::InTransaction);
            return Some(reply);
        }
        if let [Item::Sync] = items
            && self.tx == TxStatus::Idle
        {
            // A Sync with nothing before it (after an error in a Flush-ended request): every
            // request the proxy sent ended with a Sync, so no server has anything pending.
            return Some(vec![protocol::ready_for_query(TxStatus::Idle)]);
        }
        let [Item::Query { class, .. }] = items else {
            return None;
        };
        // Inside a transaction too: psycopg 3 (libpq < 17) deallocates its oldest statement
        // there. DEALLOCATE is not transactional. A failed block's server answers 25P02.
        if self.tx == TxStatus::Failed || class.statement_count != 1 {
            return None;
        }
        let tag = match class.session_ops.as_slice() {
            [SessionOp::Deallocate { name }] if self.statements.contains_key(name) => {
                self.statements.remove(name);
                "DEALLOCATE"
            }
            [SessionOp::DeallocateAll] if !self.pinned => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            _ => return None,
        };
        Some(vec![
            protocol::command_complete(tag),
            protocol::ready_for_query(self.tx),
        ])
    }

    /// No server could take the request: tell the client the way PostgreSQL reports a
    /// failed request, and keep the session.
    async fn report_unavailable(&mut self, e: Error, items: &[Item], open: bool) -> Result<()> {
        if matches!(e, Error::SettingsRefused(_) | Error::ClientGone) {
            // No server will serve this session: it ends, as a direct login with such a
            // startup parameter would (with the server's FATAL and SQLSTATE). Or the client
            // left while its request waited for a connection: nobody is there to answer.
            return Err(e);
        }
        if matches!(e, Error::Canceled) {
            debug!("request cancelled by the client while it waited for a server connection");
        } else {
            warn!(error = ?e.to_string(), "request failed before reaching a server");
        }
        if self.deferred_begin {
            // The transaction's first request reached no server: the block fails, as a
            // statement's error fails it, and its ROLLBACK is answered here.
            self.tx = TxStatus::Failed;
        }
        if self.pinned_state_lost
            || (self.tx != TxStatus::Idle
                && self
                    .tx_conn
                    .is_some_and(|b| self.conns[b.0 as usize].is_none()))
        {
            // The transaction's connection, or the pinned one, is gone: what it held is
            // lost with it, and so is the session.
            return Err(e);
        }
        self.last_failed = true;
        let mut frames = vec![e.to_error_response(Severity::Error)];
        let synced = items
            .iter()
            .any(|i| matches!(i, Item::Sync | Item::Query { .. } | Item::Forwarded(_)));
        if synced {
            frames.push(protocol::ready_for_query(self.tx));
        } else if open {
            self.skip_until_sync = true;
        }
        self.client.send(&frames).await
    }

    /// Record what `item` may write (read-your-writes, the cache's invalidation).
    fn note_writes(&mut self, item: &Item) {
        match item {
            // A fast-path call may write anything; a malformed Query runs nothing.
            Item::Forwarded(f) if f.tag == tag::FUNCTION_CALL => self.writes.note_unknown(),
            // What runs statements: a Query, a Bind (for the Execute that follows it). A
            // Parse or a Describe only prepares (a driver's prepare of an INSERT).
            Item::Query { class, .. } => self.writes.note(class),
            Item::Bind { stmt: Some(s), .. } => self.writes.note(&s.class),
            // A statement pgsplit does not know, in a pinned session: an SQL-level
            // PREPAREd one (libpq's PQexecPrepared), which may write anything.
            Item::Bind { stmt: None, .. } if self.pinned => self.writes.note_unknown(),
            _ => {}
        }
    }

    /// A request finished on `conn`: commit the session operations it carried, keep them
    /// for the end of the open transaction, or drop them when the server undid them.
    fn settle_session_ops(
        &mut self,
        conn: BackendId,
        ops: Vec<SessionOp>,
        failed: bool,
        rolled_back: bool,
        set_config_unread: bool,
    ) {
        if self.tx == TxStatus::Idle
            && let Some(c) = self.conns[conn.0 as usize].as_mut()
        {
            // Out of the transaction: its local settings are gone, and the session's own
            // are recorded below.
            c.parse_settings_changed = false;
        }
        if failed || rolled_back {
            // An error aborts the implicit transaction or the whole block, and a ROLLBACK
            // ends the block: SETs in them are undone by the server too. A failed block's
            // pending operations go at its ROLLBACK (reported as such even for COMMIT).
            // Not always all of them: a COMMIT before the error, a SET after the ROLLBACK
            // in the same request, or a ROLLBACK TO SAVEPOINT (reported as ROLLBACK too)
            // leave some in place, and the tags do not tell these cases apart (nor is a
            // `set_config` read back after an error). So a connection that had any SET
            // pending here serves no other session: transaction mode closes it at release.
            if !ops.is_empty() || !self.tx_ops.is_empty() || set_config_unread {
                if self.mode == PoolMode::Transaction {
                    self.tainted[conn.0 as usize] = true;
                } else if self.tx == TxStatus::Idle && !(conn.is_primary() && self.pinned) {
                    // The session's own connection: replaced, so that all its connections
                    // run with the settings it replays (one that holds more session state
                    // than settings stays, and so does an open transaction's).
                    self.release(conn, false);
                }
            }
            if self.tx == TxStatus::Idle {
                self.tx_ops.clear();
            }
            return;
        }
        if self.tx != TxStatus::Idle {
            self.tx_ops.extend(ops);
            return;
        }
        let mut all = std::mem::take(&mut self.tx_ops);
        all.extend(ops);
        if all.is_empty() {
            return;
        }
        for op in &all {
            match op {
                SessionOp::Set { name, sql } if name == CONSISTENCY_SETTING => {
                    if let Some(c) = Consistency::from_sql(sql) {
                        self.consistency = c;
                    }
                }
                SessionOp::Reset { name } if name == CONSISTENCY_SETTING => {
                    self.consistency = self.default_consistency();
                }
                SessionOp::ResetAll | SessionOp::DiscardAll => {
                    self.consistency = self.default_consistency();
                }
                _ => {}
            }
        }
        if self.settings.apply(&all) {
            // The statements DISCARD ALL dropped, on the session and the connection, were
            // forgotten when its CommandComplete came (see the relay): those the request
            // parsed after it stay.
            // What the same request pins may come after the DISCARD ALL: it stays pinned.
            if self.pinned && !self.pinned_for_good && !self.pinned_in_request {
                self.unpin();
            }
        }
        self.statements.set_context(self.settings.parse_context());
        let unfit = self.replicas_unfit();
        // Its texts may run unlike pgsplit read them (see `backslash_escapes_on`).
        self.state_outlives_reset |= unfit;
        self.pinned_for_good |= unfit;
        if !self.pinned && unfit {
            debug!("session pinned to the primary: a setting replicas cannot serve");
            self.pinned = true;
        }
        // The connection that ran the statements now has exactly what they did to it: a
        // RESET there returns to the server's default, which need not be this session's
        // (pooled connections start without its startup settings).
        if let Some(c) = self.conns[conn.0 as usize].as_mut() {
            state::apply_to_server(&mut c.settings, &all);
            c.settings_generation =
                (c.settings == self.settings.effective()).then_some(self.settings.generation);
        }
    }

    /// `conn`, in `id`'s slot, says the server runs with standard_conforming_strings off
    /// (see [`ServerConn::backslash_escapes`]).
    pub(super) fn note_backslash_escapes(&mut self, id: BackendId, conn: &ServerConn) {
        if conn.backslash_escapes {
            self.backslash_escapes_on(id);
        }
    }

    /// The server reads a backslash in a string unlike pgsplit (standard_conforming_strings
    /// off, however it came about: a role default, SET LOCAL, `UPDATE pg_settings`), so what
    /// it runs may not be what pgsplit classified: the session stays on its primary
    /// connection for good, and none of its connections serves anyone after it.
    pub(super) fn backslash_escapes_on(&mut self, id: BackendId) {
        self.pinned = true;
        self.pinned_for_good = true;
        self.state_outlives_reset = true;
        self.tainted[id.0 as usize] = true;
    }

    /// A request that succeeded outside a transaction block and pinned nothing itself took
    /// back what its statements take back in full (a pool's release: `SELECT
    /// pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *`): with no kind of pinning state
    /// left, the session is free.
    fn take_back_pins(&mut self, items: &[Item]) {
        if !self.pinned || self.pinned_for_good || self.pinned_in_request {
            return;
        }
        // Only what ran takes anything back (a driver prepares `UNLISTEN *` in a request
        // of its own before it executes it).
        let unpins = Item::executed(items)
            .into_iter()
            .fold(PinKinds::NONE, |all, c| all | c.unpins);
        if unpins.is_empty() {
            return;
        }
        self.pin_kinds = self.pin_kinds.without(unpins);
        if self.pin_kinds.is_empty() && !self.replicas_unfit() {
            debug!("session unpinned: its statements took back what pinned it");
            self.unpin();
        }
    }

    fn unpin(&mut self) {
        // What it wrote while pinned left no position to wait for, so its reads wait for
        // one the health checker reads from now on.
        self.min_lsn = u64::MAX;
        self.min_lsn_unknown_since = Some(self.runtime.backends.primary.health.lsn_samples());
        self.pinned = false;
        self.pin_kinds = PinKinds::NONE;
    }

    /// A setting in force (from the startup packet, or a `set_config` read back) under which
    /// replicas cannot serve this session's reads.
    fn replicas_unfit(&self) -> bool {
        // Transaction mode holds the startup parameters as settings; session mode passes
        // them to its connections instead.
        self.settings.replicas_unfit()
            || (self.mode == PoolMode::Session
                && state::REPLICA_UNFIT_SETTINGS.into_iter().any(|name| {
                    state::startup_value(&self.login_params, name)
                        .is_some_and(|v| state::replicas_unfit(name, &v))
                }))
    }

    /// The session's default isolation is serializable (its reads go to the primary, on
    /// pooled connections, until it is set back).
    pub(super) fn serializable_default(&self) -> bool {
        const NAME: &str = "default_transaction_isolation";
        match self.settings.serializable_default() {
            Some(serializable) => serializable,
            // Session mode passes the startup parameters to its connections instead of
            // holding them as settings.
            None => {
                self.mode == PoolMode::Session
                    && state::startup_value(&self.login_params, NAME)
                        .is_some_and(|v| state::is_serializable(&v))
            }
        }
    }

    fn default_consistency(&self) -> Consistency {
        Consistency::from_startup(
            &self.login_params,
            self.runtime.config.routing.read_your_writes,
        )
    }

    fn set_cancel_target(
        &self,
        target: Option<(crate::backend::CancelKey, Arc<std::sync::atomic::AtomicU32>)>,
    ) {
        *lock(&self.slot.cancel_target) = target;
    }
}

/// Remember how `reported` (a connection's ParameterStatus values, with the login's
/// settings set) spells the values the login gave: also those it spells as given, which
/// need no server either next time (pgjdbc sends its JVM's TimeZone at every login).
fn learn_spellings(pool: &Pool, reported: &[(String, String)], given: &[(String, String)]) {
    for (name, spelled) in reported {
        if let Some(value) = state::value_in(given, name)
            && !state::reported_as_given(name, value)
        {
            pool.learn_spelling(&name.to_ascii_lowercase(), value, spelled);
        }
    }
}

/// A request of one simple-protocol statement whose every reason to pin is undone by its
/// failure (see `Classification::pin_undone_by_failure`).
fn failure_undoes_pin(items: &[Item]) -> bool {
    let mut classes = items.iter().filter_map(Item::class);
    match (classes.next(), classes.next()) {
        (Some(c), None) => {
            c.statement_count == 1
                && c.pin_undone_by_failure
                && items.iter().any(|i| matches!(i, Item::Query { .. }))
        }
        _ => false,
    }
}
