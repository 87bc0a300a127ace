//! Errors of metadata operations, each with the errno it stands for.

/// Result of a metadata operation.
pub type Result<T> = std::result::Result<T, MetaError>;

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// No such file, directory or attribute target (ENOENT).
    #[error("no such file or directory")]
    NotFound,
    /// The name exists already (EEXIST).
    #[error("file exists")]
    Exists,
    /// The directory is not empty (ENOTEMPTY).
    #[error("directory not empty")]
    NotEmpty,
    /// A directory was needed (ENOTDIR).
    #[error("not a directory")]
    NotDir,
    /// A non-directory was needed (EISDIR).
    #[error("is a directory")]
    IsDir,
    /// The operation is not permitted (EPERM).
    #[error("operation not permitted")]
    NotPermitted,
    /// Invalid argument, such as renaming a directory into itself (EINVAL).
    #[error("invalid argument")]
    Invalid,
    /// A name or value is too long (ENAMETOOLONG).
    #[error("name too long")]
    NameTooLong,
    /// No such extended attribute (ENODATA).
    #[error("no such attribute")]
    NoData,
    /// A value is too large (E2BIG / ERANGE).
    #[error("argument list too long")]
    TooBig,
    /// Too many links (EMLINK).
    #[error("too many links")]
    TooManyLinks,
    /// The volume is out of space or inodes (ENOSPC).
    #[error("no space left on volume")]
    NoSpace,
    /// File too large (EFBIG).
    #[error("file too large")]
    FileTooLarge,
    /// Operation not supported (EOPNOTSUPP).
    #[error("operation not supported")]
    NotSupported,
    /// The volume has not been formatted.
    #[error("volume is not formatted")]
    NotFormatted,
    /// The volume is formatted with other settings.
    #[error("volume is already formatted with other settings: {0}")]
    FormatMismatch(String),
    /// The engine's storage failed; the operation had no effect (EIO).
    #[error("metadata engine error: {0}")]
    Engine(String),
}

impl MetaError {
    /// The errno this error stands for at the system-call boundary.
    pub fn errno(&self) -> i32 {
        match self {
            MetaError::NotFound => libc::ENOENT,
            MetaError::Exists => libc::EEXIST,
            MetaError::NotEmpty => libc::ENOTEMPTY,
            MetaError::NotDir => libc::ENOTDIR,
            MetaError::IsDir => libc::EISDIR,
            MetaError::NotPermitted => libc::EPERM,
            MetaError::Invalid => libc::EINVAL,
            MetaError::NameTooLong => libc::ENAMETOOLONG,
            MetaError::NoData => libc::ENODATA,
            MetaError::TooBig => libc::E2BIG,
            MetaError::TooManyLinks => libc::EMLINK,
            MetaError::NoSpace => libc::ENOSPC,
            MetaError::FileTooLarge => libc::EFBIG,
            MetaError::NotSupported => libc::EOPNOTSUPP,
            MetaError::NotFormatted | MetaError::FormatMismatch(_) | MetaError::Engine(_) => {
                libc::EIO
            }
        }
    }
}

impl From<rusqlite::Error> for MetaError {
    fn from(e: rusqlite::Error) -> Self {
        MetaError::Engine(e.to_string())
    }
}
