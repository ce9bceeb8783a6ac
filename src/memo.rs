//! A bounded map from SQL text to something derived from it, shared by all sessions.
//!
//! Sharded so sessions on different cores rarely meet on a lock; each shard is simply
//! cleared when full (what it holds is cheap enough to derive again that an occasional cold
//! start costs less than LRU bookkeeping on every hit).

use std::hash::BuildHasher;
use std::sync::Mutex;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

const SHARDS: usize = 16;
/// SQL texts longer than this are not kept: bulk statements (multi-megabyte INSERTs) are
/// rarely repeated, and keeping them would bound the map by count but not by memory.
pub const MAX_MEMO_SQL: usize = 16 * 1024;

/// Each entry keeps its text's hash, compared before the text.
type Shard<V> = Mutex<HashTable<(u64, Box<str>, V)>>;

/// Each text is hashed once per lookup: the hash picks the shard and the slot (a
/// `HashMap` per shard would hash it a second time).
pub struct SqlMemo<V> {
    shards: Vec<Shard<V>>,
    per_shard: usize,
    /// foldhash with a random seed: about a sixth of SipHash's cost on a statement-sized
    /// text, which is hashed at every classification. Texts come from clients, and foldhash
    /// resists collisions only while its per-process seed stays unknown: it is not keyed
    /// the way SipHash is, and its authors advise against it where an adversary can study
    /// the program's behaviour to recover the seed. Through the network, timing a lookup
    /// that probes a few more slots is lost in the jitter. Were the seed known, colliding
    /// texts could lengthen the probes of one shard up to `per_shard` entries (it is
    /// cleared when full); texts are compared only when their full 64-bit hashes match.
    hasher: foldhash::fast::RandomState,
}

impl<V: Clone> SqlMemo<V> {
    pub fn new(capacity: usize) -> Self {
        SqlMemo {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            per_shard: (capacity / SHARDS).max(16),
            hasher: Default::default(),
        }
    }

    fn shard(&self, hash: u64) -> &Shard<V> {
        // Bits the tables do not use for slots (low bits) or tags (top seven).
        &self.shards[(hash >> 40) as usize % SHARDS]
    }

    pub fn get(&self, sql: &str) -> Option<V> {
        let hash = self.hasher.hash_one(sql);
        lock(self.shard(hash))
            .find(hash, |(h, k, _)| *h == hash && **k == *sql)
            .map(|(_, _, v)| v.clone())
    }

    /// Remember `value` for `sql` (unless the text is too long to keep).
    pub fn insert(&self, sql: &str, value: V) {
        if sql.len() > MAX_MEMO_SQL {
            return;
        }
        let hash = self.hasher.hash_one(sql);
        let mut table = lock(self.shard(hash));
        let same = |(h, k, _): &(u64, Box<str>, V)| *h == hash && **k == *sql;
        if table.len() >= self.per_shard && table.find(hash, same).is_none() {
            table.clear();
        }
        match table.entry(hash, same, |(h, _, _)| *h) {
            Entry::Occupied(mut e) => e.get_mut().2 = value,
            Entry::Vacant(e) => {
                e.insert((hash, sql.into(), value));
            }
        }
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

    #[test]
    fn a_second_insert_replaces_and_every_text_is_found() {
        let m = SqlMemo::new(4096);
        for i in 0..1000 {
            m.insert(&format!("SELECT {i}"), i);
        }
        m.insert("SELECT 7", 70);
        assert_eq!(m.len(), 1000);
        assert_eq!(m.get("SELECT 7"), Some(70));
        assert!(
            (0..1000)
                .filter(|i| *i != 7)
                .all(|i| m.get(&format!("SELECT {i}")) == Some(i))
        );
        assert_eq!(m.get("SELECT 1000"), None);
    }
}
