//! The control file: `.control` at the root of every mount, through which `tidefs rmr` and
//! `tidefs compact` ask the mount to work on its volume. Only the mount knows which files are
//! open (a removed open file must stay readable) and can keep its caches right, so these
//! commands go through it rather than to the metadata engine directly.
//!
//! Protocol: open the file read-write, write one JSON [`Request`] ending in a newline, then
//! read JSON [`Reply`] lines: any number of `progress` lines and one final `done` or `error`
//! line, after which reads return end of file. The command runs with the permissions of the
//! process that opened the file. Closing the file early cancels the command between steps.

use crate::compact::{self, Compacted};
use crate::error::FsError;
use crate::layout::CHUNK_SIZE;
use crate::perm;
use crate::vfs::TideVfs;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use tidefs_fuse::{Ctx, ToErrno};
use tidefs_meta::{Attr, FileKind, Ino, MetaError, Timestamp};

pub use tidefs_meta::{CONTROL_INO, CONTROL_NAME};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;

/// How often a long command reports progress (in entries or files).
const PROGRESS_EVERY: u64 = 1000;

/// Longest a read of the control file waits for output: then it returns a progress line, so
/// a slow command never holds a FUSE request thread for long.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Times in a row a directory may be listed without anything removed from it before `rmr`
/// gives up on it (entries that cannot be removed and yield no error, or are being re-created).
const MAX_FRUITLESS_PASSES: u32 = 100;

/// A command for the mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Remove `name` in directory `parent` and, if it is a directory, everything below it.
    Rmr {
        /// The directory holding the tree.
        parent: Ino,
        /// The tree's name (bytes).
        name: Vec<u8>,
    },
    /// Compact every chunk of file `ino`, or of every file below directory `ino`.
    Compact {
        /// A file or directory.
        ino: Ino,
    },
}

/// One line of a command's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Work done so far.
    Progress(Tally),
    /// The command finished; the whole work done.
    Done(Tally),
    /// The command stopped on this error; `tally` says what was done before.
    Error {
        /// What went wrong.
        message: String,
        /// The errno standing for it.
        errno: i32,
        /// Work done before the error.
        tally: Tally,
    },
}

/// Work counted by a command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Entries removed (rmr) or files visited (compact).
    pub entries: u64,
    /// Slices replaced by compaction.
    pub slices: u64,
    /// Bytes rewritten by compaction.
    pub bytes: u64,
}

/// The attributes `.control` shows: an empty file everyone may read and write.
pub fn control_attr() -> Attr {
    let now = Timestamp::now();
    Attr {
        ino: CONTROL_INO,
        kind: FileKind::File,
        mode: 0o666,
        uid: 0,
        gid: 0,
        rdev: 0,
        nlink: 1,
        length: 0,
        atime: now,
        mtime: now,
        ctime: now,
        parent: tidefs_meta::ROOT_INO,
    }
}

#[derive(Default)]
struct Output {
    bytes: Vec<u8>,
    /// Bytes already read: the output is a stream, whatever file offset reads give (the
    /// request written on the same descriptor moved it).
    read: usize,
    /// A command was started (one per open).
    started: bool,
    /// The command's last line is written.
    finished: bool,
}

/// One open of the control file: the request being written and the command's output.
pub struct ControlSession {
    ctx: Ctx,
    /// The opener's groups, read when it opened the file.
    groups: Vec<u32>,
    input: Mutex<Vec<u8>>,
    /// The work done so far by the running command.
    tally: Mutex<Tally>,
    output: Mutex<Output>,
    ready: Condvar,
    cancelled: AtomicBool,
}

impl ControlSession {
    /// A session for a process with `ctx` whose groups (primary included) are `groups`.
    pub fn new(ctx: Ctx, groups: Vec<u32>) -> Self {
        ControlSession {
            ctx,
            groups,
            input: Mutex::new(Vec::new()),
            tally: Mutex::new(Tally::default()),
            output: Mutex::new(Output::default()),
            ready: Condvar::new(),
            cancelled: AtomicBool::new(false),
        }
    }

    /// Takes written bytes; once a line is complete, the request it holds (one per open).
    pub fn feed(&self, data: &[u8]) -> Result<Option<Request>, FsError> {
        let mut input = self.input.lock().unwrap_or_else(|e| e.into_inner());
        input.extend_from_slice(data);
        if input.len() > MAX_REQUEST {
            return Err(FsError::refused(libc::E2BIG, "control request too long"));
        }
        let Some(end) = input.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        {
            let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
            if out.started {
                return Err(FsError::refused(
                    libc::EBUSY,
                    "one control request per open",
                ));
            }
            out.started = true;
        }
        let request = serde_json::from_slice(&input[..end]);
        input.clear();
        match request {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                self.emit(
                    &Reply::Error {
                        message: format!("bad control request: {e}"),
                        errno: libc::EINVAL,
                        tally: Tally::default(),
                    },
                    true,
                );
                Ok(None)
            }
        }
    }

    /// Appends a reply line; `last` ends the output.
    fn emit(&self, reply: &Reply, last: bool) {
        let mut line = serde_json::to_vec(reply).expect("replies serialize");
        line.push(b'\n');
        let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        out.bytes.extend_from_slice(&line);
        out.finished |= last;
        self.ready.notify_all();
    }

    /// The next (up to `size`) bytes of output, as from a pipe: waits until there are some
    /// or the output ended (then an empty read is end of file). No request yet reads as end
    /// of file; a command silent for [`READ_WAIT`] reads as a progress line.
    pub fn read(&self, size: u32) -> Vec<u8> {
        let mut out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = std::time::Instant::now() + READ_WAIT;
        while out.started && out.bytes.len() <= out.read && !out.finished && !self.is_cancelled() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                let tally = *self.tally.lock().unwrap_or_else(|e| e.into_inner());
                let mut line = serde_json::to_vec(&Reply::Progress(tally)).expect("serializes");
                line.push(b'\n');
                out.bytes.extend_from_slice(&line);
                break;
            }
            out = self
                .ready
                .wait_timeout(out, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let start = out.read;
        let end = (start + size as usize).min(out.bytes.len());
        out.read = end;
        out.bytes[start..end].to_vec()
    }

    /// Stops the command at its next step (the file was closed).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.ready.notify_all();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    fn check_cancelled(&self) -> Result<(), FsError> {
        if self.is_cancelled() {
            return Err(FsError::refused(libc::EINTR, "cancelled"));
        }
        Ok(())
    }

    /// Records the work done so far, and reports it every [`PROGRESS_EVERY`] entries.
    fn progress(&self, tally: &Tally) {
        *self.tally.lock().unwrap_or_else(|e| e.into_inner()) = *tally;
        if tally.entries % PROGRESS_EVERY == 0 {
            self.emit(&Reply::Progress(*tally), false);
        }
    }

    /// Runs `request` on `vfs` to the end, writing its output.
    pub fn run(&self, vfs: &TideVfs, request: Request) {
        let _span = tracing::info_span!("control", ?request, uid = self.ctx.uid).entered();
        let mut tally = Tally::default();
        let result = match request {
            Request::Rmr { parent, name } => {
                let removed = self.rmr(vfs, parent, &name, &mut tally);
                // Whatever went, the kernel must not list it or find it from its caches.
                if tally.entries > 0 {
                    vfs.forget_entry(parent, &name);
                }
                removed
            }
            Request::Compact { ino } => self.compact(vfs, ino, &mut tally),
        };
        match result {
            Ok(()) => self.emit(&Reply::Done(tally), true),
            Err(e) => self.emit(
                &Reply::Error {
                    message: e.to_string(),
                    errno: e.errno(),
                    tally,
                },
                true,
            ),
        }
    }

    /// Whether the caller may do `want` on `a`.
    fn check_access(&self, groups: &[u32], a: &Attr, want: u32) -> Result<(), FsError> {
        if perm::may_access(self.ctx.uid, groups, a.uid, a.gid, a.mode, want) {
            Ok(())
        } else {
            Err(FsError::refused(libc::EACCES, "permission denied"))
        }
    }

    /// Whether the caller may reach directory `dir` by path: search permission on it and on
    /// every directory above it, as the kernel checks on a path lookup.
    fn check_reachable(&self, vfs: &TideVfs, dir: &Attr) -> Result<(), FsError> {
        let meta = &vfs.data().meta;
        let mut at = dir.clone();
        for _ in 0..4096 {
            self.check_access(&self.groups, &at, perm::X)?;
            if at.ino == tidefs_meta::ROOT_INO {
                return Ok(());
            }
            at = meta.getattr(at.parent)?;
        }
        Err(FsError::refused(libc::ELOOP, "directory nesting too deep"))
    }

    fn check_unlink(&self, dir: &Attr, child: &Attr) -> Result<(), FsError> {
        if perm::may_unlink_from(self.ctx.uid, dir.uid, dir.mode, child.uid) {
            Ok(())
        } else {
            Err(FsError::refused(
                libc::EPERM,
                "sticky directory: not the owner",
            ))
        }
    }

    /// Removes a tree with metadata operations only: one transaction per entry, no kernel
    /// round trips, with the same permission rules as `rm -rf` (write and search on each
    /// directory emptied, read to list it, the sticky bit).
    fn rmr(
        &self,
        vfs: &TideVfs,
        parent: Ino,
        name: &[u8],
        tally: &mut Tally,
    ) -> Result<(), FsError> {
        let data = vfs.data();
        let meta = &data.meta;
        let groups = &self.groups;
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(FsError::refused(
                libc::EINVAL,
                "rmr needs the name of an entry",
            ));
        }
        let top_dir = meta.getattr(parent)?;
        if top_dir.kind != FileKind::Dir {
            return Err(FsError::refused(libc::ENOTDIR, "not a directory"));
        }
        self.check_reachable(vfs, &top_dir)?;
        self.check_access(groups, &top_dir, perm::W | perm::X)?;
        let top = meta.lookup(parent, name)?;
        self.check_unlink(&top_dir, &top)?;
        if top.kind != FileKind::Dir {
            vfs.unlink_entry(parent, name)?;
            tally.entries += 1;
            return Ok(());
        }
        // Directories being emptied, deepest last: (parent, name, attributes).
        let mut stack: Vec<(Ino, Vec<u8>, Attr)> = vec![(parent, name.to_vec(), top)];
        let mut fruitless = 0;
        while let Some((dir_parent, dir_name, dir)) = stack.last().cloned() {
            self.check_cancelled()?;
            self.check_access(groups, &dir, perm::R | perm::W | perm::X)?;
            if fruitless > MAX_FRUITLESS_PASSES {
                return Err(FsError::refused(
                    libc::ENOTEMPTY,
                    "a directory of the tree keeps entries that cannot be removed",
                ));
            }
            let entries = meta.readdir(dir.ino, 0, 1000)?;
            if entries.is_empty() {
                match meta.rmdir(dir_parent, &dir_name) {
                    Ok(()) | Err(MetaError::NotFound) => {}
                    // Something was created meanwhile: list again.
                    Err(MetaError::NotEmpty) => {
                        fruitless += 1;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                stack.pop();
                fruitless = 0;
                tally.entries += 1;
                self.progress(tally);
                continue;
            }
            let before = (tally.entries, stack.len());
            let sticky = dir.mode & libc::S_ISVTX != 0;
            for e in entries {
                if e.kind == FileKind::Dir || sticky {
                    let child = match meta.getattr(e.ino) {
                        Ok(a) => a,
                        Err(MetaError::NotFound) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    self.check_unlink(&dir, &child)?;
                    if e.kind == FileKind::Dir {
                        stack.push((dir.ino, e.name, child));
                        break;
                    }
                }
                match vfs.unlink_entry(dir.ino, &e.name) {
                    Ok(()) => {}
                    Err(FsError::Meta(MetaError::NotFound)) => continue,
                    Err(e) => return Err(e),
                }
                tally.entries += 1;
                self.progress(tally);
                self.check_cancelled()?;
            }
            if (tally.entries, stack.len()) == before {
                fruitless += 1;
            } else {
                fruitless = 0;
            }
        }
        Ok(())
    }

    /// Compacts file `ino`, or every file below directory `ino` (files the caller may not
    /// write are refused), one file at a time as the walk finds them.
    fn compact(&self, vfs: &TideVfs, ino: Ino, tally: &mut Tally) -> Result<(), FsError> {
        let meta = vfs.data().meta.clone();
        let top = meta.getattr(ino)?;
        match top.kind {
            FileKind::File => return self.compact_file(vfs, &top, tally),
            FileKind::Dir => {}
            _ => return Err(FsError::refused(libc::EINVAL, "not a file or directory")),
        }
        let mut dirs = vec![top];
        while let Some(dir) = dirs.pop() {
            self.check_access(&self.groups, &dir, perm::R | perm::X)?;
            let mut cookie = 0;
            loop {
                let entries = meta.readdir(dir.ino, cookie, 1000)?;
                let Some(last) = entries.last() else { break };
                cookie = last.cookie;
                for e in entries {
                    if !matches!(e.kind, FileKind::Dir | FileKind::File) {
                        continue;
                    }
                    let a = match meta.getattr(e.ino) {
                        Ok(a) => a,
                        Err(MetaError::NotFound) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    if a.kind == FileKind::Dir {
                        dirs.push(a);
                    } else {
                        self.compact_file(vfs, &a, tally)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Compacts every chunk of file `f`, once its writes buffered here are committed.
    fn compact_file(&self, vfs: &TideVfs, f: &Attr, tally: &mut Tally) -> Result<(), FsError> {
        self.check_cancelled()?;
        self.check_access(&self.groups, f, perm::W)?;
        vfs.flush_file(f.ino)?;
        let data = vfs.data();
        let length = data.meta.getattr(f.ino)?.length;
        for chunk in 0..length.div_ceil(CHUNK_SIZE) as u32 {
            match compact::compact_chunk(&data, f.ino, chunk, 2)? {
                Compacted::Done { slices, bytes } => {
                    tally.slices += slices as u64;
                    tally.bytes += bytes;
                }
                Compacted::Skipped | Compacted::Raced => {}
            }
        }
        tally.entries += 1;
        self.progress(tally);
        vfs.wake_deleter();
        Ok(())
    }
}

/// Why a control command sent with [`send`] did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The control file could not be used (not a tidefs mount, mount gone).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The mount ran the command and it failed.
    #[error("{message}")]
    Failed {
        /// What went wrong.
        message: String,
        /// The errno standing for it.
        errno: i32,
        /// Work done before the failure.
        tally: Tally,
    },
}

/// Runs `request` on the mount at `mountpoint` through its control file, calling `progress`
/// with each progress report, and returns the work done.
pub fn send(
    mountpoint: &std::path::Path,
    request: &Request,
    progress: &mut dyn FnMut(&Tally),
) -> Result<Tally, SendError> {
    use std::io::{BufRead, Write};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = mountpoint.join(std::str::from_utf8(CONTROL_NAME).expect("ASCII name"));
    // Never follow a symlink or write to anything but the mount's own control file.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)?;
    let (meta, mount) = (file.metadata()?, std::fs::metadata(mountpoint)?);
    if meta.ino() != CONTROL_INO || meta.dev() != mount.dev() {
        return Err(SendError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a tidefs control file", path.display()),
        )));
    }
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    file.write_all(&line)?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        let reply: Reply = serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad reply from the mount: {e}: {line}"),
            )
        })?;
        match reply {
            Reply::Progress(t) => progress(&t),
            Reply::Done(t) => return Ok(t),
            Reply::Error {
                message,
                errno,
                tally,
            } => {
                return Err(SendError::Failed {
                    message,
                    errno,
                    tally,
                })
            }
        }
    }
    Err(SendError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the mount stopped before the command finished",
    )))
}
