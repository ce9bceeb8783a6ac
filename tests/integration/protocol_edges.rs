//! Message sequences drivers send that a proxy gets wrong easily, replayed byte for byte in
//! one packet each (so timing cannot hide a bug).

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
