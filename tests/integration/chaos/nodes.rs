//! Faults for the failure cluster's nodes: signals to a node's processes, and a guard that
//! puts every node back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// PIDs of a node's postmaster and of its children (backends, walreceiver, ...).
pub(super) fn postgres_pids(c: &Cluster, node: &str) -> Vec<u32> {
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

pub(super) fn send_signal(sig: &str, pids: &[u32]) -> bool {
    !pids.is_empty()
        && Command::new("kill")
            .arg(format!("-{sig}"))
            .args(pids.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

pub(super) async fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "killed processes linger: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) fn redis_pid(c: &Cluster) -> u32 {
    std::fs::read_to_string(c.dir.join("redis/redis.pid"))
        .expect("redis.pid")
        .trim()
        .parse()
        .expect("a pid in redis.pid")
}

/// Resumes and starts every node of the failure cluster when dropped, so that the tests
/// after this one find it whole even when an assertion here failed mid-fault.
pub(super) struct RestoreCluster(pub(super) &'static Cluster);

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
