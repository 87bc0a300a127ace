//! Errors of the filesystem core, each standing for one errno at the FUSE edge.

use crate::object::StoreError;
use tidefs_meta::MetaError;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A metadata operation failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// An object-store call failed (EIO).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing data failed (EIO).
    #[error("data error: {0}")]
    Data(String),
    /// A request the filesystem refuses, with the errno to return.
    #[error("{msg}")]
    Refused {
        /// The errno.
        errno: i32,
        /// Why.
        msg: &'static str,
    },
}

impl FsError {
    /// A refusal with `errno`.
    pub fn refused(errno: i32, msg: &'static str) -> Self {
        FsError::Refused { errno, msg }
    }
}

impl tidefs_fuse::ToErrno for FsError {
    fn errno(&self) -> i32 {
        match self {
            FsError::Meta(e) => e.errno(),
            FsError::Store(_) | FsError::Data(_) => libc::EIO,
            FsError::Refused { errno, .. } => *errno,
        }
    }
}
