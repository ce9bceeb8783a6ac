//! The Redis result cache against the real cluster and a real Redis: hits skip the servers,
//! writes invalidate at once (also for a second proxy sharing the Redis), a lagging replica
//! cannot refill stale data, keys separate what must stay separate, and a dead Redis costs
//! nothing but the cache.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

use crate::common::*;

/// A `[cache]` section for `redis_port` whitelisting `tables` (table rules) and `queries`.
fn cache_section(redis_port: u16, prefix: &str, tables: &[&str], queries: &[&str]) -> String {
    cache_section_with(redis_port, prefix, "", tables, queries)
}

/// [`cache_section`] with extra `[cache]` lines.
fn cache_section_with(
    redis_port: u16,
    prefix: &str,
    extra: &str,
    tables: &[&str],
    queries: &[&str],
) -> String {
    // A generous timeout: parallel tests load the machine, and a lookup that times out
    // bypasses the cache, which the tests would take for a miss.
    let mut s = format!(
        "\n[cache]\nenabled = true\nredis_url = \"redis://127.0.0.1:{redis_port}\"\nkey_prefix = \"{prefix}\"\ntimeout_ms = 2000\n{extra}\n"
    );
    for t in tables {
        s.push_str(&format!("[[cache.rules]]\ntable = \"{t}\"\n"));
    }
    for q in queries {
        s.push_str(&format!("[[cache.rules]]\nquery = \"{q}\"\n"));
    }
    s
}

async fn cache_proxy(prefix: &str, tables: &[&str], queries: &[&str]) -> Proxy {
    let c = cluster();
    cache_ready(
        start_proxy_with(&(base_config_toml(c) + &cache_section(c.redis, prefix, tables, queries)))
            .await,
    )
    .await
}

/// The proxy once its cache is connected (it starts bypassed until Redis answered once).
async fn cache_ready(proxy: Proxy) -> Proxy {
    let cache = proxy.shared.cache.clone().expect("cache enabled");
    assert!(
        eventually(Duration::from_secs(10), || !cache.is_bypassed()).await,
        "the cache never connected to redis"
    );
    proxy
}

/// Wait until `proxy`'s cache has stored more than `before` entries in all: a fill is
/// stored off the client's path, so a repeat sent at once can still miss.
async fn stored_more_than(proxy: &Proxy, before: u64) {
    let cache = proxy.shared.cache.clone().expect("cache enabled");
    assert!(
        eventually(Duration::from_secs(10), || cache.snapshot().stores > before).await,
        "the fill was never stored"
    );
}

/// Read `sql` until the cache holds it: a miss that fills, then (once the fill is stored)
/// the same value again; or at once a hit, when an earlier read of the same text filled it.
/// The value.
async fn cached_value(proxy: &Proxy, client: &tokio_postgres::Client, sql: &str) -> String {
    let cache = proxy.shared.cache.clone().expect("cache");
    let before = cache.snapshot();
    let value = simple_value(client, sql).await;
    if cache.snapshot().hits > before.hits {
        return value;
    }
    stored_more_than(proxy, before.stores).await;
    assert_eq!(simple_value(client, sql).await, value, "a hit: {sql}");
    value
}

/// How many times SELECTs mentioning `marker` ran, summed over all three nodes
/// (pg_stat_statements; the marker is a table name unique to the test).
async fn executions_on(c: &Cluster, marker: &str) -> i64 {
    // Statement statistics are recorded as a statement ends; give the last one a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut total = 0;
    for port in [c.primary, c.replicas[0], c.replicas[1]] {
        let n: i64 = direct(port)
            .await
            .query_one(
                "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
                 WHERE query ILIKE 'select%' AND query LIKE '%' || $1 || '%'",
                &[&marker],
            )
            .await
            .unwrap()
            .get(0);
        total += n;
    }
    total
}

async fn executions(marker: &str) -> i64 {
    executions_on(cluster(), marker).await
}

/// The only value of a one-row, one-column simple query.
async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(values.len(), 1, "{sql}: {values:?}");
    values.into_iter().next().unwrap()
}

/// A table `name (id int primary key, v text)` with rows 1..=3, replicated everywhere.
async fn make_table(name: &str) {
    let c = cluster();
    let primary = direct(c.primary).await;
    primary
        .batch_execute(&format!(
            "CREATE TABLE {name} (id int PRIMARY KEY, v text);
             INSERT INTO {name} SELECT i, 'v' || i FROM generate_series(1, 3) i;
             GRANT ALL ON {name} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
}

#[tokio::test]
async fn a_whitelisted_read_is_served_from_redis_on_the_second_call() {
    let t = unique("cache_hit");
    make_table(&t).await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let client = proxy.app().await;

    // Simple protocol.
    let sql = format!("SELECT v FROM {t} WHERE id = 2");
    assert_eq!(simple_value(&client, &sql).await, "v2");
    assert_eq!(executions(&t).await, 1);
    assert_eq!(simple_value(&client, &sql).await, "v2");
    // Formatting and keyword case do not split entries.
    let same = format!("select   v\n FROM {t} where ID = 2 -- again");
    assert_eq!(simple_value(&client, &same).await, "v2");
    assert_eq!(executions(&t).await, 1, "the hits never reached a server");

    // Extended protocol with binary results and a parameter.
    let stmt = client
        .prepare(&format!("SELECT id, v FROM {t} WHERE id = $1"))
        .await
        .unwrap();
    let stores = || proxy.shared.cache.as_ref().unwrap().snapshot().stores;
    for i in 0..3 {
        let before = stores();
        let rows = client.query(&stmt, &[&3i32]).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i32>(0), 3);
        assert_eq!(rows[0].get::<_, String>(1), "v3");
        if i == 0 {
            stored_more_than(&proxy, before).await;
        }
    }
    // Unnamed statements (Parse + Bind + Execute in one request) hit too.
    for i in 0..2 {
        let before = stores();
        let rows = client
            .query(&format!("SELECT id, v FROM {t} WHERE id = $1"), &[&1i32])
            .await
            .unwrap();
        assert_eq!(rows[0].get::<_, String>(1), "v1");
        if i == 0 {
            stored_more_than(&proxy, before).await;
        }
    }
    let n = executions(&t).await;
    assert!(
        n <= 3,
        "one execution per distinct request shape and parameter, got {n}"
    );
    let stats = proxy.shared.cache.as_ref().unwrap().snapshot();
    assert!(stats.hits >= 4, "{stats:?}");
    assert!(stats.stores >= 3, "{stats:?}");

    // pgbench's three protocols through the cache: the answers stay right.
    client
        .batch_execute(&format!("SELECT v FROM {t} WHERE id = 1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_write_invalidates_at_once_also_for_a_second_proxy() {
    let t = unique("cache_inval");
    make_table(&t).await;
    let prefix = unique("p");
    let a = cache_proxy(&prefix, &[&t], &[]).await;
    let b = cache_proxy(&prefix, &[&t], &[]).await;
    let (ca, cb) = (a.app().await, b.app().await);
    let read = format!("SELECT v FROM {t} WHERE id = 1");
    let stmt_b = cb
        .prepare(&format!("SELECT v FROM {t} WHERE id = $1"))
        .await
        .unwrap();
    for i in 0..20 {
        // Warm both kinds of entry, then write through one proxy and read through both.
        simple_value(&cb, &read).await;
        cb.query_one(&stmt_b, &[&1i32]).await.unwrap();
        let (writer, name) = if i % 2 == 0 { (&ca, "a") } else { (&cb, "b") };
        let value = format!("new{i}");
        if i % 3 == 0 {
            // Inside a transaction: the bump happens at COMMIT.
            writer
                .batch_execute(&format!(
                    "BEGIN; UPDATE {t} SET v = '{value}' WHERE id = 1; COMMIT"
                ))
                .await
                .unwrap();
        } else {
            writer
                .execute(&format!("UPDATE {t} SET v = $1 WHERE id = 1"), &[&value])
                .await
                .unwrap();
        }
        assert_eq!(
            simple_value(&ca, &read).await,
            value,
            "via a after write by {name}"
        );
        assert_eq!(
            simple_value(&cb, &read).await,
            value,
            "via b after write by {name}"
        );
        let v: String = cb.query_one(&stmt_b, &[&1i32]).await.unwrap().get(0);
        assert_eq!(v, value, "extended via b after write by {name}");
    }
    let sa = a.shared.cache.as_ref().unwrap().snapshot();
    let sb = b.shared.cache.as_ref().unwrap().snapshot();
    assert!(
        sa.invalidations >= 10 && sb.invalidations >= 10,
        "{sa:?} {sb:?}"
    );
    assert!(sa.hits + sb.hits >= 20, "{sa:?} {sb:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_cannot_refill_stale_data() {
    let _guard = failure_lock().lock().await;
    let c = failure_cluster();
    let t = unique("cache_lag");
    let primary = direct(c.primary).await;
    primary
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v text);
             INSERT INTO {t} VALUES (1, 'old');
             GRANT ALL ON {t} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated_on(c).await;
    // Only the replica that applies WAL 2 s late, a generous lag limit so it stays in the
    // rotation, and eventual consistency: nothing but the cache's own floor keeps its fills
    // fresh.
    let only_delayed = without_replica(&base_config_toml(c), c.replicas[0]);
    let toml = only_delayed
        + "\n[routing]\nread_your_writes = false\nmax_replica_lag_bytes = 1073741824\n"
        + &cache_section(c.redis, &unique("p"), &[&t], &[]);
    let proxy = cache_ready(start_proxy_with(&toml).await).await;
    let reader = proxy.app().await;
    let writer = proxy.app().await;
    let read = format!("SELECT v FROM {t} WHERE id = 1");
    assert_eq!(simple_value(&reader, &read).await, "old");
    assert_eq!(simple_value(&reader, &read).await, "old");
    writer
        .execute(&format!("UPDATE {t} SET v = 'new' WHERE id = 1"), &[])
        .await
        .unwrap();
    // For the next 3 s the delayed replica still has 'old'; no read may return it, and no
    // fill may put it back in the cache.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut reads = 0;
    while Instant::now() < deadline {
        let other = proxy.app().await;
        assert_eq!(simple_value(&other, &read).await, "new", "read {reads}");
        assert_eq!(simple_value(&reader, &read).await, "new", "read {reads}");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replica = direct(c.replicas[1]).await;
    let now_there: String = replica.query_one(&read, &[]).await.unwrap().get(0);
    assert_eq!(now_there, "new", "the replica replays eventually");
}

#[tokio::test]
async fn users_settings_and_parameters_never_share_an_entry() {
    let t = unique("cache_keys");
    let c = cluster();
    let primary = direct(c.primary).await;
    let (s1, s2) = (unique("s"), unique("s"));
    primary
        .batch_execute(&format!(
            "CREATE SCHEMA {s1}; CREATE SCHEMA {s2};
             CREATE TABLE {s1}.{t} (id int, v text); CREATE TABLE {s2}.{t} (id int, v text);
             INSERT INTO {s1}.{t} VALUES (1, 'one'), (2, 'two');
             INSERT INTO {s2}.{t} VALUES (1, 'uno'), (2, 'dos');
             GRANT USAGE ON SCHEMA {s1}, {s2} TO app;
             GRANT SELECT ON {s1}.{t}, {s2}.{t} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let read = format!("SELECT v FROM {t} WHERE id = 1");

    // search_path: same text, different tables.
    let client = proxy.app().await;
    for _ in 0..2 {
        client
            .batch_execute(&format!("SET search_path = {s1}"))
            .await
            .unwrap();
        assert_eq!(simple_value(&client, &read).await, "one");
        client
            .batch_execute(&format!("SET search_path = {s2}"))
            .await
            .unwrap();
        assert_eq!(simple_value(&client, &read).await, "uno");
    }
    assert_eq!(
        executions(&t).await,
        2,
        "one fill per search_path, then hits"
    );

    // Another user: its own entry (it may not even be allowed to read the same rows).
    let admin = connect(&proxy.conn_str("admin", "admin_password")).await;
    admin
        .batch_execute(&format!("SET search_path = {s1}"))
        .await
        .unwrap();
    assert_eq!(simple_value(&admin, &read).await, "one");
    assert_eq!(
        executions(&t).await,
        3,
        "admin's first read ran on a server"
    );

    // Parameters: each value its own entry.
    client
        .batch_execute(&format!("SET search_path = {s2}"))
        .await
        .unwrap();
    let stmt = client
        .prepare(&format!("SELECT v FROM {t} WHERE id = $1"))
        .await
        .unwrap();
    for _ in 0..2 {
        for (id, want) in [(1i32, "uno"), (2, "dos")] {
            let v: String = client.query_one(&stmt, &[&id]).await.unwrap().get(0);
            assert_eq!(v, want);
        }
    }
    assert_eq!(executions(&t).await, 5, "two parameter values, two fills");

    // application_name: a row-level security policy may filter on it (a tenant per
    // application name), so each value has its own entry.
    for name in ["tenant_a", "tenant_b"] {
        let tenant = connect(&format!(
            "{} application_name={name}",
            proxy.conn_str("app", "app_pw")
        ))
        .await;
        tenant
            .batch_execute(&format!("SET search_path = {s1}"))
            .await
            .unwrap();
        assert_eq!(simple_value(&tenant, &read).await, "one");
    }
    assert_eq!(executions(&t).await, 7, "one fill per application_name");
}

#[tokio::test]
async fn what_is_not_whitelisted_or_not_safe_is_never_stored() {
    let t = unique("cache_wl");
    let other = unique("cache_other");
    make_table(&t).await;
    make_table(&other).await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let client = proxy.app().await;
    let cases = [
        // Not whitelisted.
        format!("SELECT v FROM {other} WHERE id = 1"),
        // Whitelisted table, but a volatile function.
        format!("SELECT v || now()::text FROM {t} WHERE id = 1"),
        format!("SELECT v || random()::text FROM {t} WHERE id = 1"),
        // Joins a table that is not whitelisted.
        format!("SELECT a.v FROM {t} a JOIN {other} b USING (id) WHERE a.id = 1"),
    ];
    for sql in &cases {
        let marker = if sql.contains(&other) { &other } else { &t };
        let before = executions(marker).await;
        simple_value(&client, sql).await;
        simple_value(&client, sql).await;
        assert_eq!(executions(marker).await, before + 2, "{sql}");
    }
    // Inside a transaction the answer comes from its own snapshot.
    let read = format!("SELECT v FROM {t} WHERE id = 2");
    simple_value(&client, &read).await;
    let before = executions(&t).await;
    client.batch_execute("BEGIN").await.unwrap();
    simple_value(&client, &read).await;
    simple_value(&client, &read).await;
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(executions(&t).await, before + 2, "reads in a transaction");
    simple_value(&client, &read).await;
    assert_eq!(executions(&t).await, before + 2, "outside it, a hit again");
}

#[tokio::test]
async fn oversized_results_are_not_stored() {
    let t = unique("cache_big");
    make_table(&t).await;
    let c = cluster();
    let toml = base_config_toml(c)
        + &cache_section_with(c.redis, &unique("p"), "max_entry_bytes = 2048", &[&t], &[]);
    let proxy = cache_ready(start_proxy_with(&toml).await).await;
    let client = proxy.app().await;
    let big = format!("SELECT repeat(v, 2000) FROM {t} WHERE id = 1");
    let small = format!("SELECT v FROM {t} WHERE id = 1");
    for _ in 0..2 {
        assert_eq!(simple_value(&client, &big).await.len(), 4000);
        assert_eq!(simple_value(&client, &small).await, "v1");
    }
    assert_eq!(executions(&t).await, 3, "big twice, small once");
    let stats = proxy.shared.cache.as_ref().unwrap().snapshot();
    assert!(stats.too_large >= 2, "{stats:?}");
}

/// A Redis of the test's own, to kill and restart.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis {
            port,
            child: Some(child),
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    fn cli(&self, args: &[&str]) {
        let status = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success());
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_costs_only_the_cache() {
    let t = unique("cache_down");
    make_table(&t).await;
    let port = unused_port();
    let mut redis = OwnRedis::start(port);
    let c = cluster();
    let toml = base_config_toml(c)
        + &cache_section(port, &unique("p"), &[&t], &[])
            .replace("timeout_ms = 2000", "timeout_ms = 300");
    let proxy = cache_ready(start_proxy_with(&toml).await).await;
    let cache = proxy.shared.cache.clone().unwrap();
    let read = format!("SELECT v FROM {t} WHERE id = 1");
    let client = proxy.app().await;
    let before = cache.snapshot().stores;
    simple_value(&client, &read).await;
    stored_more_than(&proxy, before).await;
    simple_value(&client, &read).await;
    assert!(cache.snapshot().hits >= 1);

    // Load from four clients while Redis dies: not one query may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let conn_str = proxy.conn_str("app", "app_pw");
        let (stop, t, read) = (stop.clone(), t.clone(), read.clone());
        workers.push(tokio::spawn(async move {
            let client = connect(&conn_str).await;
            let mut done = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if w == 0 {
                    let v = format!("w{done}");
                    client
                        .execute(&format!("UPDATE {t} SET v = $1 WHERE id = 3"), &[&v])
                        .await
                        .expect("write while redis is down");
                } else {
                    client
                        .simple_query(&read)
                        .await
                        .expect("read while redis is down");
                }
                done += 1;
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Hung: every call times out.
    redis.signal("STOP");
    assert!(
        eventually(Duration::from_secs(5), || cache.is_bypassed()).await,
        "the breaker opens"
    );
    // A write Redis cannot record: once Redis answers again, the entry from before it
    // must not be served.
    client
        .execute(
            &format!("UPDATE {t} SET v = 'while_hung' WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    redis.signal("CONT");
    assert!(
        eventually(Duration::from_secs(10), || !cache.is_bypassed()).await,
        "the cache resumes once redis answers"
    );
    assert_eq!(simple_value(&client, &read).await, "while_hung");

    // Gone: connections refused.
    redis.kill();
    assert!(
        eventually(Duration::from_secs(5), || {
            // Lookups notice; the workers keep issuing them.
            cache.is_bypassed()
        })
        .await,
        "the breaker opens again"
    );
    client
        .execute(
            &format!("UPDATE {t} SET v = 'while_down' WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    let mut redis = OwnRedis::start(port);
    assert!(
        eventually(Duration::from_secs(10), || !cache.is_bypassed()).await,
        "the cache resumes once redis is back"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        assert!(w.await.expect("no worker failed") > 0);
    }
    // The restarted Redis is empty, and the epoch moved: fresh answers, then hits again.
    assert_eq!(simple_value(&client, &read).await, "while_down");
    let before = executions(&t).await;
    assert_eq!(simple_value(&client, &read).await, "while_down");
    assert_eq!(executions(&t).await, before, "served from the cache again");

    // Flushed under a running proxy: still right.
    redis.cli(&["FLUSHALL"]);
    assert_eq!(simple_value(&client, &read).await, "while_down");
    client
        .execute(
            &format!("UPDATE {t} SET v = 'after_flush' WHERE id = 1"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(simple_value(&client, &read).await, "after_flush");
    redis.kill();
}

#[tokio::test]
async fn writes_the_proxy_cannot_attribute_invalidate_everything() {
    let t = unique("cache_epoch");
    make_table(&t).await;
    let c = cluster();
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION {t}_set(val text) RETURNS text LANGUAGE sql AS
               $$ UPDATE {t} SET v = val WHERE id = 1 RETURNING v $$;
             CREATE PROCEDURE {t}_proc(val text) LANGUAGE sql AS
               $$ UPDATE {t} SET v = val WHERE id = 1 $$;
             GRANT EXECUTE ON FUNCTION {t}_set(text) TO app;
             GRANT EXECUTE ON PROCEDURE {t}_proc(text) TO app;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let client = proxy.app().await;
    let read = format!("SELECT v FROM {t} WHERE id = 1");
    let writes = [
        (
            "do",
            format!("DO $$ BEGIN UPDATE {t} SET v = 'do' WHERE id = 1; END $$"),
        ),
        // Outside a transaction: a replica refuses it, the primary runs it.
        ("fn", format!("SELECT {t}_set('fn')")),
        // Inside one: it runs on the primary straight away.
        ("tx", format!("BEGIN; SELECT {t}_set('tx'); COMMIT")),
        ("call", format!("CALL {t}_proc('call')")),
    ];
    for (value, sql) in writes {
        simple_value(&client, &read).await;
        simple_value(&client, &read).await;
        client.batch_execute(&sql).await.unwrap();
        assert_eq!(simple_value(&client, &read).await, value, "after {sql}");
    }
}

/// What only prepares (a driver's Parse and Describe of an INSERT) writes nothing and
/// invalidates nothing; what executes a statement pgsplit cannot see (an SQL-level
/// PREPAREd UPDATE run through the protocol, as libpq's PQexecPrepared does) may write
/// anything and invalidates everything.
#[tokio::test]
async fn only_what_executes_counts_as_a_write() {
    let t = unique("cache_exec");
    make_table(&t).await;
    direct(cluster().primary)
        .await
        .batch_execute(&format!("GRANT ALL ON {t} TO trustuser"))
        .await
        .unwrap();
    wait_replicated().await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let cache = proxy.shared.cache.clone().expect("cache");
    let client = proxy.app().await;
    let read = format!("SELECT v FROM {t} WHERE id = 1");
    assert_eq!(cached_value(&proxy, &client, &read).await, "v1");

    let invalidations = cache.snapshot().invalidations;
    client
        .prepare(&format!("INSERT INTO {t} VALUES (100, 'prepared only')"))
        .await
        .unwrap();
    assert_eq!(cache.snapshot().invalidations, invalidations);
    let hits = cache.snapshot().hits;
    assert_eq!(simple_value(&client, &read).await, "v1");
    assert_eq!(
        cache.snapshot().hits,
        hits + 1,
        "still served from the cache"
    );

    let mut raw = RawClient::login(proxy.addr, "trustuser").await;
    let prepared = raw
        .send(&message(
            b'Q',
            &cstr(&format!(
                "PREPARE upd_{t} AS UPDATE {t} SET v = 'by PQexecPrepared' WHERE id = 1"
            )),
        ))
        .await;
    assert_eq!(error_code(&prepared), None, "{prepared:?}");
    let mut req = bind(&format!("upd_{t}"));
    req.extend(execute());
    req.extend(sync());
    let ran = raw.send(&req).await;
    assert_eq!(error_code(&ran), None, "{ran:?}");
    assert_eq!(simple_value(&client, &read).await, "by PQexecPrepared");
}

#[tokio::test]
async fn cascades_and_triggers_invalidate_what_they_change() {
    let (parent, child, audit, log) = (
        unique("cache_parent"),
        unique("cache_child"),
        unique("cache_audit"),
        unique("cache_log"),
    );
    let c = cluster();
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {parent} (id int PRIMARY KEY);
             CREATE TABLE {child} (id int PRIMARY KEY,
                 parent_id int REFERENCES {parent} ON DELETE CASCADE);
             INSERT INTO {parent} VALUES (1), (2);
             INSERT INTO {child} VALUES (1, 1), (2, 1), (3, 2);
             CREATE TABLE {audit} (n int);
             INSERT INTO {audit} VALUES (0);
             CREATE TABLE {log} (msg text);
             CREATE FUNCTION {log}_fn() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN UPDATE {audit} SET n = n + 1; RETURN NEW; END $$;
             CREATE TRIGGER {log}_trg AFTER INSERT ON {log}
               FOR EACH ROW EXECUTE FUNCTION {log}_fn();
             GRANT ALL ON {parent}, {child}, {audit}, {log} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    // Only the tables read are whitelisted: the writes go to tables no rule names.
    let proxy = cache_proxy(&unique("p"), &[&child, &audit], &[]).await;
    let client = proxy.app().await;

    let count = format!("SELECT count(*) FROM {child}");
    assert_eq!(simple_value(&client, &count).await, "3");
    assert_eq!(simple_value(&client, &count).await, "3");
    client
        .batch_execute(&format!("DELETE FROM {parent} WHERE id = 1"))
        .await
        .unwrap();
    assert_eq!(
        simple_value(&client, &count).await,
        "1",
        "the cascade invalidated"
    );

    let n = format!("SELECT n FROM {audit}");
    assert_eq!(simple_value(&client, &n).await, "0");
    assert_eq!(simple_value(&client, &n).await, "0");
    client
        .batch_execute(&format!("INSERT INTO {log} VALUES ('x')"))
        .await
        .unwrap();
    assert_eq!(
        simple_value(&client, &n).await,
        "1",
        "the trigger's write invalidated"
    );
}

/// A COMMIT that leaves a transaction block open behind it (COMMIT AND CHAIN, or
/// `COMMIT; BEGIN` in one Query) has committed: others must miss what it outdated at
/// once, not when the chained block ends.
#[tokio::test]
async fn a_commit_and_chain_invalidates_at_the_commit() {
    let t = unique("cache_chain");
    make_table(&t).await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let (writer, reader) = (proxy.app().await, proxy.app().await);
    let read = format!("SELECT v FROM {t} WHERE id = 1");
    for (n, commit) in ["COMMIT AND CHAIN", "COMMIT; BEGIN"]
        .into_iter()
        .enumerate()
    {
        cached_value(&proxy, &reader, &read).await;
        let value = format!("chained{n}");
        writer
            .batch_execute(&format!(
                "BEGIN; UPDATE {t} SET v = '{value}' WHERE id = 1; {commit}"
            ))
            .await
            .unwrap();
        // Replicated first: the miss that must follow reads a replica.
        wait_replicated().await;
        assert_eq!(
            simple_value(&reader, &read).await,
            value,
            "after {commit}, with the chained block still open"
        );
        // A write in the chained block is invalidated at its own commit.
        let later = format!("later{n}");
        writer
            .batch_execute(&format!(
                "UPDATE {t} SET v = '{later}' WHERE id = 1; COMMIT"
            ))
            .await
            .unwrap();
        assert_eq!(simple_value(&reader, &read).await, later, "{commit}");
    }
}

/// A transaction whose server connection is lost while it holds writes may have committed
/// (the COMMIT went out, its answer did not come back): the session ends, and the cache
/// must not keep what the write may have outdated. Here the server is terminated before the
/// COMMIT, so nothing committed; the whole cache is invalidated all the same.
#[tokio::test]
async fn a_transaction_lost_with_its_writes_invalidates_the_cache() {
    let t = unique("cache_doubt");
    make_table(&t).await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let cache = proxy.shared.cache.clone().expect("cache");
    let client = proxy.app().await;
    client
        .batch_execute(&format!("BEGIN; UPDATE {t} SET v = 'doubt' WHERE id = 1"))
        .await
        .unwrap();
    let before = cache.snapshot().invalidations;
    terminate_primary_backend(&client).await;
    assert!(
        client.batch_execute("COMMIT").await.is_err(),
        "the COMMIT's connection is gone"
    );
    assert!(
        eventually(Duration::from_secs(10), || cache.snapshot().invalidations
            > before)
        .await,
        "the commit in doubt invalidated: {:?}",
        cache.snapshot()
    );
}

/// A write made under `SET LOCAL search_path` (schema-per-tenant behind a transaction
/// pooler): the relations it reaches are looked up after the COMMIT, when that path is gone,
/// so the lookup must find the tenant's table by its name in any schema, or the cascade it
/// caused would not invalidate the reads of the tenant's other table.
#[tokio::test]
async fn a_write_under_a_local_search_path_reaches_what_it_cascades_to() {
    let (schema, parent, child) = (
        unique("cache_tenant"),
        unique("cache_tparent"),
        unique("cache_tchild"),
    );
    let c = cluster();
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.{parent} (id int PRIMARY KEY);
             CREATE TABLE {schema}.{child} (id int PRIMARY KEY,
                 parent_id int REFERENCES {schema}.{parent} ON DELETE CASCADE);
             INSERT INTO {schema}.{parent} VALUES (1), (2);
             INSERT INTO {schema}.{child} VALUES (1, 1), (2, 1), (3, 2);
             GRANT USAGE ON SCHEMA {schema} TO app;
             GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let proxy = cache_proxy(&unique("p"), &[&child], &[]).await;
    let (writer, reader) = (proxy.app().await, proxy.app().await);
    reader
        .batch_execute(&format!("SET search_path = {schema}"))
        .await
        .unwrap();
    let count = format!("SELECT count(*) FROM {child}");
    assert_eq!(cached_value(&proxy, &reader, &count).await, "3");
    for local in [
        format!("SET LOCAL search_path = {schema}"),
        format!("SELECT set_config('search_path', '{schema}', true)"),
    ] {
        let id = if local.starts_with("SET") { 1 } else { 2 };
        writer
            .batch_execute(&format!(
                "BEGIN; {local}; DELETE FROM {parent} WHERE id = {id}; COMMIT"
            ))
            .await
            .unwrap();
        let left = if id == 1 { "1" } else { "0" };
        assert_eq!(
            simple_value(&reader, &count).await,
            left,
            "the cascade of a delete under {local:?} invalidated"
        );
    }
}

/// A row-level security policy that reads another table: a write to that table changes
/// what the policy lets a user see, so it invalidates the reads of the policy's table.
#[tokio::test]
async fn a_write_a_security_policy_reads_invalidates_the_tables_it_guards() {
    let (docs, members) = (unique("cache_docs"), unique("cache_members"));
    let c = cluster();
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {docs} (id int, team int);
             CREATE TABLE {members} (team int, who text);
             INSERT INTO {docs} VALUES (1, 7), (2, 8);
             INSERT INTO {members} VALUES (7, 'app');
             ALTER TABLE {docs} ENABLE ROW LEVEL SECURITY;
             CREATE POLICY {docs}_team ON {docs}
               USING (team IN (SELECT team FROM {members} WHERE who = current_user));
             GRANT ALL ON {docs}, {members} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    // Only the guarded table is whitelisted.
    let proxy = cache_proxy(&unique("p"), &[&docs], &[]).await;
    let client = proxy.app().await;
    let visible = format!("SELECT count(*) FROM {docs}");
    assert_eq!(cached_value(&proxy, &client, &visible).await, "1");
    client
        .batch_execute(&format!("DELETE FROM {members} WHERE team = 7"))
        .await
        .unwrap();
    assert_eq!(
        simple_value(&client, &visible).await,
        "0",
        "the membership's removal invalidated what the policy showed"
    );
}

/// Writes reach cached reads through other relations too: a base table's reads after an
/// update through its view, a view's reads after a write to its base table, a partitioned
/// table's reads after an insert into one partition, and a rule's target.
#[tokio::test]
async fn writes_through_views_partitions_and_rules_invalidate_what_they_change() {
    let (base, view, parted, rule_src, rule_dst) = (
        unique("cache_base"),
        unique("cache_view"),
        unique("cache_parted"),
        unique("cache_rsrc"),
        unique("cache_rdst"),
    );
    let c = cluster();
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {base} (id int PRIMARY KEY, v text);
             INSERT INTO {base} VALUES (1, 'a');
             CREATE VIEW {view} AS SELECT id, v FROM {base} WHERE id > 0;
             CREATE TABLE {parted} (id int, v text) PARTITION BY RANGE (id);
             CREATE TABLE {parted}_low PARTITION OF {parted} FOR VALUES FROM (0) TO (100);
             CREATE TABLE {parted}_high PARTITION OF {parted} FOR VALUES FROM (100) TO (200);
             INSERT INTO {parted} VALUES (1, 'a'), (150, 'h');
             ALTER TABLE {parted}_high OWNER TO app;
             CREATE TABLE {base}_kid () INHERITS ({base});
             INSERT INTO {base}_kid VALUES (7, 'k');
             ALTER TABLE {base}_kid OWNER TO app;
             CREATE TABLE {rule_src} (id int);
             CREATE TABLE {rule_dst} (id int);
             CREATE RULE {rule_src}_r AS ON INSERT TO {rule_src}
               DO ALSO INSERT INTO {rule_dst} VALUES (NEW.id);
             GRANT ALL ON {base}, {view}, {parted}, {parted}_low, {rule_src}, {rule_dst} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let proxy = cache_proxy(&unique("p"), &[&base, &view, &parted, &rule_dst], &[]).await;
    let client = proxy.app().await;
    let cases = [
        (
            format!("SELECT v FROM {base} WHERE id = 1"),
            format!("UPDATE {view} SET v = 'b' WHERE id = 1"),
            "a",
            "b",
            "an update through the view",
        ),
        (
            format!("SELECT v FROM {view} WHERE id = 1"),
            format!("UPDATE {base} SET v = 'c' WHERE id = 1"),
            "b",
            "c",
            "an update of the view's base table",
        ),
        (
            format!("SELECT count(*) FROM {parted}"),
            format!("INSERT INTO {parted}_low VALUES (2, 'b')"),
            "2",
            "3",
            "an insert into a partition",
        ),
        // DDL whose commit can no longer name the parent it changed.
        (
            format!("SELECT count(*) FROM {parted}"),
            format!("DROP TABLE {parted}_high"),
            "3",
            "2",
            "a partition dropped",
        ),
        (
            format!("SELECT count(*) FROM {base}"),
            format!("ALTER TABLE {base}_kid NO INHERIT {base}"),
            "2",
            "1",
            "a child taken out of its parent",
        ),
        (
            format!("SELECT count(*) FROM {rule_dst}"),
            format!("INSERT INTO {rule_src} VALUES (1)"),
            "0",
            "1",
            "an insert its rule copies",
        ),
    ];
    for (read, write, before, after, what) in cases {
        assert_eq!(cached_value(&proxy, &client, &read).await, before, "{what}");
        client.batch_execute(&write).await.unwrap();
        assert_eq!(
            simple_value(&client, &read).await,
            after,
            "{what} invalidated"
        );
    }
}

/// Texts in another client encoding: their lossy UTF-8 view is the same for 'Caf\xE9' and
/// 'Caf\xE8', so such texts must not be keyed on it.
#[tokio::test]
async fn texts_in_another_client_encoding_never_share_an_entry() {
    let t = unique("cache_latin1");
    let c = cluster();
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (id int, v text);
             INSERT INTO {t} VALUES (1, 'Café'), (2, 'Cafè');
             GRANT SELECT ON {t} TO trustuser;"
        ))
        .await
        .unwrap();
    wait_replicated().await;
    let proxy = cache_proxy(&unique("p"), &[&t], &[]).await;
    let mut raw = RawClient::login(proxy.addr, "trustuser").await;
    let set = raw
        .send(&query_message(b"SET client_encoding = 'LATIN1'"))
        .await;
    assert_eq!(error_code(&set), None, "{set:?}");
    for _ in 0..2 {
        for (byte, id) in [(0xE9u8, b'1'), (0xE8, b'2')] {
            let mut sql = format!("SELECT id FROM {t} WHERE v = 'Caf").into_bytes();
            sql.extend_from_slice(&[byte, b'\'']);
            let msgs = raw.send(&query_message(&sql)).await;
            let row = msgs.iter().find(|m| m.0 == b'D').expect("a row");
            assert_eq!(row.1.last(), Some(&id), "{msgs:?}");
        }
    }
}

fn query_message(sql: &[u8]) -> Vec<u8> {
    let mut body = sql.to_vec();
    body.push(0);
    message(b'Q', &body)
}
