//! Classification cache keyed by SQL text, shared by all sessions of one configuration, with
//! a second level keyed by the text's shape (literals masked) so that statements differing
//! only in literal values are parsed once.

use std::sync::Arc;

use super::fingerprint::{fingerprint, fingerprint_into};
use super::{Classification, Target, classify_with};
use crate::memo::SqlMemo;

/// The per-thread shape buffer is given back once it grew past this.
const MAX_KEPT_SHAPE: usize = 64 * 1024;

pub struct ClassifyCache {
    memo: SqlMemo<Arc<Classification>>,
    /// By shape: only classifications that do not carry literal values (no session
    /// operations, no read-back settings).
    shapes: SqlMemo<Arc<Classification>>,
    /// Extra function names (lower-case) that force the primary (`[routing]
    /// primary_functions`).
    primary_functions: Vec<String>,
}

impl ClassifyCache {
    pub fn new(capacity: usize, primary_functions: Vec<String>) -> ClassifyCache {
        ClassifyCache {
            memo: SqlMemo::new(capacity),
            shapes: SqlMemo::new(capacity),
            primary_functions: primary_functions
                .into_iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn get(&self, sql: &str) -> Arc<Classification> {
        thread_local! {
            // Every simple-protocol query with a literal is masked: one buffer per thread
            // instead of an allocation per query.
            static SHAPE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        SHAPE.with(|buf| match buf.try_borrow_mut() {
            Ok(mut shape) => {
                let c = self.get_with(sql, &mut shape);
                if shape.capacity() > MAX_KEPT_SHAPE {
                    // One bulk statement must not keep megabytes per thread.
                    *shape = String::new();
                }
                c
            }
            Err(_) => self.get_with(sql, &mut String::new()),
        })
    }

    fn get_with(&self, sql: &str, shape: &mut String) -> Arc<Classification> {
        let shaped = fingerprint_into(sql, shape);
        if shaped && let Some(c) = self.shapes.get(shape) {
            return c;
        }
        if let Some(c) = self.memo.get(sql) {
            return c;
        }
        let c = Arc::new(classify_with(sql, &self.primary_functions));
        if shaped && c.parsed && c.session_ops.is_empty() && c.read_back.is_empty() && !c.by_literal
        {
            // Texts with literals go by their shape only: caching each would fill the map
            // with statements seen once. Not what the classifier could not read: the
            // fingerprint may cut such a text into other statements than sqlparser did, and
            // a text of the same shape can hold a SET that must be seen.
            self.shapes.insert(shape, c.clone());
        } else {
            self.memo.insert(sql, c.clone());
        }
        c
    }

    /// A replica refused this SQL as a write (SQLSTATE 25006): remember it as one.
    pub fn learn_write(&self, sql: &str) {
        self.learn(sql, true);
    }

    /// A replica cannot serve this read (an unlogged table): it goes to the primary.
    pub fn learn_primary_read(&self, sql: &str) {
        self.learn(sql, false);
    }

    fn learn(&self, sql: &str, writes: bool) {
        let mut c = (*self.get(sql)).clone();
        c.target = Target::Primary;
        if writes {
            c.writes_unknown = true;
            c.volatile = true;
        }
        let c = Arc::new(c);
        if let Some(shape) = fingerprint(sql) {
            self.shapes.insert(&shape, c.clone());
        }
        self.memo.insert(sql, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caches_and_learns_writes() {
        let c = ClassifyCache::new(64, vec![]);
        let a = c.get("SELECT f()");
        assert!(Arc::ptr_eq(&a, &c.get("SELECT f()")));
        c.learn_write("SELECT f()");
        assert_eq!(c.get("SELECT f()").target, Target::Primary);
        assert!(c.get("SELECT f()").writes_unknown);
        // A read only the primary can serve stays a read.
        c.learn_primary_read("SELECT v FROM unlogged_t WHERE id = 1");
        let r = c.get("SELECT v FROM unlogged_t WHERE id = 2");
        assert_eq!(r.target, Target::Primary);
        assert!(!r.writes_unknown && !r.may_write() && !r.volatile);
    }

    /// Whether a standby takes a transaction-scoped setting depends on its value: texts
    /// that differ only in it are judged each by itself.
    #[test]
    fn a_transaction_setting_is_judged_by_its_value_through_the_cache() {
        let c = ClassifyCache::new(64, vec![]);
        for (sql, refused) in [
            (
                "SET LOCAL transaction_isolation TO 'repeatable read'",
                false,
            ),
            ("SET LOCAL transaction_isolation TO 'serializable'", true),
            ("SET LOCAL transaction_read_only = 'on'", false),
            ("SET LOCAL transaction_read_only = 'off'", true),
            ("SET transaction_read_only = 1", false),
            ("SET transaction_read_only = 0", true),
            ("SET LOCAL transaction_read_only TO DEFAULT", true),
        ] {
            assert_eq!(c.get(sql).standby_refuses, refused, "{sql}");
            assert!(c.get(sql).tx_local, "{sql}");
        }
    }

    #[test]
    fn statements_differing_in_literals_share_one_classification() {
        let c = ClassifyCache::new(64, vec![]);
        let a = c.get("SELECT abalance FROM pgbench_accounts WHERE aid = 17");
        let b = c.get("SELECT abalance FROM pgbench_accounts WHERE aid = 99");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.target, Target::Replica);
        // Literal-carrying session operations are classified per text.
        let s1 = c.get("SET statement_timeout = 1000");
        let s2 = c.get("SET statement_timeout = 2000");
        assert_ne!(s1.session_ops, s2.session_ops);
        // A learned write covers the whole shape.
        c.learn_write("SELECT f(1)");
        assert_eq!(c.get("SELECT f(2)").target, Target::Primary);
        // 'now' is evaluated at run time: never shared with another literal.
        assert!(
            !c.get("SELECT 'x'::timestamptz FROM t WHERE id = 1")
                .volatile
        );
        assert!(
            c.get("SELECT 'now'::timestamptz FROM t WHERE id = 1")
                .volatile
        );
    }

    #[test]
    fn a_decision_taken_by_a_literal_is_not_shared_by_shape() {
        let c = ClassifyCache::new(64, vec![]);
        assert_eq!(
            c.get("SELECT current_setting('server_version_num')").target,
            Target::Replica
        );
        assert_eq!(
            c.get("SELECT current_setting('transaction_read_only')")
                .target,
            Target::Primary
        );
        // The setting's name stays in the shape; other literals do not.
        let tenant = |id: u32| {
            c.get(&format!(
                "SELECT * FROM t WHERE tenant = current_setting ( 'app.tenant') AND id = {id}"
            ))
        };
        assert!(Arc::ptr_eq(&tenant(1), &tenant(2)));
        assert_eq!(
            c.get("SELECT current_setting(('server_version_num'))")
                .target,
            Target::Replica
        );
        assert_eq!(
            c.get("SELECT current_setting(('in_hot_standby'))").target,
            Target::Primary
        );
        assert_eq!(tenant(3).target, Target::Replica);
        // Spellings whose setting name the shape does not keep.
        for (probe, target) in [
            (
                "SELECT current_setting(CAST('server_version' AS text))",
                Target::Replica,
            ),
            (
                "SELECT current_setting(CAST('transaction_read_only' AS text))",
                Target::Primary,
            ),
            (
                "SELECT \"current_setting\"('server_version')",
                Target::Replica,
            ),
            (
                "SELECT \"current_setting\"('transaction_read_only')",
                Target::Primary,
            ),
        ] {
            assert_eq!(c.get(probe).target, target, "{probe}");
        }
        // Which name set_config sets decides whether the transaction's search_path moves.
        for (sql, local) in [
            ("SELECT set_config('app.tenant', $1, true)", false),
            ("SELECT set_config('search_path', $1, true)", true),
            ("SELECT set_config('app.tenant', '7', true)", false),
            ("SELECT set_config('search_path', 'tenant_7', true)", true),
        ] {
            assert_eq!(c.get(sql).local_search_path, local, "{sql}");
        }
        assert!(
            !c.get("EXPLAIN (ANALYZE 0) SELECT pg_advisory_lock(1)")
                .pins_session
        );
        assert!(
            c.get("EXPLAIN (ANALYZE 1) SELECT pg_advisory_lock(2)")
                .pins_session
        );
        // What the classifier could not read is kept per text: another text of its shape
        // may hold a SET. (Texts with comments, like this one, have no shape at all.)
        let hidden_set = "SELECT 1 >/* ' */ 0; SET search_path = evil; SELECT ' AS a --'";
        assert!(!c.get(hidden_set).parsed && fingerprint(hidden_set).is_none());
        let unparsed = "ALTER SEQUENCE s RESTART WITH 1";
        assert!(!c.get(unparsed).parsed);
        let shape = fingerprint(unparsed).expect("a literal to mask");
        assert!(c.shapes.get(&shape).is_none());
    }

    #[test]
    fn configured_primary_functions_force_the_primary() {
        let c = ClassifyCache::new(64, vec!["Bump_Counter".into()]);
        assert_eq!(c.get("select bump_counter (1)").target, Target::Primary);
        assert_eq!(
            c.get("select my_bump_counter(1)").target,
            c.get("select f(1)").target
        );
        assert_eq!(c.get("select 'bump_counter'").target, Target::Replica);
    }
}
