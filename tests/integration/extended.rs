//! The extended protocol through the proxy: prepared statements on any backend, binary
//! formats, pipelining, COPY, cancel, errors, large results.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, future::join_all};
use tokio_postgres::types::Type;

use crate::common::*;

#[tokio::test]
async fn a_prepared_statement_runs_on_every_replica_with_binary_results() {
    let c = cluster();
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let stmt = client
        .prepare_typed(
            "SELECT inet_server_port(), $1::int8 * 2, $2::text || '!', now() > '2000-01-01'::timestamptz",
            &[Type::INT8, Type::TEXT],
        )
        .await
        .unwrap();
        assert_eq!(stmt.columns().len(), 4);
        let mut i = 0i64;
        let ports = tally_while_in_rotation(&proxy, 6, async || {
            i += 1;
            let row = client.query_one(&stmt, &[&i, &"x"]).await.unwrap();
            assert_eq!(row.get::<_, i64>(1), i * 2);
            assert_eq!(row.get::<_, String>(2), "x!");
            assert!(row.get::<_, bool>(3));
            row.get::<_, i32>(0) as u16
        })
        .await;
        assert_eq!(
            ports.into_keys().collect::<std::collections::HashSet<_>>(),
            c.replicas.into_iter().collect(),
            "prepared lazily on both replicas"
        );
    }
}

#[tokio::test]
async fn pipelined_queries_all_answer_in_order() {
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    let stmt = client.prepare("SELECT $1::int4 + 1").await.unwrap();
    let futures = (0..50).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move {
            client
                .query_one(stmt, &[&i])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }
    });
    let results = join_all(futures).await;
    assert_eq!(results, (1..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn errors_are_passed_through_and_the_session_stays_usable() {
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    let e = client.query("SELEC 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42601");
    let e = client.query_one("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012");
    let e = client
        .prepare("SELECT * FROM no_such_table_here")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    // Inside a transaction: the transaction is failed, then rolled back.
    client.batch_execute("BEGIN").await.unwrap();
    assert!(client.query_one("SELECT 1/0", &[]).await.is_err());
    let e = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        client
            .query_one("SELECT 7", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        7
    );
}

#[tokio::test]
async fn copy_in_and_copy_out_through_the_proxy() {
    let c = cluster();
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let t = unique("copy");
        client
            .batch_execute(&format!("CREATE TABLE {t} (id int, name text)"))
            .await
            .unwrap();
        let sink = client
            .copy_in(&format!("COPY {t} FROM STDIN"))
            .await
            .unwrap();
        let mut sink = std::pin::pin!(sink);
        let mut data = String::new();
        for i in 0..1000 {
            data.push_str(&format!("{i}\tname {i}\n"));
        }
        sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
        let n = sink.finish().await.unwrap();
        assert_eq!(n, 1000);
        let count: i64 = rows_on(c.primary, &t).await;
        assert_eq!(count, 1000);
        wait_replicated().await;
        let stream = client
            .copy_out(&format!("COPY (SELECT * FROM {t} ORDER BY id) TO STDOUT"))
            .await
            .unwrap();
        let chunks: Vec<_> = stream.collect().await;
        let out: Vec<u8> = chunks
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(String::from_utf8(out).unwrap(), data);
        // (A failing COPY is checked with psql: tokio-postgres 0.7 itself loses track of the
        // protocol after a COPY that fails at Execute, on a direct connection too.)
    }
}

#[tokio::test]
async fn cancel_reaches_the_node_running_the_query() {
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    for sql in [
        "SELECT pg_sleep(30)",
        "SELECT pg_sleep(30) FROM pg_advisory_xact_lock(5)",
    ] {
        let token = client.cancel_token();
        let started = Instant::now();
        let canceller = tokio::spawn(cancel_repeatedly(token));
        let e = client.query(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "57014", "{sql}: {e}");
        assert!(started.elapsed() < Duration::from_secs(10));
        canceller.abort();
        assert_usable(&client).await;
    }
}

#[tokio::test]
async fn a_large_result_streams_through_intact() {
    let proxy = start_proxy().await;
    let client = proxy.app().await;
    // ~64 MB in 64 KiB rows.
    let rows = client
        .query_raw(
            "SELECT i, repeat('x', 65536) FROM generate_series(1, 1000) i",
            Vec::<i32>::new(),
        )
        .await
        .unwrap();
    let mut rows = std::pin::pin!(rows);
    let mut n = 0;
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        n += 1;
        assert_eq!(row.get::<_, i32>(0), n);
        assert_eq!(row.get::<_, &str>(1).len(), 65536);
    }
    assert_eq!(n, 1000);
}

#[tokio::test]
async fn statement_names_of_one_client_map_per_sql_text() {
    for proxy in both_modes().await {
        let a = proxy.app().await;
        let b = proxy.app().await;
        // tokio-postgres names statements s0, s1 ... in each client: the same names, other SQL.
        let sa = a.prepare("SELECT 'a'::text").await.unwrap();
        let sb = b.prepare("SELECT 'b'::text, 2").await.unwrap();
        for _ in 0..4 {
            assert_eq!(
                a.query_one(&sa, &[]).await.unwrap().get::<_, String>(0),
                "a"
            );
            assert_eq!(
                b.query_one(&sb, &[]).await.unwrap().get::<_, String>(0),
                "b"
            );
        }
        // Dropping a statement closes it; its name can be reused for other SQL.
        drop(sa);
        let again = a.prepare("SELECT 'again'::text").await.unwrap();
        assert_eq!(
            a.query_one(&again, &[]).await.unwrap().get::<_, String>(0),
            "again"
        );
    }
}

/// After a table's columns change, a server refuses to run a statement prepared before
/// with "cached plan must not change result type" (0A000); drivers then prepare it again.
/// pgsplit shares server statements per SQL text, so what a client prepares after that
/// error must get a server statement of its own, or it would meet the same error for ever.
#[tokio::test]
async fn a_statement_prepared_again_after_a_schema_change_works() {
    let t = unique("reshaped");
    let primary = direct(cluster().primary).await;
    primary
        .batch_execute(&format!(
            "CREATE TABLE {t} (a int); INSERT INTO {t} VALUES (1); GRANT SELECT ON {t} TO app"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let sql = format!("SELECT * FROM {t}");
    let mut proxies = Vec::new();
    for proxy in both_modes().await {
        let client = proxy.app().await;
        let stmt = client.prepare(&sql).await.unwrap();
        for _ in 0..4 {
            assert_eq!(client.query(&stmt, &[]).await.unwrap()[0].len(), 1);
        }
        proxies.push((proxy, client, stmt));
    }
    primary
        .batch_execute(&format!("ALTER TABLE {t} ADD COLUMN b int DEFAULT 7"))
        .await
        .unwrap();
    wait_replicated().await;
    for (proxy, client, old) in &proxies {
        // A client that prepares the text now: at most one 0A000 (from a connection
        // holding the old plan), as a driver's first try; its next prepare works.
        let fresh = proxy.app().await;
        let mut refused = 0;
        let stmt = loop {
            match fresh.prepare(&sql).await {
                Ok(s) => break s,
                Err(e) => {
                    assert_eq!(sqlstate(&e), "0A000", "{e}");
                    refused += 1;
                    assert!(refused < 2, "refused again: {e}");
                }
            }
        };
        assert_eq!(stmt.columns().len(), 2);
        for _ in 0..4 {
            let rows = fresh.query(&stmt, &[]).await.unwrap();
            assert_eq!(rows[0].get::<_, i32>(1), 7);
        }
        // The old handle fails as on a direct connection; prepared again, it works.
        let e = client.query(old, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{e}");
        let stmt = client.prepare(&sql).await.unwrap();
        assert_eq!(stmt.columns().len(), 2);
        for _ in 0..4 {
            let rows = client.query(&stmt, &[]).await.unwrap();
            assert_eq!(rows[0].get::<_, i32>(1), 7);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_reading_a_huge_result_costs_the_proxy_only_buffers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A proxy process of its own: its memory is not the other tests' running beside it.
    let proxy = ProxyProcess::start(&base_config_toml(cluster()), "warn").await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.port));
    let mut c = RawClient::login(addr, "trustuser").await;
    let before = proxy.rss_kib();
    // 300 MB of rows, read slowly in small pieces: the proxy must wait for the client
    // instead of buffering what the server sends.
    let sql = "SELECT repeat('x', 1048576) FROM generate_series(1, 300)\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    c.stream.write_all(&q).await.unwrap();
    let mut total = 0usize;
    let mut peak = before;
    let mut buf = vec![0u8; 256 * 1024];
    let mut tail = Vec::new();
    loop {
        let n = c.stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the proxy closed the connection");
        total += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 16 {
            tail.drain(..tail.len() - 16);
        }
        // ReadyForQuery 'I' ends the answer.
        if tail.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
            break;
        }
        if total % (16 << 20) < n {
            peak = peak.max(proxy.rss_kib());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert!(total > 300 << 20, "{total}");
    let growth_mib = (peak.saturating_sub(before)) / 1024;
    assert!(
        growth_mib < 64,
        "memory grew by {growth_mib} MiB while relaying 300 MB"
    );
}
