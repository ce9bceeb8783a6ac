//! One connection to a PostgreSQL server, opened as an ordinary client: startup,
//! authentication (SCRAM-SHA-256, md5, cleartext, trust), and the per-connection state the
//! session keeps in step (prepared statements, applied settings).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BackendError, BackendId, PreparedSet};
use crate::config::ServerTls;
use crate::protocol::{self, ErrorFields, Frame, decode_frame, tag};
use crate::tls::{Reader, ServerTlsPolicy, Writer};

/// What a backend connection is opened with.
#[derive(Clone)]
pub struct ConnectParams {
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// Client startup parameters passed through (application_name, options, DateStyle ...).
    pub startup: Vec<(String, String)>,
    /// How many prepared statements one connection keeps before closing the oldest.
    pub max_prepared: usize,
    /// TLS towards the server (`[proxy] server_tls`).
    pub tls: Arc<ServerTlsPolicy>,
}

/// Without the password: these reach debug output.
impl std::fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "********"))
            .field("database", &self.database)
            .field("startup", &self.startup)
            .field("max_prepared", &self.max_prepared)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Where to send a CancelRequest for whatever this connection is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelKey {
    pub addr: ServerAddr,
    pub pid: i32,
    pub secret: i32,
}

/// A server's socket: TCP, or a Unix-domain socket when the configured host is a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    Unix(Arc<std::path::Path>),
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

/// A live, authenticated server connection.
pub struct ServerConn {
    pub id: BackendId,
    pub rd: Reader,
    pub wr: Writer,
    /// Bytes read from the server not yet consumed; owned here so reads stay cancel-safe.
    pub rbuf: BytesMut,
    pub cancel_key: CancelKey,
    /// Cancel requests for this connection on their way to the server: while one is, the
    /// connection must not run another client's query, which the request could cancel.
    pub cancels: Arc<std::sync::atomic::AtomicU32>,
    /// ParameterStatus values: those reported at startup, kept current with those reported
    /// since (see [`ServerConn::note_parameter`]).
    pub params: Vec<(String, String)>,
    /// Server-side names of the statements prepared on this connection.
    pub prepared: PreparedSet,
    /// The identity of the statement this connection's unnamed statement holds, if known.
    pub unnamed: Option<u64>,
    /// Session settings (name → SET statement) this connection currently has applied.
    pub settings: HashMap<String, String>,
    /// The session-settings generation `settings` was last brought to.
    pub settings_generation: Option<u64>,
    /// Since its last request that ended outside a transaction, something ran here that
    /// may have changed a setting PostgreSQL parses statements under (see
    /// `router::PARSE_SETTINGS`): a named statement prepared meanwhile may be parsed unlike
    /// the name the session gave it says.
    pub parse_settings_changed: bool,
    /// The server reported standard_conforming_strings off here (at its login, or since):
    /// it splits texts unlike pgsplit (see `Session::backslash_escapes_on`).
    pub backslash_escapes: bool,
    /// The [`Pool::generation`](super::Pool::generation) it was opened in: one from before
    /// the pool's last RECONNECT is closed when it comes back.
    pub generation: u64,
    /// When a pool retires this connection (`max_lifetime` after it opened); None: never
    /// (a session's own connection).
    pub expires: Option<Instant>,
}

impl std::fmt::Debug for ServerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConn")
            .field("id", &self.id)
            .field("addr", &self.cancel_key.addr)
            .field("pid", &self.cancel_key.pid)
            .finish()
    }
}

impl ServerConn {
    /// Connect and authenticate; the caller wraps this in its connect timeout. Boxed: a
    /// connection changes hands (pool, session slot, request in flight) several times per
    /// transaction, and moving a pointer is cheaper than moving the struct.
    pub async fn connect(
        id: BackendId,
        address: &str,
        params: &ConnectParams,
        max_message: usize,
    ) -> Result<Box<ServerConn>, BackendError> {
        let (addr, (rd, wr)) = if address.starts_with('/') {
            // Like libpq, no TLS on a Unix-domain socket: nothing leaves the machine.
            let stream = tokio::net::UnixStream::connect(address)
                .await
                .map_err(BackendError::Io)?;
            let path: Arc<std::path::Path> = Arc::from(std::path::Path::new(address));
            (ServerAddr::Unix(path), crate::tls::split_unix(stream))
        } else {
            let stream = TcpStream::connect(address)
                .await
                .map_err(BackendError::Io)?;
            stream.set_nodelay(true).map_err(BackendError::Io)?;
            watch_for_a_dead_peer(&stream).map_err(BackendError::Io)?;
            let addr = stream.peer_addr().map_err(BackendError::Io)?;
            (
                ServerAddr::Tcp(addr),
                negotiate_tls(stream, address, &params.tls).await?,
            )
        };
        let mut conn = Box::new(ServerConn {
            id,
            rd,
            wr,
            rbuf: BytesMut::with_capacity(8192),
            cancel_key: CancelKey {
                addr,
                pid: 0,
                secret: 0,
            },
            cancels: Arc::default(),
            params: Vec::new(),
            prepared: PreparedSet::new(params.max_prepared),
            unnamed: None,
            settings: HashMap::new(),
            settings_generation: None,
            parse_settings_changed: false,
            generation: 0,
            backslash_escapes: false,
            expires: None,
        });
        conn.startup(params, max_message).await?;
        Ok(conn)
    }

    async fn startup(
        &mut self,
        params: &ConnectParams,
        max_message: usize,
    ) -> Result<(), BackendError> {
        let mut body = BytesMut::new();
        body.put_i32(protocol::PROTOCOL_3_0);
        for (k, v) in [
            ("user", params.user.as_str()),
            ("database", &params.database),
        ]
        .into_iter()
        .chain(params.startup.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut pkt = BytesMut::with_capacity(body.len() + 4);
        pkt.put_i32(body.len() as i32 + 4);
        pkt.put_slice(&body);
        self.wr.send_all(&pkt).await.map_err(BackendError::Io)?;

        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.read_frame(max_message).await?;
            match f.tag {
                tag::AUTHENTICATION => {
                    let mut b = &f.body[..];
                    if b.len() < 4 {
                        return Err(BackendError::Protocol("short authentication message"));
                    }
                    let kind = b.get_i32();
                    match kind {
                        0 => {}
                        3 => {
                            let pw = password(params)?;
                            let mut m = BytesMut::new();
                            m.put_slice(pw.as_bytes());
                            m.put_u8(0);
                            self.send(tag::PASSWORD, &m).await?;
                        }
                        5 => {
                            if b.len() < 4 {
                                return Err(BackendError::Protocol("short md5 salt"));
                            }
                            let salt = [b[0], b[1], b[2], b[3]];
                            let pw = password(params)?;
                            let hash = postgres_protocol::authentication::md5_hash(
                                params.user.as_bytes(),
                                pw.as_bytes(),
                                salt,
                            );
                            let mut m = BytesMut::new();
                            m.put_slice(hash.as_bytes());
                            m.put_u8(0);
                            self.send(tag::PASSWORD, &m).await?;
                        }
                        10 => {
                            let offers_scram =
                                b.split(|&c| c == 0).any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offers_scram {
                                return Err(BackendError::AuthUnsupported(
                                    "server offers no SASL mechanism we support".into(),
                                ));
                            }
                            let pw = password(params)?;
                            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                            let mut m = BytesMut::new();
                            m.put_slice(SCRAM_SHA_256.as_bytes());
                            m.put_u8(0);
                            m.put_i32(s.message().len() as i32);
                            m.put_slice(s.message());
                            self.send(tag::PASSWORD, &m).await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or(BackendError::Protocol("SASL continue without start"))?;
                            s.update(b).map_err(|e| {
                                BackendError::AuthUnsupported(format!("SCRAM: {e}"))
                            })?;
                            let msg = s.message().to_vec();
                            self.send(tag::PASSWORD, &msg).await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or(BackendError::Protocol("SASL final without start"))?;
                            s.finish(b).map_err(|e| {
                                BackendError::AuthUnsupported(format!(
                                    "SCRAM server signature: {e}"
                                ))
                            })?;
                        }
                        other => {
                            return Err(BackendError::AuthUnsupported(format!(
                                "authentication method {other} is not supported"
                            )));
                        }
                    }
                }
                tag::ERROR_RESPONSE => {
                    return Err(BackendError::Server(ErrorFields::parse(&f.body)));
                }
                tag::PARAMETER_STATUS => self.note_parameter_status(&f.body),
                tag::BACKEND_KEY_DATA => {
                    let mut b = &f.body[..];
                    if b.len() >= 8 {
                        self.cancel_key.pid = b.get_i32();
                        self.cancel_key.secret = b.get_i32();
                    }
                }
                tag::READY_FOR_QUERY => return Ok(()),
                // NoticeResponse and anything else harmless during startup.
                _ => {}
            }
        }
    }

    async fn send(&mut self, t: u8, body: &[u8]) -> Result<(), BackendError> {
        let mut m = BytesMut::with_capacity(body.len() + 5);
        m.put_u8(t);
        m.put_i32(body.len() as i32 + 4);
        m.put_slice(body);
        self.wr.send_all(&m).await.map_err(BackendError::Io)
    }

    /// Read one whole frame (used outside the relay: startup and internal queries).
    pub async fn read_frame(&mut self, max_message: usize) -> Result<Frame, BackendError> {
        loop {
            if let Some(f) = decode_frame(&mut self.rbuf, max_message)
                .map_err(|_| BackendError::Protocol("bad frame from server"))?
            {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Let go of a read buffer that answers taken in while sending grew, once it is empty:
    /// a pooled connection would keep it for its whole life. (Its capacity cannot tell:
    /// it counts from where the consumed bytes end, not from the allocation's start.)
    pub fn trim_read_buffer(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
    }

    /// Read more bytes into `rbuf`. Cancel-safe: bytes land in `rbuf` or not at all.
    pub async fn fill(&mut self) -> Result<(), BackendError> {
        fill_from(&mut self.rd, &mut self.rbuf).await
    }

    /// Write the front of `out` to the server (what is written leaves `out`), taking in
    /// what it answers meanwhile. A long pipeline's answers come while the rest of it is
    /// still being written: left unread, they would fill the socket, the server would stop
    /// reading to wait for it, and so would this write, for ever. Returns `true` once all
    /// of `out` is sent (and flushed, over TLS), `false` after `rbuf` took in `drain_limit`
    /// more bytes or the read side failed after taking some: the caller passes on what
    /// came (a FATAL saying why, perhaps) and calls again for the rest.
    pub async fn send_draining(
        &mut self,
        out: &mut BytesMut,
        drain_limit: usize,
    ) -> Result<bool, BackendError> {
        let (wr, rd, rbuf) = (&mut self.wr, &mut self.rd, &mut self.rbuf);
        // Almost always the socket takes it all at once: one write(2), no select.
        if let Some(n) = wr.try_write_plain(out) {
            out.advance(n);
            if out.is_empty() {
                return Ok(true);
            }
        }
        let start = rbuf.len();
        let limit = start.saturating_add(drain_limit);
        // A TLS writer may keep the last record until flushed; flushing an empty one is free.
        let mut unflushed = matches!(wr, Writer::Tls(_));
        loop {
            let flush = match (out.is_empty(), unflushed) {
                (false, _) => false,
                (true, true) => true,
                (true, false) => return Ok(true),
            };
            if rbuf.len() >= limit {
                return Ok(false);
            }
            // Both cancel-safe: a write that loses the race wrote nothing, a flush that
            // loses it goes on at the next call.
            tokio::select! {
                biased;
                r = async {
                    if flush {
                        wr.flush().await.map(|()| None)
                    } else {
                        wr.write(out).await.map(Some)
                    }
                } => match r.map_err(BackendError::Io)? {
                    None => unflushed = false,
                    Some(0) => return Err(BackendError::Io(std::io::ErrorKind::WriteZero.into())),
                    Some(n) => {
                        out.advance(n);
                        unflushed = matches!(wr, Writer::Tls(_));
                    }
                },
                r = fill_from(rd, rbuf) => if let Err(e) = r {
                    return if rbuf.len() > start { Ok(false) } else { Err(e) };
                },
            }
        }
    }

    /// Run SQL the proxy needs (settings replay) and swallow the answer. A server error is
    /// returned; the connection stays usable after it.
    pub async fn run_internal(
        &mut self,
        sql: &str,
        max_message: usize,
    ) -> Result<(), BackendError> {
        let mut out = BytesMut::new();
        protocol::query_frame(sql).encode_into(&mut out);
        self.wr.send_all(&out).await.map_err(BackendError::Io)?;
        // A simple Query destroys the unnamed statement.
        self.unnamed = None;
        let mut error = None;
        loop {
            let f = self.read_frame(max_message).await?;
            match f.tag {
                tag::ERROR_RESPONSE => error = Some(ErrorFields::parse(&f.body)),
                tag::PARAMETER_STATUS => self.note_parameter_status(&f.body),
                tag::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(BackendError::Server(e)),
            None => Ok(()),
        }
    }

    /// Run a query the proxy needs and return every column of its first row as text (empty
    /// when there is no row). Notifications that arrive meanwhile (the connection of a
    /// session that LISTENs) are the client's: they go to `notifications`.
    pub async fn query_row(
        &mut self,
        sql: &str,
        max_message: usize,
        notifications: &mut Vec<Frame>,
    ) -> Result<Vec<Option<String>>, BackendError> {
        let mut out = BytesMut::new();
        protocol::query_frame(sql).encode_into(&mut out);
        self.wr.send_all(&out).await.map_err(BackendError::Io)?;
        self.unnamed = None;
        self.first_row(max_message, notifications).await
    }

    /// The value of the setting `name` now in force on this connection (`None`: there is
    /// none), read without disturbing the client's unnamed statement or portal (see
    /// [`protocol::read_setting_messages`]).
    pub async fn read_setting(
        &mut self,
        name: &str,
        max_message: usize,
        notifications: &mut Vec<Frame>,
    ) -> Result<Option<String>, BackendError> {
        let mut out = BytesMut::new();
        protocol::read_setting_messages(name, &mut out);
        self.wr.send_all(&out).await.map_err(BackendError::Io)?;
        let row = self.first_row(max_message, notifications).await?;
        Ok(row.into_iter().next().flatten())
    }

    /// The first row of the answer up to ReadyForQuery, or its error.
    async fn first_row(
        &mut self,
        max_message: usize,
        notifications: &mut Vec<Frame>,
    ) -> Result<Vec<Option<String>>, BackendError> {
        let mut value = None;
        let mut error = None;
        loop {
            let f = self.read_frame(max_message).await?;
            match f.tag {
                tag::DATA_ROW if value.is_none() => {
                    value = Some(protocol::decode_data_row_text(&f.body));
                }
                tag::ERROR_RESPONSE => error = Some(ErrorFields::parse(&f.body)),
                tag::NOTIFICATION_RESPONSE => notifications.push(f),
                tag::PARAMETER_STATUS => self.note_parameter_status(&f.body),
                tag::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(BackendError::Server(e)),
            None => Ok(value.unwrap_or_default()),
        }
    }

    /// Record a value the server reported (ParameterStatus): a session-mode connection
    /// handed on tells its next client these at login, and they change while it lives
    /// (a server configuration reload, a session's SET, the reset that takes that back).
    pub fn note_parameter_status(&mut self, body: &[u8]) {
        if let Some(kv) = protocol::decode_parameter_status(body) {
            self.note_parameter(kv);
        }
    }

    /// [`ServerConn::note_parameter_status`], decoded.
    pub fn note_parameter(&mut self, (name, value): (String, String)) {
        if name == "standard_conforming_strings" {
            self.backslash_escapes = !crate::router::keeps_on(&value);
        }
        match self.params.iter_mut().find(|(k, _)| *k == name) {
            Some(kv) => kv.1 = value,
            None => self.params.push((name, value)),
        }
    }

    /// Return a session's own connection to the state it was opened in, for another
    /// session with the same startup parameters: `DISCARD ALL` drops what the session left
    /// on the server (settings, prepared statements, cursors, temporary tables, LISTEN,
    /// advisory locks), and what pgsplit knew of those goes with it. Not on a connection
    /// inside a transaction block, where the server refuses it.
    pub async fn reset_session(&mut self, max_message: usize) -> Result<(), BackendError> {
        self.run_internal("DISCARD ALL", max_message).await?;
        self.prepared.clear();
        self.settings.clear();
        self.settings_generation = None;
        self.parse_settings_changed = false;
        Ok(())
    }

    pub async fn terminate(mut self) {
        let _ = self.wr.send_all(&[tag::TERMINATE, 0, 0, 0, 4]).await;
        let _ = self.wr.shutdown().await;
    }
}

fn password(params: &ConnectParams) -> Result<&str, BackendError> {
    params.password.as_deref().ok_or_else(|| {
        BackendError::AuthUnsupported(format!(
            "the server asks a password for {:?} and none is configured (server_password)",
            params.user
        ))
    })
}

/// SSLRequest per `policy`: the socket halves, encrypted when the server agreed.
async fn negotiate_tls(
    mut stream: TcpStream,
    address: &str,
    policy: &ServerTlsPolicy,
) -> Result<(Reader, Writer), BackendError> {
    if policy.mode == ServerTls::Disable {
        return Ok(crate::tls::split_plain(stream));
    }
    let mut pkt = BytesMut::with_capacity(8);
    pkt.put_i32(8);
    pkt.put_i32(protocol::SSL_REQUEST_CODE);
    stream.write_all(&pkt).await.map_err(BackendError::Io)?;
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(BackendError::Io)?;
    match answer[0] {
        b'S' => {
            let host = address
                .rsplit_once(':')
                .map_or(address, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            policy.connect(host, stream).await.map_err(BackendError::Io)
        }
        b'N' if policy.mode == ServerTls::Prefer => Ok(crate::tls::split_plain(stream)),
        b'N' => Err(BackendError::Protocol(
            "the server does not support TLS, and server_tls requires it",
        )),
        _ => Err(BackendError::Protocol("unexpected answer to SSLRequest")),
    }
}

/// A server host that loses power or its network sends nothing more: without this, a
/// request waiting for its answer would wait (and hold its pool slot) for ever. Keepalive
/// probes after 15 s of silence, every 5 s; 3 unanswered ones end the connection. A server
/// busy with a long query still answers them (its kernel does). Data the server does not
/// take (a COPY into a locked table) is left to TCP's own retransmission limit: a
/// shorter TCP_USER_TIMEOUT would also cut a server that is merely slow to read.
fn watch_for_a_dead_peer(stream: &TcpStream) -> std::io::Result<()> {
    socket2::SockRef::from(stream).set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(15))
            .with_interval(Duration::from_secs(5))
            .with_retries(3),
    )
}

/// Send a CancelRequest for `key` on a fresh connection (the protocol's only way).
pub async fn send_cancel(key: CancelKey) -> std::io::Result<()> {
    let mut pkt = BytesMut::with_capacity(16);
    pkt.put_i32(16);
    pkt.put_i32(protocol::CANCEL_REQUEST_CODE);
    pkt.put_i32(key.pid);
    pkt.put_i32(key.secret);
    match &key.addr {
        ServerAddr::Tcp(a) => deliver_cancel(TcpStream::connect(a).await?, &pkt).await,
        ServerAddr::Unix(p) => {
            deliver_cancel(tokio::net::UnixStream::connect(p).await?, &pkt).await
        }
    }
}

async fn deliver_cancel(
    mut s: impl AsyncReadExt + AsyncWriteExt + Unpin,
    pkt: &[u8],
) -> std::io::Result<()> {
    s.write_all(pkt).await?;
    // The server closes the connection without answering; wait for that so the request is
    // processed before we return.
    let mut sink = [0u8; 16];
    let _ = s.read(&mut sink).await;
    Ok(())
}
/// Read more bytes from `rd` into `rbuf`; apart from the writer, so that a write can wait
/// on the same connection meanwhile. Cancel-safe.
async fn fill_from(rd: &mut Reader, rbuf: &mut BytesMut) -> Result<(), BackendError> {
    if rbuf.capacity() - rbuf.len() < 4096 {
        rbuf.reserve(16 * 1024);
    }
    let n = rd.read_buf(rbuf).await.map_err(BackendError::Io)?;
    if n == 0 {
        return Err(BackendError::Closed);
    }
    Ok(())
}
