//! A raw protocol client for what drivers do not let a test control (statement names,
//! malformed messages, half-sent frames).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn startup_packet(user: &str) -> Vec<u8> {
    startup_packet_with(user, &[])
}

/// A startup packet with more parameters than user and database.
pub fn startup_packet_with(user: &str, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i32(196608);
    for &(k, v) in [("user", user), ("database", "appdb")].iter().chain(params) {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    pkt.extend_from_slice(&body);
    pkt
}

/// Read backend messages until ReadyForQuery or EOF; returns (tag, body) pairs.
pub async fn read_messages(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let t = buf[0];
            out.push((t, buf[5..len + 1].to_vec()));
            buf.drain(..len + 1);
            if t == b'Z' {
                return out;
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer from the proxy"),
        }
    }
}

/// Read exactly `n` backend messages.
pub async fn read_n_messages(s: &mut TcpStream, n: usize) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while out.len() < n {
        let mut header = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut header))
            .await
            .expect("an answer in time")
            .unwrap();
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        out.push((header[0], body));
    }
    out
}

pub fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|m| m.0 == b'E')?;
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
}

pub fn message(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    /// Log in as a trust user.
    pub async fn login(addr: SocketAddr, user: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&startup_packet(user)).await.unwrap();
        let msgs = read_messages(&mut stream).await;
        assert_eq!(
            msgs.last().map(|m| m.0),
            Some(b'Z'),
            "login completes: {msgs:?}"
        );
        RawClient { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        self.stream.write_all(bytes).await.unwrap();
        read_messages(&mut self.stream).await
    }

    pub async fn stream_write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Read exactly `n` messages (for requests that end without ReadyForQuery).
    pub async fn read_n(&mut self, n: usize) -> Vec<(u8, Vec<u8>)> {
        read_n_messages(&mut self.stream, n).await
    }

    pub async fn parse(&mut self, name: &str, sql: &str) {
        let mut body = cstr(name);
        body.extend(cstr(sql));
        body.extend_from_slice(&[0, 0]);
        let mut req = message(b'P', &body);
        req.extend(message(b'S', &[]));
        let msgs = self.send(&req).await;
        assert_eq!(error_code(&msgs), None, "{msgs:?}");
        assert_eq!(msgs[0].0, b'1');
    }

    /// Bind and execute a named statement; the first column of the first row, as text.
    pub async fn execute_named(&mut self, name: &str) -> String {
        let mut bind = cstr("");
        bind.extend(cstr(name));
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut req = message(b'B', &bind);
        req.extend(message(b'E', &[0, 0, 0, 0, 0]));
        req.extend(message(b'S', &[]));
        let msgs = self.send(&req).await;
        assert_eq!(error_code(&msgs), None, "{msgs:?}");
        let (_, row) = msgs.iter().find(|m| m.0 == b'D').expect("a data row");
        let len = i32::from_be_bytes([row[2], row[3], row[4], row[5]]) as usize;
        String::from_utf8_lossy(&row[6..6 + len]).into_owned()
    }

    pub async fn close_statement(&mut self, name: &str) {
        let mut req = close_statement(name);
        req.extend(sync());
        let msgs = self.send(&req).await;
        assert_eq!(
            msgs.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![b'3', b'Z']
        );
    }
}

// Frontend messages, byte for byte; `bind` sends no parameters and text results.

pub fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend_from_slice(&[0, 0]);
    message(b'P', &b)
}

pub fn describe_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    message(b'D', &b)
}

pub fn bind(statement: &str) -> Vec<u8> {
    let mut b = cstr("");
    b.extend(cstr(statement));
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    message(b'B', &b)
}

pub fn execute() -> Vec<u8> {
    message(b'E', &[0, 0, 0, 0, 0])
}

/// Close of the statement `name`.
pub fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    message(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

/// Parse `sql` as statement `name`, bind it to the unnamed portal and execute it (no Sync).
pub fn run_in_batch(name: &str, sql: &str) -> Vec<u8> {
    let mut req = parse(name, sql);
    req.extend(bind(name));
    req.extend(execute());
    req
}

/// Parse `sql` as the unnamed statement, bind it, execute it, Sync.
pub fn parse_bind_execute(sql: &str) -> Vec<u8> {
    let mut req = parse("", sql);
    req.extend(bind_execute(""));
    req
}

/// Bind `statement` to the unnamed portal, execute it, Sync.
pub fn bind_execute(statement: &str) -> Vec<u8> {
    let mut req = bind(statement);
    req.extend(execute());
    req.extend(sync());
    req
}

pub fn query(sql: &str) -> Vec<u8> {
    message(b'Q', &cstr(sql))
}

pub fn tags(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|m| m.0 as char).collect()
}

impl RawClient {
    /// Log in with a password by SCRAM-SHA-256 (the admin console's only method), to
    /// `database`.
    pub async fn login_scram(
        addr: SocketAddr,
        user: &str,
        database: &str,
        password: &str,
    ) -> RawClient {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut body = BytesMut::new();
        body.put_i32(196608);
        for (k, v) in [("user", user), ("database", database)] {
            body.extend(cstr(k));
            body.extend(cstr(v));
        }
        body.put_u8(0);
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut packet = (body.len() as i32 + 4).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        stream.write_all(&packet).await.unwrap();
        let mut client = RawClient { stream };
        let auth = |m: &(u8, Vec<u8>), code: i32| {
            assert_eq!(m.0, b'R', "{m:?}");
            assert_eq!(
                i32::from_be_bytes(m.1[..4].try_into().unwrap()),
                code,
                "{m:?}"
            );
            m.1[4..].to_vec()
        };
        auth(&client.read_n(1).await[0], 10);
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut first = cstr("SCRAM-SHA-256");
        first.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
        first.extend_from_slice(scram.message());
        client.stream_write(&message(b'p', &first)).await;
        let server_first = auth(&client.read_n(1).await[0], 11);
        scram.update(&server_first).unwrap();
        client.stream_write(&message(b'p', scram.message())).await;
        let server_final = auth(&client.read_n(1).await[0], 12);
        scram.finish(&server_final).unwrap();
        let msgs = read_messages(&mut client.stream).await;
        assert_eq!(
            msgs.last().map(|m| m.0),
            Some(b'Z'),
            "login completes: {msgs:?}"
        );
        client
    }
}
