//! Metadata engines of tidefs.
//!
//! Every engine implements [`Meta`], whose methods are filesystem operations: each one is a
//! single atomic transaction in the engine, so a crash leaves either all of an operation or none
//! of it. The [`conformance`] suite states the behaviour every engine must have; each engine runs
//! it unchanged.

pub mod conformance;
pub mod dump;
mod error;
pub mod lock;
mod redis;
mod sqlite;
pub mod testing;
mod types;
mod url;

pub use error::{MetaError, Result};
pub use redis::{hide_password, RedisMeta};
pub use sqlite::SqliteMeta;
pub use types::*;
pub use url::{open, MetaUrl};

/// A metadata engine: inodes, directory entries, slice lists, xattrs, sessions and counters of
/// one volume.
///
/// Permission checks are not done here (the caller does them); every other rule of POSIX
/// namespaces is: names are unique in a directory, directories are removed only when empty, a
/// directory is never moved below itself, link counts and timestamps follow Linux.
pub trait Meta: Send + Sync {
    /// The engine's name, for logs and status.
    fn engine(&self) -> &'static str;

    /// Formats the volume, or accepts an existing format with the same layout (updating its
    /// changeable settings). Fails with [`MetaError::FormatMismatch`] for another layout.
    fn format(&self, format: &Format, root_uid: u32, root_gid: u32) -> Result<()>;
    /// The volume's settings; [`MetaError::NotFormatted`] if it was never formatted.
    fn load_format(&self) -> Result<Format>;

    /// Registers a mounted client and returns its session id.
    fn new_session(&self, info: &SessionInfo) -> Result<u64>;
    /// Records that session `sid` is alive.
    fn heartbeat(&self, sid: u64) -> Result<()>;
    /// Ends session `sid`, freeing files it kept alive after their last unlink and releasing
    /// its locks.
    fn close_session(&self, sid: u64) -> Result<()>;
    /// Every registered session.
    fn sessions(&self) -> Result<Vec<SessionInfo>>;

    /// Space and inodes in use.
    fn usage(&self) -> Result<Usage>;

    /// The inode named `name` in directory `parent`.
    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr>;
    /// The attributes of `ino`.
    fn getattr(&self, ino: Ino) -> Result<Attr>;
    /// Changes mode, owner, group or times of `ino`.
    fn setattr(&self, ino: Ino, set: &SetAttr) -> Result<Attr>;
    /// Sets the length of file `ino`; bytes past a shrink are gone, an extension reads as zeros.
    fn truncate(&self, ino: Ino, length: u64, mtime: Timestamp) -> Result<Attr>;
    /// Allocates or zeroes `[off, off + len)` of file `ino`. Zeroing writes zero slices with
    /// the ids `zero_ids` (one per chunk touched), which the caller takes from the same ordered
    /// source as its data slices, so that later writes hide them.
    fn fallocate(
        &self,
        ino: Ino,
        mode: FallocMode,
        off: u64,
        len: u64,
        zero_ids: &[u64],
    ) -> Result<Attr>;

    /// Creates a file, directory, symlink or special node `name` in `parent`.
    fn mknod(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<Attr> {
        Ok(self.mknod_with_parent(parent, name, node)?.0)
    }
    /// As [`Meta::mknod`], also giving the parent's attributes as the same transaction left
    /// them.
    fn mknod_with_parent(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<(Attr, Attr)>;
    /// Adds the name `name` in `parent` for the existing non-directory `ino`.
    fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr>;
    /// Removes the non-directory `name` from `parent`. An inode left with no name is freed,
    /// unless `is_open` says it is open, in which case session `sid` keeps it until
    /// [`Meta::release`].
    fn unlink(
        &self,
        parent: Ino,
        name: &[u8],
        sid: u64,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()>;
    /// Removes the empty directory `name` from `parent`.
    fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()>;
    /// Renames atomically; a replaced target is treated as by [`Meta::unlink`].
    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
        sid: u64,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()>;
    /// The target of symlink `ino`.
    fn readlink(&self, ino: Ino) -> Result<Vec<u8>>;
    /// Up to `limit` entries of directory `ino` that come after `cookie` (0: from the start),
    /// without `.` and `..`.
    fn readdir(&self, ino: Ino, cookie: u64, limit: usize) -> Result<Vec<DirEntry>>;

    /// The value of xattr `name` of `ino`.
    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>>;
    /// Sets xattr `name` of `ino`.
    fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()>;
    /// The names of the xattrs of `ino`.
    fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>>;
    /// Removes xattr `name` of `ino`.
    fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()>;

    /// The slices of chunk `chunk` of file `ino`, in the order they apply: each hides the
    /// bytes of those before it where they overlap.
    fn read_chunk(&self, ino: Ino, chunk: u32) -> Result<Vec<Slice>>;
    /// Commits slices whose data is durable in the object store, extending the length to cover
    /// them and setting mtime and ctime. They apply after every slice committed before, in
    /// the order given.
    fn write_slices(&self, ino: Ino, slices: &[ChunkSlice], mtime: Timestamp) -> Result<Attr>;
    /// [`Meta::write_slices`] for several files in one transaction: all of them, in the order
    /// given, or none. Files may share a slice id (a packed object holding several small
    /// files): a slice's objects go to the deletion queue only when no file references it.
    /// An inode given twice fails the call with [`MetaError::Invalid`].
    fn write_files(&self, files: &[FileWrite]) -> Result<Vec<Attr>>;
    /// Replaces `replaced`, the first slices of chunk `chunk` of file `ino` in the order
    /// [`Meta::read_chunk`] gave them, by `new`, which holds the same bytes and is durable;
    /// the replaced slices go to the deletion queue once no file references them. If the
    /// chunk changed meanwhile so that the swap could change what reads see (a replaced slice is gone or cut short, or a
    /// slice not replaced now applies before one that is), it changes nothing, queues `new`
    /// for deletion instead and returns false. Length and times do not change.
    fn compact_chunk(&self, ino: Ino, chunk: u32, replaced: &[Slice], new: Slice) -> Result<bool>;
    /// Reserves `n` consecutive slice ids and returns the first.
    fn next_slice_ids(&self, n: u64) -> Result<u64>;

    /// Called on the last close of `ino` in session `sid`: frees it if it has no name left.
    fn release(&self, ino: Ino, sid: u64) -> Result<()>;
    /// Up to `limit` slices with ids above `after`, freed by earlier operations, whose objects
    /// are still to delete, in id order.
    fn pending_deletions(&self, after: u64, limit: usize) -> Result<Vec<FreedSlice>>;
    /// Forgets freed slices whose objects are now deleted.
    fn ack_deletions(&self, ids: &[u64]) -> Result<()>;
    /// Up to `limit` slices with data (zero slices have none) that files reference, with ids
    /// above `after`, each once, in id order.
    fn referenced_slices(&self, after: u64, limit: usize) -> Result<Vec<SliceRef>>;
    /// Checks that link counts, directory parents and sizes, entries, open-but-unlinked inodes
    /// and the usage and id counters agree. With `repair` it also fixes every problem whose
    /// fix loses nothing (each [`Problem`] says whether it was fixed). Safe on a mounted
    /// volume: each operation of a mount is one transaction, and so is the check.
    fn check_namespace(&self, repair: bool) -> Result<Vec<Problem>>;

    /// Makes every committed operation durable against power loss, not only process crashes.
    fn sync(&self) -> Result<()>;

    /// Takes or releases POSIX lock `req` on `ino` for its owner, atomically against every
    /// mount of the volume (see [`lock::apply`]). Returns the lock of another owner it
    /// conflicts with, changing nothing, or None when done.
    fn setlk(&self, ino: Ino, req: &lock::Lock) -> Result<Option<lock::Lock>>;
    /// The first lock of another owner that `req` would conflict with.
    fn getlk(&self, ino: Ino, req: &lock::Lock) -> Result<Option<lock::Lock>>;

    /// The next inode number and the next slice id the volume hands out.
    fn id_counters(&self) -> Result<(u64, u64)>;
    /// Fills an engine that holds no volume with a dump's records (see [`dump::load`]):
    /// inode numbers, slice ids and entry order are kept, usage counters recomputed, and the
    /// format written last, so a load that fails part way leaves no formatted volume.
    fn load_records(
        &self,
        header: &dump::DumpHeader,
        records: &mut dyn Iterator<Item = Result<dump::DumpRecord>>,
    ) -> Result<()>;
}

/// Fails unless `name` may name a new directory entry: not empty, `.` or `..`, no `/`, at most
/// [`NAME_MAX`] bytes.
pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(MetaError::Invalid);
    }
    Ok(())
}
