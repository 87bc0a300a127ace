//! The VFS driven directly (no kernel), on a real SQLite file and a real local store wrapped in
//! a fault injector: error reporting and ordering rules that a mount cannot provoke on demand.

use std::sync::Arc;
use std::time::Duration;
use tidefs::data::DataCtx;
use tidefs::layout::Layout;
use tidefs::object::{FaultyStore, LocalStore, ObjectStore};
use tidefs::vfs::{TideVfs, VfsOptions};
use tidefs_cache::BlockCache;
use tidefs_fuse::{Ctx, ToErrno, Vfs};
use tidefs_meta::{Meta, RenameFlags, SetAttr, SqliteMeta, Timestamp, ROOT_INO};

struct Fixture {
    vfs: Arc<TideVfs>,
    store: Arc<FaultyStore>,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

const CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

fn fixture(block_size: u32) -> Fixture {
    fixture_with_cache(block_size, 64 << 20)
}

fn fixture_with_cache(block_size: u32, cache_bytes: u64) -> Fixture {
    fixture_with(block_size, cache_bytes, VfsOptions::default())
}

fn fixture_with(block_size: u32, cache_bytes: u64, opts: VfsOptions) -> Fixture {
    fixture_prefetching(block_size, cache_bytes, opts, 64 << 20)
}

fn fixture_prefetching(
    block_size: u32,
    cache_bytes: u64,
    opts: VfsOptions,
    prefetch_limit: u64,
) -> Fixture {
    fixture_caching(block_size, opts, prefetch_limit, &|_| {
        BlockCache::new(cache_bytes)
    })
}

/// A fixture whose block cache `cache` makes, given the fixture's temporary directory.
fn fixture_caching(
    block_size: u32,
    opts: VfsOptions,
    prefetch_limit: u64,
    cache: &dyn Fn(&std::path::Path) -> BlockCache,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let meta = SqliteMeta::open(&dir.path().join("meta.db"), true).unwrap();
    let mut format = tidefs_meta::conformance::sample_format();
    format.block_size = block_size;
    meta.format(&format, 0, 0).unwrap();
    let meta: Arc<dyn Meta> = Arc::new(meta);
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(&dir.path().join("objects")).unwrap());
    let store = Arc::new(FaultyStore::new(local));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sid = meta
        .new_session(&tidefs_meta::conformance::sample_session())
        .unwrap();
    let data = Arc::new(
        DataCtx::new(
            meta,
            store.clone(),
            cache(dir.path()),
            Layout::new(&format.name, block_size),
            rt.handle().clone(),
        )
        .with_prefetch_limit(prefetch_limit),
    );
    let vfs = TideVfs::new(data, format, sid, opts);
    Fixture {
        vfs,
        store,
        _rt: rt,
        _dir: dir,
    }
}

impl Fixture {
    /// Creates files `names` in the root, each holding `len` bytes of `byte`, and closes them;
    /// their inode numbers.
    fn write_files(&self, names: &[&[u8]], byte: u8, len: usize) -> Vec<u64> {
        names
            .iter()
            .map(|name| {
                let (a, fh) = self.vfs.create(CTX, ROOT_INO, name, 0o644, 0).unwrap();
                self.vfs.write(a.ino, fh, 0, &vec![byte; len]).unwrap();
                self.vfs.release(a.ino, fh).unwrap();
                a.ino
            })
            .collect()
    }

    fn store_objects(&self, prefix: &str) -> Vec<String> {
        self._rt
            .block_on(self.store.list(prefix, None, 10_000))
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    }
}

/// Writes `len` bytes of `byte` at `off` of file `ino` through handle `fh`, and the same into
/// `model`, the file as it should read.
fn write_fill(
    f: &Fixture,
    ino: u64,
    fh: u64,
    model: &mut Vec<u8>,
    off: usize,
    len: usize,
    byte: u8,
) {
    f.vfs.write(ino, fh, off as u64, &vec![byte; len]).unwrap();
    if model.len() < off + len {
        model.resize(off + len, 0);
    }
    model[off..off + len].fill(byte);
}

fn errno<T: std::fmt::Debug>(r: Result<T, tidefs::error::FsError>) -> i32 {
    r.expect_err("should fail").errno()
}

/// A failed upload is reported by close/fsync of every handle that wrote or saw the file,
/// whichever flush hit it, and the data is not committed.
#[test]
fn failed_upload_is_reported_to_every_handle() {
    let f = fixture(64 << 10);
    let (a, fh1) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    let fh2 = f.vfs.open(CTX, a.ino, libc::O_RDWR).unwrap().fh;
    f.vfs.write(a.ino, fh1, 0, &[7u8; 100_000]).unwrap();
    f.store.fail_puts(1000);
    // Another handle's flush commits (and fails) the first handle's data...
    assert_eq!(errno(f.vfs.flush(a.ino, fh2)), libc::EIO);
    f.store.fail_puts(0);
    f.vfs.flush(a.ino, fh2).unwrap();
    // ...and the writer still hears of it, once.
    assert_eq!(errno(f.vfs.flush(a.ino, fh1)), libc::EIO);
    f.vfs.flush(a.ino, fh1).unwrap();
    assert_eq!(f.vfs.getattr(a.ino).unwrap().length, 0);
    // A handle opened after the failure does not inherit it.
    let fh3 = f.vfs.open(CTX, a.ino, libc::O_RDWR).unwrap().fh;
    f.vfs.flush(a.ino, fh3).unwrap();
    for fh in [fh1, fh2, fh3] {
        f.vfs.release(a.ino, fh).unwrap();
    }
}

/// A reader whose read commits pending writes gets the failure, and so does the writer's close.
#[test]
fn read_racing_a_failed_commit_leaves_the_error_for_the_writer() {
    let f = fixture(64 << 10);
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    let reader = f.vfs.open(CTX, a.ino, libc::O_RDONLY).unwrap().fh;
    f.store.fail_puts(1000);
    // A full block starts uploading at once; reading it means committing it first.
    f.vfs.write(a.ino, fh, 0, &[5u8; 70_000]).unwrap();
    assert_eq!(errno(f.vfs.read(a.ino, reader, 0, 100)), libc::EIO);
    f.store.fail_puts(0);
    assert_eq!(errno(f.vfs.fsync(a.ino, fh, false)), libc::EIO);
    f.vfs.fsync(a.ino, fh, false).unwrap();
    f.vfs.release(a.ino, fh).unwrap();
    f.vfs.release(a.ino, reader).unwrap();
}

/// A hole punched into a file is hidden by any later write (ids of zero slices and data slices
/// come from one ordered source).
#[test]
fn writes_after_a_punched_hole_are_visible() {
    let f = fixture(64 << 10);
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &[1u8; 200_000]).unwrap();
    f.vfs.flush(a.ino, fh).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    f.vfs.fallocate(a.ino, fh, 0, 100_000, punch).unwrap();
    f.vfs.write(a.ino, fh, 10, b"after the hole").unwrap();
    f.vfs.flush(a.ino, fh).unwrap();
    let back = f.vfs.read(a.ino, fh, 0, 200_000).unwrap();
    assert_eq!(&back[..10], &[0u8; 10]);
    assert_eq!(&back[10..24], b"after the hole");
    assert!(back[24..100_000].iter().all(|b| *b == 0));
    assert!(back[100_000..].iter().all(|b| *b == 1));
    f.vfs.release(a.ino, fh).unwrap();
}

/// Times set while writes are pending (cp -p sets them before close) are the ones that stay.
#[test]
fn times_set_with_pending_writes_stick() {
    let f = fixture(64 << 10);
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, b"data").unwrap();
    let t = Timestamp {
        sec: 1_234_567_890,
        nsec: 0,
    };
    let set = SetAttr {
        atime: Some(t),
        mtime: Some(t),
        ..Default::default()
    };
    assert_eq!(f.vfs.setattr(CTX, a.ino, set, None).unwrap().mtime, t);
    f.vfs.release(a.ino, fh).unwrap();
    let attr = f.vfs.getattr(a.ino).unwrap();
    assert_eq!((attr.mtime, attr.length), (t, 4));
}

/// Reads of different files proceed in parallel: eight reads that each wait 300 ms on the store
/// finish together, not one after another (which would take 2.4 s).
#[test]
fn reads_of_different_files_do_not_serialize() {
    let f = fixture_with_cache(64 << 10, 0);
    let mut files = Vec::new();
    for i in 0..8u8 {
        let (a, fh) = f
            .vfs
            .create(CTX, ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0)
            .unwrap();
        f.vfs.write(a.ino, fh, 0, &[i; 1000]).unwrap();
        f.vfs.release(a.ino, fh).unwrap();
        files.push(a.ino);
    }
    f.store.delay_gets(Duration::from_millis(300));
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for (i, ino) in files.iter().enumerate() {
            let vfs = &f.vfs;
            s.spawn(move || {
                let fh = vfs.open(CTX, *ino, libc::O_RDONLY).unwrap().fh;
                let data = vfs.read(*ino, fh, 0, 1000).unwrap();
                assert!(data.len() == 1000 && data.iter().all(|b| *b == i as u8));
                vfs.release(*ino, fh).unwrap();
            });
        }
    });
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1800),
        "8 slow reads took {elapsed:?}: serialized?"
    );
}

/// Readahead over many files at once stays within the mount's prefetch limit (here 4 blocks),
/// however large each file's window: the memory held by fetches under way is bounded.
#[test]
fn readahead_over_many_files_stays_within_the_limit() {
    let f = fixture_prefetching(64 << 10, 64 << 20, VfsOptions::default(), 4 * (64 << 10));
    let mut files = Vec::new();
    for i in 0..4u8 {
        let (a, fh) = f
            .vfs
            .create(CTX, ROOT_INO, format!("f{i}").as_bytes(), 0o644, 0)
            .unwrap();
        f.vfs.write(a.ino, fh, 0, &vec![i; 2 << 20]).unwrap();
        f.vfs.release(a.ino, fh).unwrap();
        files.push(a.ino);
    }
    f.store.delay_gets(Duration::from_millis(20));
    std::thread::scope(|s| {
        for (i, ino) in files.iter().enumerate() {
            let vfs = &f.vfs;
            s.spawn(move || {
                let fh = vfs.open(CTX, *ino, libc::O_RDONLY).unwrap().fh;
                for off in (0..2u64 << 20).step_by(128 << 10) {
                    let data = vfs.read(*ino, fh, off, 128 << 10).unwrap();
                    assert!(data.len() == 128 << 10 && data.iter().all(|b| *b == i as u8));
                }
                vfs.release(*ino, fh).unwrap();
            });
        }
    });
    // 4 blocks ahead, and the two blocks each reader's own 128 KiB read may wait for
    // (without the limit: 64).
    let most = f.store.most_gets_at_once();
    assert!(most <= 4 + 4 * 2, "{most} gets at once");
}

/// Reads served from cached metadata follow every change made through any handle: writes,
/// truncation and punched holes.
#[test]
fn cached_reads_follow_changes() {
    let f = fixture(64 << 10);
    let (a, w) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    let r = f.vfs.open(CTX, a.ino, libc::O_RDONLY).unwrap().fh;
    f.vfs.write(a.ino, w, 0, &[1u8; 100_000]).unwrap();
    f.vfs.flush(a.ino, w).unwrap();
    assert_eq!(
        f.vfs.read(a.ino, r, 0, 200_000).unwrap(),
        vec![1u8; 100_000]
    );
    f.vfs.write(a.ino, w, 50_000, &[2u8; 100_000]).unwrap();
    f.vfs.flush(a.ino, w).unwrap();
    let back = f.vfs.read(a.ino, r, 0, 200_000).unwrap();
    assert_eq!(back.len(), 150_000);
    assert!(back[..50_000].iter().all(|b| *b == 1) && back[50_000..].iter().all(|b| *b == 2));
    f.vfs
        .setattr(CTX, a.ino, SetAttr::default(), Some(10))
        .unwrap();
    assert_eq!(f.vfs.read(a.ino, r, 0, 200_000).unwrap(), vec![1u8; 10]);
    f.vfs
        .setattr(CTX, a.ino, SetAttr::default(), Some(20))
        .unwrap();
    assert_eq!(
        f.vfs.read(a.ino, r, 0, 200_000).unwrap(),
        [[1u8; 10], [0u8; 10]].concat()
    );
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    f.vfs.fallocate(a.ino, w, 0, 5, punch).unwrap();
    assert_eq!(
        f.vfs.read(a.ino, r, 0, 7).unwrap(),
        [0, 0, 0, 0, 0, 1, 1][..]
    );
    f.vfs.release(a.ino, w).unwrap();
    f.vfs.release(a.ino, r).unwrap();
}

/// Objects whose deletion keeps failing stay queued without holding up other freed objects,
/// and go once the store accepts the delete.
#[test]
fn a_failing_delete_does_not_block_the_queue() {
    let f = fixture(64 << 10);
    let inos = f.write_files(&[&b"stuck"[..], b"a", b"b"], 3, 100_000);
    let data = f.vfs.data();
    let objects = || f.store_objects(&data.layout.prefix());
    assert_eq!(objects().len(), 6);
    // The first file's slice has the lowest id: make its deletes fail.
    let stuck_id = data.meta.read_chunk(inos[0], 0).unwrap()[0].id;
    f.store
        .fail_deletes_matching(Some(&format!("/{stuck_id}_")));
    for name in [&b"stuck"[..], b"a", b"b"] {
        f.vfs.unlink(CTX, ROOT_INO, name).unwrap();
    }
    assert!(tidefs::vfs::delete_freed(&data).is_err());
    let left = objects();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|k| k.contains(&format!("/{stuck_id}_"))));
    f.store.fail_deletes_matching(None);
    // (The mount's background thread may get there first: check the outcome, not the count.)
    tidefs::vfs::delete_freed(&data).unwrap();
    assert!(objects().is_empty());
}

/// A fixture whose closes commit in the background (a sole mount's default).
fn closing_behind() -> Fixture {
    let opts = VfsOptions {
        close_behind: true,
        ..VfsOptions::default()
    };
    fixture_with(64 << 10, 64 << 20, opts)
}

/// With close-behind a close does not wait for the upload, so it cannot report its failure;
/// the file's next users do, each once, as Linux reports a writeback error no one has seen.
#[test]
fn close_behind_leaves_a_failed_commit_for_the_files_next_users() {
    let f = closing_behind();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.store.fail_puts(1000);
    f.vfs.write(a.ino, fh, 0, &[7u8; 100_000]).unwrap();
    f.vfs.flush(a.ino, fh).unwrap();
    f.vfs.release(a.ino, fh).unwrap();
    // Waits for the closes before it: the commit has failed now, and it says so, once (as
    // syncfs(2) does).
    assert_eq!(errno(f.vfs.fsyncdir(ROOT_INO)), libc::EIO);
    f.vfs.fsyncdir(ROOT_INO).unwrap();
    f.store.fail_puts(0);
    assert_eq!(f.vfs.getattr(a.ino).unwrap().length, 0);
    let fh2 = f.vfs.open(CTX, a.ino, libc::O_RDWR).unwrap().fh;
    let fh3 = f.vfs.open(CTX, a.ino, libc::O_RDONLY).unwrap().fh;
    assert_eq!(errno(f.vfs.flush(a.ino, fh2)), libc::EIO);
    f.vfs.flush(a.ino, fh2).unwrap();
    // Opened before anyone reported it: hears of it too, through fsync.
    assert_eq!(errno(f.vfs.fsync(a.ino, fh3, false)), libc::EIO);
    // Opened after it was reported: does not inherit it.
    let fh4 = f.vfs.open(CTX, a.ino, libc::O_RDWR).unwrap().fh;
    f.vfs.flush(a.ino, fh4).unwrap();
    for fh in [fh2, fh3, fh4] {
        f.vfs.release(a.ino, fh).unwrap();
    }
    // Nothing is left to report: the next user hears nothing.
    f.vfs.fsyncdir(ROOT_INO).unwrap();
    let fh5 = f.vfs.open(CTX, a.ino, libc::O_RDWR).unwrap().fh;
    f.vfs.flush(a.ino, fh5).unwrap();
    f.vfs.release(a.ino, fh5).unwrap();
}

/// While a file's writes commit (here: a close's, behind it), a read elsewhere in the file does
/// not wait for the commit and still sees the file's whole length: a read of a hole between
/// two written ranges reads zeros, not a short file.
#[test]
fn a_read_of_a_hole_while_its_file_commits_sees_the_whole_length() {
    let f = closing_behind();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &[1u8; 10]).unwrap();
    f.vfs.write(a.ino, fh, 200_000, &[2u8; 10]).unwrap();
    f.store.delay_puts(Duration::from_millis(500));
    f.vfs.flush(a.ino, fh).unwrap();
    f.vfs.release(a.ino, fh).unwrap();
    // The release's commit is under way now (its uploads take 500 ms).
    std::thread::sleep(Duration::from_millis(100));
    let reader = f.vfs.open(CTX, a.ino, libc::O_RDONLY).unwrap().fh;
    let hole = f.vfs.read(a.ino, reader, 100_000, 100).unwrap();
    assert_eq!(&hole[..], &[0u8; 100][..]);
    assert_eq!(f.vfs.getattr(a.ino).unwrap().length, 200_010);
    let tail = f.vfs.read(a.ino, reader, 200_000, 100).unwrap();
    assert_eq!(&tail[..], &[2u8; 10][..]);
    f.vfs.release(a.ino, reader).unwrap();
}

/// Files closed while their uploads are still under way read back whole at once, a file
/// removed before its commit ended leaves no object behind, and fsync of a directory returns
/// once every file closed before it is in the store.
#[test]
fn close_behind_files_read_back_at_once_and_removed_ones_leave_nothing() {
    let f = closing_behind();
    f.store.delay_puts(Duration::from_millis(300));
    let names: Vec<&[u8]> = vec![b"a", b"b", b"c", b"d", b"gone"];
    let inos = f.write_files(&names, 9, 100_000);
    for &ino in &inos {
        assert_eq!(f.vfs.getattr(ino).unwrap().length, 100_000);
        let fh = f.vfs.open(CTX, ino, libc::O_RDONLY).unwrap().fh;
        let back = f.vfs.read(ino, fh, 0, 200_000).unwrap();
        assert!(back.len() == 100_000 && back.iter().all(|&b| b == 9));
        f.vfs.release(ino, fh).unwrap();
    }
    f.vfs.unlink(CTX, ROOT_INO, b"gone").unwrap();
    f.vfs.fsyncdir(ROOT_INO).unwrap();
    f.store.delay_puts(Duration::ZERO);
    let data = f.vfs.data();
    let objects = || f.store_objects(&data.layout.prefix());
    // (The mount's background thread may delete first: check the outcome.)
    tidefs::vfs::delete_freed(&data).unwrap();
    // Two blocks (64 KiB and the rest) for each file left.
    assert_eq!(objects().len(), 8, "{:?}", objects());
    for &ino in &inos[..4] {
        assert_eq!(data.meta.read_chunk(ino, 0).unwrap().len(), 1);
    }
}

/// With close-behind, a small file closed with all its writes in memory commits after the
/// close delay, with no fsync; removed, or replaced by a rename, before that, its data is never
/// uploaded (a temporary file). A file whose blocks are already uploading commits at once, and
/// one written again and released through two handles is stored by the next fsync of a
/// directory, in one more object; one removed after all of its handles closed is never
/// uploaded either.
#[test]
fn close_behind_small_files_commit_after_a_delay_and_removed_ones_never_upload() {
    let delay = tidefs::vfs::CLOSE_DELAY;
    let opts = VfsOptions {
        close_behind: true,
        ..VfsOptions::default()
    };
    let f = fixture_with(64 << 10, 64 << 20, opts);
    let data = f.vfs.data();
    let closed = std::time::Instant::now();
    let small: Vec<&[u8]> = vec![b"kept", b"gone", b"old", b"new"];
    let inos = f.write_files(&small, 3, 10_000);
    let large = f.write_files(&[&b"large"[..]], 4, 100_000)[0];
    f.vfs.unlink(CTX, ROOT_INO, b"gone").unwrap();
    let flags = RenameFlags::default();
    f.vfs
        .rename(CTX, ROOT_INO, b"new", ROOT_INO, b"old", flags)
        .unwrap();
    // The large file (two blocks of 64 KiB) did not wait; the small ones all do.
    let deadline = closed + Duration::from_secs(10);
    while data.meta.read_chunk(large, 0).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stored: Vec<bool> = inos
        .iter()
        .map(|&ino| !data.meta.read_chunk(ino, 0).unwrap().is_empty())
        .collect();
    let puts = f.store.puts();
    // (Unless this machine was too slow to get here within the delay.)
    if closed.elapsed() < delay {
        assert_eq!((stored, puts), (vec![false; 4], 2));
    }
    let kept = f.vfs.lookup(CTX, ROOT_INO, b"kept").unwrap();
    assert_eq!(kept.length, 10_000);
    // Past the delay, with nothing asking: the two files left are stored, in one object
    // together as they came due together (one each if this machine closed them further
    // apart than the batch window).
    let deadline = closed + delay + Duration::from_secs(10);
    while [inos[0], inos[3]]
        .iter()
        .any(|&ino| data.meta.read_chunk(ino, 0).unwrap().is_empty())
    {
        assert!(std::time::Instant::now() < deadline, "never committed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(closed.elapsed() >= delay);
    f.vfs.fsyncdir(ROOT_INO).unwrap();
    // (Whether they shared an object depends on when the closer woke: read it back.)
    let shared = data.meta.read_chunk(inos[0], 0).unwrap()[0].id
        == data.meta.read_chunk(inos[3], 0).unwrap()[0].id;
    let puts = if shared { 3 } else { 4 };
    assert_eq!(f.store.puts(), puts);
    for name in [&b"kept"[..], b"old"] {
        let a = f.vfs.lookup(CTX, ROOT_INO, name).unwrap();
        let fh = f.vfs.open(CTX, a.ino, libc::O_RDONLY).unwrap().fh;
        let back = f.vfs.read(a.ino, fh, 0, 20_000).unwrap();
        assert!(back.len() == 10_000 && back.iter().all(|&b| b == 3));
        f.vfs.release(a.ino, fh).unwrap();
    }
    // A file written again and closed twice, then synced through its directory: stored at
    // once, with the second write.
    let fh = f.vfs.open(CTX, kept.ino, libc::O_RDWR).unwrap().fh;
    f.vfs.write(kept.ino, fh, 0, &[9u8; 100]).unwrap();
    let fh2 = f.vfs.open(CTX, kept.ino, libc::O_RDONLY).unwrap().fh;
    f.vfs.release(kept.ino, fh).unwrap();
    f.vfs.release(kept.ino, fh2).unwrap();
    f.vfs.fsyncdir(ROOT_INO).unwrap();
    assert_eq!(f.store.puts(), puts + 1);
    assert_eq!(data.meta.read_chunk(kept.ino, 0).unwrap().len(), 2);
    // A temporary file written through one handle and opened through another, both closed,
    // then removed: every handle of it is closed, so neither release uploads it.
    let (tmp, fh) = f.vfs.create(CTX, ROOT_INO, b"twice", 0o644, 0).unwrap();
    f.vfs.write(tmp.ino, fh, 0, &[5u8; 1000]).unwrap();
    let fh2 = f.vfs.open(CTX, tmp.ino, libc::O_RDONLY).unwrap().fh;
    let closed = std::time::Instant::now();
    f.vfs.release(tmp.ino, fh2).unwrap();
    f.vfs.release(tmp.ino, fh).unwrap();
    f.vfs.unlink(CTX, ROOT_INO, b"twice").unwrap();
    let removed_in_time = closed.elapsed() < delay;
    f.vfs.fsyncdir(ROOT_INO).unwrap();
    // (Unless this machine was too slow to remove it within the delay.)
    if removed_in_time {
        assert_eq!(f.store.puts(), puts + 1);
    }
}

/// Small files closed together are stored packed: as many as fit in 1 MiB share one object,
/// which one PUT stores and one transaction commits for all of them. Each reads back its own
/// bytes, also from the store alone (the first of a pack with a ranged GET), and the object is
/// deleted only with its last file.
#[test]
fn close_behind_packs_small_files_closed_together_into_shared_objects() {
    // Long enough that no release comes due by itself: each directory fsync below takes the
    // waiting ones together, however slow the machine.
    let opts = VfsOptions {
        close_behind: true,
        close_delay: Duration::from_secs(600),
        ..VfsOptions::default()
    };
    let f = fixture_with(4 << 20, 64 << 20, opts);
    let data = f.vfs.data();
    // 120 files of 10,000 bytes: 104 fit in 1 MiB, the other 16 go in a second object.
    let names: Vec<Vec<u8>> = (0..120).map(|i| format!("f{i}").into_bytes()).collect();
    let inos: Vec<u64> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (a, fh) = f.vfs.create(CTX, ROOT_INO, name, 0o644, 0).unwrap();
            f.vfs.write(a.ino, fh, 0, &[i as u8; 10_000]).unwrap();
            f.vfs.release(a.ino, fh).unwrap();
            a.ino
        })
        .collect();
    // The directory's fsync takes every waiting release at once.
    f.vfs.fsyncdir(ROOT_INO).unwrap();
    let slices: Vec<tidefs_meta::Slice> = inos
        .iter()
        .map(|&ino| match &data.meta.read_chunk(ino, 0).unwrap()[..] {
            [s] => *s,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(f.store.puts(), 2);
    let mut objects: Vec<(u64, u32)> = slices.iter().map(|s| (s.id, s.size)).collect();
    objects.dedup();
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert_eq!((objects[0].1, objects[1].1), (1_040_000, 160_000));
    for s in &slices {
        assert_eq!((s.len, s.pos, s.off % 10_000), (10_000, 0, 0), "{s:?}");
    }
    let read_back = |i: usize| {
        let fh = f.vfs.open(CTX, inos[i], libc::O_RDONLY).unwrap().fh;
        let back = f.vfs.read(inos[i], fh, 0, 20_000).unwrap();
        assert!(
            back.len() == 10_000 && back.iter().all(|&b| b == i as u8),
            "file {i}"
        );
        f.vfs.release(inos[i], fh).unwrap();
    };
    (0..inos.len()).for_each(read_back);
    // A pack's first file read fetched just its own bytes; the second, the whole pack,
    // which then served the rest.
    assert_eq!(f.store.got_bytes(), 10_000 + 1_040_000 + 10_000 + 160_000);
    // Every file but the last of the first object removed: that object stays, the second goes.
    let last = slices.iter().rposition(|s| s.id == slices[0].id).unwrap();
    for (i, name) in names.iter().enumerate() {
        if i != last {
            f.vfs.unlink(CTX, ROOT_INO, name).unwrap();
        }
    }
    tidefs::vfs::delete_freed(&data).unwrap();
    let key = |s: &tidefs_meta::Slice| data.layout.block_key(s.id, 0, s.size);
    let exists = |k: &str| f._rt.block_on(f.store.head(k)).is_ok();
    assert!(exists(&key(&slices[last])));
    assert!(!exists(&key(&slices[119])));
    // The survivor reads its own bytes from the store alone (no cache to lean on).
    f._rt.block_on(data.cache.discard(vec![key(&slices[last])]));
    read_back(last);
    f.vfs.unlink(CTX, ROOT_INO, &names[last]).unwrap();
    tidefs::vfs::delete_freed(&data).unwrap();
    assert!(!exists(&key(&slices[last])));
    assert!(data.meta.pending_deletions(0, 10).unwrap().is_empty());
    // A pack that cannot be stored fails each of its files, none half-committed, and each
    // file's next user hears of it once.
    f.store.fail_puts(1000);
    let lost = f.write_files(&[&b"x"[..], b"y"], 1, 100);
    assert_eq!(errno(f.vfs.fsyncdir(ROOT_INO)), libc::EIO);
    f.store.fail_puts(0);
    for ino in lost {
        assert_eq!(f.vfs.getattr(ino).unwrap().length, 0);
        let fh = f.vfs.open(CTX, ino, libc::O_RDWR).unwrap().fh;
        assert_eq!(errno(f.vfs.flush(ino, fh)), libc::EIO);
        f.vfs.flush(ino, fh).unwrap();
        f.vfs.release(ino, fh).unwrap();
    }
    // A file that another mount frees while its pack is stored fails alone: the others are
    // committed, referencing the object already stored.
    let puts = f.store.puts();
    let objects = || f.store_objects(&data.layout.prefix()).len();
    let stored = objects();
    let inos = f.write_files(&[&b"p"[..], b"q", b"r"], 9, 100);
    data.meta.unlink(ROOT_INO, b"q", 0, &|_| false).unwrap();
    assert_eq!(errno(f.vfs.fsyncdir(ROOT_INO)), libc::EIO);
    assert_eq!((f.store.puts(), objects()), (puts + 1, stored + 1));
    assert_eq!(errno(f.vfs.getattr(inos[1])), libc::ENOENT);
    let slices: Vec<_> = [inos[0], inos[2]]
        .iter()
        .map(|&ino| data.meta.read_chunk(ino, 0).unwrap()[0])
        .collect();
    assert_eq!(slices[0].id, slices[1].id);
    assert_eq!(
        (slices[0].off, slices[1].off, slices[1].size),
        (0, 200, 300)
    );
    for ino in [inos[0], inos[2]] {
        let fh = f.vfs.open(CTX, ino, libc::O_RDONLY).unwrap().fh;
        assert_eq!(f.vfs.read(ino, fh, 0, 1000).unwrap(), vec![9u8; 100]);
        f.vfs.release(ino, fh).unwrap();
    }
    // When every file of a pack is gone, no file can reference its object: it is deleted.
    f.write_files(&[&b"s"[..], b"t"], 9, 100);
    for name in [b"s", b"t"] {
        data.meta.unlink(ROOT_INO, name, 0, &|_| false).unwrap();
    }
    assert_eq!(errno(f.vfs.fsyncdir(ROOT_INO)), libc::EIO);
    assert_eq!((f.store.puts(), objects()), (puts + 2, stored + 1));
}

/// Deleting a file's objects also removes its blocks from the disk cache, so that the blocks
/// of deleted files (temporary files, a job's scratch data) do not push live ones out.
#[test]
fn deleted_blocks_leave_the_disk_cache() {
    let f = fixture_caching(64 << 10, VfsOptions::default(), 64 << 20, &|dir| {
        let disk = tidefs_cache::DiskCache::open(&tidefs_cache::DiskCacheConfig {
            dirs: vec![dir.join("cache")],
            capacity: 64 << 20,
            free_ratio: 0.0,
        })
        .unwrap();
        BlockCache::with_disk(1 << 20, disk)
    });
    let data = f.vfs.data();
    let disk = data.cache.disk().unwrap();
    // Short blocks (here: whole small files) are kept in the disk cache as they are written.
    let inos = f.write_files(&[&b"gone"[..], b"kept"], 7, 10_000);
    let key_of = |ino| {
        let s = &data.meta.read_chunk(ino, 0).unwrap()[0];
        data.layout.slice_keys(s.id, s.size)[0].clone()
    };
    let (gone, kept) = (key_of(inos[0]), key_of(inos[1]));
    // The cache files are written in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(disk.contains(&gone) && disk.contains(&kept)) {
        assert!(std::time::Instant::now() < deadline, "blocks never cached");
        std::thread::sleep(Duration::from_millis(10));
    }
    f.vfs.unlink(CTX, ROOT_INO, b"gone").unwrap();
    // (The mount's background thread may get there first: check the outcome.)
    tidefs::vfs::delete_freed(&data).unwrap();
    assert!(!disk.contains(&gone), "a deleted block stays cached");
    assert!(disk.contains(&kept));
    assert_eq!(disk.used(), 10_000);
    let files = walk(&f._dir.path().join("cache"));
    assert_eq!(files.len(), 1, "{files:?}");
}

/// Regular files under `dir`, at any depth.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// The kernel may keep a file's cached pages on a reopen only if the file is unchanged, and
/// never after a commit failed (its pages would hold bytes that are not stored).
#[test]
fn kernel_cache_is_kept_only_for_unchanged_files() {
    let f = fixture(64 << 10);
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, b"v1").unwrap();
    f.vfs.release(a.ino, fh).unwrap();
    let open = || f.vfs.open(CTX, a.ino, libc::O_RDWR).unwrap();
    let first = open();
    assert!(!first.keep_cache);
    f.vfs.release(a.ino, first.fh).unwrap();
    let second = open();
    assert!(second.keep_cache, "unchanged file");
    f.vfs.write(a.ino, second.fh, 0, b"v2").unwrap();
    f.vfs.release(a.ino, second.fh).unwrap();
    let third = open();
    assert!(!third.keep_cache, "changed file");
    f.store.fail_puts(1000);
    f.vfs.write(a.ino, third.fh, 0, b"lost").unwrap();
    assert_eq!(errno(f.vfs.flush(a.ino, third.fh)), libc::EIO);
    f.store.fail_puts(0);
    f.vfs.release(a.ino, third.fh).unwrap();
    let fourth = open();
    assert!(!fourth.keep_cache, "after a failed commit");
    assert_eq!(f.vfs.read(a.ino, fourth.fh, 0, 10).unwrap(), &b"v2"[..]);
    f.vfs.release(a.ino, fourth.fh).unwrap();
}

/// Bytes counted as buffered all come back once writes are committed, whatever the block size
/// and write pattern (a leak would throttle writers forever, an underflow never).
#[test]
fn buffered_bytes_return_to_zero() {
    for block in [64 << 10, 4 << 20] {
        let f = fixture(block);
        let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
        let chunk = vec![5u8; 1 << 20];
        for i in 0..9u64 {
            f.vfs.write(a.ino, fh, i * (1 << 20), &chunk).unwrap();
        }
        f.vfs.write(a.ino, fh, 12345, &chunk[..5000]).unwrap();
        f.vfs.write(a.ino, fh, 100 << 20, b"far").unwrap();
        f.vfs.fsync(a.ino, fh, false).unwrap();
        let data = f.vfs.data();
        assert_eq!(
            data.buffered.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "block {block}"
        );
        assert_eq!(
            f.vfs.read(a.ino, fh, (8 << 20) + 7, 3).unwrap(),
            [5, 5, 5][..]
        );
        f.vfs.release(a.ino, fh).unwrap();
    }
}

/// Past the buffer limit a writer waits for uploads to make room instead of committing: memory
/// stays within the limit (plus one write) and a large sequential write commits nothing until
/// it is flushed.
#[test]
fn a_full_write_buffer_waits_for_uploads() {
    use std::sync::atomic::Ordering;
    let opts = VfsOptions {
        buffer_size: 1 << 20,
        ..VfsOptions::default()
    };
    let f = fixture_with(64 << 10, 64 << 20, opts);
    f.store.delay_puts(Duration::from_millis(5));
    let data = f.vfs.data();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"w", 0o644, 0).unwrap();
    let piece = vec![9u8; 64 << 10];
    let mut peak = 0;
    for i in 0..128u64 {
        f.vfs.write(a.ino, fh, i * (64 << 10), &piece).unwrap();
        peak = peak.max(data.buffered.load(Ordering::SeqCst));
    }
    assert!(peak <= (1 << 20) + (64 << 10), "peak {peak}");
    assert_eq!(
        data.meta.getattr(a.ino).unwrap().length,
        0,
        "nothing committed yet"
    );
    f.vfs.fsync(a.ino, fh, false).unwrap();
    assert_eq!(data.meta.getattr(a.ino).unwrap().length, 8 << 20);
    assert_eq!(data.buffered.load(Ordering::SeqCst), 0);
    f.vfs.release(a.ino, fh).unwrap();
}

/// With retries in front of a store whose puts keep failing for a while, fsync succeeds and
/// every acknowledged byte reads back: transient failures never lose data.
#[test]
fn retried_uploads_lose_nothing() {
    use tidefs::object::{RetryPolicy, Retrying, StoreMetrics};
    let dir = tempfile::tempdir().unwrap();
    let meta = SqliteMeta::open(&dir.path().join("meta.db"), true).unwrap();
    let mut format = tidefs_meta::conformance::sample_format();
    format.block_size = 64 << 10;
    meta.format(&format, 0, 0).unwrap();
    let meta: Arc<dyn Meta> = Arc::new(meta);
    let local: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::open(&dir.path().join("objects")).unwrap());
    let faulty = Arc::new(FaultyStore::new(local));
    let metrics = Arc::new(StoreMetrics::default());
    let policy = RetryPolicy {
        attempts: 8,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(10),
        deadline: Duration::from_secs(60),
    };
    let store: Arc<dyn ObjectStore> =
        Arc::new(Retrying::new(faulty.clone(), policy, metrics.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let data = Arc::new(DataCtx::new(
        meta.clone(),
        store,
        BlockCache::new(0),
        Layout::new(&format.name, format.block_size),
        rt.handle().clone(),
    ));
    let vfs = TideVfs::new(data, format, 1, VfsOptions::default());
    let (a, fh) = vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    let content: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    // Every block upload fails a few times before it lands.
    faulty.fail_puts(40);
    vfs.write(a.ino, fh, 0, &content).unwrap();
    vfs.fsync(a.ino, fh, false).unwrap();
    assert!(metrics.retries.load(std::sync::atomic::Ordering::SeqCst) >= 40);
    faulty.fail_gets(5);
    assert_eq!(vfs.read(a.ino, fh, 0, 2_000_000).unwrap(), content);
    vfs.release(a.ino, fh).unwrap();
}

/// A stored block that is shorter than its key says (truncated on disk, half-written by a
/// foreign tool) is reported as an I/O error, never served as data.
#[test]
fn a_truncated_block_is_never_served() {
    let f = fixture_with_cache(64 << 10, 0);
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &[9u8; 100_000]).unwrap();
    f.vfs.flush(a.ino, fh).unwrap();
    let objects = f.store_objects("");
    let first = objects
        .iter()
        .find(|k| k.contains("_0_65536"))
        .expect("first block");
    let path = f._dir.path().join("objects").join(first);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(1000).unwrap();
    assert_eq!(errno(f.vfs.read(a.ino, fh, 0, 10)), libc::EIO);
    // The other block is intact and still readable.
    assert_eq!(f.vfs.read(a.ino, fh, 70_000, 10).unwrap(), vec![9u8; 10]);
    f.vfs.release(a.ino, fh).unwrap();
}

/// Data just written is read back from the write buffer: no commit, no upload. Only a read of
/// bytes already handed to an upload commits first.
#[test]
fn reads_of_pending_writes_are_served_from_the_buffer() {
    let f = fixture(64 << 10);
    let meta = f.vfs.data().meta.clone();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &[1u8; 10_000]).unwrap();
    assert_eq!(f.vfs.read(a.ino, fh, 0, 20_000).unwrap(), vec![1u8; 10_000]);
    assert_eq!(f.vfs.getattr(a.ino).unwrap().length, 10_000);
    assert!(
        meta.read_chunk(a.ino, 0).unwrap().is_empty(),
        "nothing committed"
    );
    assert!(f.store_objects("").is_empty(), "nothing uploaded");

    // Pending writes over committed data, and past the committed end.
    f.vfs.flush(a.ino, fh).unwrap();
    f.vfs.write(a.ino, fh, 5_000, &[2u8; 1_000]).unwrap();
    f.vfs.write(a.ino, fh, 5_500, &[3u8; 100]).unwrap();
    f.vfs.write(a.ino, fh, 200_000, &[4u8; 10]).unwrap();
    let mut want = vec![1u8; 3_000];
    want.extend([2u8; 500]);
    want.extend([3u8; 100]);
    want.extend([2u8; 400]);
    want.extend([1u8; 1_000]);
    assert_eq!(f.vfs.read(a.ino, fh, 2_000, 5_000).unwrap(), want);
    let mut tail = vec![0u8; 10];
    tail.extend([4u8; 10]);
    assert_eq!(f.vfs.read(a.ino, fh, 199_990, 100).unwrap(), tail);
    assert_eq!(
        meta.getattr(a.ino).unwrap().length,
        10_000,
        "still uncommitted"
    );

    // Bytes already uploading are read after a commit.
    f.vfs.write(a.ino, fh, 300_000, &[6u8; 70_000]).unwrap();
    assert_eq!(f.vfs.read(a.ino, fh, 300_000, 10).unwrap(), vec![6u8; 10]);
    assert_eq!(
        meta.getattr(a.ino).unwrap().length,
        370_000,
        "committed by the read"
    );
    f.vfs.release(a.ino, fh).unwrap();
}

/// Random writes, reads and flushes through the VFS match a reference buffer byte for byte,
/// whether the bytes read are committed, pending in memory or uploading.
#[test]
fn reads_mixing_pending_and_committed_data_match_a_model() {
    use rand::{Rng, SeedableRng};
    let f = fixture(64 << 10);
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"model", 0o644, 0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model: Vec<u8> = Vec::new();
    for step in 0..400 {
        match rng.gen_range(0..10) {
            0..=4 => {
                let off = rng.gen_range(0..600_000usize);
                let len = rng.gen_range(1..150_000usize);
                write_fill(&f, a.ino, fh, &mut model, off, len, rng.gen::<u8>() | 1);
            }
            5..=8 => {
                let off = rng.gen_range(0..800_000usize);
                let len = rng.gen_range(1..200_000usize);
                let got = f.vfs.read(a.ino, fh, off as u64, len as u32).unwrap();
                let want = &model[off.min(model.len())..(off + len).min(model.len())];
                assert!(got == want, "step {step}: read {off}+{len} differs");
            }
            _ => f.vfs.flush(a.ino, fh).unwrap(),
        }
    }
    f.vfs.release(a.ino, fh).unwrap();
}

/// Writes left open are committed in the background after the commit interval: their data
/// reaches the volume without a close or fsync, and writing goes on.
#[test]
fn old_writes_are_committed_in_the_background() {
    let opts = VfsOptions {
        commit_interval: Duration::from_millis(300),
        delete_interval: Duration::from_millis(100),
        ..VfsOptions::default()
    };
    let f = fixture_with(64 << 10, 64 << 20, opts);
    let meta = f.vfs.data().meta.clone();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"log", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &[1u8; 1000]).unwrap();
    assert_eq!(meta.getattr(a.ino).unwrap().length, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while meta.getattr(a.ino).unwrap().length != 1000 {
        assert!(std::time::Instant::now() < deadline, "never committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    f.vfs.write(a.ino, fh, 1000, &[2u8; 1000]).unwrap();
    let mut want = vec![1u8; 1000];
    want.extend([2u8; 1000]);
    assert_eq!(f.vfs.read(a.ino, fh, 0, 4000).unwrap(), want);
    while meta.getattr(a.ino).unwrap().length != 2000 {
        assert!(
            std::time::Instant::now() < deadline,
            "second write never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    f.vfs.release(a.ino, fh).unwrap();
    assert_eq!(f.vfs.read(a.ino, fh, 0, 4000).unwrap(), want);
}

/// A read waits for a commit in flight only if it needs bytes of that commit.
#[test]
fn reads_wait_only_for_commits_they_overlap() {
    let f = fixture(64 << 10);
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"f", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &[1u8; 10_000]).unwrap();
    f.vfs.flush(a.ino, fh).unwrap();
    f.store.delay_puts(Duration::from_millis(1500));
    f.vfs.write(a.ino, fh, 5_000, &[2u8; 100]).unwrap();
    let vfs = f.vfs.clone();
    let committing = std::thread::spawn(move || vfs.flush(a.ino, fh));
    std::thread::sleep(Duration::from_millis(200));
    // Elsewhere in the file: served at once, with the committed bytes.
    let t = std::time::Instant::now();
    assert_eq!(f.vfs.read(a.ino, fh, 0, 1_000).unwrap(), vec![1u8; 1_000]);
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    // Over the bytes being committed: waits for the commit and sees them.
    let got = f.vfs.read(a.ino, fh, 4_990, 20).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    let mut want = vec![1u8; 10];
    want.extend([2u8; 10]);
    assert_eq!(got, want);
    committing.join().unwrap().unwrap();
    f.store.delay_puts(Duration::ZERO);
    f.vfs.release(a.ino, fh).unwrap();
}

/// The trash is purged of what has stayed past the trash days, by hour, and not before; a
/// purged file that is open stays readable until its last close; then its objects go.
#[test]
fn trash_is_purged_after_its_days() {
    let f = fixture(64 << 10);
    let data = f.vfs.data();
    let mut format = data.meta.load_format().unwrap();
    format.trash_days = 2;
    data.meta.format(&format, 0, 0).unwrap();
    let objects = || f.store_objects(&data.layout.prefix());
    let inos = f.write_files(&[&b"a"[..], b"b"], 7, 100_000);
    let held = f.vfs.open(CTX, inos[1], libc::O_RDONLY).unwrap().fh;
    for name in [&b"a"[..], b"b"] {
        f.vfs.unlink(CTX, ROOT_INO, name).unwrap();
    }
    tidefs::vfs::delete_freed(&data).unwrap();
    assert_eq!(objects().len(), 4, "the trash keeps the data");
    let now = Timestamp::now().sec;
    assert_eq!(f.vfs.purge_trash(now).unwrap(), 0);
    assert_eq!(f.vfs.purge_trash(now + 2 * 86_400 - 3600).unwrap(), 0);
    assert_eq!(f.vfs.purge_trash(now + 2 * 86_400 + 3600).unwrap(), 2);
    assert!(data
        .meta
        .readdir(tidefs_meta::TRASH_INO, 0, 10)
        .unwrap()
        .is_empty());
    tidefs::vfs::delete_freed(&data).unwrap();
    assert_eq!(objects().len(), 2, "the open file keeps its data");
    assert_eq!(errno(f.vfs.getattr(inos[0])), libc::ENOENT);
    assert_eq!(f.vfs.read(inos[1], held, 0, 10).unwrap(), vec![7u8; 10]);
    f.vfs.release(inos[1], held).unwrap();
    assert_eq!(errno(f.vfs.getattr(inos[1])), libc::ENOENT);
    tidefs::vfs::delete_freed(&data).unwrap();
    assert!(objects().is_empty());
    // Turning the trash off purges what it holds.
    let (c, fh) = f.vfs.create(CTX, ROOT_INO, b"c", 0o644, 0).unwrap();
    f.vfs.release(c.ino, fh).unwrap();
    f.vfs.unlink(CTX, ROOT_INO, b"c").unwrap();
    format.trash_days = 0;
    data.meta.format(&format, 0, 0).unwrap();
    assert_eq!(f.vfs.purge_trash(now).unwrap(), 1);
}

/// Compaction turns a chunk of many slices (overwrites, holes, a punched hole) into one that
/// reads the same, and the objects of the replaced slices are deleted.
#[test]
fn compaction_keeps_the_bytes_and_frees_the_replaced_slices() {
    use rand::{Rng, SeedableRng};
    let f = fixture(64 << 10);
    let data = f.vfs.data();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"c", 0o644, 0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut model = vec![0u8; 0];
    for _ in 0..12 {
        let off = rng.gen_range(0..400_000usize);
        let len = rng.gen_range(1..100_000usize);
        write_fill(&f, a.ino, fh, &mut model, off, len, rng.gen::<u8>() | 1);
        f.vfs.fsync(a.ino, fh, false).unwrap();
    }
    f.vfs
        .fallocate(
            a.ino,
            fh,
            1000,
            5000,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
    model[1000..6000].fill(0);
    let before = data.meta.read_chunk(a.ino, 0).unwrap().len();
    // (Writes hidden entirely by later ones were dropped at commit.)
    assert!(before >= 5, "{before} slices");
    let read_all = || f.vfs.read(a.ino, fh, 0, 1 << 20).unwrap();
    assert!(read_all() == model);
    let done = tidefs::compact::compact_chunk(&data, a.ino, 0, 2).unwrap();
    assert!(
        matches!(done, tidefs::compact::Compacted::Done { slices, .. } if slices == before),
        "{done:?}"
    );
    let after = data.meta.read_chunk(a.ino, 0).unwrap();
    assert_eq!(after.len(), 1);
    assert!(read_all() == model);
    tidefs::vfs::delete_freed(&data).unwrap();
    let blocks = (after[0].size as usize).div_ceil(64 << 10);
    assert_eq!(f.store_objects(&data.layout.prefix()).len(), blocks);
    // A write after compaction applies on top.
    f.vfs.write(a.ino, fh, 10, b"after").unwrap();
    f.vfs.fsync(a.ino, fh, false).unwrap();
    model[10..15].copy_from_slice(b"after");
    assert!(read_all() == model);
    f.vfs.release(a.ino, fh).unwrap();
}

/// Readers see exactly the file's bytes while writers rewrite ranges (with the same bytes),
/// compactions swap slices and the deleter removes the replaced objects, all at once.
#[test]
fn reads_racing_compaction_stay_correct() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, Ordering};
    // A cache of two blocks: reads go to the store, where replaced blocks disappear.
    let f = fixture_with_cache(64 << 10, 128 << 10);
    let data = f.vfs.data();
    let model: Vec<u8> = (0..900_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"r", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &model).unwrap();
    f.vfs.fsync(a.ino, fh, false).unwrap();
    let stop = AtomicBool::new(false);
    let compactions = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for seed in 0..2u64 {
            let (vfs, model, stop) = (&f.vfs, &model, &stop);
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let rfh = vfs.open(CTX, a.ino, libc::O_RDONLY).unwrap().fh;
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.gen_range(0..model.len());
                    let len = rng.gen_range(1..300_000usize);
                    let got = vfs.read(a.ino, rfh, off as u64, len as u32).unwrap();
                    let want = &model[off..(off + len).min(model.len())];
                    assert!(got == want, "read {off}+{len} differs");
                }
                vfs.release(a.ino, rfh).unwrap();
            });
        }
        let (vfs, model, stop, data, compactions) = (&f.vfs, &model, &stop, &data, &compactions);
        s.spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            for round in 0..40 {
                for _ in 0..3 {
                    let off = rng.gen_range(0..model.len());
                    let end = (off + rng.gen_range(1..80_000usize)).min(model.len());
                    vfs.write(a.ino, fh, off as u64, &model[off..end]).unwrap();
                    vfs.flush(a.ino, fh).unwrap();
                }
                if round % 2 == 0 {
                    let done = tidefs::compact::compact_chunk(data, a.ino, 0, 2).unwrap();
                    if matches!(done, tidefs::compact::Compacted::Done { .. }) {
                        compactions.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = tidefs::vfs::delete_freed(data);
            }
            stop.store(true, Ordering::Relaxed);
        });
    });
    assert!(compactions.load(Ordering::Relaxed) > 5);
    tidefs::compact::compact_chunk(&data, a.ino, 0, 2).unwrap();
    tidefs::vfs::delete_freed(&data).unwrap();
    assert!(f.vfs.read(a.ino, fh, 0, 1 << 20).unwrap() == model);
    f.vfs.release(a.ino, fh).unwrap();
}

/// Runs a control request as `ctx` and returns its last reply.
fn control(f: &Fixture, ctx: Ctx, request: tidefs::control::Request) -> tidefs::control::Reply {
    let session = tidefs::control::ControlSession::new(ctx, vec![ctx.gid]);
    let mut line = serde_json::to_vec(&request).unwrap();
    line.push(b'\n');
    let request = session.feed(&line).unwrap().expect("a whole request");
    session.run(&f.vfs, request);
    let out = session.read(1 << 20);
    let last = out.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap();
    serde_json::from_slice(last).unwrap()
}

/// rmr obeys the rules rm -rf meets: a user who may not write a directory of the tree, or
/// who does not own an entry of a sticky directory, is refused there and the rest stays.
#[test]
fn rmr_checks_permissions_like_rm() {
    use tidefs::control::{Reply, Request};
    let f = fixture(64 << 10);
    let user = Ctx {
        uid: 1000,
        gid: 1000,
        pid: 0,
    };
    let mkdir = |ctx: Ctx, parent, name: &[u8], mode| f.vfs.mkdir(ctx, parent, name, mode).unwrap();
    let touch = |ctx: Ctx, parent, name: &[u8]| {
        let (a, fh) = f.vfs.create(ctx, parent, name, 0o644, 0).unwrap();
        f.vfs.release(a.ino, fh).unwrap();
    };
    let shared = mkdir(CTX, ROOT_INO, b"shared", 0o1777);
    let mine = mkdir(user, shared.ino, b"mine", 0o755);
    touch(user, mine.ino, b"a");
    let locked = mkdir(CTX, mine.ino, b"locked", 0o755);
    touch(CTX, locked.ino, b"b");
    touch(CTX, shared.ino, b"roots");
    let rmr = |ctx, parent, name: &[u8]| {
        control(
            &f,
            ctx,
            Request::Rmr {
                parent,
                name: name.to_vec(),
            },
        )
    };
    // Root's file in a sticky directory: not the user's to remove.
    match rmr(user, shared.ino, b"roots") {
        Reply::Error { errno, .. } => assert_eq!(errno, libc::EPERM),
        other => panic!("{other:?}"),
    }
    // A root-owned directory inside the user's tree cannot be emptied by the user.
    match rmr(user, shared.ino, b"mine") {
        Reply::Error { errno, tally, .. } => {
            assert_eq!(errno, libc::EACCES);
            // As rm -rf: what it could remove before, it removed.
            assert_eq!(tally.entries, 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(f.vfs.lookup(CTX, locked.ino, b"b").is_ok());
    assert_eq!(errno(f.vfs.lookup(CTX, mine.ino, b"a")), libc::ENOENT);
    // Root may.
    match rmr(CTX, shared.ino, b"mine") {
        Reply::Done(t) => assert_eq!(t.entries, 3),
        other => panic!("{other:?}"),
    }
    assert_eq!(errno(f.vfs.lookup(CTX, shared.ino, b"mine")), libc::ENOENT);
    // A bad request gets an error line, not a hang.
    let session = tidefs::control::ControlSession::new(CTX, vec![0]);
    assert!(session.feed(b"{\"cmd\":\"nope\"}\n").unwrap().is_none());
    let out = String::from_utf8(session.read(4096)).unwrap();
    assert!(out.contains("bad control request"), "{out}");
}

/// A random read of a block not read before fetches just its bytes (a ranged GET, not
/// cached); a second random read of that block fetches it whole and caches it.
#[test]
fn random_reads_fetch_ranges_until_a_block_is_hot() {
    let f = fixture_with_cache(1 << 20, 64 << 20);
    let body: Vec<u8> = (0..64u32 << 20).map(|i| (i % 253) as u8).collect();
    let (a, fh) = f.vfs.create(CTX, ROOT_INO, b"big", 0o644, 0).unwrap();
    f.vfs.write(a.ino, fh, 0, &body).unwrap();
    f.vfs.release(a.ino, fh).unwrap();
    let fh = f.vfs.open(CTX, a.ino, libc::O_RDONLY).unwrap().fh;
    let before = f.store.got_bytes();
    // Each read is more than the sequential slack away from the one before.
    let mib = 1usize << 20;
    for at in [
        20 * mib,
        40 * mib,
        10 * mib,
        60 * mib,
        30 * mib,
        50 * mib + 5,
    ] {
        let got = f.vfs.read(a.ino, fh, at as u64, 4096).unwrap();
        assert!(got == body[at..at + 4096], "read at {at}");
    }
    assert_eq!(f.store.got_bytes() - before, 6 * 4096);
    // The block at 40 MiB again: now fetched whole, then served from the cache.
    let at = 40 * mib + 8192;
    assert!(f.vfs.read(a.ino, fh, at as u64, 4096).unwrap() == body[at..at + 4096]);
    assert_eq!(f.store.got_bytes() - before, 6 * 4096 + mib as u64);
    let at = 40 * mib + 100_000;
    let far = 5 * mib;
    assert!(f.vfs.read(a.ino, fh, far as u64, 100).unwrap() == body[far..far + 100]);
    assert!(f.vfs.read(a.ino, fh, at as u64, 4096).unwrap() == body[at..at + 4096]);
    assert_eq!(f.store.got_bytes() - before, 6 * 4096 + mib as u64 + 100);
    f.vfs.release(a.ino, fh).unwrap();
}
