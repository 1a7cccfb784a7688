//! The catalog: blockwarden's metadata store (volumes, nodes, events).
//!
//! - [`kv`]: the seam. Keys carry a revision (etcd's `mod_revision`); every mutation is a
//!   compare-and-swap transaction of (key, expected revision, change) triples; typed helpers
//!   (`get_volume`, `put_volume`, …) are provided on top of the primitives.
//! - [`records`]: the JSON records stored under the keys (`volumes/<name>`, `nodes/<id>`,
//!   `events/<seq>`).
//! - [`lease`]: leases, lease-bound ownership (`owners/<volume>`, whose creation revision is
//!   the volume's generation) and liveness keys, and prefix watches: the `ClusterStore` trait
//!   cluster mode runs on.
//! - [`embedded`]: the single-node backend on a redb file (ACID, fsync on commit), with
//!   in-memory leases.
//! - [`etcd`]: the cluster backend over etcd's v3 HTTP/JSON gateway, with endpoint failover.
//! - [`follow`]: history-then-live event streaming for `events --follow`.
//! - [`testing`]: the contract suites every backend runs, and a throwaway etcd for tests.
//!
//! Data flow: agent → `Catalog::txn` (CAS) → backend commit → (events) broadcast →
//! `follow_events` → API stream. In cluster mode: agent → `ClusterStore::grant` /
//! `keep_alive` (its session lease) → `acquire_owner` (one etcd txn → generation) and
//! `watch_prefix` (etcd watch → membership and ownership changes from every node).
//! See `docs/design/catalog.md` and `docs/design/control-plane.md`.

pub mod embedded;
pub mod etcd;
pub mod follow;
pub mod kv;
pub mod lease;
pub mod records;
pub mod testing;

pub use embedded::{
    EmbeddedCatalog, DEFAULT_EVENT_RETENTION, EVENT_CHANNEL_CAPACITY, SCHEMA_VERSION,
};
pub use etcd::{EtcdCatalog, EtcdOptions};
pub use follow::follow_events;
pub use kv::{Catalog, CatalogError, Change, Expect, Key, Prefix, Revision, Rows, TxnOp};
pub use lease::{
    keepalive_interval, Acquired, AliveRecord, ClusterStore, Held, Lease, LeaseId, OwnerRecord,
    WatchEvent, DEFAULT_LEASE_TTL,
};
pub use records::{
    now_ms, Attachment, EventRecord, Level, Mode, NewEvent, NodeRecord, ReplicaRecord,
    ReplicaReport, ReplicaState, VolumeRecord, VolumeState,
};
