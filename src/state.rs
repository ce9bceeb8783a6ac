//! State shared by every session of one proxy instance: the current runtime (configuration
//! plus what is derived from it) behind an `ArcSwap`, and the registry of live sessions.
//!
//! No process-global state: two proxies can run in one test process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use atomic_waker::AtomicWaker;

use crate::auth::UserSecret;
use crate::backend::{
    BackendId, Backends, CancelKey, ConnectParams, PlaceSets, PlacesKey, Pool, PoolLimits,
};
use crate::cache::{CacheRules, ResultCache};
use crate::config::{Config, ConfigError, PoolMode, UserConfig};
use crate::router::ClassifyCache;

/// A configured user with its derived secret.
#[derive(Debug)]
pub struct UserEntry {
    pub config: UserConfig,
    pub secret: UserSecret,
}

/// Everything derived from one configuration. Sessions take an `Arc` of it at each request
/// boundary.
pub struct Runtime {
    pub config: Arc<Config>,
    pub users: HashMap<String, Arc<UserEntry>>,
    /// The admin console's login (`[proxy] admin_user` / `admin_password`), if configured.
    pub admin: Option<Arc<UserEntry>>,
    /// Keys the salts pgsplit chooses (plain passwords, unknown users): see
    /// [`crate::auth::salt_key`].
    pub salt_key: ring::hmac::Key,
    /// Client TLS, when `tls_cert` and `tls_key` are set.
    pub tls: Option<crate::tls::ClientTls>,
    /// TLS towards the servers.
    pub server_tls: Arc<crate::tls::ServerTlsPolicy>,
    pub backends: Backends,
    pub classify: ClassifyCache,
    /// What the result cache may hold (`[[cache.rules]]`).
    pub cache_rules: CacheRules,
    /// Pools by (backend, server user, database), made on first use.
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// The places of every server, user and database, shared with the configurations
    /// before and after this one: sessions still on an old one (for hours, in session
    /// mode) hold places that count against this one's `size`.
    places: Arc<PlaceSets>,
    /// A reload replaced this runtime: pools it makes from now on are retired at once.
    retired: AtomicBool,
}

type PoolKey = (BackendId, String, String);

impl Runtime {
    pub fn new(config: Config) -> Result<Runtime, ConfigError> {
        Runtime::new_reusing(config, None)
    }

    /// A runtime for `config` that keeps `old`'s knowledge of servers at the same address.
    pub fn new_reusing(config: Config, old: Option<&Runtime>) -> Result<Runtime, ConfigError> {
        config.validate()?;
        let salt_key = crate::auth::salt_key().clone();
        // A reload keeps the secrets of users it does not change: deriving a SCRAM secret
        // from a plain password is 4,096 rounds of HMAC, and a reload runs on the event
        // loop (thousands of users stalled every client for a second at each SIGHUP).
        let same_auth_default =
            |old: &Runtime| old.config.proxy.auth_method == config.proxy.auth_method;
        let mut users = HashMap::new();
        for u in &config.users {
            if let Some(kept) = old
                .filter(|old| same_auth_default(old))
                .and_then(|old| old.users.get(&u.name))
                .filter(|kept| kept.config == *u)
            {
                users.insert(u.name.clone(), kept.clone());
                continue;
            }
            let secret = UserSecret::for_user(&config, u, &salt_key).ok_or_else(|| {
                ConfigError::Invalid(format!("user {:?}: unusable password", u.name))
            })?;
            users.insert(
                u.name.clone(),
                Arc::new(UserEntry {
                    config: u.clone(),
                    secret,
                }),
            );
        }
        let kept_admin = old.and_then(|old| old.admin.as_ref()).filter(|kept| {
            Some(&kept.config.name) == config.proxy.admin_user.as_ref()
                && kept.config.password == config.proxy.admin_password
        });
        let admin = match (&config.proxy.admin_user, &config.proxy.admin_password) {
            _ if kept_admin.is_some() => kept_admin.cloned(),
            (Some(name), Some(password)) => {
                let user = UserConfig {
                    name: name.clone(),
                    password: Some(password.clone()),
                    auth_method: Some(crate::config::AuthMethod::ScramSha256),
                    server_user: None,
                    server_password: None,
                };
                let secret = UserSecret::for_user(&config, &user, &salt_key).ok_or_else(|| {
                    ConfigError::Invalid("proxy.admin_password: unusable password".into())
                })?;
                Some(Arc::new(UserEntry {
                    config: user,
                    secret,
                }))
            }
            _ => None,
        };
        let tls = match (&config.proxy.tls_cert, &config.proxy.tls_key) {
            (Some(cert), Some(key)) => {
                Some(crate::tls::acceptor(cert, key).map_err(ConfigError::Invalid)?)
            }
            _ => None,
        };
        let server_tls = crate::tls::ServerTlsPolicy::new(
            config.proxy.server_tls,
            config.proxy.server_tls_ca.as_deref(),
        )
        .map_err(ConfigError::Invalid)?;
        let backends = Backends::from_config_reusing(&config, old.map(|o| &o.backends));
        let pools = old.map_or_else(HashMap::new, |o| {
            o.pools_still_valid(&config, &backends, &server_tls)
        });
        Ok(Runtime {
            backends,
            admin,
            salt_key,
            tls,
            server_tls: Arc::new(server_tls),
            classify: ClassifyCache::new(16_384, config.routing.primary_functions.clone()),
            cache_rules: CacheRules::new(&config.cache),
            users,
            pools: Mutex::new(pools),
            places: old.map_or_else(|| PlaceSets::new(config.pool.size), |o| o.places.clone()),
            retired: AtomicBool::new(false),
            config: Arc::new(config),
        })
    }

    /// The pools a reload to `config` can keep, connections and all: same pool settings and
    /// server TLS (mode and trusted roots, read from the CA file now), the same server at the same place, and a user who logs in to it the same
    /// way. Throwing them away would make every client reconnect to the servers at once.
    fn pools_still_valid(
        &self,
        config: &Config,
        backends: &Backends,
        server_tls: &crate::tls::ServerTlsPolicy,
    ) -> HashMap<PoolKey, Arc<Pool>> {
        let old = &self.config;
        if old.pool != config.pool
            || self.server_tls.mode != server_tls.mode
            || self.server_tls.roots != server_tls.roots
            || old.proxy.max_message_bytes != config.proxy.max_message_bytes
        {
            return HashMap::new();
        }
        // Every user that logs in to the servers as this role must still use its password:
        // the pool key does not hold the password.
        let same_login = |params: &ConnectParams| {
            let mut users = config
                .users
                .iter()
                .filter(|u| u.server_user() == params.user)
                .peekable();
            users.peek().is_some()
                && users.all(|u| u.server_password() == params.password.as_deref())
        };
        lock(&self.pools)
            .iter()
            // One that never reached its server may be a made-up database's, still
            // logging in: left to `forget_unconnected_pool`.
            .filter(|(_, pool)| pool.has_connected())
            .filter(|((id, _, _), pool)| {
                backends
                    .get(*id)
                    .is_some_and(|b| b.address() == pool.address() && b.name() == pool.name())
                    && same_login(pool.params())
            })
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect()
    }

    /// The pool for `backend` and these credentials, made on first use. Sessions keep the
    /// `Arc`, so this lock is taken once per session and backend, not per query.
    pub fn pool(&self, backend: BackendId, params: &ConnectParams) -> Option<Arc<Pool>> {
        let b = self.backends.get(backend)?;
        let key = (backend, params.user.clone(), params.database.clone());
        let mut pools = lock(&self.pools);
        let mut made = false;
        let pool = pools.entry(key).or_insert_with(|| {
            made = true;
            let places = self.places.get(&places_key(b, params));
            let p = &self.config.pool;
            Pool::new(
                backend,
                b.address(),
                b.name(),
                ConnectParams {
                    // Pooled connections start bare: each client's startup settings are
                    // replayed as session settings where they differ.
                    startup: Vec::new(),
                    ..params.clone()
                },
                PoolLimits {
                    size: p.size,
                    // Session mode: idle connections wait for a session with their
                    // startup parameters, which warm ones opened in advance cannot know.
                    min_idle: match self.config.proxy.pool_mode {
                        PoolMode::Transaction => p.min_idle,
                        PoolMode::Session => 0,
                    },
                    checkout_timeout: Duration::from_millis(p.checkout_timeout_ms),
                    connect_timeout: Duration::from_millis(p.connect_timeout_ms),
                    max_lifetime: Duration::from_millis(p.max_lifetime_ms),
                    idle_timeout: Duration::from_millis(p.idle_timeout_ms),
                    max_message: self.config.proxy.max_message_bytes,
                },
                places,
            )
        });
        if made && self.retired.load(Ordering::Relaxed) {
            // Made by a session still on this configuration after a reload replaced it.
            // (Not one the reload kept: the new configuration uses that one too.)
            pool.retire();
        }
        Some(pool.clone())
    }

    /// The sets of places, shared with the configurations before and after this one.
    pub fn place_sets(&self) -> &PlaceSets {
        &self.places
    }

    /// When this runtime is about to replace `old` (a reload): bring every set of places
    /// to this pool `size` (a client waiting for a place gets one now if that grew), and
    /// retire the pools of `old` this one did not keep, making their successors now, so
    /// that SHOW POOLS and /metrics count the places held from the start. (A server or a
    /// server login the reload removed has no successor.) Not while building this runtime:
    /// a reload can still fail after that.
    pub fn take_over_pools(&self, old: &Runtime) {
        self.places.resize(self.config.pool.size);
        // First: a pool `old` makes from now on is retired as it is made.
        old.retired.store(true, Ordering::Relaxed);
        let replaced: Vec<Arc<Pool>> = {
            let kept = lock(&self.pools);
            lock(&old.pools)
                .values()
                .filter(|p| !kept.values().any(|k| Arc::ptr_eq(k, p)))
                .cloned()
                .collect()
        };
        for pool in replaced {
            pool.retire();
            // One that never reached its server may be a made-up database's.
            if !pool.has_connected() {
                continue;
            }
            let Some(id) = self.backends.id_of(pool.address()) else {
                continue;
            };
            let Some(login) = self
                .users
                .values()
                .find(|u| u.config.server_user() == pool.user())
            else {
                continue;
            };
            let params = ConnectParams {
                user: pool.user().to_owned(),
                password: login.config.server_password().map(str::to_owned),
                database: pool.database().to_owned(),
                startup: Vec::new(),
                max_prepared: self.config.pool.max_prepared_statements,
                tls: self.server_tls.clone(),
            };
            self.pool(id, &params);
        }
    }

    /// Forget the pool for `backend` and these credentials if it never reached its server
    /// (a login to a database or role that does not exist), and its set of places if
    /// nothing else holds that: a client making up names must not leave either behind.
    pub fn forget_unconnected_pool(&self, backend: BackendId, params: &ConnectParams) {
        let key = (backend, params.user.clone(), params.database.clone());
        let mut pools = lock(&self.pools);
        // Only one nothing else holds: another first login still connecting through it
        // would go on using it, outside the list (unseen by maintenance, SHOW POOLS and
        // reloads), beside the next pool made for the key.
        if pools
            .get(&key)
            .is_some_and(|pool| !pool.has_connected() && Arc::strong_count(pool) == 1)
        {
            pools.remove(&key);
            if let Some(b) = self.backends.get(backend) {
                self.places.forget_unused(&places_key(b, params));
            }
        }
    }

    /// Every pool made so far.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }
}

/// What other tasks need of a live session.
#[derive(Default)]
pub struct SessionSlot {
    /// What a CancelRequest carrying the session's key must reach: the backend query the
    /// session is running right now, if any.
    /// With the count of cancel requests on their way to that connection.
    pub cancel_target: Mutex<Option<(CancelKey, Arc<AtomicU32>)>>,
    /// The session waits for a server connection to run a request on: a cancel request
    /// that comes meanwhile has no query to reach, and sets `cancel_requested` instead.
    pub waiting: AtomicBool,
    pub cancel_requested: AtomicBool,
    /// Wakes the session when something it waits on changes outside its sockets (the proxy
    /// begins draining, a cancel request comes while it waits in a pool's queue). A session re-registers it at every wait, which costs a few atomic
    /// operations where a `Notify` or `CancellationToken` waiter takes a lock to join and
    /// another to leave, once per request.
    nudge: AtomicWaker,
}

impl SessionSlot {
    /// The session starts waiting with no query running (for a pooled connection, for a
    /// long text's classification): a cancel request from now on is noted, not dropped.
    pub fn begin_wait(&self) {
        self.cancel_requested.store(false, Ordering::Relaxed);
        // Release: a cancel handler that sees `waiting` sees the reset before it.
        self.waiting.store(true, Ordering::Release);
    }

    /// The wait is over: whether a cancel request came during it (the flag is cleared, so
    /// none is left to stop a later wait).
    pub fn end_wait(&self) -> bool {
        self.waiting.store(false, Ordering::Relaxed);
        self.cancel_requested.swap(false, Ordering::AcqRel)
    }

    /// Ready once `flag` is set; the setter must call [`SessionRegistry::nudge_all`] after.
    pub async fn wait_for(&self, flag: &AtomicBool) {
        std::future::poll_fn(|cx| {
            // Registered before the check: a nudge between the two still wakes us.
            self.nudge.register(cx.waker());
            if flag.load(Ordering::SeqCst) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// Live sessions by the process id the proxy handed out in BackendKeyData.
#[derive(Default)]
pub struct SessionRegistry {
    map: Mutex<HashMap<i32, (i32, Arc<SessionSlot>)>>,
    next_pid: AtomicI32,
}

impl SessionRegistry {
    /// A fresh (pid, secret) for a session, and the slot it keeps current.
    pub fn register(&self) -> (i32, i32, Arc<SessionSlot>) {
        let slot = Arc::new(SessionSlot::default());
        let secret: i32 = rand::random();
        let mut map = lock(&self.map);
        loop {
            // Positive and unique among live sessions; wraps after 2^31 sessions.
            let pid = self
                .next_pid
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1)
                & 0x7fff_ffff;
            if pid != 0 && !map.contains_key(&pid) {
                map.insert(pid, (secret, slot.clone()));
                return (pid, secret, slot);
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        lock(&self.map).remove(&pid);
    }

    /// The backend target for a cancel request, if the key is valid and a query runs, and
    /// a mark on its server connection until the request has been delivered: the session
    /// then closes that connection instead of pooling it (taken under the lock the session
    /// clears its target under, so a session that cleared it sees every mark).
    pub fn cancel_target(&self, pid: i32, secret: i32) -> Option<(CancelKey, CancelInFlight)> {
        let map = lock(&self.map);
        let (s, slot) = map.get(&pid)?;
        if *s != secret {
            return None;
        }
        let target = lock(&slot.cancel_target);
        let Some((key, count)) = target.as_ref() else {
            if slot.waiting.load(Ordering::Acquire) {
                slot.cancel_requested.store(true, Ordering::SeqCst);
                // A session waiting in a pool's queue stops waiting (`wait_for`).
                slot.nudge.wake();
            }
            return None;
        };
        count.fetch_add(1, Ordering::SeqCst);
        Some((key.clone(), CancelInFlight(count.clone())))
    }

    /// Wake every session, to look again at what changed.
    pub fn nudge_all(&self) {
        for (_, slot) in lock(&self.map).values() {
            slot.nudge.wake();
        }
    }
}

/// A cancel request on its way to a server connection (see
/// [`SessionRegistry::cancel_target`]); delivered when dropped.
pub struct CancelInFlight(Arc<AtomicU32>);

impl Drop for CancelInFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain read or write of a value; a panic elsewhere
    // cannot leave it half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The proxy instance's shared state.
pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    pub sessions: SessionRegistry,
    /// The Redis result cache, when `[cache] enabled`.
    pub cache: Option<Arc<ResultCache>>,
    /// Counters, latency histograms and the client registry.
    pub stats: crate::stats::Stats,
    /// The file the configuration came from (reloads read it again).
    pub config_path: std::sync::OnceLock<std::path::PathBuf>,
    /// How the last reloads went.
    pub reload: Mutex<ReloadStatus>,
    /// Held through a reload, from reading the file to recording the outcome.
    pub reloading: Mutex<()>,
    /// Applies a new log filter (set by `main`; tests run without one).
    pub log_filter: std::sync::OnceLock<LogFilterFn>,
    /// Health checkers of the current runtime.
    pub checkers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set when the proxy shuts down (by [`Shared::begin_draining`]): sessions end at
    /// their next idle point.
    pub draining: AtomicBool,
    /// By (user, database): the commit position of the last write of any of its sessions,
    /// which the others' reads wait for under `read_your_writes = "user"`. Kept across
    /// reloads; one entry per pair that logged in.
    user_writes: Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
    /// Addresses of the replicas an operator banned: a reload that drops such a replica
    /// and a later one that brings it back find it banned still.
    pub banned: Mutex<std::collections::HashSet<String>>,
}

pub type LogFilterFn = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The outcome of config reloads, for SHOW CONFIG and the metrics.
#[derive(Debug, Default, Clone)]
pub struct ReloadStatus {
    pub applied: u64,
    pub failed: u64,
    /// Unix time of the last applied reload.
    pub last_applied_unix: Option<u64>,
    /// The last attempt's error, cleared by the next success.
    pub last_error: Option<String>,
    /// What the last applied reload changed.
    pub last_summary: Option<String>,
    /// A digest of the file's contents as the last reload (of any cause) read them (not
    /// the contents: they hold passwords): the file watcher reloads when the file differs,
    /// so a SIGHUP or RELOAD between two of its polls cannot leave the proxy running what
    /// the file no longer says.
    pub last_read: Option<[u8; 32]>,
}

impl Shared {
    /// Must run inside a tokio runtime: the cache connects to Redis in the background.
    pub fn new(runtime: Runtime) -> Arc<Shared> {
        Arc::new_cyclic(|weak: &std::sync::Weak<Shared>| {
            let cache_config = &runtime.config.cache;
            let cache = if cache_config.enabled {
                // The primary's position as the health checker last saw it: for the epoch
                // bump after a Redis outage, when no write's own position is at hand.
                let weak = weak.clone();
                let lsn_source = Box::new(move || {
                    weak.upgrade()
                        .map_or(0, |s| s.runtime.load().backends.primary.health.lsn())
                });
                match ResultCache::connect(cache_config, lsn_source) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "result cache disabled: bad redis_url");
                        None
                    }
                }
            } else {
                None
            };
            Shared {
                runtime: ArcSwap::from_pointee(runtime),
                sessions: SessionRegistry::default(),
                cache,
                stats: crate::stats::Stats::default(),
                config_path: std::sync::OnceLock::new(),
                reload: Mutex::new(ReloadStatus::default()),
                reloading: Mutex::new(()),
                log_filter: std::sync::OnceLock::new(),
                checkers: Mutex::new(Vec::new()),
                draining: AtomicBool::new(false),
                user_writes: Mutex::new(HashMap::new()),
                banned: Mutex::new(std::collections::HashSet::new()),
            }
        })
    }

    /// The shared commit position of `user`'s sessions on `database` (see
    /// [`Shared::user_writes`]'s field).
    pub fn user_writes(&self, user: &str, database: &str) -> Arc<AtomicU64> {
        lock(&self.user_writes)
            .entry((user.to_owned(), database.to_owned()))
            .or_default()
            .clone()
    }

    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.sessions.nudge_all();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Which set of places a pool of `backend` for these credentials uses.
fn places_key(backend: &crate::backend::Backend, params: &ConnectParams) -> PlacesKey {
    (
        backend.address(),
        params.user.clone(),
        params.database.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn a_reload_keeps_the_secrets_of_users_it_does_not_change() {
        let text = |app_pw: &str, default: &str| {
            format!(
                "[proxy]\nauth_method = \"{default}\"\nadmin_user = \"pgsplit\"\n\
                 admin_password = \"console\"\n\
                 [[users]]\nname = \"app\"\npassword = \"{app_pw}\"\n\
                 [[users]]\nname = \"web\"\npassword = \"web_pw\"\n\
                 [primary]\nhost = \"127.0.0.1\"\n"
            )
        };
        let runtime = |text: &str, old: Option<&Runtime>| {
            Runtime::new_reusing(Config::from_toml(text).unwrap(), old).unwrap()
        };
        let old = runtime(&text("app_pw", "scram-sha-256"), None);
        let new = runtime(&text("rotated", "scram-sha-256"), Some(&old));
        assert!(Arc::ptr_eq(&old.users["web"], &new.users["web"]));
        assert!(!Arc::ptr_eq(&old.users["app"], &new.users["app"]));
        assert!(Arc::ptr_eq(
            old.admin.as_ref().unwrap(),
            new.admin.as_ref().unwrap()
        ));
        // Another default method changes what a user without its own is asked.
        let md5 = runtime(&text("rotated", "md5"), Some(&new));
        assert!(!Arc::ptr_eq(&new.users["web"], &md5.users["web"]));
        assert!(matches!(md5.users["web"].secret, UserSecret::Md5(_)));
        let rotated = text("rotated", "md5").replace("\"console\"", "\"console2\"");
        let admin = runtime(&rotated, Some(&md5));
        assert!(!Arc::ptr_eq(
            md5.admin.as_ref().unwrap(),
            admin.admin.as_ref().unwrap()
        ));
    }

    #[test]
    fn cancel_keys_need_the_secret_and_a_running_query() {
        let r = SessionRegistry::default();
        let (pid, secret, slot) = r.register();
        let key_of = |pid, secret| r.cancel_target(pid, secret).map(|(key, _)| key);
        assert_eq!(key_of(pid, secret), None);
        let key = CancelKey {
            addr: crate::backend::ServerAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 5432))),
            pid: 42,
            secret: 7,
        };
        let cancels = Arc::new(AtomicU32::new(0));
        *lock(&slot.cancel_target) = Some((key.clone(), cancels.clone()));
        // The connection counts the request as on its way until it has been delivered.
        let (found, in_flight) = r.cancel_target(pid, secret).unwrap();
        assert_eq!(found, key);
        assert_eq!(cancels.load(Ordering::SeqCst), 1);
        drop(in_flight);
        assert_eq!(cancels.load(Ordering::SeqCst), 0);
        assert_eq!(key_of(pid, secret.wrapping_add(1)), None);
        assert_eq!(cancels.load(Ordering::SeqCst), 0);
        r.unregister(pid);
        assert_eq!(key_of(pid, secret), None);
        let (pid2, _, _) = r.register();
        assert_ne!(pid, pid2);
    }

    #[tokio::test]
    async fn a_nudge_wakes_a_session_waiting_for_its_flag() {
        let r = SessionRegistry::default();
        let (_, _, slot) = r.register();
        let flag = Arc::new(AtomicBool::new(false));
        let waiter = tokio::spawn({
            let flag = flag.clone();
            async move { slot.wait_for(&flag).await }
        });
        // The waiter runs up to its wait (this runtime has one thread).
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        flag.store(true, Ordering::SeqCst);
        r.nudge_all();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
    }
}
