//! Places in pools: the permits that bound the server connections of one (server address,
//! server user, database). Every configuration a reload leaves running (sessions still on
//! the old one, pinned or idle ones) takes its places from the same sets, so that `[pool]
//! size` bounds them all together, and a reload resizes the sets in place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Which set: server address, server user, database.
pub type PlacesKey = (String, String, String);

/// One set of places, shared by the pools of every configuration for its key.
#[derive(Clone)]
pub struct Places {
    pub(super) permits: Arc<Semaphore>,
    /// Permits over the size still to be taken out as they come back (a reload lowered
    /// the size while they were in use).
    pub(super) excess: Arc<AtomicUsize>,
    /// A connection for this key has logged in (the role and database exist).
    pub(super) reached: Arc<AtomicBool>,
}

/// A place in a pool. Dropped, it goes back to its set, or out of it while the set has more
/// permits than its size (after a reload lowered it), so that the lower size holds also
/// while clients queue for places.
pub struct Place {
    pub(super) permit: Option<OwnedSemaphorePermit>,
    pub(super) excess: Arc<AtomicUsize>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take()
            && self
                .excess
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        {
            permit.forget();
        }
    }
}

/// Every set of places, and the size they have (the running configuration's).
pub struct PlaceSets {
    inner: Mutex<Sets>,
}

struct Sets {
    size: usize,
    sets: HashMap<PlacesKey, Places>,
}

impl PlaceSets {
    pub fn new(size: usize) -> Arc<PlaceSets> {
        Arc::new(PlaceSets {
            inner: Mutex::new(Sets {
                size,
                sets: HashMap::new(),
            }),
        })
    }

    /// The set for `key`, made at the current size at its first use.
    pub fn get(&self, key: &PlacesKey) -> Places {
        let mut inner = lock(&self.inner);
        let size = inner.size;
        inner
            .sets
            .entry(key.clone())
            .or_insert_with(|| Places {
                permits: Arc::new(Semaphore::new(size)),
                excess: Arc::new(AtomicUsize::new(0)),
                reached: Arc::new(AtomicBool::new(false)),
            })
            .clone()
    }

    /// A reload installed `size`: every set goes to it, at once where that adds permits
    /// (clients waiting for one get theirs now); where it removes some, those free now go
    /// at once and the rest as they come back (see [`Place`]).
    pub fn resize(&self, size: usize) {
        let mut inner = lock(&self.inner);
        let old = std::mem::replace(&mut inner.size, size);
        for set in inner.sets.values() {
            // Taken over whole: a place dropped meanwhile goes back as usual, counted in.
            let total = old + set.excess.swap(0, Ordering::Relaxed);
            if total <= size {
                set.permits.add_permits(size - total);
            } else {
                let surplus = total - size;
                let forgotten = set.permits.forget_permits(surplus);
                set.excess.fetch_add(surplus - forgotten, Ordering::Relaxed);
            }
        }
    }

    /// How many sets exist (for tests).
    pub fn len(&self) -> usize {
        lock(&self.inner).sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget `key`'s set if nothing uses it (no pool of any configuration, no place held)
    /// and no connection for it ever logged in (a made-up database's): a client making up
    /// names must not leave one behind.
    pub fn forget_unused(&self, key: &PlacesKey) {
        let mut inner = lock(&self.inner);
        if inner.sets.get(key).is_some_and(|set| {
            // Pools and places hold the semaphore too; new ones come only through this
            // lock.
            Arc::strong_count(&set.permits) == 1 && !set.reached.load(Ordering::Relaxed)
        }) {
            inner.sets.remove(key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only map and counter updates happen under this lock: a panic cannot leave it
    // inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PlacesKey {
        ("127.0.0.1:5432".into(), "app".into(), "appdb".into())
    }

    fn take(places: &Places) -> Place {
        Place {
            permit: Some(places.permits.clone().try_acquire_owned().unwrap()),
            excess: places.excess.clone(),
        }
    }

    /// A reload resizes every set: a larger size adds the difference at once; a smaller one
    /// takes out what is free now, and the rest as places in use are dropped, even with
    /// clients queued for them. Every configuration gets the same set.
    #[test]
    fn sets_resize_in_place_and_are_shared() {
        let sets = PlaceSets::new(3);
        let places = sets.get(&key());
        let held = [take(&places), take(&places)];
        assert!(Arc::ptr_eq(&sets.get(&key()).permits, &places.permits));
        sets.resize(5);
        assert_eq!(places.permits.available_permits(), 3);
        // Down to 1 with 2 in use: the 3 free go, and 1 of those in use is one too many.
        sets.resize(1);
        let excess = || places.excess.load(Ordering::Relaxed);
        assert_eq!((places.permits.available_permits(), excess()), (0, 1));
        let [first, second] = held;
        drop(first);
        assert_eq!(
            places.permits.available_permits(),
            0,
            "the first one back goes"
        );
        drop(second);
        assert_eq!(
            places.permits.available_permits(),
            1,
            "the next one is the size"
        );
        sets.resize(2);
        assert_eq!(places.permits.available_permits(), 2);
    }

    #[test]
    fn only_unused_sets_of_unreached_servers_are_forgotten() {
        let sets = PlaceSets::new(2);
        let pool = sets.get(&key());
        let reached = pool.reached.clone();
        let is_the_same = |sets: &PlaceSets| Arc::ptr_eq(&sets.get(&key()).reached, &reached);
        sets.forget_unused(&key());
        assert!(is_the_same(&sets), "a pool uses it");
        let held = take(&pool);
        drop(pool);
        sets.forget_unused(&key());
        assert!(is_the_same(&sets), "a place is held");
        drop(held);
        reached.store(true, Ordering::Relaxed);
        sets.forget_unused(&key());
        assert!(is_the_same(&sets), "it logged in");
        reached.store(false, Ordering::Relaxed);
        sets.forget_unused(&key());
        assert_eq!(sets.len(), 0, "forgotten");
    }
}
