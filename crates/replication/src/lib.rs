//! The synchronous-replication core of one attached volume (C3), as a plain state machine.
//!
//! Events go in ([`Event`]: client requests, replica replies, connections up and down,
//! catalog answers, metadata persisted, ticks), effects come out ([`Effect`]: send to a
//! replica, reply to the client, persist metadata, run a catalog transaction, copy a region,
//! notify, stop). No I/O, no clock, no randomness: a thin async driver performs the effects,
//! and the seeded simulation in [`sim`] runs the same code against simulated replicas, a
//! catalog and faults. The rules and their arguments are in `docs/design/replication.md`.
//!
//! ```text
//!  driver ──Event──▶ Replicator::apply ──▶ handler (records the fact)
//!                                           │
//!                                           ▼
//!                                    pump: advance_phase → dispatch writes/flushes/reads
//!                                          → schedule copies → advance joins
//!                                          → complete requests (the ack rules)
//!  driver ◀──Effect── out ◀─────────────────┘        + PersistMeta (one batch at a time)
//! ```
//!
//! - `ids`: newtypes (`ReplicaId`, `RequestId`, `RegionIndex`, `OpId`, `SessionId`, …)
//!   and byte-range/region arithmetic.
//! - `config`: [`Config`] with named limits and defaults, [`Rules`] (every safety rule,
//!   switchable only so the simulation can prove its checkers catch a broken one), and
//!   [`AttachInit`] (catalog and persisted metadata at attach time).
//! - `io`: the [`Event`] and [`Effect`] vocabulary.
//! - `replica`: per-replica membership (what the catalog may believe), link and dirty
//!   regions; [`ReplicaState`] is the public view.
//! - `activity_log`: which regions may differ after a crash, and the ordered queue of
//!   metadata batches.
//! - `core`: [`Replicator`]; `requests.rs` (data path and ack rules), `membership.rs`
//!   (failures, catalog transactions, rejoin), `copy.rs` (reconciliation and resync).
//! - `sim`: the seeded simulation (replicas with volatile caches, catalog, metadata
//!   store, network, client model, faults) and its checkers for G1, G2, G4 and G5.

pub mod config;
pub mod ids;
pub mod io;
pub mod sim;

mod activity_log;
mod core;
mod replica;

pub use crate::config::{AttachInit, Config, ReplicaInit, Rules};
pub use crate::core::{LogDrain, Replicator, Status};
pub use crate::ids::{
    ByteRange, CopyId, DataHandle, MetaBatchId, OpId, RegionIndex, RegionSet, ReplicaId, RequestId,
    SessionId, TxnId,
};
pub use crate::io::{
    CatalogOp, Completion, CopyPurpose, Effect, Event, MetaBatch, Notice, ReplicaOutcome,
    RequestError, StopReason, TxnOutcome,
};
pub use crate::replica::{ReplicaState, ReplicaStatus};
