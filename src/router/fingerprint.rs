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
pub fn fingerprint_into(sql: &str, out: &mut String) -> bool {
    out.clear();
    let b = sql.as_bytes();
    // Most texts sent with parameters have no literal at all: no need to copy them. A digit
    // after an identifier character (`t1`, `$1`) is not a literal either.
    if !has_literal(b) {
        return false;
    }
    out.reserve(sql.len());
    let mut i = 0;
    let mut masked = false;
    while i < b.len() {
        let c = b[i];
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
                let mut j = start;
                loop {
                    match b.get(j) {
                        None => return false,
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
                        Some(b'\'') => break,
                        Some(_) => j += 1,
                    }
                }
                let text = sql[start..j].trim();
                if [
                    "now",
                    "today",
                    "tomorrow",
                    "yesterday",
                    "epoch",
                    "infinity",
                    "-infinity",
                    "allballs",
                ]
                .iter()
                .any(|w| text.eq_ignore_ascii_case(w))
                {
                    return false;
                }
                out.push_str("'?'");
                masked = true;
                i = j + 1;
            }
            b'"' => {
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return false,
                        Some(b'"') if b.get(j + 1) == Some(&b'"') => j += 2,
                        Some(b'"') => break,
                        Some(_) => j += 1,
                    }
                }
                out.push_str(&sql[i..=j]);
                i = j + 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => return false,
            b'/' if b.get(i + 1) == Some(&b'*') => return false,
            b'$' if !prev_ident && !b.get(i + 1).is_some_and(u8::is_ascii_digit) => return false,
            b'0'..=b'9' if !prev_ident => {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'.' || b[j] == b'_')
                {
                    j += 1;
                }
                out.push('?');
                masked = true;
                i = j;
            }
            _ => {
                // Copy up to the next byte that needs a look.
                let run = b[i..]
                    .iter()
                    .skip(1)
                    .position(|&c| matches!(c, b'\'' | b'"' | b'-' | b'/' | b'$' | b'0'..=b'9'))
                    .map_or(b.len() - i, |p| p + 1);
                let mut end = i + run;
                while !sql.is_char_boundary(end) {
                    end += 1;
                }
                out.push_str(&sql[i..end]);
                i = end;
            }
        }
    }
    masked
}

/// A quote, or a digit not after an identifier character: where the scan below masks.
fn has_literal(b: &[u8]) -> bool {
    let mut prev_ident = false;
    for &c in b {
        if c == b'\'' || (!prev_ident && c.wrapping_sub(b'0') < 10) {
            return true;
        }
        prev_ident = IDENT[usize::from(c)];
    }
    false
}

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
    use super::{fingerprint, has_literal};

    #[test]
    fn the_pre_check_finds_exactly_what_could_be_masked() {
        for (sql, expected) in [
            ("SELECT t1.c2 FROM t1 WHERE a = $1", false),
            ("SELECT \"é1\" FROM x_2", false),
            ("SELECT 1", true),
            ("SELECT a FROM t WHERE b = 'x'", true),
            ("SELECT a-1 FROM t", true),
            ("7", true),
            ("", false),
        ] {
            assert_eq!(has_literal(sql.as_bytes()), expected, "{sql}");
            if !expected {
                assert_eq!(fingerprint(sql), None, "{sql}");
            }
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
