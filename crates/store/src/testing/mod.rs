//! Backends and helpers for tests, here and in other crates: fault injection and crash
//! simulation *below* the storage seam, so the logic above it (fail-stop, flush coalescing,
//! crash consistency) is tested without a broken disk.
//!
//! - [`FaultyBackend`] wraps any backend and fails reads, writes, deallocations or syncs
//!   after N calls, once or for good, with the `errno` you choose (EIO, ENOSPC, ...).
//! - [`VolatileBackend`] is an in-memory disk with a volatile cache that can
//!   [`crash`](VolatileBackend::crash).
//! - [`TempDir`] is a uniquely named scratch directory removed on drop.

mod faulty;
mod volatile;

pub use faulty::{FaultOp, FaultRule, FaultyBackend};
pub use volatile::{VolatileBackend, VOLATILE_PAGE_BYTES};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory under the system temp dir, removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/store-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> std::io::Result<TempDir> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("store-{label}-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
