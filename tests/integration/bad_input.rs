//! Hostile or broken clients get a clear error and never hurt the proxy or other sessions.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

async fn logged_in(proxy: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&startup_packet("trustuser")).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "login completes");
    s
}

async fn assert_closed(s: &mut TcpStream) {
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the proxy closes the connection");
}

async fn assert_proxy_serves(proxy: &Proxy) {
    let client = proxy.app().await;
    assert_usable(&client).await;
}

#[tokio::test]
async fn bad_lengths_and_unknown_messages_get_fatal_08p01() {
    let proxy = start_proxy().await;
    let bystander = proxy.app().await;
    for bad in [
        vec![b'Q', 0x7f, 0xff, 0xff, 0xff], // far over the limit
        vec![b'Q', 0xff, 0xff, 0xff, 0xfe], // negative
        vec![b'Q', 0, 0, 0, 2],             // shorter than itself
        vec![b'?', 0, 0, 0, 4],             // no such message type
        vec![b'Q', 0, 0, 0, 7, b'x', 0, 0], // bytes after the query's terminator
        vec![b'B', 0, 0, 0, 5, 0],          // Bind without its statement name
    ] {
        let mut s = logged_in(&proxy).await;
        s.write_all(&bad).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("08P01"),
            "{bad:?}: {msgs:?}"
        );
        assert_closed(&mut s).await;
    }
    // SQL that is not valid in the client encoding is the server's to judge: an ERROR, and
    // the session goes on.
    let mut s = logged_in(&proxy).await;
    s.write_all(&[b'Q', 0, 0, 0, 6, 0xff, 0]).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("22021"), "{msgs:?}");
    s.write_all(&[
        b'Q', 0, 0, 0, 14, b's', b'e', b'l', b'e', b'c', b't', b' ', b'1', b';', 0,
    ])
    .await
    .unwrap();
    let msgs = read_messages(&mut s).await;
    assert!(msgs.iter().any(|m| m.0 == b'D'), "{msgs:?}");
    assert_eq!(
        bystander
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    assert_proxy_serves(&proxy).await;
}

#[tokio::test]
async fn garbage_and_half_messages_do_not_hurt_the_proxy() {
    let proxy = start_proxy().await;
    for garbage in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 64],
        vec![0, 0, 0, 8, 0, 2, 0, 0], // protocol 2.0
        vec![0, 0, 0],
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&garbage).await.unwrap();
        s.shutdown().await.unwrap();
        assert_closed(&mut s).await;
    }
    // A client that disconnects in the middle of a message.
    let mut s = logged_in(&proxy).await;
    s.write_all(&[b'Q', 0, 0, 1, 0, b'S', b'E']).await.unwrap();
    drop(s);
    assert_proxy_serves(&proxy).await;
}

#[tokio::test]
async fn a_startup_that_never_finishes_times_out() {
    let c = cluster();
    let toml = with_proxy_settings(&base_config_toml(c), "client_login_timeout_ms = 300");
    let proxy = start_proxy_with(&toml).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 50]).await.unwrap(); // a startup packet that never arrives
    let started = std::time::Instant::now();
    assert_closed(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_proxy_serves(&proxy).await;
}

#[tokio::test]
async fn the_client_after_the_limit_gets_53300() {
    let c = cluster();
    let toml = with_proxy_settings(&base_config_toml(c), "max_client_connections = 2");
    let proxy = start_proxy_with(&toml).await;
    let a = proxy.app().await;
    let b = proxy.app().await;
    let e = try_connect(&proxy.conn_str("app", "app_pw"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e), "53300", "{e}");
    assert_usable(&a).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = proxy.app().await;
    assert_usable(&again).await;
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_declined() {
    let proxy = start_proxy().await;
    for code in [80877103i32, 80877104] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let mut pkt = 8i32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&code.to_be_bytes());
        s.write_all(&pkt).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        s.write_all(&startup_packet("trustuser")).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'));
    }
}
