//! Chaos under load: the real pgsplit binary in front of the failure cluster, the Redis cache
//! on, and a pgbench read/write mix through it while, one after the other, a replica is
//! killed with SIGKILL, a replica is paused with SIGSTOP, the primary restarts, Redis is
//! killed and the configuration is reloaded with SIGHUP. Then: every write pgbench counted as
//! committed is on the primary, no client saw an error except while the primary itself was
//! down, the proxy's memory is back near its baseline, and it is still the same process.
//!
//! Also: a proxy started while Redis is down takes the cache into use once Redis is up.
//!
//! pgbench (15) aborts a client at its first error that it cannot retry, so the load is one
//! short pgbench run per fault; each run writes rows tagged with its own number
//! (`-D run=N`) and the pgbench client's id, which the per-transaction log (`-l`) is then
//! compared with.

mod load;
mod nodes;
mod proxy;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use load::*;
use nodes::*;
use proxy::*;

/// The proxy may end a little above the RSS it had after the warm-up: glibc keeps freed
/// memory in its arenas instead of returning it, and the runs after a fault refill the pools
/// (new server connections, their TLS state and statement caches) and the cache client's
/// buffers. Measured here: a baseline of about 29 MiB (debug build) and an end 0.3 to
/// 0.7 MiB above it. 8 MiB is ten times that, and still less than a leak of 2 KiB per
/// transaction would add over the 5,000 or more transactions of this test.
const RSS_MARGIN_KIB: u64 = 8 * 1024;

/// The failure cluster behind the binary: health checks twice a second, reads of a session
/// that wrote still go to the replicas (so that replica faults meet the load), the result
/// cache on the chaos tables, an admin console and /metrics. Check and connect timeouts stay
/// at their defaults: on a 2-core machine that also builds, a healthy server can take longer
/// than a few hundred ms to accept a connection, and that is no fault of the proxy.
fn chaos_config(c: &Cluster, tables: &[&str]) -> String {
    let rules: String = tables
        .iter()
        .map(|t| format!("[[cache.rules]]\ntable = \"{t}\"\n"))
        .collect();
    let proxy = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n\
         admin_user = \"pgsplit\"\nadmin_password = \"console_pw\"\n",
        unused_port(),
        unused_port()
    );
    base_config_toml(c)
        .replacen("[proxy]\n        listen = \"127.0.0.1:0\"\n", &proxy, 1)
        .replace("\n        ", "\n")
        + &format!(
            "\n[health]\ninterval_ms = 500\n\
             [routing]\nread_your_writes = false\n\
             [cache]\nenabled = true\nredis_url = \"redis://127.0.0.1:{}\"\nkey_prefix = \"{}\"\n\
             timeout_ms = 500\n{rules}",
            c.redis,
            unique("chaos")
        )
}

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_load_loses_no_committed_write_and_the_proxy_survives() {
    let _serial = failure_lock().lock().await;
    let c = failure_cluster();
    let _restore = RestoreCluster(c);
    let test_started = Instant::now();

    let t = unique("chaos");
    let reference = format!("{t}_ref");
    direct(c.primary)
        .await
        .batch_execute(&format!(
            "CREATE TABLE {t} (id bigserial PRIMARY KEY, run int NOT NULL, client int NOT NULL);
             CREATE INDEX ON {t} (run, client);
             CREATE TABLE {reference} (id int PRIMARY KEY, v text);
             INSERT INTO {reference} SELECT i, md5(i::text) FROM generate_series(1, 100) i;
             GRANT ALL ON {t}, {t}_id_seq, {reference} TO app;"
        ))
        .await
        .unwrap();
    wait_replicated_on(c).await;

    let dir = tempfile::tempdir().unwrap();
    // Per transaction: a cached read (the reference table never changes: mostly hits), a
    // read of the table being written (invalidated by every commit: misses, whose fills
    // only a replica that replayed the last commit may serve, so mostly replica1), a read
    // of no table (never cached, round robin over both replicas), and one row written,
    // tagged with the run and the client.
    let script = dir.path().join("chaos.sql");
    std::fs::write(
        &script,
        format!(
            "\\set r random(1, 100)\n\
             SELECT v FROM {reference} WHERE id = :r;\n\
             SELECT count(*) FROM {t} WHERE run = :run AND client = :client_id;\n\
             SELECT inet_server_port(), :client_id;\n\
             INSERT INTO {t} (run, client) VALUES (:run, :client_id);\n"
        ),
    )
    .unwrap();
    let toml = chaos_config(c, &[&t, &reference]);
    let proxy = start_pgsplit(dir.path(), &toml).await;
    assert!(
        eventually_metric(&proxy, "pgsplit_cache_redis_available", 1.0).await,
        "the cache connected to Redis"
    );

    // Warm-up: pools, statement caches, the cache client and the allocator reach their
    // working size. The baseline is taken with the clients gone, as is the final reading.
    let mut runs = Vec::new();
    let load = spawn_run("warm-up", &proxy, &script, 0, 4);
    finish_clean(load, c, &t, &mut runs).await;
    pause(1000).await;
    let rss_baseline = proxy.rss_kib();

    // 1. SIGKILL replica1 (every process of it, as a crash of its machine would), then
    //    bring it back while the load goes on.
    let load = spawn_run("replica1 killed", &proxy, &script, 1, 8);
    pause(1500).await;
    let killed = postgres_pids(c, "replica1");
    assert!(send_signal("KILL", &killed), "kill replica1");
    proxy.wait_replicas_in_rotation(1, "replica1 killed").await;
    // Until its parent reaps it, a dead postmaster's PID still exists, and a new one would
    // refuse to start over its lock file.
    wait_gone(&killed).await;
    cluster_cmd(c, &["start-node", "replica1"]).await;
    finish_clean(load, c, &t, &mut runs).await;
    proxy.wait_all_up("replica1 restarted").await;

    // 2. SIGSTOP replica2 until the proxy took it out of the rotation: its connections hang
    //    rather than fail.
    let load = spawn_run("replica2 paused", &proxy, &script, 2, 8);
    pause(1500).await;
    let paused = postgres_pids(c, "replica2");
    assert!(send_signal("STOP", &paused), "pause replica2");
    proxy.wait_replicas_in_rotation(1, "replica2 paused").await;
    pause(500).await;
    assert!(send_signal("CONT", &paused), "resume replica2");
    finish_clean(load, c, &t, &mut runs).await;
    proxy.wait_all_up("replica2 resumed").await;

    // 3. Restart the primary (fast shutdown, then start). Clients whose write meets the
    //    downtime fail (pgbench then aborts them); nobody may fail before it.
    let load = spawn_run("primary restart", &proxy, &script, 3, 6);
    pause(1500).await;
    let down_from = unix_now();
    cluster_cmd(c, &["stop-node", "primary", "--mode", "fast"]).await;
    cluster_cmd(c, &["start-node", "primary"]).await;
    // pg_ctl returned: the primary accepts connections again.
    let up_at = unix_now();
    let run = load.await.unwrap();
    proxy.wait_all_up("primary restarted").await;
    assert_writes_kept(c, &t, &run).await;
    for (client, at) in &run.aborted {
        // 1 s of slack for the error's way through a loaded machine.
        assert!(
            (down_from..=up_at + 1.0).contains(at),
            "client {client} saw its error {:+.1} s after the primary went down, which took \
             {:.1} s:\n{}",
            at - down_from,
            up_at - down_from,
            run.output
        );
    }
    assert_eq!(run.failed.unwrap_or(0), 0, "{}", run.output);
    let mut seen: Vec<f64> = run.aborted.values().map(|at| at - down_from).collect();
    seen.sort_by(f64::total_cmp);
    eprintln!(
        "chaos: the primary was down for {:.1} s; clients saw errors at {seen:.2?} s into it",
        up_at - down_from
    );
    runs.push(run);
    wait_replicated_on(c).await;

    // 4. With the primary back, clients see no error at all.
    let load = spawn_run("after the primary restart", &proxy, &script, 4, 4);
    finish_clean(load, c, &t, &mut runs).await;

    // 5. SIGKILL Redis, then start it again: the cache is bypassed, nobody notices.
    assert!(
        proxy
            .metric("pgsplit_cache_hits_total", &[])
            .await
            .unwrap_or(0.0)
            > 0.0,
        "the cache answered reads before Redis dies"
    );
    let load = spawn_run("redis killed", &proxy, &script, 5, 7);
    pause(1500).await;
    let redis = redis_pid(c);
    assert!(send_signal("KILL", &[redis]), "kill redis");
    assert!(
        eventually_metric(&proxy, "pgsplit_cache_redis_available", 0.0).await,
        "the proxy noticed that Redis is gone"
    );
    wait_gone(&[redis]).await;
    cluster_cmd(c, &["start-node", "redis"]).await;
    finish_clean(load, c, &t, &mut runs).await;
    assert!(
        eventually_metric(&proxy, "pgsplit_cache_redis_available", 1.0).await,
        "the cache resumes once Redis is back"
    );

    // 6. Reload (SIGHUP) with replica1 weighted 2 and a new cache TTL.
    let applied_before = proxy
        .metric("pgsplit_config_reloads_total", &["result=\"applied\""])
        .await
        .unwrap();
    let load = spawn_run("reload", &proxy, &script, 6, 5);
    pause(1500).await;
    let reloaded = toml
        .replacen(
            &format!("port = {}\n", c.replicas[0]),
            &format!("port = {}\nweight = 2\n", c.replicas[0]),
            1,
        )
        .replacen(
            "timeout_ms = 500\n",
            "timeout_ms = 500\ndefault_ttl_s = 30\n",
            1,
        );
    assert_ne!(reloaded, toml);
    write_atomically(&proxy.config, &reloaded);
    assert!(send_signal("HUP", &[proxy.pid()]), "SIGHUP");
    finish_clean(load, c, &t, &mut runs).await;
    let applied = proxy
        .metric("pgsplit_config_reloads_total", &["result=\"applied\""])
        .await
        .unwrap();
    assert!(
        applied > applied_before,
        "the reload was applied:\n{}",
        proxy.log_text()
    );
    assert_eq!(
        proxy.metric("pgsplit_config_last_reload_failed", &[]).await,
        Some(0.0)
    );

    // The reads went to the replicas (not all to the primary), the proxy is the process it
    // was, it never panicked, and its memory is back near the baseline.
    let replica_reads = proxy
        .metric("pgsplit_queries_total", &["route=\"replica\""])
        .await
        .unwrap();
    assert!(replica_reads > 0.0, "{}", proxy.log_text());
    pause(1000).await;
    let rss_end = proxy.rss_kib();
    let mut proxy = proxy;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "pgsplit exited:\n{}",
        proxy.log_text()
    );
    assert_eq!(proc_start_ticks(proxy.pid()), Some(proxy.started));
    let health = proxy.get("/health").await;
    assert!(
        matches!(&health, Some((200, b)) if b.starts_with("ok")),
        "{health:?}"
    );
    let log = proxy.log_text();
    assert!(!log.contains("panicked"), "pgsplit panicked:\n{log}");

    for run in &runs {
        eprintln!(
            "chaos: {:<26} {:>6} transactions, slowest {:>5} ms, {} aborted client(s)",
            run.name,
            run.total(),
            run.slowest_ms,
            run.aborted.len()
        );
    }
    eprintln!(
        "chaos: pgsplit RSS {rss_baseline} KiB after the warm-up, {rss_end} KiB at the end; \
         {:.0} s in all",
        test_started.elapsed().as_secs_f64()
    );
    assert!(
        rss_end <= rss_baseline + RSS_MARGIN_KIB,
        "pgsplit RSS grew from {rss_baseline} KiB to {rss_end} KiB"
    );

    // Leave the cluster as the other failure tests expect it: every node up, replicas
    // streaming and caught up (the guard only starts what is stopped).
    drop(proxy);
    wait_replicated_on(c).await;
}

/// A redis-server of the test's own, killed when dropped.
struct LateRedis(Child);

impl Drop for LateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_proxy_started_while_redis_is_down_uses_the_cache_once_redis_is_up() {
    let redis_port = unused_port();
    let toml = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[users]]\nname = \"app\"\npassword = \"app_pw\"\n\
         [primary]\nhost = \"127.0.0.1\"\nport = {}\n\
         [cache]\nenabled = true\nredis_url = \"redis://127.0.0.1:{redis_port}\"\n\
         [[cache.rules]]\ntable = \"t\"\n",
        unused_port()
    );
    let proxy = start_proxy_with(&toml).await;
    let cache = proxy.shared.cache.clone().expect("cache enabled");
    // Its first connection attempt is refused.
    pause(1000).await;
    assert!(cache.is_bypassed());
    let _redis = LateRedis(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    assert!(
        eventually(Duration::from_secs(10), || !cache.is_bypassed()).await,
        "the cache never connected to the Redis that came up after the proxy"
    );
}
