//! The FUSE edge of tidefs: the only crate that knows the kernel protocol.
//!
//! It adapts kernel requests to a [`Vfs`], maps errors to errno, and mounts with fuser. Requests
//! are served by several request loops (one cloned `/dev/fuse` descriptor each), so a slow read
//! never holds up requests for other files or other ranges.

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, Session, SessionACL, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
pub use tidefs_meta::lock::LockKind;
use tidefs_meta::{Attr, FileKind, Ino, RenameFlags, SetAttr, Timestamp};

/// Who makes a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctx {
    /// Effective user id of the caller.
    pub uid: u32,
    /// Effective group id of the caller.
    pub gid: u32,
    /// Process id of the caller (0 for kernel-internal requests).
    pub pid: u32,
}

/// An error that stands for one errno at the system-call boundary.
pub trait ToErrno: std::fmt::Display {
    /// The errno to return to the kernel.
    fn errno(&self) -> i32;
}

/// An opened file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The handle later requests carry.
    pub fh: u64,
    /// The kernel may keep the file's cached pages: the file has not changed since they were
    /// read.
    pub keep_cache: bool,
    /// Reads and writes bypass the kernel's page cache and go to the filesystem as issued
    /// (for files whose contents are produced on demand, whatever their size says).
    pub direct_io: bool,
}

/// What a read answers with.
#[derive(Debug)]
pub enum ReadData {
    /// Bytes in memory (often a view of a cached block, which the reply copies once).
    Bytes(bytes::Bytes),
    /// `len` bytes of `file` from `offset`, known good, which the reply moves to the kernel
    /// with splice(2) without this process reading them.
    File {
        /// The file, open for reading.
        file: std::fs::File,
        /// Where the bytes start.
        offset: u64,
        /// How many there are.
        len: usize,
    },
}

impl ReadData {
    /// How many bytes there are.
    pub fn len(&self) -> usize {
        match self {
            ReadData::Bytes(b) => b.len(),
            ReadData::File { len, .. } => *len,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, read from the file for [`ReadData::File`]: an error if it has fewer now.
    pub fn into_bytes(self) -> io::Result<bytes::Bytes> {
        match self {
            ReadData::Bytes(b) => Ok(b),
            ReadData::File { file, offset, len } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf.into())
            }
        }
    }
}

/// One directory listing entry, including `.` and `..`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    /// Inode number.
    pub ino: Ino,
    /// Kind of inode.
    pub kind: FileKind,
    /// Name.
    pub name: Vec<u8>,
    /// Offset that resumes the listing right after this entry.
    pub next: u64,
}

/// Filesystem statistics for statfs(2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Total space in bytes.
    pub total_bytes: u64,
    /// Free space in bytes.
    pub free_bytes: u64,
    /// Total inodes.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Block size reported to callers.
    pub block_size: u32,
}

/// The filesystem operations the kernel asks for, in terms of tidefs types.
///
/// Permission checks on paths are done by the kernel (`default_permissions`); implementations
/// apply the rules the kernel leaves to filesystems (setgid inheritance and such).
/// A file lock as the kernel passes it: bytes `start..=end`, `typ` one of `F_RDLCK`,
/// `F_WRLCK`, `F_UNLCK`, the process it belongs to, and whether it is a POSIX record lock
/// (fcntl) or a flock(2) lock (always the whole file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileLock {
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive.
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
    /// The process holding or asking.
    pub pid: u32,
    /// fcntl or flock.
    pub kind: LockKind,
}

pub trait Vfs: Send + Sync + 'static {
    /// Error of every operation.
    type Error: ToErrno;

    /// The inode `name` in `parent`.
    fn lookup(&self, ctx: Ctx, parent: Ino, name: &[u8]) -> Result<Attr, Self::Error>;
    /// Attributes of `ino`, including writes not yet committed.
    fn getattr(&self, ino: Ino) -> Result<Attr, Self::Error>;
    /// Changes attributes; `size` truncates or extends a file.
    fn setattr(
        &self,
        ctx: Ctx,
        ino: Ino,
        set: SetAttr,
        size: Option<u64>,
    ) -> Result<Attr, Self::Error>;
    /// Target of a symlink.
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>, Self::Error>;
    /// Creates a non-directory, non-symlink node.
    fn mknod(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<Attr, Self::Error>;
    /// Creates a directory.
    fn mkdir(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32) -> Result<Attr, Self::Error>;
    /// Creates a symlink.
    fn symlink(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> Result<Attr, Self::Error>;
    /// Removes a non-directory name.
    fn unlink(&self, ctx: Ctx, parent: Ino, name: &[u8]) -> Result<(), Self::Error>;
    /// Removes an empty directory.
    fn rmdir(&self, ctx: Ctx, parent: Ino, name: &[u8]) -> Result<(), Self::Error>;
    /// Renames atomically.
    fn rename(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<(), Self::Error>;
    /// Adds a hard link.
    fn link(&self, ctx: Ctx, ino: Ino, new_parent: Ino, name: &[u8]) -> Result<Attr, Self::Error>;
    /// Opens a file.
    fn open(&self, ctx: Ctx, ino: Ino, flags: i32) -> Result<Opened, Self::Error>;
    /// Creates and opens a file; returns its attributes and a handle.
    fn create(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(Attr, u64), Self::Error>;
    /// Reads up to `size` bytes at `offset` (short only at end of file). The bytes may be a
    /// view of a cached block: the reply copies them to the kernel once.
    fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> Result<bytes::Bytes, Self::Error>;
    /// As [`Vfs::read`], but the answer may be a span of a file for the reply to move to the
    /// kernel unread. Called only while the mount can splice replies; a span the reply cannot
    /// move is read with [`ReadData::into_bytes`] or, failing that, read again with
    /// [`Vfs::read`].
    fn read_data(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReadData, Self::Error> {
        self.read(ino, fh, offset, size).map(ReadData::Bytes)
    }
    /// Writes `data` at `offset`; returns the bytes written.
    fn write(&self, ino: Ino, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Self::Error>;
    /// Drops what a write, truncate or chown of regular file `ino` must drop: its file
    /// capabilities (`security.capability`) always, and with `suidgid` (a caller without
    /// CAP_FSETID, or any chown) its setuid bit and the setgid bit of a group-executable
    /// file. Called before each such change, so it must be cheap once nothing is left.
    fn drop_privileges(&self, ino: Ino, suidgid: bool) -> Result<(), Self::Error>;
    /// Called at each close(2) of a descriptor; its result is close's. How much of the
    /// written data is committed first is the VFS's choice (tidefs: all of it, unless the
    /// mount commits behind the close).
    fn flush(&self, ino: Ino, fh: u64) -> Result<(), Self::Error>;
    /// Called when the last descriptor of a handle goes away.
    fn release(&self, ino: Ino, fh: u64) -> Result<(), Self::Error>;
    /// The first lock of another owner that `lock` conflicts with (F_GETLK); None if it
    /// could be taken.
    fn getlk(
        &self,
        ino: Ino,
        fh: u64,
        owner: u64,
        lock: FileLock,
    ) -> Result<Option<FileLock>, Self::Error>;
    /// Takes or releases a lock for `owner` (F_SETLK); with `wait` (F_SETLKW) waits until it
    /// can be taken, or until [`Vfs::interrupt`] names `request` (then fails with EINTR).
    /// Called on a thread of its own when waiting.
    fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        owner: u64,
        lock: FileLock,
        wait: bool,
        request: u64,
    ) -> Result<(), Self::Error>;
    /// The caller of kernel request `request` got a signal: if that request is waiting for
    /// a lock, it should end with EINTR. May come before the request starts waiting.
    fn interrupt(&self, request: u64);
    /// The locks of `kind` that `owner` holds on `ino` go: POSIX locks when a descriptor of
    /// the owner is closed, flock locks when the open file description is released.
    fn release_locks(&self, ino: Ino, owner: u64, kind: LockKind) -> Result<(), Self::Error>;
    /// Makes written data and metadata durable.
    fn fsync(&self, ino: Ino, fh: u64, datasync: bool) -> Result<(), Self::Error>;
    /// Makes the directory's entries durable.
    fn fsyncdir(&self, ino: Ino) -> Result<(), Self::Error>;
    /// Opens directory `ino` for listing; `keep_cache` says the listing the kernel cached at
    /// an earlier open is still right (the directory has not changed since).
    fn opendir(&self, ino: Ino) -> Result<Opened, Self::Error>;
    /// Entries of directory `ino` after `offset` (0: from the start), at most `limit`.
    fn readdir(&self, ino: Ino, offset: u64, limit: usize) -> Result<Vec<ListEntry>, Self::Error>;
    /// Space and inode statistics.
    fn statfs(&self) -> Result<StatFs, Self::Error>;
    /// Sets an xattr; `flags` are XATTR_CREATE / XATTR_REPLACE.
    fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<(), Self::Error>;
    /// Value of an xattr.
    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>, Self::Error>;
    /// Names of the xattrs, each followed by a NUL byte.
    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, Self::Error>;
    /// Removes an xattr.
    fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<(), Self::Error>;
    /// fallocate(2) with its `mode` flags.
    fn fallocate(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), Self::Error>;
    /// Called once when the kernel ends the session: flush and release everything.
    fn destroy(&self);
}

/// Kernel cache timeouts and request concurrency of a mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Name shown as the mount source.
    pub fsname: String,
    /// How long the kernel may cache attributes.
    pub attr_ttl: Duration,
    /// How long the kernel may cache a file name lookup.
    pub entry_ttl: Duration,
    /// How long the kernel may cache a directory name lookup.
    pub dir_entry_ttl: Duration,
    /// Number of request loops.
    pub threads: usize,
    /// Let users other than the mounting one in (`allow_other`).
    pub allow_other: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// KiB the kernel reads ahead of a sequential reader of a file, in requests of up to
    /// 1 MiB (the mount's `read_ahead_kb`); each request is spliced when it is no longer
    /// than [`splice_limit`]. `None` keeps the kernel's 128 KiB. Setting it needs root;
    /// without, the kernel's value stays and the mount goes on.
    pub read_ahead_kb: Option<u32>,
    /// Reads may be answered with spans of files ([`Vfs::read_data`]), spliced into the
    /// reply: for filesystems that have such files (a disk cache). Where pipes cannot hold a
    /// 1 MiB reply, the kernel is then asked for reads of at most 512 KiB.
    pub splice_reads: bool,
    /// Counts spliced replies.
    pub splice_stats: Arc<SpliceStats>,
    /// How long the kernel may remember that a name does not exist (zero: it asks again at
    /// each lookup).
    pub negative_entry_ttl: Duration,
    /// No other mount changes the volume, so every change but those the filesystem makes on
    /// its own (told through [`KernelCache`]) passes through this kernel: it may then keep
    /// directory listings across opens and checks them against its own view of the
    /// directory, with no `OPENDIR`/`RELEASEDIR` round trips (`FUSE_NO_OPENDIR_SUPPORT`).
    pub sole_mount: bool,
    /// Set up by [`mount`] so that the filesystem can tell the kernel of its own changes.
    pub kernel_cache: Arc<KernelCache>,
}

/// Lets the filesystem tell the kernel of namespace changes it makes on its own, not in
/// answer to a request (`tidefs rmr`, trash purges), so that the kernel drops what it cached
/// of them. Does nothing until the mount is made.
#[derive(Debug, Default)]
pub struct KernelCache {
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

impl KernelCache {
    /// Makes the kernel forget entry `name` of directory `parent` (and every name below it)
    /// and the cached listing and attributes of `parent`. It must not be called while
    /// answering a request on `parent` (the kernel holds the directory's lock then).
    pub fn forget_entry(&self, parent: Ino, name: &[u8]) {
        let Some(n) = self.notifier.get() else {
            return;
        };
        if let Err(e) = n.inval_entry(INodeNo(parent), OsStr::from_bytes(name)) {
            tracing::debug!(parent, error = %e, "cannot drop a cached name");
        }
        if let Err(e) = n.inval_inode(INodeNo(parent), 0, 0) {
            tracing::debug!(parent, error = %e, "cannot drop a cached listing");
        }
    }
}

/// Counters of read replies spliced from files.
#[derive(Debug, Default)]
pub struct SpliceStats {
    /// Replies spliced.
    pub spliced: AtomicU64,
    /// Spans that could not be spliced and were copied (or read again) instead.
    pub copied: AtomicU64,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            fsname: "tidefs".into(),
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            dir_entry_ttl: Duration::from_secs(1),
            threads: 16,
            allow_other: true,
            read_only: false,
            read_ahead_kb: None,
            splice_reads: false,
            splice_stats: Arc::default(),
            negative_entry_ttl: Duration::ZERO,
            sole_mount: false,
            kernel_cache: Arc::default(),
        }
    }
}

/// The attributes of a negative entry: node 0 tells the kernel the name does not exist.
const ABSENT: FileAttr = FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: std::time::UNIX_EPOCH,
    mtime: std::time::UNIX_EPOCH,
    ctime: std::time::UNIX_EPOCH,
    crtime: std::time::UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

/// Largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;

struct Adapter<V: Vfs> {
    vfs: Arc<V>,
    config: MountConfig,
    /// The longest read reply to splice from a file (see [`splice_limit`]; 0 without
    /// [`MountConfig::splice_reads`]); lowered below a length whose pipe could not grow.
    splice_max: AtomicUsize,
    /// The kernel opens directories without asking (set at INIT; see
    /// [`MountConfig::sole_mount`]).
    no_opendir: bool,
}

/// The longest read reply the request loops can splice from a file: what a pipe of this
/// process can be grown to hold, less a page for the reply's header and one for data that
/// does not start on a page. Pipes grow to `fs.pipe-max-size` (1 MiB by default), or past
/// it with CAP_SYS_RESOURCE; 2 MiB are asked for, so that 1 MiB reads (the largest the
/// kernel sends) can be spliced. 0 if no pipe can be made.
pub fn splice_limit() -> usize {
    use std::os::fd::AsRawFd;
    let Ok((_read, write)) = std::io::pipe() else {
        return 0;
    };
    let fd = write.as_raw_fd();
    let grown = [2 << 20, 1 << 20]
        .into_iter()
        // SAFETY: fcntl on a descriptor that `write` keeps open.
        .map(|size: libc::c_int| unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size) })
        .find(|&got| got > 0);
    // SAFETY: as above.
    let size = grown.unwrap_or_else(|| unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) });
    let page = page_size::get();
    (size.max(0) as usize / page).saturating_sub(2) * page
}

/// The largest read request to ask the kernel for (`max_read`) when pipes cannot hold the
/// 1 MiB requests it sends by default: the largest power of two they hold, so that reads
/// from the disk cache can still be spliced (a 1 MiB pipe takes 512 KiB requests). Writes
/// stay at [`MAX_WRITE`].
fn max_read(splice_limit: usize) -> Option<usize> {
    const SMALLEST: usize = 128 << 10;
    if splice_limit >= MAX_WRITE as usize || splice_limit < SMALLEST {
        return None;
    }
    Some(1 << splice_limit.ilog2())
}

fn errno<E: ToErrno>(e: E) -> Errno {
    let n = e.errno();
    if n == libc::EIO {
        tracing::warn!(error = %e, "request failed with EIO");
    } else {
        tracing::debug!(error = %e, errno = n, "request failed");
    }
    Errno::from_i32(n)
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn time(t: Option<TimeOrNow>) -> Option<Timestamp> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => Timestamp::from(t),
        TimeOrNow::Now => Timestamp::now(),
    })
}

impl<V: Vfs> Adapter<V> {
    /// How long the kernel may keep `a`. Not at all for a file with setuid or setgid bits: a
    /// write may drop them in the mount (`Vfs::drop_privileges`) and the write's reply does
    /// not refresh the kernel's mode, which exec and permission checks read.
    fn attr_ttl(&self, a: &Attr) -> Duration {
        if a.kind == FileKind::File && privileged_bits(a.mode) != 0 {
            Duration::ZERO
        } else {
            self.config.attr_ttl
        }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.length,
            blocks: a.length.div_ceil(512),
            atime: a.atime.into(),
            mtime: a.mtime.into(),
            ctime: a.ctime.into(),
            crtime: a.ctime.into(),
            kind: file_type(a.kind),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, result: Result<Attr, V::Error>) {
        match result {
            Ok(a) => {
                let ttl = if a.kind == FileKind::Dir {
                    self.config.dir_entry_ttl
                } else {
                    self.config.entry_ttl
                };
                reply.entry_with_ttls(&self.attr_ttl(&a), &ttl, &self.attr(&a), Generation(0));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn empty(reply: ReplyEmpty, result: Result<(), V::Error>) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Takes or releases `lock`; a request that may wait runs on a thread of its own, as a
    /// wait may be long and must not hold a request loop.
    #[allow(clippy::too_many_arguments)]
    fn set_lock(
        &self,
        request: u64,
        ino: INodeNo,
        fh: FileHandle,
        owner: LockOwner,
        lock: FileLock,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        if !sleep {
            let taken = self.vfs.setlk(ino.0, fh.0, owner.0, lock, false, request);
            return Self::empty(reply, taken);
        }
        let vfs = self.vfs.clone();
        let waiter = std::thread::Builder::new()
            .name("tidefs-lockwait".into())
            .spawn(move || {
                Self::empty(reply, vfs.setlk(ino.0, fh.0, owner.0, lock, true, request));
            });
        if let Err(e) = waiter {
            tracing::warn!(error = %e, "cannot start a lock waiter");
        }
    }
}

impl<V: Vfs> Filesystem for Adapter<V> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            config.set_max_write(max).ok();
        }
        // POSIX locks go to the VFS so that they hold across every mount of a volume.
        // Asynchronous direct I/O lets the kernel send an application's queued O_DIRECT
        // requests (and the pieces of a large one) at once instead of one after another.
        // HANDLE_KILLPRIV_V2: the kernel stops asking for security.capability before every
        // write (a round trip each, half the cost of an 8 KiB write) and leaves dropping
        // setuid/setgid bits and capabilities to `Vfs::drop_privileges`.
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS;
        config.add_capabilities(wanted & config.capabilities()).ok();
        // The kernel takes ENOSYS from OPENDIR as "open directories without asking" only if
        // it says it can.
        self.no_opendir = self.config.sole_mount
            && config
                .capabilities()
                .contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        Ok(())
    }

    fn destroy(&mut self) {
        self.vfs.destroy();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = tracing::debug_span!("lookup", parent = parent.0).entered();
        match self.vfs.lookup(ctx(req), parent.0, name.as_bytes()) {
            // A negative entry (node 0): the kernel keeps the name's absence for the TTL.
            Err(e) if e.errno() == libc::ENOENT && !self.config.negative_entry_ttl.is_zero() => {
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &self.config.negative_entry_ttl,
                    &ABSENT,
                    Generation(0),
                );
            }
            r => self.entry(reply, r),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = tracing::debug_span!("getattr", ino = ino.0).entered();
        match self.vfs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.attr_ttl(&a), &self.attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        kill_suidgid: bool,
        reply: ReplyAttr,
    ) {
        let _s = tracing::debug_span!("setattr", ino = ino.0).entered();
        // A truncate or chown of a file drops capabilities (and, when the kernel says so,
        // the setuid and setgid bits) first, so the attributes replied below already show
        // it. The kernel sets `kill_suidgid` on every chown of a non-directory.
        if size.is_some() || kill_suidgid {
            if let Err(e) = self.vfs.drop_privileges(ino.0, kill_suidgid) {
                return reply.error(errno(e));
            }
        }
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            atime: time(atime),
            mtime: time(mtime),
            ctime: ctime.map(Timestamp::from),
        };
        match self.vfs.setattr(ctx(req), ino.0, set, size) {
            Ok(a) => reply.attr(&self.attr_ttl(&a), &self.attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _s = tracing::debug_span!("readlink", ino = ino.0).entered();
        match self.vfs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("mknod", parent = parent.0).entered();
        self.entry(
            reply,
            self.vfs
                .mknod(ctx(req), parent.0, name.as_bytes(), mode, rdev),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("mkdir", parent = parent.0).entered();
        self.entry(
            reply,
            self.vfs.mkdir(ctx(req), parent.0, name.as_bytes(), mode),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("unlink", parent = parent.0).entered();
        Self::empty(reply, self.vfs.unlink(ctx(req), parent.0, name.as_bytes()));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("rmdir", parent = parent.0).entered();
        Self::empty(reply, self.vfs.rmdir(ctx(req), parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("symlink", parent = parent.0).entered();
        let target = target.as_os_str().as_bytes();
        self.entry(
            reply,
            self.vfs
                .symlink(ctx(req), parent.0, link_name.as_bytes(), target),
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _s =
            tracing::debug_span!("rename", parent = parent.0, newparent = newparent.0).entered();
        if flags.contains(fuser::RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let flags = RenameFlags {
            noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
        };
        Self::empty(
            reply,
            self.vfs.rename(
                ctx(req),
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags,
            ),
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _s = tracing::debug_span!("link", ino = ino.0, newparent = newparent.0).entered();
        self.entry(
            reply,
            self.vfs
                .link(ctx(req), ino.0, newparent.0, newname.as_bytes()),
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = tracing::debug_span!("open", ino = ino.0).entered();
        match self.vfs.open(ctx(req), ino.0, flags.0) {
            Ok(o) => {
                let mut flags = FopenFlags::empty();
                if o.keep_cache {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                if o.direct_io {
                    flags |= FopenFlags::FOPEN_DIRECT_IO;
                }
                reply.opened(FileHandle(o.fh), flags)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _s = tracing::debug_span!("read", ino = ino.0, offset, size).entered();
        let data = if size as usize <= self.splice_max.load(Ordering::Relaxed) {
            self.vfs.read_data(ino.0, fh.0, offset, size)
        } else {
            self.vfs
                .read(ino.0, fh.0, offset, size)
                .map(ReadData::Bytes)
        };
        match data {
            Ok(ReadData::Bytes(data)) => reply.data(&data),
            Ok(ReadData::File {
                file,
                offset: at,
                len,
            }) => {
                let stats = &self.config.splice_stats;
                let Err((reply, e)) = reply.splice(file.as_fd(), at, len) else {
                    stats.spliced.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                stats.copied.fetch_add(1, Ordering::Relaxed);
                // EPERM: the pipe cannot grow to this length (fs.pipe-max-size, no
                // CAP_SYS_RESOURCE); EINVAL: the file's filesystem cannot splice. Both hold for
                // every later reply as long; other errors concern this one.
                if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) {
                    let max = len.saturating_sub(1);
                    if self.splice_max.fetch_min(max, Ordering::Relaxed) > max {
                        tracing::info!(error = %e, len, "read replies this long or longer are \
                             copied, not spliced");
                    }
                } else {
                    tracing::debug!(error = %e, len, "a read reply was copied, not spliced");
                }
                // The file cut short since it was checked is the cache's to find and drop:
                // the read made again checks it.
                let data = ReadData::File {
                    file,
                    offset: at,
                    len,
                }
                .into_bytes();
                match data.or_else(|_| self.vfs.read(ino.0, fh.0, offset, size)) {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(errno(e)),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _s = tracing::debug_span!("write", ino = ino.0, offset, len = data.len()).entered();
        let suidgid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        if let Err(e) = self.vfs.drop_privileges(ino.0, suidgid) {
            return reply.error(errno(e));
        }
        match self.vfs.write(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("flush", ino = ino.0).entered();
        let flushed = self.vfs.flush(ino.0, fh.0);
        let unlocked = self.vfs.release_locks(ino.0, lock_owner.0, LockKind::Posix);
        Self::empty(reply, flushed.and(unlocked));
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let _s = tracing::debug_span!("getlk", ino = ino.0).entered();
        let lock = FileLock {
            start,
            end,
            typ,
            pid,
            kind: LockKind::Posix,
        };
        match self.vfs.getlk(ino.0, fh.0, lock_owner.0, lock) {
            Ok(Some(l)) => reply.locked(l.start, l.end, l.typ, l.pid),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("setlk", ino = ino.0, sleep).entered();
        let req = req.unique().0;
        let lock = FileLock {
            start,
            end,
            typ,
            pid,
            kind: LockKind::Posix,
        };
        self.set_lock(req, ino, fh, lock_owner, lock, sleep, reply);
    }

    fn interrupt(&self, _req: &Request, unique: fuser::RequestId) {
        self.vfs.interrupt(unique.0);
    }

    fn flock(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("flock", ino = ino.0, sleep).entered();
        let req = req.unique().0;
        let lock = FileLock {
            start: 0,
            end: u64::MAX,
            typ,
            pid,
            kind: LockKind::Flock,
        };
        self.set_lock(req, ino, fh, lock_owner, lock, sleep, reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("release", ino = ino.0).entered();
        // The kernel names the owner only when the description held flock locks.
        let unlocked = match lock_owner {
            Some(owner) => self.vfs.release_locks(ino.0, owner.0, LockKind::Flock),
            None => Ok(()),
        };
        Self::empty(reply, self.vfs.release(ino.0, fh.0).and(unlocked));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("fsync", ino = ino.0).entered();
        Self::empty(reply, self.vfs.fsync(ino.0, fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _s = tracing::debug_span!("opendir", ino = ino.0).entered();
        if self.no_opendir {
            // Once, at the first opendir: the kernel then opens directories by itself and
            // keeps their listings (as with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR), dropping
            // them when this mount changes the directory.
            return reply.error(Errno::ENOSYS);
        }
        match self.vfs.opendir(ino.0) {
            Ok(o) => {
                // The kernel keeps listings in its page cache; it drops them itself when
                // this mount changes the directory, and at an open without KEEP_CACHE.
                let mut flags = FopenFlags::FOPEN_CACHE_DIR;
                if o.keep_cache {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(o.fh), flags);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _s = tracing::debug_span!("readdir", ino = ino.0, offset).entered();
        match self.vfs.readdir(ino.0, offset, 256) {
            Ok(entries) => {
                for e in entries {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), e.next, file_type(e.kind), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("fsyncdir", ino = ino.0).entered();
        Self::empty(reply, self.vfs.fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.vfs.statfs() {
            Ok(s) => {
                let bs = s.block_size as u64;
                reply.statfs(
                    s.total_bytes / bs,
                    s.free_bytes / bs,
                    s.free_bytes / bs,
                    s.total_inodes,
                    s.free_inodes,
                    s.block_size,
                    255,
                    s.block_size,
                );
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("setxattr", ino = ino.0).entered();
        Self::empty(
            reply,
            self.vfs.setxattr(ino.0, name.as_bytes(), value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _s = tracing::debug_span!("getxattr", ino = ino.0).entered();
        xattr_reply(reply, size, self.vfs.getxattr(ino.0, name.as_bytes()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _s = tracing::debug_span!("listxattr", ino = ino.0).entered();
        xattr_reply(reply, size, self.vfs.listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _s = tracing::debug_span!("removexattr", ino = ino.0).entered();
        Self::empty(reply, self.vfs.removexattr(ino.0, name.as_bytes()));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // With default_permissions the kernel checks access itself; this is never reached.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _s = tracing::debug_span!("create", parent = parent.0).entered();
        match self
            .vfs
            .create(ctx(req), parent.0, name.as_bytes(), mode, flags)
        {
            Ok((a, fh)) => reply.created(
                &self.config.entry_ttl,
                &self.attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _s = tracing::debug_span!("fallocate", ino = ino.0, offset, length).entered();
        // Like a write (the kernel's file_modified, which with HANDLE_KILLPRIV_V2 leaves it
        // to the filesystem and does not say whether the caller has CAP_FSETID: root is
        // taken to have it).
        if let Err(e) = self.vfs.drop_privileges(ino.0, req.uid() != 0) {
            return reply.error(errno(e));
        }
        Self::empty(reply, self.vfs.fallocate(ino.0, fh.0, offset, length, mode));
    }
}

fn xattr_reply<E: ToErrno>(reply: ReplyXattr, size: u32, result: Result<Vec<u8>, E>) {
    match result {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}

/// The bits of `mode` that a write, truncate or chown by a caller without CAP_FSETID drops
/// (the rule of `FUSE_HANDLE_KILLPRIV_V2`): setuid, and setgid when group execute is set
/// (without it, setgid marks mandatory locking, not a privilege).
pub fn privileged_bits(mode: u32) -> u32 {
    let mut bits = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && mode & libc::S_IXGRP != 0 {
        bits |= libc::S_ISGID;
    }
    bits
}

/// A mounted filesystem served by background request loops. Dropping it unmounts.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted").finish_non_exhaustive()
    }
}

impl Mounted {
    /// Waits until the filesystem is unmounted (by umount(2), fusermount3 or the kernel).
    pub fn join(mut self) -> io::Result<()> {
        match self.session.take() {
            // Once the kernel has torn the connection down (after an unmount, notably a lazy
            // one, or an abort), reading /dev/fuse can fail with ECONNABORTED rather than
            // ENODEV, which fuser takes for an error: it is the end of the session all the same.
            Some(s) => match s.join() {
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                    tracing::debug!("FUSE connection ended with ECONNABORTED");
                    Ok(())
                }
                other => other,
            },
            None => Ok(()),
        }
    }
}

/// Mounts `vfs` at `mountpoint` and serves it from background request loops.
///
/// As root it mounts with mount(2); otherwise through fusermount3.
pub fn mount<V: Vfs>(vfs: Arc<V>, mountpoint: &Path, config: MountConfig) -> io::Result<Mounted> {
    let mut options = vec![
        MountOption::FSName(config.fsname.clone()),
        MountOption::Subtype("tidefs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if config.read_only {
        options.push(MountOption::RO);
    }
    let splice_max = if config.splice_reads {
        splice_limit()
    } else {
        0
    };
    if let Some(max) = max_read(splice_max) {
        options.push(MountOption::CUSTOM(format!("max_read={max}")));
    }
    if unsafe { libc::geteuid() } == 0 {
        options.push(MountOption::Dev);
        options.push(MountOption::Suid);
    }
    let mut fuser_config = Config::default();
    fuser_config.mount_options = options;
    fuser_config.acl = if config.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuser_config.n_threads = Some(config.threads.max(1));
    fuser_config.clone_fd = true;
    let read_ahead_kb = config.read_ahead_kb;
    let kernel_cache = config.kernel_cache.clone();
    let adapter = Adapter {
        vfs,
        config,
        splice_max: AtomicUsize::new(splice_max),
        no_opendir: false,
    };
    let session = Session::new(adapter, mountpoint, &fuser_config)?;
    kernel_cache.notifier.set(session.notifier()).ok();
    let session = session.spawn()?;
    match read_ahead_kb {
        Some(kb) if unsafe { libc::geteuid() } == 0 => set_read_ahead(mountpoint, kb),
        Some(_) => tracing::info!("kernel readahead stays at 128 KiB (raising it needs root)"),
        None => {}
    }
    Ok(Mounted {
        session: Some(session),
    })
}

/// Sets the kernel readahead of the filesystem mounted at `mountpoint` to `kb` KiB.
///
/// The kernel starts a FUSE mount at 128 KiB and lowers it to what the filesystem answers
/// its INIT request with, so the larger value can only be set afterwards, through the
/// mount's backing device in sysfs. The `stat` of the mountpoint is answered once INIT is,
/// so it also waits for that. A failure (no sysfs, a confined root) is logged, not returned:
/// the mount works, with the kernel's readahead.
fn set_read_ahead(mountpoint: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot stat the mountpoint to set its readahead");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    match std::fs::write(&path, kb.to_string()) {
        Ok(()) => tracing::debug!(kb, path, "kernel readahead set"),
        Err(e) => tracing::info!(error = %e, path, "kernel readahead left at its default"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_cut_to_what_a_pipe_can_splice() {
        let page = page_size::get();
        // 2 MiB pipes carry 1 MiB replies: the kernel's own limit stays.
        assert_eq!(max_read((2 << 20) - 2 * page), None);
        // 1 MiB pipes carry a little less than 1 MiB: reads of 512 KiB.
        assert_eq!(max_read((1 << 20) - 2 * page), Some(512 << 10));
        assert_eq!(max_read(300 << 10), Some(256 << 10));
        // No splicing (or too little to matter): no limit.
        assert_eq!(max_read(0), None);
        assert_eq!(max_read(100 << 10), None);
    }

    #[test]
    fn the_splice_limit_leaves_room_for_the_header() {
        let limit = splice_limit();
        let page = page_size::get();
        assert!(limit > 0 && limit % page == 0, "{limit}");
        // A pipe holds at least the default 64 KiB (16 pages): 14 of them for data.
        assert!(limit >= 14 * page, "{limit}");
    }
}
