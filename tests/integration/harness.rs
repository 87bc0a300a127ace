//! Real volumes and real mounts for integration tests: every `Volume` lives in its own
//! temporary directory, and every `Mount` is a `tidefs mount` process that is unmounted and
//! reaped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
pub use tidefs_meta::testing::RedisServer;

/// The tidefs binary under test.
pub const TIDEFS: &str = env!("CARGO_BIN_EXE_tidefs");

/// Runs `tidefs ARGS` to completion.
pub fn tidefs(args: &[&str]) -> Output {
    Command::new(TIDEFS)
        .args(args)
        .output()
        .expect("run tidefs")
}

/// A zeroed buffer of `len` bytes starting on a 4 KiB boundary, as O_DIRECT needs.
pub struct DirectBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl DirectBuf {
    /// A buffer of `len` zeroed bytes.
    pub fn new(len: usize) -> DirectBuf {
        let bytes = vec![0u8; len + 4096];
        let start = bytes.as_ptr().align_offset(4096);
        DirectBuf { bytes, start, len }
    }
}

impl std::ops::Deref for DirectBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for DirectBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// Asserts that `got` equals `want`, naming the first byte that differs (not printing both).
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// What `tidefs status URL` reports, as JSON; panics if it fails.
pub fn status(url: &str) -> serde_json::Value {
    let out = tidefs(&["status", url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

/// A formatted volume: SQLite metadata in a temp dir, or in a redis-server of its own when
/// `TIDEFS_TEST_META=redis`; objects in a local directory, or in a bucket of the test S3
/// server when `TIDEFS_TEST_STORAGE=s3`.
pub struct Volume {
    pub dir: tempfile::TempDir,
    pub url: String,
    /// Where the objects end up on the local disk (for the S3 server, its bucket directory).
    pub bucket: PathBuf,
    /// Extra `mount` arguments the store needs (S3 credentials).
    pub store_args: Vec<String>,
    /// The volume's own redis-server when this run tests the Redis engine; declared last so
    /// it stops after everything else is dropped.
    pub redis: Option<RedisServer>,
}

impl Volume {
    /// A new volume with blocks of `block_kib` KiB, on the storage this run tests.
    pub fn new(block_kib: u32) -> Volume {
        Volume::with_storage(block_kib, s3_storage(), test_redis(), &[])
    }

    /// A new volume with metadata in a redis-server of its own, whatever this run tests: a
    /// volume several mounts may share.
    pub fn shared(block_kib: u32) -> Volume {
        Volume::on_redis(block_kib, RedisServer::start())
    }

    /// A new volume with metadata in `server`.
    pub fn on_redis(block_kib: u32, server: RedisServer) -> Volume {
        Volume::with_storage(block_kib, s3_storage(), Some(server), &[])
    }

    /// A new volume formatted with extra `tidefs format` options.
    pub fn formatted_with(block_kib: u32, extra: &[&str]) -> Volume {
        Volume::with_storage(block_kib, s3_storage(), test_redis(), extra)
    }

    /// A new volume whose objects are in a local directory, whatever this run tests.
    pub fn local(block_kib: u32) -> Volume {
        Volume::with_storage(block_kib, false, test_redis(), &[])
    }

    fn with_storage(
        block_kib: u32,
        s3: bool,
        redis: Option<RedisServer>,
        extra: &[&str],
    ) -> Volume {
        let dir = tempfile::Builder::new()
            .prefix("tidefs-it.")
            .tempdir()
            .expect("temp dir");
        // Other users (permission tests) must reach the mountpoint inside.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let url = match &redis {
            Some(server) => server.url(1),
            None => format!("sqlite3://{}", dir.path().join("meta.db").display()),
        };
        let (bucket, mut args, store_args) = if s3 {
            let server = s3_server();
            let (bucket_url, bucket_dir) = server.new_bucket();
            let creds = server.credentials();
            let mut args = vec![
                "--storage".to_string(),
                "s3".into(),
                "--bucket".into(),
                bucket_url,
            ];
            args.extend(creds.iter().cloned());
            (bucket_dir, args, creds)
        } else {
            let bucket = dir.path().join("objects");
            let args = vec!["--bucket".to_string(), bucket.display().to_string()];
            (bucket, args, Vec::new())
        };
        args.extend(["--block-size".to_string(), block_kib.to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut all = vec!["format".to_string(), url.clone(), "itest".into()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = tidefs(&all);
        assert!(
            out.status.success(),
            "format failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Volume {
            dir,
            url,
            bucket,
            store_args,
            redis,
        }
    }

    /// Mounts the volume at a fresh directory.
    pub fn mount(&self) -> Mount {
        self.mount_with(&[])
    }

    /// Mounts with extra `tidefs mount` options.
    pub fn mount_with(&self, extra: &[&str]) -> Mount {
        let path = self.dir.path().join("mnt");
        // (A killed mount may still be in the way there, which a stat cannot see through.)
        if let Err(e) = std::fs::create_dir(&path) {
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        }
        self.mount_at(&path, extra, "mount.log")
    }

    /// Mounts at `path`, logging to `log` in the volume's directory.
    pub fn mount_at(&self, path: &Path, extra: &[&str], log: &str) -> Mount {
        let mut args: Vec<&str> = self.store_args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Mount::start(&self.url, path, &args, self.dir.path().join(log))
    }

    /// Every object file in the bucket (relative keys).
    pub fn objects(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, root, out);
                } else if !e.file_name().to_string_lossy().starts_with('.') {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.bucket, &self.bucket, &mut out);
        out.sort();
        out
    }
}

/// A running `tidefs mount`.
pub struct Mount {
    pub path: PathBuf,
    pub child: Option<Child>,
    log: PathBuf,
}

/// Whether a tidefs filesystem is mounted at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.display().to_string();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 4
            && f[4] == want
            && (l.contains(" - fuse tidefs:") || l.contains(" - fuse.tidefs tidefs:"))
    })
}

impl Mount {
    /// Starts `tidefs mount URL PATH EXTRA...` and waits until it is mounted.
    pub fn start(url: &str, path: &Path, extra: &[&str], log: PathBuf) -> Mount {
        // Through the parent: a dead mount at `path` itself cannot be resolved.
        let path = std::fs::canonicalize(path.parent().unwrap())
            .unwrap()
            .join(path.file_name().unwrap());
        let logfile = std::fs::File::create(&log).unwrap();
        let child = Command::new(TIDEFS)
            .arg("mount")
            .arg(url)
            .arg(&path)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn tidefs mount");
        let mut m = Mount {
            path,
            child: Some(child),
            log,
        };
        m.wait_mounted();
        m
    }

    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        // A dead mount left in the way by a kill does not count.
        while !(is_mounted(&self.path) && answers(&self.path)) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mount exited early ({status}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mount did not come up: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the mount process logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the files closed so far are committed, their blocks in the store: a
    /// SQLite volume's mount commits them after close returns (close-behind), and an fsync of
    /// any directory waits for that.
    pub fn settle(&self) {
        std::fs::File::open(&self.path).unwrap().sync_all().unwrap();
    }

    /// A path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Unmounts with `tidefs umount` and waits for the process to exit cleanly.
    pub fn unmount(mut self) {
        let out = tidefs(&["umount", self.path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "umount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "mount exited with {status}: {}",
            self.log_text()
        );
        assert!(!self.log_text().contains("panicked"), "{}", self.log_text());
    }

    /// Waits for the mount process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "mount process did not exit: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the mount process with SIGKILL. Its dead mount stays in place, as after a real
    /// crash, while the returned guard lives (dropping it at once detaches it).
    pub fn kill9(mut self) -> DeadMount {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // Taken, so that dropping `self` leaves the mount alone.
        DeadMount {
            path: std::mem::take(&mut self.path),
        }
    }

    /// Sends `signal` to the mount process.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = tidefs(&["umount", "--force", self.path.to_str().unwrap()]);
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The mount point of a killed mount. Dropped, it detaches the dead mount unless a live one
/// has taken its place.
pub struct DeadMount {
    path: PathBuf,
}

impl Drop for DeadMount {
    fn drop(&mut self) {
        if is_mounted(&self.path) && !answers(&self.path) {
            let _ = tidefs(&["umount", "--force", self.path.to_str().unwrap()]);
        }
    }
}

/// Whether the filesystem at `path` answers statfs(2) within 2 s: false for a dead mount (and
/// for one stuck before it serves, so that the caller's deadline still fires).
fn answers(path: &Path) -> bool {
    tidefs::volume::statfs_answer(path, Duration::from_secs(2)).is_some_and(|r| r.is_ok())
}

/// `sh -c script`, to run as user `nobody` (uid/gid 65534).
fn nobody_sh(script: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(script).uid(65534).gid(65534);
    sh
}

/// Runs a shell command as user `nobody` and returns whether it succeeded.
pub fn as_nobody(script: &str) -> bool {
    nobody_sh(script)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run sh")
        .success()
}

/// Runs `script` with `sh -c` as user nobody; panics with its output if it fails.
pub fn run_as_nobody(script: &str) -> String {
    let out = nobody_sh(script).output().expect("run sh");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "{script}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The errno of the last failed libc call.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

/// A C string of a path.
pub fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

/// A redis-server for a new volume's metadata when this run tests Redis.
fn test_redis() -> Option<RedisServer> {
    redis_meta().then(RedisServer::start)
}

/// Whether this run keeps metadata in Redis (`TIDEFS_TEST_META=redis`).
pub fn redis_meta() -> bool {
    std::env::var("TIDEFS_TEST_META").is_ok_and(|v| v == "redis")
}

/// Whether this run tests S3-backed volumes (`TIDEFS_TEST_STORAGE=s3`).
pub fn s3_storage() -> bool {
    std::env::var("TIDEFS_TEST_STORAGE").is_ok_and(|v| v == "s3")
}

/// The test S3 server, started on first use for the whole test process.
pub fn s3_server() -> &'static S3Server {
    static SERVER: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
    SERVER.get_or_init(S3Server::start)
}

/// An s3s-fs server on a random port of 127.0.0.1, storing buckets as directories under a
/// temporary root. It is killed when the test process exits (PR_SET_PDEATHSIG), so it never
/// outlives the tests.
pub struct S3Server {
    pub endpoint: String,
    pub root: PathBuf,
    next: std::sync::atomic::AtomicU32,
    _child: Child,
}

/// Access key and secret key of the test server.
pub const S3_KEYS: (&str, &str) = ("tidefs-test-ak", "tidefs-test-sk");

impl S3Server {
    fn start() -> S3Server {
        use std::os::unix::process::CommandExt;
        let bin = std::env::var("S3S_FS").unwrap_or_else(|_| {
            let cargo_bin = std::env::var("HOME").map(|h| format!("{h}/.cargo/bin/s3s-fs"));
            cargo_bin
                .ok()
                .filter(|p| Path::new(p).exists())
                .unwrap_or_else(|| "s3s-fs".into())
        });
        // The server lives in a static, which is never dropped: its directory is removed by
        // an exit handler instead.
        let root = tempfile::Builder::new()
            .prefix("tidefs-s3.")
            .tempdir()
            .unwrap()
            .keep();
        static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        extern "C" fn remove_root() {
            if let Some(root) = ROOT.get() {
                let _ = std::fs::remove_dir_all(root);
            }
        }
        if ROOT.set(root.clone()).is_ok() {
            unsafe { libc::atexit(remove_root) };
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(&bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEYS.0, "--secret-key", S3_KEYS.1])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // PR_SET_PDEATHSIG fires when the spawning *thread* ends: spawn from a thread that
        // lives as long as the test process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        });
        let mut child = rx.recv().unwrap().unwrap_or_else(|e| {
            panic!("cannot start the S3 test server {bin:?} ({e}): run scripts/install-deps.sh")
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            // (If another process took the port first, the server exits: say so.)
            if let Ok(Some(status)) = child.try_wait() {
                panic!("S3 test server exited ({status}) before listening on port {port}");
            }
            assert!(
                Instant::now() < deadline,
                "S3 test server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            next: std::sync::atomic::AtomicU32::new(0),
            _child: child,
        }
    }

    /// A fresh bucket: its URL and its directory on the local disk.
    pub fn new_bucket(&self) -> (String, PathBuf) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("bucket-{}-{n}", std::process::id());
        let dir = self.root.join(&name);
        std::fs::create_dir(&dir).unwrap();
        (format!("{}/{name}", self.endpoint), dir)
    }

    /// The `--access-key`/`--secret-key` arguments for this server.
    pub fn credentials(&self) -> Vec<String> {
        ["--access-key", S3_KEYS.0, "--secret-key", S3_KEYS.1]
            .map(String::from)
            .to_vec()
    }
}

/// The names in directory `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
