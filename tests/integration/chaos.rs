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

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// pgbench clients per run: enough for contention on a 2-core machine, few enough that the
/// cluster, the proxy and pgbench all get CPU.
const CLIENTS: usize = 8;

/// The proxy may end a little above the RSS it had after the warm-up: glibc keeps freed
/// memory in its arenas instead of returning it, and the runs after a fault refill the pools
/// (new server connections, their TLS state and statement caches) and the cache client's
/// buffers. Measured here: a baseline of about 29 MiB (debug build) and an end 0.3 to
/// 0.7 MiB above it. 8 MiB is ten times that, and still less than a leak of 2 KiB per
/// transaction would add over the 5,000 or more transactions of this test.
const RSS_MARGIN_KIB: u64 = 8 * 1024;

/// The pgsplit binary, killed when dropped.
struct Pgsplit {
    child: Child,
    port: u16,
    metrics: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): the same PID with
    /// another start time would be another process.
    started: u64,
}

impl Drop for Pgsplit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- last lines of the pgsplit log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

impl Pgsplit {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// VmRSS in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the proxy is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics, path).await
    }

    /// A sample of /metrics whose line carries every `labels` pair (`key="value"`).
    async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .find(|l| labels.iter().all(|kv| l.contains(kv)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Wait until /health says the primary and both replicas are in use.
    async fn wait_all_up(&self, what: &str) {
        self.wait_health("ok: primary up, 2 replica(s)", 40, what)
            .await
    }

    /// Wait until /health counts `n` replicas in the rotation (the primary up).
    async fn wait_replicas_in_rotation(&self, n: usize, what: &str) {
        self.wait_health(&format!("ok: primary up, {n} replica(s)"), 10, what)
            .await
    }

    async fn wait_health(&self, want: &str, seconds: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let health = self.get("/health").await;
            if matches!(&health, Some((200, b)) if b.starts_with(want)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: /health never said {want:?}, last: {health:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A GET over a fresh connection, or None if nothing answered within 5 s.
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: pgsplit\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start_pgsplit(dir: &Path, toml: &str) -> Pgsplit {
    let config = dir.join("proxy.toml");
    write_atomically(&config, toml);
    let log = dir.join("pgsplit.log");
    let child = Command::new(env!("CARGO_BIN_EXE_pgsplit"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--log",
            // The cache's failed Redis probes, should it not recover.
            "info,pgsplit::cache=debug",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the pgsplit binary");
    let started = proc_start_ticks(child.id()).expect("pgsplit runs");
    let field = |key: &str| -> String {
        toml.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| {
                v.trim_matches(|c| c == ' ' || c == '=' || c == '"')
                    .to_owned()
            })
            .unwrap()
    };
    let listen: SocketAddr = field("listen").parse().unwrap();
    let proxy = Pgsplit {
        child,
        port: listen.port(),
        metrics: field("metrics_listen").parse().unwrap(),
        config,
        log,
        started,
    };
    proxy.wait_all_up("start-up").await;
    proxy
}

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

/// PIDs of a node's postmaster and of its children (backends, walreceiver, ...).
fn postgres_pids(c: &Cluster, node: &str) -> Vec<u32> {
    let Ok(pidfile) = std::fs::read_to_string(c.dir.join(node).join("postmaster.pid")) else {
        return Vec::new();
    };
    let Some(postmaster) = pidfile.lines().next().and_then(|l| l.trim().parse().ok()) else {
        return Vec::new();
    };
    let children =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
            .unwrap_or_default();
    std::iter::once(postmaster)
        .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect()
}

fn send_signal(sig: &str, pids: &[u32]) -> bool {
    !pids.is_empty()
        && Command::new("kill")
            .arg(format!("-{sig}"))
            .args(pids.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

async fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "killed processes linger: {pids:?}"
        );
        pause(50).await;
    }
}

fn redis_pid(c: &Cluster) -> u32 {
    std::fs::read_to_string(c.dir.join("redis/redis.pid"))
        .expect("redis.pid")
        .trim()
        .parse()
        .expect("a pid in redis.pid")
}

/// Resumes and starts every node of the failure cluster when dropped, so that the tests
/// after this one find it whole even when an assertion here failed mid-fault.
struct RestoreCluster(&'static Cluster);

impl Drop for RestoreCluster {
    fn drop(&mut self) {
        for node in ["primary", "replica1", "replica2"] {
            send_signal("CONT", &postgres_pids(self.0, node));
        }
        for node in ["primary", "replica1", "replica2", "redis"] {
            // Starting a node that runs is a no-op.
            let _ = Command::new(repo_root().join("scripts/cluster"))
                .args(["start-node", node, "--dir"])
                .arg(&self.0.dir)
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// What one pgbench run reported.
struct Run {
    name: &'static str,
    tag: i32,
    output: String,
    exit_ok: bool,
    failed: Option<u64>,
    /// Clients pgbench aborted, and when each saw its error (Unix time, seconds).
    aborted: HashMap<u32, f64>,
    /// Per client: transactions the log records as completed.
    committed: HashMap<u32, i64>,
    /// The slowest completed transaction, in ms: how long a fault stalled clients.
    slowest_ms: u64,
}

impl Run {
    fn assert_clean(&self) {
        assert!(
            self.exit_ok && self.failed == Some(0) && self.aborted.is_empty(),
            "{}: pgbench saw errors (aborted clients {:?}):\n{}",
            self.name,
            self.aborted,
            self.output
        );
        assert_eq!(
            self.committed.len(),
            CLIENTS,
            "{}: every client committed transactions:\n{}",
            self.name,
            self.output
        );
    }

    fn total(&self) -> i64 {
        self.committed.values().sum()
    }
}

/// `pgbench -f script` through the proxy for `seconds`, tagging its rows with `tag`.
fn pgbench_run(name: &'static str, port: u16, script: &Path, tag: i32, seconds: u32) -> Run {
    let logs = tempfile::tempdir().unwrap();
    let prefix = logs.path().join("tx");
    let mut child = Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-j",
            "2",
            "-f",
            script.to_str().unwrap(),
        ])
        .args(["-c", &CLIENTS.to_string(), "-T", &seconds.to_string()])
        .args(["-D", &format!("run={tag}"), "-l", "--log-prefix"])
        .arg(&prefix)
        .arg(format!(
            "host=127.0.0.1 port={port} user=app password=app_pw dbname=appdb"
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pgbench runs");
    // pgbench reports an aborted client on stderr at once: the time a line arrives is the
    // time the client saw its error.
    let stderr = child.stderr.take().unwrap();
    let stamped = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .map(|l| (unix_now(), l))
            .collect::<Vec<_>>()
    });
    let out = child.wait_with_output().expect("pgbench ends");
    let stderr = stamped.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    // "pgbench: error: client 3 script 0 aborted in command 2 query 0: ERROR: ..."
    let aborted = stderr
        .iter()
        .filter(|(_, l)| l.contains(" aborted in command "))
        .filter_map(|(at, l)| {
            let client = l.split_once("client ")?.1.split(' ').next()?.parse().ok()?;
            Some((client, *at))
        })
        .collect();
    let stderr: Vec<&str> = stderr.iter().map(|(_, l)| l.as_str()).collect();
    // Log lines: client_id transaction_no time script_no time_epoch time_us [...]; `time`
    // is a number for a completed transaction ("failed"/"skipped" otherwise).
    let mut committed = HashMap::new();
    let mut slowest_us = 0;
    for entry in std::fs::read_dir(logs.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(us) = f.get(2).and_then(|t| t.parse::<u64>().ok()) else {
                continue;
            };
            assert!(f.len() >= 4, "a pgbench log line: {line}");
            slowest_us = slowest_us.max(us);
            let client: u32 = f[0].parse().expect("client id in the pgbench log");
            *committed.entry(client).or_insert(0) += 1;
        }
    }
    Run {
        name,
        tag,
        output: format!("{stdout}\n{}", stderr.join("\n")),
        exit_ok: out.status.success(),
        failed,
        aborted,
        committed,
        slowest_ms: slowest_us / 1000,
    }
}

/// Every transaction pgbench logged as done left its row on the primary; a client that
/// aborted may have one row more (its commit happened, the reply was lost); a client that
/// did not abort has exactly its logged transactions.
async fn assert_writes_kept(c: &Cluster, table: &str, run: &Run) {
    let primary = direct(c.primary).await;
    let rows: HashMap<u32, i64> = primary
        .query(
            &format!("SELECT client, count(*) FROM {table} WHERE run = $1 GROUP BY client"),
            &[&run.tag],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i32>(0) as u32, r.get(1)))
        .collect();
    for client in 0..CLIENTS as u32 {
        let logged = run.committed.get(&client).copied().unwrap_or(0);
        let stored = rows.get(&client).copied().unwrap_or(0);
        let lost_reply = i64::from(run.aborted.contains_key(&client));
        assert!(
            logged <= stored && stored <= logged + lost_reply,
            "{}: client {client}: pgbench logged {logged} committed transactions, the primary \
             has {stored} rows (aborted: {})",
            run.name,
            lost_reply == 1
        );
    }
}

/// Wait for a run that had to be clean, check its writes, and keep it for the summary.
async fn finish_clean(
    load: tokio::task::JoinHandle<Run>,
    c: &Cluster,
    table: &str,
    runs: &mut Vec<Run>,
) {
    let run = load.await.unwrap();
    run.assert_clean();
    assert_writes_kept(c, table, &run).await;
    runs.push(run);
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// pgbench through `proxy` in the background; the caller injects a fault meanwhile.
fn spawn_run(
    name: &'static str,
    proxy: &Pgsplit,
    script: &Path,
    tag: i32,
    seconds: u32,
) -> tokio::task::JoinHandle<Run> {
    let (port, script) = (proxy.port, script.to_owned());
    tokio::task::spawn_blocking(move || pgbench_run(name, port, &script, tag, seconds))
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

/// Wait up to 10 s for a /metrics gauge to reach `want`.
async fn eventually_metric(proxy: &Pgsplit, name: &str, want: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if proxy.metric(name, &[]).await == Some(want) {
            return true;
        }
        pause(100).await;
    }
    false
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
