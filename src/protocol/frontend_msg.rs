//! Views of the frontend messages routing needs (Query, Parse, Bind, Describe, Close,
//! Execute) and the few rewrites the proxy does (statement names in Parse/Bind/Describe/
//! Close). Everything else is forwarded untouched.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};

use super::{Frame, tag};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("malformed {0} message")]
pub struct MalformedMessage(pub &'static str);

/// Where the first NUL byte of `b` is. `CStr` searches word by word (core's memchr), several
/// times faster than a byte loop over a statement's text.
fn nul_at(b: &[u8]) -> Option<usize> {
    std::ffi::CStr::from_bytes_until_nul(b)
        .ok()
        .map(|c| c.count_bytes())
}

/// Split a NUL-terminated UTF-8 string off the front of `b`: a statement or portal name,
/// short enough that a byte loop beats `nul_at`'s setup.
fn cstr<'a>(b: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), MalformedMessage> {
    let nul = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(MalformedMessage(what))?;
    let s = match ascii_text(&b[..nul]) {
        Some(s) => s,
        None => std::str::from_utf8(&b[..nul]).map_err(|_| MalformedMessage(what))?,
    };
    Ok((s, &b[nul + 1..]))
}

/// Split a NUL-terminated byte string off the front of `b` (any client encoding): SQL text.
fn cbytes<'a>(b: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), MalformedMessage> {
    let nul = nul_at(b).ok_or(MalformedMessage(what))?;
    Ok((&b[..nul], &b[nul + 1..]))
}

/// The SQL of a simple Query message, for classification. The client encoding need not be
/// UTF-8: invalid sequences become U+FFFD here, while the frame itself is forwarded as sent
/// (the server judges the encoding).
pub fn query_sql(body: &[u8]) -> Result<Cow<'_, str>, MalformedMessage> {
    if let Some((&0, sql)) = body.split_last()
        && let Some(text) = ascii_text(sql)
    {
        return Ok(Cow::Borrowed(text));
    }
    let (sql, rest) = cbytes(body, "Query")?;
    if !rest.is_empty() {
        return Err(MalformedMessage("Query"));
    }
    Ok(lossy_text(sql))
}

/// `b` as text if no byte is NUL or beyond ASCII: the usual statement text and names,
/// recognised in one pass without branches (the compiler folds 16 bytes per instruction),
/// where finding the NUL and then validating UTF-8 takes two.
fn ascii_text(b: &[u8]) -> Option<&str> {
    if b.iter().fold(0u8, |acc, &c| acc | c | c.wrapping_sub(1)) >= 0x80 {
        return None;
    }
    // SAFETY: every byte is ASCII (just checked), and ASCII is valid UTF-8. Skipping the
    // second pass that `from_utf8` would make took about a tenth off the proxy's
    // instructions for a simple-protocol select.
    Some(unsafe { std::str::from_utf8_unchecked(b) })
}

/// `sql` as text, U+FFFD for invalid sequences. Checked as UTF-8 first: that check runs word
/// by word over ASCII, several times faster than the lossy decoder on the usual valid text.
fn lossy_text(sql: &[u8]) -> Cow<'_, str> {
    if let Some(text) = ascii_text(sql) {
        return Cow::Borrowed(text);
    }
    match std::str::from_utf8(sql) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(sql),
    }
}

/// A decoded Parse message. `param_types` is the raw tail (count + OIDs), kept as bytes so
/// the statement can be re-sent exactly as the client declared it.
#[derive(Clone, PartialEq, Eq)]
pub struct ParseMsg {
    pub name: String,
    /// The SQL for classification (lossy if the client encoding is not UTF-8).
    pub sql: String,
    /// The SQL exactly as the client sent it.
    pub sql_raw: Bytes,
    pub param_types: Bytes,
}

/// Name and size only: SQL text can hold literals such as `ALTER ROLE ... PASSWORD '...'`.
impl std::fmt::Debug for ParseMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParseMsg")
            .field("name", &self.name)
            .field("sql_len", &self.sql_raw.len())
            .finish()
    }
}

impl ParseMsg {
    pub fn decode(body: &Bytes) -> Result<ParseMsg, MalformedMessage> {
        let (name, rest) = cstr(body, "Parse")?;
        let sql_start = body.len() - rest.len();
        let (sql, rest) = cbytes(rest, "Parse")?;
        let sql_raw = body.slice(sql_start..sql_start + sql.len());
        if rest.len() < 2 {
            return Err(MalformedMessage("Parse"));
        }
        // Unsigned, as the server reads it: up to 65535 parameter types.
        let n = u16::from_be_bytes([rest[0], rest[1]]);
        if rest.len() != 2 + 4 * n as usize {
            return Err(MalformedMessage("Parse"));
        }
        let offset = body.len() - rest.len();
        Ok(ParseMsg {
            name: name.to_owned(),
            sql: lossy_text(sql).into_owned(),
            sql_raw,
            param_types: body.slice(offset..),
        })
    }

    /// The same statement under another name.
    pub fn encode_named(&self, name: &str) -> Frame {
        let mut b = BytesMut::with_capacity(self.body_len(name));
        self.put_body(name, &mut b);
        Frame {
            tag: tag::PARSE,
            body: b.freeze(),
        }
    }

    /// The same statement under another name, as a whole message written onto `out` (no
    /// buffer of its own: this runs for every Parse a client sends).
    pub fn encode_named_into(&self, name: &str, out: &mut BytesMut) {
        let len = self.body_len(name);
        out.reserve(5 + len);
        out.put_u8(tag::PARSE);
        out.put_i32((len + 4) as i32);
        self.put_body(name, out);
    }

    fn body_len(&self, name: &str) -> usize {
        name.len() + self.sql_raw.len() + 2 + self.param_types.len()
    }

    fn put_body(&self, name: &str, b: &mut BytesMut) {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        // The client's own bytes: `sql` is lossy for clients whose encoding is not UTF-8.
        b.put_slice(&self.sql_raw);
        b.put_u8(0);
        b.put_slice(&self.param_types);
    }
}

/// Portal and statement names of a Bind message, and where the rest of it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindNames<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
    rest_offset: usize,
}

impl<'a> BindNames<'a> {
    pub fn decode(body: &'a [u8]) -> Result<BindNames<'a>, MalformedMessage> {
        let (portal, rest) = cstr(body, "Bind")?;
        let (statement, rest) = cstr(rest, "Bind")?;
        Ok(BindNames {
            portal,
            statement,
            rest_offset: body.len() - rest.len(),
        })
    }

    /// Parameter formats, values and result formats: the part a result cache keys on.
    pub fn tail(&self, body: &'a [u8]) -> &'a [u8] {
        &body[self.rest_offset..]
    }
}

/// The parameter values a Bind sends in text format (NULLs left out), from its
/// [`tail`](BindNames::tail); `None` if the tail is malformed.
pub fn bind_text_values(tail: &[u8]) -> Option<Vec<&[u8]>> {
    fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = r.split_at_checked(n)?;
        *r = rest;
        Some(head)
    }
    fn int16(r: &mut &[u8]) -> Option<usize> {
        Some(u16::from_be_bytes(take(r, 2)?.try_into().ok()?) as usize)
    }
    let mut r = tail;
    let nformats = int16(&mut r)?;
    let formats = take(&mut r, nformats * 2)?;
    let nparams = int16(&mut r)?;
    let mut values = Vec::new();
    for i in 0..nparams {
        let len = i32::from_be_bytes(take(&mut r, 4)?.try_into().ok()?);
        let Ok(len) = usize::try_from(len) else {
            continue; // NULL
        };
        let value = take(&mut r, len)?;
        // No format codes: all text; one: for all; else one per parameter.
        let binary = match nformats {
            0 => false,
            1 => formats[1] != 0,
            _ => *formats.get(i * 2 + 1)? != 0,
        };
        if !binary {
            values.push(value);
        }
    }
    Some(values)
}

/// The same Bind aimed at another server-side statement name.
pub fn rewrite_bind(body: &Bytes, names: &BindNames<'_>, statement: &str) -> Frame {
    let mut b = BytesMut::with_capacity(rewritten_bind_len(body, names, statement));
    put_rewritten_bind(body, names, statement, &mut b);
    Frame {
        tag: tag::BIND,
        body: b.freeze(),
    }
}

/// [`rewrite_bind`], as a whole message written onto `out` (no buffer of its own: this
/// runs for every Bind of a prepared statement).
pub fn rewrite_bind_into(body: &[u8], names: &BindNames<'_>, statement: &str, out: &mut BytesMut) {
    let len = rewritten_bind_len(body, names, statement);
    out.reserve(5 + len);
    out.put_u8(tag::BIND);
    out.put_i32((len + 4) as i32);
    put_rewritten_bind(body, names, statement, out);
}

fn rewritten_bind_len(body: &[u8], names: &BindNames<'_>, statement: &str) -> usize {
    names.portal.len() + statement.len() + 2 + (body.len() - names.rest_offset)
}

fn put_rewritten_bind(body: &[u8], names: &BindNames<'_>, statement: &str, b: &mut BytesMut) {
    b.put_slice(names.portal.as_bytes());
    b.put_u8(0);
    b.put_slice(statement.as_bytes());
    b.put_u8(0);
    b.put_slice(&body[names.rest_offset..]);
}

/// What a Describe or Close message targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Statement(&'a str),
    Portal(&'a str),
}

/// Decode Describe / Close (same layout: kind byte 'S' or 'P', then a name).
pub fn decode_target<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<Target<'a>, MalformedMessage> {
    let (&kind, rest) = body.split_first().ok_or(MalformedMessage(what))?;
    let (name, rest) = cstr(rest, what)?;
    if !rest.is_empty() {
        return Err(MalformedMessage(what));
    }
    match kind {
        b'S' => Ok(Target::Statement(name)),
        b'P' => Ok(Target::Portal(name)),
        _ => Err(MalformedMessage(what)),
    }
}

/// A Describe or Close of a statement under another name.
pub fn encode_statement_target(frame_tag: u8, name: &str) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + 2);
    b.put_u8(b'S');
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    Frame {
        tag: frame_tag,
        body: b.freeze(),
    }
}

/// Check an Execute message's layout (portal name, row limit).
pub fn validate_execute(body: &[u8]) -> Result<(), MalformedMessage> {
    let (_, rest) = cstr(body, "Execute")?;
    if rest.len() != 4 {
        return Err(MalformedMessage("Execute"));
    }
    Ok(())
}

/// Frontend messages the proxy originates (towards a backend).
pub fn query_frame(sql: &str) -> Frame {
    let mut b = BytesMut::with_capacity(sql.len() + 1);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    Frame {
        tag: tag::QUERY,
        body: b.freeze(),
    }
}

pub fn sync_frame() -> Frame {
    Frame {
        tag: tag::SYNC,
        body: Bytes::new(),
    }
}

/// Messages that read the value of the setting `name` now in force
/// (`current_setting(name, true)`: NULL if there is none) through a statement and portal
/// of their own, then close both and Sync. Unlike a simple Query, they leave the client's
/// unnamed statement and portal alone: inside a transaction block the client may still be
/// fetching from its portal.
pub fn read_setting_messages(name: &str, out: &mut BytesMut) {
    const STATEMENT: &[u8] = b"pgsplit\x01read setting\0";
    const SQL: &[u8] = b"SELECT pg_catalog.current_setting($1, true)\0";
    let mut message = |tag: u8, parts: &[&[u8]]| {
        out.put_u8(tag);
        out.put_i32(4 + parts.iter().map(|p| p.len()).sum::<usize>() as i32);
        for part in parts {
            out.put_slice(part);
        }
    };
    // One parameter, of type text (OID 25).
    message(tag::PARSE, &[STATEMENT, SQL, &[0, 1, 0, 0, 0, 25]]);
    // Portal and statement of the same name; no format codes (text); the name; text results.
    message(
        tag::BIND,
        &[
            STATEMENT,
            STATEMENT,
            &[0, 0, 0, 1],
            &(name.len() as i32).to_be_bytes(),
            name.as_bytes(),
            &[0, 0],
        ],
    );
    message(tag::EXECUTE, &[STATEMENT, &[0, 0, 0, 0]]);
    message(tag::CLOSE, &[b"P", STATEMENT]);
    message(tag::CLOSE, &[b"S", STATEMENT]);
    message(tag::SYNC, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_a_setting_names_neither_the_unnamed_statement_nor_portal() {
        let mut out = BytesMut::new();
        read_setting_messages("search_path", &mut out);
        let mut frames = Vec::new();
        let mut buf = out;
        while let Some(f) = crate::protocol::decode_frame(&mut buf, 1 << 20).unwrap() {
            frames.push(f);
        }
        assert!(buf.is_empty());
        let tags: Vec<u8> = frames.iter().map(|f| f.tag).collect();
        assert_eq!(tags, b"PBECCS");
        let parse = ParseMsg::decode(&frames[0].body).unwrap();
        assert_eq!(parse.name, "pgsplit\u{1}read setting");
        let bind = BindNames::decode(&frames[1].body).unwrap();
        assert_eq!(
            (bind.portal, bind.statement),
            (parse.name.as_str(), parse.name.as_str())
        );
        assert_eq!(
            bind_text_values(bind.tail(&frames[1].body)),
            Some(vec![&b"search_path"[..]])
        );
        validate_execute(&frames[2].body).unwrap();
        assert_eq!(
            decode_target(&frames[3].body, "Close"),
            Ok(Target::Portal(&parse.name))
        );
        assert_eq!(
            decode_target(&frames[4].body, "Close"),
            Ok(Target::Statement(&parse.name))
        );
    }

    #[test]
    fn bind_text_values_follow_the_format_codes_and_never_panic() {
        // Two parameters: 'now' as text, 4 binary bytes; formats [0, 1].
        let mut tail = vec![0, 2, 0, 0, 0, 1, 0, 2];
        tail.extend_from_slice(&3i32.to_be_bytes());
        tail.extend_from_slice(b"now");
        tail.extend_from_slice(&4i32.to_be_bytes());
        tail.extend_from_slice(&[1, 2, 3, 4]);
        tail.extend_from_slice(&[0, 0]);
        assert_eq!(bind_text_values(&tail), Some(vec![&b"now"[..]]));
        // One format code for all (binary): nothing in text; a NULL is skipped.
        let mut all_binary = vec![0, 1, 0, 1, 0, 1];
        all_binary.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(bind_text_values(&all_binary), Some(vec![]));
        for cut in 0..tail.len() - 2 {
            let _ = bind_text_values(&tail[..cut]);
        }
        assert_eq!(bind_text_values(&[0, 0, 0, 1, 0, 0, 0, 9, b'x']), None);
    }

    #[test]
    fn ascii_text_is_ascii_without_nul() {
        assert_eq!(ascii_text(b""), Some(""));
        let all: Vec<u8> = (1..=0x7f).collect();
        assert_eq!(ascii_text(&all).map(str::len), Some(0x7f));
        for bad in [0u8, 0x80, 0x81, 0xfe, 0xff] {
            let mut text = b"select 1 from a_table_with_a_long_name".to_vec();
            text.insert(20, bad);
            assert_eq!(ascii_text(&text), None, "{bad:#x}");
        }
    }

    #[test]
    fn parse_round_trip_under_a_new_name() {
        let body = Bytes::from_static(b"s1\0select $1\0\0\x01\0\0\0\x17");
        let p = ParseMsg::decode(&body).unwrap();
        assert_eq!(p.name, "s1");
        assert_eq!(p.sql, "select $1");
        let f = p.encode_named("srv");
        assert_eq!(&f.body[..], b"srv\0select $1\0\0\x01\0\0\0\x17");
        let (mut whole, mut direct) = (BytesMut::from(&b"x"[..]), BytesMut::from(&b"x"[..]));
        f.encode_into(&mut whole);
        p.encode_named_into("srv", &mut direct);
        assert_eq!(direct, whole);
        assert!(ParseMsg::decode(&Bytes::from_static(b"s1\0select\0\0\x02\0\0\0\x17")).is_err());
        assert!(ParseMsg::decode(&Bytes::from_static(b"s1\0select")).is_err());
        // A count over 32767 is no negative number: the server takes up to 65535.
        let mut wide = b"s\0select\0\x80\x00".to_vec();
        wide.extend(std::iter::repeat_n(0u8, 4 * 32768));
        assert_eq!(
            ParseMsg::decode(&Bytes::from(wide))
                .unwrap()
                .param_types
                .len(),
            2 + 4 * 32768
        );
    }

    #[test]
    fn parse_re_encodes_the_clients_bytes_not_the_lossy_text() {
        let body = Bytes::from_static(b"s\0SELECT '\xe9'\0\0\0");
        let p = ParseMsg::decode(&body).unwrap();
        assert!(p.sql.contains('\u{fffd}'));
        assert_eq!(&p.encode_named("s").body[..], &body[..]);
    }

    #[test]
    fn bind_rewrite_keeps_the_tail() {
        let body = Bytes::from_static(b"p\0s1\0\0\0\0\x01\0\0\0\x011\0\0");
        let names = BindNames::decode(&body).unwrap();
        assert_eq!((names.portal, names.statement), ("p", "s1"));
        let f = rewrite_bind(&body, &names, "srv_1");
        assert_eq!(&f.body[..], b"p\0srv_1\0\0\0\0\x01\0\0\0\x011\0\0");
        let (mut whole, mut direct) = (BytesMut::from(&b"x"[..]), BytesMut::from(&b"x"[..]));
        f.encode_into(&mut whole);
        rewrite_bind_into(&body, &names, "srv_1", &mut direct);
        assert_eq!(direct, whole);
    }

    #[test]
    fn describe_and_close_targets() {
        assert_eq!(
            decode_target(b"Sabc\0", "Describe"),
            Ok(Target::Statement("abc"))
        );
        assert_eq!(decode_target(b"P\0", "Close"), Ok(Target::Portal("")));
        assert_eq!(
            decode_target("Sé\0".as_bytes(), "Close"),
            Ok(Target::Statement("é"))
        );
        assert!(decode_target(b"S\xff\0", "Close").is_err());
        assert!(decode_target(b"Xa\0", "Close").is_err());
        assert!(decode_target(b"", "Close").is_err());
        assert!(decode_target(b"Sa", "Close").is_err());
    }

    #[test]
    fn query_needs_its_terminator() {
        assert_eq!(query_sql(b"select 1\0").unwrap(), "select 1");
        assert!(query_sql(b"select 1").is_err());
        assert!(query_sql(b"a\0b\0").is_err());
        assert!(query_sql(b"a\0\0").is_err());
        assert_eq!(query_sql(b"\xff\0").unwrap(), "\u{fffd}");
        assert_eq!(query_sql(b"\x80\0").unwrap(), "\u{fffd}");
        assert_eq!(query_sql("select 'é'\0".as_bytes()).unwrap(), "select 'é'");
        assert_eq!(query_sql(b"\0").unwrap(), "");
        assert!(query_sql(b"").is_err());
    }

    #[test]
    fn finds_the_first_nul_at_any_position() {
        assert_eq!(nul_at(b""), None);
        assert_eq!(nul_at(b"abc"), None);
        assert_eq!(nul_at(b"\0abc"), Some(0));
        let mut long = vec![b'x'; 100];
        assert_eq!(nul_at(&long), None);
        for at in [1, 7, 8, 9, 63, 64, 99] {
            long[at] = 0;
            assert_eq!(nul_at(&long), Some(at));
            long[at] = 0xff;
        }
    }
}
