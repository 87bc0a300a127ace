//! Consistency of a volume (`tidefs fsck`): the namespace, checked and repaired by the
//! metadata engine, and the blocks, every one of which a referenced slice needs must be in the
//! bucket with its length.
//!
//! The bucket is listed before the slices are read, so a block found missing may belong to a
//! slice committed after the listing; each such block is asked for again before it is
//! reported. A missing block cannot be repaired: its data is gone. A block not in the bucket
//! but staged by a `--writeback` mount (in the staging directory given) is not missing: it is
//! counted as staged, to be uploaded by that mount or the next one with the same cache.

use crate::layout::Layout;
use crate::object::{ObjectStore, StoreError};
use crate::scan::{self, ScanError};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use tidefs_meta::{Meta, Problem, SliceRef};

/// What `fsck` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    /// Namespace problems, each saying whether it was repaired.
    pub namespace: Vec<String>,
    /// How many of those are left unrepaired.
    pub namespace_unrepaired: usize,
    /// Objects listed.
    pub objects: u64,
    /// Referenced slices checked.
    pub slices: u64,
    /// Blocks those slices need.
    pub blocks: u64,
    /// Blocks missing from the bucket, with the file that needs each.
    pub missing: Vec<String>,
    /// Blocks not in the bucket yet but staged on local disk by a `--writeback` mount.
    pub staged: u64,
    /// Blocks present with the wrong size.
    pub wrong_size: Vec<String>,
}

impl FsckReport {
    /// Whether anything is still wrong.
    pub fn is_broken(&self) -> bool {
        self.namespace_unrepaired > 0 || !self.missing.is_empty() || !self.wrong_size.is_empty()
    }
}

/// Checks the volume; with `repair`, fixes the namespace problems that lose nothing. Blocks
/// whose keys are in `staged` (a writeback staging directory) count as staged, not missing.
/// `progress` sees the report as the scan goes.
pub async fn fsck(
    meta: &dyn Meta,
    store: &dyn ObjectStore,
    layout: &Layout,
    repair: bool,
    staged: &HashSet<String>,
    progress: &mut dyn FnMut(&FsckReport),
) -> Result<FsckReport, ScanError> {
    let mut report = FsckReport::default();
    let problems: Vec<Problem> = meta.check_namespace(repair)?;
    report.namespace_unrepaired = problems.iter().filter(|p| !p.repaired).count();
    report.namespace = problems.iter().map(|p| p.to_string()).collect();
    // (slice id, block index) -> (length in the key, size of the object)
    let mut present: HashMap<(u64, u32), (u32, u64)> = HashMap::new();
    scan::for_each_object_page(store, layout, |page| {
        for o in page {
            report.objects += 1;
            if let Some((id, index, len)) = layout.parse_key(&o.key) {
                present.insert((id, index), (len, o.size));
            }
        }
        progress(&report);
    })
    .await?;
    // Referenced slices come in id order, a page at a time: nothing proportional to the
    // volume is held besides the listing.
    let mut after = 0;
    loop {
        let page = meta.referenced_slices(after, scan::SLICE_PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for SliceRef { id, size, ino } in page {
            report.slices += 1;
            let blocks = size.div_ceil(layout.block_size());
            for index in 0..blocks {
                report.blocks += 1;
                let len = layout.block_len(size, index);
                let key = layout.block_key(id, index, len);
                match present.get(&(id, index)) {
                    Some(&(l, actual)) if l == len && actual == len as u64 => {}
                    Some(&(l, actual)) if l == len => report
                        .wrong_size
                        .push(format!("{key}: {actual} bytes, expected {len}")),
                    _ => match store.head(&key).await {
                        Ok(actual) if actual == len as u64 => {}
                        Ok(actual) => report
                            .wrong_size
                            .push(format!("{key}: {actual} bytes, expected {len}")),
                        Err(StoreError::NotFound(_)) if staged.contains(&key) => {
                            report.staged += 1;
                        }
                        Err(StoreError::NotFound(_)) => {
                            if still_referenced(meta, id)? {
                                report
                                    .missing
                                    .push(format!("{key} (slice {id} of inode {ino})"));
                            }
                        }
                        Err(e) => return Err(e.into()),
                    },
                }
            }
            if report.slices % 10_000 == 0 {
                progress(&report);
            }
        }
    }
    progress(&report);
    Ok(report)
}

fn still_referenced(meta: &dyn Meta, id: u64) -> Result<bool, ScanError> {
    Ok(meta
        .referenced_slices(id - 1, 1)?
        .first()
        .is_some_and(|s| s.id == id))
}
