//! The catalog: blockwarden's metadata store (volumes, nodes, events).
//!
//! - [`kv`]: the seam. Keys carry a revision (etcd's `mod_revision`); every mutation is a
//!   compare-and-swap transaction of (key, expected revision, change) triples; typed helpers
//!   (`get_volume`, `put_volume`, …) are provided on top of the primitives.
//! - [`records`]: the JSON records stored under the keys (`volumes/<name>`, `nodes/<id>`,
//!   `events/<seq>`).
//! - [`embedded`]: the single-node backend on a redb file (ACID, fsync on commit).
//! - [`follow`]: history-then-live event streaming for `events --follow`.
//! - [`testing`]: the contract suite every backend runs.
//!
//! Data flow: agent → `Catalog::txn` (CAS) → backend commit → (events) broadcast →
//! `follow_events` → API stream. See `docs/design/catalog.md`.

pub mod embedded;
pub mod follow;
pub mod kv;
pub mod records;
pub mod testing;

pub use embedded::{
    EmbeddedCatalog, DEFAULT_EVENT_RETENTION, EVENT_CHANNEL_CAPACITY, SCHEMA_VERSION,
};
pub use follow::follow_events;
pub use kv::{Catalog, CatalogError, Change, Expect, Key, Prefix, Revision, TxnOp};
pub use records::{
    now_ms, Attachment, EventRecord, Level, Mode, NewEvent, NodeRecord, ReplicaRecord,
    ReplicaState, VolumeRecord, VolumeState,
};
