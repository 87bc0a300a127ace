//! The filesystem the FUSE adapter calls: open files, write buffers, unlinked-but-open files,
//! and the background work of a mount (object deletion, session heartbeat).
//!
//! Consistency: close(2), fsync(2) and a read of a file with buffered writes commit those
//! writes first, so another open after a close sees every byte (close-to-open), and fsync
//! returns only when data is in the object store and metadata is durable.

use crate::closing::{self, Closing};
use crate::compact;
use crate::control::{self, ControlSession, CONTROL_INO, CONTROL_NAME};
use crate::data::{
    DataCtx, FileWriter, PendingRead, ReadPattern, COMPACT_THRESHOLD, MAX_FILE_SIZE,
    MAX_PENDING_SLICES,
};
use crate::error::FsError;
use crate::layout::CHUNK_SIZE;
use crate::perm;
use crate::readahead::Readahead;
use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tidefs_fuse::{privileged_bits, Ctx, FileLock, ListEntry, Opened, ReadData, StatFs};
use tidefs_meta::lock::{Lock, LockKind, LockType};
use tidefs_meta::{
    parse_trash_hour, Attr, FallocMode, FileKind, Format, Ino, MetaError, NewNode, RenameFlags,
    SetAttr, Timestamp, XattrMode, TRASH_INO,
};

/// Tunables of a mount's VFS.
#[derive(Clone, Debug)]
pub struct VfsOptions {
    /// Bytes of uncommitted writes, over all files, before writers commit at once.
    pub buffer_size: u64,
    /// How often the session heartbeat is written and dead sessions are looked for.
    pub heartbeat: Duration,
    /// How often freed objects are deleted when nobody asks sooner.
    pub delete_interval: Duration,
    /// Most bytes a sequential reader has fetched ahead (also held to half the block cache).
    pub max_readahead: u64,
    /// Writes still uncommitted after this long are committed in the background, so that an
    /// open file's data reaches the volume (and other clients, and gc's view) without waiting
    /// for close or fsync.
    pub commit_interval: Duration,
    /// How often this mount purges expired files from the trash.
    pub trash_purge_interval: Duration,
    /// The mount is read-only: no background work that writes (compaction, trash purge) and
    /// no control commands.
    pub read_only: bool,
    /// How long the kernel may keep attributes (`--attr-cache`); a directory's attributes
    /// that this mount's last creation in it left are answered for as long (see
    /// [`TideVfs::getattr`]).
    pub attr_ttl: Duration,
    /// close(2) returns without waiting for the file's upload and commit, which the release
    /// that follows runs in the background (see [`crate::closing`]). Only for a sole mount:
    /// other mounts would not see a closed file's data until it commits.
    pub close_behind: bool,
    /// With close-behind, how long the commit of a small file closed with all its writes in
    /// memory waits (see [`crate::closing`]): if the file is removed or replaced meanwhile,
    /// its data is never uploaded.
    pub close_delay: Duration,
}

impl Default for VfsOptions {
    fn default() -> Self {
        VfsOptions {
            buffer_size: 96 << 20,
            heartbeat: Duration::from_secs(crate::session::DEFAULT_HEARTBEAT),
            delete_interval: Duration::from_secs(1),
            max_readahead: 64 << 20,
            commit_interval: Duration::from_secs(5),
            trash_purge_interval: Duration::from_secs(3600),
            read_only: false,
            attr_ttl: Duration::from_secs(1),
            close_behind: false,
            close_delay: CLOSE_DELAY,
        }
    }
}

/// Releases of written files finishing in the background before closes wait (see
/// [`crate::closing`]): enough to keep the object store busy with small files.
const CLOSES_BEHIND: usize = 64;

/// Deferred releases of small files before closes wait: with at most
/// [`crate::data::DEFERRABLE_BYTES`] each, they hold at most 32 MiB.
const CLOSES_DEFERRED: usize = 512;

/// Deferred releases due within this of the moment the first due one is taken start with it,
/// so that their small files share objects (see [`crate::data::DataCtx::commit_packed`]): at
/// most this much earlier than their delay says.
pub const CLOSE_BATCH: Duration = Duration::from_millis(250);

/// The default [`VfsOptions::close_delay`]: most temporary files a build, a test suite or a
/// file server (dbench's load) removes are gone within it.
pub const CLOSE_DELAY: Duration = Duration::from_secs(2);

/// The handles of a file open here.
#[derive(Clone, Copy, Debug, Default)]
struct Opens {
    /// Handles opened whose release has not finished; the file stays alive while any is.
    handles: u32,
    /// Of those, the ones already closed, whose release waits or is under way: they can
    /// never read the file again.
    closed: u32,
}

/// Entries of a directory fetched from the engine in one call, kept for the rest of a listing.
struct DirBatch {
    /// Orders batches by when their read began: an older read never replaces a newer one.
    seq: u64,
    /// The listing offset the batch starts after.
    after: u64,
    /// The entries, in listing order.
    entries: Arc<Vec<ListEntry>>,
    /// The engine had no more entries after these (when they were read).
    last: bool,
}

impl DirBatch {
    /// Whether the listing from offset `start` on begins in this batch (or, for the last
    /// batch, is over).
    fn covers(&self, start: u64) -> bool {
        self.after <= start && (self.last || self.entries.last().is_some_and(|l| l.next > start))
    }
}

/// One open(2) of a file.
struct OpenHandle {
    /// Sequential detection and the readahead window.
    readahead: Readahead,
    /// Commit failures of the file this handle has reported (see [`FileWriter::flush`]).
    err_seen: AtomicU64,
}

/// The xattr holding a file's capabilities, which a write, truncate or chown drops.
const CAPABILITIES: &[u8] = b"security.capability";

/// The tidefs VFS of one mount.
pub struct TideVfs {
    data: Arc<DataCtx>,
    format: Format,
    sid: u64,
    opts: VfsOptions,
    handles: DashMap<u64, Arc<OpenHandle>>,
    next_fh: AtomicU64,
    open_counts: DashMap<Ino, Opens>,
    /// Files unlinked while open here, kept alive by this session.
    sustained: DashMap<Ino, ()>,
    writers: DashMap<Ino, Arc<FileWriter>>,
    /// (mtime, length) of files at their last open, to let the kernel keep cached pages.
    seen_versions: DashMap<Ino, (Timestamp, u64)>,
    /// Regular files found with nothing for [`Vfs::drop_privileges`] to drop (no setuid bit,
    /// no setgid bit with group execute, no file capabilities) since their last open here or
    /// their last change of mode, owner or xattrs through this mount.
    unprivileged: DashMap<Ino, ()>,
    /// Directory entries fetched ahead for listings in progress: the kernel asks for about
    /// a page of entries at a time, the engine hands out [`DIR_BATCH`] per call. Keyed by
    /// directory.
    dir_batches: DashMap<Ino, DirBatch>,
    /// Hands out [`DirBatch::seq`].
    dir_batch_seq: AtomicU64,
    /// (inode, lock owner, kind) that took locks here: their close (fcntl) or the release of
    /// their open file description (flock) releases them.
    lock_owners: DashMap<(Ino, u64, LockKind), ()>,
    /// Directories' attributes as this mount's last creation in each (or opendir) read them,
    /// with when: they answer the getattr the kernel sends right after a creation (see
    /// [`TideVfs::getattr`]) or the start of the listing after an opendir.
    fresh_dirs: DashMap<Ino, (Attr, Instant)>,
    /// Tells the kernel of namespace changes made here on the mount's own initiative.
    kernel: Arc<tidefs_fuse::KernelCache>,
    /// Kernel requests whose caller got a signal (FUSE_INTERRUPT), with when: a lock wait
    /// of one of them ends with EINTR.
    interrupted: DashMap<u64, Instant>,
    /// Bumped whenever this mount releases a lock, waking its lock waiters at once (waiters
    /// for locks of other mounts ask again after a growing pause).
    lock_changed: (Mutex<u64>, std::sync::Condvar),
    background: Mutex<Option<JoinHandle<()>>>,
    /// Tells the background thread that objects were freed (or to stop).
    deleter: mpsc::Sender<Wake>,
    destroyed: AtomicBool,
    /// Opens of the control file, by handle.
    controls: DashMap<u64, Arc<ControlSession>>,
    /// Threads of background work (commits, compaction, trash purge), joined at unmount.
    helpers: Mutex<Vec<JoinHandle<()>>>,
    /// This VFS, for control commands that outlive the request starting them.
    me: Weak<TideVfs>,
    /// Releases finishing in the background, with close-behind.
    closing: Arc<Closing>,
    /// [`DataCtx::commit_failures`] as the last fsync of a directory reported them.
    failures_dir_synced: AtomicU64,
}

impl std::fmt::Debug for TideVfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TideVfs")
            .field("volume", &self.format.name)
            .field("sid", &self.sid)
            .finish()
    }
}

type Result<T> = std::result::Result<T, FsError>;

/// Files whose last-open version is remembered (about 50 bytes each).
const MAX_SEEN_VERSIONS: usize = 100_000;

/// How long a directory's attributes kept after a creation (or opendir) may answer the
/// question that follows; that question comes at once (the kernel asks at the next path walk
/// through the directory), so this only bounds how late another mount's change may show.
const FRESH_DIR_WINDOW: Duration = Duration::from_millis(100);

/// Interrupts remembered before old ones are forgotten.
const MAX_INTERRUPTS: usize = 1024;

/// Directories whose attributes after a creation are kept for the next getattr (about 100
/// bytes each; the kernel asks within moments, so few are ever waiting).
const MAX_FRESH_DIRS: usize = 10_000;

/// The bytes of a read's answer (read from the file for a span, which only a read that
/// allowed spans gets).
fn into_bytes(data: ReadData) -> Result<Bytes> {
    data.into_bytes()
        .map_err(|e| FsError::Data(format!("reading a cache file: {e}")))
}

impl TideVfs {
    /// A read, answered with a checked span of a disk cache file when `spans` allows and one
    /// holds all of it (see [`DataCtx::read`]).
    fn read_from(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
        spans: bool,
    ) -> Result<ReadData> {
        if ino == CONTROL_INO {
            return Ok(ReadData::Bytes(Bytes::from(self.control(fh)?.read(size))));
        }
        let _reading = self.data.reads.enter();
        let writer = self.writers.get(&ino).map(|w| w.clone());
        let pending = writer.map_or(PendingRead::Nothing, |w| {
            w.pending_read(offset, offset + size as u64)
        });
        let (length, overlay) = match pending {
            PendingRead::Nothing => (self.data.length(ino)?, Vec::new()),
            PendingRead::CommitFirst => {
                self.flush_inode(ino, None)?;
                (self.data.length(ino)?, Vec::new())
            }
            PendingRead::Overlay { length, parts } => (self.data.length(ino)?.max(length), parts),
        };
        let handle = self.handle(fh);
        let pattern = match &handle {
            Some(h) if !h.readahead.is_sequential(offset) => ReadPattern::Random,
            _ => ReadPattern::Sequential,
        };
        let spans = spans && overlay.is_empty();
        let mut out = self.data.read(ino, length, offset, size, pattern, spans)?;
        if !overlay.is_empty() {
            let mut with_overlay = Vec::from(into_bytes(out)?);
            for (at, bytes) in overlay {
                let dst = (at - offset) as usize;
                if dst >= with_overlay.len() {
                    continue;
                }
                let n = bytes.len().min(with_overlay.len() - dst);
                with_overlay[dst..dst + n].copy_from_slice(&bytes[..n]);
            }
            out = ReadData::Bytes(Bytes::from(with_overlay));
        }
        if let Some(h) = handle {
            let end = offset + out.len() as u64;
            let bs = self.data.layout.block_size() as u64;
            let max = self.opts.max_readahead.min(self.data.cache.room() / 2);
            if let Some(ahead) = h.readahead.on_read(offset, end, bs, max) {
                if ahead.start < length {
                    self.data.prefetch(ino, ahead.start, ahead.end.min(length));
                }
            }
        }
        Ok(out)
    }

    /// The VFS of session `sid` of the volume with `format`.
    pub fn new(data: Arc<DataCtx>, format: Format, sid: u64, opts: VfsOptions) -> Arc<Self> {
        let (deleter, rx) = mpsc::channel();
        let vfs = Arc::new_cyclic(|me| TideVfs {
            deleter,
            me: me.clone(),
            closing: Arc::new(Closing::new(closing::Limits {
                running: CLOSES_BEHIND,
                deferred: CLOSES_DEFERRED,
                delay: opts.close_delay,
                batch: CLOSE_BATCH,
            })),
            failures_dir_synced: AtomicU64::new(0),
            controls: DashMap::new(),
            helpers: Mutex::new(Vec::new()),
            data,
            format,
            sid,
            opts,
            handles: DashMap::new(),
            next_fh: AtomicU64::new(1),
            open_counts: DashMap::new(),
            sustained: DashMap::new(),
            writers: DashMap::new(),
            seen_versions: DashMap::new(),
            unprivileged: DashMap::new(),
            lock_owners: DashMap::new(),
            fresh_dirs: DashMap::new(),
            kernel: Arc::default(),
            interrupted: DashMap::new(),
            dir_batches: DashMap::new(),
            dir_batch_seq: AtomicU64::new(0),
            lock_changed: (Mutex::new(0), std::sync::Condvar::new()),
            background: Mutex::new(None),
            destroyed: AtomicBool::new(false),
        });
        let worker = {
            let data = vfs.data.clone();
            let opts = vfs.opts.clone();
            std::thread::Builder::new()
                .name("tidefs-background".into())
                .spawn(move || background_loop(&data, &opts, rx))
                .expect("spawn background thread")
        };
        // Commits run on their own thread: one can wait minutes on a slow store, and the
        // heartbeat must not wait with it.
        let period =
            (vfs.opts.commit_interval / 5).clamp(Duration::from_millis(50), Duration::from_secs(1));
        vfs.spawn_helper("tidefs-commit", move |weak| {
            while let Some(vfs) = sleep_while_mounted(weak, period) {
                vfs.commit_old_writes();
            }
        });
        if vfs.opts.close_behind {
            // Starts deferred releases as they come due; unmount finishes the rest.
            vfs.spawn_helper("tidefs-closer", |weak| loop {
                let Some(vfs) = weak.upgrade() else {
                    return;
                };
                if vfs.destroyed.load(Ordering::SeqCst) {
                    return;
                }
                // Written data in memory past half the buffer: deferred small files stop
                // waiting, so that writers need not.
                let pressure = vfs.data.buffered.load(Ordering::Relaxed) > vfs.opts.buffer_size / 2;
                let due = vfs.closing.take_due(pressure, Duration::from_millis(100));
                vfs.finish_releases(due);
            });
        }
        // The heartbeat has a thread of its own, so that neither slow deletes nor slow
        // commits make a live mount look dead to the others.
        let heartbeat = vfs.opts.heartbeat;
        vfs.spawn_helper("tidefs-session", move |weak| {
            while let Some(vfs) = sleep_while_mounted(weak, heartbeat) {
                let meta = &vfs.data.meta;
                if let Err(e) = meta.heartbeat(sid) {
                    tracing::warn!(error = %e, "session heartbeat failed");
                }
                if !vfs.opts.read_only {
                    if let Err(e) = crate::session::reap_dead(&**meta, Some(sid), heartbeat) {
                        tracing::warn!(error = %e, "cleaning up dead sessions failed");
                    }
                }
            }
        });
        if !vfs.opts.read_only {
            // Chunks with many slices are compacted one at a time, off every request path.
            let data = vfs.data.clone();
            vfs.spawn_helper("tidefs-compact", move |weak| loop {
                let hint = data.next_compaction_hint(Duration::from_millis(100));
                let Some(vfs) = weak
                    .upgrade()
                    .filter(|v| !v.destroyed.load(Ordering::SeqCst))
                else {
                    return;
                };
                let Some((ino, chunk)) = hint else { continue };
                match compact::compact_chunk(&data, ino, chunk, COMPACT_THRESHOLD) {
                    Ok(compact::Compacted::Done { .. }) => vfs.wake_deleter(),
                    Ok(_) | Err(FsError::Meta(MetaError::NotFound)) => {}
                    Err(e) => tracing::warn!(ino, chunk, error = %e, "compaction failed"),
                }
            });
            // Any mount purges the trash: at mount, then once per interval.
            let interval = vfs.opts.trash_purge_interval;
            vfs.spawn_helper("tidefs-trash", move |weak| {
                let mut wait = Duration::ZERO;
                while let Some(vfs) = sleep_while_mounted(weak, wait) {
                    match vfs.purge_trash(Timestamp::now().sec) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(files = n, "purged expired trash"),
                        Err(e) => tracing::warn!(error = %e, "purging the trash failed"),
                    }
                    wait = interval;
                }
            });
        }
        *vfs.background.lock().unwrap_or_else(|e| e.into_inner()) = Some(worker);
        vfs
    }

    /// Removes for good the files that have been in the trash longer than the volume's trash
    /// days (all of them when the trash is off), as of `now` (seconds since the epoch), and
    /// the hour directories it empties. Returns how many files it removed. Files open here
    /// stay until their last close, as after any unlink; mounts purging at once skip what
    /// the other removed.
    pub fn purge_trash(&self, now: i64) -> Result<usize> {
        let meta = &self.data.meta;
        let days = i64::from(meta.load_format()?.trash_days);
        let hours = match meta.readdir(TRASH_INO, 0, usize::MAX) {
            Err(MetaError::NotFound) => return Ok(0),
            r => r?,
        };
        let mut purged = 0;
        for hour in hours {
            let Some(start) = parse_trash_hour(&hour.name) else {
                continue;
            };
            if days > 0 && start + 3600 + days * 86_400 > now {
                continue;
            }
            let mut cookie = 0;
            loop {
                let entries = match meta.readdir(hour.ino, cookie, 1000) {
                    Err(MetaError::NotFound) => break,
                    r => r?,
                };
                let Some(last) = entries.last() else { break };
                cookie = last.cookie;
                for e in entries {
                    match self.unlink_entry(hour.ino, &e.name) {
                        Ok(()) => purged += 1,
                        Err(FsError::Meta(MetaError::NotFound)) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            let removed = meta.rmdir(TRASH_INO, &hour.name);
            self.forget_entry(TRASH_INO, &hour.name);
            match removed {
                Ok(()) | Err(MetaError::NotFound | MetaError::NotEmpty) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(purged)
    }

    fn lock_helpers(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.helpers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a thread of background work named `name`, joined at unmount. It gets a weak
    /// reference, so it never keeps the VFS alive, and must end soon after the unmount.
    fn spawn_helper(
        self: &Arc<Self>,
        name: &str,
        work: impl FnOnce(&Weak<TideVfs>) + Send + 'static,
    ) {
        let weak = Arc::downgrade(self);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(&weak))
            .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"));
        self.lock_helpers().push(thread);
    }

    /// The data path of this mount.
    pub fn data(&self) -> Arc<DataCtx> {
        self.data.clone()
    }

    /// Records `version` as what an open of `ino` found and says whether the previous open
    /// found the same: then what the kernel cached of it (file pages, directory listings) is
    /// still right. This is what makes caching close-to-open across mounts.
    fn unchanged_since_last_open(&self, ino: Ino, version: (Timestamp, u64)) -> bool {
        if self.seen_versions.len() >= MAX_SEEN_VERSIONS {
            self.seen_versions.clear();
        }
        self.seen_versions.insert(ino, version) == Some(version)
    }

    /// The engine's form of a kernel lock request of `owner` on `ino`.
    fn meta_lock(&self, ino: Ino, owner: u64, lock: FileLock) -> Result<Lock> {
        if ino == CONTROL_INO {
            return Err(FsError::refused(
                libc::ENOLCK,
                "the control file takes no locks",
            ));
        }
        let typ = match lock.typ {
            libc::F_RDLCK => LockType::Read,
            libc::F_WRLCK => LockType::Write,
            libc::F_UNLCK => LockType::Unlock,
            _ => return Err(FsError::refused(libc::EINVAL, "unknown lock type")),
        };
        Ok(Lock {
            sid: self.sid,
            owner,
            pid: lock.pid,
            typ,
            start: lock.start,
            end: lock.end,
            kind: lock.kind,
        })
    }

    /// Wakes this mount's lock waiters: a lock was released here.
    fn locks_released(&self) {
        let (count, changed) = &self.lock_changed;
        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        changed.notify_all();
    }

    /// The attributes of `ino` as the engine gives them, with the file's uncommitted writes
    /// laid over them. The writes are looked at first: a commit ending in between only moves
    /// them into the engine's answer, it cannot hide them.
    fn attr_of(&self, ino: Ino) -> Result<Attr> {
        let writer = self.writers.get(&ino).map(|w| w.clone());
        let pending = writer.and_then(|w| w.overlay());
        Ok(lay_over(self.data.meta.getattr(ino)?, pending))
    }

    /// Attributes the engine gave before the inode was known (lookup, link, setattr), with
    /// the file's uncommitted writes laid over them. A file with a writer but nothing
    /// pending may have committed since the engine answered: it is asked again.
    fn with_overlay(&self, a: Attr) -> Result<Attr> {
        if a.kind != FileKind::File {
            return Ok(a);
        }
        let Some(w) = self.writers.get(&a.ino).map(|w| w.clone()) else {
            return Ok(a);
        };
        match w.overlay() {
            Some(pending) => Ok(lay_over(a, Some(pending))),
            None => self.attr_of(a.ino),
        }
    }

    /// Commits the buffered writes of `ino`, waiting until they are durable and committed.
    /// With a handle, also reports commit failures that handle has not reported yet.
    fn flush_inode(&self, ino: Ino, handle: Option<&OpenHandle>) -> Result<()> {
        let Some(w) = self.writers.get(&ino).map(|w| w.clone()) else {
            return Ok(());
        };
        self.lost_writes_if_err(ino, w.flush(&self.data, ino, handle.map(|h| &h.err_seen)))
    }

    /// After a failed commit the kernel's cached pages hold data that is not stored: the next
    /// open must not keep them.
    fn lost_writes_if_err<T>(&self, ino: Ino, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.seen_versions.remove(&ino);
        }
        r
    }

    /// Commits the file's writes and, at its last release here, lets go of it. The kernel
    /// ignores release errors, so a failure to commit is left for the file's next close or
    /// fsync (and logged).
    fn finish_release(&self, ino: Ino) -> Result<()> {
        if !self.discard_if_unreadable(ino) {
            if let Err(e) = self.flush_inode(ino, None) {
                tracing::warn!(ino, error = %e, "flush at release failed");
            }
        }
        let mut last = false;
        self.open_counts.remove_if_mut(&ino, |_, o| {
            o.handles -= 1;
            o.closed = o.closed.saturating_sub(1);
            last = o.handles == 0;
            last
        });
        if !last {
            return Ok(());
        }
        // A writer is dropped only when idle and no handle is open, so a write through a
        // handle opened meanwhile never lands in a dropped writer; and not while a failure
        // of its commits is unreported, so the file's next close or fsync reports it.
        self.writers.remove_if(&ino, |_, w| {
            w.is_idle() && !self.is_open(ino) && !w.has_unreported_failure()
        });
        if !self.is_open(ino) {
            self.data.forget(ino);
            // The next open checks again anyway: no need to keep it for every file ever
            // created here.
            self.unprivileged.remove(&ino);
        }
        // If reopened meanwhile (e.g. through /proc/PID/fd), the new handle keeps it alive.
        if !self.is_open(ino) && self.sustained.remove(&ino).is_some() {
            self.data.meta.release(ino, self.sid)?;
            self.wake_deleter();
        }
        Ok(())
    }

    /// Drops the writes still in memory of a file that has lost its last name and whose
    /// every handle is closed (including those whose release waits or is under way): it can
    /// never be read again (a temporary file). Whether nothing is left to commit.
    fn discard_if_unreadable(&self, ino: Ino) -> bool {
        let unreadable = self.sustained.contains_key(&ino)
            && self
                .open_counts
                .get(&ino)
                .is_some_and(|o| o.closed == o.handles);
        let writer = self.writers.get(&ino).map(|w| w.clone());
        unreadable && writer.is_some_and(|w| w.discard(&self.data))
    }

    /// Runs [`TideVfs::finish_release`] for each of `due` on the runtime's blocking pool
    /// (here, if the VFS is being dropped), ending each ticket after it. Several releases
    /// first commit their small files packed together ([`DataCtx::commit_packed`]), in one
    /// task, before each finishes on its own.
    fn finish_releases(&self, due: closing::Due) {
        match self.me.upgrade() {
            Some(vfs) if due.len() > 1 => {
                self.data.rt.spawn_blocking(move || {
                    vfs.commit_packed(&due);
                    vfs.finish_each_release(due);
                });
            }
            _ => self.finish_each_release(due),
        }
    }

    /// Commits the small files of `due` packed together; the rest is left to their releases.
    fn commit_packed(&self, due: &closing::Due) {
        let _s = tracing::debug_span!("release_packed", files = due.len()).entered();
        let mut files: Vec<(Ino, Arc<FileWriter>)> = Vec::with_capacity(due.len());
        for (ino, _) in due {
            if files.iter().any(|(i, _)| i == ino) || self.discard_if_unreadable(*ino) {
                continue;
            }
            if let Some(w) = self.writers.get(ino) {
                files.push((*ino, w.clone()));
            }
        }
        for (ino, e) in self.data.commit_packed(&files) {
            tracing::warn!(ino, error = %e, "packed commit at release failed");
            // As `lost_writes_if_err`: the kernel's pages of the file hold unstored data.
            self.seen_versions.remove(&ino);
        }
    }

    /// [`TideVfs::finish_release`] of each of `due`, each as its own task.
    fn finish_each_release(&self, due: closing::Due) {
        for (ino, ticket) in due {
            let finish = move |vfs: &TideVfs| {
                let _ticket = ticket;
                let _s = tracing::debug_span!("release_behind", ino).entered();
                if let Err(e) = vfs.finish_release(ino) {
                    tracing::warn!(ino, error = %e, "release failed");
                }
            };
            match self.me.upgrade() {
                Some(vfs) => {
                    self.data.rt.spawn_blocking(move || finish(&vfs));
                }
                None => finish(self),
            }
        }
    }

    /// Finishes every release begun before this call, deferred ones at once, and waits for
    /// them; later ones may go on.
    fn finish_earlier_releases(&self) {
        let mark = self.closing.mark();
        self.finish_releases(self.closing.take_begun_before(mark));
        self.closing.wait_for_begun_before(mark);
    }

    fn handle(&self, fh: u64) -> Option<Arc<OpenHandle>> {
        self.handles.get(&fh).map(|h| h.clone())
    }

    /// Commits the writes that have waited longer than the commit interval. A failure reaches
    /// the file's handles through its errseq, as any commit failure does.
    fn commit_old_writes(&self) {
        let old: Vec<Ino> = self
            .writers
            .iter()
            .filter(|w| {
                w.pending_for()
                    .is_some_and(|d| d >= self.opts.commit_interval)
            })
            .map(|w| *w.key())
            .collect();
        for ino in old {
            if let Err(e) = self.flush_inode(ino, None) {
                tracing::warn!(ino, error = %e, "background commit failed");
            }
        }
    }

    /// Commits the buffered writes of every file.
    pub fn flush_all(&self) -> Result<()> {
        let inos: Vec<Ino> = self.writers.iter().map(|e| *e.key()).collect();
        let mut first = Ok(());
        for ino in inos {
            if let Err(e) = self.flush_inode(ino, None) {
                tracing::error!(ino, error = %e, "flush failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Creates `node` (made by [`blank_node`]) as `name` in `parent`, deciding on its setgid
    /// bit with the caller's groups.
    fn new_node(&self, ctx: Ctx, parent: Ino, name: &[u8], mut node: NewNode) -> Result<Attr> {
        node.groups = if perm::needs_groups(node.mode, node.kind == FileKind::Dir) {
            perm::caller_groups(ctx.pid, ctx.gid)
        } else {
            vec![ctx.gid]
        };
        match self.data.meta.mknod_with_parent(parent, name, &node) {
            Ok((a, dir)) => {
                self.note_dir(dir);
                Ok(a)
            }
            Err(e) => {
                self.dir_changed(parent);
                Err(e.into())
            }
        }
    }

    /// Keeps a directory's current attributes for the next question about them, unless
    /// attributes read after them (by ctime) are kept already.
    fn note_dir(&self, dir: Attr) {
        if self.opts.attr_ttl.is_zero() {
            return;
        }
        if self.fresh_dirs.len() >= MAX_FRESH_DIRS {
            self.fresh_dirs.clear();
        }
        match self.fresh_dirs.entry(dir.ino) {
            Entry::Occupied(kept) if kept.get().0.ctime > dir.ctime => {}
            Entry::Occupied(mut kept) => {
                kept.insert((dir, Instant::now()));
            }
            Entry::Vacant(v) => {
                v.insert((dir, Instant::now()));
            }
        }
    }

    /// The attributes [`TideVfs::note_dir`] kept for `ino`, if they are recent enough (see
    /// [`FRESH_DIR_WINDOW`]); they answer one question only.
    fn take_fresh_dir(&self, ino: Ino) -> Option<Attr> {
        let (_, (a, at)) = self.fresh_dirs.remove(&ino)?;
        (at.elapsed() < self.opts.attr_ttl.min(FRESH_DIR_WINDOW)).then_some(a)
    }

    /// A change through this mount other than a creation touched directory `ino`.
    fn dir_changed(&self, ino: Ino) {
        self.fresh_dirs.remove(&ino);
    }

    /// What the mount uses to tell the kernel of namespace changes it makes on its own
    /// (give it to [`tidefs_fuse::MountConfig::kernel_cache`]).
    pub fn kernel_cache(&self) -> Arc<tidefs_fuse::KernelCache> {
        self.kernel.clone()
    }

    /// Has the kernel forget entry `name` of `parent`, changed here without a request.
    pub(crate) fn forget_entry(&self, parent: Ino, name: &[u8]) {
        self.kernel.forget_entry(parent, name);
    }

    /// Removes the non-directory `name` from `parent` as unlink(2) does (an open file stays
    /// until its last close here).
    pub fn unlink_entry(&self, parent: Ino, name: &[u8]) -> Result<()> {
        let unlinked = self
            .data
            .meta
            .unlink(parent, name, self.sid, &|ino| self.keep_if_open(ino));
        self.dir_changed(parent);
        unlinked?;
        self.wake_deleter();
        Ok(())
    }

    /// Has the objects of slices an operation may have freed deleted soon.
    pub(crate) fn wake_deleter(&self) {
        let _ = self.deleter.send(Wake::Freed);
    }

    /// Commits the buffered writes of `ino`, waiting until they are durable.
    pub fn flush_file(&self, ino: Ino) -> Result<()> {
        self.flush_inode(ino, None)
    }

    fn control(&self, fh: u64) -> Result<Arc<ControlSession>> {
        self.controls
            .get(&fh)
            .map(|c| c.clone())
            .ok_or(FsError::refused(libc::EBADF, "unknown control handle"))
    }

    fn is_open(&self, ino: Ino) -> bool {
        self.open_counts.contains_key(&ino)
    }

    /// For `Meta::unlink` and `Meta::rename`, called inside their transaction when `ino` loses
    /// its last name: whether this session keeps it alive. It is noted before the commit, so a
    /// last close racing the unlink cannot miss it.
    fn keep_if_open(&self, ino: Ino) -> bool {
        // Noted while holding the open count, so a last close cannot slip in between.
        let Some(_count) = self.open_counts.get(&ino) else {
            return false;
        };
        self.sustained.insert(ino, ());
        true
    }

    fn open_handle(&self, ino: Ino) -> u64 {
        self.open_counts.entry(ino).or_default().handles += 1;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let err_seq = self
            .writers
            .get(&ino)
            .map(|w| w.seen_at_open())
            .unwrap_or(0);
        let handle = OpenHandle {
            readahead: Readahead::default(),
            err_seen: AtomicU64::new(err_seq),
        };
        self.handles.insert(fh, Arc::new(handle));
        fh
    }
}

/// Sleeps `period` in short steps; then the VFS, unless it was dropped or unmounted meanwhile
/// (so a helper thread ends within 100 ms of the unmount).
fn sleep_while_mounted(weak: &Weak<TideVfs>, period: Duration) -> Option<Arc<TideVfs>> {
    let step = Duration::from_millis(100);
    let deadline = Instant::now() + period;
    loop {
        let vfs = weak.upgrade()?;
        if vfs.destroyed.load(Ordering::SeqCst) {
            return None;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Some(vfs);
        }
        drop(vfs);
        std::thread::sleep(left.min(step));
    }
}

/// Entries asked of the engine at a time for a listing.
const DIR_BATCH: usize = 1000;

/// Directories with a listing batch kept; all are dropped when there are more.
const MAX_DIR_BATCHES: usize = 256;

/// Longest pause between two tries of a lock held by another mount.
const MAX_LOCK_POLL: Duration = Duration::from_millis(100);

/// A message for the background thread.
enum Wake {
    /// An operation freed slices: delete their objects soon.
    Freed,
    /// The mount is ending.
    Stop,
}

/// How long the deleter waits after being told of freed objects, so that the objects freed by
/// a burst of removals (`rm -rf`) go out together in batches of up to 1000 keys.
const DELETE_SETTLE: Duration = Duration::from_millis(200);

/// Longest the deleter waits for a burst of removals to end before deleting what it freed.
const MAX_DELETE_SETTLE: Duration = Duration::from_secs(1);

/// Deletes freed objects until told to stop. Deletion runs
/// [`DELETE_SETTLE`] after an operation freed something (up to [`MAX_DELETE_SETTLE`] while
/// more keep coming), and at least once per `delete_interval` (retrying what failed).
fn background_loop(data: &DataCtx, opts: &VfsOptions, wake: mpsc::Receiver<Wake>) {
    loop {
        let (woken, mut stop) = match wake.recv_timeout(opts.delete_interval) {
            Ok(Wake::Freed) => (true, false),
            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => (false, true),
            Err(RecvTimeoutError::Timeout) => (false, false),
        };
        // While removals keep coming (rm -rf), wait for them in steps, up to a bound, so that
        // their objects go out in full batches.
        let settling = Instant::now();
        while woken && !stop {
            std::thread::sleep(DELETE_SETTLE);
            let mut more = false;
            while let Ok(w) = wake.try_recv() {
                stop |= matches!(w, Wake::Stop);
                more = true;
            }
            if !more || settling.elapsed() >= MAX_DELETE_SETTLE {
                break;
            }
        }
        if let Err(e) = delete_freed(data) {
            tracing::warn!(error = %e, "deleting freed objects failed; will retry");
        }
        if stop {
            return;
        }
    }
}

/// Freed slices read from the deletion queue at a time: small files have one block each, so
/// a page this size still fills whole 1000-key batch requests.
const DELETE_PAGE: usize = 1000;

/// Deletes the objects of freed slices, one batch request per 1000 keys (sent at once), in one
/// pass over the deletion queue, and drops their blocks from the cache. A slice leaves the
/// queue only when all its blocks are gone; slices that fail stay for the next pass without
/// holding up the ones behind them.
pub fn delete_freed(data: &DataCtx) -> Result<usize> {
    let mut deleted = 0;
    let mut after = 0;
    let mut first_failure = None;
    loop {
        let freed = data.meta.pending_deletions(after, DELETE_PAGE)?;
        let Some(last) = freed.last() else { break };
        after = last.id;
        let owned: Vec<(u64, String)> = freed
            .iter()
            .flat_map(|f| {
                data.layout
                    .slice_keys(f.id, f.size)
                    .into_iter()
                    .map(move |k| (f.id, k))
            })
            .collect();
        let keys: Vec<String> = owned.iter().map(|(_, k)| k.clone()).collect();
        // Batches go out together; the store bounds how many requests run at once.
        let batches = keys
            .chunks(1000)
            .map(|batch| data.store.delete_batch(batch));
        let failed: Vec<_> = data
            .rt
            .block_on(futures::future::join_all(batches))
            .into_iter()
            .flatten()
            .collect();
        // No file refers to these blocks any more, whether or not their deletes went
        // through: their cached copies only take space from live blocks.
        data.rt.block_on(data.cache.discard(keys));
        let failed_keys: HashSet<&str> = failed.iter().map(|(k, _)| k.as_str()).collect();
        let failed_ids: HashSet<u64> = owned
            .iter()
            .filter(|(_, k)| failed_keys.contains(k.as_str()))
            .map(|(id, _)| *id)
            .collect();
        let ok: Vec<u64> = freed
            .iter()
            .map(|f| f.id)
            .filter(|id| !failed_ids.contains(id))
            .collect();
        data.meta.ack_deletions(&ok)?;
        deleted += ok.len();
        if first_failure.is_none() {
            first_failure = failed.into_iter().next();
        }
    }
    match first_failure {
        Some((key, e)) => Err(FsError::Data(format!("delete of {key} failed: {e}"))),
        None => Ok(deleted),
    }
}

/// A node of `kind` owned by the caller, before its groups are known.
fn blank_node(ctx: Ctx, kind: FileKind, mode: u32) -> NewNode {
    NewNode {
        kind,
        mode: mode & 0o7777,
        uid: ctx.uid,
        gid: ctx.gid,
        rdev: 0,
        symlink: None,
        groups: Vec::new(),
    }
}

fn xattr_mode(flags: i32) -> Result<XattrMode> {
    match flags {
        0 => Ok(XattrMode::Any),
        libc::XATTR_CREATE => Ok(XattrMode::Create),
        libc::XATTR_REPLACE => Ok(XattrMode::Replace),
        _ => Err(FsError::refused(libc::EINVAL, "bad xattr flags")),
    }
}

fn check_xattr_name(name: &[u8]) -> Result<()> {
    if name.starts_with(b"system.") {
        // POSIX ACLs are not supported; storing them unenforced would mislead.
        return Err(FsError::refused(
            libc::EOPNOTSUPP,
            "system xattrs are not supported",
        ));
    }
    Ok(())
}

/// `a` with a file's uncommitted writes, `(length, mtime)`, laid over it.
fn lay_over(mut a: Attr, pending: Option<(u64, Timestamp)>) -> Attr {
    if let (FileKind::File, Some((length, mtime))) = (a.kind, pending) {
        a.length = a.length.max(length);
        a.mtime = mtime;
        a.ctime = a.ctime.max(mtime);
    }
    a
}

impl tidefs_fuse::Vfs for TideVfs {
    type Error = FsError;

    fn lookup(&self, _ctx: Ctx, parent: Ino, name: &[u8]) -> Result<Attr> {
        match self.data.meta.lookup(parent, name) {
            Err(MetaError::NotFound) if parent == tidefs_meta::ROOT_INO && name == CONTROL_NAME => {
                Ok(control::control_attr())
            }
            r => self.with_overlay(r?),
        }
    }

    /// After a creation in a directory the kernel drops the directory's attributes and asks
    /// for them at the next path walk through it: that question is answered, once, with the
    /// attributes the creation left, which is what the engine would say unless another mount
    /// changed the directory since (as stale as the kernel's own attribute cache may be).
    fn getattr(&self, ino: Ino) -> Result<Attr> {
        if ino == CONTROL_INO {
            return Ok(control::control_attr());
        }
        if let Some(a) = self.take_fresh_dir(ino) {
            return Ok(a);
        }
        self.attr_of(ino)
    }

    fn setattr(&self, _ctx: Ctx, ino: Ino, set: SetAttr, size: Option<u64>) -> Result<Attr> {
        if ino == CONTROL_INO {
            // Opening with O_TRUNC truncates; the control file has nothing to cut.
            return Ok(control::control_attr());
        }
        self.dir_changed(ino);
        let meta = &self.data.meta;
        if size.is_some_and(|s| s > MAX_FILE_SIZE) {
            return Err(FsError::refused(libc::EFBIG, "file too large"));
        }
        // Pending writes go first: their commit sets mtime, which must not override times set
        // here (cp -p sets times before close), and a truncate must cut them too.
        self.flush_inode(ino, None)?;
        let mut attr = None;
        if let Some(size) = size {
            let t = set.mtime.unwrap_or_else(Timestamp::now);
            let truncated = meta.truncate(ino, size, t);
            self.data.invalidate(ino);
            attr = Some(truncated?);
            self.wake_deleter();
        }
        let rest = SetAttr {
            mtime: if size.is_some() { None } else { set.mtime },
            ..set
        };
        let anything = rest.mode.is_some()
            || rest.uid.is_some()
            || rest.gid.is_some()
            || rest.atime.is_some()
            || rest.mtime.is_some()
            || rest.ctime.is_some();
        if anything || attr.is_none() {
            let set = meta.setattr(ino, &rest);
            if rest.mode.is_some() || rest.uid.is_some() || rest.gid.is_some() {
                self.unprivileged.remove(&ino);
            }
            attr = Some(set?);
        }
        let attr = attr.expect("set above");
        if attr.kind == FileKind::Dir {
            // Newer (by ctime) than whatever a creation racing this call may keep.
            self.note_dir(attr.clone());
        }
        self.with_overlay(attr)
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(self.data.meta.readlink(ino)?)
    }

    fn mknod(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32, rdev: u32) -> Result<Attr> {
        let kind =
            FileKind::from_mode(mode).ok_or(FsError::refused(libc::EINVAL, "unknown file type"))?;
        if matches!(kind, FileKind::Dir | FileKind::Symlink) {
            return Err(FsError::refused(
                libc::EINVAL,
                "mknod of a directory or symlink",
            ));
        }
        self.new_node(
            ctx,
            parent,
            name,
            NewNode {
                rdev,
                ..blank_node(ctx, kind, mode)
            },
        )
    }

    fn mkdir(&self, ctx: Ctx, parent: Ino, name: &[u8], mode: u32) -> Result<Attr> {
        self.new_node(ctx, parent, name, blank_node(ctx, FileKind::Dir, mode))
    }

    fn symlink(&self, ctx: Ctx, parent: Ino, name: &[u8], target: &[u8]) -> Result<Attr> {
        let node = NewNode {
            symlink: Some(target.to_vec()),
            ..blank_node(ctx, FileKind::Symlink, 0o777)
        };
        self.new_node(ctx, parent, name, node)
    }

    fn unlink(&self, _ctx: Ctx, parent: Ino, name: &[u8]) -> Result<()> {
        self.unlink_entry(parent, name)
    }

    fn rmdir(&self, _ctx: Ctx, parent: Ino, name: &[u8]) -> Result<()> {
        let removed = self.data.meta.rmdir(parent, name);
        self.dir_changed(parent);
        Ok(removed?)
    }

    fn rename(
        &self,
        _ctx: Ctx,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        let renamed = self.data.meta.rename(
            parent,
            name,
            new_parent,
            new_name,
            flags,
            self.sid,
            &|ino| self.keep_if_open(ino),
        );
        // A moved directory changed too (its parent and ctime); it is not named here.
        self.fresh_dirs.clear();
        renamed?;
        self.wake_deleter();
        Ok(())
    }

    fn link(&self, _ctx: Ctx, ino: Ino, new_parent: Ino, name: &[u8]) -> Result<Attr> {
        let linked = self.data.meta.link(ino, new_parent, name);
        self.dir_changed(new_parent);
        self.with_overlay(linked?)
    }

    fn open(&self, ctx: Ctx, ino: Ino, _flags: i32) -> Result<Opened> {
        if ino == CONTROL_INO {
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            let groups = perm::caller_groups(ctx.pid, ctx.gid);
            self.controls
                .insert(fh, Arc::new(ControlSession::new(ctx, groups)));
            return Ok(Opened {
                fh,
                keep_cache: false,
                direct_io: true,
            });
        }
        // Close-to-open: an open sees the latest committed state (and another mount's
        // chmod u+s).
        self.data.invalidate(ino);
        self.unprivileged.remove(&ino);
        let a = self.attr_of(ino)?;
        if a.kind == FileKind::Dir {
            return Err(FsError::refused(
                libc::EISDIR,
                "open of a directory as a file",
            ));
        }
        // Unchanged since the last open: the pages the kernel cached then are still right.
        let keep_cache = self.unchanged_since_last_open(ino, (a.mtime, a.length));
        Ok(Opened {
            fh: self.open_handle(ino),
            keep_cache,
            direct_io: false,
        })
    }

    fn create(
        &self,
        ctx: Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        _flags: i32,
    ) -> Result<(Attr, u64)> {
        let a = self.new_node(ctx, parent, name, blank_node(ctx, FileKind::File, mode))?;
        // A new file has no capabilities; its first writes need no lookup.
        if privileged_bits(a.mode) == 0 {
            self.unprivileged.insert(a.ino, ());
        }
        let fh = self.open_handle(a.ino);
        Ok((a, fh))
    }

    fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> Result<Bytes> {
        into_bytes(self.read_from(ino, fh, offset, size, false)?)
    }

    fn read_data(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> Result<ReadData> {
        self.read_from(ino, fh, offset, size, true)
    }

    fn write(&self, ino: Ino, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        if ino == CONTROL_INO {
            if self.opts.read_only {
                return Err(FsError::refused(libc::EROFS, "read-only mount"));
            }
            let session = self.control(fh)?;
            if let Some(request) = session.feed(data)? {
                let vfs = self
                    .me
                    .upgrade()
                    .ok_or(FsError::refused(libc::ESHUTDOWN, "unmounting"))?;
                std::thread::Builder::new()
                    .name("tidefs-control".into())
                    .spawn(move || session.run(&vfs, request))
                    .map_err(|e| FsError::Data(format!("cannot start a control thread: {e}")))?;
            }
            return Ok(data.len() as u32);
        }
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > MAX_FILE_SIZE)
        {
            return Err(FsError::refused(libc::EFBIG, "file too large"));
        }
        let writer = self.writers.entry(ino).or_default().clone();
        let pending = writer.write(&self.data, offset, data)?;
        // Backpressure: past the buffer limit a writer waits for uploads to make room, and
        // commits its file only if uploads cannot (the memory is in unfinished blocks).
        let limit = self.opts.buffer_size;
        if pending >= MAX_PENDING_SLICES
            || (self.data.buffered.load(Ordering::Relaxed) > limit
                && !self.data.wait_for_room(limit))
        {
            self.lost_writes_if_err(ino, writer.flush(&self.data, ino, None))?;
        }
        Ok(data.len() as u32)
    }

    fn flush(&self, ino: Ino, fh: u64) -> Result<()> {
        if ino == CONTROL_INO {
            return Ok(());
        }
        let handle = self.handle(fh);
        if self.opts.close_behind {
            // The writes commit at the release that follows (in the background); a close
            // reports the failures before it and waits only for room among those releases.
            self.closing.wait_for_room();
            let writer = self.writers.get(&ino).map(|w| w.clone());
            return match (writer, handle) {
                (Some(w), Some(h)) => w.take_unreported(&h.err_seen),
                _ => Ok(()),
            };
        }
        self.flush_inode(ino, handle.as_deref())
    }

    fn getlk(&self, ino: Ino, _fh: u64, owner: u64, lock: FileLock) -> Result<Option<FileLock>> {
        let req = self.meta_lock(ino, owner, lock)?;
        Ok(self.data.meta.getlk(ino, &req)?.map(|l| FileLock {
            start: l.start,
            end: l.end,
            typ: match l.typ {
                LockType::Write => libc::F_WRLCK,
                _ => libc::F_RDLCK,
            },
            pid: l.pid,
            kind: l.kind,
        }))
    }

    fn setlk(
        &self,
        ino: Ino,
        fh: u64,
        owner: u64,
        lock: FileLock,
        wait: bool,
        request: u64,
    ) -> Result<()> {
        let req = self.meta_lock(ino, owner, lock)?;
        if req.typ != LockType::Unlock {
            // Before taking it: a close racing this request must find the owner.
            self.lock_owners.insert((ino, owner, lock.kind), ());
        }
        let mut pause = Duration::from_millis(1);
        let mut converting = req.kind == LockKind::Flock && req.typ != LockType::Unlock;
        let outcome = loop {
            let seen = *self
                .lock_changed
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let conflict = match self.data.meta.setlk(ino, &req) {
                Ok(conflict) => conflict,
                Err(e) => break Err(e.into()),
            };
            if conflict.is_none() {
                if req.typ == LockType::Unlock {
                    self.locks_released();
                }
                break Ok(());
            }
            if converting {
                // flock(2) converts by dropping the lock held first, as Linux does (even when
                // the new one is then refused): two holders of a shared lock both asking
                // for it exclusive must not wait on each other. Then it tries again.
                converting = false;
                let drop = Lock {
                    typ: LockType::Unlock,
                    ..req
                };
                if let Err(e) = self.data.meta.setlk(ino, &drop) {
                    break Err(e.into());
                }
                self.locks_released();
                continue;
            }
            if !wait {
                break Err(FsError::refused(
                    libc::EAGAIN,
                    "the range is locked by another owner",
                ));
            }
            // Stop waiting once nobody can receive the lock: the caller got a signal, the
            // file was closed or the mount is ending.
            if self.interrupted.remove(&request).is_some() {
                break Err(FsError::refused(libc::EINTR, "lock wait interrupted"));
            }
            if !self.handles.contains_key(&fh) || self.destroyed.load(Ordering::SeqCst) {
                break Err(FsError::refused(libc::EINTR, "lock wait abandoned"));
            }
            let (count, changed) = &self.lock_changed;
            let guard = count.lock().unwrap_or_else(|e| e.into_inner());
            let _ = changed
                .wait_timeout_while(guard, pause, |n| *n == seen)
                .unwrap_or_else(|e| e.into_inner());
            pause = (pause * 2).min(MAX_LOCK_POLL);
        };
        self.interrupted.remove(&request);
        outcome
    }

    fn interrupt(&self, request: u64) {
        // Interrupts of requests that never wait (most) are forgotten after a while.
        if self.interrupted.len() >= MAX_INTERRUPTS {
            self.interrupted
                .retain(|_, at| at.elapsed() < Duration::from_secs(60));
        }
        if self.interrupted.len() >= MAX_INTERRUPTS {
            // A storm of recent interrupts: the oldest waiter may miss one (it still ends
            // when its file closes).
            self.interrupted.clear();
        }
        self.interrupted.insert(request, Instant::now());
        self.locks_released();
    }

    fn release_locks(&self, ino: Ino, owner: u64, kind: LockKind) -> Result<()> {
        if self.lock_owners.remove(&(ino, owner, kind)).is_none() {
            return Ok(());
        }
        let all = FileLock {
            start: 0,
            end: u64::MAX,
            typ: libc::F_UNLCK,
            pid: 0,
            kind,
        };
        self.data
            .meta
            .setlk(ino, &self.meta_lock(ino, owner, all)?)?;
        self.locks_released();
        Ok(())
    }

    fn release(&self, ino: Ino, fh: u64) -> Result<()> {
        if ino == CONTROL_INO {
            if let Some((_, session)) = self.controls.remove(&fh) {
                session.cancel();
            }
            return Ok(());
        }
        self.handles.remove(&fh);
        if let Some(mut opens) = self.open_counts.get_mut(&ino) {
            opens.closed += 1;
        }
        let writer = self.writers.get(&ino).map(|w| w.clone());
        match writer {
            Some(w) if self.opts.close_behind && !w.is_idle() => {
                if w.is_small_and_in_memory() {
                    self.closing.defer(ino);
                } else {
                    // Ends the release when dropped, even if the task never runs.
                    self.finish_releases(vec![(ino, self.closing.begin())]);
                }
                Ok(())
            }
            _ => self.finish_release(ino),
        }
    }

    fn fsync(&self, ino: Ino, fh: u64, _datasync: bool) -> Result<()> {
        if ino == CONTROL_INO {
            return Ok(());
        }
        self.flush_inode(ino, self.handle(fh).as_deref())?;
        Ok(self.data.meta.sync()?)
    }

    fn fsyncdir(&self, _ino: Ino) -> Result<()> {
        if self.opts.close_behind {
            // Files closed before it, whose commits may still be finishing in the background
            // (or whose release has not even arrived), are durable when it returns: which
            // directory they are in is not tracked, so every file's writes are committed, as
            // syncfs(2) would; and, as syncfs does, it fails if a commit failed since the
            // last one (the files' own handles still hear of it, too).
            self.finish_earlier_releases();
            let flushed = self.flush_all();
            let failures = self.data.commit_failures.load(Ordering::Relaxed);
            let earlier = self.failures_dir_synced.swap(failures, Ordering::Relaxed);
            flushed?;
            if earlier < failures {
                return Err(FsError::Data(format!(
                    "{} commits of closed files failed since the last directory fsync (see the log)",
                    failures - earlier
                )));
            }
        }
        Ok(self.data.meta.sync()?)
    }

    fn opendir(&self, ino: Ino) -> Result<Opened> {
        let a = self.data.meta.getattr(ino)?;
        if a.kind != FileKind::Dir {
            return Err(FsError::refused(libc::ENOTDIR, "not a directory"));
        }
        let keep_cache = self.unchanged_since_last_open(ino, (a.mtime, u64::from(a.nlink)));
        // The listing that follows starts with `..`: it needs the parent read here.
        self.note_dir(a);
        Ok(Opened {
            fh: 0,
            keep_cache,
            direct_io: false,
        })
    }

    fn readdir(&self, ino: Ino, offset: u64, limit: usize) -> Result<Vec<ListEntry>> {
        let mut out = Vec::new();
        if offset < 2 {
            let dir = match self.take_fresh_dir(ino) {
                Some(dir) => dir,
                None => self.data.meta.getattr(ino)?,
            };
            if dir.kind != FileKind::Dir {
                return Err(FsError::refused(libc::ENOTDIR, "not a directory"));
            }
            if offset == 0 {
                out.push(ListEntry {
                    ino,
                    kind: FileKind::Dir,
                    name: b".".to_vec(),
                    next: 1,
                });
            }
            out.push(ListEntry {
                ino: dir.parent,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
                next: 2,
            });
        }
        let start = offset.max(2);
        // A listing in progress continues from its batch; a new one (offset < 2) always asks
        // the engine, so it sees every change made before it began.
        let batch = self
            .dir_batches
            .get(&ino)
            .filter(|b| offset >= 2 && b.covers(start))
            .map(|b| b.entries.clone());
        let batch = match batch {
            Some(b) => b,
            None => {
                let seq = self.dir_batch_seq.fetch_add(1, Ordering::Relaxed);
                let entries: Vec<ListEntry> = self
                    .data
                    .meta
                    .readdir(ino, start - 2, DIR_BATCH)?
                    .into_iter()
                    .map(|e| ListEntry {
                        ino: e.ino,
                        kind: e.kind,
                        name: e.name,
                        next: e.cookie + 2,
                    })
                    .collect();
                let batch = DirBatch {
                    seq,
                    after: start,
                    last: entries.len() < DIR_BATCH,
                    entries: Arc::new(entries),
                };
                let b = batch.entries.clone();
                if self.dir_batches.len() >= MAX_DIR_BATCHES {
                    self.dir_batches.clear();
                }
                match self.dir_batches.entry(ino) {
                    Entry::Occupied(kept) if kept.get().seq > seq => {}
                    Entry::Occupied(mut kept) => {
                        kept.insert(batch);
                    }
                    Entry::Vacant(v) => {
                        v.insert(batch);
                    }
                }
                b
            }
        };
        let from = batch.partition_point(|e| e.next <= start);
        out.extend(batch[from..].iter().take(limit).cloned());
        Ok(out)
    }

    fn statfs(&self) -> Result<StatFs> {
        let usage = self.data.meta.usage()?;
        let total = if self.format.capacity > 0 {
            self.format.capacity
        } else {
            1 << 50
        };
        let total_inodes = if self.format.inodes > 0 {
            self.format.inodes
        } else {
            (usage.inodes + (10 << 20)).next_power_of_two()
        };
        Ok(StatFs {
            total_bytes: total,
            free_bytes: total.saturating_sub(usage.space),
            total_inodes,
            free_inodes: total_inodes.saturating_sub(usage.inodes),
            block_size: 4096,
        })
    }

    fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        check_xattr_name(name)?;
        let set = self
            .data
            .meta
            .setxattr(ino, name, value, xattr_mode(flags)?);
        if name == CAPABILITIES {
            self.unprivileged.remove(&ino);
        }
        self.dir_changed(ino);
        Ok(set?)
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        check_xattr_name(name)?;
        Ok(self.data.meta.getxattr(ino, name)?)
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for name in self.data.meta.listxattr(ino)? {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    fn drop_privileges(&self, ino: Ino, suidgid: bool) -> Result<()> {
        if ino == CONTROL_INO || self.unprivileged.contains_key(&ino) {
            return Ok(());
        }
        let meta = &self.data.meta;
        let a = match meta.getattr(ino) {
            Ok(a) => a,
            // Removed by another mount while open here: the write itself reports it.
            Err(MetaError::NotFound) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if a.kind != FileKind::File {
            return Ok(());
        }
        // Looked up first: a removal is a write transaction even when there is nothing.
        match meta.getxattr(ino, CAPABILITIES) {
            Ok(_) => match meta.removexattr(ino, CAPABILITIES) {
                Ok(()) | Err(MetaError::NoData) => {}
                Err(e) => return Err(e.into()),
            },
            Err(MetaError::NoData) => {}
            Err(e) => return Err(e.into()),
        }
        let privileged = privileged_bits(a.mode);
        if suidgid && privileged != 0 {
            let set = SetAttr {
                mode: Some(a.mode & !privileged),
                ..SetAttr::default()
            };
            meta.setattr(ino, &set)?;
        }
        if suidgid || privileged == 0 {
            self.unprivileged.insert(ino, ());
        }
        Ok(())
    }

    fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        check_xattr_name(name)?;
        let removed = self.data.meta.removexattr(ino, name);
        self.dir_changed(ino);
        Ok(removed?)
    }

    fn fallocate(&self, ino: Ino, _fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let mode = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => FallocMode::Allocate { keep_size },
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => FallocMode::PunchHole,
            libc::FALLOC_FL_ZERO_RANGE => FallocMode::ZeroRange { keep_size },
            _ => {
                return Err(FsError::refused(
                    libc::EOPNOTSUPP,
                    "unsupported fallocate mode",
                ))
            }
        };
        let Some(end) = offset.checked_add(len).filter(|end| *end <= MAX_FILE_SIZE) else {
            return Err(FsError::refused(libc::EFBIG, "file too large"));
        };
        // Zero slices take ids from the same ordered source as writes, one per chunk touched,
        // before pending writes are committed: every slice still pending then is older, and
        // every write after this call gets a newer id and hides the hole.
        let zero_ids = match mode {
            FallocMode::Allocate { .. } => Vec::new(),
            _ => self
                .data
                .slice_ids((end.div_ceil(CHUNK_SIZE) - offset / CHUNK_SIZE) as usize)?,
        };
        // Like setattr, this reports only its own failure; close and fsync report the rest.
        self.flush_inode(ino, None)?;
        let result = self.data.meta.fallocate(ino, mode, offset, len, &zero_ids);
        self.data.invalidate(ino);
        result?;
        self.wake_deleter();
        Ok(())
    }

    fn destroy(&self) {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        for c in self.controls.iter() {
            c.cancel();
        }
        // Each helper sees `destroyed` within a second and ends after its current step.
        let helpers = std::mem::take(&mut *self.lock_helpers());
        for h in helpers {
            let _ = h.join();
        }
        self.finish_earlier_releases();
        if let Err(e) = self.flush_all() {
            tracing::error!(error = %e, "flushing writes at unmount failed");
        }
        let background = self
            .background
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(worker) = background {
            let _ = self.deleter.send(Wake::Stop);
            let _ = worker.join();
        }
        if let Err(e) = self.data.meta.close_session(self.sid) {
            tracing::error!(error = %e, "closing the session failed");
        }
        if let Err(e) = delete_freed(&self.data) {
            tracing::warn!(error = %e, "deleting freed objects at unmount failed");
        }
        if let Err(e) = self.data.meta.sync() {
            tracing::error!(error = %e, "syncing metadata at unmount failed");
        }
        tracing::info!(volume = %self.format.name, "unmounted");
    }
}
