//! The startup-phase parser (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) on
//! arbitrary bytes, read the way `session::startup::read_startup` reads them, and what the
//! session derives from the parameters of a StartupMessage.
//!
//! Input: one byte choosing the chunk size, then the first bytes of a client connection.
//!
//! Checks: no panic; cancel-safe (any chunking gives the same packets and error); errors map
//! to 08P01 / 0A000; startup parameters turned into session settings (transaction pool mode)
//! are each one `set_config` call that quotes the client's text, so a parameter can never
//! smuggle in a second statement.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsplit::protocol::{StartupError, StartupPacket, decode_startup, negotiate_protocol_version};
use pgsplit_fuzz::check_error_response;
use pgsplit_fuzz::state::{Settings, startup_settings};

/// Packets up to the first StartupMessage or CancelRequest (what `read_startup` returns),
/// then how reading stopped.
#[derive(Debug, PartialEq)]
struct Read {
    packets: Vec<StartupPacket>,
    error: Option<StartupError>,
}

fn read(data: &[u8], chunk: usize) -> Read {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decode_startup(&mut buf) {
                Ok(Some(p)) => {
                    let last = !matches!(p, StartupPacket::Ssl | StartupPacket::GssEnc);
                    packets.push(p);
                    if last {
                        return Read {
                            packets,
                            error: None,
                        };
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return Read {
                        packets,
                        error: Some(e),
                    };
                }
            }
        }
    }
    Read {
        packets,
        error: None,
    }
}

fn check_startup(minor: u16, params: &[(String, String)]) {
    let unsupported: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if minor > 0 || !unsupported.is_empty() {
        let f = negotiate_protocol_version(0, &unsupported);
        assert_eq!(f.tag, b'v');
    }
    let settings = startup_settings(params);
    for (name, sql) in &settings {
        assert_eq!(*name, name.to_ascii_lowercase());
        // The client's text only ever appears inside the two quoted arguments.
        let inner = sql
            .strip_prefix("SELECT pg_catalog.set_config('")
            .and_then(|s| s.strip_suffix("', false)"))
            .unwrap_or_else(|| panic!("unexpected setting SQL {sql:?}"));
        let (n, v) = split_quoted_args(inner)
            .unwrap_or_else(|| panic!("setting SQL {sql:?} escapes its quotes"));
        assert!(!n.contains('\0') && !v.contains('\0'));
    }
    let s = Settings::with_baseline(settings.clone());
    assert_eq!(s.generation == 0, s.baseline.is_empty());
    assert_eq!(
        s.diff_sql(&Default::default()).is_none(),
        s.baseline.is_empty()
    );
    assert_eq!(s.diff_sql(&s.effective()), None);
}

/// `name', 'value` with every quote inside doubled: the two unescaped texts, or `None` if a
/// lone quote would end a literal early.
fn split_quoted_args(s: &str) -> Option<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            if chars.peek() == Some(&'\'') {
                chars.next();
                cur.push('\'');
                continue;
            }
            // The only lone quotes are the ones around the separator `', '`.
            if chars.next() != Some(',') || chars.next() != Some(' ') || chars.next() != Some('\'')
            {
                return None;
            }
            parts.push(std::mem::take(&mut cur));
            continue;
        }
        cur.push(c);
    }
    parts.push(cur);
    match <[String; 2]>::try_from(parts) {
        Ok([n, v]) => Some((n, v)),
        Err(_) => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, data)) = data.split_first() else {
        return;
    };
    let chunk = 1 + knob as usize;
    let whole = read(data, data.len());
    let pieces = read(data, chunk);
    assert_eq!(whole, pieces, "startup parsing depends on how bytes arrive");
    if let Some(e) = whole.error {
        check_error_response(&pgsplit::Error::from(e));
    }
    if let Some(StartupPacket::Startup { minor, params }) = whole.packets.last() {
        check_startup(*minor, params);
    }
});
