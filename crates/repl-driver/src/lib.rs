//! The async driver of the replication core for one attached volume: it runs a
//! [`replication::Replicator`] in one tokio task and performs its effects against replica
//! sessions, the catalog and the clock, behind a [`bw_types::BlockDevice`]
//! ([`ReplicatedDevice`]) that the NBD server and the agent use like a local volume.
//!
//! It knows nothing of the agent or the network: replicas come in through [`Connector`] /
//! [`Leg`] (local store replica or remote peer session), the catalog through
//! [`CatalogPort`], the lease as a `watch::Receiver<bool>`.
//!
//! ```text
//!  NBD ─IoRequest─▶ ReplicatedDevice ─Msg─▶ event loop ─Event─▶ Replicator
//!                                            │  ▲                   │ Effect
//!     Leg::device().submit ◀─ SendWrite/Flush/Read ◀────────────────┤
//!     Leg::write_meta      ◀─ PersistMeta (whole blob, every session)│
//!     CatalogPort::txn     ◀─ CatalogTxn                             │
//!     copy task (read src, write dst) ◀─ CopyRegion                  │
//!     IoDone (client)      ◀─ Reply                                  ┘
//!     completions, leg closed, reconnects, ticks, lease ──Msg──▶ event loop
//! ```
//!
//! - `ports`: the traits adapters implement, and [`ReplicaSpec`].
//! - `meta`: the metadata blob ([`MetaState`], format in its docs and in
//!   `docs/design/replication.md`, "Metadata blob").
//! - `start`: [`start`], the takeover (connect, read blobs, build the core).
//! - `device`: [`ReplicatedDevice`], options, status, errors.
//! - `driver`: the event loop (client requests, sessions and metadata, copies and the
//!   resync rate limiter).

mod device;
mod driver;
pub mod meta;
mod ports;
mod start;

pub use crate::device::{
    DriverOptions, DriverStatus, ReplicaDriverStatus, ReplicatedDevice, StartError, StopReason,
    DEFAULT_RECONNECT_INTERVAL, DEFAULT_REQUEST_TIMEOUT,
};
pub use crate::driver::{
    BULK_CHUNKS_IN_FLIGHT, BULK_CHUNK_REGIONS, COPY_CHUNK_BYTES, RATE_WINDOW, TICK,
};
pub use crate::meta::{MetaError, MetaState, META_FORMAT_VERSION};
pub use crate::ports::{BoxFut, CatalogPort, ConnectError, Connector, Leg, LegError, ReplicaSpec};
pub use crate::start::start;
