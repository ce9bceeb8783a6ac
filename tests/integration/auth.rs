//! Client authentication at the proxy, and server authentication behind it.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::common::*;

#[tokio::test]
async fn scram_md5_and_trust_users_log_in() {
    let proxy = start_proxy().await;
    for (user, pw) in [("app", "app_pw"), ("md5user", "md5_pw"), ("trustuser", "")] {
        let client = connect(&proxy.conn_str(user, pw)).await;
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
    }
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_refused() {
    let proxy = start_proxy().await;
    let e = try_connect(&proxy.conn_str("app", "nope"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e), "28P01", "{e}");
    let e = try_connect(&proxy.conn_str("md5user", "nope"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e), "28P01", "{e}");
    // A user pgsplit does not know is asked for a password too and fails the same way, so
    // probing cannot tell unknown names from wrong passwords.
    let e = try_connect(&proxy.conn_str("mallory", "x"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e), "28P01", "{e}");
    assert_eq!(
        e.as_db_error().map(|d| d.message()),
        Some("password authentication failed for user \"mallory\"")
    );
}

#[tokio::test]
async fn a_scram_verifier_in_the_config_works_without_the_plain_password() {
    let c = cluster();
    let verifier = postgres_protocol::password::scram_sha_256(b"app_pw");
    let toml = base_config_toml(c).replacen(
        "password = \"app_pw\"",
        &format!("password = \"{verifier}\"\n        server_password = \"app_pw\""),
        1,
    );
    let proxy = start_proxy_with(&toml).await;
    let client = proxy.app().await;
    assert_usable(&client).await;
    assert!(try_connect(&proxy.conn_str("app", "wrong")).await.is_err());
}

/// In both pool modes (session mode holds a place in the pool while it logs in).
#[tokio::test]
async fn an_unknown_database_reports_the_servers_error() {
    for proxy in both_modes().await {
        let e = try_connect(&format!(
            "host=127.0.0.1 port={} user=app password=app_pw dbname=nosuchdb",
            proxy.port()
        ))
        .await
        .expect_err("refused");
        assert_eq!(sqlstate(&e), "3D000", "{e}");
        // Made-up names leave no pool behind, however many and however long.
        let pools = || {
            let runtime = proxy.shared.runtime.load();
            (runtime.pools().len(), runtime.place_sets().len())
        };
        let before = pools();
        for i in 0..5 {
            let name = format!("nosuchdb{i}{}", "x".repeat(2_000));
            let e = try_connect(&format!(
                "host=127.0.0.1 port={} user=app password=app_pw dbname={name}",
                proxy.port()
            ))
            .await
            .expect_err("refused");
            assert_eq!(sqlstate(&e), "3D000", "{e}");
            let message = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default();
            assert!(
                message.contains(&format!("nosuchdb{i}xxx")) && !message.contains(&name),
                "the server saw the name cut to 63 bytes: {message}"
            );
        }
        assert_eq!(pools(), before);
        assert_eq!(before, (0, 0), "not even the first one's");
    }
}

/// Startup parameters the server refuses end the session with the server's FATAL, as a
/// direct login ends: at login when pgsplit asks the primary then, else at the first
/// request. pgsplit used to log the client in and fail every request, trying each replica
/// and the primary anew (a new server connection each time). `replication=false` (libpq's
/// `replication=0`) is an ordinary connection, which pgsplit refused to serve.
#[tokio::test]
async fn startup_parameters_the_server_refuses_end_the_session() {
    let proxy = start_proxy().await;
    let bad = format!(
        "host=127.0.0.1 port={} user=app password=app_pw dbname=appdb \
         options='-c work_mem=banana'",
        proxy.port()
    );
    let e = try_connect(&bad).await.expect_err("refused at login");
    assert_eq!(sqlstate(&e), "22023", "{e}");
    // Now the pool knows the login parameters: the first request ends the session.
    let good = proxy.app().await;
    assert_usable(&good).await;
    let client = connect(&bad).await;
    let e = client.simple_query("SELECT 1").await.expect_err("refused");
    assert_eq!(sqlstate(&e), "22023", "{e}");
    assert!(
        eventually(Duration::from_secs(5), || client.is_closed()).await,
        "the session ended"
    );
    assert_usable(&good).await;
    for value in ["false", "0", "off", "No"] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&startup_packet_with("trustuser", &[("replication", value)]))
            .await
            .unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{value}: {msgs:?}");
        s.write_all(&query("SELECT 1")).await.unwrap();
        assert_eq!(tags(&read_messages(&mut s).await), "TDCZ", "{value}");
    }
}

#[tokio::test]
async fn a_primary_that_is_down_gives_a_clear_error_not_a_hang() {
    let c = cluster();
    let dead_port = unused_port();
    let toml = base_config_toml(c).replace(
        &format!("port = {}\n", c.primary),
        &format!("port = {dead_port}\n"),
    );
    for toml in [toml.clone(), session_mode(&toml)] {
        let proxy = start_proxy_with(&toml).await;
        let started = std::time::Instant::now();
        // Logging in works (reads can still be served by the replicas)...
        let client = proxy.app().await;
        assert!(c.replicas.contains(&server_port(&client).await));
        // ...and a write fails at once, saying which server is missing.
        let e = client
            .batch_execute("CREATE TABLE never_made (id int)")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&e), "08006", "{e}");
        let message = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(
            message.contains(&format!("127.0.0.1:{dead_port}")),
            "{message}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}

/// Plain passwords in a file others can read get a warning at start; a private file, or one
/// holding only verifiers, does not.
#[tokio::test]
async fn a_readable_config_with_plain_passwords_is_warned_about() {
    let c = cluster();
    let warning = "the config holds plain passwords and other users can read it";
    let plain = base_config_toml(c);
    let readable = ProxyProcess::start_with_mode(&plain, "info", 0o644).await;
    assert!(
        readable.log_text().contains(warning),
        "{}",
        readable.log_text()
    );
    let private = ProxyProcess::start_with_mode(&plain, "info", 0o600).await;
    assert!(
        !private.log_text().contains(warning),
        "{}",
        private.log_text()
    );
    let verifier = postgres_protocol::password::scram_sha_256(b"app_pw");
    let md5 = postgres_protocol::password::md5(b"md5_pw", "md5user");
    let verifiers_only = plain
        .replacen(
            "password = \"app_pw\"",
            &format!("password = \"{verifier}\""),
            1,
        )
        .replacen("password = \"md5_pw\"", &format!("password = \"{md5}\""), 1)
        .replacen(
            "password = \"admin_password\"",
            &format!(
                "password = \"{}\"",
                postgres_protocol::password::scram_sha_256(b"admin_password")
            ),
            1,
        );
    assert!(!verifiers_only.contains("_pw\""));
    let shared = ProxyProcess::start_with_mode(&verifiers_only, "info", 0o644).await;
    assert!(
        !shared.log_text().contains(warning),
        "{}",
        shared.log_text()
    );
}

/// A client asking for protocol 3.2 (libpq 18 with max_protocol_version=latest) or for
/// `_pq_.` options learns that the proxy speaks 3.0, as from PostgreSQL 17, and logs in.
#[tokio::test]
async fn a_client_asking_for_a_newer_minor_protocol_is_answered_with_3_0() {
    use tokio::io::AsyncWriteExt;
    let proxy = start_proxy().await;
    let mut body = Vec::new();
    body.extend_from_slice(&0x0003_0002i32.to_be_bytes());
    for part in [
        "user",
        "trustuser",
        "database",
        "appdb",
        "_pq_.test_option",
        "on",
    ] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = (body.len() as i32 + 4).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&packet).await.unwrap();
    let msgs = read_messages(&mut s).await;
    let (tag, negotiate) = &msgs[0];
    assert_eq!(*tag, b'v', "{msgs:?}");
    assert_eq!(
        negotiate[..4],
        0x0003_0000i32.to_be_bytes(),
        "the newest version, whole"
    );
    assert_eq!(negotiate[4..8], 1i32.to_be_bytes());
    assert_eq!(&negotiate[8..], b"_pq_.test_option\0");
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "logged in: {msgs:?}");
}
