//! The client's socket: cancel-safe buffered reads of frames, and writes.

use bytes::BytesMut;
use std::future::Future;

use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};
use crate::protocol::{Frame, decode_frame};
use crate::tls::{Reader, Writer};

pub struct ClientConn {
    pub rd: Reader,
    pub wr: Writer,
    /// Bytes read and not yet taken as frames: owned here so a read interrupted by
    /// `select!` loses nothing.
    pub buf: BytesMut,
    pub max_message: usize,
    /// How long a write may wait for the client to take bytes (`client_write_timeout_ms`).
    pub write_timeout: Option<std::time::Duration>,
    /// Frames that go out with the next write (empty, unallocated, almost always).
    held: BytesMut,
    /// Where the client's bytes are copied (the `capture` feature, for fuzz seeds).
    #[cfg(feature = "capture")]
    capture: Option<std::fs::File>,
}

impl ClientConn {
    pub fn new(
        rd: Reader,
        wr: Writer,
        max_message: usize,
        write_timeout: Option<std::time::Duration>,
    ) -> ClientConn {
        ClientConn {
            rd,
            wr,
            // Startup packets are small; `fill` grows the buffer for real traffic.
            buf: BytesMut::with_capacity(1024),
            max_message,
            write_timeout,
            held: BytesMut::new(),
            #[cfg(feature = "capture")]
            capture: capture_file(),
        }
    }

    /// A whole frame already buffered, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>> {
        Ok(decode_frame(&mut self.buf, self.max_message)?)
    }

    /// [`try_frame`](Self::try_frame) for a logged-in session: a message type no client
    /// sends then is refused at its header, and the messages that are always small are
    /// capped as PostgreSQL caps them, before their bodies are buffered (a Sync claiming
    /// 150 MB would otherwise hold that much memory while it trickles in).
    pub fn try_session_frame(&mut self) -> Result<Option<Frame>> {
        if let [t, a, b, c, d, ..] = self.buf[..] {
            let len = i32::from_be_bytes([a, b, c, d]);
            match crate::protocol::session_message_limit(t) {
                None => {
                    return Err(Error::Protocol(format!(
                        "invalid frontend message type {}",
                        t
                    )));
                }
                Some(limit) if len > 0 && len as usize > limit => {
                    return Err(crate::protocol::FrameError::TooLarge {
                        len: len as usize,
                        max: limit,
                    }
                    .into());
                }
                Some(_) => {}
            }
        }
        self.try_frame()
    }

    /// Put `frame` back in front of what is buffered: the next `try_frame` returns it.
    pub fn unread(&mut self, frame: &Frame) {
        let mut buf = BytesMut::with_capacity(5 + frame.body.len() + self.buf.len());
        frame.encode_into(&mut buf);
        buf.extend_from_slice(&self.buf);
        self.buf = buf;
    }

    /// Whether a whole frame (or a malformed header, which `try_frame` reports) is buffered.
    pub fn has_frame(&self) -> bool {
        if self.buf.len() < 5 {
            return false;
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        len < 4 || self.buf.len() > len as usize
    }

    /// Read more bytes. Cancel-safe.
    pub async fn fill(&mut self) -> Result<()> {
        self.make_room();
        let read = self.rd.read_buf(&mut self.buf).await;
        self.took(read).map(|_| ())
    }

    /// Ready once the client has closed its connection (or it failed). What the client
    /// sends meanwhile is kept for later, up to a request's worth; then it waits no more
    /// (a client that keeps sending is not gone). Cancel-safe.
    pub async fn gone(&mut self) {
        const KEPT: usize = 64 * 1024;
        while self.buf.len() < KEPT {
            if self.fill().await.is_err() {
                return;
            }
        }
        std::future::pending().await
    }

    /// Read what the client already sent, without waiting: `false` when nothing is there.
    pub fn try_fill(&mut self) -> Result<bool> {
        self.make_room();
        match self.rd.try_read_buf(&mut self.buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            read => self.took(read).map(|_| true),
        }
    }

    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
    }

    fn took(&mut self, read: std::io::Result<usize>) -> Result<usize> {
        match read {
            Ok(0) => Err(Error::ClientGone),
            Ok(n) => {
                #[cfg(feature = "capture")]
                if let Some(f) = self.capture.as_mut() {
                    use std::io::Write;
                    // Plain text: after a TLS handshake, `rd` yields decrypted bytes.
                    let _ = f.write_all(&self.buf[self.buf.len() - n..]);
                }
                Ok(n)
            }
            Err(e) => Err(Error::ClientIo(e)),
        }
    }

    pub async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Answer an SSLRequest with TLS: the handshake on the plain socket, then encrypted
    /// halves from here on.
    pub async fn start_tls(&mut self, acceptor: &tokio_rustls::TlsAcceptor) -> Result<()> {
        let rd = std::mem::replace(&mut self.rd, Reader::Detached);
        let wr = std::mem::replace(&mut self.wr, Writer::Detached);
        let stream = crate::tls::reunite(rd, wr).map_err(Error::ClientIo)?;
        let (rd, wr) = crate::tls::accept(acceptor, stream)
            .await
            .map_err(Error::ClientIo)?;
        self.rd = rd;
        self.wr = wr;
        Ok(())
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.rd, Reader::Tls(_))
    }

    /// Send `bytes`. A client that takes nothing of them for `write_timeout` (it stopped
    /// reading) is given up on ([`Error::ClientWriteTimeout`]); one that reads slowly is not:
    /// the limit restarts with every write that makes progress.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if !self.held.is_empty() {
            let mut all = std::mem::take(&mut self.held);
            all.extend_from_slice(bytes);
            return Box::pin(self.write(&all)).await;
        }
        use tokio::io::AsyncWriteExt;
        let Some(limit) = self.write_timeout else {
            return self.wr.send_all(bytes).await.map_err(Error::ClientIo);
        };
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = within(limit, self.wr.write(rest)).await?;
            if n == 0 {
                return Err(Error::ClientIo(std::io::ErrorKind::WriteZero.into()));
            }
            rest = &rest[n..];
        }
        // A TLS writer may keep the last record buffered.
        within(limit, self.wr.flush()).await
    }

    /// Send `frame` with the next write instead of on its own: the last message of a
    /// password exchange goes with AuthenticationOk and the rest of the greeting.
    pub fn hold(&mut self, frame: &Frame) {
        frame.encode_into(&mut self.held);
    }

    pub async fn send(&mut self, frames: &[Frame]) -> Result<()> {
        let mut out = BytesMut::with_capacity(frames.iter().map(Frame::wire_len).sum());
        for f in frames {
            f.encode_into(&mut out);
        }
        self.write(&out).await
    }
}

impl Drop for ClientConn {
    fn drop(&mut self) {
        self.wr.let_go();
    }
}

/// A new file for one connection's bytes under `$PGSPLIT_CAPTURE_DIR`, if it is set.
#[cfg(feature = "capture")]
fn capture_file() -> Option<std::fs::File> {
    let dir = std::path::PathBuf::from(std::env::var_os("PGSPLIT_CAPTURE_DIR")?);
    std::fs::create_dir_all(&dir).ok()?;
    let name = format!(
        "client-{}-{:016x}.bin",
        std::process::id(),
        rand::random::<u64>()
    );
    std::fs::File::create(dir.join(name)).ok()
}

/// `io`, failing with [`Error::ClientWriteTimeout`] if it is still pending after `limit`.
/// Almost always the socket takes the bytes at once: the timer is armed only when not.
async fn within<T>(
    limit: std::time::Duration,
    io: impl Future<Output = std::io::Result<T>>,
) -> Result<T> {
    let mut io = std::pin::pin!(io);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(io.as_mut().poll(cx))).await;
    let result = match first {
        std::task::Poll::Ready(r) => r,
        // Boxed: the timer is large and rarely needed; inline, it would be part of every
        // request's future (and of its allocation and copies).
        std::task::Poll::Pending => Box::pin(tokio::time::timeout(limit, io))
            .await
            .map_err(|_| Error::ClientWriteTimeout(limit))?,
    };
    result.map_err(Error::ClientIo)
}
