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
        // Refused at the header, as PostgreSQL refuses them, not once 100 MB came in: a
        // message type no client sends, and a Sync over the small-message cap.
        vec![b'z', 0x05, 0xf5, 0xe1, 0x00],
        vec![b'S', 0x05, 0xf5, 0xe1, 0x00],
        vec![b'E', 0, 0, 0x27, 0x1a], // 10,010 bytes
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
    // SQL that is not valid in the client encoding is the server's to judge, and a Query
    // with bytes after its terminator is malformed: an ERROR each, as PostgreSQL answers
    // them, and the session goes on.
    let mut s = logged_in(&proxy).await;
    for (bad, code) in [
        (&[b'Q', 0, 0, 0, 6, 0xff, 0][..], "22021"),
        (&[b'Q', 0, 0, 0, 7, b'x', 0, 0][..], "08P01"),
    ] {
        s.write_all(bad).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some(code),
            "{bad:?}: {msgs:?}"
        );
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{bad:?}: {msgs:?}");
        s.write_all(&[
            b'Q', 0, 0, 0, 14, b's', b'e', b'l', b'e', b'c', b't', b' ', b'1', b';', 0,
        ])
        .await
        .unwrap();
        let msgs = read_messages(&mut s).await;
        assert!(msgs.iter().any(|m| m.0 == b'D'), "{msgs:?}");
    }
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
    // As many again may wait to be told so; past that, connections are closed at once
    // instead of piling up for the login timeout.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        waiting.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    assert_closed(&mut extra).await;
    assert!(started.elapsed() < Duration::from_secs(2), "closed at once");
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = try_connect(&proxy.conn_str("app", "app_pw"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&e), "53300", "once the waiting ones left: {e}");
    assert_usable(&a).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = proxy.app().await;
    assert_usable(&again).await;
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_declined() {
    const SSL: i32 = 80877103;
    const GSS: i32 = 80877104;
    let proxy = start_proxy().await;
    let request = |code: i32| [8i32.to_be_bytes(), code.to_be_bytes()].concat();
    // Each once, in either order, as PostgreSQL takes them.
    for codes in [&[SSL][..], &[GSS], &[SSL, GSS], &[GSS, SSL]] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        for &code in codes {
            s.write_all(&request(code)).await.unwrap();
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"N", "{codes:?}");
        }
        s.write_all(&startup_packet("trustuser")).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{codes:?}");
    }
    // A second request of one kind is read as a startup packet of protocol 1234.5679 (or
    // .5680): refused, as the server refuses it.
    for code in [SSL, GSS] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&request(code)).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        s.write_all(&request(code)).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(error_code(&msgs).as_deref(), Some("0A000"), "{msgs:?}");
        assert_closed(&mut s).await;
    }
}

/// `options` the server cannot read refuse the login (42601) through pgsplit as on a
/// direct connection, also in transaction mode, which passes on only the settings in them
/// (and dropped what it could not read).
#[tokio::test]
async fn options_the_server_cannot_read_refuse_the_login_in_both_modes() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    for addr in addrs {
        let conn = |options: &str| {
            format!(
                "host=127.0.0.1 port={} user=trustuser dbname=appdb options='{options}'",
                addr.port()
            )
        };
        for bad in ["-c", "-c work_mem", "--work_mem", "work_mem=1MB"] {
            let e = try_connect(&conn(bad)).await.err();
            assert_eq!(
                e.as_ref().and_then(|e| e.code()).map(|c| c.code()),
                Some("42601"),
                "{addr} {bad:?}: {e:?}"
            );
        }
        let client = try_connect(&conn("-c work_mem=5MB")).await.unwrap();
        let value: String = client.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
        assert_eq!(value, "5MB", "{addr}");
    }
}

/// A startup value that is not UTF-8 (the client's encoding is not known yet) reaches the
/// server as PostgreSQL itself would take it: `application_name` shows each such byte as
/// one '?', through pgsplit as on a direct connection.
#[tokio::test]
async fn a_startup_value_in_another_encoding_reads_as_on_a_direct_connection() {
    let (_proxies, addrs) = direct_and_both_modes().await;
    let mut body = 196608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0trustuser\0database\0appdb\0application_name\0caf\xe9\0\0");
    let packet = [(body.len() as i32 + 4).to_be_bytes().to_vec(), body].concat();
    for addr in addrs {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&packet).await.unwrap();
        let login = read_messages(&mut s).await;
        assert_eq!(login.last().map(|m| m.0), Some(b'Z'), "{addr}: {login:?}");
        s.write_all(&query("SELECT current_setting('application_name')"))
            .await
            .unwrap();
        let msgs = read_messages(&mut s).await;
        let row = msgs.iter().find(|m| m.0 == b'D').expect("a row");
        assert!(row.1.ends_with(b"caf?"), "{addr}: {:?}", row.1);
    }
}

/// The ErrorResponse's fields, by their one-letter code.
fn error_field(msgs: &[(u8, Vec<u8>)], field: u8) -> Option<String> {
    let (_, body) = msgs.iter().find(|m| m.0 == b'E')?;
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&field))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

/// A message type no client sends is named by its number, as PostgreSQL names it: a NUL
/// (or a control byte) written into the message text would make the ErrorResponse itself
/// malformed. Before authentication too.
#[tokio::test]
async fn an_unknown_message_type_is_named_by_its_number() {
    let proxy = start_proxy().await;
    for tag in [0u8, 1, 255] {
        let mut s = logged_in(&proxy).await;
        s.write_all(&[tag, 0, 0, 0, 4]).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(
            error_field(&msgs, b'M').as_deref(),
            Some(format!("invalid frontend message type {tag}").as_str()),
            "{msgs:?}"
        );
        // The body is its fields and one final NUL: nothing cut short.
        let (_, body) = msgs.iter().find(|m| m.0 == b'E').unwrap();
        assert!(body.ends_with(&[0, 0]), "{body:?}");
        assert_eq!(body.iter().filter(|&&b| b == 0).count(), 5, "{body:?}");
    }
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&startup_packet("md5user")).await.unwrap();
    read_n_messages(&mut s, 1).await;
    s.write_all(&[0, 0, 0, 0, 4]).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(
        error_field(&msgs, b'M').as_deref(),
        Some("expected password response, got message type 0"),
        "{msgs:?}"
    );
}

/// A PasswordMessage that is not one NUL-terminated string is a protocol violation
/// (08P01 "invalid password packet size", as PostgreSQL answers), not a wrong password.
#[tokio::test]
async fn a_malformed_password_message_is_a_protocol_violation() {
    let proxy = start_proxy().await;
    for body in [&b""[..], b"md5abc", b"md5\0abc\0"] {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&startup_packet("md5user")).await.unwrap();
        let challenge = read_n_messages(&mut s, 1).await;
        assert_eq!(challenge[0].0, b'R', "{challenge:?}");
        s.write_all(&message(b'p', body)).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(
            error_code(&msgs).as_deref(),
            Some("08P01"),
            "{body:?}: {msgs:?}"
        );
        assert_eq!(
            error_field(&msgs, b'M').as_deref(),
            Some("invalid password packet size")
        );
    }
    assert_proxy_serves(&proxy).await;
}

/// Statements out of order, wrong parameter counts, COPY messages outside COPY: each gets
/// the server's (or the proxy's) error and the session goes on.
#[tokio::test]
async fn messages_out_of_protocol_order_get_errors_and_the_session_goes_on() {
    for proxy in both_modes().await {
        let mut s = logged_in(&proxy).await;
        let sync = message(b'S', &[]);
        let mut exchange = async |bytes: Vec<u8>| {
            s.write_all(&bytes).await.unwrap();
            read_messages(&mut s).await
        };
        // Execute of a portal that was never bound; Bind of a statement never parsed.
        let msgs = exchange([execute(), sync.clone()].concat()).await;
        assert_eq!(error_code(&msgs).as_deref(), Some("34000"), "{msgs:?}");
        let msgs = exchange([bind("never_parsed"), execute(), sync.clone()].concat()).await;
        assert_eq!(error_code(&msgs).as_deref(), Some("26000"), "{msgs:?}");
        // Bind with no parameter for a statement that takes one.
        let msgs = exchange(
            [
                parse("", "SELECT $1::int"),
                bind(""),
                execute(),
                sync.clone(),
            ]
            .concat(),
        )
        .await;
        assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
        // COPY data, done and fail outside COPY: PostgreSQL ignores them, so does the session.
        let msgs = exchange(
            [
                message(b'd', b"1\t2\n"),
                message(b'c', &[]),
                message(b'f', &cstr("no copy")),
                query("SELECT 41 + 1"),
            ]
            .concat(),
        )
        .await;
        assert!(
            msgs.iter().any(|m| m.0 == b'D' && m.1.ends_with(b"42")),
            "{msgs:?}"
        );
        // A Sync on its own is answered with ReadyForQuery.
        let msgs = exchange(sync.clone()).await;
        assert_eq!(tags(&msgs), "Z");
        let msgs = exchange(query("SELECT 1")).await;
        assert_eq!(tags(&msgs), "TDCZ", "{msgs:?}");
        // A second password message after login is a protocol violation.
        s.write_all(&message(b'p', &cstr("again"))).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
        assert_proxy_serves(&proxy).await;
    }
}

/// A client that asks for a large result and stops reading holds the proxy's memory to a
/// buffer and its server connection only until `client_write_timeout_ms`.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_server() {
    let c = cluster();
    let toml = with_proxy_settings(&base_config_toml(c), "client_write_timeout_ms = 1000");
    // The binary: its memory is its own, not shared with the tests running beside this one
    // (one classifying an 8 MB text took this test's in-process figure past its bound).
    let proxy = ProxyProcess::start(&toml, "info").await;
    let marker = unique("stalled_reader");
    let rss_before = proxy.rss_kib();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], proxy.port).into();
    let mut s = RawClient::login(addr, "trustuser").await.stream;
    // About 400 MB of rows, never read.
    s.write_all(&query(&format!(
        "SELECT /* {marker} */ repeat('x', 2000) FROM generate_series(1, 200000)"
    )))
    .await
    .unwrap();
    let running = async || {
        let mut n = 0;
        for port in [c.primary, c.replicas[0], c.replicas[1]] {
            n += marked_statements_on(port, &marker).await;
        }
        n
    };
    let mut seen = false;
    for _ in 0..50 {
        if running().await > 0 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the query reached a server");
    // The server connection is given up a second after the client stopped taking bytes.
    let mut gone = false;
    for _ in 0..100 {
        if running().await == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the stalled query still runs on its server");
    let grown = proxy.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "the proxy buffered {grown} KiB of the result"
    );
    // What the client reads now is what the socket buffers held, then the end.
    assert_closed(&mut s).await;
    assert_usable(&connect(&proxy.conn_str("app", "app_pw")).await).await;
}

/// Extended-protocol messages without a Sync go on to the server as they come, as a direct
/// connection takes them, instead of piling up in the proxy (a 7-byte Describe held with its
/// decoded form cost 20 times its size; a client that never sent its Sync could grow the
/// proxy without bound).
#[tokio::test]
async fn extended_messages_without_a_sync_are_passed_on_not_piled_up() {
    let c = cluster();
    // The binary: its memory is its own, not shared with the tests running beside this one.
    let proxy = ProxyProcess::start(&base_config_toml(c), "info").await;
    let marker = unique("unsynced");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], proxy.port).into();
    let (mut rd, mut wr) = RawClient::login(addr, "trustuser")
        .await
        .stream
        .into_split();
    let rss_before = proxy.rss_kib();
    let describes: usize = 600_000;
    let reader = tokio::spawn(async move {
        // ParseComplete, then a ParameterDescription and a RowDescription per Describe,
        // then ReadyForQuery.
        let mut counts = std::collections::HashMap::<u8, usize>::new();
        let mut header = [0u8; 5];
        loop {
            rd.read_exact(&mut header).await.unwrap();
            let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            rd.read_exact(&mut body).await.unwrap();
            *counts.entry(header[0]).or_default() += 1;
            if header[0] == b'Z' {
                return counts;
            }
        }
    });
    let mut parse = format!("\0SELECT /* {marker} */ 1\0").into_bytes();
    parse.extend_from_slice(&[0, 0]);
    wr.write_all(&message(b'P', &parse)).await.unwrap();
    let describe = message(b'D', b"S\0");
    let chunk: Vec<u8> = describe.repeat(10_000);
    for _ in 0..describes / 10_000 {
        wr.write_all(&chunk).await.unwrap();
    }
    // No Sync yet: the statement reached the primary all the same.
    let mut seen = false;
    for _ in 0..100 {
        if marked_statements_on(c.primary, &marker).await > 0 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = proxy.rss_kib().saturating_sub(rss_before);
    wr.write_all(&message(b'S', b"")).await.unwrap();
    let counts = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("every answer comes")
        .unwrap();
    assert!(seen, "the unsynced Parse reached the primary");
    assert_eq!(counts.get(&b'1'), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&b't'), Some(&describes), "{counts:?}");
    assert_eq!(counts.get(&b'T'), Some(&describes), "{counts:?}");
    assert_eq!(counts.get(&b'E'), None, "{counts:?}");
    // Held whole, they took 120 MB.
    assert!(
        grown < 32 * 1024,
        "the proxy held {grown} KiB for {} KiB of messages",
        describes * 7 / 1024
    );
}

/// Answers the proxy makes itself (CloseComplete for a statement the server never had)
/// wait behind a server answer the server has not flushed: an open batch with thousands of
/// them behind an Execute must still be answered whole, as on a direct connection. (The
/// bound on answers due once stopped reading the client there, and both sides waited.)
#[tokio::test]
async fn thousands_of_proxy_answered_closes_behind_an_unflushed_answer_complete() {
    let proxy = start_proxy().await;
    let mut client = RawClient::login(proxy.addr, "trustuser").await;
    let mut request = parse("", "SELECT 1");
    request.extend(bind(""));
    request.extend(execute());
    request.extend(message(b'H', b""));
    request.extend(bind(""));
    request.extend(execute());
    let closes = 20_000;
    for _ in 0..closes {
        request.extend(close_statement("never_prepared"));
    }
    request.extend(sync());
    let messages = client.send(&request).await;
    let count = |t: u8| messages.iter().filter(|m| m.0 == t).count();
    assert_eq!(count(b'3'), closes, "every CloseComplete");
    assert_eq!(count(b'D'), 2, "both rows");
    assert_eq!(messages.last().map(|m| m.0), Some(b'Z'));
}

/// A statement text of 1 MiB or more is classified before it runs: a cancel request then
/// stops it, as PostgreSQL's would while it parses (pgsplit used to drop that cancel, the
/// session having no query running, and the statement ran).
#[tokio::test]
async fn a_cancel_while_a_long_statement_is_classified_stops_it() {
    // The binary: the parser's memory for the text must not count in other tests' figures.
    let proxy = ProxyProcess::start(&base_config_toml(cluster()), "info").await;
    let t = unique("long_cancel");
    let client = connect(&proxy.conn_str("app", "app_pw")).await;
    client
        .batch_execute(&format!("CREATE TABLE {t} (n int)"))
        .await
        .unwrap();
    let token = client.cancel_token();
    let text = format!("INSERT INTO {t} SELECT length('{}')", "x".repeat(8 << 20));
    let (inserted, ()) = tokio::join!(client.simple_query(&text), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let e = inserted.expect_err("cancelled");
    assert_eq!(sqlstate(&e), "57014", "{e}");
    assert_eq!(primary_count(&t).await, 0, "the INSERT never ran");
    assert_usable(&client).await;
}

/// Connections that never finish logging in open no server connection, cost little memory
/// and are closed at `client_login_timeout_ms`.
#[tokio::test]
async fn thousands_of_unauthenticated_clients_open_no_server_connection() {
    let c = cluster();
    let toml = with_proxy_settings(&base_config_toml(c), "client_login_timeout_ms = 3000");
    let proxy = start_proxy_with(&toml).await;
    let server_conns = |proxy: &Proxy| -> usize {
        let (lent, idle) = proxy.pool_counts(|_| true);
        lent + idle
    };
    // Two sockets per connection live in this process: stay well under its file limit.
    let n = (open_file_limit().saturating_sub(200) / 2).min(2000);
    assert!(
        n >= 500,
        "file limit too low for this test: {}",
        open_file_limit()
    );
    let rss_before = rss_kib("self");
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        match i % 3 {
            // Nothing at all.
            0 => {}
            // A startup packet for a SCRAM user, then silence at the password request.
            1 => s.write_all(&startup_packet("app")).await.unwrap(),
            // Half a startup packet.
            _ => s.write_all(&startup_packet("app")[..6]).await.unwrap(),
        }
        pending.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_client = rss_kib("self").saturating_sub(rss_before) / n as u64;
    // Wrong passwords and unknown users do not get further.
    for (user, password) in [("app", "wrong"), ("md5user", "wrong"), ("nobody", "x")] {
        assert!(try_connect(&proxy.conn_str(user, password)).await.is_err());
    }
    assert_eq!(server_conns(&proxy), 0, "a server connection was opened");
    // Both ends of each connection are in this process.
    assert!(
        per_client < 48,
        "{per_client} KiB per unauthenticated client"
    );
    // A real client still gets in meanwhile.
    assert_proxy_serves(&proxy).await;
    // All of them are closed at the login timeout.
    let mut closed = 0;
    for s in &mut pending {
        let mut rest = Vec::new();
        if tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    assert_eq!(closed, n, "connections left open after the login timeout");
}

fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

/// Guessing passwords: every failure is logged with the client's address, optionally
/// delayed, and counted.
#[tokio::test]
async fn failed_logins_are_logged_delayed_and_counted() {
    let c = cluster();
    let toml = with_proxy_settings(&base_config_toml(c), "auth_failure_delay_ms = 400");
    let proxy = ProxyProcess::start(&toml, "info").await;
    for guess in ["guess-one", "guess-two"] {
        let started = std::time::Instant::now();
        let e = try_connect(&proxy.conn_str("app", guess))
            .await
            .expect_err("wrong password refused");
        assert_eq!(sqlstate(&e), "28P01", "{e}");
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "the failure came back after {:?}",
            started.elapsed()
        );
    }
    let e = try_connect(&proxy.conn_str("nobody", "x"))
        .await
        .expect_err("unknown user refused");
    assert_eq!(sqlstate(&e), "28P01", "{e}");
    let ok = connect(&proxy.conn_str("app", "app_pw")).await;
    assert_usable(&ok).await;
    let log = proxy.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("login refused"))
        .collect();
    assert_eq!(refusals.len(), 3, "{log}");
    assert!(
        refusals
            .iter()
            .all(|l| l.contains("127.0.0.1") && l.contains("WARN")),
        "{log}"
    );
    assert!(
        !log.contains("guess-"),
        "a password reached the log:\n{log}"
    );
}

/// What a client sends reaches the log escaped, even at debug: a SASL mechanism name with
/// a line break in it (before any authentication), or a startup value the server quotes
/// in its error, cannot forge a log line. pgsplit logged both as sent.
#[tokio::test]
async fn client_sent_text_cannot_forge_a_log_line() {
    let proxy = ProxyProcess::start(&base_config_toml(cluster()), "debug").await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    s.write_all(&startup_packet("app")).await.unwrap();
    // AuthenticationSASL, then the client's choice.
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], b'R');
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    s.read_exact(&mut vec![0; len - 4]).await.unwrap();
    let mut body = b"x\nFORGED-LINE pgsplit::admin: admin console opened\0".to_vec();
    body.extend(0i32.to_be_bytes());
    s.write_all(&message(b'p', &body)).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    // The pool learns the login's server parameters, then a client whose startup value
    // the primary refuses (quoting it) at its first request.
    assert_usable(&connect(&proxy.conn_str("trustuser", "none")).await).await;
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let bad = [("work_mem", "x\nFORGED-VALUE")];
    s.write_all(&startup_packet_with("trustuser", &bad))
        .await
        .unwrap();
    assert_eq!(read_messages(&mut s).await.last().map(|m| m.0), Some(b'Z'));
    s.write_all(&query("SELECT 1")).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("22023"), "{msgs:?}");
    let logged = eventually(Duration::from_secs(5), || {
        let log = proxy.log_text();
        log.contains("FORGED-LINE") && log.contains("FORGED-VALUE")
    })
    .await;
    let log = proxy.log_text();
    assert!(logged, "the refusal is logged:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED-")),
        "a client's line break reached the log:\n{log}"
    );
}

/// At the most verbose level, no password (right or wrong, SCRAM or md5, the admin
/// console's) and no Bind parameter appears in the log.
#[tokio::test]
async fn passwords_and_bind_parameters_never_reach_the_log() {
    let c = cluster();
    let secret_param = unique("bind_secret");
    let toml = with_proxy_settings(
        &base_config_toml(c),
        "admin_user = \"pgsplit\"\nadmin_password = \"console-secret-pw\"",
    ) + &format!(
        "\n[cache]\nenabled = true\nredis_url = \"redis://127.0.0.1:{}\"\nkey_prefix = \"{}\"\n\
         [[cache.rules]]\nquery = \"SELECT $1::text AS echoed\"\n",
        c.redis,
        unique("logtest")
    );
    let proxy = ProxyProcess::start(&toml, "trace").await;
    let app = connect(&proxy.conn_str("app", "app_pw")).await;
    for _ in 0..2 {
        let row = app
            .query_one("SELECT $1::text AS echoed", &[&secret_param])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), secret_param);
    }
    app.execute(
        "SELECT length($1::text) WHERE $2::int > 0",
        &[&secret_param, &7i32],
    )
    .await
    .unwrap();
    let md5 = connect(&proxy.conn_str("md5user", "md5_pw")).await;
    assert_usable(&md5).await;
    let _ = try_connect(&proxy.conn_str("app", "wrong-secret-guess")).await;
    let _ = try_connect(&proxy.conn_str("md5user", "wrong-md5-guess")).await;
    let console = format!(
        "host=127.0.0.1 port={} user=pgsplit password=console-secret-pw dbname=pgsplit",
        proxy.port
    );
    let admin = connect(&console).await;
    let shown = format!("{:?}", admin.simple_query("SHOW CONFIG").await.unwrap());
    assert!(shown.contains("admin_password") && shown.contains("********"));
    assert!(
        !shown.contains("app_pw") && !shown.contains("console-secret-pw"),
        "SHOW CONFIG shows a password: {shown}"
    );
    drop((app, md5, admin));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = proxy.log_text();
    assert!(log.lines().count() > 20, "trace logging is on:\n{log}");
    for secret in [
        "app_pw",
        "md5_pw",
        "admin_password",
        "wrong-secret-guess",
        "wrong-md5-guess",
        "console-secret-pw",
        secret_param.as_str(),
    ] {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            hits.is_empty(),
            "{secret:?} in the log:\n{}",
            hits.join("\n")
        );
    }
}

/// A read's answer is held back while it could still be retried on another replica, but only
/// up to 64 KiB: a single DataRow far larger than that streams through, and the proxy never
/// holds it whole.
#[tokio::test]
async fn a_huge_row_from_a_replica_streams_through_without_being_held_whole() {
    let proxy = ProxyProcess::start(&base_config_toml(cluster()), "warn").await;
    let pid = proxy.pid().to_string();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", proxy.port).parse().unwrap();
    let mut c = RawClient::login(addr, "trustuser").await;
    let before = peak_rss_kib(&pid);
    const ROW: usize = 200 * 1024 * 1024;
    c.stream_write(&query(&format!("SELECT repeat('x', {ROW})")))
        .await;
    // Read and discard, keeping the frame types and the row's length.
    let mut tags = String::new();
    let mut row_len = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while !tags.ends_with('Z') {
        let mut header = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(60), c.stream.read_exact(&mut header))
            .await
            .expect("an answer in time")
            .unwrap();
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize - 4;
        let mut left = len;
        while left > 0 {
            let n = c
                .stream
                .read(&mut buf[..left.min(64 * 1024)])
                .await
                .unwrap();
            assert!(n > 0, "the proxy closed the connection");
            left -= n;
        }
        tags.push(header[0] as char);
        if header[0] == b'D' {
            row_len = len;
        }
    }
    assert_eq!(tags, "TDCZ");
    assert!(row_len > ROW, "the whole row arrived ({row_len} bytes)");
    let grown = peak_rss_kib(&pid).saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "the proxy's peak memory grew by {grown} KiB for a {} MiB row",
        ROW >> 20
    );
}

/// Channel-binding data after choosing plain SCRAM-SHA-256 is a malformed SCRAM message:
/// FATAL 08P01, as the server answers it.
#[tokio::test]
async fn scram_with_channel_binding_data_is_a_protocol_violation() {
    let proxy = start_proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&startup_packet("app")).await.unwrap();
    let mut header = [0u8; 9];
    s.read_exact(&mut header).await.unwrap();
    assert_eq!(
        (header[0], &header[5..9]),
        (b'R', &10i32.to_be_bytes()[..]),
        "SASL offered"
    );
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut rest = vec![0u8; len - 8];
    s.read_exact(&mut rest).await.unwrap();
    let data = b"p=tls-server-end-point,,n=,r=abcdef";
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    s.write_all(&message(b'p', &body)).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");
    assert_proxy_serves(&proxy).await;
}

/// A long statement text is classified away from the event loop: the other sessions go on
/// meanwhile. Parsing takes about 0.1 s per MB in a release build (far more in a test
/// build), and with one event loop every other session, `/health` and `/metrics` used to
/// wait that long (a review stalled them for 5 s with a 70 MB query).
#[tokio::test]
async fn a_long_statement_does_not_stall_the_other_sessions() {
    // The binary, with its one event loop: the test's own clients must not share it.
    let proxy = ProxyProcess::start(&base_config_toml(cluster()), "info").await;
    let other = connect(&proxy.conn_str("app", "app_pw")).await;
    other.batch_execute("SELECT 1").await.unwrap();
    let long = connect(&proxy.conn_str("app", "app_pw")).await;
    let text = format!("SELECT length('{}')", "x".repeat(4 << 20));
    let started = std::time::Instant::now();
    let answered = tokio::spawn(async move {
        let messages = long.simple_query(&text).await.unwrap();
        let length = messages.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        (length, started.elapsed())
    });
    let mut worst = Duration::ZERO;
    let mut selects = 0;
    while !answered.is_finished() {
        let t = std::time::Instant::now();
        other.batch_execute("SELECT 1").await.unwrap();
        worst = worst.max(t.elapsed());
        selects += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (length, took) = answered.await.unwrap();
    assert_eq!(length.as_deref(), Some("4194304"));
    assert!(
        selects > 1,
        "the other session ran while the long one was classified"
    );
    assert!(
        worst * 3 < took,
        "another session waited {worst:?} while a {took:?} statement was classified"
    );
}
