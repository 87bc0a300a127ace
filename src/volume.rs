//! Volumes: formatting, the default volume, opening the object store, and mountpoint checks.

use crate::object::{
    Instrumented, LocalStore, ObjectStore, RetryPolicy, Retrying, S3Location, S3Options, S3Store,
    StoreError, StoreMetrics,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidefs_cache::BufferPool;
use tidefs_meta::{Format, Meta, MetaError, MetaUrl};

/// Why a volume could not be formatted, opened or mounted.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A setting is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The metadata engine failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The mountpoint cannot be used.
    #[error("mountpoint {path}: {why}")]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A local I/O step failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What `tidefs format` asks for.
#[derive(Clone, Debug)]
pub struct FormatRequest {
    /// Volume name.
    pub name: String,
    /// Object store kind.
    pub storage: String,
    /// Where objects go; for `file`, a directory (default: `objects` beside an SQLite file).
    pub bucket: Option<String>,
    /// Block size in KiB.
    pub block_size_kib: u32,
    /// Trash retention in days.
    pub trash_days: u32,
    /// Space limit in GiB (0: none).
    pub capacity_gib: u64,
    /// Inode limit (0: none).
    pub inodes: u64,
    /// Prefixes to spread block keys over (0: one).
    pub shards: u32,
    /// Keep the access key and the sealed secret key in the volume, so mounts need no keys.
    pub store_secret: bool,
}

/// How to reach a volume's object store: given at format and at each mount, never stored.
#[derive(Clone)]
pub struct StoreAccess {
    /// Access key and secret key; None: the standard AWS credential chain.
    pub credentials: Option<(String, String)>,
    /// Region of an S3 bucket.
    pub region: Option<String>,
    /// Concurrent uploads.
    pub max_uploads: usize,
    /// Concurrent downloads (GET, HEAD, LIST).
    pub max_downloads: usize,
    /// Concurrent batch-delete requests.
    pub max_deletes: usize,
    /// Retries of transient object-store failures.
    pub retry: RetryPolicy,
}

impl Default for StoreAccess {
    fn default() -> Self {
        StoreAccess {
            credentials: None,
            region: None,
            max_uploads: 20,
            max_downloads: 200,
            max_deletes: 10,
            retry: RetryPolicy::default(),
        }
    }
}

impl std::fmt::Debug for StoreAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreAccess")
            .field("access_key", &self.credentials.as_ref().map(|c| &c.0))
            .field(
                "secret_key",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .field("max_uploads", &self.max_uploads)
            .field("max_downloads", &self.max_downloads)
            .field("max_deletes", &self.max_deletes)
            .field("retry", &self.retry)
            .finish()
    }
}

impl StoreAccess {
    /// Credentials from an access key and a secret key given together, or neither.
    pub fn credentials_from(
        access_key: Option<String>,
        secret_key: Option<String>,
    ) -> Result<Option<(String, String)>, VolumeError> {
        match (access_key, secret_key) {
            (Some(a), Some(s)) => Ok(Some((a, s))),
            (None, None) => Ok(None),
            _ => Err(VolumeError::Invalid(
                "give --access-key and --secret-key together (or neither, for the AWS chain)"
                    .into(),
            )),
        }
    }
}

/// Checks a volume name: 3 to 63 lowercase letters, digits and hyphens, as object-store
/// bucket names allow.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(VolumeError::Invalid(format!(
            "invalid volume name {name:?}: use 3 to 63 lowercase letters, digits and hyphens"
        )))
    }
}

/// The directory of the default volume: `$TIDEFS_DATA_DIR`, else `/var/lib/tidefs` for root,
/// else `$XDG_DATA_HOME/tidefs` or `~/.local/share/tidefs`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TIDEFS_DATA_DIR") {
        return PathBuf::from(d);
    }
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/tidefs");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("tidefs");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/tidefs")
}

/// The META_URL of the default volume in `data_dir`.
pub fn default_meta_url(data_dir: &Path) -> String {
    format!("sqlite3://{}", data_dir.join("tidefs.db").display())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The most key prefixes a volume's blocks can be spread over.
pub const MAX_SHARDS: u32 = 256;

/// Builds the format record asked for, checking every setting.
pub fn build_format(url: &MetaUrl, req: &FormatRequest) -> Result<Format, VolumeError> {
    check_name(&req.name)?;
    let bs = req.block_size_kib;
    if !(64..=16384).contains(&bs) || !bs.is_power_of_two() {
        return Err(VolumeError::Invalid(format!(
            "invalid --block-size {bs}: a power of two from 64 to 16384 (KiB)"
        )));
    }
    if req.shards > MAX_SHARDS {
        return Err(VolumeError::Invalid(format!(
            "invalid --shards {}: at most {MAX_SHARDS}",
            req.shards
        )));
    }
    let bucket = match req.storage.as_str() {
        "file" => {
            let dir = match (&req.bucket, url) {
                (Some(b), _) => PathBuf::from(b.strip_prefix("file://").unwrap_or(b)),
                (None, url) => url
                    .local_file()
                    .and_then(Path::parent)
                    .unwrap_or(Path::new("."))
                    .join(format!("{}-objects", req.name)),
            };
            absolute(&dir).display().to_string()
        }
        "s3" => {
            let Some(bucket) = &req.bucket else {
                return Err(VolumeError::Invalid(
                    "--storage s3 needs --bucket s3://BUCKET[/PREFIX] or http(s)://HOST:PORT/BUCKET[/PREFIX]".into(),
                ));
            };
            S3Location::parse(bucket).map_err(VolumeError::Invalid)?;
            bucket.trim_end_matches('/').to_string()
        }
        other => {
            return Err(VolumeError::Invalid(format!(
                "unsupported --storage {other:?} (supported: file, s3)"
            )))
        }
    };
    Ok(Format {
        name: req.name.clone(),
        uuid: new_uuid(),
        storage: req.storage.clone(),
        bucket,
        block_size: bs << 10,
        trash_days: req.trash_days,
        capacity: req.capacity_gib << 30,
        inodes: req.inodes,
        shards: req.shards,
        access_key: String::new(),
        secret_key: String::new(),
    })
}

fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

/// Formats the volume at `url`: checks the object store is reachable and writable first (a
/// probe object is written, read back and deleted), then writes the format. An existing volume
/// with the same layout is kept (its changeable settings updated); one with another layout is
/// an error and is left untouched. Returns the stored format.
pub fn format_volume(
    url: &MetaUrl,
    req: &FormatRequest,
    access: &StoreAccess,
) -> Result<Format, VolumeError> {
    let mut format = build_format(url, req)?;
    if req.store_secret && access.credentials.is_none() {
        return Err(VolumeError::Invalid(
            "--store-secret needs --access-key and --secret-key".into(),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| VolumeError::Io {
            what: "cannot start a runtime".into(),
            source,
        })?;
    rt.block_on(async {
        let (store, _) = open_store(&format, access).await?;
        probe_store(&*store, &format.name).await
    })?;
    if let Some(db) = url.local_file() {
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| VolumeError::Io {
                what: format!("cannot create {}", dir.display()),
                source,
            })?;
        }
    }
    let meta = tidefs_meta::open(url, true)?;
    if req.store_secret {
        // Sealed for the UUID the volume keeps: the existing one when formatting again.
        match meta.load_format() {
            Ok(existing) => format.uuid = existing.uuid,
            Err(MetaError::NotFormatted) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some((ak, sk)) = &access.credentials {
            format.access_key = ak.clone();
            format.secret_key = crate::secret::seal(&format.uuid, &format.name, sk);
        }
    }
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    meta.format(&format, uid, gid)?;
    Ok(meta.load_format()?)
}

/// A format record as shown to users: a stored secret key is replaced by a note saying so.
pub fn display_format(format: &Format) -> serde_json::Value {
    let mut v = serde_json::to_value(format).expect("formats serialize");
    if !format.secret_key.is_empty() {
        v["secret_key"] = "stored in the volume, sealed (not shown)".into();
    }
    v
}

/// The credentials a mount uses: those given, else those stored in the volume, else none
/// (the AWS credential chain).
pub fn effective_credentials(
    format: &Format,
    access: &StoreAccess,
) -> Result<Option<(String, String)>, VolumeError> {
    if access.credentials.is_some() || format.secret_key.is_empty() {
        return Ok(access.credentials.clone());
    }
    let secret = crate::secret::open(&format.uuid, &format.name, &format.secret_key)
        .map_err(|e| VolumeError::Invalid(e.to_string()))?;
    Ok(Some((format.access_key.clone(), secret)))
}

/// Writes, reads back and deletes a probe object, explaining what failed.
pub async fn probe_store(store: &dyn ObjectStore, volume: &str) -> Result<(), VolumeError> {
    let key = format!("{volume}/.probe-{:016x}", rand::random::<u64>());
    let what = |step: &str, e: &dyn std::fmt::Display| {
        VolumeError::Invalid(format!(
            "object store {} is not usable ({step} of a probe object failed): {e}",
            store.describe()
        ))
    };
    let data = bytes::Bytes::from_static(b"tidefs probe");
    store
        .put(&key, data.clone())
        .await
        .map_err(|e| what("put", &e))?;
    let back = store.get(&key, None).await.map_err(|e| what("get", &e))?;
    if back != data {
        return Err(what("read-back", &"content differs"));
    }
    let failed = store.delete_batch(std::slice::from_ref(&key)).await;
    if let Some((_, e)) = failed.first() {
        return Err(what("delete", e));
    }
    Ok(())
}

/// Opens the object store a format names. Transient failures are retried with backoff; every
/// call and every retry is counted in the returned metrics.
pub async fn open_store(
    format: &Format,
    access: &StoreAccess,
) -> Result<(Arc<dyn ObjectStore>, Arc<StoreMetrics>), VolumeError> {
    let (store, metrics) = open_instrumented(format, access).await?;
    Ok((
        Arc::new(Retrying::new(store, access.retry.clone(), metrics.clone())),
        metrics,
    ))
}

async fn open_instrumented(
    format: &Format,
    access: &StoreAccess,
) -> Result<(Arc<dyn ObjectStore>, Arc<StoreMetrics>), VolumeError> {
    let raw: Arc<dyn ObjectStore> = match format.storage.as_str() {
        "file" => {
            let buffers = BufferPool::shared(format.block_size as usize);
            Arc::new(LocalStore::open(Path::new(&format.bucket))?.with_block_buffers(buffers))
        }
        "s3" => {
            let location = S3Location::parse(&format.bucket).map_err(VolumeError::Invalid)?;
            let opts = S3Options {
                location,
                region: access.region.clone(),
                credentials: effective_credentials(format, access)?,
                max_uploads: access.max_uploads,
                max_downloads: access.max_downloads,
                max_deletes: access.max_deletes,
                timeout: std::time::Duration::from_secs(60),
            };
            let buffers = BufferPool::shared(format.block_size as usize);
            Arc::new(S3Store::new(&opts).await.with_block_buffers(buffers))
        }
        other => {
            return Err(VolumeError::Invalid(format!(
                "unsupported storage {other:?}"
            )))
        }
    };
    let instrumented = Instrumented::new(raw);
    let metrics = instrumented.metrics();
    Ok((Arc::new(instrumented), metrics))
}

/// Opens the metadata of an existing volume.
pub fn open_meta(url: &MetaUrl) -> Result<(Arc<dyn Meta>, Format), VolumeError> {
    let meta: Arc<dyn Meta> = Arc::from(tidefs_meta::open(url, false)?);
    let format = meta.load_format()?;
    Ok((meta, format))
}

/// Decodes the octal escapes (`\040` for a space) of a /proc mountinfo field.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filesystem mounted exactly at `path`, if any, as "TYPE SOURCE" (from
/// /proc/self/mountinfo); a tidefs mount reads `fuse tidefs:NAME`.
pub fn mounted_fs(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() > sep + 2 && fields.len() > 4 && unescape_mount_path(fields[4]) == want {
            found = Some(format!(
                "{} {}",
                fields[sep + 1],
                unescape_mount_path(fields[sep + 2])
            ));
        }
    }
    found
}

/// Checks that `path` can be mounted on: it exists, is a directory and nothing is mounted
/// there. A dead mount in the way (one whose process is gone: a killed tidefs, or another
/// FUSE filesystem's) is detached first. Returns the canonical path.
pub fn prepare_mountpoint(path: &Path) -> Result<PathBuf, VolumeError> {
    let err = |why: String| VolumeError::Mountpoint {
        path: path.to_path_buf(),
        why,
    };
    let detach = |at: &Path| {
        tracing::warn!(path = %at.display(), "detaching a dead mount (its process is gone)");
        unmount(at, true).map_err(|e| {
            err(format!(
                "a dead mount is in the way and could not be detached: {e}"
            ))
        })
    };
    match std::fs::metadata(path) {
        Err(e) if is_dead_mount(&e) => detach(&absolute(path))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(err("does not exist".into()))
        }
        Err(e) => return Err(err(e.to_string())),
        Ok(m) if !m.is_dir() => return Err(err("is not a directory".into())),
        Ok(_) => {}
    }
    let canonical = match std::fs::canonicalize(path) {
        // The cached attributes of a dead mount's root ran out since the stat above.
        Err(e) if is_dead_mount(&e) => {
            detach(&absolute(path))?;
            std::fs::canonicalize(path)
        }
        found => found,
    }
    .map_err(|e| err(e.to_string()))?;
    if let Some(fs) = mounted_fs(&canonical) {
        // For a while after its process died, a mount's root still stats fine: the kernel
        // answers from its attribute cache. statfs(2) is never cached.
        match statfs_answer(&canonical, MOUNT_PROBE_TIMEOUT) {
            Some(Err(e)) if is_dead_mount(&e) && fs.starts_with("fuse") => {
                detach(&canonical)?;
                if let Some(fs) = mounted_fs(&canonical) {
                    return Err(err(format!("is already mounted ({fs})")));
                }
            }
            Some(_) => return Err(err(format!("is already mounted ({fs})"))),
            None => {
                return Err(err(format!(
                    "is already mounted ({fs}), and that mount does not answer"
                )))
            }
        }
    }
    Ok(canonical)
}

/// How long a mount found in the way has to answer statfs(2) before it is taken for live but
/// hung (and left alone).
const MOUNT_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `e` is what a mount whose process is gone answers: ENOTCONN once its connection is
/// aborted, ECONNABORTED for a request that was under way as the process died (seen 2 ms
/// after a kill -9).
fn is_dead_mount(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
}

/// The outcome of statfs(2) on `path`, which the kernel never answers from a cache (so a dead
/// FUSE mount answers ENOTCONN at once), or None if it takes longer than `timeout` (the call
/// goes on in a thread of its own, which a hung mount may keep).
pub fn statfs_answer(path: &Path, timeout: std::time::Duration) -> Option<std::io::Result<()>> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("tidefs-probe".into())
        .spawn(move || {
            let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
            // SAFETY: `c` is a NUL-terminated path and `buf` has room for a statfs.
            let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
            let _ = tx.send(if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            });
        })
        .ok()?;
    rx.recv_timeout(timeout).ok()
}

/// The mount point of the filesystem holding `path` (an absolute, resolved path).
pub fn mount_point_of(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .find(|a| mounted_fs(a).is_some())
        .map(Path::to_path_buf)
}

/// Whether a tidefs volume is mounted at `path` (type `fuse` when mounted by root with
/// mount(2), `fuse.tidefs` through fusermount3).
pub fn is_tidefs_mount(path: &Path) -> bool {
    mounted_fs(path).is_some_and(|fs| {
        let (kind, source) = fs.split_once(' ').unwrap_or((&fs, ""));
        (kind == "fuse" || kind == "fuse.tidefs") && source.starts_with("tidefs:")
    })
}

/// Checks that /dev/fuse can be opened (other users than root need it too: the mount first
/// tries mount(2) on its own descriptor, then fusermount3).
pub fn check_fuse_device() -> Result<(), VolumeError> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(VolumeError::Invalid(
            "/dev/fuse is not readable and writable by this user: make it mode 0666 \
             (the Debian default) or mount as root"
                .into(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VolumeError::Invalid(
            "/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or, in a container, pass --device /dev/fuse".into(),
        )),
        Err(e) => Err(VolumeError::Io { what: "cannot open /dev/fuse".into(), source: e }),
    }
}

/// Unmounts `path`: umount2(2) as root, fusermount3 otherwise; `lazy` detaches even if busy.
pub fn unmount(path: &Path, lazy: bool) -> Result<(), VolumeError> {
    let io = |what: String, source| VolumeError::Io { what, source };
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| VolumeError::Invalid("path contains a NUL byte".into()))?;
        let flags = if lazy { libc::MNT_DETACH } else { 0 };
        if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
            return Err(io(
                format!("umount {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        return Ok(());
    }
    let mut cmd = std::process::Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let out = cmd
        .arg(path)
        .output()
        .map_err(|e| io("cannot run fusermount3 (install fuse3)".into(), e))?;
    if !out.status.success() {
        return Err(VolumeError::Invalid(format!(
            "fusermount3 -u {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_secret_key() {
        let access = StoreAccess {
            credentials: Some(("AKID".into(), "very-secret".into())),
            ..StoreAccess::default()
        };
        let text = format!("{access:?}");
        assert!(
            text.contains("AKID") && !text.contains("very-secret"),
            "{text}"
        );
    }

    #[test]
    fn names_follow_bucket_rules() {
        check_name("my-vol1").unwrap();
        for bad in [
            "ab",
            "Upper",
            "under_score",
            "-lead",
            "trail-",
            &"x".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn format_checks_block_size_and_storage() {
        let url = MetaUrl::Sqlite("/tmp/x/vol.db".into());
        let mut req = FormatRequest {
            name: "vol".into(),
            storage: "file".into(),
            bucket: None,
            block_size_kib: 4096,
            trash_days: 0,
            capacity_gib: 0,
            inodes: 0,
            shards: 0,
            store_secret: false,
        };
        let f = build_format(&url, &req).unwrap();
        assert_eq!(
            (f.block_size, f.bucket.as_str()),
            (4 << 20, "/tmp/x/vol-objects")
        );
        req.block_size_kib = 100;
        assert!(build_format(&url, &req)
            .unwrap_err()
            .to_string()
            .contains("power of two"));
        req.block_size_kib = 1024;
        req.shards = 257;
        assert!(build_format(&url, &req)
            .unwrap_err()
            .to_string()
            .contains("--shards"));
        req.shards = 16;
        assert_eq!(build_format(&url, &req).unwrap().shards, 16);
        req.storage = "ftp".into();
        assert!(build_format(&url, &req)
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(mounted_fs(Path::new("/proc")).as_deref(), Some("proc proc"));
    }

    #[test]
    fn mountpoint_problems_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(prepare_mountpoint(&missing)
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(prepare_mountpoint(&file)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
        assert!(prepare_mountpoint(Path::new("/proc"))
            .unwrap_err()
            .to_string()
            .contains("already mounted"));
        prepare_mountpoint(dir.path()).unwrap();
    }
}
