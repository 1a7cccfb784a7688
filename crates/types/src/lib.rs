//! Shared vocabulary of blockwarden.
//!
//! - [`name`]: validated names of volumes and nodes (`[a-z0-9][a-z0-9._-]{0,62}`).
//! - [`size`]: byte sizes as operators type them (`10G`, `512K`, `4096`) and print them.
//! - [`ids`]: newtypes for ids and generations.
//! - [`metrics`]: per-volume I/O counters and latency histograms (Prometheus text).
//! - [`bufpool`]: a bounded process-wide pool of large data buffers (WRITE payloads, READ
//!   replies), so bulk I/O does not fault in fresh memory per request.
//! - [`databuf`]: [`DataBuf`], a write payload shared by every replica's leg without copies.
//! - [`blockdev`]: the seam between a front end (the NBD server) and a volume's data path:
//!   requests go in through [`blockdev::BlockDevice::submit`], completions come back through
//!   a callback, so a local volume can finish inline and a replicated one when every replica
//!   answered, without either side knowing the other's threading.

pub mod blockdev;
pub mod bufpool;
pub mod databuf;
pub mod ids;
pub mod metrics;
pub mod name;
pub mod size;

pub use blockdev::{BlockDevice, Extent, IoDone, IoError, IoKind, IoReply, IoRequest};
pub use databuf::DataBuf;
pub use ids::{Generation, NodeId, VolumeId};
pub use metrics::IoMetrics;
pub use name::{Name, NameError};
pub use size::{format_size, parse_size, SizeError};
