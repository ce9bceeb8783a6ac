//! A client request decoded for routing: one simple Query, one FunctionCall, or the
//! extended-protocol messages up to a Sync (or a Flush), with every statement name resolved
//! to the session's [`Statement`]. Decoded once; sent to a backend once or, on a retry,
//! again to another.

use std::sync::Arc;

use super::state::{Statement, Statements};
use crate::error::Result;
use crate::protocol::{
    BindNames, Frame, MalformedMessage, ParseMsg, Target, decode_target, query_sql, tag,
    validate_execute,
};
use crate::router::{Classification, ClassifyCache, TxEffect};

/// One frontend message of a request, decoded as far as routing and renaming need.
#[derive(Debug, Clone)]
pub enum Item {
    Query {
        frame: Frame,
        class: Arc<Classification>,
    },
    /// A message forwarded as it is, whose content the proxy does not judge: a fast-path
    /// FunctionCall (its function named by OID), or a simple Query whose text is malformed
    /// (the server refuses it as PostgreSQL does). Answered up to ReadyForQuery, or skipped
    /// by a server skipping to the Sync after an error.
    Forwarded(Frame),
    Parse(Arc<Statement>),
    /// `stmt` is `None` for a name the session does not know (an SQL-level PREPARE, or an
    /// error the server will report).
    Bind {
        frame: Frame,
        stmt: Option<Arc<Statement>>,
    },
    DescribeStatement {
        frame: Frame,
        stmt: Option<Arc<Statement>>,
    },
    CloseStatement {
        frame: Frame,
        name: String,
        known: bool,
    },
    /// Execute, Describe portal, Close portal: forwarded as they are.
    Portal(Frame),
    Sync,
    Flush,
    /// A Sync the proxy adds itself (never decoded from the client).
    HiddenSync,
    /// A malformed Parse, Bind, Describe, Close or Execute, which PostgreSQL refuses with an
    /// ERROR (08P01), not by ending the session. The relay makes the server fail in its
    /// place, so that the batch and any transaction block fail with it exactly as on a
    /// direct connection; the client gets this error instead of the server's. (Kept as the
    /// decoder's error, a few bytes: a client can send many such messages before a Sync.)
    Fail(MalformedMessage),
}

impl Item {
    pub fn is_execute(&self) -> bool {
        matches!(self, Item::Portal(f) if f.tag == tag::EXECUTE)
    }

    /// It may leave session state pgsplit cannot see on its connection: a fast-path
    /// function call, an SQL-level prepared statement bound through the protocol (one
    /// pgsplit does not know), or text that runs somebody's own code or that the classifier
    /// could not read (`EXECUTE`, `CALL`, `DO`, a user function).
    pub fn may_hide_session_state(&self) -> bool {
        match self {
            Item::Forwarded(f) => f.tag == tag::FUNCTION_CALL,
            Item::Bind { stmt: None, .. } => true,
            other => other
                .class()
                .is_some_and(|c| c.calls_user_functions || !c.parsed),
        }
    }

    /// The classifications of the statements `items` runs, in order: each Query's, and
    /// the statement bound to the unnamed portal at each Execute of it (named portals are
    /// not followed; a Parse or a Describe only prepares).
    pub fn executed(items: &[Item]) -> Vec<&Classification> {
        let mut out = Vec::new();
        let mut portal: Option<&Classification> = None;
        for item in items {
            match item {
                Item::Query { class, .. } => out.push(&**class),
                Item::Bind { frame, stmt } if frame.body.first() == Some(&0) => {
                    portal = stmt.as_ref().map(|s| &*s.class);
                }
                Item::Portal(frame)
                    if frame.tag == tag::EXECUTE && frame.body.first() == Some(&0) =>
                {
                    out.extend(portal);
                }
                _ => {}
            }
        }
        out
    }

    /// The classification of what this item parses or executes, for routing.
    pub fn class(&self) -> Option<&Arc<Classification>> {
        match self {
            Item::Query { class, .. } => Some(class),
            Item::Parse(s) => Some(&s.class),
            Item::Bind { stmt: Some(s), .. } | Item::DescribeStatement { stmt: Some(s), .. } => {
                Some(&s.class)
            }
            _ => None,
        }
    }
}

/// Whether the server connection is surely outside a transaction block once `items` ran,
/// whatever they do and whether they fail: a complete request (a simple Query, or extended
/// messages up to the client's Sync) that executes one COMMIT / ROLLBACK, or that starts
/// outside a block (`in_transaction` false) and executes only statements that open no block
/// and use no COPY. Only then may the proxy queue a query of its own behind the request.
pub fn ends_outside_transaction(items: &[Item], in_transaction: bool) -> bool {
    if !matches!(items, [Item::Query { .. }] | [.., Item::Sync]) {
        return false;
    }
    let mut executed: Vec<&Classification> = Vec::new();
    // What the unnamed portal runs; named portals are not followed.
    let mut portal: Option<&Classification> = None;
    for item in items {
        match item {
            Item::Query { class, .. } => executed.push(class),
            Item::Bind {
                frame,
                stmt: Some(s),
            } if frame.body.first() == Some(&0) => portal = Some(&s.class),
            Item::Portal(frame) if frame.tag == tag::EXECUTE => match portal {
                Some(class) if frame.body.first() == Some(&0) => executed.push(class),
                _ => return false,
            },
            // A Fail fails the request where it stands: what comes after it never runs.
            Item::Bind { .. } | Item::Forwarded(_) | Item::HiddenSync | Item::Fail(_) => {
                return false;
            }
            _ => {}
        }
    }
    match executed.as_slice() {
        [] => false,
        [one] if one.tx_effect == TxEffect::Ends => true,
        all => {
            !in_transaction
                && all
                    .iter()
                    .all(|c| c.parsed && c.tx_effect == TxEffect::Neutral)
        }
    }
}

/// The answer the proxy gives itself to a request that only opens a transaction block, a
/// plain one (`BEGIN`, `BEGIN WORK`, `BEGIN TRANSACTION`, `START TRANSACTION`) or a read-only
/// one that replicas can serve (`BEGIN READ ONLY`, with an isolation level short of
/// serializable), as a simple Query or by binding and executing a prepared statement with
/// no parameters, for a session outside one. The server gets the BEGIN with the session's
/// next request: a transaction holds no server connection and costs no round trip of its
/// own until it runs something, and a read-only block goes where its first statement can
/// run (a `SET TRANSACTION` to serializable or READ WRITE, or a snapshot import, is for the
/// primary). The second value: the read-only BEGIN's text, to send ahead of that
/// statement (`None`: a plain BEGIN). Other options (`DEFERRABLE`, what sqlparser cannot
/// read) are not answered here: the server must be the one to judge them.
pub fn deferrable_begin(items: &[Item]) -> Option<(Vec<Frame>, Option<Box<str>>)> {
    use crate::protocol::{TxStatus, command_complete, ready_for_query};
    // Checked on every request outside a transaction: the cached classification first.
    let lone = lone_statement(items)?;
    let class = lone.class;
    if class.begins_tx.is_none() || class.statement_count != 1 {
        return None;
    }
    let sql = lone.sql()?;
    let read_only = if is_plain_begin(&sql) {
        None
    } else if class.begins_tx == Some(crate::router::TxAccess::ReadOnly) && is_read_only_begin(&sql)
    {
        Some(sql.trim().trim_end_matches(';').into())
    } else {
        return None;
    };
    let mut reply = lone.before();
    // The tag PostgreSQL gives each spelling.
    let starts = sql
        .trim_start()
        .get(..5)
        .is_some_and(|w| w.eq_ignore_ascii_case("START"));
    reply.push(command_complete(match starts {
        true => "START TRANSACTION",
        false => "BEGIN",
    }));
    reply.push(ready_for_query(TxStatus::InTransaction));
    Some((reply, read_only))
}

/// PostgreSQL's answer to a request in a transaction block that failed before any of it
/// reached a server (its deferred BEGIN found no primary): a lone COMMIT / ROLLBACK, parsed
/// in the same request or not, ends it ("ROLLBACK", idle; `None` when it comes with
/// anything else the proxy does not answer itself: it then goes to the server), anything
/// else is refused with 25P02. The bool: whether the block ended.
pub fn answer_in_failed_block(items: &[Item]) -> Option<(Vec<Frame>, bool)> {
    use crate::protocol::{Severity, TxStatus, command_complete, error_response, ready_for_query};
    if items.iter().all(|i| matches!(i, Item::Sync | Item::Flush)) {
        // Nothing to refuse: a Sync only asks where the session stands.
        return Some((vec![ready_for_query(TxStatus::Failed)], false));
    }
    if let Some(lone) = lone_statement_maybe_parsed(items)
        && lone.class.tx_effect == TxEffect::Ends
    {
        let mut reply = lone.before();
        reply.push(command_complete("ROLLBACK"));
        reply.push(ready_for_query(TxStatus::Idle));
        return Some((reply, true));
    }
    if ends_outside_transaction(items, true) {
        return None;
    }
    // The message's form is checked before the transaction's state.
    let malformed_query = matches!(items.first(), Some(Item::Forwarded(f)) if f.tag == tag::QUERY);
    let mut reply = vec![if malformed_query {
        error_response(Severity::Error, "08P01", "malformed Query message")
    } else {
        error_response(
            Severity::Error,
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        )
    }];
    // A simple Query or forwarded message alone has its own ReadyForQuery; behind a refused
    // extended message the server skips it, and only a Sync is answered.
    if matches!(items.first(), Some(Item::Query { .. } | Item::Forwarded(_)))
        || items.iter().any(|i| matches!(i, Item::Sync))
    {
        reply.push(ready_for_query(TxStatus::Failed));
    }
    Some((reply, false))
}

/// A request that runs exactly one statement the proxy can answer for: a simple Query, or
/// a Bind (no parameters) of a statement the session knows or the request parses first,
/// an optional Describe of the unnamed portal, its Execute and a Sync.
struct LoneStatement<'a> {
    class: &'a Classification,
    /// The Query message, or the prepared statement's text.
    source: Result<&'a Frame, &'a str>,
    /// A Describe of the portal came with the Bind.
    described: bool,
    /// The request parses the statement first.
    parsed: bool,
}

impl LoneStatement<'_> {
    fn sql(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self.source {
            Ok(query) => query_sql(&query.body).ok(),
            Err(text) => Some(std::borrow::Cow::Borrowed(text)),
        }
    }

    /// The answers due before the statement's own: ParseComplete, BindComplete, NoData.
    fn before(&self) -> Vec<Frame> {
        use crate::protocol::{bind_complete, no_data, parse_complete};
        let mut out = Vec::new();
        if self.parsed {
            out.push(parse_complete());
        }
        if self.source.is_err() {
            out.push(bind_complete());
            if self.described {
                out.push(no_data());
            }
        }
        out
    }
}

fn lone_statement(items: &[Item]) -> Option<LoneStatement<'_>> {
    match items {
        [Item::Query { frame, class }] => Some(LoneStatement {
            class,
            source: Ok(frame),
            described: false,
            parsed: false,
        }),
        [
            Item::Bind {
                frame,
                stmt: Some(s),
            },
            rest @ ..,
            Item::Sync,
        ] if binds_nothing(&frame.body) => {
            let described = match rest {
                [Item::Portal(e)] if unnamed_execute(e) => false,
                [Item::Portal(d), Item::Portal(e)]
                    if d.tag == tag::DESCRIBE && d.body[..] == *b"P\0" && unnamed_execute(e) =>
                {
                    true
                }
                _ => return None,
            };
            Some(LoneStatement {
                class: &s.class,
                source: Err(&s.parse.sql),
                described,
                parsed: false,
            })
        }
        _ => None,
    }
}

/// [`lone_statement`], or the same behind a Parse of the statement it binds.
fn lone_statement_maybe_parsed(items: &[Item]) -> Option<LoneStatement<'_>> {
    let [Item::Parse(parsed), rest @ ..] = items else {
        return lone_statement(items);
    };
    match rest.first() {
        Some(Item::Bind { stmt: Some(s), .. }) if Arc::ptr_eq(s, parsed) => Some(LoneStatement {
            parsed: true,
            ..lone_statement(rest)?
        }),
        _ => None,
    }
}

fn is_plain_begin(sql: &str) -> bool {
    let sql = sql.trim().trim_end_matches(';');
    // Every request outside a transaction comes through here: most are longer.
    if sql.len() > "START TRANSACTION".len() + 8 {
        return false;
    }
    let mut words = sql.split_ascii_whitespace();
    let mut next = || words.next().map(str::to_ascii_uppercase);
    matches!(
        (next().as_deref(), next().as_deref(), next()),
        (Some("BEGIN"), None | Some("WORK" | "TRANSACTION"), None)
            | (Some("START"), Some("TRANSACTION"), None)
    )
}

/// `BEGIN [WORK | TRANSACTION]` or `START TRANSACTION` with `READ ONLY` among modes that
/// standbys serve (`ISOLATION LEVEL` short of serializable, `NOT DEFERRABLE`), in
/// PostgreSQL's grammar: pgsplit answers it before any server sees it, so it must be one
/// the server would accept (sqlparser takes more, such as `ISOLATION LEVEL SNAPSHOT`).
fn is_read_only_begin(sql: &str) -> bool {
    let sql = sql.trim().trim_end_matches(';');
    if sql.len() > 100 {
        return false;
    }
    let spaced = sql.to_ascii_uppercase().replace(',', " , ");
    let words: Vec<&str> = spaced.split_ascii_whitespace().collect();
    let mut rest = match words.as_slice() {
        ["BEGIN", "WORK" | "TRANSACTION", rest @ ..]
        | ["START", "TRANSACTION", rest @ ..]
        | ["BEGIN", rest @ ..] => rest,
        _ => return false,
    };
    let mut read_only = false;
    loop {
        rest = match rest {
            ["READ", "ONLY", more @ ..] => {
                read_only = true;
                more
            }
            [
                "ISOLATION",
                "LEVEL",
                "READ",
                "COMMITTED" | "UNCOMMITTED",
                more @ ..,
            ]
            | ["ISOLATION", "LEVEL", "REPEATABLE", "READ", more @ ..]
            | ["NOT", "DEFERRABLE", more @ ..] => more,
            _ => return false,
        };
        // Modes are separated by a comma or by nothing.
        match rest {
            [] => return read_only,
            [",", more @ ..] => rest = more,
            _ => {}
        }
    }
}

/// A Bind of the unnamed portal with no parameters (and any result formats).
fn binds_nothing(body: &[u8]) -> bool {
    body.len() >= 6 && body[0] == 0 && {
        let Some(nul) = body[1..].iter().position(|&b| b == 0) else {
            return false;
        };
        body.get(2 + nul..6 + nul) == Some(&[0, 0, 0, 0][..])
    }
}

/// Execute of the unnamed portal.
fn unnamed_execute(frame: &Frame) -> bool {
    frame.tag == tag::EXECUTE && frame.body.first() == Some(&0)
}

/// Decode one extended-protocol (or Query/FunctionCall) frame. `local` holds the statements
/// parsed earlier in the same batch, which shadow the session's.
/// A statement text at least this long is classified away from the event loop (see
/// [`classify_large`]): parsing takes about 0.1 s per MB, and every other session on the
/// loop would wait that long.
pub const LARGE_SQL: usize = 1 << 20;

/// Whether `frame` is a Query or Parse whose classification should run aside.
pub fn is_large_sql(frame: &Frame) -> bool {
    frame.body.len() >= LARGE_SQL && matches!(frame.tag, tag::QUERY | tag::PARSE)
}

/// The classification of a Query's or Parse's text, as [`decode_with`] takes it; `None`
/// for a malformed message (decoding reports that). Runs on the blocking pool.
pub fn classify_large(
    t: u8,
    body: &bytes::Bytes,
    classify: &ClassifyCache,
) -> Option<Arc<Classification>> {
    match t {
        tag::QUERY => query_sql(body).ok().map(|sql| classify.get(&sql)),
        tag::PARSE => ParseMsg::decode(body).ok().map(|p| classify.get(&p.sql)),
        _ => None,
    }
}

/// Decode one client message; `classified`: the text's classification when it was made
/// already (from [`classify_large`] on this frame).
/// A Sync or Flush with a body, which PostgreSQL refuses (08P01) as it refuses a malformed
/// extended-protocol message: the failure that goes before it (a Sync still ends the batch,
/// with its ReadyForQuery, as the server's does after the error).
pub fn trailing_body_failure(frame: &Frame) -> Option<Item> {
    let what = match frame.tag {
        tag::SYNC => "Sync",
        tag::FLUSH => "Flush",
        _ => return None,
    };
    (!frame.body.is_empty()).then_some(Item::Fail(MalformedMessage(what)))
}

pub fn decode(
    frame: Frame,
    classify: &ClassifyCache,
    session: &Statements,
    local: &mut Statements,
    classified: Option<Arc<Classification>>,
) -> Result<Item> {
    Ok(match frame.tag {
        // A Query whose text is not one NUL-terminated string goes to the server as it is:
        // PostgreSQL answers it with ERROR 08P01 and ReadyForQuery (or skips it after an
        // error, waiting for the Sync), and fails the open block, not the session.
        tag::QUERY => match query_sql(&frame.body) {
            Ok(sql) => {
                let class = classified.unwrap_or_else(|| classify.get(&sql));
                Item::Query { frame, class }
            }
            Err(_) => Item::Forwarded(frame),
        },
        tag::FUNCTION_CALL => Item::Forwarded(frame),
        _ => decode_extended(frame, classify, session, local, classified)?,
    })
}

/// [`decode`] for the extended-protocol messages, whose malformed forms are an ERROR (the
/// server's own `pq_getmsg*` checks raise one), not a reason to end the session.
fn decode_extended(
    frame: Frame,
    classify: &ClassifyCache,
    session: &Statements,
    local: &mut Statements,
    classified: Option<Arc<Classification>>,
) -> Result<Item> {
    let lookup = |name: &str, local: &Statements| {
        local
            .get(name)
            .or_else(|| {
                (!local.is_closed(name))
                    .then(|| session.get(name))
                    .flatten()
            })
            .cloned()
    };
    // A Parse of a name the session already has replaces the statement, where PostgreSQL
    // answers 42P05: the session's names can outlive the server's view of them (a name
    // registered by a replica attempt that was then abandoned, a DEALLOCATE the server
    // refused because it knows the statement under pgsplit's name, a client that looks in
    // pg_prepared_statements and finds only pgsplit's names), and a strict check would
    // then fail that statement for the rest of the session.
    Ok(match frame.tag {
        tag::PARSE => match ParseMsg::decode(&frame.body) {
            Ok(parse) => {
                let class = classified.unwrap_or_else(|| classify.get(&parse.sql));
                let stmt = Arc::new(Statement::new(parse, class, session.context()));
                local.insert(stmt.parse.name.clone(), stmt.clone());
                Item::Parse(stmt)
            }
            Err(e) => Item::Fail(e),
        },
        tag::BIND => match BindNames::decode(&frame.body) {
            Ok(names) => {
                let stmt = lookup(names.statement, local);
                Item::Bind { frame, stmt }
            }
            Err(e) => Item::Fail(e),
        },
        tag::DESCRIBE => match decode_target(&frame.body, "Describe") {
            Ok(Target::Statement(name)) => {
                let stmt = lookup(name, local);
                Item::DescribeStatement { frame, stmt }
            }
            Ok(Target::Portal(_)) => Item::Portal(frame),
            Err(e) => Item::Fail(e),
        },
        tag::CLOSE => match decode_target(&frame.body, "Close") {
            Ok(Target::Statement(name)) => {
                let name = name.to_owned();
                let known = local.get(&name).is_some() | session.contains_key(&name);
                local.mark_closed(&name);
                Item::CloseStatement { frame, name, known }
            }
            Ok(Target::Portal(_)) => Item::Portal(frame),
            Err(e) => Item::Fail(e),
        },
        tag::EXECUTE => match validate_execute(&frame.body) {
            Ok(()) => Item::Portal(frame),
            Err(e) => Item::Fail(e),
        },
        tag::SYNC => Item::Sync,
        tag::FLUSH => Item::Flush,
        other => {
            return Err(crate::error::Error::Protocol(format!(
                "invalid frontend message type {}",
                other
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;

    /// Decodes `messages` (`Q sql`, `P name sql`, `B portal statement`, `E portal`,
    /// `D portal` (Describe), `C statement` (Close), `X name` (a Describe of kind X), `S`)
    /// as the session would.
    fn items(messages: &[&str]) -> Vec<Item> {
        let classify = ClassifyCache::new(64, vec![]);
        let session = Statements::default();
        let mut local = Statements::default();
        messages
            .iter()
            .map(|m| {
                let mut parts = m.splitn(3, ' ');
                let kind = parts.next().unwrap_or_default();
                let mut body = BytesMut::new();
                let mut cstr = |s: &str| {
                    body.put_slice(s.as_bytes());
                    body.put_u8(0);
                };
                let tag = match kind {
                    "Q" => {
                        cstr(&m[2..]);
                        tag::QUERY
                    }
                    "P" => {
                        cstr(parts.next().unwrap_or_default());
                        cstr(parts.next().unwrap_or_default());
                        body.put_i16(0);
                        tag::PARSE
                    }
                    "B" => {
                        cstr(parts.next().unwrap_or_default());
                        cstr(parts.next().unwrap_or_default());
                        body.put_i16(0);
                        body.put_i16(0);
                        body.put_i16(0);
                        tag::BIND
                    }
                    "E" => {
                        cstr(parts.next().unwrap_or_default());
                        body.put_i32(0);
                        tag::EXECUTE
                    }
                    "D" => {
                        cstr(&format!("P{}", parts.next().unwrap_or_default()));
                        tag::DESCRIBE
                    }
                    "C" => {
                        cstr(&format!("S{}", parts.next().unwrap_or_default()));
                        tag::CLOSE
                    }
                    // A Describe of neither a statement nor a portal.
                    "X" => {
                        cstr(&format!("X{}", parts.next().unwrap_or_default()));
                        tag::DESCRIBE
                    }
                    _ => tag::SYNC,
                };
                let frame = Frame {
                    tag,
                    body: body.freeze(),
                };
                decode(frame, &classify, &session, &mut local, None).expect("valid message")
            })
            .collect()
    }

    fn failure(item: &Item) -> Option<MalformedMessage> {
        match item {
            Item::Fail(e) => Some(e.clone()),
            _ => None,
        }
    }

    #[test]
    fn parsing_a_name_again_replaces_the_statement() {
        let decoded = items(&["P a SELECT 1", "P a SELECT 2", "B  a", "S"]);
        assert!(decoded.iter().all(|i| failure(i).is_none()));
        let Item::Bind { stmt: Some(s), .. } = &decoded[2] else {
            panic!("{decoded:?}");
        };
        assert_eq!(s.parse.sql, "SELECT 2");
    }

    #[test]
    fn a_malformed_extended_message_is_an_error_not_the_end_of_the_session() {
        let decoded = items(&["X a", "S"]);
        assert_eq!(failure(&decoded[0]), Some(MalformedMessage("Describe")));
        let classify = ClassifyCache::new(64, vec![]);
        let mut local = Statements::default();
        let truncated_bind = Frame {
            tag: tag::BIND,
            body: bytes::Bytes::from_static(b"\0"),
        };
        let item = decode(
            truncated_bind,
            &classify,
            &Statements::default(),
            &mut local,
            None,
        );
        assert_eq!(failure(&item.unwrap()), Some(MalformedMessage("Bind")));
        for body in [&b"SELECT 1\0x"[..], b"SELECT 1"] {
            let malformed_query = Frame {
                tag: tag::QUERY,
                body: bytes::Bytes::from_static(body),
            };
            // Forwarded as it is: the server refuses it (or skips it) as PostgreSQL does.
            let item = decode(
                malformed_query,
                &classify,
                &Statements::default(),
                &mut local,
                None,
            );
            assert!(matches!(item, Ok(Item::Forwarded(_))), "{item:?}");
        }
    }

    /// What the session answers itself in a transaction block that failed before reaching
    /// a server, in PostgreSQL's words: tags of the reply, and whether the block ended.
    fn failed_block_reply(messages: &[&str]) -> Option<(String, bool)> {
        let (reply, ended) = answer_in_failed_block(&items(messages))?;
        Some((reply.iter().map(|f| f.tag as char).collect(), ended))
    }

    #[test]
    fn a_failed_block_refuses_all_but_its_end_as_postgresql_does() {
        let refused = |tags: &str| Some((tags.to_owned(), false));
        assert_eq!(failed_block_reply(&["Q SELECT 1"]), refused("EZ"));
        assert_eq!(
            failed_block_reply(&["P  SELECT 1", "B  ", "E ", "S"]),
            refused("EZ")
        );
        // Behind the refused Parse the server would skip the Query, and answer only a Sync.
        assert_eq!(
            failed_block_reply(&["P  SELECT 1", "B  ", "E ", "Q SELECT 2"]),
            refused("E")
        );
        assert_eq!(failed_block_reply(&["S"]), refused("Z"));
        assert_eq!(
            failed_block_reply(&["Q ROLLBACK"]),
            Some(("CZ".to_owned(), true))
        );
        // Sent through the extended protocol, parsed in the same request (pgjdbc, Npgsql).
        for statement in ["", "s_rollback"] {
            assert_eq!(
                failed_block_reply(&[
                    &format!("P {statement} ROLLBACK"),
                    &format!("B  {statement}"),
                    "E ",
                    "S"
                ]),
                Some(("12CZ".to_owned(), true))
            );
        }
        // A Parse of another statement than the one bound ends nothing.
        assert_eq!(
            failed_block_reply(&["P a ROLLBACK", "B  b", "E ", "S"]),
            refused("EZ")
        );
        // A malformed Query is refused for its form, which comes before the block's state.
        let malformed = Item::Forwarded(Frame {
            tag: tag::QUERY,
            body: bytes::Bytes::from_static(b"SELECT 1"),
        });
        let (reply, ended) = answer_in_failed_block(&[malformed]).expect("answered");
        assert!(!ended);
        assert_eq!(
            reply.iter().map(|f| f.tag as char).collect::<String>(),
            "EZ"
        );
        let code = crate::protocol::ErrorFields::parse(&reply[0].body).code;
        assert_eq!(code, "08P01");
    }

    #[test]
    fn a_lone_commit_or_rollback_ends_any_transaction() {
        for sql in ["COMMIT", "END", "ROLLBACK"] {
            assert!(ends_outside_transaction(
                &items(&[&format!("Q {sql}")]),
                true
            ));
            let extended = [&format!("P  {sql}"), "B  ", "E ", "S"].map(|s| s.to_owned());
            let extended: Vec<&str> = extended.iter().map(String::as_str).collect();
            assert!(ends_outside_transaction(&items(&extended), true), "{sql}");
        }
        assert!(!ends_outside_transaction(
            &items(&["Q COMMIT AND CHAIN"]),
            true
        ));
        assert!(!ends_outside_transaction(
            &items(&["Q ROLLBACK TO SAVEPOINT a"]),
            true
        ));
    }

    #[test]
    fn statements_outside_a_transaction_end_outside_one() {
        assert!(ends_outside_transaction(
            &items(&["Q INSERT INTO t VALUES (1)"]),
            false
        ));
        assert!(ends_outside_transaction(
            &items(&["P  UPDATE t SET a = 1", "B  ", "E ", "S"]),
            false
        ));
        // The same inside a transaction leaves it open.
        assert!(!ends_outside_transaction(
            &items(&["Q INSERT INTO t VALUES (1)"]),
            true
        ));
        for opens in [
            "Q BEGIN",
            "Q INSERT INTO t VALUES (1); BEGIN",
            "Q COPY t FROM STDIN",
        ] {
            assert!(
                !ends_outside_transaction(&items(&[opens]), false),
                "{opens}"
            );
        }
        assert!(!ends_outside_transaction(
            &items(&["Q not sql at all"]),
            false
        ));
    }

    #[test]
    fn only_complete_requests_and_known_portals_count() {
        // No Sync yet: more may follow.
        assert!(!ends_outside_transaction(
            &items(&["P  COMMIT", "B  ", "E "]),
            true
        ));
        // A BEGIN bound to a named portal and executed: the unnamed portal's statement is
        // not what ran.
        assert!(!ends_outside_transaction(
            &items(&[
                "P a BEGIN",
                "B p a",
                "P  INSERT INTO t VALUES (1)",
                "B  ",
                "E p",
                "E ",
                "S"
            ]),
            false
        ));
        // Executing a portal bound in an earlier request.
        assert!(!ends_outside_transaction(&items(&["E ", "S"]), false));
        // Parsing only: nothing runs.
        assert!(!ends_outside_transaction(&items(&["P  COMMIT", "S"]), true));
    }

    /// The reply's tags and final status, and the read-only BEGIN kept for later.
    fn reply_tags(reply: Option<(Vec<Frame>, Option<Box<str>>)>) -> Option<String> {
        reply.map(|(frames, read_only)| {
            let status = frames.last().map_or(0, |f| f.body[0]);
            let tags: String = frames.iter().map(|f| f.tag as char).collect();
            match read_only {
                None => format!("{tags} {}", status as char),
                Some(sql) => format!("{tags} {} {sql}", status as char),
            }
        })
    }

    #[test]
    fn a_read_only_begin_is_answered_and_kept_for_the_first_statement() {
        for (sql, kept) in [
            ("BEGIN READ ONLY", "BEGIN READ ONLY"),
            (
                "start transaction read only;",
                "start transaction read only",
            ),
            (
                "BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ",
                "BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ",
            ),
            (
                "begin transaction isolation level read committed, read only",
                "begin transaction isolation level read committed, read only",
            ),
        ] {
            let reply = deferrable_begin(&items(&[&format!("Q {sql}")]));
            assert_eq!(
                reply_tags(reply).as_deref(),
                Some(format!("CZ T {kept}").as_str()),
                "{sql}"
            );
        }
    }

    #[test]
    fn a_plain_begin_is_answered_by_the_proxy() {
        for sql in [
            "BEGIN",
            "begin;",
            "BEGIN WORK",
            "Begin Transaction",
            "START TRANSACTION",
        ] {
            let reply = deferrable_begin(&items(&[&format!("Q {sql}")]));
            assert_eq!(reply_tags(reply).as_deref(), Some("CZ T"), "{sql}");
        }
        // Each spelling with PostgreSQL's tag.
        for (sql, tag) in [
            ("begin work", "BEGIN"),
            (" start transaction;", "START TRANSACTION"),
            ("START TRANSACTION READ ONLY", "START TRANSACTION"),
            ("BEGIN READ ONLY", "BEGIN"),
        ] {
            let (frames, _) = deferrable_begin(&items(&[&format!("Q {sql}")])).unwrap();
            let complete = frames.iter().find(|f| f.tag == b'C').unwrap();
            assert_eq!(&complete.body[..], format!("{tag}\0").as_bytes(), "{sql}");
        }
        // Prepared earlier, bound and executed now (pgbench -M prepared, JDBC, ...).
        let prepared = items(&["P b BEGIN;", "B  b", "D ", "E ", "S"]);
        assert_eq!(
            reply_tags(deferrable_begin(&prepared[1..])).as_deref(),
            Some("2nCZ T")
        );
        let without_describe = [
            prepared[1].clone(),
            prepared[3].clone(),
            prepared[4].clone(),
        ];
        assert_eq!(
            reply_tags(deferrable_begin(&without_describe)).as_deref(),
            Some("2CZ T")
        );
    }

    #[test]
    fn begins_with_options_or_company_go_to_the_server() {
        for sql in [
            "BEGIN ISOLATION LEVEL SERIALIZABLE",
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
            "BEGIN READ ONLY DEFERRABLE",
            // sqlparser reads these; PostgreSQL refuses them.
            "BEGIN READ ONLY ISOLATION LEVEL SNAPSHOT",
            "BEGIN TRAN READ ONLY",
            "BEGIN READ ONLY,",
            "BEGIN READ ONLY,, NOT DEFERRABLE",
            "/* c */ BEGIN READ ONLY",
            "START TRANSACTION READ WRITE",
            "BEGIN; SELECT 1",
            "/* c */ BEGIN",
            "COMMIT",
        ] {
            assert!(
                deferrable_begin(&items(&[&format!("Q {sql}")])).is_none(),
                "{sql}"
            );
        }
        // Parsed in the same request: the server must see the Parse.
        assert!(deferrable_begin(&items(&["P b BEGIN", "B  b", "E ", "S"])).is_none());
        // A named portal, or no Sync yet.
        let prepared = items(&["P b BEGIN", "B p b", "E p", "S", "B  b", "E "]);
        assert!(deferrable_begin(&prepared[1..4]).is_none());
        assert!(deferrable_begin(&prepared[4..]).is_none());
        // A statement the session does not know.
        assert!(deferrable_begin(&items(&["B  nothing", "E ", "S"])).is_none());
    }
}
