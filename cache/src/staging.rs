//! Writeback staging: blocks kept on local disk until they are uploaded.
//!
//! [`Staging::put`] returns only when the block is durable on the local disk (the file and
//! its directory are fsynced), so a write acknowledged from staging survives a crash of the
//! process or of the machine. Each file holds the block and a CRC32 of it, so a damaged file
//! is detected and never uploaded or served. File names are the block keys with `%` and `/`
//! escaped, so the staged keys can be listed after a restart.

use bytes::Bytes;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Blocks staged in one directory.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

/// Suffix of files being written; leftovers of a crash are removed at open.
const TMP_SUFFIX: &str = ".tmp";

fn file_name(key: &str) -> String {
    key.replace('%', "%25").replace('/', "%2F")
}

fn key_of(name: &str) -> Option<String> {
    if name.ends_with(TMP_SUFFIX) {
        return None;
    }
    Some(name.replace("%2F", "/").replace("%25", "%"))
}

impl Staging {
    /// Opens (creating it) the staging directory `dir`, removing files left half-written.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Staging {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(file_name(key))
    }

    /// Stores block `key` durably: when this returns Ok, the block survives a crash.
    pub fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(key);
        let tmp = path.with_file_name(format!("{}{TMP_SUFFIX}", file_name(key)));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.write_all(&crc32fast::hash(data).to_le_bytes())?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// Block `key` if it is staged; an error of kind `InvalidData` if its file is damaged.
    pub fn get(&self, key: &str) -> io::Result<Option<Bytes>> {
        let mut raw = match fs::read(self.path(key)) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let damaged = || io::Error::new(io::ErrorKind::InvalidData, format!("staged {key}"));
        if raw.len() < 4 {
            return Err(damaged());
        }
        let body = raw.len() - 4;
        let crc = u32::from_le_bytes(raw[body..].try_into().expect("4 bytes"));
        raw.truncate(body);
        if crc32fast::hash(&raw) != crc {
            return Err(damaged());
        }
        Ok(Some(Bytes::from(raw)))
    }

    /// The length of staged block `key`, if it is staged (from the file's size, unchecked).
    pub fn len(&self, key: &str) -> io::Result<Option<u64>> {
        match fs::metadata(self.path(key)) {
            Ok(m) => Ok(Some(m.len().saturating_sub(4))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forgets block `key` (uploaded or no longer wanted); a missing one is fine.
    pub fn remove(&self, key: &str) -> io::Result<()> {
        match fs::remove_file(self.path(key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every staged key.
    pub fn keys(&self) -> io::Result<Vec<String>> {
        Self::keys_in(&self.dir)
    }

    /// Every key staged in directory `dir`, read without changing anything there (a mount
    /// may be using it). A missing directory stages nothing.
    pub fn keys_in(dir: &Path) -> io::Result<Vec<String>> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut keys = Vec::new();
        for entry in entries {
            if let Some(key) = key_of(&entry?.file_name().to_string_lossy()) {
                keys.push(key);
            }
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_blocks_survive_reopen_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let s = Staging::open(dir.path()).unwrap();
        let key = "vol/chunks/0/0/12_0_5";
        s.put(key, b"hello").unwrap();
        s.put("odd%key/x", b"").unwrap();
        // A crash while writing leaves a temporary file, removed at open.
        fs::write(dir.path().join(format!("x{TMP_SUFFIX}")), b"partial").unwrap();
        let s = Staging::open(dir.path()).unwrap();
        let mut keys = s.keys().unwrap();
        keys.sort();
        assert_eq!(keys, vec!["odd%key/x".to_string(), key.to_string()]);
        assert_eq!(s.get(key).unwrap().unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(s.get("odd%key/x").unwrap().unwrap(), Bytes::new());
        assert!(s.get("missing").unwrap().is_none());
        assert_eq!(s.len(key).unwrap(), Some(5));
        assert_eq!(s.len("missing").unwrap(), None);
        // A flipped byte or a cut file is damage, never data.
        let path = s.path(key);
        let mut raw = fs::read(&path).unwrap();
        raw[1] ^= 1;
        fs::write(&path, &raw).unwrap();
        assert_eq!(s.get(key).unwrap_err().kind(), io::ErrorKind::InvalidData);
        fs::write(&path, b"ab").unwrap();
        assert_eq!(s.get(key).unwrap_err().kind(), io::ErrorKind::InvalidData);
        s.remove(key).unwrap();
        s.remove(key).unwrap();
        assert_eq!(s.keys().unwrap(), vec!["odd%key/x".to_string()]);
    }
}
