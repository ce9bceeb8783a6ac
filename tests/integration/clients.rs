//! Real client programs through the proxy: psql (simple protocol, multi-statement strings,
//! \copy) and pgbench in its three query modes.

use std::process::{Command, Output};

use crate::common::*;

fn psql(proxy: &ProxyHandle, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host=127.0.0.1 port={} user=app dbname=appdb",
            proxy.port()
        ))
        .args(args)
        .env("PGPASSWORD", "app_pw")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("psql runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

/// Run a psql script (without ON_ERROR_STOP) from a file, so COPY data can be inline.
fn psql_script(proxy: &ProxyHandle, script: &str) -> Output {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), script).unwrap();
    Command::new("psql")
        .args(["-X", "-q", "-A", "-t"])
        .arg(format!(
            "host=127.0.0.1 port={} user=app dbname=appdb",
            proxy.port()
        ))
        .arg("-f")
        .arg(file.path())
        .env("PGPASSWORD", "app_pw")
        .output()
        .unwrap()
}

fn ok_stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn psql_simple_queries_multi_statements_and_copy() {
    let c = cluster();
    let proxy = start_proxy().await;
    let p = proxy.clone_handle();
    let t = unique("psql");
    tokio::task::spawn_blocking(move || {
        let proxy = &p;
        // Multi-statement string with a write: all of it on the primary.
        let out = ok_stdout(&psql(
            proxy,
            &[
                "-c",
                &format!("CREATE TABLE {t} (id int, v text); INSERT INTO {t} VALUES (1, 'a'); SELECT inet_server_port()"),
            ],
            None,
        ));
        assert_eq!(out.trim(), c.primary.to_string());
        // Reads only: a replica. (Under load, a replica's health check can time out and
        // take it out for a few seconds, and reads fall back to the primary: a few tries.)
        let read_port = || {
            let out = ok_stdout(&psql(proxy, &["-c", "SELECT 1; SELECT inet_server_port()"], None));
            out.lines().last().unwrap().trim().parse::<u16>().unwrap()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut port = read_port();
        while port == c.primary && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(200));
            port = read_port();
        }
        assert!(c.replicas.contains(&port), "read on {port}");
        // \copy in and out.
        let out = ok_stdout(&psql(
            proxy,
            &["-c", &format!("\\copy {t} from stdin")],
            Some("2\tb\n3\tc\n\\.\n"),
        ));
        assert_eq!(out.trim(), "");
        let out = ok_stdout(&psql(
            proxy,
            &["-c", &format!("\\copy (SELECT * FROM {t} ORDER BY id) to stdout")],
            None,
        ));
        // The copy-out may run on a replica that has not replayed the insert yet; the
        // primary is what counts for the row count check below.
        assert!(out.is_empty() || out.starts_with("1\ta\n"), "{out}");
        // A COPY that fails on bad data leaves the session usable (same psql session).
        let o = psql_script(proxy, &format!("COPY {t} FROM STDIN;\nx\tbad\n\\.\nSELECT 40 + 2;\n"));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(stdout.trim_end().ends_with("42"), "{stdout} {}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("invalid input syntax"));
        // An error ends psql with ON_ERROR_STOP, and says why.
        let o = psql(proxy, &["-c", "SELECT * FROM no_such_table"], None);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
        t
    })
    .await
    .map(|t| async move {
        let n: i64 = rows_on(c.primary, &t).await;
        assert_eq!(n, 3);
    })
    .unwrap()
    .await;
}

#[tokio::test]
async fn pgbench_in_all_query_modes() {
    let c = cluster();
    let proxy = start_proxy().await;
    let port = proxy.port();
    let out = tokio::task::spawn_blocking(move || {
        ensure_pgbench_tables();
        let mut reports = Vec::new();
        for mode in ["simple", "extended", "prepared"] {
            let o = pgbench(
                &["-n", "-S", "-c", "8", "-j", "2", "-t", "100", "-M", mode],
                port,
            );
            assert!(
                o.status.success(),
                "{mode}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            reports.push((mode, String::from_utf8_lossy(&o.stdout).into_owned()));
            // TPC-B-like read/write mix, transactions on the primary.
            let o = pgbench(&["-n", "-c", "4", "-j", "2", "-t", "50", "-M", mode], port);
            assert!(
                o.status.success(),
                "{mode} rw: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            reports.push((mode, String::from_utf8_lossy(&o.stdout).into_owned()));
        }
        reports
    })
    .await
    .unwrap();
    for (mode, report) in out {
        assert!(
            report.contains("number of failed transactions: 0"),
            "{mode}: {report}"
        );
    }
    let history: i64 = direct(c.primary)
        .await
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        history,
        3 * 4 * 50,
        "every read/write transaction committed on the primary"
    );
}
