//! Arbitrary sequences of frontend messages (Query, Parse, Bind, Describe, Execute, Close,
//! Sync, Flush, FunctionCall, COPY leftovers, Terminate, garbage) through the pure state a
//! session keeps for them.
//!
//! The proxy's own code does the work: `session/request.rs` decodes each frame and resolves
//! statement names (compiled from the proxy's file, see `src/lib.rs`), the shared
//! `ClassifyCache` classifies, `router::route` routes, `backend::PreparedSet` tracks what each
//! server connection has prepared, `session/state.rs` records settings. What the session does
//! between them in async code (batching up to Sync/Flush, the proxy's own answers, emitting
//! to a server with injected Parses and evicting Closes, the expectation queue, settling
//! session operations) is mirrored here, step for step, from `session/mod.rs` and
//! `session/relay.rs`.
//!
//! Input: a flags byte (pool mode, prepared-statement capacity), an oracle length byte and
//! that many oracle bytes (the servers' answers: errors, transaction status, which replica,
//! a 25006 refusal; all "success" when exhausted), then the client's frames on the wire, as
//! captured from real clients after their startup packet.
//!
//! Checks: no panic; every client mistake becomes an ErrorResponse with its SQLSTATE; routing
//! keeps its contract (a transaction stays on its connection, a pinned session and anything
//! that is not a plain read go to the primary, an open batch never goes to a replica); a
//! server connection never holds more prepared statements than its limit, and holds each
//! statement a Bind or Describe needs before that message is sent; a replica's 25006 teaches
//! the classification cache; settings replay converges.
#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use arbitrary::Unstructured;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgsplit::backend::PreparedSet;
use pgsplit::protocol::{TxStatus, decode_frame, query_sql, tag};
use pgsplit::router::{
    Classification, ClassifyCache, Route, SessionFacts, SessionOp, Target, TxAccess, route,
};
use pgsplit_fuzz::request::{self, Item};
use pgsplit_fuzz::state::{Settings, Statement, Statements, apply_to_server, startup_settings};
use pgsplit_fuzz::{SESSION_STACK, check_error_response, on_stack};

/// One server connection (0 = primary, 1 and 2 = replicas), as `ServerConn` tracks it.
struct Server {
    prepared: PreparedSet,
    unnamed: Option<u64>,
    settings: HashMap<String, String>,
    capacity: usize,
    /// What the server really holds, from the messages it ran (not skipped): the truth the
    /// proxy's bookkeeping (`prepared`, `unnamed`) must match.
    actual: HashSet<String>,
    actual_unnamed: Option<u64>,
    /// Every server-side name sent to it.
    seen: HashSet<String>,
}

impl Server {
    fn new(capacity: usize) -> Server {
        Server {
            prepared: PreparedSet::new(capacity),
            unnamed: None,
            settings: HashMap::new(),
            capacity,
            actual: HashSet::new(),
            actual_unnamed: None,
            seen: HashSet::new(),
        }
    }
}

/// `relay::Expect`, reduced to what changes state.
enum Expect {
    Parse {
        server_name: Option<String>,
        unnamed: bool,
        identity: u64,
        register: Option<(String, Arc<Statement>)>,
    },
    Synth {
        register: Option<(String, Arc<Statement>)>,
        unregister: Option<String>,
    },
    CloseEvicted(String),
    /// The Close of the unnamed statement sent before a Bind or Describe of an unnamed
    /// statement the session does not have.
    CloseUnnamed,
    /// Bind, Describe, Execute, Close: answered, nothing to record.
    Plain,
    /// The Describe standing for an `Item::Fail`: always an error.
    Fail,
    Sync,
    HiddenSync,
    /// `clears`: it holds DISCARD ALL or DEALLOCATE ALL (the server drops every prepared
    /// statement when it succeeds). `simple`: a simple Query, which drops the unnamed
    /// statement (a FunctionCall leaves it).
    Query {
        clears: bool,
        simple: bool,
    },
}

struct InFlight {
    backend: usize,
    expects: VecDeque<Expect>,
    local: Statements,
    open: bool,
    failed: bool,
    /// An extended message failed: the server discards what follows up to the Sync.
    skipping: bool,
    rolled_back: bool,
    ops: Vec<SessionOp>,
    /// The SQL of the statements sent (what a 25006 teaches the cache).
    sql: Vec<String>,
    /// A replica refused the request as a write: drained, then run on the primary.
    retry: bool,
}

struct Model<'a> {
    oracle: Unstructured<'a>,
    classify: &'a ClassifyCache,
    servers: Vec<Server>,
    statements: Statements,
    batch: Vec<Item>,
    batch_local: Statements,
    skip_until_sync: bool,
    tx: TxStatus,
    tx_conn: Option<usize>,
    pinned: bool,
    settings: Settings,
    baseline: Vec<(String, String)>,
    tx_ops: Vec<SessionOp>,
    inflight: Option<InFlight>,
}

/// How a client frame left the session.
enum Flow {
    Continue,
    /// The session ended (Terminate, or an error it reports as FATAL).
    End,
}

impl<'a> Model<'a> {
    fn oracle(&mut self) -> u8 {
        self.oracle.arbitrary::<u8>().unwrap_or(0)
    }

    /// A new client session (pooled server connections keep their state).
    fn reset_session(&mut self) {
        self.statements.clear();
        self.batch.clear();
        self.batch_local.clear();
        self.skip_until_sync = false;
        self.tx = TxStatus::Idle;
        self.tx_conn = None;
        self.pinned = false;
        self.settings = Settings::with_baseline(self.baseline.clone());
        self.tx_ops.clear();
        // A connection left in the middle of a request is closed, not pooled.
        if let Some(fl) = self.inflight.take() {
            let capacity = self.servers[fl.backend].capacity;
            self.servers[fl.backend] = Server::new(capacity);
        }
    }

    fn facts(&self) -> SessionFacts {
        SessionFacts {
            in_transaction: self.tx != TxStatus::Idle,
            pinned: self.pinned,
            replicas_refused: false,
        }
    }

    /// `Session::take_client_frame` (and `forward_client_frames` while a batch is open).
    fn on_frame(&mut self, frame: pgsplit::protocol::Frame) -> Flow {
        if let Some(fl) = self.inflight.as_mut().filter(|f| f.open) {
            if frame.tag == tag::TERMINATE {
                return Flow::End;
            }
            if matches!(frame.tag, tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL) {
                return Flow::Continue;
            }
            let item = match request::decode(
                frame,
                self.classify,
                &self.statements,
                &mut fl.local,
                None,
            ) {
                Ok(item) => item,
                Err(e) => {
                    check_error_response(&e);
                    return Flow::End;
                }
            };
            if let Some(c) = item.class() {
                self.pinned |= c.pins_session;
            }
            let mut fl = self.inflight.take().expect("in flight");
            // `relay::ends_batch`: behind an error, only the Sync ends the batch.
            match item {
                Item::Sync => fl.open = false,
                Item::Query { .. } | Item::Forwarded(_) if !fl.skipping => fl.open = false,
                _ => {}
            }
            self.emit(&mut fl, &item);
            self.process(fl);
            return Flow::Continue;
        }
        if self.skip_until_sync {
            if frame.tag == tag::SYNC {
                self.skip_until_sync = false;
            }
            return Flow::Continue;
        }
        match frame.tag {
            tag::QUERY
            | tag::FUNCTION_CALL
            | tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::SYNC
            | tag::FLUSH => {
                let item = match request::decode(
                    frame,
                    self.classify,
                    &self.statements,
                    &mut self.batch_local,
                    None,
                ) {
                    Ok(item) => item,
                    Err(e) => {
                        check_error_response(&e);
                        return Flow::End;
                    }
                };
                if matches!(item, Item::Query { .. }) && self.batch.is_empty() {
                    self.statements.remove("");
                }
                let ends = match item {
                    Item::Query { .. } | Item::Forwarded(_) | Item::Sync => Some(false),
                    Item::Flush => Some(true),
                    _ => None,
                };
                self.batch.push(item);
                match ends {
                    Some(true) => self.dispatch_flush(),
                    Some(false) => self.dispatch(false),
                    None => {}
                }
                Flow::Continue
            }
            tag::TERMINATE => Flow::End,
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => Flow::Continue,
            other => {
                check_error_response(&pgsplit::Error::Protocol(format!(
                    "invalid frontend message type {}",
                    other as char
                )));
                Flow::End
            }
        }
    }

    fn dispatch_flush(&mut self) {
        if self.batch.iter().all(|i| matches!(i, Item::Flush)) {
            self.batch.clear();
            return;
        }
        let describe_only = self.batch.iter().all(|i| {
            matches!(
                i,
                Item::Parse(_) | Item::DescribeStatement { .. } | Item::Flush
            )
        });
        if describe_only && self.tx == TxStatus::Idle {
            self.batch.push(Item::HiddenSync);
            return self.dispatch(false);
        }
        self.dispatch(true)
    }

    /// `Session::local_reply`: what the proxy answers itself.
    fn local_reply(&mut self, items: &[Item]) -> bool {
        if let [Item::Sync] = items
            && self.tx == TxStatus::Idle
        {
            return true;
        }
        let [Item::Query { class, .. }] = items else {
            return false;
        };
        if self.tx != TxStatus::Idle || class.statement_count != 1 {
            return false;
        }
        match class.session_ops.as_slice() {
            [SessionOp::Deallocate { name }] if self.statements.contains_key(name) => {
                self.statements.remove(name);
                true
            }
            [SessionOp::DeallocateAll] if !self.pinned => {
                self.statements.clear();
                true
            }
            _ => false,
        }
    }

    /// `Session::dispatch_batch`, with the servers' answers from the oracle.
    fn dispatch(&mut self, open: bool) {
        let items = std::mem::take(&mut self.batch);
        let local = std::mem::take(&mut self.batch_local);
        if self.local_reply(&items) {
            return;
        }
        let classes: Vec<&Arc<Classification>> = items.iter().filter_map(Item::class).collect();
        let mut r = route(classes.iter().map(|c| &***c), self.facts());
        // The router's contract.
        if self.tx != TxStatus::Idle {
            assert_eq!(r, Route::Transaction);
        } else if self.pinned {
            assert_eq!(r, Route::Primary);
        } else if r == Route::Replica {
            assert!(!classes.is_empty());
            for c in &classes {
                assert!(!c.pins_session);
                assert_eq!(c.target, Target::Replica);
                assert!(!c.may_write());
                assert_ne!(c.begins_tx, Some(TxAccess::ReadWrite));
            }
        } else {
            assert_eq!(r, Route::Primary);
        }
        if open && r == Route::Replica {
            r = Route::Primary;
        }
        if classes.iter().any(|c| c.pins_session) {
            self.pinned = true;
        }
        let backend = match r {
            Route::Transaction => self
                .tx_conn
                .expect("a session in a transaction knows its connection"),
            Route::Primary => 0,
            Route::Replica => 1 + usize::from(self.oracle() & 1),
        };
        let mut fl = InFlight {
            backend,
            expects: VecDeque::new(),
            local: if open { local } else { Statements::default() },
            open,
            failed: false,
            skipping: false,
            rolled_back: false,
            ops: Vec::new(),
            sql: Vec::new(),
            retry: backend != 0 && !open && self.oracle() == 0xff,
        };
        for item in &items {
            self.emit(&mut fl, item);
        }
        if fl.retry {
            // The replica refused: nothing of it reaches the client, the cache learns,
            // and the request runs again on the primary.
            fl.failed = true;
            self.drain_after_error(&mut fl);
            for sql in &fl.sql {
                self.classify.learn_write(sql);
                if sql.len() <= pgsplit::memo::MAX_MEMO_SQL {
                    assert_eq!(self.classify.get(sql).target, Target::Primary);
                }
            }
            let mut again = InFlight {
                backend: 0,
                expects: VecDeque::new(),
                local: Statements::default(),
                open: false,
                failed: false,
                skipping: false,
                rolled_back: false,
                ops: Vec::new(),
                sql: Vec::new(),
                retry: false,
            };
            for item in &items {
                self.emit(&mut again, item);
            }
            return self.process(again);
        }
        self.process(fl)
    }

    /// `Session::emit`.
    fn emit(&mut self, fl: &mut InFlight, item: &Item) {
        if fl.skipping && !matches!(item, Item::Sync) {
            return;
        }
        match item {
            Item::Query { frame, class } => {
                self.servers[fl.backend].unnamed = None;
                let clears = class
                    .session_ops
                    .iter()
                    .any(|op| matches!(op, SessionOp::DiscardAll | SessionOp::DeallocateAll));
                fl.expects.push_back(Expect::Query {
                    clears,
                    simple: true,
                });
                fl.ops.extend(class.session_ops.iter().cloned());
                let sql = query_sql(&frame.body).expect("decoded once").into_owned();
                let head = sql.trim_start().to_ascii_lowercase();
                if head.starts_with("rollback") || head.starts_with("abort") {
                    fl.rolled_back = true;
                }
                fl.sql.push(sql);
            }
            Item::Forwarded(_) => fl.expects.push_back(Expect::Query {
                clears: false,
                simple: false,
            }),
            Item::Parse(stmt) => {
                let name = stmt.parse.name.clone();
                fl.sql.push(stmt.parse.sql.clone());
                if !name.is_empty()
                    && self.servers[fl.backend]
                        .prepared
                        .contains(&stmt.server_name)
                {
                    fl.expects.push_back(Expect::Synth {
                        register: Some((name, stmt.clone())),
                        unregister: None,
                    });
                } else {
                    self.send_parse(fl, stmt, Some(name));
                }
            }
            Item::Bind { stmt, frame } | Item::DescribeStatement { stmt, frame } => {
                if let Some(s) = stmt {
                    self.ensure_prepared(fl, s);
                    if matches!(item, Item::Bind { .. }) {
                        fl.ops.extend(s.class.session_ops.iter().cloned());
                        fl.sql.push(s.parse.sql.clone());
                    }
                } else if names_unnamed_statement(item, &frame.body) {
                    self.servers[fl.backend].unnamed = None;
                    fl.expects.push_back(Expect::CloseUnnamed);
                }
                fl.expects.push_back(Expect::Plain);
            }
            Item::CloseStatement { name, known, .. } => {
                if *known || !self.pinned {
                    fl.expects.push_back(Expect::Synth {
                        register: None,
                        unregister: Some(name.clone()),
                    });
                } else {
                    fl.expects.push_back(Expect::Plain);
                }
            }
            Item::Portal(_) => fl.expects.push_back(Expect::Plain),
            Item::Sync => fl.expects.push_back(Expect::Sync),
            Item::HiddenSync => fl.expects.push_back(Expect::HiddenSync),
            Item::Flush => {}
            Item::Fail(_) => fl.expects.push_back(Expect::Fail),
        }
    }

    fn send_parse(&mut self, fl: &mut InFlight, stmt: &Arc<Statement>, register: Option<String>) {
        let server = &mut self.servers[fl.backend];
        if !stmt.server_name.is_empty()
            && let Some(victim) = server.prepared.insert(&stmt.server_name)
        {
            assert_ne!(
                victim, stmt.server_name,
                "evicted the statement being prepared"
            );
            fl.expects.push_back(Expect::CloseEvicted(victim));
        }
        assert!(server.prepared.len() <= server.capacity);
        let unnamed = stmt.server_name.is_empty();
        let server_name = if unnamed {
            server.unnamed = Some(stmt.identity);
            None
        } else {
            assert!(server.prepared.contains(&stmt.server_name));
            server.seen.insert(stmt.server_name.clone());
            Some(stmt.server_name.clone())
        };
        fl.expects.push_back(Expect::Parse {
            server_name,
            unnamed,
            identity: stmt.identity,
            register: register.map(|n| (n, stmt.clone())),
        });
    }

    fn ensure_prepared(&mut self, fl: &mut InFlight, stmt: &Arc<Statement>) {
        let server = &mut self.servers[fl.backend];
        let present = if stmt.server_name.is_empty() {
            server.unnamed == Some(stmt.identity)
        } else {
            server.prepared.touch(&stmt.server_name)
        };
        if !present {
            self.send_parse(fl, stmt, None);
        }
        // The message that needs it goes right after: the server must hold it now.
        let server = &self.servers[fl.backend];
        if stmt.server_name.is_empty() {
            assert_eq!(server.unnamed, Some(stmt.identity));
        } else {
            assert!(server.prepared.contains(&stmt.server_name));
        }
    }

    /// The server reported an error: it skips everything up to the next Sync, and the
    /// proxy undoes what sending those messages did to its bookkeeping, newest first.
    fn drain_after_error(&mut self, fl: &mut InFlight) {
        if matches!(fl.expects.front(), Some(Expect::Query { .. })) {
            return;
        }
        fl.skipping = true;
        let server = &mut self.servers[fl.backend];
        let mut skipped = Vec::new();
        let mut skipped_query = false;
        while let Some(x) = fl.expects.front() {
            if matches!(x, Expect::Sync | Expect::HiddenSync) {
                break;
            }
            skipped_query |= matches!(x, Expect::Query { .. });
            skipped.extend(fl.expects.pop_front());
        }
        for x in skipped.into_iter().rev() {
            match x {
                Expect::Parse {
                    server_name,
                    unnamed,
                    ..
                } => {
                    if let Some(n) = server_name {
                        server.prepared.remove(&n);
                    }
                    if unnamed {
                        server.unnamed = None;
                    }
                }
                Expect::CloseEvicted(victim) => server.prepared.restore(&victim),
                _ => {}
            }
        }
        if skipped_query && fl.expects.is_empty() {
            // A simple Query behind the failed message was skipped as well, and no Sync
            // follows: a refused replica read gets a Sync of the proxy's, anything else
            // waits for the client's.
            if fl.retry {
                fl.expects.push_back(Expect::HiddenSync);
            } else {
                fl.open = true;
            }
        }
        // On a retry the rest is drained without a word to the client.
        if fl.retry {
            fl.expects.clear();
        }
    }

    /// The server's answers, message by message (`process_backend` / `on_backend_frame`).
    fn process(&mut self, mut fl: InFlight) {
        loop {
            if !fl.skipping {
                while let Some(Expect::Synth { .. }) = fl.expects.front() {
                    if let Some(Expect::Synth {
                        register,
                        unregister,
                    }) = fl.expects.pop_front()
                    {
                        if let Some((n, s)) = register {
                            self.statements.insert(n, s);
                        }
                        if let Some(n) = unregister {
                            self.statements.remove(&n);
                        }
                    }
                }
            }
            let Some(front) = fl.expects.front() else {
                break;
            };
            let errs = matches!(front, Expect::Fail)
                || (!matches!(front, Expect::Synth { .. }) && self.oracle() >= 0xf0);
            if errs && !matches!(front, Expect::Sync | Expect::HiddenSync) {
                fl.failed = true;
                self.drain_after_error(&mut fl);
                continue;
            }
            let server = &mut self.servers[fl.backend];
            match fl.expects.pop_front() {
                Some(Expect::Parse {
                    register,
                    server_name,
                    identity,
                    ..
                }) => {
                    match server_name {
                        Some(n) => {
                            server.actual.insert(n);
                        }
                        None => server.actual_unnamed = Some(identity),
                    }
                    if let Some((n, s)) = register {
                        self.statements.insert(n, s);
                    }
                }
                Some(Expect::CloseEvicted(victim)) => {
                    server.actual.remove(&victim);
                }
                Some(Expect::CloseUnnamed) => server.actual_unnamed = None,
                Some(Expect::Query { clears, simple }) => {
                    // A simple Query drops the unnamed statement, the session's with it.
                    if simple {
                        server.actual_unnamed = None;
                        self.statements.remove("");
                    }
                    if clears && !fl.failed {
                        server.actual.clear();
                        server.prepared.clear();
                        server.unnamed = None;
                        self.statements.clear_named();
                    }
                    let status = self.status_after(&fl);
                    self.tx = status;
                    self.tx_conn = (status != TxStatus::Idle).then_some(fl.backend);
                }
                Some(Expect::Sync | Expect::HiddenSync) => {
                    fl.skipping = false;
                    let status = self.status_after(&fl);
                    self.tx = status;
                    self.tx_conn = (status != TxStatus::Idle).then_some(fl.backend);
                }
                // Skipped after an error: only a Sync is answered.
                Some(Expect::Synth { .. }) => {}
                _ => {}
            }
        }
        if fl.open {
            self.inflight = Some(fl);
            return;
        }
        self.settle(fl);
        self.check_invariants();
    }

    /// The transaction status a ReadyForQuery reports: the oracle's, or what the SQL sent
    /// implies.
    fn status_after(&mut self, fl: &InFlight) -> TxStatus {
        let implied = || {
            let last = fl.sql.last().map(|s| s.trim_start().to_ascii_lowercase());
            let ends = last.as_deref().is_some_and(|s| {
                ["commit", "end", "rollback", "abort"]
                    .iter()
                    .any(|w| s.starts_with(w))
            });
            let begins = fl.sql.iter().any(|s| {
                let s = s.trim_start().to_ascii_lowercase();
                s.starts_with("begin") || s.starts_with("start transaction")
            });
            if ends {
                TxStatus::Idle
            } else if fl.failed && (begins || self.tx != TxStatus::Idle) {
                TxStatus::Failed
            } else if begins {
                TxStatus::InTransaction
            } else {
                self.tx
            }
        };
        let implied = implied();
        match self.oracle() % 8 {
            5 => TxStatus::Idle,
            6 => TxStatus::InTransaction,
            7 => TxStatus::Failed,
            _ => implied,
        }
    }

    /// `Session::settle_session_ops`. Not mirrored: the taint that keeps a connection with
    /// unknown settings out of the pool (this model has no server-side settings to compare).
    fn settle(&mut self, fl: InFlight) {
        if fl.failed || fl.rolled_back {
            if self.tx == TxStatus::Idle {
                self.tx_ops.clear();
            }
            return;
        }
        if self.tx != TxStatus::Idle {
            self.tx_ops.extend(fl.ops);
            return;
        }
        let mut all = std::mem::take(&mut self.tx_ops);
        all.extend(fl.ops);
        if all.is_empty() {
            return;
        }
        if self.settings.apply(&all) {
            self.statements.clear();
            self.pinned = false;
            self.servers[fl.backend].prepared.clear();
            self.servers[fl.backend].unnamed = None;
        }
        apply_to_server(&mut self.servers[fl.backend].settings, &all);
    }

    fn check_invariants(&self) {
        for s in &self.servers {
            assert!(s.prepared.len() <= s.capacity, "over the prepared limit");
            for name in &s.seen {
                assert_eq!(
                    s.prepared.contains(name),
                    s.actual.contains(name),
                    "the proxy's prepared set disagrees with the server on {name}"
                );
            }
            if let Some(h) = s.unnamed {
                assert_eq!(s.actual_unnamed, Some(h), "unnamed statement out of date");
            }
        }
        if self.tx != TxStatus::Idle {
            assert!(self.tx_conn.is_some());
        }
        let s = &self.settings;
        assert_eq!(
            s.diff_sql(&s.effective()),
            None,
            "settings replay does not converge"
        );
        assert_eq!(
            s.generation == 0,
            s.baseline.is_empty() && s.values.is_empty()
        );
        for (name, stmt) in self.statements.iter() {
            assert_eq!(name, stmt.parse.name);
            assert_eq!(name.is_empty(), stmt.server_name.is_empty());
        }
    }
}

fn run(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&oracle_len, rest)) = rest.split_first() else {
        return;
    };
    let (oracle, client) = rest.split_at((oracle_len as usize).min(rest.len()));
    let capacity = 1 + usize::from((flags >> 1) & 7);
    let baseline = if flags & 1 == 1 {
        // Transaction pool mode: startup parameters become session settings.
        startup_settings(&[
            ("application_name".into(), "fuzz".into()),
            (
                "options".into(),
                "-c search_path=a,b --statement-timeout=5s".into(),
            ),
        ])
    } else {
        Vec::new()
    };
    let classify = pgsplit_fuzz::classify_cache();
    let mut m = Model {
        oracle: Unstructured::new(oracle),
        classify: &classify,
        servers: (0..3).map(|_| Server::new(capacity)).collect(),
        statements: Statements::default(),
        batch: Vec::new(),
        batch_local: Statements::default(),
        skip_until_sync: false,
        tx: TxStatus::Idle,
        tx_conn: None,
        pinned: false,
        settings: Settings::with_baseline(baseline.clone()),
        baseline,
        tx_ops: Vec::new(),
        inflight: None,
    };
    let mut buf = BytesMut::from(client);
    loop {
        match decode_frame(&mut buf, 1 << 20) {
            Ok(Some(frame)) => {
                if let Flow::End = m.on_frame(frame) {
                    m.reset_session();
                }
            }
            Ok(None) => break,
            Err(e) => {
                check_error_response(&pgsplit::Error::from(e));
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Classification runs sqlparser: give it the stack a session has.
    let data = data.to_vec();
    on_stack(SESSION_STACK, move || run(&data));
});

/// Whether a Bind or Describe (statement) names the unnamed statement.
fn names_unnamed_statement(item: &Item, body: &[u8]) -> bool {
    match item {
        // Portal name, then statement name.
        Item::Bind { .. } => {
            body.iter().position(|&b| b == 0).map(|p| body.get(p + 1)) == Some(Some(&0))
        }
        // 'S', then the statement name.
        _ => body.get(1) == Some(&0),
    }
}
