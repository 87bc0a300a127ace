//! Mount sessions: which are alive, and cleaning up after those that are not.
//!
//! Every mount registers a session and writes a heartbeat every `--heartbeat` seconds. A
//! session of this host is dead when its process is gone; one of another host when it has
//! not written a heartbeat for [`STALE_BEATS`] heartbeat intervals. Every mount cleans up dead
//! sessions at each heartbeat: closing one frees the files it kept open after their last
//! unlink. All clients of a volume should use the same `--heartbeat`, as with JuiceFS.

use std::time::Duration;
use tidefs_meta::{Meta, SessionInfo, Timestamp};

/// The heartbeat interval a mount uses unless told otherwise (`--heartbeat`), in seconds.
pub const DEFAULT_HEARTBEAT: u64 = 12;

/// Missed heartbeats after which a session counts as dead.
pub const STALE_BEATS: u32 = 5;

/// This machine's host name, as sessions record it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Whether process `pid` of this host exists.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether the mount of session `s` is running, for clients whose heartbeat interval is
/// `heartbeat`: on this host, whether its process exists (a mount that is only slow, or
/// stopped, keeps its session); elsewhere, whether it wrote a heartbeat within
/// [`STALE_BEATS`] intervals.
pub fn is_alive(s: &SessionInfo, heartbeat: Duration) -> bool {
    if s.host == hostname() {
        return pid_alive(s.pid);
    }
    let stale_after = (heartbeat * STALE_BEATS).as_secs().max(1) as i64;
    Timestamp::now().sec - s.heartbeat <= stale_after
}

/// Closes every session but `own` that is not alive (see [`is_alive`]), freeing what it held;
/// returns the sessions closed.
pub fn reap_dead(
    meta: &dyn Meta,
    own: Option<u64>,
    heartbeat: Duration,
) -> tidefs_meta::Result<Vec<SessionInfo>> {
    let mut closed = Vec::new();
    for s in meta.sessions()? {
        if Some(s.sid) == own || is_alive(&s, heartbeat) {
            continue;
        }
        tracing::info!(
            sid = s.sid,
            host = %s.host,
            pid = s.pid,
            mountpoint = %s.mountpoint,
            "closing the session of a dead mount"
        );
        meta.close_session(s.sid)?;
        closed.push(s);
    }
    Ok(closed)
}
