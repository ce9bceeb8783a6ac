//! The session's side of the result cache: which requests may be answered from Redis, the
//! replay of a hit, the capture of a miss's answer, and the invalidation after a committed
//! write (before the client learns of the commit).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tracing::debug;

use super::Session;
use super::request::Item;
use super::state::{Statement, startup_settings};
use crate::backend::BackendId;
use crate::cache::{CachePlan, Fill, KeyParts, Lookup, entry_key, replayable_frames, version_name};
use crate::error::Result;
use crate::protocol::{self, BindNames, Target, TxStatus, decode_target, query_sql, tag};
use crate::router::Classification;

/// Tables written since the last commit, for invalidation when it happens.
#[derive(Debug, Default)]
pub(super) struct WriteSet {
    /// Something was written (a transaction that wrote commits; read-your-writes cares).
    pub any: bool,
    /// Something was written that cannot be attributed to tables: bump the global epoch.
    pub everything: bool,
    /// Version names of the tables written.
    pub tables: Vec<String>,
    /// The tables written as the statements named them, for catalog lookups.
    pub raw_tables: Vec<String>,
    /// The transaction changed `search_path` for itself only: after its COMMIT the names
    /// it wrote may resolve elsewhere, or nowhere.
    pub local_search_path: bool,
}

impl WriteSet {
    pub fn note(&mut self, class: &Classification) {
        self.local_search_path |= class.local_search_path;
        if !class.may_write() {
            return;
        }
        self.any = true;
        self.everything |= class.writes_unknown;
        for t in &class.tables_written {
            let name = version_name(t);
            if !self.tables.contains(&name) {
                self.tables.push(name);
            }
            if !self.raw_tables.contains(t) {
                self.raw_tables.push(t.clone());
            }
        }
    }

    /// A FunctionCall (fast-path) or a statement learned as a write: anything may have
    /// changed.
    pub fn note_unknown(&mut self) {
        self.any = true;
        self.everything = true;
    }
}

/// An answer being recorded for the cache while it streams to the client.
pub(super) struct Capture {
    fill: Fill,
    ttl: Duration,
    buf: BytesMut,
    max: usize,
    too_large: bool,
}

/// A request the cache may answer.
struct Candidate {
    plan: Arc<CachePlan>,
    shape: &'static str,
    params: Vec<u8>,
    /// The statement a Parse in the request defines: registered on a hit, as if parsed.
    parsed: Option<Arc<Statement>>,
}

impl Session {
    /// Answer the request from the cache if it can; on a miss, arrange for the answer to be
    /// captured and for the read to run only where the cached tables' last writes are
    /// replayed. Returns whether the request was answered.
    pub(super) async fn serve_from_cache(&mut self, items: &[Item], open: bool) -> Result<bool> {
        self.capture = None;
        self.read_floor = 0;
        let Some(cache) = self.shared.cache.clone() else {
            return Ok(false);
        };
        if open
            || self.tx != TxStatus::Idle
            || self.pinned
            || self.runtime.cache_rules.is_empty()
            || self.serializable_default()
        {
            // Inside a transaction the answer must come from its snapshot; a pinned session
            // may have temporary tables that shadow the cached ones; a serializable one
            // reads only the primary's present.
            return Ok(false);
        }
        let Some(candidate) = self.cache_candidate(items) else {
            return Ok(false);
        };
        let key = self.cache_key(&candidate);
        // Boxed: the Redis client's futures are large, and would otherwise enlarge every
        // session's state, cache or not.
        match Box::pin(cache.lookup(key, &candidate.plan.tables)).await {
            Lookup::Hit(frames) => {
                debug!("answered from the result cache");
                let mut out = BytesMut::with_capacity(frames.len() + 16);
                if let Some(stmt) = candidate.parsed {
                    protocol::parse_complete().encode_into(&mut out);
                    self.statements.insert(stmt.parse.name.clone(), stmt);
                }
                if candidate.shape != "Q" {
                    protocol::bind_complete().encode_into(&mut out);
                }
                out.put_slice(&frames);
                protocol::ready_for_query(TxStatus::Idle).encode_into(&mut out);
                self.client.write(&out).await?;
                Ok(true)
            }
            Lookup::Miss(fill) => {
                self.read_floor = fill.floor_lsn;
                self.capture = Some(Capture {
                    fill,
                    ttl: candidate.plan.ttl,
                    buf: BytesMut::new(),
                    max: self.runtime.config.cache.max_entry_bytes,
                    too_large: false,
                });
                Ok(false)
            }
            Lookup::Bypass => Ok(false),
        }
    }

    /// The request is one whitelisted read, as a simple Query or as
    /// `[Parse] Bind [Describe portal] Execute Sync` on the unnamed portal.
    fn cache_candidate(&self, items: &[Item]) -> Option<Candidate> {
        let rules = &self.runtime.cache_rules;
        if let [Item::Query { frame, class }] = items {
            let sql = query_sql(&frame.body).ok()?;
            if matches!(sql, Cow::Owned(_)) {
                // Not UTF-8 (another client encoding): the lossy text for the key could be
                // the same for two different statements.
                return None;
            }
            return Some(Candidate {
                plan: rules.plan(&sql, class)?,
                shape: "Q",
                params: Vec::new(),
                parsed: None,
            });
        }
        let mut rest = items;
        let parsed = match rest.first() {
            Some(Item::Parse(s)) => {
                rest = &rest[1..];
                Some(s.clone())
            }
            _ => None,
        };
        let (bind, stmt, describe) = match rest {
            [
                Item::Bind {
                    frame,
                    stmt: Some(s),
                },
                Item::Portal(_),
                Item::Sync,
            ] => (frame, s, None),
            [
                Item::Bind {
                    frame,
                    stmt: Some(s),
                },
                Item::Portal(d),
                Item::Portal(_),
                Item::Sync,
            ] => (frame, s, Some(d)),
            _ => return None,
        };
        let execute = match rest {
            [_, Item::Portal(e), Item::Sync] | [_, _, Item::Portal(e), Item::Sync] => e,
            _ => return None,
        };
        if parsed.as_ref().is_some_and(|p| !Arc::ptr_eq(p, stmt)) {
            return None;
        }
        let names = BindNames::decode(&bind.body).ok()?;
        if !names.portal.is_empty() || !runs_unnamed_portal_to_completion(execute) {
            return None;
        }
        if let Some(d) = describe
            && !(d.tag == tag::DESCRIBE
                && matches!(decode_target(&d.body, "Describe"), Ok(Target::Portal(""))))
        {
            return None;
        }
        if stmt.parse.sql.as_bytes() != &stmt.parse.sql_raw[..] {
            return None;
        }
        let plan = rules.plan(&stmt.parse.sql, &stmt.class)?;
        if text_params_run_time_words(names.tail(&bind.body)) {
            return None;
        }
        let mut params = Vec::with_capacity(stmt.parse.param_types.len() + bind.body.len());
        params.extend_from_slice(&(stmt.parse.param_types.len() as u32).to_be_bytes());
        params.extend_from_slice(&stmt.parse.param_types);
        params.extend_from_slice(names.tail(&bind.body));
        let shape = match (parsed.is_some(), describe.is_some()) {
            (true, true) => "PBDE",
            (true, false) => "PBE",
            (false, true) => "BDE",
            (false, false) => "BE",
        };
        Some(Candidate {
            plan,
            shape,
            params,
            parsed,
        })
    }

    fn cache_key(&mut self, c: &Candidate) -> String {
        let generation = self.settings.generation;
        let settings = match self.settings_digest {
            Some((g, d)) if g == generation => d,
            _ => {
                // Session mode passes startup parameters to the server as such; transaction
                // mode replays them as settings. Either way they shape results.
                let startup = startup_settings(&self.login_params);
                let effective = self.settings.effective();
                let all = startup
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .chain(effective.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .filter(|(k, _)| !IRRELEVANT_SETTINGS.contains(k));
                let d = crate::cache::settings_digest(all);
                self.settings_digest = Some((generation, d));
                d
            }
        };
        entry_key(
            &self.runtime.config.cache.key_prefix,
            &KeyParts {
                user: &self.login_user,
                database: &self.connect.database,
                settings: &settings,
                shape: c.shape,
                normalized_sql: &c.plan.normalized,
                params: &c.params,
            },
        )
    }

    /// Record what is about to go to the client, if an answer is being captured.
    pub(super) fn tee_capture(&mut self) {
        if let Some(c) = self.capture.as_mut()
            && !c.too_large
        {
            if c.buf.len() + self.out.len() > c.max {
                c.too_large = true;
                c.buf = BytesMut::new();
            } else {
                c.buf.extend_from_slice(&self.out);
            }
        }
    }

    /// A request that may run again (on another backend) starts its capture over.
    pub(super) fn restart_capture(&mut self) {
        if let Some(c) = self.capture.as_mut() {
            c.buf.clear();
            c.too_large = false;
        }
    }

    /// The request ended: store a complete, successful captured answer.
    pub(super) fn finish_capture(&mut self) {
        let Some(capture) = self.capture.take() else {
            return;
        };
        self.read_floor = 0;
        let Some(cache) = self.shared.cache.clone() else {
            return;
        };
        if capture.too_large {
            cache
                .stats
                .too_large
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        if self.tx != TxStatus::Idle {
            return;
        }
        let Some(frames) = replayable_frames(&capture.buf) else {
            return;
        };
        // The client has its answer: storing need not delay its next request.
        tokio::spawn(async move {
            cache.store(capture.fill, &frames, capture.ttl).await;
        });
    }

    /// The client must not see a commit before the cache knows of it: a read it sends next,
    /// on any connection to any pgsplit instance, must miss the entries the write outdated.
    /// Any committed write may matter: even one to a table no rule names can cascade
    /// (foreign-key actions, triggers) into one that does. Nor before the other sessions of
    /// its user know its position, when they read its writes (`read_your_writes = "user"`).
    pub(super) fn defer_tail(&self) -> bool {
        (self.tx == TxStatus::Idle || self.committed)
            && self.writes.any
            && ((self.shared.cache.is_some() && self.any_cache_rules()) || self.shares_writes())
    }

    /// Whether this session's configuration or the one in force now has cache rules: a
    /// session keeps the configuration it started a transaction or pinned itself under,
    /// and its writes must still invalidate what sessions under a newer one cached.
    pub(super) fn any_cache_rules(&self) -> bool {
        !self.runtime.cache_rules.is_empty() || !self.shared.runtime.load().cache_rules.is_empty()
    }

    /// After a request that ended outside a transaction: if what it committed wrote,
    /// learn the commit position (read-your-writes) and invalidate the cache.
    pub(super) async fn settle_writes(&mut self, conn: BackendId) {
        let committed = std::mem::take(&mut self.committed);
        if !self.writes.any {
            if self.tx == TxStatus::Idle {
                // A block that wrote nothing leaves nothing for the next one.
                self.writes.local_search_path = false;
            }
            return;
        }
        if self.tx != TxStatus::Idle {
            if committed && conn.is_primary() {
                // COMMIT AND CHAIN, or `COMMIT; BEGIN` in one request: what it changed
                // cannot be asked inside the new block (a query there would take the
                // block's snapshot before the client's first statement does). The writes
                // stay noted, for the block's own commit: some may have come after the
                // COMMIT.
                Box::pin(self.invalidate_unknown_commit()).await;
            }
            return;
        }
        let invalidate = self.any_cache_rules();
        let mut writes = std::mem::take(&mut self.writes);
        if !conn.is_primary() {
            return;
        }
        let cache = self.shared.cache.clone().filter(|_| invalidate);
        let facts = match self.commit_facts_query(&writes) {
            Some(sql) => self.learn_commit(&sql).await,
            None => None,
        };
        if cache.is_some() && facts.is_none() {
            // What the commit changed, and where, is unknown (its query failed, or the
            // connection): everything goes, at a position read before the commit, and once
            // more at one read after it.
            return Box::pin(self.invalidate_unknown_commit()).await;
        }
        if let Some(cache) = cache {
            // Unknown position (the primary connection failed right after the commit): the
            // health checker's last view of the primary is the best bound left.
            let lsn = facts
                .as_ref()
                .map_or_else(|| self.runtime.backends.primary.health.lsn(), |f| f.lsn);
            match &facts {
                Some(f) => {
                    for d in &f.dependents {
                        let name = version_name(d);
                        if !writes.tables.contains(&name) {
                            writes.tables.push(name);
                        }
                    }
                    writes.everything |= f.triggers;
                }
                // What cascades and triggers changed is unknown too.
                None => writes.everything = true,
            }
            let current = self.shared.runtime.load();
            writes
                .tables
                .retain(|t| self.runtime.cache_rules.guards(t) || current.cache_rules.guards(t));
            if writes.everything || !writes.tables.is_empty() {
                Box::pin(cache.invalidate(&writes.tables, writes.everything, lsn)).await;
            }
        }
    }

    /// Invalidate the whole cache for a commit on the primary whose facts cannot be asked
    /// (a COMMIT with a block open again behind it, a commit in doubt).
    pub(super) async fn invalidate_unknown_commit(&mut self) {
        if !self.any_cache_rules() {
            return;
        }
        let Some(cache) = self.shared.cache.clone() else {
            return;
        };
        let health = &self.runtime.backends.primary.health;
        let samples = health.lsn_samples();
        cache.invalidate(&[], true, health.lsn()).await;
        // That position was read before the commit: a replica that reached it may still
        // lack the commit and refill what it outdated. Once the health checker has read
        // the position twice more (the first read may have begun before the commit), bump
        // again at the newer one; such refills last about two health intervals at most.
        let runtime = self.runtime.clone();
        let interval = self.runtime.config.health.interval();
        tokio::spawn(async move {
            let health = &runtime.backends.primary.health;
            // Not for ever: a primary that stays down is sampled no more.
            for _ in 0..40 {
                if health.lsn_samples() >= samples + 2 {
                    cache.invalidate(&[], true, health.lsn()).await;
                    return;
                }
                tokio::time::sleep(interval / 4).await;
            }
        });
    }
}

/// The commit position, plus what else the write may have changed: through foreign-key
/// actions (cascades, SET NULL, SET DEFAULT, transitively), inheritance and partitions,
/// updatable views and rules, and for the views and row-level security policies reading
/// any of it; and whether user triggers ran on any of it. `by_bare_name`: the names are
/// also looked up in every schema (see [`WriteSet::local_search_path`]).
pub(super) fn commit_facts_sql(tables: &[String], by_bare_name: bool) -> String {
    let names: Vec<String> = tables
        .iter()
        .map(|t| {
            // As the classifier reports them: unquoted names are already folded; others
            // need quotes to resolve.
            let regclass_text = t
                .split('.')
                .map(|part| {
                    if part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    {
                        part.to_owned()
                    } else {
                        format!("\"{}\"", part.replace('"', "\"\""))
                    }
                })
                .collect::<Vec<_>>()
                .join(".");
            format!("'{}'", regclass_text.replace('\'', "''"))
        })
        .collect();
    // The query runs after the COMMIT, under the session's search_path: a transaction that
    // wrote under one of its own also seeds every relation of the same name (which only
    // walks more than needed), else the relations it wrote may not be found.
    let bare_seeds = if by_bare_name {
        let bare: Vec<String> = tables
            .iter()
            .map(|t| {
                let name = t.rsplit('.').next().unwrap_or(t);
                format!("'{}'", name.replace('\'', "''"))
            })
            .collect();
        format!(
            " UNION SELECT c.oid FROM pg_catalog.pg_class c \
             WHERE c.relname = ANY(ARRAY[{}]::text[]) AND c.relkind IN ('r','p','v','m','f')",
            bare.join(",")
        )
    } else {
        String::new()
    };
    // w walks from the written relations to every relation whose rows or reads the write
    // may have changed. Downwards (`down`, from the named relations only): inheritance
    // children and partitions, and what a view or rule on them writes through to.
    // From everything reached: foreign-key actions, inheritance parents, the views that
    // read it, and the tables whose row-level security policies read it (what those show
    // changes with it). Only rows of `down` relations change, so only their triggers fire. One recursive term with LATERAL keeps the planner's estimate small
    // (two recursive CTEs made it large enough to JIT-compile a 1 ms query for 300 ms).
    format!(
        "WITH RECURSIVE w(oid, down) AS (\
           SELECT s.oid, true FROM (\
             SELECT to_regclass(n)::oid FROM unnest(ARRAY[{}]::text[]) n \
             WHERE to_regclass(n) IS NOT NULL{}) s(oid) \
           UNION \
           SELECT x.oid, x.down FROM w, LATERAL (\
             SELECT i.inhrelid, true FROM pg_catalog.pg_inherits i WHERE w.down AND i.inhparent = w.oid \
             UNION ALL \
             SELECT d.refobjid, true FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d \
               ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid \
               AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> r.ev_class \
             WHERE w.down AND r.ev_class = w.oid \
             UNION ALL \
             SELECT k.conrelid, true FROM pg_catalog.pg_constraint k \
             WHERE k.confrelid = w.oid AND k.contype = 'f' \
               AND (k.confdeltype IN ('c','n','d') OR k.confupdtype IN ('c','n','d')) \
             UNION ALL \
             SELECT i.inhparent, false FROM pg_catalog.pg_inherits i WHERE i.inhrelid = w.oid \
             UNION ALL \
             SELECT p.polrelid, false FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_policy p \
               ON d.classid = 'pg_catalog.pg_policy'::regclass AND d.objid = p.oid \
             WHERE d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = w.oid \
               AND p.polrelid <> w.oid \
             UNION ALL \
             SELECT r.ev_class, false FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_rewrite r \
               ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid \
             WHERE d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = w.oid \
               AND r.ev_class <> w.oid AND r.ev_type = '1') x(oid, down)) \
         SELECT {}, \
           (SELECT string_agg(DISTINCT c.relname, ',') FROM w JOIN pg_catalog.pg_class c ON c.oid = w.oid), \
           (SELECT count(*) FROM pg_catalog.pg_trigger t \
            WHERE NOT t.tgisinternal AND t.tgrelid IN (SELECT oid FROM w WHERE down))",
        names.join(","),
        bare_seeds,
        super::backends::COMMIT_POSITION_SQL,
    )
}

/// Startup parameters that cannot change a query's result. (Not `application_name`: a
/// row-level security policy or a view may read it, as multi-tenant setups do.)
const IRRELEVANT_SETTINGS: &[&str] = &[super::CONSISTENCY_SETTING];

/// Whether a text-format parameter value holds a word the server reads as a moment
/// ('now', 'today', ...): `WHERE day = $1::date` with 'today' has another answer tomorrow.
/// Any value that cannot be read counts too.
fn text_params_run_time_words(tail: &[u8]) -> bool {
    protocol::bind_text_values(tail)
        .is_none_or(|values| values.iter().any(|v| crate::router::names_a_moment(v)))
}

/// Execute of the unnamed portal with no row limit.
fn runs_unnamed_portal_to_completion(execute: &protocol::Frame) -> bool {
    execute.tag == tag::EXECUTE && execute.body.len() == 5 && execute.body[..] == [0, 0, 0, 0, 0]
}
