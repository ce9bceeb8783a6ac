//! SQL text → [`Classification`]: where it may run, what it reads and writes, which session
//! state it changes.
//!
//! Owns the statement split (on the tokenizer's `;`, so each statement keeps its own source
//! text), the sqlparser walk, the primary-only and known-stable function lists, and a small
//! keyword fallback for statements sqlparser cannot parse.
//!
//! Must not: read session or config state (extra primary-only function names come in as an
//! argument), cache (the caller caches by SQL text), or panic on any input.
//!
//! Invariant: anything not positively recognised as a plain read is [`Target::Primary`]; a
//! statement sqlparser rejects is `Primary` + `writes_unknown` + `volatile`, `parsed = false`.

use std::ops::ControlFlow;

use sqlparser::ast::{
    AlterTableOperation, CascadeOption, CastKind, CloseCursor, ContextModifier, CopySource,
    CopyTarget, CreateTable, CreateView, DeclareType, DiscardObject, Expr, FromTable, FunctionArg,
    FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, ObjectName, ObjectType, Query, Reset,
    Select, SelectItem, Set, SetExpr, Statement, TableFactor, TableObject, TransactionAccessMode,
    TransactionIsolationLevel, TransactionMode, Value, ValueWithSpan, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer, Whitespace, Word};

use super::{Classification, PinKinds, SessionOp, Target, TxAccess, TxEffect};

/// Longest run of tokens (between commas, at one parenthesis depth) handed to sqlparser.
/// Operator chains (`a = 1 OR a = 2 OR ...`, `x::t::t ...`) become left-deep trees that
/// sqlparser builds without its recursion check and drops recursively: around 25k levels that
/// overflows a 2 MiB tokio worker stack. A chain level costs at least two tokens.
const MAX_TOKEN_RUN: usize = 20_000;

/// How many leading tokens of a statement the keyword fallback looks at.
const HEAD_TOKENS: usize = 8;

/// GUCs that live only for the current transaction: replaying them elsewhere is wrong.
const TX_SCOPED_GUCS: [&str; 3] = [
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
];

/// Settings PostgreSQL applies when it parses a statement's text: the input of date, time,
/// interval and money literals, string escapes, `= NULL`, array literals, the encoding of
/// the text itself. A prepared statement keeps what they were at its Parse, so statements
/// prepared under different values are different statements.
pub const PARSE_SETTINGS: [&str; 11] = [
    "timezone",
    "timezone_abbreviations",
    "xmloption",
    "datestyle",
    "intervalstyle",
    "client_encoding",
    "standard_conforming_strings",
    "transform_null_equals",
    "array_nulls",
    "lc_monetary",
    "backslash_quote",
];

/// Whether the (lower-case) setting `name` changes how statements are parsed.
pub fn affects_parsing(name: &str) -> bool {
    PARSE_SETTINGS.contains(&name)
}

/// Settings whose value tells a client which node answered (libpq `target_session_attrs`,
/// JDBC `targetServerType`): the proxy must answer them as the writable primary.
const PROBE_GUCS: [&str; 3] = [
    "transaction_read_only",
    "default_transaction_read_only",
    "in_hot_standby",
];

/// Catalog views that describe the node answering (its sessions, locks, replication; and
/// every `pg_stat_*` / `pg_statio_*` view, pg_stat_statements included: its activity): on a
/// replica they describe the replica, not the server the client thinks it talks to.
/// `pg_sequences` too: a standby knows only the value the primary logged ahead (up to 32
/// past the last one handed out).
const NODE_VIEWS: [&str; 6] = [
    "pg_stat_activity",
    "pg_locks",
    "pg_stat_replication",
    "pg_replication_slots",
    "pg_prepared_xacts",
    "pg_sequences",
];

/// Classify one SQL string (may contain several `;`-separated statements).
pub fn classify(sql: &str) -> Classification {
    classify_with(sql, &[])
}

/// [`classify`], also treating calls to `extra_primary_functions` (config
/// `routing.primary_functions`; matched case-insensitively by bare or schema-qualified name)
/// as writing functions. Results depend on that list: clear a cache keyed by SQL when it changes.
pub fn classify_with(sql: &str, extra_primary_functions: &[String]) -> Classification {
    if lexes_unlike_postgres(sql) {
        return Classification::unreadable(sql);
    }
    let dialect = PostgreSqlDialect {};
    let Ok(mut tokens) = Tokenizer::new(&dialect, sql).tokenize_with_location() else {
        return Classification::unreadable(sql);
    };
    // After `COPY ... FROM STDIN;` the tokenizer takes the following lines as COPY data (a psql
    // script convention). On the wire that text is more SQL: fine if it holds no statement,
    // otherwise do not guess.
    let mut copy_data_is_sql = false;
    tokens.retain(|t| match &t.token {
        Token::CopyData { data, .. } => {
            let rest = Tokenizer::new(&dialect, data).tokenize();
            copy_data_is_sql |= !rest.is_ok_and(|r| {
                r.iter()
                    .all(|t| matches!(t, Token::Whitespace(_) | Token::SemiColon))
            });
            false
        }
        _ => true,
    });
    if copy_data_is_sql
        || comment_start_inside_operators(&tokens)
        || (sql.contains("&\"") && unicode_escaped_identifier(&tokens))
    {
        return Classification::unreadable(sql);
    }
    let fragments = split(tokens);
    let mut ctx = Ctx {
        sql,
        extra: extra_primary_functions,
        line_starts: None,
        out: Classification {
            target: Target::Replica,
            writes_unknown: false,
            volatile: false,
            calls_user_functions: false,
            statement_count: 0,
            parsed: true,
            tx_effect: TxEffect::Neutral,
            local_parse_setting: false,
            standby_refuses: false,
            tx_local: false,
            ..Classification::unknown()
        },
    };
    // `BEGIN ATOMIC ... END` function bodies hold `;`s that do not end the statement: only a
    // whole-string parse splits those correctly.
    if fragments.iter().any(|f| f.atomic) {
        let too_long = fragments.iter().any(|f| f.longest_run > MAX_TOKEN_RUN);
        let Some(stmts) = parse_all(sql).filter(|_| !too_long) else {
            return Classification::unreadable(sql);
        };
        for stmt in &stmts {
            ctx.out.statement_count += 1;
            ctx.statement(stmt, None);
        }
        return ctx.finish();
    }
    for fragment in fragments {
        ctx.fragment(fragment);
    }
    ctx.finish()
}

/// Texts whose tokens the server may see differently from sqlparser, so that a statement
/// could hide inside what looks like one read (it would run on a replica's pooled
/// connection): a dollar-quote tag starting with a non-ASCII character (the server allows
/// any, sqlparser only alphanumerics), and a backslash in a text that was not valid UTF-8
/// (in SJIS, BIG5, GBK or UHC a character's second byte can be 0x5C, which the lossy
/// decoding leaves as a backslash that escapes a quote in `E''`).
fn lexes_unlike_postgres(sql: &str) -> bool {
    let b = sql.as_bytes();
    let non_ascii_dollar_tag = b.iter().enumerate().any(|(i, &c)| {
        if c != b'$' {
            return false;
        }
        let tag_len = b[i + 1..]
            .iter()
            .take_while(|&&t| t.is_ascii_alphanumeric() || t == b'_' || t >= 0x80)
            .count();
        let tag = &b[i + 1..i + 1 + tag_len];
        b.get(i + 1 + tag_len) == Some(&b'$') && tag.iter().any(|&t| t >= 0x80)
    });
    non_ascii_dollar_tag || (sql.contains('\u{FFFD}') && b.contains(&b'\\'))
}

/// Whether sqlparser read a `--` or `/*` as part of operators, where the server ends the
/// operator there and starts a comment: the statements each of them sees would differ.
/// Inside one token (`>--` as a custom operator) or across two adjacent ones (`?-` then
/// `-`, or `-` then `-` written apart only by sqlparser).
fn comment_start_inside_operators(tokens: &[TokenWithSpan]) -> bool {
    let operator = |t: &Token| {
        !matches!(
            t,
            Token::Whitespace(_)
                | Token::Word(_)
                | Token::Number(..)
                | Token::SingleQuotedString(_)
                | Token::DoubleQuotedString(_)
                | Token::DollarQuotedString(_)
                | Token::EscapedStringLiteral(_)
                | Token::UnicodeStringLiteral(_)
                | Token::NationalStringLiteral(_)
                | Token::HexStringLiteral(_)
                | Token::SingleQuotedByteStringLiteral(_)
                | Token::Placeholder(_)
                | Token::EOF
        )
    };
    let text = |t: &Token| operator(t).then(|| t.to_string());
    tokens.iter().enumerate().any(|(i, t)| {
        let Some(a) = text(&t.token) else {
            return false;
        };
        if a.contains("--") || a.contains("/*") {
            return true;
        }
        let Some(b) = tokens.get(i + 1).and_then(|n| text(&n.token)) else {
            return false;
        };
        (a.ends_with('-') && b.starts_with('-')) || (a.ends_with('/') && b.starts_with('*'))
    })
}

/// Whether the text has a `U&"…"` identifier, which PostgreSQL reads as one name with its
/// escapes decoded (`U&"\0070g_advisory_lock"` is pg_advisory_lock) and sqlparser as the
/// word U, an operator and a name with the escapes left in: the classifier would judge a
/// name the server never sees.
fn unicode_escaped_identifier(tokens: &[TokenWithSpan]) -> bool {
    tokens.windows(3).any(|w| {
        matches!(&w[0].token, Token::Word(u) if u.quote_style.is_none() && u.value.eq_ignore_ascii_case("u"))
            && w[1].token == Token::Ampersand
            && matches!(&w[2].token, Token::Word(q) if q.quote_style == Some('"'))
    })
}

/// One `;`-separated statement as tokens, plus what the fallback and the replay text need.
#[derive(Default)]
struct Fragment {
    tokens: Vec<TokenWithSpan>,
    /// The first significant tokens; empty for a fragment of only whitespace and comments.
    head: Vec<Token>,
    /// From the first significant token's start to the last one's end.
    bounds: Option<(Location, Location)>,
    comments: Vec<(Location, Location)>,
    longest_run: usize,
    atomic: bool,
    /// Words anywhere in it that the fallback acts on when sqlparser cannot read it: a call
    /// that changes the session (set_config, a session advisory lock, a dblink connection;
    /// `dblink`: the last, which DISCARD ALL does not undo), TEMP / TEMPORARY,
    /// SERIALIZABLE, READ WRITE.
    session_call: bool,
    dblink: bool,
    temp: bool,
    serializable: bool,
    read_write: bool,
}

fn split(tokens: Vec<TokenWithSpan>) -> Vec<Fragment> {
    let mut fragments = Vec::new();
    let mut cur = Fragment::default();
    let mut runs = vec![0usize];
    let mut after_begin = false;
    let mut after_read = false;
    for t in tokens {
        match &t.token {
            Token::SemiColon => {
                let done = std::mem::take(&mut cur);
                if !done.head.is_empty() {
                    fragments.push(done);
                }
                runs = vec![0];
                after_begin = false;
                continue;
            }
            Token::Whitespace(Whitespace::SingleLineComment { .. })
            | Token::Whitespace(Whitespace::MultiLineComment(_)) => {
                cur.comments.push((t.span.start, t.span.end));
            }
            Token::Whitespace(_) => {}
            tok => {
                cur.bounds = Some((cur.bounds.map_or(t.span.start, |b| b.0), t.span.end));
                if cur.head.len() < HEAD_TOKENS {
                    cur.head.push(tok.clone());
                }
                cur.atomic |= after_begin && is_word(tok, "ATOMIC");
                after_begin = is_word(tok, "BEGIN");
                if let Token::Word(w) = tok {
                    // By length first: this runs for every word of every statement.
                    let is = |k: &str| w.value.eq_ignore_ascii_case(k);
                    let keyword = w.quote_style.is_none();
                    match w.value.len() {
                        4 => cur.temp |= keyword && is("TEMP"),
                        5 => cur.read_write |= keyword && after_read && is("WRITE"),
                        9 => cur.temp |= keyword && is("TEMPORARY"),
                        12 => cur.serializable |= keyword && is("SERIALIZABLE"),
                        _ => {}
                    }
                    // `pg_temp.x`: the session's temporary schema, in any spelling.
                    cur.temp |= w
                        .value
                        .as_bytes()
                        .get(..7)
                        .is_some_and(|p| p.eq_ignore_ascii_case(b"pg_temp"));
                    if w.value.len() >= "set_config".len() {
                        cur.session_call |= is("set_config") || SESSION_FNS.iter().any(|f| is(f));
                        cur.dblink |= is("dblink_connect") || is("dblink_connect_u");
                    }
                }
                after_read = is_word(tok, "READ");
                match tok {
                    Token::Comma => {
                        if let Some(run) = runs.last_mut() {
                            *run = 0;
                        }
                    }
                    Token::RParen | Token::RBracket if runs.len() > 1 => {
                        runs.pop();
                    }
                    _ => {}
                }
                if let Some(run) = runs.last_mut() {
                    *run += 1;
                    cur.longest_run = cur.longest_run.max(*run);
                }
                if matches!(tok, Token::LParen | Token::LBracket) {
                    runs.push(0);
                }
            }
        }
        cur.tokens.push(t);
    }
    if !cur.head.is_empty() {
        fragments.push(cur);
    }
    fragments
}

fn is_word(token: &Token, keyword: &str) -> bool {
    matches!(token, Token::Word(Word { value, quote_style: None, .. })
        if value.eq_ignore_ascii_case(keyword))
}

/// Parses exactly one statement, or nothing.
fn parse_one(tokens: Vec<TokenWithSpan>) -> Option<Statement> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens);
    let stmt = parser.parse_statement().ok()?;
    // sqlparser stops quietly at a stray `END` and ignores the rest; PostgreSQL rejects it.
    (parser.peek_token().token == Token::EOF).then_some(stmt)
}

/// Parses the whole string, or nothing.
fn parse_all(sql: &str) -> Option<Vec<Statement>> {
    let dialect = PostgreSqlDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(sql).ok()?;
    let stmts = parser.parse_statements().ok()?;
    (parser.peek_token().token == Token::EOF).then_some(stmts)
}

struct Ctx<'a> {
    sql: &'a str,
    extra: &'a [String],
    line_starts: Option<Vec<usize>>,
    out: Classification,
}

impl Ctx<'_> {
    fn finish(mut self) -> Classification {
        // Only a lone COMMIT is known to end the block: after `COMMIT; INSERT ...` the
        // connection is idle too, but that is not worth telling apart.
        if self.out.tx_effect == TxEffect::Ends && self.out.statement_count != 1 {
            self.out.tx_effect = TxEffect::Other;
        }
        self.out
    }

    /// A statement that leaves the transaction state anything but idle-after-it.
    fn tx_other(&mut self) {
        self.out.tx_effect = TxEffect::Other;
    }

    /// COMMIT / ROLLBACK: `chain` (AND [NO] CHAIN) and savepoints keep a block open.
    fn tx_end(&mut self, keeps_block: bool) {
        if keeps_block {
            self.tx_other();
        } else if self.out.tx_effect == TxEffect::Neutral {
            self.out.tx_effect = TxEffect::Ends;
        }
    }

    fn fragment(&mut self, mut f: Fragment) {
        self.out.statement_count += 1;
        if f.longest_run > MAX_TOKEN_RUN {
            // What it does is unknown.
            self.out.outlives_reset = true;
            return self.unparsed();
        }
        // DDL with a SET clause (`ALTER ROLE … SET app.x = …`, `CREATE FUNCTION … SET app.x`)
        // defines the custom setting's name on its connection (PostgreSQL checks the name
        // there), even when it fails.
        if f.head
            .first()
            .is_some_and(|t| is_word(t, "CREATE") || is_word(t, "ALTER"))
        {
            let significant: Vec<&Token> = f
                .tokens
                .iter()
                .map(|t| &t.token)
                .filter(|t| !matches!(t, Token::Whitespace(_)))
                .collect();
            self.out.outlives_reset |= significant.windows(4).any(|w| {
                (is_word(w[0], "SET") || is_word(w[0], "RESET"))
                    && matches!(w[1], Token::Word(_))
                    && *w[2] == Token::Period
                    && matches!(w[3], Token::Word(_))
            });
        }
        // sqlparser lacks `TABLE name`, PostgreSQL's spelling of `SELECT * FROM name`.
        if let Some(i) = f
            .tokens
            .iter()
            .position(|t| !matches!(t.token, Token::Whitespace(_)))
            && is_word(&f.tokens[i].token, "TABLE")
        {
            let span = f.tokens[i].span;
            let (select, from) = (Token::make_keyword("SELECT"), Token::make_keyword("FROM"));
            let space = Token::Whitespace(Whitespace::Space);
            let spelled = [select, space.clone(), Token::Mul, space, from];
            let spelled = spelled.map(|token| TokenWithSpan { token, span });
            f.tokens.splice(i..=i, spelled);
        }
        match parse_one(std::mem::take(&mut f.tokens)) {
            Some(stmt) => {
                let text = matches!(stmt, Statement::Set(_))
                    .then(|| self.source_text(&f))
                    .flatten();
                self.statement(&stmt, text.as_deref());
            }
            None => self.fallback(&f),
        }
    }

    fn primary(&mut self) {
        self.out.target = Target::Primary;
    }

    /// Pins for state that only `DISCARD ALL` takes back.
    fn pin(&mut self) {
        self.pin_for(PinKinds::OTHER);
    }

    fn pin_for(&mut self, kinds: PinKinds) {
        self.out.target = Target::Primary;
        self.out.pins_session = true;
        self.out.pins |= kinds;
        self.out.pin_undone_by_failure = false;
    }

    /// [`pin_for`](Self::pin_for) for work a failure of the statement undoes (see
    /// `Classification::pin_undone_by_failure`).
    fn pin_transactional(&mut self, kind: PinKinds) {
        if !self.out.pins_session {
            self.out.pin_undone_by_failure = true;
        }
        self.out.target = Target::Primary;
        self.out.pins_session = true;
        self.out.pins |= kind;
    }

    fn unparsed(&mut self) {
        self.out.parsed = false;
        self.tx_other();
        self.opaque();
    }

    /// Parsed, but not something whose effects we track: assume the worst.
    fn opaque(&mut self) {
        self.primary();
        self.out.writes_unknown = true;
        self.out.volatile = true;
        self.out.calls_user_functions = true;
    }

    /// `text`: the statement's source text for a SET replay (`None`: use its Display).
    fn statement(&mut self, stmt: &Statement, text: Option<&str>) {
        match stmt {
            Statement::Query(_) => {
                if self.walk(stmt) {
                    self.primary();
                }
                if unlocks_all_advisory_locks(stmt) {
                    self.out.unpins |= PinKinds::ADVISORY_LOCK;
                }
            }
            Statement::Insert(_)
            | Statement::Update(_)
            | Statement::Delete(_)
            | Statement::Merge(_)
            | Statement::AlterTable(_)
            | Statement::AlterView(_)
            | Statement::RefreshMaterializedView(_)
            | Statement::CreateIndex(_)
            | Statement::Lock(_)
            | Statement::Analyze(_)
            | Statement::Vacuum(_)
            | Statement::Comment { .. }
            | Statement::Close { .. }
            | Statement::NOTIFY { .. } => {
                self.walk(stmt);
                self.primary();
                // `UPDATE pg_settings SET setting = …` is set_config for any name, unseen.
                if self
                    .out
                    .tables_written
                    .iter()
                    .any(|t| t == "pg_settings" || t == "pg_catalog.pg_settings")
                {
                    self.pin();
                    self.out.outlives_reset = true;
                }
                if let Statement::Close {
                    cursor: CloseCursor::All,
                } = stmt
                {
                    self.out.unpins |= PinKinds::HOLD_CURSOR;
                }
                // A new index is a write for read-your-writes (a lagging replica lacks it).
                if let Statement::CreateIndex(c) = stmt {
                    push_unique(&mut self.out.tables_written, relation_name(&c.table_name));
                }
                // A table renamed, or taken out of its parent: reads of another table change
                // (the one the new name now resolves to; the parent, which the commit can no
                // longer name). Rare DDL: every cached result goes.
                if let Statement::AlterTable(a) = stmt
                    && a.operations.iter().any(|o| {
                        matches!(
                            o,
                            AlterTableOperation::RenameTable { .. }
                                | AlterTableOperation::NoInherit { .. }
                        )
                    })
                {
                    self.out.writes_unknown = true;
                }
                // So is a comment: `obj_description()` right after it reads the catalog.
                if let Statement::Comment { .. } = stmt {
                    push_unique(
                        &mut self.out.tables_written,
                        "pg_catalog.pg_description".to_owned(),
                    );
                }
            }
            Statement::Explain {
                analyze,
                statement,
                options,
                ..
            } => {
                // PostgreSQL's grammar takes the British spelling as the same option.
                let analyze_option = options.iter().flatten().any(|o| {
                    (o.name.value.eq_ignore_ascii_case("analyze")
                        || o.name.value.eq_ignore_ascii_case("analyse"))
                        && o.arg
                            .as_ref()
                            .is_none_or(|a| !is_false_word(&a.to_string()))
                });
                if *analyze || analyze_option {
                    self.statement(statement, None);
                }
                // `ANALYZE 0` and `ANALYZE 1` have one shape.
                self.out.by_literal |= options.iter().flatten().any(|o| o.arg.is_some());
                // Plans are not data: never cache them.
                self.out.volatile = true;
            }
            Statement::Copy { to, target, .. } => {
                self.tx_other();
                if self.walk(stmt) || !to || !matches!(target, CopyTarget::Stdout) {
                    self.primary();
                }
            }
            Statement::StartTransaction {
                modes,
                statements,
                exception,
                ..
            } => {
                self.tx_other();
                if !statements.is_empty() || exception.is_some() {
                    return self.opaque();
                }
                let access = tx_access(modes);
                self.out.begins_tx.get_or_insert(access);
                if access == TxAccess::ReadWrite {
                    self.primary();
                }
            }
            Statement::Commit { chain, .. } => {
                self.tx_end(*chain);
                self.primary();
                self.out.tx_local = true;
            }
            Statement::Rollback { chain, savepoint } => {
                self.tx_end(*chain || savepoint.is_some());
                self.primary();
                self.out.tx_local = true;
            }
            Statement::Savepoint { .. } | Statement::ReleaseSavepoint { .. } => {
                self.tx_other();
                self.primary();
                self.out.tx_local = true;
            }
            Statement::Set(set) => {
                let sql = text.map_or_else(|| stmt.to_string(), str::to_owned);
                self.set(set, sql);
            }
            Statement::Reset(r) => {
                self.primary();
                let op = match &r.reset {
                    Reset::ALL => SessionOp::ResetAll,
                    Reset::SessionAuthorization => SessionOp::Reset {
                        name: "session_authorization".to_owned(),
                    },
                    Reset::ConfigurationParameter(name) => SessionOp::Reset {
                        name: guc_name(name),
                    },
                };
                if let SessionOp::Reset { name } = &op {
                    self.out.outlives_reset |= is_custom_setting(name);
                }
                self.push_op(op);
            }
            Statement::Discard { object_type } => {
                self.primary();
                match object_type {
                    DiscardObject::ALL => {
                        self.push_op(SessionOp::DiscardAll);
                        self.out.unpins |= PinKinds::ALL;
                    }
                    DiscardObject::TEMP => self.out.unpins |= PinKinds::TEMP,
                    DiscardObject::PLANS | DiscardObject::SEQUENCES => {}
                }
            }
            Statement::Deallocate { name, .. } => {
                self.primary();
                let all = name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all");
                if all {
                    self.out.unpins |= PinKinds::PREPARED;
                }
                self.out.session_ops.push(if all {
                    SessionOp::DeallocateAll
                } else {
                    SessionOp::Deallocate {
                        name: ident_name(name),
                    }
                });
            }
            Statement::ShowVariable { variable } => {
                // Settings differ per node and per session: not cacheable.
                self.out.volatile = true;
                if let [one] = variable.as_slice() {
                    let name = one.value.to_ascii_lowercase();
                    if PROBE_GUCS.contains(&name.as_str()) || name.starts_with("pool_") {
                        self.primary();
                    }
                }
            }
            Statement::Declare { stmts, .. } => {
                // A cursor without HOLD dies with its transaction, which the caller keeps on
                // one connection: it may run wherever its query may. WITH HOLD outlives it.
                self.out.volatile = true;
                let cursors = stmts
                    .iter()
                    .all(|d| matches!(d.declare_type, Some(DeclareType::Cursor)));
                if self.walk(stmt) || !cursors {
                    self.primary();
                }
                if stmts.iter().any(|d| d.hold == Some(true)) {
                    self.pin_transactional(PinKinds::HOLD_CURSOR);
                }
            }
            Statement::Fetch { .. } => {
                self.primary();
                self.out.volatile = true;
            }
            Statement::Execute { .. } => {
                self.opaque();
                self.note_custom_settings(stmt);
            }
            Statement::Prepare { .. } | Statement::LISTEN { .. } => {
                self.pin_transactional(if matches!(stmt, Statement::LISTEN { .. }) {
                    PinKinds::LISTEN
                } else {
                    PinKinds::PREPARED
                });
                self.note_custom_settings(stmt);
            }
            // Only a pinned session listens (LISTEN pins), and its UNLISTEN reaches that
            // connection; anywhere else it undoes nothing, so it leaves the session free
            // (asyncpg's pool sends `UNLISTEN *` at every release).
            Statement::UNLISTEN { channel } => {
                self.primary();
                if channel.quote_style.is_none() && channel.value == "*" {
                    self.out.unpins |= PinKinds::LISTEN;
                }
            }
            Statement::Load { .. } => {
                self.pin();
                self.out.pins_for_good = true;
            }
            Statement::Truncate(t) => {
                self.walk(stmt);
                self.primary();
                // CASCADE also empties every table referencing these.
                self.out.writes_unknown |= t.cascade == Some(CascadeOption::Cascade);
            }
            Statement::CreateTable(CreateTable { temporary, .. })
            | Statement::CreateView(CreateView { temporary, .. })
            | Statement::CreateSequence { temporary, .. } => {
                self.walk(stmt);
                self.primary();
                if *temporary {
                    self.pin_transactional(PinKinds::TEMP);
                }
                if let Statement::CreateSequence { name, .. } = stmt {
                    push_unique(&mut self.out.tables_written, relation_name(name));
                }
            }
            Statement::Drop {
                object_type,
                names,
                cascade,
                ..
            } => {
                self.primary();
                match object_type {
                    ObjectType::Table
                    | ObjectType::View
                    | ObjectType::MaterializedView
                    | ObjectType::Index
                    | ObjectType::Sequence => {
                        for name in names {
                            push_unique(&mut self.out.tables_written, relation_name(name));
                        }
                    }
                    _ => self.out.writes_unknown = true,
                }
                // A dropped table may have been a partition or an inheritance child, whose
                // parent the commit can no longer find: every cached result goes. (Not for
                // the session's own temporary tables, named so.)
                self.out.writes_unknown |= matches!(
                    object_type,
                    ObjectType::Table | ObjectType::View | ObjectType::MaterializedView
                ) && !names.iter().all(is_temp_schema);
                self.out.writes_unknown |= *cascade;
            }
            Statement::CreateFunction(f) => {
                self.opaque();
                if is_temp_schema(&f.name) {
                    self.pin();
                }
            }
            Statement::Call(_) => {
                self.opaque();
                self.note_custom_settings(stmt);
            }
            _ => self.opaque(),
        }
    }

    fn set(&mut self, set: &Set, sql: String) {
        self.primary();
        let name = match set {
            Set::SingleAssignment {
                scope,
                variable,
                values,
                ..
            } => {
                let name = guc_name(variable);
                self.out.outlives_reset |= is_custom_setting(&name);
                if *scope == Some(ContextModifier::Local) || TX_SCOPED_GUCS.contains(&&*name) {
                    self.out.local_search_path |= name == "search_path";
                    self.out.local_parse_setting |= affects_parsing(&name);
                    self.out.tx_local = true;
                    // What a standby's transaction cannot be. Judged by the value: texts that
                    // differ only in it must not share the answer.
                    let value = || values.iter().map(|v| v.to_string());
                    let refuses = match name.as_str() {
                        "transaction_isolation" | "default_transaction_isolation" => {
                            Some(value().any(|v| v.to_ascii_lowercase().contains("serializable")))
                        }
                        // DEFAULT may be read-write.
                        "transaction_read_only" | "default_transaction_read_only" => Some(
                            value().any(|v| !keeps_on(&v) || v.eq_ignore_ascii_case("default")),
                        ),
                        _ => None,
                    };
                    self.out.by_literal |= refuses.is_some();
                    self.out.standby_refuses |= refuses.unwrap_or(false);
                    return;
                }
                // `TO DEFAULT` is a RESET: back to the login's value, not the server's.
                if let [value] = values.as_slice()
                    && is_keyword_value(value, &["default"])
                {
                    return self.push_op(SessionOp::Reset { name });
                }
                // sqlparser reads MySQL's `SET a = 1, b = 2` as one value list.
                if values.iter().any(|v| matches!(v, Expr::BinaryOp { .. })) {
                    return self.pin();
                }
                // Without standard strings `\'` escapes a quote, and the tokenizer would split
                // statements differently from the server: keep it all on one connection. (A
                // serializable default, which standbys refuse, is followed by the session:
                // its reads go to the primary while it is in force.)
                if name == "standard_conforming_strings"
                    && values.iter().any(|v| !keeps_on(&v.to_string()))
                {
                    self.pin();
                    self.out.outlives_reset = true;
                }
                if name == "datestyle" {
                    // One half ('ISO', 'DMY') keeps the other half in force: the whole
                    // value is read back afterwards, and replayed.
                    push_unique(&mut self.out.read_back, name);
                    return;
                }
                name
            }
            Set::SetTimeZone {
                local: false,
                value,
            } => {
                let name = "timezone".to_owned();
                if is_keyword_value(value, &["default", "local"]) {
                    return self.push_op(SessionOp::Reset { name });
                }
                name
            }
            Set::SetNames { .. } | Set::SetNamesDefault {} => "client_encoding".to_owned(),
            Set::SetRole {
                context_modifier, ..
            } if *context_modifier != Some(ContextModifier::Local) => "role".to_owned(),
            Set::SetSessionAuthorization(p) if p.scope != ContextModifier::Local => {
                "session_authorization".to_owned()
            }
            Set::SetTransaction {
                modes,
                snapshot: None,
                session: true,
            } => {
                // One replayable op per mode, so later SETs of the same GUC replace it.
                for mode in modes {
                    let name = match mode {
                        TransactionMode::AccessMode(_) => "default_transaction_read_only",
                        TransactionMode::IsolationLevel(_) => "default_transaction_isolation",
                    };
                    self.out.session_ops.push(SessionOp::Set {
                        name: name.to_owned(),
                        sql: format!("SET SESSION CHARACTERISTICS AS TRANSACTION {mode}"),
                    });
                }
                return;
            }
            // SET LOCAL ... and SET TRANSACTION ...: gone at the end of the transaction.
            Set::SetTimeZone { .. } => {
                self.out.local_parse_setting = true;
                self.out.tx_local = true;
                return;
            }
            Set::SetTransaction {
                modes, snapshot, ..
            } => {
                self.out.tx_local = true;
                self.out.standby_refuses |= snapshot.is_some()
                    || modes.iter().any(|m| {
                        matches!(
                            m,
                            TransactionMode::IsolationLevel(
                                TransactionIsolationLevel::Serializable
                            ) | TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)
                        )
                    });
                return;
            }
            Set::SetRole { .. } | Set::SetSessionAuthorization(_) => {
                self.out.tx_local = true;
                return;
            }
            // Not PostgreSQL syntax: we cannot know what it would replay.
            _ => return self.pin(),
        };
        self.push_op(SessionOp::Set { name, sql });
    }

    /// A statement sqlparser rejected: the conservative answer, plus what its first keywords
    /// say about session state so a session is pinned rather than silently diverging.
    fn fallback(&mut self, f: &Fragment) {
        let head = &f.head;
        let kw = |i: usize, k: &str| head.get(i).is_some_and(|t| is_word(t, k));
        if kw(0, "BEGIN") || (kw(0, "START") && kw(1, "TRANSACTION")) {
            // Modes sqlparser does not read (`BEGIN READ ONLY DEFERRABLE`, as asyncpg
            // sends it): a transaction start all the same, which writes nothing. Read only
            // unless serializable (standbys refuse that) or also READ WRITE.
            self.out.parsed = false;
            self.tx_other();
            let read_only = head
                .windows(2)
                .any(|w| is_word(&w[0], "READ") && is_word(&w[1], "ONLY"))
                && !f.read_write
                && !f.serializable;
            let access = if read_only {
                TxAccess::ReadOnly
            } else {
                self.primary();
                TxAccess::ReadWrite
            };
            self.out.begins_tx.get_or_insert(access);
            return;
        }
        self.unparsed();
        // A call that changes the session anywhere in a statement sqlparser cannot read:
        // the state it leaves must stay on this session's connection.
        if f.session_call || f.temp {
            self.pin();
        }
        // A DO block's body is one token; a SET sqlparser cannot read may name a custom
        // setting or standard_conforming_strings. (Not every statement it cannot read:
        // `SET CONSTRAINTS`, `FOR NO KEY UPDATE` are common and leave nothing.)
        let names_one = head
            .iter()
            .any(|t| *t == Token::Period || is_word(t, "standard_conforming_strings"));
        self.out.outlives_reset |=
            kw(0, "DO") || f.session_call || ((kw(0, "SET") || kw(0, "RESET")) && names_one);
        self.out.pins_for_good |= f.dblink;
        if kw(0, "SET") {
            self.fallback_set(f);
        } else if kw(0, "RESET") {
            let op = if kw(1, "ALL") && head.len() == 2 {
                Some(SessionOp::ResetAll)
            } else if kw(1, "TIME") && kw(2, "ZONE") && head.len() == 3 {
                Some(SessionOp::Reset {
                    name: "timezone".to_owned(),
                })
            } else {
                dotted_name(&head[1..]).and_then(|(name, used)| {
                    (used + 1 == head.len()).then_some(SessionOp::Reset { name })
                })
            };
            match op {
                Some(op) => self.push_op(op),
                None => self.pin(),
            }
        } else if (kw(0, "PREPARE") && !kw(1, "TRANSACTION"))
            || ["LISTEN", "LOAD", "DECLARE"].iter().any(|k| kw(0, k))
        {
            self.pin();
            // A loaded library stays in the backend: DISCARD ALL does not undo it.
            self.out.pins_for_good |= kw(0, "LOAD");
        }
    }

    /// A session operation: a value to read back that an earlier statement of the text
    /// set and this one resets is not the session's any more (`SET datestyle …; RESET
    /// datestyle`).
    fn push_op(&mut self, op: SessionOp) {
        self.out.read_back.retain(|n| !op.resets(n));
        self.out.session_ops.push(op);
    }

    fn fallback_set(&mut self, f: &Fragment) {
        let head = &f.head;
        let kw = |i: usize, k: &str| head.get(i).is_some_and(|t| is_word(t, k));
        if kw(1, "LOCAL") || kw(1, "TRANSACTION") {
            // Which setting it is, sqlparser could not say: it may be one parsing reads.
            self.out.local_parse_setting |= kw(1, "LOCAL");
            self.out.standby_refuses |= kw(1, "TRANSACTION")
                && (f.serializable || f.read_write || head.iter().any(|t| is_word(t, "SNAPSHOT")));
            return;
        }
        let i = if kw(1, "SESSION") { 2 } else { 1 };
        let name = if kw(i, "SCHEMA") {
            Some("search_path".to_owned())
        } else if kw(i, "NAMES") {
            Some("client_encoding".to_owned())
        } else if kw(i, "ROLE") {
            Some("role".to_owned())
        } else if kw(i, "TIME") && kw(i + 1, "ZONE") {
            Some("timezone".to_owned())
        } else if kw(i, "XML") && kw(i + 1, "OPTION") {
            Some("xmloption".to_owned())
        } else if i == 2 && kw(2, "AUTHORIZATION") {
            Some("session_authorization".to_owned())
        } else {
            dotted_name(&head[i.min(head.len())..]).and_then(|(name, used)| {
                let next = head.get(i + used);
                (next.is_some_and(|t| is_word(t, "TO") || *t == Token::Eq)
                    && !TX_SCOPED_GUCS.contains(&&*name))
                .then_some(name)
            })
        };
        match (name, self.source_text(f)) {
            (Some(name), Some(sql)) => self.push_op(SessionOp::Set { name, sql }),
            _ => self.pin(),
        }
    }

    /// The statement's own source text, comments cut out (a replayed `-- ...` would swallow
    /// whatever the caller appends), without surrounding whitespace or the `;`.
    fn source_text(&mut self, f: &Fragment) -> Option<String> {
        let sql = self.sql;
        let starts = self.line_starts.get_or_insert_with(|| {
            std::iter::once(0)
                .chain(sql.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        let at = |loc: Location| -> Option<usize> {
            let line_start = *starts.get(usize::try_from(loc.line).ok()?.checked_sub(1)?)?;
            let col = usize::try_from(loc.column).ok()?.checked_sub(1)?;
            let line = sql.get(line_start..)?;
            let mut chars = line.char_indices().map(|(i, _)| i).chain([line.len()]);
            Some(line_start + chars.nth(col)?)
        };
        let (start, end) = f.bounds?;
        let (start, end) = (at(start)?, at(end)?);
        let mut text = String::with_capacity(end.saturating_sub(start));
        let mut pos = start;
        for &(from, to) in &f.comments {
            let (from, to) = (at(from)?, at(to)?);
            if from >= pos && to <= end {
                text.push_str(sql.get(pos..from)?);
                text.push(' ');
                pos = to;
            }
        }
        text.push_str(sql.get(pos..end)?);
        Some(text.trim().to_owned())
    }

    /// A `set_config` in a statement not otherwise walked (`PREPARE`'s body, `EXECUTE`'s
    /// or `CALL`'s arguments): see [`Classification::outlives_reset`].
    fn note_custom_settings(&mut self, stmt: &Statement) {
        let mut w = Walk {
            extra: self.extra,
            ..Walk::default()
        };
        let _ = stmt.visit(&mut w);
        self.out.outlives_reset |= w.custom_setting;
    }

    /// Walks one statement; returns whether something in it needs the primary.
    fn walk(&mut self, stmt: &Statement) -> bool {
        let mut w = Walk {
            extra: self.extra,
            ..Walk::default()
        };
        let _ = stmt.visit(&mut w);
        for t in w.read {
            push_unique(&mut self.out.tables_read, t);
        }
        for t in w.written {
            push_unique(&mut self.out.tables_written, t);
        }
        if !w.pins.is_empty() {
            // A session call (an advisory lock): its effect outlives a failure.
            self.pin_for(w.pins);
        }
        for n in w.read_back {
            push_unique(&mut self.out.read_back, n);
        }
        self.out.writes_unknown |= w.writes_unknown;
        self.out.volatile |= w.volatile;
        self.out.calls_user_functions |= w.user_functions;
        self.out.by_literal |= w.by_literal;
        self.out.pins_for_good |= w.pins_for_good;
        self.out.outlives_reset |= w.custom_setting;
        self.out.local_search_path |= w.local_search_path;
        self.out.local_parse_setting |= w.local_parse_setting;
        self.out.standby_refuses |= w.standby_refuses;
        w.needs_primary
    }
}

fn tx_access(modes: &[TransactionMode]) -> TxAccess {
    let has = |mode| modes.contains(&mode);
    let read_only = has(TransactionMode::AccessMode(TransactionAccessMode::ReadOnly));
    let read_write = has(TransactionMode::AccessMode(
        TransactionAccessMode::ReadWrite,
    ));
    // Standbys refuse serializable transactions, so such a read-only one must stay on the
    // primary; calling it read-write keeps any router from sending it to a replica.
    let serializable = has(TransactionMode::IsolationLevel(
        TransactionIsolationLevel::Serializable,
    ));
    if read_only && !read_write && !serializable {
        TxAccess::ReadOnly
    } else {
        TxAccess::ReadWrite
    }
}

/// `a`, `a.b`, ... at the start of `tokens`: (lower-case name, tokens used).
fn dotted_name(tokens: &[Token]) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut used = 0;
    loop {
        let Some(Token::Word(w)) = tokens.get(used) else {
            return None;
        };
        name.push_str(&w.value.to_ascii_lowercase());
        used += 1;
        if tokens.get(used) != Some(&Token::Period) {
            return Some((name, used));
        }
        name.push('.');
        used += 1;
    }
}

fn is_false_word(s: &str) -> bool {
    ["false", "off", "0", "no"]
        .iter()
        .any(|f| s.eq_ignore_ascii_case(f))
}

/// Whether a text holds a word that date and time input reads as a moment relative to
/// the clock ('now', 'today', 'tomorrow', 'yesterday'), in any case: such a value has another
/// meaning at every run. Over-matching ('nowhere') only costs caching.
pub fn names_a_moment(text: &[u8]) -> bool {
    const WORDS: [&[u8]; 4] = [b"now", b"today", b"tomorrow", b"yesterday"];
    (0..text.len()).any(|i| {
        // Most bytes start none of the words: one comparison each.
        matches!(text[i] | 0x20, b'n' | b't' | b'y')
            && WORDS.iter().any(|w| {
                text[i..]
                    .get(..w.len())
                    .is_some_and(|t| t.eq_ignore_ascii_case(w))
            })
    })
}

/// Whether a boolean setting's value leaves it on (or at its default): the server takes any
/// unique prefix of true / yes, `on` and `1`, in quotes of either kind too. Anything else may
/// turn it off (`f`, `of`, `n`, `"off"`, ...).
pub fn keeps_on(value: &str) -> bool {
    let v = value.trim().trim_matches(['\'', '"']).to_ascii_lowercase();
    let prefix_of = |word: &str| !v.is_empty() && word.starts_with(v.as_str());
    prefix_of("true") || prefix_of("yes") || v == "on" || v == "1" || v == "default"
}

/// A SET value that is one of `words` as a bare keyword (`DEFAULT`, `LOCAL`), not a string
/// or a quoted identifier.
fn is_keyword_value(value: &Expr, words: &[&str]) -> bool {
    let text = value.to_string();
    words.iter().any(|w| text.eq_ignore_ascii_case(w))
}

/// PostgreSQL folds unquoted identifiers to (ASCII) lower case; quoted ones stay as written.
fn ident_name(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

fn relation_name(name: &ObjectName) -> String {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| p.as_ident().map_or_else(|| p.to_string(), ident_name))
        .collect();
    parts.join(".")
}

/// GUC names are case-insensitive, quoted or not.
fn guc_name(name: &ObjectName) -> String {
    name.to_string().replace('"', "").to_ascii_lowercase()
}

/// `pg_temp.x` (or `pg_temp_3.x`): the session's own temporary schema.
fn is_temp_schema(name: &ObjectName) -> bool {
    let schema = name.0.iter().rev().nth(1).and_then(|p| p.as_ident());
    schema.is_some_and(|s| s.value.to_ascii_lowercase().starts_with("pg_temp"))
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// What calling a primary-only function implies.
#[derive(Clone)]
enum FnKind {
    /// Must run on the primary (node or session state), writes nothing.
    Primary,
    /// Primary, and session-bound: the session stays on that connection.
    Session,
    /// `set_config('name', value, false)` with a literal name: a session setting whose value
    /// the proxy reads back afterwards and replays like a SET.
    SetConfig(String),
    /// Primary, and writes something no table list captures.
    Write,
    /// `set_config('search_path', …, true)`: primary, and the transaction's `search_path`
    /// may differ from the session's.
    LocalSearchPath,
    /// `set_config(…, true)` of a name not given as a literal: both of the others.
    LocalAnySetting,
    /// `set_config(name, …, true)` of one of [`PARSE_SETTINGS`]: primary, and what the
    /// transaction parses may differ from the session's statements of the same text.
    LocalParseSetting,
}

/// Session-level advisory locks and dblink connections outlive the statement.
#[rustfmt::skip]
const SESSION_FNS: [&str; 6] = [
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared", "dblink_connect", "dblink_connect_u",
];

/// `SELECT pg_advisory_unlock_all()` (asyncpg's pool sends it at every release): a call in
/// the select list, not under anything that could skip it, of a query with no FROM, WHERE,
/// GROUP BY, HAVING or LIMIT, so that it runs once the statement succeeds.
fn unlocks_all_advisory_locks(stmt: &Statement) -> bool {
    let Statement::Query(q) = stmt else {
        return false;
    };
    let SetExpr::Select(s) = &*q.body else {
        return false;
    };
    let plain_query = q.with.is_none()
        && q.limit_clause.is_none()
        && q.fetch.is_none()
        && q.pipe_operators.is_empty();
    let runs_once = s.from.is_empty()
        && s.selection.is_none()
        && s.having.is_none()
        && s.qualify.is_none()
        && s.prewhere.is_none()
        && matches!(&s.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty());
    let unlock_all = |e: &Expr| {
        matches!(e, Expr::Function(f)
            if f.over.is_none()
                && f.filter.is_none()
                && is_catalog_function(&f.name, "pg_advisory_unlock_all"))
    };
    plain_query
        && runs_once
        && s.projection.iter().any(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => unlock_all(e),
            _ => false,
        })
}

/// `name` calls the built-in function `base` (lower-case): unqualified or in pg_catalog,
/// spelled as PostgreSQL folds it.
fn is_catalog_function(name: &ObjectName, base: &str) -> bool {
    let folds_to = |i: &Ident, to: &str| match i.quote_style {
        None => i.value.eq_ignore_ascii_case(to),
        Some(_) => i.value == to,
    };
    let parts: Vec<_> = name.0.iter().map(|p| p.as_ident()).collect();
    match parts.as_slice() {
        [Some(f)] => folds_to(f, base),
        [Some(schema), Some(f)] => folds_to(schema, "pg_catalog") && folds_to(f, base),
        _ => false,
    }
}

/// Answerable only by the primary (or the session's connection there), but writes nothing.
#[rustfmt::skip]
const PRIMARY_FNS: [&str; 17] = [
    "currval", "lastval", "pg_sequence_last_value", "pg_export_snapshot",
    "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all", "txid_current_if_assigned", "pg_current_xact_id_if_assigned",
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
    "pg_is_in_recovery",
];

/// Writes or side effects no table list captures, or acts on the node that runs it (plus
/// every name with a prefix in [`WRITE_FN_PREFIXES`]). A standby would run the node's own:
/// `pg_promote` there promotes it, a replication slot made there is not the primary's.
#[rustfmt::skip]
const WRITE_FNS: [&str; 20] = [
    "nextval", "setval", "txid_current", "pg_current_xact_id", "pg_switch_wal", "pg_notify",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "dblink_exec",
    "pg_promote", "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_log_standby_snapshot",
    "pg_drop_replication_slot", "pg_replication_slot_advance", "pg_backup_start",
    "pg_backup_stop", "pg_rotate_logfile", "pg_stat_statements_reset",
];

/// Large objects, statistics resets, slots, origins, logical messages, restore points.
#[rustfmt::skip]
const WRITE_FN_PREFIXES: [&str; 6] = [
    "lo_", "pg_stat_reset", "pg_create_", "pg_copy_", "pg_logical_", "pg_replication_origin_",
];

/// Whether the first argument is a literal written right after the parenthesis (cast with
/// `::` or not), where the shape fingerprint keeps a setting's name.
fn plain_first(args: &[FunctionArg]) -> bool {
    match args.first() {
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(e))) => match e {
            Expr::Value(_) => true,
            Expr::Cast {
                kind: CastKind::DoubleColon,
                expr,
                ..
            } => matches!(**expr, Expr::Value(_)),
            _ => false,
        },
        _ => false,
    }
}

/// A custom setting's name (it has a dot), which PostgreSQL keeps defined on a connection
/// once it was set or reset there. pgsplit's own `pgsplit.consistency` (which reaches the
/// server too) does not count: sessions choose it routinely, and nothing else reads it.
fn is_custom_setting(name: &str) -> bool {
    name.contains('.') && !name.eq_ignore_ascii_case("pgsplit.consistency")
}

/// Argument `i` of set_config or current_setting when it is a literal, also when cast or
/// parenthesized (`'transaction_read_only'::text`): a named argument (`is_local => true`)
/// is found by its name, the others by position.
fn literal_arg(args: &[FunctionArg], i: usize) -> Option<&Value> {
    fn literal(e: &Expr) -> Option<&Value> {
        match e {
            Expr::Value(v) => Some(&v.value),
            Expr::Cast { expr, .. } | Expr::Nested(expr) => literal(expr),
            _ => None,
        }
    }
    const PARAMS: [&str; 3] = ["setting_name", "new_value", "is_local"];
    let named = args.iter().find_map(|a| match a {
        FunctionArg::Named {
            name,
            arg: FunctionArgExpr::Expr(e),
            ..
        } if name.value.eq_ignore_ascii_case(PARAMS[i]) => Some(e),
        FunctionArg::ExprNamed {
            name: Expr::Identifier(name),
            arg: FunctionArgExpr::Expr(e),
            ..
        } if name.value.eq_ignore_ascii_case(PARAMS[i]) => Some(e),
        _ => None,
    });
    let positional = match args.get(i) {
        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(e))) => Some(e),
        _ => None,
    };
    named.or(positional).and_then(literal)
}

fn primary_kind(name: &str, args: &[FunctionArg]) -> Option<FnKind> {
    let arg = |i: usize| literal_arg(args, i);
    match name {
        // set_config(name, value, is_local => true) is SET LOCAL: it dies with the transaction.
        "set_config" if arg(2) == Some(&Value::Boolean(true)) => match arg(0) {
            Some(Value::SingleQuotedString(n)) if affects_parsing(&n.to_ascii_lowercase()) => {
                Some(FnKind::LocalParseSetting)
            }
            Some(Value::SingleQuotedString(n)) if !n.eq_ignore_ascii_case("search_path") => {
                Some(FnKind::Primary)
            }
            Some(Value::SingleQuotedString(_)) => Some(FnKind::LocalSearchPath),
            _ => Some(FnKind::LocalAnySetting),
        },
        "set_config" => match arg(0) {
            Some(Value::SingleQuotedString(n)) => Some(FnKind::SetConfig(n.to_ascii_lowercase())),
            _ => Some(FnKind::Session),
        },
        // A name given as a parameter is the application's own reading (drivers probe
        // with SHOW or a literal name); a literal in any quoting is checked.
        "current_setting" => match arg(0) {
            Some(
                Value::SingleQuotedString(s)
                | Value::EscapedStringLiteral(s)
                | Value::UnicodeStringLiteral(s),
            ) => PROBE_GUCS
                .iter()
                .any(|p| s.eq_ignore_ascii_case(p))
                .then_some(FnKind::Primary),
            Some(Value::DollarQuotedString(d)) => PROBE_GUCS
                .iter()
                .any(|p| d.value.eq_ignore_ascii_case(p))
                .then_some(FnKind::Primary),
            _ => None,
        },
        _ if SESSION_FNS.contains(&name) => Some(FnKind::Session),
        _ if PRIMARY_FNS.contains(&name) => Some(FnKind::Primary),
        _ if WRITE_FNS.contains(&name) || WRITE_FN_PREFIXES.iter().any(|p| name.starts_with(p)) => {
            Some(FnKind::Write)
        }
        _ => None,
    }
}

/// Built-in volatile functions that change nothing (so calling them is no write). Sorted.
/// The SQL-standard niladic forms (`CURRENT_TIMESTAMP`, `current_user`) are keywords no
/// user function can take the place of; the session-describing ones are volatile because a
/// `SET ROLE` or a setting changes them within one login.
const KNOWN_VOLATILE_READS: &[&str] = &[
    "age",
    "clock_timestamp",
    "current_catalog",
    "current_database",
    "current_date",
    "current_role",
    "current_schema",
    "current_schemas",
    "current_setting",
    "current_time",
    "current_timestamp",
    "current_user",
    "gen_random_uuid",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "localtime",
    "localtimestamp",
    "now",
    "pg_backend_pid",
    "pg_sleep",
    "random",
    "session_user",
    "statement_timestamp",
    "timeofday",
    "transaction_timestamp",
    "user",
];

/// Built-ins whose result depends only on their arguments, the data and recorded session
/// settings. Everything else, user functions included, counts as volatile: caching a volatile
/// result is the worse mistake. Sorted.
const KNOWN_STABLE: &[&str] = &[
    "abs",
    "any_value",
    "array",
    "array_agg",
    "array_append",
    "array_cat",
    "array_dims",
    "array_fill",
    "array_length",
    "array_lower",
    "array_ndims",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_replace",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "avg",
    "bit_and",
    "bit_length",
    "bit_or",
    "bool",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "cbrt",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "cume_dist",
    "date",
    "date_bin",
    "date_part",
    "date_trunc",
    "decode",
    "degrees",
    "dense_rank",
    "div",
    "encode",
    "every",
    "exp",
    "extract",
    "first_value",
    "float4",
    "float8",
    "floor",
    "format",
    "format_type",
    "gcd",
    "generate_series",
    "generate_subscripts",
    "greatest",
    "initcap",
    "int2",
    "int4",
    "int8",
    "isfinite",
    "json_agg",
    "json_array_elements",
    "json_array_elements_text",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_each_text",
    "json_extract_path",
    "json_extract_path_text",
    "json_object",
    "json_object_agg",
    "json_object_keys",
    "json_populate_record",
    "json_strip_nulls",
    "json_to_record",
    "json_to_recordset",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_elements_text",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_each_text",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object",
    "jsonb_object_agg",
    "jsonb_object_keys",
    "jsonb_path_exists",
    "jsonb_path_match",
    "jsonb_path_query",
    "jsonb_path_query_array",
    "jsonb_path_query_first",
    "jsonb_populate_record",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_to_record",
    "jsonb_to_recordset",
    "jsonb_typeof",
    "justify_days",
    "justify_hours",
    "justify_interval",
    "lag",
    "last_value",
    "lcm",
    "lead",
    "least",
    "left",
    "length",
    "ln",
    "log",
    "log10",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_time",
    "make_timestamp",
    "make_timestamptz",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "normalize",
    "nth_value",
    "ntile",
    "nullif",
    "num_nonnulls",
    "num_nulls",
    "numeric",
    "octet_length",
    "overlay",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_typeof",
    "phraseto_tsquery",
    "pi",
    "plainto_tsquery",
    "position",
    "pow",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "radians",
    "rank",
    "regexp_count",
    "regexp_like",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "regexp_substr",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "setweight",
    "sha256",
    "sha512",
    "sign",
    "split_part",
    "sqrt",
    "starts_with",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "substring",
    "sum",
    "text",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "to_tsquery",
    "to_tsvector",
    "translate",
    "trim",
    "trunc",
    "ts_headline",
    "ts_rank",
    "ts_rank_cd",
    "unnest",
    "upper",
    "var_pop",
    "var_samp",
    "variance",
    "version",
    "websearch_to_tsquery",
    "width_bucket",
];

/// Visits every node of one statement.
#[derive(Default)]
struct Walk<'a> {
    extra: &'a [String],
    read: Vec<String>,
    written: Vec<String>,
    /// Names (by address) that a write statement targets.
    targets: Vec<*const ObjectName>,
    /// Names (by address) of functions called in FROM, which sqlparser reports as relations.
    functions_in_from: Vec<*const ObjectName>,
    /// CTE names in scope, one WITH list per enclosing query, with how many of its
    /// names are visible at this point: references to them are not tables.
    ctes: Vec<(Vec<String>, usize)>,
    /// The CTE bodies (by address) of the queries being walked: the WITH list (its index in
    /// `ctes`) and how many of its names the body sees.
    cte_bodies: Vec<(*const Query, usize, usize)>,
    needs_primary: bool,
    pins: PinKinds,
    read_back: Vec<String>,
    writes_unknown: bool,
    volatile: bool,
    user_functions: bool,
    by_literal: bool,
    pins_for_good: bool,
    custom_setting: bool,
    local_search_path: bool,
    local_parse_setting: bool,
    standby_refuses: bool,
}

impl Walk<'_> {
    fn target_factor(&mut self, factor: &TableFactor) {
        match factor {
            TableFactor::Table { name, .. } => self.targets.push(name),
            _ => self.writes_unknown = true,
        }
    }

    fn function(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let Some(last) = name.0.last().and_then(|p| p.as_ident()) else {
            self.volatile = true;
            return;
        };
        let base = last.value.to_ascii_lowercase();
        let configured = !self.extra.is_empty() && {
            let full = name.to_string().replace('"', "");
            let matches =
                |e: &String| e.eq_ignore_ascii_case(&base) || e.eq_ignore_ascii_case(&full);
            self.extra.iter().any(matches)
        };
        // Which name set_config sets decides where it runs and what it does to the
        // transaction, and the shape cache keeps no literal but `current_setting('name')`'s
        // (and only in that spelling): such texts are classified each by itself.
        self.by_literal |= base == "set_config"
            || (base == "current_setting" && !(last.quote_style.is_none() && plain_first(args)));
        // Local or not, and whatever name a parameter or an expression turns out to be.
        self.custom_setting |= base == "set_config"
            && !matches!(literal_arg(args, 0), Some(Value::SingleQuotedString(n)) if !is_custom_setting(n));
        let kind = if configured {
            Some(FnKind::Write)
        } else {
            primary_kind(&base, args)
        };
        if let Some(kind) = kind {
            self.needs_primary = true;
            self.volatile = true;
            match kind {
                FnKind::Primary => self.standby_refuses |= base == "pg_export_snapshot",
                FnKind::Session => {
                    let dblink = base.starts_with("dblink_connect");
                    self.pins |= if dblink {
                        PinKinds::OTHER
                    } else {
                        PinKinds::ADVISORY_LOCK
                    };
                    self.pins_for_good |= dblink;
                }
                FnKind::SetConfig(name) => push_unique(&mut self.read_back, name),
                FnKind::Write => self.writes_unknown = true,
                FnKind::LocalSearchPath => self.local_search_path = true,
                FnKind::LocalParseSetting => self.local_parse_setting = true,
                FnKind::LocalAnySetting => {
                    self.local_search_path = true;
                    self.local_parse_setting = true;
                }
            }
            return;
        }
        // `"Lower"(x)` or `app.lower(x)` is somebody's own function, not the built-in.
        let schema = name.0.iter().rev().nth(1).and_then(|p| p.as_ident());
        let builtin = (last.quote_style.is_none() || last.value == base)
            && schema.is_none_or(|s| s.value.eq_ignore_ascii_case("pg_catalog"))
            && name.0.len() <= 2;
        let stable = KNOWN_STABLE.binary_search(&base.as_str()).is_ok();
        self.volatile |= !(builtin && stable);
        self.user_functions |=
            !(builtin && (stable || KNOWN_VOLATILE_READS.binary_search(&base.as_str()).is_ok()));
    }

    fn read_relation(&mut self, name: String, qualified: bool) {
        if qualified
            || !self
                .ctes
                .iter()
                .any(|(names, visible)| names[..*visible].contains(&name))
        {
            push_unique(&mut self.read, name);
        }
    }

    /// `TABLE name` inside a set operation is not visited as a relation.
    fn set_expr_tables(&mut self, body: &SetExpr) {
        match body {
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr_tables(left);
                self.set_expr_tables(right);
            }
            SetExpr::Table(t) => {
                let parts: Vec<String> = [&t.schema_name, &t.table_name]
                    .into_iter()
                    .flatten()
                    .map(ident_name)
                    .collect();
                self.read_relation(parts.join("."), parts.len() > 1);
            }
            _ => {}
        }
    }
}

impl Visitor for Walk<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        match stmt {
            Statement::Insert(i) => {
                self.needs_primary = true;
                match &i.table {
                    TableObject::TableName(name) => self.targets.push(name),
                    _ => self.writes_unknown = true,
                }
            }
            Statement::Update(u) => {
                self.needs_primary = true;
                self.target_factor(&u.table.relation);
            }
            Statement::Delete(d) => {
                self.needs_primary = true;
                self.targets
                    .extend(d.tables.iter().map(|n| n as *const ObjectName));
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
                for table in from {
                    self.target_factor(&table.relation);
                }
            }
            Statement::Merge(m) => {
                self.needs_primary = true;
                self.target_factor(&m.table);
            }
            // sqlparser does not visit a COPY table as a relation.
            Statement::Copy {
                source: CopySource::Table { table_name, .. },
                to,
                ..
            } => {
                let name = relation_name(table_name);
                if *to {
                    push_unique(&mut self.read, name);
                } else {
                    self.needs_primary = true;
                    push_unique(&mut self.written, name);
                }
            }
            Statement::Truncate(t) => self
                .targets
                .extend(t.table_names.iter().map(|t| &t.name as *const _)),
            Statement::CreateTable(c) => self.targets.push(&c.name),
            Statement::CreateView(c) => self.targets.push(&c.name),
            Statement::AlterTable(a) => self.targets.push(&a.name),
            Statement::AlterView(a) => self.targets.push(&a.name),
            Statement::RefreshMaterializedView(r) => self.targets.push(&r.name),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // FOR UPDATE / SHARE takes row locks: only the primary can.
        self.needs_primary |= !query.locks.is_empty();
        // A CTE's own body sees only the CTEs before it (all of them WITH RECURSIVE): in
        // `WITH t AS (SELECT * FROM t)` the inner `t` is the table, and the statement reads it.
        if let Some(&(_, list, visible)) = self
            .cte_bodies
            .iter()
            .find(|(body, ..)| std::ptr::eq(*body, query))
        {
            self.ctes[list].1 = visible;
        }
        let names: Vec<String> = query
            .with
            .iter()
            .flat_map(|w| &w.cte_tables)
            .map(|c| ident_name(&c.alias.name))
            .collect();
        if let Some(with) = &query.with {
            let list = self.ctes.len();
            for (i, cte) in with.cte_tables.iter().enumerate() {
                let visible = if with.recursive { names.len() } else { i };
                self.cte_bodies
                    .push((&*cte.query as *const Query, list, visible));
            }
        }
        let all = names.len();
        self.ctes.push((names, all));
        self.set_expr_tables(&query.body);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.ctes.pop();
        let own = self.ctes.len();
        self.cte_bodies.retain(|&(_, list, _)| list != own);
        if let Some(&(_, list, _)) = self
            .cte_bodies
            .iter()
            .find(|(body, ..)| std::ptr::eq(*body, query))
        {
            // Back to the whole list for the rest of the enclosing query.
            self.ctes[list].1 = self.ctes[list].0.len();
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        // SELECT INTO creates and fills a table.
        if let Some(into) = &select.into {
            self.needs_primary = true;
            if into.temporary {
                self.pins |= PinKinds::TEMP;
            }
            for target in &into.targets {
                match target {
                    Expr::Identifier(i) => push_unique(&mut self.written, ident_name(i)),
                    Expr::CompoundIdentifier(parts) => {
                        let name: Vec<String> = parts.iter().map(ident_name).collect();
                        let schema = name.iter().rev().nth(1);
                        if schema.is_some_and(|s| s.starts_with("pg_temp")) {
                            self.pins |= PinKinds::TEMP;
                        }
                        push_unique(&mut self.written, name.join("."));
                    }
                    _ => self.writes_unknown = true,
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            sample:
                Some(
                    sqlparser::ast::TableSampleKind::BeforeTableAlias(sample)
                    | sqlparser::ast::TableSampleKind::AfterTableAlias(sample),
                ),
            ..
        } = factor
            && sample.seed.is_none()
        {
            // TABLESAMPLE without REPEATABLE draws a new sample each time.
            self.volatile = true;
        }
        match factor {
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                self.functions_in_from.push(name);
                self.function(name, &args.args);
            }
            TableFactor::Function { name, args, .. } => {
                self.functions_in_from.push(name);
                self.function(name, args);
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let addr: *const ObjectName = relation;
        if self.functions_in_from.contains(&addr) {
            return ControlFlow::Continue(());
        }
        // Temp objects exist only on the one connection that made them.
        if is_temp_schema(relation) {
            self.needs_primary = true;
            self.pins |= PinKinds::TEMP;
        }
        let name = relation_name(relation);
        // Views of this node's own sessions, locks and replication: a replica shows its own.
        let bare = name.rsplit('.').next().unwrap_or(&name);
        if NODE_VIEWS.contains(&bare)
            || bare.starts_with("pg_stat_")
            || bare.starts_with("pg_statio_")
        {
            self.needs_primary = true;
            self.volatile = true;
        }
        if self.targets.contains(&addr) {
            push_unique(&mut self.written, name);
        } else {
            self.read_relation(name, relation.0.len() > 1);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            let args = match &f.args {
                FunctionArguments::List(list) => list.args.as_slice(),
                _ => &[],
            };
            self.function(&f.name, args);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_value(&mut self, value: &ValueWithSpan) -> ControlFlow<()> {
        // 'now'::timestamptz and friends are evaluated when the statement runs, in any
        // quoting and with a time after them ('yesterday 13:00').
        if let Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::UnicodeStringLiteral(s)
        | Value::NationalStringLiteral(s)
        | Value::DoubleQuotedString(s) = &value.value
        {
            self.volatile |= names_a_moment(s.as_bytes());
        }
        if let Value::DollarQuotedString(d) = &value.value {
            self.volatile |= names_a_moment(d.value.as_bytes());
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
