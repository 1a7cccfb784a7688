//! The peer protocol over TCP: the server that exposes this node's replicas to other nodes,
//! and [`RemoteReplica`], the client that makes a replica on another node look like a local
//! [`bw_types::BlockDevice`] (remote attach).
//!
//! - [`server`]: [`serve`] (accept loop, connection limit, shutdown) and what the agent
//!   provides ([`ReplicaProvider`]).
//! - `server_conn`: one connection's handshake: hello → [`ReplicaProvider::open`] →
//!   [`store::Replica::admit_session`] → accept or refuse with a clear reason.
//! - `server_tx`: the transmission reader: parse → generation and session check
//!   ([`store::Replica::enter_session`]) → `LocalVolume::submit` with a completion that
//!   queues the reply (replication-metadata requests: a blocking thread); in-flight limits
//!   ([`MAX_INFLIGHT_REQUESTS`], [`MAX_INFLIGHT_BYTES`]).
//! - [`client`]: [`RemoteReplica::connect`] and the `BlockDevice` implementation;
//!   `client_conn`: the waiting-request tables, reader/writer/watchdog tasks, the failure
//!   path.
//! - `writer`: the batching, vectored writer task both sides use; `framed`: buffered frame
//!   reading (large bodies read straight into their own buffer).
//! - [`stats`]: server counters ([`PeerStats`]) in the Prometheus text format.
//!
//! Data flow of one remote request:
//!
//! ```text
//! NBD reader → RemoteReplica::submit → queue → client writer ──TCP──▶ server reader
//!   → Replica::enter (fence) → LocalVolume::submit ─┐ (any thread, any order)
//! server writer (batched) ◀── completion ◀─────────┘
//!   ──TCP──▶ client reader → waiting[id] → the NBD completion
//! ```
//!
//! The wire format is the `peer-proto` crate; `docs/design/peer-protocol.md` covers the
//! protocol, its limits, and why fencing here is safe together with lease self-fencing.

pub mod client;
mod client_conn;
mod framed;
pub mod server;
mod server_conn;
mod server_tx;
pub mod stats;
mod writer;

pub use client::{
    ConnectError, ConnectOptions, MetaError, PeerState, RemoteReplica, StateCallback,
    DEFAULT_CONNECTIONS, DEFAULT_CONNECT_TIMEOUT, DEFAULT_PING_INTERVAL, DEFAULT_REQUEST_TIMEOUT,
    MAX_CONNECTIONS_PER_REPLICA,
};
pub use framed::READ_BUFFER_LEN;
pub use server::{serve, ProviderError, ReplicaProvider, MAX_CONNECTIONS, SHUTDOWN_GRACE};
pub use server_conn::HANDSHAKE_TIMEOUT;
pub use server_tx::{MAX_INFLIGHT_BYTES, MAX_INFLIGHT_REQUESTS};
pub use stats::PeerStats;
