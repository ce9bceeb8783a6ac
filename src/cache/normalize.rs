//! The normalized text of a statement, for matching cache rules and building cache keys.
//!
//! Two texts normalize alike exactly when PostgreSQL reads them as the same statement with the
//! same literals: whitespace and comments vanish, unquoted words are case-folded (PostgreSQL
//! folds unquoted identifiers and keywords alike), quoted identifiers, string and number
//! literals and `$n` placeholders stay as written.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

/// `None` when the text does not tokenize (such SQL is never cached).
pub fn normalize(sql: &str) -> Option<String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    let mut out = String::with_capacity(sql.len());
    let mut words = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_) | Token::EOF))
        .peekable();
    while let Some(t) = words.next() {
        if matches!(t, Token::SemiColon) && words.peek().is_none() {
            // A trailing `;` does not change the statement.
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        match t {
            // PostgreSQL folds ASCII letters only (in UTF-8): `Ärzte` and `ärzte` are two tables.
            Token::Word(w) if w.quote_style.is_none() => {
                out.push_str(&w.value.to_ascii_lowercase())
            }
            other => {
                let shown = other.to_string();
                if shown.contains(['\'', '"', '\\']) {
                    // The tokenizer unescapes quoted text and displays it without escaping
                    // it again: 'x'' and b = ''y' would read like 'x' and b = 'y'. Debug
                    // output escapes, and names the kind of literal.
                    out.push_str(&format!("{other:?}"));
                } else {
                    out.push_str(&shown);
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    fn same(a: &str, b: &str) {
        assert_eq!(normalize(a), normalize(b), "{a:?} vs {b:?}");
    }

    fn differ(a: &str, b: &str) {
        assert_ne!(normalize(a), normalize(b), "{a:?} vs {b:?}");
    }

    #[test]
    fn whitespace_comments_and_keyword_case_do_not_matter() {
        same(
            "SELECT id, title FROM albums WHERE id = $1",
            "select  id,title\n from Albums -- the album\n where id=$1;",
        );
        same("SELECT 1", "/* hi */ SELECT\t1 ;");
        same("select a.b from a", "SELECT A . B FROM A");
    }

    #[test]
    fn literals_placeholders_and_quoted_names_matter() {
        differ(
            "SELECT * FROM t WHERE id = 1",
            "SELECT * FROM t WHERE id = 2",
        );
        differ(
            "SELECT * FROM t WHERE id = $1",
            "SELECT * FROM t WHERE id = $2",
        );
        differ("SELECT 'Abc'", "SELECT 'abc'");
        differ("SELECT * FROM \"T\"", "SELECT * FROM t");
        differ("SELECT 1.0", "SELECT 1");
        differ("SELECT $$a$$", "SELECT $$A$$");
        differ("SELECT 1; SELECT 2", "SELECT 1 SELECT 2");
    }

    #[test]
    fn quotes_inside_literals_and_names_cannot_make_two_statements_alike() {
        differ(
            "SELECT * FROM albums WHERE artist = 'x'' and title = ''y' and title = 'z'",
            "SELECT * FROM albums WHERE artist = 'x' and title = 'y'' and title = ''z'",
        );
        differ(r#"SELECT "a"" , ""b" FROM t"#, r#"SELECT "a" , "b" FROM t"#);
        differ("SELECT E'a\\\\b'", "SELECT E'a\\\\\\\\b'");
        differ("SELECT 'a'", "SELECT E'a'");
        same("SELECT 'it''s'", "select   'it''s' ;");
    }

    #[test]
    fn only_ascii_letters_fold() {
        differ("SELECT * FROM Ärzte", "SELECT * FROM ärzte");
        same("SELECT * FROM ÄRZTE", "select * from Ärzte");
    }

    #[test]
    fn untokenizable_text_has_no_normal_form() {
        assert_eq!(normalize("SELECT 'unterminated"), None);
    }
}
