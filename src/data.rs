//! The data path: buffering writes into slices, uploading their blocks, committing them, and
//! reading a file's bytes back through the block cache.
//!
//! Durability rule: a slice is committed to metadata only after every one of its blocks is
//! durable in the object store, so metadata never points at missing data, whatever crashes.

use crate::error::FsError;
use crate::inflight::InFlight;
use crate::layout::{Layout, CHUNK_SIZE};
use crate::object::{ObjectStore, StoreError};
use crate::slices::{resolve, Source};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use dashmap::DashMap;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tidefs_cache::BlockCache;
use tidefs_cache::BufferPool;
use tidefs_fuse::ReadData;
use tidefs_meta::{ChunkSlice, FileKind, FileWrite, Ino, Meta, MetaError, Slice, Timestamp};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Largest file size accepted (as ext4 with 4 KiB blocks: 16 TiB).
pub const MAX_FILE_SIZE: u64 = 16 << 40;

/// Slice ids reserved from metadata at a time.
const ID_BATCH: u64 = 1024;

/// Pending slices per file before a write forces a commit.
pub const MAX_PENDING_SLICES: usize = 512;

/// Blocks remembered as read in part (see [`ReadPattern::Random`]); the set is cleared when
/// it grows past this, which only costs some later reads a whole-block fetch.
const MAX_TOUCHED_BLOCKS: usize = 65_536;

/// How a read is expected to continue, which decides what a cache miss fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPattern {
    /// Part of a sequential run: a missing block is fetched whole (and cached), since the
    /// reader will want the rest of it.
    Sequential,
    /// A random read: the first miss on a block fetches just the bytes asked for (a ranged
    /// GET, not cached); a block read in part before is fetched whole and cached, because it
    /// is evidently hot.
    Random,
}

/// Times a read plans again after blocks it planned with were deleted under it.
const VANISHED_RETRIES: usize = 8;

/// Slices in one chunk from which the chunk is compacted in the background.
pub const COMPACT_THRESHOLD: usize = 16;

/// A chunk of a file: (inode, chunk index).
pub type ChunkRef = (Ino, u32);

/// What the data path of a mount shares.
pub struct DataCtx {
    /// Metadata engine.
    pub meta: Arc<dyn Meta>,
    /// Object store.
    pub store: Arc<dyn ObjectStore>,
    /// Block cache.
    pub cache: BlockCache,
    /// Block naming.
    pub layout: Layout,
    /// Runtime running uploads and fetches.
    pub rt: Handle,
    /// Bytes of written data held in memory (buffered or uploading), over all files.
    pub buffered: Arc<AtomicU64>,
    /// Bytes being uploaded now, and a signal each time an upload ends (for writers waiting
    /// for buffer room).
    uploading: Arc<(AtomicU64, Mutex<()>, Condvar)>,
    ids: Mutex<Range<u64>>,
    /// Per-file metadata cached for reads (see [`FileCache`]).
    files: DashMap<Ino, Arc<FileCache>>,
    /// Block buffers of the write path.
    buffers: Arc<BufferPool>,
    /// Chunks that may need compaction, for the mount's compactor; each queued once.
    compact_tx: Sender<ChunkRef>,
    compact_rx: Receiver<ChunkRef>,
    compact_queued: DashMap<ChunkRef, ()>,
    /// Blocks a random read fetched in part (see [`ReadPattern::Random`]).
    touched: DashMap<String, ()>,
    /// Whether full blocks of written data go to the disk cache (short ones always do).
    cache_large_writes: bool,
    /// Blocks that readahead may be fetching at once, over all open files.
    prefetches: Arc<tokio::sync::Semaphore>,
    /// File reads being served (at most one per FUSE request loop).
    pub reads: InFlight,
    /// Commits of written data that failed, over all files, since the mount began.
    pub commit_failures: AtomicU64,
}

/// Read-side metadata of one file, cached between changes.
///
/// Every change of a file's length or slices made through this mount invalidates it, and so
/// does every open (close-to-open). A generation number keeps a lookup that raced an
/// invalidation from installing what it read.
#[derive(Default)]
struct FileCache {
    gen: AtomicU64,
    state: Mutex<FileCacheState>,
}

#[derive(Default)]
struct FileCacheState {
    length: Option<u64>,
    chunks: HashMap<u32, Arc<Vec<Slice>>>,
}

impl std::fmt::Debug for DataCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataCtx")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// Bytes readahead may fetch at once over all files, unless set otherwise.
const DEFAULT_PREFETCH_BYTES: u64 = 64 << 20;

/// Turns for readahead fetches: one per block in `bytes`, and at least 4.
fn prefetch_turns(layout: &Layout, bytes: u64) -> Arc<tokio::sync::Semaphore> {
    let blocks = (bytes / layout.block_size() as u64).max(4) as usize;
    Arc::new(tokio::sync::Semaphore::new(blocks))
}

impl DataCtx {
    /// The shared state of a mount's data path.
    pub fn new(
        meta: Arc<dyn Meta>,
        store: Arc<dyn ObjectStore>,
        cache: BlockCache,
        layout: Layout,
        rt: Handle,
    ) -> Self {
        let buffers = BufferPool::shared(layout.block_size() as usize);
        let prefetches = prefetch_turns(&layout, DEFAULT_PREFETCH_BYTES);
        let (compact_tx, compact_rx) = crossbeam_channel::unbounded();
        DataCtx {
            meta,
            store,
            cache,
            layout,
            rt,
            buffered: Arc::new(AtomicU64::new(0)),
            uploading: Arc::new((AtomicU64::new(0), Mutex::new(()), Condvar::new())),
            ids: Mutex::new(0..0),
            files: DashMap::new(),
            buffers,
            compact_tx,
            compact_rx,
            compact_queued: DashMap::new(),
            touched: DashMap::new(),
            cache_large_writes: false,
            prefetches,
            reads: InFlight::default(),
            commit_failures: AtomicU64::new(0),
        }
    }

    /// Bounds the bytes readahead fetches at once over all open files (64 MiB by default;
    /// at least 4 blocks). Each file's window is bounded on its own, but without this four
    /// sequential readers had four windows in flight, and the memory they held with them.
    /// Blocks past the bound wait their turn; they are not dropped.
    pub fn with_prefetch_limit(mut self, bytes: u64) -> Self {
        self.prefetches = prefetch_turns(&self.layout, bytes);
        self
    }

    /// Whether full blocks a mount uploads are also kept in its disk cache (JuiceFS's
    /// `--cache-large-write`). Without it only short blocks (small files, the ends of files)
    /// are: a large write would otherwise evict the cache's hot blocks for data that is
    /// rarely read back on the node that wrote it, and write every byte to the cache disk
    /// as well as to the store.
    pub fn with_large_write_caching(mut self, yes: bool) -> Self {
        self.cache_large_writes = yes;
        self
    }

    /// Notes that chunk `chunk` of `ino` may have many slices (it was just written, or read
    /// with many); the compactor looks at it once, however often it is noted meanwhile.
    pub fn hint_compaction(&self, ino: Ino, chunk: u32) {
        if self.compact_queued.insert((ino, chunk), ()).is_none() {
            let _ = self.compact_tx.send((ino, chunk));
        }
    }

    /// The next chunk to look at for compaction, waiting up to `timeout`.
    pub fn next_compaction_hint(&self, timeout: std::time::Duration) -> Option<ChunkRef> {
        let hint = self.compact_rx.recv_timeout(timeout).ok()?;
        self.compact_queued.remove(&hint);
        Some(hint)
    }

    fn file_cache(&self, ino: Ino) -> Arc<FileCache> {
        self.files.entry(ino).or_default().clone()
    }

    /// Forgets what is cached about `ino`: its length or slices changed, or it was opened.
    pub fn invalidate(&self, ino: Ino) {
        if let Some(c) = self.files.get(&ino).map(|c| c.clone()) {
            let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
            c.gen.fetch_add(1, Ordering::SeqCst);
            *st = FileCacheState::default();
        }
    }

    /// Drops the cache entry of `ino` (no handle has it open any more).
    pub fn forget(&self, ino: Ino) {
        self.invalidate(ino);
        self.files.remove(&ino);
    }

    /// The committed length of file `ino`.
    pub fn length(&self, ino: Ino) -> Result<u64, FsError> {
        let c = self.file_cache(ino);
        let gen = {
            let st = c.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = st.length {
                return Ok(l);
            }
            c.gen.load(Ordering::SeqCst)
        };
        let length = self.meta.getattr(ino)?.length;
        let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
        if c.gen.load(Ordering::SeqCst) == gen {
            st.length = Some(length);
        }
        Ok(length)
    }

    /// The committed slices of chunk `chunk` of file `ino`.
    fn chunk_slices(&self, ino: Ino, chunk: u32) -> Result<Arc<Vec<Slice>>, FsError> {
        let c = self.file_cache(ino);
        let gen = {
            let st = c.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = st.chunks.get(&chunk) {
                return Ok(s.clone());
            }
            c.gen.load(Ordering::SeqCst)
        };
        let slices = Arc::new(self.meta.read_chunk(ino, chunk)?);
        if slices.len() >= COMPACT_THRESHOLD {
            self.hint_compaction(ino, chunk);
        }
        let mut st = c.state.lock().unwrap_or_else(|e| e.into_inner());
        if c.gen.load(Ordering::SeqCst) == gen {
            st.chunks.insert(chunk, slices.clone());
        }
        Ok(slices)
    }

    /// A fresh slice id, larger than every id this mount handed out before. Ids come from
    /// metadata in batches; the lock is never held across the metadata call.
    pub fn next_slice_id(&self) -> Result<u64, FsError> {
        loop {
            {
                let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(id) = ids.next() {
                    return Ok(id);
                }
            }
            self.refill_ids()?;
        }
    }

    /// Reserves a new batch of ids if fewer than `low` are left, so that callers holding a
    /// file's writer lock rarely wait on metadata.
    pub fn reserve_ids(&self, low: u64) -> Result<(), FsError> {
        let left = {
            let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            ids.end - ids.start
        };
        if left < low {
            self.refill_ids()?;
        }
        Ok(())
    }

    /// `n` fresh ids in increasing order.
    pub fn slice_ids(&self, n: usize) -> Result<Vec<u64>, FsError> {
        (0..n).map(|_| self.next_slice_id()).collect()
    }

    fn refill_ids(&self) -> Result<(), FsError> {
        let first = self.meta.next_slice_ids(ID_BATCH)?;
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        // A batch reserved concurrently may be lower than ids already handed out: take only a
        // batch above everything handed out so far (dropping the few ids left, if any).
        if first >= ids.end {
            *ids = first..first + ID_BATCH;
        }
        Ok(())
    }

    /// Starts uploading a block; its bytes stop counting as buffered once the upload ends.
    /// An uploaded block goes to the disk cache, if any, when it is short or with
    /// [`DataCtx::with_large_write_caching`], but never to memory: large writes would only
    /// flush the hottest blocks.
    pub(crate) fn upload(&self, key: String, data: Bytes) -> JoinHandle<Result<(), StoreError>> {
        let keep = self.cache_large_writes || data.len() < self.layout.block_size() as usize;
        self.upload_with(key, data, keep)
    }

    /// As [`DataCtx::upload`], but the block always goes to the disk cache: for rewrites of
    /// data that was read (compaction), whose old blocks were cached.
    pub(crate) fn upload_cached(
        &self,
        key: String,
        data: Bytes,
    ) -> JoinHandle<Result<(), StoreError>> {
        self.upload_with(key, data, true)
    }

    fn upload_with(
        &self,
        key: String,
        data: Bytes,
        keep: bool,
    ) -> JoinHandle<Result<(), StoreError>> {
        let (store, buffered, cache, uploading) = (
            self.store.clone(),
            self.buffered.clone(),
            self.cache.clone(),
            self.uploading.clone(),
        );
        let len = data.len() as u64;
        uploading.0.fetch_add(len, Ordering::SeqCst);
        self.rt.spawn(async move {
            let result = store.put(&key, data.clone()).await;
            buffered.fetch_sub(len, Ordering::SeqCst);
            uploading.0.fetch_sub(len, Ordering::SeqCst);
            uploading.2.notify_all();
            if result.is_ok() && keep {
                cache.keep_written(&key, data);
            }
            result
        })
    }

    /// Waits for block uploads started with [`DataCtx::upload`]; the first failure, if any.
    pub(crate) fn wait_uploads(
        &self,
        uploads: Vec<JoinHandle<Result<(), StoreError>>>,
    ) -> Result<(), FsError> {
        for r in self.rt.block_on(futures::future::join_all(uploads)) {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(FsError::Store(e)),
                Err(e) => return Err(FsError::Data(format!("upload task failed: {e}"))),
            }
        }
        Ok(())
    }

    /// Waits while written data in memory exceeds `limit` and uploads under way can still
    /// bring it down; returns whether it is now within the limit. (Data not uploading, the
    /// tails of slices, only leaves memory when its file is committed.)
    pub fn wait_for_room(&self, limit: u64) -> bool {
        let (in_flight, lock, ended) = &*self.uploading;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.buffered.load(Ordering::SeqCst) > limit && in_flight.load(Ordering::SeqCst) > 0 {
            guard = ended
                .wait_timeout(guard, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.buffered.load(Ordering::SeqCst) <= limit
    }

    /// Commits the pending writes of several files, packing those of small files into shared
    /// objects: each file whose writes are one slice, all in memory (see
    /// [`FileWriter::take_packable`]), goes into an object of at most [`PACK_BYTES`] with
    /// others, stored with one PUT and committed for all of them in one transaction
    /// ([`Meta::write_files`]), so that no file's reference can be freed before another's is
    /// written. Every pack's PUT starts before the first commit, and each file's buffer is
    /// dropped once its pack holds a copy. A file found freed (or no longer a regular file)
    /// at its pack's commit fails alone: the others are committed without it. Other files
    /// are left as they are. Returns the files whose commit failed
    /// (the failure also reaches their handles, as any commit failure does).
    pub fn commit_packed(&self, files: &[(Ino, Arc<FileWriter>)]) -> Vec<(Ino, String)> {
        let max = PACK_BYTES.min(self.layout.block_size());
        let mut taken: Vec<_> = files
            .iter()
            .filter_map(|(ino, w)| w.take_packable(max).map(|t| (*ino, w, t)))
            .collect();
        let mut stored = Vec::new();
        let mut rest = &mut taken[..];
        while !rest.is_empty() {
            // As many files as fit, and always one (at most PACK_FILES: one Redis script
            // takes a few values per file, and a script's arguments are limited).
            let mut bytes = 0;
            let n = rest
                .iter()
                .take(PACK_FILES)
                .take_while(|(_, _, (s, ..))| {
                    bytes += s.len;
                    bytes <= max
                })
                .count()
                .max(1);
            let (pack, after) = std::mem::take(&mut rest).split_at_mut(n);
            rest = after;
            let members: Vec<_> = pack
                .iter()
                .map(|(ino, _, (s, m, _))| (*ino, s, *m))
                .collect();
            let pack_stored = self.store_pack(&members);
            // The object holds the bytes now, and reads of them wait for the commit (see
            // `FileWriter::take_batch`): the files' own buffers can go.
            for (_, _, (s, ..)) in pack.iter_mut() {
                s.buf = Vec::new();
            }
            stored.push((&*pack, pack_stored));
        }
        let mut failed = Vec::new();
        for (pack, pack_stored) in stored {
            let results = self.commit_pack(pack_stored, pack.len());
            for ((ino, w, (.., gen)), result) in pack.iter().zip(results) {
                drop(w.end_batch(self, *gen, true, result.as_deref()));
                if let Some(e) = result {
                    failed.push((*ino, e.to_string()));
                }
            }
        }
        failed
    }

    /// Starts storing `members`' slices as one object: what each file's commit will say.
    fn store_pack(
        &self,
        members: &[(Ino, &PendingSlice, Timestamp)],
    ) -> Result<StoredPack, FsError> {
        let size: u32 = members.iter().map(|(_, s, _)| s.len).sum();
        let id = match self.next_slice_id() {
            Ok(id) => id,
            Err(e) => {
                // Never handed to an upload, which would have uncounted them.
                self.buffered.fetch_sub(size as u64, Ordering::SeqCst);
                return Err(e);
            }
        };
        let mut object = Vec::with_capacity(size as usize);
        let mut writes = Vec::with_capacity(members.len());
        for (ino, s, mtime) in members {
            let off = object.len() as u32;
            object.extend_from_slice(&s.buf);
            writes.push(FileWrite {
                ino: *ino,
                slices: vec![ChunkSlice {
                    chunk: s.chunk,
                    slice: Slice {
                        id,
                        size,
                        off,
                        len: s.len,
                        pos: s.pos,
                    },
                }],
                mtime: *mtime,
            });
        }
        let key = self.layout.block_key(id, 0, size);
        Ok(StoredPack {
            writes,
            upload: self.upload(key.clone(), Bytes::from(object)),
            key,
        })
    }

    /// Waits for `stored`'s object and commits its `n` files: each file's failure, in order.
    /// When the commit fails because a file was freed or is no regular file (another mount
    /// removed it), the others are committed again without it, once; its part of the object
    /// then stays unused. An object that no file could reference (the metadata engine refused
    /// every commit, so none took effect) is deleted again.
    fn commit_pack(
        &self,
        stored: Result<StoredPack, FsError>,
        n: usize,
    ) -> Vec<Option<Arc<FsError>>> {
        let all = |e: FsError| vec![Some(Arc::new(e)); n];
        let StoredPack {
            writes,
            upload,
            key,
        } = match stored {
            Ok(pack) => pack,
            Err(e) => return all(e),
        };
        if let Err(e) = self.wait_uploads(vec![upload]) {
            return all(e);
        }
        let mut failures = vec![None; n];
        let mut members: Vec<usize> = (0..n).collect();
        let mut written = self.meta.write_files(&writes).map(drop);
        if let Err(e @ (MetaError::NotFound | MetaError::Invalid)) = written {
            let (gone, kept): (Vec<usize>, Vec<usize>) =
                members.iter().partition(|&&i| self.is_gone(writes[i].ino));
            written = if gone.is_empty() || kept.is_empty() {
                Err(e)
            } else {
                let e = Arc::new(FsError::Meta(e));
                for &i in &gone {
                    failures[i] = Some(e.clone());
                }
                let others: Vec<FileWrite> = kept.iter().map(|&i| writes[i].clone()).collect();
                members = kept;
                self.meta.write_files(&others).map(drop)
            };
        }
        for w in &writes {
            self.invalidate(w.ino);
        }
        match written {
            Ok(_) => {
                for &i in &members {
                    self.hint_compaction(writes[i].ino, writes[i].slices[0].chunk);
                }
            }
            Err(e) => {
                // An engine failure may hide a commit that went through: the object stays
                // (for `tidefs gc`, if nothing references it). A refusal changed nothing.
                if !matches!(e, MetaError::Engine(_)) {
                    self.delete_unreferenced(key);
                }
                let e = Arc::new(FsError::Meta(e));
                for &i in &members {
                    failures[i] = Some(e.clone());
                }
            }
        }
        failures
    }

    /// Whether `ino` is freed or no longer a regular file (another mount removed it); not
    /// when its attributes cannot be read for another reason.
    fn is_gone(&self, ino: Ino) -> bool {
        match self.meta.getattr(ino) {
            Ok(a) => a.kind != FileKind::File,
            Err(e) => matches!(e, MetaError::NotFound),
        }
    }

    /// Deletes object `key`, stored but referenced by no file, and its cached copy; if the
    /// delete fails, `tidefs gc` finds the object later.
    fn delete_unreferenced(&self, key: String) {
        let keys = vec![key];
        if let Some((key, e)) = self.rt.block_on(self.store.delete_batch(&keys)).pop() {
            tracing::warn!(key, error = %e, "deleting an object no file references failed");
        }
        self.rt.block_on(self.cache.discard(keys));
    }

    /// Fetches block `key` of `len` bytes through the cache; concurrent callers share a fetch.
    async fn block(&self, key: &str, len: u32) -> Result<Bytes, ReadError> {
        fetch_block(self.store.clone(), &self.cache, key, len)
            .await
            .map_err(|e| match *e {
                StoreError::NotFound(_) => ReadError::Vanished,
                _ => ReadError::Fs(FsError::Data(e.to_string())),
            })
    }

    /// Reads `[off, off + size)` of file `ino`, whose committed length is `length`; `pattern`
    /// says whether cache misses fetch whole blocks or just the bytes asked for. With
    /// `spans`, a read that one checked span of a disk cache file holds is answered with that
    /// span, for the reply to move to the kernel unread; without, always with bytes.
    pub fn read(
        &self,
        ino: Ino,
        length: u64,
        off: u64,
        size: u32,
        pattern: ReadPattern,
        spans: bool,
    ) -> Result<ReadData, FsError> {
        if off >= length {
            return Ok(ReadData::Bytes(Bytes::new()));
        }
        let mut end = length.min(off + size as u64);
        for _ in 0..VANISHED_RETRIES {
            match self.read_planned(ino, off, end, pattern, spans) {
                // A truncate, unlink or compaction committed after the plan and the objects
                // it freed are already deleted: plan again from the new metadata, length
                // included.
                Err(ReadError::Vanished) => {
                    self.invalidate(ino);
                    let length = self.length(ino)?;
                    if off >= length {
                        return Ok(ReadData::Bytes(Bytes::new()));
                    }
                    end = length.min(off + size as u64);
                }
                other => return other.map_err(ReadError::into_fs),
            }
        }
        Err(FsError::Data(format!(
            "blocks of inode {ino} kept vanishing during a read"
        )))
    }

    fn read_planned(
        &self,
        ino: Ino,
        off: u64,
        end: u64,
        pattern: ReadPattern,
        spans: bool,
    ) -> Result<ReadData, ReadError> {
        let pieces = self.plan(ino, off, end).map_err(ReadError::Fs)?;
        if spans {
            if let [Piece {
                block: Some((key, _, in_block)),
                len,
                ..
            }] = &pieces[..]
            {
                if let Some(s) = self.cache.span(key, *in_block..*in_block + *len) {
                    return Ok(ReadData::File {
                        file: s.file,
                        offset: s.offset,
                        len: s.len,
                    });
                }
            }
        }
        self.fetch_pieces(&pieces, off, end, pattern)
            .map(ReadData::Bytes)
    }

    /// Bytes `[start, end)` of chunk `chunk` as the slices `slices` (in the order they apply)
    /// make them: a read of one fixed version of the chunk. `Ok(None)` if a block of it is
    /// gone (the slices are no longer current).
    pub fn read_slices(
        &self,
        chunk: u32,
        slices: &[Slice],
        start: u32,
        end: u32,
    ) -> Result<Option<Bytes>, FsError> {
        let chunk_start = chunk as u64 * CHUNK_SIZE;
        let mut pieces = Vec::new();
        self.plan_chunk(slices, chunk_start, start, end, &mut pieces);
        match self.fetch_pieces(
            &pieces,
            chunk_start + start as u64,
            chunk_start + end as u64,
            ReadPattern::Sequential,
        ) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(ReadError::Vanished) => Ok(None),
            Err(ReadError::Fs(e)) => Err(e),
        }
    }

    /// The bytes of `[off, end)` of a file, planned as `pieces`.
    fn fetch_pieces(
        &self,
        pieces: &[Piece],
        off: u64,
        end: u64,
        pattern: ReadPattern,
    ) -> Result<Bytes, ReadError> {
        // Each piece's bytes: from a cache layer if one holds them (the disk layer reads just
        // the piece, on this thread: `block_on` runs here, never on a runtime worker), else
        // from the whole block, fetched once for every reader; or, for a random read of a
        // block not read before, or a small file's part of a packed object, just the piece
        // (the second file read from a pack fetches it whole, for its neighbours).
        let mut fetched = self.rt.block_on(async {
            let fetches = pieces.iter().map(|p| async move {
                let Some((key, len, in_block)) = &p.block else {
                    return Ok(None);
                };
                let range = *in_block..*in_block + p.len;
                if let Some(bytes) = self.cache.get_range(key, range.clone()).await {
                    return Ok(Some(bytes));
                }
                if (pattern == ReadPattern::Random || p.narrow)
                    && p.len < *len
                    && self.first_touch(key)
                {
                    return self.block_range(key, range).await.map(Some);
                }
                let block = self.block(key, *len).await?;
                Ok(Some(block.slice(range.start as usize..range.end as usize)))
            });
            futures::future::try_join_all(fetches).await
        })?;
        if let [Some(data)] = &mut fetched[..] {
            if data.len() as u64 == end - off {
                // One piece is the whole read (the usual case): hand on a view of it, often
                // of a cached block, which the reply to the kernel copies once. (Copying it
                // into a buffer of its own first was a tenth of a cold read's CPU.)
                return Ok(std::mem::take(data));
            }
        }
        let mut out = vec![0u8; (end - off) as usize];
        for (p, data) in pieces.iter().zip(fetched) {
            if let Some(data) = data {
                let dst = (p.file_off - off) as usize;
                out[dst..dst + p.len as usize].copy_from_slice(&data);
            }
        }
        Ok(Bytes::from(out))
    }

    /// Whether no random read fetched part of block `key` before (and notes that one did).
    fn first_touch(&self, key: &str) -> bool {
        if self.touched.len() >= MAX_TOUCHED_BLOCKS {
            self.touched.clear();
        }
        self.touched.insert(key.to_string(), ()).is_none()
    }

    /// Bytes `range` of block `key`, fetched with a ranged GET and not cached.
    async fn block_range(&self, key: &str, range: Range<u32>) -> Result<Bytes, ReadError> {
        let want = (range.end - range.start) as usize;
        match self
            .store
            .get(key, Some(range.start as u64..range.end as u64))
            .await
        {
            Ok(b) if b.len() == want => Ok(b),
            Ok(b) => Err(ReadError::Fs(FsError::Data(format!(
                "block {key} is shorter than expected: {} of {want} bytes at {}",
                b.len(),
                range.start
            )))),
            Err(StoreError::NotFound(_)) => Err(ReadError::Vanished),
            Err(e) => Err(ReadError::Fs(FsError::Store(e))),
        }
    }

    /// Starts fetching the blocks behind `[off, end)` of file `ino` into the cache (blocks a
    /// cache layer holds already are only readied, see [`BlockCache::ready`]).
    pub fn prefetch(&self, ino: Ino, off: u64, end: u64) {
        let Ok(pieces) = self.plan(ino, off, end) else {
            return;
        };
        // A block split into several pieces (several slices) is fetched once.
        let blocks: std::collections::BTreeMap<String, u32> = pieces
            .into_iter()
            .filter_map(|p| p.block.map(|(key, len, _)| (key, len)))
            .collect();
        for (key, len) in blocks {
            if self.cache.ready(&key, &self.rt) {
                continue;
            }
            let (store, cache) = (self.store.clone(), self.cache.clone());
            let turn = self.prefetches.clone().acquire_owned();
            let rt = self.rt.clone();
            self.rt.spawn(async move {
                let Ok(_turn) = turn.await else { return };
                // A demand read may have fetched it while this waited.
                if !cache.ready(&key, &rt) {
                    let _ = fetch_block(store, &cache, &key, len).await;
                }
            });
        }
    }

    /// Splits `[off, end)` of a file into pieces that each come from one block or are zeros.
    fn plan(&self, ino: Ino, off: u64, end: u64) -> Result<Vec<Piece>, FsError> {
        let mut pieces = Vec::new();
        let mut at = off;
        while at < end {
            let chunk = (at / CHUNK_SIZE) as u32;
            let chunk_start = chunk as u64 * CHUNK_SIZE;
            let cend = end.min(chunk_start + CHUNK_SIZE);
            let slices = self.chunk_slices(ino, chunk)?;
            self.plan_chunk(
                &slices,
                chunk_start,
                (at - chunk_start) as u32,
                (cend - chunk_start) as u32,
                &mut pieces,
            );
            at = cend;
        }
        Ok(pieces)
    }

    /// Adds the pieces of `[start, end)` of the chunk at file offset `chunk_start` made of
    /// `slices`.
    fn plan_chunk(
        &self,
        slices: &[Slice],
        chunk_start: u64,
        start: u32,
        end: u32,
        pieces: &mut Vec<Piece>,
    ) {
        let bs = self.layout.block_size();
        for span in resolve(slices, start, end) {
            let file_off = chunk_start + span.pos as u64;
            match span.source {
                Source::Zero => pieces.push(Piece {
                    file_off,
                    len: span.len,
                    block: None,
                    narrow: false,
                }),
                Source::Data { slice, data_off } => {
                    let mut done = 0;
                    while done < span.len {
                        let d = data_off + done;
                        let index = d / bs;
                        let in_block = d % bs;
                        let n = (bs - in_block).min(span.len - done);
                        let blen = self.layout.block_len(slice.size, index);
                        let key = self.layout.block_key(slice.id, index, blen);
                        pieces.push(Piece {
                            file_off: file_off + done as u64,
                            len: n,
                            block: Some((key, blen, in_block)),
                            narrow: u64::from(slice.len) * 4 <= u64::from(blen),
                        });
                        done += n;
                    }
                }
            }
        }
    }
}

/// Block `key` of `len` bytes, from the cache or else from the store (then cached); a block
/// of the wrong length is reported as corrupt, never served. Concurrent callers share a fetch.
async fn fetch_block(
    store: Arc<dyn ObjectStore>,
    cache: &BlockCache,
    key: &str,
    len: u32,
) -> Result<Bytes, Arc<StoreError>> {
    let k = key.to_string();
    cache
        .get_or_fetch(key, async move {
            let data = store.get(&k, None).await?;
            if data.len() as u64 != len as u64 {
                return Err(StoreError::Corrupt {
                    key: k,
                    actual: data.len() as u64,
                    expected: len as u64,
                });
            }
            Ok(data)
        })
        .await
}

/// Why a planned read failed.
enum ReadError {
    /// An object named by the plan does not exist (any more).
    Vanished,
    /// Any other failure.
    Fs(FsError),
}

impl ReadError {
    fn into_fs(self) -> FsError {
        match self {
            ReadError::Vanished => FsError::Data("a block of the file is missing".into()),
            ReadError::Fs(e) => e,
        }
    }
}

/// Part of a read: `len` bytes at `file_off`, from (block key, block length, offset in block)
/// or zeros.
struct Piece {
    file_off: u64,
    len: u32,
    block: Option<(String, u32, u32)>,
    /// The file shows at most a quarter of the block (one of the small files of a packed
    /// object): a first miss fetches just the piece, as for a random read.
    narrow: bool,
}

/// Pending bytes past this move into a block buffer of the pool.
const POOLED_SLICE_MIN: usize = 64 << 10;

/// Appends `bytes` to the buffer of a pending slice. A small slice stays in a small buffer (a
/// random 4 KiB write must not hold a block's worth of address space); one growing past
/// 64 KiB moves into a block buffer of the pool, once, instead of doubling and copying its
/// way up to a block: those freed steps fragmented the heap (in an 8 KiB read-seek-rewrite
/// loop the heap grew ~90 MiB past the data buffered).
fn append(buf: &mut Vec<u8>, bytes: &[u8], pool: &BufferPool) {
    let len = buf.len() + bytes.len();
    let grows = len > buf.capacity() && len > POOLED_SLICE_MIN;
    if grows && len <= pool.size() && buf.capacity() < pool.size() {
        let mut pooled = pool.take();
        pooled.extend_from_slice(buf);
        *buf = pooled;
    }
    buf.extend_from_slice(bytes);
}

/// Most bytes of buffers a file's pending writes may hold for
/// [`FileWriter::is_small_and_in_memory`]: small files, whose commits can wait in numbers.
pub const DEFERRABLE_BYTES: usize = POOLED_SLICE_MIN;

/// A packed object whose upload has started, and the commit that will reference it.
struct StoredPack {
    writes: Vec<FileWrite>,
    upload: JoinHandle<Result<(), StoreError>>,
    key: String,
}

/// Most bytes of one packed object ([`DataCtx::commit_packed`]), which stays whole while any
/// of its files references it.
pub const PACK_BYTES: u32 = 1 << 20;

/// Most files in one packed object.
pub const PACK_FILES: usize = 256;

/// A slice being written: bytes `[0, uploaded)` are in flight to the store as whole blocks,
/// bytes `[uploaded, len)` are in `buf`, which holds less than a block.
struct PendingSlice {
    chunk: u32,
    pos: u32,
    id: u64,
    len: u32,
    uploaded: u32,
    buf: Vec<u8>,
    uploads: Vec<JoinHandle<Result<(), StoreError>>>,
}

impl PendingSlice {
    fn end(&self) -> u32 {
        self.pos + self.len
    }

    /// Appends `bytes` to the buffered tail, starting the upload of each block as it fills.
    /// The buffer never holds more than a block: bytes past a block's end go to the next
    /// block's buffer, so a write across a block boundary neither grows a pooled buffer past
    /// a block (which the pool would then keep idle at twice the size) nor copies the block
    /// it fills.
    fn push(&mut self, mut bytes: &[u8], data: &DataCtx) {
        let bs = data.layout.block_size() as usize;
        while !bytes.is_empty() {
            let n = (bs - self.buf.len()).min(bytes.len());
            append(&mut self.buf, &bytes[..n], &data.buffers);
            bytes = &bytes[n..];
            if self.buf.len() == bs {
                self.upload_full_block(data);
            }
        }
    }

    /// Starts the upload of the buffer, which holds exactly one block.
    fn upload_full_block(&mut self, data: &DataCtx) {
        let bs = data.layout.block_size();
        debug_assert_eq!(self.buf.len(), bs as usize);
        let key = data.layout.block_key(self.id, self.uploaded / bs, bs);
        let block = data.buffers.freeze(std::mem::take(&mut self.buf));
        self.uploads.push(data.upload(key, block));
        self.uploaded += bs;
    }

    /// Starts the upload of the last, short block; the slice takes no more writes.
    fn upload_tail(&mut self, data: &DataCtx) {
        if !self.buf.is_empty() {
            let bs = data.layout.block_size();
            let block = std::mem::take(&mut self.buf);
            let key = data
                .layout
                .block_key(self.id, self.uploaded / bs, block.len() as u32);
            self.uploaded += block.len() as u32;
            self.uploads
                .push(data.upload(key, data.buffers.freeze(block)));
        }
    }
}

#[derive(Default)]
struct WriterState {
    slices: Vec<PendingSlice>,
    /// End of the furthest byte written and not yet committed (0: nothing pending).
    length: u64,
    /// Time of the last write not yet committed.
    mtime: Option<Timestamp>,
    /// Generation of the last batch of slices taken for commit.
    taken: u64,
    /// Generations of batches being committed now, with the file ranges each one writes.
    committing: Vec<(u64, Vec<Range<u64>>)>,
    /// Number of failed commits so far (an errseq: each open handle remembers how many it
    /// has reported, so every handle hears of every failure once).
    err_seq: u64,
    /// The last commit failure.
    last_error: Option<String>,
    /// How many of the failures some handle has reported. A handle opening while some
    /// failure went unreported will report it (as Linux's `errseq_sample`), so a failure of a
    /// commit that ends after the last close still reaches the file's next user.
    err_reported: u64,
    /// When the oldest write not yet taken for commit was made.
    pending_since: Option<std::time::Instant>,
}

/// What a read must do about a file's uncommitted writes.
#[derive(Debug, PartialEq, Eq)]
pub enum PendingRead {
    /// Nothing is pending: the committed data is the file.
    Nothing,
    /// The read needs bytes that are no longer in memory (uploaded, not yet committed) or a
    /// commit is under way: commit first, then read.
    CommitFirst,
    /// Read the committed data as if the file were `length` bytes long, then lay each
    /// `(file offset, bytes)` over it in order.
    Overlay {
        /// The length the file has with its pending writes.
        length: u64,
        /// Pending bytes within the read, oldest first.
        parts: Vec<(u64, Vec<u8>)>,
    },
}

/// The uncommitted writes of one file.
#[derive(Default)]
pub struct FileWriter {
    state: Mutex<WriterState>,
    idle: Condvar,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter").finish_non_exhaustive()
    }
}

impl FileWriter {
    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Buffers `buf` at `off`. Full blocks start uploading at once. Returns the number of
    /// slices now pending.
    pub fn write(&self, data: &DataCtx, off: u64, buf: &[u8]) -> Result<usize, FsError> {
        data.reserve_ids(16)?;
        let mut st = self.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let at = off + done as u64;
            let chunk = (at / CHUNK_SIZE) as u32;
            let pos = (at % CHUNK_SIZE) as u32;
            let n = ((CHUNK_SIZE as usize) - pos as usize).min(buf.len() - done);
            let part = &buf[done..done + n];
            // Extend or overwrite the newest slice of this chunk if the range starts inside
            // its not yet uploaded tail.
            let newest = st.slices.iter_mut().rev().find(|s| s.chunk == chunk);
            match newest {
                Some(s) if pos >= s.pos + s.uploaded && pos <= s.end() => {
                    let rel = (pos - s.pos - s.uploaded) as usize;
                    let overlap = (s.buf.len() - rel).min(n);
                    s.buf[rel..rel + overlap].copy_from_slice(&part[..overlap]);
                    let old = s.len;
                    s.len = s.len.max(pos + n as u32 - s.pos);
                    // Counted before any upload can finish and uncount it.
                    data.buffered
                        .fetch_add((s.len - old) as u64, Ordering::Relaxed);
                    s.push(&part[overlap..], data);
                }
                // A write that ends inside or right at the start of the newest slice, all of
                // it still in memory, joins it: "write the last byte, then the whole file"
                // or "write a header after the body" makes one object, not two.
                Some(s) if s.uploaded == 0 && pos < s.pos && pos + n as u32 >= s.pos => {
                    let end = s.end().max(pos + n as u32);
                    // Only the slice's bytes past the write are kept (none, most often).
                    let kept_from = (pos + n as u32).clamp(s.pos, s.end());
                    let kept = s.buf.split_off((kept_from - s.pos) as usize);
                    data.buffered
                        .fetch_add(u64::from(end - pos - s.len), Ordering::Relaxed);
                    s.buf.clear();
                    s.pos = pos;
                    s.len = end - pos;
                    s.push(part, data);
                    s.push(&kept, data);
                }
                _ => {
                    let id = data.next_slice_id()?;
                    let mut s = PendingSlice {
                        chunk,
                        pos,
                        id,
                        len: n as u32,
                        uploaded: 0,
                        buf: Vec::new(),
                        uploads: Vec::new(),
                    };
                    data.buffered.fetch_add(n as u64, Ordering::Relaxed);
                    s.push(part, data);
                    st.slices.push(s);
                }
            }
            done += n;
        }
        st.length = st.length.max(off + buf.len() as u64);
        st.mtime = Some(Timestamp::now());
        st.pending_since.get_or_insert_with(std::time::Instant::now);
        Ok(st.slices.len())
    }

    /// The length and mtime a reader should see on top of committed metadata, if anything is
    /// pending.
    pub fn overlay(&self) -> Option<(u64, Timestamp)> {
        let st = self.lock();
        st.mtime.map(|m| (st.length, m))
    }

    /// How a read of `[off, end)` sees the pending writes: most reads of data just written
    /// are served from the write buffer, with no commit and no upload.
    pub fn pending_read(&self, off: u64, end: u64) -> PendingRead {
        let st = self.lock();
        // Bytes of a batch being committed are neither in memory here nor in metadata yet.
        let overlaps = |r: &Range<u64>| r.start < end && off < r.end;
        if st
            .committing
            .iter()
            .any(|(_, ranges)| ranges.iter().any(overlaps))
        {
            return PendingRead::CommitFirst;
        }
        // While a batch commits the file may be longer than its committed length says.
        if st.slices.is_empty() && st.committing.is_empty() {
            return PendingRead::Nothing;
        }
        let mut parts = Vec::new();
        // Slices are in write order, so later ones are laid over earlier ones.
        for s in &st.slices {
            let start = s.chunk as u64 * CHUNK_SIZE + s.pos as u64;
            let in_memory = start + s.uploaded as u64;
            let stop = start + s.len as u64;
            if stop <= off || start >= end {
                continue;
            }
            // Overlaps the part handed to uploads (the read already overlaps the slice).
            if s.uploaded > 0 && off < in_memory {
                return PendingRead::CommitFirst;
            }
            let (from, to) = (off.max(in_memory), end.min(stop));
            let rel = (from - in_memory) as usize..(to - in_memory) as usize;
            parts.push((from, s.buf[rel].to_vec()));
        }
        PendingRead::Overlay {
            length: st.length,
            parts,
        }
    }

    /// How long the oldest write not yet taken for commit has waited, if any is pending.
    pub fn pending_for(&self) -> Option<std::time::Duration> {
        self.lock().pending_since.map(|t| t.elapsed())
    }

    /// Whether nothing is pending or committing.
    pub fn is_idle(&self) -> bool {
        let st = self.lock();
        st.slices.is_empty() && st.committing.is_empty()
    }

    /// Whether the pending writes are small and all in memory (nothing uploading or
    /// committing, at most [`DEFERRABLE_BYTES`] of buffers): their commit may wait a little,
    /// and they may be [discarded](FileWriter::discard) if nobody can read them any more.
    pub fn is_small_and_in_memory(&self) -> bool {
        let st = self.lock();
        !st.slices.is_empty()
            && st.committing.is_empty()
            && st.slices.iter().all(|s| s.uploaded == 0)
            && st.slices.iter().map(|s| s.buf.capacity()).sum::<usize>() <= DEFERRABLE_BYTES
    }

    /// Drops the pending writes, unless some are uploading or committing; whether it did (or
    /// nothing was pending). For a file that has lost its last name and whose every handle
    /// is closed: its pending bytes could never be read.
    pub fn discard(&self, data: &DataCtx) -> bool {
        let mut st = self.lock();
        if !st.committing.is_empty() || st.slices.iter().any(|s| s.uploaded > 0) {
            return false;
        }
        let bytes: u64 = st.slices.drain(..).map(|s| u64::from(s.len)).sum();
        data.buffered.fetch_sub(bytes, Ordering::SeqCst);
        st.pending_since = None;
        st.length = 0;
        st.mtime = None;
        true
    }

    /// The number of commit failures a handle opening now counts as seen: all but those no
    /// handle has reported yet.
    pub fn seen_at_open(&self) -> u64 {
        self.lock().err_reported
    }

    /// Whether a commit failed and no handle has reported it yet.
    pub fn has_unreported_failure(&self) -> bool {
        let st = self.lock();
        st.err_reported < st.err_seq
    }

    /// Fails if a commit failed since the handle that has seen `seen` failures last heard,
    /// which then counts as told (of this and every earlier failure).
    pub fn take_unreported(&self, seen: &AtomicU64) -> Result<(), FsError> {
        Self::report(&mut self.lock(), seen)
    }

    fn report(st: &mut WriterState, seen: &AtomicU64) -> Result<(), FsError> {
        st.err_reported = st.err_seq;
        if seen.swap(st.err_seq, Ordering::Relaxed) < st.err_seq {
            let e = st.last_error.clone().unwrap_or_default();
            return Err(FsError::Data(format!(
                "an earlier write could not be committed: {e}"
            )));
        }
        Ok(())
    }

    /// Uploads what is buffered and waits until every write made before this call is durable
    /// and committed.
    ///
    /// Returns this call's own commit failure; and, given the errseq a handle has seen, also
    /// any failure since (updating it), so a close or fsync reports every lost write even when
    /// another thread's flush committed it.
    pub fn flush(&self, data: &DataCtx, ino: Ino, seen: Option<&AtomicU64>) -> Result<(), FsError> {
        let (mut slices, mtime, gen) = Self::take_batch(&mut self.lock());
        let own = if slices.is_empty() {
            Ok(())
        } else {
            self.commit(data, ino, &mut slices, mtime, gen)
        };
        let mut st = self.end_batch(data, gen, !slices.is_empty(), own.as_ref().err());
        // Whatever this call reports, the handle has now heard of every failure so far.
        let unreported = seen.map_or(Ok(()), |seen| Self::report(&mut st, seen));
        own.and(unreported)
    }

    /// Takes every pending slice for commit as a new batch: the slices, their mtime and the
    /// batch's generation. Reads of their ranges commit first (wait) until the batch ends.
    fn take_batch(st: &mut WriterState) -> (Vec<PendingSlice>, Timestamp, u64) {
        let slices = std::mem::take(&mut st.slices);
        st.pending_since = None;
        st.taken += 1;
        let gen = st.taken;
        if !slices.is_empty() {
            let ranges = slices
                .iter()
                .map(|s| {
                    let start = s.chunk as u64 * CHUNK_SIZE + s.pos as u64;
                    start..start + s.len as u64
                })
                .collect();
            st.committing.push((gen, ranges));
        }
        (slices, st.mtime.unwrap_or_else(Timestamp::now), gen)
    }

    /// Ends batch `gen` (`had_slices`: it was not empty), which failed with `failure` if
    /// any, and waits for the batches taken before it, so that every earlier write is then
    /// committed (later ones may keep going).
    fn end_batch(
        &self,
        data: &DataCtx,
        gen: u64,
        had_slices: bool,
        failure: Option<&FsError>,
    ) -> std::sync::MutexGuard<'_, WriterState> {
        let mut st = self.lock();
        if had_slices {
            st.committing.retain(|(g, _)| *g != gen);
            if let Some(e) = failure {
                data.commit_failures.fetch_add(1, Ordering::Relaxed);
                st.err_seq += 1;
                st.last_error = Some(e.to_string());
            }
            self.idle.notify_all();
        }
        let mut st = self.wait_for_earlier(st, gen);
        if st.slices.is_empty() && st.committing.is_empty() {
            st.length = 0;
            st.mtime = None;
        }
        st
    }

    /// Takes the pending writes for a packed commit ([`DataCtx::commit_packed`]) if they
    /// are one slice of at most `max` bytes, all in memory, with no batch committing: the
    /// slice, its mtime and its batch, which [`FileWriter::end_batch`] must end.
    fn take_packable(&self, max: u32) -> Option<(PendingSlice, Timestamp, u64)> {
        let mut st = self.lock();
        let packable = st.committing.is_empty()
            && matches!(&st.slices[..], [s] if s.uploaded == 0 && s.len > 0 && s.len <= max);
        if !packable {
            return None;
        }
        let (mut slices, mtime, gen) = Self::take_batch(&mut st);
        Some((slices.pop().expect("one slice"), mtime, gen))
    }

    /// Waits, with the state locked as `st`, until no batch taken before batch `gen` is
    /// still being committed.
    fn wait_for_earlier<'a>(
        &self,
        mut st: std::sync::MutexGuard<'a, WriterState>,
        gen: u64,
    ) -> std::sync::MutexGuard<'a, WriterState> {
        while st.committing.iter().any(|(g, _)| *g < gen) {
            st = self.idle.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    /// Uploads and commits batch `gen`. Uploads of several batches run at once, but batches
    /// commit in order: slices apply in commit order, so a later write must commit later.
    fn commit(
        &self,
        data: &DataCtx,
        ino: Ino,
        slices: &mut [PendingSlice],
        mtime: Timestamp,
        gen: u64,
    ) -> Result<(), FsError> {
        for s in slices.iter_mut() {
            s.upload_tail(data);
        }
        let uploads: Vec<_> = slices
            .iter_mut()
            .flat_map(|s| s.uploads.drain(..))
            .collect();
        data.wait_uploads(uploads)?;
        drop(self.wait_for_earlier(self.lock(), gen));
        let committed: Vec<ChunkSlice> = slices
            .iter()
            .map(|s| ChunkSlice {
                chunk: s.chunk,
                slice: Slice {
                    id: s.id,
                    size: s.len,
                    off: 0,
                    len: s.len,
                    pos: s.pos,
                },
            })
            .collect();
        let written = data.meta.write_slices(ino, &committed, mtime);
        data.invalidate(ino);
        written?;
        let mut chunks: Vec<u32> = committed.iter().map(|c| c.chunk).collect();
        chunks.dedup();
        for chunk in chunks {
            data.hint_compaction(ino, chunk);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data path over a fresh SQLite volume and local store in a temporary directory, with
    /// blocks of `block` bytes. Uploads run only when the test drives the returned runtime.
    fn data_ctx(
        block: u32,
    ) -> (
        tempfile::TempDir,
        tokio::runtime::Runtime,
        Arc<dyn ObjectStore>,
        DataCtx,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let meta = tidefs_meta::SqliteMeta::open(&dir.path().join("meta.db"), true).unwrap();
        let mut format = tidefs_meta::conformance::sample_format();
        format.block_size = block;
        meta.format(&format, 0, 0).unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(crate::object::LocalStore::open(&dir.path().join("objects")).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let data = DataCtx::new(
            Arc::new(meta),
            store.clone(),
            BlockCache::new(0),
            Layout::new(&format.name, block),
            rt.handle().clone(),
        );
        (dir, rt, store, data)
    }

    /// Writes as `writes` would leave a file of `len` zero bytes.
    fn model(len: usize, writes: &[(usize, Vec<u8>)]) -> Vec<u8> {
        let mut file = vec![0u8; len];
        for (at, bytes) in writes {
            file[*at..at + bytes.len()].copy_from_slice(bytes);
        }
        file
    }

    /// A write that ends inside or at the start of the newest slice, still all in memory,
    /// becomes part of it (one object, not two); one that leaves a gap does not, and the
    /// pending bytes read back as written either way, also when the joined slice passes a
    /// block's end and starts uploading it.
    #[test]
    fn a_write_ending_in_the_newest_slice_joins_it() {
        const BLOCK: u32 = 64 << 10;
        let (_dir, rt, store, data) = data_ctx(BLOCK);
        let w = FileWriter::default();
        let fill = |n: usize, seed: u8| -> Vec<u8> { (0..n).map(|i| seed ^ i as u8).collect() };
        let writes = vec![
            (65_534, vec![7u8]),
            (0, fill(65_534, 1)),
            (70_000, fill(10, 2)),
            (60_000, fill(10_010, 3)),
        ];
        let mut counts = Vec::new();
        for (at, bytes) in &writes {
            counts.push(w.write(&data, *at as u64, bytes).unwrap());
        }
        assert_eq!(counts, [1, 1, 2, 2]);
        let want = model(70_010, &writes);
        let PendingRead::Overlay { length, parts } = w.pending_read(0, 70_010) else {
            panic!("everything is in memory");
        };
        let mut got = vec![0u8; length as usize];
        for (at, bytes) in parts {
            got[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        }
        assert!(got == want);
        assert_eq!(data.buffered.load(Ordering::Relaxed), 65_535 + 10_010);

        // Joined past a block's end: the first block uploads, the rest stays in memory.
        let w = FileWriter::default();
        let writes = vec![(200_000, fill(1_000, 4)), (100_000, fill(101_000, 5))];
        for (at, bytes) in &writes {
            assert_eq!(w.write(&data, *at as u64, bytes).unwrap(), 1);
        }
        let want = model(201_000, &writes);
        let (id, uploads) = {
            let mut st = w.lock();
            let s = &mut st.slices[0];
            assert_eq!((s.pos, s.len, s.uploaded), (100_000, 101_000, BLOCK));
            assert!(s.buf[..] == want[100_000 + BLOCK as usize..]);
            (s.id, std::mem::take(&mut s.uploads))
        };
        for u in uploads {
            rt.block_on(u).unwrap().unwrap();
        }
        let key = data.layout.block_key(id, 0, BLOCK);
        let block = rt.block_on(store.get(&key, None)).unwrap();
        assert!(block[..] == want[100_000..100_000 + BLOCK as usize]);
    }

    #[test]
    fn a_growing_slice_moves_into_a_block_buffer_once() {
        const BLOCK: usize = 1 << 20;
        let pool = BufferPool::new(BLOCK, 2);
        let kept = pool.take();
        let at = kept.as_ptr();
        drop(pool.freeze(kept));
        assert_eq!(pool.idle(), 1);
        let piece: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let mut buf = Vec::new();
        // Small slices (a random 4-64 KiB write) stay in a buffer of their own size.
        for _ in 0..8 {
            append(&mut buf, &piece, &pool);
        }
        assert!(buf.capacity() < BLOCK, "capacity {}", buf.capacity());
        assert_eq!(pool.idle(), 1);
        // Past 64 KiB the bytes move, once, into the kept block buffer, which then takes the
        // rest of the block without growing.
        append(&mut buf, &piece, &pool);
        assert_eq!((buf.as_ptr(), pool.idle()), (at, 0));
        while buf.len() + piece.len() <= BLOCK {
            append(&mut buf, &piece, &pool);
        }
        assert_eq!(
            (buf.as_ptr(), buf.capacity(), buf.len()),
            (at, BLOCK, BLOCK)
        );
        assert!(buf.chunks(8192).all(|c| c == &piece[..]));
        // A first write past 64 KiB goes into a block buffer at once; one larger than a
        // block (a pool of small blocks) keeps a buffer of its own.
        let mut big = Vec::new();
        append(&mut big, &vec![1u8; 100 << 10], &pool);
        assert_eq!((big.capacity(), big.len()), (BLOCK, 100 << 10));
        let small_blocks = BufferPool::new(64 << 10, 2);
        let mut own = Vec::new();
        append(&mut own, &vec![2u8; 100 << 10], &small_blocks);
        assert_eq!((own.len(), small_blocks.idle()), (100 << 10, 0));
    }

    /// Writes that cross block ends fill each block buffer exactly: every block is uploaded
    /// from a buffer of the pool's size, which comes back to the pool (a buffer grown past a
    /// block would be dropped there), and the stored blocks hold the bytes written.
    #[test]
    fn writes_across_block_ends_fill_block_buffers_exactly() {
        // A block size no other test of this binary uses: the pool is per size and shared.
        const BLOCK: u32 = 512 << 10;
        let (_dir, rt, store, data) = data_ctx(BLOCK);
        let content: Vec<u8> = (0..3 * BLOCK + 1000).map(|i| (i % 253) as u8).collect();
        let writer = FileWriter::default();
        // 100,000-byte writes: most blocks end inside a write.
        for (i, piece) in content.chunks(100_000).enumerate() {
            writer.write(&data, (i * 100_000) as u64, piece).unwrap();
            let st = writer.lock();
            assert!(st.slices.iter().all(|s| s.buf.len() < BLOCK as usize));
        }
        let (id, uploads) = {
            let mut st = writer.lock();
            assert_eq!(st.slices.len(), 1);
            let s = &mut st.slices[0];
            assert_eq!(s.uploaded, 3 * BLOCK);
            (s.id, std::mem::take(&mut s.uploads))
        };
        for u in uploads {
            rt.block_on(u).unwrap().unwrap();
        }
        // The upload tasks drop their views of the blocks just after the PUT returns.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while data.buffers.idle() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(data.buffers.idle(), 3);
        for index in 0..3u32 {
            let key = data.layout.block_key(id, index, BLOCK);
            let got = rt.block_on(store.get(&key, None)).unwrap();
            let at = (index * BLOCK) as usize;
            assert!(got[..] == content[at..at + BLOCK as usize], "block {index}");
        }
    }
}
