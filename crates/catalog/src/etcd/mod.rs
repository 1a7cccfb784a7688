//! The cluster backend: the catalog, leases and watches on etcd (v3 API, 3.4+).
//!
//! We speak etcd's HTTP/JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/lease/*`,
//! `/v3/watch`) over plain HTTP/1.1 with the workspace's hyper, not gRPC: the gRPC client
//! crates need protoc and minutes of build time on small machines, and every call we make
//! maps onto one JSON request. Keys and values travel base64-encoded, int64s as strings.
//!
//! - [`transport`]: endpoints, failover, the per-endpoint deadline, "require leader", and the
//!   `cluster store unavailable` error.
//! - [`wire`] and `b64`: the JSON shapes of requests and responses.
//! - `store`: `EtcdCatalog` and the `Catalog` primitives; `txn` maps a `TxnOp` list onto
//!   one etcd `Txn`; `events` sequences events with a counter key; `leases` implements
//!   `ClusterStore`; `watch` follows a prefix over the streaming watch endpoint.
//!
//! Layout of the keys under the prefix: `docs/design/catalog.md`, "etcd backend".

mod b64;
mod events;
mod leases;
mod store;
pub mod transport;
mod txn;
mod watch;
pub mod wire;

pub use events::{APPEND_ATTEMPTS, EVENT_COUNTER_KEY};
pub use store::{EtcdCatalog, EtcdOptions};
pub use transport::{DEFAULT_CALL_DEADLINE, DEFAULT_ENDPOINT_DEADLINE, MAX_RESPONSE_BYTES};
pub use watch::WATCH_RETRY_DELAY;
