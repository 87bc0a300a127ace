//! Crashes and signals: a `kill -9` of the mount loses nothing fsync acknowledged and the
//! volume mounts again at once; SIGTERM and SIGINT flush and unmount.

use crate::harness::*;
use rand::{RngCore, SeedableRng};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn walk_and_read_everything(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            n += walk_and_read_everything(&e.path());
        } else if t.is_file() {
            let mut v = Vec::new();
            File::open(e.path())
                .unwrap()
                .read_to_end(&mut v)
                .unwrap_or_else(|err| {
                    panic!("{} unreadable after crash: {err}", e.path().display())
                });
            n += 1;
        }
    }
    n
}

/// A file whose fsync returned success: its name and content.
type Acked = (String, Vec<u8>);

#[test]
fn kill9_in_the_middle_of_writes_loses_nothing_fsynced() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    fs::create_dir(mnt.p("acked")).unwrap();
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for t in 0..3u64 {
        let (acked, stop, root) = (acked.clone(), stop.clone(), mnt.path.clone());
        workers.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t);
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let name = format!("acked/t{t}-{i}");
                let mut data = vec![0u8; 1000 + (i % 7) * 150_000];
                rng.fill_bytes(&mut data);
                let r = (|| {
                    let mut f = File::create(root.join(&name))?;
                    f.write_all(&data)?;
                    f.sync_all()
                })();
                match r {
                    Ok(()) => acked.lock().unwrap().push((name, data)),
                    Err(_) => return,
                }
            }
        }));
    }
    {
        // One writer that never fsyncs: its data may be lost, but must not corrupt anything.
        let (stop, root) = (stop.clone(), mnt.path.clone());
        workers.push(std::thread::spawn(move || {
            let Ok(mut f) = File::create(root.join("unsynced")) else {
                return;
            };
            let block = vec![0x5au8; 256 << 10];
            while !stop.load(Ordering::Relaxed) {
                if f.write_all(&block).is_err() {
                    return;
                }
            }
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 30 {
        assert!(
            std::time::Instant::now() < deadline,
            "writers made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let path = mnt.path.clone();
    let dead = mnt.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    // The dead mount is still in the way; mounting again detaches it.
    let mnt = vol.mount_at(&path, &[], "mount2.log");
    for (name, data) in &acked {
        let got = fs::read(mnt.p(name)).unwrap_or_else(|e| panic!("{name} lost: {e}"));
        assert!(got == *data, "{name} differs after the crash");
    }
    assert!(walk_and_read_everything(&mnt.path) >= acked.len());
    // And the volume still works.
    fs::write(mnt.p("after"), b"fine").unwrap();
    assert_eq!(fs::read(mnt.p("after")).unwrap(), b"fine");
    drop(dead);
    mnt.unmount();
}

/// Right after a `kill -9` the kernel still answers a stat of the mount point from its
/// attribute cache, so the dead mount looks alive there; a mount started at once must still
/// see it is dead and take its place.
#[test]
fn a_mount_started_right_after_a_kill9_takes_the_dead_mounts_place() {
    let vol = Volume::new(64);
    let mnt = vol.mount_with(&["--attr-cache", "30"]);
    fs::write(mnt.p("kept"), b"synced before the kill").unwrap();
    mnt.settle();
    let path = mnt.path.clone();
    // The root's attributes are now cached for 30 s.
    fs::metadata(&path).unwrap();
    let dead = mnt.kill9();
    assert!(is_mounted(&path));
    assert!(
        fs::metadata(&path).is_ok(),
        "the stat no longer comes from the cache"
    );
    let mnt = vol.mount_at(&path, &[], "mount2.log");
    assert!(
        mnt.log_text().contains("detaching a dead mount"),
        "{}",
        mnt.log_text()
    );
    assert_eq!(fs::read(mnt.p("kept")).unwrap(), b"synced before the kill");
    // The guard leaves the live mount that took the dead one's place alone.
    drop(dead);
    assert_eq!(fs::read(mnt.p("kept")).unwrap(), b"synced before the kill");
    mnt.unmount();
}

#[test]
fn sigterm_and_sigint_flush_and_unmount() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let vol = Volume::new(64);
        let mut mnt = vol.mount();
        let mut data = vec![0u8; 700 << 10];
        rand::thread_rng().fill_bytes(&mut data);
        // Written but neither closed nor fsynced when the signal comes.
        let mut f = File::create(mnt.p("open")).unwrap();
        f.write_all(&data).unwrap();
        fs::write(mnt.p("closed"), b"closed file").unwrap();
        mnt.signal(signal);
        // The busy mount is detached; the process ends once the last descriptor goes.
        std::thread::sleep(Duration::from_millis(300));
        drop(f);
        let status = mnt.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "exit after signal {signal}: {status}; {}",
            mnt.log_text()
        );
        assert!(!is_mounted(&mnt.path));
        let path = mnt.path.clone();
        drop(mnt);
        let mnt = vol.mount_at(&path, &[], "mount2.log");
        assert_eq!(fs::read(mnt.p("closed")).unwrap(), b"closed file");
        assert!(
            fs::read(mnt.p("open")).unwrap() == data,
            "unflushed data lost at signal {signal}"
        );
        mnt.unmount();
    }
}
