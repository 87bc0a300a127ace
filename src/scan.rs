//! Walks over a volume's metadata and bucket shared by `gc` and `fsck`.

use crate::layout::Layout;
use crate::object::{ObjectInfo, ObjectStore, StoreError};
use std::collections::HashMap;
use tidefs_meta::{Meta, MetaError};

/// Objects asked for per listing call.
pub const LIST_PAGE: usize = 1000;
/// Slices asked for per metadata call.
pub const SLICE_PAGE: usize = 10_000;

/// Why a scan stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The metadata engine failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every slice id files reference, with its size, read page by page.
pub fn referenced(meta: &dyn Meta) -> Result<HashMap<u64, u32>, MetaError> {
    all_pages(|after| {
        let page = meta.referenced_slices(after, SLICE_PAGE)?;
        Ok(page.iter().map(|s| (s.id, s.size)).collect())
    })
}

/// Every freed slice whose objects are still queued for deletion, with its size.
pub fn queued(meta: &dyn Meta) -> Result<HashMap<u64, u32>, MetaError> {
    all_pages(|after| {
        let page = meta.pending_deletions(after, SLICE_PAGE)?;
        Ok(page.iter().map(|s| (s.id, s.size)).collect())
    })
}

/// Collects `(id, size)` pages in id order, each asked for after the last id of the one
/// before, until one comes back empty.
fn all_pages(
    mut page: impl FnMut(u64) -> Result<Vec<(u64, u32)>, MetaError>,
) -> Result<HashMap<u64, u32>, MetaError> {
    let mut out = HashMap::new();
    let mut after = 0;
    loop {
        let rows = page(after)?;
        let Some(&(last, _)) = rows.last() else {
            return Ok(out);
        };
        after = last;
        out.extend(rows);
    }
}

/// Calls `each` with every page of the volume's objects, in key order.
pub async fn for_each_object_page(
    store: &dyn ObjectStore,
    layout: &Layout,
    mut each: impl FnMut(&[ObjectInfo]),
) -> Result<(), StoreError> {
    let prefix = layout.prefix();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(&prefix, after.as_deref(), LIST_PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.key.clone());
        each(&page);
        if page.len() < LIST_PAGE {
            return Ok(());
        }
    }
}

/// Whether block `index` of length `len` belongs to a slice storing `size` bytes.
pub fn block_belongs(layout: &Layout, size: u32, index: u32, len: u32) -> bool {
    index < size.div_ceil(layout.block_size()) && layout.block_len(size, index) == len
}
