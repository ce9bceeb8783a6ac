//! Health, lag and consistency against a cluster whose nodes the tests stop, kill and pause
//! (the failure cluster; its replica2 applies WAL 2 s late).

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const INTERVAL_MS: u64 = 500;

/// The failure cluster behind a proxy with fast health checks.
fn config(c: &Cluster, extra: &str) -> String {
    format!(
        "{}\n[health]\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 300\n[pool]\nconnect_timeout_ms = 1000\n{extra}\n",
        base_config_toml(c)
    )
}

fn replica_healthy(proxy: &Proxy, i: usize) -> bool {
    proxy.shared.runtime.load().backends.replicas[i]
        .health
        .healthy()
}

fn pgbench_init(c: &Cluster) {
    let init = pgbench(&["-i", "-q", "-s", "1"], c.primary);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

fn assert_no_failures(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pgbench failed:\n{stdout}\n{stderr}");
    assert!(!stderr.contains("aborted"), "{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
}

/// PIDs of one node's postmaster and its children.
fn node_pids(c: &Cluster, node: &str) -> Vec<String> {
    let pidfile = std::fs::read_to_string(c.dir.join(node).join("postmaster.pid")).unwrap();
    let postmaster = pidfile.lines().next().unwrap().trim().to_owned();
    let children = Command::new("pgrep")
        .args(["-P", &postmaster])
        .output()
        .unwrap();
    let mut pids = vec![postmaster];
    pids.extend(
        String::from_utf8_lossy(&children.stdout)
            .lines()
            .map(str::to_owned),
    );
    pids
}

fn signal(pids: &[String], sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A proxy in front of `c` under 6 s of pgbench -S -c 16, 1.5 s into it.
async fn start_read_load(c: &Cluster) -> (Proxy, tokio::task::JoinHandle<std::process::Output>) {
    pgbench_init(c);
    wait_replicated_on(c).await;
    let proxy = start_proxy_with(&config(c, "")).await;
    let port = proxy.port();
    let args = [
        "-n", "-S", "-c", "16", "-j", "2", "-T", "6", "-M", "prepared",
    ];
    let load = tokio::task::spawn_blocking(move || pgbench(&args, port));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    (proxy, load)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_leaves_the_rotation_without_failing_reads_and_rejoins() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let (proxy, load) = start_read_load(c).await;
    cluster_cmd(c, &["stop-node", "replica1", "--mode", "immediate"]).await;
    // The node is gone once the command returned (pg_ctl waits for it).
    let stopped = Instant::now();
    let left = eventually(Duration::from_secs(5), || !replica_healthy(&proxy, 0)).await;
    let out_after = stopped.elapsed();
    let load = load.await.unwrap();
    cluster_cmd(c, &["start-node", "replica1"]).await;
    assert!(left, "the dead replica leaves the rotation");
    // Two failed checks: at most two intervals, each plus the check timeout (300 ms), plus
    // scheduling slack on a loaded machine.
    assert!(
        out_after <= Duration::from_millis(2 * (INTERVAL_MS + 300) + 400),
        "left after {out_after:?}"
    );
    assert_no_failures(&load);
    assert!(
        eventually(Duration::from_secs(20), || replica_healthy(&proxy, 0)).await,
        "the restarted replica rejoins"
    );
    let client = proxy.app().await;
    let mut seen = std::collections::HashSet::new();
    // (A node that refused connections is also skipped for a second after its last refusal.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains(&c.replicas[0]) && Instant::now() < deadline {
        seen.insert(server_port(&client).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.contains(&c.replicas[0]),
        "reads reach it again: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_is_left_via_the_timeout_without_failing_reads() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let (proxy, load) = start_read_load(c).await;
    let pids = tokio::task::spawn_blocking(move || node_pids(c, "replica1"))
        .await
        .unwrap();
    signal(&pids, "STOP");
    let left = eventually(Duration::from_secs(5), || !replica_healthy(&proxy, 0)).await;
    let out = load.await.unwrap();
    signal(&pids, "CONT");
    assert!(left, "the paused replica leaves the rotation");
    assert_no_failures(&out);
    assert!(
        eventually(Duration::from_secs(20), || replica_healthy(&proxy, 0)).await,
        "the resumed replica rejoins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_leaves_the_rotation_over_the_lag_limit() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let proxy = start_proxy_with(&format!(
        "{}\n[routing]\nmax_replica_lag_bytes = 4096\n",
        config(c, "")
    ))
    .await;
    wait_replicated_on(c).await;
    let writer = direct(c.primary).await;
    let t = unique("lag");
    writer
        .batch_execute(&format!("CREATE TABLE {t} (v text)"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut left = false;
    while started.elapsed() < Duration::from_secs(8) {
        writer
            .execute(&format!("INSERT INTO {t} VALUES (repeat('x', 200))"), &[])
            .await
            .unwrap();
        if !replica_healthy(&proxy, 1) {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        left,
        "the delayed replica goes over 4 KiB of lag and leaves"
    );
    assert!(replica_healthy(&proxy, 0), "the prompt replica stays");
    let lag = proxy.shared.runtime.load().backends.replicas[1]
        .health
        .lag_bytes();
    assert!(lag.is_some_and(|l| l > 4096), "{lag:?}");
    assert!(
        eventually(Duration::from_secs(15), || replica_healthy(&proxy, 1)).await,
        "once writes stop it catches up and rejoins"
    );
}

/// A proxy whose only replica is the delayed one.
fn delayed_only(c: &Cluster) -> String {
    without_replica(&config(c, ""), c.replicas[0])
}

async fn stale_reads(client: &tokio_postgres::Client, t: &str, cycles: i32) -> usize {
    stale_reads_of(client, client, t, cycles).await
}

/// How many of `cycles` reads by `reader`, each right after a committed write by `client`,
/// missed that write.
async fn stale_reads_of(
    client: &tokio_postgres::Client,
    reader: &tokio_postgres::Client,
    t: &str,
    cycles: i32,
) -> usize {
    let insert = client
        .prepare(&format!("INSERT INTO {t} VALUES ($1)"))
        .await
        .unwrap();
    let read = reader
        .prepare(&format!("SELECT count(*) FROM {t} WHERE id = $1"))
        .await
        .unwrap();
    let mut stale = 0;
    for i in 0..cycles {
        // Autocommit writes, and every third one in a transaction of its own: the proxy
        // learns the commit position behind the INSERT or behind the COMMIT.
        let explicit = i % 3 == 2;
        if explicit {
            client.batch_execute("BEGIN").await.unwrap();
        }
        client.execute(&insert, &[&i]).await.unwrap();
        if explicit {
            client.batch_execute("COMMIT").await.unwrap();
        }
        let n: i64 = reader.query_one(&read, &[&i]).await.unwrap().get(0);
        if n != 1 {
            stale += 1;
        }
    }
    stale
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_never_reads_the_past_and_eventual_can() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let toml = delayed_only(c);
    assert!(!toml.contains(&format!("port = {}\n", c.replicas[0])));
    let proxy = start_proxy_with(&toml).await;
    let t = unique("ryw");
    let client = proxy.app().await;
    client
        .batch_execute(&format!("CREATE TABLE {t} (id int)"))
        .await
        .unwrap();
    wait_replicated_on(c).await;
    // A session that never wrote reads from the (delayed) replica.
    let fresh = proxy.app().await;
    let ports = tally_while_in_rotation(&proxy, 1, async || server_port(&fresh).await).await;
    assert_eq!(ports.into_keys().collect::<Vec<_>>(), [c.replicas[1]]);

    assert_eq!(
        stale_reads(&client, &t, 1000).await,
        0,
        "read-your-writes: no stale read"
    );

    client
        .batch_execute(&format!(
            "SET pgsplit.consistency = 'eventual'; CREATE TABLE {t}_ev (id int)"
        ))
        .await
        .unwrap();
    wait_replicated_on(c).await;
    let stale = stale_reads(&client, &format!("{t}_ev"), 20).await;
    assert!(
        stale > 0,
        "eventual consistency on a 2 s late replica reads the past"
    );

    // The same as a startup parameter.
    let eventual = connect(&format!(
        "{} options='-c pgsplit.consistency=eventual'",
        proxy.conn_str("app", "app_pw")
    ))
    .await;
    let t2 = unique("ryw");
    eventual
        .batch_execute(&format!("CREATE TABLE {t2} (id int)"))
        .await
        .unwrap();
    wait_replicated_on(c).await;
    assert!(stale_reads(&eventual, &t2, 20).await > 0);
}

/// `read_your_writes = "user"`: an application's pool writes on one connection and reads
/// on another; each read sees what any session of the same user and database committed
/// before it, a pinned writer's too. With the default scope (the session's own writes)
/// the other session reads the delayed replica's past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_wide_read_your_writes_covers_the_other_connections_of_a_pool() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let session_scope = start_proxy_with(&delayed_only(c)).await;
    let user_scope = start_proxy_with(&without_replica(
        &config(c, "[routing]\nread_your_writes = \"user\"\n"),
        c.replicas[0],
    ))
    .await;
    assert_eq!(
        user_scope
            .shared
            .runtime
            .load()
            .config
            .routing
            .read_your_writes,
        pgsplit::config::ReadYourWrites::User
    );
    let t = unique("ryw_user");
    session_scope
        .app()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t}_a (id int); CREATE TABLE {t}_b (id int); CREATE TABLE {t}_c (id int)"
        ))
        .await
        .unwrap();
    wait_replicated_on(c).await;
    let (writer, reader) = (session_scope.app().await, session_scope.app().await);
    assert!(stale_reads_of(&writer, &reader, &format!("{t}_a"), 20).await > 0);
    let (writer, reader) = (user_scope.app().await, user_scope.app().await);
    assert_eq!(
        stale_reads_of(&writer, &reader, &format!("{t}_b"), 300).await,
        0
    );
    // A writer pinned to its primary connection tells its position all the same (once the
    // replica has replayed what came before, only that position keeps the reads off it).
    wait_replicated_on(c).await;
    wait_proxy_saw_replay(&user_scope, c).await;
    writer
        .batch_execute("LISTEN pgsplit_ryw_user")
        .await
        .unwrap();
    assert_eq!(
        stale_reads_of(&writer, &reader, &format!("{t}_c"), 50).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_writes_fail_clearly_and_reads_go_on() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    for toml in [config(c, ""), session_mode(&config(c, ""))] {
        let proxy = start_proxy_with(&toml).await;
        let t = unique("pdown");
        let client = proxy.app().await;
        client
            .batch_execute(&format!("CREATE TABLE {t} (id int)"))
            .await
            .unwrap();
        wait_replicated_on(c).await;
        wait_proxy_saw_replay(&proxy, c).await;
        cluster_cmd(c, &["stop-node", "primary", "--mode", "fast"]).await;
        let write = client
            .execute(&format!("INSERT INTO {t} VALUES (1)"), &[])
            .await;
        let mut reads = Vec::new();
        for _ in 0..4 {
            reads.push(
                client
                    .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                    .await
                    .map(|r| r.get::<_, i64>(0)),
            );
        }
        // A transaction whose first statement finds no primary fails as PostgreSQL's would:
        // 25P02 for what follows, until ROLLBACK; the session goes on.
        client.batch_execute("BEGIN").await.unwrap();
        let in_tx = client
            .execute(&format!("INSERT INTO {t} VALUES (2)"), &[])
            .await;
        let aborted = client.query_one("SELECT 1", &[]).await;
        let rollback = client.batch_execute("ROLLBACK").await;
        let after = client
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await;
        // A statement that would pin the session to the primary and never ran there leaves
        // it free to read on.
        let temp = client
            .batch_execute("CREATE TEMP TABLE pdown_temp (a int)")
            .await;
        let after_temp = client
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await;
        // A new client can still log in and read.
        let newcomer = match try_connect(&proxy.conn_str("app", "app_pw")).await {
            Ok(n) => Ok(server_port(&n).await),
            Err(e) => Err(e),
        };
        cluster_cmd(c, &["start-node", "primary"]).await;
        let e = write.unwrap_err();
        let code = sqlstate(&e);
        assert!(["08006", "57P01"].contains(&code.as_str()), "{code}: {e:?}");
        for r in reads {
            assert_eq!(r.unwrap(), 0);
        }
        assert!(in_tx.is_err());
        assert_eq!(sqlstate(&aborted.unwrap_err()), "25P02");
        rollback.expect("ROLLBACK of the failed transaction");
        assert_eq!(after.unwrap().get::<_, i64>(0), 0);
        assert!(temp.is_err());
        assert_eq!(after_temp.unwrap().get::<_, i64>(0), 0);
        assert!(c.replicas.contains(&newcomer.unwrap()));
        let mut ok = false;
        for _ in 0..50 {
            if client
                .execute(&format!("INSERT INTO {t} VALUES (1)"), &[])
                .await
                .is_ok()
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "writes work again once the primary is back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_in_recovery_is_never_sent_writes() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    // Misconfigured: a standby as the primary (and not also as a replica, which
    // validation refuses).
    let toml = without_replica(&config(c, ""), c.replicas[0]).replacen(
        &format!("port = {}\n", c.primary),
        &format!("port = {}\n", c.replicas[0]),
        1,
    );
    let proxy = start_proxy_with(&toml).await;
    let standby_seen = eventually(Duration::from_secs(5), || {
        proxy.shared.runtime.load().backends.primary.health.role()
            == pgsplit::backend::Role::Standby
    })
    .await;
    assert!(standby_seen);
    let client = proxy.app().await;
    let e = client
        .batch_execute("CREATE TABLE never (id int)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "25006");
    let msg = e.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("in recovery"), "{msg}");
    assert_usable(&client).await;
}

/// A pinned session reads from the primary, but DISCARD ALL (which some drivers send when
/// they return a connection to their pool) unpins it: what it wrote while pinned must
/// still hold its replica reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_pinned_are_read_after_discard_all_unpins() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let proxy = start_proxy_with(&delayed_only(c)).await;
    let t = unique("ryw_pin");
    // Made elsewhere: the session itself has written nothing before it pins.
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int); GRANT ALL ON {t} TO app"
        ))
        .await
        .unwrap();
    wait_replicated_on(c).await;
    let client = proxy.app().await;
    client
        .batch_execute("CREATE TEMP TABLE pinned_here (x int)")
        .await
        .unwrap();
    client
        .batch_execute(&format!("INSERT INTO {t} VALUES (1)"))
        .await
        .unwrap();
    client.batch_execute("DISCARD ALL").await.unwrap();
    // The replica is in rotation: a session that never wrote reads there.
    let fresh = proxy.app().await;
    let ports = tally_while_in_rotation(&proxy, 1, async || server_port(&fresh).await).await;
    assert_eq!(ports.into_keys().collect::<Vec<_>>(), [c.replicas[1]]);
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {t}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the write made while pinned is read after the unpin");
}

/// `BAN` drains a replica: a read already running there finishes there (it is not given
/// up and run again elsewhere, which would do the work twice and move it to the primary).
#[tokio::test]
async fn a_read_running_on_a_banned_replica_finishes_there() {
    let c = cluster();
    let proxy = start_proxy().await;
    assert!(
        eventually(Duration::from_secs(20), || proxy
            .every_replica(|r| r.is_available()))
        .await,
        "the replicas never were all in rotation"
    );
    let client = proxy.app().await;
    let read = tokio::spawn(async move {
        let row = client
            .query_one("SELECT inet_server_port() FROM pg_sleep(3)", &[])
            .await
            .unwrap();
        row.get::<_, i32>(0) as u16
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.every_replica(|r| {
        r.health.set_banned(true);
        true
    });
    let port = read.await.unwrap();
    assert!(
        c.replicas.contains(&port),
        "the read finished on its replica, not on {port}"
    );
}

/// Session mode: the sessions that hold the primary's places keep them while it is down. A
/// login then goes on to a replica rather than wait for a place on a server that is down
/// (at once once the health checks have seen it, and when they do for one that waited),
/// and a session holding a place on one replica reads there rather than wait for the
/// other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_logins_and_reads_with_the_primary_down_do_not_wait_for_places() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let proxy = start_proxy_with(&session_mode(&config(
        c,
        "size = 1\ncheckout_timeout_ms = 20000",
    )))
    .await;
    let holder = proxy.app().await;
    holder.batch_execute("SELECT txid_current()").await.unwrap();
    cluster_cmd(c, &["stop-node", "primary", "--mode", "fast"]).await;
    // A login before the health checks have seen it: it waits for the holder's place, until
    // they do.
    let early = tokio::spawn({
        let conn_str = proxy.conn_str("app", "app_pw");
        async move {
            let started = Instant::now();
            let port = match try_connect(&conn_str).await {
                Ok(client) => Ok(server_port(&client).await),
                Err(e) => Err(e.to_string()),
            };
            (port, started.elapsed())
        }
    });
    let (early_port, early_took) = early.await.unwrap();
    let primary_down = eventually(Duration::from_secs(10), || {
        proxy
            .shared
            .runtime
            .load()
            .backends
            .primary
            .is_unreachable()
    })
    .await;
    let started = Instant::now();
    let mut sessions = Vec::new();
    let mut logins = Vec::new();
    let mut reads = Vec::new();
    for _ in 0..2 {
        let login = try_connect(&proxy.conn_str("app", "app_pw")).await;
        logins.push(login.as_ref().err().map(|e| e.to_string()));
        sessions.extend(login.ok());
    }
    // Each holds one replica's only place; the round robin sends some reads to the other.
    for session in &sessions {
        for _ in 0..3 {
            let read = session.query_one("SELECT inet_server_port()", &[]).await;
            reads.push(
                read.map(|r| r.get::<_, i32>(0) as u16)
                    .map_err(|e| e.to_string()),
            );
        }
    }
    let took = started.elapsed();
    cluster_cmd(c, &["start-node", "primary"]).await;
    assert!(primary_down, "the proxy saw the primary go down");
    assert!(
        c.replicas.contains(&early_port.unwrap()),
        "the early login went on to a replica"
    );
    assert!(early_took < Duration::from_secs(8), "{early_took:?}");
    assert_eq!(logins, [None, None], "both logins went on to a replica");
    for read in reads {
        assert!(c.replicas.contains(&read.unwrap()));
    }
    assert!(
        took < Duration::from_secs(10),
        "nothing waited for a place: {took:?}"
    );
}

/// The ParameterStatus values of a login as `trustuser`, with `params` in its startup
/// packet, through `proxy`; and the client's connection, open.
async fn raw_login(
    proxy: &Proxy,
    params: &[(&str, &str)],
) -> (Vec<(String, String)>, tokio::net::TcpStream) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(&startup_packet_with("trustuser", params))
        .await
        .unwrap();
    let reported = read_messages(&mut stream)
        .await
        .into_iter()
        .filter(|(tag, _)| *tag == b'S')
        .map(|(_, body)| {
            let mut parts = body
                .split(|&b| b == 0)
                .map(|p| String::from_utf8_lossy(p).into_owned());
            (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            )
        })
        .collect();
    (reported, stream)
}

/// Session mode: a connection a session leaves behind tells the next session's login the
/// server's values of now, not those of its own start: here a configuration reload on the
/// server changed IntervalStyle while it lived. (On the failure cluster, which tests use
/// one at a time: the change is server-wide.)
#[tokio::test]
async fn session_mode_logins_on_a_kept_connection_are_told_the_servers_current_settings() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let proxy = start_proxy_with(&session_mode(&config(c, "size = 1"))).await;
    let params = [("application_name", "kept_connection_settings")];
    let (before, first) = raw_login(&proxy, &params).await;
    let style = |reported: &[(String, String)]| {
        reported
            .iter()
            .find(|(k, _)| k == "IntervalStyle")
            .map(|(_, v)| v.clone())
    };
    let admin = direct(c.primary).await;
    let alter_system = async |sql: &str| {
        admin.batch_execute(sql).await.unwrap();
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
    };
    alter_system("ALTER SYSTEM SET IntervalStyle = 'iso_8601'").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    let primary = |p: &pgsplit::backend::Pool| p.backend.is_primary();
    let kept = eventually(Duration::from_secs(5), || {
        proxy.pool_counts(primary) == (0, 1)
    })
    .await;
    let (after, _second) = raw_login(&proxy, &params).await;
    alter_system("ALTER SYSTEM RESET IntervalStyle").await;
    assert!(kept, "the connection was kept");
    assert_eq!(style(&before).as_deref(), Some("postgres"));
    assert_eq!(style(&after).as_deref(), Some("iso_8601"), "{after:?}");
}

/// Transaction mode: after the admin console's RECONNECT, logins are told what the new
/// server connections say (here a role default changed meanwhile) once one has opened, not
/// what the pool's first connection said. (On the failure cluster: the role is shared by
/// other tests.)
#[tokio::test]
async fn after_reconnect_logins_are_told_what_new_connections_say() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let proxy = start_proxy_with(&config(c, "")).await;
    let style = |reported: &[(String, String)]| {
        reported
            .iter()
            .find(|(k, _)| k == "IntervalStyle")
            .map(|(_, v)| v.clone())
    };
    let (before, _first) = raw_login(&proxy, &[]).await;
    let admin = direct(c.primary).await;
    admin
        .batch_execute("ALTER ROLE trustuser SET IntervalStyle = 'iso_8601'")
        .await
        .unwrap();
    // What the admin console's RECONNECT does.
    for pool in proxy.shared.runtime.load().pools() {
        pool.reconnect();
    }
    // A login meanwhile needs no server connection (the pool may be busy): it is told the
    // values from before; a statement opens a connection of the new generation.
    let (meanwhile, mut second) = raw_login(&proxy, &[]).await;
    use tokio::io::AsyncWriteExt;
    second
        .write_all(&message(b'Q', b"SELECT txid_current()\0"))
        .await
        .unwrap();
    read_messages(&mut second).await;
    let (after, _third) = raw_login(&proxy, &[]).await;
    admin
        .batch_execute("ALTER ROLE trustuser RESET IntervalStyle")
        .await
        .unwrap();
    assert_eq!(style(&before).as_deref(), Some("postgres"));
    assert_eq!(style(&meanwhile).as_deref(), Some("postgres"));
    assert_eq!(style(&after).as_deref(), Some("iso_8601"), "{after:?}");
}
