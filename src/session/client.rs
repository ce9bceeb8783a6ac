//! The client's socket: cancel-safe buffered reads of frames, and writes.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::error::{Error, Result};
use crate::protocol::{Frame, decode_frame};

pub struct ClientConn {
    pub rd: OwnedReadHalf,
    pub wr: OwnedWriteHalf,
    /// Bytes read and not yet taken as frames: owned here so a read interrupted by
    /// `select!` loses nothing.
    pub buf: BytesMut,
    pub max_message: usize,
}

impl ClientConn {
    pub fn new(rd: OwnedReadHalf, wr: OwnedWriteHalf, max_message: usize) -> ClientConn {
        ClientConn {
            rd,
            wr,
            buf: BytesMut::with_capacity(8192),
            max_message,
        }
    }

    /// A whole frame already buffered, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>> {
        Ok(decode_frame(&mut self.buf, self.max_message)?)
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
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.rd.read_buf(&mut self.buf).await {
            Ok(0) => Err(Error::ClientGone),
            Ok(_) => Ok(()),
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

    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.wr.write_all(bytes).await.map_err(Error::ClientIo)
    }

    pub async fn send(&mut self, frames: &[Frame]) -> Result<()> {
        let mut out = BytesMut::with_capacity(frames.iter().map(Frame::wire_len).sum());
        for f in frames {
            f.encode_into(&mut out);
        }
        self.write(&out).await
    }
}
