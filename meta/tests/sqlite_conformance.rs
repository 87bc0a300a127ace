//! The conformance suite on the SQLite engine, each check on a fresh database file.

use tidefs_meta::{Meta, SqliteMeta};

fn sqlite() -> (Box<dyn Meta>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let meta = SqliteMeta::open(&dir.path().join("meta.db"), true).expect("open sqlite");
    (Box::new(meta), dir)
}

tidefs_meta::meta_conformance_tests!(sqlite);
