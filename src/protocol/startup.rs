//! Untagged startup-phase packets: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.

use bytes::{Buf, BytesMut};

/// Protocol 3.0; the minor version is the low 16 bits.
pub const PROTOCOL_3: i32 = 3 << 16;
pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;

/// Startup packets are small; libpq caps them at 10000 bytes too.
pub const MAX_STARTUP_LEN: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        /// Minor protocol version the client asked for (we speak 3.0).
        minor: u16,
        /// Parameters in the order sent; `user` and `database` among them.
        params: Vec<(String, String)>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(i32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Take one startup-phase packet out of `buf` when it is complete.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_LEN as i32).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let mut pkt = buf.split_to(len);
    pkt.advance(4);
    let code = pkt.get_i32();
    match code {
        SSL_REQUEST_CODE if len == 8 => Ok(Some(StartupPacket::Ssl)),
        GSSENC_REQUEST_CODE if len == 8 => Ok(Some(StartupPacket::GssEnc)),
        CANCEL_REQUEST_CODE if len == 16 => {
            let pid = pkt.get_i32();
            let secret = pkt.get_i32();
            Ok(Some(StartupPacket::Cancel { pid, secret }))
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(StartupError::Malformed("wrong length for a request code"))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let params = parse_params(&pkt)?;
            Ok(Some(StartupPacket::Startup { minor, params }))
        }
    }
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let (key, rest) = cstr(body).ok_or(StartupError::Malformed("missing terminator"))?;
        if key.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the terminator"));
            }
            return Ok(params);
        }
        let key = std::str::from_utf8(key)
            .map_err(|_| StartupError::Malformed("a parameter name that is not UTF-8"))?;
        let (value, rest) = cstr(rest).ok_or(StartupError::Malformed("parameter without value"))?;
        // The client's encoding is not known yet: a value in another one (a Latin-1
        // application_name) is taken, each byte that is not UTF-8 replaced by '?', which is
        // what PostgreSQL shows for it in application_name (U+FFFD would show as '???').
        params.push((key.to_owned(), lossy_with_question_marks(value)));
        body = rest;
    }
}

fn lossy_with_question_marks(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(rest) => {
                out.push_str(rest);
                return out;
            }
            Err(e) => {
                let (valid, after) = bytes.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                let bad = e.error_len().unwrap_or(after.len());
                out.extend(std::iter::repeat_n('?', bad));
                bytes = &after[bad..];
            }
        }
    }
}

fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    Some((&b[..nul], &b[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn packet(code: i32, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32(8 + payload.len() as i32);
        b.put_i32(code);
        b.put_slice(payload);
        b
    }

    #[test]
    fn a_value_in_another_encoding_is_taken() {
        let mut b = packet(PROTOCOL_3, b"user\0app\0application_name\0caf\xe9\0\0");
        let Some(StartupPacket::Startup { params, .. }) = decode_startup(&mut b).unwrap() else {
            panic!("a startup packet");
        };
        assert_eq!(params[1], ("application_name".into(), "caf?".into()));
        let mut b = packet(PROTOCOL_3, b"user\0app\0a\0\xe9t\xc3\xa9 \xf0\x9f\0\0");
        let Some(StartupPacket::Startup { params, .. }) = decode_startup(&mut b).unwrap() else {
            panic!("a startup packet");
        };
        assert_eq!(params[1].1, "?t\u{e9} ??");
        let mut b = packet(PROTOCOL_3, b"us\xe9r\0app\0\0");
        assert!(decode_startup(&mut b).is_err());
    }

    #[test]
    fn startup_with_params() {
        let mut b = packet(
            PROTOCOL_3,
            b"user\0app\0database\0appdb\0application_name\0x\0\0",
        );
        let p = decode_startup(&mut b).unwrap().unwrap();
        assert_eq!(
            p,
            StartupPacket::Startup {
                minor: 0,
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "appdb".into()),
                    ("application_name".into(), "x".into())
                ]
            }
        );
    }

    #[test]
    fn ssl_cancel_and_partial() {
        let mut b = packet(SSL_REQUEST_CODE, b"");
        assert_eq!(decode_startup(&mut b).unwrap(), Some(StartupPacket::Ssl));
        let mut c = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 0, 0, 0, 9]);
        let mut part = BytesMut::from(&c[..10]);
        assert_eq!(decode_startup(&mut part).unwrap(), None);
        assert_eq!(
            decode_startup(&mut c).unwrap(),
            Some(StartupPacket::Cancel { pid: 7, secret: 9 })
        );
    }

    #[test]
    fn rejects_garbage() {
        let mut neg = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(decode_startup(&mut neg).is_err());
        let mut huge = BytesMut::from(&[0x7f, 0, 0, 0][..]);
        assert!(decode_startup(&mut huge).is_err());
        let mut v2 = packet(2 << 16, b"\0");
        assert!(matches!(
            decode_startup(&mut v2),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        let mut unterminated = packet(PROTOCOL_3, b"user\0app");
        assert!(decode_startup(&mut unterminated).is_err());
        let mut no_value = packet(PROTOCOL_3, b"user\0");
        assert!(decode_startup(&mut no_value).is_err());
    }
}
