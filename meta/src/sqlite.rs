//! The embedded engine: one SQLite database file in WAL mode.
//!
//! Every [`Meta`] operation is one transaction. Writers take the database's write lock at the
//! start (`BEGIN IMMEDIATE`), so concurrent writers never deadlock on lock upgrades; readers run
//! in parallel with them thanks to WAL. Within a process, writers first wait for the one
//! writer connection, on a lock that wakes the next writer as soon as one ends: SQLite admits
//! one writer at a time anyway, and its busy handler would have a waiter poll with sleeps of
//! 1 to 100 ms. Other processes on the same file (a second mount, `tidefs gc`) still meet the
//! busy handler.
//!
//! Commits use `synchronous=NORMAL`: a committed transaction survives a crash of the process at
//! once, and survives power loss after [`Meta::sync`], which commits with `synchronous=FULL`
//! and so syncs the WAL with every earlier commit in it — the filesystem calls it on fsync(2).
//!
//! The WAL is copied into the database file (checkpointed) by a thread of the engine's own
//! after every 256 write transactions, while writers go on. SQLite's default would have the
//! writer whose commit fills 4 MiB of WAL do it, two fsyncs included, while every other writer
//! waits. A checkpoint beside constant writes can never empty the WAL, so once it passes
//! 32 MiB, or after 1,024 write transactions whatever the checkpoint thread saw (it may be
//! kept from the CPU), the next writer checkpoints it itself, holding the others back: the
//! WAL file stays under about 50 MiB.

use crate::dump::{DumpHeader, DumpRecord};
use crate::lock::{self, Lock};
use crate::types::*;
use crate::{check_name, Meta, MetaError, Result};
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// When the WAL is checkpointed.
#[derive(Clone, Copy, Debug)]
struct Checkpoints {
    /// Write transactions between two checkpoints.
    every: u64,
    /// WAL frames (pages) past which a checkpoint holds writers back until it has copied all.
    cap_frames: i64,
}

/// A checkpoint every 256 write transactions (a create writes about 12 pages of 4 KiB to the
/// WAL, so some 12 MiB), writers held back past 8192 frames (32 MiB): the WAL file stays
/// under about 50 MiB.
const CHECKPOINTS: Checkpoints = Checkpoints {
    every: 256,
    cap_frames: 8192,
};

/// Multiples of [`Checkpoints::every`] write transactions after which a writer checkpoints the
/// WAL itself, as it does past the cap: a thread kept from the CPU by busy writers would not
/// see the WAL grow.
const STARVED_AFTER: u64 = 4;

/// Bytes a WAL file is cut back to when it starts over, having grown past them.
const WAL_KEEP_BYTES: i64 = 64 << 20;

/// Statements each pooled connection keeps prepared: more than the engine has.
const STATEMENT_CACHE: usize = 128;

/// Runs SQL through the connection's statement cache. Parsing and planning each statement
/// anew took as much CPU as running it (a few percent of a busy machine under dbench).
trait CachedSql {
    /// As [`Connection::execute`].
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    /// As [`Connection::query_row`].
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl CachedSql for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS setting (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS node (
    ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, rdev INTEGER NOT NULL, nlink INTEGER NOT NULL,
    length INTEGER NOT NULL, atime INTEGER NOT NULL, mtime INTEGER NOT NULL,
    ctime INTEGER NOT NULL, parent INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS edge (
    id INTEGER PRIMARY KEY AUTOINCREMENT, parent INTEGER NOT NULL, name BLOB NOT NULL,
    ino INTEGER NOT NULL, kind INTEGER NOT NULL, UNIQUE (parent, name));
CREATE INDEX IF NOT EXISTS edge_by_parent ON edge (parent, id);
CREATE TABLE IF NOT EXISTS symlink (ino INTEGER PRIMARY KEY, target BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS xattr (
    ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (ino, name))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slice (
    ino INTEGER NOT NULL, chunk INTEGER NOT NULL, id INTEGER NOT NULL, size INTEGER NOT NULL,
    off INTEGER NOT NULL, len INTEGER NOT NULL, pos INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (ino, chunk, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session (
    sid INTEGER PRIMARY KEY AUTOINCREMENT, host TEXT NOT NULL, pid INTEGER NOT NULL,
    mountpoint TEXT NOT NULL, version TEXT NOT NULL, started INTEGER NOT NULL,
    heartbeat INTEGER NOT NULL, metrics TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS sustained (
    sid INTEGER NOT NULL, ino INTEGER NOT NULL, PRIMARY KEY (sid, ino)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deleted_slice (id INTEGER PRIMARY KEY, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS slice_by_id ON slice (id);
CREATE INDEX IF NOT EXISTS edge_by_ino ON edge (ino);
CREATE TABLE IF NOT EXISTS plock (ino INTEGER NOT NULL, sid INTEGER NOT NULL, lock TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS plock_by_ino ON plock (ino);
CREATE INDEX IF NOT EXISTS plock_by_sid ON plock (sid);
";

/// How long the capacity and inode limits are used before being read again.
const LIMITS_TTL: Duration = Duration::from_secs(5);

const NODE_COLUMNS: &str =
    "ino, kind, mode, uid, gid, rdev, nlink, length, atime, mtime, ctime, parent";

/// The settings of a volume that operations obey and that may change while it is mounted.
#[derive(Clone, Copy, Debug, Default)]
struct Limits {
    /// Space limit in bytes, 0 for none.
    capacity: u64,
    /// Inode limit, 0 for none.
    inodes: u64,
    /// Days removed files stay in the trash, 0 for no trash.
    trash_days: u32,
}

/// What a writer of this process holds during its turn.
#[derive(Default)]
struct Writer {
    /// The connection for write transactions; opened on first use, and again after a
    /// transaction on it was left open.
    conn: Option<Connection>,
    /// Write transactions run since the engine was opened.
    commits: u64,
    /// Write transactions since a writer last checkpointed the WAL itself.
    since_own_checkpoint: u64,
}

/// The SQLite metadata engine.
pub struct SqliteMeta {
    path: PathBuf,
    /// Connections for read transactions, kept for reuse.
    pool: Mutex<Vec<Connection>>,
    /// The writer connection and its counts; holding it is this process's turn to write.
    writer: Mutex<Writer>,
    /// Write transactions of this process that have ended, committed or not.
    ended: AtomicU64,
    /// Held by whoever of this process syncs: how many of [`Self::ended`] the last sync made
    /// durable. A sync that waited for another finds its commits covered by it.
    synced: Mutex<u64>,
    /// When the WAL is checkpointed.
    checkpoints: Checkpoints,
    /// Set by the checkpointing thread when the WAL has grown past the cap.
    force_checkpoint: Arc<AtomicBool>,
    /// Held by whoever of this process checkpoints: SQLite lets one connection at a time do it
    /// and the others' attempts fail at once.
    checkpointing: Arc<Mutex<()>>,
    /// Wakes the checkpointing thread; it ends when this is dropped.
    wake_checkpoint: SyncSender<()>,
    /// The changeable settings of the format and when they were read: re-read after
    /// [`LIMITS_TTL`], so `tidefs config` reaches running mounts.
    limits: Mutex<Option<(std::time::Instant, Limits)>>,
}

impl std::fmt::Debug for SqliteMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteMeta")
            .field("path", &self.path)
            .finish()
    }
}

fn ts_to_db(t: Timestamp) -> i64 {
    t.sec
        .saturating_mul(1_000_000_000)
        .saturating_add(t.nsec as i64)
}

fn ts_from_db(v: i64) -> Timestamp {
    Timestamp {
        sec: v.div_euclid(1_000_000_000),
        nsec: v.rem_euclid(1_000_000_000) as u32,
    }
}

fn unix_now() -> i64 {
    Timestamp::now().sec
}

fn round_space(length: u64) -> i64 {
    (length.div_ceil(4096) * 4096) as i64
}

fn row_to_attr(row: &rusqlite::Row<'_>) -> rusqlite::Result<Attr> {
    let kind: u8 = row.get(1)?;
    Ok(Attr {
        ino: row.get::<_, i64>(0)? as u64,
        kind: FileKind::from_code(kind).unwrap_or(FileKind::File),
        mode: row.get(2)?,
        uid: row.get(3)?,
        gid: row.get(4)?,
        rdev: row.get(5)?,
        nlink: row.get(6)?,
        length: row.get::<_, i64>(7)? as u64,
        atime: ts_from_db(row.get(8)?),
        mtime: ts_from_db(row.get(9)?),
        ctime: ts_from_db(row.get(10)?),
        parent: row.get::<_, i64>(11)? as u64,
    })
}

fn get_node(tx: &Connection, ino: Ino) -> Result<Attr> {
    tx.row(
        &format!("SELECT {NODE_COLUMNS} FROM node WHERE ino = ?1"),
        [ino as i64],
        row_to_attr,
    )
    .optional()?
    .ok_or(MetaError::NotFound)
}

fn put_node(tx: &Connection, a: &Attr) -> Result<()> {
    tx.exec(
        &format!("INSERT OR REPLACE INTO node ({NODE_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12)"),
        params![
            a.ino as i64,
            a.kind.code(),
            a.mode,
            a.uid,
            a.gid,
            a.rdev,
            a.nlink,
            a.length as i64,
            ts_to_db(a.atime),
            ts_to_db(a.mtime),
            ts_to_db(a.ctime),
            a.parent as i64
        ],
    )?;
    Ok(())
}

fn get_dir(tx: &Connection, ino: Ino) -> Result<Attr> {
    let a = get_node(tx, ino)?;
    if a.kind != FileKind::Dir {
        return Err(MetaError::NotDir);
    }
    Ok(a)
}

fn find_edge(tx: &Connection, parent: Ino, name: &[u8]) -> Result<Option<(Ino, FileKind)>> {
    Ok(tx
        .row(
            "SELECT ino, kind FROM edge WHERE parent = ?1 AND name = ?2",
            params![parent as i64, name],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, u8>(1)?)),
        )
        .optional()?
        .map(|(ino, k)| (ino, FileKind::from_code(k).unwrap_or(FileKind::File))))
}

fn add_edge(tx: &Connection, parent: Ino, name: &[u8], ino: Ino, kind: FileKind) -> Result<()> {
    tx.exec(
        "INSERT INTO edge (parent, name, ino, kind) VALUES (?1, ?2, ?3, ?4)",
        params![parent as i64, name, ino as i64, kind.code()],
    )?;
    Ok(())
}

fn remove_edge(tx: &Connection, parent: Ino, name: &[u8]) -> Result<()> {
    tx.exec(
        "DELETE FROM edge WHERE parent = ?1 AND name = ?2",
        params![parent as i64, name],
    )?;
    Ok(())
}

fn bump_counter(tx: &Connection, name: &str, delta: i64) -> Result<i64> {
    tx.exec(
        "INSERT INTO counter (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + ?2",
        params![name, delta],
    )?;
    Ok(
        tx.row("SELECT value FROM counter WHERE name = ?1", [name], |r| {
            r.get(0)
        })?,
    )
}

fn counter(tx: &Connection, name: &str) -> Result<i64> {
    Ok(tx
        .row("SELECT value FROM counter WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

/// The first of `n` consecutive positions in the commit order of slices. They come from the
/// slice id counter, so they also sort after every id reserved before this commit (slices of
/// older databases had their id as position).
fn next_seq(tx: &Connection, n: usize) -> Result<i64> {
    Ok(bump_counter(tx, "next_slice", n as i64)? - n as i64)
}

fn dir_is_empty(tx: &Connection, ino: Ino) -> Result<bool> {
    Ok(tx
        .row(
            "SELECT 1 FROM edge WHERE parent = ?1 LIMIT 1",
            [ino as i64],
            |_| Ok(()),
        )
        .optional()?
        .is_none())
}

/// Moves every slice of `ino` with chunk/position at or past `length` out of the file: whole
/// slices go to the deletion queue, a slice straddling `length` is cut short.
fn drop_slices_past(tx: &Connection, ino: Ino, length: u64) -> Result<()> {
    let first_chunk = (length / CHUNK_SIZE) as i64;
    let cut = (length % CHUNK_SIZE) as i64;
    let mut stmt = tx.prepare_cached(
        "SELECT chunk, id, size, pos, len FROM slice WHERE ino = ?1 AND chunk >= ?2",
    )?;
    let rows: Vec<(i64, i64, i64, i64, i64)> = stmt
        .query_map(params![ino as i64, first_chunk], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (chunk, id, size, pos, len) in rows {
        if chunk > first_chunk || pos >= cut {
            drop_slice(tx, ino, chunk as u32, id, size)?;
        } else if pos + len > cut {
            tx.exec(
                "UPDATE slice SET len = ?4 WHERE ino = ?1 AND chunk = ?2 AND id = ?3",
                params![ino as i64, chunk, id, cut - pos],
            )?;
        }
    }
    Ok(())
}

/// Adds slice `s` to chunk `chunk` of `ino` at commit position `seq` (replacing one with its
/// id there).
fn insert_slice(tx: &Connection, ino: Ino, chunk: u32, s: &Slice, seq: i64) -> Result<()> {
    tx.exec(
        "INSERT OR REPLACE INTO slice (ino, chunk, id, size, off, len, pos, seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            ino as i64,
            chunk,
            s.id as i64,
            s.size,
            s.off,
            s.len,
            s.pos,
            seq
        ],
    )?;
    Ok(())
}

/// Removes slice `id` from chunk `chunk` of `ino` and, if that was its last reference (a
/// packed slice is shared by several files), queues its objects (if it has any) for deletion.
fn drop_slice(tx: &Connection, ino: Ino, chunk: u32, id: i64, size: i64) -> Result<()> {
    tx.exec(
        "DELETE FROM slice WHERE ino = ?1 AND chunk = ?2 AND id = ?3",
        params![ino as i64, chunk, id],
    )?;
    if size > 0 {
        tx.exec(
            "INSERT OR IGNORE INTO deleted_slice (id, size)
             SELECT ?1, ?2 WHERE NOT EXISTS (SELECT 1 FROM slice WHERE id = ?1)",
            params![id, size],
        )?;
    }
    Ok(())
}

/// Removes the slices of a chunk that later slices hide entirely (an overwrite): nothing can
/// read them any more, so their objects go to the deletion queue now.
fn drop_hidden_slices(tx: &Connection, ino: Ino, chunk: u32) -> Result<()> {
    let slices: Vec<(i64, i64, u64, u64)> = tx
        .prepare_cached(
            "SELECT id, size, pos, len FROM slice WHERE ino = ?1 AND chunk = ?2
             ORDER BY seq DESC, id DESC",
        )?
        .query_map(params![ino as i64, chunk], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    // Ranges covered by the slices seen so far (newest first), disjoint and sorted.
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (id, size, pos, len) in slices {
        let (start, end) = (pos, pos + len);
        let at = covered.partition_point(|&(_, e)| e < start);
        if covered
            .get(at)
            .is_some_and(|&(s, e)| s <= start && end <= e)
        {
            drop_slice(tx, ino, chunk, id, size)?;
            continue;
        }
        // Merge [start, end) with the ranges it touches.
        let mut merged = (start, end);
        let mut last = at;
        while let Some(&(s, e)) = covered.get(last).filter(|&&(s, _)| s <= end) {
            merged = (merged.0.min(s), merged.1.max(e));
            last += 1;
        }
        covered.splice(at..last, [merged]);
    }
    Ok(())
}

/// Deletes inode `ino` and everything it owns; its slices go to the deletion queue.
fn free_inode(tx: &Connection, a: &Attr) -> Result<()> {
    let ino = a.ino as i64;
    // A packed slice that other files still reference stays.
    tx.exec(
        "INSERT OR IGNORE INTO deleted_slice (id, size)
         SELECT id, size FROM slice s WHERE ino = ?1 AND size > 0
         AND NOT EXISTS (SELECT 1 FROM slice o WHERE o.id = s.id AND o.ino != ?1)",
        [ino],
    )?;
    tx.exec("DELETE FROM slice WHERE ino = ?1", [ino])?;
    tx.exec("DELETE FROM xattr WHERE ino = ?1", [ino])?;
    tx.exec("DELETE FROM symlink WHERE ino = ?1", [ino])?;
    tx.exec("DELETE FROM plock WHERE ino = ?1", [ino])?;
    tx.exec("DELETE FROM node WHERE ino = ?1", [ino])?;
    if a.kind == FileKind::File {
        bump_counter(tx, "used_space", -round_space(a.length))?;
    }
    bump_counter(tx, "used_inodes", -1)?;
    Ok(())
}

/// Drops one name of a non-directory `target`. When no name is left, a regular file goes to
/// the trash if `trash` says where its last name was; anything else is freed, unless it is
/// open, in which case session `sid` keeps it alive.
fn unlink_inode(
    tx: &Connection,
    mut target: Attr,
    now: Timestamp,
    sid: u64,
    is_open: &dyn Fn(Ino) -> bool,
    trash: TrashFrom<'_>,
) -> Result<()> {
    target.nlink = target.nlink.saturating_sub(1);
    target.ctime = now;
    if target.nlink > 0 {
        return put_node(tx, &target);
    }
    if let Some(from) = trash.filter(|_| target.kind == FileKind::File) {
        return move_to_trash(tx, target, from, now);
    }
    if is_open(target.ino) {
        put_node(tx, &target)?;
        tx.exec(
            "INSERT OR IGNORE INTO sustained (sid, ino) VALUES (?1, ?2)",
            params![sid as i64, target.ino as i64],
        )?;
        return Ok(());
    }
    free_inode(tx, &target)
}

/// Frees `ino` if nothing names (the trash included) or holds it any more.
fn free_if_orphan(tx: &Connection, ino: Ino) -> Result<()> {
    let Ok(a) = get_node(tx, ino) else {
        return Ok(());
    };
    let held: bool = tx
        .row(
            "SELECT 1 FROM sustained WHERE ino = ?1
             UNION ALL SELECT 1 FROM edge WHERE ino = ?1 LIMIT 1",
            [ino as i64],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if a.nlink == 0 && !held {
        free_inode(tx, &a)?;
    }
    Ok(())
}

/// A new empty directory `ino` in `parent`, root-owned with mode 0700 (the trash's: a removed
/// file must not become readable to users its old directory kept out).
fn empty_dir(ino: Ino, parent: Ino, now: Timestamp) -> Attr {
    Attr {
        ino,
        kind: FileKind::Dir,
        mode: 0o700,
        uid: 0,
        gid: 0,
        rdev: 0,
        nlink: 2,
        length: 4096,
        atime: now,
        mtime: now,
        ctime: now,
        parent,
    }
}

/// Whether `dir` is the trash or one of its hour directories, where nothing may be created
/// and files may only be removed for good or moved out.
fn in_trash(dir: &Attr) -> bool {
    dir.ino == TRASH_INO || dir.parent == TRASH_INO
}

/// The directory and name a removed file's last name had, when it is to go to the trash.
type TrashFrom<'a> = Option<(Ino, &'a [u8])>;

/// The trash directory for the hour of `now`, made (with the trash itself) when missing.
fn trash_hour_dir(tx: &Connection, now: Timestamp) -> Result<Ino> {
    let mut trash = match get_node(tx, TRASH_INO) {
        Ok(a) => a,
        Err(MetaError::NotFound) => {
            let a = empty_dir(TRASH_INO, ROOT_INO, now);
            put_node(tx, &a)?;
            bump_counter(tx, "used_inodes", 1)?;
            a
        }
        Err(e) => return Err(e),
    };
    let name = trash_hour_name(now.sec);
    if let Some((ino, _)) = find_edge(tx, TRASH_INO, name.as_bytes())? {
        return Ok(ino);
    }
    let ino = bump_counter(tx, "next_ino", 1)? as u64 - 1;
    let hour = empty_dir(ino, TRASH_INO, now);
    put_node(tx, &hour)?;
    add_edge(tx, TRASH_INO, name.as_bytes(), ino, FileKind::Dir)?;
    bump_counter(tx, "used_inodes", 1)?;
    trash.nlink += 1;
    touch_dir(tx, &mut trash, now)?;
    Ok(ino)
}

/// Puts `target`, whose last name `(parent, name)` was just removed, in the trash as
/// `<parent>-<ino>-<name>`. Its link count stays 0: trash entries are not links.
fn move_to_trash(
    tx: &Connection,
    mut target: Attr,
    (parent, name): (Ino, &[u8]),
    now: Timestamp,
) -> Result<()> {
    let hour = trash_hour_dir(tx, now)?;
    let mut entry = format!("{parent}-{}-", target.ino).into_bytes();
    entry.extend_from_slice(name);
    entry.truncate(NAME_MAX);
    let mut n = 1;
    while find_edge(tx, hour, &entry)?.is_some() {
        let suffix = format!("~{n}");
        entry.truncate(NAME_MAX - suffix.len());
        entry.extend_from_slice(suffix.as_bytes());
        n += 1;
    }
    add_edge(tx, hour, &entry, target.ino, target.kind)?;
    target.parent = hour;
    put_node(tx, &target)
}

fn touch_dir(tx: &Connection, dir: &mut Attr, now: Timestamp) -> Result<()> {
    dir.mtime = now;
    dir.ctime = now;
    put_node(tx, dir)
}

/// Opens a connection to the database at `path` with the engine's settings; automatic
/// checkpoints are off, as the engine's checkpoint thread makes them.
fn connect(path: &Path, create: bool) -> Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| MetaError::Engine(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(Duration::from_secs(60))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Checkpoints the WAL of the database at `path` each time `wake` is signalled, until its
/// sender is dropped, holding `checkpointing` during each. A WAL still longer than
/// `cap_frames` after a checkpoint sets `force`: the next writer checkpoints it itself before
/// it lets the next one write, which copies everything.
fn checkpoint_loop(
    path: &Path,
    wake: &Receiver<()>,
    cap_frames: i64,
    force: &AtomicBool,
    checkpointing: &Mutex<()>,
) {
    let mut conn = None;
    while wake.recv().is_ok() {
        if conn.is_none() {
            conn = connect(path, false)
                .map_err(|e| tracing::warn!(error = %e, "cannot open the database to checkpoint"))
                .ok();
        }
        let Some(c) = conn.as_ref() else { continue };
        let done = {
            let _only = checkpointing.lock().unwrap_or_else(|e| e.into_inner());
            checkpoint(c)
        };
        match done {
            Ok(Some(frames)) if frames > cap_frames => force.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checkpoint of the metadata WAL failed"),
        }
    }
}

/// Copies what it can of the WAL into the database file without waiting for any lock;
/// returns the WAL's length in frames, or `None` if another connection was checkpointing.
fn checkpoint(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(0)? == 0).then_some(r.get(1)?))
    })
}

/// Brings a database made by an earlier tidefs up to the current schema, in one transaction
/// (two processes opening an old database at once upgrade it once).
fn upgrade(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match upgrade_in_transaction(conn) {
        Ok(()) => Ok(conn.execute_batch("COMMIT")?),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn upgrade_in_transaction(conn: &Connection) -> Result<()> {
    let columns = |table: &str| -> Result<Vec<String>> {
        Ok(conn
            .prepare_cached("SELECT name FROM pragma_table_info(?1)")?
            .query_map([table], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?)
    };
    let session_columns = columns("session")?;
    if !session_columns.is_empty() && !session_columns.iter().any(|c| c == "metrics") {
        conn.execute_batch("ALTER TABLE session ADD COLUMN metrics TEXT NOT NULL DEFAULT ''")?;
    }
    let has_slices: bool = conn
        .row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'slice'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if has_slices {
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS slice_by_id ON slice (id);
             CREATE INDEX IF NOT EXISTS edge_by_ino ON edge (ino);
             CREATE TABLE IF NOT EXISTS plock (
                 ino INTEGER NOT NULL, sid INTEGER NOT NULL, lock TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS plock_by_ino ON plock (ino);
             CREATE INDEX IF NOT EXISTS plock_by_sid ON plock (sid);",
        )?;
        if !columns("slice")?.iter().any(|c| c == "seq") {
            // Slices used to apply in id order; commit order starts from there.
            conn.execute_batch(
                "ALTER TABLE slice ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
                 UPDATE slice SET seq = id;",
            )?;
        }
    }
    Ok(())
}

/// The POSIX locks held on `ino`.
fn file_locks(tx: &Connection, ino: Ino) -> Result<Vec<Lock>> {
    let raw: Vec<String> = tx
        .prepare_cached("SELECT lock FROM plock WHERE ino = ?1")?
        .query_map([ino as i64], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    raw.iter()
        .map(|r| Lock::decode(r).ok_or_else(|| MetaError::Engine(format!("corrupt lock {r:?}"))))
        .collect()
}

/// The checks of [`Meta::check_namespace`], in one transaction.
fn check_namespace(tx: &Connection, repair: bool) -> Result<Vec<Problem>> {
    let dir = FileKind::Dir.code() as i64;
    let mut problems = Vec::new();
    let mut note = |what: String, fix: Option<&str>| {
        problems.push(Problem {
            what,
            fix: fix.map(str::to_string),
            repaired: repair && fix.is_some(),
        })
    };

    // Entries naming no inode.
    let dangling: Vec<(i64, Vec<u8>, i64)> = tx
        .prepare_cached(
            "SELECT e.parent, e.name, e.ino FROM edge e LEFT JOIN node n ON n.ino = e.ino
             WHERE n.ino IS NULL",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (parent, name, ino) in dangling {
        if repair {
            remove_edge(tx, parent as Ino, &name)?;
        }
        let name = String::from_utf8_lossy(&name);
        note(
            format!("entry {name:?} in directory {parent} names missing inode {ino}"),
            Some("remove the entry"),
        );
    }
    // Entries in something that is not a directory: the child is reported, not moved.
    let misplaced: Vec<(i64, Vec<u8>)> = tx
        .prepare_cached(
            "SELECT e.parent, e.name FROM edge e LEFT JOIN node p ON p.ino = e.parent
             WHERE p.ino IS NULL OR p.kind != ?1",
        )?
        .query_map([dir], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (parent, name) in misplaced {
        let name = String::from_utf8_lossy(&name);
        note(
            format!("entry {name:?} is in {parent}, which is not a directory"),
            None,
        );
    }
    // Link counts of everything but directories: one per entry outside the trash; 0 only
    // while held open or in the trash.
    let counts: Vec<(i64, i64, i64, bool)> = tx
        .prepare_cached(
            "SELECT n.ino, n.nlink,
                    (SELECT COUNT(*) FROM edge e WHERE e.ino = n.ino AND e.parent NOT IN
                        (SELECT t.ino FROM node t WHERE t.parent = ?2 AND t.kind = ?1)),
                    EXISTS (SELECT 1 FROM sustained s WHERE s.ino = n.ino)
                    OR EXISTS (SELECT 1 FROM edge e JOIN node t ON t.ino = e.parent
                               WHERE e.ino = n.ino AND t.parent = ?2)
             FROM node n WHERE n.kind != ?1",
        )?
        .query_map([dir, TRASH_INO as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (ino, nlink, names, held) in counts {
        if nlink == names {
            if names == 0 && !held {
                if repair {
                    free_if_orphan(tx, ino as Ino)?;
                }
                note(
                    format!("inode {ino} has no name and is not open"),
                    Some("free it"),
                );
            }
            continue;
        }
        if names == 0 && !held {
            note(
                format!("inode {ino} has link count {nlink} but no name: unreachable"),
                None,
            );
            continue;
        }
        if repair {
            tx.exec("UPDATE node SET nlink = ?2 WHERE ino = ?1", [ino, names])?;
        }
        note(
            format!("inode {ino} has link count {nlink}, but {names} entries name it"),
            Some("set the link count"),
        );
    }
    // Directories: one name (the root none), parent = the directory naming it, link count 2 +
    // subdirectories, size 4096.
    /// ino, nlink, parent, length, names, first directory naming it, subdirectories.
    type DirRow = (i64, i64, i64, i64, i64, Option<i64>, i64);
    let dirs: Vec<DirRow> = tx
        .prepare_cached(
            "SELECT n.ino, n.nlink, n.parent, n.length,
                    (SELECT COUNT(*) FROM edge e WHERE e.ino = n.ino),
                    (SELECT MIN(e.parent) FROM edge e WHERE e.ino = n.ino),
                    (SELECT COUNT(*) FROM edge e WHERE e.parent = n.ino AND e.kind = ?1)
             FROM node n WHERE n.kind = ?1",
        )?
        .query_map([dir], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (ino, nlink, parent, length, names, named_in, subdirs) in dirs {
        // The root and the trash have no entry naming them.
        let root = ino as Ino == ROOT_INO || ino as Ino == TRASH_INO;
        let expected_parent = match ino as Ino {
            ROOT_INO => Some(ino),
            TRASH_INO => Some(ROOT_INO as i64),
            _ => named_in,
        };
        if !root && names != 1 {
            note(
                format!("directory {ino} has {names} names (expected 1)"),
                None,
            );
        }
        if let Some(p) = expected_parent.filter(|&p| p != parent) {
            if repair {
                tx.exec("UPDATE node SET parent = ?2 WHERE ino = ?1", [ino, p])?;
            }
            note(
                format!("directory {ino} records parent {parent} but is in {p}"),
                Some("set the parent"),
            );
        }
        if nlink != 2 + subdirs {
            if repair {
                tx.exec(
                    "UPDATE node SET nlink = ?2 WHERE ino = ?1",
                    [ino, 2 + subdirs],
                )?;
            }
            note(
                format!(
                    "directory {ino} has link count {nlink}, expected {}",
                    2 + subdirs
                ),
                Some("set the link count"),
            );
        }
        if length != 4096 {
            if repair {
                tx.exec("UPDATE node SET length = 4096 WHERE ino = ?1", [ino])?;
            }
            note(
                format!("directory {ino} has size {length}, expected 4096"),
                Some("set the size"),
            );
        }
    }
    // Inodes held open by sessions that no longer exist.
    let stale: Vec<(i64, i64)> = tx
        .prepare_cached(
            "SELECT s.sid, s.ino FROM sustained s LEFT JOIN session x ON x.sid = s.sid
             WHERE x.sid IS NULL",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (sid, ino) in stale {
        if repair {
            tx.exec(
                "DELETE FROM sustained WHERE sid = ?1 AND ino = ?2",
                [sid, ino],
            )?;
            free_if_orphan(tx, ino as Ino)?;
        }
        note(
            format!("inode {ino} is held open by session {sid}, which is gone"),
            Some("release it"),
        );
    }
    // Usage counters.
    let file = FileKind::File.code() as i64;
    let (inodes, space): (i64, i64) = tx.row(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN kind = ?1 THEN (length + 4095) / 4096 * 4096
                                            ELSE 0 END), 0) FROM node",
        [file],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    for (name, actual) in [("used_inodes", inodes), ("used_space", space)] {
        let recorded = counter(tx, name)?;
        if recorded != actual {
            if repair {
                bump_counter(tx, name, actual - recorded)?;
            }
            note(
                format!("counter {name} is {recorded}, actual {actual}"),
                Some("set the counter"),
            );
        }
    }
    // Id counters must stay above every id in use, or ids would be handed out twice.
    let max_ino: i64 = tx.row(
        "SELECT COALESCE(MAX(ino), 0) FROM node WHERE ino != ?1",
        [TRASH_INO as i64],
        |r| r.get(0),
    )?;
    let max_slice: i64 = tx.row(
        "SELECT MAX(COALESCE((SELECT MAX(MAX(id), MAX(seq)) FROM slice), 0),
                    COALESCE((SELECT MAX(id) FROM deleted_slice), 0))",
        [],
        |r| r.get(0),
    )?;
    for (name, max) in [("next_ino", max_ino), ("next_slice", max_slice)] {
        let next = counter(tx, name)?;
        if next <= max {
            if repair {
                bump_counter(tx, name, max + 1 - next)?;
            }
            note(
                format!("counter {name} is {next} but {max} is in use"),
                Some("raise the counter"),
            );
        }
    }
    Ok(problems)
}

impl SqliteMeta {
    /// Opens the database at `path`. With `create` a missing file is created; without it a
    /// missing file is [`MetaError::NotFormatted`].
    pub fn open(path: &Path, create: bool) -> Result<Self> {
        Self::open_with(path, create, CHECKPOINTS)
    }

    fn open_with(path: &Path, create: bool, checkpoints: Checkpoints) -> Result<Self> {
        if !create && !path.exists() {
            return Err(MetaError::NotFormatted);
        }
        let conn = connect(path, create)?;
        upgrade(&conn)?;
        let (wakes, wake) = mpsc::sync_channel(1);
        let force = Arc::new(AtomicBool::new(false));
        let checkpointing = Arc::new(Mutex::new(()));
        let (db, forced, only) = (path.to_path_buf(), force.clone(), checkpointing.clone());
        let cap = checkpoints.cap_frames;
        std::thread::Builder::new()
            .name("tidefs-checkpoint".into())
            .spawn(move || checkpoint_loop(&db, &wake, cap, &forced, &only))
            .map_err(|e| MetaError::Engine(format!("cannot start the checkpoint thread: {e}")))?;
        let meta = SqliteMeta {
            path: path.to_path_buf(),
            pool: Mutex::new(Vec::new()),
            writer: Mutex::new(Writer::default()),
            ended: AtomicU64::new(0),
            synced: Mutex::new(0),
            checkpoints: Checkpoints {
                every: checkpoints.every.max(1),
                ..checkpoints
            },
            force_checkpoint: force,
            checkpointing,
            wake_checkpoint: wakes,
            limits: Mutex::new(None),
        };
        meta.put_conn(conn);
        Ok(meta)
    }

    fn take_conn(&self) -> Result<Connection> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(c) => Ok(c),
            None => connect(&self.path, false),
        }
    }

    fn put_conn(&self, conn: Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 32 {
            pool.push(conn);
        }
    }

    /// The volume's limits and trash setting, at most [`LIMITS_TTL`] old.
    fn limits(&self, tx: &Connection) -> Result<Limits> {
        if let Some((read, l)) = *self.limits.lock().unwrap_or_else(|e| e.into_inner()) {
            if read.elapsed() < LIMITS_TTL {
                return Ok(l);
            }
        }
        let json: Option<String> = tx
            .row("SELECT value FROM setting WHERE name = 'format'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let l = json
            .and_then(|j| serde_json::from_str::<Format>(&j).ok())
            .map(|f| Limits {
                capacity: f.capacity,
                inodes: f.inodes,
                trash_days: f.trash_days,
            })
            .unwrap_or_default();
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), l));
        Ok(l)
    }

    /// Whether a file losing its last name in `dir` goes to the trash.
    fn trashing(&self, tx: &Connection, dir: &Attr) -> Result<bool> {
        Ok(!in_trash(dir) && self.limits(tx)?.trash_days > 0)
    }

    /// [`Meta::write_slices`] within transaction `tx`.
    fn write_file_slices(
        &self,
        tx: &Connection,
        ino: Ino,
        slices: &[ChunkSlice],
        mtime: Timestamp,
    ) -> Result<Attr> {
        let mut a = get_node(tx, ino)?;
        if a.kind != FileKind::File {
            return Err(MetaError::Invalid);
        }
        let mut end = a.length;
        let first = next_seq(tx, slices.len())?;
        for (seq, cs) in (first..).zip(slices) {
            let s = cs.slice;
            insert_slice(tx, ino, cs.chunk, &s, seq)?;
            end = end.max(cs.chunk as u64 * CHUNK_SIZE + s.pos as u64 + s.len as u64);
        }
        let delta = round_space(end) - round_space(a.length);
        self.check_space(tx, delta)?;
        bump_counter(tx, "used_space", delta)?;
        let mut chunks: Vec<u32> = slices.iter().map(|cs| cs.chunk).collect();
        chunks.sort_unstable();
        chunks.dedup();
        for chunk in chunks {
            drop_hidden_slices(tx, ino, chunk)?;
        }
        a.length = end;
        a.mtime = mtime;
        a.ctime = mtime;
        put_node(tx, &a)?;
        Ok(a)
    }

    /// Fails with [`MetaError::NoSpace`] if growing usage by `delta` bytes passes the capacity.
    fn check_space(&self, tx: &Connection, delta: i64) -> Result<()> {
        let capacity = self.limits(tx)?.capacity;
        if delta > 0 && capacity > 0 && counter(tx, "used_space")? + delta > capacity as i64 {
            return Err(MetaError::NoSpace);
        }
        Ok(())
    }

    fn read<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.take_conn()?;
        let result = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })();
        self.put_conn(conn);
        result
    }

    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.with_writer(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Runs `f` on the writer connection, waiting while another thread of this process
    /// holds it.
    fn with_writer<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut turn = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let turn = &mut *turn;
        let conn = match turn.conn.as_mut() {
            Some(conn) => conn,
            None => turn.conn.insert(connect(&self.path, false)?),
        };
        let result = f(conn);
        self.ended.fetch_add(1, Ordering::Release);
        turn.commits += 1;
        turn.since_own_checkpoint += 1;
        if !conn.is_autocommit() {
            // A transaction left open (a failed rollback) would hold the database's write
            // lock: start over with a new connection.
            turn.conn = None;
        } else if self.force_checkpoint.swap(false, Ordering::Relaxed)
            // Or the thread is starved of CPU and the WAL grows unwatched.
            || turn.since_own_checkpoint >= STARVED_AFTER * self.checkpoints.every
        {
            // No writer of this process can add to the WAL meanwhile, so this one empties it
            // (unless another process writes or checkpoints, or reads an old snapshot).
            let _only = self.checkpointing.lock().unwrap_or_else(|e| e.into_inner());
            match checkpoint(conn) {
                Ok(Some(_)) => turn.since_own_checkpoint = 0,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "checkpoint of the metadata WAL failed"),
            }
        }
        if turn.commits.is_multiple_of(self.checkpoints.every) {
            // Full: a wake is already pending, which is as good.
            let _ = self.wake_checkpoint.try_send(());
        }
        result
    }
}

impl Meta for SqliteMeta {
    fn engine(&self) -> &'static str {
        "sqlite3"
    }

    fn format(&self, format: &Format, root_uid: u32, root_gid: u32) -> Result<()> {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.write(|tx| {
            tx.execute_batch(SCHEMA)?;
            let existing: Option<String> = tx
                .row("SELECT value FROM setting WHERE name = 'format'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            if let Some(existing) = existing {
                let old: Format = serde_json::from_str(&existing)
                    .map_err(|e| MetaError::Engine(format!("corrupt format record: {e}")))?;
                let updated = old.updated_with(format)?;
                let json = serde_json::to_string(&updated).expect("format serializes");
                tx.exec(
                    "UPDATE setting SET value = ?1 WHERE name = 'format'",
                    [json],
                )?;
                return Ok(());
            }
            let json = serde_json::to_string(format).expect("format serializes");
            tx.exec(
                "INSERT INTO setting (name, value) VALUES ('format', ?1)",
                [json],
            )?;
            let now = Timestamp::now();
            put_node(
                tx,
                &Attr {
                    mode: 0o777,
                    uid: root_uid,
                    gid: root_gid,
                    ..empty_dir(ROOT_INO, ROOT_INO, now)
                },
            )?;
            tx.execute_batch(
                "INSERT INTO counter VALUES ('next_ino', 2), ('next_slice', 1),
                 ('used_space', 0), ('used_inodes', 1);",
            )?;
            Ok(())
        })
    }

    fn load_format(&self) -> Result<Format> {
        self.read(|tx| {
            let has_table: bool = tx
                .row(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'setting'",
                    [],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !has_table {
                return Err(MetaError::NotFormatted);
            }
            let json: String = tx
                .row("SELECT value FROM setting WHERE name = 'format'", [], |r| {
                    r.get(0)
                })
                .optional()?
                .ok_or(MetaError::NotFormatted)?;
            serde_json::from_str(&json)
                .map_err(|e| MetaError::Engine(format!("corrupt format record: {e}")))
        })
    }

    fn new_session(&self, info: &SessionInfo) -> Result<u64> {
        self.write(|tx| {
            let now = unix_now();
            tx.exec(
                "INSERT INTO session (host, pid, mountpoint, version, started, heartbeat, metrics)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
                params![
                    info.host,
                    info.pid,
                    info.mountpoint,
                    info.version,
                    now,
                    info.metrics
                ],
            )?;
            Ok(tx.last_insert_rowid() as u64)
        })
    }

    fn heartbeat(&self, sid: u64) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                "UPDATE session SET heartbeat = ?2 WHERE sid = ?1",
                params![sid as i64, unix_now()],
            )?;
            Ok(())
        })
    }

    fn close_session(&self, sid: u64) -> Result<()> {
        self.write(|tx| {
            let inos: Vec<i64> = tx
                .prepare_cached("SELECT ino FROM sustained WHERE sid = ?1")?
                .query_map([sid as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            tx.exec("DELETE FROM sustained WHERE sid = ?1", [sid as i64])?;
            tx.exec("DELETE FROM plock WHERE sid = ?1", [sid as i64])?;
            for ino in inos {
                free_if_orphan(tx, ino as u64)?;
            }
            tx.exec("DELETE FROM session WHERE sid = ?1", [sid as i64])?;
            Ok(())
        })
    }

    fn sessions(&self) -> Result<Vec<SessionInfo>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT sid, host, pid, mountpoint, version, started, heartbeat, metrics
                 FROM session ORDER BY sid",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(SessionInfo {
                        sid: r.get::<_, i64>(0)? as u64,
                        host: r.get(1)?,
                        pid: r.get(2)?,
                        mountpoint: r.get(3)?,
                        version: r.get(4)?,
                        started: r.get(5)?,
                        heartbeat: r.get(6)?,
                        metrics: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn usage(&self) -> Result<Usage> {
        self.read(|tx| {
            Ok(Usage {
                space: counter(tx, "used_space")?.max(0) as u64,
                inodes: counter(tx, "used_inodes")?.max(0) as u64,
            })
        })
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        self.read(|tx| {
            let dir = get_dir(tx, parent)?;
            match name {
                b"." => return Ok(dir),
                b".." => return get_node(tx, dir.parent),
                _ => {}
            }
            match find_edge(tx, parent, name)? {
                Some((ino, _)) => get_node(tx, ino),
                None if parent == ROOT_INO && name == TRASH_NAME => get_node(tx, TRASH_INO),
                None => Err(MetaError::NotFound),
            }
        })
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.read(|tx| get_node(tx, ino))
    }

    fn setattr(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        self.write(|tx| {
            let mut a = get_node(tx, ino)?;
            let mut changed = false;
            if let Some(mode) = set.mode {
                a.mode = mode & 0o7777;
                changed = true;
            }
            if let Some(uid) = set.uid {
                a.uid = uid;
                changed = true;
            }
            if let Some(gid) = set.gid {
                a.gid = gid;
                changed = true;
            }
            if let Some(t) = set.atime {
                a.atime = t;
                changed = true;
            }
            if let Some(t) = set.mtime {
                a.mtime = t;
                changed = true;
            }
            if let Some(t) = set.ctime {
                a.ctime = t;
            } else if changed {
                a.ctime = Timestamp::now();
            }
            put_node(tx, &a)?;
            Ok(a)
        })
    }

    fn truncate(&self, ino: Ino, length: u64, mtime: Timestamp) -> Result<Attr> {
        self.write(|tx| {
            let mut a = get_node(tx, ino)?;
            match a.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(MetaError::IsDir),
                _ => return Err(MetaError::Invalid),
            }
            let delta = round_space(length) - round_space(a.length);
            self.check_space(tx, delta)?;
            if length < a.length {
                drop_slices_past(tx, ino, length)?;
            }
            bump_counter(tx, "used_space", delta)?;
            a.length = length;
            a.mtime = mtime;
            a.ctime = mtime;
            put_node(tx, &a)?;
            Ok(a)
        })
    }

    fn fallocate(
        &self,
        ino: Ino,
        mode: FallocMode,
        off: u64,
        len: u64,
        zero_ids: &[u64],
    ) -> Result<Attr> {
        let end = off.checked_add(len).ok_or(MetaError::FileTooLarge)?;
        self.write(|tx| {
            let mut a = get_node(tx, ino)?;
            match a.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(MetaError::IsDir),
                _ => return Err(MetaError::NotSupported),
            }
            let (zero, keep_size) = match mode {
                FallocMode::Allocate { keep_size } => (false, keep_size),
                FallocMode::PunchHole => (true, true),
                FallocMode::ZeroRange { keep_size } => (true, keep_size),
            };
            let now = Timestamp::now();
            if zero {
                let zero_end = if keep_size { end.min(a.length) } else { end };
                let mut ids = zero_ids.iter();
                let mut at = off;
                while at < zero_end {
                    let chunk = at / CHUNK_SIZE;
                    let pos = at % CHUNK_SIZE;
                    let n = (CHUNK_SIZE - pos).min(zero_end - at);
                    let id = *ids.next().ok_or(MetaError::Invalid)? as i64;
                    let seq = next_seq(tx, 1)?;
                    tx.exec(
                        "INSERT INTO slice (ino, chunk, id, size, off, len, pos, seq)
                         VALUES (?1, ?2, ?3, 0, 0, ?4, ?5, ?6)",
                        params![ino as i64, chunk as i64, id, n as i64, pos as i64, seq],
                    )?;
                    at += n;
                }
                a.mtime = now;
            }
            if !keep_size && end > a.length {
                let delta = round_space(end) - round_space(a.length);
                self.check_space(tx, delta)?;
                bump_counter(tx, "used_space", delta)?;
                a.length = end;
                a.mtime = now;
            }
            a.ctime = now;
            put_node(tx, &a)?;
            Ok(a)
        })
    }

    fn mknod_with_parent(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<(Attr, Attr)> {
        check_name(name)?;
        if let Some(target) = &node.symlink {
            if target.len() > SYMLINK_MAX {
                return Err(MetaError::NameTooLong);
            }
        }
        self.write(|tx| {
            let mut dir = get_dir(tx, parent)?;
            if dir.nlink == 0 {
                return Err(MetaError::NotFound);
            }
            if in_trash(&dir) || is_reserved(parent, name) {
                return Err(MetaError::NotPermitted);
            }
            if find_edge(tx, parent, name)?.is_some() {
                return Err(MetaError::Exists);
            }
            if node.kind == FileKind::Dir && dir.nlink >= LINK_MAX {
                return Err(MetaError::TooManyLinks);
            }
            let max_inodes = self.limits(tx)?.inodes;
            if max_inodes > 0 && counter(tx, "used_inodes")? as u64 >= max_inodes {
                return Err(MetaError::NoSpace);
            }
            let ino = bump_counter(tx, "next_ino", 1)? as u64 - 1;
            let now = Timestamp::now();
            let mut mode = node.mode & 0o7777;
            let mut gid = node.gid;
            if dir.mode & libc::S_ISGID != 0 {
                gid = dir.gid;
                if node.kind == FileKind::Dir {
                    mode |= libc::S_ISGID;
                }
            }
            if node.kind != FileKind::Dir
                && mode & libc::S_ISGID != 0
                && node.uid != 0
                && !node.groups.contains(&gid)
            {
                mode &= !libc::S_ISGID;
            }
            let length = match (&node.symlink, node.kind) {
                (Some(t), _) => t.len() as u64,
                (None, FileKind::Dir) => 4096,
                _ => 0,
            };
            let attr = Attr {
                ino,
                kind: node.kind,
                mode,
                uid: node.uid,
                gid,
                rdev: node.rdev,
                nlink: if node.kind == FileKind::Dir { 2 } else { 1 },
                length,
                atime: now,
                mtime: now,
                ctime: now,
                parent,
            };
            put_node(tx, &attr)?;
            if let Some(target) = &node.symlink {
                tx.exec(
                    "INSERT INTO symlink (ino, target) VALUES (?1, ?2)",
                    params![ino as i64, target],
                )?;
            }
            add_edge(tx, parent, name, ino, node.kind)?;
            if node.kind == FileKind::Dir {
                dir.nlink += 1;
            }
            touch_dir(tx, &mut dir, now)?;
            bump_counter(tx, "used_inodes", 1)?;
            Ok((attr, dir))
        })
    }

    fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        self.write(|tx| {
            let mut dir = get_dir(tx, parent)?;
            if dir.nlink == 0 {
                return Err(MetaError::NotFound);
            }
            if in_trash(&dir) || is_reserved(parent, name) {
                return Err(MetaError::NotPermitted);
            }
            let mut a = get_node(tx, ino)?;
            if a.kind == FileKind::Dir {
                return Err(MetaError::NotPermitted);
            }
            if a.nlink == 0 {
                return Err(MetaError::NotFound);
            }
            if a.nlink >= LINK_MAX {
                return Err(MetaError::TooManyLinks);
            }
            if find_edge(tx, parent, name)?.is_some() {
                return Err(MetaError::Exists);
            }
            let now = Timestamp::now();
            add_edge(tx, parent, name, ino, a.kind)?;
            a.nlink += 1;
            a.ctime = now;
            a.parent = parent;
            put_node(tx, &a)?;
            touch_dir(tx, &mut dir, now)?;
            Ok(a)
        })
    }

    fn unlink(
        &self,
        parent: Ino,
        name: &[u8],
        sid: u64,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        self.write(|tx| {
            let mut dir = get_dir(tx, parent)?;
            let (ino, kind) = find_edge(tx, parent, name)?.ok_or(MetaError::NotFound)?;
            if kind == FileKind::Dir {
                return Err(MetaError::IsDir);
            }
            let now = Timestamp::now();
            remove_edge(tx, parent, name)?;
            touch_dir(tx, &mut dir, now)?;
            let target = get_node(tx, ino)?;
            let trash = self.trashing(tx, &dir)?.then_some((parent, name));
            unlink_inode(tx, target, now, sid, is_open, trash)
        })
    }

    fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        match name {
            b"." => return Err(MetaError::Invalid),
            b".." => return Err(MetaError::NotEmpty),
            _ if name.len() > NAME_MAX => return Err(MetaError::NameTooLong),
            _ => {}
        }
        self.write(|tx| {
            let mut dir = get_dir(tx, parent)?;
            let (ino, kind) = find_edge(tx, parent, name)?.ok_or(MetaError::NotFound)?;
            if kind != FileKind::Dir {
                return Err(MetaError::NotDir);
            }
            if !dir_is_empty(tx, ino)? {
                return Err(MetaError::NotEmpty);
            }
            let now = Timestamp::now();
            remove_edge(tx, parent, name)?;
            dir.nlink = dir.nlink.saturating_sub(1);
            touch_dir(tx, &mut dir, now)?;
            let target = get_node(tx, ino)?;
            free_inode(tx, &target)
        })
    }

    fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
        sid: u64,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        check_name(new_name)?;
        if flags.exchange && flags.noreplace {
            return Err(MetaError::Invalid);
        }
        self.write(|tx| {
            let mut src_dir = get_dir(tx, parent)?;
            let (ino, kind) = find_edge(tx, parent, name)?.ok_or(MetaError::NotFound)?;
            let same_dir = parent == new_parent;
            let mut dst_dir = if same_dir {
                src_dir.clone()
            } else {
                get_dir(tx, new_parent)?
            };
            if dst_dir.nlink == 0 {
                return Err(MetaError::NotFound);
            }
            // Files leave the trash by rename; nothing enters it that way, and its hour
            // directories stay where they are.
            if in_trash(&dst_dir)
                || src_dir.ino == TRASH_INO
                || (flags.exchange && in_trash(&src_dir))
                || is_reserved(new_parent, new_name)
            {
                return Err(MetaError::NotPermitted);
            }
            let restoring = in_trash(&src_dir);
            let dst = find_edge(tx, new_parent, new_name)?;
            if same_dir && name == new_name {
                // Renaming a name onto itself changes nothing.
                return if flags.noreplace {
                    Err(MetaError::Exists)
                } else {
                    Ok(())
                };
            }
            // A directory may not move below itself.
            if !same_dir {
                let mut at = new_parent;
                while at != ROOT_INO {
                    if at == ino {
                        return Err(MetaError::Invalid);
                    }
                    at = get_node(tx, at)?.parent;
                }
                if let (true, Some((dst_ino, FileKind::Dir))) = (flags.exchange, dst) {
                    let mut at = parent;
                    while at != ROOT_INO {
                        if at == dst_ino {
                            return Err(MetaError::Invalid);
                        }
                        at = get_node(tx, at)?.parent;
                    }
                }
            }
            let now = Timestamp::now();
            let mut moved = get_node(tx, ino)?;
            if flags.exchange {
                let (dst_ino, dst_kind) = dst.ok_or(MetaError::NotFound)?;
                let mut other = get_node(tx, dst_ino)?;
                tx.exec(
                    "UPDATE edge SET ino = ?3, kind = ?4 WHERE parent = ?1 AND name = ?2",
                    params![parent as i64, name, dst_ino as i64, dst_kind.code()],
                )?;
                tx.exec(
                    "UPDATE edge SET ino = ?3, kind = ?4 WHERE parent = ?1 AND name = ?2",
                    params![new_parent as i64, new_name, ino as i64, kind.code()],
                )?;
                if !same_dir {
                    if kind == FileKind::Dir && dst_kind != FileKind::Dir {
                        if dst_dir.nlink >= LINK_MAX {
                            return Err(MetaError::TooManyLinks);
                        }
                        src_dir.nlink -= 1;
                        dst_dir.nlink += 1;
                    } else if kind != FileKind::Dir && dst_kind == FileKind::Dir {
                        if src_dir.nlink >= LINK_MAX {
                            return Err(MetaError::TooManyLinks);
                        }
                        src_dir.nlink += 1;
                        dst_dir.nlink -= 1;
                    }
                }
                moved.parent = new_parent;
                moved.ctime = now;
                other.parent = parent;
                other.ctime = now;
                put_node(tx, &moved)?;
                put_node(tx, &other)?;
            } else {
                if let Some((dst_ino, dst_kind)) = dst {
                    if flags.noreplace {
                        return Err(MetaError::Exists);
                    }
                    if dst_ino == ino {
                        // Two names of one inode: rename does nothing.
                        return Ok(());
                    }
                    match (kind == FileKind::Dir, dst_kind == FileKind::Dir) {
                        (true, false) => return Err(MetaError::NotDir),
                        (false, true) => return Err(MetaError::IsDir),
                        _ => {}
                    }
                    let target = get_node(tx, dst_ino)?;
                    remove_edge(tx, new_parent, new_name)?;
                    if dst_kind == FileKind::Dir {
                        if !dir_is_empty(tx, dst_ino)? {
                            return Err(MetaError::NotEmpty);
                        }
                        dst_dir.nlink -= 1;
                        free_inode(tx, &target)?;
                    } else {
                        let trash = self
                            .trashing(tx, &dst_dir)?
                            .then_some((new_parent, new_name));
                        unlink_inode(tx, target, now, sid, is_open, trash)?;
                    }
                }
                remove_edge(tx, parent, name)?;
                add_edge(tx, new_parent, new_name, ino, kind)?;
                if kind == FileKind::Dir && !same_dir {
                    if dst_dir.nlink >= LINK_MAX {
                        return Err(MetaError::TooManyLinks);
                    }
                    src_dir.nlink -= 1;
                    dst_dir.nlink += 1;
                }
                moved.parent = new_parent;
                moved.ctime = now;
                if restoring {
                    // Out of the trash, the file has a name again.
                    moved.nlink = 1;
                }
                put_node(tx, &moved)?;
            }
            if same_dir {
                touch_dir(tx, &mut dst_dir, now)?;
            } else {
                touch_dir(tx, &mut src_dir, now)?;
                touch_dir(tx, &mut dst_dir, now)?;
            }
            Ok(())
        })
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.read(|tx| {
            let a = get_node(tx, ino)?;
            if a.kind != FileKind::Symlink {
                return Err(MetaError::Invalid);
            }
            tx.row(
                "SELECT target FROM symlink WHERE ino = ?1",
                [ino as i64],
                |r| r.get(0),
            )
            .optional()?
            .ok_or(MetaError::NotFound)
        })
    }

    fn readdir(&self, ino: Ino, cookie: u64, limit: usize) -> Result<Vec<DirEntry>> {
        self.read(|tx| {
            get_dir(tx, ino)?;
            let mut stmt = tx.prepare_cached(
                "SELECT id, name, ino, kind FROM edge WHERE parent = ?1 AND id > ?2
                 ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![ino as i64, cookie as i64, limit as i64], |r| {
                    Ok(DirEntry {
                        cookie: r.get::<_, i64>(0)? as u64,
                        name: r.get(1)?,
                        ino: r.get::<_, i64>(2)? as u64,
                        kind: FileKind::from_code(r.get(3)?).unwrap_or(FileKind::File),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        self.read(|tx| {
            get_node(tx, ino)?;
            tx.row(
                "SELECT value FROM xattr WHERE ino = ?1 AND name = ?2",
                params![ino as i64, name],
                |r| r.get(0),
            )
            .optional()?
            .ok_or(MetaError::NoData)
        })
    }

    fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        if name.is_empty() {
            return Err(MetaError::Invalid);
        }
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(MetaError::TooBig);
        }
        self.write(|tx| {
            let mut a = get_node(tx, ino)?;
            let exists = tx
                .row(
                    "SELECT 1 FROM xattr WHERE ino = ?1 AND name = ?2",
                    params![ino as i64, name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            match (mode, exists) {
                (XattrMode::Create, true) => return Err(MetaError::Exists),
                (XattrMode::Replace, false) => return Err(MetaError::NoData),
                _ => {}
            }
            tx.exec(
                "INSERT OR REPLACE INTO xattr (ino, name, value) VALUES (?1, ?2, ?3)",
                params![ino as i64, name, value],
            )?;
            a.ctime = Timestamp::now();
            put_node(tx, &a)
        })
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.read(|tx| {
            get_node(tx, ino)?;
            let names = tx
                .prepare_cached("SELECT name FROM xattr WHERE ino = ?1 ORDER BY name")?
                .query_map([ino as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(names)
        })
    }

    fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        self.write(|tx| {
            let mut a = get_node(tx, ino)?;
            let n = tx.exec(
                "DELETE FROM xattr WHERE ino = ?1 AND name = ?2",
                params![ino as i64, name],
            )?;
            if n == 0 {
                return Err(MetaError::NoData);
            }
            a.ctime = Timestamp::now();
            put_node(tx, &a)
        })
    }

    fn read_chunk(&self, ino: Ino, chunk: u32) -> Result<Vec<Slice>> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT id, size, off, len, pos FROM slice WHERE ino = ?1 AND chunk = ?2
                 ORDER BY seq, id",
            )?;
            let rows = stmt
                .query_map(params![ino as i64, chunk], |r| {
                    Ok(Slice {
                        id: r.get::<_, i64>(0)? as u64,
                        size: r.get(1)?,
                        off: r.get(2)?,
                        len: r.get(3)?,
                        pos: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn write_slices(&self, ino: Ino, slices: &[ChunkSlice], mtime: Timestamp) -> Result<Attr> {
        self.write(|tx| self.write_file_slices(tx, ino, slices, mtime))
    }

    fn write_files(&self, files: &[FileWrite]) -> Result<Vec<Attr>> {
        if repeats_an_inode(files) {
            return Err(MetaError::Invalid);
        }
        self.write(|tx| {
            files
                .iter()
                .map(|f| self.write_file_slices(tx, f.ino, &f.slices, f.mtime))
                .collect()
        })
    }

    fn compact_chunk(&self, ino: Ino, chunk: u32, replaced: &[Slice], new: Slice) -> Result<bool> {
        self.write(|tx| {
            let rows: Vec<(Slice, i64)> = tx
                .prepare_cached(
                    "SELECT id, size, off, len, pos, seq FROM slice WHERE ino = ?1 AND chunk = ?2",
                )?
                .query_map(params![ino as i64, chunk], |r| {
                    Ok((
                        Slice {
                            id: r.get::<_, i64>(0)? as u64,
                            size: r.get(1)?,
                            off: r.get(2)?,
                            len: r.get(3)?,
                            pos: r.get(4)?,
                        },
                        r.get(5)?,
                    ))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let still_there = replaced.iter().all(|r| rows.iter().any(|(s, _)| s == r));
            let last = rows
                .iter()
                .filter(|(s, _)| replaced.iter().any(|r| r.id == s.id))
                .map(|(_, seq)| *seq)
                .max();
            let prefix = last.is_some_and(|last| {
                rows.iter()
                    .all(|(s, seq)| *seq > last || replaced.iter().any(|r| r.id == s.id))
            });
            if !still_there || !prefix || replaced.is_empty() {
                // Its data is stored but never referenced: free it.
                if new.size > 0 {
                    tx.exec(
                        "INSERT OR IGNORE INTO deleted_slice (id, size) VALUES (?1, ?2)",
                        params![new.id as i64, new.size],
                    )?;
                }
                return Ok(false);
            }
            for r in replaced {
                drop_slice(tx, ino, chunk, r.id as i64, r.size as i64)?;
            }
            insert_slice(tx, ino, chunk, &new, last.unwrap_or_default())?;
            Ok(true)
        })
    }

    fn next_slice_ids(&self, n: u64) -> Result<u64> {
        self.write(|tx| Ok((bump_counter(tx, "next_slice", n as i64)? as u64) - n))
    }

    fn release(&self, ino: Ino, sid: u64) -> Result<()> {
        self.write(|tx| {
            let n = tx.exec(
                "DELETE FROM sustained WHERE sid = ?1 AND ino = ?2",
                params![sid as i64, ino as i64],
            )?;
            if n > 0 {
                free_if_orphan(tx, ino)?;
            }
            Ok(())
        })
    }

    fn pending_deletions(&self, after: u64, limit: usize) -> Result<Vec<FreedSlice>> {
        self.read(|tx| {
            let rows = tx
                .prepare_cached(
                    "SELECT id, size FROM deleted_slice WHERE id > ?1 ORDER BY id LIMIT ?2",
                )?
                .query_map(params![after as i64, limit as i64], |r| {
                    Ok(FreedSlice {
                        id: r.get::<_, i64>(0)? as u64,
                        size: r.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn referenced_slices(&self, after: u64, limit: usize) -> Result<Vec<SliceRef>> {
        self.read(|tx| {
            let rows = tx
                .prepare_cached(
                    "SELECT id, size, MIN(ino) FROM slice WHERE id > ?1 AND size > 0
                     GROUP BY id ORDER BY id LIMIT ?2",
                )?
                .query_map(params![after as i64, limit as i64], |r| {
                    Ok(SliceRef {
                        id: r.get::<_, i64>(0)? as u64,
                        size: r.get(1)?,
                        ino: r.get::<_, i64>(2)? as u64,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn check_namespace(&self, repair: bool) -> Result<Vec<Problem>> {
        if repair {
            self.write(|tx| check_namespace(tx, true))
        } else {
            self.read(|tx| check_namespace(tx, false))
        }
    }

    fn ack_deletions(&self, ids: &[u64]) -> Result<()> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached("DELETE FROM deleted_slice WHERE id = ?1")?;
            for id in ids {
                stmt.execute([*id as i64])?;
            }
            Ok(())
        })
    }

    fn sync(&self) -> Result<()> {
        // Commits that ended before this call; a sync begun after them covers them.
        let wanted = self.ended.load(Ordering::Acquire);
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if *synced >= wanted {
            // Nothing committed since a sync, or a sync that began while this one waited for
            // its turn made them durable: several files' fsyncs at once share one WAL fsync.
            return Ok(());
        }
        // A commit with synchronous=FULL fsyncs the WAL, and with it every earlier commit.
        // It must write something: an empty transaction writes no frame and syncs nothing.
        self.with_writer(|conn| {
            // Holding the writer, no other commit ends until this one has: every commit
            // counted here is in the WAL before it, this one is the next.
            let covered = self.ended.load(Ordering::Acquire) + 1;
            conn.pragma_update(None, "synchronous", "FULL")?;
            let committed: Result<()> = (|| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                bump_counter(&tx, "syncs", 1)?;
                tx.commit()?;
                Ok(())
            })();
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            committed?;
            *synced = covered;
            Ok(())
        })
    }

    fn setlk(&self, ino: Ino, req: &Lock) -> Result<Option<Lock>> {
        self.write(|tx| {
            let held = file_locks(tx, ino)?;
            let locks = match lock::apply(&held, req) {
                Ok(locks) => locks,
                Err(conflict) => return Ok(Some(conflict)),
            };
            tx.exec("DELETE FROM plock WHERE ino = ?1", [ino as i64])?;
            for l in locks {
                tx.exec(
                    "INSERT INTO plock (ino, sid, lock) VALUES (?1, ?2, ?3)",
                    params![ino as i64, l.sid as i64, l.encode()],
                )?;
            }
            Ok(None)
        })
    }

    fn getlk(&self, ino: Ino, req: &Lock) -> Result<Option<Lock>> {
        self.read(|tx| Ok(lock::conflict(&file_locks(tx, ino)?, req)))
    }

    fn id_counters(&self) -> Result<(u64, u64)> {
        self.read(|tx| {
            Ok((
                counter(tx, "next_ino")? as u64,
                counter(tx, "next_slice")? as u64,
            ))
        })
    }

    fn load_records(
        &self,
        header: &DumpHeader,
        records: &mut dyn Iterator<Item = Result<DumpRecord>>,
    ) -> Result<()> {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.write(|tx| {
            tx.execute_batch(SCHEMA)?;
            let (mut inodes, mut space, mut seq) = (0i64, 0i64, 0i64);
            for r in records {
                match r? {
                    DumpRecord::Header(_) => return Err(MetaError::Invalid),
                    DumpRecord::Inode(i) => {
                        let a = &i.attr;
                        put_node(tx, a)?;
                        inodes += 1;
                        if a.kind == FileKind::File {
                            space += round_space(a.length);
                        }
                        if let Some(target) = &i.symlink {
                            tx.exec(
                                "INSERT INTO symlink (ino, target) VALUES (?1, ?2)",
                                params![a.ino as i64, target.0],
                            )?;
                        }
                        for (name, value) in &i.xattrs {
                            tx.exec(
                                "INSERT INTO xattr (ino, name, value) VALUES (?1, ?2, ?3)",
                                params![a.ino as i64, name.0, value.0],
                            )?;
                        }
                        for c in &i.chunks {
                            for s in &c.slices {
                                seq += 1;
                                insert_slice(tx, a.ino, c.index, s, seq)?;
                            }
                        }
                    }
                    DumpRecord::Entry(e) => add_edge(tx, e.parent, &e.name.0, e.ino, e.kind)?,
                    DumpRecord::Freed { id, size } => {
                        tx.exec(
                            "INSERT OR IGNORE INTO deleted_slice (id, size) VALUES (?1, ?2)",
                            params![id as i64, size],
                        )?;
                    }
                }
            }
            // Commit positions of loaded slices stay below every id handed out later.
            let next_slice = (header.next_slice as i64).max(seq + 1);
            tx.exec(
                "INSERT INTO counter (name, value) VALUES ('next_ino', ?1), ('next_slice', ?2),
                 ('used_space', ?3), ('used_inodes', ?4)",
                params![header.next_ino as i64, next_slice, space, inodes],
            )?;
            let json = serde_json::to_string(&header.format).expect("format serializes");
            tx.exec(
                "INSERT INTO setting (name, value) VALUES ('format', ?1)",
                [json],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{node, sample_format};

    /// A sync fsyncs the WAL (one more commit with synchronous=FULL) only if some commit of
    /// this process ended since the last one began: an fsync with nothing new to make durable,
    /// or one whose commits another sync covered while it waited, costs no WAL fsync.
    #[test]
    fn a_sync_with_nothing_new_committed_does_not_fsync_again() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db"), true).unwrap();
        meta.format(&sample_format(), 0, 0).unwrap();
        let syncs = || meta.read(|tx| counter(tx, "syncs")).unwrap();
        meta.sync().unwrap();
        let first = syncs();
        meta.sync().unwrap();
        meta.sync().unwrap();
        assert_eq!(syncs(), first, "syncs with nothing committed between them");
        meta.mknod(ROOT_INO, b"f", &node(FileKind::File, 0o644))
            .unwrap();
        meta.sync().unwrap();
        assert_eq!(syncs(), first + 1, "a commit since the last sync is synced");
        // Many threads committing and syncing at once: they share WAL fsyncs as far as they
        // overlap, never take more than one per call, and the last one leaves none to do.
        std::thread::scope(|s| {
            for t in 0..4 {
                let meta = &meta;
                s.spawn(move || {
                    for i in 0..50 {
                        meta.mknod(
                            ROOT_INO,
                            format!("g{t}-{i}").as_bytes(),
                            &node(FileKind::File, 0o644),
                        )
                        .unwrap();
                        meta.sync().unwrap();
                    }
                });
            }
        });
        let after = syncs();
        assert!(after > first + 1 && after <= first + 201, "{after} syncs");
        meta.sync().unwrap();
        assert_eq!(
            syncs(),
            after,
            "the last thread's sync covered every commit"
        );
    }

    /// Writers that never pause leave a checkpoint running beside them no moment to empty the
    /// WAL; the cap must still keep it bounded, and every write must stay.
    #[test]
    fn checkpoints_keep_the_wal_bounded_under_constant_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let tuned = Checkpoints {
            every: 16,
            cap_frames: 256,
        };
        let meta = SqliteMeta::open_with(&path, true, tuned).unwrap();
        meta.format(&sample_format(), 0, 0).unwrap();
        let file = node(FileKind::File, 0o644);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (meta, file) = (&meta, &file);
                s.spawn(move || {
                    for i in 0..500 {
                        meta.mknod(ROOT_INO, format!("f{t}-{i}").as_bytes(), file)
                            .unwrap();
                    }
                });
            }
        });
        // 2,000 creates write some 24,000 frames (96 MiB) of WAL without checkpoints; the cap
        // of 256 frames (1 MiB) with a checkpoint every 16 writes keeps it to a few MiB.
        let wal = std::fs::metadata(dir.path().join("meta.db-wal"))
            .unwrap()
            .len();
        assert!(wal < 8 << 20, "WAL of {wal} bytes");
        assert!(std::fs::metadata(&path).unwrap().len() > 256 << 10);
        drop(meta);
        let meta = SqliteMeta::open(&path, false).unwrap();
        for t in 0..4 {
            for i in 0..500 {
                meta.lookup(ROOT_INO, format!("f{t}-{i}").as_bytes())
                    .unwrap();
            }
        }
    }
}
