//! Framing of tagged messages (`tag: u8, len: i32 incl. itself, body`) and the relay scanner.
//!
//! `decode_frame` is cancel-safe by construction: it only looks at a caller-owned buffer and
//! takes bytes out of it when a whole frame is there (`Ok(None)` means "need more bytes").

use bytes::{Buf, Bytes, BytesMut};

use super::tag;

/// One whole tagged message. `body` excludes the tag and the length word.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// Tag and length only: bodies carry passwords, Bind parameters and row data, which must
/// never reach a log at any level.
impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("tag", &(self.tag as char))
            .field("len", &self.body.len())
            .finish()
    }
}

impl Frame {
    /// The frame as it goes on the wire.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.extend_from_slice(&[self.tag]);
        out.extend_from_slice(&((self.body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(&self.body);
    }

    pub fn wire_len(&self) -> usize {
        5 + self.body.len()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(i32),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// Take one frame out of `buf` if it is complete. The length is validated before anything is
/// allocated, so a peer cannot make us reserve memory it never sends.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len));
    }
    let len = len as usize;
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    if buf.len() < len + 1 {
        return Ok(None);
    }
    let tag = buf[0];
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    Ok(Some(Frame { tag, body }))
}

/// PostgreSQL's cap on the frontend messages that are always small (`PQ_SMALL_MESSAGE_LIMIT`).
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// The size cap of a frontend message a logged-in client may send with tag `t` (the
/// configured maximum for those that carry SQL, parameters or data), `None` for a tag no
/// client sends after login.
pub fn session_message_limit(t: u8) -> Option<usize> {
    match t {
        tag::QUERY
        | tag::PARSE
        | tag::BIND
        | tag::FUNCTION_CALL
        | tag::COPY_DATA
        | tag::COPY_FAIL => Some(usize::MAX),
        tag::DESCRIBE
        | tag::EXECUTE
        | tag::CLOSE
        | tag::SYNC
        | tag::FLUSH
        | tag::TERMINATE
        | tag::COPY_DONE => Some(SMALL_MESSAGE_LIMIT),
        _ => None,
    }
}

/// Tags the relay must see whole (it acts on their contents, or may drop them); every
/// other frame may be streamed through in pieces and is always forwarded.
pub fn needs_whole_frame(t: u8) -> bool {
    matches!(
        t,
        tag::READY_FOR_QUERY
            | tag::ERROR_RESPONSE
            | tag::COMMAND_COMPLETE
            | tag::PARAMETER_STATUS
            | tag::COPY_IN_RESPONSE
            | tag::COPY_OUT_RESPONSE
            | tag::COPY_BOTH_RESPONSE
            | tag::PARSE_COMPLETE
            | tag::BIND_COMPLETE
            | tag::CLOSE_COMPLETE
            | tag::NOTICE_RESPONSE
            | tag::NOTIFICATION_RESPONSE
            | tag::EMPTY_QUERY_RESPONSE
    )
}

/// Walk backend bytes for streaming: `passthrough` is how many bytes of a large frame are
/// still to be forwarded blindly. Calls `on_frame` for each whole frame that the relay must
/// inspect, with its offset in `buf`; stops early when it returns `false` (the frame and
/// everything after it are not counted as forwardable). Returns the forwardable prefix.
pub fn scan_relay(
    buf: &[u8],
    passthrough: &mut usize,
    max_len: usize,
    mut on_frame: impl FnMut(u8, &[u8], usize) -> bool,
) -> Result<usize, FrameError> {
    let mut pos = 0usize;
    loop {
        if *passthrough > 0 {
            let n = (*passthrough).min(buf.len() - pos);
            pos += n;
            *passthrough -= n;
            if *passthrough > 0 {
                return Ok(pos);
            }
        }
        let rest = &buf[pos..];
        if rest.len() < 5 {
            return Ok(pos);
        }
        let t = rest[0];
        let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        if len < 4 {
            return Err(FrameError::BadLength(len));
        }
        let len = len as usize;
        if needs_whole_frame(t) {
            if len > max_len {
                return Err(FrameError::TooLarge { len, max: max_len });
            }
            if rest.len() < len + 1 {
                return Ok(pos);
            }
            if !on_frame(t, &rest[5..len + 1], pos) {
                return Ok(pos);
            }
            pos += len + 1;
        } else {
            // Stream it: the header now, the body as it arrives.
            pos += 5;
            *passthrough = len - 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn debug_output_never_shows_a_body() {
        let f = Frame {
            tag: b'p',
            body: Bytes::from_static(b"hunter2\0"),
        };
        let shown = format!("{f:?}");
        assert_eq!(shown, "Frame { tag: 'p', len: 8 }");
    }

    #[test]
    fn decodes_whole_frames_only() {
        let mut buf = BytesMut::from(&wire(b'Q', b"select 1\0")[..]);
        let full = buf.clone();
        let mut partial = BytesMut::from(&full[..7]);
        assert_eq!(decode_frame(&mut partial, 1024), Ok(None));
        assert_eq!(partial.len(), 7, "partial input is left untouched");
        let f = decode_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body[..], b"select 1\0");
        assert!(buf.is_empty());
        let mut out = BytesMut::new();
        f.encode_into(&mut out);
        assert_eq!(out, full);
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut neg = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xf0][..]);
        assert_eq!(
            decode_frame(&mut neg, 1024),
            Err(FrameError::BadLength(-16))
        );
        let mut small = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            decode_frame(&mut small, 1024),
            Err(FrameError::BadLength(3))
        );
        let mut big = BytesMut::from(&[b'Q', 0x7f, 0, 0, 0][..]);
        assert!(matches!(
            decode_frame(&mut big, 1024),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn relay_scan_streams_data_rows_and_stops_at_inspected_frames() {
        let mut bytes = wire(b'D', &[7u8; 100]);
        bytes.extend(wire(b'C', b"SELECT 1\0"));
        bytes.extend(wire(b'Z', b"I"));
        let mut pass = 0;
        let mut seen = vec![];
        // Only the first 50 bytes have arrived: the data row header and part of its body.
        let n = scan_relay(&bytes[..50], &mut pass, 1024, |t, _, _| {
            seen.push(t);
            true
        })
        .unwrap();
        assert_eq!(n, 50);
        assert_eq!(pass, 55);
        let n2 = scan_relay(&bytes[50..], &mut pass, 1024, |t, body, _| {
            seen.push(t);
            if t == b'Z' {
                assert_eq!(body, b"I");
            }
            true
        })
        .unwrap();
        assert_eq!(n2, bytes.len() - 50);
        assert_eq!(seen, vec![b'C', b'Z']);
    }

    #[test]
    fn relay_scan_can_stop_before_a_frame() {
        let mut bytes = wire(b'2', b"");
        bytes.extend(wire(b'E', b"SERROR\0\0"));
        let mut pass = 0;
        let n = scan_relay(&bytes, &mut pass, 1024, |t, _, _| t != b'E').unwrap();
        assert_eq!(n, 5);
    }
}
