//! TLS: psql reaches pgsplit with `sslmode=verify-full` against the certificate
//! scripts/gen-cert made, and pgsplit reaches the servers (which scripts/cluster runs with
//! `ssl = on`) with each `server_tls` mode.

use std::process::Command;

use crate::common::*;

fn tls_files(c: &Cluster) -> (String, String, String) {
    (
        c.env["PGSPLIT_TLS_CA"].clone(),
        c.env["PGSPLIT_TLS_CERT"].clone(),
        c.env["PGSPLIT_TLS_KEY"].clone(),
    )
}

/// psql through `port` with extra conninfo; (success, stdout + stderr).
fn psql(port: u16, conninfo: &str, command: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            &format!("host=127.0.0.1 port={port} user=app dbname=appdb {conninfo}"),
            "-c",
            command,
        ])
        .env("PGPASSWORD", "app_pw")
        .output()
        .expect("psql runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn with_tls_lines(c: &Cluster, lines: &str) -> String {
    with_proxy_settings(&base_config_toml(c), lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_connects_with_verify_full_and_plain_clients_can_be_refused() {
    let c = cluster();
    let (ca, cert, key) = tls_files(c);
    let proxy = start_proxy_with(&with_tls_lines(
        c,
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\""),
    ))
    .await;
    let port = proxy.port();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        psql(
            port,
            &format!("sslmode=verify-full sslrootcert={ca}"),
            "\\conninfo",
        )
    })
    .await
    .unwrap();
    assert!(ok && out.contains("SSL connection"), "{out}");
    let (ok, out) =
        tokio::task::spawn_blocking(move || psql(port, "sslmode=require", "SELECT 40 + 2"))
            .await
            .unwrap();
    assert!(ok && out.trim() == "42", "{out}");
    // Over TLS, SCRAM with channel binding (libpq computes tls-server-end-point from the
    // certificate pgsplit presents; a mismatch fails the login).
    let (ok, out) = tokio::task::spawn_blocking(move || {
        psql(port, "sslmode=require channel_binding=require", "SELECT 43")
    })
    .await
    .unwrap();
    assert!(ok && out.trim() == "43", "{out}");
    // Without TLS there is nothing to bind to: a client that requires it is refused.
    let (ok, out) = tokio::task::spawn_blocking(move || {
        psql(port, "sslmode=disable channel_binding=require", "SELECT 1")
    })
    .await
    .unwrap();
    assert!(!ok && out.contains("channel binding"), "{out}");
    // Without tls_required, plain clients still work.
    app_select_one(&proxy).await;

    let (_, cert, key) = tls_files(c);
    let strict = start_proxy_with(&with_tls_lines(
        c,
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\ntls_required = true"),
    ))
    .await;
    let e = try_connect(&strict.conn_str("app", "app_pw"))
        .await
        .expect_err("a plain client is refused");
    assert_eq!(sqlstate(&e), "28000");
    assert!(format!("{e:?}").contains("requires TLS"), "{e:?}");
    let port = strict.port();
    let (ok, out) = tokio::task::spawn_blocking(move || psql(port, "sslmode=require", "SELECT 1"))
        .await
        .unwrap();
    assert!(ok, "{out}");
}

async fn app_select_one(proxy: &Proxy) {
    proxy.app().await.simple_query("SELECT 1").await.unwrap();
}

/// Whether the server connections that answer run over TLS: two reads (both replicas) and
/// one in a transaction (the primary). Through a view of `pg_stat_ssl`: pgsplit reads the
/// pg_stat_* views themselves on the primary, as views of the node's own activity.
async fn server_side_tls(proxy: &Proxy) -> Vec<bool> {
    let view = unique("own_ssl");
    run_as_superuser(&format!(
        "CREATE VIEW {view} AS SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid(); \
         GRANT SELECT ON {view} TO app"
    ))
    .await;
    wait_replicated().await;
    let sql = format!("SELECT ssl, inet_server_port() FROM {view}");
    let client = proxy.app().await;
    let mut seen = Vec::new();
    let mut ports = std::collections::HashSet::new();
    for _ in 0..2 {
        let row = client.query_one(&sql, &[]).await.unwrap();
        ports.insert(row.get::<_, i32>(1) as u16);
        seen.push(row.get::<_, bool>(0));
    }
    assert!(
        ports.iter().all(|p| cluster().replicas.contains(p)),
        "{ports:?}"
    );
    client.batch_execute("BEGIN").await.unwrap();
    seen.push(client.query_one(&sql, &[]).await.unwrap().get::<_, bool>(0));
    client.batch_execute("COMMIT").await.unwrap();
    seen
}

#[tokio::test]
async fn server_tls_modes_reach_postgres_as_configured() {
    let c = cluster();
    let (ca, _, _) = tls_files(c);
    let verified = start_proxy_with(&with_tls_lines(
        c,
        &format!("server_tls = \"verify-full\"\nserver_tls_ca = \"{ca}\""),
    ))
    .await;
    assert_eq!(server_side_tls(&verified).await, vec![true; 3]);
    let required = start_proxy_with(&with_tls_lines(c, "server_tls = \"require\"")).await;
    assert_eq!(server_side_tls(&required).await, vec![true; 3]);
    let chained = start_proxy_with(&with_tls_lines(
        c,
        &format!("server_tls = \"verify-ca\"\nserver_tls_ca = \"{ca}\""),
    ))
    .await;
    assert_eq!(server_side_tls(&chained).await, vec![true; 3]);
    let plain = start_proxy_with(&with_tls_lines(c, "server_tls = \"disable\"")).await;
    assert_eq!(server_side_tls(&plain).await, vec![false; 3]);

    // A CA the servers' certificates do not chain to: no connection, a clear error.
    let other = tempfile::tempdir().unwrap();
    let status = Command::new(repo_root().join("scripts/gen-cert"))
        .arg(other.path())
        .status()
        .unwrap();
    assert!(status.success());
    // `require` with a CA checks the chain too, as libpq's does (it is verify-ca).
    for mode in ["verify-full", "verify-ca", "require"] {
        let wrong = start_proxy_with(&with_tls_lines(
            c,
            &format!(
                "server_tls = \"{mode}\"\nserver_tls_ca = \"{}\"",
                other.path().join("ca.crt").display()
            ),
        ))
        .await;
        let e = try_connect(&wrong.conn_str("app", "app_pw"))
            .await
            .expect_err("an unverifiable server is refused");
        assert!(
            format!("{e:?}").to_lowercase().contains("certificate"),
            "{mode}: the error names the certificate problem: {e:?}"
        );
    }
}

#[test]
fn bad_certificate_paths_are_a_config_error() {
    let c = cluster();
    let toml = with_tls_lines(
        c,
        "tls_cert = \"/nonexistent/server.crt\"\ntls_key = \"/nonexistent/server.key\"",
    );
    let config = pgsplit::config::Config::from_toml(&toml).unwrap();
    let err = pgsplit::state::Runtime::new(config)
        .err()
        .expect("missing files are refused")
        .to_string();
    assert!(err.contains("tls_cert"), "{err}");
}
