//! SQL classification and routing decisions.
//!
//! Pure and synchronous: `classify` turns SQL text into a [`Classification`], and `route`
//! turns a classification plus the session's facts into a [`Route`]. Nothing here touches a
//! socket or a session type. Conservative by rule: when unsure whether SQL writes, the answer
//! is [`Target::Primary`].

mod cache;
mod classify;
mod fingerprint;
mod route;

pub use cache::ClassifyCache;
pub use classify::{
    PARSE_SETTINGS, affects_parsing, classify, classify_with, keeps_on, names_a_moment,
};
pub use route::{Route, SessionFacts, route};

/// Where a statement may run, judged from its text alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A plain read: any replica (or the primary) may answer it.
    Replica,
    /// Writes, locking reads, writing functions, unparseable SQL, node-identity probes.
    Primary,
}

/// The access mode a `BEGIN` / `START TRANSACTION` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxAccess {
    ReadOnly,
    ReadWrite,
}

/// What a SQL string does to the connection's transaction state, as far as its text tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEffect {
    /// Runs in whatever state it finds: outside a transaction block it runs and commits in an
    /// implicit one, and the connection is idle after it, whether it succeeded or not.
    Neutral,
    /// One `COMMIT` / `END` / `ROLLBACK` (not `AND CHAIN`, not `TO SAVEPOINT`): the
    /// connection is outside any transaction block after it, whatever it found.
    Ends,
    /// Anything else: opens a block, works with savepoints, switches to COPY, or text the
    /// classifier could not read.
    Other,
}

/// A statement that changes session state the proxy must replay on other backends, or
/// state the proxy keeps itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOp {
    /// `SET [SESSION] name ...`: `sql` is a statement that, replayed verbatim on another
    /// backend, gives it the same setting. `name` is lower-case.
    Set { name: String, sql: String },
    /// `RESET name`.
    Reset { name: String },
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL` (also drops prepared statements, like on a direct connection).
    DiscardAll,
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate { name: String },
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
}

/// Kinds of session state that hold a session on its primary connection, as a set: each
/// kind but the last has a statement that takes all of it back, which frees the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PinKinds(u8);

impl PinKinds {
    pub const NONE: Self = Self(0);
    /// LISTEN; taken back by `UNLISTEN *`.
    pub const LISTEN: Self = Self(1);
    /// A session-level advisory lock; by `pg_advisory_unlock_all()`.
    pub const ADVISORY_LOCK: Self = Self(1 << 1);
    /// A cursor WITH HOLD; by `CLOSE ALL`.
    pub const HOLD_CURSOR: Self = Self(1 << 2);
    /// An SQL `PREPARE`; by `DEALLOCATE ALL`.
    pub const PREPARED: Self = Self(1 << 3);
    /// A temporary object; by `DISCARD TEMP`.
    pub const TEMP: Self = Self(1 << 4);
    /// Anything else (an unreadable statement, a SET pgsplit cannot replay, ...): only
    /// `DISCARD ALL` takes it back.
    pub const OTHER: Self = Self(1 << 5);
    pub const ALL: Self = Self((1 << 6) - 1);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

impl std::ops::BitOr for PinKinds {
    type Output = Self;
    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl std::ops::BitOrAssign for PinKinds {
    fn bitor_assign(&mut self, other: Self) {
        self.0 |= other.0;
    }
}

/// Settings RESET ALL leaves alone (PostgreSQL marks them GUC_NO_RESET_ALL; DISCARD ALL
/// resets them).
pub const KEPT_BY_RESET_ALL: [&str; 2] = ["role", "session_authorization"];

impl SessionOp {
    /// Whether this takes `name` (lower-case) back from any value set before it.
    pub fn resets(&self, name: &str) -> bool {
        match self {
            // A new session authorization drops the role too.
            SessionOp::Reset { name: n } => {
                n == name || (n == "session_authorization" && name == "role")
            }
            SessionOp::Set { name: n, .. } => n == "session_authorization" && name == "role",
            SessionOp::ResetAll => !KEPT_BY_RESET_ALL.contains(&name),
            SessionOp::DiscardAll => true,
            SessionOp::Deallocate { .. } | SessionOp::DeallocateAll => false,
        }
    }
}

/// What the proxy needs to know about one SQL string (which may hold several statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// Combined over all statements: `Primary` if any statement is not a plain read.
    pub target: Target,
    /// Set when the string opens a transaction block (`BEGIN`, `START TRANSACTION`).
    pub begins_tx: Option<TxAccess>,
    /// Where it leaves the transaction state: lets the proxy send its own follow-up query
    /// behind a request that surely ends outside a transaction block.
    pub tx_effect: TxEffect,
    /// Session-bound work (temp table, LISTEN, session advisory lock, SQL PREPARE,
    /// DECLARE ... WITH HOLD, set_config, SET of something that cannot be replayed): the
    /// session stays on its primary connection from now on.
    pub pins_session: bool,
    /// What kinds of state it pins for (not empty exactly when `pins_session`).
    pub pins: PinKinds,
    /// Kinds of pinning state it takes back in full (`UNLISTEN *`, `CLOSE ALL`, ...), and
    /// does not pin again after: once it succeeded outside a transaction block, a session
    /// pinned only for these is free again.
    pub unpins: PinKinds,
    /// Each reason it pins is work that a failure of the statement undoes (creating a
    /// temporary object, LISTEN, SQL PREPARE, DECLARE ... WITH HOLD), not one that
    /// survives it (a session advisory lock taken before the error): a statement of its own
    /// that fails outside a transaction block leaves the session as free as before.
    pub pin_undone_by_failure: bool,
    /// It leaves state on the connection that `DISCARD ALL` does not reset (a library
    /// loaded with LOAD, a dblink connection): the session stays pinned for its life.
    pub pins_for_good: bool,
    /// It may leave on its connection what `DISCARD ALL` does not take back and pgsplit
    /// cannot replay or see, so that the session's connections must not serve another
    /// session after it: a custom setting's name (`app.tenant`: a `SET`, `SET LOCAL` or
    /// `RESET` of one, a `set_config` of one or of a name not given as a literal), which
    /// stays defined as `''` where a new connection has none; `standard_conforming_strings`
    /// turned off, under which the server splits texts unlike pgsplit (whatever it ran
    /// unseen stays); a statement sqlparser cannot read (a `DO` block).
    pub outlives_reset: bool,
    /// Session-state statements in the order they appear.
    pub session_ops: Vec<SessionOp>,
    /// Settings changed by `set_config(name, value, false)`: once the statement succeeded,
    /// the proxy reads their values back and records them like a SET.
    pub read_back: Vec<String>,
    /// Tables read (lower-case unless quoted, schema kept when written).
    pub tables_read: Vec<String>,
    /// Tables written (INSERT/UPDATE/DELETE/MERGE/TRUNCATE/COPY FROM/DDL targets).
    pub tables_written: Vec<String>,
    /// It may write something that cannot be attributed to tables (DO, CALL, writing
    /// function calls, unparseable SQL that is not a read).
    pub writes_unknown: bool,
    /// It calls a volatile function (now(), random(), nextval ...): never cacheable.
    pub volatile: bool,
    /// It calls a function that is not a known built-in (somebody's own, which may write):
    /// where it runs on the primary, the proxy cannot tell what it changed.
    pub calls_user_functions: bool,
    /// Number of statements in the string (0 for an empty query).
    pub statement_count: usize,
    /// Whether sqlparser understood it; `false` means the conservative fallback was used.
    pub parsed: bool,
    /// The decision depends on a literal's value (`current_setting('…')`, EXPLAIN's option
    /// values): texts that differ only in literals must not share it.
    pub by_literal: bool,
    /// It changes `search_path` for the rest of its transaction only (`SET LOCAL`,
    /// `set_config(…, true)`): names the transaction wrote may not resolve after its COMMIT
    /// as they did inside it.
    pub local_search_path: bool,
    /// It may change, for the rest of its transaction only, a setting PostgreSQL reads when
    /// it parses a statement ([`PARSE_SETTINGS`]; `SET LOCAL TIME ZONE`, `set_config(…,
    /// true)`): what the transaction prepares then is parsed unlike the session's other
    /// statements of the same text. Set for texts the classifier could not read.
    pub local_parse_setting: bool,
    /// First in a READ ONLY block, it needs the block on the primary, which a standby
    /// would refuse (`SET TRANSACTION` to serializable, `READ WRITE` or a snapshot) or
    /// serve unlike it (`pg_export_snapshot()`, whose snapshot others import there).
    pub standby_refuses: bool,
    /// It goes to the primary only because it acts on the transaction, as a standby's
    /// transaction takes it too (`SET LOCAL`, `SET TRANSACTION`, SAVEPOINT, COMMIT, ...):
    /// first in a READ ONLY block, it can open the block on a replica (unless
    /// `standby_refuses`). Meaningful for a single statement.
    pub tx_local: bool,
}

impl Classification {
    /// The conservative answer for SQL we could not understand.
    pub fn unknown() -> Self {
        Classification {
            target: Target::Primary,
            begins_tx: None,
            tx_effect: TxEffect::Other,
            pins_session: false,
            pins: PinKinds::NONE,
            unpins: PinKinds::NONE,
            pin_undone_by_failure: false,
            pins_for_good: false,
            outlives_reset: false,
            session_ops: Vec::new(),
            read_back: Vec::new(),
            tables_read: Vec::new(),
            tables_written: Vec::new(),
            writes_unknown: true,
            volatile: true,
            calls_user_functions: true,
            statement_count: 1,
            parsed: false,
            by_literal: false,
            local_search_path: false,
            local_parse_setting: true,
            // In a READ ONLY block it runs where the block does, as it always did.
            standby_refuses: false,
            tx_local: false,
        }
    }

    /// A text the classifier could not read at all (it lexes unlike PostgreSQL, or is too
    /// deep to parse): on the primary, an unknown write, and pinning the session, since
    /// it may change session state (`U&"set\005fconfig"(…)`) that must not reach a pooled
    /// connection.
    pub fn unreadable(sql: &str) -> Self {
        // It may do what DISCARD ALL does not undo (LOAD, a dblink connection): then for
        // good. Judged by the bare text, since nothing else can be trusted here.
        let says = |needle: &[u8]| {
            sql.as_bytes()
                .windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
        };
        Classification {
            pins_session: true,
            pins: PinKinds::OTHER,
            pins_for_good: says(b"load") || says(b"dblink") || says(b"u&"),
            outlives_reset: true,
            ..Classification::unknown()
        }
    }

    /// It changes data (as opposed to reading, locking or changing session state): after it
    /// commits, the session's reads must see it.
    pub fn may_write(&self) -> bool {
        self.target == Target::Primary && (self.writes_unknown || !self.tables_written.is_empty())
    }

    /// A plain read with no side effects (the replica route).
    pub fn is_plain_read(&self) -> bool {
        self.target == Target::Replica && !self.pins_session && self.session_ops.is_empty()
    }
}
