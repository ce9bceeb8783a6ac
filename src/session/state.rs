//! What a client session remembers so any backend can serve it: recorded settings and
//! prepared statements. Pure data, unit-tested.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::protocol::ParseMsg;
use crate::router::{Classification, PARSE_SETTINGS, SessionOp};

/// A statement the client prepared with the extended protocol.
#[derive(Debug)]
pub struct Statement {
    pub parse: ParseMsg,
    pub class: Arc<Classification>,
    /// What a server connection's copy of this statement is recognised by. Named: a stable
    /// hash of SQL text, declared parameter types and the parse context. Unnamed: a number
    /// unique in this process, since clients parse the unnamed statement again before
    /// nearly every use; hashing its text each time cost more than the rare re-Parse the
    /// hash could spare.
    pub identity: u64,
    /// The name it has on servers: derived from the hash, so equal SQL shares one
    /// server-side statement and two clients' names never collide.
    pub server_name: String,
    /// Bumped past a server statement of this SQL that a server called outdated (see
    /// [`outdate_shared_statement`]); part of `server_name` when not 0.
    pub generation: u32,
    /// The session's parse settings when it was named ([`Settings::parse_context`]): the
    /// server parses it under them, so only sessions with the same ones may share it.
    pub context: u64,
}

/// Source of unnamed statements' identities.
static UNNAMED_STATEMENTS: AtomicU64 = AtomicU64::new(1);

impl Statement {
    pub fn new(parse: ParseMsg, class: Arc<Classification>, context: u64) -> Statement {
        if parse.name.is_empty() {
            return Statement {
                parse,
                class,
                identity: UNNAMED_STATEMENTS.fetch_add(1, Ordering::Relaxed),
                server_name: String::new(),
                generation: 0,
                context,
            };
        }
        // DefaultHasher::new() uses fixed keys: the same text hashes alike in every process.
        let mut h = std::hash::DefaultHasher::new();
        parse.sql_raw.hash(&mut h);
        parse.param_types.hash(&mut h);
        if context != 0 {
            // Not hashed for the login's defaults: names stay those of earlier versions.
            context.hash(&mut h);
        }
        let identity = h.finish();
        let generation = current_generation(identity);
        let server_name = match generation {
            0 => format!("pgsplit_{identity:016x}"),
            g => format!("pgsplit_{identity:016x}_{g}"),
        };
        Statement {
            parse,
            class,
            identity,
            server_name,
            generation,
            context,
        }
    }

    /// The same statement, classified anew (after the proxy learned something about its
    /// SQL).
    pub fn with_class(&self, class: Arc<Classification>) -> Statement {
        Statement {
            parse: self.parse.clone(),
            class,
            identity: self.identity,
            server_name: self.server_name.clone(),
            generation: self.generation,
            context: self.context,
        }
    }

    /// Which shared server statement this is (none for the unnamed one).
    pub fn shared_key(&self) -> Option<SharedStatement> {
        (!self.server_name.is_empty()).then_some((self.identity, self.generation))
    }
}

/// A shared server statement: the SQL's digest and its generation.
pub type SharedStatement = (u64, u32);

/// Server statements a server called outdated ("cached plan must not change result type",
/// after a table's columns changed): digest → the generation new Parses of that SQL get.
/// Clients' statements prepared before keep the old server statement and its error, as
/// on a direct connection, and drivers that prepare again (pgjdbc, asyncpg, Npgsql) get a
/// fresh one instead of the outdated one shared per text. Read without a lock at every
/// named Parse; written (copied whole) only on such an error. Bounded.
static OUTDATED: std::sync::LazyLock<ArcSwap<HashMap<u64, u32>>> =
    std::sync::LazyLock::new(Default::default);
/// Serializes the writers of `OUTDATED`.
static OUTDATING: Mutex<()> = Mutex::new(());
const MAX_OUTDATED: usize = 4096;

fn current_generation(identity: u64) -> u32 {
    OUTDATED.load().get(&identity).copied().unwrap_or(0)
}

/// A server refused `key`'s cached plan: Parses of its SQL from now on get a new server
/// statement.
pub fn outdate_shared_statement((identity, generation): SharedStatement) {
    let _one_writer = OUTDATING.lock().unwrap_or_else(|p| p.into_inner());
    let mut outdated = HashMap::clone(&OUTDATED.load());
    if outdated.len() >= MAX_OUTDATED && !outdated.contains_key(&identity) {
        // Forgotten marks cost at most the old statements' error once more, and a mark.
        outdated.clear();
    }
    let next = generation.wrapping_add(1).max(1);
    let g = outdated.entry(identity).or_insert(next);
    *g = (*g).max(next);
    OUTDATED.store(Arc::new(outdated));
}

/// A session's (or one batch's) prepared statements by name. The unnamed one has a field of
/// its own: most clients parse it again before every use, and a map would hash "" for each
/// Parse, Bind and ParseComplete.
#[derive(Debug, Default, Clone)]
pub struct Statements {
    unnamed: Option<Arc<Statement>>,
    /// foldhash: the names are hashed at every Bind. Names that collide would slow the
    /// session's own map, and crafting them takes the process's random seed (see
    /// `SqlMemo::hasher`).
    named: foldhash::HashMap<String, Arc<Statement>>,
    /// In one batch's statements: names it closed, which no longer fall back to the
    /// session's (a Bind behind the Close must fail, as on the server). Empty otherwise.
    closed: Vec<String>,
    /// The session's parse settings ([`Settings::parse_context`]) its named statements are
    /// named under.
    context: u64,
}

impl Statements {
    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn insert(&mut self, name: String, stmt: Arc<Statement>) {
        if !self.closed.is_empty() {
            self.closed.retain(|n| *n != name);
        }
        if name.is_empty() {
            self.unnamed = Some(stmt);
        } else {
            self.named.insert(name, stmt);
        }
    }

    /// The parse settings new statements are named under.
    pub fn context(&self) -> u64 {
        self.context
    }

    /// The session's parse settings are `context` (after a change, or after a request that
    /// registered statements named before one): its named statements get the names of
    /// those settings. A server copy of a statement is parsed under the settings the
    /// connection has when it is prepared there, which are the session's now; under the
    /// old name, another session with the old settings would run it.
    pub fn set_context(&mut self, context: u64) {
        self.context = context;
        for stmt in self.named.values_mut() {
            if stmt.context != context {
                *stmt = Arc::new(Statement::new(
                    stmt.parse.clone(),
                    stmt.class.clone(),
                    context,
                ));
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<Statement>> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    /// Give the statements of `sql` the classification `class` (learned from a replica's
    /// refusal): a statement prepared once and bound many times (statement caches of
    /// drivers) would otherwise go to a replica and be refused at every Bind.
    pub fn reclassify(&mut self, sql: &str, class: &Arc<Classification>) {
        for stmt in self.unnamed.iter_mut().chain(self.named.values_mut()) {
            if stmt.parse.sql == sql && !Arc::ptr_eq(&stmt.class, class) {
                *stmt = Arc::new(stmt.with_class(class.clone()));
            }
        }
    }

    /// What `DEALLOCATE ALL` drops: the named statements, not the unnamed one.
    pub fn clear_named(&mut self) {
        self.named.clear();
    }

    pub fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
        self.closed.clear();
    }

    /// `name` was closed in this batch (see `closed`).
    pub fn mark_closed(&mut self, name: &str) {
        self.remove(name);
        if !self.closed.iter().any(|n| n == name) {
            self.closed.push(name.to_owned());
        }
    }

    pub fn is_closed(&self, name: &str) -> bool {
        self.closed.iter().any(|n| n == name)
    }

    /// Every statement with its name, the unnamed one first (for the fuzz target's checks).
    #[allow(dead_code)]
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Statement>)> {
        let unnamed = self.unnamed.iter().map(|s| ("", s));
        unnamed.chain(self.named.iter().map(|(n, s)| (n.as_str(), s)))
    }

    /// Statements the map has room for without growing (the unnamed one counted when
    /// present, so a map holding only it is not mistaken for an unused one).
    pub fn capacity(&self) -> usize {
        self.named.capacity() + usize::from(self.unnamed.is_some())
    }
}

/// Settings recorded from SET / RESET / DISCARD, replayed on every backend the session uses.
#[derive(Debug, Default, Clone)]
pub struct Settings {
    /// The session's defaults from its startup packet (transaction mode): what RESET goes
    /// back to. GUC name (lower-case) → SET statement.
    pub baseline: HashMap<String, String>,
    /// GUC name (lower-case) → the SET statement that produced the current value.
    pub values: HashMap<String, String>,
    /// The values set while a session authorization or role was in force, with that
    /// identity (their SQL): replayed under it, the others as the login, since each
    /// setting's privilege check used the identity it ran with.
    set_under: HashMap<String, Identity>,
    /// Unique per distinct state across all sessions (0: no settings at all), so a server
    /// connection that served another session cannot be mistaken for current.
    pub generation: u64,
    /// Generations of other sessions found to hold exactly these settings: a connection
    /// tagged with one of them needs no comparison. Sessions of one application usually
    /// share their startup settings, so in transaction mode this spares a map comparison
    /// per transaction. Emptied when the settings change.
    equal_generations: Vec<u64>,
    /// [`Settings::serializable_default`], worked out when the settings change: routing asks
    /// at every request, and a lookup by name hashes it each time.
    serializable_default: Option<bool>,
}

/// How many equal generations a session remembers (a linear scan of a few words). Tags
/// settle on the generations that replayed onto fresh connections (`sync_settings` keeps a
/// matching tag), so a pool rarely shows more.
const EQUAL_GENERATIONS_KEPT: usize = 16;

/// Source of `Settings::generation` values.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

impl Settings {
    pub fn with_baseline(baseline: Vec<(String, String)>) -> Settings {
        let mut s = Settings {
            baseline: baseline.into_iter().collect(),
            ..Settings::default()
        };
        s.bump();
        s
    }

    fn bump(&mut self) {
        self.equal_generations.clear();
        self.serializable_default = self
            .in_force("default_transaction_isolation")
            .map(|sql| is_serializable(sql));
        self.generation = if self.baseline.is_empty() && self.values.is_empty() {
            0
        } else {
            GENERATIONS.fetch_add(1, Ordering::Relaxed)
        };
    }

    /// Whether a connection last brought to `generation` has exactly these settings.
    pub fn is_current(&self, generation: u64) -> bool {
        generation == self.generation || self.equal_generations.contains(&generation)
    }

    /// Record that `generation` (another session's) holds exactly these settings, as a
    /// comparison found.
    pub fn remember_equal(&mut self, generation: u64) {
        if generation != self.generation && self.equal_generations.len() < EQUAL_GENERATIONS_KEPT {
            self.equal_generations.push(generation);
        }
    }

    /// Name → SET statement of everything in force (startup defaults overridden by SETs).
    pub fn effective(&self) -> HashMap<String, String> {
        let mut all = self.baseline.clone();
        all.extend(self.values.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// Whether the default isolation in force is serializable, however it was set (`SET`,
    /// `SET SESSION CHARACTERISTICS`, `set_config`, the startup packet): standbys refuse
    /// serializable transactions, so the session's reads go to the primary while it is.
    /// `None`: neither set nor given at login.
    pub fn serializable_default(&self) -> Option<bool> {
        self.serializable_default
    }

    /// Whether a setting in force keeps this session on one connection (see
    /// [`replicas_unfit`]). Values set by `SET` pinned the session when they ran; these come
    /// from the startup packet or a `set_config` read back.
    pub fn replicas_unfit(&self) -> bool {
        self.baseline
            .iter()
            .chain(&self.values)
            .filter(|(name, _)| REPLICA_UNFIT_SETTINGS.contains(&name.as_str()))
            .any(|(name, sql)| {
                set_config_value(sql).is_some_and(|value| replicas_unfit(name, &value))
            })
    }

    /// A digest of the [`PARSE_SETTINGS`] in force, 0 when none is set (the login's
    /// defaults): statements are shared among sessions with the same one.
    pub fn parse_context(&self) -> u64 {
        let mut h: Option<std::hash::DefaultHasher> = None;
        for name in PARSE_SETTINGS {
            if let Some(sql) = self.in_force(name) {
                let h = h.get_or_insert_with(std::hash::DefaultHasher::new);
                name.hash(h);
                sql.hash(h);
            }
        }
        h.map_or(0, |h| h.finish().max(1))
    }

    /// The SQL of `name`'s value in force: SET, or the startup packet's.
    fn in_force(&self, name: &str) -> Option<&String> {
        self.values.get(name).or_else(|| self.baseline.get(name))
    }

    /// The session authorization and role in force.
    fn identity(&self) -> IdentityRef<'_> {
        (self.in_force(AUTHORIZATION), self.in_force(ROLE))
    }

    /// Apply committed session operations. Returns true when prepared statements must be
    /// forgotten too (DISCARD ALL).
    pub fn apply(&mut self, ops: &[SessionOp]) -> bool {
        let mut discard = false;
        for op in ops {
            match op {
                SessionOp::Set { name, sql } => {
                    let identity = self.identity();
                    if identity != (None, None) && ordinary(name) {
                        let identity = (identity.0.cloned(), identity.1.cloned());
                        self.set_under.insert(name.clone(), identity);
                    } else {
                        self.set_under.remove(name);
                    }
                    forget_role_with_authorization(&mut self.values, name);
                    self.values.insert(name.clone(), sql.clone());
                }
                SessionOp::Reset { name } => {
                    forget_role_with_authorization(&mut self.values, name);
                    self.values.remove(name);
                    self.set_under.remove(name);
                }
                SessionOp::ResetAll => {
                    self.values.retain(|name, _| survives_reset_all(name));
                    self.set_under.clear();
                }
                SessionOp::DiscardAll => {
                    self.values.clear();
                    self.set_under.clear();
                    discard = true;
                }
                SessionOp::Deallocate { .. } | SessionOp::DeallocateAll => continue,
            }
            self.bump();
        }
        discard
    }

    /// The SQL that brings a backend from `current` to these settings, or `None` if it is
    /// already there.
    ///
    /// Each setting is replayed with the identity it ran with, which its privilege checks
    /// used: those the session made as the login before its own authorization and role,
    /// those it made under them after.
    pub fn diff_sql(&self, current: &HashMap<String, String>) -> Option<String> {
        let leftovers = current
            .keys()
            .any(|name| ordinary(name) && self.in_force(name).is_none());
        let baseline_only = self
            .baseline
            .iter()
            .filter(|(name, _)| !self.values.contains_key(*name));
        let wanted: Vec<(&String, &String)> = self
            .values
            .iter()
            .chain(baseline_only)
            .filter(|(name, _)| ordinary(name))
            .collect();
        // After a RESET ALL the connection has none of them.
        let differing = |after_reset_all: bool| {
            wanted
                .iter()
                .filter(move |(name, sql)| after_reset_all || current.get(*name) != Some(sql))
        };
        let (authorization, role) = self.identity();
        let on_conn = (current.get(AUTHORIZATION), current.get(ROLE));
        // The identity a setting ran with (none: the login's own).
        let ran_with = |name: &str| {
            self.set_under
                .get(name)
                .map_or((None, None), |(a, r)| (a.as_ref(), r.as_ref()))
        };
        // Only settings that ran with the identity the connection has, which is the
        // session's already: set as they are.
        if (authorization, role) == on_conn
            && !leftovers
            && differing(false).all(|(name, _)| ran_with(name) == on_conn)
        {
            let stmts: Vec<String> = differing(false).map(|(_, sql)| (*sql).clone()).collect();
            return (!stmts.is_empty()).then(|| stmts.join("; "));
        }
        // Otherwise: back to the login's own identity (a new authorization drops the role;
        // older servers need the role reset too); RESET ALL for what the connection has
        // that this session does not (it checks no privileges, which a RESET of a setting
        // another session made under its role would need, and keeps the identity); then
        // each identity's settings under it, the login's first; the session's identity
        // last.
        let mut stmts: Vec<String> = Vec::new();
        let back_to_login = |stmts: &mut Vec<String>, (a, r): IdentityRef| {
            if a.is_some() {
                stmts.push(reset_sql(AUTHORIZATION));
            }
            if r.is_some() {
                stmts.push(reset_sql(ROLE));
            }
        };
        back_to_login(&mut stmts, on_conn);
        if leftovers {
            stmts.push("RESET ALL".to_owned());
        }
        let mut groups: Vec<(IdentityRef, Vec<&String>)> = Vec::new();
        for (name, sql) in differing(leftovers) {
            let identity = ran_with(name);
            match groups.iter_mut().find(|(i, _)| *i == identity) {
                Some((_, sqls)) => sqls.push(sql),
                None => groups.push((identity, vec![sql])),
            }
        }
        // The login's group first, the session's own identity's last.
        groups.sort_by_key(|(identity, _)| {
            (
                *identity != (None, None),
                *identity == (authorization, role),
            )
        });
        let mut in_force = (None, None);
        for (identity, sqls) in groups {
            if identity != in_force {
                back_to_login(&mut stmts, in_force);
                stmts.extend(identity.0.cloned());
                stmts.extend(identity.1.cloned());
                in_force = identity;
            }
            stmts.extend(sqls.into_iter().cloned());
        }
        if (authorization, role) != in_force {
            back_to_login(&mut stmts, in_force);
            stmts.extend(authorization.cloned());
            stmts.extend(role.cloned());
        }
        if stmts.is_empty() {
            None
        } else {
            Some(stmts.join("; "))
        }
    }
}

/// What session operations do to a server connection's settings (as the proxy tracks
/// them): RESET goes back to the server's default, i.e. the entry disappears.
pub fn apply_to_server(server: &mut HashMap<String, String>, ops: &[SessionOp]) {
    for op in ops {
        match op {
            SessionOp::Set { name, sql } => {
                forget_role_with_authorization(server, name);
                server.insert(name.clone(), sql.clone());
            }
            SessionOp::Reset { name } => {
                forget_role_with_authorization(server, name);
                server.remove(name);
            }
            SessionOp::ResetAll => server.retain(|name, _| survives_reset_all(name)),
            SessionOp::DiscardAll => server.clear(),
            SessionOp::Deallocate { .. } | SessionOp::DeallocateAll => {}
        }
    }
}

/// The startup packet's settings as `(name, value)`, in the order PostgreSQL applies them,
/// later ones winning: the parts of `options` (`-c name=value` / `--name=value`) first,
/// then the parameters of their own, wherever they are in the packet.
pub fn startup_values(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut out = last_options(params);
    out.extend(params.iter().filter(|(k, _)| k != "options").cloned());
    out
}

/// Startup parameters as session settings (transaction mode), which become `SET`s.
pub fn startup_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    startup_values(params)
        .into_iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), set_sql(&name, &value)))
        .collect()
}

/// The value `name` has in the end among [`startup_values`].
pub fn value_in<'a>(values: &'a [(String, String)], name: &str) -> Option<&'a str> {
    values
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The value the startup packet gives `name` in the end (the one `startup_settings` leaves
/// in force), without building its SQL.
pub fn startup_value(params: &[(String, String)], name: &str) -> Option<String> {
    value_in(&startup_values(params), name).map(str::to_owned)
}

/// Whether PostgreSQL reports startup parameter `name` given as `value` just as given, or
/// pgsplit works its report out alone: an `application_name` of printable ASCII (the
/// server replaces other bytes), a `DateStyle` (see [`reported_datestyle`]). Other values
/// can be spelled otherwise by the server (TimeZone `asia/tokyo` is `Asia/Tokyo`).
pub fn reported_as_given(name: &str, value: &str) -> bool {
    if name.eq_ignore_ascii_case("application_name") {
        // Longer ones are cut to the server's name length (63 bytes).
        return value.len() < 64 && value.bytes().all(|b| (0x20..0x7f).contains(&b));
    }
    name.eq_ignore_ascii_case("DateStyle")
}

/// The DateStyle PostgreSQL reports once `value` is set over `default` (a report such as
/// "ISO, MDY"), read as its `check_datestyle` reads it: a comma-separated list (quoted
/// items allowed) of at most one style and one order; a half not given keeps `default`'s,
/// `DEFAULT` fills the halves not given yet, `German` alone is day first. Drivers parse the
/// report (psycopg refuses "iso,dmy"); `None` for a value the server would refuse.
pub fn reported_datestyle(value: &str, default: &str) -> Option<String> {
    let (default_style, default_order) = default.split_once(", ")?;
    let (mut style, mut order): (Option<&str>, Option<&str>) = (None, None);
    let mut german_order = false;
    for item in value.split(',') {
        let item = item.trim();
        let word = match item.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
            Some(quoted) => quoted,
            None if !item.is_empty() && !item.contains(char::is_whitespace) => item,
            None => return None,
        };
        let (is_style, name) = match word.to_ascii_uppercase().as_str() {
            "ISO" => (true, "ISO"),
            "SQL" => (true, "SQL"),
            "POSTGRES" => (true, "Postgres"),
            "GERMAN" => (true, "German"),
            "YMD" => (false, "YMD"),
            "DMY" | "EURO" | "EUROPEAN" => (false, "DMY"),
            "MDY" | "US" | "NONEURO" | "NONEUROPEAN" => (false, "MDY"),
            "DEFAULT" => {
                style = style.or(Some(default_style));
                order = order.or(Some(default_order));
                continue;
            }
            _ => return None,
        };
        let slot = if is_style { &mut style } else { &mut order };
        if slot.is_some_and(|s| s != name) {
            // "conflicting datestyle specifications"
            return None;
        }
        *slot = Some(name);
        if name == "German" && order.is_none() {
            german_order = true;
        }
    }
    let order = order.unwrap_or(if german_order { "DMY" } else { default_order });
    Some(format!("{}, {order}", style.unwrap_or(default_style)))
}

/// The settings of the startup packet's `options`: of the last one, which is the one
/// PostgreSQL reads when it is given twice.
fn last_options(params: &[(String, String)]) -> Vec<(String, String)> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == "options")
        .map(|(_, v)| parse_options(v))
        .unwrap_or_default()
}

/// set_config takes the value as raw text, as the startup packet does (a SET with a quoted
/// literal would turn `a,b` into one list element).
/// Settings under which the session stays on its primary connection: strings with
/// backslash escapes (the classifier would split statements unlike the server, and could
/// miss what changes the session).
pub const REPLICA_UNFIT_SETTINGS: [&str; 1] = ["standard_conforming_strings"];

/// See [`REPLICA_UNFIT_SETTINGS`].
pub fn replicas_unfit(name: &str, value: &str) -> bool {
    match name {
        "standard_conforming_strings" => !crate::router::keeps_on(value),
        _ => false,
    }
}

/// A default_transaction_isolation value (or the statement that set it) that is serializable.
pub fn is_serializable(value_or_sql: &str) -> bool {
    value_or_sql.to_ascii_lowercase().contains("serializable")
}

/// The value in a statement [`set_sql`] built.
fn set_config_value(sql: &str) -> Option<String> {
    let rest = sql.strip_prefix("SELECT pg_catalog.set_config('")?;
    let (_, value) = rest.split_once("', '")?;
    Some(value.strip_suffix("', false)")?.replace("''", "'"))
}

pub fn set_sql(name: &str, value: &str) -> String {
    // Built in one allocation: every pooled login makes one of these per startup parameter.
    let mut sql = String::with_capacity(48 + name.len() + value.len());
    if name.eq_ignore_ascii_case("datestyle") {
        // A DateStyle of one half ('ISO', 'DMY') keeps the other half of the value in
        // force: from the default, as on a fresh connection, not from what another session
        // left on this one.
        sql.push_str("RESET datestyle; ");
    }
    sql.push_str("SELECT pg_catalog.set_config('");
    push_quoted(&mut sql, name);
    sql.push_str("', '");
    push_quoted(&mut sql, value);
    sql.push_str("', false)");
    sql
}

/// `text` inside a single-quoted SQL literal: quotes doubled.
fn push_quoted(sql: &mut String, text: &str) {
    let mut parts = text.split('\'');
    sql.push_str(parts.next().unwrap_or_default());
    for part in parts {
        sql.push_str("''");
        sql.push_str(part);
    }
}

/// Why PostgreSQL would refuse the login for the startup packet's `options` (42601): see
/// [`read_options`].
pub fn options_refusal(params: &[(String, String)]) -> Option<String> {
    let (_, options) = params.iter().rev().find(|(k, _)| k == "options")?;
    read_options(options).1
}

/// The settings (`-c name=value`, `--name=value`) of a libpq `options` string, read as the
/// server's getopt reads it, and why the server would refuse it, if it would: a switch
/// without the value it takes (a `-c` at the end), a setting without `=value`, a word that
/// is no switch (after `--`, any word). Which switches the server allows at all is its
/// business: a transaction-mode session passes on only the settings.
fn read_options(options: &str) -> (Vec<(String, String)>, Option<String>) {
    // The server's switches that take a value (its getopt string).
    const TAKES_VALUE: &str = "BcCDdfhkNprStvW";
    let invalid = |w: &str| {
        Some(format!(
            "invalid command-line argument for server process: {w}"
        ))
    };
    let mut settings = Vec::new();
    let mut setting = |s: &str| match s.split_once('=') {
        Some((name, value)) => {
            settings.push((name.replace('-', "_"), value.to_owned()));
            None
        }
        None => Some(s.to_owned()),
    };
    let mut words = option_words(options).into_iter();
    let refusal = loop {
        let Some(w) = words.next() else {
            break None;
        };
        if w == "--" {
            // The end of the switches: whatever follows is an argument, which it takes none.
            break words.next().and_then(|w| invalid(&w));
        }
        let Some(switches) = w.strip_prefix('-').filter(|s| !s.is_empty()) else {
            break invalid(&w);
        };
        if let Some(long) = switches.strip_prefix('-') {
            match setting(long) {
                None => continue,
                Some(name) => break Some(format!("--{name} requires a value")),
            }
        }
        // Switches can be grouped (`-ec a=1`); one that takes a value takes the rest of
        // the word, or the next word.
        let mut refused = None;
        for (i, letter) in switches.char_indices() {
            if !TAKES_VALUE.contains(letter) {
                continue;
            }
            let value = match &switches[i + letter.len_utf8()..] {
                "" => match words.next() {
                    Some(v) => v,
                    None => {
                        refused = invalid(&w);
                        break;
                    }
                },
                inline => inline.to_owned(),
            };
            if letter == 'c' {
                refused = setting(&value).map(|name| format!("-c {name} requires a value"));
            } else {
                tracing::debug!(option = ?w, "startup option ignored in transaction pool mode");
            }
            break;
        }
        if refused.is_some() {
            break refused;
        }
    };
    (settings, refusal)
}

/// The words of a libpq `options` string (backslash escapes a space, as libpq and the
/// server's parser agree).
fn option_words(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            // The server splits at ASCII white space only (isspace in the C locale).
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The `-c name=value` and `--name=value` settings in a libpq `options` string (those
/// before anything the server would refuse).
fn parse_options(options: &str) -> Vec<(String, String)> {
    read_options(options).0
}

const ROLE: &str = "role";
const AUTHORIZATION: &str = "session_authorization";

/// Any setting but the session authorization and the role.
fn ordinary(name: &str) -> bool {
    name != AUTHORIZATION && name != ROLE
}

/// A session authorization and a role, as the SQL that set them.
type Identity = (Option<String>, Option<String>);

/// An [`Identity`] borrowed; `(None, None)` is the login's own.
type IdentityRef<'a> = (Option<&'a String>, Option<&'a String>);

/// `RESET ALL` leaves the role and the session authorization alone.
fn survives_reset_all(name: &str) -> bool {
    crate::router::KEPT_BY_RESET_ALL.contains(&name)
}

/// Setting or resetting the session authorization drops the role too (`SET ROLE NONE`).
fn forget_role_with_authorization(settings: &mut HashMap<String, String>, name: &str) {
    if name == AUTHORIZATION {
        settings.remove(ROLE);
    }
}

fn reset_sql(name: &str) -> String {
    match name {
        AUTHORIZATION => "RESET SESSION AUTHORIZATION".to_owned(),
        // Quoted so names like `pgsplit.consistency` or mixed case survive.
        _ => format!("RESET \"{}\"", name.replace('"', "\"\"")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn options_are_read_as_the_server_reads_them() {
        for (options, settings) in [
            ("-c a=1 --b-c=2", vec![("a", "1"), ("b_c", "2")]),
            ("-ec a=1 -ca.b=x\\ y", vec![("a", "1"), ("a.b", "x y")]),
            ("-e -B 100 -c a=", vec![("a", "")]),
            ("-c a=1 stray -c b=2", vec![("a", "1")]),
        ] {
            let read = super::parse_options(options);
            let want: Vec<(String, String)> = settings
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            assert_eq!(read, want, "{options}");
        }
    }

    #[test]
    fn options_the_server_would_refuse_are_told() {
        let refusal =
            |options: &str| super::options_refusal(&[("options".to_owned(), options.to_owned())]);
        for ok in [
            "",
            "-c work_mem=64MB",
            "-cwork_mem=64MB --search-path=a,b",
            "-c geqo=off -e -B 100",
            r"-c search_path=a\ b",
            "-ec geqo=off",
            "-ecgeqo=off",
            "--",
            "-c application_name=a\u{a0}b",
        ] {
            assert_eq!(refusal(ok), None, "{ok}");
        }
        for (bad, told) in [
            ("-c", "invalid command-line argument for server process: -c"),
            ("-c work_mem", "-c work_mem requires a value"),
            ("-cwork_mem", "-c work_mem requires a value"),
            ("--work_mem", "--work_mem requires a value"),
            (
                "work_mem=1",
                "invalid command-line argument for server process: work_mem=1",
            ),
            ("-B", "invalid command-line argument for server process: -B"),
            (
                "-c a=1 -",
                "invalid command-line argument for server process: -",
            ),
            (
                "-- -c a=1",
                "invalid command-line argument for server process: -c",
            ),
            (
                "-ec",
                "invalid command-line argument for server process: -ec",
            ),
            ("-ecgeqo", "-c geqo requires a value"),
        ] {
            assert_eq!(refusal(bad).as_deref(), Some(told), "{bad}");
        }
    }

    use super::*;

    fn set(name: &str, sql: &str) -> SessionOp {
        SessionOp::Set {
            name: name.into(),
            sql: sql.into(),
        }
    }

    #[test]
    fn diff_sets_what_differs_and_resets_what_is_gone() {
        let mut s = Settings::default();
        s.apply(&[
            set("search_path", "SET search_path TO a"),
            set("timezone", "SET TIME ZONE 'UTC'"),
        ]);
        let mut server = HashMap::new();
        let sql = s.diff_sql(&server).unwrap();
        assert!(sql.contains("SET search_path TO a") && sql.contains("SET TIME ZONE 'UTC'"));
        server = s.values.clone();
        assert_eq!(s.diff_sql(&server), None);
        s.apply(&[SessionOp::Reset {
            name: "timezone".into(),
        }]);
        // What the connection has and the session does not goes with a RESET ALL, which
        // checks no privileges (another session may have set it under a role).
        assert_eq!(
            s.diff_sql(&server).as_deref(),
            Some("RESET ALL; SET search_path TO a")
        );
        assert!(s.apply(&[SessionOp::DiscardAll]));
        assert!(s.values.is_empty());
    }

    #[test]
    fn a_startup_value_is_the_one_postgres_applies_as_startup_settings_apply_it() {
        // PostgreSQL applies `options` first, then the parameters of their own (the last
        // of one given twice), wherever they are in the packet.
        let params = [
            ("TimeZone".to_string(), "UTC".to_string()),
            ("pgsplit.consistency".into(), "eventual".into()),
            (
                "options".into(),
                "-c search_path=a -c PgSplit.Consistency=read_your_writes -c timezone=Asia/Tokyo"
                    .into(),
            ),
            ("TimeZone".into(), "Europe/Paris".into()),
        ];
        let in_force = |name: &str| {
            startup_settings(&params)
                .into_iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, sql)| sql)
        };
        for (name, want) in [
            ("pgsplit.consistency", "eventual"),
            ("timezone", "Europe/Paris"),
            ("search_path", "a"),
        ] {
            assert_eq!(
                startup_value(&params, name).as_deref(),
                Some(want),
                "{name}"
            );
            let sql = in_force(name).unwrap();
            assert!(sql.contains(&format!("'{want}'")), "{name}: {sql}");
        }
        assert_eq!(startup_value(&params, "application_name"), None);
        // Of two `options`, PostgreSQL reads the last only.
        let twice = [
            (
                "options".to_string(),
                "-c work_mem=1MB -c search_path=a".to_string(),
            ),
            ("options".into(), "-c search_path=b".into()),
        ];
        assert_eq!(startup_value(&twice, "search_path").as_deref(), Some("b"));
        assert_eq!(startup_value(&twice, "work_mem"), None);
        let names: Vec<_> = startup_settings(&twice)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["search_path"]);
    }

    #[test]
    fn only_values_the_server_cannot_respell_are_reported_as_given() {
        assert!(reported_as_given("application_name", "albums api"));
        assert!(reported_as_given("Application_Name", ""));
        assert!(!reported_as_given("application_name", "caf\u{e9}"));
        assert!(!reported_as_given("application_name", "a\tb"));
        assert!(!reported_as_given("application_name", &"a".repeat(64)));
        assert!(reported_as_given("datestyle", "iso,dmy"));
        assert!(!reported_as_given("TimeZone", "UTC"));
        assert!(!reported_as_given("client_encoding", "UTF8"));
    }

    #[test]
    fn a_datestyle_is_reported_as_the_server_reports_it() {
        for (value, want) in [
            ("iso,dmy", Some("ISO, DMY")),
            ("ISO", Some("ISO, MDY")),
            ("dmy", Some("ISO, DMY")),
            ("SQL, European", Some("SQL, DMY")),
            ("german", Some("German, DMY")),
            ("German, YMD", Some("German, YMD")),
            ("postgres, ymd", Some("Postgres, YMD")),
            ("default", Some("ISO, MDY")),
            ("sql, default", Some("SQL, MDY")),
            ("dmy, default", Some("ISO, DMY")),
            ("\"ISO\", dmy", Some("ISO, DMY")),
            ("postgres mdy", None),
            ("ISO, SQL", None),
            ("banana", None),
        ] {
            assert_eq!(
                reported_datestyle(value, "ISO, MDY").as_deref(),
                want,
                "{value}"
            );
        }
    }

    #[test]
    fn startup_parameters_become_settings_and_reset_returns_to_them() {
        let base = startup_settings(&[
            ("application_name".into(), "it's".into()),
            (
                "options".into(),
                "-c search_path=a,b --statement-timeout=5s -csynchronous_commit=off".into(),
            ),
        ]);
        let names: Vec<_> = base.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "search_path",
                "statement_timeout",
                "synchronous_commit",
                "application_name"
            ]
        );
        assert_eq!(
            base[3].1,
            "SELECT pg_catalog.set_config('application_name', 'it''s', false)"
        );
        let base0 = base[3].1.clone();
        let mut s = Settings::with_baseline(base);
        assert_ne!(s.generation, 0);
        let mut server = HashMap::new();
        let sql = s.diff_sql(&server).unwrap();
        assert!(
            sql.contains("set_config('search_path', 'a,b', false)"),
            "{sql}"
        );
        server = s.effective();
        s.apply(&[set("application_name", "SET application_name = 'x'")]);
        assert_eq!(
            s.diff_sql(&server).as_deref(),
            Some("SET application_name = 'x'")
        );
        server = s.effective();
        s.apply(&[SessionOp::ResetAll]);
        assert_eq!(s.diff_sql(&server).as_deref(), Some(base0.as_str()));
    }

    #[test]
    fn a_reset_on_a_pooled_connection_leaves_it_behind_the_session() {
        let mut s =
            Settings::with_baseline(startup_settings(&[("application_name".into(), "x".into())]));
        let mut server = s.effective();
        let ops = [SessionOp::Reset {
            name: "application_name".into(),
        }];
        s.apply(&ops);
        apply_to_server(&mut server, &ops);
        assert!(server.is_empty(), "the server went back to its own default");
        assert_ne!(
            server,
            s.effective(),
            "so it must be brought back to the session's"
        );
        assert!(s.diff_sql(&server).unwrap().contains("application_name"));
    }

    #[test]
    fn no_difference_means_the_server_has_exactly_the_session_settings() {
        // sync_settings keeps a connection's recorded settings when diff_sql finds nothing.
        let s = Settings::with_baseline(startup_settings(&[
            ("application_name".into(), "pgbench".into()),
            ("search_path".into(), "a".into()),
        ]));
        let mut s2 = s.clone();
        s2.apply(&[set("search_path", "SET search_path = b")]);
        let servers = [
            HashMap::new(),
            s.effective(),
            s2.effective(),
            s.effective()
                .into_iter()
                .chain([("work_mem".to_owned(), "SET work_mem = '1MB'".to_owned())])
                .collect(),
        ];
        for session in [&s, &s2, &Settings::default()] {
            for server in &servers {
                assert_eq!(
                    session.diff_sql(server).is_none(),
                    *server == session.effective(),
                    "{server:?}"
                );
            }
        }
    }

    #[test]
    fn generations_are_unique_across_sessions() {
        let mut a = Settings::default();
        let mut b = Settings::default();
        assert_eq!((a.generation, b.generation), (0, 0));
        a.apply(&[set("x", "SET x = 1")]);
        b.apply(&[set("x", "SET x = 2")]);
        assert_ne!(a.generation, b.generation);
    }

    #[test]
    fn an_equal_generation_is_remembered_until_the_settings_change() {
        let startup = || startup_settings(&[("application_name".into(), "app".into())]);
        let mut a = Settings::with_baseline(startup());
        let b = Settings::with_baseline(startup());
        assert_ne!(a.generation, b.generation);
        assert!(a.is_current(a.generation));
        assert!(!a.is_current(b.generation), "unknown until compared");
        // What sync_settings does when a connection b left behind shows no difference.
        assert_eq!(a.diff_sql(&b.effective()), None);
        a.remember_equal(b.generation);
        assert!(a.is_current(b.generation));
        a.apply(&[set("x", "SET x = 1")]);
        assert!(
            !a.is_current(b.generation),
            "a's settings are no longer b's"
        );
        for g in 1_000_000..1_000_100 {
            a.remember_equal(g);
        }
        assert!(a.equal_generations.len() <= EQUAL_GENERATIONS_KEPT);
    }

    fn parse_msg(name: &str, sql: &str) -> ParseMsg {
        ParseMsg {
            name: name.into(),
            sql: sql.into(),
            sql_raw: bytes::Bytes::copy_from_slice(sql.as_bytes()),
            param_types: bytes::Bytes::from_static(&[0, 0]),
        }
    }

    #[test]
    fn statements_share_server_names_by_text() {
        let c = Arc::new(Classification::unknown());
        let a = Statement::new(parse_msg("a", "select 1"), c.clone(), 0);
        let b = Statement::new(parse_msg("b", "select 1"), c.clone(), 0);
        let d = Statement::new(parse_msg("a", "select 2"), c.clone(), 0);
        assert_eq!(a.server_name, b.server_name);
        assert_ne!(a.server_name, d.server_name);
        let e = Statement::new(parse_msg("", "select 1"), c.clone(), 0);
        let f = Statement::new(parse_msg("", "select 1"), c, 0);
        assert_eq!(e.server_name, "");
        assert_ne!(e.identity, f.identity);
    }

    /// PostgreSQL reads dates, times and escapes in a statement's text with the settings
    /// of its Parse, and keeps the result: only sessions with the same such settings may
    /// share a server statement.
    #[test]
    fn statements_are_shared_only_under_the_same_parse_settings() {
        let mut utc =
            Settings::with_baseline(startup_settings(&[("TimeZone".into(), "UTC".into())]));
        let plain = Settings::default();
        assert_eq!(plain.parse_context(), 0);
        let mut other = Settings::default();
        other.apply(&[set("work_mem", "SET work_mem = '64MB'")]);
        assert_eq!(other.parse_context(), 0, "work_mem does not change parsing");
        assert_ne!(utc.parse_context(), 0);
        let ny = {
            let mut s = Settings::default();
            s.apply(&[set("timezone", "SET TIME ZONE 'America/New_York'")]);
            s
        };
        assert_ne!(ny.parse_context(), utc.parse_context());

        let c = Arc::new(Classification::unknown());
        let sql = "select '2023-01-01 00:00'::timestamptz";
        let named = |ctx| Statement::new(parse_msg("s", sql), c.clone(), ctx).server_name;
        // The login's defaults keep the names pgsplit always gave: text and types only.
        let mut h = std::hash::DefaultHasher::new();
        parse_msg("s", sql).sql_raw.hash(&mut h);
        parse_msg("s", sql).param_types.hash(&mut h);
        assert_eq!(named(0), format!("pgsplit_{:016x}", h.finish()));
        assert_ne!(named(utc.parse_context()), named(0));
        assert_ne!(named(utc.parse_context()), named(ny.parse_context()));

        // A session whose parse settings change renames its statements.
        let mut statements = Statements::default();
        statements.set_context(utc.parse_context());
        let before = Arc::new(Statement::new(
            parse_msg("s", sql),
            c.clone(),
            statements.context(),
        ));
        statements.insert("s".into(), before.clone());
        utc.apply(&[set("datestyle", "SET DateStyle = 'ISO, DMY'")]);
        statements.set_context(utc.parse_context());
        let after = statements.get("s").unwrap();
        assert_ne!(after.server_name, before.server_name);
        assert_eq!(after.server_name, named(utc.parse_context()));
        assert_eq!(after.parse.sql, before.parse.sql);
    }

    #[test]
    fn an_outdated_server_statement_is_left_to_old_handles() {
        let c = Arc::new(Classification::unknown());
        let sql = "select 'outdated statement test'";
        let old = Statement::new(parse_msg("a", sql), c.clone(), 0);
        assert_eq!(old.generation, 0);
        outdate_shared_statement(old.shared_key().unwrap());
        let new = Statement::new(parse_msg("b", sql), c.clone(), 0);
        assert_eq!(new.identity, old.identity);
        assert_eq!(new.generation, 1);
        assert_ne!(new.server_name, old.server_name);
        // A late error from an old handle does not move the generation back or on.
        outdate_shared_statement(old.shared_key().unwrap());
        assert_eq!(
            Statement::new(parse_msg("c", sql), c.clone(), 0).generation,
            1
        );
        outdate_shared_statement(new.shared_key().unwrap());
        assert_eq!(
            Statement::new(parse_msg("c", sql), c.clone(), 0).generation,
            2
        );
        // Other texts and the unnamed statement are untouched.
        assert_eq!(
            Statement::new(parse_msg("d", "select 3"), c.clone(), 0).generation,
            0
        );
        assert_eq!(Statement::new(parse_msg("", sql), c, 0).shared_key(), None);
    }

    #[test]
    fn the_unnamed_statement_is_kept_apart_from_named_ones() {
        let c = Arc::new(Classification::unknown());
        let mut all = Statements::default();
        all.insert(
            String::new(),
            Arc::new(Statement::new(parse_msg("", "select 1"), c.clone(), 0)),
        );
        all.insert(
            "s1".into(),
            Arc::new(Statement::new(parse_msg("s1", "select 2"), c.clone(), 0)),
        );
        assert_eq!(all.get("").map(|s| s.parse.sql.as_str()), Some("select 1"));
        assert_eq!(
            all.get("s1").map(|s| s.parse.sql.as_str()),
            Some("select 2")
        );
        all.insert(
            String::new(),
            Arc::new(Statement::new(parse_msg("", "select 3"), c, 0)),
        );
        assert_eq!(all.get("").map(|s| s.parse.sql.as_str()), Some("select 3"));
        assert!(all.remove("").is_some());
        assert!(!all.contains_key(""));
        assert!(all.contains_key("s1"));
        all.clear();
        assert!(!all.contains_key("s1"));
    }

    /// PostgreSQL's RESET ALL leaves the role and the session authorization in force, and a
    /// new session authorization drops the role: a pooled connection keeps what its server
    /// keeps, and the next session's replay sets the authorization before the role.
    #[test]
    fn reset_all_keeps_the_role_and_a_new_authorization_drops_it() {
        let role = set("role", "SET ROLE alice");
        let mut s = Settings::default();
        let mut server = HashMap::new();
        let ops = [role.clone(), set("search_path", "SET search_path TO a")];
        s.apply(&ops);
        apply_to_server(&mut server, &ops);
        s.apply(&[SessionOp::ResetAll]);
        apply_to_server(&mut server, &[SessionOp::ResetAll]);
        assert_eq!(s.values.keys().collect::<Vec<_>>(), ["role"]);
        assert_eq!(server.keys().collect::<Vec<_>>(), ["role"]);
        // Another session, without a role, on that connection: the role is reset.
        assert_eq!(
            Settings::default().diff_sql(&server).as_deref(),
            Some("RESET \"role\"")
        );
        let auth = set("session_authorization", "SET SESSION AUTHORIZATION bob");
        apply_to_server(&mut server, std::slice::from_ref(&auth));
        assert!(server.keys().eq(["session_authorization"]));
        // Authorization first, then the ordinary settings, the role last, and the role set
        // again after a new authorization even where the connection had the same one.
        let mut s = Settings::default();
        s.apply(&[role, set("timezone", "SET TIME ZONE 'UTC'"), auth]);
        assert_eq!(s.values.len(), 2, "the authorization dropped the role");
        s.apply(&[set("role", "SET ROLE carol")]);
        let mut on_conn = s.effective();
        on_conn.remove("session_authorization");
        assert_eq!(
            s.diff_sql(&on_conn).as_deref(),
            Some("RESET \"role\"; SET SESSION AUTHORIZATION bob; SET ROLE carol")
        );
        // The time zone was set under alice's role: it is replayed under it.
        assert_eq!(
            s.diff_sql(&HashMap::new()).as_deref(),
            Some(
                "SET ROLE alice; SET TIME ZONE 'UTC'; RESET \"role\"; \
                 SET SESSION AUTHORIZATION bob; SET ROLE carol"
            )
        );
        // Another session's role on the connection is reset before this session's
        // settings run.
        let mut other = HashMap::new();
        apply_to_server(&mut other, &[set("role", "SET ROLE mallory")]);
        let mine = Settings::with_baseline(vec![(
            "log_statement".into(),
            "SET log_statement = 'all'".into(),
        )]);
        assert_eq!(
            mine.diff_sql(&other).as_deref(),
            Some("RESET \"role\"; SET log_statement = 'all'")
        );
        assert!(s.apply(&[SessionOp::DiscardAll]));
        assert!(s.values.is_empty());
    }

    /// Each setting replays with the identity it ran with: a superuser-only setting made by
    /// a superuser login before SET ROLE, as the login; one made under a superuser role by
    /// a login that is not, under the role. Only what differs is set when the connection
    /// has the session's identity already.
    #[test]
    fn settings_replay_with_the_identity_they_ran_with() {
        let mut s = Settings::default();
        s.apply(&[
            set("log_statement", "SET log_statement = 'all'"),
            set("role", "SET ROLE dba"),
            set(
                "log_min_duration_statement",
                "SET log_min_duration_statement = 5",
            ),
        ]);
        assert_eq!(
            s.diff_sql(&HashMap::new()).as_deref(),
            Some("SET log_statement = 'all'; SET ROLE dba; SET log_min_duration_statement = 5")
        );
        // The same role on the connection, only the setting made under it differs: set
        // under the role in force.
        let mut conn = s.effective();
        conn.remove("log_min_duration_statement");
        assert_eq!(
            s.diff_sql(&conn).as_deref(),
            Some("SET log_min_duration_statement = 5")
        );
        // A login setting differs: the identity is taken back first and set again.
        let mut conn = s.effective();
        conn.remove("log_statement");
        assert_eq!(
            s.diff_sql(&conn).as_deref(),
            Some("RESET \"role\"; SET log_statement = 'all'; SET ROLE dba")
        );
        // Another session's setting left on the connection: RESET ALL, then all of them.
        let mut conn = s.effective();
        conn.insert("work_mem".into(), "SET work_mem = '1GB'".into());
        assert_eq!(
            s.diff_sql(&conn).as_deref(),
            Some(
                "RESET \"role\"; RESET ALL; SET log_statement = 'all'; SET ROLE dba; \
                 SET log_min_duration_statement = 5"
            )
        );
        assert_eq!(s.diff_sql(&s.effective()), None);
        // A setting made under a role the session left since: replayed under that role.
        let mut s = Settings::default();
        s.apply(&[
            set("role", "SET ROLE admin"),
            set("log_statement", "SET log_statement = 'all'"),
            set("role", "SET ROLE app"),
        ]);
        assert_eq!(
            s.diff_sql(&HashMap::new()).as_deref(),
            Some("SET ROLE admin; SET log_statement = 'all'; RESET \"role\"; SET ROLE app")
        );
        s.apply(&[SessionOp::Reset {
            name: "role".into(),
        }]);
        assert_eq!(
            s.diff_sql(&HashMap::new()).as_deref(),
            Some("SET ROLE admin; SET log_statement = 'all'; RESET \"role\"")
        );
    }
}
