//! Backend messages the proxy writes itself (auth, errors, ReadyForQuery ...) and the fields
//! it reads out of backend ErrorResponses.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Frame, TxStatus, tag};

fn frame(t: u8, body: BytesMut) -> Frame {
    Frame {
        tag: t,
        body: body.freeze(),
    }
}

fn put_cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

/// ErrorResponse / NoticeResponse severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse the proxy originates.
pub fn error_response(severity: Severity, code: &str, message: &str) -> Frame {
    let mut b = BytesMut::with_capacity(32 + message.len());
    for (field, value) in [
        (b'S', severity.as_str()),
        (b'V', severity.as_str()),
        (b'C', code),
        (b'M', message),
    ] {
        b.put_u8(field);
        put_cstr(&mut b, value);
    }
    b.put_u8(0);
    frame(tag::ERROR_RESPONSE, b)
}

/// The fields of a backend ErrorResponse that the proxy acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    /// The DETAIL, when the proxy needs to tell errors of one message apart.
    pub detail: String,
}

impl ErrorFields {
    /// Lenient: a field that is not valid UTF-8 is skipped rather than failing the parse.
    pub fn parse(body: &[u8]) -> ErrorFields {
        let mut out = ErrorFields::default();
        let mut rest = body;
        while let Some((&field, tail)) = rest.split_first() {
            if field == 0 {
                break;
            }
            let Some(nul) = tail.iter().position(|&c| c == 0) else {
                break;
            };
            let value = String::from_utf8_lossy(&tail[..nul]);
            match field {
                b'V' => out.severity = value.into_owned(),
                b'S' if out.severity.is_empty() => out.severity = value.into_owned(),
                b'C' => out.code = value.into_owned(),
                b'M' => out.message = value.into_owned(),
                b'D' => out.detail = value.into_owned(),
                _ => {}
            }
            rest = &tail[nul + 1..];
        }
        out
    }
}

pub fn auth_ok() -> Frame {
    auth(0, &[])
}

pub fn auth_cleartext() -> Frame {
    auth(3, &[])
}

pub fn auth_md5(salt: [u8; 4]) -> Frame {
    auth(5, &salt)
}

pub fn auth_sasl(mechanisms: &[&str]) -> Frame {
    let mut data = BytesMut::new();
    for m in mechanisms {
        put_cstr(&mut data, m);
    }
    data.put_u8(0);
    auth(10, &data)
}

pub fn auth_sasl_continue(data: &[u8]) -> Frame {
    auth(11, data)
}

pub fn auth_sasl_final(data: &[u8]) -> Frame {
    auth(12, data)
}

fn auth(kind: i32, data: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(4 + data.len());
    b.put_i32(kind);
    b.put_slice(data);
    frame(tag::AUTHENTICATION, b)
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + value.len() + 2);
    put_cstr(&mut b, name);
    put_cstr(&mut b, value);
    frame(tag::PARAMETER_STATUS, b)
}

/// A ParameterStatus message appended to `out` (no frame of its own).
pub fn put_parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    out.put_u8(tag::PARAMETER_STATUS);
    out.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
    put_cstr(out, name);
    put_cstr(out, value);
}

/// Name and value of a ParameterStatus body.
pub fn decode_parameter_status(body: &[u8]) -> Option<(String, String)> {
    let nul = body.iter().position(|&c| c == 0)?;
    let rest = &body[nul + 1..];
    let nul2 = rest.iter().position(|&c| c == 0)?;
    Some((
        String::from_utf8_lossy(&body[..nul]).into_owned(),
        String::from_utf8_lossy(&rest[..nul2]).into_owned(),
    ))
}

/// The columns of a text-format DataRow (NULL as `None`); lenient with truncated input.
pub fn decode_data_row_text(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(count) = body.get(..2) else {
        return out;
    };
    let count = i16::from_be_bytes([count[0], count[1]]).max(0) as usize;
    let mut rest = &body[2..];
    for _ in 0..count {
        let Some(len) = rest.get(..4) else { break };
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
            continue;
        }
        let Some(value) = rest.get(..len as usize) else {
            break;
        };
        out.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &rest[len as usize..];
    }
    out
}

pub fn backend_key_data(pid: i32, secret: i32) -> Frame {
    let mut b = BytesMut::with_capacity(8);
    b.put_i32(pid);
    b.put_i32(secret);
    frame(tag::BACKEND_KEY_DATA, b)
}

pub fn ready_for_query(status: TxStatus) -> Frame {
    let mut b = BytesMut::with_capacity(1);
    b.put_u8(status.as_byte());
    frame(tag::READY_FOR_QUERY, b)
}

pub fn command_complete(command_tag: &str) -> Frame {
    let mut b = BytesMut::with_capacity(command_tag.len() + 1);
    put_cstr(&mut b, command_tag);
    frame(tag::COMMAND_COMPLETE, b)
}

/// The command tag of a CommandComplete body.
pub fn decode_command_tag(body: &[u8]) -> &[u8] {
    match body.iter().position(|&c| c == 0) {
        Some(n) => &body[..n],
        None => body,
    }
}

pub fn close_complete() -> Frame {
    empty(tag::CLOSE_COMPLETE)
}

/// A NoticeResponse (severity NOTICE, SQLSTATE 00000) the proxy sends itself.
pub fn notice_response(message: &str) -> Frame {
    let mut b = BytesMut::with_capacity(32 + message.len());
    for (field, value) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "00000"),
        (b'M', message),
    ] {
        b.put_u8(field);
        put_cstr(&mut b, value);
    }
    b.put_u8(0);
    frame(tag::NOTICE_RESPONSE, b)
}

/// RowDescription of text columns (type `text`, text format), for answers the proxy makes.
pub fn row_description_text(columns: &[&str]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(columns.len() as i16);
    for c in columns {
        put_cstr(&mut b, c);
        b.put_i32(0); // table oid
        b.put_i16(0); // column number
        b.put_i32(25); // text
        b.put_i16(-1); // variable length
        b.put_i32(-1); // no type modifier
        b.put_i16(0); // text format
    }
    frame(tag::ROW_DESCRIPTION, b)
}

/// DataRow of text values (`None`: NULL).
pub fn data_row_text(values: &[Option<&str>]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
            None => b.put_i32(-1),
        }
    }
    frame(tag::DATA_ROW, b)
}

pub fn parse_complete() -> Frame {
    empty(tag::PARSE_COMPLETE)
}

pub fn bind_complete() -> Frame {
    empty(tag::BIND_COMPLETE)
}

pub fn no_data() -> Frame {
    empty(tag::NO_DATA)
}

pub fn empty_query_response() -> Frame {
    empty(tag::EMPTY_QUERY_RESPONSE)
}

fn empty(tag: u8) -> Frame {
    Frame {
        tag,
        body: Bytes::new(),
    }
}

/// Tell a client asking for protocol 3.x (x > 0) or `_pq_.` options that we speak 3.0.
/// The first field is the whole version code, as the server sends it (the documentation
/// calls it the newest minor version; libpq 18 takes a bare 0 for "pre-3.0" and gives up).
pub fn negotiate_protocol_version(newest_version: i32, unsupported: &[&str]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(newest_version);
    b.put_i32(unsupported.len() as i32);
    for o in unsupported {
        put_cstr(&mut b, o);
    }
    frame(tag::NEGOTIATE_PROTOCOL_VERSION, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_round_trip() {
        let f = error_response(Severity::Fatal, "28P01", "password authentication failed");
        let e = ErrorFields::parse(&f.body);
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "password authentication failed");
        // Truncated input must not panic.
        let _ = ErrorFields::parse(&f.body[..7]);
        let _ = ErrorFields::parse(b"C");
    }

    #[test]
    fn data_rows_decode_leniently() {
        let body = [0, 2, 0, 0, 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(decode_data_row_text(&body), vec![Some("t".into()), None]);
        assert_eq!(decode_data_row_text(&body[..7]), vec![Some("t".into())]);
        assert!(decode_data_row_text(&[0, 1, 0, 0, 0, 9, b'x']).is_empty());
        assert!(decode_data_row_text(&[]).is_empty());
    }

    #[test]
    fn parameter_status_round_trip() {
        let f = parameter_status("TimeZone", "UTC");
        assert_eq!(
            decode_parameter_status(&f.body),
            Some(("TimeZone".into(), "UTC".into()))
        );
        assert_eq!(decode_parameter_status(b"x"), None);
        let mut framed = BytesMut::new();
        f.encode_into(&mut framed);
        let mut direct = BytesMut::new();
        put_parameter_status(&mut direct, "TimeZone", "UTC");
        assert_eq!(direct, framed);
    }
}
