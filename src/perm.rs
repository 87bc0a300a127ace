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
    fn only_setgid_non_directories_need_groups() {
        assert!(needs_groups(0o2755, false));
        assert!(!needs_groups(0o2755, true));
        assert!(!needs_groups(0o755, false));
    }
}
