//! Error types of the store's own API. Errors of the data path are
//! [`bw_types::IoError`], which crosses the block-device seam.

use std::io;
use std::path::PathBuf;

/// A failure of a volume-file primitive ([`crate::create_volume_file`] and friends) or of
/// opening a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeFileError {
    #[error("volume file {path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("{name:?} is not a plain file name (no '/', no leading '.', not empty)")]
    BadName { name: String },
    #[error("volume file {path} is {current} bytes; it cannot shrink to {requested} bytes")]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
    #[error("cannot {action} {path}")]
    Io {
        /// What we were doing, as a verb phrase ("create", "fsync directory", ...).
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl VolumeFileError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| VolumeFileError::Io {
            action,
            path,
            source,
        }
    }
}

/// A refused [`crate::LocalVolume::set_size`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    #[error("a volume cannot shrink (from {current} to {requested} bytes)")]
    Shrink { current: u64, requested: u64 },
    #[error("{requested} bytes is larger than the largest volume ({max} bytes)")]
    TooLarge { requested: u64, max: u64 },
}
