//! An NBD server over the [`bw_types::BlockDevice`] seam.
//!
//! - [`listener`]: [`serve_tcp`] / [`serve_unix`]: accept loop, connection limit, shutdown.
//! - `conn`: one connection's life: handshake, then transmission; kill and shutdown.
//! - `handshake`: option haggling (LIST, INFO, GO, EXPORT_NAME, STRUCTURED_REPLY, meta
//!   contexts) against the embedding process's [`Exports`].
//! - `transmission`: the reader: parse → check → `BlockDevice::submit` with a completion that
//!   builds the reply; in-flight limits ([`MAX_INFLIGHT_REQUESTS`], [`MAX_INFLIGHT_BYTES`]).
//! - `writer`: the writer task: drains all queued replies into one vectored write.
//! - `framed`: buffered frame reading (many requests per syscall, big payloads direct).
//! - [`exports`]: what the embedding process provides ([`Exports`], [`OpenExport`]).
//! - [`stats`]: server-wide counters ([`ServerStats`]) in the Prometheus text format.
//!
//! Data flow of one request:
//!
//! ```text
//! socket → FrameReader → Reader::check → BlockDevice::submit ─┐ (any thread, any order)
//! socket ← write_loop (vectored, batched) ← mpsc ← completion ┘
//! ```
//!
//! The wire format lives in the `nbd-proto` crate; `docs/design/nbd.md` describes the
//! protocol subset, limits and error mapping.

mod conn;
pub mod exports;
mod framed;
mod handshake;
pub mod listener;
pub mod stats;
mod transmission;
mod writer;

pub use conn::HANDSHAKE_TIMEOUT;
pub use exports::{ExportInfo, Exports, OpenError, OpenExport};
pub use framed::READ_BUFFER_LEN;
pub use listener::{serve_tcp, serve_unix, MAX_CONNECTIONS, SHUTDOWN_GRACE};
pub use stats::ServerStats;
pub use transmission::{MAX_INFLIGHT_BYTES, MAX_INFLIGHT_REQUESTS};
