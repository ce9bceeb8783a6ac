//! The statements one server connection has prepared, bounded with least-recently-used
//! eviction (a pooled connection serves many clients and would otherwise collect every
//! statement any of them ever prepared).

/// Statements set aside by [`PreparedSet::take_all`].
#[derive(Debug, Default)]
pub struct PreparedNames(foldhash::HashMap<String, u64>);

#[derive(Debug)]
pub struct PreparedSet {
    /// Server-side name → the tick of its last use (looked up at every Bind). The names
    /// are digests of the statement text, colliding ones would take the process's
    /// foldhash seed (see `SqlMemo::hasher`), and the set is bounded.
    names: foldhash::HashMap<String, u64>,
    tick: u64,
    capacity: usize,
}

impl PreparedSet {
    pub fn new(capacity: usize) -> PreparedSet {
        PreparedSet {
            names: Default::default(),
            tick: 0,
            capacity: capacity.max(1),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Mark a statement as used now; whether the connection has it (one lookup for both).
    pub fn touch(&mut self, name: &str) -> bool {
        self.tick += 1;
        match self.names.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Record a statement being prepared. Returns the statement that must be closed on the
    /// server first to stay within capacity, if any.
    pub fn insert(&mut self, name: &str) -> Option<String> {
        self.tick += 1;
        let evicted = if self.names.len() >= self.capacity && !self.names.contains_key(name) {
            let victim = self
                .names
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(n, _)| n.clone());
            if let Some(v) = &victim {
                self.names.remove(v);
            }
            victim
        } else {
            None
        };
        self.names.insert(name.to_owned(), self.tick);
        evicted
    }

    /// Put back a statement whose eviction did not happen (its Close was skipped).
    pub fn restore(&mut self, name: &str) {
        self.names.entry(name.to_owned()).or_insert(0);
    }

    pub fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }

    /// Every statement taken out (the server is about to drop them all), to be put back
    /// with [`PreparedSet::put_back`] should it not.
    pub fn take_all(&mut self) -> PreparedNames {
        PreparedNames(std::mem::take(&mut self.names))
    }

    /// Put back what [`PreparedSet::take_all`] took (the server did not drop them).
    pub fn put_back(&mut self, taken: PreparedNames) {
        for (name, tick) in taken.0 {
            self.names.entry(name).or_insert(tick);
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used() {
        let mut p = PreparedSet::new(2);
        assert_eq!(p.insert("a"), None);
        assert_eq!(p.insert("b"), None);
        assert!(p.touch("a"));
        assert!(!p.touch("z"), "touching an absent name adds nothing");
        assert_eq!(p.insert("c"), Some("b".to_owned()));
        assert!(p.contains("a") && p.contains("c") && !p.contains("b"));
        assert_eq!(
            p.insert("c"),
            None,
            "re-inserting a present name evicts nothing"
        );
        assert_eq!(p.len(), 2);
    }
}
