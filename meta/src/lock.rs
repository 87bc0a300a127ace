//! File locks held in the metadata engine, so that they conflict across every mount of a
//! volume: POSIX record locks (fcntl) and flock(2) locks.
//!
//! A lock belongs to an owner: a session (mount) and the kernel's lock owner within it (a
//! process's file table for fcntl, an open file description for flock). The rules are those
//! of fcntl(2): an owner's locks never conflict with each other, and a new lock replaces,
//! splits or merges the owner's locks over its range; two owners conflict where their ranges
//! overlap and one of them writes. A flock lock is the same thing over the whole file. As on
//! Linux, the two kinds never conflict with each other.

use serde::{Deserialize, Serialize};

/// What a lock request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockType {
    /// A shared (read) lock.
    Read,
    /// An exclusive (write) lock.
    Write,
    /// Release the range.
    Unlock,
}

impl LockType {
    /// The stable letter used to store the type.
    pub fn code(self) -> char {
        match self {
            LockType::Read => 'r',
            LockType::Write => 'w',
            LockType::Unlock => 'u',
        }
    }

    /// The type stored as `code`.
    pub fn from_code(code: char) -> Option<Self> {
        Some(match code {
            'r' => LockType::Read,
            'w' => LockType::Write,
            'u' => LockType::Unlock,
            _ => return None,
        })
    }
}

/// Which of the two independent lock families a lock belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    /// A POSIX record lock (fcntl, lockf).
    #[default]
    Posix,
    /// A whole-file flock(2) lock.
    Flock,
}

/// A held lock, or a request for one: bytes `start..=end` of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// The session (mount) of the owner.
    pub sid: u64,
    /// The kernel's lock owner within that mount.
    pub owner: u64,
    /// The process that took it (reported by F_GETLK).
    pub pid: u32,
    /// Read or write (Unlock only in requests).
    pub typ: LockType,
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive (`u64::MAX`: to the end of any file).
    pub end: u64,
    /// fcntl or flock.
    pub kind: LockKind,
}

impl Lock {
    fn same_owner(&self, other: &Lock) -> bool {
        self.sid == other.sid && self.owner == other.owner && self.kind == other.kind
    }

    fn overlaps(&self, other: &Lock) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// The stored form `sid,owner,pid,typ,start,end`, with `,f` appended for a flock lock
    /// (so that records written before flock locks existed read as POSIX locks).
    pub fn encode(&self) -> String {
        format!(
            "{},{},{},{},{},{}{}",
            self.sid,
            self.owner,
            self.pid,
            self.typ.code(),
            self.start,
            self.end,
            match self.kind {
                LockKind::Posix => "",
                LockKind::Flock => ",f",
            }
        )
    }

    /// Reads the stored form.
    pub fn decode(raw: &str) -> Option<Lock> {
        let f: Vec<&str> = raw.split(',').collect();
        let (kind, f) = match f.as_slice() {
            [rest @ .., "f"] => (LockKind::Flock, rest),
            all => (LockKind::Posix, all),
        };
        let [sid, owner, pid, typ, start, end] = f else {
            return None;
        };
        let mut typ = typ.chars();
        let (Some(code), None) = (typ.next(), typ.next()) else {
            return None;
        };
        Some(Lock {
            sid: sid.parse().ok()?,
            owner: owner.parse().ok()?,
            pid: pid.parse().ok()?,
            typ: LockType::from_code(code)?,
            start: start.parse().ok()?,
            end: end.parse().ok()?,
            kind,
        })
    }
}

/// The first lock of another owner that `req` conflicts with, if any.
pub fn conflict(held: &[Lock], req: &Lock) -> Option<Lock> {
    if req.typ == LockType::Unlock {
        return None;
    }
    held.iter()
        .find(|l| {
            l.kind == req.kind
                && !l.same_owner(req)
                && l.overlaps(req)
                && (l.typ == LockType::Write || req.typ == LockType::Write)
        })
        .copied()
}

/// The locks of a file after `req` (a lock or an unlock) is applied to `held`, or the lock it
/// conflicts with. The owner's locks over the range are replaced; adjacent or overlapping
/// locks of the owner with the same type are merged.
pub fn apply(held: &[Lock], req: &Lock) -> Result<Vec<Lock>, Lock> {
    if let Some(c) = conflict(held, req) {
        return Err(c);
    }
    let mut out = Vec::with_capacity(held.len() + 2);
    let mut merged = *req;
    for l in held {
        if !l.same_owner(req) {
            out.push(*l);
            continue;
        }
        let touches = l.start <= req.end.saturating_add(1) && req.start <= l.end.saturating_add(1);
        if l.typ == req.typ && touches {
            merged.start = merged.start.min(l.start);
            merged.end = merged.end.max(l.end);
            continue;
        }
        if !l.overlaps(req) {
            out.push(*l);
            continue;
        }
        // Keep the parts of `l` outside the request.
        if l.start < req.start {
            out.push(Lock {
                end: req.start - 1,
                ..*l
            });
        }
        if l.end > req.end {
            out.push(Lock {
                start: req.end + 1,
                ..*l
            });
        }
    }
    if merged.typ != LockType::Unlock {
        out.push(merged);
    }
    out.sort_by_key(|l| (l.start, l.sid, l.owner));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lk(owner: u64, typ: LockType, start: u64, end: u64) -> Lock {
        Lock {
            sid: 1,
            owner,
            pid: owner as u32,
            typ,
            start,
            end,
            kind: LockKind::Posix,
        }
    }

    fn flock(owner: u64, typ: LockType) -> Lock {
        Lock {
            kind: LockKind::Flock,
            ..lk(owner, typ, 0, u64::MAX)
        }
    }

    #[test]
    fn flock_and_fcntl_locks_are_independent() {
        use LockType::*;
        let held = apply(&[], &lk(1, Write, 100, 199)).unwrap();
        // Another owner's flock lock ignores the record lock, as on Linux.
        let held = apply(&held, &flock(2, Write)).unwrap();
        assert_eq!(held.len(), 2);
        // flock locks of two owners conflict like whole-file record locks.
        assert_eq!(conflict(&held, &flock(3, Read)), Some(flock(2, Write)));
        // The same owner converts its lock, without touching its record locks.
        let held = apply(&held, &lk(2, Read, 0, 9)).unwrap();
        assert_eq!(held.len(), 3);
        let held = apply(&held, &flock(2, Read)).unwrap();
        assert!(held.contains(&flock(2, Read)) && !held.contains(&flock(2, Write)));
        assert_eq!(conflict(&held, &flock(3, Read)), None);
        // Unlocking the flock lock leaves the record locks.
        let held = apply(&held, &flock(2, Unlock)).unwrap();
        assert_eq!(held, vec![lk(2, Read, 0, 9), lk(1, Write, 100, 199)]);
    }

    #[test]
    fn owners_conflict_only_where_one_writes() {
        use LockType::*;
        let held = vec![lk(1, Read, 0, 99), lk(2, Write, 200, 299)];
        assert_eq!(conflict(&held, &lk(3, Read, 50, 60)), None);
        assert_eq!(conflict(&held, &lk(3, Write, 50, 60)), Some(held[0]));
        assert_eq!(conflict(&held, &lk(3, Read, 299, 400)), Some(held[1]));
        assert_eq!(conflict(&held, &lk(2, Write, 0, 300)), Some(held[0]));
        assert_eq!(conflict(&held, &lk(1, Write, 0, 100)), None);
        let other_mount = Lock {
            sid: 2,
            ..lk(1, Write, 0, 0)
        };
        assert_eq!(conflict(&held, &other_mount), Some(held[0]));
    }

    #[test]
    fn an_owners_locks_split_and_merge() {
        use LockType::*;
        let held = apply(&[], &lk(1, Write, 0, 99)).unwrap();
        // A read lock in the middle splits the write lock.
        let held = apply(&held, &lk(1, Read, 40, 59)).unwrap();
        assert_eq!(
            held,
            vec![
                lk(1, Write, 0, 39),
                lk(1, Read, 40, 59),
                lk(1, Write, 60, 99)
            ]
        );
        // Writing it back merges all three.
        let held = apply(&held, &lk(1, Write, 40, 59)).unwrap();
        assert_eq!(held, vec![lk(1, Write, 0, 99)]);
        // Unlocking the middle, then the rest, leaves nothing.
        let held = apply(&held, &lk(1, Unlock, 10, 19)).unwrap();
        assert_eq!(held, vec![lk(1, Write, 0, 9), lk(1, Write, 20, 99)]);
        let held = apply(&held, &lk(1, Unlock, 0, u64::MAX)).unwrap();
        assert!(held.is_empty());
        // To the end of the file, without overflow.
        let held = apply(&[], &lk(1, Read, 5, u64::MAX)).unwrap();
        let held = apply(&held, &lk(1, Read, 0, 4)).unwrap();
        assert_eq!(held, vec![lk(1, Read, 0, u64::MAX)]);
    }

    #[test]
    fn stored_form_round_trips() {
        let l = Lock {
            sid: 7,
            owner: u64::MAX - 3,
            pid: 42,
            typ: LockType::Write,
            start: 0,
            end: u64::MAX,
            kind: LockKind::Posix,
        };
        assert_eq!(Lock::decode(&l.encode()), Some(l));
        let f = Lock {
            kind: LockKind::Flock,
            ..l
        };
        assert_eq!(f.encode(), format!("{},f", l.encode()));
        assert_eq!(Lock::decode(&f.encode()), Some(f));
        assert_eq!(Lock::decode("1,2,3,w,4,5,f,f"), None);
        assert_eq!(Lock::decode("1,2,3,x,4,5"), None);
        assert_eq!(Lock::decode("1,2"), None);
        assert_eq!(Lock::decode("1,2,3,ww,4,5"), None);
        assert_eq!(Lock::decode("1,2,3,w,4,5,6"), None);
    }
}
