//! Plain data types shared by every metadata engine and its callers.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// An inode number. Numbers are allocated from a counter and never reused.
pub type Ino = u64;

/// The inode number of the root directory.
pub const ROOT_INO: Ino = 1;

/// The inode number of the trash directory, `.trash` at the root. It is never handed out by
/// the inode counter; the trash exists once something was moved into it.
pub const TRASH_INO: Ino = 0x7FFF_FFFF_1000_0000;

/// The name under which the root shows the trash (not listed by readdir).
pub const TRASH_NAME: &[u8] = b".trash";

/// The inode number of a mount's control file, `.control` at the root; never handed out to a
/// real inode.
pub const CONTROL_INO: Ino = 0x7FFF_FFFF_0000_0001;

/// The name under which the root shows a mount's control file (not listed by readdir).
pub const CONTROL_NAME: &[u8] = b".control";

/// Names no entry of the root may take: the trash and the control file live there.
pub fn is_reserved(parent: Ino, name: &[u8]) -> bool {
    parent == ROOT_INO && (name == TRASH_NAME || name == CONTROL_NAME)
}

/// The name of the trash directory holding what was removed in the hour (UTC) that contains
/// `sec` (seconds since the epoch): `YYYY-MM-DD-HH`.
pub fn trash_hour_name(sec: i64) -> String {
    let (days, secs) = (sec.div_euclid(86_400), sec.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}-{:02}", secs / 3600)
}

/// The start (seconds since the epoch) of the hour a trash directory is named after, if
/// `name` is such a name.
pub fn parse_trash_hour(name: &[u8]) -> Option<i64> {
    let name = std::str::from_utf8(name).ok()?;
    let mut parts = name.split('-');
    let mut next = |digits: usize| {
        parts
            .next()
            .filter(|p| p.len() == digits && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<i64>().ok())
    };
    let (year, month, day, hour) = (next(4)?, next(2)?, next(2)?, next(2)?);
    if parts.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23
    {
        return None;
    }
    // Days since the epoch from a civil date (the inverse of the above).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let start = days * 86_400 + hour * 3600;
    (trash_hour_name(start) == name).then_some(start)
}

/// Size of a chunk: a file is cut into chunks of this many bytes, each with its own slice list.
pub const CHUNK_SIZE: u64 = 64 << 20;

/// Longest file name accepted, in bytes (as on ext4).
pub const NAME_MAX: usize = 255;

/// Longest symlink target accepted, in bytes.
pub const SYMLINK_MAX: usize = 4096;

/// Largest value of one extended attribute, in bytes (as the Linux VFS allows).
pub const XATTR_VALUE_MAX: usize = 65536;

/// Most hard links one inode may have.
pub const LINK_MAX: u32 = 65000;

/// A point in time with nanosecond precision, seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds since the epoch (negative before it).
    pub sec: i64,
    /// Nanoseconds within the second, below 1e9.
    pub nsec: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timestamp { sec, nsec }
            }
        }
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        if t.sec >= 0 {
            UNIX_EPOCH + std::time::Duration::new(t.sec as u64, t.nsec)
        } else {
            UNIX_EPOCH - std::time::Duration::from_secs(t.sec.unsigned_abs())
                + std::time::Duration::from_nanos(t.nsec as u64)
        }
    }
}

/// The kind of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file with data in chunks.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A character device.
    CharDev,
    /// A block device.
    BlockDev,
}

impl FileKind {
    /// The stable number used to store the kind.
    pub fn code(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Dir => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::Socket => 5,
            FileKind::CharDev => 6,
            FileKind::BlockDev => 7,
        }
    }

    /// The kind stored as `code`, if it is one.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDev,
            7 => FileKind::BlockDev,
            _ => return None,
        })
    }

    /// The kind named by the `S_IFMT` bits of a mode, if any.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => return None,
        })
    }
}

/// Attributes of one inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// Inode number.
    pub ino: Ino,
    /// Kind of inode.
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777` at most).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes, else 0.
    pub rdev: u32,
    /// Number of names (for a directory: 2 plus its subdirectories).
    pub nlink: u32,
    /// Length in bytes (file data, symlink target; directories report 4096).
    pub length: u64,
    /// Last access.
    pub atime: Timestamp,
    /// Last data change.
    pub mtime: Timestamp,
    /// Last attribute change.
    pub ctime: Timestamp,
    /// The directory this inode was last linked into (hints only for files with several links).
    pub parent: Ino,
}

/// What to create with [`crate::Meta::mknod`].
#[derive(Clone, Debug)]
pub struct NewNode {
    /// Kind of inode.
    pub kind: FileKind,
    /// Permission bits, already masked by the caller's umask.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group (the engine substitutes the parent's group under a setgid directory).
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// The target, for a symlink.
    pub symlink: Option<Vec<u8>>,
    /// Every group of the caller; a new non-directory keeps its setgid bit only if the caller
    /// is root or in the group the file gets.
    pub groups: Vec<u32>,
}

/// Changes asked by setattr; `None` leaves a field as is.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New access time.
    pub atime: Option<Timestamp>,
    /// New modification time.
    pub mtime: Option<Timestamp>,
    /// New change time; when `None` the engine sets it to now if anything else changed.
    pub ctime: Option<Timestamp>,
}

/// One slice of a chunk: a run of bytes that a single write produced.
///
/// Bytes `[off, off + len)` of the slice object `id` (whose total size is `size`) appear at
/// `pos` within the chunk. A slice with `size == 0` reads as zeros (a hole punched or zeroed).
/// Slices of a chunk apply in commit order: a slice committed later hides older ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// Slice id: the object name and the order of application.
    pub id: u64,
    /// Total bytes stored for this slice id (0 for a zero slice).
    pub size: u32,
    /// Offset within the slice's data where the visible bytes start.
    pub off: u32,
    /// Number of visible bytes.
    pub len: u32,
    /// Offset within the chunk where the visible bytes land.
    pub pos: u32,
}

impl Slice {
    /// Whether this slice stands for zeros rather than stored data.
    pub fn is_zero(&self) -> bool {
        self.size == 0
    }
}

/// Slices to commit into one file, as [`crate::Meta::write_slices`] takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWrite {
    /// The file.
    pub ino: Ino,
    /// Its slices, in the order they apply.
    pub slices: Vec<ChunkSlice>,
    /// Its new mtime and ctime.
    pub mtime: Timestamp,
}

/// Whether `files` names one inode twice, which [`crate::Meta::write_files`] refuses: a file's
/// references to a shared slice are counted per file.
pub(crate) fn repeats_an_inode(files: &[FileWrite]) -> bool {
    let mut inos: Vec<Ino> = files.iter().map(|f| f.ino).collect();
    inos.sort_unstable();
    inos.windows(2).any(|w| w[0] == w[1])
}

/// A slice waiting to be committed into chunk `chunk` of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSlice {
    /// Chunk index within the file.
    pub chunk: u32,
    /// The slice.
    pub slice: Slice,
}

/// A slice object no longer referenced, whose blocks may be deleted from the object store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreedSlice {
    /// Slice id.
    pub id: u64,
    /// Total bytes stored for it.
    pub size: u32,
}

/// A slice with data that some file references, as gc and fsck see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceRef {
    /// Slice id.
    pub id: u64,
    /// Bytes stored for it: its objects hold exactly this many.
    pub size: u32,
    /// A file that references it.
    pub ino: Ino,
}

/// An inconsistency found by [`crate::Meta::check_namespace`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong, for people.
    pub what: String,
    /// What a repair does about it; None when no fix is safe (it would lose data).
    pub fix: Option<String>,
    /// Whether it was repaired.
    pub repaired: bool,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.fix, self.repaired) {
            (Some(fix), true) => write!(f, "{} (repaired: {fix})", self.what),
            (Some(fix), false) => write!(f, "{} (--repair would {fix})", self.what),
            (None, _) => write!(f, "{} (not repairable without losing data)", self.what),
        }
    }
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Entry name.
    pub name: Vec<u8>,
    /// Inode it names.
    pub ino: Ino,
    /// Kind of that inode.
    pub kind: FileKind,
    /// Cookie to resume listing right after this entry; stable while other entries come and go.
    pub cookie: u64,
}

/// Flags of rename(2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// Fail with `Exists` if the target exists.
    pub noreplace: bool,
    /// Swap source and target atomically; both must exist.
    pub exchange: bool,
}

/// Whether setxattr may create or replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// Fail with `Exists` if present (XATTR_CREATE).
    Create,
    /// Fail with `NoData` if absent (XATTR_REPLACE).
    Replace,
}

/// What fallocate(2) should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// Reserve the range, extending the length unless `keep_size`.
    Allocate {
        /// FALLOC_FL_KEEP_SIZE.
        keep_size: bool,
    },
    /// Make the range read as zeros without changing the length (needs KEEP_SIZE).
    PunchHole,
    /// Make the range read as zeros, extending the length unless `keep_size`.
    ZeroRange {
        /// FALLOC_FL_KEEP_SIZE.
        keep_size: bool,
    },
}

/// Space and inode usage of a volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes used by file data, each file rounded up to 4 KiB.
    pub space: u64,
    /// Inodes in use.
    pub inodes: u64,
}

/// A mounted client of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id, assigned by the engine.
    pub sid: u64,
    /// Host name of the client.
    pub host: String,
    /// Process id of the mount.
    pub pid: u32,
    /// Where it is mounted.
    pub mountpoint: String,
    /// tidefs version of the client.
    pub version: String,
    /// When it started, seconds since the epoch.
    pub started: i64,
    /// Last heartbeat, seconds since the epoch.
    pub heartbeat: i64,
    /// Address of the mount's metrics endpoint (`host:port`), or empty.
    #[serde(default)]
    pub metrics: String,
}

/// Settings of a volume, fixed at format time except where noted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Format {
    /// Volume name; also the key prefix of its objects.
    pub name: String,
    /// Unique id made at format time.
    pub uuid: String,
    /// Object store kind (`file`, later `s3`).
    pub storage: String,
    /// Where objects go (a directory for `file`).
    pub bucket: String,
    /// Block size in bytes.
    pub block_size: u32,
    /// Days removed files stay in the trash (0: no trash). Changeable.
    pub trash_days: u32,
    /// Space limit in bytes (0: unlimited). Changeable.
    pub capacity: u64,
    /// Inode limit (0: unlimited). Changeable.
    pub inodes: u64,
    /// Block keys are spread over this many prefixes (0 or 1: one prefix).
    #[serde(default)]
    pub shards: u32,
    /// Access key of the object store, kept only when the user asked to store it. Changeable.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub access_key: String,
    /// Secret key of the object store, sealed (never in clear), kept only when the user asked
    /// to store it. Changeable.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret_key: String,
}

impl Format {
    /// This format with the changeable settings of `asked` (a format asked for again), or
    /// [`crate::MetaError::FormatMismatch`] if `asked` has another layout.
    pub fn updated_with(&self, asked: &Format) -> crate::Result<Format> {
        if !self.same_layout(asked) {
            return Err(crate::MetaError::FormatMismatch(format!(
                "name {:?}, storage {}, bucket {}, block size {} (asked: name {:?}, storage {}, \
                 bucket {}, block size {})",
                self.name,
                self.storage,
                self.bucket,
                self.block_size,
                asked.name,
                asked.storage,
                asked.bucket,
                asked.block_size
            )));
        }
        Ok(Format {
            trash_days: asked.trash_days,
            capacity: asked.capacity,
            inodes: asked.inodes,
            access_key: asked.access_key.clone(),
            secret_key: asked.secret_key.clone(),
            ..self.clone()
        })
    }

    /// Whether `other` names the same volume layout (everything that cannot change after format).
    pub fn same_layout(&self, other: &Format) -> bool {
        self.name == other.name
            && self.storage == other.storage
            && self.bucket == other.bucket
            && self.block_size == other.block_size
            && self.shards.max(1) == other.shards.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trash_hour_names_round_trip() {
        assert_eq!(trash_hour_name(0), "1970-01-01-00");
        // 2024-02-29 13:05:00 UTC, a leap day.
        assert_eq!(trash_hour_name(1_709_211_900), "2024-02-29-13");
        assert_eq!(parse_trash_hour(b"2024-02-29-13"), Some(1_709_211_600));
        for sec in (0..4_000_000_000i64).step_by(3_599_999) {
            let name = trash_hour_name(sec);
            assert_eq!(
                parse_trash_hour(name.as_bytes()),
                Some(sec - sec % 3600),
                "{name}"
            );
        }
        for bad in [
            "2024-02-30-13",
            "2024-13-01-00",
            "2024-1-01-00",
            "2024-01-01-24",
            "x",
            "",
        ] {
            assert_eq!(parse_trash_hour(bad.as_bytes()), None, "{bad}");
        }
    }
}
