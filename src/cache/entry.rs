//! What goes into Redis: entry keys, the versions an entry was filled under, and the stored
//! response frames. Pure functions; the Redis calls live in `store.rs`.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::tag;

/// Everything that can change a cached answer, hashed into the entry key.
pub struct KeyParts<'a> {
    pub user: &'a str,
    pub database: &'a str,
    /// Digest of the session settings in force (search_path, TimeZone, role ...).
    pub settings: &'a [u8],
    /// `Q` for a simple query; for the extended protocol, which optional messages the
    /// request carried (the replayed frames differ with them).
    pub shape: &'a str,
    pub normalized_sql: &'a str,
    /// Parameter type OIDs from Parse, then the Bind body from its parameter format codes
    /// on (formats, values, result formats); empty for a simple query.
    pub params: &'a [u8],
}

/// The Redis key of an entry: a hash, so keys stay short and reveal no SQL or parameters.
/// SHA-256 from ring (already linked for TLS): its assembly runs several times faster than
/// the portable implementation, and every cached read computes one.
pub fn entry_key(prefix: &str, parts: &KeyParts<'_>) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for field in [
        parts.user.as_bytes(),
        parts.database.as_bytes(),
        parts.settings,
        parts.shape.as_bytes(),
        parts.normalized_sql.as_bytes(),
        parts.params,
    ] {
        // Length-prefixed, so no two different tuples hash the same bytes.
        h.update(&(field.len() as u64).to_be_bytes());
        h.update(field);
    }
    let digest = h.finish();
    let mut key = String::with_capacity(prefix.len() + 3 + 2 * digest.as_ref().len());
    key.push_str(prefix);
    key.push_str(":e:");
    crate::hex::push_hex(&mut key, digest.as_ref());
    key
}

/// Digest of a session's settings, sorted by name so the order they were set in does not
/// matter.
pub fn settings_digest<'a>(settings: impl Iterator<Item = (&'a str, &'a str)>) -> [u8; 32] {
    let mut sorted: Vec<_> = settings.collect();
    sorted.sort_unstable();
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, value) in sorted {
        for field in [name, value] {
            h.update(&(field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// The Redis key of a table's version (`None`: the global epoch). The hash tag keeps each
/// counter on its own Redis Cluster slot, so the bump script touches one slot.
pub fn version_key(prefix: &str, table: Option<&str>) -> String {
    let table = table.unwrap_or("*");
    let mut key = String::with_capacity(prefix.len() + 5 + table.len());
    key.push_str(prefix);
    key.push_str(":v:{");
    key.push_str(table);
    key.push('}');
    key
}

/// A version value is `<counter>:<LSN as 16 hex digits>`: the counter changes at every
/// committed write, the LSN is the highest commit position among those writes. Returns the
/// LSN.
pub fn version_lsn(value: &str) -> Option<u64> {
    let (_, lsn) = value.split_once(':')?;
    u64::from_str_radix(lsn, 16).ok()
}

/// The value a missing version key starts at: a random counter, so an entry filled before
/// Redis lost the key (flush, eviction) can never match again, and `lsn`, the primary's
/// last known position: a write the key recorded may have been lost with it, so fills
/// wait for a replica that has replayed that far.
pub fn fresh_version(lsn: u64) -> String {
    format!("{}:{:016X}", rand::random::<u64>() >> 24, lsn)
}

pub fn lsn_hex(lsn: u64) -> String {
    format!("{lsn:016X}")
}

/// An entry: the versions it was filled under, then the response frames.
pub fn encode_entry(versions: &str, frames: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + versions.len() + frames.len());
    b.put_u32(versions.len() as u32);
    b.put_slice(versions.as_bytes());
    b.put_slice(frames);
    b.freeze()
}

/// The frames of an entry, if it was filled under exactly `versions`.
pub fn decode_entry(mut value: Bytes, versions: &str) -> Option<Bytes> {
    if value.len() < 4 {
        return None;
    }
    let n = u32::from_be_bytes([value[0], value[1], value[2], value[3]]) as usize;
    let stored = value.get(4..4 + n)?;
    if stored != versions.as_bytes() {
        return None;
    }
    let frames = value.split_off(4 + n);
    valid_frames(&frames).then_some(frames)
}

/// The part of a captured answer a hit can replay: RowDescription, DataRows and
/// CommandComplete as the server sent them. Messages the proxy produces itself on a hit
/// (ParseComplete, BindComplete, ReadyForQuery) and incidental ones (notices, parameter
/// status, notifications) are left out. `None` when the answer is not a complete,
/// successful result (an error, an empty query, a suspended portal, COPY).
pub fn replayable_frames(captured: &[u8]) -> Option<BytesMut> {
    let mut out = BytesMut::with_capacity(captured.len());
    let mut completed = false;
    let mut rest = captured;
    while !rest.is_empty() {
        let (t, frame) = split_frame(rest)?;
        rest = &rest[frame.len()..];
        match t {
            tag::ROW_DESCRIPTION | tag::DATA_ROW | tag::NO_DATA if !completed => {
                out.put_slice(frame)
            }
            tag::COMMAND_COMPLETE if !completed => {
                out.put_slice(frame);
                completed = true;
            }
            tag::PARSE_COMPLETE
            | tag::BIND_COMPLETE
            | tag::READY_FOR_QUERY
            | tag::NOTICE_RESPONSE
            | tag::PARAMETER_STATUS
            | tag::NOTIFICATION_RESPONSE => {}
            _ => return None,
        }
    }
    completed.then_some(out)
}

/// Well-formed frames of the shape [`replayable_frames`] stores (descriptions and rows,
/// then one CommandComplete) only: a corrupted or foreign value never reaches a client, and
/// never slips it a ReadyForQuery, an error or a parameter change the hit does not expect.
fn valid_frames(mut rest: &[u8]) -> bool {
    let mut completed = false;
    while !rest.is_empty() {
        let Some((t, f)) = split_frame(rest) else {
            return false;
        };
        rest = &rest[f.len()..];
        match t {
            tag::ROW_DESCRIPTION | tag::DATA_ROW | tag::NO_DATA if !completed => {}
            tag::COMMAND_COMPLETE if !completed => completed = true,
            _ => return false,
        }
    }
    completed
}

fn split_frame(buf: &[u8]) -> Option<(u8, &[u8])> {
    let header = buf.get(..5)?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let len = usize::try_from(len).ok().filter(|l| *l >= 4)?;
    Some((header[0], buf.get(..len + 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self, Frame, TxStatus};

    fn frames(list: &[Frame]) -> BytesMut {
        let mut b = BytesMut::new();
        for f in list {
            f.encode_into(&mut b);
        }
        b
    }

    fn data_row() -> Frame {
        Frame {
            tag: tag::DATA_ROW,
            body: Bytes::from_static(&[0, 1, 0, 0, 0, 1, b'7']),
        }
    }

    fn row_description() -> Frame {
        Frame {
            tag: tag::ROW_DESCRIPTION,
            body: Bytes::from_static(&[0, 0]),
        }
    }

    #[test]
    fn keys_differ_in_every_part() {
        let base = KeyParts {
            user: "app",
            database: "appdb",
            settings: b"s",
            shape: "Q",
            normalized_sql: "select 1",
            params: b"",
        };
        let k = entry_key("p", &base);
        assert!(k.starts_with("p:e:") && k.len() == 4 + 64);
        let variants = [
            KeyParts {
                user: "admin",
                ..base
            },
            KeyParts {
                database: "other",
                ..base
            },
            KeyParts {
                settings: b"t",
                ..base
            },
            KeyParts {
                shape: "PBDE",
                ..base
            },
            KeyParts {
                normalized_sql: "select 2",
                ..base
            },
            KeyParts {
                params: b"\0",
                ..base
            },
            // Shifting bytes between fields must not collide.
            KeyParts {
                user: "ap",
                database: "pappdb",
                ..base
            },
        ];
        for v in &variants {
            assert_ne!(entry_key("p", v), k);
        }
        assert_ne!(entry_key("q", &base), k);
    }

    #[test]
    fn keys_stay_what_earlier_versions_stored() {
        use sha2::{Digest, Sha256};
        // Hex SHA-256 of the length-prefixed parts (as built with sha2 before ring did it):
        // entries cached by an older pgsplit sharing the Redis remain reachable.
        let parts = KeyParts {
            user: "app",
            database: "appdb",
            settings: b"s",
            shape: "PBE",
            normalized_sql: "select $1",
            params: b"\0\x01",
        };
        let mut h = Sha256::new();
        for field in [&b"app"[..], b"appdb", b"s", b"PBE", b"select $1", b"\0\x01"] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field);
        }
        let expected: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(entry_key("pfx", &parts), format!("pfx:e:{expected}"));
        assert_eq!(version_key("pfx", Some("t")), "pfx:v:{t}");
        assert_eq!(version_key("pfx", None), "pfx:v:{*}");
    }

    #[test]
    fn settings_order_does_not_matter() {
        let a = settings_digest([("search_path", "a"), ("timezone", "UTC")].into_iter());
        let b = settings_digest([("timezone", "UTC"), ("search_path", "a")].into_iter());
        let c = settings_digest([("timezone", "UTC"), ("search_path", "b")].into_iter());
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn entries_match_only_their_versions() {
        let body = frames(&[
            row_description(),
            data_row(),
            protocol::command_complete("SELECT 1"),
        ]);
        let e = encode_entry("3:00000000000000A0,9:0000000000000010", &body);
        assert_eq!(
            decode_entry(e.clone(), "3:00000000000000A0,9:0000000000000010").as_deref(),
            Some(&body[..])
        );
        assert_eq!(
            decode_entry(e, "4:00000000000000B0,9:0000000000000010"),
            None
        );
        assert_eq!(
            decode_entry(Bytes::from_static(b"\0\0\0\x09garbage"), ""),
            None
        );
        assert_eq!(
            decode_entry(Bytes::from_static(b"\0\0\0\0D\0\0\0\x09ab"), ""),
            None
        );
    }

    #[test]
    fn stored_values_of_another_shape_are_refused() {
        let done = protocol::command_complete("SELECT 1");
        for body in [
            // No CommandComplete: the client would wait for ever.
            frames(&[row_description(), data_row()]),
            // Anything after it, or a frame a hit never replays.
            frames(&[data_row(), done.clone(), data_row()]),
            frames(&[
                data_row(),
                protocol::ready_for_query(TxStatus::Idle),
                done.clone(),
            ]),
            frames(&[
                protocol::error_response(protocol::Severity::Error, "XX000", "no"),
                done.clone(),
            ]),
        ] {
            assert_eq!(decode_entry(encode_entry("1:00", &body), "1:00"), None);
        }
        let good = frames(&[row_description(), data_row(), done]);
        assert!(decode_entry(encode_entry("1:00", &good), "1:00").is_some());
    }

    #[test]
    fn versions_carry_the_commit_position() {
        assert_eq!(version_lsn("17:0000000001A2B3C4"), Some(0x1A2B3C4));
        assert_eq!(version_lsn("garbage"), None);
        assert_eq!(version_lsn(&fresh_version(0x2A)), Some(0x2A));
        assert_eq!(lsn_hex(0x1A), "000000000000001A");
        assert_eq!(version_key("p", Some("albums")), "p:v:{albums}");
        assert_eq!(version_key("p", None), "p:v:{*}");
    }

    #[test]
    fn only_complete_successful_results_are_replayable() {
        let ok = frames(&[
            protocol::parse_complete(),
            protocol::bind_complete(),
            row_description(),
            data_row(),
            protocol::command_complete("SELECT 1"),
            protocol::ready_for_query(TxStatus::Idle),
        ]);
        let kept = replayable_frames(&ok).unwrap();
        assert_eq!(
            kept,
            frames(&[
                row_description(),
                data_row(),
                protocol::command_complete("SELECT 1")
            ])
        );
        let failed = frames(&[
            row_description(),
            protocol::error_response(protocol::Severity::Error, "57014", "canceled"),
            protocol::ready_for_query(TxStatus::Idle),
        ]);
        assert_eq!(replayable_frames(&failed), None);
        let unfinished = frames(&[row_description(), data_row()]);
        assert_eq!(replayable_frames(&unfinished), None);
        let suspended = frames(&[
            data_row(),
            Frame {
                tag: tag::PORTAL_SUSPENDED,
                body: Bytes::new(),
            },
        ]);
        assert_eq!(replayable_frames(&suspended), None);
        assert_eq!(replayable_frames(&ok[..ok.len() - 3]), None, "a cut frame");
    }
}
