//! Message sequences drivers send that a proxy gets wrong easily, replayed byte for byte in
//! one packet each (so timing cannot hide a bug).

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn messages_behind_a_flush_in_the_same_packet_are_answered() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        let mut req = parse("", "SELECT 1");
        req.extend(describe_statement(""));
        req.extend(message(b'H', &[]));
        req.extend(bind(""));
        req.extend(execute());
        req.extend(message(b'H', &[]));
        req.extend(message(b'S', &[]));
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "1tT2DCZ", "{msgs:?}");
        // And the session goes on.
        assert_eq!(tags(&c.send(&query("SELECT 2")).await), "TDCZ");
    }
}

/// A Sync or Flush with bytes in its body is refused (08P01) as PostgreSQL refuses it, and
/// fails the transaction block: its COMMIT rolls back. pgsplit took both as they should
/// be, and the block committed.
#[tokio::test]
async fn a_sync_or_flush_with_a_body_fails_the_transaction_as_on_a_direct_connection() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    let command = |msgs: &[(u8, Vec<u8>)]| {
        msgs.iter().find(|m| m.0 == b'C').map(|m| {
            String::from_utf8_lossy(&m.1)
                .trim_end_matches('\0')
                .to_owned()
        })
    };
    for addr in addrs {
        let mut c = RawClient::login(addr, "trustuser").await;
        for (what, bad) in [
            ("Sync", message(b'S', b"junk")),
            ("Flush", [message(b'H', b"junk"), sync()].concat()),
        ] {
            assert_eq!(tags(&c.send(&query("BEGIN")).await), "CZ");
            let msgs = c.send(&bad).await;
            assert_eq!(tags(&msgs), "EZ", "{addr} {what}: {msgs:?}");
            assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{addr} {what}");
            let msgs = c.send(&query("COMMIT")).await;
            assert_eq!(
                command(&msgs).as_deref(),
                Some("ROLLBACK"),
                "{addr} {what}: {msgs:?}"
            );
        }
        // Outside a block too, and the session goes on.
        let mut req = run_in_batch("", "SELECT 1");
        req.extend(message(b'S', b"junk"));
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "12DCEZ", "{addr}: {msgs:?}");
        assert_eq!(tags(&c.send(&query("SELECT 2")).await), "TDCZ");
    }
}

#[tokio::test]
async fn copy_data_sent_with_its_query_is_not_left_waiting() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        let t = unique("copyq");
        assert_eq!(
            tags(&c.send(&query(&format!("CREATE TABLE {t} (v int)"))).await),
            "CZ"
        );
        let mut req = query(&format!("COPY {t} FROM STDIN"));
        req.extend(message(b'd', b"1\n2\n"));
        req.extend(message(b'c', &[]));
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "GCZ", "{msgs:?}");
    }
}

/// COPY data sent right behind the Execute that starts an extended-protocol COPY, before
/// the server's CopyInResponse (no Sync or Flush between): every row arrives, as on a
/// direct connection. pgsplit took such data for leftovers of a failed COPY and dropped
/// it: `COPY 1000` for 2000 rows sent, or no answer at all when the Sync came along.
#[tokio::test]
async fn copy_data_right_behind_an_extended_copy_is_all_copied() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    let rows = |from: usize| -> Vec<u8> {
        (from..from + 1000)
            .flat_map(|i| message(b'd', format!("{i}\n").as_bytes()))
            .collect()
    };
    for addr in addrs {
        let mut s = RawClient::login(addr, "trustuser").await;
        let t = unique("xcopy_early");
        assert_eq!(
            tags(&s.send(&query(&format!("CREATE TABLE {t} (v int)"))).await),
            "CZ"
        );
        // Half the rows with the Execute, the rest once the COPY has begun.
        let mut req = run_in_batch("", &format!("COPY {t} FROM STDIN"));
        req.extend(rows(0));
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(3).await), "12G", "{addr}");
        let mut req = rows(1000);
        req.extend(message(b'c', &[]));
        req.extend(sync());
        s.stream_write(&req).await;
        let msgs = s.read_n(2).await;
        assert_eq!(tags(&msgs), "CZ", "{addr}: {msgs:?}");
        assert_eq!(msgs[0].1, b"COPY 2000\0", "{addr}");
        // All of it in one write, the Sync too.
        let mut req = run_in_batch("", &format!("COPY {t} FROM STDIN"));
        req.extend(message(b'd', b"7\n"));
        req.extend(message(b'c', &[]));
        req.extend(sync());
        let msgs = s.send(&req).await;
        assert_eq!(tags(&msgs), "12GCZ", "{addr}: {msgs:?}");
        assert_eq!(msgs[3].1, b"COPY 1\0", "{addr}");
        // The whole COPY ahead of its CopyInResponse, the Sync later with the next query:
        // that query is the next request's, and gets its answer (pgsplit took the COPY as
        // still running, took the query into it, and dropped the query's answer).
        let mut req = run_in_batch("", &format!("COPY {t} FROM STDIN"));
        req.extend(message(b'd', b"8\n"));
        req.extend(message(b'c', &[]));
        req.extend(message(b'H', &[]));
        s.stream_write(&req).await;
        let msgs = s.read_n(4).await;
        assert_eq!(tags(&msgs), "12GC", "{addr}: {msgs:?}");
        let mut req = sync();
        req.extend(query(&format!("SELECT count(*) FROM {t}")));
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(1).await), "Z", "{addr}");
        let msgs = s.read_n(4).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");
        assert!(msgs[1].1.ends_with(b"2002"), "{addr}: {msgs:?}");
    }
}

/// COPY messages behind a COPY's end, in orders a review found: a simple-protocol COPY with
/// its data right after an extended COPY whose Sync the server ignored (both Syncs are
/// answered), and a stray CopyDone behind a plain Execute ahead of an extended COPY (the
/// server ignores it; the COPY still gets its data). Each answers as on a direct
/// connection, and the next request gets its own answer. pgsplit hung on the first and
/// held the server in COPY on the second.
#[tokio::test]
async fn copy_messages_around_copies_answer_as_on_a_direct_connection() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    let data = || {
        let mut m = message(b'd', b"1\n");
        m.extend(message(b'd', b"2\n"));
        m.extend(message(b'c', &[]));
        m
    };
    for addr in addrs {
        let mut s = RawClient::login(addr, "trustuser").await;
        let (a, b) = (unique("xcopy_a"), unique("xcopy_b"));
        let create = format!("CREATE TABLE {a} (v int); CREATE TABLE {b} (v int)");
        assert_eq!(tags(&s.send(&query(&create)).await), "CCZ");
        let mut req = run_in_batch("", &format!("COPY {a} FROM STDIN"));
        req.extend(sync());
        req.extend(data());
        req.extend(query(&format!("COPY {b} FROM STDIN")));
        req.extend(data());
        req.extend(sync());
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(8).await), "12GCGCZZ", "{addr}");
        assert_eq!(tags(&s.send(&query("SELECT 1")).await), "TDCZ", "{addr}");
        let mut req = run_in_batch("", "SELECT 1");
        req.extend(message(b'c', &[]));
        req.extend(run_in_batch("", &format!("COPY {a} FROM STDIN")));
        req.extend(message(b'H', &[]));
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(7).await), "12DC12G", "{addr}");
        let mut req = sync();
        req.extend(data());
        req.extend(sync());
        s.stream_write(&req).await;
        // The first Sync reached the server in COPY, which ignores it there.
        assert_eq!(tags(&s.read_n(2).await), "CZ", "{addr}");
        let count = query(&format!("SELECT count(*) FROM {a}"));
        let msgs = s.send(&count).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}");
        assert!(msgs[1].1.ends_with(b"4"), "{addr}: {msgs:?}");
    }
}

#[tokio::test]
async fn asyncpg_prepares_with_flush_then_copies_without_waiting() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        let t = unique("apg");
        c.send(&query(&format!("CREATE TABLE {t} (v int)"))).await;
        // Prepare with Parse, Describe, Flush: answered without a ReadyForQuery.
        let mut req = parse("__asyncpg_stmt_1__", &format!("SELECT v FROM {t}"));
        req.extend(describe_statement("__asyncpg_stmt_1__"));
        req.extend(message(b'H', &[]));
        c.stream_write(&req).await;
        let msgs = c.read_n(3).await;
        assert_eq!(tags(&msgs), "1tT", "{msgs:?}");
        // Then a COPY whose data follows at once.
        let mut req = query(&format!("COPY {t} FROM STDIN"));
        req.extend(message(b'd', b"7\n"));
        req.extend(message(b'c', &[]));
        assert_eq!(tags(&c.send(&req).await), "GCZ");
        // The prepared statement works afterwards.
        let mut req = bind("__asyncpg_stmt_1__");
        req.extend(execute());
        req.extend(message(b'S', &[]));
        assert_eq!(tags(&c.send(&req).await), "2DCZ");
    }
}

#[tokio::test]
async fn an_answer_the_proxy_gives_itself_never_splits_a_row_description() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        // s2 is prepared on the server connection first...
        c.parse("s2", "SELECT 2 AS b, 'y'::text AS c").await;
        c.close_statement("s2").await;
        // ...so in this batch the proxy answers Parse s2 itself, right after a streamed
        // RowDescription.
        let mut req = parse("s1", "SELECT 1 AS a");
        req.extend(describe_statement("s1"));
        req.extend(parse("s2", "SELECT 2 AS b, 'y'::text AS c"));
        req.extend(describe_statement("s2"));
        req.extend(message(b'S', &[]));
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "1tT1tTZ", "{msgs:?}");
        assert_eq!(c.execute_named("s2").await, "2");
    }
}

#[tokio::test]
async fn a_lone_flush_changes_nothing() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        c.stream_write(&message(b'H', &[])).await;
        assert_eq!(tags(&c.send(&query("SELECT 1")).await), "TDCZ");
    }
}

/// The status byte of the last ReadyForQuery.
fn status(msgs: &[(u8, Vec<u8>)]) -> u8 {
    msgs.iter()
        .rev()
        .find(|m| m.0 == b'Z')
        .map_or(0, |m| m.1[0])
}

/// The command tag of the first CommandComplete.
fn command_tag(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter()
        .find(|m| m.0 == b'C')
        .map(|m| String::from_utf8_lossy(&m.1[..m.1.len() - 1]).into_owned())
        .unwrap_or_default()
}

/// A request that commits a write gets the proxy's commit-position query queued behind it
/// on the same connection. Whatever the commit does (succeeds, fails, rolls back), the
/// client sees exactly its own answers, in order, and the connection stays in step.
#[tokio::test]
async fn commits_answered_with_their_position_keep_the_protocol_in_step() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        let t = unique("cpos");
        let setup = format!(
            "CREATE TABLE {t}_p (id int PRIMARY KEY); \
             CREATE TABLE {t} (id int, p int REFERENCES {t}_p DEFERRABLE INITIALLY DEFERRED)"
        );
        assert_eq!(tags(&c.send(&query(&setup)).await), "CCZ");

        // Autocommit, extended: the unnamed statement is used again without a new Parse,
        // although the proxy's own simple query ran on that connection in between.
        let req = parse_bind_execute(&format!("INSERT INTO {t} VALUES (1)"));
        assert_eq!(tags(&c.send(&req).await), "12CZ");
        let msgs = c.send(&bind_execute("")).await;
        assert_eq!(tags(&msgs), "2CZ", "{msgs:?}");
        assert_eq!(status(&msgs), b'I');

        // An explicit transaction, simple protocol, committed.
        assert_eq!(status(&c.send(&query("BEGIN")).await), b'T');
        let msgs = c.send(&query(&format!("INSERT INTO {t} VALUES (2)"))).await;
        assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'T'));
        let msgs = c.send(&query("COMMIT")).await;
        assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'I'));
        assert_eq!(command_tag(&msgs), "COMMIT");

        // A COMMIT that fails (deferred foreign key): the error, then idle.
        c.send(&query("BEGIN")).await;
        c.send(&query(&format!("INSERT INTO {t} VALUES (3, 42)")))
            .await;
        let msgs = c.send(&query("COMMIT")).await;
        assert_eq!(error_code(&msgs).as_deref(), Some("23503"), "{msgs:?}");
        assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("EZ", b'I'));

        // A COMMIT of a failed transaction rolls back, extended protocol.
        c.send(&query("BEGIN")).await;
        c.send(&query(&format!("INSERT INTO {t} VALUES (4)"))).await;
        let msgs = c.send(&query("SELECT 1/0")).await;
        assert_eq!(
            (error_code(&msgs).as_deref(), status(&msgs)),
            (Some("22012"), b'E')
        );
        let msgs = c.send(&parse_bind_execute("COMMIT")).await;
        assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("12CZ", b'I'));
        assert_eq!(command_tag(&msgs), "ROLLBACK");

        // A write and a read sent together: both answered, in order, the read sees the write.
        let mut req = query(&format!("INSERT INTO {t} VALUES (5)"));
        req.extend(query(&format!("SELECT count(*) FROM {t}")));
        c.stream_write(&req).await;
        let msgs = c.read_n(6).await;
        assert_eq!(tags(&msgs), "CZTDCZ", "{msgs:?}");
        assert_eq!(&msgs[3].1[6..], b"4", "rows 1, 1, 2 and 5");
        assert_eq!(primary_count(&t).await, 4);
    }
}

/// A plain BEGIN is answered by the proxy and sent with the next request (Parse, Bind and
/// Execute ahead of it, no Sync): the client sees what PostgreSQL answers, in both protocols,
/// and what follows runs in one transaction.
#[tokio::test]
async fn a_begin_answered_by_the_proxy_opens_one_real_transaction() {
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        let t = unique("dbeg");
        c.send(&query(&format!("CREATE TABLE {t} (v int)"))).await;

        let msgs = c.send(&query("BEGIN")).await;
        assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("CZ", b'T'));
        assert_eq!(command_tag(&msgs), "BEGIN");
        let msgs = c.send(&query(&format!("INSERT INTO {t} VALUES (1)"))).await;
        assert_eq!(
            (tags(&msgs).as_str(), status(&msgs)),
            ("CZ", b'T'),
            "{msgs:?}"
        );
        // One transaction: the same transaction id twice.
        let xid = |msgs: &[(u8, Vec<u8>)]| msgs.iter().find(|m| m.0 == b'D').map(|m| m.1.clone());
        let first = xid(&c.send(&query("SELECT txid_current()")).await);
        let second = xid(&c.send(&query("SELECT txid_current()")).await);
        assert!(first.is_some() && first == second);
        let msgs = c.send(&query("ROLLBACK")).await;
        assert_eq!(
            (command_tag(&msgs).as_str(), status(&msgs)),
            ("ROLLBACK", b'I')
        );
        assert_eq!(primary_count(&t).await, 0);

        // An error inside, then ROLLBACK; an empty transaction.
        c.send(&query("BEGIN")).await;
        let msgs = c.send(&query("SELECT 1/0")).await;
        assert_eq!(
            (error_code(&msgs).as_deref(), status(&msgs)),
            (Some("22012"), b'E')
        );
        assert_eq!(status(&c.send(&query("ROLLBACK")).await), b'I');
        c.send(&query("BEGIN")).await;
        let msgs = c.send(&query("COMMIT")).await;
        assert_eq!(
            (command_tag(&msgs).as_str(), status(&msgs)),
            ("COMMIT", b'I')
        );

        // A prepared BEGIN bound and executed with a Describe (pgbench -M prepared), then an
        // unnamed INSERT, then COMMIT.
        c.parse("begin_stmt", "BEGIN;").await;
        let mut req = bind("begin_stmt");
        req.extend(message(b'D', b"P\0"));
        req.extend(execute());
        req.extend(sync());
        let msgs = c.send(&req).await;
        assert_eq!((tags(&msgs).as_str(), status(&msgs)), ("2nCZ", b'T'));
        let req = parse_bind_execute(&format!("INSERT INTO {t} VALUES (2)"));
        let msgs = c.send(&req).await;
        assert_eq!(
            (tags(&msgs).as_str(), status(&msgs)),
            ("12CZ", b'T'),
            "{msgs:?}"
        );
        // The unnamed statement again, without Parse.
        assert_eq!(tags(&c.send(&bind_execute("")).await), "2CZ");
        let msgs = c.send(&query("COMMIT")).await;
        assert_eq!(
            (command_tag(&msgs).as_str(), status(&msgs)),
            ("COMMIT", b'I')
        );
        assert_eq!(primary_count(&t).await, 2);
    }
}

/// A simple Query drops the unnamed statement (PostgreSQL's `exec_simple_query` does, before
/// it even parses): a Bind of "" after one fails with 26000 through pgsplit as it does
/// directly, whether the Query came after a Sync, was answered by pgsplit itself (a plain
/// BEGIN) or ended a batch that a Flush had sent; one the server skips after an error
/// leaves the statement in place.
#[tokio::test]
async fn a_simple_query_drops_the_unnamed_statement() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let mut s = RawClient::login(addr, "trustuser").await;
        let unnamed_is_gone = |msgs: &[(u8, Vec<u8>)]| {
            assert_eq!(
                error_code(msgs).as_deref(),
                Some("26000"),
                "{addr}: {msgs:?}"
            );
            assert!(!tags(msgs).contains('D'), "{addr}: {msgs:?}");
        };

        assert_eq!(
            tags(&s.send(&parse_bind_execute("SELECT 1")).await),
            "12DCZ"
        );
        assert_eq!(tags(&s.send(&query("SELECT 2")).await), "TDCZ");
        unnamed_is_gone(&s.send(&bind_execute("")).await);

        assert_eq!(
            tags(&s.send(&parse_bind_execute("SELECT 3")).await),
            "12DCZ"
        );
        assert_eq!(tags(&s.send(&query("BEGIN")).await), "CZ");
        unnamed_is_gone(&s.send(&bind_execute("")).await);
        assert_eq!(tags(&s.send(&query("ROLLBACK")).await), "CZ");

        let mut req = parse("", "SELECT 4");
        req.extend(bind(""));
        req.extend(execute());
        req.extend(message(b'H', &[]));
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(4).await), "12DC", "{addr}");
        assert_eq!(tags(&s.send(&query("SELECT 5")).await), "TDCZ", "{addr}");
        unnamed_is_gone(&s.send(&bind_execute("")).await);

        // A Query the server skips, behind an error and before the Sync, drops nothing.
        let mut req = parse("", "SELECT 6");
        req.extend(bind(""));
        req.extend(execute());
        req.extend(bind("no_such_statement"));
        req.extend(message(b'H', &[]));
        s.stream_write(&req).await;
        let msgs = s.read_n(5).await;
        assert_eq!(tags(&msgs), "12DCE", "{addr}");
        assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "{addr}");
        let mut req = query("SELECT 7");
        req.extend(sync());
        assert_eq!(tags(&s.send(&req).await), "Z", "{addr}");
        let msgs = s.send(&bind_execute("")).await;
        assert_eq!(tags(&msgs), "2DCZ", "{addr}: {msgs:?}");
        assert!(
            msgs.iter().any(|m| m.0 == b'D' && m.1.ends_with(b"6")),
            "{addr}: {msgs:?}"
        );
    }
}

/// The unnamed statement belongs to the session that parsed it. Two sessions share the one
/// pooled connection of a primary-only proxy; the first leaves its unnamed statement in the
/// server's slot, and the second's Bind or Describe of "" without a Parse gets 26000, as on
/// a direct connection, never the first session's statement or its result.
#[tokio::test]
async fn another_sessions_unnamed_statement_is_never_run() {
    let c = cluster();
    let primary_only = without_replica(
        &without_replica(&base_config_toml(c), c.replicas[0]),
        c.replicas[1],
    );
    let proxy = start_proxy_with(&format!("{primary_only}\n[pool]\nsize = 1\n")).await;
    let mut a = RawClient::login(proxy.addr, "trustuser").await;
    let mut b = RawClient::login(proxy.addr, "trustuser").await;
    let secret = "SELECT 'a_secret'::text";
    let msgs = a.send(&parse_bind_execute(secret)).await;
    assert_eq!(tags(&msgs), "12DCZ", "{msgs:?}");

    let msgs = b.send(&bind_execute("")).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "{msgs:?}");
    assert!(!tags(&msgs).contains('D'), "{msgs:?}");
    let mut describe = describe_statement("");
    describe.extend(sync());
    let msgs = b.send(&describe).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "{msgs:?}");
    assert!(!tags(&msgs).contains('T'), "{msgs:?}");

    // The first session still has its statement: the proxy prepares it again.
    let msgs = a.send(&bind_execute("")).await;
    assert_eq!(tags(&msgs), "2DCZ", "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.0 == b'D' && m.1.windows(8).any(|w| w == b"a_secret")),
        "{msgs:?}"
    );
}

/// Behind an error in a batch a Flush sent, the server skips a simple Query like everything
/// else up to the Sync, and answers nothing for it. pgsplit took the Query as the end of the
/// request: the connection, still waiting for a Sync, went back to the pool and the session's
/// next request got a stale ReadyForQuery, then no answer at all.
///
/// Primary only, one pooled connection: every request meets what the last one left.
#[tokio::test]
async fn a_query_behind_an_error_waits_for_the_sync() {
    let c = cluster();
    let direct = std::net::SocketAddr::from(([127, 0, 0, 1], c.primary));
    let primary_only = without_replica(
        &without_replica(&base_config_toml(c), c.replicas[0]),
        c.replicas[1],
    );
    let primary_only = format!("{primary_only}\n[pool]\nsize = 1\n");
    let proxies = [
        start_proxy_with(&primary_only).await,
        start_proxy_with(&session_mode(&primary_only)).await,
    ];
    for addr in std::iter::once(direct).chain(proxies.iter().map(|p| p.addr)) {
        let mut s = RawClient::login(addr, "trustuser").await;
        let mut req = bind("no_such_statement");
        req.extend(message(b'H', &[]));
        s.stream_write(&req).await;
        let msgs = s.read_n(1).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("26000"),
            "{addr}: {msgs:?}"
        );
        let mut req = query("SELECT 1");
        req.extend(sync());
        assert_eq!(tags(&s.send(&req).await), "Z", "{addr}");
        let msgs = s.send(&query("SELECT 2")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");
        let msgs = s.send(&parse_bind_execute("SELECT 3")).await;
        assert_eq!(tags(&msgs), "12DCZ", "{addr}: {msgs:?}");
    }
}

/// A simple Query sent before the Sync of an extended-protocol batch runs as PostgreSQL runs
/// it: it ends the batch's implicit transaction with its own ReadyForQuery (a later Sync
/// gets one more), it drops the unnamed statement, and a write in it goes to the primary.
/// Behind an error in the batch the server skips it and waits for the Sync; pgsplit refused
/// such a Query with 08P01, and one sent right behind a Flush could wait forever for an
/// answer the server never gives.
#[tokio::test]
async fn a_query_inside_an_extended_batch_runs_as_postgresql_runs_it() {
    let c = cluster();
    let t = unique("query_in_batch");
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (who text); GRANT INSERT ON {t} TO trustuser"
        ))
        .await
        .unwrap();
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], c.primary));
    let proxies = both_modes().await;
    for (addr, who) in std::iter::once((direct_addr, "direct".to_owned())).chain(
        proxies
            .iter()
            .enumerate()
            .map(|(i, p)| (p.addr, format!("proxy{i}"))),
    ) {
        let mut s = RawClient::login(addr, "trustuser").await;

        let mut req = parse_bind_execute("SELECT 1");
        req.truncate(req.len() - sync().len());
        req.extend(query(&format!("INSERT INTO {t} VALUES ('{who}')")));
        req.extend(sync());
        s.stream_write(&req).await;
        let msgs = s.read_n(7).await;
        assert_eq!(tags(&msgs), "12DCCZZ", "{addr}: {msgs:?}");
        let msgs = s.send(&bind_execute("")).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("26000"),
            "{addr}: {msgs:?}"
        );

        // Behind an error (the Bind's: planning folds 1 / 0) the Query is skipped, the error
        // comes at once, the Sync answers.
        let mut req = parse("", "SELECT 1 / 0");
        req.extend(bind(""));
        req.extend(execute());
        req.extend(query("SELECT 2"));
        s.stream_write(&req).await;
        let msgs = s.read_n(2).await;
        assert_eq!(tags(&msgs), "1E", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("22012"), "{addr}");
        assert_eq!(tags(&s.send(&sync()).await), "Z", "{addr}");

        // The same Query right behind a Flush, before the error is back.
        let mut req = parse("", "SELECT 1 / 0");
        req.extend(bind(""));
        req.extend(execute());
        req.extend(message(b'H', &[]));
        req.extend(query("SELECT 3"));
        req.extend(sync());
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(3).await), "1EZ", "{addr}");

        // The session goes on.
        let msgs = s.send(&query("SELECT 4")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");
    }
    let rows = direct(c.primary)
        .await
        .query(&format!("SELECT who FROM {t} ORDER BY who"), &[])
        .await
        .unwrap();
    let who: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(who, ["direct", "proxy0", "proxy1"]);
}

/// After a COPY started by an Execute, the server ignored the Sync sent with it and waits
/// for another; what the client sends between CopyDone and that Sync runs as usual. A
/// simple Query there has its own ReadyForQuery, then the Sync gets one; pgsplit took the
/// Query's for the Sync's and left the Sync's answer to the next request.
/// A client logged in at `addr`, a new table, and a COPY into it started through the
/// extended protocol (ParseComplete, BindComplete and CopyInResponse read), without Sync.
async fn in_extended_copy(addr: std::net::SocketAddr, prefix: &str) -> (RawClient, String) {
    let mut s = RawClient::login(addr, "trustuser").await;
    let t = unique(prefix);
    assert_eq!(
        tags(&s.send(&query(&format!("CREATE TABLE {t} (v int)"))).await),
        "CZ"
    );
    s.stream_write(&parse_bind_execute(&format!("COPY {t} FROM STDIN")))
        .await;
    assert_eq!(tags(&s.read_n(3).await), "12G", "{addr}");
    (s, t)
}

#[tokio::test]
async fn a_query_between_an_extended_copy_and_its_sync_answers_in_order() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let (mut s, t) = in_extended_copy(addr, "xcopy").await;
        let mut req = message(b'd', b"1\n2\n");
        req.extend(message(b'c', &[]));
        req.extend(query(&format!("SELECT count(*) FROM {t}")));
        req.extend(sync());
        s.stream_write(&req).await;
        let msgs = s.read_n(6).await;
        assert_eq!(tags(&msgs), "CTDCZZ", "{addr}: {msgs:?}");
        assert!(msgs[2].1.ends_with(b"2"), "{addr}: {msgs:?}");
        let msgs = s.send(&query("SELECT 3")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");
    }
}

/// The same window when something fails in it. A COPY that fails makes the server skip
/// everything up to the client's Sync, a Query behind it included; a Query that fails ends
/// with its own ReadyForQuery and what follows it runs (here a Close pgsplit answers itself).
#[tokio::test]
async fn failures_between_an_extended_copy_and_its_sync_answer_in_order() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let (mut s, t) = in_extended_copy(addr, "xcopyf").await;
        let copy = parse_bind_execute(&format!("COPY {t} FROM STDIN"));
        let mut req = message(b'd', b"not a number\n");
        req.extend(message(b'c', &[]));
        req.extend(query("SELECT 1"));
        req.extend(sync());
        s.stream_write(&req).await;
        let msgs = s.read_n(2).await;
        assert_eq!(tags(&msgs), "EZ", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("22P02"), "{addr}");
        // The skipped Query dropped nothing: the unnamed statement is still the COPY.
        s.stream_write(&bind_execute("")).await;
        assert_eq!(tags(&s.read_n(2).await), "2G", "{addr}");
        let mut req = message(b'f', &cstr("changed my mind"));
        req.extend(sync());
        let msgs = s.send(&req).await;
        assert_eq!(tags(&msgs), "EZ", "{addr}: {msgs:?}");
        let msgs = s.send(&query("SELECT 2")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");

        s.parse("s1", "SELECT 1").await;
        s.stream_write(&copy).await;
        assert_eq!(tags(&s.read_n(3).await), "12G", "{addr}");
        let mut req = message(b'd', b"1\n");
        req.extend(message(b'c', &[]));
        req.extend(query("SELECT 1 / 0"));
        req.extend(close_statement("s1"));
        req.extend(sync());
        s.stream_write(&req).await;
        let msgs = s.read_n(5).await;
        assert_eq!(tags(&msgs), "CEZ3Z", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("22012"), "{addr}");
        let msgs = s.send(&bind_execute("s1")).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("26000"),
            "{addr}: {msgs:?}"
        );
        let msgs = s.send(&query("SELECT 3")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");

        // Each Query commits on its own: a setting made by one holds whatever the other did.
        // (Reads after the COPY go to the replicas at once.)
        let msgs = s.send(&query("SET pgsplit.consistency = 'eventual'")).await;
        assert_eq!(tags(&msgs), "CZ", "{addr}: {msgs:?}");
        s.stream_write(&copy).await;
        assert_eq!(tags(&s.read_n(3).await), "12G", "{addr}");
        let mut req = message(b'd', b"1\n");
        req.extend(message(b'c', &[]));
        req.extend(query("SELECT 1 / 0"));
        req.extend(query("SET statement_timeout = '7s'"));
        req.extend(sync());
        s.stream_write(&req).await;
        let msgs = s.read_n(6).await;
        assert_eq!(tags(&msgs), "CEZCZZ", "{addr}: {msgs:?}");
        for _ in 0..3 {
            let msgs = s
                .send(&query("SELECT current_setting('statement_timeout')"))
                .await;
            assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");
            assert!(msgs[1].1.ends_with(b"7s"), "{addr}: {msgs:?}");
        }
    }
}

/// A replica refuses a write that looked like a read (25006) in a batch that ends with a
/// simple Query and no Sync: the server skipped the Query too, and the whole batch runs
/// again on the primary, as without the Query; the client's Sync gets its ReadyForQuery.
#[tokio::test]
async fn a_refused_write_with_a_query_behind_it_runs_again_on_the_primary() {
    let c = cluster();
    let proxy = start_proxy().await;
    let t = unique("retryq");
    proxy
        .app()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (port int);
             GRANT SELECT, INSERT ON {t} TO trustuser;
             CREATE FUNCTION {t}_bump() RETURNS int LANGUAGE sql AS
               'INSERT INTO {t} VALUES (inet_server_port()) RETURNING port';"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let mut s = RawClient::login(proxy.addr, "trustuser").await;
    let mut req = parse("", &format!("SELECT {t}_bump()"));
    req.extend(bind(""));
    req.extend(execute());
    req.extend(query("SELECT inet_server_port()"));
    s.stream_write(&req).await;
    let msgs = s.read_n(8).await;
    assert_eq!(tags(&msgs), "12DCTDCZ", "{msgs:?}");
    let primary = c.primary.to_string();
    for row in [&msgs[2], &msgs[5]] {
        assert!(row.1.ends_with(primary.as_bytes()), "{msgs:?}");
    }
    assert_eq!(tags(&s.send(&sync()).await), "Z");
    let n: i64 = rows_on(c.primary, &t).await;
    assert_eq!(n, 1, "the write ran once");
}

/// A client that leaves in the window after an extended COPY (CopyDone sent, its Sync not
/// yet) ends its own session only: pgsplit closes the server connection itself instead of
/// forwarding the Terminate, which would look like the server failing and take the primary
/// out of rotation. The COPY, never synced, commits nothing, as on a direct connection.
#[tokio::test]
async fn a_terminate_after_an_extended_copy_ends_the_client_not_the_server() {
    let (proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let (mut s, t) = in_extended_copy(addr, "xcopyx").await;
        let mut req = message(b'd', b"1\n");
        req.extend(message(b'c', &[]));
        // The server holds its answers until a Sync or Flush.
        req.extend(message(b'H', &[]));
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(1).await), "C", "{addr}");
        s.stream_write(&message(b'X', &[])).await;
        // The socket stays open a while, as a client's may after its Terminate: whatever
        // pgsplit does, it does not wait for the client to close.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            for p in &proxies {
                assert!(
                    p.shared.runtime.load().backends.primary.is_available(),
                    "{addr}: the primary stays in rotation"
                );
            }
        }
        drop(s);
        assert_eq!(
            rows_on(cluster().primary, &t).await,
            0,
            "{addr}: nothing committed"
        );
    }
}

/// A fast-path FunctionCall names its function by OID, which the classifier cannot judge:
/// batched behind a read, the whole request goes to the primary (the call ends the batch
/// with a ReadyForQuery of its own, so what comes before it is an open batch).
#[tokio::test]
async fn a_fast_path_call_batched_with_a_read_runs_on_the_primary() {
    // pg_is_in_recovery() has the fixed OID 3810 in every PostgreSQL catalog.
    let mut call = 3810i32.to_be_bytes().to_vec();
    call.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // no formats, no arguments, text result
    for proxy in both_modes().await {
        let mut c = RawClient::login(proxy.addr, "trustuser").await;
        for _ in 0..4 {
            let mut req = parse("", "SELECT pg_is_in_recovery()");
            req.extend(bind(""));
            req.extend(execute());
            req.extend(message(b'F', &call));
            req.extend(message(b'S', &[]));
            let msgs = c.send(&req).await;
            assert_eq!(tags(&msgs), "12DCVZ", "{msgs:?}");
            let answer = msgs.iter().find(|m| m.0 == b'V').unwrap();
            assert_eq!(
                answer.1.last(),
                Some(&b'f'),
                "answered by a replica: {msgs:?}"
            );
            // The Sync's own ReadyForQuery.
            assert_eq!(tags(&c.read_n(1).await), "Z");
        }
    }
}

/// A long pipeline without a Sync, from a client that reads the answers while it writes
/// (as libpq's pipeline mode and a JDBC batch do): the server's answers must keep flowing
/// while the rest of the pipeline is still on its way to the server. A proxy that writes to
/// the server without reading it fills both sockets and waits for ever, as does the server.
#[tokio::test]
async fn a_long_pipeline_without_a_sync_keeps_flowing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EXECUTES: usize = 200_000;
    // Both pool modes over TLS to the servers (the tests' default, `prefer`), and over
    // plain TCP.
    let (_proxies, mut addrs) = direct_and_both_modes().await;
    let plain = start_proxy_with(&with_proxy_settings(
        &base_config_toml(cluster()),
        "server_tls = \"disable\"",
    ))
    .await;
    addrs.push(plain.addr);
    for addr in addrs {
        let c = RawClient::login(addr, "trustuser").await;
        let (mut rd, mut wr) = c.stream.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(&parse("wide", "SELECT repeat('x', 400)"))
                .await
                .unwrap();
            let mut one = bind("wide");
            one.extend(execute());
            let chunk = one.repeat(1000);
            for _ in 0..EXECUTES / 1000 {
                wr.write_all(&chunk).await.unwrap();
            }
            wr.write_all(&sync()).await.unwrap();
            wr
        });
        // Count DataRows up to the ReadyForQuery, reading as the answers come.
        let reader = async {
            let (mut rows, mut buf) = (0usize, Vec::new());
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = rd.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed after {rows} rows");
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while buf.len() - at >= 5 {
                    let len = u32::from_be_bytes(buf[at + 1..at + 5].try_into().unwrap()) as usize;
                    if buf.len() - at < 1 + len {
                        break;
                    }
                    match buf[at] {
                        b'D' => rows += 1,
                        b'E' => panic!("{}", String::from_utf8_lossy(&buf[at..at + 1 + len])),
                        b'Z' => return rows,
                        _ => {}
                    }
                    at += 1 + len;
                }
                buf.drain(..at);
            }
        };
        let rows = tokio::time::timeout(Duration::from_secs(120), reader)
            .await
            .unwrap_or_else(|_| panic!("{addr}: the pipeline stalled"));
        assert_eq!(rows, EXECUTES, "{addr}");
        writer.await.unwrap();
    }
}

/// psycopg 3 with a libpq older than 17 deallocates its oldest prepared statement with a
/// simple `DEALLOCATE name` inside the open transaction. The statement is known to the
/// server under another name: the transaction must go on as on a direct connection.
#[tokio::test]
async fn deallocate_of_a_protocol_statement_inside_a_transaction() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let mut c = RawClient::login(addr, "trustuser").await;
        c.parse("_pg3_0", "SELECT 1").await;
        assert_eq!(c.execute_named("_pg3_0").await, "1");
        let msgs = c.send(&query("BEGIN")).await;
        assert_eq!(tags(&msgs), "CZ", "{addr}: {msgs:?}");
        let msgs = c.send(&query("DEALLOCATE _pg3_0")).await;
        assert_eq!(tags(&msgs), "CZ", "{addr}: {msgs:?}");
        assert_eq!(msgs[1].1, b"T", "{addr}: still in the transaction");
        let msgs = c.send(&query("SELECT 2")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{addr}: {msgs:?}");
        assert_eq!(tags(&c.send(&query("COMMIT")).await), "CZ");
        // Gone, as on a direct connection.
        let msgs = c.send(&bind_execute("_pg3_0")).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("26000"),
            "{addr}: {msgs:?}"
        );
    }
}

/// A Parse of the unnamed statement that fails leaves no unnamed statement behind: the
/// server drops the old one before parsing the new one, so a later Bind of "" fails with
/// 26000 instead of running the old SQL again.
#[tokio::test]
async fn a_failed_parse_of_the_unnamed_statement_drops_the_old_one() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let mut c = RawClient::login(addr, "trustuser").await;
        let msgs = c.send(&parse_bind_execute("SELECT 1")).await;
        assert_eq!(tags(&msgs), "12DCZ", "{addr}: {msgs:?}");
        let mut bad = parse("", "SELEC oops");
        bad.extend(sync());
        let msgs = c.send(&bad).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("42601"),
            "{addr}: {msgs:?}"
        );
        let msgs = c.send(&bind_execute("")).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("26000"),
            "{addr}: {msgs:?}"
        );
    }
}

/// Closing statements needs no server (tokio-postgres closes one after every query given as
/// a string): it is answered even while the primary is down, and takes no connection.
#[tokio::test]
async fn closing_statements_is_answered_without_a_server() {
    let c = cluster();
    let dead_primary = base_config_toml(c).replace(
        &format!("port = {}\n", c.primary),
        &format!("port = {}\n", unused_port()),
    );
    for toml in [dead_primary.clone(), session_mode(&dead_primary)] {
        let proxy = start_proxy_with(&toml).await;
        let mut raw = RawClient::login(proxy.addr, "trustuser").await;
        raw.parse("s1", "SELECT 1").await;
        raw.parse("s2", "SELECT 2").await;
        assert_eq!(raw.execute_named("s1").await, "1");
        let mut req = close_statement("s1");
        req.extend(close_statement("s2"));
        req.extend(close_statement("never_made"));
        req.extend(sync());
        let msgs = raw.send(&req).await;
        assert_eq!(tags(&msgs), "333Z", "{msgs:?}");
        // Closed: the name is free for other SQL.
        raw.parse("s1", "SELECT 3").await;
        assert_eq!(raw.execute_named("s1").await, "3");
        // A client of the real driver, whose every string query ends with a Close.
        let client = proxy.app().await;
        for i in 0..3 {
            let row = client.query_one("SELECT $1::int", &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i);
        }
    }
}

/// A Close of a statement and a Bind of it in the same batch: the Bind fails (26000) as on
/// a direct connection, instead of running the statement the client closed.
#[tokio::test]
async fn a_bind_behind_a_close_of_its_statement_fails() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let mut c = RawClient::login(addr, "trustuser").await;
        c.parse("s1", "SELECT 1").await;
        let mut req = close_statement("s1");
        req.extend(bind_execute("s1"));
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "3EZ", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "{addr}");
        // The unnamed statement too, parsed before the Close in the same batch.
        let mut req = parse("", "SELECT 2");
        req.extend(close_statement(""));
        req.extend(bind_execute(""));
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "13EZ", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "{addr}");
    }
}

/// A pipelining client prepares with Parse, Describe, Flush and binds in the same write:
/// when the Parse fails, what follows up to the Sync is skipped, one error in all, as the
/// server does (the proxy ends its part of a describe-only request with a Sync of its own).
#[tokio::test]
async fn after_a_failed_prepare_with_flush_the_rest_up_to_the_sync_is_skipped() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let mut c = RawClient::login(addr, "trustuser").await;
        let mut req = parse("s_bad", "SELEC broken");
        req.extend(describe_statement("s_bad"));
        req.extend(message(b'H', &[]));
        req.extend(bind_execute("s_bad"));
        let msgs = c.send(&req).await;
        assert_eq!(tags(&msgs), "EZ", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("42601"), "{addr}");
        // And the session goes on.
        assert_eq!(tags(&c.send(&query("SELECT 1")).await), "TDCZ", "{addr}");
    }
}

/// A malformed Bind, a Describe of an unknown kind, or a Query whose text has no
/// terminator is an ERROR (08P01) in PostgreSQL, not the end of the session, and it fails what the server would fail with it: the
/// batch's implicit transaction (an INSERT before it is not committed) or the open
/// transaction block (its COMMIT rolls back). pgsplit used to end the session; now it makes
/// the server fail at that point too.
#[tokio::test]
async fn malformed_messages_fail_what_the_server_would_fail() {
    let c = cluster();
    let t = unique("raised_errors");
    let primary = direct(c.primary).await;
    primary
        .batch_execute(&format!(
            "CREATE TABLE {t} (who text); GRANT INSERT ON {t} TO trustuser"
        ))
        .await
        .unwrap();
    let (_proxies, addrs) = direct_and_both_modes().await;
    let truncated_bind = message(b'B', &[0]);
    let describe_of_kind_x = message(b'D', b"Xs1\0");
    let unterminated_query = message(b'Q', b"SELECT 1");
    for addr in addrs {
        let mut s = RawClient::login(addr, "trustuser").await;
        s.parse("s1", "SELECT 1").await;
        let insert = |who: &str| {
            let mut req = parse_bind_execute(&format!("INSERT INTO {t} VALUES ('{who}')"));
            req.truncate(req.len() - sync().len());
            req
        };
        // A simple Query ends the request where it stands: PostgreSQL answers it with
        // ReadyForQuery, no Sync needed.
        let failures = [
            (truncated_bind.clone(), false),
            (describe_of_kind_x.clone(), false),
            (unterminated_query.clone(), true),
        ];
        for (n, (failing, ends_request)) in failures.into_iter().enumerate() {
            let code = "08P01";
            // Outside a block: the INSERT's implicit transaction fails.
            let mut req = insert(&format!("{addr} implicit {n}"));
            req.extend(&failing);
            if !ends_request {
                req.extend(execute());
                req.extend(sync());
            }
            let msgs = s.send(&req).await;
            assert_eq!(tags(&msgs), "12CEZ", "{addr} {n}: {msgs:?}");
            assert_eq!(error_code(&msgs).as_deref(), Some(code), "{addr} {n}");
            assert_eq!(status(&msgs), b'I', "{addr} {n}");
            // Inside one: the block fails, and its COMMIT rolls back.
            assert_eq!(tags(&s.send(&query("BEGIN")).await), "CZ", "{addr}");
            let mut req = insert(&format!("{addr} block {n}"));
            req.extend(sync());
            assert_eq!(tags(&s.send(&req).await), "12CZ", "{addr} {n}");
            let mut req = failing.clone();
            if !ends_request {
                req.extend(sync());
            }
            let msgs = s.send(&req).await;
            assert_eq!(tags(&msgs), "EZ", "{addr} {n}: {msgs:?}");
            assert_eq!(error_code(&msgs).as_deref(), Some(code), "{addr} {n}");
            assert_eq!(status(&msgs), b'E', "{addr} {n}");
            let msgs = s.send(&query("COMMIT")).await;
            assert!(
                msgs.iter()
                    .any(|m| m.0 == b'C' && m.1.starts_with(b"ROLLBACK")),
                "{addr} {n}: {msgs:?}"
            );
            assert_eq!(status(&msgs), b'I', "{addr} {n}");
        }
        // Behind a failed Parse the server skips to the Sync, the malformed Query and the
        // INSERT after it included: one error, one ReadyForQuery, nothing committed.
        let mut req = parse("", "SELEC 1");
        req.extend(&unterminated_query);
        req.extend(insert(&format!("{addr} skipped")));
        req.extend(sync());
        let msgs = s.send(&req).await;
        assert_eq!(tags(&msgs), "EZ", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("42601"), "{addr}");
        assert_eq!(tags(&s.send(&query("SELECT 1")).await), "TDCZ", "{addr}");
        // A malformed Query that joins a request already sent (with a Flush) ends it too,
        // and its INSERT is not committed.
        let mut req = insert(&format!("{addr} joining"));
        req.extend(message(b'H', &[]));
        s.stream_write(&req).await;
        assert_eq!(tags(&s.read_n(3).await), "12C", "{addr}");
        let msgs = s.send(&unterminated_query).await;
        assert_eq!(tags(&msgs), "EZ", "{addr}: {msgs:?}");
        assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{addr}");
        assert_eq!(s.execute_named("s1").await, "1", "{addr}");
        assert_eq!(tags(&s.send(&query("SELECT 1")).await), "TDCZ", "{addr}");
    }
    let committed: i64 = primary
        .query_one(&format!("SELECT count(*) FROM {t}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        committed, 0,
        "nothing the failed requests ran was committed"
    );
}

/// A `DEALLOCATE ALL` the server ran (through the extended protocol, so pgsplit does not
/// answer it itself) drops the client's statements: a Bind of one fails with 26000, as on a
/// direct connection (pgsplit used to prepare it again and run it), and the name can be
/// prepared anew.
#[tokio::test]
async fn a_deallocate_all_the_server_ran_drops_the_clients_statements() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let mut s = RawClient::login(addr, "trustuser").await;
        s.parse("s1", "SELECT 1").await;
        let msgs = s.send(&parse_bind_execute("DEALLOCATE ALL")).await;
        assert_eq!(tags(&msgs), "12CZ", "{addr}: {msgs:?}");
        let msgs = s.send(&bind_execute("s1")).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("26000"),
            "{addr}: {msgs:?}"
        );
        s.parse("s1", "SELECT 2").await;
        assert_eq!(s.execute_named("s1").await, "2", "{addr}");
    }
}

/// Session-bound work that joins a request already running on a replica (in a READ ONLY
/// block; the first part sent with a Flush) keeps that replica connection out of the pool,
/// as when it comes with the request: it is closed at the COMMIT (a README known limit), and
/// another client never finds the WITH HOLD cursor. pgsplit used to pool the connection.
#[tokio::test]
async fn session_bound_work_joining_a_replica_request_keeps_the_connection_out_of_the_pool() {
    let proxy = start_proxy_one_connection_per_node().await;
    let mut a = RawClient::login(proxy.addr, "trustuser").await;
    let b = connect(&proxy.conn_str("trustuser", "")).await;
    // Once: the DECLARE pins A's session, whose next blocks run on the primary.
    assert_eq!(tags(&a.send(&query("BEGIN READ ONLY")).await), "CZ");
    let mut first = parse_bind_execute("SELECT 1");
    first.truncate(first.len() - sync().len());
    first.extend(message(b'H', &[]));
    a.stream_write(&first).await;
    assert_eq!(tags(&a.read_n(4).await), "12DC");
    let msgs = a
        .send(&parse_bind_execute(
            "DECLARE held CURSOR WITH HOLD FOR SELECT 42",
        ))
        .await;
    assert_eq!(tags(&msgs), "12CZ", "{msgs:?}");
    assert_eq!(tags(&a.send(&query("COMMIT")).await), "CZ");
    for _ in 0..2 {
        b.batch_execute("BEGIN READ ONLY").await.unwrap();
        let err = b.simple_query("FETCH ALL FROM held").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("34000"), "{err}");
        b.batch_execute("ROLLBACK").await.unwrap();
    }
}

/// A server connection lost in the middle of a row the client is reading (its backend
/// terminated while streaming a 32 MB value, past what pgsplit holds back for a retry): the
/// client gets no more bytes and the connection closes, as a direct connection would.
/// pgsplit used to append an ErrorResponse and ReadyForQuery inside the cut row and wait
/// for the next request, so the client waited for the rest of the row forever.
#[tokio::test]
async fn a_server_lost_in_the_middle_of_a_row_closes_the_client_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const VALUE: usize = 32 << 20;
    let proxy = start_proxy().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&startup_packet("trustuser")).await.unwrap();
    read_messages(&mut s).await;
    s.write_all(&query(&format!(
        "SELECT pg_backend_pid()::text || ',' || inet_server_port() || ',', repeat('x', {VALUE})"
    )))
    .await
    .unwrap();
    // The row's head names the backend and its server; the client then stops reading.
    let mut head = Vec::new();
    let (pid, port) = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the row's head arrives");
        head.extend_from_slice(&chunk[..n]);
        // `…<pid>,<port>,…`: the first column's text, between its length and the next one.
        let text = String::from_utf8_lossy(&head);
        let mut fields = text.split(',');
        if let (Some(before), Some(port), Some(_)) = (fields.next(), fields.next(), fields.next()) {
            let start = before.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            let pid = before[start..].parse::<i32>().unwrap();
            break (pid, port.parse::<u16>().unwrap());
        }
    };
    let killed = direct(port)
        .await
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get::<_, bool>(0);
    assert!(killed, "backend {pid} on port {port}");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    assert!(
        head.len() + rest.len() < VALUE,
        "the row was cut: {} bytes",
        head.len() + rest.len()
    );
}
