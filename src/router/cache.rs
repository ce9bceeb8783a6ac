//! Classification cache keyed by SQL text, shared by all sessions of one configuration.
//!
//! Sharded so sessions on different cores rarely meet on a lock; each shard is bounded and
//! simply cleared when full (classification is cheap enough that an occasional cold start
//! costs less than LRU bookkeeping on every hit).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use super::{Classification, Target, classify_with};

const SHARDS: usize = 16;
/// SQL texts longer than this are classified every time instead of cached.
const MAX_CACHED_SQL: usize = 16 * 1024;

pub struct ClassifyCache {
    shards: Vec<Mutex<HashMap<Box<str>, Arc<Classification>>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    /// Extra function names (lower-case) that force the primary (`[routing]
    /// primary_functions`).
    primary_functions: Vec<String>,
}

impl ClassifyCache {
    pub fn new(capacity: usize, primary_functions: Vec<String>) -> ClassifyCache {
        ClassifyCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / SHARDS).max(16),
            hasher: Default::default(),
            primary_functions: primary_functions
                .into_iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
        }
    }

    fn shard(&self, sql: &str) -> &Mutex<HashMap<Box<str>, Arc<Classification>>> {
        &self.shards[self.hasher.hash_one(sql) as usize % SHARDS]
    }

    pub fn get(&self, sql: &str) -> Arc<Classification> {
        let shard = self.shard(sql);
        if let Some(c) = lock(shard).get(sql) {
            return c.clone();
        }
        let c = classify_with(sql, &self.primary_functions);
        let c = Arc::new(c);
        if sql.len() > MAX_CACHED_SQL {
            // Bulk statements (multi-megabyte INSERTs) are rarely repeated: caching them
            // would bound the cache by count but not by memory.
            return c;
        }
        let mut map = lock(shard);
        if map.len() >= self.per_shard {
            map.clear();
        }
        map.insert(sql.into(), c.clone());
        c
    }

    /// A replica refused this SQL as a write (SQLSTATE 25006): remember it as one.
    pub fn learn_write(&self, sql: &str) {
        let mut c = (*self.get(sql)).clone();
        c.target = Target::Primary;
        c.writes_unknown = true;
        c.volatile = true;
        lock(self.shard(sql)).insert(sql.into(), Arc::new(c));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a shard cannot leave a half-written map entry, so a poisoned
    // lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    #[test]
    fn stays_bounded() {
        let c = ClassifyCache::new(16 * 16, vec![]);
        for i in 0..10_000 {
            c.get(&format!("SELECT {i}"));
        }
        let total: usize = c.shards.iter().map(|s| lock(s).len()).sum();
        assert!(total <= 16 * 16);
    }
}
