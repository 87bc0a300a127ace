//! Sequential-read detection and the readahead window of one open file.
//!
//! Reads that continue where the previous ones ended (within a slack, because the kernel
//! issues reads in parallel and they arrive a little out of order) are sequential. Each time a
//! sequential reader enters a new block the window doubles, from one block up to the maximum;
//! a read elsewhere resets it, so random readers fetch nothing ahead. Only blocks not asked for
//! yet are handed out, so each block ahead is requested once.

use std::ops::Range;
use std::sync::Mutex;

/// How far from the end of the previous reads a read may start and still be sequential.
pub const SLACK: u64 = 8 << 20;

/// The readahead state of one open file.
#[derive(Debug, Default)]
pub struct Readahead {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// End of the furthest read of the current sequential run.
    next: u64,
    /// Bytes to keep fetched ahead of the reader.
    window: u64,
    /// Everything before this is already asked for.
    requested: u64,
}

impl Readahead {
    /// Whether a read at `off` would continue the current sequential run (the first read of
    /// a file, near its start, counts as sequential).
    pub fn is_sequential(&self, off: u64) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        off + SLACK >= s.next && off <= s.next + SLACK
    }

    /// Records a read of `[off, end)` in a file of blocks of `block` bytes; returns the range
    /// to fetch ahead now, if any, at most `max_window` bytes past the block being read.
    pub fn on_read(&self, off: u64, end: u64, block: u64, max_window: u64) -> Option<Range<u64>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let sequential = off + SLACK >= s.next && off <= s.next + SLACK;
        if !sequential {
            *s = State {
                next: end,
                ..State::default()
            };
            return None;
        }
        let entered_block = s.window == 0 || end.div_ceil(block) > s.next.div_ceil(block);
        s.next = s.next.max(end);
        if max_window < block {
            return None;
        }
        if entered_block {
            s.window = (s.window * 2).clamp(block, max_window);
        }
        let from = s.requested.max(end.div_ceil(block) * block);
        let to = end.div_ceil(block) * block + s.window;
        if from >= to {
            return None;
        }
        s.requested = to;
        Some(from..to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 4 << 20;

    #[test]
    fn sequential_reads_grow_the_window_to_the_maximum() {
        let r = Readahead::default();
        let max = 8 * B;
        assert_eq!(r.on_read(0, 1 << 20, B, max), Some(B..2 * B));
        // Within the same block: nothing new to ask for.
        assert_eq!(r.on_read(1 << 20, 2 << 20, B, max), None);
        assert_eq!(r.on_read(3 << 20, B, B, max), None);
        // Each new block doubles the window and asks only for what is not asked yet.
        assert_eq!(r.on_read(B, B + (1 << 20), B, max), Some(2 * B..4 * B));
        assert_eq!(
            r.on_read(2 * B, 2 * B + (1 << 20), B, max),
            Some(4 * B..7 * B)
        );
        assert_eq!(
            r.on_read(3 * B, 3 * B + (1 << 20), B, max),
            Some(7 * B..12 * B)
        );
        assert_eq!(
            r.on_read(4 * B, 4 * B + (1 << 20), B, max),
            Some(12 * B..13 * B)
        );
        assert_eq!(
            r.on_read(5 * B, 5 * B + (1 << 20), B, max),
            Some(13 * B..14 * B)
        );
    }

    #[test]
    fn reads_arriving_slightly_out_of_order_stay_sequential() {
        let r = Readahead::default();
        let max = 16 * B;
        assert!(r.on_read(0, 128 << 10, B, max).is_some());
        assert_eq!(r.on_read(256 << 10, 384 << 10, B, max), None);
        assert_eq!(r.on_read(128 << 10, 256 << 10, B, max), None);
        assert!(r.on_read(B, B + (128 << 10), B, max).is_some());
    }

    #[test]
    fn random_reads_reset_the_window() {
        let r = Readahead::default();
        let max = 16 * B;
        assert!(r.on_read(0, 1 << 20, B, max).is_some());
        assert!(r.on_read(B, B + 1, B, max).is_some());
        assert_eq!(r.on_read(1 << 40, (1 << 40) + 4096, B, max), None);
        assert_eq!(r.on_read(7 << 30, (7 << 30) + 4096, B, max), None);
        // A new sequential run starts again from one block.
        let at: u64 = (7 << 30) + 4096;
        let start = at.div_ceil(B) * B;
        assert_eq!(r.on_read(at, at + 4096, B, max), Some(start..start + B));
    }

    #[test]
    fn no_readahead_when_the_maximum_is_below_a_block() {
        let r = Readahead::default();
        assert_eq!(r.on_read(0, 1 << 20, B, 0), None);
        assert_eq!(r.on_read(1 << 20, 2 << 20, B, B - 1), None);
    }
}
