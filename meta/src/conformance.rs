//! The conformance suite every metadata engine must pass unchanged.
//!
//! Each check takes a freshly made, unformatted engine. An engine's test file expands
//! [`meta_conformance_tests!`](crate::meta_conformance_tests) with a function that makes one, so
//! that each check is its own test.

use crate::*;

/// Expands to one `#[test]` per conformance check, each on an engine made by `$make`, an
/// expression callable as `$make()` that returns `(engine, guard)`; the guard lives until the
/// check ends (e.g. a temporary directory).
#[macro_export]
macro_rules! meta_conformance_tests {
    ($make:expr) => {
        $crate::meta_conformance_tests!(@each $make;
            format_and_root, format_mismatch, create_lookup_getattr, names_are_checked,
            mkdir_rmdir_nlink, unlink_frees_and_queues_slices, unlink_of_open_file_is_deferred,
            hard_links, link_limit, symlinks, rename_simple_and_replace, rename_flags, rename_directories,
            rename_into_own_subtree_fails, setattr_and_times, setgid_directories, xattrs,
            slices_and_length, truncate_clips_slices, fallocate_modes, readdir_cookies_are_stable,
            sessions_free_kept_files, slice_ids_are_unique, usage_counts, limits_are_enforced,
            referenced_slices_page_in_id_order, packed_slices_are_freed_with_their_last_file,
            namespace_check_passes_after_every_kind_of_change,
            trash_keeps_removed_files_without_bending_link_counts,
            slices_apply_in_commit_order_and_compact_safely,
            posix_locks_conflict_across_sessions);
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let (meta, _guard) = ($make)();
                $crate::conformance::$name(&*meta);
            }
        )*
    };
}

fn formatted(m: &dyn Meta) {
    m.format(&sample_format(), 0, 0).expect("format");
}

/// The format the checks use.
pub fn sample_format() -> Format {
    Format {
        name: "conf".into(),
        uuid: "00000000-0000-0000-0000-000000000000".into(),
        storage: "file".into(),
        bucket: "/nowhere".into(),
        block_size: 4 << 20,
        trash_days: 0,
        capacity: 0,
        inodes: 0,
        shards: 0,
        access_key: String::new(),
        secret_key: String::new(),
    }
}

/// A new node of `kind` and `mode` owned by 1000:1000, for checks and tests.
pub fn node(kind: FileKind, mode: u32) -> NewNode {
    NewNode {
        kind,
        mode,
        uid: 1000,
        gid: 1000,
        rdev: 0,
        symlink: None,
        groups: vec![1000],
    }
}

fn file(m: &dyn Meta, parent: Ino, name: &str) -> Attr {
    sample_file(m, parent, name)
}

/// Creates an empty file `name` in `parent`, owned by 1000:1000, for checks and tests.
pub fn sample_file(m: &dyn Meta, parent: Ino, name: &str) -> Attr {
    m.mknod(parent, name.as_bytes(), &node(FileKind::File, 0o644))
        .expect("create file")
}

fn dir(m: &dyn Meta, parent: Ino, name: &str) -> Attr {
    m.mknod(parent, name.as_bytes(), &node(FileKind::Dir, 0o755))
        .expect("mkdir")
}

fn closed(_: Ino) -> bool {
    false
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> i32 {
    r.expect_err("operation should fail").errno()
}

fn names(m: &dyn Meta, d: Ino) -> Vec<String> {
    let mut out: Vec<String> = m
        .readdir(d, 0, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect();
    out.sort();
    out
}

fn data_slice(id: u64, pos: u32, len: u32) -> Slice {
    Slice {
        id,
        size: len,
        off: 0,
        len,
        pos,
    }
}

/// A new volume has a root directory and keeps its settings.
pub fn format_and_root(m: &dyn Meta) {
    assert!(matches!(m.load_format(), Err(MetaError::NotFormatted)));
    m.format(&sample_format(), 7, 8).unwrap();
    assert_eq!(m.load_format().unwrap(), sample_format());
    let root = m.getattr(ROOT_INO).unwrap();
    assert_eq!(
        (root.kind, root.nlink, root.uid, root.gid),
        (FileKind::Dir, 2, 7, 8)
    );
    assert_eq!(m.lookup(ROOT_INO, b"..").unwrap().ino, ROOT_INO);
    // Formatting again with the same layout is accepted and keeps the data.
    file(m, ROOT_INO, "kept");
    m.format(&sample_format(), 0, 0).unwrap();
    m.lookup(ROOT_INO, b"kept").unwrap();
    // The changeable settings take the new values; the rest stays as formatted.
    let changed = Format {
        uuid: "11111111-1111-4111-8111-111111111111".into(),
        capacity: 1 << 40,
        inodes: 1000,
        access_key: "AK".into(),
        secret_key: "sealed-v1:xyz".into(),
        ..sample_format()
    };
    m.format(&changed, 0, 0).unwrap();
    let now = m.load_format().unwrap();
    assert_eq!(now.uuid, sample_format().uuid);
    assert_eq!((now.capacity, now.inodes), (1 << 40, 1000));
    assert_eq!(
        (now.access_key.as_str(), now.secret_key.as_str()),
        ("AK", "sealed-v1:xyz")
    );
    m.format(&sample_format(), 0, 0).unwrap();
    assert_eq!(m.load_format().unwrap(), sample_format());
}

/// Formatting over a volume with another layout fails and changes nothing.
pub fn format_mismatch(m: &dyn Meta) {
    formatted(m);
    let mut other = sample_format();
    other.block_size = 1 << 20;
    assert!(matches!(
        m.format(&other, 0, 0),
        Err(MetaError::FormatMismatch(_))
    ));
    assert_eq!(m.load_format().unwrap().block_size, 4 << 20);
}

/// Created inodes are found by name and carry what was asked.
pub fn create_lookup_getattr(m: &dyn Meta) {
    formatted(m);
    let a = file(m, ROOT_INO, "a");
    assert_eq!(
        (a.kind, a.mode, a.uid, a.gid, a.nlink, a.length),
        (FileKind::File, 0o644, 1000, 1000, 1, 0)
    );
    assert_eq!(m.lookup(ROOT_INO, b"a").unwrap(), a);
    assert_eq!(m.getattr(a.ino).unwrap(), a);
    assert_eq!(
        err(m.mknod(ROOT_INO, b"a", &node(FileKind::File, 0o600))),
        libc::EEXIST
    );
    assert_eq!(err(m.lookup(ROOT_INO, b"b")), libc::ENOENT);
    assert_eq!(
        err(m.mknod(a.ino, b"x", &node(FileKind::File, 0o600))),
        libc::ENOTDIR
    );
    let mut fifo = node(FileKind::Fifo, 0o600);
    fifo.rdev = 0;
    assert_eq!(m.mknod(ROOT_INO, b"p", &fifo).unwrap().kind, FileKind::Fifo);
}

/// Names too long or malformed are refused.
pub fn names_are_checked(m: &dyn Meta) {
    formatted(m);
    let long = "x".repeat(NAME_MAX + 1);
    assert_eq!(
        err(m.mknod(ROOT_INO, long.as_bytes(), &node(FileKind::File, 0o644))),
        libc::ENAMETOOLONG
    );
    assert_eq!(err(m.lookup(ROOT_INO, long.as_bytes())), libc::ENAMETOOLONG);
    file(m, ROOT_INO, &"y".repeat(NAME_MAX));
}

/// Directories count their subdirectories in nlink and are removed only when empty. The
/// parent's attributes a creation gives back are those it stored.
pub fn mkdir_rmdir_nlink(m: &dyn Meta) {
    formatted(m);
    let d = dir(m, ROOT_INO, "d");
    assert_eq!(d.nlink, 2);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 3);
    for (name, kind) in [("d2", FileKind::Dir), ("f2", FileKind::File)] {
        let (a, parent) = m
            .mknod_with_parent(d.ino, name.as_bytes(), &node(kind, 0o755))
            .unwrap();
        assert_eq!(a, m.lookup(d.ino, name.as_bytes()).unwrap());
        assert_eq!(parent, m.getattr(d.ino).unwrap());
    }
    assert_eq!(m.getattr(d.ino).unwrap().nlink, 3);
    m.rmdir(d.ino, b"d2").unwrap();
    m.unlink(d.ino, b"f2", 1, &closed).unwrap();
    dir(m, d.ino, "sub");
    file(m, d.ino, "f");
    assert_eq!(m.getattr(d.ino).unwrap().nlink, 3);
    assert_eq!(err(m.rmdir(ROOT_INO, b"d")), libc::ENOTEMPTY);
    assert_eq!(err(m.rmdir(d.ino, b"f")), libc::ENOTDIR);
    assert_eq!(err(m.unlink(d.ino, b"sub", 1, &closed)), libc::EISDIR);
    m.rmdir(d.ino, b"sub").unwrap();
    m.unlink(d.ino, b"f", 1, &closed).unwrap();
    m.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 2);
    assert_eq!(err(m.getattr(d.ino)), libc::ENOENT);
}

/// Unlinking the last name frees the inode and queues its data slices for deletion.
pub fn unlink_frees_and_queues_slices(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let id = m.next_slice_ids(1).unwrap();
    m.write_slices(
        f.ino,
        &[ChunkSlice {
            chunk: 0,
            slice: data_slice(id, 0, 100),
        }],
        Timestamp::now(),
    )
    .unwrap();
    m.unlink(ROOT_INO, b"f", 1, &closed).unwrap();
    assert_eq!(err(m.getattr(f.ino)), libc::ENOENT);
    assert_eq!(
        m.pending_deletions(0, 10).unwrap(),
        vec![FreedSlice { id, size: 100 }]
    );
    // Paging past an id skips it (a slice whose deletion keeps failing blocks nothing).
    assert!(m.pending_deletions(id, 10).unwrap().is_empty());
    m.ack_deletions(&[id]).unwrap();
    assert!(m.pending_deletions(0, 10).unwrap().is_empty());
}

/// An unlinked file that is open stays until its session releases it.
pub fn unlink_of_open_file_is_deferred(m: &dyn Meta) {
    formatted(m);
    let sid = m.new_session(&sample_session()).unwrap();
    let f = file(m, ROOT_INO, "f");
    let id = m.next_slice_ids(1).unwrap();
    m.write_slices(
        f.ino,
        &[ChunkSlice {
            chunk: 0,
            slice: data_slice(id, 0, 10),
        }],
        Timestamp::now(),
    )
    .unwrap();
    let open = |ino: Ino| ino == f.ino;
    m.unlink(ROOT_INO, b"f", sid, &open).unwrap();
    assert_eq!(err(m.lookup(ROOT_INO, b"f")), libc::ENOENT);
    let a = m.getattr(f.ino).unwrap();
    assert_eq!((a.nlink, a.length), (0, 10));
    assert_eq!(m.read_chunk(f.ino, 0).unwrap().len(), 1);
    assert!(m.pending_deletions(0, 10).unwrap().is_empty());
    m.release(f.ino, sid).unwrap();
    assert_eq!(err(m.getattr(f.ino)), libc::ENOENT);
    assert_eq!(m.pending_deletions(0, 10).unwrap().len(), 1);
}

/// A session record for checks and tests that need one.
pub fn sample_session() -> SessionInfo {
    SessionInfo {
        sid: 0,
        host: "h".into(),
        pid: 1,
        mountpoint: "/mnt".into(),
        version: "t".into(),
        started: 0,
        heartbeat: 0,
        metrics: "127.0.0.1:9567".into(),
    }
}

/// Hard links share one inode and count in nlink; directories cannot be linked.
pub fn hard_links(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let d = dir(m, ROOT_INO, "d");
    let l = m.link(f.ino, d.ino, b"g").unwrap();
    assert_eq!((l.ino, l.nlink), (f.ino, 2));
    assert!(l.ctime >= f.ctime);
    assert_eq!(err(m.link(d.ino, ROOT_INO, b"dl")), libc::EPERM);
    assert_eq!(err(m.link(f.ino, ROOT_INO, b"f")), libc::EEXIST);
    m.unlink(ROOT_INO, b"f", 1, &closed).unwrap();
    assert_eq!(m.lookup(d.ino, b"g").unwrap().nlink, 1);
    assert!(m.pending_deletions(0, 10).unwrap().is_empty());
}

/// A file takes at most [`LINK_MAX`] names; one more is EMLINK.
pub fn link_limit(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let d = dir(m, ROOT_INO, "d");
    for i in 1..LINK_MAX {
        m.link(f.ino, d.ino, format!("l{i}").as_bytes()).unwrap();
    }
    assert_eq!(m.getattr(f.ino).unwrap().nlink, LINK_MAX);
    assert_eq!(err(m.link(f.ino, d.ino, b"one-more")), libc::EMLINK);
    m.unlink(d.ino, b"l1", 1, &closed).unwrap();
    m.link(f.ino, d.ino, b"one-more").unwrap();
}

/// Symlinks keep their target verbatim.
pub fn symlinks(m: &dyn Meta) {
    formatted(m);
    let mut n = node(FileKind::Symlink, 0o777);
    n.symlink = Some(b"../some/where".to_vec());
    let s = m.mknod(ROOT_INO, b"s", &n).unwrap();
    assert_eq!((s.kind, s.length), (FileKind::Symlink, 13));
    assert_eq!(m.readlink(s.ino).unwrap(), b"../some/where");
    let f = file(m, ROOT_INO, "f");
    assert_eq!(err(m.readlink(f.ino)), libc::EINVAL);
    n.symlink = Some(vec![b'a'; SYMLINK_MAX + 1]);
    assert_eq!(err(m.mknod(ROOT_INO, b"t", &n)), libc::ENAMETOOLONG);
}

/// Rename moves a name, replacing a target of a compatible kind atomically.
pub fn rename_simple_and_replace(m: &dyn Meta) {
    formatted(m);
    let a = file(m, ROOT_INO, "a");
    let b = file(m, ROOT_INO, "b");
    let none = RenameFlags::default();
    m.rename(ROOT_INO, b"a", ROOT_INO, b"c", none, 1, &closed)
        .unwrap();
    assert_eq!(m.lookup(ROOT_INO, b"c").unwrap().ino, a.ino);
    assert_eq!(err(m.lookup(ROOT_INO, b"a")), libc::ENOENT);
    m.rename(ROOT_INO, b"c", ROOT_INO, b"b", none, 1, &closed)
        .unwrap();
    assert_eq!(m.lookup(ROOT_INO, b"b").unwrap().ino, a.ino);
    assert_eq!(err(m.getattr(b.ino)), libc::ENOENT);
    assert_eq!(names(m, ROOT_INO), vec!["b"]);
    // Two names of one inode: nothing happens.
    m.link(a.ino, ROOT_INO, b"h").unwrap();
    m.rename(ROOT_INO, b"b", ROOT_INO, b"h", none, 1, &closed)
        .unwrap();
    assert_eq!(names(m, ROOT_INO), vec!["b", "h"]);
    assert_eq!(
        err(m.rename(ROOT_INO, b"zz", ROOT_INO, b"y", none, 1, &closed)),
        libc::ENOENT
    );
}

/// RENAME_NOREPLACE and RENAME_EXCHANGE.
pub fn rename_flags(m: &dyn Meta) {
    formatted(m);
    let a = file(m, ROOT_INO, "a");
    let d = dir(m, ROOT_INO, "d");
    let noreplace = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    let exchange = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    assert_eq!(
        err(m.rename(ROOT_INO, b"a", ROOT_INO, b"d", noreplace, 1, &closed)),
        libc::EEXIST
    );
    assert_eq!(
        err(m.rename(ROOT_INO, b"a", ROOT_INO, b"zz", exchange, 1, &closed)),
        libc::ENOENT
    );
    let sub = dir(m, d.ino, "sub");
    m.rename(ROOT_INO, b"a", d.ino, b"sub", exchange, 1, &closed)
        .unwrap();
    assert_eq!(m.lookup(ROOT_INO, b"a").unwrap().ino, sub.ino);
    assert_eq!(m.lookup(d.ino, b"sub").unwrap().ino, a.ino);
    // The directory moved from d to the root: link counts follow.
    assert_eq!(m.getattr(d.ino).unwrap().nlink, 2);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 4);
    assert_eq!(m.lookup(ROOT_INO, b"a").unwrap().parent, ROOT_INO);
    assert_eq!(m.lookup(sub.ino, b"..").unwrap().ino, ROOT_INO);
}

/// Directory renames respect kinds, emptiness and link counts.
pub fn rename_directories(m: &dyn Meta) {
    formatted(m);
    let none = RenameFlags::default();
    let a = dir(m, ROOT_INO, "a");
    let b = dir(m, ROOT_INO, "b");
    file(m, ROOT_INO, "f");
    let full = dir(m, ROOT_INO, "full");
    file(m, full.ino, "x");
    assert_eq!(
        err(m.rename(ROOT_INO, b"a", ROOT_INO, b"f", none, 1, &closed)),
        libc::ENOTDIR
    );
    assert_eq!(
        err(m.rename(ROOT_INO, b"f", ROOT_INO, b"a", none, 1, &closed)),
        libc::EISDIR
    );
    assert_eq!(
        err(m.rename(ROOT_INO, b"a", ROOT_INO, b"full", none, 1, &closed)),
        libc::ENOTEMPTY
    );
    m.rename(ROOT_INO, b"a", b.ino, b"a2", none, 1, &closed)
        .unwrap();
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 4);
    assert_eq!(m.getattr(b.ino).unwrap().nlink, 3);
    assert_eq!(m.lookup(a.ino, b"..").unwrap().ino, b.ino);
    // Replace an empty directory.
    let e = dir(m, ROOT_INO, "e");
    m.rename(b.ino, b"a2", ROOT_INO, b"e", none, 1, &closed)
        .unwrap();
    assert_eq!(err(m.getattr(e.ino)), libc::ENOENT);
    assert_eq!(m.getattr(ROOT_INO).unwrap().nlink, 5);
    assert_eq!(m.getattr(b.ino).unwrap().nlink, 2);
}

/// A directory never moves below itself.
pub fn rename_into_own_subtree_fails(m: &dyn Meta) {
    formatted(m);
    let a = dir(m, ROOT_INO, "a");
    let b = dir(m, a.ino, "b");
    let c = dir(m, b.ino, "c");
    let none = RenameFlags::default();
    assert_eq!(
        err(m.rename(ROOT_INO, b"a", c.ino, b"x", none, 1, &closed)),
        libc::EINVAL
    );
    assert_eq!(
        err(m.rename(ROOT_INO, b"a", a.ino, b"x", none, 1, &closed)),
        libc::EINVAL
    );
    m.rename(b.ino, b"c", ROOT_INO, b"c", none, 1, &closed)
        .unwrap();
}

/// setattr changes what is asked and moves ctime.
pub fn setattr_and_times(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let t = Timestamp {
        sec: 1_000_000,
        nsec: 5,
    };
    let a = m
        .setattr(
            f.ino,
            &SetAttr {
                mode: Some(0o4711),
                uid: Some(5),
                gid: Some(6),
                atime: Some(t),
                mtime: Some(t),
                ctime: None,
            },
        )
        .unwrap();
    assert_eq!(
        (a.mode, a.uid, a.gid, a.atime, a.mtime),
        (0o4711, 5, 6, t, t)
    );
    assert!(a.ctime > t);
    assert_eq!(m.getattr(f.ino).unwrap(), a);
    let before = m.getattr(ROOT_INO).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    file(m, ROOT_INO, "g");
    let after = m.getattr(ROOT_INO).unwrap();
    assert!(after.mtime > before.mtime && after.ctime > before.ctime);
    assert_eq!(err(m.setattr(999_999, &SetAttr::default())), libc::ENOENT);
}

/// Inodes made in a setgid directory take its group; subdirectories inherit the bit.
pub fn setgid_directories(m: &dyn Meta) {
    formatted(m);
    let d = dir(m, ROOT_INO, "d");
    m.setattr(
        d.ino,
        &SetAttr {
            mode: Some(0o2775),
            gid: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    let f = file(m, d.ino, "f");
    assert_eq!(f.gid, 50);
    let sub = dir(m, d.ino, "sub");
    assert_eq!((sub.gid, sub.mode & libc::S_ISGID), (50, libc::S_ISGID));
    // A non-member's new setgid file loses the bit.
    let g = m.mknod(d.ino, b"g", &node(FileKind::File, 0o2755)).unwrap();
    assert_eq!(g.mode, 0o755);
    let mut member = node(FileKind::File, 0o2755);
    member.groups.push(50);
    assert_eq!(m.mknod(d.ino, b"h", &member).unwrap().mode, 0o2755);
}

/// Extended attributes with create/replace semantics.
pub fn xattrs(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    assert_eq!(err(m.getxattr(f.ino, b"user.a")), libc::ENODATA);
    m.setxattr(f.ino, b"user.a", b"1", XattrMode::Any).unwrap();
    assert_eq!(
        err(m.setxattr(f.ino, b"user.a", b"2", XattrMode::Create)),
        libc::EEXIST
    );
    assert_eq!(
        err(m.setxattr(f.ino, b"user.b", b"2", XattrMode::Replace)),
        libc::ENODATA
    );
    m.setxattr(f.ino, b"user.a", b"3", XattrMode::Replace)
        .unwrap();
    m.setxattr(f.ino, b"user.b", b"", XattrMode::Create)
        .unwrap();
    assert_eq!(m.getxattr(f.ino, b"user.a").unwrap(), b"3");
    assert_eq!(m.getxattr(f.ino, b"user.b").unwrap(), b"");
    assert_eq!(
        m.listxattr(f.ino).unwrap(),
        vec![b"user.a".to_vec(), b"user.b".to_vec()]
    );
    m.removexattr(f.ino, b"user.a").unwrap();
    assert_eq!(err(m.removexattr(f.ino, b"user.a")), libc::ENODATA);
    assert_eq!(
        err(m.setxattr(
            f.ino,
            b"user.big",
            &vec![0; XATTR_VALUE_MAX + 1],
            XattrMode::Any
        )),
        libc::E2BIG
    );
}

/// Committed slices come back in id order and extend the length.
pub fn slices_and_length(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let first = m.next_slice_ids(3).unwrap();
    let t = Timestamp { sec: 42, nsec: 0 };
    let s2 = data_slice(first + 2, 10, 5);
    let s0 = data_slice(first, 0, 12);
    let s1 = data_slice(first + 1, 0, 7);
    let a = m
        .write_slices(
            f.ino,
            &[
                ChunkSlice {
                    chunk: 0,
                    slice: s2,
                },
                ChunkSlice {
                    chunk: 0,
                    slice: s0,
                },
                ChunkSlice {
                    chunk: 2,
                    slice: s1,
                },
            ],
            t,
        )
        .unwrap();
    assert_eq!(a.length, 2 * CHUNK_SIZE + 7);
    assert_eq!((a.mtime, a.ctime), (t, t));
    // In the order given, not by id.
    assert_eq!(m.read_chunk(f.ino, 0).unwrap(), vec![s2, s0]);
    assert_eq!(m.read_chunk(f.ino, 1).unwrap(), vec![]);
    // A commit never shrinks a file.
    let s3 = data_slice(m.next_slice_ids(1).unwrap(), 0, 1);
    assert_eq!(
        m.write_slices(
            f.ino,
            &[ChunkSlice {
                chunk: 0,
                slice: s3
            }],
            t
        )
        .unwrap()
        .length,
        a.length
    );
}

/// Truncation removes slices past the end and cuts the one straddling it.
pub fn truncate_clips_slices(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let id = m.next_slice_ids(2).unwrap();
    let s0 = data_slice(id, 0, 1000);
    let s1 = data_slice(id + 1, 0, 1000);
    m.write_slices(
        f.ino,
        &[
            ChunkSlice {
                chunk: 0,
                slice: s0,
            },
            ChunkSlice {
                chunk: 1,
                slice: s1,
            },
        ],
        Timestamp::now(),
    )
    .unwrap();
    let a = m.truncate(f.ino, 500, Timestamp::now()).unwrap();
    assert_eq!(a.length, 500);
    assert_eq!(
        m.read_chunk(f.ino, 0).unwrap(),
        vec![Slice { len: 500, ..s0 }]
    );
    assert!(m.read_chunk(f.ino, 1).unwrap().is_empty());
    assert_eq!(
        m.pending_deletions(0, 10).unwrap(),
        vec![FreedSlice {
            id: id + 1,
            size: 1000
        }]
    );
    assert_eq!(
        m.truncate(f.ino, 10 * CHUNK_SIZE, Timestamp::now())
            .unwrap()
            .length,
        10 * CHUNK_SIZE
    );
    assert_eq!(m.read_chunk(f.ino, 0).unwrap().len(), 1);
    let d = dir(m, ROOT_INO, "d");
    assert_eq!(err(m.truncate(d.ino, 0, Timestamp::now())), libc::EISDIR);
}

/// fallocate extends, keeps size, punches holes and zeroes ranges.
pub fn fallocate_modes(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let alloc = |keep_size| FallocMode::Allocate { keep_size };
    assert_eq!(
        m.fallocate(f.ino, alloc(false), 0, 4096, &[])
            .unwrap()
            .length,
        4096
    );
    assert_eq!(
        m.fallocate(f.ino, alloc(true), 0, 1 << 20, &[])
            .unwrap()
            .length,
        4096
    );
    let ids = m.next_slice_ids(4).unwrap();
    let a = m
        .fallocate(f.ino, FallocMode::PunchHole, 100, 10_000, &[ids])
        .unwrap();
    assert_eq!(a.length, 4096);
    let zeros = m.read_chunk(f.ino, 0).unwrap();
    assert_eq!(zeros.len(), 1);
    assert!(zeros[0].is_zero());
    assert_eq!((zeros[0].id, zeros[0].pos, zeros[0].len), (ids, 100, 3996));
    let zero_range = FallocMode::ZeroRange { keep_size: false };
    let a = m
        .fallocate(f.ino, zero_range, CHUNK_SIZE - 10, 20, &[ids + 1, ids + 2])
        .unwrap();
    assert_eq!(a.length, CHUNK_SIZE + 10);
    assert_eq!(m.read_chunk(f.ino, 1).unwrap()[0].id, ids + 2);
    // Fewer ids than chunks touched is refused.
    assert_eq!(
        err(m.fallocate(f.ino, zero_range, 0, CHUNK_SIZE + 1, &[ids + 3])),
        libc::EINVAL
    );
}

/// Listing resumes after a cookie even when entries come and go in between.
pub fn readdir_cookies_are_stable(m: &dyn Meta) {
    formatted(m);
    let d = dir(m, ROOT_INO, "d");
    for i in 0..50 {
        file(m, d.ino, &format!("f{i:02}"));
    }
    let first = m.readdir(d.ino, 0, 20).unwrap();
    assert_eq!(first.len(), 20);
    let resume = first.last().unwrap().cookie;
    // Remove some already listed, some not yet listed, and add new ones.
    m.unlink(d.ino, b"f00", 1, &closed).unwrap();
    m.unlink(d.ino, b"f30", 1, &closed).unwrap();
    file(m, d.ino, "new");
    let mut rest = Vec::new();
    let mut cookie = resume;
    loop {
        let page = m.readdir(d.ino, cookie, 7).unwrap();
        let Some(last) = page.last() else { break };
        cookie = last.cookie;
        rest.extend(page.into_iter().map(|e| String::from_utf8(e.name).unwrap()));
    }
    let mut expected: Vec<String> = (20..50)
        .filter(|i| *i != 30)
        .map(|i| format!("f{i:02}"))
        .collect();
    expected.push("new".into());
    assert_eq!(rest, expected);
    // No limit at all (callers pass usize::MAX) lists everything.
    assert_eq!(m.readdir(d.ino, 0, usize::MAX).unwrap().len(), 49);
    assert_eq!(m.pending_deletions(0, usize::MAX).unwrap(), vec![]);
    assert_eq!(m.referenced_slices(0, usize::MAX).unwrap(), vec![]);
    assert_eq!(err(m.readdir(first[1].ino, 0, 10)), libc::ENOTDIR);
}

/// Closing a session frees the unlinked files it kept open.
pub fn sessions_free_kept_files(m: &dyn Meta) {
    formatted(m);
    let sid = m.new_session(&sample_session()).unwrap();
    let other = m.new_session(&sample_session()).unwrap();
    let listed = m.sessions().unwrap();
    assert_eq!(listed.len(), 2);
    let mut expected = sample_session();
    expected.sid = sid;
    assert_eq!(listed[0].sid, sid);
    assert_eq!(
        (&listed[0].host, listed[0].pid, &listed[0].mountpoint),
        (&expected.host, expected.pid, &expected.mountpoint)
    );
    assert_eq!(
        (&listed[0].version, &listed[0].metrics),
        (&expected.version, &expected.metrics)
    );
    assert!(listed[0].started > 0 && listed[0].heartbeat >= listed[0].started);
    m.heartbeat(sid).unwrap();
    let f = file(m, ROOT_INO, "f");
    m.unlink(ROOT_INO, b"f", sid, &|_| true).unwrap();
    m.getattr(f.ino).unwrap();
    m.release(f.ino, other).unwrap();
    m.getattr(f.ino).unwrap();
    m.close_session(sid).unwrap();
    assert_eq!(err(m.getattr(f.ino)), libc::ENOENT);
    assert_eq!(
        m.sessions()
            .unwrap()
            .iter()
            .map(|s| s.sid)
            .collect::<Vec<_>>(),
        vec![other]
    );
}

/// Slice ids are never handed out twice.
pub fn slice_ids_are_unique(m: &dyn Meta) {
    formatted(m);
    let a = m.next_slice_ids(10).unwrap();
    let b = m.next_slice_ids(1).unwrap();
    let c = m.next_slice_ids(5).unwrap();
    assert!(a >= 1);
    assert_eq!(b, a + 10);
    assert_eq!(c, b + 1);
}

/// Usage follows file lengths (in 4 KiB units) and inode counts.
pub fn usage_counts(m: &dyn Meta) {
    formatted(m);
    assert_eq!(
        m.usage().unwrap(),
        Usage {
            space: 0,
            inodes: 1
        }
    );
    let f = file(m, ROOT_INO, "f");
    m.truncate(f.ino, 5000, Timestamp::now()).unwrap();
    assert_eq!(
        m.usage().unwrap(),
        Usage {
            space: 8192,
            inodes: 2
        }
    );
    m.unlink(ROOT_INO, b"f", 1, &closed).unwrap();
    assert_eq!(
        m.usage().unwrap(),
        Usage {
            space: 0,
            inodes: 1
        }
    );
}

/// The capacity and inode limits of the format are enforced.
pub fn limits_are_enforced(m: &dyn Meta) {
    let mut f = sample_format();
    f.capacity = 1 << 20;
    f.inodes = 3;
    m.format(&f, 0, 0).unwrap();
    let a = file(m, ROOT_INO, "a");
    m.truncate(a.ino, 1 << 20, Timestamp::now()).unwrap();
    assert_eq!(
        err(m.truncate(a.ino, (1 << 20) + 1, Timestamp::now())),
        libc::ENOSPC
    );
    let s = data_slice(m.next_slice_ids(1).unwrap(), 0, 10);
    assert_eq!(
        err(m.write_slices(
            a.ino,
            &[ChunkSlice { chunk: 1, slice: s }],
            Timestamp::now()
        )),
        libc::ENOSPC
    );
    m.truncate(a.ino, 0, Timestamp::now()).unwrap();
    file(m, ROOT_INO, "b");
    assert_eq!(
        err(m.mknod(ROOT_INO, b"c", &node(FileKind::File, 0o644))),
        libc::ENOSPC
    );
}

/// Several files written in one call may share a slice (a packed object): each reads its own
/// part, the slice is listed once, and its objects are queued for deletion only when the last
/// file drops it, whichever way (unlink, overwrite, truncate, compaction). A call with a bad
/// file, or with one file twice, changes nothing.
pub fn packed_slices_are_freed_with_their_last_file(m: &dyn Meta) {
    formatted(m);
    let files: Vec<Attr> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| file(m, ROOT_INO, n))
        .collect();
    let pack = m.next_slice_ids(1).unwrap();
    let part = |i: u32| Slice {
        id: pack,
        size: 400,
        off: i * 100,
        len: 100,
        pos: 0,
    };
    let mtime = Timestamp { sec: 5, nsec: 6 };
    let writes: Vec<FileWrite> = (0..4)
        .map(|i| FileWrite {
            ino: files[i as usize].ino,
            slices: vec![ChunkSlice {
                chunk: 0,
                slice: part(i),
            }],
            mtime,
        })
        .collect();
    let attrs = m.write_files(&writes).unwrap();
    assert_eq!(
        attrs
            .iter()
            .map(|a| (a.ino, a.length, a.mtime))
            .collect::<Vec<_>>(),
        files
            .iter()
            .map(|f| (f.ino, 100, mtime))
            .collect::<Vec<_>>()
    );
    assert_eq!(m.read_chunk(files[1].ino, 0).unwrap(), vec![part(1)]);
    let refs = m.referenced_slices(0, 100).unwrap();
    assert_eq!(
        refs.iter().map(|r| (r.id, r.size)).collect::<Vec<_>>(),
        [(pack, 400)]
    );
    let queued = || m.pending_deletions(0, 10).unwrap();
    let chunk = |slice| [ChunkSlice { chunk: 0, slice }];
    // Compacted away from one file: the others still reference it.
    let patch = m.next_slice_ids(2).unwrap();
    m.write_slices(files[0].ino, &chunk(data_slice(patch, 0, 10)), mtime)
        .unwrap();
    let merged = data_slice(patch + 1, 0, 100);
    let replaced = [part(0), data_slice(patch, 0, 10)];
    assert!(m.compact_chunk(files[0].ino, 0, &replaced, merged).unwrap());
    assert_eq!(m.read_chunk(files[0].ino, 0).unwrap(), vec![merged]);
    let freed = |id, size| FreedSlice { id, size };
    assert_eq!(queued(), vec![freed(patch, 10)]);
    // Unlinked (the compacted file), overwritten, truncated away: others still reference it.
    m.unlink(ROOT_INO, b"a", 1, &closed).unwrap();
    assert_eq!(queued(), vec![freed(patch, 10), freed(patch + 1, 100)]);
    let over = m.next_slice_ids(1).unwrap();
    m.write_slices(files[1].ino, &chunk(data_slice(over, 0, 100)), mtime)
        .unwrap();
    m.truncate(files[2].ino, 0, mtime).unwrap();
    assert_eq!(queued(), vec![freed(patch, 10), freed(patch + 1, 100)]);
    assert_eq!(m.read_chunk(files[3].ino, 0).unwrap(), vec![part(3)]);
    m.unlink(ROOT_INO, b"d", 1, &closed).unwrap();
    assert_eq!(
        queued(),
        vec![freed(pack, 400), freed(patch, 10), freed(patch + 1, 100)]
    );
    assert_eq!(
        m.referenced_slices(0, 100).unwrap(),
        vec![SliceRef {
            id: over,
            size: 100,
            ino: files[1].ino
        }]
    );
    // All or nothing: a directory among the files fails the call before anything is written.
    let e = file(m, ROOT_INO, "e");
    let d = dir(m, ROOT_INO, "dir");
    let next = m.next_slice_ids(1).unwrap();
    let refused = |inos: [Ino; 2]| {
        let writes = inos.map(|ino| FileWrite {
            ino,
            slices: chunk(data_slice(next, 0, 10)).to_vec(),
            mtime,
        });
        assert_eq!(err(m.write_files(&writes)), libc::EINVAL, "{inos:?}");
        assert_eq!(m.getattr(e.ino).unwrap().length, 0);
        assert!(m.read_chunk(e.ino, 0).unwrap().is_empty());
    };
    refused([e.ino, d.ino]);
    // So does a file given twice: each file's reference to a shared slice counts once.
    refused([e.ino, e.ino]);
    assert_eq!(m.write_files(&[]).unwrap(), vec![]);
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
}

/// Referenced slices come once each, in id order, without zero slices, and leave when freed.
pub fn referenced_slices_page_in_id_order(m: &dyn Meta) {
    formatted(m);
    let a = file(m, ROOT_INO, "a");
    let b = file(m, ROOT_INO, "b");
    let first = m.next_slice_ids(5).unwrap();
    let commit = |ino, chunk, slice| {
        m.write_slices(ino, &[ChunkSlice { chunk, slice }], Timestamp::now())
            .unwrap();
    };
    commit(b.ino, 0, data_slice(first + 3, 0, 10));
    commit(a.ino, 0, data_slice(first, 0, 100));
    commit(a.ino, 1, data_slice(first + 1, 0, 200));
    let mut zero = data_slice(first + 2, 50, 10);
    zero.size = 0;
    commit(a.ino, 0, zero);
    let all = m.referenced_slices(0, 100).unwrap();
    assert_eq!(
        all,
        vec![
            SliceRef {
                id: first,
                size: 100,
                ino: a.ino
            },
            SliceRef {
                id: first + 1,
                size: 200,
                ino: a.ino
            },
            SliceRef {
                id: first + 3,
                size: 10,
                ino: b.ino
            },
        ]
    );
    assert_eq!(m.referenced_slices(first, 1).unwrap(), all[1..2]);
    assert!(m.referenced_slices(first + 3, 100).unwrap().is_empty());
    m.unlink(ROOT_INO, b"a", 1, &closed).unwrap();
    assert_eq!(m.referenced_slices(0, 100).unwrap(), all[2..]);
}

/// A namespace shaped by every kind of operation passes the check, which changes nothing.
pub fn namespace_check_passes_after_every_kind_of_change(m: &dyn Meta) {
    formatted(m);
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
    let none = RenameFlags::default();
    let d = dir(m, ROOT_INO, "d");
    let sub = dir(m, d.ino, "sub");
    let f = file(m, sub.ino, "f");
    m.link(f.ino, ROOT_INO, b"f2").unwrap();
    let id = m.next_slice_ids(1).unwrap();
    m.write_slices(
        f.ino,
        &[ChunkSlice {
            chunk: 0,
            slice: data_slice(id, 0, 5000),
        }],
        Timestamp::now(),
    )
    .unwrap();
    m.rename(d.ino, b"sub", ROOT_INO, b"moved", none, 1, &closed)
        .unwrap();
    let g = file(m, ROOT_INO, "g");
    let sid = m.new_session(&sample_session()).unwrap();
    m.unlink(ROOT_INO, b"g", sid, &|ino| ino == g.ino).unwrap();
    m.truncate(f.ino, 10, Timestamp::now()).unwrap();
    m.rmdir(ROOT_INO, b"d").unwrap();
    let before = m.usage().unwrap();
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
    assert_eq!(m.check_namespace(true).unwrap(), vec![]);
    assert_eq!(m.usage().unwrap(), before);
    assert_eq!(m.getattr(g.ino).unwrap().nlink, 0, "still held open");
}

/// With a trash, the last name of a file moves it to `.trash/<hour>/<parent>-<ino>-<name>`
/// with link count 0 (trash entries are not links); earlier unlinks of hard links, and
/// everything else, behave as without a trash. A rename out restores it; an unlink in the
/// trash frees it; nothing can be created in the trash.
pub fn trash_keeps_removed_files_without_bending_link_counts(m: &dyn Meta) {
    let mut format = sample_format();
    format.trash_days = 1;
    m.format(&format, 0, 0).unwrap();
    let none = RenameFlags::default();
    assert_eq!(err(m.lookup(ROOT_INO, TRASH_NAME)), libc::ENOENT);
    let d = dir(m, ROOT_INO, "d");
    let f = file(m, d.ino, "f");
    let id = m.next_slice_ids(1).unwrap();
    m.write_slices(
        f.ino,
        &[ChunkSlice {
            chunk: 0,
            slice: data_slice(id, 0, 100),
        }],
        Timestamp::now(),
    )
    .unwrap();
    m.link(f.ino, ROOT_INO, b"f2").unwrap();
    m.unlink(d.ino, b"f", 1, &closed).unwrap();
    assert_eq!(m.getattr(f.ino).unwrap().nlink, 1, "a hard link is left");
    assert_eq!(err(m.lookup(ROOT_INO, TRASH_NAME)), libc::ENOENT);
    let usage = m.usage().unwrap();
    m.unlink(ROOT_INO, b"f2", 1, &closed).unwrap();
    let a = m.getattr(f.ino).unwrap();
    assert_eq!((a.nlink, a.length), (0, 100));
    assert_eq!(
        m.usage().unwrap().space,
        usage.space,
        "space stays used while in the trash"
    );
    assert!(m.pending_deletions(0, 10).unwrap().is_empty());
    // The trash is visible by name only, and only to root.
    let trash = m.lookup(ROOT_INO, TRASH_NAME).unwrap();
    assert_eq!(
        (trash.ino, trash.kind, trash.mode, trash.uid),
        (TRASH_INO, FileKind::Dir, 0o700, 0)
    );
    assert_eq!(names(m, ROOT_INO), vec!["d"]);
    let hours = names(m, TRASH_INO);
    assert_eq!(hours.len(), 1);
    let hour = m.lookup(TRASH_INO, hours[0].as_bytes()).unwrap();
    assert!(parse_trash_hour(hours[0].as_bytes()).is_some(), "{hours:?}");
    let entry = format!("1-{}-f2", f.ino);
    assert_eq!(names(m, hour.ino), vec![entry.clone()]);
    assert_eq!(m.lookup(hour.ino, entry.as_bytes()).unwrap().ino, f.ino);
    // Nothing enters the trash except by removal.
    assert_eq!(
        err(m.mknod(hour.ino, b"x", &node(FileKind::File, 0o644))),
        libc::EPERM
    );
    assert_eq!(
        err(m.mknod(TRASH_INO, b"x", &node(FileKind::Dir, 0o755))),
        libc::EPERM
    );
    let g = file(m, ROOT_INO, "g");
    assert_eq!(err(m.link(g.ino, hour.ino, b"g")), libc::EPERM);
    assert_eq!(
        err(m.rename(ROOT_INO, b"g", hour.ino, b"g", none, 1, &closed)),
        libc::EPERM
    );
    assert_eq!(
        err(m.rename(
            TRASH_INO,
            hours[0].as_bytes(),
            ROOT_INO,
            b"h",
            none,
            1,
            &closed
        )),
        libc::EPERM
    );
    // The names of the trash and of the control file are reserved at the root.
    for reserved in [TRASH_NAME, CONTROL_NAME] {
        assert_eq!(
            err(m.mknod(ROOT_INO, reserved, &node(FileKind::File, 0o644))),
            libc::EPERM
        );
        assert_eq!(err(m.link(g.ino, ROOT_INO, reserved)), libc::EPERM);
        assert_eq!(
            err(m.rename(ROOT_INO, b"g", ROOT_INO, reserved, none, 1, &closed)),
            libc::EPERM
        );
    }
    m.mknod(d.ino, TRASH_NAME, &node(FileKind::Dir, 0o755))
        .unwrap();
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
    // Restore by moving it back: it has one link again, and its data.
    m.rename(hour.ino, entry.as_bytes(), d.ino, b"back", none, 1, &closed)
        .unwrap();
    let back = m.lookup(d.ino, b"back").unwrap();
    assert_eq!((back.ino, back.nlink, back.length), (f.ino, 1, 100));
    assert_eq!(m.read_chunk(f.ino, 0).unwrap().len(), 1);
    // A file replaced by rename goes to the trash too.
    m.rename(ROOT_INO, b"g", d.ino, b"back", none, 1, &closed)
        .unwrap();
    assert_eq!(m.getattr(f.ino).unwrap().nlink, 0);
    let replaced = format!("{}-{}-back", d.ino, f.ino);
    assert_eq!(names(m, hour.ino), vec![replaced.clone()]);
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
    // Removing it from the trash frees it, unless it is open.
    let sid = m.new_session(&sample_session()).unwrap();
    m.unlink(hour.ino, replaced.as_bytes(), sid, &|ino| ino == f.ino)
        .unwrap();
    assert_eq!(m.getattr(f.ino).unwrap().nlink, 0);
    m.release(f.ino, sid).unwrap();
    assert_eq!(err(m.getattr(f.ino)), libc::ENOENT);
    assert_eq!(
        m.pending_deletions(0, 10).unwrap(),
        vec![FreedSlice { id, size: 100 }]
    );
    // Releasing a trashed file that was open does not free it.
    let h = file(m, ROOT_INO, "h");
    m.unlink(ROOT_INO, b"h", sid, &|ino| ino == h.ino).unwrap();
    m.release(h.ino, sid).unwrap();
    assert_eq!(m.getattr(h.ino).unwrap().nlink, 0);
    // Directories and other kinds are not trashed; an emptied hour directory can go.
    dir(m, ROOT_INO, "e");
    m.rmdir(ROOT_INO, b"e").unwrap();
    m.mknod(
        ROOT_INO,
        b"l",
        &NewNode {
            symlink: Some(b"t".to_vec()),
            ..node(FileKind::Symlink, 0o777)
        },
    )
    .unwrap();
    m.unlink(ROOT_INO, b"l", 1, &closed).unwrap();
    let held = format!("1-{}-h", h.ino);
    assert_eq!(names(m, hour.ino), vec![held.clone()]);
    assert_eq!(
        err(m.rmdir(TRASH_INO, hours[0].as_bytes())),
        libc::ENOTEMPTY
    );
    m.unlink(hour.ino, held.as_bytes(), 1, &closed).unwrap();
    m.rmdir(TRASH_INO, hours[0].as_bytes()).unwrap();
    assert_eq!(m.getattr(TRASH_INO).unwrap().nlink, 2);
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
    // With the trash turned off, removal frees at once.
    format.trash_days = 0;
    m.format(&format, 0, 0).unwrap();
    let k = file(m, ROOT_INO, "k");
    m.unlink(ROOT_INO, b"k", 1, &closed).unwrap();
    assert_eq!(err(m.getattr(k.ino)), libc::ENOENT);
}

/// Slices apply in commit order, whatever their ids. Compaction swaps the first slices of a
/// chunk for one that reads the same, freeing them, and refuses (freeing the new one) when
/// the chunk changed under it; slices committed after a compaction apply after it.
pub fn slices_apply_in_commit_order_and_compact_safely(m: &dyn Meta) {
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let first = m.next_slice_ids(10).unwrap();
    let commit = |slice: Slice| {
        m.write_slices(f.ino, &[ChunkSlice { chunk: 0, slice }], Timestamp::now())
            .unwrap();
    };
    // Committed late with a lower id (a write whose upload took longer): it still applies last.
    commit(data_slice(first + 5, 0, 100));
    commit(data_slice(first + 1, 50, 100));
    commit(data_slice(first + 3, 120, 10));
    let ids = |m: &dyn Meta| -> Vec<u64> {
        m.read_chunk(f.ino, 0)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect()
    };
    assert_eq!(ids(m), vec![first + 5, first + 1, first + 3]);
    let before = m.read_chunk(f.ino, 0).unwrap();
    let usage = m.usage().unwrap();
    let merged = data_slice(first + 9, 0, 150);
    // Replacing a later slice without the ones before it is refused.
    assert!(!m.compact_chunk(f.ino, 0, &before[1..2], merged).unwrap());
    assert_eq!(m.read_chunk(f.ino, 0).unwrap(), before);
    assert_eq!(
        m.pending_deletions(0, 10).unwrap(),
        vec![FreedSlice {
            id: first + 9,
            size: 150
        }]
    );
    m.ack_deletions(&[first + 9]).unwrap();
    let merged = data_slice(first + 8, 0, 150);
    assert!(m.compact_chunk(f.ino, 0, &before[..2], merged).unwrap());
    assert_eq!(ids(m), vec![first + 8, first + 3]);
    assert_eq!(m.usage().unwrap(), usage);
    let freed: Vec<u64> = m
        .pending_deletions(0, 10)
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(freed, vec![first + 1, first + 5]);
    // A slice with a lower id committed after the compaction applies after it.
    commit(data_slice(first + 2, 0, 10));
    assert_eq!(ids(m), vec![first + 8, first + 3, first + 2]);
    // A replaced slice cut short since it was read: refused, the new slice is freed.
    let before = m.read_chunk(f.ino, 0).unwrap();
    m.truncate(f.ino, 125, Timestamp::now()).unwrap();
    assert!(!m
        .compact_chunk(f.ino, 0, &before, data_slice(first + 7, 0, 130))
        .unwrap());
    assert!(m
        .pending_deletions(first + 6, 10)
        .unwrap()
        .iter()
        .any(|s| s.id == first + 7));
    assert_eq!(m.getattr(f.ino).unwrap().length, 125);
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
    // A slice that hides others entirely frees them at once.
    let cover = data_slice(m.next_slice_ids(1).unwrap(), 0, 125);
    commit(cover);
    assert_eq!(m.read_chunk(f.ino, 0).unwrap(), vec![cover]);
    let freed: Vec<u64> = m
        .pending_deletions(0, 100)
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    for id in [first + 2, first + 3, first + 8] {
        assert!(freed.contains(&id), "{id} not freed: {freed:?}");
    }
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
}

/// POSIX locks conflict between owners, in one session or several; an owner's own locks
/// split and merge; flock locks conflict among themselves only; closing a session releases
/// its locks of both kinds.
pub fn posix_locks_conflict_across_sessions(m: &dyn Meta) {
    use crate::lock::{Lock, LockKind, LockType};
    formatted(m);
    let f = file(m, ROOT_INO, "f");
    let a = m.new_session(&sample_session()).unwrap();
    let b = m.new_session(&sample_session()).unwrap();
    let lk = |sid, owner, typ, start, end| Lock {
        sid,
        owner,
        pid: 100 + owner as u32,
        typ,
        start,
        end,
        kind: LockKind::Posix,
    };
    let flock = |sid, owner, typ| Lock {
        kind: LockKind::Flock,
        ..lk(sid, owner, typ, 0, u64::MAX)
    };
    let held = lk(a, 1, LockType::Write, 0, 99);
    assert_eq!(m.setlk(f.ino, &held).unwrap(), None);
    // Another session, another owner of the same session: both refused, nothing changes.
    for req in [
        lk(b, 1, LockType::Read, 50, 60),
        lk(a, 2, LockType::Write, 99, u64::MAX),
    ] {
        assert_eq!(m.getlk(f.ino, &req).unwrap(), Some(held));
        assert_eq!(m.setlk(f.ino, &req).unwrap(), Some(held));
    }
    // Readers share; the owner downgrades part of its range and others may read there.
    assert_eq!(
        m.setlk(f.ino, &lk(a, 1, LockType::Read, 0, 49)).unwrap(),
        None
    );
    assert_eq!(
        m.setlk(f.ino, &lk(b, 1, LockType::Read, 10, 20)).unwrap(),
        None
    );
    assert_eq!(
        m.getlk(f.ino, &lk(b, 1, LockType::Write, 40, 60)).unwrap(),
        Some(lk(a, 1, LockType::Read, 0, 49))
    );
    assert_eq!(
        m.getlk(f.ino, &lk(b, 1, LockType::Read, 50, 50)).unwrap(),
        Some(lk(a, 1, LockType::Write, 50, 99))
    );
    // flock locks ignore the record locks; they conflict with each other across sessions.
    let whole = flock(a, 1, LockType::Write);
    assert_eq!(m.setlk(f.ino, &whole).unwrap(), None);
    assert_eq!(
        m.setlk(f.ino, &flock(b, 1, LockType::Read)).unwrap(),
        Some(whole)
    );
    assert_eq!(
        m.getlk(f.ino, &lk(b, 1, LockType::Read, 10, 20)).unwrap(),
        None
    );
    // Closing session a releases all of its locks; b's stay.
    m.close_session(a).unwrap();
    let b_flock = flock(b, 2, LockType::Write);
    assert_eq!(m.setlk(f.ino, &b_flock).unwrap(), None);
    assert_eq!(
        m.setlk(f.ino, &flock(b, 2, LockType::Unlock)).unwrap(),
        None
    );
    let c = m.new_session(&sample_session()).unwrap();
    assert_eq!(
        m.setlk(f.ino, &lk(c, 1, LockType::Write, 21, u64::MAX))
            .unwrap(),
        None
    );
    assert_eq!(
        m.setlk(f.ino, &lk(c, 1, LockType::Write, 0, 20)).unwrap(),
        Some(lk(b, 1, LockType::Read, 10, 20))
    );
    // Unlocking everything lets the other owner in; unlocking nothing held is fine.
    let all = |sid, typ| lk(sid, 1, typ, 0, u64::MAX);
    assert_eq!(m.setlk(f.ino, &all(b, LockType::Unlock)).unwrap(), None);
    assert_eq!(m.setlk(f.ino, &all(b, LockType::Unlock)).unwrap(), None);
    assert_eq!(m.setlk(f.ino, &all(c, LockType::Write)).unwrap(), None);
    // Locks go with their file.
    m.unlink(ROOT_INO, b"f", c, &closed).unwrap();
    assert_eq!(m.getlk(f.ino, &all(b, LockType::Write)).unwrap(), None);
}
