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
