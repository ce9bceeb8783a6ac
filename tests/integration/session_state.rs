//! Session state follows the session to every backend it uses.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;

async fn setting(client: &tokio_postgres::Client, name: &str) -> (String, u16) {
    let row = client
        .query_one("SELECT current_setting($1), inet_server_port()", &[&name])
        .await
        .unwrap();
    (row.get(0), row.get::<_, i32>(1) as u16)
}

#[tokio::test]
async fn set_and_reset_apply_on_every_replica() {
    let c = cluster();
    for proxy in both_modes().await {
        let client = proxy.app().await;
        client
            .batch_execute("SET application_name = 'albums'; SET statement_timeout TO '7s'")
            .await
            .unwrap();
        client
            .batch_execute("SET TIME ZONE 'Asia/Tokyo'")
            .await
            .unwrap();
        let ports = tally_while_in_rotation(&proxy, 4, async || {
            let (tz, port) = setting(&client, "TimeZone").await;
            assert_eq!(tz, "Asia/Tokyo");
            assert_eq!(setting(&client, "application_name").await.0, "albums");
            assert_eq!(setting(&client, "statement_timeout").await.0, "7s");
            port
        })
        .await;
        assert_eq!(
            ports.into_keys().collect::<std::collections::HashSet<_>>(),
            c.replicas.into_iter().collect()
        );
        client
            .batch_execute("RESET statement_timeout")
            .await
            .unwrap();
        for _ in 0..4 {
            assert_eq!(setting(&client, "statement_timeout").await.0, "0");
            assert_eq!(setting(&client, "application_name").await.0, "albums");
        }
        client.batch_execute("RESET ALL").await.unwrap();
        for _ in 0..4 {
            assert_eq!(setting(&client, "application_name").await.0, "");
        }
    }
}

#[tokio::test]
async fn startup_parameters_reach_every_backend() {
    for proxy in both_modes().await {
        let client = connect(&format!(
            "{} application_name=from_startup options='-c search_path=pg_catalog,public'",
            proxy.conn_str("app", "app_pw")
        ))
        .await;
        for _ in 0..4 {
            assert_eq!(setting(&client, "application_name").await.0, "from_startup");
            assert_eq!(setting(&client, "search_path").await.0, "pg_catalog,public");
        }
    }
}

/// `SET x TO DEFAULT` and `SET TIME ZONE DEFAULT | LOCAL` are RESETs: back to what the
/// client logged in with (pgjdbc always sends its JVM's TimeZone), on every backend. pgsplit
/// replayed them as SETs in transaction mode, so pooled connections gave the server's
/// default: UTC timestamps, and no statement_timeout.
#[tokio::test]
async fn set_to_default_returns_to_the_login_value() {
    for proxy in both_modes().await {
        let client = connect(&format!(
            "{} options='-c statement_timeout=4321 -c TimeZone=Asia/Tokyo'",
            proxy.conn_str("app", "app_pw")
        ))
        .await;
        for sql in [
            "SET statement_timeout = 1000",
            "SET statement_timeout TO DEFAULT",
            "SET TIME ZONE 'UTC'",
            "SET TIME ZONE DEFAULT",
        ] {
            client.batch_execute(sql).await.unwrap();
        }
        for _ in 0..4 {
            assert_eq!(setting(&client, "statement_timeout").await.0, "4321ms");
            assert_eq!(setting(&client, "TimeZone").await.0, "Asia/Tokyo");
        }
        client.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
        client.batch_execute("SET TIME ZONE LOCAL").await.unwrap();
        for _ in 0..4 {
            assert_eq!(setting(&client, "TimeZone").await.0, "Asia/Tokyo");
        }
    }
}

/// A startup parameter given twice, or on its own and in `options`: the server applies the
/// last one on its own, else the last in `options`, and the login's ParameterStatus says
/// what it applies (in transaction mode pgsplit reported the first, and the baseline it
/// replayed followed the packet's order).
#[tokio::test]
async fn a_startup_parameter_given_twice_is_reported_as_the_one_in_force() {
    use tokio::io::AsyncWriteExt;
    type Params<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Params, &[u8], &str); 4] = [
        (
            &[
                ("application_name", "first"),
                ("application_name", "second"),
            ],
            b"application_name\0second\0",
            "SHOW application_name",
        ),
        (
            &[("TimeZone", "UTC"), ("options", "-c TimeZone=Asia/Tokyo")],
            b"TimeZone\0UTC\0",
            "SHOW TimeZone",
        ),
        (
            &[("options", "-c TimeZone=Asia/Tokyo")],
            b"TimeZone\0Asia/Tokyo\0",
            "SHOW TimeZone",
        ),
        // Reported as the server reports it (psycopg parses it, and refuses "iso,dmy").
        (
            &[("options", "-c datestyle=iso,dmy")],
            b"DateStyle\0ISO, DMY\0",
            "SHOW DateStyle",
        ),
    ];
    for proxy in both_modes().await {
        for (params, status, show) in cases {
            let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
            s.write_all(&startup_packet_with("trustuser", params))
                .await
                .unwrap();
            let msgs = read_messages(&mut s).await;
            assert!(
                msgs.iter().any(|m| m.0 == b'S' && m.1 == status),
                "{params:?}: {msgs:?}"
            );
            let value = &status[status.iter().position(|&b| b == 0).unwrap()..];
            s.write_all(&query(show)).await.unwrap();
            let msgs = read_messages(&mut s).await;
            let row = msgs.iter().find(|m| m.0 == b'D').expect("a row");
            assert!(
                row.1.ends_with(&value[1..value.len() - 1]),
                "{params:?}: {msgs:?}"
            );
        }
    }
}

/// The login's ParameterStatus spells the values a client gave as the server does
/// (drivers compare them: `UTF8`, not the `'utf-8'` asyncpg sends), in both modes, at a
/// login whose pool already knows the server's parameters, when the spelling is learned and
/// when it is remembered; and a value the server refuses fails the login as it does on a
/// direct connection. (In transaction mode pgsplit reported the value as given.)
#[tokio::test]
async fn startup_parameters_are_reported_in_the_servers_spelling() {
    use tokio::io::AsyncWriteExt;
    let c = cluster();
    let direct: SocketAddr = ([127, 0, 0, 1], c.primary).into();
    let cases: [(&str, &str, &str); 6] = [
        ("TimeZone", "asia/tokyo", "Asia/Tokyo"),
        // Spelled as given, though not the server's default.
        ("TimeZone", "Europe/Berlin", "Europe/Berlin"),
        ("client_encoding", "'utf-8'", "UTF8"),
        ("IntervalStyle", "SQL_STANDARD", "sql_standard"),
        ("default_transaction_read_only", "no", "off"),
        // PostgreSQL 15 reports each byte outside printable ASCII as '?'.
        ("application_name", "caf\u{e9}", "caf??"),
    ];
    async fn reported(addr: SocketAddr, params: &[(&str, &str)], name: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&startup_packet_with("trustuser", params))
            .await
            .unwrap();
        let msgs = read_messages(&mut s).await;
        let prefix = format!("{name}\0");
        let status = msgs
            .iter()
            .find(|m| m.0 == b'S' && m.1.starts_with(prefix.as_bytes()))
            .unwrap_or_else(|| panic!("{params:?}: no {name} reported: {msgs:?}"));
        String::from_utf8_lossy(&status.1[prefix.len()..status.1.len() - 1]).into_owned()
    }
    for proxy in both_modes().await {
        // The pool learns the server's parameters from a plain login first.
        reported(proxy.addr, &[], "TimeZone").await;
        for (name, given, spelled) in cases {
            assert_eq!(reported(direct, &[(name, given)], name).await, spelled);
            let options = format!("-c {name}={given}");
            for params in [[(name, given)], [("options", options.as_str())]] {
                // Learned from the server, then remembered.
                for _ in 0..2 {
                    assert_eq!(
                        reported(proxy.addr, &params, name).await,
                        spelled,
                        "{params:?}"
                    );
                }
            }
        }
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&startup_packet_with("trustuser", &[("TimeZone", "banana")]))
            .await
            .unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(error_code(&msgs).as_deref(), Some("22023"), "{msgs:?}");
        assert!(msgs.iter().all(|m| m.0 != b'Z'), "{msgs:?}");
    }
    // Transaction mode, the pool's only connection busy: a login with a spelling the pool
    // learned needs no server, and one with a new value does not wait for the connection
    // (it is told the value as given).
    let proxy = start_proxy_with(&format!(
        "{}\n[pool]\nsize = 1\ncheckout_timeout_ms = 30000\n",
        base_config_toml(c)
    ))
    .await;
    let learned = [("TimeZone", "asia/tokyo")];
    assert_eq!(
        reported(proxy.addr, &learned, "TimeZone").await,
        "Asia/Tokyo"
    );
    let mut holder = RawClient::login(proxy.addr, "trustuser").await;
    let msgs = holder.send(&query("BEGIN; SELECT txid_current()")).await;
    assert_eq!(error_code(&msgs), None, "{msgs:?}");
    let started = std::time::Instant::now();
    assert_eq!(
        reported(proxy.addr, &learned, "TimeZone").await,
        "Asia/Tokyo"
    );
    let new = [("TimeZone", "america/new_york")];
    assert_eq!(
        reported(proxy.addr, &new, "TimeZone").await,
        "america/new_york"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "no login waited for the busy connection: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn set_inside_a_rolled_back_transaction_is_undone() {
    for proxy in both_modes().await {
        let client = proxy.app().await;
        client
            .batch_execute("BEGIN; SET search_path TO pg_catalog; ROLLBACK")
            .await
            .unwrap();
        client.batch_execute("BEGIN").await.unwrap();
        client
            .batch_execute("SET search_path TO pg_catalog, public")
            .await
            .unwrap();
        client.batch_execute("COMMIT").await.unwrap();
        for _ in 0..4 {
            assert_eq!(
                setting(&client, "search_path").await.0,
                "pg_catalog, public"
            );
        }
        client
            .batch_execute("SET LOCAL search_path TO public")
            .await
            .ok();
        for _ in 0..2 {
            assert_eq!(
                setting(&client, "search_path").await.0,
                "pg_catalog, public"
            );
        }
    }
}

#[tokio::test]
async fn search_path_of_one_client_never_leaks_into_another() {
    for proxy in both_modes().await {
        let a = proxy.app().await;
        let b = proxy.app().await;
        a.batch_execute("SET search_path TO pg_catalog")
            .await
            .unwrap();
        for _ in 0..4 {
            assert_eq!(setting(&a, "search_path").await.0, "pg_catalog");
            assert_eq!(setting(&b, "search_path").await.0, "\"$user\", public");
        }
    }
}

/// `set_config(…, false)` called by the client is read back and replayed like a SET, with
/// the value exactly as the server holds it (quotes and commas included).
#[tokio::test]
async fn set_config_applies_on_every_backend_like_set() {
    for proxy in both_modes().await {
        let a = proxy.app().await;
        let b = proxy.app().await;
        a.batch_execute("SELECT set_config('application_name', 'it''s a,b', false)")
            .await
            .unwrap();
        for _ in 0..4 {
            assert_eq!(setting(&a, "application_name").await.0, "it's a,b");
            assert_ne!(setting(&b, "application_name").await.0, "it's a,b");
        }
    }
}

#[tokio::test]
async fn temp_tables_pin_the_session_to_the_primary() {
    let c = cluster();
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let first = tally_while_in_rotation(&proxy, 1, async || server_port(&client).await).await;
        assert!(!first.contains_key(&c.primary), "{first:?}");
        client
            .batch_execute("CREATE TEMP TABLE scratch (v int); INSERT INTO scratch VALUES (41)")
            .await
            .unwrap();
        for _ in 0..4 {
            let v: i32 = client
                .query_one("SELECT v + 1 FROM scratch", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, 42);
            assert_eq!(server_port(&client).await, c.primary);
        }
        // Other sessions are not pinned.
        let other = proxy.app().await;
        let reads = tally_while_in_rotation(&proxy, 1, async || server_port(&other).await).await;
        assert!(!reads.contains_key(&c.primary), "{reads:?}");
    }
}

#[tokio::test]
async fn listen_pins_and_notifications_arrive_while_idle() {
    for proxy in both_modes().await {
        let (listener, mut rx) = listening_client(&proxy.conn_str("app", "app_pw")).await;
        let channel = unique("chan");
        listener
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .unwrap();
        let notifier = proxy.app().await;
        notifier
            .batch_execute(&format!("NOTIFY {channel}, 'hello'"))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("notification in time")
            .unwrap();
        assert_eq!(got, (channel, "hello".to_owned()));
    }
}

#[tokio::test]
async fn deallocate_and_discard_all_behave_like_a_direct_connection() {
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let stmt = client.prepare("SELECT 5").await.unwrap();
        assert_eq!(
            client.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0),
            5
        );
        client.batch_execute("DEALLOCATE ALL").await.unwrap();
        let e = client.query_one(&stmt, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "26000", "{e}");
        client
            .batch_execute("SET application_name = 'x'")
            .await
            .unwrap();
        client.batch_execute("DISCARD ALL").await.unwrap();
        assert_eq!(setting(&client, "application_name").await.0, "");
    }
}

/// A SET that a COMMIT kept before the request failed is one pgsplit cannot see: the
/// session's connections must still agree with each other (here: the primary, which runs
/// transactions, and the replicas, which run its reads), in both pool modes.
#[tokio::test]
async fn a_set_kept_by_a_failed_request_leaves_no_connection_disagreeing() {
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let e = client
            .batch_execute("BEGIN; SET search_path TO pg_catalog; COMMIT; SELECT 1/0")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22012");
        let on_primary = primary_setting(&client, "search_path").await;
        let ports = tally_while_in_rotation(&proxy, 4, async || {
            let (on_replica, port) = setting(&client, "search_path").await;
            assert_eq!(
                on_replica, on_primary,
                "replica {port} and the primary disagree"
            );
            port
        })
        .await;
        assert!(
            !ports.contains_key(&cluster().primary),
            "reads on replicas: {ports:?}"
        );
    }
}

/// Standbys refuse serializable transactions: a session whose default is serializable,
/// however it got it, reads from the primary instead of failing on every replica read.
#[tokio::test]
async fn a_serializable_default_from_startup_or_set_config_keeps_reads_working() {
    for proxy in both_modes().await {
        let client = connect(&format!(
            "{} options='-c default_transaction_isolation=serializable'",
            proxy.conn_str("app", "app_pw")
        ))
        .await;
        for _ in 0..4 {
            let rows = client.simple_query("SELECT 1").await;
            assert!(rows.is_ok(), "{rows:?}");
        }
        let client = proxy.app().await;
        client
            .batch_execute(
                "SELECT set_config('default_transaction_isolation', 'serializable', false)",
            )
            .await
            .unwrap();
        for _ in 0..4 {
            let rows = client.simple_query("SELECT 1").await;
            assert!(rows.is_ok(), "{rows:?}");
        }
    }
}

/// A serializable default sends the session's reads to the primary only while it is in
/// force: Spring with pgjdbc sets it around each serializable transaction, then back to
/// read committed. pgsplit used to pin such a session for good: its reads stayed on the
/// primary, and in transaction mode it held a primary connection until it disconnected,
/// so a few idle clients used up the pool.
#[tokio::test]
async fn a_serializable_default_set_back_reads_from_replicas_again() {
    let c = cluster();
    const SERIALIZABLE: &str =
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE";
    const READ_COMMITTED: &str =
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED";
    for proxy in both_modes().await {
        let client = proxy.app().await;
        for (set, back) in [
            (SERIALIZABLE, READ_COMMITTED),
            (
                "SET default_transaction_isolation = 'serializable'",
                "RESET default_transaction_isolation",
            ),
            (
                "SELECT set_config('default_transaction_isolation', 'serializable', false)",
                "SET default_transaction_isolation TO DEFAULT",
            ),
        ] {
            client.batch_execute(set).await.unwrap();
            for _ in 0..3 {
                let (value, port) = setting(&client, "default_transaction_isolation").await;
                assert_eq!((value.as_str(), port), ("serializable", c.primary), "{set}");
            }
            client.batch_execute(back).await.unwrap();
            for _ in 0..3 {
                let (value, port) = setting(&client, "default_transaction_isolation").await;
                assert_eq!(value, "read committed", "{back}");
                assert!(c.replicas.contains(&port), "{back}: {port}");
            }
        }
    }
    // One server connection per node: the first client's session holds none between its
    // requests, so the second one's transaction gets the primary's.
    let proxy = start_proxy_one_connection_per_node().await;
    let first = proxy.app().await;
    first.batch_execute(SERIALIZABLE).await.unwrap();
    first.batch_execute(READ_COMMITTED).await.unwrap();
    let second = proxy.app().await;
    second
        .batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .unwrap();
    assert!(c.replicas.contains(&setting(&first, "search_path").await.1));
}

/// A serializable default set on the role (`ALTER ROLE … SET`), which pgsplit never sees
/// being set: the first read a replica refuses for it (0A000, at the replay of the
/// session's settings or at the read) runs again on the primary, and the session's reads
/// go to the primary from then on, READ ONLY blocks included, even with
/// `fallback_to_primary` off (the replicas are up, they refuse the session). pgsplit used to
/// try every replica at every read (a new server connection each time), then fail or fall
/// back.
#[tokio::test]
async fn a_serializable_default_of_the_role_keeps_reads_working() {
    let c = cluster();
    let user = unique("serializable_role");
    run_as_superuser(&format!(
        "CREATE ROLE {user} LOGIN PASSWORD 'pw'; \
         ALTER ROLE {user} SET default_transaction_isolation = 'serializable'"
    ))
    .await;
    wait_replicated_on(c).await;
    // Trusted by pgsplit (the raw client below cannot do SCRAM); pgsplit's own logins to
    // the servers use the password.
    let proxy = start_proxy_with(&format!(
        "{}\n[[users]]\nname = \"{user}\"\npassword = \"pw\"\nauth_method = \"trust\"\n\
         [routing]\nfallback_to_primary = false\n",
        base_config_toml(c)
    ))
    .await;
    // A session whose first read is inside a READ ONLY block (no settings to replay, which
    // a replica would refuse first): that block fails once, the session's later blocks
    // and reads go to the primary.
    let mut raw = RawClient::login(proxy.addr, &user).await;
    assert_eq!(tags(&raw.send(&query("BEGIN READ ONLY")).await), "CZ");
    let msgs = raw.send(&query("SELECT 1")).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("0A000"), "{msgs:?}");
    assert_eq!(tags(&raw.send(&query("ROLLBACK")).await), "CZ");
    for _ in 0..2 {
        assert_eq!(tags(&raw.send(&query("BEGIN READ ONLY")).await), "CZ");
        let msgs = raw.send(&query("SELECT inet_server_port()")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
        let port = msgs.iter().find(|m| m.0 == b'D').map(|m| m.1[6..].to_vec());
        assert_eq!(port, Some(c.primary.to_string().into_bytes()));
        assert_eq!(tags(&raw.send(&query("COMMIT")).await), "CZ");
    }
    let client = connect(&proxy.conn_str(&user, "pw")).await;
    for sql in [
        "SELECT inet_server_port()",
        "SELECT inet_server_port()",
        "BEGIN READ ONLY; SELECT inet_server_port(); COMMIT",
    ] {
        assert_eq!(
            simple_value(&client, sql).await,
            c.primary.to_string(),
            "{sql}"
        );
    }
}

/// DISCARD ALL resets what pins a session, but not a library loaded with LOAD (nor a
/// dblink connection): such a session keeps its connection, which no other client gets.
#[tokio::test]
async fn discard_all_does_not_unpin_a_session_that_loaded_a_library() {
    for proxy in both_modes().await {
        let admin = connect(&proxy.conn_str("admin", "admin_password")).await;
        admin.batch_execute("LOAD 'auto_explain'").await.unwrap();
        admin.batch_execute("DISCARD ALL").await.unwrap();
        for _ in 0..4 {
            // Only a connection that loaded the library knows its settings.
            let rows = admin
                .simple_query("SHOW auto_explain.log_min_duration")
                .await;
            assert!(rows.is_ok(), "{rows:?}");
        }
    }
}

/// DISCARD ALL unpins a session, but what the same request pins after it holds: here a
/// temp table made behind it in one extended-protocol batch (one Sync), read afterwards.
#[tokio::test]
async fn what_a_request_pins_behind_its_discard_all_keeps_the_session_pinned() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        assert_eq!(tags(&c.send(&query("LISTEN before_discard")).await), "CZ");
        let mut req = parse_bind_execute_unsynced("DISCARD ALL");
        req.extend(parse_bind_execute_unsynced(
            "CREATE TEMP TABLE made_after_discard (x int)",
        ));
        req.extend(sync());
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "12C12CZ", "{msgs:?}");
        // An unpinned session's reads go back to replicas once the health checker has read
        // the primary's position twice more (read-your-writes): wait for that.
        let health = || {
            proxy
                .shared
                .runtime
                .load()
                .backends
                .primary
                .health
                .lsn_samples()
        };
        let seen = health();
        assert!(eventually(Duration::from_secs(20), || health() >= seen + 3).await);
        for _ in 0..4 {
            let msgs = c
                .send(&query("SELECT count(*) FROM made_after_discard"))
                .await;
            assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
        }
        // A DISCARD ALL of its own still unpins: reads reach a replica again once the
        // health checker has seen the primary's position after it (read-your-writes).
        assert_eq!(tags(&c.send(&query("DISCARD ALL")).await), "CZ");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let msgs = c.send(&query("SELECT inet_server_port()")).await;
            let (_, row) = msgs.iter().find(|m| m.0 == b'D').expect("a row");
            let port: u16 = String::from_utf8_lossy(&row[6..]).parse().unwrap();
            if port != cluster().primary {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "still pinned");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn parse_bind_execute_unsynced(sql: &str) -> Vec<u8> {
    let mut req = parse("", sql);
    req.extend(bind(""));
    req.extend(execute());
    req
}

/// A pinned session whose server connection dies loses what it held there (a temp table
/// here): the session ends, as a direct connection would, instead of going on with a
/// fresh connection that lacks it.
#[tokio::test]
async fn a_pinned_session_whose_connection_dies_ends_instead_of_forgetting() {
    for proxy in both_modes().await {
        let client = proxy.app().await;
        client
            .batch_execute("CREATE TEMP TABLE held_here (x int)")
            .await
            .unwrap();
        terminate_primary_backend(&client).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            client
                .simple_query("SELECT count(*) FROM held_here")
                .await
                .is_err()
        );
        assert!(
            client.simple_query("SELECT 1").await.is_err(),
            "the session ended with its connection"
        );
    }
}

/// pgsplit reads a setting back after a `set_config(…, false)` on the connection that ran
/// it. Inside a transaction block the client may still be fetching from its unnamed portal
/// (Execute with a row limit): the read must leave that portal alone, as a direct
/// connection would (it read with a simple Query, which destroyed the portal: 34000).
#[tokio::test]
async fn reading_back_a_set_config_leaves_the_clients_portal_open() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    let execute_10 = message(b'E', &[0, 0, 0, 0, 10]);
    for addr in addrs {
        let mut s = RawClient::login(addr, "trustuser").await;
        assert_eq!(tags(&s.send(&query("BEGIN")).await), "CZ", "{addr}");
        let mut req = parse(
            "",
            "SELECT set_config('application_name', 'read back ' || g, false), g \
             FROM generate_series(1, 25) g",
        );
        req.extend(bind(""));
        req.extend(&execute_10);
        req.extend(sync());
        // ParameterStatus messages (S) report each new application_name.
        let mut answer_tags = async |req: Vec<u8>| {
            let msgs = s.send(&req).await;
            (tags(&msgs).replace('S', ""), msgs)
        };
        let (got, msgs) = answer_tags(req).await;
        assert_eq!(got, "12DDDDDDDDDDsZ", "{addr}: {msgs:?}");
        let mut req = execute_10.clone();
        req.extend(sync());
        let (got, msgs) = answer_tags(req).await;
        assert_eq!(got, "DDDDDDDDDDsZ", "{addr}: {msgs:?}");
        let msgs = s.send(&query("COMMIT")).await;
        assert_eq!(tags(&msgs), "CZ", "{addr}: {msgs:?}");
        // And the setting read back is the session's.
        let msgs = s.send(&query("SHOW application_name")).await;
        assert!(
            msgs.iter()
                .any(|m| m.0 == b'D' && m.1.windows(9).any(|w| w == b"read back")),
            "{addr}: {msgs:?}"
        );
    }
}

/// A new role (NOLOGIN) that `app` may SET ROLE to, replicated.
async fn role_granted_to_app(prefix: &str) -> String {
    let role = unique(prefix);
    run_as_superuser(&format!("CREATE ROLE {role} NOLOGIN; GRANT {role} TO app")).await;
    wait_replicated_on(cluster()).await;
    role
}

/// `RESET ALL` leaves the role in force, as PostgreSQL does (the role is not one of the
/// settings it resets): the session keeps it on every backend, and the pooled connection
/// it ran on is brought back to the next client's role (pool size 1, so that client gets
/// that very connection). pgsplit used to forget the role at RESET ALL, so the next
/// client ran as the first one's role.
#[tokio::test]
async fn reset_all_keeps_the_role_and_it_never_reaches_another_client() {
    let role = role_granted_to_app("reset_all_role").await;
    let proxy = start_proxy_one_connection_per_node().await;
    let a = proxy.app().await;
    a.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    a.batch_execute("SET search_path TO pg_catalog; RESET ALL")
        .await
        .unwrap();
    let current_user = async |client: &tokio_postgres::Client, in_transaction: bool| {
        let sql = if in_transaction {
            "BEGIN; SELECT current_user; COMMIT"
        } else {
            "SELECT current_user"
        };
        simple_value(client, sql).await
    };
    let b = proxy.app().await;
    for in_transaction in [true, false, true] {
        assert_eq!(current_user(&a, in_transaction).await, role);
        assert_eq!(current_user(&b, in_transaction).await, "app");
    }
    assert_eq!(setting(&a, "search_path").await.0, "\"$user\", public");
}

/// A connection another session left with its role is brought back to the login's own
/// identity before this session's settings are replayed: a superuser-only setting from the
/// startup packet is applied with the login's privileges, not with the role. With the role
/// reset last, the replay failed (42501) and ended the session.
#[tokio::test]
async fn settings_are_replayed_as_the_login_not_as_the_role_left_on_the_connection() {
    let proxy = start_proxy_one_connection_per_node().await;
    let admin = |options: &str| {
        format!(
            "host=127.0.0.1 port={} user=admin password=admin_password dbname=appdb{options}",
            proxy.port()
        )
    };
    let a = connect(&admin("")).await;
    a.batch_execute("SET ROLE app").await.unwrap();
    assert_eq!(primary_setting(&a, "role").await, "app");
    let b = connect(&admin(" options='-c log_statement=all'")).await;
    assert_eq!(
        simple_value(&b, "BEGIN; SELECT current_user; COMMIT").await,
        "admin"
    );
    assert_eq!(primary_setting(&b, "log_statement").await, "all");
    assert_eq!(primary_setting(&a, "role").await, "app");
    // With the same role on both sides the connection's role is taken back all the same:
    // A's replay resets B's superuser-only setting as the login, not as app.
    b.batch_execute("SET ROLE app").await.unwrap();
    assert_eq!(primary_setting(&a, "log_statement").await, "none");
    assert_eq!(primary_setting(&a, "role").await, "app");
    assert_eq!(primary_setting(&b, "log_statement").await, "all");
    assert_eq!(primary_setting(&b, "role").await, "app");
}

/// A client that finds pgsplit's name for a statement in `pg_prepared_statements` and
/// DEALLOCATEs it on the server: the connection no longer claims the statement, so the next
/// client to bind that SQL there gets it prepared again. pgsplit kept claiming it, and
/// every later Bind of that SQL on the connection failed with 26000.
#[tokio::test]
async fn a_deallocate_of_pgsplits_own_statement_name_leaves_other_clients_working() {
    let proxy = start_proxy_one_connection_per_node().await;
    let sql = format!("SELECT 1 AS {}", unique("dealloc_probe"));
    let a = proxy.app().await;
    let stmt = a.prepare(&sql).await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    a.query(&stmt, &[]).await.unwrap();
    let name = simple_value(
        &a,
        &format!("SELECT name FROM pg_prepared_statements WHERE statement = '{sql}'"),
    )
    .await;
    assert!(name.starts_with("pgsplit_"), "{name}");
    a.batch_execute(&format!("DEALLOCATE \"{name}\"; COMMIT"))
        .await
        .unwrap();
    let b = proxy.app().await;
    let stmt = b.prepare(&sql).await.unwrap();
    for _ in 0..2 {
        b.batch_execute("BEGIN").await.unwrap();
        assert_eq!(b.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0), 1);
        b.batch_execute("COMMIT").await.unwrap();
    }
}

/// Settings replay with the identity they ran with, whatever another session left on the
/// connection: a superuser-only setting made under a superuser role (by a login that is
/// not one) is set under that role, and one another session left there is cleared by
/// RESET ALL, which checks no privileges. Before, the first was replayed as the login and
/// the second reset as the login, both refused (42501), ending the session.
#[tokio::test]
async fn settings_made_under_a_role_replay_under_it() {
    let c = cluster();
    let role = unique("superuser_role");
    run_as_superuser(&format!(
        "CREATE ROLE {role} NOLOGIN SUPERUSER; GRANT {role} TO app"
    ))
    .await;
    wait_replicated_on(c).await;
    let proxy = start_proxy_one_connection_per_node().await;
    let b = proxy.app().await;
    b.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    b.batch_execute("SET log_statement = 'all'").await.unwrap();
    // A, under the same role, takes the connection B left its setting on.
    let a = proxy.app().await;
    a.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    assert_eq!(primary_setting(&a, "log_statement").await, "none");
    // B back on a connection with its role and not its setting.
    assert_eq!(primary_setting(&b, "log_statement").await, "all");
    // A third session without a role leaves the connection with none; B's replay then
    // sets its role before its setting.
    let plain = proxy.app().await;
    assert_eq!(primary_setting(&plain, "role").await, "none");
    assert_eq!(primary_setting(&b, "log_statement").await, "all");
    assert_eq!(primary_setting(&b, "role").await, role);
    assert_eq!(primary_setting(&a, "role").await, role);
    assert_eq!(primary_setting(&plain, "log_statement").await, "none");
    // B leaves the role its setting was made under: that setting still replays under it.
    b.batch_execute("SET ROLE app").await.unwrap();
    assert_eq!(primary_setting(&plain, "role").await, "none");
    assert_eq!(primary_setting(&b, "log_statement").await, "all");
    assert_eq!(primary_setting(&b, "role").await, "app");
}

/// A prepared statement's literals are read with the TimeZone and DateStyle of its Parse,
/// and kept (PostgreSQL does not parse it again when they change). pgsplit shares server
/// statements among clients by SQL text: clients whose parse settings differ must not
/// share one, or one of them gets (and writes) times shifted by the other's zone.
#[tokio::test]
async fn statements_are_not_shared_across_parse_settings() {
    let proxy = start_proxy_one_connection_per_node().await;
    // `::text` is applied when it runs, in the zone then: it shows how the literal was read.
    let sql = "SELECT ('2023-01-01 00:00'::timestamptz)::text";
    // In a transaction: on the primary, whose one pooled connection all clients share.
    async fn prepared_read(client: &tokio_postgres::Client, sql: &str) -> String {
        client.batch_execute("BEGIN").await.unwrap();
        let statement = client.prepare(sql).await.unwrap();
        let value: String = client.query_one(&statement, &[]).await.unwrap().get(0);
        client.batch_execute("COMMIT").await.unwrap();
        value
    }
    let utc = proxy.app().await;
    utc.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    let new_york = proxy.app().await;
    new_york
        .batch_execute("SET TIME ZONE 'America/New_York'")
        .await
        .unwrap();
    assert_eq!(prepared_read(&utc, sql).await, "2023-01-01 00:00:00+00");
    assert_eq!(
        prepared_read(&new_york, sql).await,
        "2023-01-01 00:00:00-05"
    );
    assert_eq!(prepared_read(&utc, sql).await, "2023-01-01 00:00:00+00");

    // A zone set for one transaction only: what it prepares is read in that zone, and no
    // other client with the session's zone finds that statement on the connection.
    let local_sql = "SELECT ('2023-06-01 12:00'::timestamptz)::text";
    utc.batch_execute("BEGIN; SET LOCAL TIME ZONE 'Asia/Tokyo'")
        .await
        .unwrap();
    let statement = utc.prepare(local_sql).await.unwrap();
    let local: String = utc.query_one(&statement, &[]).await.unwrap().get(0);
    utc.batch_execute("COMMIT").await.unwrap();
    assert_eq!(local, "2023-06-01 12:00:00+09");
    let utc_too = proxy.app().await;
    utc_too.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    assert_eq!(
        prepared_read(&utc_too, local_sql).await,
        "2023-06-01 12:00:00+00"
    );
}

/// A Bind changes nothing on the server until its portal is executed: a RESET ALL (or a
/// DISCARD ALL) bound and never executed must not make pgsplit believe the connection lost
/// the session's settings, or it would hand it, still set, to the next client.
#[tokio::test]
async fn a_reset_bound_but_never_executed_changes_nothing() {
    let proxy = start_proxy_one_connection_per_node().await;
    let mut a = RawClient::login(proxy.addr, "trustuser").await;
    let set = a
        .send(&message(
            b'Q',
            &cstr("SET search_path = tenant_never_reset, public"),
        ))
        .await;
    assert_eq!(error_code(&set), None, "{set:?}");
    for sql in ["RESET ALL", "DISCARD ALL"] {
        let mut req = parse("r", sql);
        req.extend(bind("r"));
        req.extend(sync());
        let answer = a.send(&req).await;
        assert_eq!(
            answer.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![b'1', b'2', b'Z'],
            "{sql}: {answer:?}"
        );
        a.close_statement("r").await;
        // The next client of the login, on the same server connection, has its own
        // (default) search_path; the first still has the one it set.
        let b = connect(&proxy.conn_str("trustuser", "")).await;
        assert_eq!(
            primary_setting(&b, "search_path").await,
            "\"$user\", public",
            "after an unexecuted {sql}"
        );
        let shown = a
            .send(&message(
                b'Q',
                &cstr("BEGIN; SELECT current_setting('search_path'); COMMIT"),
            ))
            .await;
        let (_, row) = shown.iter().find(|m| m.0 == b'D').expect("a row");
        assert!(
            String::from_utf8_lossy(row).contains("tenant_never_reset"),
            "after an unexecuted {sql}: {shown:?}"
        );
    }
}

/// A DEALLOCATE ALL or DISCARD ALL sent through the extended protocol drops the
/// connection's statements when the server runs it: statements the same batch parses after
/// it are prepared anew there, and stay the session's (PostgreSQL runs such a batch fine).
#[tokio::test]
async fn statements_parsed_after_a_deallocate_all_in_one_batch_work() {
    let proxy = start_proxy_one_connection_per_node().await;
    let mut raw = RawClient::login(proxy.addr, "trustuser").await;
    for (drop_all, sql, value) in [
        ("DEALLOCATE ALL", "SELECT 3 FROM pg_sleep(0)", "3"),
        ("DISCARD ALL", "SELECT 4 FROM pg_sleep(0)", "4"),
    ] {
        // The connection already holds pgsplit's statement of that text.
        raw.parse("before", sql).await;
        assert_eq!(raw.execute_named("before").await, value);
        let mut req = run_in_batch("", drop_all);
        req.extend(run_in_batch("after", sql));
        req.extend(sync());
        let answer = raw.send(&req).await;
        assert_eq!(error_code(&answer), None, "{drop_all}: {answer:?}");
        assert!(answer.iter().any(|m| m.0 == b'D'), "{drop_all}: {answer:?}");
        // Still the session's statement afterwards.
        assert_eq!(raw.execute_named("after").await, value, "{drop_all}");
        raw.close_statement("after").await;
    }
}

/// A DateStyle given by one half (`'ISO'`, `'DMY'`) keeps the other half in force. The
/// session's value is the whole of what the server ended with, and a replay starts from
/// the default, not from what another session left on a pooled connection.
#[tokio::test]
async fn a_datestyle_of_one_half_keeps_the_other_half() {
    let proxy = start_proxy_one_connection_per_node().await;
    let a = proxy.app().await;
    a.batch_execute("SET datestyle = 'SQL, DMY'").await.unwrap();
    a.batch_execute("SET datestyle = 'ISO'").await.unwrap();
    assert_eq!(primary_setting(&a, "datestyle").await, "ISO, DMY");
    // Replayed on the replicas' connections too.
    assert_eq!(simple_value(&a, "SHOW datestyle").await, "ISO, DMY");
    // B logs in with half a DateStyle (as pgjdbc sends `DateStyle=ISO`), on the
    // connection A left 'ISO, DMY' on: it gets what a fresh connection would.
    let b = connect(&format!(
        "{} options='-c DateStyle=ISO'",
        proxy.conn_str("app", "app_pw")
    ))
    .await;
    assert_eq!(primary_setting(&b, "datestyle").await, "ISO, MDY");
    assert_eq!(primary_setting(&a, "datestyle").await, "ISO, DMY");
}

/// A DISCARD ALL the server refuses (in a transaction block: 25001) drops nothing: the
/// session's prepared statements go on working on that connection, which session mode
/// keeps (a later Parse of one there would be 42P05).
#[tokio::test]
async fn a_discard_all_the_server_refused_drops_no_statement() {
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let statement = client.prepare("SELECT 5 FROM pg_sleep(0)").await.unwrap();
        client.batch_execute("BEGIN").await.unwrap();
        let v: i32 = client.query_one(&statement, &[]).await.unwrap().get(0);
        assert_eq!(v, 5);
        let e = client
            .batch_execute("DISCARD ALL")
            .await
            .expect_err("DISCARD ALL cannot run in a transaction block");
        assert_eq!(sqlstate(&e), "25001", "{e}");
        client.batch_execute("ROLLBACK").await.unwrap();
        client.batch_execute("BEGIN").await.unwrap();
        let v: i32 = client
            .query_one(&statement, &[])
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{:?}: {e}",
                    proxy.shared.runtime.load().config.proxy.pool_mode
                )
            })
            .get(0);
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!(v, 5);
    }
}

/// A DateStyle set and reset in one request is the session's own again (its startup value),
/// not what the pooled connection's RESET gave.
#[tokio::test]
async fn a_datestyle_set_and_reset_in_one_request_is_the_startup_one() {
    let proxy = start_proxy_one_connection_per_node().await;
    let b = connect(&format!(
        "{} options='-c DateStyle=SQL,DMY'",
        proxy.conn_str("app", "app_pw")
    ))
    .await;
    assert_eq!(primary_setting(&b, "datestyle").await, "SQL, DMY");
    b.batch_execute("SET datestyle = 'ISO'; RESET datestyle")
        .await
        .unwrap();
    assert_eq!(primary_setting(&b, "datestyle").await, "SQL, DMY");
    assert_eq!(simple_value(&b, "SHOW datestyle").await, "SQL, DMY");
}

/// Two DEALLOCATE ALL in one batch, a statement parsed after the second: the connection
/// still knows it has that statement (a Parse of the same text later, by anyone, would
/// otherwise reach the server, which has it: 42P05).
#[tokio::test]
async fn two_deallocate_alls_in_one_batch_keep_what_was_parsed_after() {
    let proxy = start_proxy_one_connection_per_node().await;
    let mut raw = RawClient::login(proxy.addr, "trustuser").await;
    let sql = "SELECT 6 FROM pg_sleep(0)";
    let mut req = run_in_batch("", "DEALLOCATE ALL");
    req.extend(run_in_batch("", "DEALLOCATE ALL"));
    req.extend(run_in_batch("z", sql));
    req.extend(sync());
    let answer = raw.send(&req).await;
    assert_eq!(error_code(&answer), None, "{answer:?}");
    assert_eq!(prepared_on_the_primary(&mut raw, "z_again", sql).await, "6");
}

/// Parse `sql` as `name` and run it, in a transaction: on the primary's pooled connection
/// (one per node in these tests), where a batch of session operations ran before.
async fn prepared_on_the_primary(raw: &mut RawClient, name: &str, sql: &str) -> String {
    let begin = raw.send(&query("BEGIN")).await;
    assert_eq!(error_code(&begin), None, "{begin:?}");
    raw.parse(name, sql).await;
    let value = raw.execute_named(name).await;
    let commit = raw.send(&query("COMMIT")).await;
    assert_eq!(error_code(&commit), None, "{commit:?}");
    value
}

/// RESET ALL leaves the role alone, also one set by `set_config('role', …, false)` earlier
/// in the same text: the session keeps it, and the next client of the pooled connection
/// does not run as it.
#[tokio::test]
async fn a_role_set_by_set_config_survives_reset_all() {
    let role = role_granted_to_app("reset_all_role").await;
    let proxy = start_proxy_one_connection_per_node().await;
    let a = proxy.app().await;
    a.batch_execute(&format!(
        "SELECT set_config('role', '{role}', false); RESET ALL"
    ))
    .await
    .unwrap();
    let b = proxy.app().await;
    assert_eq!(primary_setting(&b, "role").await, "none");
    assert_eq!(primary_setting(&a, "role").await, role);
}

/// A batch that fails before a Query holding two DEALLOCATE ALLs: the server skips the
/// Query and never parses the statement sent before it, and the connection claims neither
/// (a later Parse of that text must reach the server, not be answered from a claim: 26000).
/// In a pinned session, whose connection a failed batch does not close.
#[tokio::test]
async fn a_skipped_query_with_two_deallocate_alls_gives_back_only_what_was_there() {
    let proxy = start_proxy_one_connection_per_node().await;
    let mut raw = RawClient::login(proxy.addr, "trustuser").await;
    let listen = raw.send(&query("LISTEN pgsplit_pinned_for_the_test")).await;
    assert_eq!(error_code(&listen), None, "{listen:?}");
    let sql = "SELECT 7 FROM pg_sleep(0)";
    let mut req = run_in_batch("", "SELECT 1/0");
    req.extend(parse("z", sql));
    req.extend(query("DEALLOCATE ALL; DEALLOCATE ALL"));
    req.extend(sync());
    let answer = raw.send(&req).await;
    assert_eq!(error_code(&answer).as_deref(), Some("22012"), "{answer:?}");
    assert_eq!(prepared_on_the_primary(&mut raw, "z_again", sql).await, "7");
}
