//! Which segments of a cache file have matched their checksums since the file last changed.
//!
//! A segment that matched once can be handed to the kernel again without being read and
//! checked again (see [`crate::DiskCache::span`]), as long as the file is the one that was
//! checked: same inode, same size, same change time. Any write, truncation or replacement of
//! the file through the kernel changes one of them and drops every mark. What no stamp can
//! see is the disk altering a file's bytes by itself between two reads of one mount.

use std::fs::File;
use std::ops::Range;
use std::sync::Mutex;

/// A file's identity and last change as fstat(2) reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of `f` now; None if it cannot be read.
    pub(crate) fn of(f: &File) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata().ok()?;
        Some(Stamp {
            ino: m.ino(),
            size: m.size(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The checked segments of one cache file, under the stamp the file had when they were.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    stamp: Option<Stamp>,
    /// One bit per segment.
    bits: Vec<u64>,
}

impl Checked {
    /// Marks `segments` checked in a file that had `stamp` both before they were read and
    /// after they matched; marks made under another stamp are dropped first.
    pub(crate) fn mark(&self, stamp: Stamp, segments: Range<usize>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.stamp != Some(stamp) {
            s.stamp = Some(stamp);
            s.bits.clear();
        }
        let words = segments.end.div_ceil(64);
        if s.bits.len() < words {
            s.bits.resize(words, 0);
        }
        for i in segments {
            s.bits[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether every one of `segments` was checked in the file as it is at `stamp`.
    pub(crate) fn all(&self, stamp: Stamp, segments: Range<usize>) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.stamp == Some(stamp) && s.marked(segments)
    }

    /// Whether every one of `segments` was checked under some stamp: when not, [`Self::all`]
    /// cannot hold, and the file need not be opened to find its stamp.
    pub(crate) fn marked(&self, segments: Range<usize>) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .marked(segments)
    }
}

impl State {
    fn marked(&self, segments: Range<usize>) -> bool {
        segments.into_iter().all(|i| {
            self.bits
                .get(i / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_hold_for_their_stamp_only() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let f = File::open(&path).unwrap();
        let stamp = Stamp::of(&f).unwrap();
        let c = Checked::default();
        assert!(!c.all(stamp, 0..1), "nothing checked yet");
        c.mark(stamp, 0..3);
        c.mark(stamp, 70..130);
        assert!(c.all(stamp, 0..3) && c.all(stamp, 1..2) && c.all(stamp, 70..130));
        assert!(!c.all(stamp, 0..4) && !c.all(stamp, 69..71) && !c.all(stamp, 129..131));

        // A write through the kernel changes the stamp: the marks no longer count, and new
        // ones replace them.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&path, [1u8; 100]).unwrap();
        let changed = Stamp::of(&f).unwrap();
        assert_ne!(changed, stamp);
        assert!(!c.all(changed, 0..3));
        assert!(
            c.marked(0..3) && !c.marked(0..4),
            "marks are kept until a new stamp"
        );
        c.mark(changed, 5..6);
        assert!(c.all(changed, 5..6) && !c.all(changed, 0..1) && !c.all(stamp, 5..6));
    }
}
