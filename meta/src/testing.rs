//! Servers for tests: a throwaway redis-server on 127.0.0.1, stopped by PID when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server started for a test: a random port on 127.0.0.1, its files in a temporary
/// directory, nothing persisted unless asked. Dropping it kills the server and deletes the
/// directory.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server without persistence. Panics with a clear message when redis-server is
    /// not installed (`apt-get install redis-server`).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra configuration arguments (e.g. `["--appendonly", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tidefs-redis-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("create the redis test directory");
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        for _ in 0..10 {
            let port = free_port();
            let mut server = RedisServer {
                child: spawn(port, &dir, &extra),
                port,
                dir: dir.clone(),
                extra: extra.clone(),
            };
            if server.wait_ready() {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
            // The port was probably taken meanwhile; another one is tried. Keep the directory.
            server.dir = PathBuf::new();
        }
        let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        panic!("redis-server did not start: {log}");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut reply = [0u8; 16];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.set_read_timeout(Some(Duration::from_secs(1))).is_ok()
                    && s.read(&mut reply)
                        .is_ok_and(|n| reply[..n].starts_with(b"+PONG"))
                {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the server (SIGKILL, as a crash), then starts it again on the same port and
    /// directory with the same configuration; what it persisted (e.g. an append-only file) is
    /// loaded again. `down` runs while no server is listening.
    pub fn crash_and_restart(&mut self, down: impl FnOnce()) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        down();
        self.child = spawn(self.port, &self.dir, &self.extra);
        assert!(self.wait_ready(), "redis-server did not come back");
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A META_URL for database `db` of this server.
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", "redis.log"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run redis-server: install it (apt-get install redis-server)")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
