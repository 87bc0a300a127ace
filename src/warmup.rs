//! `tidefs warmup`: reads files through their mount so that their blocks land in its cache
//! (memory, or the disk cache of `--cache-dir`), ahead of the jobs that will need them.

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// What a warmup read.
#[derive(Debug, Default, serde::Serialize)]
pub struct WarmupReport {
    /// Files read whole.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Paths that could not be read, with why.
    pub errors: Vec<String>,
}

/// Every regular file at or under `paths`, with its size; unreadable paths are reported.
pub fn files_under(paths: &[PathBuf]) -> (Vec<(PathBuf, u64)>, Vec<String>) {
    let (mut files, mut errors) = (Vec::new(), Vec::new());
    let mut stack: Vec<PathBuf> = paths.iter().rev().cloned().collect();
    while let Some(p) = stack.pop() {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => files.push((p, m.len())),
            Ok(m) if m.is_dir() => match std::fs::read_dir(&p) {
                Ok(entries) => {
                    let mut children: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                    children.sort();
                    stack.extend(children.into_iter().rev());
                }
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            },
            Ok(_) => {}
            Err(e) => errors.push(format!("{}: {e}", p.display())),
        }
    }
    (files, errors)
}

/// Reads `files` whole with `threads` readers; `progress` sees the bytes read so far. The
/// kernel's copies of the pages are dropped after each file: the point is the mount's cache.
pub fn warm(
    files: &[(PathBuf, u64)],
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> WarmupReport {
    let next = AtomicUsize::new(0);
    let (done_files, done_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((path, _)) = files.get(i) else {
                        return;
                    };
                    match read_whole(path, &mut buf, &done_bytes, progress) {
                        Ok(()) => {
                            done_files.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("{}: {e}", path.display())),
                    }
                }
            });
        }
    });
    WarmupReport {
        files: done_files.into_inner(),
        bytes: done_bytes.into_inner(),
        errors: errors.into_inner().unwrap_or_else(|e| e.into_inner()),
    }
}

fn read_whole(
    path: &Path,
    buf: &mut [u8],
    done: &AtomicU64,
    progress: &(dyn Fn(u64) + Sync),
) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        progress(done.fetch_add(n as u64, Ordering::Relaxed) + n as u64);
    }
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}
