//! Weighted round robin over replicas: a precomputed, interleaved wheel walked by one atomic
//! counter, so picking a replica takes no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct Balancer {
    /// Replica indices, each appearing `weight` times, spread out (smooth weighted order).
    wheel: Vec<usize>,
    next: AtomicUsize,
}

impl Balancer {
    pub fn new(weights: &[u32]) -> Balancer {
        Balancer {
            wheel: smooth_wheel(weights),
            next: AtomicUsize::new(0),
        }
    }

    /// The next index in weighted order for which `available` holds; `None` when no
    /// replica with a positive weight is available.
    pub fn pick(&self, available: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.wheel.len();
        if n == 0 {
            return None;
        }
        // Each skip takes its own turn of the counter, so the replicas that are left share
        // the load of a missing one evenly instead of its successor taking all of it.
        (0..n)
            .map(|_| self.wheel[self.next.fetch_add(1, Ordering::Relaxed) % n])
            .find(|&i| available(i))
    }
}

/// Nginx-style smooth weighted round robin, unrolled once over the sum of weights: weights
/// 2:1 give `a b a` rather than `a a b`.
fn smooth_wheel(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut wheel = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = None;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0 {
                continue;
            }
            current[i] += w as i64;
            if best.is_none_or(|b: usize| current[i] > current[b]) {
                best = Some(i);
            }
        }
        if let Some(b) = best {
            current[b] -= total;
            wheel.push(b);
        }
    }
    wheel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(b: &Balancer, picks: usize, avail: impl Fn(usize) -> bool + Copy) -> Vec<usize> {
        let mut c = vec![0; 3];
        for _ in 0..picks {
            if let Some(i) = b.pick(avail) {
                c[i] += 1;
            }
        }
        c
    }

    #[test]
    fn equal_weights_alternate() {
        let b = Balancer::new(&[1, 1]);
        let seq: Vec<_> = (0..4).map(|_| b.pick(|_| true).unwrap()).collect();
        assert_eq!(seq, vec![0, 1, 0, 1]);
    }

    #[test]
    fn weights_are_honoured_and_interleaved() {
        let b = Balancer::new(&[2, 1, 0]);
        assert_eq!(b.wheel, vec![0, 1, 0]);
        assert_eq!(counts(&b, 300, |_| true), vec![200, 100, 0]);
    }

    #[test]
    fn unavailable_replicas_are_skipped() {
        let b = Balancer::new(&[1, 1, 1]);
        assert_eq!(counts(&b, 90, |i| i != 1), vec![45, 0, 45]);
        assert_eq!(b.pick(|_| false), None);
        assert_eq!(Balancer::new(&[]).pick(|_| true), None);
        assert_eq!(Balancer::new(&[0, 0]).pick(|_| true), None);
    }
}
