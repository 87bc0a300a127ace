//! File data on a real mount, checked against a reference file on the local disk that gets
//! exactly the same operations.

use crate::harness::*;
use rand::{Rng, RngCore, SeedableRng};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

fn read_all(path: &std::path::Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Random writes, appends, truncates and reads through one descriptor, compared with the model
/// after every step, and again after close, after a remount.
#[test]
fn random_operations_match_a_reference_file() {
    let vol = Volume::new(64); // small blocks: many block boundaries
    let mnt = vol.mount();
    let reference_dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7de);
    let path = mnt.p("model");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let ref_path = reference_dir.path().join("model");
    let mut r = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&ref_path)
        .unwrap();
    let mut buf = vec![0u8; 600 << 10];
    for step in 0..400 {
        let len = r.metadata().unwrap().len();
        match rng.gen_range(0..10) {
            0..=3 => {
                let off = rng.gen_range(0..=len + (300 << 10));
                let n = rng.gen_range(1..buf.len());
                rng.fill_bytes(&mut buf[..n]);
                f.write_all_at(&buf[..n], off).unwrap();
                r.write_all_at(&buf[..n], off).unwrap();
            }
            4 => {
                let n = rng.gen_range(1..200_000);
                rng.fill_bytes(&mut buf[..n]);
                f.seek(SeekFrom::End(0)).unwrap();
                f.write_all(&buf[..n]).unwrap();
                r.seek(SeekFrom::End(0)).unwrap();
                r.write_all(&buf[..n]).unwrap();
            }
            5 => {
                let size = rng.gen_range(0..=len + (400 << 10));
                f.set_len(size).unwrap();
                r.set_len(size).unwrap();
            }
            6 => {
                // A small rewrite right after a small write: the read-after-write pattern.
                let off = rng.gen_range(0..=len);
                rng.fill_bytes(&mut buf[..8192]);
                f.write_all_at(&buf[..8192], off).unwrap();
                r.write_all_at(&buf[..8192], off).unwrap();
                let mut a = vec![0u8; 8192];
                let mut b = vec![0u8; 8192];
                f.read_exact_at(&mut a, off).unwrap();
                r.read_exact_at(&mut b, off).unwrap();
                assert_same(&a, &b, &format!("step {step} reread"));
            }
            _ => {
                let off = rng.gen_range(0..=len + 10);
                let n = rng.gen_range(1..300_000);
                let mut a = vec![0u8; n];
                let mut b = vec![0u8; n];
                let ga = f.read_at(&mut a, off).unwrap();
                let gb = r.read_at(&mut b, off).unwrap();
                assert_eq!(ga, gb, "step {step}: short read at {off}");
                assert_same(&a[..ga], &b[..gb], &format!("step {step} read at {off}"));
            }
        }
        assert_eq!(
            f.metadata().unwrap().len(),
            r.metadata().unwrap().len(),
            "step {step}: size"
        );
    }
    drop(f);
    let want = read_all(&ref_path);
    assert_same(&read_all(&path), &want, "after close");
    mnt.unmount();
    let mnt = vol.mount();
    assert_same(&read_all(&mnt.p("model")), &want, "after remount");
    mnt.unmount();
}

/// A file spanning several 64 MiB chunks, written sequentially and at offsets straddling chunk
/// boundaries, with holes in between.
#[test]
fn multi_chunk_and_sparse_files() {
    const MIB: u64 = 1 << 20;
    let vol = Volume::new(1024);
    let mnt = vol.mount();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    // Sequential: 150 MiB in 1 MiB writes (three chunks).
    let mut seq = vec![0u8; (150 * MIB) as usize];
    rng.fill_bytes(&mut seq);
    {
        let mut f = File::create(mnt.p("seq")).unwrap();
        for part in seq.chunks(MIB as usize) {
            f.write_all(part).unwrap();
        }
        f.sync_all().unwrap();
    }
    // Sparse: pieces straddling the 64 MiB and 128 MiB boundaries, and one at 300 MiB.
    let mut model = vec![0u8; (300 * MIB + 4096) as usize];
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.p("sparse"))
        .unwrap();
    for off in [64 * MIB - 1000, 128 * MIB - 3, 300 * MIB, 5] {
        let mut piece = vec![0u8; 4096];
        rng.fill_bytes(&mut piece);
        f.write_all_at(&piece, off).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&piece);
    }
    drop(f);
    assert_same(&read_all(&mnt.p("seq")), &seq, "sequential");
    let sparse = read_all(&mnt.p("sparse"));
    assert_same(&sparse, &model, "sparse");
    // Reads crossing a chunk boundary at odd offsets.
    let f = File::open(mnt.p("seq")).unwrap();
    for off in [64 * MIB - 7, 128 * MIB - 100_000, 3] {
        let mut a = vec![0u8; 300_000];
        f.read_exact_at(&mut a, off).unwrap();
        assert_same(
            &a,
            &seq[off as usize..off as usize + 300_000],
            "cross-chunk read",
        );
    }
    drop(f);
    mnt.unmount();
}

/// An unlinked file stays readable and writable through open descriptors, and its objects are
/// deleted after the last close.
#[test]
fn unlinked_open_file_lives_until_last_close() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let mut data = vec![0u8; 300 << 10];
    rand::thread_rng().fill_bytes(&mut data);
    std::fs::write(mnt.p("keep"), b"unrelated").unwrap();
    mnt.settle();
    let objects_before = vol.objects().len();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.p("tmp"))
        .unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let g = File::open(mnt.p("tmp")).unwrap();
    assert!(vol.objects().len() > objects_before);
    std::fs::remove_file(mnt.p("tmp")).unwrap();
    assert!(!mnt.p("tmp").exists());
    f.write_all(b"more after unlink").unwrap();
    data.extend_from_slice(b"more after unlink");
    f.sync_all().unwrap();
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut back).unwrap();
    assert_same(&back, &data, "unlinked file");
    assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
    drop(f);
    // Still open through g.
    let mut back = Vec::new();
    (&g).read_to_end(&mut back).unwrap();
    assert_same(&back, &data, "second descriptor");
    drop(g);
    // The data objects go away shortly after the last close.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while vol.objects().len() > objects_before {
        assert!(
            std::time::Instant::now() < deadline,
            "objects not deleted: {:?}",
            vol.objects()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(std::fs::read(mnt.p("keep")).unwrap(), b"unrelated");
    mnt.unmount();
}

/// Overwritten and truncated data frees objects, and removing every file empties the bucket.
#[test]
fn removing_files_frees_their_objects() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    for i in 0..20 {
        std::fs::write(mnt.p(&format!("f{i}")), vec![i as u8; 200_000]).unwrap();
    }
    mnt.settle();
    assert!(vol.objects().len() >= 20 * 4);
    let f = OpenOptions::new().write(true).open(mnt.p("f0")).unwrap();
    f.set_len(10).unwrap();
    drop(f);
    for i in 0..20 {
        std::fs::remove_file(mnt.p(&format!("f{i}"))).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !vol.objects().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "leaked: {:?}",
            vol.objects()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    mnt.unmount();
}

/// On a SQLite volume a close returns before its file commits (close-behind): the files read
/// back whole at once, and an fsync of a directory returns once they are all in the store.
/// With `--commit-on-close` (as on a shared volume) they are there when close returns.
#[test]
fn closed_files_read_back_at_once_and_fsyncdir_or_commit_on_close_stores_them() {
    let vol = Volume::new(64);
    for extra in [&[][..], &["--commit-on-close"][..]] {
        let mnt = vol.mount_with(extra);
        let dir = mnt.p(if extra.is_empty() {
            "behind"
        } else {
            "on_close"
        });
        std::fs::create_dir(&dir).unwrap();
        let before = vol.objects().len();
        let body = |i: usize| vec![i as u8; 100_000 + i];
        for i in 0..30 {
            std::fs::write(dir.join(format!("f{i}")), body(i)).unwrap();
        }
        if extra.is_empty() {
            for i in 0..30 {
                assert_same(
                    &read_all(&dir.join(format!("f{i}"))),
                    &body(i),
                    "just closed",
                );
            }
            File::open(&dir).unwrap().sync_all().unwrap();
        }
        // Two blocks a file: 64 KiB and the rest.
        assert_eq!(vol.objects().len() - before, 60, "{extra:?}");
        mnt.unmount();
    }
}

/// A volume formatted with `--shards` spreads one file's blocks over the prefixes, reads them
/// back after a remount, and frees them all.
#[test]
fn sharded_volume_spreads_reads_and_frees_blocks() {
    let vol = Volume::formatted_with(64, &["--shards", "4"]);
    let mut data = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    {
        let mnt = vol.mount();
        std::fs::write(mnt.p("f"), &data).unwrap();
        mnt.unmount();
    }
    let objects = vol.objects();
    assert_eq!(objects.len(), 16, "{objects:?}");
    let shards: std::collections::BTreeSet<&str> = objects
        .iter()
        .map(|k| {
            let shard = k.strip_prefix("itest/chunks/").expect(k).split('/').next();
            shard.filter(|s| s.starts_with('s')).expect(k)
        })
        .collect();
    assert_eq!(shards.len(), 4, "{shards:?}");
    let mnt = vol.mount();
    assert_same(&read_all(&mnt.p("f")), &data, "sharded file");
    std::fs::remove_file(mnt.p("f")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !vol.objects().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "objects not deleted: {:?}",
            vol.objects()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    mnt.unmount();
}

/// Data written and closed is there after an unmount and a new mount; fsync'd data too.
#[test]
fn data_survives_remount() {
    let vol = Volume::new(4096);
    let mnt = vol.mount();
    let mut big = vec![0u8; 9 << 20];
    rand::thread_rng().fill_bytes(&mut big);
    std::fs::write(mnt.p("big"), &big).unwrap();
    std::fs::create_dir_all(mnt.p("a/b/c")).unwrap();
    std::fs::write(mnt.p("a/b/c/small"), b"small file").unwrap();
    let f = File::create(mnt.p("synced")).unwrap();
    f.write_all_at(b"fsync means it", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    mnt.unmount();
    let mnt = vol.mount();
    assert_same(&read_all(&mnt.p("big")), &big, "big");
    assert_eq!(std::fs::read(mnt.p("a/b/c/small")).unwrap(), b"small file");
    assert_eq!(std::fs::read(mnt.p("synced")).unwrap(), b"fsync means it");
    mnt.unmount();
}

/// Several readers and writers on different files at once all see their own data.
#[test]
fn concurrent_files() {
    let vol = Volume::new(256);
    let mnt = vol.mount();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let path = mnt.p(&format!("c{t}"));
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut data = vec![0u8; 3 << 20];
                rng.fill_bytes(&mut data);
                for _ in 0..3 {
                    std::fs::write(&path, &data).unwrap();
                    assert_same(&read_all(&path), &data, "concurrent");
                    data.rotate_left(12345);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    mnt.unmount();
}

/// An O_DIRECT read or write larger than one FUSE request reaches the mount as several
/// requests at once (asynchronous direct I/O), as an application's queued asynchronous reads
/// do: one request at a time would hold random-read IOPS to a single round trip's rate.
#[test]
fn direct_io_reaches_the_mount_in_parallel() {
    const LEN: usize = 16 << 20;
    let vol = Volume::new(1024);
    let mnt = vol.mount_with(&["--metrics", "127.0.0.1:0"]);
    let mut buf = DirectBuf::new(LEN);
    let got = &mut buf[..];
    let mut want = vec![0u8; LEN];
    rand::rngs::StdRng::seed_from_u64(0xd10).fill_bytes(&mut want);
    // Direct writes go out in pieces at once too, and must land as one write would.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(mnt.p("f"))
        .unwrap();
    got.copy_from_slice(&want);
    assert_eq!(f.write_at(got, 0).unwrap(), LEN);
    want[LEN / 2..].reverse();
    got.copy_from_slice(&want);
    assert_eq!(
        f.write_at(&got[LEN / 2..], LEN as u64 / 2).unwrap(),
        LEN / 2
    );
    f.sync_all().unwrap();
    for _ in 0..4 {
        got.fill(0);
        assert_eq!(f.read_at(got, 0).unwrap(), LEN);
        assert_same(got, &want, "direct read");
    }

    let status = status(&vol.url);
    let reads = &status["sessions"][0]["stats"]["reads"];
    let most = reads["most_at_once"].as_u64().unwrap();
    assert!(most >= 2, "direct reads came one at a time: {reads}");
    assert_eq!(reads["in_flight"].as_u64(), Some(0), "{reads}");
}
