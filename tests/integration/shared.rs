//! Several mounts of one volume (metadata in Redis): close-to-open consistency, namespace
//! changes seen across mounts, and the sessions of dead mounts cleaned up by the others.

use crate::harness::*;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Waits until `cond` holds, for up to `secs` seconds; panics with `what` otherwise.
fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_fsck_clean(vol: &Volume) {
    let mut args = vec!["fsck", vol.url.as_str()];
    args.extend(vol.store_args.iter().map(String::as_str));
    let out = tidefs(&args);
    assert!(
        out.status.success(),
        "fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn mount_two(vol: &Volume, extra: &[&str]) -> (Mount, Mount) {
    let (a, b) = (vol.dir.path().join("a"), vol.dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    (
        vol.mount_at(&a, extra, "a.log"),
        vol.mount_at(&b, extra, "b.log"),
    )
}

#[test]
fn two_mounts_share_a_volume_with_close_to_open_consistency() {
    let vol = Volume::shared(1024);
    let (a, b) = mount_two(&vol, &[]);
    let status = tidefs(&["status", &vol.url]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["sessions"].as_array().unwrap().len(), 2, "{status}");

    // A file closed on A is whole on B when opened after the close: 3.5 blocks.
    let body = pattern(3_500_000, 1);
    std::fs::write(a.p("data"), &body).unwrap();
    eventually(5, "B sees the file", || b.p("data").exists());
    assert_eq!(std::fs::read(b.p("data")).unwrap(), body);

    // Rewritten in the middle on B (kept open on A meanwhile); A's next open sees it.
    let mut kept = std::fs::File::open(a.p("data")).unwrap();
    let mut first = vec![0u8; 4096];
    kept.read_exact(&mut first).unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.p("data"))
            .unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(1_000_000)).unwrap();
        f.write_all(&[7u8; 70_000]).unwrap();
    }
    let mut expected = body.clone();
    expected[1_000_000..1_070_000].fill(7);
    eventually(5, "A sees the rewrite", || {
        std::fs::read(a.p("data")).unwrap() == expected
    });
    drop(kept);

    // Directories, renames and removals on one mount show on the other within the kernel's
    // cache timeout (1 s by default).
    std::fs::create_dir_all(a.p("warehouse/t1")).unwrap();
    for i in 0..20 {
        std::fs::write(
            a.p(&format!("warehouse/t1/part-{i:03}")),
            format!("row {i}"),
        )
        .unwrap();
    }
    std::fs::rename(a.p("warehouse/t1"), a.p("warehouse/t2")).unwrap();
    eventually(5, "B lists the renamed table", || {
        b.p("warehouse/t2").is_dir() && !b.p("warehouse/t1").exists()
    });
    assert_eq!(names(&b.p("warehouse/t2")).len(), 20);
    assert_eq!(
        std::fs::read_to_string(b.p("warehouse/t2/part-007")).unwrap(),
        "row 7"
    );
    std::fs::remove_file(b.p("warehouse/t2/part-000")).unwrap();
    std::fs::hard_link(b.p("warehouse/t2/part-001"), b.p("link")).unwrap();
    eventually(5, "A sees B's unlink and link", || {
        !a.p("warehouse/t2/part-000").exists()
            && std::fs::metadata(a.p("warehouse/t2/part-001")).is_ok_and(|m| m.nlink() == 2)
    });
    assert_eq!(names(&a.p("warehouse/t2")).len(), 19);

    // Both mounts create in one directory at once: every name lands once.
    let writers: Vec<_> = [a.path.clone(), b.path.clone()]
        .into_iter()
        .enumerate()
        .map(|(m, root)| {
            std::thread::spawn(move || {
                for i in 0..100 {
                    std::fs::write(root.join(format!("warehouse/m{m}-{i}")), [m as u8]).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    eventually(5, "both mounts list all 201 entries", || {
        names(&a.p("warehouse")).len() == 201 && names(&b.p("warehouse")).len() == 201
    });
    // The kernel caches listings, but an open of the directory after a change made on the
    // other mount lists afresh: no waiting for a timeout.
    let listed = names(&b.p("warehouse"));
    assert_eq!(names(&b.p("warehouse")), listed);
    std::fs::write(a.p("warehouse/fresh"), b"x").unwrap();
    assert!(names(&b.p("warehouse")).contains(&"fresh".to_string()));
    std::fs::remove_file(a.p("warehouse/fresh")).unwrap();
    assert_eq!(names(&b.p("warehouse")), listed);
    a.unmount();
    b.unmount();
    assert_fsck_clean(&vol);
}

#[test]
fn lookups_keep_names_for_the_entry_timeout_not_the_attribute_timeout() {
    // Attributes for a minute, names for a second: a name removed on A is gone on B within
    // about a second. Lookups once gave the kernel the attribute timeout for the name, so B
    // kept the removed name for the whole minute.
    let vol = Volume::shared(1024);
    let (a, b) = mount_two(&vol, &["--attr-cache", "60", "--entry-cache", "1"]);
    std::fs::write(a.p("f"), b"x").unwrap();
    eventually(5, "B sees the file", || b.p("f").exists());
    std::fs::rename(a.p("f"), a.p("g")).unwrap();
    eventually(5, "B no longer finds the old name", || !b.p("f").exists());
    assert!(b.p("g").exists());
    // On a shared volume the kernel does not remember absent names: a file A creates is
    // found on B at once.
    assert!(!b.p("h").exists());
    std::fs::write(a.p("h"), b"y").unwrap();
    assert!(b.p("h").exists());
}

#[test]
fn a_dead_mounts_session_is_cleaned_up_by_the_others() {
    let vol = Volume::shared(1024);
    let (a, b) = mount_two(&vol, &["--heartbeat", "1"]);
    std::fs::write(a.p("kept"), pattern(2_500_000, 3)).unwrap();
    let objects = vol.objects().len();
    assert!(objects >= 3, "{objects} objects");
    // Open on A and removed there: A's session keeps the inode until its last close.
    let held = std::fs::File::open(a.p("kept")).unwrap();
    std::fs::remove_file(a.p("kept")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vol.objects().len(), objects, "freed while still open");
    // A dies with the file open; B notices at its next heartbeat and frees what A held.
    a.kill9();
    drop(held);
    eventually(20, "B closes A's session", || {
        let out = tidefs(&["status", &vol.url]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["sessions"].as_array().unwrap().len() == 1
    });
    eventually(20, "the objects of the file A held are deleted", || {
        vol.objects().is_empty()
    });
    assert!(
        b.log_text().contains("closing the session of a dead mount"),
        "{}",
        b.log_text()
    );
    b.unmount();
}

#[test]
fn losing_redis_gives_eio_and_the_mount_recovers() {
    let server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut vol = Volume::on_redis(1024, server);
    let mnt = vol.mount();
    std::fs::create_dir(mnt.p("d")).unwrap();
    std::fs::write(mnt.p("d/before"), pattern(1_500_000, 5)).unwrap();
    let root = mnt.path.clone();
    vol.redis.as_mut().unwrap().crash_and_restart(|| {
        // Metadata operations fail cleanly while Redis is down; nothing hangs.
        let started = Instant::now();
        let e = std::fs::write(root.join("d/during"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        let e = std::fs::create_dir(root.join("d/sub")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        assert!(started.elapsed() < Duration::from_secs(30));
    });
    // Redis is back: the mount works again and nothing was lost or half-made.
    assert_eq!(
        std::fs::read(mnt.p("d/before")).unwrap(),
        pattern(1_500_000, 5)
    );
    std::fs::write(mnt.p("d/after"), b"after").unwrap();
    assert_eq!(names(&mnt.p("d")), vec!["after", "before"]);
    mnt.unmount();
    assert_fsck_clean(&vol);
}

#[test]
fn a_volume_moves_between_engines_by_dump_and_load() {
    let vol = Volume::new(1024);
    let mnt = vol.mount();
    std::fs::create_dir_all(mnt.p("lake/t")).unwrap();
    let big = pattern(2_300_000, 9);
    std::fs::write(mnt.p("lake/t/big"), &big).unwrap();
    for i in 0..300 {
        std::fs::write(mnt.p(&format!("lake/t/s{i}")), format!("small {i}")).unwrap();
    }
    std::os::unix::fs::symlink("t/big", mnt.p("lake/link")).unwrap();
    std::fs::hard_link(mnt.p("lake/t/s1"), mnt.p("lake/s1-again")).unwrap();
    mnt.unmount();
    let first = vol.dir.path().join("first.jsonl");
    let out = tidefs(&["dump", &vol.url, first.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // lake; t, link, s1-again; big and 300 small files.
    assert_eq!(stats["entries"], 1 + 3 + 301, "{stats}");

    // Into the other engine: Redis when the volume is on SQLite, and the other way round.
    let server = RedisServer::start();
    let target = if redis_meta() {
        format!("sqlite3://{}", vol.dir.path().join("moved.db").display())
    } else {
        server.url(5)
    };
    let out = tidefs(&["load", &target, first.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tidefs(&["load", &target, first.to_str().unwrap()]);
    assert!(!out.status.success(), "a second load into a used target");
    let again = std::process::Command::new(TIDEFS)
        .args(["dump", &target, "-"])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(again.stdout, std::fs::read(&first).unwrap());

    // The moved volume mounts on the same objects and reads the same bytes.
    let moved = vol.dir.path().join("moved");
    std::fs::create_dir_all(&moved).unwrap();
    let args: Vec<&str> = vol.store_args.iter().map(String::as_str).collect();
    let m = Mount::start(&target, &moved, &args, vol.dir.path().join("moved.log"));
    assert_eq!(std::fs::read(m.p("lake/link")).unwrap(), big);
    assert_eq!(
        std::fs::read_to_string(m.p("lake/s1-again")).unwrap(),
        "small 1"
    );
    assert_eq!(std::fs::metadata(m.p("lake/t/s1")).unwrap().nlink(), 2);
    assert_eq!(names(&m.p("lake/t")).len(), 301);
    std::fs::write(m.p("lake/new"), b"written after the move").unwrap();
    m.unmount();
}

/// A python child that takes an fcntl write lock on `len` bytes at `start` of `path`: without
/// `wait` it exits 3 when the range is locked; with `wait` it blocks until it gets it, prints
/// "locked" and exits.
fn lock_child(path: &Path, start: u32, len: u32, wait: bool) -> std::process::Child {
    let flags = if wait {
        "fcntl.LOCK_EX"
    } else {
        "fcntl.LOCK_EX|fcntl.LOCK_NB"
    };
    std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import fcntl,sys\nf=open(sys.argv[1],'r+')\ntry:\n fcntl.lockf(f, {flags}, {len}, {start})\nexcept OSError:\n sys.exit(3)\nprint('locked', flush=True)\n"
            ),
        ])
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a lock child and checks that it took its lock.
fn assert_got_lock(mut child: std::process::Child) {
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "locked\n");
}

fn probe(path: &Path, start: u32) -> Option<i32> {
    lock_child(path, start, 10, false).wait().unwrap().code()
}

fn set_lock(f: &std::fs::File, typ: i32, start: i64, len: i64) -> i32 {
    use std::os::fd::AsRawFd;
    let mut lk: libc::flock = unsafe { std::mem::zeroed() };
    lk.l_type = typ as i16;
    lk.l_whence = libc::SEEK_SET as i16;
    lk.l_start = start;
    lk.l_len = len;
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &lk) }
}

#[test]
fn fcntl_locks_hold_across_mounts() {
    let vol = Volume::shared(1024);
    let (a, b) = mount_two(&vol, &["--heartbeat", "1"]);
    std::fs::write(a.p("f"), b"records").unwrap();
    eventually(5, "B sees the file", || b.p("f").exists());
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.p("f"))
        .unwrap();
    assert_eq!(set_lock(&held, libc::F_WRLCK, 0, 100), 0);
    // Other processes meet the lock through the other mount, on the range it covers only.
    assert_eq!(probe(&b.p("f"), 50), Some(3), "the range is locked on A");
    assert_eq!(probe(&b.p("f"), 200), Some(0), "past the range it is free");
    // A waiter on B gets the lock once A releases it.
    let mut waiter = lock_child(&b.p("f"), 0, 10, true);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "waited without the lock"
    );
    assert_eq!(set_lock(&held, libc::F_UNLCK, 0, 100), 0);
    let started = Instant::now();
    assert_got_lock(waiter);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Closing a file releases its process's locks, as fcntl(2) says.
    assert_eq!(set_lock(&held, libc::F_WRLCK, 0, 0), 0);
    assert_eq!(probe(&b.p("f"), 1000), Some(3));
    drop(held);
    assert_eq!(probe(&b.p("f"), 1000), Some(0));
    // A mount that dies holding a lock loses it once the others notice it is gone.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.p("f"))
        .unwrap();
    assert_eq!(set_lock(&held, libc::F_WRLCK, 0, 0), 0);
    assert_eq!(probe(&b.p("f"), 0), Some(3));
    a.kill9();
    drop(held);
    eventually(20, "the dead mount's lock is released", || {
        probe(&b.p("f"), 0) == Some(0)
    });
    b.unmount();
}

/// A python child that opens `path` and calls `flock(op)` (an expression over `fcntl.LOCK_*`):
/// exits 3 when the lock is refused; otherwise prints "locked" and exits.
fn flock_child(path: &Path, op: &str) -> std::process::Child {
    std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import fcntl,sys\nf=open(sys.argv[1],'r')\ntry:\n fcntl.flock(f, {op})\nexcept OSError:\n sys.exit(3)\nprint('locked', flush=True)\n"
            ),
        ])
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn flock_probe(path: &Path, op: &str) -> Option<i32> {
    flock_child(path, &format!("{op}|fcntl.LOCK_NB"))
        .wait()
        .unwrap()
        .code()
}

fn flock(f: &std::fs::File, op: i32) -> i32 {
    use std::os::fd::AsRawFd;
    unsafe { libc::flock(f.as_raw_fd(), op) }
}

#[test]
fn flock_locks_hold_across_mounts() {
    let vol = Volume::shared(1024);
    let (a, b) = mount_two(&vol, &[]);
    std::fs::write(a.p("f"), b"whole file").unwrap();
    eventually(5, "B sees the file", || b.p("f").exists());
    let held = std::fs::File::open(a.p("f")).unwrap();
    assert_eq!(flock(&held, libc::LOCK_EX), 0);
    assert_eq!(flock_probe(&b.p("f"), "fcntl.LOCK_SH"), Some(3));
    assert_eq!(flock_probe(&b.p("f"), "fcntl.LOCK_EX"), Some(3));
    // flock and fcntl locks are independent, as on a local Linux filesystem.
    assert_eq!(probe(&b.p("f"), 0), Some(0), "a record lock ignores flock");
    // Downgraded, the lock is shared with readers on the other mount, not with writers.
    assert_eq!(flock(&held, libc::LOCK_SH), 0);
    assert_eq!(flock_probe(&b.p("f"), "fcntl.LOCK_SH"), Some(0));
    assert_eq!(flock_probe(&b.p("f"), "fcntl.LOCK_EX"), Some(3));
    // A waiter on B gets the lock once A unlocks.
    let mut waiter = flock_child(&b.p("f"), "fcntl.LOCK_EX");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "waited without the lock"
    );
    assert_eq!(flock(&held, libc::LOCK_UN), 0);
    assert_got_lock(waiter);
    // A lock belongs to the open file description: two opens on one mount conflict, and
    // the lock lasts until the description's last descriptor is closed.
    assert_eq!(flock(&held, libc::LOCK_EX), 0);
    let other = std::fs::File::open(a.p("f")).unwrap();
    assert_eq!(flock(&other, libc::LOCK_EX | libc::LOCK_NB), -1);
    let dup = held.try_clone().unwrap();
    drop(held);
    assert_eq!(
        flock_probe(&b.p("f"), "fcntl.LOCK_SH"),
        Some(3),
        "dup holds"
    );
    drop(dup);
    eventually(5, "the last close releases the lock", || {
        flock_probe(&b.p("f"), "fcntl.LOCK_EX") == Some(0)
    });
    assert_eq!(flock(&other, libc::LOCK_EX | libc::LOCK_NB), 0);
    drop(other);

    // A refused non-blocking conversion leaves no lock: the held one went first, as on Linux.
    let (x, y) = (
        std::fs::File::open(a.p("f")).unwrap(),
        std::fs::File::open(a.p("f")).unwrap(),
    );
    assert_eq!(flock(&x, libc::LOCK_SH), 0);
    assert_eq!(flock(&y, libc::LOCK_SH), 0);
    assert_eq!(flock(&y, libc::LOCK_EX | libc::LOCK_NB), -1);
    drop(x);
    eventually(5, "the refused conversion dropped the shared lock", || {
        flock_probe(&b.p("f"), "fcntl.LOCK_EX") == Some(0)
    });
    drop(y);

    // Two holders of a shared lock both converting to exclusive: each drops its shared lock
    // first (as Linux does), so one gets it and the other follows, no deadlock.
    let held = std::fs::File::open(a.p("f")).unwrap();
    assert_eq!(flock(&held, libc::LOCK_SH), 0);
    let mut converting = flock_child(
        &b.p("f"),
        "fcntl.LOCK_SH)\n print('shared', flush=True)\n fcntl.flock(f, fcntl.LOCK_EX",
    );
    let mut line = String::new();
    let mut out = std::io::BufReader::new(converting.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "shared\n");
    let (tx, rx) = std::sync::mpsc::channel();
    let upgrader = held.try_clone().unwrap();
    std::thread::spawn(move || tx.send(flock(&upgrader, libc::LOCK_EX)).unwrap());
    let got = rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(got, Ok(0), "A's conversion deadlocked");
    drop(held);
    let status = converting.wait().unwrap();
    assert!(status.success(), "{status}");

    // A signal ends a blocked flock: the kernel's interrupt reaches the waiter.
    let held = std::fs::File::open(a.p("f")).unwrap();
    assert_eq!(flock(&held, libc::LOCK_EX), 0);
    let mut waiter = flock_child(&b.p("f"), "fcntl.LOCK_EX");
    std::thread::sleep(Duration::from_millis(500));
    assert!(waiter.try_wait().unwrap().is_none(), "waits");
    unsafe { libc::kill(waiter.id() as i32, libc::SIGTERM) };
    eventually(5, "the signalled waiter exits", || {
        waiter.try_wait().unwrap().is_some()
    });
    drop(held);
    a.unmount();
    b.unmount();
}
