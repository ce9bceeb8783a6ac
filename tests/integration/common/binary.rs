//! The real `pgsplit` binary as a child process, for what an in-process proxy cannot show:
//! its own log output, its memory, signals.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{try_connect, unused_port};

pub struct ProxyProcess {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl ProxyProcess {
    /// Start the binary with `toml` (its `listen` replaced by a free port, the file mode
    /// 0600) and `--log log`; returns once it accepts connections.
    pub async fn start(toml: &str, log: &str) -> ProxyProcess {
        Self::start_with_mode(toml, log, 0o600).await
    }

    /// [`ProxyProcess::start`] with the config file's permission bits set to `mode`.
    pub async fn start_with_mode(toml: &str, log: &str, mode: u32) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = unused_port();
        let toml = toml.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        );
        assert!(
            toml.contains(&format!(":{port}\"")),
            "config has no listen = 127.0.0.1:0"
        );
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, toml).unwrap();
        std::fs::set_permissions(
            &config,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pgsplit"))
            .args(["--config", config.to_str().unwrap(), "--log", log])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("pgsplit.log")).unwrap())
            .spawn()
            .expect("pgsplit binary");
        let p = ProxyProcess { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe =
                format!("host=127.0.0.1 port={port} user=trustuser dbname=appdb connect_timeout=2");
            match try_connect(&probe).await {
                Ok(_) => return p,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("pgsplit did not start: {e}\n{}", p.log_text()),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgsplit.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(&self.pid().to_string())
    }

    pub fn conn_str(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=appdb",
            self.port
        )
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of process `pid` ("self": this test process, an in-process proxy's
/// included), KiB.
pub fn rss_kib(pid: &str) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory process `pid` ever had, KiB.
pub fn peak_rss_kib(pid: &str) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
