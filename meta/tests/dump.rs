//! Dumps and loads across engines: SQLite → dump → Redis → dump gives the same bytes, and so
//! does a load back into SQLite; the loaded volumes pass the namespace check.

use tidefs_meta::conformance::node;
use tidefs_meta::dump::{self, DumpStats};
use tidefs_meta::testing::RedisServer;
use tidefs_meta::*;

fn slice(id: u64, size: u32, pos: u32, len: u32) -> Slice {
    Slice {
        id,
        size,
        off: 0,
        len,
        pos,
    }
}

/// A volume with a bit of everything a dump must carry.
fn populate(m: &dyn Meta) {
    let mut format = conformance::sample_format();
    format.trash_days = 1;
    format.capacity = 1 << 40;
    m.format(&format, 0, 0).unwrap();
    let closed = |_| false;
    let d = m
        .mknod(ROOT_INO, b"warehouse", &node(FileKind::Dir, 0o2775))
        .unwrap();
    let sub = m.mknod(d.ino, b"t1", &node(FileKind::Dir, 0o755)).unwrap();
    let f = m
        .mknod(sub.ino, b"part-0", &node(FileKind::File, 0o644))
        .unwrap();
    let ids = m.next_slice_ids(6).unwrap();
    let now = Timestamp::now();
    m.write_slices(
        f.ino,
        &[
            ChunkSlice {
                chunk: 0,
                slice: slice(ids, 5000, 0, 5000),
            },
            ChunkSlice {
                chunk: 0,
                slice: slice(ids + 1, 100, 4000, 100),
            },
            ChunkSlice {
                chunk: 2,
                slice: slice(ids + 2, 10, 7, 10),
            },
        ],
        now,
    )
    .unwrap();
    m.fallocate(f.ino, FallocMode::PunchHole, 10, 20, &[ids + 3])
        .unwrap();
    m.link(f.ino, ROOT_INO, b"hardlink").unwrap();
    m.mknod(
        ROOT_INO,
        b"link",
        &NewNode {
            symlink: Some(b"warehouse/t1/part-0".to_vec()),
            ..node(FileKind::Symlink, 0o777)
        },
    )
    .unwrap();
    m.mknod(ROOT_INO, b"fifo", &node(FileKind::Fifo, 0o600))
        .unwrap();
    m.mknod(ROOT_INO, b"bin\xff\xfename", &node(FileKind::File, 0o600))
        .unwrap();
    m.setxattr(f.ino, b"user.text", b"value", XattrMode::Any)
        .unwrap();
    m.setxattr(f.ino, b"user.\x80bin", &[0, 1, 2, 255], XattrMode::Any)
        .unwrap();
    // Removed: one file to the trash, one overwritten slice to the deletion queue.
    let gone = m
        .mknod(d.ino, b"gone", &node(FileKind::File, 0o644))
        .unwrap();
    m.write_slices(
        gone.ino,
        &[ChunkSlice {
            chunk: 0,
            slice: slice(ids + 4, 300, 0, 300),
        }],
        now,
    )
    .unwrap();
    m.unlink(d.ino, b"gone", 1, &closed).unwrap();
    let g = m
        .mknod(ROOT_INO, b"g", &node(FileKind::File, 0o644))
        .unwrap();
    m.write_slices(
        g.ino,
        &[ChunkSlice {
            chunk: 0,
            slice: slice(ids + 5, 64, 0, 64),
        }],
        now,
    )
    .unwrap();
    m.truncate(g.ino, 0, now).unwrap();
    // Many entries, listed over several pages.
    for i in 0..2500 {
        m.mknod(
            sub.ino,
            format!("f{i}").as_bytes(),
            &node(FileKind::File, 0o644),
        )
        .unwrap();
    }
    // Open and unlinked: not part of the volume's namespace, not dumped.
    let sid = m.new_session(&conformance::sample_session()).unwrap();
    m.unlink(ROOT_INO, b"fifo", sid, &|_| true).unwrap();
}

fn dump_of(m: &dyn Meta) -> (Vec<u8>, DumpStats) {
    let mut out = Vec::new();
    let stats = dump::dump(m, &mut out, &mut |_| {}).unwrap();
    (out, stats)
}

fn load_into(m: &dyn Meta, bytes: &[u8]) -> DumpStats {
    dump::load(m, &mut &bytes[..], &mut |_| {}).unwrap()
}

#[test]
fn dumps_round_trip_between_sqlite_and_redis() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteMeta::open(&dir.path().join("a.db"), true).unwrap();
    populate(&sqlite);
    let (first, stats) = dump_of(&sqlite);
    // The root's 5 names, the table, its 2501 files, the trash's hour and the trashed file.
    assert_eq!(stats.entries, 5 + 1 + 2501 + 1 + 1, "{stats:?}");
    assert_eq!(stats.freed, 1, "{stats:?}");
    let text = String::from_utf8(first.clone()).unwrap();
    assert!(
        text.contains(r#"{"hex":"62696efffe6e616d65"}"#),
        "{text:.2000}"
    );

    let server = RedisServer::start();
    let redis = RedisMeta::open(&server.url(3)).unwrap();
    assert_eq!(load_into(&redis, &first), stats);
    let (second, _) = dump_of(&redis);
    assert_eq!(String::from_utf8(second.clone()).unwrap(), text);
    assert_eq!(redis.check_namespace(false).unwrap(), vec![]);
    assert_eq!(redis.usage().unwrap(), {
        let u = sqlite.usage().unwrap();
        Usage {
            inodes: u.inodes - 1, // the open unlinked fifo stays behind
            ..u
        }
    });
    assert_eq!(redis.id_counters().unwrap(), sqlite.id_counters().unwrap());

    let back = SqliteMeta::open(&dir.path().join("b.db"), true).unwrap();
    load_into(&back, &second);
    assert_eq!(dump_of(&back).0, first);
    assert_eq!(back.check_namespace(false).unwrap(), vec![]);
    // The loaded volume works: the trash, hard links, slices and new ids.
    let f = back.lookup(ROOT_INO, b"hardlink").unwrap();
    assert_eq!(f.nlink, 2);
    assert_eq!(
        redis.read_chunk(f.ino, 0).unwrap(),
        back.read_chunk(f.ino, 0).unwrap()
    );
    assert_eq!(redis.read_chunk(f.ino, 0).unwrap().len(), 3);
    assert_eq!(back.lookup(ROOT_INO, TRASH_NAME).unwrap().nlink, 3);
    let fresh = redis.next_slice_ids(1).unwrap();
    assert_eq!(fresh, sqlite.next_slice_ids(1).unwrap());
    let n = redis
        .mknod(ROOT_INO, b"new", &node(FileKind::File, 0o644))
        .unwrap();
    assert_eq!(n.ino, sqlite.id_counters().unwrap().0);
}

#[test]
fn loads_refuse_bad_input_and_used_targets() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteMeta::open(&dir.path().join("a.db"), true).unwrap();
    sqlite.format(&conformance::sample_format(), 0, 0).unwrap();
    let (good, _) = dump_of(&sqlite);
    let fails = |m: &dyn Meta, bytes: &[u8]| -> String {
        dump::load(m, &mut &bytes[..], &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    // A formatted target is refused and left as it was.
    assert!(fails(&sqlite, &good).contains("already holds volume"));
    let server = RedisServer::start();
    let redis = RedisMeta::open(&server.url(0)).unwrap();
    assert!(fails(&redis, b"").contains("no header"));
    assert!(fails(&redis, b"{\"nonsense\": 1}\n").contains("dump line 1"));
    let text = String::from_utf8(good.clone()).unwrap();
    let newer = text.replacen("\"version\":1", "\"version\":99", 1);
    assert!(fails(&redis, newer.as_bytes()).contains("version 99"));
    // A dump cut in the middle of a line: the error names the line; nothing is formatted.
    let cut = format!("{}{{\"inode\":", text);
    let e = fails(&redis, cut.as_bytes());
    assert!(e.contains("dump line"), "{e}");
    assert!(matches!(redis.load_format(), Err(MetaError::NotFormatted)));
    // A database with leftovers is refused rather than mixed with the dump.
    redis.new_session(&conformance::sample_session()).unwrap();
    assert!(fails(&redis, &good).contains("load into an empty database"));
}
