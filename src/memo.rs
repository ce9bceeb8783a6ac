//! A bounded map from SQL text to something derived from it, shared by all sessions.
//!
//! Sharded so sessions on different cores rarely meet on a lock; each shard is simply
//! cleared when full (what it holds is cheap enough to derive again that an occasional cold
//! start costs less than LRU bookkeeping on every hit).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

const SHARDS: usize = 16;
/// SQL texts longer than this are not kept: bulk statements (multi-megabyte INSERTs) are
/// rarely repeated, and keeping them would bound the map by count but not by memory.
pub const MAX_MEMO_SQL: usize = 16 * 1024;

pub struct SqlMemo<V> {
    shards: Vec<Mutex<HashMap<Box<str>, V>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl<V: Clone> SqlMemo<V> {
    pub fn new(capacity: usize) -> Self {
        SqlMemo {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: (capacity / SHARDS).max(16),
            hasher: Default::default(),
        }
    }

    fn shard(&self, sql: &str) -> &Mutex<HashMap<Box<str>, V>> {
        &self.shards[self.hasher.hash_one(sql) as usize % SHARDS]
    }

    pub fn get(&self, sql: &str) -> Option<V> {
        lock(self.shard(sql)).get(sql).cloned()
    }

    /// Remember `value` for `sql` (unless the text is too long to keep).
    pub fn insert(&self, sql: &str, value: V) {
        if sql.len() > MAX_MEMO_SQL {
            return;
        }
        let mut map = lock(self.shard(sql));
        if map.len() >= self.per_shard && !map.contains_key(sql) {
            map.clear();
        }
        map.insert(sql.into(), value);
    }

    /// The value for `sql`, derived with `make` on a miss.
    pub fn get_or_insert_with(&self, sql: &str, make: impl FnOnce() -> V) -> V {
        if let Some(v) = self.get(sql) {
            return v;
        }
        let v = make();
        self.insert(sql, v.clone());
        v
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    fn stays_bounded_and_skips_long_texts() {
        let m = SqlMemo::new(16 * 16);
        for i in 0..10_000 {
            m.insert(&format!("SELECT {i}"), i);
        }
        assert!(m.len() <= 16 * 16);
        let long = "x".repeat(MAX_MEMO_SQL + 1);
        assert_eq!(m.get_or_insert_with(&long, || 7), 7);
        assert_eq!(m.get(&long), None);
        assert_eq!(m.get_or_insert_with("SELECT 1", || 1), 1);
        assert_eq!(m.get_or_insert_with("SELECT 1", || 2), 1);
    }
}
