//! `proxy.toml`: serde types, defaults, loading and validation.
//!
//! Pure: reads a file or a string, never opens sockets. Every field documents its default.
//! `Config::validate` is the one place a configuration is judged; nothing else may reject
//! a config later, so a loaded `Config` is always usable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Where and what, without the offending line: it may hold a password.
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Who may connect to the proxy. At least one is required.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    pub primary: BackendConfig,
    /// Streaming replicas; none is allowed (every read then goes to the primary).
    #[serde(default)]
    pub replicas: Vec<BackendConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// How a server connection is shared between clients.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Each client owns its server connections for its whole session.
    Session,
    /// Server connections are pooled and lent for one transaction (or one statement
    /// outside a transaction).
    Transaction,
}

/// Whose committed writes a session's reads must see (`[routing] read_your_writes`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "ReadYourWritesValue", into = "ReadYourWritesValue")]
pub enum ReadYourWrites {
    /// Any replica in rotation answers (`false`).
    Off,
    /// The session's own (`true`, `"session"`).
    Session,
    /// Those of every session of the same user and database through this pgsplit
    /// (`"user"`): an application's pool writes on one connection and reads on another.
    User,
}

/// `read_your_writes` as written: a boolean, or a scope.
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum ReadYourWritesValue {
    Flag(bool),
    Scope(String),
}

impl TryFrom<ReadYourWritesValue> for ReadYourWrites {
    type Error = String;

    fn try_from(v: ReadYourWritesValue) -> Result<Self, String> {
        match v {
            ReadYourWritesValue::Flag(false) => Ok(ReadYourWrites::Off),
            ReadYourWritesValue::Flag(true) => Ok(ReadYourWrites::Session),
            ReadYourWritesValue::Scope(s) => match s.as_str() {
                "session" => Ok(ReadYourWrites::Session),
                "user" => Ok(ReadYourWrites::User),
                "off" => Ok(ReadYourWrites::Off),
                other => Err(format!(
                    "read_your_writes = {other:?}: expected true, false, \"session\" or \"user\""
                )),
            },
        }
    }
}

impl From<ReadYourWrites> for ReadYourWritesValue {
    fn from(r: ReadYourWrites) -> Self {
        match r {
            ReadYourWrites::Off => ReadYourWritesValue::Flag(false),
            ReadYourWrites::Session => ReadYourWritesValue::Flag(true),
            ReadYourWrites::User => ReadYourWritesValue::Scope("user".to_owned()),
        }
    }
}

/// TLS towards PostgreSQL, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTls {
    Disable,
    /// TLS when the server offers it, else plain; the certificate is not checked.
    Prefer,
    /// TLS or no connection; the certificate is not checked, unless `server_tls_ca` is set:
    /// then, as libpq's `require` with a root certificate file, it is `VerifyCa`.
    Require,
    /// TLS, the certificate chained to `server_tls_ca`, whatever host it names.
    VerifyCa,
    /// TLS, the certificate chained to `server_tls_ca` and naming the configured host.
    VerifyFull,
}

/// How clients prove who they are to the proxy.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    /// No password asked: only for users explicitly configured so.
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address clients connect to. Default `127.0.0.1:6432`. Needs a restart to change.
    pub listen: SocketAddr,
    /// Default `"transaction"`. Needs a restart to change.
    pub pool_mode: PoolMode,
    /// Clients beyond this get FATAL 53300. Default 10000.
    pub max_client_connections: usize,
    /// Default authentication method for `[[users]]` without their own. Default SCRAM.
    pub auth_method: AuthMethod,
    /// A client must finish startup and authentication within this. Default 10000 ms.
    pub client_login_timeout_ms: u64,
    /// A client that takes nothing of what the proxy sends it for this long is disconnected,
    /// so one that stops reading a large result cannot hold a server connection for ever.
    /// 0: never. Default 60000 ms.
    pub client_write_timeout_ms: u64,
    /// A failed login waits this long before its error, which slows password guessing down
    /// (PostgreSQL's auth_delay). Default 0.
    pub auth_failure_delay_ms: u64,
    /// Largest frontend or inspected backend message accepted. Default 256 MiB.
    pub max_message_bytes: usize,
    /// HTTP address for `/metrics` (Prometheus) and `/health`. Default: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// The admin console's user: `psql -U <admin_user> pgsplit`. Default: no console.
    pub admin_user: Option<String>,
    /// The admin console's password (plain or a SCRAM-SHA-256 verifier).
    pub admin_password: Option<String>,
    /// Log filter (`info`, `pgsplit=debug`, ...); `--log` or RUST_LOG override it at start.
    pub log: String,
    /// On SIGTERM/SIGINT, running transactions get this long to finish. Default 30000 ms.
    pub shutdown_timeout_ms: u64,
    /// Threads serving clients: 1 (one event loop, the default), or more; 0 = one per
    /// core. Needs a restart to change.
    pub worker_threads: usize,
    /// PEM certificate chain and key: clients may then connect with TLS. Reloadable.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS. Default false.
    pub tls_required: bool,
    /// TLS towards PostgreSQL. Default `prefer` (as libpq).
    pub server_tls: ServerTls,
    /// PEM roots for `server_tls = "verify-full"`.
    pub server_tls_ca: Option<PathBuf>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6432)),
            pool_mode: PoolMode::Transaction,
            max_client_connections: 10_000,
            auth_method: AuthMethod::ScramSha256,
            client_login_timeout_ms: 10_000,
            client_write_timeout_ms: 60_000,
            auth_failure_delay_ms: 0,
            max_message_bytes: 256 << 20,
            metrics_listen: None,
            admin_user: None,
            admin_password: None,
            log: "info".into(),
            shutdown_timeout_ms: 30_000,
            worker_threads: 1,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            server_tls: ServerTls::Prefer,
            server_tls_ca: None,
        }
    }
}

impl ProxyConfig {
    pub fn client_login_timeout(&self) -> Duration {
        Duration::from_millis(self.client_login_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    pub fn client_write_timeout(&self) -> Option<Duration> {
        (self.client_write_timeout_ms > 0)
            .then(|| Duration::from_millis(self.client_write_timeout_ms))
    }

    pub fn auth_failure_delay(&self) -> Duration {
        Duration::from_millis(self.auth_failure_delay_ms)
    }
}

/// A user clients log in as.
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// A plain password, or a SCRAM-SHA-256 verifier (`SCRAM-SHA-256$iter:salt$stored:server`)
    /// as PostgreSQL stores it, or an md5 hash (`md5` + 32 hex digits, md5 auth only).
    /// May be omitted only with `auth_method = "trust"`.
    #[serde(default)]
    pub password: Option<String>,
    /// Overrides `[proxy] auth_method` for this user.
    #[serde(default)]
    pub auth_method: Option<AuthMethod>,
    /// Role used towards PostgreSQL. Default: `name`.
    #[serde(default)]
    pub server_user: Option<String>,
    /// Password used towards PostgreSQL. Default: `password` when it is plain.
    #[serde(default)]
    pub server_password: Option<String>,
}

impl UserConfig {
    pub fn server_user(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }

    /// The password towards PostgreSQL, if any (a verifier is no use there).
    pub fn server_password(&self) -> Option<&str> {
        self.server_password.as_deref().or(match &self.password {
            Some(p) if !is_verifier(p) => Some(p.as_str()),
            _ => None,
        })
    }
}

/// Whether a configured password is a stored verifier rather than the password itself.
pub fn is_verifier(p: &str) -> bool {
    p.starts_with("SCRAM-SHA-256$")
        || (p.len() == 35 && p.starts_with("md5") && p[3..].bytes().all(|c| c.is_ascii_hexdigit()))
}

/// One PostgreSQL server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub host: String,
    /// Default 5432.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Share of reads relative to other replicas. Default 1; 0 takes it out of rotation; at
    /// most [`MAX_WEIGHT`].
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Name shown in logs. Default `host:port`.
    #[serde(default)]
    pub name: Option<String>,
}

/// The same server as written: one port, and one host up to letter case and a directory's
/// trailing slash (names that resolve alike are not looked up).
fn same_address(a: &BackendConfig, b: &BackendConfig) -> bool {
    let host = |c: &BackendConfig| {
        if c.host.starts_with('/') {
            c.host.trim_end_matches('/').to_owned()
        } else {
            c.host.to_ascii_lowercase()
        }
    };
    a.port == b.port && host(a) == host(b)
}

impl BackendConfig {
    /// `host:port`, or for a `host` that is a directory (starts with `/`, as in libpq) the
    /// server's Unix-domain socket in it.
    pub fn address(&self) -> String {
        if self.host.starts_with('/') {
            return format!("{}/.s.PGSQL.{}", self.host.trim_end_matches('/'), self.port);
        }
        format!("{}:{}", self.host, self.port)
    }

    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.address())
    }
}

fn default_pg_port() -> u16 {
    5432
}

/// Largest replica weight: the balancer lays the weights out as one wheel of that many
/// slots per replica, so a typo such as `weight = 4000000000` must not reach it (it would
/// allocate 32 GB at startup or reload).
pub const MAX_WEIGHT: u32 = 1000;

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// After a session's write commits, its reads go only to replicas that replayed it
    /// (else the primary). Sessions override it with `SET pgsplit.consistency =
    /// 'eventual' | 'read_your_writes'` or the same startup parameter. `"user"`: after a
    /// write of any session of the same user and database. Default true (`"session"`).
    pub read_your_writes: ReadYourWrites,
    /// A replica further behind the primary than this leaves the rotation. Default 16 MiB.
    pub max_replica_lag_bytes: u64,
    /// Reads go to the primary when no replica is usable. Default true.
    pub fallback_to_primary: bool,
    /// Extra function names (lower-case) whose presence in a statement forces the primary.
    pub primary_functions: Vec<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            read_your_writes: ReadYourWrites::Session,
            max_replica_lag_bytes: 16 << 20,
            fallback_to_primary: true,
            primary_functions: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often each backend is checked. Default 1000 ms.
    pub interval_ms: u64,
    /// A check or a connect attempt slower than this fails. Default 1000 ms.
    pub timeout_ms: u64,
    /// Consecutive failed checks that take a node out of rotation. Default 2.
    pub failures: u32,
    /// Consecutive good checks that bring it back. Default 2.
    pub successes: u32,
    /// Role the checker logs in as. Default: the first `[[users]]` entry's server role.
    pub user: Option<String>,
    /// Its password. Default: that user's server password.
    pub password: Option<String>,
    /// Database the checker connects to. Default `postgres`.
    pub database: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 1000,
            timeout_ms: 1000,
            failures: 2,
            successes: 2,
            user: None,
            password: None,
            database: "postgres".into(),
        }
    }
}

impl HealthConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Server connections per backend, user and database (in session mode: connections
    /// sessions own at once). Default 20.
    pub size: usize,
    /// Idle connections kept open and warm per pool once it is in use. Default 0.
    pub min_idle: usize,
    /// Longest wait for a server connection; then the client gets 53300. Default 5000 ms.
    pub checkout_timeout_ms: u64,
    /// Connecting to (and authenticating with) a backend must finish within this.
    /// Default 5000 ms.
    pub connect_timeout_ms: u64,
    /// A server connection is closed once this old (at its next return). Default 1 h.
    pub max_lifetime_ms: u64,
    /// An idle server connection above `min_idle` is closed after this. Default 10 min.
    pub idle_timeout_ms: u64,
    /// Prepared statements one server connection keeps; the least recently used is closed
    /// beyond it. Default 1000.
    pub max_prepared_statements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 20,
            min_idle: 0,
            checkout_timeout_ms: 5000,
            connect_timeout_ms: 5000,
            max_lifetime_ms: 3_600_000,
            idle_timeout_ms: 600_000,
            max_prepared_statements: 1000,
        }
    }
}

impl PoolConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Serve whitelisted reads from Redis. Default false.
    pub enabled: bool,
    /// `redis://`, `rediss://`, `redis-cluster://` or `redis-sentinel://` URL (fred syntax).
    pub redis_url: String,
    /// TTL of entries whose rule sets none.
    pub default_ttl_s: u64,
    /// Results larger than this (in protocol bytes) are not stored.
    pub max_entry_bytes: usize,
    /// Every Redis call gives up after this long; the cache is then bypassed until Redis
    /// answers again.
    pub timeout_ms: u64,
    /// Prefix of every key pgsplit writes, so several deployments can share one Redis.
    /// Instances that must stay coherent need the same prefix.
    pub key_prefix: String,
    pub rules: Vec<CacheRule>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            redis_url: "redis://127.0.0.1:6379".into(),
            default_ttl_s: 60,
            max_entry_bytes: 1 << 20,
            timeout_ms: 100,
            key_prefix: "pgsplit".into(),
            rules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// A statement, matched after normalization (whitespace, comments and the case of
    /// unquoted words do not matter; literals and `$n` parameters do).
    #[serde(default)]
    pub query: Option<String>,
    /// A table: reads touching only whitelisted tables are cached.
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

impl CacheConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl Config {
    /// The role and password the health checks log in with: `[health] user` and `password`
    /// where set. A user not set is the first configured user with a password usable
    /// towards PostgreSQL (one given as a stored verifier has none: checks as that user
    /// would fail everywhere and take every server out of rotation), else the first user;
    /// a password not set is that of a configured user with that server role.
    pub fn health_login(&self) -> (String, Option<String>) {
        let user = match &self.health.user {
            Some(user) => user.clone(),
            None => self
                .users
                .iter()
                .find(|u| u.server_password().is_some())
                .or(self.users.first())
                .map_or_else(|| "postgres".to_owned(), |u| u.server_user().to_owned()),
        };
        let password = self.health.password.clone().or_else(|| {
            self.users
                .iter()
                .filter(|u| u.server_user() == user)
                .find_map(|u| u.server_password().map(str::to_owned))
        });
        (user, password)
    }

    /// Every setting as `section.key = value` lines (arrays indexed), secrets masked: what
    /// SHOW CONFIG lists.
    pub fn flattened(&self) -> Vec<(String, String)> {
        self.flattened_with(true)
    }

    /// [`flattened`](Self::flattened) with secrets shown (`mask` false): to tell what a
    /// reload changed, never to show.
    pub(crate) fn flattened_with(&self, mask: bool) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(v) = toml::Value::try_from(self) {
            flatten(&v, "", mask, &mut out);
        }
        // Validation refuses a weight on the primary: not a setting it has.
        out.retain(|(k, _)| k != "primary.weight");
        out
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::from_toml(&text)?;
        // Relative certificate paths mean: next to the config file.
        if let Some(dir) = path.parent() {
            let p = &mut config.proxy;
            for f in [&mut p.tls_cert, &mut p.tls_key, &mut p.server_tls_ca]
                .into_iter()
                .flatten()
            {
                if f.is_relative() {
                    *f = dir.join(&*f);
                }
            }
        }
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        #[cfg(feature = "capture")]
        capture_config(text);
        let cfg: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every rule a configuration must satisfy, checked at once so the user sees them all.
    fn validate_cache(&self, errors: &mut Vec<String>) {
        let c = &self.cache;
        if c.enabled {
            let scheme = c.redis_url.split_once("://").map(|(s, _)| s);
            let known = [
                "redis",
                "rediss",
                "redis-cluster",
                "rediss-cluster",
                "redis-sentinel",
                "rediss-sentinel",
            ];
            if !scheme.is_some_and(|s| known.contains(&s)) {
                errors.push(format!(
                    "cache.redis_url {:?}: expected redis://, rediss://, redis-cluster:// or redis-sentinel://",
                    without_url_password(&c.redis_url)
                ));
            } else if let Err(e) = fred::prelude::Config::from_url(&c.redis_url) {
                errors.push(format!(
                    "cache.redis_url {:?}: {e}",
                    without_url_password(&c.redis_url)
                ));
            }
        }
        if c.default_ttl_s == 0 {
            errors.push("cache.default_ttl_s must be at least 1".to_owned());
        }
        if c.timeout_ms == 0 {
            errors.push("cache.timeout_ms must be at least 1".to_owned());
        }
        if c.key_prefix.is_empty() || c.key_prefix.contains(['{', '}']) {
            errors.push("cache.key_prefix must be non-empty and without braces".to_owned());
        }
        for (i, r) in c.rules.iter().enumerate() {
            match (&r.query, &r.table) {
                (Some(q), None) if crate::cache::normalize(q).is_none() => errors.push(format!(
                    "cache.rules[{i}]: the query cannot be tokenized as SQL"
                )),
                (Some(_), None) | (None, Some(_)) => {}
                _ => errors.push(format!(
                    "cache.rules[{i}]: set exactly one of `query` and `table`"
                )),
            }
            if r.ttl_s == Some(0) {
                errors.push(format!("cache.rules[{i}]: ttl_s must be at least 1"));
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.users.is_empty() {
            errors.push("at least one [[users]] entry is required".to_owned());
        }
        let mut seen = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() {
                errors.push("a [[users]] entry has an empty name".to_owned());
            }
            if u.name.len() > 63 {
                // Clients' names are cut to 63 bytes at login, as the server cuts them.
                errors.push(format!(
                    "user {:?}: names longer than 63 bytes cannot log in",
                    u.name
                ));
            }
            if !seen.insert(u.name.as_str()) {
                errors.push(format!("user {:?} is listed twice", u.name));
            }
            let method = u.auth_method.unwrap_or(self.proxy.auth_method);
            match (&u.password, method) {
                (None, AuthMethod::Trust) => {}
                (None, _) => errors.push(format!("user {:?} needs a password", u.name)),
                (Some(p), AuthMethod::ScramSha256) if p.starts_with("md5") && is_verifier(p) => {
                    errors.push(format!(
                        "user {:?}: an md5 hash cannot be used for SCRAM authentication",
                        u.name
                    ))
                }
                (Some(p), AuthMethod::Md5) if p.starts_with("SCRAM-SHA-256$") => {
                    errors.push(format!(
                        "user {:?}: a SCRAM verifier cannot be used for md5 authentication",
                        u.name
                    ))
                }
                (Some(p), AuthMethod::ScramSha256)
                    if p.starts_with("SCRAM-SHA-256$") && scram_verifier_shape(p).is_none() =>
                {
                    errors.push(format!("user {:?}: malformed SCRAM verifier", u.name));
                }
                _ => {}
            }
        }
        if self.proxy.max_client_connections == 0 {
            errors.push("proxy.max_client_connections must be at least 1".to_owned());
        }
        if self.proxy.admin_user.is_some() != self.proxy.admin_password.is_some() {
            errors.push("proxy.admin_user and proxy.admin_password go together".to_owned());
        }
        if self
            .proxy
            .admin_user
            .as_ref()
            .is_some_and(|a| self.users.iter().any(|u| &u.name == a))
        {
            errors.push("proxy.admin_user must not also be a [[users]] name".to_owned());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.proxy.log).is_err() {
            errors.push(format!(
                "proxy.log {:?} is not a valid log filter",
                self.proxy.log
            ));
        }
        if self.proxy.tls_cert.is_some() != self.proxy.tls_key.is_some() {
            errors.push("proxy.tls_cert and proxy.tls_key go together".to_owned());
        }
        if self.proxy.tls_required && self.proxy.tls_cert.is_none() {
            errors.push("proxy.tls_required needs tls_cert and tls_key".to_owned());
        }
        match (self.proxy.server_tls, &self.proxy.server_tls_ca) {
            (ServerTls::VerifyFull, None) => {
                errors.push("proxy.server_tls = \"verify-full\" needs server_tls_ca".to_owned())
            }
            (ServerTls::VerifyCa, None) => {
                errors.push("proxy.server_tls = \"verify-ca\" needs server_tls_ca".to_owned())
            }
            // A CA that nothing checks would let an operator believe the servers are verified.
            (ServerTls::Disable | ServerTls::Prefer, Some(_)) => errors.push(
                "proxy.server_tls_ca is used with server_tls = \"require\", \"verify-ca\" or \"verify-full\" only"
                    .to_owned(),
            ),
            _ => {}
        }
        if self.proxy.max_message_bytes < 1024 {
            errors.push("proxy.max_message_bytes must be at least 1024".to_owned());
        }
        for b in std::iter::once(&self.primary).chain(&self.replicas) {
            if b.host.is_empty() {
                errors.push("a backend has an empty host".to_owned());
            }
            if b.port == 0 {
                errors.push(format!("backend {} has port 0", b.display_name()));
            }
        }
        // BAN, SHOW BACKENDS and the metrics' labels tell servers apart by name: a name
        // given must be no other server's name or address. One server listed twice would
        // take two shares of the reads (a weight says that) and be banned, counted and
        // reloaded as one.
        let backends: Vec<&BackendConfig> = std::iter::once(&self.primary)
            .chain(&self.replicas)
            .collect();
        for (i, b) in backends.iter().enumerate() {
            let role = |i: usize| if i == 0 { "primary" } else { "replica" };
            if let Some(j) = (0..i).find(|&j| same_address(backends[j], b)) {
                errors.push(format!(
                    "{} {} is listed again as a replica ({}); to give a replica more reads, raise its weight",
                    role(j),
                    backends[j].address(),
                    b.address()
                ));
            }
        }
        for (i, b) in backends.iter().enumerate() {
            if let Some(name) = &b.name
                && backends
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && (o.display_name() == *name || o.address() == *name))
            {
                errors.push(format!("two backends are named {name}"));
            }
        }
        if self.primary.weight != default_weight() {
            // Reads are shared among replicas only; the primary is their fallback.
            errors.push("primary.weight has no effect: weights share reads among replicas".into());
        }
        for r in self.replicas.iter().filter(|r| r.weight > MAX_WEIGHT) {
            errors.push(format!(
                "replica {}: weight {} is over the maximum of {MAX_WEIGHT}",
                r.display_name(),
                r.weight
            ));
        }
        self.validate_cache(&mut errors);
        if self.pool.size == 0 {
            errors.push("pool.size must be at least 1".to_owned());
        }
        if self.pool.min_idle > self.pool.size {
            errors.push("pool.min_idle must not exceed pool.size".to_owned());
        }
        if self.pool.max_prepared_statements == 0 {
            errors.push("pool.max_prepared_statements must be at least 1".to_owned());
        }
        if self.health.interval_ms == 0 || self.health.failures == 0 || self.health.successes == 0 {
            errors.push("health.interval_ms, failures and successes must be positive".to_owned());
        }
        if self.health.timeout_ms == 0
            || self.proxy.client_login_timeout_ms == 0
            || self.pool.connect_timeout_ms == 0
            || self.pool.checkout_timeout_ms == 0
            || self.pool.max_lifetime_ms == 0
            || self.pool.idle_timeout_ms == 0
        {
            errors.push("timeouts must be positive".to_owned());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors.join("; ")))
        }
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

/// Keep a copy of a config text under `$PGSPLIT_CAPTURE_DIR` (the `capture` feature, for
/// the config fuzz target's seeds), named by its content so repeats are stored once.
#[cfg(feature = "capture")]
fn capture_config(text: &str) {
    use std::hash::{Hash, Hasher};
    let Some(dir) = std::env::var_os("PGSPLIT_CAPTURE_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let mut h = std::hash::DefaultHasher::new();
    text.hash(&mut h);
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(format!("config-{:016x}.toml", h.finish())), text);
    }
}

/// `key.sub[0].name = value` pairs of a serialized config, passwords (`*password` keys and
/// inside URLs) masked: what SHOW CONFIG and Debug output show.
fn flatten(v: &toml::Value, prefix: &str, mask: bool, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, &key, mask, out);
            }
        }
        toml::Value::Array(a) if a.iter().all(|v| v.is_table()) => {
            for (i, v) in a.iter().enumerate() {
                flatten(v, &format!("{prefix}[{i}]"), mask, out);
            }
        }
        toml::Value::String(s) => {
            let shown = if mask && prefix.ends_with("password") {
                "********".into()
            } else if mask && prefix.ends_with("url") {
                without_url_password(s)
            } else {
                s.clone()
            };
            out.push((prefix.to_owned(), shown));
        }
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// Debug through [`flatten`], masked: configs reach logs and panics, passwords must not.
fn masked_debug<T: Serialize>(
    name: &str,
    v: &T,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(v) {
        flatten(&v, "", true, &mut out);
    }
    let mut d = f.debug_struct(name);
    for (k, v) in &out {
        d.field(k, v);
    }
    d.finish()
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        masked_debug("ProxyConfig", self, f)
    }
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        masked_debug("UserConfig", self, f)
    }
}

impl std::fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        masked_debug("CacheConfig", self, f)
    }
}

/// A TOML error as "line N, column M: message". toml's own rendering quotes the source line,
/// which may be `password = "..."` with a typo in the key.
fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let place = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    ConfigError::Parse(format!(
        "{}{}",
        place.unwrap_or_default(),
        e.message().trim_end()
    ))
}

/// `redis://user:secret@host` shown as `redis://user:********@host`, and any
/// `...password=` query parameter (fred's sentinelPassword) masked too. The userinfo ends at
/// the last `@` before the path, as URL parsers read it.
pub fn without_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority_and_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority_end = authority_and_path
        .find('/')
        .unwrap_or(authority_and_path.len());
    let (authority, path) = authority_and_path.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{user}:********@{host}")
        }
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}://{authority}{path}");
    if let Some(q) = query {
        let masked: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().ends_with("password") => {
                    format!("{k}=********")
                }
                _ => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&masked.join("&"));
    }
    out
}

/// Shape check of a stored SCRAM verifier, without pulling in the auth module (config is a
/// leaf): `SCRAM-SHA-256$<iterations>:<salt>$<stored key>:<server key>`.
fn scram_verifier_shape(v: &str) -> Option<()> {
    let rest = v.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iter, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    iter.parse::<u32>().ok().filter(|&i| i > 0)?;
    // Keys are base64 of 32-byte SHA-256 values.
    (!salt.is_empty() && stored.len() == 44 && server.len() == 44).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[users]]
        name = "app"
        password = "app_pw"
        [primary]
        host = "127.0.0.1"
    "#;

    #[test]
    fn health_checks_log_in_as_a_user_with_a_usable_password() {
        let verifier = "md5b1116845021429c9cd5c0c6bb22019de";
        let with = |users: &str, health: &str| {
            let text = format!("{users}\n[primary]\nhost = \"h\"\n[health]\n{health}");
            Config::from_toml(&text).unwrap().health_login()
        };
        let users = format!(
            "[[users]]\nname = \"md5user\"\npassword = \"{verifier}\"\nauth_method = \"md5\"\n\
             [[users]]\nname = \"app\"\npassword = \"app_pw\"\n\
             [[users]]\nname = \"web\"\npassword = \"{verifier}\"\nauth_method = \"md5\"\n\
             server_user = \"app\""
        );
        // The first user has only a verifier: the next one with a password.
        assert_eq!(with(&users, ""), ("app".into(), Some("app_pw".into())));
        // A health user given without a password: that of a user with that server role.
        assert_eq!(
            with(&users, "user = \"app\""),
            ("app".into(), Some("app_pw".into()))
        );
        assert_eq!(
            with(&users, "user = \"monitor\"\npassword = \"m\""),
            ("monitor".into(), Some("m".into()))
        );
        assert_eq!(with(&users, "user = \"monitor\""), ("monitor".into(), None));
        // No user has a usable password (trust towards the servers): the first.
        let only = format!(
            "[[users]]\nname = \"md5user\"\npassword = \"{verifier}\"\nauth_method = \"md5\""
        );
        assert_eq!(with(&only, ""), ("md5user".into(), None));
    }

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.proxy.listen.port(), 6432);
        assert_eq!(c.primary.port, 5432);
        assert_eq!(c.pool.size, 20);
        assert!(c.routing.fallback_to_primary);
        assert_eq!(c.users[0].server_user(), "app");
        assert_eq!(c.users[0].server_password(), Some("app_pw"));
        // SHOW CONFIG lists what can be set: not a weight for the primary.
        let shown = c.flattened();
        assert!(shown.iter().any(|(k, _)| k == "primary.port"));
        assert!(!shown.iter().any(|(k, _)| k == "primary.weight"));
    }

    #[test]
    fn read_your_writes_takes_a_flag_or_a_scope() {
        for (value, want) in [
            ("true", ReadYourWrites::Session),
            ("false", ReadYourWrites::Off),
            ("\"session\"", ReadYourWrites::Session),
            ("\"user\"", ReadYourWrites::User),
            ("\"off\"", ReadYourWrites::Off),
        ] {
            let text = format!("{MINIMAL}\n[routing]\nread_your_writes = {value}\n");
            let c = Config::from_toml(&text).unwrap();
            assert_eq!(c.routing.read_your_writes, want, "{value}");
            let again = toml::to_string(&c.routing).unwrap();
            let back: RoutingConfig = toml::from_str(&again).unwrap();
            assert_eq!(back.read_your_writes, want, "{again}");
        }
        assert_eq!(
            Config::from_toml(MINIMAL).unwrap().routing.read_your_writes,
            ReadYourWrites::Session
        );
        let err = Config::from_toml(&format!(
            "{MINIMAL}\n[routing]\nread_your_writes = \"everyone\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("read_your_writes"), "{err}");
    }

    #[test]
    fn debug_output_masks_passwords() {
        let text = format!(
            "{MINIMAL}\n[proxy]\nadmin_user = \"a\"\nadmin_password = \"adm1n-secret\"\n\
             [cache]\nredis_url = \"redis://:redis-secret@localhost\"\n"
        );
        let cfg = Config::from_toml(&text).unwrap();
        let shown = format!("{cfg:?}");
        for secret in ["adm1n-secret", "redis-secret", "app_pw"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("admin_user"), "{shown}");
    }

    #[test]
    fn parse_errors_never_quote_the_line() {
        let text = format!("{MINIMAL}\n[[users]]\nname = \"x\"\npasword = \"hunter2\"\n");
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("line ") && e.contains("pasword"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = format!("{MINIMAL}\n[routing]\nfallback = true\n");
        assert!(matches!(
            Config::from_toml(&text),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn validation_reports_every_problem() {
        let text = r#"
            [proxy]
            max_client_connections = 0
            client_login_timeout_ms = 0
            [[users]]
            name = "a"
            [primary]
            host = ""
            weight = 3
            [[replicas]]
            host = "r"
            [[replicas]]
            host = "r2"
            name = "r:5432"
        "#;
        let err = Config::from_toml(text).unwrap_err().to_string();
        assert!(err.contains("needs a password"), "{err}");
        assert!(err.contains("max_client_connections"), "{err}");
        assert!(err.contains("empty host"), "{err}");
        assert!(err.contains("timeouts must be positive"), "{err}");
        assert!(err.contains("primary.weight has no effect"), "{err}");
        assert!(err.contains("two backends are named r:5432"), "{err}");
        let long = format!(
            "[[users]]\nname = \"{}\"\nauth_method = \"trust\"\n[primary]\nhost = \"h\"\n",
            "u".repeat(64)
        );
        let err = Config::from_toml(&long).unwrap_err().to_string();
        assert!(err.contains("longer than 63 bytes"), "{err}");
    }

    #[test]
    fn a_server_listed_twice_is_refused() {
        let config =
            |servers: &str| format!("[[users]]\nname = \"a\"\nauth_method = \"trust\"\n{servers}");
        for (servers, expected) in [
            (
                "[primary]\nhost = \"p\"\n[[replicas]]\nhost = \"r\"\n[[replicas]]\nhost = \"R\"\nport = 5432\n",
                "replica r:5432 is listed again as a replica (R:5432)",
            ),
            (
                "[primary]\nhost = \"p\"\nport = 5433\n[[replicas]]\nhost = \"p\"\nport = 5433\nname = \"other\"\n",
                "primary p:5433 is listed again as a replica (p:5433)",
            ),
            (
                "[primary]\nhost = \"/run/pg\"\n[[replicas]]\nhost = \"/run/pg/\"\n",
                "primary /run/pg/.s.PGSQL.5432 is listed again",
            ),
        ] {
            let err = Config::from_toml(&config(servers)).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        let distinct = "[primary]\nhost = \"p\"\n[[replicas]]\nhost = \"p\"\nport = 5433\n[[replicas]]\nhost = \"r\"\n";
        Config::from_toml(&config(distinct)).unwrap();
    }

    #[test]
    fn cache_rules_are_validated() {
        let good = format!(
            "{MINIMAL}\n[cache]\nenabled = true\n[[cache.rules]]\ntable = \"t\"\n\
             [[cache.rules]]\nquery = \"SELECT 1\"\nttl_s = 5\n"
        );
        let c = Config::from_toml(&good).unwrap();
        assert_eq!(c.cache.rules.len(), 2);
        let bad = format!(
            "{MINIMAL}\n[cache]\nenabled = true\nredis_url = \"http://x\"\ntimeout_ms = 0\n\
             [[cache.rules]]\ntable = \"t\"\nquery = \"SELECT 1\"\n\
             [[cache.rules]]\nttl_s = 0\n\
             [[cache.rules]]\nquery = \"SELECT 'open\"\n"
        );
        let err = Config::from_toml(&bad).unwrap_err().to_string();
        for needle in [
            "cache.redis_url",
            "cache.timeout_ms",
            "rules[0]: set exactly one",
            "rules[1]: set exactly one",
            "rules[1]: ttl_s",
            "rules[2]: the query cannot be tokenized",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn tls_settings_go_together() {
        let text = format!(
            "[proxy]\ntls_cert = \"c.pem\"\ntls_required = true\nserver_tls = \"verify-full\"\n{MINIMAL}"
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains("tls_cert and proxy.tls_key go together"),
            "{err}"
        );
        assert!(err.contains("needs server_tls_ca"), "{err}");
        let unused =
            format!("[proxy]\nserver_tls = \"prefer\"\nserver_tls_ca = \"ca.crt\"\n{MINIMAL}");
        let err = Config::from_toml(&unused).unwrap_err().to_string();
        assert!(err.contains("server_tls_ca is used with"), "{err}");
        let chain = format!("[proxy]\nserver_tls = \"verify-ca\"\n{MINIMAL}");
        let err = Config::from_toml(&chain).unwrap_err().to_string();
        assert!(err.contains("\"verify-ca\" needs server_tls_ca"), "{err}");
        let ok = format!("[proxy]\nserver_tls = \"disable\"\n{MINIMAL}");
        assert_eq!(
            Config::from_toml(&ok).unwrap().proxy.server_tls,
            ServerTls::Disable
        );
        let bad = format!("[proxy]\nserver_tls = \"sometimes\"\n{MINIMAL}");
        assert!(Config::from_toml(&bad).is_err());
    }

    #[test]
    fn shown_urls_hide_their_password() {
        assert_eq!(
            without_url_password("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://:********@10.0.0.1:6379/0"
        );
        assert_eq!(
            without_url_password("rediss://app:s3cret@cache"),
            "rediss://app:********@cache"
        );
        assert_eq!(
            without_url_password("redis://cache:6379"),
            "redis://cache:6379"
        );
    }

    #[test]
    fn verifiers_are_recognised() {
        assert!(is_verifier("md5abcdefabcdefabcdefabcdefabcdefab"));
        assert!(!is_verifier("md5-is-my-password"));
        let text = r#"
            [[users]]
            name = "v"
            password = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            [primary]
            host = "h"
        "#;
        let c = Config::from_toml(text).unwrap();
        assert_eq!(c.users[0].server_password(), None);
        let bad = text.replace("4096:", "x:");
        assert!(Config::from_toml(&bad).is_err());
    }
}
