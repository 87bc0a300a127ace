//! A block cache on local disks: one file per block, checksummed, found again after a restart.
//!
//! Each cached block is a file `<dir>/<xx>/<hash>-<unique>` holding a header (magic, the block's key,
//! its length, and a checksum for each 4 KiB segment) and then the block. A segment's checksum
//! is a CRC32 seeded with the block's key and the segment's place, so a read that checks the
//! segments it touches (reading their checksums from the file too) finds a truncated, corrupt
//! or misplaced file, which is dropped and reported as a miss, never served (segments already
//! checked in a file unchanged since may be handed out unread: see [`DiskCache::span`]). A
//! small read touches one segment: it reads and checks 4 KiB, not the block. (Files of the previous
//! format, with plain CRC32s of 64 KiB segments, are still read.) Files are
//! written under a temporary name and renamed, without fsync: after a crash a damaged file is
//! dropped like any other. Opening a cache reads every file's header to rebuild the index,
//! oldest first, so the least recently written blocks are evicted first. A directory whose
//! disk fails is left alone for a while, and one short of free space takes no new blocks:
//! either way reads go on, uncached.

use crate::checked::{Checked, Stamp};
use crate::BufferPool;
use bytes::Bytes;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const MAGIC: &[u8; 4] = b"TDC3";
/// Files written before segment checksums were seeded and segments were 4 KiB.
const MAGIC_V2: &[u8; 4] = b"TDC2";
/// Bytes covered by one checksum.
const SEGMENT: usize = 4 << 10;
const SEGMENT_V2: usize = 64 << 10;
/// Capacity of the pooled buffers ranged reads go into: a FUSE read of at most 1 MiB widened
/// to whole segments at both ends (below glibc's mmap threshold, so buffers past the kept ones
/// come from the heap). Larger reads, such as a 1 MiB read of a `TDC2` file, get their own.
const READ_BUFFER: usize = (1 << 20) + 2 * SEGMENT;
/// Ranged reads shorter than this take plain heap memory, which costs no page faults, and do
/// not tie up a pooled buffer.
const POOLED_READ_MIN: usize = 64 << 10;
/// Idle read buffers kept (as many as a mount has FUSE request loops by default).
const READ_BUFFERS_KEPT: usize = 16;
/// Ranges [`DiskCache::span`] hands out: from 64 KiB (below, a read of the few segments
/// costs less than a splice) to 1 MiB (the largest FUSE read).
const SPANS: std::ops::RangeInclusive<usize> = (64 << 10)..=(1 << 20);
/// How long a directory that failed a write is left alone.
const FAILURE_PAUSE: Duration = Duration::from_secs(30);
/// How often a directory's free space is measured.
const SPACE_CHECK: Duration = Duration::from_secs(1);

/// Where and how much to cache on disk.
#[derive(Clone, Debug)]
pub struct DiskCacheConfig {
    /// Cache directories, typically one per local SSD; blocks are spread over them by key.
    pub dirs: Vec<PathBuf>,
    /// Bytes of block data to keep over all directories.
    pub capacity: u64,
    /// Stop adding blocks to a directory whose disk has less than this share free.
    pub free_ratio: f64,
}

/// Why a disk cache could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cache directory {dir}: {source}")]
pub struct DiskCacheError {
    /// The directory.
    pub dir: PathBuf,
    /// What failed.
    pub source: std::io::Error,
}

struct CacheDir {
    root: PathBuf,
    failed_at: Mutex<Option<Instant>>,
    low_space: AtomicBool,
    space_checked: Mutex<Option<Instant>>,
}

impl CacheDir {
    /// Whether new blocks may go here now.
    fn usable(&self, free_ratio: f64) -> bool {
        let failed = *self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_some_and(|t| t.elapsed() < FAILURE_PAUSE) {
            return false;
        }
        let mut checked = self.space_checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.is_none_or(|t| t.elapsed() >= SPACE_CHECK) {
            *checked = Some(Instant::now());
            self.low_space
                .store(free_share(&self.root) < free_ratio, Ordering::Relaxed);
        }
        !self.low_space.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, e: &std::io::Error) {
        let mut failed = self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_none_or(|t| t.elapsed() >= FAILURE_PAUSE) {
            tracing::warn!(dir = %self.root.display(), error = %e, "cache {what} failed; \
                 not caching there for {}s", FAILURE_PAUSE.as_secs());
        }
        *failed = Some(Instant::now());
    }
}

/// The share of the disk holding `dir` that is free (1.0 if it cannot be measured).
fn free_share(dir: &Path) -> f64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 1.0;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 || st.f_blocks == 0 {
        return 1.0;
    }
    st.f_bavail as f64 / st.f_blocks as f64
}

/// Where a cached block is, and its length. Every write makes a new file name, so an entry
/// owns its file: removing it never touches another copy of the block.
#[derive(Clone, Debug)]
struct Entry {
    dir: u16,
    name: u64,
    /// Distinguishes the files written for one key over time.
    unique: u64,
    len: u32,
    /// Bytes before the block in the file.
    header: u32,
    format: Format,
    /// The segments that matched their checksums since the file last changed.
    checked: Arc<Checked>,
}

/// How a cache file checksums its block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// 4 KiB segments; CRC32s seeded with the key and the segment's index.
    Seeded,
    /// 64 KiB segments; plain CRC32s.
    V2,
}

impl Format {
    fn segment(self) -> usize {
        match self {
            Format::Seeded => SEGMENT,
            Format::V2 => SEGMENT_V2,
        }
    }

    /// The checksum of segment `index` of block `key`, whose name hash is `name`.
    fn checksum(self, name: u64, index: usize, data: &[u8]) -> u32 {
        match self {
            Format::Seeded => {
                // Mixed, so that no two (key, index) pairs share a seed in any simple way.
                let seed = ((name ^ index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
                let mut h = crc32fast::Hasher::new_with_initial(seed);
                h.update(data);
                h.finalize()
            }
            Format::V2 => crc32fast::hash(data),
        }
    }
}

/// Bytes of a cache file that matched their checksums and may be served unread: `len` bytes
/// of `file` from `offset`.
#[derive(Debug)]
pub struct FileSpan {
    /// The cache file, open for reading.
    pub file: std::fs::File,
    /// Where the bytes start in it.
    pub offset: u64,
    /// How many there are.
    pub len: usize,
}

/// Counters of a disk cache.
#[derive(Debug, Default)]
pub struct DiskCacheStats {
    /// Reads served from disk.
    pub hits: AtomicU64,
    /// Hits answered with a span of a checked file ([`DiskCache::span`]), for the kernel to
    /// take unread.
    pub spans: AtomicU64,
    /// Reads that found nothing usable.
    pub misses: AtomicU64,
    /// Cached files found damaged and dropped.
    pub dropped: AtomicU64,
    /// Blocks not cached because their directory failed or was short of space.
    pub skipped: AtomicU64,
    /// Blocks removed because their objects were deleted.
    pub discarded: AtomicU64,
}

/// A block cache on local disks; see the module docs. Every call does blocking file I/O.
pub struct DiskCache {
    dirs: Vec<Arc<CacheDir>>,
    index: moka::sync::Cache<Arc<str>, Entry>,
    free_ratio: f64,
    stats: DiskCacheStats,
    reads: Arc<BufferPool>,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dirs: Vec<_> = self.dirs.iter().map(|d| &d.root).collect();
        f.debug_struct("DiskCache")
            .field("dirs", &dirs)
            .finish_non_exhaustive()
    }
}

/// FNV-1a: a stable 64-bit hash of a key, naming its file.
fn name_of(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn path_of(root: &Path, name: u64, unique: u64) -> PathBuf {
    root.join(format!("{:02x}", name & 0xff))
        .join(format!("{name:016x}-{unique:x}"))
}

/// A file name not used before: a counter started at the time (in nanoseconds) of the
/// process's first cache write, so it stays ahead of every earlier process's names unless
/// one wrote more than a block per nanosecond.
fn new_unique() -> u64 {
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        AtomicU64::new(nanos)
    })
    .fetch_add(1, Ordering::Relaxed)
}

/// Bytes before a block of `len` bytes whose checksums end at `crcs_end`: blocks of more than
/// one segment start on a page boundary, so that each segment is one page of the file.
fn data_offset(len: usize, crcs_end: usize) -> usize {
    if len > SEGMENT {
        crcs_end.next_multiple_of(SEGMENT)
    } else {
        crcs_end
    }
}

/// Where a header's key starts: after the magic and the key's length.
const KEY_AT: usize = 6;

/// Where the segment checksums start in a file whose key is `key_len` bytes long: after
/// the key, the block's length and the number of segments.
fn crcs_at(key_len: usize) -> usize {
    KEY_AT + key_len + 8
}

/// The header written before block `data` of `key`, with its segment checksums and the
/// padding up to [`data_offset`].
fn header(key: &str, data: &[u8]) -> Vec<u8> {
    let segments = data.len().div_ceil(SEGMENT);
    let mut h = Vec::with_capacity(data_offset(data.len(), crcs_at(key.len()) + 4 * segments));
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&(key.len() as u16).to_le_bytes());
    h.extend_from_slice(key.as_bytes());
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h.extend_from_slice(&(segments as u32).to_le_bytes());
    let name = name_of(key);
    for (i, seg) in data.chunks(SEGMENT).enumerate() {
        h.extend_from_slice(&Format::Seeded.checksum(name, i, seg).to_le_bytes());
    }
    h.resize(data_offset(data.len(), h.len()), 0);
    h
}

/// What a file's header records, but the checksums (reads check them).
struct Header {
    key: String,
    len: u32,
    format: Format,
    /// Bytes before the block.
    size: u64,
}

fn read_header(r: &mut impl Read) -> std::io::Result<Header> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad cache header");
    let mut fixed = [0u8; KEY_AT];
    r.read_exact(&mut fixed)?;
    let format = match &fixed[..4] {
        m if m == MAGIC => Format::Seeded,
        m if m == MAGIC_V2 => Format::V2,
        _ => return Err(bad()),
    };
    let key_len = u16::from_le_bytes([fixed[4], fixed[5]]) as usize;
    let mut key = vec![0u8; key_len];
    r.read_exact(&mut key)?;
    let mut tail = [0u8; 8];
    r.read_exact(&mut tail)?;
    let len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let segments = u32::from_le_bytes([tail[4], tail[5], tail[6], tail[7]]) as usize;
    if segments != (len as usize).div_ceil(format.segment()) {
        return Err(bad());
    }
    let key = String::from_utf8(key).map_err(|_| bad())?;
    let crcs_end = crcs_at(key_len) + 4 * segments;
    let size = match format {
        Format::Seeded => data_offset(len as usize, crcs_end),
        Format::V2 => crcs_end,
    };
    Ok(Header {
        key,
        len,
        format,
        size: size as u64,
    })
}

impl DiskCache {
    /// Opens the cache directories (creating them if needed) and indexes the blocks already
    /// in them; damaged files are removed.
    pub fn open(config: &DiskCacheConfig) -> Result<Self, DiskCacheError> {
        let mut dirs = Vec::new();
        for root in &config.dirs {
            std::fs::create_dir_all(root).map_err(|source| DiskCacheError {
                dir: root.clone(),
                source,
            })?;
            dirs.push(Arc::new(CacheDir {
                root: root.clone(),
                failed_at: Mutex::new(None),
                low_space: AtomicBool::new(false),
                space_checked: Mutex::new(None),
            }));
        }
        let roots: Vec<PathBuf> = dirs.iter().map(|d| d.root.clone()).collect();
        let index = moka::sync::Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(config.capacity)
            .weigher(|_k: &Arc<str>, e: &Entry| e.len.max(1))
            .eviction_listener(move |_k, e: Entry, _cause| {
                let _ = std::fs::remove_file(path_of(&roots[e.dir as usize], e.name, e.unique));
            })
            .build();
        let cache = DiskCache {
            dirs,
            index,
            free_ratio: config.free_ratio,
            stats: DiskCacheStats::default(),
            reads: BufferPool::new(READ_BUFFER, READ_BUFFERS_KEPT),
        };
        cache.rebuild();
        Ok(cache)
    }

    /// Indexes the files already in the directories, oldest first.
    fn rebuild(&self) {
        let mut found = Vec::new();
        for (i, dir) in self.dirs.iter().enumerate() {
            let Ok(subdirs) = std::fs::read_dir(&dir.root) else {
                continue;
            };
            for sub in subdirs.flatten() {
                let Ok(files) = std::fs::read_dir(sub.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let path = f.path();
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".tmp-") {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    let parsed = name.split_once('-').and_then(|(n, u)| {
                        Some((
                            u64::from_str_radix(n, 16).ok()?,
                            u64::from_str_radix(u, 16).ok()?,
                        ))
                    });
                    let Some((name, unique)) = parsed else {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    };
                    match Self::probe(&path) {
                        Some((h, modified)) if name_of(&h.key) == name => {
                            let entry = Entry {
                                dir: i as u16,
                                name,
                                unique,
                                len: h.len,
                                header: h.size as u32,
                                format: h.format,
                                checked: Arc::default(),
                            };
                            found.push((modified, h.key, entry));
                        }
                        _ => {
                            let _ = std::fs::remove_file(&path);
                            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        found.sort_by_key(|(modified, _, _)| *modified);
        for (_, key, entry) in found {
            self.index.insert(Arc::from(key.as_str()), entry);
        }
        self.index.run_pending_tasks();
    }

    /// The header and mtime of a cache file whose size matches its header.
    fn probe(path: &Path) -> Option<(Header, SystemTime)> {
        let mut f = std::fs::File::open(path).ok()?;
        let meta = f.metadata().ok()?;
        let h = read_header(&mut std::io::BufReader::new(&mut f)).ok()?;
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        (meta.len() == h.size + h.len as u64).then_some((h, modified))
    }

    /// The cached block `key` if its file is whole and matches its checksums; a damaged
    /// file is removed.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.get_range(key, None)
    }

    /// Bytes `range` of the cached block `key` (all of it for None), reading and checking only
    /// the segments they fall in; None if not cached, out of range or damaged (then removed).
    pub fn get_range(&self, key: &str, range: Option<Range<u32>>) -> Option<Bytes> {
        let Some(e) = self.index.get(key) else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let path = path_of(&self.dirs[e.dir as usize].root, e.name, e.unique);
        let explicit = range.is_some();
        let range = range.unwrap_or(0..e.len);
        if range.start > range.end || range.end > e.len {
            return None;
        }
        // Whole blocks (no range given) may be kept by the memory layer, where a pooled buffer
        // would stay tied up: they get buffers of their own.
        match self.read_range(&path, key, &e, range, explicit) {
            Some(data) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Some(data)
            }
            None => {
                // Drop this entry, not a fresh copy another reader may have written since.
                let unique = e.unique;
                self.index
                    .entry(Arc::from(key))
                    .and_compute_with(|current| match current {
                        Some(c) if c.value().unique == unique => moka::ops::compute::Op::Remove,
                        _ => moka::ops::compute::Op::Nop,
                    });
                let _ = std::fs::remove_file(&path);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// The segments of block `key` holding `range`, checked against their checksums: a file
    /// damaged, cut short or holding another block fails the check (for files of the
    /// previous format, whose checksums are not seeded, the key in the header is compared).
    /// With `pool`, a read of 64 KiB up to about 1 MiB lands in a pooled buffer, which comes
    /// back when the last view of it is gone.
    fn read_range(
        &self,
        path: &Path,
        key: &str,
        e: &Entry,
        range: Range<u32>,
        pool: bool,
    ) -> Option<Bytes> {
        let f = std::fs::File::open(path).ok()?;
        // Large reads of current files note what they checked, for `span`: under the stamp
        // the file had before the read, if it still has it after the check.
        let stamp = (e.format == Format::Seeded && SPANS.contains(&(range.len())))
            .then(|| Stamp::of(&f))
            .flatten();
        if e.format == Format::V2 {
            // Plain checksums say nothing of whose block this is: the header must.
            let head = read_exact_at(&f, KEY_AT + key.len(), 0)?;
            if &head[KEY_AT..] != key.as_bytes() {
                return None;
            }
        }
        let segment = e.format.segment();
        let first = range.start as usize / segment;
        let last = (range.end as usize).div_ceil(segment).max(first + 1);
        let start = (first * segment).min(e.len as usize);
        let end = (last * segment).min(e.len as usize);
        let pooled = pool && (POOLED_READ_MIN..=self.reads.size()).contains(&(end - start));
        let mut data = if pooled {
            self.reads.take()
        } else {
            Vec::with_capacity(end - start)
        };
        read_exact_into(&f, &mut data, end - start, e.header as u64 + start as u64)?;
        let segments = (end - start).div_ceil(segment);
        let at = crcs_at(key.len()) + 4 * first;
        let crcs = read_exact_at(&f, 4 * segments, at as u64)?;
        let name = name_of(key);
        let intact = data
            .chunks(segment)
            .zip(crcs.chunks_exact(4))
            .enumerate()
            .all(|(i, (seg, crc))| {
                e.format.checksum(name, first + i, seg)
                    == u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]])
            });
        if !intact {
            return None;
        }
        if let Some(stamp) = stamp.filter(|s| Stamp::of(&f).as_ref() == Some(s)) {
            e.checked.mark(stamp, first..last);
        }
        let data = if pooled {
            self.reads.freeze(data)
        } else {
            Bytes::from(data)
        };
        Some(data.slice(range.start as usize - start..range.end as usize - start))
    }

    /// Caches `data` as block `key`, unless it is cached already or its directory is failing
    /// or short of space.
    pub fn insert(&self, key: &str, data: &[u8]) {
        if self.index.contains_key(key) {
            return;
        }
        self.put(key, data);
    }

    /// Caches `data` as block `key`, replacing what is cached under that key: for blocks just
    /// written, which are authoritative.
    pub fn replace(&self, key: &str, data: &[u8]) {
        self.put(key, data);
    }

    fn put(&self, key: &str, data: &[u8]) {
        if self.dirs.is_empty() {
            return;
        }
        let name = name_of(key);
        let dir_index = (name % self.dirs.len() as u64) as usize;
        let dir = &self.dirs[dir_index];
        if !dir.usable(self.free_ratio) {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unique = new_unique();
        let path = path_of(&dir.root, name, unique);
        let parent = path.parent().expect("cache files are in a subdirectory");
        let tmp = parent.join(format!(".tmp-{name:016x}-{unique:x}"));
        let head = header(key, data);
        // Only the first block put in each of the 256 subdirectories has to make it.
        let written = std::fs::File::create(&tmp)
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(parent).and_then(|_| std::fs::File::create(&tmp))
                }
                _ => Err(e),
            })
            .and_then(|mut f| {
                f.write_all(&head)?;
                f.write_all(data)?;
                std::fs::rename(&tmp, &path)?;
                Ok(f)
            });
        match written {
            Ok(f) => {
                // The file holds what was just written from memory: its segments are as
                // good as checked, under the stamp it has now (the rename changed it).
                let checked = Arc::<Checked>::default();
                if let Some(stamp) = Stamp::of(&f) {
                    checked.mark(stamp, 0..data.len().div_ceil(SEGMENT));
                }
                let entry = Entry {
                    dir: dir_index as u16,
                    name,
                    unique,
                    len: data.len() as u32,
                    header: head.len() as u32,
                    format: Format::Seeded,
                    checked,
                };
                self.index.insert(Arc::from(key), entry);
                self.index.run_pending_tasks();
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                dir.failed("write", &e);
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Bytes `range` of the cached block `key` as a span of its file, for the kernel to take
    /// without this process reading them (splice), if every segment they fall in matched its
    /// checksum since the file last changed (see the `checked` module), and the range is 64
    /// KiB to 1 MiB long. None otherwise: then [`DiskCache::get_range`] reads and checks
    /// them, and notes them for the next time.
    pub fn span(&self, key: &str, range: Range<u32>) -> Option<FileSpan> {
        let len = range.len();
        if !SPANS.contains(&len) {
            return None;
        }
        let e = self.index.get(key)?;
        if e.format != Format::Seeded || range.end > e.len {
            return None;
        }
        let segments = range.start as usize / SEGMENT..(range.end as usize).div_ceil(SEGMENT);
        // Unchecked segments (the first reads after a mount) cost no open here: the checked
        // read that follows opens the file.
        if !e.checked.marked(segments.clone()) {
            return None;
        }
        let path = path_of(&self.dirs[e.dir as usize].root, e.name, e.unique);
        let file = std::fs::File::open(path).ok()?;
        if !e.checked.all(Stamp::of(&file)?, segments) {
            return None;
        }
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats.spans.fetch_add(1, Ordering::Relaxed);
        Some(FileSpan {
            file,
            offset: e.header as u64 + range.start as u64,
            len,
        })
    }

    /// Forgets blocks `keys` and removes their files, where cached: for blocks whose objects
    /// were deleted, which no read can ask for again and which would otherwise hold space
    /// until evicted. Returns how many were cached.
    pub fn remove<'a>(&self, keys: impl IntoIterator<Item = &'a str>) -> usize {
        // The eviction listener removes the files.
        let removed = keys
            .into_iter()
            .filter(|k| self.index.remove(*k).is_some())
            .count();
        if removed > 0 {
            self.index.run_pending_tasks();
            self.stats
                .discarded
                .fetch_add(removed as u64, Ordering::Relaxed);
        }
        removed
    }

    /// Whether block `key` is indexed (its file may still turn out damaged).
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Asks the kernel to start reading the file of block `key` into its page cache, so that
    /// reads of it soon find it there; does nothing if the block is not indexed. Blocks for
    /// the open and the advice, not for the read.
    pub fn will_need(&self, key: &str) {
        use std::os::fd::AsRawFd;
        let Some(e) = self.index.get(key) else {
            return;
        };
        let path = path_of(&self.dirs[e.dir as usize].root, e.name, e.unique);
        if let Ok(f) = std::fs::File::open(path) {
            // SAFETY: plain advice on a descriptor we own; no memory is passed.
            unsafe {
                libc::posix_fadvise(
                    f.as_raw_fd(),
                    0,
                    (e.header as u64 + e.len as u64) as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }

    /// Bytes of block data indexed (as of the last insert or eviction; no I/O).
    pub fn used(&self) -> u64 {
        self.index.weighted_size()
    }

    /// The byte limit.
    pub fn capacity(&self) -> u64 {
        self.index.policy().max_capacity().unwrap_or(0)
    }

    /// Hits, misses, drops, skips and discards so far.
    pub fn stats(&self) -> &DiskCacheStats {
        &self.stats
    }
}

/// `len` bytes of `f` at `offset`, read into a buffer that is not zeroed first (the read
/// overwrites it; zeroing 256 KiB per read was a visible share of a warm read's CPU).
fn read_exact_at(f: &std::fs::File, len: usize, offset: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    read_exact_into(f, &mut buf, len, offset)?;
    Some(buf)
}

/// Replaces the contents of `buf` with `len` bytes of `f` at `offset`, as [`read_exact_at`].
fn read_exact_into(f: &std::fs::File, buf: &mut Vec<u8>, len: usize, offset: u64) -> Option<()> {
    use std::os::fd::AsRawFd;
    buf.clear();
    buf.reserve(len);
    let mut done = 0usize;
    while done < len {
        // SAFETY: the destination is the vector's own unused capacity, `len - done` bytes
        // from `done`; pread writes at most that many bytes there.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
    // SAFETY: pread initialized all `len` bytes above.
    unsafe { buf.set_len(len) };
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, capacity: u64) -> DiskCacheConfig {
        DiskCacheConfig {
            dirs: vec![dir.join("a"), dir.join("b")],
            capacity,
            free_ratio: 0.0,
        }
    }

    /// The file holding `key` (its name starts with the key's hash).
    fn file_of(dir: &Path, key: &str) -> Option<PathBuf> {
        let prefix = format!("{:016x}-", name_of(key));
        files(dir).into_iter().find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for root in ["a", "b"] {
            for sub in std::fs::read_dir(dir.join(root))
                .into_iter()
                .flatten()
                .flatten()
            {
                for f in std::fs::read_dir(sub.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    out.push(f.path());
                }
            }
        }
        out
    }

    #[test]
    fn blocks_survive_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        for i in 0..20 {
            c.insert(&format!("vol/chunks/0/0/{i}_0_1000"), &[i as u8; 1000]);
        }
        assert_eq!(c.used(), 20_000);
        assert_eq!(files(tmp.path()).len(), 20);
        drop(c);
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        assert_eq!(c.used(), 20_000);
        assert_eq!(c.get("vol/chunks/0/0/7_0_1000").unwrap(), vec![7u8; 1000]);
        assert!(c.get("vol/chunks/0/0/99_0_1000").is_none());
    }

    #[test]
    fn removed_blocks_leave_the_index_and_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        for i in 0..4 {
            c.insert(&format!("k{i}"), &[i as u8; 1000]);
        }
        assert_eq!(c.remove(["k1", "k2", "never-cached"]), 2);
        assert_eq!(c.remove(["k2"]), 0, "removed twice");
        assert_eq!(c.used(), 2000);
        assert_eq!(files(tmp.path()).len(), 2);
        assert!(file_of(tmp.path(), "k1").is_none() && file_of(tmp.path(), "k2").is_none());
        assert!(c.get("k1").is_none());
        assert_eq!(c.get("k3").unwrap(), vec![3u8; 1000]);
        assert_eq!(c.stats().discarded.load(Ordering::Relaxed), 2);
        // A reopen finds only what is left.
        drop(c);
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        assert_eq!(c.used(), 2000);
    }

    #[test]
    fn damaged_files_are_dropped_never_served() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        c.insert("k1", &[1u8; 5000]);
        c.insert("k2", &[2u8; 5000]);
        c.insert("k3", &[3u8; 5000]);
        let path = |key: &str| file_of(tmp.path(), key).expect("cached file");
        // A flipped byte, a truncated file, a file holding another key.
        let mut bytes = std::fs::read(path("k1")).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(path("k1"), &bytes).unwrap();
        let bytes = std::fs::read(path("k2")).unwrap();
        std::fs::write(path("k3"), &bytes).unwrap();
        std::fs::write(path("k2"), &bytes[..bytes.len() - 10]).unwrap();
        for key in ["k1", "k2", "k3"] {
            assert!(c.get(key).is_none(), "{key} served though damaged");
            assert!(file_of(tmp.path(), key).is_none(), "{key} not removed");
        }
        assert_eq!(c.stats().dropped.load(Ordering::Relaxed), 3);
        // Damage found at open: the file is removed and not indexed.
        c.insert("k4", &[4u8; 5000]);
        drop(c);
        let bytes = std::fs::read(path("k4")).unwrap();
        std::fs::write(path("k4"), &bytes[..100]).unwrap();
        std::fs::write(path("k4").with_file_name(".tmp-leftover"), b"x").unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        assert_eq!(c.used(), 0);
        assert!(files(tmp.path()).is_empty(), "{:?}", files(tmp.path()));
    }

    #[test]
    fn spans_cover_only_checked_segments_of_unchanged_files() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 8 << 20)).unwrap();
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let read = |s: &FileSpan| {
            let mut got = vec![0u8; s.len];
            s.file.read_exact_at(&mut got, s.offset).unwrap();
            got
        };

        // A block written from memory is checked as written; a span holds its bytes.
        c.insert("k", &block);
        let s = c
            .span("k", 65_536..196_608)
            .expect("span of a block just written");
        assert_eq!(read(&s), &block[65_536..196_608]);
        assert!(c.span("k", 0..1 << 20).is_some(), "the whole block");
        assert!(
            c.span("k", 0..4096).is_none(),
            "a read this short is read and checked"
        );
        assert!(
            c.span("k", 1 << 19..(1 << 20) + 4096).is_none(),
            "past the block"
        );
        assert!(c.span("other", 0..65_536).is_none());
        assert_eq!(c.stats().spans.load(Ordering::Relaxed), 2);

        // Any change to the file voids what was checked: no span, and the checked read
        // finds the damage.
        let path = file_of(tmp.path(), "k").unwrap();
        std::thread::sleep(Duration::from_millis(10));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let at = f.metadata().unwrap().len() - (1 << 20) + 100_000;
        f.write_all_at(&[block[100_000] ^ 1], at).unwrap();
        assert!(
            c.span("k", 65_536..196_608).is_none(),
            "changed file spanned"
        );
        assert!(c.get_range("k", Some(65_536..196_608)).is_none());
        assert!(file_of(tmp.path(), "k").is_none(), "damaged file kept");

        // Files found at open are unchecked: a span needs a checked read of its segments
        // first (a read long enough to be spanned itself; shorter ones leave no mark).
        c.insert("k2", &block);
        drop(c);
        let c = DiskCache::open(&config(tmp.path(), 8 << 20)).unwrap();
        assert!(c.span("k2", 0..131_072).is_none(), "unchecked file spanned");
        assert_eq!(c.get_range("k2", Some(0..4096)).unwrap(), &block[..4096]);
        assert!(
            c.span("k2", 0..65_536).is_none(),
            "a 4 KiB read marked its segment"
        );
        assert_eq!(
            c.get_range("k2", Some(0..131_072)).unwrap(),
            &block[..131_072]
        );
        let s = c.span("k2", 0..131_072).expect("span after a checked read");
        assert_eq!(read(&s), &block[..131_072]);
        assert!(
            c.span("k2", 65_536..196_608).is_none(),
            "unchecked segments spanned"
        );
    }

    #[test]
    fn ranges_read_and_check_only_their_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        let block: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        c.insert("k", &block);
        assert_eq!(c.get("k").unwrap(), block);
        // The block starts on a page boundary of its file, and is found so again.
        let size = std::fs::metadata(file_of(tmp.path(), "k").unwrap())
            .unwrap()
            .len();
        assert_eq!((size - block.len() as u64) % SEGMENT as u64, 0, "{size}");
        drop(c);
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        for r in [
            0..1,
            65_530..65_550,
            200_000..300_000,
            299_999..300_000,
            7..7,
        ] {
            let got = c.get_range("k", Some(r.clone())).unwrap();
            assert_eq!(got, block[r.start as usize..r.end as usize], "{r:?}");
        }
        assert!(c.get_range("k", Some(299_000..300_001)).is_none());
        // Damage in the last segment: ranges elsewhere still read; one touching it drops
        // the file.
        let path = file_of(tmp.path(), "k").expect("cached file");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(c.get_range("k", Some(0..100)).is_some());
        assert!(c.get_range("k", Some(299_000..299_100)).is_none());
        assert!(!path.exists());
        assert!(c.get("k").is_none());
    }

    /// A cache file as the previous format wrote it: plain CRC32s of 64 KiB segments.
    fn write_v2_file(dir: &Path, key: &str, data: &[u8]) -> PathBuf {
        let crcs: Vec<u32> = data.chunks(SEGMENT_V2).map(crc32fast::hash).collect();
        let mut bytes = MAGIC_V2.to_vec();
        bytes.extend_from_slice(&(key.len() as u16).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(crcs.len() as u32).to_le_bytes());
        for crc in crcs {
            bytes.extend_from_slice(&crc.to_le_bytes());
        }
        bytes.extend_from_slice(data);
        let name = name_of(key);
        let root = dir.join(["a", "b"][(name % 2) as usize]);
        let path = path_of(&root, name, 1);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn files_of_the_previous_format_are_still_read_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let block: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let path = write_v2_file(tmp.path(), "old", &block);
        let damaged = write_v2_file(tmp.path(), "old2", &block);
        let misplaced = write_v2_file(tmp.path(), "ol3", &block);
        let mut bytes = std::fs::read(&damaged).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&damaged, bytes).unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        assert_eq!(c.used(), 600_000);
        // Another block's file put in its place once indexed: the same layout and checksums
        // (a key of the same length), only the key in the header differs.
        std::fs::copy(&path, &misplaced).unwrap();
        assert!(c.get("ol3").is_none(), "a misplaced file is not served");
        assert_eq!(c.get("old").unwrap(), block);
        for r in [0..1, 65_530..65_550, 199_999..200_000] {
            let got = c.get_range("old", Some(r.clone())).unwrap();
            assert_eq!(got, block[r.start as usize..r.end as usize], "{r:?}");
        }
        assert!(c.get_range("old2", Some(0..100)).is_some());
        assert!(c.get_range("old2", Some(199_000..199_100)).is_none());
        assert!(path.exists() && !damaged.exists());
    }

    #[test]
    fn a_segment_of_another_block_or_place_fails_its_check() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        // Same bytes in every segment, so only the seed tells them apart.
        c.insert("k", &[9u8; 3 * SEGMENT]);
        // A key of the same length: the same header layout, only the seeds differ.
        c.insert("j", &[9u8; 3 * SEGMENT]);
        let path = file_of(tmp.path(), "k").unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // Swap the checksums of segments 0 and 1: each now sits at the other's place.
        let at = crcs_at("k".len());
        let (a, b) = bytes[at..at + 8].split_at_mut(4);
        a.swap_with_slice(b);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            c.get_range("k", Some(2 * SEGMENT as u32..3 * SEGMENT as u32)),
            Some(Bytes::from(vec![9u8; SEGMENT]))
        );
        assert!(c.get_range("k", Some(0..10)).is_none());
        // The file of "j" copied over a fresh "k": checksums seeded with another key.
        c.insert("k", &[9u8; 3 * SEGMENT]);
        let path = file_of(tmp.path(), "k").unwrap();
        std::fs::copy(file_of(tmp.path(), "j").unwrap(), &path).unwrap();
        assert!(c.get_range("k", Some(0..10)).is_none());
        assert!(c.get("j").is_some());
    }

    #[test]
    fn a_written_block_replaces_what_was_cached() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 1 << 20)).unwrap();
        c.insert("k", &[1u8; 100]);
        c.insert("k", &[2u8; 100]);
        assert_eq!(
            c.get("k").unwrap(),
            vec![1u8; 100],
            "a fetched copy does not replace"
        );
        c.replace("k", &[3u8; 100]);
        assert_eq!(c.get("k").unwrap(), vec![3u8; 100]);
        assert_eq!(files(tmp.path()).len(), 1, "the replaced file is removed");
    }

    #[test]
    fn capacity_holds_and_evicted_files_go() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 10_000)).unwrap();
        for i in 0..50 {
            c.insert(&format!("b{i}"), &[0u8; 1000]);
        }
        assert!(c.used() <= 10_000, "{}", c.used());
        let on_disk = files(tmp.path()).len();
        assert!((5..=10).contains(&on_disk), "{on_disk} files");
        assert!(c.get("b49").is_some(), "the newest block stays");
    }

    #[test]
    fn a_failing_directory_degrades_to_no_caching() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&DiskCacheConfig {
            dirs: vec![tmp.path().join("gone")],
            capacity: 1 << 20,
            free_ratio: 0.0,
        })
        .unwrap();
        // The disk disappears under the cache: a file where the directory was.
        std::fs::remove_dir_all(tmp.path().join("gone")).unwrap();
        std::fs::write(tmp.path().join("gone"), b"not a directory").unwrap();
        c.insert("k", &[1u8; 100]);
        assert!(c.get("k").is_none());
        assert_eq!(c.stats().skipped.load(Ordering::Relaxed), 1);
        // A directory short of free space takes nothing.
        let full = DiskCache::open(&DiskCacheConfig {
            dirs: vec![tmp.path().join("full")],
            capacity: 1 << 20,
            free_ratio: 1.1,
        })
        .unwrap();
        full.insert("k", &[1u8; 100]);
        assert!(full.get("k").is_none());
    }

    #[test]
    fn ranged_reads_reuse_their_buffers() {
        let tmp = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&config(tmp.path(), 8 << 20)).unwrap();
        let block: Vec<u8> = (0..(2 << 20) as u32).map(|i| (i * 7) as u8).collect();
        c.insert("k", &block);
        let first = c.get_range("k", Some(0..(1 << 20))).unwrap();
        assert_eq!(&first[..], &block[..1 << 20]);
        let at = first.as_ptr();
        drop(first);
        assert_eq!(c.reads.idle(), 1);
        // The next read (segment-aligned, so its view starts the buffer) reuses it...
        let again = c.get_range("k", Some(8192..(1 << 20) + 8192)).unwrap();
        assert_eq!(&again[..], &block[8192..(1 << 20) + 8192]);
        assert_eq!((again.as_ptr(), c.reads.idle()), (at, 0));
        // ...and one made while it is still viewed gets another.
        let other = c.get_range("k", Some(0..(256 << 10))).unwrap();
        assert_eq!(&other[..], &block[..256 << 10]);
        assert_ne!(other.as_ptr(), at);
        drop((again, other));
        assert_eq!(c.reads.idle(), 2);
        // Small reads, reads larger than the pooled buffers, and whole blocks (which the
        // memory layer may keep) get buffers of their own, which are not kept.
        let small = c.get_range("k", Some(4096..8192)).unwrap();
        let large = c.get_range("k", Some(0..(1 << 20) + 3 * 4096)).unwrap();
        let whole = c.get("k").unwrap();
        let small_block = {
            c.insert("s", &block[..100 << 10]);
            c.get("s").unwrap()
        };
        assert_eq!(&small[..], &block[4096..8192]);
        assert_eq!(&large[..], &block[..(1 << 20) + 3 * 4096]);
        assert_eq!(&whole[..], &block[..]);
        assert_eq!(&small_block[..], &block[..100 << 10]);
        assert_eq!(c.reads.idle(), 2, "no read took a kept buffer");
        drop((small, large, whole, small_block));
        assert_eq!(c.reads.idle(), 2, "none came back to the pool");
    }
}
