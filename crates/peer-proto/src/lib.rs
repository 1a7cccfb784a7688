//! The blockwarden peer protocol: how an attachment reads and writes a replica on another
//! node (remote attach, C2), and later how replicas are fed and resynced (C3). A codec
//! without I/O: parsers take byte slices, encoders append to `Vec<u8>`.
//!
//! - [`consts`]: magics, versions, the message-type registry, flags and the named limits.
//! - [`handshake`]: the client's [`Hello`] (version range, node id, volume id, generation)
//!   and the server's [`Accept`] or [`Refuse`] ([`RefuseCode`]).
//! - [`frame`]: the 36-byte [`FrameHeader`] of every later frame, [`Request`] (READ, WRITE,
//!   FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, PING, READ_META, WRITE_META) and its mapping to
//!   [`bw_types::IoRequest`]; [`RequestError`] for well-framed requests that cannot run.
//! - [`reply`]: [`ReplyHead`] (OK, DATA, EXTENTS, ERROR, FENCED, PONG, META), their encoders, and
//!   [`ErrorCode`], the error that crosses the wire, mapped onto [`bw_types::IoError`].
//! - [`ProtoError`]: broken framing, after which the connection is closed.
//!
//! Data flow: a connection reads bytes into a buffer and calls a `parse_*` function, which
//! returns `Ok(Some((message, consumed)))`, `Ok(None)` when more bytes are needed, or `Err`
//! when the bytes can never become a valid message. `docs/design/peer-protocol.md` has the
//! byte diagrams, the limits and what happens when each is hit, and the fencing argument.
//!
//! # Version history
//!
//! The version is negotiated in the handshake: the client offers `[min, max]`, the server
//! answers with the highest version both speak, or refuses with `VersionUnsupported` and
//! its own range. The 16-byte handshake prefix is frozen; later versions only append fields
//! to handshake bodies and add message types, flags and feature bits. The golden-byte tests
//! (`golden_tests.rs`) pin the bytes of every released version and are never edited to pass.
//!
//! - **v1** (blockwarden 0.2, C2 remote attach): hello with generation, features (none
//!   defined), node id, volume id; accept with size, highest generation, features and the
//!   server's limits; refuse with code, version range, highest generation and message.
//!   Requests READ, WRITE (+FUA), FLUSH, TRIM (+FUA), WRITE_ZEROES (+FUA, MAY_PUNCH),
//!   BLOCK_STATUS, PING; replies OK, DATA, EXTENTS, ERROR, FENCED, PONG. Request types
//!   0x0100–0x01ff reserved for replication (C3).
//! - **v2** (blockwarden C3, synchronous replication): the hello appends `session` (u64)
//!   when its `max_version` ≥ 2; refusal code 7 `StaleSession` (v2 clients only);
//!   requests READ_META (0x0100) and WRITE_META (0x0101, body ≤ 16 MiB) with reply META
//!   (0x8007, flag PRESENT). Everything of v1 unchanged; a v2 server still speaks v1.

pub mod consts;
mod error;
pub mod frame;
pub mod handshake;
pub mod reply;
mod wire;

#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod malformed_tests;

pub use error::ProtoError;
pub use frame::{parse_frame, parse_frame_header, FrameHeader, Request, RequestError};
pub use handshake::{
    choose_version, encode_accept, encode_hello, encode_refuse, parse_hello, parse_server_answer,
    Accept, Hello, Refuse, RefuseCode, ServerAnswer,
};
pub use reply::{
    data_header, encode_error, encode_extents, encode_fenced, encode_io_error, encode_ok,
    encode_pong, meta_header, parse_extents, parse_message, ErrorCode, ReplyHead,
};

/// Result of every parser: `Ok(Some((message, bytes consumed)))`, `Ok(None)` if the input
/// ends before the message does, `Err` if the input can never become a valid message.
pub type Parsed<T> = Result<Option<(T, usize)>, ProtoError>;
