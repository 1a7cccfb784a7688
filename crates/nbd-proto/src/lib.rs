//! The NBD wire protocol (the subset blockwarden serves), as a codec without I/O.
//!
//! - [`consts`]: magics, flags, option/reply/info/command numbers, error values, and the
//!   named limits we enforce (option size, payload size, extent count).
//! - [`handshake`]: the server side of fixed-newstyle negotiation: greeting, client flags,
//!   options parsed into [`OptionRequest`], and encoders for every option reply.
//! - [`transmission`]: the 28-byte [`RequestHeader`] parser and the reply encoders (simple
//!   replies, structured chunks: `OFFSET_DATA`, `NONE`, `BLOCK_STATUS`, `ERROR`).
//! - [`client`]: the client half (encoders for client messages, parsers for server
//!   messages), for tests, fuzzing and tools.
//! - [`ProtoError`]: framing errors after which the byte stream cannot be trusted.
//!
//! Data flow: the server's connection reads bytes into a buffer and calls a `parse_*`
//! function, which returns `Ok(Some((message, consumed)))`, `Ok(None)` when more bytes are
//! needed, or `Err` for a broken frame. Replies are encoded into a `Vec<u8>` (or a fixed
//! array for headers that precede a large data buffer) and written by the connection.
//!
//! # Wire format version history
//!
//! The format is the NBD standard (`doc/proto.md` of NetworkBlockDevice/nbd); this list
//! records which subset we speak, so a change to it is a deliberate, reviewed event. The
//! golden-byte tests in `golden_tests.rs` pin the bytes and must never be edited to pass.
//!
//! - **v1** (blockwarden 0.1): fixed newstyle only (no oldstyle, no TLS); options
//!   EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT
//!   (`base:allocation` only); info EXPORT, NAME, DESCRIPTION, BLOCK_SIZE (1 / 4096 /
//!   32 MiB); compact (non-extended) headers; commands READ, WRITE, DISC, FLUSH, TRIM,
//!   WRITE_ZEROES, BLOCK_STATUS; flags FUA, NO_HOLE, DF, REQ_ONE; transmission flags
//!   HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN and
//!   SEND_DF (with structured replies).

pub mod client;
pub mod consts;
mod error;
pub mod handshake;
pub mod transmission;

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod smoke_tests;

pub use error::ProtoError;
pub use handshake::{ClientFlags, InfoRequest, MetaRequest, OptionBody, OptionRequest};
pub use transmission::{BlockDescriptor, Command, RequestHeader};

/// Result of every parser: `Ok(Some((message, bytes consumed)))`, `Ok(None)` if the input
/// ends before the message does, `Err` if the input can never become a valid message.
pub type Parsed<T> = Result<Option<(T, usize)>, ProtoError>;
