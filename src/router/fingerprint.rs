//! The shape of a statement: its text with number and string literals masked. Statements
//! that differ only in literal values (`WHERE aid = 17` / `= 42`, as simple-protocol clients
//! send them) route alike, so one classification serves them all instead of one sqlparser
//! run per query.

/// `None` when the text has something whose classification may depend on a literal or that
/// this scanner does not take apart safely: comments, dollar quotes, escape strings, and the
/// strings PostgreSQL evaluates at run time ('now', 'today', ...).
pub fn fingerprint(sql: &str) -> Option<String> {
    let mut out = String::new();
    fingerprint_into(sql, &mut out).then_some(out)
}

/// [`fingerprint`] into `out` (cleared first), so a caller on the hot path can reuse one
/// buffer; true when a literal was masked (`out` holds the shape).
///
/// One pass: bytes that need no look are skipped by a table lookup each, and nothing is
/// copied until the first literal is masked, so a text without one (most texts sent with
/// parameters) costs a scan and no copy.
pub fn fingerprint_into(sql: &str, out: &mut String) -> bool {
    out.clear();
    let b = sql.as_bytes();
    // `sql[..copied]` is already in `out` (with its literals masked). Every position stored
    // here follows an ASCII byte, so it is a char boundary.
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if !SPECIAL[usize::from(c)] {
            i += 1;
            // Then eight bytes at a time: keywords, names and spaces, most of a statement,
            // pass at about an instruction a byte, and a word that may hold a special byte
            // is looked at byte by byte once (punctuation like `.` and `,` only may).
            while let Some(word) = b.get(i..i + 8) {
                if may_hold_special(u64::from_le_bytes(word.try_into().unwrap_or_default())) {
                    match word.iter().position(|&c| SPECIAL[usize::from(c)]) {
                        Some(at) => {
                            i += at;
                            break;
                        }
                        None => i += 8,
                    }
                } else {
                    i += 8;
                }
            }
            continue;
        }
        let prev_ident = i > 0 && is_ident(b[i - 1]);
        match c {
            b'\'' => {
                if prev_ident
                    && matches!(
                        b[i - 1],
                        b'e' | b'E' | b'b' | b'B' | b'x' | b'X' | b'n' | b'N' | b'u' | b'U' | b'&'
                    )
                {
                    // E'..', B'..', X'..', N'..', U&'..': other quoting rules.
                    return false;
                }
                let start = i + 1;
                let Some(end) = closing(b, start, b'\'') else {
                    return false;
                };
                if is_run_time_word(sql[start..end].trim()) {
                    return false;
                }
                if !names_a_setting(b, i) {
                    mask(out, sql, copied, i, "'?'");
                    copied = end + 1;
                }
                i = end + 1;
            }
            b'"' => match closing(b, i + 1, b'"') {
                Some(end) => i = end + 1,
                None => return false,
            },
            b'-' if b.get(i + 1) == Some(&b'-') => return false,
            b'/' if b.get(i + 1) == Some(&b'*') => return false,
            b'$' if !prev_ident && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => return false,
            b'0'..=b'9' if !prev_ident => {
                let mut end = i;
                while end < b.len()
                    && (b[end].is_ascii_alphanumeric() || b[end] == b'.' || b[end] == b'_')
                {
                    end += 1;
                }
                mask(out, sql, copied, i, "?");
                copied = end;
                i = end;
            }
            _ => i += 1,
        }
    }
    if copied == 0 {
        // Nothing masked (a literal ends at `copied` >= 1).
        return false;
    }
    out.push_str(&sql[copied..]);
    true
}

/// Append the text between the last masked literal and the one at `at`, then its mask.
fn mask(out: &mut String, sql: &str, copied: usize, at: usize, with: &str) {
    if copied == 0 {
        // The first mask: the shape is at most as long as the text.
        out.reserve(sql.len());
    }
    out.push_str(&sql[copied..at]);
    out.push_str(with);
}

/// The index of the quote closing a quoted text that starts at `from` (a doubled quote
/// stands for itself); `None` if it never closes.
fn closing(b: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut j = from;
    loop {
        match b.get(j) {
            None => return None,
            Some(&c) if c == quote && b.get(j + 1) == Some(&quote) => j += 2,
            Some(&c) if c == quote => return Some(j),
            Some(_) => j += 1,
        }
    }
}

/// Whether the string starting at `quote` is `current_setting`'s first argument: which
/// setting decides the route (the node-identity probes go to the primary), so the name
/// stays in the shape.
fn names_a_setting(b: &[u8], quote: usize) -> bool {
    let opening = b[..quote]
        .iter()
        .rev()
        .take_while(|c| c.is_ascii_whitespace() || **c == b'(')
        .count();
    let before = &b[..quote - opening];
    if !b[quote - opening..quote].contains(&b'(') {
        return false;
    }
    const NAME: &[u8] = b"current_setting";
    before.len() >= NAME.len()
        && before[before.len() - NAME.len()..].eq_ignore_ascii_case(NAME)
        && !before[..before.len() - NAME.len()]
            .last()
            .is_some_and(|&c| is_ident(c))
}

/// Strings PostgreSQL turns into a different value at every run ('now', 'today', ...): a
/// statement with one is not the same statement with another literal.
fn is_run_time_word(text: &str) -> bool {
    super::names_a_moment(text.as_bytes())
        || ["epoch", "infinity", "-infinity", "allballs"]
            .iter()
            .any(|w| text.eq_ignore_ascii_case(w))
}

/// Whether one of the eight bytes of `word` may be one the scan stops at ([`SPECIAL`]):
/// those are all within 0x22..=0x39, so a byte in that range or beyond ASCII says maybe.
fn may_hold_special(word: u64) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const EACH: u64 = 0x0101_0101_0101_0101;
    if word & HIGH != 0 {
        return true;
    }
    // Below 0x80 a byte plus 0x5e (or plus 0x46) stays within its own byte; the sum's top
    // bit says whether the byte is at least 0x22 (at least 0x3a).
    let at_least_22 = word.wrapping_add(0x5e * EACH);
    let at_least_3a = word.wrapping_add(0x46 * EACH);
    at_least_22 & !at_least_3a & HIGH != 0
}

/// Bytes the scan stops at: quotes, the starts of comments and dollar quotes, digits.
const SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        table[i] = matches!(c, b'\'' | b'"' | b'-' | b'/' | b'$') || c.is_ascii_digit();
        i += 1;
    }
    table
};

/// Bytes that continue an identifier (or a `$n` placeholder), by value.
const IDENT: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        table[i] = c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
        i += 1;
    }
    table
};

fn is_ident(c: u8) -> bool {
    IDENT[usize::from(c)]
}

#[cfg(test)]
mod tests {
    use super::{SPECIAL, fingerprint, may_hold_special};

    #[test]
    fn a_word_without_special_bytes_is_never_one_that_has_one() {
        for c in 0..=255u8 {
            for at in 0..8 {
                let mut bytes = *b"SELECT a";
                bytes[at] = c;
                let word = u64::from_le_bytes(bytes);
                if SPECIAL[usize::from(c)] {
                    assert!(may_hold_special(word), "{c:#x} at {at}");
                }
                assert_eq!(
                    may_hold_special(word),
                    (0x22..=0x39).contains(&c) || c >= 0x80,
                    "{c:#x} at {at}"
                );
            }
        }
    }

    #[test]
    fn texts_without_a_literal_have_no_shape() {
        for (sql, has_literal) in [
            ("SELECT t1.c2 FROM t1 WHERE a = $1", false),
            ("SELECT \"é1\" FROM x_2", false),
            ("SELECT 1", true),
            ("SELECT a FROM t WHERE b = 'x'", true),
            ("SELECT a-1 FROM t", true),
            ("7", true),
            ("", false),
        ] {
            assert_eq!(fingerprint(sql).is_some(), has_literal, "{sql}");
        }
    }

    #[test]
    fn literals_are_masked() {
        let a = fingerprint("SELECT abalance FROM pgbench_accounts WHERE aid = 17;");
        let b = fingerprint("SELECT abalance FROM pgbench_accounts WHERE aid = 424242;");
        assert_eq!(a, b);
        assert_eq!(
            a.as_deref(),
            Some("SELECT abalance FROM pgbench_accounts WHERE aid = ?;")
        );
        assert_eq!(
            fingerprint("SELECT * FROM t WHERE name = 'it''s' AND x > 1.5e3"),
            Some("SELECT * FROM t WHERE name = '?' AND x > ?".into())
        );
    }

    #[test]
    fn literals_anywhere_and_the_text_around_them_are_kept_in_order() {
        for (sql, shape) in [
            ("7", "?"),
            ("''", "'?'"),
            ("1, 2", "?, ?"),
            ("'a' || x1 || 'b'", "'?' || x1 || '?'"),
            ("SELECT 1", "SELECT ?"),
            (
                "SELECT x FROM t WHERE a = 'x'",
                "SELECT x FROM t WHERE a = '?'",
            ),
            ("SELECT a-1", "SELECT a-?"),
            (
                "SELECT \"a\"\"1\", 2 FROM \"t'3\"",
                "SELECT \"a\"\"1\", ? FROM \"t'3\"",
            ),
            ("SELECT é, 1, ü", "SELECT é, ?, ü"),
            ("SELECT $1, 2", "SELECT $1, ?"),
        ] {
            assert_eq!(fingerprint(sql).as_deref(), Some(shape), "{sql}");
        }
        for sql in [
            "SELECT 1 -- x",
            "SELECT 1 /* x */",
            "SELECT 'a', $$b$$",
            "SELECT 1, E'x'",
        ] {
            assert_eq!(fingerprint(sql), None, "refused after a literal: {sql}");
        }
    }

    #[test]
    fn identifiers_and_placeholders_stay() {
        assert_eq!(
            fingerprint("SELECT t1.c2 FROM t1 WHERE a = $1"),
            None,
            "nothing to mask"
        );
        assert_eq!(
            fingerprint("SELECT \"Col 1\" FROM t2 WHERE a = $1 AND b = 7"),
            Some("SELECT \"Col 1\" FROM t2 WHERE a = $1 AND b = ?".into())
        );
    }

    #[test]
    fn unsafe_texts_have_no_fingerprint() {
        for sql in [
            "SELECT 1 -- comment 'x'",
            "SELECT /* 1 */ 2",
            "SELECT $$a$$, 1",
            "SELECT E'\\'', 1",
            "SELECT 'now'::timestamptz, 1",
            "SELECT ' Today ', 1",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
        ] {
            assert_eq!(fingerprint(sql), None, "{sql}");
        }
        assert!(fingerprint("SELECT 'héllo', 1").is_some());
    }
}
