//! The local-disk block cache on real mounts: blocks read once are served from disk after a
//! remount even with the object store gone, and damaged cache files are never served.

use crate::harness::*;
use rand::RngCore;

fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    // The cache keeps each volume in its own subdirectory.
    let mut out = Vec::new();
    for vol in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.extend(volume_files(&vol.path()));
    }
    out
}

fn volume_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(sub.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            // Files being written are not in the cache yet.
            if !f.file_name().to_string_lossy().starts_with('.') {
                out.push(f.path());
            }
        }
    }
    out
}

fn wait_for_files(dir: &std::path::Path, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while cache_files(dir).len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} cache files, expected {n}",
            cache_files(dir).len()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Writes `data` as file `f` on one mount, then reads it once on another, which fills the disk
/// cache `cache` with the file's `blocks` blocks.
fn write_then_cache(
    vol: &Volume,
    opts: &[&str],
    data: &[u8],
    cache: &std::path::Path,
    blocks: usize,
) {
    let mnt = vol.mount_with(opts);
    std::fs::write(mnt.p("f"), data).unwrap();
    mnt.unmount();
    let mnt = vol.mount_with(opts);
    assert_same(&std::fs::read(mnt.p("f")).unwrap(), data, "first read");
    wait_for_files(cache, blocks);
    mnt.unmount();
}

#[test]
fn disk_cache_survives_remounts_and_drops_damaged_files() {
    let vol = Volume::local(64);
    let cache = vol.dir.path().join("cache");
    let opts = ["--cache-dir", cache.to_str().unwrap(), "--cache-size", "64"];
    let mut data = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut data);
    write_then_cache(&vol, &opts, &data, &cache, 16);
    // With the objects gone, the next mount still reads the file: from the disk cache.
    let hidden = vol.dir.path().join("objects-away");
    std::fs::rename(&vol.bucket, &hidden).unwrap();
    std::fs::create_dir(&vol.bucket).unwrap();
    {
        let mnt = vol.mount_with(&opts);
        assert_eq!(std::fs::read(mnt.p("f")).unwrap(), data);
        mnt.unmount();
    }
    // Damage every cache file: with the objects still gone the read fails rather than
    // return wrong bytes; with them back it succeeds and the cache is written again.
    for f in cache_files(&cache) {
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&f, bytes).unwrap();
    }
    {
        let mnt = vol.mount_with(&opts);
        let err = std::fs::read(mnt.p("f")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        mnt.unmount();
    }
    std::fs::remove_dir(&vol.bucket).unwrap();
    std::fs::rename(&hidden, &vol.bucket).unwrap();
    {
        let mnt = vol.mount_with(&opts);
        assert_eq!(std::fs::read(mnt.p("f")).unwrap(), data);
        wait_for_files(&cache, 16);
        mnt.unmount();
    }
    std::fs::rename(&vol.bucket, &hidden).unwrap();
    std::fs::create_dir(&vol.bucket).unwrap();
    let mnt = vol.mount_with(&opts);
    assert_eq!(
        std::fs::read(mnt.p("f")).unwrap(),
        data,
        "rewritten cache files serve"
    );
    mnt.unmount();
}

#[test]
fn bad_cache_dir_is_a_clear_error() {
    let vol = Volume::local(64);
    let file = vol.dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let path = vol.dir.path().join("mnt");
    std::fs::create_dir_all(&path).unwrap();
    let out = tidefs(&[
        "mount",
        &vol.url,
        path.to_str().unwrap(),
        "--cache-dir",
        file.join("sub").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the disk cache"), "{err}");
    assert!(!is_mounted(&path));
}

/// Blocks written through a mount with a disk cache and `--cache-large-write` land in it, so
/// reading them back needs no fetch; `tidefs warmup` fills an empty cache from the store.
#[test]
fn written_blocks_are_cached_and_warmup_fills_the_cache() {
    let vol = Volume::local(64);
    let cache = vol.dir.path().join("cache");
    let opts = [
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-large-write",
    ];
    let mut a = vec![0u8; 640 << 10];
    rand::thread_rng().fill_bytes(&mut a);
    let b = vec![7u8; 100_000];
    {
        let mnt = vol.mount_with(&opts);
        std::fs::create_dir(mnt.p("d")).unwrap();
        std::fs::write(mnt.p("d/a"), &a).unwrap();
        std::fs::write(mnt.p("d/b"), &b).unwrap();
        wait_for_files(&cache, 10 + 2);
        mnt.unmount();
    }
    let hidden = vol.dir.path().join("objects-away");
    std::fs::rename(&vol.bucket, &hidden).unwrap();
    std::fs::create_dir(&vol.bucket).unwrap();
    {
        let mnt = vol.mount_with(&opts);
        assert_eq!(
            std::fs::read(mnt.p("d/a")).unwrap(),
            a,
            "served from the cache"
        );
        mnt.unmount();
    }
    std::fs::remove_dir(&vol.bucket).unwrap();
    std::fs::rename(&hidden, &vol.bucket).unwrap();

    // An empty cache, filled by warmup.
    std::fs::remove_dir_all(&cache).unwrap();
    let mnt = vol.mount_with(&opts);
    let out = tidefs(&["warmup", mnt.p("d").to_str().unwrap(), "--threads", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"].as_u64(), Some(2), "{report}");
    assert_eq!(report["bytes"].as_u64(), Some((a.len() + b.len()) as u64));
    wait_for_files(&cache, 12);
    mnt.unmount();
    std::fs::rename(&vol.bucket, &hidden).unwrap();
    std::fs::create_dir(&vol.bucket).unwrap();
    let mnt = vol.mount_with(&opts);
    assert_eq!(
        std::fs::read(mnt.p("d/b")).unwrap(),
        b,
        "warmed blocks serve"
    );
    mnt.unmount();
    // Outside tidefs, warmup says so.
    let out = tidefs(&["warmup", vol.dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not on a tidefs mount"));
}

/// Without `--cache-large-write`, only the short blocks of what a mount writes reach its
/// disk cache; with it, every block does.
#[test]
fn only_short_written_blocks_are_cached_by_default() {
    let vol = Volume::local(64);
    let cache = vol.dir.path().join("cache");
    let data = vec![5u8; (640 << 10) + 1000];
    let dir = ["--cache-dir", cache.to_str().unwrap()];
    let mnt = vol.mount_with(&dir);
    std::fs::write(mnt.p("f"), &data).unwrap();
    wait_for_files(&cache, 1);
    // Time for any other cache writes under way to land, had they been started.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(cache_files(&cache).len(), 1, "only the last, short block");
    mnt.unmount();

    let mnt = vol.mount_with(&[dir[0], dir[1], "--cache-large-write"]);
    std::fs::write(mnt.p("g"), &data).unwrap();
    wait_for_files(&cache, 1 + 11);
    mnt.unmount();
    assert_eq!(cache_files(&cache).len(), 12);
}

/// Volumes sharing a cache directory never see each other's blocks, though their block keys
/// are the same (same name, slice ids counted from 1 in both).
#[test]
fn volumes_sharing_a_cache_dir_stay_apart() {
    let shared = tempfile::tempdir().unwrap();
    let opts = ["--cache-dir", shared.path().to_str().unwrap()];
    let (one, two) = (Volume::local(64), Volume::local(64));
    for (vol, byte) in [(&one, 1u8), (&two, 2u8)] {
        let mnt = vol.mount_with(&opts);
        std::fs::write(mnt.p("f"), vec![byte; 200_000]).unwrap();
        mnt.unmount();
    }
    for (vol, byte) in [(&one, 1u8), (&two, 2u8), (&one, 1u8)] {
        let mnt = vol.mount_with(&opts);
        assert_eq!(std::fs::read(mnt.p("f")).unwrap(), vec![byte; 200_000]);
        mnt.unmount();
    }
}

/// The writeback staging directory of the volume under `cache`.
fn staging_files(cache: &std::path::Path) -> usize {
    std::fs::read_dir(cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("-staging"))
        .map(|e| std::fs::read_dir(e.path()).unwrap().count())
        .sum()
}

/// `--writeback`: fsync returns once the blocks are durable in the staging directory, so it
/// succeeds while the object store fails, and the data reads back; `tidefs status` shows the
/// staged blocks. A kill -9 then loses nothing: fsck given the cache directory counts the
/// blocks as staged (without it, as missing, with a hint), the next mount with the same
/// cache directory uploads them, and the volume holds exactly the file's blocks.
#[test]
fn writeback_survives_a_killed_mount_and_uploads_later() {
    use std::io::Write;
    let vol = Volume::local(64);
    let cache = vol.dir.path().join("cache");
    let cache_arg = cache.to_str().unwrap().to_string();
    std::fs::create_dir_all(vol.dir.path().join("mnt")).unwrap();
    let out = tidefs(&[
        "mount",
        &vol.url,
        vol.dir.path().join("mnt").to_str().unwrap(),
        "--writeback",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache-dir"));

    let mnt = vol.mount_with(&["--writeback", "--cache-dir", &cache_arg]);
    // The store fails from now on: its directory is replaced by a file.
    let away = vol.dir.path().join("objects.away");
    std::fs::rename(&vol.bucket, &away).unwrap();
    std::fs::write(&vol.bucket, b"not a directory").unwrap();
    let body: Vec<u8> = (0..3u32 << 20).map(|i| (i % 249) as u8).collect();
    let mut f = std::fs::File::create(mnt.p("f")).unwrap();
    f.write_all(&body).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(std::fs::read(mnt.p("f")).unwrap(), body);
    assert_eq!(
        staging_files(&cache),
        48,
        "3 MiB in 64 KiB blocks, all staged"
    );
    let status = status(&vol.url);
    let staged = &status["sessions"][0]["stats"]["writeback"];
    assert_eq!(staged["staged_blocks"].as_u64(), Some(48), "{status}");
    assert_eq!(staged["staged_bytes"].as_u64(), Some(3 << 20), "{status}");
    mnt.kill9();

    std::fs::remove_file(&vol.bucket).unwrap();
    std::fs::rename(&away, &vol.bucket).unwrap();
    let fsck = |extra: &[&str]| {
        let out = tidefs(&[&["fsck", &vol.url][..], extra].concat());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            out.status.success(),
            report,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, report, err) = fsck(&[]);
    assert!(!ok && err.contains("--cache-dir"), "{err}");
    assert_eq!(report["missing"].as_array().unwrap().len(), 48);
    let (ok, report, err) = fsck(&["--cache-dir", &cache_arg]);
    assert!(ok, "{err}");
    assert_eq!(report["staged"].as_u64(), Some(48), "{report}");
    assert_eq!(report["missing"].as_array().unwrap().len(), 0);
    let mnt = vol.mount_with(&["--writeback", "--cache-dir", &cache_arg]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while staging_files(&cache) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "staged blocks never uploaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    mnt.unmount();
    assert_eq!(vol.objects().len(), 48);
    let (ok, report, err) = fsck(&[]);
    assert!(ok && report["staged"].as_u64() == Some(0), "{err} {report}");
    // A mount without the cache reads it all from the store.
    let mnt = vol.mount();
    assert_eq!(std::fs::read(mnt.p("f")).unwrap(), body);
    mnt.unmount();
}

/// Reads `path` whole with O_DIRECT, `chunk` bytes per read: each read reaches the mount (the
/// kernel's page cache is bypassed).
fn read_direct(path: &std::path::Path, len: usize, chunk: usize) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let mut chunk_buf = DirectBuf::new(chunk);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = f.read_at(&mut chunk_buf, out.len() as u64).unwrap();
        assert!(n > 0, "early end of file at {}", out.len());
        out.extend_from_slice(&chunk_buf[..n]);
    }
    out
}

/// Reads from the disk cache are handed to the kernel unread (spliced) once a read has checked
/// their segments, or when the mount wrote the file itself; a cache file changed while the
/// mount runs is read, checked and dropped again, never served.
#[test]
fn spliced_reads_serve_checked_cache_files_only() {
    const LEN: usize = 2 << 20;
    let vol = Volume::local(256);
    let cache = vol.dir.path().join("cache");
    let opts = ["--cache-dir", cache.to_str().unwrap()];
    let mut data = vec![0u8; LEN];
    rand::thread_rng().fill_bytes(&mut data);
    write_then_cache(&vol, &opts, &data, &cache, 8);
    let stat = |path: &[&str]| {
        let s = status(&vol.url);
        let mut v = &s["sessions"][0]["stats"];
        for p in path {
            v = &v[*p];
        }
        v.as_u64().unwrap_or_else(|| panic!("no {path:?} in {s}"))
    };
    let disk = |what: &str| stat(&["cache", "disk", what]);
    let mnt = vol.mount_with(&opts);
    // Files found at mount are unchecked: the first pass reads and checks them.
    assert_same(
        &read_direct(&mnt.p("f"), LEN, 256 << 10),
        &data,
        "first pass",
    );
    assert_eq!(disk("spans"), 0, "unchecked files spliced");
    // The second pass is spliced from the files the first one checked.
    assert_same(
        &read_direct(&mnt.p("f"), LEN, 256 << 10),
        &data,
        "spliced pass",
    );
    assert!(disk("spans") >= 8, "{} spans", disk("spans"));
    assert_eq!(
        stat(&["reads", "spliced"]),
        disk("spans"),
        "spans not spliced"
    );
    assert_eq!(stat(&["reads", "splice_fallbacks"]), 0);

    // Every cache file changed in place: the reads check them again, drop them and fetch
    // the blocks from the store.
    let spans = disk("spans");
    std::thread::sleep(std::time::Duration::from_millis(20));
    for f in cache_files(&cache) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f)
            .unwrap();
        let last = file.metadata().unwrap().len() - 1;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, last).unwrap();
        file.write_all_at(&[byte[0] ^ 0x55], last).unwrap();
    }
    assert_same(
        &read_direct(&mnt.p("f"), LEN, 256 << 10),
        &data,
        "after damage",
    );
    assert_eq!(disk("dropped"), 8);
    assert_eq!(disk("spans"), spans, "changed files spliced");
    mnt.unmount();
}

/// A mount by a user without root (through fusermount3) splices disk-cache reads too: its
/// pipes hold 1 MiB, so it asks the kernel for read requests of at most 512 KiB.
#[test]
fn a_mount_without_root_splices_reads_too() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let (meta, mnt) = (format!("sqlite3://{d}/meta.db"), format!("{d}/mnt"));
    /// Detaches the mount if the test fails before unmounting it.
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            if is_mounted(std::path::Path::new(&self.0)) {
                let _ = std::process::Command::new("umount")
                    .args(["-l", &self.0])
                    .status();
            }
        }
    }
    run_as_nobody(&format!(
        "set -e; cd {d}; mkdir data cache mnt; \
         {TIDEFS} format {meta} nobody-vol --storage file --bucket {d}/data --block-size 1024; \
         {TIDEFS} mount {meta} {mnt} --cache-dir {d}/cache --mem-cache-size 1 \
           --metrics 127.0.0.1:0 -d --log {d}/log"
    ));
    let _detach = Detach(mnt.clone());
    let options = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = options.lines().find(|l| l.contains(&mnt)).expect("mounted");
    assert!(line.contains("max_read=524288"), "{line}");
    // Written, read once (which caches its blocks on disk), then read twice with O_DIRECT,
    // 512 KiB at a time: the second pass is spliced from checked files.
    run_as_nobody(&format!(
        "set -e; head -c 16777216 /dev/urandom > {d}/want; cp {d}/want {mnt}/f; \
         cat {mnt}/f > /dev/null; sleep 1; \
         dd if={mnt}/f of=/dev/null bs=512k iflag=direct 2>/dev/null; \
         dd if={mnt}/f of={d}/got bs=512k iflag=direct 2>/dev/null; cmp {d}/want {d}/got"
    ));
    let s = status(&meta);
    let reads = &s["sessions"][0]["stats"]["reads"];
    assert!(reads["spliced"].as_u64().unwrap() >= 8, "{reads}");
    assert_eq!(reads["splice_fallbacks"].as_u64(), Some(0), "{reads}");
    run_as_nobody(&format!("fusermount3 -u {mnt}"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(format!("{d}/log"))
        .unwrap_or_default()
        .contains("unmounted")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the mount did not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
