//! Where statements run: reads on replicas (round robin), everything else on the primary.

use crate::common::*;

#[tokio::test]
async fn plain_reads_spread_over_both_replicas_round_robin() {
    let c = cluster();
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    let seen = tally_while_in_rotation(&proxy, 20, async || server_port(&client).await).await;
    assert_eq!(seen.get(&c.replicas[0]), Some(&10), "{seen:?}");
    assert_eq!(seen.get(&c.replicas[1]), Some(&10), "{seen:?}");
    assert!(!seen.contains_key(&c.primary));
    let in_recovery: bool = client
        .query_one(
            "SELECT setting = 'on' FROM pg_settings WHERE name = 'in_hot_standby'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "a plain read ran on a replica");
}

#[tokio::test]
async fn writes_and_locking_reads_go_to_the_primary() {
    let c = cluster();
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    let t = unique("rw");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int primary key, port int); CREATE SEQUENCE {t}_seq"
        ))
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO {t} VALUES (1, inet_server_port())"),
            &[],
        )
        .await
        .unwrap();
    let row = direct(c.primary)
        .await
        .query_one(&format!("SELECT port FROM {t} WHERE id = 1"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0) as u16, c.primary);
    for sql in [
        format!("SELECT inet_server_port() FROM {t} FOR UPDATE"),
        format!("SELECT inet_server_port() FROM (SELECT nextval('{t}_seq')) s"),
        format!("WITH d AS (DELETE FROM {t} WHERE id = 99 RETURNING id) SELECT inet_server_port()"),
        "SELECT inet_server_port() WHERE pg_is_in_recovery() = false".to_owned(),
    ] {
        let port: i32 = client
            .query_one(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0);
        assert_eq!(port as u16, c.primary, "{sql}");
    }
    // Node-identity probe: the proxy is a writable server.
    let ro: String = client
        .query_one("SHOW transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ro, "off");
}

#[tokio::test]
async fn a_transaction_stays_on_one_primary_connection() {
    let c = cluster();
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    client.batch_execute("BEGIN").await.unwrap();
    let pid1: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(server_port(&client).await, c.primary);
    let pid2: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid1, pid2);
    client.batch_execute("COMMIT").await.unwrap();
    // Reads leave the primary after COMMIT. (While other tests write heavily, both replicas
    // can be out of the rotation for their lag for a moment: reads then fall back to the
    // primary, so give it a few tries.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut port = server_port(&client).await;
    while port == c.primary && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        port = server_port(&client).await;
    }
    assert!(
        c.replicas.contains(&port),
        "reads leave the primary after COMMIT"
    );
}

#[tokio::test]
async fn read_only_transactions_run_on_one_replica() {
    let c = cluster();
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    // Also in the spelling sqlparser does not read (asyncpg's deferrable read-only
    // transactions), which pgsplit sent to the primary as an unknown write.
    let begins = ["BEGIN READ ONLY", "BEGIN READ ONLY DEFERRABLE"];
    let mut turn = 0;
    let ports = tally_while_in_rotation(&proxy, 4, async || {
        turn += 1;
        client.batch_execute(begins[turn % 2]).await.unwrap();
        let first = server_port(&client).await;
        for _ in 0..4 {
            assert_eq!(server_port(&client).await, first);
        }
        client.batch_execute("COMMIT").await.unwrap();
        first
    })
    .await;
    assert!(ports.keys().all(|p| c.replicas.contains(p)), "{ports:?}");
}

/// A read-only block goes where its first statement can run: the statements after BEGIN
/// may still make it serializable or read-write, or import a snapshot, which standbys
/// refuse (a direct connection runs them all). pgsplit sent `BEGIN READ ONLY` to a replica
/// at once, and the next `SET TRANSACTION ISOLATION LEVEL SERIALIZABLE` failed with 0A000.
#[tokio::test]
async fn a_read_only_block_changed_by_its_first_statement_runs_on_the_primary() {
    let c = cluster();
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let value_and_port = async |sql: &str| -> (String, u16) {
            let (value, port) = first_two_values(&client, sql).await;
            (value, port.parse().unwrap())
        };
        for (second, want) in [
            (
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                "serializable",
            ),
            ("SET TRANSACTION READ WRITE", "read committed"),
        ] {
            client.batch_execute("BEGIN READ ONLY").await.unwrap();
            client.batch_execute(second).await.unwrap();
            let (isolation, port) = value_and_port(
                "SELECT current_setting('transaction_isolation'), inet_server_port()",
            )
            .await;
            assert_eq!((isolation.as_str(), port), (want, c.primary), "{second}");
            client.batch_execute("COMMIT").await.unwrap();
        }
        // A lock that must exclude the primary's other takers.
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        client
            .batch_execute("SELECT pg_advisory_xact_lock(5)")
            .await
            .unwrap();
        assert_eq!(server_port(&client).await, c.primary);
        client.batch_execute("COMMIT").await.unwrap();
        // A snapshot exported in one read-only block and imported in another's.
        let importer = proxy.app().await;
        let begin = "BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ";
        client.batch_execute(begin).await.unwrap();
        let (snapshot, port) =
            value_and_port("SELECT pg_export_snapshot(), inet_server_port()").await;
        assert_eq!(port, c.primary);
        importer.batch_execute(begin).await.unwrap();
        importer
            .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
            .await
            .unwrap();
        assert_eq!(server_port(&importer).await, c.primary);
        importer.batch_execute("COMMIT").await.unwrap();
        client.batch_execute("COMMIT").await.unwrap();
        // An ordinary read-only block still reads one replica, also when it starts with a
        // setting for the block, which standbys take.
        for start in [
            None,
            Some("SET LOCAL statement_timeout = '5s'"),
            Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
            Some("SAVEPOINT a"),
        ] {
            client.batch_execute("BEGIN READ ONLY").await.unwrap();
            if let Some(sql) = start {
                client.batch_execute(sql).await.unwrap();
            }
            let first = server_port(&client).await;
            // (A replica out of the rotation for its lag under the other tests' load
            // sends the block to the primary.)
            let replicas_in = proxy.every_replica(|r| r.is_available());
            assert!(
                c.replicas.contains(&first) || !replicas_in,
                "{start:?}: {first}"
            );
            assert_eq!(server_port(&client).await, first);
            client.batch_execute("COMMIT").await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_replica_refusing_a_write_is_retried_on_the_primary() {
    let c = cluster();
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    let t = unique("retry");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (port int);
             CREATE FUNCTION {t}_bump() RETURNS int LANGUAGE sql AS
               'INSERT INTO {t} VALUES (inet_server_port()) RETURNING port';
             GRANT ALL ON {t} TO trustuser;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    // Looks like a plain read, goes to a replica, which answers 25006: retried on the primary.
    let port: i32 = client
        .query_one(&format!("SELECT {t}_bump()"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, c.primary);
    // Learned: the next one goes straight to the primary (and still works).
    let port: i32 = client
        .query_one(&format!("SELECT {t}_bump()"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, c.primary);
    // A statement prepared once and run many times (drivers' statement caches) learns it
    // too: one refusal, not one at every run.
    let replica_retries = || {
        proxy
            .shared
            .stats
            .snapshot()
            .iter()
            .find(|r| r.route == pgsplit::stats::RouteKind::Replica)
            .map_or(0, |r| r.retries)
    };
    // Without read-your-writes, each run would go to a replica again.
    let eventual = proxy.app().await;
    eventual
        .batch_execute("SET pgsplit.consistency = 'eventual'")
        .await
        .unwrap();
    let before = replica_retries();
    let prepared = eventual
        .prepare(&format!("SELECT {t}_bump() AS prepared_once"))
        .await
        .unwrap();
    for _ in 0..3 {
        let port: i32 = eventual.query_one(&prepared, &[]).await.unwrap().get(0);
        assert_eq!(port as u16, c.primary);
    }
    assert_eq!(replica_retries() - before, 1, "refused once");
    // Also when the refused request itself prepared it (Parse, Bind, Execute in one, as
    // node-postgres sends a named query the first time).
    let mut raw = RawClient::login(proxy.addr, "trustuser").await;
    let msgs = raw
        .send(&query("SET pgsplit.consistency = 'eventual'"))
        .await;
    assert_eq!(tags(&msgs), "CZ");
    let mut first = parse("named_once", &format!("SELECT {t}_bump() AS named_once"));
    first.extend(bind_execute("named_once"));
    assert_eq!(tags(&raw.send(&first).await), "12DCZ");
    for _ in 0..2 {
        assert_eq!(tags(&raw.send(&bind_execute("named_once")).await), "2DCZ");
    }
    assert_eq!(replica_retries() - before, 2, "refused once more");
    // A read of tables alone, pipelined with the call that wrote, is not learned as a
    // write (it would go to the primary and invalidate the cache at every run).
    let read = format!("SELECT count(*) FROM {t} WHERE port > 0");
    let mut req = parse_bind_execute(&read);
    req.truncate(req.len() - sync().len());
    req.extend(parse_bind_execute(&format!(
        "SELECT {t}_bump() AS pipelined"
    )));
    assert_eq!(tags(&raw.send(&req).await), "12DC12DCZ");
    assert_eq!(replica_retries() - before, 3, "the pipeline was refused");
    let learned = proxy.shared.runtime.load().classify.get(&read);
    assert_eq!(learned.target, pgsplit::router::Target::Replica);
    assert!(!learned.writes_unknown);
    let n: i64 = rows_on(c.primary, &t).await;
    assert_eq!(n, 9, "each call wrote exactly once");
}

/// A function that writes only after the answer outgrew what pgsplit holds back for a
/// retry (64 KiB): the replica's 25006 reaches the client, as it must once rows went out,
/// but the statement is learned as a write all the same, and the next run goes to the
/// primary. pgsplit used to learn only retried refusals: every run failed.
#[tokio::test]
async fn a_write_refused_after_the_answer_streamed_is_learned() {
    let c = cluster();
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    let t = unique("late_write");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (port int);
             CREATE FUNCTION {t}_log() RETURNS int LANGUAGE sql AS
               'INSERT INTO {t} VALUES (inet_server_port()) RETURNING port';"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let eventual = proxy.app().await;
    eventual
        .batch_execute("SET pgsplit.consistency = 'eventual'")
        .await
        .unwrap();
    let sql = format!(
        "SELECT g, repeat('x', 100), CASE WHEN g = 5000 THEN {t}_log() END \
         FROM generate_series(1, 5000) g"
    );
    let err = eventual.simple_query(&sql).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
    let rows = eventual.query(&sql, &[]).await.unwrap();
    assert_eq!(rows.len(), 5000);
    let written: i32 = rows[4999].get(2);
    assert_eq!(written as u16, c.primary);
}

/// The first two columns of the first row `sql` returns as a simple query, as text.
async fn first_two_values(client: &tokio_postgres::Client, sql: &str) -> (String, String) {
    let rows = client.simple_query(sql).await.unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    (row.get(0).unwrap().into(), row.get(1).unwrap().into())
}

/// A proxy, and a client of it, once `setup` ran through the proxy as app and every
/// replica (and the proxy's health checker) saw it replayed.
async fn replayed_through_a_proxy(setup: &str) -> (Proxy, tokio_postgres::Client) {
    let proxy = start_proxy().await;
    proxy.app().await.batch_execute(setup).await.unwrap();
    wait_replicated().await;
    wait_proxy_saw_replay(&proxy, cluster()).await;
    let client = proxy.app().await;
    (proxy, client)
}

/// Replicas cannot read unlogged tables (0A000 "cannot access temporary or unlogged
/// relations during recovery"): such a read is run again on the primary, and the next one
/// goes there at once. A read, not a write: it invalidates nothing.
#[tokio::test]
async fn a_read_of_an_unlogged_table_is_answered_by_the_primary() {
    let c = cluster();
    let t = unique("unlogged");
    let (_proxy, reader) = replayed_through_a_proxy(&format!(
        "CREATE UNLOGGED TABLE {t} (v int); INSERT INTO {t} VALUES (5)"
    ))
    .await;
    for protocol in ["simple", "extended", "extended"] {
        let sql = format!("SELECT v, inet_server_port() FROM {t}");
        let (v, port): (String, String) = if protocol == "simple" {
            first_two_values(&reader, &sql).await
        } else {
            let row = reader.query_one(&sql, &[]).await.unwrap();
            (
                row.get::<_, i32>(0).to_string(),
                row.get::<_, i32>(1).to_string(),
            )
        };
        assert_eq!(v, "5", "{protocol}");
        assert_eq!(port, c.primary.to_string(), "{protocol}");
    }
}

/// A read a standby refuses with another code than 25006: the WAL position behind a view
/// (55000 "recovery is in progress") runs again on the primary. pgsplit passed the
/// replica's error on.
#[tokio::test]
async fn a_read_of_the_wal_position_behind_a_view_is_answered_by_the_primary() {
    let c = cluster();
    let v = unique("wal_position");
    let (_proxy, reader) = replayed_through_a_proxy(&format!(
        "CREATE VIEW {v} AS SELECT pg_current_wal_lsn() AS lsn, inet_server_port() AS port"
    ))
    .await;
    for _ in 0..3 {
        let port = simple_value(&reader, &format!("SELECT port FROM {v}")).await;
        assert_eq!(port, c.primary.to_string());
    }
}

#[tokio::test]
async fn weights_shape_the_distribution() {
    let c = cluster();
    let toml = base_config_toml(c).replacen(
        &format!("port = {}\n", c.replicas[0]),
        &format!("port = {}\n        weight = 3\n", c.replicas[0]),
        1,
    );
    let proxy = start_proxy_with(&toml).await;
    let client = proxy.app().await;
    let seen = tally_while_in_rotation(&proxy, 40, async || server_port(&client).await).await;
    assert_eq!(seen.get(&c.replicas[0]), Some(&30), "{seen:?}");
    assert_eq!(seen.get(&c.replicas[1]), Some(&10), "{seen:?}");
}

#[tokio::test]
async fn reads_fall_back_to_the_primary_when_no_replica_answers() {
    let c = cluster();
    // Replicas on ports where nothing listens.
    let dead = unused_ports::<2>();
    let toml = base_config_toml(c)
        .replace(
            &format!("port = {}\n", c.replicas[0]),
            &format!("port = {}\n", dead[0]),
        )
        .replace(
            &format!("port = {}\n", c.replicas[1]),
            &format!("port = {}\n", dead[1]),
        );
    let proxy = start_proxy_with(&toml).await;
    let client = proxy.app().await;
    assert_eq!(server_port(&client).await, c.primary);

    let strict = toml.replace(
        "[primary]",
        "[routing]\nfallback_to_primary = false\n[primary]",
    );
    let proxy = start_proxy_with(&strict).await;
    let client = proxy.app().await;
    let err = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err), "08006", "{err}");
    // The session survives and writes still work.
    client
        .batch_execute("SELECT pg_advisory_xact_lock(1)")
        .await
        .unwrap();
}

/// Servers on the same machine can be reached over their Unix-domain sockets (`host` is a
/// directory, as in libpq): cheaper than loopback TCP, with the same routing, health checks
/// and cancel requests.
#[tokio::test]
async fn servers_reached_over_unix_sockets_route_and_cancel_the_same() {
    let c = cluster();
    let dir = &c.env["PGSPLIT_SOCKET_DIR"];
    let toml = base_config_toml(c).replace("host = \"127.0.0.1\"", &format!("host = \"{dir}\""));
    assert_eq!(toml.matches(dir.as_str()).count(), 3, "{toml}");
    let proxy = start_proxy_with(&toml).await;
    let client = proxy.app().await;
    let port_of = async |sql: &str| -> u16 {
        let row = client.query_one(sql, &[]).await.unwrap();
        row.get::<_, String>(0).parse().unwrap()
    };
    let seen = tally_while_in_rotation(&proxy, 2, async || {
        port_of("SELECT current_setting('port')").await
    })
    .await;
    assert_eq!(
        seen.into_keys().collect::<std::collections::HashSet<_>>(),
        c.replicas.into_iter().collect(),
        "reads reached both replicas"
    );
    let t = unique("unix_socket_write");
    client
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int); INSERT INTO {t} VALUES (1)"
        ))
        .await
        .unwrap();
    assert_eq!(
        port_of(&format!(
            "SELECT current_setting('port') FROM {t} FOR UPDATE"
        ))
        .await,
        c.primary
    );
    // A cancel request finds its server through the socket too.
    let canceller = tokio::spawn(cancel_repeatedly(client.cancel_token()));
    let e = client.query("SELECT pg_sleep(30)", &[]).await.unwrap_err();
    canceller.abort();
    assert_eq!(sqlstate(&e), "57014", "{e}");
    assert_usable(&client).await;
    client
        .batch_execute(&format!("DROP TABLE {t}"))
        .await
        .unwrap();
}

/// A read with a large parameter (an ORM's `= ANY($1)` array, a long IN list) goes to a
/// replica like any read: the bound on messages held for their Sync is far above one
/// request's (a first version of it sent every request of 1 MiB on to the primary).
#[tokio::test]
async fn a_read_with_a_megabyte_parameter_runs_on_a_replica() {
    let c = cluster();
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    let big = "x".repeat(1_100_000);
    for _ in 0..4 {
        let row = client
            .query_one("SELECT length($1::text), inet_server_port()", &[&big])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 1_100_000);
        let port = row.get::<_, i32>(1) as u16;
        assert_ne!(
            port, c.primary,
            "a read with a big parameter went to the primary"
        );
    }
}

/// A pipeline of thousands of reads sent in one write with its Sync runs on a replica: the
/// bound on messages held for their Sync counts only once nothing more is there to read (a
/// first version sent it on to the primary when its buffer, filled 16 KiB at a time, held
/// no whole message).
#[tokio::test]
async fn a_long_read_pipeline_sent_with_its_sync_runs_on_a_replica() {
    let c = cluster();
    let proxy = start_proxy().await;
    let mut client = RawClient::login(proxy.addr, "trustuser").await;
    let pairs = 5_000;
    let mut request = parse("", "SELECT inet_server_port()");
    for _ in 0..pairs {
        request.extend(bind(""));
        request.extend(execute());
    }
    request.extend(sync());
    let messages = client.send(&request).await;
    let ports: Vec<&[u8]> = messages
        .iter()
        .filter(|m| m.0 == b'D')
        .map(|m| &m.1[6..])
        .collect();
    assert_eq!(ports.len(), pairs);
    let primary = c.primary.to_string();
    assert!(
        ports.iter().all(|p| *p != primary.as_bytes()),
        "the pipeline ran on the primary"
    );
}
