//! Classification cache keyed by SQL text, shared by all sessions of one configuration.

use std::sync::Arc;

use super::{Classification, Target, classify_with};
use crate::memo::SqlMemo;

pub struct ClassifyCache {
    memo: SqlMemo<Arc<Classification>>,
    /// Extra function names (lower-case) that force the primary (`[routing]
    /// primary_functions`).
    primary_functions: Vec<String>,
}

impl ClassifyCache {
    pub fn new(capacity: usize, primary_functions: Vec<String>) -> ClassifyCache {
        ClassifyCache {
            memo: SqlMemo::new(capacity),
            primary_functions: primary_functions
                .into_iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn get(&self, sql: &str) -> Arc<Classification> {
        self.memo.get_or_insert_with(sql, || {
            Arc::new(classify_with(sql, &self.primary_functions))
        })
    }

    /// A replica refused this SQL as a write (SQLSTATE 25006): remember it as one.
    pub fn learn_write(&self, sql: &str) {
        let mut c = (*self.get(sql)).clone();
        c.target = Target::Primary;
        c.writes_unknown = true;
        c.volatile = true;
        self.memo.insert(sql, Arc::new(c));
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
