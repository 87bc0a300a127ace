//! Releases of written files that finish after close(2) has returned ("close-behind").
//!
//! On a sole mount a close does not wait for its file's upload and commit: the release that
//! follows it hands them to a background thread. [`Closing`] keeps count of those, so that
//! closes wait once too many are under way, and fsync of a directory and unmount wait for the
//! ones begun before them.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The releases finishing in the background.
#[derive(Debug)]
pub struct Closing {
    state: Mutex<State>,
    changed: Condvar,
    limit: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The next ticket to hand out.
    next: u64,
    /// Tickets of the releases under way.
    under_way: BTreeSet<u64>,
}

/// One release under way; it ends when this is dropped.
#[derive(Debug)]
pub struct Ticket {
    closing: Arc<Closing>,
    number: u64,
}

impl Closing {
    /// Lets at most `limit` (at least 1) releases run at once before closes wait.
    pub fn new(limit: usize) -> Self {
        Closing {
            state: Mutex::default(),
            changed: Condvar::new(),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a release as under way until the ticket is dropped (also when the release
    /// panics, or its task is dropped without running).
    pub fn begin(self: &Arc<Self>) -> Ticket {
        let mut st = self.lock();
        let number = st.next;
        st.next += 1;
        st.under_way.insert(number);
        Ticket {
            closing: self.clone(),
            number,
        }
    }

    /// Waits while `limit` releases or more are under way (a soft limit: releases begun
    /// meanwhile by other threads may pass it).
    pub fn wait_for_room(&self) {
        let mut st = self.lock();
        while st.under_way.len() >= self.limit {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until every release begun before this call has ended (later ones may go on).
    pub fn wait_for_earlier(&self) {
        let mark = self.lock().next;
        self.wait_for_begun_before(mark);
    }

    /// Waits until every release numbered below `mark` (in the order they began) has ended.
    fn wait_for_begun_before(&self, mark: u64) {
        let mut st = self.lock();
        while st.under_way.first().is_some_and(|&n| n < mark) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    #[cfg(test)]
    fn under_way(&self) -> usize {
        self.lock().under_way.len()
    }

    fn end(&self, number: u64) {
        self.lock().under_way.remove(&number);
        self.changed.notify_all();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.closing.end(self.number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::Receiver;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// Runs `wait` on a thread of its own; the receiver hears when it returns.
    fn waiting(wait: impl FnOnce() + Send + 'static) -> (JoinHandle<()>, Receiver<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            wait();
            tx.send(()).unwrap();
        });
        (thread, rx)
    }

    #[test]
    fn waiting_for_earlier_releases_ignores_later_ones() {
        let c = Arc::new(Closing::new(8));
        let first = c.begin();
        // Begun after the waiter's call: it must not hold the waiter back.
        let later = c.begin();
        let (mark, waiting_on) = (later.number, c.clone());
        let (waiter, rx) = waiting(move || waiting_on.wait_for_begun_before(mark));
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(first);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the waiter saw the first release end");
        waiter.join().unwrap();
        assert_eq!(c.under_way(), 1);
        drop(later);
        assert_eq!(c.under_way(), 0);
    }

    #[test]
    fn closes_wait_for_room_at_the_limit() {
        let c = Arc::new(Closing::new(2));
        let (a, b) = (c.begin(), c.begin());
        let closing = c.clone();
        let (closer, rx) = waiting(move || closing.wait_for_room());
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(a);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("room was made");
        closer.join().unwrap();
        drop(b);
    }
}
