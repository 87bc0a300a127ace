//! A gauge of operations under way, with the most seen at once since it was made.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts operations under way; each holds an [`InFlightGuard`] while it runs.
#[derive(Debug, Default)]
pub struct InFlight {
    now: AtomicU64,
    most: AtomicU64,
}

/// One operation under way; it ends when this is dropped.
#[derive(Debug)]
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// Counts an operation as under way until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard<'_> {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.most.fetch_max(now, Ordering::Relaxed);
        InFlightGuard(self)
    }

    /// Operations under way now.
    pub fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    /// The most operations that were under way at once.
    pub fn most(&self) -> u64 {
        self.most.load(Ordering::Relaxed)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_is_under_way_and_the_most_at_once() {
        let g = InFlight::default();
        let a = g.enter();
        let b = g.enter();
        assert_eq!((g.now(), g.most()), (2, 2));
        drop(a);
        drop(b);
        let _c = g.enter();
        assert_eq!((g.now(), g.most()), (1, 2));
    }
}
