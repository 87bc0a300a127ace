//! The Redis engine: metadata in one Redis database, shared by every mount of the volume.
//!
//! Every [`Meta`] operation that changes more than one key is one call of a server-side Lua
//! script (`redis.lua`): Redis runs a script to its end without interleaving other commands,
//! so each operation is atomic and isolated across all mounts, and costs one round trip.
//! Reads of a single key go straight to Redis. The key schema is described in `redis.lua` and
//! in docs/design.md.
//!
//! Durability is Redis's: with `appendonly yes` and `appendfsync always` every reply follows
//! an fsync; with `everysec` (Redis's default for AOF) [`Meta::sync`] waits for the fsync with
//! `WAITAOF` where the server has it (Redis 7.2 and later).

use crate::dump::{DumpHeader, DumpRecord};
use crate::lock::{self, Lock};
use crate::types::*;
use crate::{check_name, Meta, MetaError, Result};
use redis::{Connection, RedisError, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const SCRIPT: &str = include_str!("redis.lua");

/// How long to wait for a connection to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one command may take before the operation fails with EIO. The namespace check
/// runs as one script and may take long on a large volume.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Connections kept for reuse.
const POOL_SIZE: usize = 64;

/// The Redis metadata engine.
pub struct RedisMeta {
    client: redis::Client,
    /// The URL with any password hidden, for messages.
    shown: String,
    pool: Mutex<Vec<Connection>>,
    script: redis::Script,
    /// The library of operations as Redis 7 functions (`FUNCTION LOAD`): its code runs once,
    /// at load, where a script's runs at every call. Its function is `tidefs_<hash>`, so
    /// mounts of different versions use their own. None on servers without functions.
    library: Option<Library>,
    /// Whether the server knows WAITAOF (Redis 7.2+); cleared at the first refusal.
    waitaof: AtomicBool,
    /// The inodes recent lookups and creations found under (directory, name): the likely
    /// target of an unlink or a replacing rename, so the call can say at once whether it is
    /// open and take one round trip, not two. A wrong guess only costs the second trip (the
    /// script checks it).
    named: Mutex<HashMap<(Ino, Vec<u8>), Ino>>,
}

/// Most (directory, name) guesses kept; the map is emptied when full.
const NAMED_MAX: usize = 65_536;

impl std::fmt::Debug for RedisMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMeta")
            .field("url", &self.shown)
            .finish()
    }
}

/// `url` with the password of its user info replaced by `****`.
pub fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rfind('@') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_string(),
    }
}

fn map_err(e: RedisError) -> MetaError {
    match e.code() {
        Some("ENOENT") => MetaError::NotFound,
        Some("EEXIST") => MetaError::Exists,
        Some("ENOTEMPTY") => MetaError::NotEmpty,
        Some("ENOTDIR") => MetaError::NotDir,
        Some("EISDIR") => MetaError::IsDir,
        Some("EPERM") => MetaError::NotPermitted,
        Some("EINVAL") => MetaError::Invalid,
        Some("ENAMETOOLONG") => MetaError::NameTooLong,
        Some("ENODATA") => MetaError::NoData,
        Some("EMLINK") => MetaError::TooManyLinks,
        Some("ENOSPC") => MetaError::NoSpace,
        Some("EOPNOTSUPP") => MetaError::NotSupported,
        _ => MetaError::Engine(format!("redis: {e}")),
    }
}

/// Whether `e` came from the server's answer to a well-formed exchange, so the connection is
/// still in step and may be reused.
fn connection_usable(e: &RedisError) -> bool {
    !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error())
}

fn bytes(v: &Value) -> Result<&[u8]> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.as_bytes()),
        other => Err(MetaError::Engine(format!(
            "redis: unexpected reply {other:?}"
        ))),
    }
}

fn text(v: &Value) -> Result<&str> {
    std::str::from_utf8(bytes(v)?)
        .map_err(|_| MetaError::Engine("redis: reply is not UTF-8".into()))
}

fn number<T: std::str::FromStr>(v: &Value) -> Result<T> {
    if let Value::Int(i) = v {
        return i
            .to_string()
            .parse()
            .map_err(|_| MetaError::Engine(format!("redis: number {i} out of range")));
    }
    let s = text(v)?;
    s.parse()
        .map_err(|_| MetaError::Engine(format!("redis: {s:?} is not a number")))
}

fn items(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(MetaError::Engine(format!(
            "redis: expected a list, got {other:?}"
        ))),
    }
}

/// How often a lookup reads a name again when its inode vanished between the two reads.
const LOOKUP_TRIES: usize = 3;

fn corrupt(what: &str, raw: &str) -> MetaError {
    MetaError::Engine(format!("redis: corrupt {what} {raw:?}"))
}

/// Decodes an inode record `kind,mode,uid,gid,rdev,nlink,length,atime s,ns,mtime s,ns,ctime
/// s,ns,parent` (see redis.lua).
fn decode_attr(ino: Ino, raw: &str) -> Result<Attr> {
    let f: Vec<&str> = raw.split(',').collect();
    if f.len() != 14 {
        return Err(corrupt("inode", raw));
    }
    let n = |i: usize| f[i].parse::<i64>().map_err(|_| corrupt("inode", raw));
    let ts = |i: usize| -> Result<Timestamp> {
        Ok(Timestamp {
            sec: n(i)?,
            nsec: n(i + 1)? as u32,
        })
    };
    Ok(Attr {
        ino,
        kind: FileKind::from_code(n(0)? as u8).ok_or_else(|| corrupt("inode", raw))?,
        mode: n(1)? as u32,
        uid: n(2)? as u32,
        gid: n(3)? as u32,
        rdev: n(4)? as u32,
        nlink: n(5)? as u32,
        length: n(6)? as u64,
        atime: ts(7)?,
        mtime: ts(9)?,
        ctime: ts(11)?,
        parent: f[13].parse().map_err(|_| corrupt("inode", raw))?,
    })
}

/// The inode record of `a`, as [`decode_attr`] reads it.
fn encode_attr(a: &Attr) -> String {
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        a.kind.code(),
        a.mode,
        a.uid,
        a.gid,
        a.rdev,
        a.nlink,
        a.length,
        a.atime.sec,
        a.atime.nsec,
        a.mtime.sec,
        a.mtime.nsec,
        a.ctime.sec,
        a.ctime.nsec,
        a.parent
    )
}

/// The list element of slice `s`, as [`decode_slice`] reads it.
fn encode_slice(s: &Slice) -> String {
    format!("{},{},{},{},{}", s.id, s.size, s.off, s.len, s.pos)
}

/// The attributes in a script's `{ino, record}` reply.
fn attr_reply(v: Value) -> Result<Attr> {
    let v = items(v)?;
    match v.as_slice() {
        [ino, raw] => decode_attr(number(ino)?, text(raw)?),
        _ => Err(MetaError::Engine("redis: malformed inode reply".into())),
    }
}

/// The numbers of a record `raw` of kind `what`, separated by `,` or `:`.
fn numbers(raw: &str, what: &str) -> Result<Vec<u64>> {
    raw.split([',', ':'])
        .map(|x| x.parse().map_err(|_| corrupt(what, raw)))
        .collect()
}

fn decode_slice(raw: &str) -> Result<Slice> {
    match numbers(raw, "slice")?.as_slice() {
        &[id, size, off, len, pos] => Ok(Slice {
            id,
            size: size as u32,
            off: off as u32,
            len: len as u32,
            pos: pos as u32,
        }),
        _ => Err(corrupt("slice", raw)),
    }
}

fn slice_args(s: &Slice) -> [u64; 5] {
    [
        s.id,
        s.size as u64,
        s.off as u64,
        s.len as u64,
        s.pos as u64,
    ]
}

/// The operations as a Redis function library.
struct Library {
    name: String,
    code: String,
}

impl Library {
    fn load(&self, c: &mut Connection) -> redis::RedisResult<()> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.code)
            .query::<Value>(c)
            .map(drop)
    }
}

/// Arguments of one script call.
struct Call {
    args: Vec<Vec<u8>>,
}

impl Call {
    fn new(op: &str) -> Self {
        let now = Timestamp::now();
        let mut c = Call { args: Vec::new() };
        c.arg(op)
            .arg(now.sec)
            .arg(now.nsec)
            .arg(trash_hour_name(now.sec));
        c
    }

    fn arg(&mut self, a: impl std::fmt::Display) -> &mut Self {
        self.args.push(a.to_string().into_bytes());
        self
    }

    fn bin(&mut self, a: &[u8]) -> &mut Self {
        self.args.push(a.to_vec());
        self
    }

    fn time(&mut self, t: Option<Timestamp>) -> &mut Self {
        match t {
            Some(t) => self.arg(t.sec).arg(t.nsec),
            None => self.arg("").arg(""),
        }
    }
}

/// What a script asking whether an inode is open (`retry <ino>`) gets back.
enum Outcome {
    Done(Value),
    AskOpen(Ino),
}

impl RedisMeta {
    /// Connects to the Redis database at `url` (`redis://[user:pass@]host:port/db`,
    /// `rediss://...` for TLS, `unix:///path/redis.sock?db=N`). Fails with a clear error when
    /// the server cannot be reached.
    pub fn open(url: &str) -> Result<Self> {
        let shown = hide_password(url);
        if url.starts_with("rediss://") {
            // TLS needs a process-wide crypto provider; the one the build already has (the
            // S3 client's) unless another part of the process chose one first.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        let client = redis::Client::open(url)
            .map_err(|e| MetaError::Engine(format!("invalid redis URL {shown}: {e}")))?;
        let code = SCRIPT.replace("@TRASH_INO@", &TRASH_INO.to_string());
        let script = redis::Script::new(&code.replace("-- @ENTRY@", "return dispatch(ARGV)"));
        let name = format!("tidefs_{}", &script.get_hash()[..16]);
        let library = Library {
            code: format!("#!lua name={name}\n")
                + &code.replace(
                    "-- @ENTRY@",
                    &format!(
                        "redis.register_function('{name}', function(_, args) \
                         return dispatch(args) end)"
                    ),
                ),
            name,
        };
        let mut meta = RedisMeta {
            client,
            shown,
            pool: Mutex::new(Vec::new()),
            script,
            library: None,
            waitaof: AtomicBool::new(true),
            named: Mutex::new(HashMap::new()),
        };
        let mut conn = meta.connect()?;
        match library.load(&mut conn) {
            Ok(()) => meta.library = Some(library),
            Err(e) => tracing::info!(
                url = %meta.shown,
                error = %e,
                "redis functions unavailable; running operations as scripts"
            ),
        }
        meta.put_conn(conn);
        Ok(meta)
    }

    fn connect(&self) -> Result<Connection> {
        let conn = self
            .client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(|e| MetaError::Engine(format!("cannot connect to {}: {e}", self.shown)))?;
        conn.set_read_timeout(Some(COMMAND_TIMEOUT))
            .and_then(|_| conn.set_write_timeout(Some(COMMAND_TIMEOUT)))
            .map_err(|e| MetaError::Engine(format!("redis {}: {e}", self.shown)))?;
        Ok(conn)
    }

    fn put_conn(&self, conn: Connection) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_SIZE {
            pool.push(conn);
        }
    }

    /// Runs `f` on a pooled connection; a connection that failed below the protocol level is
    /// dropped, not reused.
    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Result<T> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.connect()?,
        };
        match f(&mut conn) {
            Ok(v) => {
                self.put_conn(conn);
                Ok(v)
            }
            Err(e) => {
                if connection_usable(&e) {
                    self.put_conn(conn);
                }
                Err(map_err(e))
            }
        }
    }

    /// The stored POSIX locks of `ino` (`lock;lock;...`, empty for none) and their decoding.
    fn file_locks(&self, ino: Ino) -> Result<(String, Vec<Lock>)> {
        let raw: Option<String> =
            self.with_conn(|c| redis::cmd("GET").arg(format!("p{ino}")).query(c))?;
        let raw = raw.unwrap_or_default();
        let locks = raw
            .split(';')
            .filter(|l| !l.is_empty())
            .map(|l| Lock::decode(l).ok_or_else(|| corrupt("lock", l)))
            .collect::<Result<_>>()?;
        Ok((raw, locks))
    }

    /// Up to `limit` members of sorted set `key` scored above `after`, in score order.
    fn ids_after(&self, key: &str, after: u64, limit: usize) -> Result<Vec<String>> {
        self.with_conn(|c| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(key)
                .arg(format!("({after}"))
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(redis_count(limit))
                .query(c)
        })
    }

    fn cmd(&self, cmd: &redis::Cmd) -> Result<Value> {
        self.with_conn(|c| cmd.query(c))
    }

    fn run(&self, call: &Call) -> Result<Outcome> {
        let v: Value = match &self.library {
            Some(lib) => self.with_conn(|c| {
                let mut fcall = redis::cmd("FCALL");
                fcall.arg(&lib.name).arg(0);
                for a in &call.args {
                    fcall.arg(a.as_slice());
                }
                match fcall.query(c) {
                    // A server restarted without persistence forgot the library.
                    Err(e) if e.to_string().contains("Function not found") => {
                        lib.load(c)?;
                        fcall.query(c)
                    }
                    r => r,
                }
            })?,
            None => {
                let mut inv = self.script.prepare_invoke();
                for a in &call.args {
                    inv.arg(a.as_slice());
                }
                self.with_conn(|c| inv.invoke(c))?
            }
        };
        if let Value::BulkString(b) = &v {
            if let Some(ino) = b.strip_prefix(b"retry ") {
                let ino = std::str::from_utf8(ino)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| MetaError::Engine("redis: malformed retry".into()))?;
                return Ok(Outcome::AskOpen(ino));
            }
        }
        Ok(Outcome::Done(v))
    }

    fn call(&self, call: &Call) -> Result<Value> {
        match self.run(call)? {
            Outcome::Done(v) => Ok(v),
            Outcome::AskOpen(_) => Err(MetaError::Engine("redis: unexpected retry".into())),
        }
    }

    /// Runs an operation that may drop the last name of an inode: the script asks whether
    /// that inode is open (only this mount knows), and the call is repeated with the answer.
    /// If the namespace changed in between, the script asks again.
    fn call_with_open(
        &self,
        target: (Ino, &[u8]),
        make: impl Fn(Option<(Ino, bool)>) -> Call,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()> {
        let guess = self.forget(target.0, target.1);
        let mut answer = guess.map(|ino| (ino, is_open(ino)));
        for _ in 0..100 {
            match self.run(&make(answer))? {
                Outcome::Done(_) => return Ok(()),
                Outcome::AskOpen(ino) => answer = Some((ino, is_open(ino))),
            }
        }
        Err(MetaError::Engine(
            "redis: the namespace kept changing during the operation".into(),
        ))
    }
}

impl RedisMeta {
    /// Remembers that `name` in `parent` is `ino`.
    fn remember(&self, parent: Ino, name: &[u8], ino: Ino) {
        let mut named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        if named.len() >= NAMED_MAX {
            named.clear();
        }
        named.insert((parent, name.to_vec()), ino);
    }

    /// The inode `name` in `parent` was last known as.
    fn known(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.named
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(parent, name.to_vec()))
            .copied()
    }

    /// Forgets `name` in `parent`, returning the inode it was last known as.
    fn forget(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.named
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(parent, name.to_vec()))
    }
}

impl Meta for RedisMeta {
    fn engine(&self) -> &'static str {
        "redis"
    }

    fn format(&self, format: &Format, root_uid: u32, root_gid: u32) -> Result<()> {
        loop {
            match self.load_format() {
                Ok(old) => {
                    let updated = old.updated_with(format)?;
                    let json = serde_json::to_string(&updated).expect("format serializes");
                    self.cmd(
                        redis::cmd("HSET")
                            .arg("setting")
                            .arg("format")
                            .arg(json)
                            .arg("capacity")
                            .arg(updated.capacity)
                            .arg("inodes")
                            .arg(updated.inodes)
                            .arg("trash_days")
                            .arg(updated.trash_days),
                    )?;
                    return Ok(());
                }
                Err(MetaError::NotFormatted) => {}
                Err(e) => return Err(e),
            }
            let json = serde_json::to_string(format).expect("format serializes");
            let v = self.call(
                Call::new("format")
                    .arg(json)
                    .arg(format.capacity)
                    .arg(format.inodes)
                    .arg(format.trash_days)
                    .arg(root_uid)
                    .arg(root_gid),
            )?;
            if text(&v)? == "ok" {
                return Ok(());
            }
            // Formatted by someone else meanwhile: check it as an existing format.
        }
    }

    fn load_format(&self) -> Result<Format> {
        match self.cmd(redis::cmd("HGET").arg("setting").arg("format"))? {
            Value::Nil => Err(MetaError::NotFormatted),
            v => serde_json::from_slice(bytes(&v)?)
                .map_err(|e| MetaError::Engine(format!("corrupt format record: {e}"))),
        }
    }

    fn new_session(&self, info: &SessionInfo) -> Result<u64> {
        let now = Timestamp::now().sec;
        let sid: u64 =
            number(&self.cmd(redis::cmd("HINCRBY").arg("counter").arg("next_sid").arg(1))?)?;
        let record = SessionInfo {
            sid,
            started: now,
            heartbeat: now,
            ..info.clone()
        };
        let json = serde_json::to_string(&record).expect("session serializes");
        self.with_conn(|c| {
            redis::pipe()
                .atomic()
                .hset("sessions", sid, json)
                .ignore()
                .zadd("heartbeats", sid, now)
                .ignore()
                .query::<()>(c)
        })?;
        Ok(sid)
    }

    fn heartbeat(&self, sid: u64) -> Result<()> {
        self.cmd(
            redis::cmd("ZADD")
                .arg("heartbeats")
                .arg("XX")
                .arg(Timestamp::now().sec)
                .arg(sid),
        )?;
        Ok(())
    }

    fn close_session(&self, sid: u64) -> Result<()> {
        self.call(Call::new("close_session").arg(sid))?;
        Ok(())
    }

    fn sessions(&self) -> Result<Vec<SessionInfo>> {
        /// Session records (sid, JSON) and heartbeats (sid, seconds).
        type Listing = (Vec<(u64, String)>, Vec<(u64, i64)>);
        let (records, beats): Listing = self.with_conn(|c| {
            redis::pipe()
                .atomic()
                .hgetall("sessions")
                .zrange_withscores("heartbeats", 0, -1)
                .query(c)
        })?;
        let beats: std::collections::HashMap<u64, i64> = beats.into_iter().collect();
        let mut out = Vec::with_capacity(records.len());
        for (sid, json) in records {
            let mut s: SessionInfo = serde_json::from_str(&json)
                .map_err(|e| MetaError::Engine(format!("corrupt session {sid}: {e}")))?;
            s.sid = sid;
            if let Some(&beat) = beats.get(&sid) {
                s.heartbeat = beat;
            }
            out.push(s);
        }
        out.sort_by_key(|s| s.sid);
        Ok(out)
    }

    fn usage(&self) -> Result<Usage> {
        let (space, inodes): (Option<i64>, Option<i64>) = self.with_conn(|c| {
            redis::cmd("HMGET")
                .arg("counter")
                .arg("used_space")
                .arg("used_inodes")
                .query(c)
        })?;
        Ok(Usage {
            space: space.unwrap_or(0).max(0) as u64,
            inodes: inodes.unwrap_or(0).max(0) as u64,
        })
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        if name == b"." || name == b".." || (parent == ROOT_INO && name == TRASH_NAME) {
            return attr_reply(self.call(Call::new("lookup").arg(parent).bin(name))?);
        }
        // Two plain reads instead of a script: a missing name (the lookup before every
        // create) costs one GET-sized trip, and a name this mount has seen is read with its
        // inode in one pipelined trip. Each entry names an existing inode when read; an
        // inode gone by the second read was unlinked in between, so the name is read again.
        for _ in 0..LOOKUP_TRIES {
            let guess = self.known(parent, name);
            let entry_key = format!("d{parent}");
            let (entry, guessed): (Option<String>, Option<String>) = match guess {
                Some(g) => self.with_conn(|c| {
                    redis::pipe()
                        .cmd("HGET")
                        .arg(&entry_key)
                        .arg(name)
                        .cmd("GET")
                        .arg(format!("i{g}"))
                        .query(c)
                })?,
                None => (
                    self.with_conn(|c| redis::cmd("HGET").arg(&entry_key).arg(name).query(c))?,
                    None,
                ),
            };
            let Some(entry) = entry else {
                self.forget(parent, name);
                return Err(MetaError::NotFound);
            };
            let ino: Ino = entry
                .split(',')
                .next()
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| corrupt("entry", &entry))?;
            let found = match guessed {
                Some(raw) if guess == Some(ino) => decode_attr(ino, &raw),
                _ => self.getattr(ino),
            };
            match found {
                Ok(a) => {
                    self.remember(parent, name, ino);
                    return Ok(a);
                }
                Err(MetaError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Err(MetaError::NotFound)
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        match self.cmd(redis::cmd("GET").arg(format!("i{ino}")))? {
            Value::Nil => Err(MetaError::NotFound),
            v => decode_attr(ino, text(&v)?),
        }
    }

    fn setattr(&self, ino: Ino, set: &SetAttr) -> Result<Attr> {
        let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_default();
        attr_reply(
            self.call(
                Call::new("setattr")
                    .arg(ino)
                    .arg(opt(set.mode))
                    .arg(opt(set.uid))
                    .arg(opt(set.gid))
                    .time(set.atime)
                    .time(set.mtime)
                    .time(set.ctime),
            )?,
        )
    }

    fn truncate(&self, ino: Ino, length: u64, mtime: Timestamp) -> Result<Attr> {
        attr_reply(self.call(Call::new("truncate").arg(ino).arg(length).time(Some(mtime)))?)
    }

    fn fallocate(
        &self,
        ino: Ino,
        mode: FallocMode,
        off: u64,
        len: u64,
        zero_ids: &[u64],
    ) -> Result<Attr> {
        off.checked_add(len).ok_or(MetaError::FileTooLarge)?;
        let (zero, keep_size) = match mode {
            FallocMode::Allocate { keep_size } => (false, keep_size),
            FallocMode::PunchHole => (true, true),
            FallocMode::ZeroRange { keep_size } => (true, keep_size),
        };
        let mut call = Call::new("fallocate");
        call.arg(ino)
            .arg(u8::from(zero))
            .arg(u8::from(keep_size))
            .arg(off)
            .arg(len);
        for id in zero_ids {
            call.arg(id);
        }
        attr_reply(self.call(&call)?)
    }

    fn mknod_with_parent(&self, parent: Ino, name: &[u8], node: &NewNode) -> Result<(Attr, Attr)> {
        check_name(name)?;
        if node.symlink.as_ref().is_some_and(|t| t.len() > SYMLINK_MAX) {
            return Err(MetaError::NameTooLong);
        }
        let groups: Vec<String> = node.groups.iter().map(|g| g.to_string()).collect();
        let reply = items(
            self.call(
                Call::new("mknod")
                    .arg(parent)
                    .bin(name)
                    .arg(node.kind.code())
                    .arg(node.mode)
                    .arg(node.uid)
                    .arg(node.gid)
                    .arg(node.rdev)
                    .arg(u8::from(node.symlink.is_some()))
                    .bin(node.symlink.as_deref().unwrap_or_default())
                    .arg(groups.join(",")),
            )?,
        )?;
        let [ino, raw, dir] = reply.as_slice() else {
            return Err(MetaError::Engine("redis: malformed mknod reply".into()));
        };
        let a = decode_attr(number(ino)?, text(raw)?)?;
        self.remember(parent, name, a.ino);
        Ok((a, decode_attr(parent, text(dir)?)?))
    }

    fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        let a = attr_reply(self.call(Call::new("link").arg(ino).arg(parent).bin(name))?)?;
        self.remember(parent, name, a.ino);
        Ok(a)
    }

    fn unlink(
        &self,
        parent: Ino,
        name: &[u8],
        sid: u64,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        self.call_with_open(
            (parent, name),
            |answer| {
                let mut c = Call::new("unlink");
                c.arg(parent).bin(name).arg(sid);
                open_answer(&mut c, answer);
                c
            },
            is_open,
        )
    }

    fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        match name {
            b"." => return Err(MetaError::Invalid),
            b".." => return Err(MetaError::NotEmpty),
            _ if name.len() > NAME_MAX => return Err(MetaError::NameTooLong),
            _ => {}
        }
        self.forget(parent, name);
        self.call(Call::new("rmdir").arg(parent).bin(name))?;
        Ok(())
    }

    fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
        sid: u64,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        check_name(new_name)?;
        if flags.exchange && flags.noreplace {
            return Err(MetaError::Invalid);
        }
        self.forget(parent, name);
        self.call_with_open(
            (new_parent, new_name),
            |answer| {
                let mut c = Call::new("rename");
                c.arg(parent)
                    .bin(name)
                    .arg(new_parent)
                    .bin(new_name)
                    .arg(u8::from(flags.noreplace))
                    .arg(u8::from(flags.exchange))
                    .arg(sid);
                open_answer(&mut c, answer);
                c
            },
            is_open,
        )
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        Ok(bytes(&self.call(Call::new("readlink").arg(ino))?)?.to_vec())
    }

    fn readdir(&self, ino: Ino, cookie: u64, limit: usize) -> Result<Vec<DirEntry>> {
        let flat = items(
            self.call(
                Call::new("readdir")
                    .arg(ino)
                    .arg(cookie)
                    .arg(redis_count(limit)),
            )?,
        )?;
        flat.chunks(4)
            .map(|e| match e {
                [name, child, kind, cookie] => Ok(DirEntry {
                    name: bytes(name)?.to_vec(),
                    ino: number(child)?,
                    kind: FileKind::from_code(number(kind)?).unwrap_or(FileKind::File),
                    cookie: number(cookie)?,
                }),
                _ => Err(MetaError::Engine("redis: malformed directory reply".into())),
            })
            .collect()
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes(&self.call(Call::new("getxattr").arg(ino).bin(name))?)?.to_vec())
    }

    fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        if name.is_empty() {
            return Err(MetaError::Invalid);
        }
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(MetaError::TooBig);
        }
        let mode = match mode {
            XattrMode::Any => "any",
            XattrMode::Create => "create",
            XattrMode::Replace => "replace",
        };
        self.call(
            Call::new("setxattr")
                .arg(ino)
                .bin(name)
                .bin(value)
                .arg(mode),
        )?;
        Ok(())
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        items(self.call(Call::new("listxattr").arg(ino))?)?
            .iter()
            .map(|v| Ok(bytes(v)?.to_vec()))
            .collect()
    }

    fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<()> {
        self.call(Call::new("removexattr").arg(ino).bin(name))?;
        Ok(())
    }

    fn read_chunk(&self, ino: Ino, chunk: u32) -> Result<Vec<Slice>> {
        let raw: Vec<String> = self.with_conn(|c| {
            redis::cmd("LRANGE")
                .arg(format!("c{ino}:{chunk}"))
                .arg(0)
                .arg(-1)
                .query(c)
        })?;
        raw.iter().map(|r| decode_slice(r)).collect()
    }

    fn write_slices(&self, ino: Ino, slices: &[ChunkSlice], mtime: Timestamp) -> Result<Attr> {
        let mut call = Call::new("write_slices");
        call.arg(ino).time(Some(mtime));
        for cs in slices {
            call.arg(cs.chunk);
            for v in slice_args(&cs.slice) {
                call.arg(v);
            }
        }
        attr_reply(self.call(&call)?)
    }

    fn write_files(&self, files: &[FileWrite]) -> Result<Vec<Attr>> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        if repeats_an_inode(files) {
            return Err(MetaError::Invalid);
        }
        let mut call = Call::new("write_files");
        for f in files {
            call.arg(f.ino).time(Some(f.mtime)).arg(f.slices.len());
            for cs in &f.slices {
                call.arg(cs.chunk);
                for v in slice_args(&cs.slice) {
                    call.arg(v);
                }
            }
        }
        items(self.call(&call)?)?
            .into_iter()
            .map(attr_reply)
            .collect()
    }

    fn compact_chunk(&self, ino: Ino, chunk: u32, replaced: &[Slice], new: Slice) -> Result<bool> {
        let mut call = Call::new("compact_chunk");
        call.arg(ino).arg(chunk);
        for s in std::iter::once(&new).chain(replaced) {
            for v in slice_args(s) {
                call.arg(v);
            }
        }
        Ok(number::<u8>(&self.call(&call)?)? == 1)
    }

    fn next_slice_ids(&self, n: u64) -> Result<u64> {
        let next: u64 = number(
            &self.cmd(
                redis::cmd("HINCRBY")
                    .arg("counter")
                    .arg("next_slice")
                    .arg(n),
            )?,
        )?;
        Ok(next - n)
    }

    fn release(&self, ino: Ino, sid: u64) -> Result<()> {
        self.call(Call::new("release").arg(ino).arg(sid))?;
        Ok(())
    }

    fn pending_deletions(&self, after: u64, limit: usize) -> Result<Vec<FreedSlice>> {
        self.ids_after("freed", after, limit)?
            .iter()
            .map(|r| match numbers(r, "freed slice")?.as_slice() {
                &[id, size] => Ok(FreedSlice {
                    id,
                    size: size as u32,
                }),
                _ => Err(corrupt("freed slice", r)),
            })
            .collect()
    }

    fn ack_deletions(&self, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.with_conn(|c| {
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg("freed")
                    .arg(id)
                    .arg(id)
                    .ignore();
            }
            pipe.query::<()>(c)
        })
    }

    fn referenced_slices(&self, after: u64, limit: usize) -> Result<Vec<SliceRef>> {
        let mut out: Vec<SliceRef> = Vec::new();
        for r in self.ids_after("refs", after, limit)? {
            let &[id, size, ino] = numbers(&r, "slice reference")?.as_slice() else {
                return Err(corrupt("slice reference", &r));
            };
            // A packed slice has one reference per file, in a row (they share the score).
            if out.last().is_none_or(|l| l.id != id) {
                out.push(SliceRef {
                    id,
                    size: size as u32,
                    ino,
                });
            }
        }
        Ok(out)
    }

    fn check_namespace(&self, repair: bool) -> Result<Vec<Problem>> {
        let flat = items(self.call(Call::new("check_namespace").arg(u8::from(repair)))?)?;
        flat.chunks(3)
            .map(|p| match p {
                [what, fix, repaired] => {
                    let fix = String::from_utf8_lossy(bytes(fix)?).into_owned();
                    Ok(Problem {
                        what: String::from_utf8_lossy(bytes(what)?).into_owned(),
                        fix: (!fix.is_empty()).then_some(fix),
                        repaired: text(repaired)? == "1",
                    })
                }
                _ => Err(MetaError::Engine("redis: malformed check reply".into())),
            })
            .collect()
    }

    fn sync(&self) -> Result<()> {
        if !self.waitaof.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Waits until this connection's writes, and so every earlier one, are fsynced to the
        // local append-only file. Servers without an AOF or WAITAOF keep their own durability.
        let r = self.with_conn(|c| redis::cmd("WAITAOF").arg(1).arg(0).arg(0).query::<Value>(c));
        match r {
            Ok(_) => Ok(()),
            Err(MetaError::Engine(msg))
                if msg.contains("unknown command") || msg.contains("appendonly is disabled") =>
            {
                if msg.contains("unknown command") {
                    self.waitaof.store(false, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn setlk(&self, ino: Ino, req: &Lock) -> Result<Option<Lock>> {
        // Read, decide here, then swap only if nobody changed the file's locks meanwhile.
        loop {
            let (raw, held) = self.file_locks(ino)?;
            let locks = match lock::apply(&held, req) {
                Ok(locks) => locks,
                Err(conflict) => return Ok(Some(conflict)),
            };
            let new: Vec<String> = locks.iter().map(Lock::encode).collect();
            let swapped = self.call(
                Call::new("lock_swap")
                    .arg(ino)
                    .arg(req.sid)
                    .arg(raw)
                    .arg(new.join(";")),
            )?;
            if number::<u8>(&swapped)? == 1 {
                return Ok(None);
            }
        }
    }

    fn getlk(&self, ino: Ino, req: &Lock) -> Result<Option<Lock>> {
        Ok(lock::conflict(&self.file_locks(ino)?.1, req))
    }

    fn id_counters(&self) -> Result<(u64, u64)> {
        let (ino, slice): (Option<u64>, Option<u64>) = self.with_conn(|c| {
            redis::cmd("HMGET")
                .arg("counter")
                .arg("next_ino")
                .arg("next_slice")
                .query(c)
        })?;
        Ok((ino.unwrap_or(0), slice.unwrap_or(0)))
    }

    fn load_records(
        &self,
        header: &DumpHeader,
        records: &mut dyn Iterator<Item = Result<DumpRecord>>,
    ) -> Result<()> {
        let keys: u64 = number(&self.cmd(&redis::cmd("DBSIZE"))?)?;
        if keys > 0 {
            return Err(MetaError::Engine(format!(
                "{} holds {keys} keys: load into an empty database",
                self.shown
            )));
        }
        let (mut inodes, mut space, mut cookie) = (0u64, 0u64, 0u64);
        // Hour directories of the trash: a file named in one is a trashed file.
        let mut hours = std::collections::HashSet::new();
        let mut pipe = redis::pipe();
        let mut queued = 0;
        for r in records {
            match r? {
                DumpRecord::Header(_) => return Err(MetaError::Invalid),
                DumpRecord::Inode(i) => {
                    let a = &i.attr;
                    pipe.set(format!("i{}", a.ino), encode_attr(a)).ignore();
                    inodes += 1;
                    match a.kind {
                        FileKind::File => space += a.length.div_ceil(4096) * 4096,
                        FileKind::Dir if a.parent == TRASH_INO => {
                            hours.insert(a.ino);
                        }
                        _ => {}
                    }
                    if let Some(target) = &i.symlink {
                        pipe.set(format!("s{}", a.ino), &target.0).ignore();
                    }
                    for (name, value) in &i.xattrs {
                        pipe.hset(format!("x{}", a.ino), &name.0, &value.0).ignore();
                    }
                    for c in &i.chunks {
                        let list: Vec<String> = c.slices.iter().map(encode_slice).collect();
                        pipe.rpush(format!("c{}:{}", a.ino, c.index), list).ignore();
                        pipe.sadd(format!("k{}", a.ino), c.index).ignore();
                        for s in c.slices.iter().filter(|s| !s.is_zero()) {
                            let member = format!("{}:{}:{}", s.id, s.size, a.ino);
                            pipe.zadd("refs", member, s.id).ignore();
                        }
                    }
                }
                DumpRecord::Entry(e) => {
                    cookie += 1;
                    let value = format!("{},{},{cookie}", e.ino, e.kind.code());
                    pipe.hset(format!("d{}", e.parent), &e.name.0, value)
                        .ignore();
                    pipe.zadd(format!("z{}", e.parent), &e.name.0, cookie)
                        .ignore();
                    if hours.contains(&e.parent) {
                        pipe.hset("trashed", e.ino, e.parent).ignore();
                    }
                }
                DumpRecord::Freed { id, size } => {
                    pipe.zadd("freed", format!("{id}:{size}"), id).ignore();
                }
            }
            queued += 1;
            if queued >= 1000 {
                self.with_conn(|c| pipe.query::<()>(c))?;
                pipe = redis::pipe();
                queued = 0;
            }
        }
        let f = &header.format;
        let json = serde_json::to_string(f).expect("format serializes");
        pipe.cmd("HSET")
            .arg("counter")
            .arg("next_ino")
            .arg(header.next_ino)
            .arg("next_slice")
            .arg(header.next_slice)
            .arg("used_space")
            .arg(space)
            .arg("used_inodes")
            .arg(inodes)
            .arg("next_edge")
            .arg(cookie)
            .ignore();
        // Last: until the format is there, the database holds no volume.
        pipe.cmd("HSET")
            .arg("setting")
            .arg("format")
            .arg(json)
            .arg("capacity")
            .arg(f.capacity)
            .arg("inodes")
            .arg(f.inodes)
            .arg("trash_days")
            .arg(f.trash_days)
            .ignore();
        self.with_conn(|c| pipe.query::<()>(c))
    }
}

/// A count as Redis takes it (a signed 64-bit number): "no limit" (usize::MAX) included.
fn redis_count(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Adds the answer to "is this inode open?" (or none yet) to an unlink or rename call.
fn open_answer(call: &mut Call, answer: Option<(Ino, bool)>) {
    match answer {
        Some((ino, open)) => call.arg(ino).arg(u8::from(open)),
        None => call.arg("").arg(0),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            hide_password("redis://user:secret@host:6379/1"),
            "redis://user:****@host:6379/1"
        );
        assert_eq!(hide_password("redis://host:6379/1"), "redis://host:6379/1");
        assert_eq!(
            hide_password("unix:///run/redis.sock?db=2"),
            "unix:///run/redis.sock?db=2"
        );
    }

    #[test]
    fn inode_records_round_trip_through_the_script_format() {
        let a = decode_attr(7, "1,420,1000,1000,0,1,5000,-1,999999999,10,5,11,6,1").unwrap();
        assert_eq!(a.kind, FileKind::File);
        assert_eq!(a.mode, 0o644);
        assert_eq!(
            a.atime,
            Timestamp {
                sec: -1,
                nsec: 999_999_999
            }
        );
        assert_eq!(a.parent, 1);
        assert_eq!(decode_attr(7, &encode_attr(&a)).unwrap(), a);
        assert!(decode_attr(7, "1,2,3").is_err());
    }
}
