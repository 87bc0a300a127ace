//! Attributes, permissions, xattrs, locks, fallocate and statfs on a real mount.

use crate::harness::*;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::time::Duration;

#[test]
fn modes_owners_times_and_permission_checks() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let f = mnt.p("f");
    fs::write(&f, b"secret").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o600);
    let fp = f.display().to_string();
    assert!(
        !as_nobody(&format!("cat {fp}")),
        "nobody read a 0600 root file"
    );
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(as_nobody(&format!("cat {fp} > /dev/null")));
    assert!(
        !as_nobody(&format!("echo x >> {fp}")),
        "nobody wrote a 0644 root file"
    );
    // chown, then the new owner may write.
    std::os::unix::fs::chown(&f, Some(65534), Some(65534)).unwrap();
    let m = fs::metadata(&f).unwrap();
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    assert!(as_nobody(&format!("echo x >> {fp}")));
    assert!(
        !as_nobody(&format!("chown 0 {fp}")),
        "nobody gave a file away"
    );
    // utimens with explicit times.
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    let m = fs::metadata(&f).unwrap();
    assert_eq!((m.mtime(), m.atime()), (1_000_000_000, 1_000_000_000));
    assert!(m.ctime() > 1_000_000_000);

    // Sticky directory: others' files cannot be removed.
    let sticky = mnt.p("sticky");
    fs::create_dir(&sticky).unwrap();
    fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(sticky.join("roots"), b"r").unwrap();
    let sp = sticky.display().to_string();
    assert!(as_nobody(&format!(
        "echo n > {sp}/nobodys && rm {sp}/nobodys"
    )));
    assert!(
        !as_nobody(&format!("rm -f {sp}/roots")),
        "sticky bit ignored"
    );
    assert!(sticky.join("roots").exists());

    // setgid directory: new entries take its group, subdirectories inherit the bit.
    let sg = mnt.p("sg");
    fs::create_dir(&sg).unwrap();
    std::os::unix::fs::chown(&sg, None, Some(4242)).unwrap();
    fs::set_permissions(&sg, fs::Permissions::from_mode(0o2777)).unwrap();
    fs::write(sg.join("file"), b"").unwrap();
    fs::create_dir(sg.join("sub")).unwrap();
    assert_eq!(fs::metadata(sg.join("file")).unwrap().gid(), 4242);
    let sub = fs::metadata(sg.join("sub")).unwrap();
    assert_eq!((sub.gid(), sub.mode() & 0o2000), (4242, 0o2000));
    mnt.unmount();
}

/// Writes, truncates and chowns drop what the kernel's own filesystems drop: the file
/// capabilities always, and, for a caller without CAP_FSETID or on any chown, the setuid bit
/// and the setgid bit of a group-executable file. (The mount takes this over from the kernel
/// with FUSE_HANDLE_KILLPRIV_V2, which spares a getxattr round trip per write.)
#[test]
fn writes_truncates_and_chowns_drop_setuid_setgid_and_capabilities() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let f = mnt.p("tool");
    let fp = f.display().to_string();
    fs::write(&f, b"#!/bin/sh\n").unwrap();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().mode() & 0o7777;
    let chmod = |p: &std::path::Path, m: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap()
    };
    // A v2 capability set (CAP_NET_BIND_SERVICE permitted), as setcap(8) writes it.
    let mut caps = 0x0200_0000u32.to_le_bytes().to_vec();
    caps.extend_from_slice(&[0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    chmod(&f, 0o6777);
    assert_eq!(setxattr(&f, "security.capability", &caps, 0), 0);
    assert_eq!(getxattr(&f, "security.capability"), Ok(caps.clone()));

    // Root (CAP_FSETID) keeps the bits; the capabilities go with any write.
    OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b"# root\n")
        .unwrap();
    assert_eq!(mode(&f), 0o6777);
    assert_eq!(getxattr(&f, "security.capability"), Err(libc::ENODATA));

    // Anyone else's write drops setuid and setgid; again after a chmod puts them back.
    run_as_nobody(&format!("echo '# nobody' >> {fp}"));
    assert_eq!(mode(&f), 0o0777);
    chmod(&f, 0o6777);
    run_as_nobody(&format!("echo '# again' >> {fp}"));
    assert_eq!(mode(&f), 0o0777);

    // Setgid without group execute marks mandatory locking, not a privilege: it stays.
    chmod(&f, 0o2767);
    run_as_nobody(&format!("echo '# locking' >> {fp}"));
    assert_eq!(mode(&f), 0o2767);

    // A truncate or fallocate by anyone else, and a chown by anyone, drop them too.
    chmod(&f, 0o6777);
    run_as_nobody(&format!("truncate -s 3 {fp}"));
    assert_eq!((mode(&f), fs::metadata(&f).unwrap().len()), (0o0777, 3));
    chmod(&f, 0o6777);
    run_as_nobody(&format!("fallocate -l 8192 {fp}"));
    assert_eq!((mode(&f), fs::metadata(&f).unwrap().len()), (0o0777, 8192));
    chmod(&f, 0o6777);
    assert_eq!(setxattr(&f, "security.capability", &caps, 0), 0);
    std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
    assert_eq!(mode(&f), 0o0777);
    assert_eq!(getxattr(&f, "security.capability"), Err(libc::ENODATA));
    // The kernel sees a dropped setuid bit at once: a setuid-root program that someone
    // else has just written no longer runs as root (its cached mode would say setuid).
    let id = mnt.p("id");
    fs::copy("/usr/bin/id", &id).unwrap();
    chmod(&id, 0o6777);
    let idp = id.display().to_string();
    let euid = run_as_nobody(&format!("printf '\\n' >> {idp} && {idp} -u"));
    assert_eq!((euid.trim(), mode(&id)), ("65534", 0o0777));
    // Directories keep their setgid bit across a chown.
    let d = mnt.p("shared");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o2775);
    std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
    assert_eq!(mode(&d), 0o2775);
    mnt.unmount();
}

fn setxattr(p: &std::path::Path, name: &str, value: &[u8], flags: i32) -> i32 {
    let (p, n) = (cpath(p), std::ffi::CString::new(name).unwrap());
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 {
        0
    } else {
        errno()
    }
}

fn getxattr(p: &std::path::Path, name: &str) -> Result<Vec<u8>, i32> {
    let (p, n) = (cpath(p), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 70_000];
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

#[test]
fn extended_attributes() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let f = mnt.p("f");
    fs::write(&f, b"").unwrap();
    assert_eq!(getxattr(&f, "user.a"), Err(libc::ENODATA));
    assert_eq!(setxattr(&f, "user.a", b"one", 0), 0);
    assert_eq!(
        setxattr(&f, "user.a", b"two", libc::XATTR_CREATE),
        libc::EEXIST
    );
    assert_eq!(
        setxattr(&f, "user.b", b"two", libc::XATTR_REPLACE),
        libc::ENODATA
    );
    assert_eq!(setxattr(&f, "user.a", b"three", libc::XATTR_REPLACE), 0);
    assert_eq!(setxattr(&f, "user.big", &vec![7u8; 65536], 0), 0);
    assert_eq!(getxattr(&f, "user.a").unwrap(), b"three");
    assert_eq!(getxattr(&f, "user.big").unwrap().len(), 65536);
    let cp = cpath(&f);
    let mut list = vec![0u8; 1024];
    let n = unsafe { libc::listxattr(cp.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(n > 0);
    let names: Vec<&[u8]> = list[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(names, vec![&b"user.a"[..], b"user.big"]);
    // A buffer too small is ERANGE; size 0 asks for the size.
    let mut small = [0u8; 2];
    let name = std::ffi::CString::new("user.a").unwrap();
    assert_eq!(
        unsafe { libc::getxattr(cp.as_ptr(), name.as_ptr(), small.as_mut_ptr().cast(), 2) },
        -1
    );
    assert_eq!(errno(), libc::ERANGE);
    assert_eq!(
        unsafe { libc::getxattr(cp.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) },
        5
    );
    assert_eq!(unsafe { libc::removexattr(cp.as_ptr(), name.as_ptr()) }, 0);
    assert_eq!(getxattr(&f, "user.a"), Err(libc::ENODATA));
    mnt.unmount();
    let mnt = vol.mount();
    assert_eq!(getxattr(&mnt.p("f"), "user.big").unwrap().len(), 65536);
    mnt.unmount();
}

#[test]
fn flock_and_fcntl_locks() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let path = mnt.p("lockfile");
    fs::write(&path, b"").unwrap();
    let a = File::open(&path).unwrap();
    let b = File::open(&path).unwrap();
    assert_eq!(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    assert_eq!(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        -1
    );
    assert_eq!(errno(), libc::EWOULDBLOCK);
    assert_eq!(unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_UN) }, 0);
    assert_eq!(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) },
        0
    );

    // fcntl locks are per process: hold one here and probe from a child process.
    let w = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut lk: libc::flock = unsafe { std::mem::zeroed() };
    lk.l_type = libc::F_WRLCK as i16;
    lk.l_whence = libc::SEEK_SET as i16;
    lk.l_start = 0;
    lk.l_len = 100;
    assert_eq!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETLK, &lk) }, 0);
    let probe = |start: u32| {
        std::process::Command::new("python3")
            .args(["-c", &format!(
                "import fcntl,sys\nf=open(sys.argv[1],'r+')\ntry:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 10, {start})\nexcept OSError:\n sys.exit(3)\n"
            )])
            .arg(&path)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(probe(50), Some(3), "overlapping range should be locked");
    assert_eq!(probe(200), Some(0), "disjoint range should be free");
    lk.l_type = libc::F_UNLCK as i16;
    assert_eq!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETLK, &lk) }, 0);
    assert_eq!(probe(50), Some(0));
    drop((a, b, w));
    mnt.unmount();
}

#[test]
fn fallocate_and_statfs() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.p("f"))
        .unwrap();
    let fd = f.as_raw_fd();
    assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 1 << 20) }, 0);
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    assert_eq!(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 4 << 20) },
        0
    );
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    f.write_all_at(&vec![0xabu8; 1 << 20], 0).unwrap();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(unsafe { libc::fallocate(fd, punch, 1000, 5000) }, 0);
    assert_eq!(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, (1 << 20) - 10, 20) },
        0
    );
    assert_eq!(f.metadata().unwrap().len(), (1 << 20) + 10);
    let mut back = vec![0u8; (1 << 20) + 10];
    f.read_exact_at(&mut back, 0).unwrap();
    for (i, b) in back.iter().enumerate() {
        let zero = (1000..6000).contains(&i) || i >= (1 << 20) - 10;
        assert_eq!(*b, if zero { 0 } else { 0xab }, "byte {i}");
    }
    assert_eq!(
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096) },
        -1
    );
    assert_eq!(errno(), libc::EOPNOTSUPP);
    drop(f);

    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let cp = cpath(&mnt.path);
    assert_eq!(unsafe { libc::statvfs(cp.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > st.f_bfree && st.f_bfree > 0);
    assert!(st.f_files > st.f_ffree && st.f_namemax == 255);
    mnt.unmount();
}

/// `cp -p` sets times through the open descriptor before closing it: they stay.
#[test]
fn cp_preserves_times() {
    let vol = Volume::new(64);
    let mnt = vol.mount();
    let src = vol.dir.path().join("src");
    fs::write(&src, vec![9u8; 300_000]).unwrap();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(t)
        .unwrap();
    let ok = std::process::Command::new("cp")
        .arg("-p")
        .arg(&src)
        .arg(mnt.p("copy"))
        .status()
        .unwrap();
    assert!(ok.success());
    let m = fs::metadata(mnt.p("copy")).unwrap();
    assert_eq!((m.mtime(), m.len()), (1_500_000_000, 300_000));
    mnt.unmount();
    let mnt = vol.mount();
    assert_eq!(fs::metadata(mnt.p("copy")).unwrap().mtime(), 1_500_000_000);
    mnt.unmount();
}
