//! Names on a real mount: directories, renames with flags, hard links, symlinks, FIFOs, and
//! large directories with stable listing offsets.

use crate::harness::*;
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

fn renameat2(from: &std::path::Path, to: &std::path::Path, flags: u32) -> i32 {
    let (a, b) = (cpath(from), cpath(to));
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        errno()
    }
}

#[test]
fn directories_and_renames() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    fs::create_dir(mnt.p("d")).unwrap();
    fs::write(mnt.p("d/f"), b"f").unwrap();
    assert_eq!(
        fs::remove_dir(mnt.p("d")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    assert_eq!(fs::metadata(mnt.p("d")).unwrap().nlink(), 2);
    fs::create_dir(mnt.p("d/sub")).unwrap();
    assert_eq!(fs::metadata(mnt.p("d")).unwrap().nlink(), 3);

    // Rename over an existing file replaces it atomically.
    fs::write(mnt.p("a"), b"new").unwrap();
    fs::write(mnt.p("b"), b"old").unwrap();
    fs::rename(mnt.p("a"), mnt.p("b")).unwrap();
    assert_eq!(fs::read(mnt.p("b")).unwrap(), b"new");
    assert!(!mnt.p("a").exists());
    // Across directories.
    fs::rename(mnt.p("b"), mnt.p("d/sub/b")).unwrap();
    assert_eq!(fs::read(mnt.p("d/sub/b")).unwrap(), b"new");
    fs::rename(mnt.p("d/sub"), mnt.p("sub2")).unwrap();
    assert_eq!(fs::metadata(mnt.p("d")).unwrap().nlink(), 2);
    assert_eq!(fs::read(mnt.p("sub2/b")).unwrap(), b"new");
    // Into its own subtree.
    assert_eq!(renameat2(&mnt.p("d"), &mnt.p("d/f2"), 0), libc::EINVAL);

    // RENAME_NOREPLACE and RENAME_EXCHANGE.
    fs::write(mnt.p("x"), b"x").unwrap();
    fs::write(mnt.p("y"), b"y").unwrap();
    assert_eq!(
        renameat2(&mnt.p("x"), &mnt.p("y"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(
        renameat2(&mnt.p("x"), &mnt.p("z"), libc::RENAME_NOREPLACE),
        0
    );
    assert_eq!(
        renameat2(&mnt.p("z"), &mnt.p("y"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(fs::read(mnt.p("y")).unwrap(), b"x");
    assert_eq!(fs::read(mnt.p("z")).unwrap(), b"y");
    assert_eq!(
        renameat2(&mnt.p("z"), &mnt.p("d"), libc::RENAME_EXCHANGE),
        0
    );
    assert!(mnt.p("z/f").exists());
    assert_eq!(fs::read(mnt.p("d")).unwrap(), b"y");
    assert_eq!(
        renameat2(&mnt.p("z"), &mnt.p("nope"), libc::RENAME_EXCHANGE),
        libc::ENOENT
    );
    mnt.unmount();
}

#[test]
fn links_symlinks_and_fifos() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    fs::write(mnt.p("f"), b"data").unwrap();
    fs::hard_link(mnt.p("f"), mnt.p("g")).unwrap();
    fs::create_dir(mnt.p("d")).unwrap();
    fs::hard_link(mnt.p("f"), mnt.p("d/h")).unwrap();
    let m = fs::metadata(mnt.p("g")).unwrap();
    assert_eq!(m.nlink(), 3);
    assert_eq!(m.ino(), fs::metadata(mnt.p("f")).unwrap().ino());
    fs::remove_file(mnt.p("f")).unwrap();
    assert_eq!(fs::metadata(mnt.p("g")).unwrap().nlink(), 2);
    assert_eq!(fs::read(mnt.p("d/h")).unwrap(), b"data");
    assert_eq!(
        fs::hard_link(mnt.p("d"), mnt.p("dl"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );

    std::os::unix::fs::symlink("d/h", mnt.p("s")).unwrap();
    assert_eq!(fs::read_link(mnt.p("s")).unwrap().to_str(), Some("d/h"));
    assert_eq!(fs::read(mnt.p("s")).unwrap(), b"data");
    assert!(fs::symlink_metadata(mnt.p("s"))
        .unwrap()
        .file_type()
        .is_symlink());
    std::os::unix::fs::symlink("/nowhere/at/all", mnt.p("dangling")).unwrap();
    assert!(fs::metadata(mnt.p("dangling")).is_err());

    let fifo = cpath(&mnt.p("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(fs::metadata(mnt.p("fifo")).unwrap().file_type().is_fifo());
    let path = mnt.p("fifo");
    let writer = std::thread::spawn(move || fs::write(path, b"through the pipe").unwrap());
    assert_eq!(fs::read(mnt.p("fifo")).unwrap(), b"through the pipe");
    writer.join().unwrap();
    mnt.unmount();
}

/// 100,000 entries in one directory, listed completely; a listing in progress while entries
/// come and go sees every entry that stayed exactly once.
#[test]
fn large_directory_with_stable_offsets() {
    const N: usize = 100_000;
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let dir = mnt.p("big");
    fs::create_dir(&dir).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                for i in (t..N).step_by(4) {
                    fs::File::create(dir.join(format!("entry-{i:06}"))).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let names: HashSet<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), N);
    assert!(names.contains("entry-000000") && names.contains("entry-099999"));

    // Read part of the listing, then remove and add entries, then read the rest.
    let cdir = cpath(&dir);
    let d = unsafe { libc::opendir(cdir.as_ptr()) };
    assert!(!d.is_null());
    let mut seen = Vec::new();
    let next = |d: *mut libc::DIR| -> Option<String> {
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            return None;
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        Some(name.to_string_lossy().into_owned())
    };
    for _ in 0..30_000 {
        seen.push(next(d).unwrap());
    }
    let mut removed = HashSet::new();
    for i in (0..N).step_by(97) {
        let name = format!("entry-{i:06}");
        fs::remove_file(dir.join(&name)).unwrap();
        removed.insert(name);
    }
    for i in 0..500 {
        fs::File::create(dir.join(format!("late-{i}"))).unwrap();
    }
    while let Some(n) = next(d) {
        seen.push(n);
    }
    unsafe { libc::closedir(d) };
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an entry was listed twice");
    for name in &names {
        if !removed.contains(name) {
            assert!(unique.contains(name), "{name} was skipped");
        }
    }
    mnt.unmount();
}

/// A directory's attributes seen right after each change made through the mount (the
/// getattr after a creation is answered from what the creation left) are its current ones.
#[test]
fn directory_attributes_follow_each_change() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let d = mnt.p("d");
    fs::create_dir(&d).unwrap();
    let stat = |p: &std::path::Path| fs::metadata(p).unwrap();
    let mut nlink = 2;
    for i in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let sub = d.join(format!("s{i}"));
        let (changed, what) = match i % 5 {
            0 => {
                fs::create_dir(&sub).unwrap();
                nlink += 1;
                (stat(&sub).ctime_nsec(), "mkdir")
            }
            1 => {
                drop(fs::File::create(&sub).unwrap());
                (stat(&sub).ctime_nsec(), "create")
            }
            2 => {
                fs::remove_file(d.join(format!("s{}", i - 1))).unwrap();
                (-1, "unlink")
            }
            3 => {
                fs::remove_dir(d.join(format!("s{}", i - 3))).unwrap();
                nlink -= 1;
                (-1, "rmdir")
            }
            _ => {
                std::os::unix::fs::symlink("t", &sub).unwrap();
                (fs::symlink_metadata(&sub).unwrap().ctime_nsec(), "symlink")
            }
        };
        let a = stat(&d);
        assert_eq!(a.nlink(), nlink, "after {what} {i}");
        if changed >= 0 {
            assert_eq!(a.mtime_nsec(), changed, "after {what} {i}");
        }
        if changed >= 0 {
            // What the engine says once the kernel's copy expired agrees.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let later = stat(&d);
            assert_eq!(
                (later.nlink(), later.mtime_nsec()),
                (a.nlink(), a.mtime_nsec()),
                "{what}"
            );
        }
    }
    mnt.unmount();
}
