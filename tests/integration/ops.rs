//! Operations: the admin console, /metrics and /health, live reload under load, and a
//! graceful shutdown of the real binary with a transaction open.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::SimpleQueryMessage;

use crate::common::*;

const ADMIN: &str = "[proxy]\nadmin_user = \"pgsplit\"\nadmin_password = \"console_pw\"\nmetrics_listen = \"127.0.0.1:0\"\n";

fn ops_config(c: &Cluster) -> String {
    base_config_toml(c).replacen("[proxy]\n", ADMIN, 1)
}

/// A proxy started from a file holding [`ops_config`] (in `dir`, which must outlive it), and
/// its admin console: for tests that change the file.
async fn proxy_from_ops_file(
    c: &Cluster,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    String,
    Proxy,
    tokio_postgres::Client,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let base = ops_config(c);
    write(&path, &base);
    let proxy = start_proxy_from_file(&path).await;
    let admin = console(proxy.port()).await;
    (dir, path, base, proxy, admin)
}

/// The SQLSTATE of a login through the proxy that must fail (`params`: user, password,
/// dbname).
async fn refused_login(proxy_port: u16, params: &str) -> String {
    let e = try_connect(&format!("host=127.0.0.1 port={proxy_port} {params}"))
        .await
        .expect_err(params);
    sqlstate(&e)
}

async fn console(proxy_port: u16) -> tokio_postgres::Client {
    connect(&format!(
        "host=127.0.0.1 port={proxy_port} user=pgsplit password=console_pw dbname=pgsplit"
    ))
    .await
}

/// The rows of a console command, as column → value maps.
async fn rows(admin: &tokio_postgres::Client, cmd: &str) -> Vec<HashMap<String, String>> {
    admin
        .simple_query(cmd)
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// SHOW CONFIG / SHOW CACHE as a name → value map.
async fn settings(admin: &tokio_postgres::Client, cmd: &str) -> HashMap<String, String> {
    rows(admin, cmd)
        .await
        .into_iter()
        .map(|r| (r["name"].clone(), r["value"].clone()))
        .collect()
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// Parsed /metrics samples: (name, labels) → value.
async fn scrape(addr: std::net::SocketAddr) -> Vec<prometheus_parse::Sample> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .expect("the Prometheus text format parses")
        .samples
}

fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

#[tokio::test]
async fn the_admin_console_reports_and_controls() {
    let c = cluster();
    let proxy = start_proxy_with(&ops_config(c)).await;
    let app = proxy.app().await;
    // Reads counted while both replicas are in rotation (else they fall back to the
    // primary and count there), one of them failing.
    let reads = tally_while_in_rotation(&proxy, 7, async || {
        let failing = app.simple_query("SELECT * FROM no_such_table_x").await;
        assert!(failing.is_err());
        server_port(&app).await
    })
    .await;
    assert!(!reads.contains_key(&c.primary), "{reads:?}");
    app.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();

    let admin = console(proxy.port()).await;
    let admin_ref = &admin;
    assert!(
        eventually_async(Duration::from_secs(20), || async move {
            rows(admin_ref, "SHOW BACKENDS")
                .await
                .iter()
                .all(|b| b["in_rotation"] == "true")
        })
        .await,
        "every backend in rotation"
    );
    let backends = rows(&admin, "SHOW BACKENDS").await;
    assert_eq!(backends.len(), 3, "{backends:?}");
    assert_eq!(backends[0]["configured_as"], "primary");

    let stats = rows(&admin, "show stats;").await;
    let route = |name: &str| stats.iter().find(|r| r["route"] == name).unwrap().clone();
    assert!(route("replica")["queries"].parse::<u64>().unwrap() >= 6);
    assert!(route("primary")["transactions"].parse::<u64>().unwrap() >= 1);
    assert!(route("replica")["errors"].parse::<u64>().unwrap() >= 1);
    assert!(!route("replica")["p99_ms"].is_empty());

    let clients = rows(&admin, "SHOW CLIENTS").await;
    assert!(
        clients
            .iter()
            .any(|c| c["user"] == "app" && c["state"] == "idle")
    );
    // The backend column names the server a running query is on (here a replica, outside
    // a transaction), and the one a pinned session holds while idle.
    let sleeper = proxy.app().await;
    let sleeping = tokio::spawn(async move {
        sleeper.batch_execute("SELECT pg_sleep(1.5)").await.unwrap();
        sleeper
    });
    let replica_names: Vec<String> = backends[1..].iter().map(|b| b["name"].clone()).collect();
    let mut running_on = None;
    for _ in 0..40 {
        running_on = rows(&admin, "SHOW CLIENTS")
            .await
            .into_iter()
            .find(|c| c["state"] == "active" && c["user"] == "app")
            .map(|c| c["backend"].clone());
        if running_on.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let running_on = running_on.expect("the sleeping query listed as active");
    assert!(replica_names.contains(&running_on), "{running_on}");
    let sleeper = sleeping.await.unwrap();
    sleeper
        .batch_execute("CREATE TEMP TABLE show_clients_pinned (a int)")
        .await
        .unwrap();
    let holding: Vec<String> = rows(&admin, "SHOW CLIENTS")
        .await
        .into_iter()
        .filter(|c| c["user"] == "app" && c["state"] == "idle")
        .map(|c| c["backend"].clone())
        .collect();
    assert!(holding.contains(&backends[0]["name"]), "{holding:?}");
    let pools = rows(&admin, "SHOW POOLS").await;
    assert!(
        pools
            .iter()
            .any(|p| p["user"] == "app" && p["size"] == "20")
    );
    let cache = settings(&admin, "SHOW CACHE").await;
    assert_eq!(cache["enabled"], "false");
    let config = settings(&admin, "SHOW CONFIG").await;
    assert_eq!(config["proxy.admin_password"], "********");
    assert_eq!(config["users[0].password"], "********");
    assert!(rows(&admin, "SHOW VERSION").await[0]["version"].starts_with("pgsplit "));

    // BAN takes a replica out of rotation; reads go to the other one.
    let victim = backends[1]["name"].clone();
    admin.simple_query(&format!("BAN {victim}")).await.unwrap();
    let banned: u16 = backends[1]["address"]
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for _ in 0..6 {
        assert_ne!(
            server_port(&app).await,
            banned,
            "a banned replica got a read"
        );
    }
    let after = rows(&admin, "SHOW BACKENDS").await;
    assert_eq!(after[1]["in_rotation"], "false");
    assert!(after[1]["reason"].contains("banned"));
    admin
        .simple_query(&format!("UNBAN {victim}"))
        .await
        .unwrap();
    let app_ref = &app;
    assert!(
        eventually_async(Duration::from_secs(20), || async move {
            server_port(app_ref).await == banned
        })
        .await,
        "unbanned replica back in rotation"
    );

    // Mistakes get errors, and the console stays usable.
    let e = admin.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42601");
    let e = admin
        .simple_query(&format!("BAN {}", backends[0]["name"]))
        .await
        .expect_err("the primary cannot be banned");
    assert_eq!(sqlstate(&e), "55000", "{e}");
    admin
        .simple_query(&format!("UNBAN {}", backends[0]["name"]))
        .await
        .expect("UNBAN of the primary (a ban a reload carried over to it) is allowed");
    let e = admin.simple_query("BAN nosuchreplica").await.unwrap_err();
    assert_eq!(sqlstate(&e), "42704", "{e}");
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&e), "F0000", "no config file to reload: {e}");
    // An empty query (a keepalive's) gets EmptyQueryResponse, as from PostgreSQL.
    let empty = admin.simple_query("").await.expect("empty query");
    assert!(
        !empty
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(_))),
        "{empty:?}"
    );
    assert_eq!(rows(&admin, "SHOW VERSION").await.len(), 1);

    // Ordinary users never reach the console; a wrong admin password is refused.
    assert_eq!(
        refused_login(proxy.port(), "user=app password=app_pw dbname=pgsplit").await,
        "3D000",
        "app reaches PostgreSQL, which has no such database"
    );
    assert_eq!(
        refused_login(proxy.port(), "user=pgsplit password=wrong dbname=pgsplit").await,
        "28P01",
        "wrong password"
    );
    assert_eq!(
        refused_login(
            proxy.port(),
            "user=pgsplit password=console_pw dbname=appdb"
        )
        .await,
        "28P01",
        "the admin is no database user"
    );
}

#[tokio::test]
async fn metrics_and_health_speak_http() {
    let c = cluster();
    let proxy = start_proxy_with(&ops_config(c)).await;
    let addr = proxy.metrics.expect("metrics_listen is set");
    // Before any query: empty histograms sum to 0, not "-0".
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains("pgsplit_query_duration_seconds_sum{route=\"primary\"} 0\n"),
        "{text}"
    );
    let app = proxy.app().await;
    for _ in 0..5 {
        app.simple_query("SELECT 1").await.unwrap();
    }
    app.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
    // A login the primary refuses (no such database) failed, though its password was right.
    let before = scrape(addr).await;
    assert_eq!(
        refused_login(proxy.port(), "user=app password=app_pw dbname=no_such_db").await,
        "3D000",
        "no such database"
    );
    let samples = scrape(addr).await;
    for (name, grew) in [
        ("pgsplit_logins_total", 0.0),
        ("pgsplit_login_failures_total", 1.0),
    ] {
        assert_eq!(
            value(&samples, name, &[]) - value(&before, name, &[]),
            grew,
            "{name}"
        );
    }
    assert!(value(&samples, "pgsplit_logins_total", &[]) >= 1.0);
    // Reads go to the replicas, or to the primary while a loaded machine makes a replica's
    // health check time out: count both.
    let reads = value(&samples, "pgsplit_queries_total", &[("route", "replica")])
        + value(&samples, "pgsplit_queries_total", &[("route", "primary")]);
    assert!(reads >= 6.0, "{reads}");
    assert!(
        value(
            &samples,
            "pgsplit_transactions_total",
            &[("route", "primary")]
        ) >= 1.0
    );
    assert!(value(&samples, "pgsplit_clients", &[]) >= 1.0);
    assert_eq!(primary_in_rotation(&samples), 1.0);
    assert_eq!(
        value(&samples, "pgsplit_config_last_reload_failed", &[]),
        0.0
    );
    // The latency histogram: cumulative buckets ending in +Inf == count.
    let histogram = samples
        .iter()
        .find(|s| {
            s.metric == "pgsplit_query_duration_seconds" && s.labels.get("route") == Some("primary")
        })
        .expect("latency histogram for the primary route");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
            assert!(
                buckets.last().unwrap().count >= 1.0,
                "the transaction ran on the primary"
            );
        }
        other => panic!("not a histogram: {other:?}"),
    }
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok"), "{body}");
    assert_eq!(http_get(addr, "/nope").await.0, 404);
}

/// With `[health]` naming no user, the checks log in as the first user whose password
/// they can use towards PostgreSQL. They took the first user's, and a first user
/// configured with a stored md5 hash (as the README advises) has none: every check failed,
/// every server left the rotation and `/health` answered 503, while clients were served.
#[tokio::test]
async fn health_checks_pass_when_the_first_user_has_only_a_stored_hash() {
    let c = cluster();
    let verifier_first = ops_config(c).replacen(
        "[[users]]",
        "[[users]]\nname = \"hash_only\"\npassword = \"md5b1116845021429c9cd5c0c6bb22019de\"\n\
         auth_method = \"md5\"\nserver_user = \"md5user\"\n\n[[users]]",
        1,
    );
    let proxy = start_proxy_with(&verifier_first).await;
    let runtime = proxy.shared.runtime.load_full();
    assert_eq!(runtime.config.users[0].name, "hash_only");
    assert!(
        eventually(Duration::from_secs(15), || runtime
            .backends
            .replicas
            .iter()
            .all(|r| r.health.lsn_samples() > 0))
        .await,
        "the health checks read both replicas' positions"
    );
    let (status, body) = http_get(proxy.metrics.unwrap(), "/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "ok: primary up, 2 replica(s) in rotation\n");
}

/// The console speaks the simple query protocol only; an extended-protocol request gets
/// 0A000 at once, not at its Sync: asyncpg sends Parse, Describe and Flush and waits for
/// the answer before any Sync (it waited forever). The console goes on after the Sync.
#[tokio::test]
async fn the_admin_console_refuses_the_extended_protocol_without_waiting_for_a_sync() {
    let c = cluster();
    let proxy = start_proxy_with(&ops_config(c)).await;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], proxy.port()).into();
    let mut console = RawClient::login_scram(addr, "pgsplit", "pgsplit", "console_pw").await;
    let mut parse = cstr("");
    parse.extend(cstr("SHOW POOLS"));
    parse.extend_from_slice(&[0, 0]);
    let mut describe = vec![b'S'];
    describe.extend(cstr(""));
    let mut req = message(b'P', &parse);
    req.extend(message(b'D', &describe));
    req.extend(message(b'H', &[]));
    console.stream_write(&req).await;
    let refused = console.read_n(1).await;
    assert_eq!(
        error_code(&refused).as_deref(),
        Some("0A000"),
        "{refused:?}"
    );
    // The rest up to the Sync is skipped, a simple Query too; the Sync gets
    // ReadyForQuery alone.
    let mut rest = message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    rest.extend(query("SHOW VERSION"));
    rest.extend(message(b'S', &[]));
    let msgs = console.send(&rest).await;
    assert_eq!(tags(&msgs), "Z", "{msgs:?}");
    let msgs = console.send(&query("SHOW VERSION")).await;
    assert!(msgs.iter().any(|m| m.0 == b'D'), "{msgs:?}");
    // What a session takes without ending: COPY leftovers are ignored, a FunctionCall and
    // a Query without its terminator get an ERROR each, and the console goes on.
    console.stream_write(&message(b'd', b"x")).await;
    console.stream_write(&message(b'c', &[])).await;
    let msgs = console
        .send(&message(b'F', &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]))
        .await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(error_code(&msgs).as_deref(), Some("0A000"), "{msgs:?}");
    let msgs = console.send(&message(b'Q', b"SHOW VERSION")).await;
    assert_eq!(tags(&msgs), "EZ", "{msgs:?}");
    assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    let msgs = console.send(&query("SHOW VERSION")).await;
    assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
}

/// A ban is kept by address: a reload that drops the banned replica and a later one that
/// brings it back find it banned still (it came back in rotation, silently).
#[tokio::test]
async fn a_ban_outlives_a_reload_that_drops_the_replica_and_one_that_brings_it_back() {
    let c = cluster();
    let (_dir, path, base, proxy, admin) = proxy_from_ops_file(c).await;
    let address = format!("127.0.0.1:{}", c.replicas[1]);
    admin.simple_query(&format!("BAN {address}")).await.unwrap();
    let reload = async |text: &str| {
        write(&path, text);
        // The file watcher may apply it first; RELOAD then finds nothing new.
        admin.simple_query("RELOAD").await.unwrap();
    };
    reload(&without_replica(&base, c.replicas[1])).await;
    assert_eq!(proxy.shared.runtime.load().backends.replicas.len(), 1);
    reload(&base).await;
    let backends = rows(&admin, "SHOW BACKENDS").await;
    let back = backends
        .iter()
        .find(|b| b["address"] == address)
        .expect("the replica is configured again");
    assert_eq!(back["in_rotation"], "false", "{back:?}");
    assert_eq!(back["reason"], "banned by an operator", "{back:?}");
    admin
        .simple_query(&format!("UNBAN {address}"))
        .await
        .unwrap();
    let runtime = proxy.shared.runtime.load();
    assert!(runtime.backends.replicas.iter().all(|r| !r.health.banned()));
}

/// At `max_client_connections`, clients are refused with 53300 but the admin console
/// opens, as PostgreSQL reserves connections for superusers: that is when an operator
/// needs SHOW CLIENTS.
#[tokio::test]
async fn the_admin_console_opens_when_the_client_limit_is_reached() {
    let c = cluster();
    let toml = ops_config(c).replacen("[proxy]\n", "[proxy]\nmax_client_connections = 1\n", 1);
    let proxy = start_proxy_with(&toml).await;
    let _app = proxy.app().await;
    let e = try_connect(&proxy.conn_str("app", "app_pw"))
        .await
        .expect_err("over the limit");
    assert_eq!(sqlstate(&e), "53300", "{e}");
    let admin = console(proxy.port()).await;
    let clients = rows(&admin, "SHOW CLIENTS").await;
    assert_eq!(clients.len(), 1, "{clients:?}");
    assert_eq!(clients[0]["user"], "app");
}

/// Out of file descriptors, a request that needs a new server connection gets 53000
/// naming pgsplit's own limit (it got 08006 "server connection failed", which blames the
/// server), no server leaves the rotation, and the session and others go on.
#[tokio::test]
async fn out_of_file_descriptors_is_reported_as_pgsplits_own_limit() {
    let c = cluster();
    let proxy = ProxyProcess::start(&base_config_toml(c), "info").await;
    let conn = format!(
        "host=127.0.0.1 port={} user=trustuser dbname=appdb",
        proxy.port
    );
    // One client holds the primary connection in a transaction; the other's write needs a
    // new one.
    let holder = connect(&conn).await;
    holder
        .batch_execute("BEGIN; SELECT txid_current()")
        .await
        .unwrap();
    let writer = connect(&conn).await;
    // The lowest descriptor number free now: a limit of it leaves none to open.
    let fds: Vec<u32> = std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let limit = (0..).find(|n| !fds.contains(n)).unwrap();
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &proxy.pid().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let e = writer
        .batch_execute("SELECT txid_current()")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "53000", "{e}");
    let message = e.as_db_error().unwrap().message();
    assert!(
        message.starts_with("pgsplit is out of file descriptors"),
        "{message}"
    );
    // The sessions go on: the holder's connection is at hand.
    holder.batch_execute("COMMIT").await.unwrap();
    let log = proxy.log_text();
    assert!(log.contains("out of file descriptors"), "{log}");
    assert!(!log.contains("out of rotation"), "{log}");
}

/// A client that terminates its own server backend makes routing skip that server for a
/// second, but the server is up: `/health`, the in-rotation metric and SHOW BACKENDS go by
/// the health checks (they said "primary down" and, with no replica, 503).
#[tokio::test]
async fn a_client_ending_its_own_backend_does_not_make_health_report_the_server_down() {
    let c = cluster();
    let proxy = start_proxy_with(&ops_config(c)).await;
    let addr = proxy.metrics.expect("metrics_listen is set");
    let app = proxy.app().await;
    app.batch_execute("BEGIN").await.unwrap();
    let e = app
        .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
        .await
        .unwrap_err();
    assert!(e.as_db_error().is_some() || e.is_closed(), "{e}");
    let routing_skips = proxy.shared.runtime.load().backends.primary.is_available();
    assert!(!routing_skips, "routing skips the primary for a moment");
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ok: primary up"), "{body}");
    let samples = scrape(addr).await;
    assert_eq!(primary_in_rotation(&samples), 1.0);
}

/// The `pgsplit_backend_in_rotation` sample of the primary.
fn primary_in_rotation(samples: &[prometheus_parse::Sample]) -> f64 {
    value(
        samples,
        "pgsplit_backend_in_rotation",
        &[("role", "primary")],
    )
}

fn write(path: &Path, text: &str) {
    // Write-then-rename, as editors and config managers do: never a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_changes_routing_users_and_rules_without_errors() {
    let c = cluster();
    ensure_pgbench_tables();
    wait_replicated().await;
    let (_dir, path, base, proxy, admin) = proxy_from_ops_file(c).await;
    let metrics = proxy.metrics.unwrap();

    // Load through every change below.
    let port = proxy.port();
    let load = tokio::task::spawn_blocking(move || {
        pgbench(
            &[
                "-n", "-S", "-c", "8", "-j", "2", "-T", "12", "-M", "extended",
            ],
            port,
        )
    });

    // 1. Remove replica2: reads stop reaching it, SHOW BACKENDS lists two servers.
    let trust_block = "[[users]]\n        name = \"trustuser\"\n        auth_method = \"trust\"\n";
    let without_trust = base.replacen(trust_block, "", 1);
    assert_ne!(without_trust, base);
    let one_replica = without_replica(&without_trust, c.replicas[1]);
    let removed = connect(&proxy.conn_str("trustuser", "")).await;
    removed.simple_query("SELECT 1").await.unwrap();
    write(&path, &one_replica);
    let admin_ref = &admin;
    assert!(
        eventually_async(Duration::from_secs(5), || async move {
            rows(admin_ref, "SHOW BACKENDS").await.len() == 2
        })
        .await,
        "the file change was applied"
    );
    let app = proxy.app().await;
    for _ in 0..6 {
        assert_ne!(server_port(&app).await, c.replicas[1]);
    }
    let e = try_connect(&proxy.conn_str("trustuser", ""))
        .await
        .expect_err("removed user");
    // Asked for a password like any user pgsplit does not know; the client has none.
    assert!(format!("{e:?}").contains("password"), "{e:?}");
    // A session it had open ends at its next request.
    let e = removed
        .simple_query("SELECT 1")
        .await
        .expect_err("the removed user's session ends");
    assert_eq!(sqlstate(&e), "28000", "{e}");

    // 2. Put it back with weight 3, and let trustuser in, and whitelist a table: RELOAD.
    let with_more = base.replacen(
        &format!("port = {}\n", c.replicas[1]),
        &format!("port = {}\n        weight = 3\n", c.replicas[1]),
        1,
    ) + "\n[cache]\nenabled = false\n[[cache.rules]]\ntable = \"pgbench_accounts\"\n";

    // The watcher may take it first; RELOAD then finds nothing new, which is fine too.
    write(&path, &with_more);
    admin
        .simple_query("RELOAD")
        .await
        .expect("RELOAD via the console");
    let backends = rows(&admin, "SHOW BACKENDS").await;
    assert_eq!(backends.len(), 3);
    assert_eq!(backends[2]["weight"], "3");
    let config = settings(&admin, "SHOW CONFIG").await;
    assert_eq!(config["cache.rules[0].table"], "pgbench_accounts");
    assert!(config["reload.last_error"].is_empty());
    connect(&proxy.conn_str("trustuser", ""))
        .await
        .simple_query("SELECT 1")
        .await
        .expect("a user added by the reload logs in");
    // The re-added replica is new to the health checker: it joins after its first checks.
    assert!(
        eventually_async(Duration::from_secs(10), || async move {
            rows(admin_ref, "SHOW BACKENDS").await[2]["in_rotation"] == "true"
        })
        .await,
        "the re-added replica joins the rotation"
    );

    // 3. An invalid file is rejected whole: the running config stays, the error shows.
    write(
        &path,
        &(with_more.clone() + "\n[routing]\nno_such_key = 1\n"),
    );
    assert!(admin.simple_query("RELOAD").await.is_err());
    let config = settings(&admin, "SHOW CONFIG").await;
    assert!(
        config["reload.last_error"].contains("no_such_key"),
        "{config:?}"
    );
    assert_eq!(
        rows(&admin, "SHOW BACKENDS").await.len(),
        3,
        "old config still serving"
    );
    let samples = scrape(metrics).await;
    assert_eq!(
        value(&samples, "pgsplit_config_last_reload_failed", &[]),
        1.0
    );
    assert!(
        value(
            &samples,
            "pgsplit_config_reloads_total",
            &[("result", "rejected")]
        ) >= 1.0
    );
    app.simple_query("SELECT 1").await.expect("still serving");

    // 4. A setting that needs a restart is reported, not silently ignored.
    write(
        &path,
        &with_more.replacen("[proxy]\n", "[proxy]\nmax_client_connections = 5\n", 1),
    );
    let e = admin.simple_query("RELOAD").await.unwrap();
    drop(e);
    let config = settings(&admin, "SHOW CONFIG").await;
    assert!(
        config["reload.last_changes"].contains("needs a restart")
            && config["reload.last_changes"].contains("max_client_connections"),
        "{config:?}"
    );
    // ... and not applied: the running value stays (new clients are not limited to 5).
    assert_ne!(
        proxy
            .shared
            .runtime
            .load()
            .config
            .proxy
            .max_client_connections,
        5
    );
    assert_ne!(config["proxy.max_client_connections"], "5", "{config:?}");

    let out = load.await.unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgbench failed during reloads:\n{text}"
    );
    assert!(
        text.contains("number of failed transactions: 0"),
        "pgbench saw failures:\n{text}"
    );
    // The weights of step 2 are still in force. Counted once the load is over: the weighted
    // rotation is shared, and the picks of pgbench's clients between this client's can
    // alias it (one pick of theirs between two of ours saw 1:1 in a weight-3 rotation).
    let hits = tally_while_in_rotation(&proxy, 40, async || server_port(&app).await).await;
    let (r1, r2) = (
        hits.get(&c.replicas[0]).copied().unwrap_or(0),
        hits.get(&c.replicas[1]).copied().unwrap_or(0),
    );
    assert!(r2 > r1, "weight 3 takes most reads: {hits:?}");
}

struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// [`eventually`] for an async condition.
async fn eventually_async<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Redis unreachable from the start (a wrong `redis_url`, Redis not up yet) is told in the
/// log once, as an outage after it answered is, not only by SHOW CACHE and the metrics.
#[tokio::test]
async fn a_redis_unreachable_from_the_start_is_logged_once() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let log = dir.path().join("pgsplit.log");
    let [port, dead_redis] = unused_ports::<2>();
    let toml = ops_config(c).replacen(
        "\n        listen = \"127.0.0.1:0\"",
        &format!("\n        listen = \"127.0.0.1:{port}\""),
        1,
    ) + &format!(
        "\n[cache]\nenabled = true\nredis_url = \"redis://127.0.0.1:{dead_redis}\"\n\
         [[cache.rules]]\ntable = \"albums\"\n"
    );
    write(&path, &toml);
    let child = Command::new(env!("CARGO_BIN_EXE_pgsplit"))
        .args(["--config", path.to_str().unwrap(), "--log", "info"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("pgsplit binary");
    let _child = KillOnDrop(Some(child));
    let warnings = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("redis unavailable"))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || warnings() > 0).await,
        "no warning:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Probes go on every second; the outage is told once.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        warnings(),
        1,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_transaction_commit_then_stops() {
    let c = cluster();
    let t = unique("shutdown");
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int); GRANT ALL ON {t} TO app;"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let port = unused_port();
    let toml = ops_config(c)
        .replacen(
            "\n        listen = \"127.0.0.1:0\"",
            &format!("\n        listen = \"127.0.0.1:{port}\""),
            1,
        )
        .replacen("[proxy]\n", "[proxy]\nshutdown_timeout_ms = 20000\n", 1);
    write(&path, &toml);
    let child = Command::new(env!("CARGO_BIN_EXE_pgsplit"))
        .args(["--config", path.to_str().unwrap(), "--log", "info"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("pgsplit.log")).unwrap())
        .spawn()
        .expect("pgsplit binary");
    // Killed if the test fails before the binary exits on its own.
    let mut child = KillOnDrop(Some(child));
    let conn_str = format!("host=127.0.0.1 port={port} user=app password=app_pw dbname=appdb");
    let deadline = Instant::now() + Duration::from_secs(10);
    let tx_client = loop {
        match try_connect(&conn_str).await {
            Ok(cl) => break cl,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!(
                "pgsplit did not start: {e}\n{}",
                std::fs::read_to_string(dir.path().join("pgsplit.log")).unwrap_or_default()
            ),
        }
    };
    let idle_client = connect(&conn_str).await;
    let idle_console = console(port).await;
    tx_client
        .batch_execute(&format!("BEGIN; INSERT INTO {t} VALUES (1)"))
        .await
        .unwrap();

    // SIGHUP reloads (here: nothing changed) and the proxy keeps serving.
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.0.as_ref().unwrap().id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    idle_client
        .simple_query("SELECT 1")
        .await
        .expect("serving after SIGHUP");

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.0.as_ref().unwrap().id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    // The idle session is ended (at once; the wait only covers a loaded machine), new
    // clients are turned away, the transaction goes on.
    let idle_ref = &idle_client;
    assert!(
        eventually_async(Duration::from_secs(5), || async move {
            idle_ref.simple_query("SELECT 1").await.is_err()
        })
        .await,
        "idle session closed"
    );
    // An idle admin console ends too (57P01), not holding up the exit for the timeout.
    let console_ref = &idle_console;
    assert!(
        eventually_async(Duration::from_secs(5), || async move {
            console_ref.simple_query("SHOW VERSION").await.is_err()
        })
        .await,
        "idle console closed"
    );
    assert!(
        try_connect(&conn_str).await.is_err(),
        "no new clients while draining"
    );
    tx_client
        .batch_execute(&format!("INSERT INTO {t} VALUES (2); COMMIT"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the open transaction commits during the shutdown: {e}\n{}",
                std::fs::read_to_string(dir.path().join("pgsplit.log")).unwrap_or_default()
            )
        });
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = child.0.as_mut().unwrap().try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "pgsplit exited cleanly: {status:?}"
    );
    assert_eq!(
        primary_count(&t).await,
        2,
        "both rows of the committed transaction are there"
    );
}

/// A reload keeps the pools of servers, users and pool settings it did not change, with
/// their connections: clients do not all reconnect to the servers at once.
#[tokio::test]
async fn a_reload_keeps_the_pooled_connections_it_did_not_change() {
    let c = cluster();
    let (_dir, path, base, proxy, admin) = proxy_from_ops_file(c).await;
    let app = proxy.app().await;
    // One client, one transaction at a time: the primary pool holds one connection.
    let primary_pid = async || -> i32 {
        let rows = app
            .simple_query("BEGIN; SELECT pg_backend_pid()::text; COMMIT")
            .await
            .unwrap();
        rows.iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                _ => None,
            })
            .unwrap()
    };
    let before = primary_pid().await;
    assert_eq!(
        primary_pid().await,
        before,
        "the pool reuses its connection"
    );
    // A change elsewhere (a replica's weight, the log level): the pool stays.
    let changed = base.replacen(
        &format!("port = {}\n", c.replicas[1]),
        &format!("port = {}\n        weight = 2\n", c.replicas[1]),
        1,
    );
    write(&path, &changed);
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert_eq!(rows(&admin, "SHOW BACKENDS").await[2]["weight"], "2");
    assert_eq!(primary_pid().await, before, "the reload kept the pool");
    // A pool setting changed: new pools, new connections. The replaced pools close their
    // idle ones at once, though a client that has not sent anything since (here `app`, idle
    // between transactions) still runs on the old configuration and keeps them alive.
    let replaced = proxy.shared.runtime.load().pools();
    assert!(
        replaced.iter().any(|p| p.counts().1 > 0),
        "an idle connection"
    );
    write(&path, &(changed + "\n[pool]\nsize = 7\n"));
    admin.simple_query("RELOAD").await.expect("RELOAD");
    for pool in &replaced {
        assert_eq!(
            pool.counts().1,
            0,
            "{}: idle connections closed",
            pool.name()
        );
    }
    assert_ne!(
        primary_pid().await,
        before,
        "a new pool after [pool] changed"
    );
}

#[tokio::test]
async fn server_connections_retire_after_their_lifetime_and_idle_ones_close() {
    let c = cluster();
    let limits = "\n[pool]\nsize = 1\nmax_lifetime_ms = 1500\nidle_timeout_ms = 1000\n";
    let proxy = start_proxy_with(&format!("{}{limits}", ops_config(c))).await;
    let admin = console(proxy.port()).await;
    // Read before the login, which opens the first server connection.
    let started = Instant::now();
    let client = connect(&proxy.conn_str("trustuser", "")).await;
    // In a transaction: on the primary, through its pool of one.
    let primary_pid = || async {
        let messages = client
            .simple_query("BEGIN; SELECT pg_backend_pid()::text; COMMIT")
            .await
            .unwrap();
        messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap()
    };
    let first = primary_pid().await;
    // Kept busy (never idle for the idle timeout): only its lifetime retires it.
    let mut replaced_after = None;
    while started.elapsed() < Duration::from_secs(5) {
        if primary_pid().await != first {
            replaced_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replaced_after = replaced_after.expect("the connection outlived its max_lifetime");
    assert!(
        replaced_after >= Duration::from_millis(1500),
        "retired after {replaced_after:?}, before its lifetime"
    );
    // Idle past the idle timeout: the pool closes it (min_idle is 0).
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let pools = rows(&admin, "SHOW POOLS").await;
        let idle: Vec<_> = pools.iter().filter(|p| p["user"] == "trustuser").collect();
        assert!(!idle.is_empty(), "{pools:?}");
        if idle.iter().all(|p| p["idle"] == "0" && p["in_use"] == "0") {
            break;
        }
        assert!(Instant::now() < deadline, "still open: {idle:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A reload that changes the admin login (a rotated password) ends the consoles opened
/// with the old one at their next command, as it cuts off removed users; a reload that
/// leaves the admin login alone keeps them. pgsplit kept old consoles open for good.
/// A config reached through a symlink that the deployment swaps (a Kubernetes ConfigMap
/// relinks `..data`; a release switch relinks `current`) and whose old target is deleted is
/// read through the new link at the next reload.
#[tokio::test]
async fn a_reload_follows_a_swapped_config_symlink() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let release = |n: u32, text: &str| {
        let d = dir.path().join(format!("release{n}"));
        std::fs::create_dir(&d).unwrap();
        write(&d.join("proxy.toml"), text);
        d
    };
    let base = ops_config(c);
    let first = release(1, &base);
    let current = dir.path().join("current");
    std::os::unix::fs::symlink(&first, &current).unwrap();
    let proxy = start_proxy_from_file(&current.join("proxy.toml")).await;
    let admin = console(proxy.port()).await;
    let weighted = base.replacen(
        &format!("port = {}\n", c.replicas[1]),
        &format!("port = {}\n        weight = 2\n", c.replicas[1]),
        1,
    );
    let second = release(2, &weighted);
    let swap = dir.path().join("current.new");
    std::os::unix::fs::symlink(&second, &swap).unwrap();
    std::fs::rename(&swap, &current).unwrap();
    std::fs::remove_dir_all(&first).unwrap();
    admin
        .simple_query("RELOAD")
        .await
        .expect("RELOAD reads the file through the new link");
    let backends = rows(&admin, "SHOW BACKENDS").await;
    assert_eq!(backends[2]["weight"], "2", "{backends:?}");
}

#[tokio::test]
async fn a_reload_that_rotates_the_admin_password_closes_old_consoles() {
    let c = cluster();
    let (_dir, path, base, proxy, admin) = proxy_from_ops_file(c).await;
    let weight = base.replacen(
        &format!("port = {}\n", c.replicas[1]),
        &format!("port = {}\n        weight = 2\n", c.replicas[1]),
        1,
    );
    write(&path, &weight);
    admin.simple_query("RELOAD").await.expect("RELOAD");
    rows(&admin, "SHOW BACKENDS").await;
    write(&path, &weight.replace("console_pw", "rotated_pw"));
    admin.simple_query("RELOAD").await.expect("RELOAD");
    let e = admin
        .simple_query("SHOW BACKENDS")
        .await
        .expect_err("the old login no longer works");
    assert_eq!(sqlstate(&e), "28000", "{e}");
    let rotated = connect(&format!(
        "host=127.0.0.1 port={} user=pgsplit password=rotated_pw dbname=pgsplit",
        proxy.port()
    ))
    .await;
    assert_eq!(rows(&rotated, "SHOW BACKENDS").await.len(), 3);
}

/// Session mode: a reload leaves each session its places in the pools, also when it
/// changes the pool settings (the new pools take the old ones' places over). Before, a
/// login waiting for a place got in at the reload, past `size`, or took the place of a
/// session that was merely idle, whose next statement then queued behind it.
#[tokio::test]
async fn a_reload_in_session_mode_leaves_the_sessions_their_places() {
    let c = cluster();
    let config = session_config;
    let (_dir, path, _proxy, admin, name, conn_str) =
        session_proxy_from_file("reload_places").await;
    let (first, second) = (connect(&conn_str).await, connect(&conn_str).await);
    let waiting = login_in_background(&conn_str);
    let primary_conns = async || -> i64 {
        direct(c.primary)
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0)
    };
    for (reload, changed) in [
        (config(2, 20_000), "nothing"),
        (config(2, 20_001), "a pool setting"),
    ] {
        write(&path, &reload);
        admin.simple_query("RELOAD").await.expect("RELOAD");
        // Listed with its places before anyone uses it again.
        let in_use: Vec<_> = rows(&admin, "SHOW POOLS")
            .await
            .into_iter()
            .filter(|r| r["user"] == "app")
            .map(|r| r["in_use"].clone())
            .collect();
        assert_eq!(in_use, ["2"], "after a reload changing {changed}");
        let started = Instant::now();
        first
            .batch_execute("SELECT txid_current()")
            .await
            .unwrap_or_else(|e| panic!("after a reload changing {changed}: {e}"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "after a reload changing {changed}, the session waited {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "after a reload changing {changed}, the login still waits"
        );
        assert!(
            primary_conns().await <= 2,
            "after a reload changing {changed}"
        );
    }
    // A larger pool lets the waiting login in at once.
    write(&path, &config(3, 20_001));
    admin.simple_query("RELOAD").await.expect("RELOAD");
    let third = logged_in_within_5s(waiting, "a third place").await;
    third.batch_execute("SELECT txid_current()").await.unwrap();
    second.batch_execute("SELECT txid_current()").await.unwrap();
    assert_eq!(primary_conns().await, 3);
    // A smaller pool holds also with a login queued: the places sessions leave go until
    // the size is reached, not to the queue.
    write(&path, &config(1, 20_001));
    admin.simple_query("RELOAD").await.expect("RELOAD");
    let fourth = login_in_background(&conn_str);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop((first, second));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fourth.is_finished(),
        "one session is still in, and the size is 1"
    );
    drop(third);
    let fourth = logged_in_within_5s(fourth, "the one place, once free").await;
    fourth.batch_execute("SELECT txid_current()").await.unwrap();
}

/// A connection the proxy has accepted (its session holds the configuration of now), on
/// which nothing is sent yet: see [`log_in_on`].
async fn accepted(proxy: &Proxy) -> tokio::net::TcpStream {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream
}

/// Log in on a connection from [`accepted`], with `conn_str`'s user and password.
async fn log_in_on(stream: tokio::net::TcpStream, conn_str: String) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = conn_str.parse().unwrap();
    let (client, connection) = config
        .connect_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// A session-mode proxy of `[pool] size` 1 from a file, with a connection it accepted
/// (see [`accepted`]) before a reload that replaced its pools.
async fn accepted_before_a_pool_changing_reload()
-> (tempfile::TempDir, Proxy, tokio::net::TcpStream) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    write(&path, &session_config(1, 20_000));
    let proxy = start_proxy_from_file(&path).await;
    let admin = console(proxy.port()).await;
    let early = accepted(&proxy).await;
    write(&path, &session_config(1, 20_001));
    admin.simple_query("RELOAD").await.expect("RELOAD");
    (dir, proxy, early)
}

/// A client whose connection was accepted before a reload takes its places from the same
/// sets as the sessions of the new configuration: `[pool] size` bounds them together.
/// (Each configuration used to make its own set for a server, user and database it had no
/// pool for yet, so that such a client got in past the size. Its login moves to the new
/// configuration now; one whose startup settings pin it at once, or a session between its
/// login and its first request, still uses the old one's pools.)
#[tokio::test]
async fn a_client_accepted_before_a_reload_shares_the_places_of_the_new_configuration() {
    let (_dir, proxy, early) = accepted_before_a_pool_changing_reload().await;
    let holder = proxy.app().await;
    holder.batch_execute("SELECT txid_current()").await.unwrap();
    let late = tokio::spawn(log_in_on(early, proxy.conn_str("app", "app_pw")));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!late.is_finished(), "the size is 1 and the place is held");
    drop(holder);
    let late = logged_in_within_5s(late, "the place, once free").await;
    late.batch_execute("SELECT txid_current()").await.unwrap();
}

/// Server connections on the primary whose session carries one of `names` as its
/// `application_name`.
async fn primary_conns_named(names: &[&str]) -> i64 {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    direct(cluster().primary)
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1)",
            &[&names],
        )
        .await
        .unwrap()
        .get(0)
}

/// A session-mode configuration with `[pool] size` and a checkout timeout (change the
/// timeout to make a reload replace the pools).
fn session_config(size: usize, timeout_ms: u64) -> String {
    format!(
        "{}\n[pool]\nsize = {size}\ncheckout_timeout_ms = {timeout_ms}\n",
        session_mode(&ops_config(cluster()))
    )
}

/// A session-mode proxy started from a file holding `session_config(2, 20_000)` (in the
/// directory, which must outlive it), its admin console, a unique application name from
/// `prefix`, and a connection string of `app` with that name.
async fn session_proxy_from_file(
    prefix: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Proxy,
    tokio_postgres::Client,
    String,
    String,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    write(&path, &session_config(2, 20_000));
    let proxy = start_proxy_from_file(&path).await;
    let admin = console(proxy.port()).await;
    let name = unique(prefix);
    let conn_str = format!(
        "{} application_name={name}",
        proxy.conn_str("app", "app_pw")
    );
    (dir, path, proxy, admin, name, conn_str)
}

/// The primary pool of `app` holds `counts` (in use, idle) within 5 s.
async fn primary_app_pool_settles(proxy: &Proxy, counts: (usize, usize)) -> (usize, usize) {
    let pool = |p: &pgsplit::backend::Pool| p.backend.is_primary() && p.user() == "app";
    eventually(Duration::from_secs(5), || proxy.pool_counts(pool) == counts).await;
    proxy.pool_counts(pool)
}

/// Session mode, a client accepted before a reload that replaced the pools: its login
/// takes the new configuration's pools, so a connection it opens counts the idle ones
/// sessions left there. (Through the replaced pool it once opened one beside them: two
/// primary connections at size 1.) Also when its startup settings pin it to the primary.
#[tokio::test]
async fn a_client_accepted_before_a_reload_logs_in_on_the_new_pools() {
    for options in ["", " options='-c standard_conforming_strings=off'"] {
        let (_dir, proxy, early) = accepted_before_a_pool_changing_reload().await;
        let (left, late) = (unique("straddle_left"), unique("straddle_late"));
        let app = proxy.conn_str("app", "app_pw");
        let leaving = connect(&format!("{app} application_name={left}")).await;
        leaving
            .batch_execute("SELECT txid_current()")
            .await
            .unwrap();
        drop(leaving);
        assert_eq!(primary_app_pool_settles(&proxy, (0, 1)).await, (0, 1));
        // Counted before its first request (which moves a session to the new configuration).
        let client = log_in_on(early, format!("{app} application_name={late}{options}")).await;
        let conns = primary_conns_named(&[&left, &late]).await;
        assert_eq!(conns, 1, "size 1, with{options}");
        client.batch_execute("SELECT txid_current()").await.unwrap();
        assert_eq!(primary_conns_named(&[&left, &late]).await, 1);
    }
}

/// Session mode, a reload that lowers `[pool] size` below the sessions in: the connections
/// they leave close until the size holds (they used to wait idle beside the sessions,
/// past it), then are kept again.
#[tokio::test]
async fn a_lowered_size_closes_the_connections_sessions_leave_past_it() {
    let (_dir, path, proxy, admin, name, conn_str) = session_proxy_from_file("lowered_size").await;
    let (first, second) = (connect(&conn_str).await, connect(&conn_str).await);
    write(&path, &session_config(1, 20_000));
    admin.simple_query("RELOAD").await.expect("RELOAD");
    for session in [&first, &second] {
        session
            .batch_execute("SELECT txid_current()")
            .await
            .unwrap();
    }
    drop(first);
    assert_eq!(primary_app_pool_settles(&proxy, (1, 0)).await, (1, 0));
    assert_eq!(primary_conns_named(&[&name]).await, 1);
    let kept = primary_conns_named(&[&name]).await;
    drop(second);
    assert_eq!(
        primary_app_pool_settles(&proxy, (0, 1)).await,
        (0, 1),
        "kept"
    );
    let next = connect(&conn_str).await;
    next.batch_execute("SELECT txid_current()").await.unwrap();
    assert_eq!(primary_conns_named(&[&name]).await, kept, "and reused");
}

/// A reload that changes no pool setting keeps the pools, shared by the old and the new
/// configuration: a client accepted before the reload uses them as they are. (The old configuration once retired every pool it handed out,
/// kept ones included: each transaction then opened a server connection of its own.)
#[tokio::test]
async fn a_client_accepted_before_a_reload_that_kept_the_pools_reuses_their_connections() {
    let c = cluster();
    let (_dir, _path, _base, proxy, admin) = proxy_from_ops_file(c).await;
    // The primary's pool in use (and so kept by the reload).
    let earlier = proxy.app().await;
    earlier
        .batch_execute("SELECT txid_current()")
        .await
        .unwrap();
    let early = accepted(&proxy).await;
    // The same file: a new configuration all the same, with every pool kept.
    let accepted_under = proxy.shared.runtime.load_full();
    admin.simple_query("RELOAD").await.expect("RELOAD");
    assert!(
        !std::sync::Arc::ptr_eq(&accepted_under, &proxy.shared.runtime.load_full()),
        "a new configuration"
    );
    drop(accepted_under);
    let client = log_in_on(early, proxy.conn_str("app", "app_pw")).await;
    let mut pids = std::collections::HashSet::new();
    for _ in 0..3 {
        let rows = client
            .simple_query("BEGIN; SELECT pg_backend_pid()::text; COMMIT")
            .await
            .unwrap();
        pids.extend(rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        }));
    }
    assert_eq!(pids.len(), 1, "one pooled connection, reused: {pids:?}");
}

/// RECONNECT on the admin console replaces every server connection, so that what
/// PostgreSQL fixes at a login (a role's attributes and defaults) applies from then on:
/// idle ones close at once, one in use once it is free (transaction mode: back in the
/// pool; session mode: at its session's end).
#[tokio::test]
async fn reconnect_replaces_the_server_connections_once_they_are_free() {
    let c = cluster();
    let alive = async |pid: i32| -> bool {
        direct(c.primary)
            .await
            .query_one(
                "SELECT count(*) = 1 FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0)
    };
    let primary_pid = async |client: &tokio_postgres::Client| -> i32 {
        client
            .query_one("SELECT pg_backend_pid() FROM txid_current()", &[])
            .await
            .unwrap()
            .get(0)
    };
    for session in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        let config = ops_config(c);
        write(
            &path,
            &if session {
                session_mode(&config)
            } else {
                config
            },
        );
        let proxy = start_proxy_from_file(&path).await;
        let admin = console(proxy.port()).await;
        let name = unique("reconnect");
        let conn_str = format!(
            "{} application_name={name}",
            proxy.conn_str("app", "app_pw")
        );
        let busy = connect(&conn_str).await;
        busy.batch_execute("BEGIN").await.unwrap();
        let busy_pid = primary_pid(&busy).await;
        let leaving = connect(&conn_str).await;
        let idle_pid = primary_pid(&leaving).await;
        drop(leaving);
        let primary = |p: &pgsplit::backend::Pool| p.backend.is_primary() && p.user() == "app";
        assert!(
            eventually(Duration::from_secs(5), || proxy.pool_counts(primary).1 == 1).await,
            "session mode {session}: an idle connection"
        );
        admin.simple_query("RECONNECT").await.expect("RECONNECT");
        assert_eq!(proxy.pool_counts(primary).1, 0, "idle ones close at once");
        assert_eq!(
            primary_pid(&busy).await,
            busy_pid,
            "one in use stays in use"
        );
        busy.batch_execute("COMMIT").await.unwrap();
        if session {
            assert_eq!(primary_pid(&busy).await, busy_pid, "its session's own");
            drop(busy);
        }
        let mut gone = false;
        for _ in 0..50 {
            gone = !alive(busy_pid).await && !alive(idle_pid).await;
            if gone {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "session mode {session}: both closed");
        let next = connect(&conn_str).await;
        let next_pid = primary_pid(&next).await;
        assert!(next_pid != busy_pid && next_pid != idle_pid);
    }
}
