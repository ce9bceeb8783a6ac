//! Test harness: one real cluster (primary + 2 streaming replicas + Redis) per test run,
//! started by the project's own `scripts/cluster` on free ports in a temp dir, torn down by
//! its watchdog when this process exits. Each test starts its own proxy in-process on port 0.

#![allow(dead_code)]

mod binary;
mod raw;
pub use binary::{ProxyProcess, peak_rss_kib, rss_kib};
pub use raw::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use pgsplit::config::Config;
use pgsplit::server::Server;
use pgsplit::state::{Runtime, Shared};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

pub struct Cluster {
    pub env: HashMap<String, String>,
    pub primary: u16,
    pub replicas: [u16; 2],
    pub redis: u16,
    pub dir: PathBuf,
}

impl Cluster {
    pub fn pg_bin(&self, tool: &str) -> PathBuf {
        Path::new(&self.env["PGSPLIT_PG_BIN"]).join(tool)
    }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static FAILURE_CLUSTER: OnceLock<Cluster> = OnceLock::new();

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared cluster; started on first use. `PGSPLIT_TEST_CLUSTER_ENV` may name the
/// cluster.env of a cluster that is already running.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let env_path = match std::env::var("PGSPLIT_TEST_CLUSTER_ENV") {
            Ok(p) => PathBuf::from(p),
            Err(_) => start_cluster("main", &[]),
        };
        load_cluster(&env_path)
    })
}

/// A second cluster for tests that stop, kill or pause nodes (they hold
/// [`failure_lock`] so they never overlap). Its replica2 applies WAL 2 s late
/// (`recovery_min_apply_delay`): a deterministic lagging replica.
pub fn failure_cluster() -> &'static Cluster {
    FAILURE_CLUSTER.get_or_init(|| {
        load_cluster(&start_cluster(
            "failure",
            &["--replica-delay", "replica2=2s"],
        ))
    })
}

/// Serializes the tests that break nodes of the failure cluster.
pub fn failure_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

/// Run `scripts/cluster ARGS --dir <cluster dir>` (stop-node, start-node ...) off the
/// runtime's threads, so an in-process proxy keeps serving meanwhile.
pub async fn cluster_cmd(c: &Cluster, args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let dir = c.dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(repo_root().join("scripts/cluster"))
            .args(&args)
            .arg("--dir")
            .arg(&dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run scripts/cluster")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "scripts/cluster failed");
}

fn load_cluster(env_path: &Path) -> Cluster {
    {
        let text = std::fs::read_to_string(env_path).expect("read cluster.env");
        let env: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        let port = |k: &str| env[k].parse::<u16>().expect("port");
        Cluster {
            primary: port("PGSPLIT_PRIMARY_PORT"),
            replicas: [port("PGSPLIT_REPLICA1_PORT"), port("PGSPLIT_REPLICA2_PORT")],
            redis: port("PGSPLIT_REDIS_PORT"),
            dir: PathBuf::from(&env["PGSPLIT_CLUSTER_DIR"]),
            env,
        }
    }
}

fn start_cluster(name: &str, extra: &[&str]) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000;
    // Short: the unix socket path inside it has a length limit.
    let dir = std::env::temp_dir().join(format!("pgsplit-{name}-{}-{stamp}", std::process::id()));
    let out = Command::new(repo_root().join("scripts/cluster"))
        .args(["up", "--dir"])
        .arg(&dir)
        .args([
            "--primary-port",
            "0",
            "--replica-ports",
            "0,0",
            "--redis-port",
            "0",
        ])
        .args(extra)
        .args(["--owner-pid", &std::process::id().to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/cluster");
    assert!(out.status.success(), "scripts/cluster up failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().expect("cluster.env path").trim())
}

/// The proxy configuration the tests start from: every cluster user, all three nodes.
pub fn base_config_toml(c: &Cluster) -> String {
    format!(
        r#"
        [proxy]
        listen = "127.0.0.1:0"
        pool_mode = "transaction"

        [[users]]
        name = "app"
        password = "app_pw"

        [[users]]
        name = "admin"
        password = "admin_password"

        [[users]]
        name = "md5user"
        password = "md5_pw"
        auth_method = "md5"

        [[users]]
        name = "trustuser"
        auth_method = "trust"

        [primary]
        host = "127.0.0.1"
        port = {}

        [[replicas]]
        host = "127.0.0.1"
        port = {}

        [[replicas]]
        host = "127.0.0.1"
        port = {}
        "#,
        c.primary, c.replicas[0], c.replicas[1]
    )
}

/// A config made by [`base_config_toml`] (or from it) without the replica on `port`.
pub fn without_replica(toml: &str, port: u16) -> String {
    let block = format!("[[replicas]]\n        host = \"127.0.0.1\"\n        port = {port}\n");
    assert!(
        toml.contains(&block),
        "no replica on port {port} in the config"
    );
    toml.replacen(&block, "", 1)
}

/// `toml` with extra `[proxy]` settings (lines like `max_client_connections = 2`).
pub fn with_proxy_settings(toml: &str, lines: &str) -> String {
    toml.replacen("[proxy]\n", &format!("[proxy]\n{lines}\n"), 1)
}

/// `toml` in session pool mode.
pub fn session_mode(toml: &str) -> String {
    toml.replace("pool_mode = \"transaction\"", "pool_mode = \"session\"")
}

/// A proxy running inside the test's runtime; stopped when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    /// `/metrics` and `/health`, when the config sets `metrics_listen`.
    pub metrics: Option<SocketAddr>,
    shutdown: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What blocking code (psql, pgbench) needs of a proxy.
#[derive(Clone)]
pub struct ProxyHandle {
    pub addr: SocketAddr,
}

impl ProxyHandle {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Proxy {
    pub fn clone_handle(&self) -> ProxyHandle {
        ProxyHandle { addr: self.addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn conn_str(&self, user: &str, password: &str) -> String {
        let password = if password.is_empty() {
            String::new()
        } else {
            format!(" password={password}")
        };
        format!(
            "host=127.0.0.1 port={} user={user}{password} dbname=appdb",
            self.port()
        )
    }

    /// Whether `holds` holds for every replica in the proxy's current configuration.
    pub fn every_replica(&self, holds: impl Fn(&pgsplit::backend::Backend) -> bool) -> bool {
        self.shared
            .runtime
            .load()
            .backends
            .replicas
            .iter()
            .all(holds)
    }

    /// Server connections (lent, idle) summed over the pools that `counts` picks.
    pub fn pool_counts(&self, counts: impl Fn(&pgsplit::backend::Pool) -> bool) -> (usize, usize) {
        self.shared
            .runtime
            .load()
            .pools()
            .iter()
            .filter(|p| counts(p))
            .map(|p| p.counts())
            .fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }

    /// A tokio-postgres client through the proxy as `app`.
    pub async fn app(&self) -> Client {
        connect(&self.conn_str("app", "app_pw")).await
    }
}

/// One proxy in each pool mode (transaction, session), for behaviour both must keep.
pub async fn both_modes() -> Vec<Proxy> {
    let base = base_config_toml(cluster());
    vec![
        start_proxy_with(&base).await,
        start_proxy_with(&session_mode(&base)).await,
    ]
}

/// The primary's address, then one proxy's in each pool mode: for behaviour that must be
/// the same through pgsplit as on a direct connection. The proxies run while the returned
/// Vec lives.
pub async fn direct_and_both_modes() -> (Vec<Proxy>, Vec<SocketAddr>) {
    let proxies = both_modes().await;
    let direct = SocketAddr::from(([127, 0, 0, 1], cluster().primary));
    let addrs = std::iter::once(direct)
        .chain(proxies.iter().map(|p| p.addr))
        .collect();
    (proxies, addrs)
}

pub async fn start_proxy() -> Proxy {
    start_proxy_with(&base_config_toml(cluster())).await
}

/// A proxy whose pools hold one server connection per node (transaction mode): a client
/// gets the very connection the one before it left on that node.
pub async fn start_proxy_one_connection_per_node() -> Proxy {
    start_proxy_with(&format!(
        "{}\n[pool]\nsize = 1\n",
        base_config_toml(cluster())
    ))
    .await
}

pub async fn start_proxy_with(toml: &str) -> Proxy {
    let config = Config::from_toml(toml).expect("valid test config");
    run_proxy(Shared::new(Runtime::new(config).expect("runtime"))).await
}

/// A proxy that reads `path` (and reloads it on change, or on the admin's RELOAD).
pub async fn start_proxy_from_file(path: &Path) -> Proxy {
    let config = Config::load(path).expect("valid test config file");
    let shared = Shared::new(Runtime::new(config).expect("runtime"));
    shared
        .config_path
        .set(pgsplit::reload::config_path(path))
        .unwrap();
    run_proxy(shared).await
}

async fn run_proxy(shared: Arc<Shared>) -> Proxy {
    init_logging();
    let server = Server::bind(shared.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .expect("bind");
    let addr = server.local_addr().unwrap();
    let metrics = server.metrics_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    Proxy {
        addr,
        shared,
        metrics,
        shutdown,
    }
}

/// Proxy logs in test output when RUST_LOG is set (e.g. RUST_LOG=pgsplit=debug).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

pub async fn connect(conn_str: &str) -> Client {
    try_connect(conn_str).await.expect("connect")
}

/// A login through `conn_str` in a task of its own: one that may have to wait (for a place
/// in a full pool) while the test goes on.
pub fn login_in_background(conn_str: &str) -> tokio::task::JoinHandle<Client> {
    let conn_str = conn_str.to_owned();
    tokio::spawn(async move { connect(&conn_str).await })
}

/// The client of a [`login_in_background`] that must finish within 5 s (`what` says why
/// it should).
pub async fn logged_in_within_5s(login: tokio::task::JoinHandle<Client>, what: &str) -> Client {
    tokio::time::timeout(Duration::from_secs(5), login)
        .await
        .expect(what)
        .unwrap()
}

pub async fn try_connect(conn_str: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn_str, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A direct connection to one node as the superuser.
pub async fn direct(port: u16) -> Client {
    connect(&format!(
        "host=127.0.0.1 port={port} user=admin password=admin_password dbname=appdb"
    ))
    .await
}

/// Run `sql` on the primary as the superuser (setup the test's own roles or tables need).
pub async fn run_as_superuser(sql: &str) {
    direct(cluster().primary)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Terminate, from a direct admin connection, the primary backend `client`'s session is on
/// (it must be on the primary now: in a transaction, or pinned).
pub async fn terminate_primary_backend(client: &Client) {
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    direct(cluster().primary)
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
}

/// Wait until both replicas replayed everything the primary has written so far.
pub async fn wait_replicated() {
    wait_replicated_on(cluster()).await
}

pub async fn wait_replicated_on(c: &Cluster) {
    let primary = direct(c.primary).await;
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for port in c.replicas {
        let r = direct(port).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let caught_up: bool = r
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .unwrap()
                .get(0);
            if caught_up {
                break;
            }
            assert!(Instant::now() < deadline, "replica {port} did not catch up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Which node answered: the port it listens on.
pub async fn server_port(client: &Client) -> u16 {
    let row = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap();
    row.get::<_, i32>(0) as u16
}

/// Wait until `proxy`'s health checkers have seen every replica of `c` replay all the
/// primary has written so far. A session's reads after its own write go to a replica only
/// once the proxy knows the replica has it (read-your-writes); the checkers look once per
/// interval, so a replica can have replayed a write for up to a second before that.
pub async fn wait_proxy_saw_replay(proxy: &Proxy, c: &Cluster) {
    let text: String = direct(c.primary)
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let lsn = pgsplit::backend::health::parse_lsn(&text).expect("an LSN");
    let seen = || proxy.every_replica(|r| r.health.lsn() >= lsn);
    assert!(
        eventually(Duration::from_secs(30), seen).await,
        "the proxy never saw the replicas replay {text}"
    );
}

/// How many of `n` calls of `read` (each returning the port that answered) each server
/// answered, counted while every replica of `proxy` stayed in rotation. On a loaded machine a
/// health check can time out twice and take a replica out for a few seconds, which would skew
/// the count for reasons outside the test; then the count waits for the rotation to be whole
/// again and starts over. The balancer's wheel goes on turning, so `n` should be a multiple
/// of the wheel's length for exact counts.
pub async fn tally_while_in_rotation(
    proxy: &Proxy,
    n: usize,
    mut read: impl AsyncFnMut() -> u16,
) -> HashMap<u16, usize> {
    let whole = || proxy.every_replica(|r| r.is_available());
    for _ in 0..5 {
        assert!(
            eventually(Duration::from_secs(20), whole).await,
            "the replicas never were all in rotation"
        );
        let mut tally = HashMap::new();
        for _ in 0..n {
            let port = read().await;
            if !whole() {
                break;
            }
            *tally.entry(port).or_default() += 1;
        }
        if tally.values().sum::<usize>() == n {
            return tally;
        }
    }
    panic!("a replica kept leaving the rotation");
}

/// How many rows `table` has, read directly on the server at `port`.
pub async fn rows_on(port: u16, table: &str) -> i64 {
    direct(port)
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A table name unique to one test, so tests sharing the cluster never collide.
pub fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// SQLSTATE of a tokio-postgres error.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_default()
}

/// pgbench through `port` as `app`.
pub fn pgbench(args: &[&str], port: u16) -> std::process::Output {
    Command::new("pgbench")
        .args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "app",
            "appdb",
        ])
        .env("PGPASSWORD", "app_pw")
        .output()
        .expect("pgbench runs")
}

/// Poll `cond` every 50 ms for up to `limit`; true if it held in time.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// pgbench's tables (scale 1), made once per test run directly on the primary.
pub fn ensure_pgbench_tables() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let init = pgbench(&["-i", "-q", "-s", "1"], cluster().primary);
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
    });
}

/// Send a cancel request every 200 ms until aborted: a cancel that arrives before the query
/// started (on a loaded machine) cancels nothing, on a direct connection too.
pub async fn cancel_repeatedly(token: tokio_postgres::CancelToken) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query(NoTls).await.unwrap();
    }
}

/// The client's session answers a query (it survived whatever the test did).
pub async fn assert_usable(client: &Client) {
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// A loopback port nothing listens on (bound, then released).
pub fn unused_port() -> u16 {
    unused_ports::<1>()[0]
}

/// `N` different ports nothing listens on (for now).
pub fn unused_ports<const N: usize>() -> [u16; N] {
    // Held together, so that the system hands out each port once.
    let held: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// Rows in `table`, counted on the primary directly.
pub async fn primary_count(table: &str) -> i64 {
    direct(cluster().primary)
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A setting as the primary sees it for `client`: read inside a transaction, which pgsplit
/// always runs there.
pub async fn primary_setting(client: &Client, name: &str) -> String {
    simple_value(
        client,
        &format!("BEGIN; SELECT current_setting('{name}'); COMMIT"),
    )
    .await
}

/// The first column of the first row `sql` (simple protocol, maybe several statements)
/// returns.
pub async fn simple_value(client: &Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("a row from {sql}"))
}

/// How many statements carrying the comment `/* marker */` the server at `port` runs or last
/// ran on its connections (the asking one left out).
pub async fn marked_statements_on(port: u16, marker: &str) -> i64 {
    direct(port)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE $1 AND pid <> pg_backend_pid()",
            &[&format!("%/* {marker} */%")],
        )
        .await
        .unwrap()
        .get(0)
}

/// A client whose notifications (channel, payload) arrive on the receiver.
pub async fn listening_client(
    conn_str: &str,
) -> (
    Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    use futures_util::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(conn_str, NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    (client, rx)
}
