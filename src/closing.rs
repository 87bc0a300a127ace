//! Releases of written files that finish after close(2) has returned ("close-behind").
//!
//! On a sole mount a close does not wait for its file's upload and commit: the release that
//! follows it hands them to a background thread, at once, or — for a small file still all in
//! memory — after a short delay, so that a file removed or replaced within it is never
//! uploaded at all. [`Closing`] keeps these releases in order: closes wait once too many are
//! running or waiting, and fsync of a directory and unmount finish the ones begun before them.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tidefs_meta::Ino;

/// The releases finishing in the background, running or deferred.
#[derive(Debug)]
pub struct Closing {
    state: Mutex<State>,
    changed: Condvar,
    limits: Limits,
}

/// How many releases run and wait at once, and how long deferred ones wait.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Releases running at once past which closes wait, and up to which deferred releases
    /// are started.
    pub running: usize,
    /// Deferred releases past which closes wait; past half of it the oldest start early,
    /// down to a quarter of it.
    pub deferred: usize,
    /// How long a deferred release waits before it starts.
    pub delay: Duration,
    /// Deferred releases due within this of the first one taken come with it, so that their
    /// small files can share one object (see [`crate::data::DataCtx::commit_packed`]).
    pub batch: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// The next ticket to hand out.
    next: u64,
    /// Tickets of the releases not ended, running or deferred.
    under_way: BTreeSet<u64>,
    /// Tickets of the releases running.
    running: usize,
    /// Deferred releases, oldest first: when each is due, and its file.
    deferred: VecDeque<(Instant, Ino, Ticket)>,
}

/// One release under way; it ends when this is dropped.
#[derive(Debug)]
pub struct Ticket {
    closing: Arc<Closing>,
    number: u64,
    running: bool,
}

/// Deferred releases to run now, with their files.
pub type Due = Vec<(Ino, Ticket)>;

impl Closing {
    /// Releases kept within `limits` (each limit at least 1).
    pub fn new(limits: Limits) -> Self {
        Closing {
            state: Mutex::default(),
            changed: Condvar::new(),
            limits: Limits {
                running: limits.running.max(1),
                deferred: limits.deferred.max(1),
                delay: limits.delay,
                batch: limits.batch,
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ticket(self: &Arc<Self>, st: &mut State, running: bool) -> Ticket {
        let number = st.next;
        st.next += 1;
        st.under_way.insert(number);
        st.running += usize::from(running);
        Ticket {
            closing: self.clone(),
            number,
            running,
        }
    }

    /// Counts a release that runs now as under way until the ticket is dropped (also when
    /// the release panics, or its task is dropped without running).
    pub fn begin(self: &Arc<Self>) -> Ticket {
        let mut st = self.lock();
        self.ticket(&mut st, true)
    }

    /// Defers the release of `ino`: [`Closing::take_due`] hands it out once the delay has
    /// passed (or earlier, under pressure), [`Closing::take_begun_before`] at once.
    pub fn defer(self: &Arc<Self>, ino: Ino) {
        let mut st = self.lock();
        let ticket = self.ticket(&mut st, false);
        st.deferred
            .push_back((Instant::now() + self.limits.delay, ino, ticket));
        drop(st);
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for deferred releases that are due, and takes them, now
    /// counted as running, oldest first, while fewer than the running limit run. A release
    /// is due when its delay has passed, when more than half the deferred limit wait (then
    /// more are taken while over a quarter wait), or, with `pressure`, at once; once one is
    /// taken, those due within the batch window come with it. So releases start in batches,
    /// whose small files can share objects.
    pub fn take_due(&self, pressure: bool, timeout: Duration) -> Due {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            while st.running < self.limits.running {
                let Some((at, ..)) = st.deferred.front() else {
                    break;
                };
                let (horizon, crowd) = if due.is_empty() {
                    (now, self.limits.deferred / 2)
                } else {
                    (now + self.limits.batch, self.limits.deferred / 4)
                };
                if !(pressure || *at <= horizon || st.deferred.len() > crowd) {
                    break;
                }
                let (_, ino, ticket) = st.deferred.pop_front().expect("a front");
                due.push((ino, Self::start(&mut st, ticket)));
            }
            if !due.is_empty() {
                // Closes waiting for room among deferred releases may go on.
                drop(st);
                self.changed.notify_all();
                return due;
            }
            if now >= deadline {
                return due;
            }
            let next = st.deferred.front().map_or(deadline, |(at, ..)| *at);
            let wait = next.min(deadline).saturating_duration_since(now);
            st = self
                .changed
                .wait_timeout(st, wait.max(Duration::from_millis(1)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn start(st: &mut State, mut ticket: Ticket) -> Ticket {
        ticket.running = true;
        st.running += 1;
        ticket
    }

    /// The mark of releases begun so far, for [`Closing::take_begun_before`] and
    /// [`Closing::wait_for_begun_before`].
    pub fn mark(&self) -> u64 {
        self.lock().next
    }

    /// Takes every deferred release begun before `mark`, due or not, now counted as running.
    pub fn take_begun_before(&self, mark: u64) -> Due {
        let mut st = self.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::new();
        while let Some((at, ino, ticket)) = st.deferred.pop_front() {
            if ticket.number < mark {
                taken.push((ino, Self::start(&mut st, ticket)));
            } else {
                kept.push_back((at, ino, ticket));
            }
        }
        st.deferred = kept;
        drop(st);
        self.changed.notify_all();
        taken
    }

    /// Waits while the running limit is reached or the deferred limit is (soft limits:
    /// releases begun meanwhile by other threads may pass them).
    pub fn wait_for_room(&self) {
        let mut st = self.lock();
        while st.running >= self.limits.running || st.deferred.len() >= self.limits.deferred {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until every release numbered below `mark` (in the order they began) has ended
    /// (later ones may go on). Deferred ones among them must have been taken to run.
    pub fn wait_for_begun_before(&self, mark: u64) {
        let mut st = self.lock();
        while st.under_way.first().is_some_and(|&n| n < mark) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    #[cfg(test)]
    fn under_way(&self) -> usize {
        self.lock().under_way.len()
    }

    #[cfg(test)]
    fn deferred(&self) -> usize {
        self.lock().deferred.len()
    }

    fn end(&self, number: u64, running: bool) {
        let mut st = self.lock();
        st.under_way.remove(&number);
        st.running -= usize::from(running);
        drop(st);
        self.changed.notify_all();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.closing.end(self.number, self.running);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Runs `wait` on a thread of its own and checks that it still waits 100 ms later; then
    /// runs `unblock` and checks that the wait ends (`what` says why it should), giving back
    /// what `unblock` returned.
    fn blocks_until<T>(
        wait: impl FnOnce() + Send + 'static,
        unblock: impl FnOnce() -> T,
        what: &str,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            wait();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "did not wait"
        );
        let out = unblock();
        rx.recv_timeout(Duration::from_secs(5)).expect(what);
        thread.join().unwrap();
        out
    }

    fn closing(running: usize, deferred: usize, delay_ms: u64) -> Arc<Closing> {
        Arc::new(Closing::new(Limits {
            running,
            deferred,
            delay: Duration::from_millis(delay_ms),
            batch: Duration::ZERO,
        }))
    }

    fn inos(due: &Due) -> Vec<Ino> {
        due.iter().map(|(ino, _)| *ino).collect()
    }

    #[test]
    fn waiting_for_earlier_releases_ignores_later_ones() {
        let c = closing(8, 8, 0);
        let first = c.begin();
        // Begun after the waiter's mark: it must not hold the waiter back.
        let mark = c.mark();
        let later = c.begin();
        let waiting_on = c.clone();
        blocks_until(
            move || waiting_on.wait_for_begun_before(mark),
            || drop(first),
            "the waiter saw the first release end",
        );
        assert_eq!(c.under_way(), 1);
        drop(later);
        assert_eq!(c.under_way(), 0);
    }

    #[test]
    fn closes_wait_for_room_at_the_running_limit() {
        let c = closing(2, 8, 0);
        let (a, b) = (c.begin(), c.begin());
        let closing = c.clone();
        blocks_until(move || closing.wait_for_room(), || drop(a), "room was made");
        drop(b);
    }

    /// A deferred release waits out its delay, unless pressure or a long queue makes it due
    /// early; it is taken only while fewer than the running limit run, and then counts as
    /// running until its ticket is dropped.
    #[test]
    fn deferred_releases_come_due_after_the_delay_or_under_pressure() {
        let c = closing(2, 4, 300);
        c.defer(1);
        let started = Instant::now();
        assert!(c.take_due(false, Duration::from_millis(50)).is_empty());
        let due = c.take_due(false, Duration::from_secs(5));
        assert_eq!(inos(&due), [1]);
        assert!(started.elapsed() >= Duration::from_millis(300));
        // Pressure: due at once, but only up to the running limit (one runs already).
        c.defer(2);
        c.defer(3);
        let more = c.take_due(true, Duration::from_millis(10));
        assert_eq!(inos(&more), [2]);
        assert!(c.take_due(true, Duration::from_millis(10)).is_empty());
        drop(due);
        assert_eq!(inos(&c.take_due(true, Duration::from_millis(10))), [3]);
        drop(more);
        // More than half the deferred limit waiting: the oldest are due at once, down to a
        // quarter of it (here up to the running limit).
        for ino in 4..7 {
            c.defer(ino);
        }
        let crowded = c.take_due(false, Duration::from_millis(10));
        assert_eq!(inos(&crowded), [4, 5]);
        assert_eq!(c.under_way(), 3);
        // With room to run: 5 of 8 waiting, so the oldest 3 go, leaving a quarter (2).
        let c = closing(8, 8, 60_000);
        for ino in 1..=5 {
            c.defer(ino);
        }
        assert_eq!(inos(&c.take_due(false, Duration::ZERO)), [1, 2, 3]);
        assert_eq!(c.deferred(), 2);
    }

    /// Releases due within the batch window of the first one due come with it, and no later
    /// ones; none comes before the first is due.
    #[test]
    fn releases_due_soon_after_the_first_come_with_it() {
        let c = Arc::new(Closing::new(Limits {
            running: 8,
            deferred: 100,
            delay: Duration::from_millis(500),
            batch: Duration::from_millis(200),
        }));
        // Due at 500, 600 and 850 ms.
        c.defer(1);
        std::thread::sleep(Duration::from_millis(100));
        c.defer(2);
        std::thread::sleep(Duration::from_millis(250));
        c.defer(3);
        // None is due yet, though 2 will be within 200 ms of 1.
        assert!(c.take_due(false, Duration::ZERO).is_empty());
        let due = c.take_due(false, Duration::from_secs(5));
        // 1 was due and 2 within 200 ms of it; 3 is 250 ms behind 2, so it comes on its own.
        assert_eq!(inos(&due), [1, 2]);
        assert_eq!(c.deferred(), 1);
        assert_eq!(inos(&c.take_due(false, Duration::from_secs(5))), [3]);
    }

    /// Closes wait while the deferred limit is reached; taking deferred releases begun before
    /// a mark takes them all, due or not, and leaves later ones deferred.
    #[test]
    fn deferred_releases_before_a_mark_are_taken_at_once() {
        let c = closing(8, 2, 60_000);
        c.defer(1);
        c.defer(2);
        let mark = c.mark();
        c.defer(3);
        // (Nothing but the taking may wake the waiter: its wait must not end by chance.)
        let closing = c.clone();
        let taken = blocks_until(
            move || closing.wait_for_room(),
            || c.take_begun_before(mark),
            "room was made",
        );
        assert_eq!(inos(&taken), [1, 2]);
        let waiting_on = c.clone();
        blocks_until(
            move || waiting_on.wait_for_begun_before(mark),
            || drop(taken),
            "the earlier releases ended",
        );
        assert_eq!((c.deferred(), c.under_way()), (1, 1));
    }
}
