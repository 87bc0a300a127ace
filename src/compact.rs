//! Compaction: a chunk made of many slices (small appends, random writes, overwrites) is
//! rewritten as one slice holding the bytes reads see, so reads plan few pieces and the bytes
//! that newer slices hid stop taking space.
//!
//! Safe beside writers and readers of the same file: the new slice is committed with
//! [`Meta::compact_chunk`](tidefs_meta::Meta::compact_chunk), which swaps it in only if the
//! slices it was made from are still the chunk's first ones, unchanged, and otherwise frees it;
//! slices committed meanwhile apply after it. A reader that planned with the old slices and
//! finds their blocks deleted plans again.

use crate::data::DataCtx;
use crate::error::FsError;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use tidefs_meta::{Ino, Slice};

/// What one compaction of a chunk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compacted {
    /// The chunk had fewer slices than asked for (or none with data).
    Skipped,
    /// `slices` slices were replaced by one of `bytes` bytes.
    Done {
        /// Slices replaced.
        slices: usize,
        /// Bytes written for the new slice.
        bytes: u64,
    },
    /// The chunk changed while it was being rewritten; nothing changed and the rewritten
    /// data was freed. A later compaction will see the new state.
    Raced,
}

/// Compacts chunk `chunk` of `ino` if it has at least `min_slices` slices (and at least 2).
pub fn compact_chunk(
    data: &DataCtx,
    ino: Ino,
    chunk: u32,
    min_slices: usize,
) -> Result<Compacted, FsError> {
    let slices = data.meta.read_chunk(ino, chunk)?;
    if slices.len() < min_slices.max(2) {
        return Ok(Compacted::Skipped);
    }
    let start = slices.iter().map(|s| s.pos).min().unwrap_or(0);
    let end = slices.iter().map(|s| s.pos + s.len).max().unwrap_or(0);
    let _span = tracing::debug_span!("compact", ino, chunk, slices = slices.len()).entered();
    // A chunk of zero slices only has nothing stored: one zero slice says the same.
    let stored = !slices.iter().all(Slice::is_zero);
    let new = Slice {
        id: data.next_slice_id()?,
        size: if stored { end - start } else { 0 },
        off: 0,
        len: end - start,
        pos: start,
    };
    if stored {
        let Some(bytes) = data.read_slices(chunk, &slices, start, end)? else {
            return Ok(Compacted::Raced);
        };
        if let Err(e) = upload_slice(data, new, bytes) {
            // Blocks that did reach the store are freed through the deletion queue.
            data.meta.compact_chunk(ino, chunk, &[], new)?;
            return Err(e);
        }
    }
    let swapped = data.meta.compact_chunk(ino, chunk, &slices, new)?;
    data.invalidate(ino);
    Ok(if swapped {
        tracing::debug!(ino, chunk, slices = slices.len(), "compacted");
        Compacted::Done {
            slices: slices.len(),
            bytes: new.size as u64,
        }
    } else {
        Compacted::Raced
    })
}

/// Stores the blocks of slice `s` holding `bytes`, waiting until all are durable.
fn upload_slice(data: &DataCtx, s: Slice, bytes: Bytes) -> Result<(), FsError> {
    let bs = data.layout.block_size() as usize;
    let uploads: Vec<_> = (0..bytes.len())
        .step_by(bs)
        .enumerate()
        .map(|(index, at)| {
            let block = bytes.slice(at..(at + bs).min(bytes.len()));
            let key = data
                .layout
                .block_key(s.id, index as u32, block.len() as u32);
            data.buffered
                .fetch_add(block.len() as u64, Ordering::Relaxed);
            data.upload_cached(key, block)
        })
        .collect();
    data.wait_uploads(uploads)
}
