//! Leaked objects: blocks in the bucket that no metadata references (`tidefs gc`).
//!
//! An object is **leaked** when its key is a block key of the volume and no file references
//! its slice (or the slice has another size). Uploads not yet committed look the same, so
//! objects younger than a grace period are skipped. Objects of freed slices waiting in the
//! deletion queue are not leaked: a mount deletes them in the background, and `gc --delete`
//! drains that queue too, so a volume that is no longer mounted gets its space back.

use crate::layout::Layout;
use crate::object::ObjectStore;
use crate::scan::{self, ScanError};
use serde::Serialize;
use std::time::{Duration, SystemTime};
use tidefs_meta::Meta;

/// What `gc` does.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Delete leaked objects and drain the deletion queue (otherwise only count them).
    pub delete: bool,
    /// Unreferenced objects younger than this may be uploads in flight: skipped.
    pub grace: Duration,
}

/// What `gc` found and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Objects listed under the volume's block prefix.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Objects of referenced slices.
    pub referenced: u64,
    /// Objects of freed slices queued for deletion.
    pub queued: u64,
    /// Unreferenced objects past the grace period.
    pub leaked: u64,
    /// Their bytes.
    pub leaked_bytes: u64,
    /// Unreferenced objects younger than the grace period, left alone.
    pub young: u64,
    /// Keys under the prefix that are not block keys of this volume, left alone.
    pub foreign: u64,
    /// Leaked objects deleted.
    pub deleted: u64,
    /// Objects whose delete failed.
    pub delete_failures: u64,
    /// Queued slices whose objects are all gone, removed from the queue.
    pub queue_drained: u64,
}

/// Scans the bucket against the metadata; see the module docs. `progress` sees the report
/// after each page of objects.
pub async fn gc(
    meta: &dyn Meta,
    store: &dyn ObjectStore,
    layout: &Layout,
    opts: &GcOptions,
    progress: &mut dyn FnMut(&GcReport),
) -> Result<GcReport, ScanError> {
    // Metadata first: a slice committed after this is younger than the grace period, and a
    // slice freed after it looks referenced and waits for the next run.
    let referenced = scan::referenced(meta)?;
    let queued = scan::queued(meta)?;
    let now = SystemTime::now();
    let mut report = GcReport::default();
    let mut doomed = Vec::new();
    scan::for_each_object_page(store, layout, |page| {
        for o in page {
            report.objects += 1;
            report.bytes += o.size;
            let Some((id, index, len)) = layout.parse_key(&o.key) else {
                report.foreign += 1;
                continue;
            };
            let belongs = |m: &std::collections::HashMap<u64, u32>| {
                m.get(&id)
                    .is_some_and(|&size| scan::block_belongs(layout, size, index, len))
            };
            if belongs(&referenced) {
                report.referenced += 1;
            } else if belongs(&queued) {
                report.queued += 1;
            } else if o
                .modified
                .and_then(|m| now.duration_since(m).ok())
                .is_none_or(|age| age < opts.grace)
            {
                report.young += 1;
            } else {
                report.leaked += 1;
                report.leaked_bytes += o.size;
                if opts.delete {
                    doomed.push(o.key.clone());
                }
            }
        }
        progress(&report);
    })
    .await?;
    if !opts.delete {
        return Ok(report);
    }
    for batch in doomed.chunks(scan::LIST_PAGE) {
        let failed = store.delete_batch(batch).await;
        report.delete_failures += failed.len() as u64;
        report.deleted += (batch.len() - failed.len()) as u64;
        progress(&report);
    }
    // Drain the deletion queue, as a mount's background deleter would.
    let mut ids: Vec<u64> = queued.keys().copied().collect();
    ids.sort_unstable();
    for ids in ids.chunks(scan::LIST_PAGE) {
        let keys: Vec<String> = ids
            .iter()
            .flat_map(|id| layout.slice_keys(*id, queued[id]))
            .collect();
        let failed = store.delete_batch(&keys).await;
        report.delete_failures += failed.len() as u64;
        let failed_ids: std::collections::HashSet<u64> = failed
            .iter()
            .filter_map(|(k, _)| layout.parse_key(k).map(|(id, _, _)| id))
            .collect();
        let done: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| !failed_ids.contains(id))
            .collect();
        meta.ack_deletions(&done)?;
        report.queue_drained += done.len() as u64;
        progress(&report);
    }
    Ok(report)
}
