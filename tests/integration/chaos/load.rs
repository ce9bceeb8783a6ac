//! The load: one pgbench run per fault, and what it reported (its output, its aborted
//! clients with the time each saw its error, its per-transaction log), checked against the
//! rows on the primary.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use super::proxy::Pgsplit;
use crate::common::*;

/// pgbench clients per run: enough for contention on a 2-core machine, few enough that the
/// cluster, the proxy and pgbench all get CPU.
const CLIENTS: usize = 8;

/// What one pgbench run reported.
pub(super) struct Run {
    pub(super) name: &'static str,
    tag: i32,
    pub(super) output: String,
    exit_ok: bool,
    pub(super) failed: Option<u64>,
    /// Clients pgbench aborted, and when each saw its error (Unix time, seconds).
    pub(super) aborted: HashMap<u32, f64>,
    /// Per client: transactions the log records as completed.
    committed: HashMap<u32, i64>,
    /// The slowest completed transaction, in ms: how long a fault stalled clients.
    pub(super) slowest_ms: u64,
}

impl Run {
    pub(super) fn assert_clean(&self) {
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

    pub(super) fn total(&self) -> i64 {
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
pub(super) async fn assert_writes_kept(c: &Cluster, table: &str, run: &Run) {
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
pub(super) async fn finish_clean(
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

pub(super) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// pgbench through `proxy` in the background; the caller injects a fault meanwhile.
pub(super) fn spawn_run(
    name: &'static str,
    proxy: &Pgsplit,
    script: &Path,
    tag: i32,
    seconds: u32,
) -> tokio::task::JoinHandle<Run> {
    let (port, script) = (proxy.port, script.to_owned());
    tokio::task::spawn_blocking(move || pgbench_run(name, port, &script, tag, seconds))
}
