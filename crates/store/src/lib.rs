//! One replica of a volume on local disk.
//!
//! Parts, from the bottom up:
//!
//! - [`backend`]: the storage seam [`Backend`] (`read_at`, `write_at`, `punch_hole`,
//!   `zero_range`, `sync_data`, `SEEK_DATA`/`SEEK_HOLE`, optional non-blocking fast paths)
//!   and [`FileBackend`], a sparse file used through the page cache.
//! - [`testing`]: backends that inject I/O errors ([`testing::FaultyBackend`]) or lose
//!   un-synced writes on a simulated crash ([`testing::VolatileBackend`]).
//! - `volume` and `ops`: [`LocalVolume`], which implements [`bw_types::BlockDevice`]: page-cache
//!   hits are served inline in `submit`, the rest on a small pool of I/O threads (`pool`);
//!   flushes and FUA writes share coalesced `fdatasync`s (`flush`); any failed write or sync
//!   faults the volume for good (fail-stop).
//! - [`replica`]: [`Replica`], a `LocalVolume` behind a durable generation fence (the
//!   highest generation seen, in `<volume file>.meta`): older attachments are refused on
//!   every path, peer protocol and local ([`ReplicaDevice`]) alike; plus a session floor
//!   per generation, so a newer session of one attachment fences its older sessions.
//! - [`repl_meta`]: the replica's replication-metadata area (`<volume file>.repl`), one
//!   opaque blob written durably in place (two slots) and fenced like data
//!   ([`Replica::write_repl_meta`]).
//! - `meta_file`, `crc`: atomic replacement of the generation record, and checksums.
//! - `files`: crash-safe primitives for volume files ([`create_volume_file`],
//!   [`grow_volume_file`], [`remove_volume_file`], [`fsync_dir`]).
//!
//! Data flow: NBD server → `LocalVolume::submit` → (inline fast path | I/O thread) →
//! `Backend` → completion callback → NBD reply. `docs/design/storage.md` gives the on-disk
//! layout, the fsync ordering and the crash analysis.

pub mod backend;
mod crc;
mod error;
mod files;
mod flush;
mod meta_file;
mod ops;
mod pool;
pub mod repl_meta;
pub mod replica;
pub mod testing;
mod volume;

pub use backend::{Backend, FastPath, FileBackend, ZERO_FALLBACK_CHUNK_BYTES};
pub use error::{ResizeError, VolumeFileError};
pub use files::{
    create_volume_file, fsync_dir, grow_volume_file, remove_temp_files, remove_volume_file,
    TEMP_SUFFIX,
};
pub use pool::{MAX_QUEUED_JOBS, WORKER_IDLE_EXIT};
pub use repl_meta::{
    default_repl_meta_path, ReplMetaError, MAX_REPL_META_BYTES, REPL_META_HEADER_LEN,
    REPL_META_SUFFIX,
};
pub use replica::{
    default_meta_path, AdmitError, AdvanceCallback, Fenced, InFlight, Replica, ReplicaDevice,
    ReplicaError, ReplicaOptions, ADMIT_DRAIN_TIMEOUT, META_LEN, META_SUFFIX,
};
pub use volume::{
    ErrorCallback, LocalVolume, VolumeErrorEvent, VolumeOptions, VolumeStats, DEFAULT_IO_WORKERS,
    MAX_BLOCK_STATUS_EXTENTS, MAX_READ_BYTES, MAX_VOLUME_BYTES,
};
