//! The pgsplit binary as a child process: its /metrics and /health, its RSS, its log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pgsplit binary, killed when dropped.
pub(super) struct Pgsplit {
    pub(super) child: Child,
    pub(super) port: u16,
    metrics: SocketAddr,
    pub(super) config: PathBuf,
    log: PathBuf,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): the same PID with
    /// another start time would be another process.
    pub(super) started: u64,
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
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// VmRSS in KiB.
    pub(super) fn rss_kib(&self) -> u64 {
        let kib = crate::common::rss_kib(&self.pid().to_string());
        assert!(kib > 0, "the proxy is running");
        kib
    }

    pub(super) async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics, path).await
    }

    /// A sample of /metrics whose line carries every `labels` pair (`key="value"`).
    pub(super) async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .find(|l| labels.iter().all(|kv| l.contains(kv)))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Wait until /health says the primary and both replicas are in use.
    pub(super) async fn wait_all_up(&self, what: &str) {
        self.wait_health("ok: primary up, 2 replica(s)", 40, what)
            .await
    }

    /// Wait until /health counts `n` replicas in the rotation (the primary up).
    pub(super) async fn wait_replicas_in_rotation(&self, n: usize, what: &str) {
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

pub(super) fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub(super) fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub(super) async fn start_pgsplit(dir: &Path, toml: &str) -> Pgsplit {
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

/// Wait up to 10 s for a /metrics gauge to reach `want`.
pub(super) async fn eventually_metric(proxy: &Pgsplit, name: &str, want: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if proxy.metric(name, &[]).await == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
