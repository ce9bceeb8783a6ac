//! Sending a decoded request to one server connection and relaying the answer.
//!
//! Backend frames are not decoded: the relay reads each header, and whole frames only for
//! the few types it acts on (ReadyForQuery, ErrorResponse, CommandComplete, ParseComplete,
//! CopyInResponse ...). DataRows stream through in pieces as they arrive, and the next read
//! from the server waits until the client took the previous bytes (backpressure); only
//! while a long request is still being written does up to [`DRAIN_LIMIT`] more come in.
//!
//! Each message sent has an [`Expect`] entry. Responses arrive in order, so the queue tells
//! which message a response answers: that is how the relay drops the answer to a Parse it
//! injected, inserts answers for messages it served itself, and knows after an error which
//! messages the server skipped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Buf;
use tracing::{debug, warn};

use super::Session;
use super::request::{self, Item};
use super::state::{Statement, Statements};
use crate::backend::{BackendError, BackendId, PreparedNames, ServerConn};
use crate::error::{Error, Result};
use crate::protocol::{
    self, BindNames, ErrorFields, Frame, Severity, TxStatus, decode_command_tag, needs_whole_frame,
    rewrite_bind_into, tag,
};
use crate::router::{Classification, PinKinds, SessionOp, affects_parsing};

/// How much of the server's answer is taken in while a request is still being written to
/// it, before that answer is passed on to the client and the writing goes on.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Messages of an open batch sent on whose answers are still due: past this, more of the
/// client's are taken only as the server answers. Each costs the proxy a few dozen bytes,
/// and a client that streams small messages without a Sync could otherwise keep the
/// socket buffers' worth (millions) outstanding. On reaching it the proxy sends the server
/// a Flush of its own (which has no answer): a server holds up to 8 KiB of answers until a
/// Sync or Flush, and answers the proxy makes itself (a Close of a statement the server
/// never had) wait behind them, so without one the server would wait for the client's
/// Sync while the proxy waits for the server.
const MAX_OUTSTANDING: usize = 16 * 1024;

/// Why a replica refused what the primary can serve.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Refusal {
    /// A write the classifier missed: the statement is learned as one.
    Write,
    /// A read of what only the primary has (an unlogged table, the WAL position behind a
    /// view or function): the statement is learned as a primary read.
    PrimaryRead,
    /// Not the statement but the session: serializable by default (a role's or database's
    /// setting pgsplit never sees being set), which no standby runs.
    Session,
}

/// A replica's error that the primary would not give. Apart from 25006 the messages are
/// matched in English only; in another language the error reaches the client.
pub(super) fn replica_cannot_serve(e: &ErrorFields) -> Option<Refusal> {
    let says = |m: &str| e.message.starts_with(m);
    match e.code.as_str() {
        "25006" => Some(Refusal::Write),
        // A function that assigns a transaction id or writes WAL itself, called from a
        // user function (pg_logical_emit_message in an outbox helper).
        "XX000"
            if says("cannot assign TransactionIds during recovery")
                || says("cannot make new WAL entries during recovery") =>
        {
            Some(Refusal::Write)
        }
        "0A000" if says("cannot access temporary or unlogged relations during recovery") => {
            Some(Refusal::PrimaryRead)
        }
        "55000" if says("recovery is in progress") => Some(Refusal::PrimaryRead),
        // The default's, not a transaction's own SET TRANSACTION: its DETAIL names it.
        "0A000"
            if says("cannot use serializable mode in a hot standby")
                && e.detail.contains("default_transaction_isolation") =>
        {
            Some(Refusal::Session)
        }
        _ => None,
    }
}

/// How a request ended.
pub enum Outcome {
    Done,
    /// Nothing reached the client and the request may run again: on another replica after
    /// a connection failure, on the primary after a replica refused it as a write.
    Retry {
        on_replica: bool,
    },
}

/// What the response to one message sent to the server means for the relay.
enum Expect {
    Parse {
        /// False for a Parse the proxy injected: its ParseComplete is not the client's.
        forward: bool,
        /// Server-side name added to the connection's prepared set when sent; removed again
        /// if the Parse fails or is skipped.
        server_name: Option<String>,
        unnamed: bool,
        /// Client name → statement, recorded in the session once the server accepted it.
        register: Option<(String, Arc<Statement>)>,
    },
    /// A response the proxy produces itself, in its place in the stream.
    Synth {
        frame: Frame,
        register: Option<(String, Arc<Statement>)>,
        unregister: Option<String>,
    },
    /// The shared server statement it binds, if named: a 0A000 answer outdates it.
    Bind(Option<super::state::SharedStatement>),
    /// A Close the proxy sent to stay within the connection's prepared-statement limit; if
    /// the server skips it (after an error), the statement is still there.
    CloseEvicted(String),
    /// A Close of the unnamed statement, sent before a Bind or Describe of an unnamed
    /// statement this session does not have: on a pooled connection the slot may hold
    /// another session's statement, which must not run. The server then answers 26000, as
    /// a direct connection would.
    CloseUnnamed,
    /// As for Bind.
    DescribeStatement(Option<super::state::SharedStatement>),
    /// The Describe of an invalid kind standing for an [`Item::Fail`]: the server's error
    /// is replaced by the client's own.
    Fail(protocol::MalformedMessage),
    DescribePortal,
    Execute {
        /// How many DEALLOCATE ALL / DISCARD ALL it runs (see `InFlight::set_aside`).
        drops_all: u32,
    },
    Close,
    Sync,
    /// A Sync the proxy added to close a describe-only request: its ReadyForQuery is not
    /// the client's.
    HiddenSync,
    /// A simple Query or a forwarded message: everything up to ReadyForQuery. A Query the
    /// server runs drops its unnamed statement (`drops_unnamed`); a FunctionCall, or a
    /// Query the server refuses as malformed, does not.
    Query {
        drops_unnamed: bool,
        /// How many DEALLOCATE ALL / DISCARD ALL it runs (see `InFlight::set_aside`).
        drops_all: u32,
    },
    /// The proxy's own commit-facts query behind the client's request: everything up to its
    /// ReadyForQuery is read, none of it forwarded (but notifications).
    CommitFacts,
    /// The client's deferred BEGIN, sent ahead of its request as Parse, Bind and Execute
    /// without a Sync: if it failed, the server would skip the client's messages up to the
    /// next Sync instead of running them outside a transaction block. Its ParseComplete,
    /// BindComplete and CommandComplete are not the client's.
    HiddenBegin,
}

/// A portal's name and the classification of the statement bound to it.
type BoundPortal = (String, Arc<Classification>);

/// The state of the request in flight. Owns the server connection meanwhile.
struct InFlight {
    id: BackendId,
    conn: Box<ServerConn>,
    expects: VecDeque<Expect>,
    /// Statements parsed in this batch (for messages of an open batch still to come).
    local: Statements,
    /// The batch has no Sync yet: further client messages join it.
    open: bool,
    copy_in: bool,
    /// COPY FROM STDIN started by an Execute: the server ignored any Sync sent during the
    /// copy, so the Sync that follows CopyDone/CopyFail must reach it too.
    copy_by_execute: bool,
    need_sync: bool,
    /// A Flush went to the server for COPY messages waiting on its answers (see
    /// [`Session::copy_must_wait`]), and they have waited since.
    flushed_for_copy: bool,
    /// The server reported an error: what the request set up does not hold.
    failed: bool,
    /// The error was an extended-protocol message's: the server discards what follows up to
    /// the next Sync (a simple Query's error ends with its own ReadyForQuery instead).
    skipping: bool,
    /// The session's unnamed statement, set aside when a simple Query joined after an
    /// extended COPY, until the server runs that Query (or skips it: then it comes back).
    set_aside_unnamed: Option<Arc<Statement>>,
    rolled_back: bool,
    /// Bytes of a large frame still to stream through untouched.
    passthrough: usize,
    /// Output is withheld from the client because the request may still be retried.
    holding: bool,
    /// While holding a replica's answer: it sent something (or the request began) since
    /// the session's hold timer last fired. A firing that finds it unset means at least a
    /// whole health interval of silence (the firing before cleared it); a flag costs no
    /// clock read per answer, a timestamp did.
    heard_since_tick: bool,
    /// Part of the request (in `wbuf`, or a TLS record not flushed yet) has not reached the
    /// server: the server's answers meanwhile went on first (see `send_request`).
    unsent: bool,
    /// Answers were taken in while sending: the read buffer may have grown.
    drained: bool,
    /// A Flush went to the server when [`MAX_OUTSTANDING`] answers were due (see there),
    /// and none since fewer were.
    flushed_at_limit: bool,
    /// A replica refused what the primary can serve (`replica_cannot_serve`): drain to
    /// ReadyForQuery, then retry on the primary.
    retry: bool,
    /// ... for this reason.
    refusal: Option<Refusal>,
    /// The last ReadyForQuery said the server is outside a transaction block.
    server_idle: bool,
    /// The server said FATAL and is closing the connection; kept from the client, which
    /// keeps its session (the error is reported as an ERROR when the connection ends).
    /// Boxed, with `facts_error`: rare, and this struct lives in every request's future.
    fatal: Option<Box<ErrorFields>>,
    ops: Vec<SessionOp>,
    /// Settings set by set_config() in this request, to read back once it succeeded.
    read_back: Vec<String>,
    /// Portals bound to statements that change session state (SET, RESET, DISCARD,
    /// set_config, a SET LOCAL of a parse setting) and not executed yet: a Bind alone
    /// changes nothing on the server, so their operations count when an Execute runs them.
    unexecuted: Vec<BoundPortal>,
    /// For each DEALLOCATE ALL or DISCARD ALL sent, in order: the connection's statements
    /// as they were then, set aside until its CommandComplete says the server dropped them
    /// (what the batch parses after it is prepared anew). One the server skipped or did
    /// not run (an error before it, DISCARD ALL in a transaction block) gives them back.
    set_aside: VecDeque<PreparedNames>,
    /// Of the set-asides of the simple Query being answered, how many its CommandCompletes
    /// took (the rest go back at its ReadyForQuery: an error stopped it before them).
    query_drops_done: u32,
    /// A Sync must go to the server: the deferred BEGIN failed and the client's simple
    /// Query behind it was skipped, so only a Sync brings the ReadyForQuery it waits for.
    sync_due: bool,
    /// The answer to [`Expect::CommitFacts`] so far.
    facts_row: Option<Vec<Option<String>>>,
    facts_error: Option<Box<ErrorFields>>,
}

/// A retryable read's answer is held back until it is complete, so that a replica dying
/// midway (it flushes what it has, a notice, then closes) costs a retry elsewhere and not an
/// error; beyond this much, the output is released and the request no longer retried.
const MAX_HELD: usize = 64 * 1024;

enum Progress {
    NeedMore,
    Done,
}

impl Session {
    pub(super) async fn run_request(
        &mut self,
        id: BackendId,
        items: &[Item],
        local: &Statements,
        open: bool,
        retryable: bool,
    ) -> Result<Outcome> {
        let conn = self.conns[id.0 as usize]
            .take()
            .ok_or_else(|| Error::NoServer("server connection missing".into()))?;
        let mut fl = InFlight {
            id,
            conn,
            expects: VecDeque::with_capacity(items.len()),
            local: if open {
                local.clone()
            } else {
                Statements::default()
            },
            open,
            copy_in: false,
            flushed_for_copy: false,
            copy_by_execute: false,
            need_sync: false,
            failed: false,
            skipping: false,
            set_aside_unnamed: None,
            rolled_back: false,
            passthrough: 0,
            holding: retryable,
            heard_since_tick: true,
            unsent: false,
            drained: false,
            flushed_at_limit: false,
            retry: false,
            refusal: None,
            server_idle: false,
            fatal: None,
            ops: Vec::new(),
            read_back: Vec::new(),
            unexecuted: Vec::new(),
            set_aside: VecDeque::new(),
            query_drops_done: 0,
            facts_row: None,
            facts_error: None,
            sync_due: false,
        };
        self.wbuf.clear();
        if self.deferred_begin {
            self.deferred_begin = false;
            // From here the transaction is on this connection, answered or not.
            self.tx_conn = Some(id);
            let sql = self.deferred_read_only.take();
            encode_hidden_begin(&mut self.wbuf, sql.as_deref().unwrap_or("BEGIN"));
            fl.conn.unnamed = None;
            fl.expects.push_back(Expect::HiddenBegin);
        }
        for item in items {
            self.emit(&mut fl, item);
        }
        self.commit_read = super::backends::CommitRead::NotSent;
        // Not behind a hidden BEGIN: if that failed, the server would skip the query too,
        // up to a Sync that comes after it. Not for a pinned session: it may have changed
        // how the server reads SQL text (standard_conforming_strings) behind our classifier.
        let hidden_begin = matches!(fl.expects.front(), Some(Expect::HiddenBegin));
        if id.is_primary()
            && !hidden_begin
            && !self.pinned
            && !open
            && !retryable
            && self.writes.any
            && request::ends_outside_transaction(items, self.tx != TxStatus::Idle)
            && let Some(sql) = self.commit_facts_query(&self.writes)
        {
            // The request commits a write: what the proxy must learn about the commit is
            // asked in the same write, and answered before the connection goes back.
            protocol::query_frame(&sql).encode_into(&mut self.wbuf);
            fl.conn.unnamed = None;
            fl.expects.push_back(Expect::CommitFacts);
            self.commit_read = super::backends::CommitRead::Sent;
        }
        self.restart_capture();
        self.set_cancel_target(Some((fl.conn.cancel_key.clone(), fl.conn.cancels.clone())));
        let result = self.relay(&mut fl).await;
        self.set_cancel_target(None);
        if let Err(Error::Backend(e)) = &result
            && e.is_connection_failure()
            && matches!(fl.expects.front(), Some(Expect::CommitFacts))
        {
            // The client's part is complete (and maybe already sent): only the proxy's own
            // question went unanswered.
            return Ok(self.lost_after_answer(fl, result));
        }
        if result.is_err() || fl.retry {
            // Output withheld for a retry, or cut short: none of it is the client's.
            self.out.clear();
        }
        match result {
            Ok(()) if fl.retry => {
                self.capture = None;
                match fl.refusal {
                    Some(Refusal::Write) => {
                        warn!(backend = ?fl.id, "replica refused a statement as a write; retrying on the primary");
                        // Whatever it wrote is not attributable to tables, and its answer is
                        // no read to cache.
                        self.writes.note_unknown();
                    }
                    Some(Refusal::PrimaryRead) => {
                        debug!(backend = ?fl.id, "replica cannot serve this read; retrying on the primary");
                    }
                    Some(Refusal::Session) | None => {}
                }
                self.learn_refusal(items, fl.refusal);
                let reusable = fl.server_idle;
                self.conns[id.0 as usize] = Some(fl.conn);
                self.clock = std::time::Instant::now();
                // Only outside a transaction block: the refused statement may have aborted
                // one, which the next user of the connection must not inherit.
                self.release(id, reusable);
                Ok(Outcome::Retry { on_replica: false })
            }
            Ok(()) => {
                if fl.refusal.is_some() && retryable {
                    // Refused after part of the answer went out: the client has the error.
                    // Only a request that was a candidate for a retry (outside a transaction
                    // block, whole): inside a READ ONLY block the primary refuses a write
                    // the same way, and says nothing about the replica.
                    self.learn_refusal(items, fl.refusal);
                }
                if !fl.failed && !fl.read_back.is_empty() {
                    // Boxed, like server_lost: rare paths kept out of every request's future.
                    Box::pin(self.read_back_settings(&mut fl)).await?;
                }
                self.last_failed = fl.failed;
                let InFlight {
                    mut conn,
                    ops,
                    failed,
                    rolled_back,
                    read_back,
                    unexecuted,
                    set_aside,
                    ..
                } = fl;
                for kept in set_aside {
                    // Never run: the server still has them (a Parse of one would be 42P05).
                    conn.prepared.put_back(kept);
                }
                self.conns[id.0 as usize] = Some(conn);
                if !unexecuted.is_empty() && self.tx != TxStatus::Idle {
                    // A portal that changes session state lives on in the transaction, and
                    // a later request may run it unseen: no other session gets this
                    // connection.
                    self.tainted[id.0 as usize] = true;
                }
                self.settle_session_ops(id, ops, failed, rolled_back, !read_back.is_empty());
                Ok(Outcome::Done)
            }
            Err(Error::Backend(e)) if e.is_connection_failure() => {
                Box::pin(self.server_lost(fl, e)).await
            }
            Err(e) => Err(e),
        }
    }

    /// A replica refused `items` (`refusal`): remember their SQL as a write, or as a read
    /// only the primary can serve, so they go to the primary from now on.
    fn learn_refusal(&mut self, items: &[Item], refusal: Option<Refusal>) {
        // A write refused: the statements that call functions, when some do. A read of
        // tables alone batched with them (a pipeline) did not write, and learning it as a
        // write would send it to the primary, and invalidate the cache, from then on.
        let calls_functions = |i: &Item| i.class().is_some_and(|c| c.calls_user_functions);
        let suspects = refusal == Some(Refusal::Write) && items.iter().any(calls_functions);
        // A read a standby cannot serve reads a relation (an unlogged table, a view over
        // the WAL position) or calls a function: a `SELECT 1` batched with it did not.
        let reads_something = |i: &Item| {
            i.class()
                .is_some_and(|c| !c.tables_read.is_empty() || c.volatile || c.calls_user_functions)
        };
        for item in items {
            if suspects && !calls_functions(item) {
                continue;
            }
            if refusal == Some(Refusal::PrimaryRead) && !reads_something(item) {
                continue;
            }
            let Some(sql) = statement_sql(item) else {
                continue;
            };
            let classify = &self.runtime.classify;
            match refusal {
                Some(Refusal::Write) => classify.learn_write(&sql),
                Some(Refusal::PrimaryRead) => classify.learn_primary_read(&sql),
                Some(Refusal::Session) | None => continue,
            }
            // The session's own statements of that SQL follow at once.
            self.statements.reclassify(&sql, &classify.get(&sql));
        }
    }

    /// The connection failed after the request's own answer was complete, while the answer
    /// to the proxy's commit-facts query was due: the request is done, the facts unknown.
    fn lost_after_answer(&mut self, fl: InFlight, result: Result<()>) -> Outcome {
        if let Err(Error::Backend(e)) = result {
            if let Some(b) = self.runtime.backends.get(fl.id) {
                warn!(backend = %b.name(), error = ?e.to_string(), "server connection lost after a commit");
                b.mark_down();
            }
            self.commit_read = super::backends::CommitRead::Answer(Box::new(Err(e)));
        }
        self.connection_lost(fl.id);
        self.discard_idle(fl.id);
        self.last_failed = fl.failed;
        let unread = !fl.read_back.is_empty();
        self.settle_session_ops(fl.id, fl.ops, fl.failed, fl.rolled_back, unread);
        Outcome::Done
    }

    /// `set_config(name, …, false)` ran: record each setting's value now in force as a
    /// replayable session setting.
    async fn read_back_settings(&mut self, fl: &mut InFlight) -> Result<()> {
        let max = self.runtime.config.proxy.max_message_bytes;
        // Bounded, as the settings replay: a server that stopped answering must not hold
        // the session and its pool slot.
        let limit = self.runtime.config.pool.connect_timeout();
        for name in std::mem::take(&mut fl.read_back) {
            let mut notifications = Vec::new();
            let read = fl.conn.read_setting(&name, max, &mut notifications);
            let value = tokio::time::timeout(limit, read)
                .await
                .unwrap_or(Err(BackendError::Timeout))
                .map_err(Error::Backend)?;
            for n in notifications {
                n.encode_into(&mut self.out);
            }
            let Some(v) = value else { continue };
            let sql = super::state::set_sql(&name, &v);
            fl.ops.push(SessionOp::Set { name, sql });
        }
        Ok(())
    }

    /// The server connection failed mid-request (it is dropped with `fl`).
    async fn server_lost(&mut self, fl: InFlight, e: BackendError) -> Result<Outcome> {
        self.connection_lost(fl.id);
        if let Some(b) = self.runtime.backends.get(fl.id) {
            warn!(backend = %b.name(), error = ?e.to_string(), "server connection lost during a request");
            b.mark_down();
        }
        self.discard_idle(fl.id);
        if fl.holding {
            return Ok(Outcome::Retry { on_replica: true });
        }
        // The server's own last word (e.g. 57P01 terminating connection), if it said one.
        let e = match fl.fatal {
            Some(fields) => BackendError::Server(*fields),
            None => e,
        };
        // A message to the client cut short: it would read anything more as part of it.
        let cut = fl.passthrough > 0;
        let ends_session = cut
            || (self.tx != TxStatus::Idle && self.tx_conn == Some(fl.id))
            || (fl.id.is_primary() && self.pinned);
        if ends_session {
            if fl.id.is_primary() && self.writes.any {
                // The request may have committed before the connection went (a COMMIT, or
                // a pinned session's write): in doubt, the cache must not keep what it
                // may have outdated.
                Box::pin(self.invalidate_unknown_commit()).await;
            }
            self.tx = TxStatus::Idle;
            self.tx_conn = None;
            return Err(if cut {
                Error::ServerLostMidMessage(e)
            } else {
                Error::Backend(e)
            });
        }
        let mut frames = vec![match &e {
            BackendError::Server(f) => {
                protocol::error_response(Severity::Error, &f.code, &f.message)
            }
            other => protocol::error_response(
                Severity::Error,
                "08006",
                &format!("server connection lost while running the request: {other}"),
            ),
        }];
        if fl
            .expects
            .iter()
            .any(|x| matches!(x, Expect::Sync | Expect::Query { .. }))
        {
            frames.push(protocol::ready_for_query(self.tx));
        } else if fl.open {
            self.skip_until_sync = true;
        }
        self.client.send(&frames).await?;
        Ok(Outcome::Done)
    }

    /// Encode one item for the server, with the expectation of its response.
    fn emit(&mut self, fl: &mut InFlight, item: &Item) {
        tracing::trace!(?item, "to server");
        if fl.skipping && !matches!(item, Item::Sync) {
            // The server discards messages after an error until the Sync: so do we.
            return;
        }
        let out = &mut self.wbuf;
        match item {
            Item::Query { frame, class } => {
                frame.encode_into(out);
                fl.conn.unnamed = None;
                let drops_all = take_session_ops(fl, class);
                fl.expects.push_back(Expect::Query {
                    drops_unnamed: true,
                    drops_all,
                });
            }
            Item::Forwarded(frame) => {
                frame.encode_into(out);
                fl.expects.push_back(Expect::Query {
                    drops_unnamed: false,
                    drops_all: 0,
                });
            }
            Item::Parse(stmt) => {
                let name = stmt.parse.name.clone();
                if !name.is_empty() && fl.conn.prepared.contains(&stmt.server_name) {
                    fl.expects.push_back(Expect::Synth {
                        frame: protocol::parse_complete(),
                        register: Some((name, stmt.clone())),
                        unregister: None,
                    });
                } else {
                    self.send_parse(fl, stmt, true, Some(name));
                }
            }
            Item::Bind { frame, stmt } => {
                match stmt {
                    Some(s) => {
                        self.ensure_prepared(fl, s);
                        if s.server_name.is_empty() {
                            frame.encode_into(&mut self.wbuf);
                        } else if let Ok(names) = BindNames::decode(&frame.body) {
                            rewrite_bind_into(&frame.body, &names, &s.server_name, &mut self.wbuf);
                        }
                        bind_portal(fl, &frame.body, Some(&s.class));
                    }
                    None => {
                        if BindNames::decode(&frame.body).is_ok_and(|n| n.statement.is_empty()) {
                            close_unnamed(out, fl);
                        }
                        frame.encode_into(out);
                        bind_portal(fl, &frame.body, None);
                    }
                }
                let key = stmt.as_ref().and_then(|s| s.shared_key());
                fl.expects.push_back(Expect::Bind(key));
            }
            Item::DescribeStatement { frame, stmt } => {
                match stmt {
                    Some(s) => {
                        self.ensure_prepared(fl, s);
                        if s.server_name.is_empty() {
                            frame.encode_into(&mut self.wbuf);
                        } else {
                            protocol::encode_statement_target(tag::DESCRIBE, &s.server_name)
                                .encode_into(&mut self.wbuf);
                        }
                    }
                    None => {
                        let target = protocol::decode_target(&frame.body, "Describe");
                        if target == Ok(protocol::Target::Statement("")) {
                            close_unnamed(out, fl);
                        }
                        frame.encode_into(out);
                    }
                }
                let key = stmt.as_ref().and_then(|s| s.shared_key());
                fl.expects.push_back(Expect::DescribeStatement(key));
            }
            Item::CloseStatement { frame, name, known } => {
                if *known || !self.pinned {
                    // The server statement stays: other names (or clients) may share it.
                    fl.expects.push_back(Expect::Synth {
                        frame: protocol::close_complete(),
                        register: None,
                        unregister: Some(name.clone()),
                    });
                } else {
                    // An SQL-level PREPAREd statement of a pinned session.
                    frame.encode_into(out);
                    fl.expects.push_back(Expect::Close);
                }
            }
            Item::Portal(frame) => {
                let ran = (frame.tag == tag::EXECUTE)
                    .then(|| take_unexecuted(fl, &frame.body))
                    .flatten();
                let drops_all = ran.map_or(0, |class| take_session_ops(fl, &class));
                frame.encode_into(out);
                fl.expects.push_back(match frame.tag {
                    tag::EXECUTE => Expect::Execute { drops_all },
                    tag::DESCRIBE => Expect::DescribePortal,
                    _ => Expect::Close,
                });
            }
            Item::Sync => {
                protocol::sync_frame().encode_into(out);
                fl.expects.push_back(Expect::Sync);
            }
            Item::HiddenSync => {
                protocol::sync_frame().encode_into(out);
                fl.expects.push_back(Expect::HiddenSync);
            }
            Item::Flush => {
                Frame {
                    tag: tag::FLUSH,
                    body: bytes::Bytes::new(),
                }
                .encode_into(out);
            }
            Item::Fail(error) => {
                // A Describe of neither a statement nor a portal: refused with an ERROR in
                // any state, never answered with a description.
                out.extend_from_slice(&[tag::DESCRIBE, 0, 0, 0, 6, b'X', 0]);
                fl.expects.push_back(Expect::Fail(error.clone()));
            }
        }
    }

    fn send_parse(
        &mut self,
        fl: &mut InFlight,
        stmt: &Arc<Statement>,
        forward: bool,
        register: Option<String>,
    ) {
        if !stmt.server_name.is_empty() && fl.conn.parse_settings_changed {
            // Parsed under settings its name does not say: no other session may find it.
            self.tainted[fl.id.0 as usize] = true;
        }
        if !stmt.server_name.is_empty()
            && let Some(victim) = fl.conn.prepared.insert(&stmt.server_name)
        {
            protocol::encode_statement_target(tag::CLOSE, &victim).encode_into(&mut self.wbuf);
            fl.expects.push_back(Expect::CloseEvicted(victim));
        }
        stmt.parse
            .encode_named_into(&stmt.server_name, &mut self.wbuf);
        let unnamed = stmt.server_name.is_empty();
        let server_name = if unnamed {
            fl.conn.unnamed = Some(stmt.identity);
            None
        } else {
            Some(stmt.server_name.clone())
        };
        fl.expects.push_back(Expect::Parse {
            forward,
            server_name,
            unnamed,
            register: register.map(|n| (n, stmt.clone())),
        });
    }

    /// Prepare `stmt` on the connection first if it does not have it.
    fn ensure_prepared(&mut self, fl: &mut InFlight, stmt: &Arc<Statement>) {
        let present = if stmt.server_name.is_empty() {
            fl.conn.unnamed == Some(stmt.identity)
        } else {
            fl.conn.prepared.touch(&stmt.server_name)
        };
        if !present {
            self.send_parse(fl, stmt, false, None);
        }
    }

    /// Send what was emitted, then relay until the request is complete.
    async fn relay(&mut self, fl: &mut InFlight) -> Result<()> {
        self.send_request(fl).await?;
        loop {
            let progress = self.process_backend(fl)?;
            if std::mem::take(&mut fl.sync_due) {
                self.wbuf.extend_from_slice(&[tag::SYNC, 0, 0, 0, 4]);
            }
            if let Progress::Done = progress {
                if fl.unsent || !self.wbuf.is_empty() {
                    // COPY data behind an error, which the server skips: it must still get
                    // whole messages, or it would take the next request's first bytes for
                    // their rest.
                    while !fl
                        .conn
                        .send_draining(&mut self.wbuf, usize::MAX)
                        .await
                        .map_err(Error::Backend)?
                    {}
                    fl.unsent = false;
                }
                if fl.drained {
                    fl.conn.trim_read_buffer();
                }
                if fl.retry {
                    return Ok(());
                }
                // Complete without a retry: any held answer is the answer.
                fl.holding = false;
                self.tee_capture();
                if !self.defer_tail() {
                    self.client.write(&self.out).await?;
                    self.out.clear();
                }
                return Ok(());
            }
            // Once only the commit-facts answer is due, the client's answer is complete: it
            // goes now, unless the cache must learn of the commit first.
            let facts_only = matches!(fl.expects.front(), Some(Expect::CommitFacts));
            if facts_only {
                // The client's request is answered: a cancel it sends now is not for the
                // proxy's own query.
                self.set_cancel_target(None);
            }
            let tail_held = facts_only && self.defer_tail();
            if !fl.holding && !self.out.is_empty() && !tail_held {
                self.tee_capture();
                self.client.write(&self.out).await?;
                self.out.clear();
            }
            if fl.unsent || !self.wbuf.is_empty() {
                // The rest of what goes to the server, once what it answered meanwhile has
                // gone on; nothing more is taken from the client before.
                self.send_request(fl).await?;
                continue;
            }
            let at_limit = (fl.open || fl.need_sync) && fl.expects.len() >= MAX_OUTSTANDING;
            if !at_limit {
                fl.flushed_at_limit = false;
            } else if !fl.flushed_at_limit && !fl.copy_in {
                fl.flushed_at_limit = true;
                self.wbuf.extend_from_slice(&[tag::FLUSH, 0, 0, 0, 4]);
                self.send_request(fl).await?;
                continue;
            }
            let copy_wait = self.copy_must_wait(fl);
            if !copy_wait {
                fl.flushed_for_copy = false;
            } else if !fl.flushed_for_copy {
                // The statement's answer (a CopyInResponse, or not) may sit in the server's
                // buffer until a Sync or Flush, which may be behind the COPY data.
                fl.flushed_for_copy = true;
                self.wbuf.extend_from_slice(&[tag::FLUSH, 0, 0, 0, 4]);
                self.send_request(fl).await?;
                continue;
            }
            let accepting = !copy_wait && (fl.copy_in || ((fl.open || fl.need_sync) && !at_limit));
            if accepting && self.client.has_frame() {
                // Messages that arrived with earlier ones (a Flush followed by more, COPY data
                // behind its query) must not wait for the next read.
                self.forward_client_frames(fl).await?;
                continue;
            }
            if accepting {
                tokio::select! {
                    biased;
                    r = fl.conn.fill() => r?,
                    r = self.client.fill() => {
                        r?;
                        self.forward_client_frames(fl).await?;
                    }
                }
            } else if fl.holding && !fl.id.is_primary() {
                // A replica that stops answering (paused, partitioned) must not hold a read
                // that could still run elsewhere: give up on it once it has been quiet for a
                // health interval and its checks get no answer (a replica banned or over
                // the lag limit still runs the read: it may finish). One timer per session serves
                // all its reads (no timer-wheel insert and removal per read); it fires once
                // per interval, and a read that was not heard from between two firings has
                // been quiet for at least an interval.
                let interval = self.runtime.config.health.interval();
                let tick = self
                    .hold_tick
                    .get_or_insert_with(|| HoldTick::new(interval));
                let ticked = tokio::select! {
                    biased;
                    r = fl.conn.fill() => {
                        r?;
                        false
                    }
                    _ = tick.fired() => true,
                };
                if !ticked {
                    fl.heard_since_tick = true;
                    continue;
                }
                tick.restart(interval);
                if std::mem::take(&mut fl.heard_since_tick) {
                    continue;
                }
                if self
                    .runtime
                    .backends
                    .get(fl.id)
                    .is_none_or(|b| b.is_unreachable())
                {
                    return Err(Error::Backend(BackendError::Timeout));
                }
            } else {
                fl.conn.fill().await?;
            }
        }
    }

    /// Client messages that belong to the request in flight: COPY data, or the rest of an
    /// open batch. Anything after them stays buffered for the next request.
    async fn forward_client_frames(&mut self, fl: &mut InFlight) -> Result<()> {
        while fl.copy_in || ((fl.open || fl.need_sync) && fl.expects.len() < MAX_OUTSTANDING) {
            if self.copy_must_wait(fl) {
                break;
            }
            let Some(frame) = self.client.try_session_frame()? else {
                break;
            };
            if fl.copy_in && matches!(frame.tag, tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL) {
                if frame.tag != tag::COPY_DATA {
                    fl.copy_in = false;
                    // Not cleared: an earlier COPY's ignored Sync may still want its own.
                    fl.need_sync |= fl.copy_by_execute && !fl.open;
                }
                frame.encode_into(&mut self.wbuf);
                continue;
            }
            if frame.tag == tag::TERMINATE {
                // Ends the client's session, never the server's: the connection (in an
                // unknown state now) is closed by the proxy, not by a forwarded Terminate
                // that would look like the server failing.
                return Err(Error::ClientGone);
            }
            if !fl.open || matches!(frame.tag, tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL) {
                // Within a COPY, anything else goes to the server, which ignores Sync and
                // Flush there and reports the rest. After an extended-protocol COPY, the
                // next Sync answers the one the server ignored: its Expect is queued.
                // COPY data sent ahead of a CopyInResponse (asyncpg does) goes on in order.
                if frame.tag == tag::SYNC {
                    fl.need_sync = false;
                } else if fl.need_sync
                    && !fl.copy_in
                    && !matches!(frame.tag, tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL)
                {
                    // The COPY is over but the Sync that answers the one the server
                    // ignored in it is still to come: the server runs what comes first as
                    // usual, and its answers come before that Sync's. (It drops COPY
                    // messages now, and they go to it as they are.)
                    let item = self.decode_joining(fl, frame).await?;
                    if let Item::Query { class, .. } = &item
                        && !fl.skipping
                    {
                        // Messages behind the Query are decoded before its answer comes,
                        // and must not find the unnamed statement it drops.
                        let had = self.statements.remove("");
                        if fl.set_aside_unnamed.is_none() {
                            fl.set_aside_unnamed = had;
                        }
                        fl.local.remove("");
                        // Each Query here commits on its own, but the request settles its
                        // session settings as one unit, all or (after any error) none: a
                        // session that changes settings in such a request stays on this
                        // connection, which then holds the truth.
                        if !class.session_ops.is_empty() || !fl.ops.is_empty() {
                            self.pinned = true;
                            self.pin_kinds |= PinKinds::OTHER;
                            self.pinned_in_request = true;
                        }
                    }
                    let first_sync = fl
                        .expects
                        .iter()
                        .rposition(|x| !matches!(x, Expect::Sync))
                        .map_or(0, |i| i + 1);
                    let held: Vec<Expect> = fl.expects.drain(first_sync..).collect();
                    self.emit(fl, &item);
                    fl.expects.extend(held);
                    continue;
                }
                frame.encode_into(&mut self.wbuf);
                continue;
            }
            if let Some(failure) = request::trailing_body_failure(&frame) {
                self.emit(fl, &failure);
            }
            let item = self.decode_joining(fl, frame).await?;
            if ends_batch(&item, fl.skipping) {
                fl.open = false;
            }
            self.emit(fl, &item);
        }
        self.send_request(fl).await
    }

    /// Whether the client's next message is COPY data (or its end) that must wait: no COPY
    /// is running, but a statement sent may be starting one. Forwarded ahead of the
    /// server's CopyInResponse, the relay could not tell the COPY's end from a stray one
    /// the server ignores, nor which messages after it belong to the next request.
    fn copy_must_wait(&self, fl: &InFlight) -> bool {
        !fl.copy_in
            && matches!(
                self.client.buf.first(),
                Some(&(tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL))
            )
            && fl
                .expects
                .iter()
                .any(|e| matches!(e, Expect::Execute { .. } | Expect::Query { .. }))
    }

    /// Send what `wbuf` holds for the server, or as much as goes before the server's
    /// answers meanwhile reach [`DRAIN_LIMIT`]; the rest stays in `wbuf` (`fl.unsent`).
    async fn send_request(&mut self, fl: &mut InFlight) -> Result<()> {
        let before = fl.conn.rbuf.len();
        let sent = fl
            .conn
            .send_draining(&mut self.wbuf, DRAIN_LIMIT)
            .await
            .map_err(Error::Backend)?;
        fl.unsent = !sent;
        if fl.conn.rbuf.len() > before {
            fl.heard_since_tick = true;
            fl.drained = true;
        }
        Ok(())
    }

    /// Decode a client message that joins the request in flight, and note what it may
    /// write or pin.
    async fn decode_joining(&mut self, fl: &mut InFlight, frame: Frame) -> Result<Item> {
        let classified = match request::is_large_sql(&frame) && !fl.skipping {
            true => self.classify_aside(&frame).await,
            false => None,
        };
        let item = request::decode(
            frame,
            &self.runtime.classify,
            &self.statements,
            &mut fl.local,
            classified,
        )?;
        if let Some(c) = item.class() {
            self.pinned |= c.pins_session;
            self.pin_kinds |= c.pins;
            self.pinned_in_request |= c.pins_session;
            self.pinned_for_good |= c.pins_for_good;
            self.state_outlives_reset |= c.outlives_reset;
            if c.pins_session && !fl.id.is_primary() {
                // As at dispatch: session-bound work on a replica (in a READ ONLY block)
                // stays on that connection, which is closed, not pooled, at the block's end.
                self.tainted[fl.id.0 as usize] = true;
            }
            if c.calls_user_functions && fl.id.is_primary() {
                self.writes.note_unknown();
            }
        }
        if self.pinned && item.may_hide_session_state() {
            // As at dispatch.
            self.pin_kinds |= PinKinds::OTHER;
        }
        self.note_writes(&item);
        Ok(item)
    }

    /// Move what the server sent into the client output, acting on the frames that matter.
    fn process_backend(&mut self, fl: &mut InFlight) -> Result<Progress> {
        let max = self.runtime.config.proxy.max_message_bytes;
        loop {
            // The rest of a frame being streamed comes first: an answer the proxy inserts
            // must never land inside it.
            if fl.passthrough > 0 {
                let n = fl.passthrough.min(fl.conn.rbuf.len());
                if !fl.retry {
                    self.out.extend_from_slice(&fl.conn.rbuf[..n]);
                }
                fl.conn.rbuf.advance(n);
                fl.passthrough -= n;
                if fl.passthrough > 0 {
                    return Ok(Progress::NeedMore);
                }
            }
            if !fl.skipping {
                self.emit_synths(fl);
            }
            if fl.expects.is_empty() && !fl.open {
                return Ok(Progress::Done);
            }
            let buf = &fl.conn.rbuf;
            if buf.len() < 5 {
                return Ok(Progress::NeedMore);
            }
            let t = buf[0];
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            if len < 4 {
                return Err(Error::Backend(BackendError::Protocol(
                    "invalid message length from server",
                )));
            }
            let len = len as usize;
            if matches!(fl.expects.front(), Some(Expect::CommitFacts)) {
                if len > max {
                    return Err(Error::Backend(BackendError::Protocol(
                        "oversized message from server",
                    )));
                }
                if buf.len() < len + 1 {
                    return Ok(Progress::NeedMore);
                }
                self.on_commit_facts_frame(fl, t, len);
                fl.conn.rbuf.advance(len + 1);
                continue;
            }
            if needs_whole_frame(t) {
                if len > max {
                    return Err(Error::Backend(BackendError::Protocol(
                        "oversized message from server",
                    )));
                }
                if buf.len() < len + 1 {
                    return Ok(Progress::NeedMore);
                }
            }
            let forward = self.on_backend_frame(fl, t, len);
            tracing::trace!(tag = %(t as char), forward, pending = fl.expects.len(), "server frame");
            // Counted with the whole frame before any of it is taken: a single huge DataRow
            // streams through in pieces, it is never held whole.
            if fl.holding && self.out.len() + len + 1 > MAX_HELD && !fl.retry {
                fl.holding = false;
            }
            if needs_whole_frame(t) {
                if forward && !fl.retry {
                    self.out.extend_from_slice(&fl.conn.rbuf[..len + 1]);
                }
                fl.conn.rbuf.advance(len + 1);
            } else {
                debug_assert!(forward, "only whole frames can be dropped");
                if !fl.retry {
                    self.out.extend_from_slice(&fl.conn.rbuf[..5]);
                }
                fl.conn.rbuf.advance(5);
                fl.passthrough = len - 4;
            }
        }
    }

    /// Responses the proxy answers itself, when their turn comes.
    fn emit_synths(&mut self, fl: &mut InFlight) {
        while let Some(Expect::Synth { .. }) = fl.expects.front() {
            if let Some(Expect::Synth {
                frame,
                register,
                unregister,
            }) = fl.expects.pop_front()
            {
                frame.encode_into(&mut self.out);
                if let Some((name, stmt)) = register {
                    self.statements.insert(name, stmt);
                }
                if let Some(name) = unregister {
                    self.statements.remove(&name);
                }
            }
        }
    }

    /// One whole frame of the answer to the proxy's commit-facts query.
    fn on_commit_facts_frame(&mut self, fl: &mut InFlight, t: u8, len: usize) {
        let frame = &fl.conn.rbuf[..len + 1];
        let body = &frame[5..];
        match t {
            tag::DATA_ROW if fl.facts_row.is_none() => {
                fl.facts_row = Some(protocol::decode_data_row_text(body));
            }
            tag::ERROR_RESPONSE => fl.facts_error = Some(Box::new(ErrorFields::parse(body))),
            // Meant for the client whichever query they came with.
            tag::NOTIFICATION_RESPONSE => self.out.extend_from_slice(frame),
            tag::PARAMETER_STATUS => {
                self.out.extend_from_slice(frame);
                if let Some(kv) = protocol::decode_parameter_status(body) {
                    fl.conn.note_parameter(kv);
                    self.note_backslash_escapes(fl.id, &fl.conn);
                }
            }
            tag::READY_FOR_QUERY => {
                fl.expects.pop_front();
                let answer = match fl.facts_error.take() {
                    Some(e) => Err(BackendError::Server(*e)),
                    None => Ok(fl.facts_row.take().unwrap_or_default()),
                };
                self.commit_read = super::backends::CommitRead::Answer(Box::new(answer));
            }
            _ => {}
        }
    }

    /// Update the request state for one backend frame (whole for inspected types, header
    /// only for the rest). Returns whether the frame goes to the client.
    fn on_backend_frame(&mut self, fl: &mut InFlight, t: u8, len: usize) -> bool {
        let body = || &fl.conn.rbuf[5..len + 1];
        let mut substituted = false;
        let hidden_begin = matches!(fl.expects.front(), Some(Expect::HiddenBegin));
        if hidden_begin {
            match t {
                tag::PARSE_COMPLETE | tag::BIND_COMPLETE => return false,
                tag::COMMAND_COMPLETE => {
                    fl.expects.pop_front();
                    return false;
                }
                _ => {}
            }
        }
        match t {
            tag::ERROR_RESPONSE => {
                let fields = ErrorFields::parse(body());
                if matches!(fields.severity.as_str(), "FATAL" | "PANIC") {
                    debug!(code = %fields.code, "server is closing the connection");
                    fl.fatal = Some(Box::new(fields));
                    return false;
                }
                fl.failed = true;
                if let Some(Expect::Fail(error)) = fl.expects.front()
                    && !fl.retry
                {
                    // The server failed where the client's message does: the client's
                    // error goes out instead of the server's, then everything runs its course.
                    protocol::error_response(Severity::Error, "08P01", &error.to_string())
                        .encode_into(&mut self.out);
                    substituted = true;
                }
                if let Some(refusal) = replica_cannot_serve(&fields)
                    && !fl.id.is_primary()
                {
                    if refusal == Refusal::Session && !self.replicas_refused {
                        // The session's default isolation: it holds for the session's later
                        // reads and READ ONLY blocks too (this one, if it cannot be retried,
                        // fails once), which go to the primary.
                        debug!(backend = ?fl.id, "replicas refuse this session's default isolation; its reads go to the primary");
                        self.replicas_refused = true;
                    }
                    // Learned even when the answer already streams to the client and
                    // cannot be retried: the next run goes to the primary.
                    fl.retry |= fl.holding;
                    fl.refusal = Some(refusal);
                }
                if fields.code == "0A000"
                    && let Some(Expect::Bind(Some(key)) | Expect::DescribeStatement(Some(key))) =
                        fl.expects.front()
                {
                    // "cached plan must not change result type" (in the server's language):
                    // this server statement is outdated. The client's handles keep it, and
                    // its error, as on a direct connection; what it prepares from now on
                    // gets a server statement of its own.
                    super::state::outdate_shared_statement(*key);
                }
                debug!(code = %fields.code, "server reported an error");
                if !matches!(fl.expects.front(), Some(Expect::Query { .. })) {
                    // The failed message and everything up to the Sync are skipped, a simple
                    // Query among them too. What sending them did to the prepared set is
                    // undone newest first: a batch can prepare a statement, evict it and
                    // prepare it again, and only the reverse order gets back to what the
                    // server holds (found by fuzz/fuzz_targets/extended_sequence.rs).
                    fl.skipping = true;
                    let mut skipped = Vec::new();
                    let mut skipped_query = false;
                    while let Some(x) = fl.expects.front() {
                        if matches!(x, Expect::Sync | Expect::HiddenSync) {
                            break;
                        }
                        skipped_query |= matches!(x, Expect::Query { .. });
                        skipped.extend(fl.expects.pop_front());
                    }
                    if let Some(Expect::Parse {
                        forward: true,
                        unnamed: true,
                        ..
                    }) = skipped.first()
                    {
                        // The client's Parse of the unnamed statement failed: the server
                        // dropped the old one first, so a later Bind of "" fails there too.
                        self.statements.remove("");
                        fl.local.remove("");
                        fl.set_aside_unnamed = None;
                    }
                    if skipped_query
                        && let Some(unnamed) = fl.set_aside_unnamed.take()
                        && !self.statements.contains_key("")
                    {
                        // The Query that set it aside was skipped: the server still has it.
                        self.statements.insert(String::new(), unnamed);
                    }
                    if skipped_query && fl.expects.is_empty() {
                        // The request ended with that Query, and no Sync is on its way
                        // (one sent or still to come after a COPY has its Expect queued).
                        if hidden_begin {
                            // The deferred BEGIN failed: a Sync of ours brings the
                            // ReadyForQuery the client waits for, after this error, as the
                            // answer to its request.
                            fl.expects.push_back(Expect::Sync);
                            fl.sync_due = true;
                        } else if fl.retry {
                            // The replica refused a write: a Sync of ours ends its part,
                            // and the whole request runs again on the primary.
                            fl.expects.push_back(Expect::HiddenSync);
                            fl.sync_due = true;
                        } else {
                            // The client's own extended messages came before the Query
                            // without a Sync: the request stays open for the client's Sync,
                            // as the server does, and the error goes out now.
                            fl.open = true;
                            fl.holding = false;
                        }
                    }
                    for x in skipped.into_iter().rev() {
                        match x {
                            Expect::Parse {
                                server_name,
                                unnamed,
                                ..
                            } => undo_parse(&mut fl.conn, server_name, unnamed),
                            // Skipped: the server still has the statement.
                            Expect::CloseEvicted(victim) => fl.conn.prepared.restore(&victim),
                            // Skipped too: the statements it set aside are still there
                            // (newest first, as it was the newest one set aside; a Parse
                            // skipped before it is undone after).
                            Expect::Query { drops_all: n, .. }
                            | Expect::Execute { drops_all: n } => {
                                for _ in 0..n {
                                    if let Some(kept) = fl.set_aside.pop_back() {
                                        fl.conn.prepared.put_back(kept);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                !substituted
            }
            tag::READY_FOR_QUERY => {
                let answered = fl.expects.pop_front();
                if let Some(Expect::Query { drops_all, .. }) = answered {
                    // Its drops an error kept from running: the server still has those.
                    for _ in std::mem::take(&mut fl.query_drops_done)..drops_all {
                        if let Some(kept) = fl.set_aside.pop_front() {
                            fl.conn.prepared.put_back(kept);
                        }
                    }
                }
                if let Some(Expect::Query {
                    drops_unnamed: true,
                    ..
                }) = answered
                {
                    self.statements.remove("");
                    fl.set_aside_unnamed = None;
                }
                let hidden = matches!(answered, Some(Expect::HiddenSync));
                if matches!(answered, Some(Expect::Sync | Expect::HiddenSync)) {
                    fl.skipping = false;
                }
                let status = fl.conn.rbuf.get(5).copied().and_then(TxStatus::from_byte);
                fl.server_idle = status == Some(TxStatus::Idle);
                if let Some(status) = status
                    && !fl.retry
                {
                    self.tx = status;
                    self.tx_conn = (status != TxStatus::Idle).then_some(fl.id);
                }
                !hidden
            }
            tag::PARSE_COMPLETE => match fl.expects.pop_front() {
                Some(Expect::Parse {
                    forward, register, ..
                }) => {
                    if let Some((name, stmt)) = register {
                        self.statements.insert(name, stmt);
                    }
                    forward
                }
                _ => true,
            },
            tag::BIND_COMPLETE | tag::CLOSE_COMPLETE => !matches!(
                fl.expects.pop_front(),
                Some(Expect::CloseEvicted(_) | Expect::CloseUnnamed)
            ),
            tag::ROW_DESCRIPTION | tag::NO_DATA => {
                if matches!(
                    fl.expects.front(),
                    // A Fail is never described; should a server do it all the same, the
                    // request goes on rather than waiting for ever.
                    Some(Expect::DescribeStatement(_) | Expect::DescribePortal | Expect::Fail(_))
                ) {
                    fl.expects.pop_front();
                }
                true
            }
            tag::COMMAND_COMPLETE => {
                match decode_command_tag(body()) {
                    b"ROLLBACK" => fl.rolled_back = true,
                    b"COMMIT" if !fl.retry => self.committed = true,
                    // The server dropped every prepared statement of this connection (a
                    // DEALLOCATE is not undone by a rollback), and the client's names with
                    // them: a later Bind of one fails with 26000, as on a direct connection.
                    // (Statements parsed after it in the same batch register at their own
                    // ParseComplete, which comes later.)
                    b"DEALLOCATE ALL" | b"DISCARD ALL" => {
                        let foreseen = match fl.expects.front() {
                            Some(Expect::Execute { drops_all }) => *drops_all > 0,
                            Some(Expect::Query { drops_all, .. }) => {
                                fl.query_drops_done < *drops_all
                            }
                            _ => false,
                        };
                        if foreseen {
                            fl.set_aside.pop_front();
                            if matches!(fl.expects.front(), Some(Expect::Query { .. })) {
                                fl.query_drops_done += 1;
                            }
                        } else {
                            // Not seen coming (a text pgsplit could not read, a portal bound
                            // in an earlier request): what the connection has is not known
                            // any more, and no set-aside may come back over it (emptied, not
                            // removed: each still stands for its own drop).
                            fl.conn.prepared.clear();
                            fl.conn.unnamed = None;
                            for kept in fl.set_aside.iter_mut() {
                                *kept = PreparedNames::default();
                            }
                            self.tainted[fl.id.0 as usize] = true;
                        }
                        self.statements.clear_named();
                    }
                    // A DEALLOCATE that reached the server may have dropped a statement
                    // pgsplit prepared there (a client that found its name in
                    // pg_prepared_statements): the connection must not claim it any more,
                    // or every later client's Bind of that SQL here would fail with 26000.
                    b"DEALLOCATE" => {
                        let mut names = fl.ops.iter().filter_map(|op| match op {
                            SessionOp::Deallocate { name } => Some(name),
                            _ => None,
                        });
                        match (names.next(), names.next()) {
                            (Some(name), None) => {
                                fl.conn.prepared.remove(name);
                            }
                            // Several in one request (some maybe bound and never run): which
                            // one ran is not known, so the connection is closed after it.
                            (Some(_), Some(_)) => self.tainted[fl.id.0 as usize] = true,
                            _ => {}
                        }
                    }
                    _ => {}
                }
                if matches!(fl.expects.front(), Some(Expect::Execute { .. })) {
                    fl.expects.pop_front();
                }
                true
            }
            tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED => {
                if matches!(fl.expects.front(), Some(Expect::Execute { .. })) {
                    fl.expects.pop_front();
                }
                true
            }
            tag::PARAMETER_STATUS => {
                if let Some(kv) = protocol::decode_parameter_status(body()) {
                    fl.conn.note_parameter(kv);
                    self.note_backslash_escapes(fl.id, &fl.conn);
                }
                true
            }
            tag::COPY_IN_RESPONSE => {
                fl.copy_in = true;
                fl.copy_by_execute = matches!(fl.expects.front(), Some(Expect::Execute { .. }));
                true
            }
            _ => true,
        }
    }
}

/// Parse, Bind and Execute of `sql` (the client's BEGIN) in the unnamed statement and
/// portal, without a Sync.
fn encode_hidden_begin(out: &mut bytes::BytesMut, sql: &str) {
    use bytes::BufMut;
    out.put_u8(tag::PARSE);
    out.put_i32(4 + 1 + sql.len() as i32 + 1 + 2);
    out.put_u8(0);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
    out.put_i16(0);
    out.put_u8(tag::BIND);
    out.put_i32(4 + 2 + 6);
    out.put_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    out.put_u8(tag::EXECUTE);
    out.put_i32(4 + 1 + 4);
    out.put_slice(&[0, 0, 0, 0, 0]);
}

/// Whether `item` ends the open batch it joins. A simple Query or forwarded message ends with
/// its own ReadyForQuery, so nothing joins it after; but while the server skips messages
/// after an error it skips that one too and answers nothing before the Sync, so the batch
/// stays open for that.
fn ends_batch(item: &Item, skipping: bool) -> bool {
    match item {
        Item::Sync => true,
        Item::Query { .. } | Item::Forwarded(_) => !skipping,
        _ => false,
    }
}

/// Empty the connection's unnamed statement slot ahead of a message that names it (see
/// [`Expect::CloseUnnamed`]).
fn close_unnamed(out: &mut bytes::BytesMut, fl: &mut InFlight) {
    protocol::encode_statement_target(tag::CLOSE, "").encode_into(out);
    fl.conn.unnamed = None;
    fl.expects.push_back(Expect::CloseUnnamed);
}

fn undo_parse(conn: &mut ServerConn, server_name: Option<String>, unnamed: bool) {
    if let Some(n) = server_name {
        conn.prepared.remove(&n);
    }
    if unnamed {
        conn.unnamed = None;
    }
}

/// The SQL text an item runs, for learning writes.
fn statement_sql(item: &Item) -> Option<std::borrow::Cow<'_, str>> {
    match item {
        Item::Query { frame, .. } => protocol::query_sql(&frame.body).ok(),
        Item::Parse(s) => Some(std::borrow::Cow::Borrowed(&s.parse.sql)),
        Item::Bind { stmt: Some(s), .. } => Some(std::borrow::Cow::Borrowed(&s.parse.sql)),
        _ => None,
    }
}

/// The session's one timer for reads held on a replica (see `relay`).
pub(super) struct HoldTick {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The timer holds this task's waker since a poll returned Pending, and keeps it until
    /// it fires: until then a held read only looks at it, instead of polling it again (the
    /// poll, most of it waker bookkeeping, cost about 1 % of a select's instructions).
    armed: bool,
}

impl HoldTick {
    fn new(interval: std::time::Duration) -> HoldTick {
        HoldTick {
            sleep: Box::pin(tokio::time::sleep(interval)),
            armed: false,
        }
    }

    async fn fired(&mut self) {
        std::future::poll_fn(|cx| {
            if self.armed && !self.sleep.is_elapsed() {
                return std::task::Poll::Pending;
            }
            // Outside the task's budget: a Sleep polled on a spent budget answers Pending
            // without taking the waker, and would then never be looked at again.
            let poll =
                Pin::new(&mut tokio::task::coop::unconstrained(self.sleep.as_mut())).poll(cx);
            self.armed = poll.is_pending();
            poll
        })
        .await
    }

    fn restart(&mut self, interval: std::time::Duration) {
        self.sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + interval);
        // A reset timer may have let go of the waker.
        self.armed = false;
    }
}

/// The session operations of `class`, which runs now (a Query, or the Execute of its
/// portal), in the order the request runs them. How many times it drops every prepared
/// statement.
fn take_session_ops(fl: &mut InFlight, class: &Classification) -> u32 {
    if class.session_ops.is_empty() && class.read_back.is_empty() && !class.local_parse_setting {
        // Almost every statement: nothing to note.
        return 0;
    }
    let mut drops_all = 0u32;
    for op in &class.session_ops {
        // A value read back at the end of the request that this resets afterwards is not
        // the session's any more (SET datestyle …; RESET datestyle).
        fl.read_back.retain(|n| !op.resets(n));
        if matches!(op, SessionOp::DeallocateAll | SessionOp::DiscardAll) {
            // The server drops the connection's statements when it gets there, before
            // anything the batch sends after it: those parsed after it are prepared anew (a
            // ParseComplete of pgsplit's own, for a statement the server had when this was
            // sent, would be followed by a 26000).
            fl.set_aside.push_back(fl.conn.prepared.take_all());
            drops_all += 1;
        }
    }
    fl.ops.extend(class.session_ops.iter().cloned());
    fl.read_back.extend(class.read_back.iter().cloned());
    fl.conn.parse_settings_changed |= changes_parsing(class);
    drops_all
}

/// A Bind of a portal to a statement classified `class` (None: one pgsplit does not know):
/// the portal's session operations wait for its Execute, and a portal bound anew forgets
/// those of its old statement.
fn bind_portal(fl: &mut InFlight, body: &[u8], class: Option<&Arc<Classification>>) {
    let changes = class
        .filter(|c| !c.session_ops.is_empty() || !c.read_back.is_empty() || c.local_parse_setting);
    if changes.is_none() && fl.unexecuted.is_empty() {
        return;
    }
    let portal = BindNames::decode(body).map_or(String::new(), |n| n.portal.to_owned());
    fl.unexecuted.retain(|(p, _)| *p != portal);
    if let Some(class) = changes {
        fl.unexecuted.push((portal, class.clone()));
    }
}

/// The classification of the session-changing statement an Execute (`body`) runs, if any.
fn take_unexecuted(fl: &mut InFlight, body: &[u8]) -> Option<Arc<Classification>> {
    if fl.unexecuted.is_empty() {
        return None;
    }
    let name_end = body.iter().position(|&b| b == 0)?;
    let portal = &body[..name_end];
    let at = fl
        .unexecuted
        .iter()
        .position(|(p, _)| p.as_bytes() == portal)?;
    Some(fl.unexecuted.remove(at).1)
}

/// Whether `class` may change a setting PostgreSQL parses statements under, for the
/// session or for its transaction.
fn changes_parsing(class: &Classification) -> bool {
    class.local_parse_setting
        || class.read_back.iter().any(|n| affects_parsing(n))
        || class.session_ops.iter().any(|op| match op {
            SessionOp::Set { name, .. } | SessionOp::Reset { name } => affects_parsing(name),
            SessionOp::ResetAll | SessionOp::DiscardAll => true,
            SessionOp::Deallocate { .. } | SessionOp::DeallocateAll => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_hold_tick_first_polled_on_a_spent_budget_still_fires() {
        let mut tick = HoldTick::new(Duration::from_millis(20));
        while tokio::task::coop::has_budget_remaining() {
            tokio::task::coop::consume_budget().await;
        }
        // One poll while the budget is spent (as after a long streamed answer), without
        // yielding in between.
        std::future::poll_fn(|cx| {
            assert!(std::pin::pin!(tick.fired()).poll(cx).is_pending());
            std::task::Poll::Ready(())
        })
        .await;
        tokio::time::timeout(Duration::from_secs(5), tick.fired())
            .await
            .expect("the timer fires");
        tick.restart(Duration::from_millis(20));
        tokio::time::timeout(Duration::from_secs(5), tick.fired())
            .await
            .expect("and fires again after a restart");
    }
}
