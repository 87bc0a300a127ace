//! The conformance suite on the SQLite engine, each check on a fresh database file.

use tidefs_meta::{Meta, SqliteMeta};

fn sqlite() -> (Box<dyn Meta>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let meta = SqliteMeta::open(&dir.path().join("meta.db"), true).expect("open sqlite");
    (Box::new(meta), dir)
}

tidefs_meta::meta_conformance_tests!(sqlite);

/// A database made before sessions recorded a metrics address opens and gains the column.
#[test]
fn upgrades_an_older_session_table() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("meta.db");
    {
        let m = SqliteMeta::open(&path, true).unwrap();
        m.format(&tidefs_meta::conformance::sample_format(), 0, 0)
            .unwrap();
    }
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE session;
             CREATE TABLE session (
                sid INTEGER PRIMARY KEY AUTOINCREMENT, host TEXT NOT NULL, pid INTEGER NOT NULL,
                mountpoint TEXT NOT NULL, version TEXT NOT NULL, started INTEGER NOT NULL,
                heartbeat INTEGER NOT NULL);
             INSERT INTO session (host, pid, mountpoint, version, started, heartbeat)
                VALUES ('old', 7, '/mnt/old', '0.0.1', 1, 1);",
        )
        .unwrap();
    }
    let m = SqliteMeta::open(&path, false).unwrap();
    let sid = m
        .new_session(&tidefs_meta::conformance::sample_session())
        .unwrap();
    let sessions = m.sessions().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(
        (sessions[0].host.as_str(), sessions[0].metrics.as_str()),
        ("old", "")
    );
    assert_eq!(sessions[1].sid, sid);
    assert_eq!(sessions[1].metrics, "127.0.0.1:9567");
}

/// A database made when slices applied in id order opens with that order kept, and slices
/// committed afterwards apply after the old ones.
#[test]
fn upgrades_slices_to_commit_order() {
    use tidefs_meta::{ChunkSlice, Slice, Timestamp, ROOT_INO};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("meta.db");
    let slice = |id: u64, len: u32| Slice {
        id,
        size: len,
        off: 0,
        len,
        pos: 0,
    };
    let ino;
    {
        let m = SqliteMeta::open(&path, true).unwrap();
        m.format(&tidefs_meta::conformance::sample_format(), 0, 0)
            .unwrap();
        ino = tidefs_meta::conformance::sample_file(&m, ROOT_INO, "f").ino;
    }
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "DROP TABLE slice;
             CREATE TABLE slice (
                ino INTEGER NOT NULL, chunk INTEGER NOT NULL, id INTEGER NOT NULL,
                size INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
                pos INTEGER NOT NULL, PRIMARY KEY (ino, chunk, id)) WITHOUT ROWID;
             INSERT INTO slice VALUES ({ino}, 0, 7, 10, 0, 10, 0), ({ino}, 0, 3, 20, 0, 20, 0);
             UPDATE counter SET value = 8 WHERE name = 'next_slice';"
        ))
        .unwrap();
    }
    let m = SqliteMeta::open(&path, false).unwrap();
    assert_eq!(
        m.read_chunk(ino, 0).unwrap(),
        vec![slice(3, 20), slice(7, 10)]
    );
    // A write that took id 5 long ago commits only now.
    let late = 5;
    m.write_slices(
        ino,
        &[ChunkSlice {
            chunk: 0,
            slice: slice(late, 5),
        }],
        Timestamp::now(),
    )
    .unwrap();
    assert_eq!(
        m.read_chunk(ino, 0).unwrap(),
        vec![slice(3, 20), slice(7, 10), slice(late, 5)]
    );
    assert_eq!(m.check_namespace(false).unwrap(), vec![]);
}

/// Damage done behind the engine's back is found, left alone without `repair`, fixed with it,
/// and what cannot be fixed safely is reported every time.
#[test]
fn check_finds_and_repairs_damage() {
    use tidefs_meta::{FileKind, NewNode, ROOT_INO};
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("meta.db");
    let m = SqliteMeta::open(&path, true).unwrap();
    m.format(&tidefs_meta::conformance::sample_format(), 0, 0)
        .unwrap();
    let node = |kind| NewNode {
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        rdev: 0,
        symlink: None,
        groups: vec![],
    };
    let d = m.mknod(ROOT_INO, b"d", &node(FileKind::Dir)).unwrap();
    let f = m.mknod(d.ino, b"f", &node(FileKind::File)).unwrap();
    let lost = m.mknod(ROOT_INO, b"lost", &node(FileKind::File)).unwrap();
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "UPDATE node SET nlink = 5 WHERE ino = {f};
             UPDATE node SET parent = 999, nlink = 7, length = 1 WHERE ino = {d};
             INSERT INTO edge (parent, name, ino, kind) VALUES (1, CAST('ghost' AS BLOB), 4242, 1);
             DELETE FROM edge WHERE ino = {lost};
             UPDATE counter SET value = value + 3 WHERE name = 'used_inodes';
             UPDATE counter SET value = 1 WHERE name = 'next_ino';
             INSERT INTO sustained (sid, ino) VALUES (77, {f});",
            f = f.ino,
            d = d.ino,
            lost = lost.ino
        ))
        .unwrap();
    }
    let found = m.check_namespace(false).unwrap();
    let text: Vec<&str> = found.iter().map(|p| p.what.as_str()).collect();
    assert!(found.iter().all(|p| !p.repaired), "{found:?}");
    for needle in [
        "names missing inode 4242",
        &format!("inode {} has link count 5, but 1 entries", f.ino),
        &format!("directory {} records parent 999", d.ino),
        &format!("directory {} has link count 7, expected 2", d.ino),
        &format!("directory {} has size 1", d.ino),
        &format!("inode {} has link count 1 but no name", lost.ino),
        "held open by session 77",
        "counter used_inodes is",
        "counter next_ino is 1",
    ] {
        assert!(
            text.iter().any(|t| t.contains(needle)),
            "{needle:?} not in {text:#?}"
        );
    }
    assert_eq!(
        m.check_namespace(false).unwrap(),
        found,
        "a check changes nothing"
    );

    let repaired = m.check_namespace(true).unwrap();
    assert_eq!(repaired.len(), found.len());
    let left = m.check_namespace(false).unwrap();
    assert_eq!(left.len(), 1, "only the unreachable inode stays: {left:?}");
    assert!(left[0].what.contains("no name") && !left[0].repaired && left[0].fix.is_none());
    assert!(repaired
        .iter()
        .filter(|p| p.fix.is_some())
        .all(|p| p.repaired));
    assert_eq!(m.getattr(f.ino).unwrap().nlink, 1);
    let d_now = m.getattr(d.ino).unwrap();
    assert_eq!(
        (d_now.parent, d_now.nlink, d_now.length),
        (ROOT_INO, 2, 4096)
    );
    assert!(m.lookup(ROOT_INO, b"ghost").is_err());
    // New inodes get fresh numbers again.
    let fresh = m.mknod(ROOT_INO, b"new", &node(FileKind::File)).unwrap();
    assert!(fresh.ino > lost.ino);
}
