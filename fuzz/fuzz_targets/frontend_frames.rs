//! The tagged-frame decoder on arbitrary client bytes, and every message view on each body.
//!
//! Input: one byte choosing how the bytes arrive (chunk size) and the frame limit, then the
//! bytes a client sends after its startup packet.
//!
//! Checks: no panic; decoding is cancel-safe (bytes arriving in any chunks give the same
//! frames and the same error as all at once); the proxy's rewrites of Parse/Bind/Describe/
//! Close keep everything but the name byte-for-byte; the relay's scanner (`scan_relay`) sees
//! the same frames however bytes arrive; errors map to 08P01.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsplit::protocol::{
    self, BindNames, Frame, FrameError, ParseMsg, Target, decode_frame, decode_target,
    encode_statement_target, query_sql, rewrite_bind, scan_relay, tag, validate_execute,
};
use pgsplit_fuzz::check_error_response;

/// What decoding a byte stream produced: the frames, then how it stopped.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Frame>,
    error: Option<FrameError>,
}

fn decode_all(data: &[u8], chunk: usize, max: usize) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decode_frame(&mut buf, max) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    // What is left is never consumed: the header stays for the next look.
                    assert!(buf.len() >= 5);
                    return Decoded {
                        frames,
                        error: Some(e),
                    };
                }
            }
        }
    }
    // Whatever stays buffered is less than one whole frame.
    if buf.len() >= 5 {
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        assert!(len >= 4 && buf.len() < len as usize + 1);
    }
    Decoded {
        frames,
        error: None,
    }
}

/// Frames the relay inspects (tag and body), found by `scan_relay` with bytes arriving in
/// `chunk`-sized pieces, and whether it stopped on an error.
fn relay_scan(data: &[u8], chunk: usize, max: usize) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut buf: Vec<u8> = Vec::new();
    let mut passthrough = 0usize;
    let mut seen = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        let r = scan_relay(&buf, &mut passthrough, max, |t, body, _| {
            seen.push((t, body.to_vec()));
            true
        });
        match r {
            Ok(n) => {
                assert!(n <= buf.len());
                buf.drain(..n);
            }
            Err(_) => return (seen, true),
        }
    }
    (seen, false)
}

fn check_body(frame: &Frame) {
    let body = &frame.body;
    match frame.tag {
        tag::QUERY => {
            let _ = query_sql(body);
        }
        tag::PARSE => {
            if let Ok(p) = ParseMsg::decode(body) {
                // Renaming keeps the client's SQL bytes and parameter types exactly.
                assert_eq!(p.encode_named(&p.name).body, *body);
                let renamed = p.encode_named("pgsplit_0123456789abcdef");
                let again = ParseMsg::decode(&renamed.body).expect("a renamed Parse decodes");
                assert_eq!(again.name, "pgsplit_0123456789abcdef");
                assert_eq!(again.sql_raw, p.sql_raw);
                assert_eq!(again.param_types, p.param_types);
            }
        }
        tag::BIND => {
            if let Ok(names) = BindNames::decode(body) {
                assert_eq!(rewrite_bind(body, &names, names.statement).body, *body);
                let renamed = rewrite_bind(body, &names, "pgsplit_0123456789abcdef");
                let again = BindNames::decode(&renamed.body).expect("a renamed Bind decodes");
                assert_eq!(again.portal, names.portal);
                assert_eq!(again.statement, "pgsplit_0123456789abcdef");
                assert_eq!(again.tail(&renamed.body), names.tail(body));
            }
        }
        tag::DESCRIBE | tag::CLOSE => {
            let what = if frame.tag == tag::DESCRIBE {
                "Describe"
            } else {
                "Close"
            };
            if let Ok(Target::Statement(name)) = decode_target(body, what) {
                assert_eq!(encode_statement_target(frame.tag, name).body, *body);
            }
        }
        tag::EXECUTE => {
            let _ = validate_execute(body);
        }
        tag::PASSWORD => {
            let _ =
                pgsplit::auth::md5_response_ok("0123456789abcdef0123456789abcdef", [1; 4], body);
        }
        _ => {}
    }
    // The backend views, on the same bytes: a server's frames are peer input too.
    let _ = protocol::ErrorFields::parse(body);
    let _ = protocol::decode_parameter_status(body);
    let _ = protocol::decode_data_row_text(body);
    let _ = protocol::decode_command_tag(body);
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, data)) = data.split_first() else {
        return;
    };
    let chunk = 1 + (knob & 0x3f) as usize;
    // The smallest limit a config allows, the limit before login, and the default.
    let max = match knob >> 6 {
        0 => 1024,
        1 => 64 * 1024,
        _ => 256 << 20,
    };
    let whole = decode_all(data, data.len(), max);
    let pieces = decode_all(data, chunk, max);
    assert_eq!(whole, pieces, "decoding depends on how bytes arrive");
    for f in &whole.frames {
        check_body(f);
        let mut out = BytesMut::new();
        f.encode_into(&mut out);
        assert_eq!(out.len(), f.wire_len());
    }
    if let Some(e) = whole.error {
        check_error_response(&pgsplit::Error::from(e));
    }
    // The same bytes as a server's answer, through the relay's streaming scanner.
    let (seen_whole, err_whole) = relay_scan(data, data.len(), max);
    let (seen_pieces, err_pieces) = relay_scan(data, chunk, max);
    assert_eq!(err_whole, err_pieces);
    assert_eq!(
        seen_whole, seen_pieces,
        "the relay sees other frames in pieces"
    );
});
