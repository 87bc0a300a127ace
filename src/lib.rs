//! tidefs: a POSIX filesystem whose data lives in an object store and whose metadata lives in
//! a transactional engine.
//!
//! Layers, each behind a narrow interface:
//! - [`object`]: the [`object::ObjectStore`] trait and its stores;
//! - [`layout`] and [`slices`]: how file bytes map to chunks, slices and block objects;
//! - [`data`]: write buffering, uploads, commits and reads;
//! - [`vfs`]: the filesystem the FUSE adapter (`tidefs-fuse`) calls;
//! - [`volume`]: formatting and opening volumes, the default volume;
//! - [`objbench`]: measuring an object store.

pub mod closing;
pub mod compact;
pub mod control;
pub mod data;
pub mod error;
pub mod exporter;
pub mod fsck;
pub mod gc;
pub mod inflight;
pub mod layout;
pub mod objbench;
pub mod object;
pub mod perm;
pub mod readahead;
pub mod scan;
pub mod secret;
pub mod session;
pub mod slices;
pub mod vfs;
pub mod volume;
pub mod warmup;
