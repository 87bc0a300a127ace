//! A local directory as an object store: one file per object.

use super::{ObjectInfo, ObjectStore, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidefs_cache::BufferPool;

/// Objects stored as files below a root directory. A put writes a temporary file, fsyncs it,
/// renames it into place and fsyncs the directory, so an object is either whole or absent.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    block_buffers: Option<Arc<BufferPool>>,
}

fn io_err(key: &str, source: std::io::Error) -> StoreError {
    if source.kind() == std::io::ErrorKind::NotFound {
        StoreError::NotFound(key.to_string())
    } else {
        StoreError::Io {
            key: key.to_string(),
            cause: source,
        }
    }
}

impl LocalStore {
    /// A store rooted at `root`, which is created if missing. Fails if it cannot be written.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let key = root.display().to_string();
        fs::create_dir_all(root).map_err(|e| io_err(&key, e))?;
        let probe = root.join(format!(".probe-{}", std::process::id()));
        fs::write(&probe, b"probe").map_err(|e| io_err(&key, e))?;
        fs::remove_file(&probe).map_err(|e| io_err(&key, e))?;
        Ok(LocalStore {
            root: root.to_path_buf(),
            block_buffers: None,
        })
    }

    /// Whole reads of objects of `pool`'s buffer size (whole blocks) fill buffers of the pool,
    /// which come back to it when their last reader is done, as for S3 downloads: a fresh
    /// 4 MiB buffer costs a thousand page faults.
    pub fn with_block_buffers(mut self, pool: Arc<BufferPool>) -> Self {
        self.block_buffers = Some(pool);
        self
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn put_sync(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key);
        let dir = path.parent().expect("object keys have a directory");
        if !dir.is_dir() {
            self.create_dirs(dir).map_err(|e| io_err(key, e))?;
        }
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("obj"),
            rand::random::<u64>()
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| io_err(key, e))
    }

    /// Creates `dir` and its missing parents below the root, fsyncing each new directory's
    /// parent so the new entries survive a power loss.
    fn create_dirs(&self, dir: &Path) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut at = dir;
        while !at.is_dir() && at != self.root {
            missing.push(at);
            at = match at.parent() {
                Some(p) => p,
                None => break,
            };
        }
        fs::create_dir_all(dir)?;
        for d in missing.iter().rev() {
            if let Some(parent) = d.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(())
    }

    fn get_sync(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let mut f = File::open(self.path(key)).map_err(|e| io_err(key, e))?;
        let mut buf = Vec::new();
        match range {
            None => {
                let len = f.metadata().map_err(|e| io_err(key, e))?.len();
                let pool = self
                    .block_buffers
                    .as_ref()
                    .filter(|p| p.size() as u64 == len);
                if let Some(pool) = pool {
                    buf = pool.take();
                    f.read_to_end(&mut buf).map_err(|e| io_err(key, e))?;
                    return Ok(pool.freeze(buf));
                }
                f.read_to_end(&mut buf).map_err(|e| io_err(key, e))?;
            }
            Some(r) => {
                f.seek(SeekFrom::Start(r.start))
                    .map_err(|e| io_err(key, e))?;
                f.take(r.end - r.start)
                    .read_to_end(&mut buf)
                    .map_err(|e| io_err(key, e))?;
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Up to `limit` objects starting with `prefix` and sorting after `after`, in key order.
    /// Directories are walked in key order and those wholly before `after` are skipped, so a
    /// page costs about `limit` entries, not the whole tree.
    fn list_sync(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let base = prefix.rfind('/').map_or("", |i| &prefix[..=i]);
        let mut out = Vec::new();
        self.walk(base, prefix, after, limit, &mut out)?;
        Ok(out)
    }

    /// Appends the objects below directory key `dir` (empty or ending in `/`); see
    /// [`LocalStore::list_sync`].
    fn walk(
        &self,
        dir: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        out: &mut Vec<ObjectInfo>,
    ) -> Result<(), StoreError> {
        let entries = match fs::read_dir(self.root.join(dir)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(prefix, e)),
        };
        // A directory sorts as its name and a slash, which makes the walk visit keys in
        // exactly their byte order.
        let mut children = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(prefix, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Deleted since the directory was read (a mount deleting freed objects).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(prefix, e)),
            };
            let key = if meta.is_dir() {
                format!("{dir}{name}/")
            } else {
                format!("{dir}{name}")
            };
            children.push((key, meta));
        }
        children.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, meta) in children {
            if out.len() >= limit {
                break;
            }
            if meta.is_dir() {
                let wanted = key.starts_with(prefix) || prefix.starts_with(&key);
                let passed = after.is_some_and(|a| key.as_str() < a && !a.starts_with(&key));
                if wanted && !passed {
                    self.walk(&key, prefix, after, limit, out)?;
                }
            } else if key.starts_with(prefix) && after.is_none_or(|a| key.as_str() > a) {
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    key: &str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io {
            key: key.to_string(),
            cause: std::io::Error::other(e.to_string()),
        })?
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let (store, k) = (self.clone(), key.to_string());
        blocking(key, move || store.put_sync(&k, &data)).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let (store, k) = (self.clone(), key.to_string());
        blocking(key, move || store.get_sync(&k, range)).await
    }

    async fn head(&self, key: &str) -> Result<u64, StoreError> {
        let (path, k) = (self.path(key), key.to_string());
        blocking(key, move || {
            fs::metadata(&path)
                .map(|m| m.len())
                .map_err(|e| io_err(&k, e))
        })
        .await
    }

    async fn delete_batch(&self, keys: &[String]) -> Vec<(String, StoreError)> {
        let (store, owned) = (self.clone(), keys.to_vec());
        let result = tokio::task::spawn_blocking(move || {
            let mut failed = Vec::new();
            for key in owned {
                match fs::remove_file(store.path(&key)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => failed.push((key.clone(), io_err(&key, e))),
                }
            }
            failed
        })
        .await;
        match result {
            Ok(failed) => failed,
            // The task died: nothing is known to be deleted.
            Err(e) => keys
                .iter()
                .map(|k| (k.clone(), io_err(k, std::io::Error::other(e.to_string()))))
                .collect(),
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let (store, p, a) = (self.clone(), prefix.to_string(), after.map(str::to_string));
        blocking(prefix, move || store.list_sync(&p, a.as_deref(), limit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listing_pages_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let mut keys: Vec<String> = [
            "v/a/1/x", "v/a/1_0", "v/a/12/x", "v/a/1-2", "v/a/2", "v/b", "v/b0/z", "w/x",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        keys.extend((0..300).map(|i| format!("v/c/{}/{i}_0_1", i % 7)));
        for k in &keys {
            store.put(k, Bytes::from_static(b"x")).await.unwrap();
        }
        let mut want: Vec<String> = keys
            .iter()
            .filter(|k| k.starts_with("v/"))
            .cloned()
            .collect();
        want.sort();
        for page in [1, 7, 1000] {
            let mut got = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let batch = store.list("v/", after.as_deref(), page).await.unwrap();
                assert!(batch.len() <= page);
                let Some(last) = batch.last() else { break };
                after = Some(last.key.clone());
                got.extend(batch.into_iter().map(|o| o.key));
            }
            assert_eq!(got, want, "pages of {page}");
        }
        let some: Vec<String> = store
            .list("v/a/1", None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        // Byte order: '-' < '/' < '2' < '_'.
        assert_eq!(some, ["v/a/1-2", "v/a/1/x", "v/a/12/x", "v/a/1_0"]);
    }

    #[tokio::test]
    async fn put_get_range_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store
            .put("v/chunks/0/0/1_0_5", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        store
            .put("v/chunks/0/0/2_0_3", Bytes::from_static(b"abc"))
            .await
            .unwrap();
        assert_eq!(
            store.get("v/chunks/0/0/1_0_5", None).await.unwrap(),
            "hello"
        );
        assert_eq!(
            store.get("v/chunks/0/0/1_0_5", Some(1..3)).await.unwrap(),
            "el"
        );
        assert_eq!(store.head("v/chunks/0/0/2_0_3").await.unwrap(), 3);
        let all = store.list("v/", None, 10).await.unwrap();
        assert_eq!(
            all.iter().map(|o| o.key.as_str()).collect::<Vec<_>>(),
            ["v/chunks/0/0/1_0_5", "v/chunks/0/0/2_0_3"]
        );
        let after = store
            .list("v/", Some("v/chunks/0/0/1_0_5"), 10)
            .await
            .unwrap();
        assert_eq!(after.len(), 1);
        let failed = store
            .delete_batch(&["v/chunks/0/0/1_0_5".into(), "v/chunks/0/0/missing".into()])
            .await;
        assert!(failed.is_empty());
        assert!(matches!(
            store.get("v/chunks/0/0/1_0_5", None).await,
            Err(StoreError::NotFound(_))
        ));
        // No temporary files are left behind.
        assert_eq!(store.list("", None, 10).await.unwrap().len(), 1);
    }

    #[test]
    fn unwritable_root_is_a_clear_error() {
        let err = LocalStore::open(Path::new("/proc/tidefs-cannot-exist")).unwrap_err();
        assert!(
            err.to_string().contains("/proc/tidefs-cannot-exist"),
            "{err}"
        );
    }
}
