//! Permission rules the kernel leaves to the filesystem.
//!
//! With `default_permissions` the kernel checks access bits, ownership for chmod/chown/utimes
//! and the sticky bit itself; a filesystem still decides which group a new inode gets and
//! whether it keeps its setgid bit, which needs the caller's supplementary groups.

use std::fs;

/// Every group of process `pid` (primary `gid` included), read from `/proc/PID/status`. If the
/// process is gone, just `gid`.
pub fn caller_groups(pid: u32, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
        groups.extend(parse_groups(&status));
    }
    groups
}

/// The supplementary groups listed in the text of a `/proc/PID/status` file.
pub fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a new inode with `mode` needs the caller's groups to decide on its setgid bit.
pub fn needs_groups(mode: u32, is_dir: bool) -> bool {
    !is_dir && mode & libc::S_ISGID != 0
}

/// Read permission, for [`may_access`].
pub const R: u32 = 4;
/// Write permission, for [`may_access`].
pub const W: u32 = 2;
/// Search (execute) permission, for [`may_access`].
pub const X: u32 = 1;

/// Whether user `uid` with `groups` may access an inode owned by `owner:group` with `mode`
/// in every way of `want` (`R`, `W`, `X` or'ed), as the kernel decides it: root may do
/// anything, else the owner, group or other bits apply (only the first class that matches).
pub fn may_access(uid: u32, groups: &[u32], owner: u32, group: u32, mode: u32, want: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let bits = if uid == owner {
        mode >> 6
    } else if groups.contains(&group) {
        mode >> 3
    } else {
        mode
    } & 7;
    bits & want == want
}

/// Whether user `uid` may remove or rename an entry for an inode owned by `child_owner` from
/// a directory owned by `dir_owner` with `dir_mode` (the sticky-bit rule; write and search
/// permission on the directory are checked apart).
pub fn may_unlink_from(uid: u32, dir_owner: u32, dir_mode: u32, child_owner: u32) -> bool {
    dir_mode & libc::S_ISVTX == 0 || uid == 0 || uid == dir_owner || uid == child_owner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supplementary_groups() {
        let status = "Name:\tbash\nGid:\t100\t100\t100\t100\nGroups:\t4 24 27 \nVmPeak:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("nothing"), Vec::<u32>::new());
    }

    #[test]
    fn reads_own_groups() {
        let me = std::process::id();
        let gid = unsafe { libc::getgid() };
        assert_eq!(caller_groups(me, gid)[0], gid);
        assert_eq!(caller_groups(u32::MAX, 5), vec![5]);
    }

    #[test]
    fn access_follows_the_first_matching_class() {
        assert!(may_access(0, &[], 5, 5, 0o000, R | W | X));
        assert!(may_access(5, &[9], 5, 9, 0o700, R | W | X));
        // The owner class decides for the owner, even when the group bits would allow.
        assert!(!may_access(5, &[9], 5, 9, 0o070, R));
        assert!(may_access(6, &[9], 5, 9, 0o070, R | W | X));
        assert!(!may_access(6, &[9], 5, 9, 0o050, W));
        assert!(may_access(7, &[1], 5, 9, 0o003, W | X));
        assert!(!may_access(7, &[1], 5, 9, 0o003, R));
        assert!(may_unlink_from(7, 5, 0o777, 6));
        assert!(!may_unlink_from(7, 5, 0o1777, 6));
        assert!(may_unlink_from(6, 5, 0o1777, 6));
        assert!(may_unlink_from(5, 5, 0o1777, 6));
    }

    #[test]
    fn only_setgid_non_directories_need_groups() {
        assert!(needs_groups(0o2755, false));
        assert!(!needs_groups(0o2755, true));
        assert!(!needs_groups(0o755, false));
    }
}
