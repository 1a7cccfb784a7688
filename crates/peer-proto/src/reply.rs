//! Replies (server → client) and the error codes that cross the wire.
//!
//! ```text
//! OK       type 0x8001  body: none
//! DATA     type 0x8002  body: the bytes read (exactly the requested length)
//! EXTENTS  type 0x8003  body: n × [length(8) flags(4) reserved(4)], 1 ≤ n ≤ MAX_EXTENTS
//! ERROR    type 0x8004  header.length = error code; body: UTF-8 message
//! FENCED   type 0x8005  header.offset = the replica's highest generation; body: message
//! PONG     type 0x8006  body: none
//! META     type 0x8007  (v2) flag PRESENT: body = the blob (maybe empty); clear: none, no body
//! ```
//!
//! An ERROR or FENCED reply with id 0 ([`CONNECTION_ID`]) is about the whole connection:
//! the server sends it right before closing (protocol error, shutdown).

use bw_types::{Extent, Generation, IoError};

use crate::consts::*;
use crate::error::ProtoError;
use crate::frame::FrameHeader;
use crate::wire::truncate_str;

/// The error codes of ERROR replies. Each maps onto one [`IoError`] variant; fencing has
/// its own reply type (FENCED) because the client must react to it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Io,
    NoSpace,
    OutOfRange,
    Invalid,
    Faulted,
    Unsupported,
    ShuttingDown,
    /// Connection-level: the client broke framing; the server closes the connection.
    Protocol,
    /// A code this build does not know (a newer peer); treated as an I/O error.
    Unknown(u16),
}

impl ErrorCode {
    pub fn to_wire(self) -> u16 {
        match self {
            ErrorCode::Io => 1,
            ErrorCode::NoSpace => 2,
            ErrorCode::OutOfRange => 3,
            ErrorCode::Invalid => 4,
            ErrorCode::Faulted => 5,
            ErrorCode::Unsupported => 6,
            ErrorCode::ShuttingDown => 7,
            ErrorCode::Protocol => 8,
            ErrorCode::Unknown(c) => c,
        }
    }

    pub fn from_wire(c: u16) -> ErrorCode {
        match c {
            1 => ErrorCode::Io,
            2 => ErrorCode::NoSpace,
            3 => ErrorCode::OutOfRange,
            4 => ErrorCode::Invalid,
            5 => ErrorCode::Faulted,
            6 => ErrorCode::Unsupported,
            7 => ErrorCode::ShuttingDown,
            8 => ErrorCode::Protocol,
            c => ErrorCode::Unknown(c),
        }
    }

    /// The code for a device error (exhaustive: a new `IoError` variant must pick one).
    pub fn from_io(e: &IoError) -> ErrorCode {
        match e {
            IoError::Io(_) => ErrorCode::Io,
            IoError::NoSpace => ErrorCode::NoSpace,
            IoError::OutOfRange => ErrorCode::OutOfRange,
            IoError::Invalid(_) => ErrorCode::Invalid,
            IoError::Faulted(_) => ErrorCode::Faulted,
            IoError::Unsupported => ErrorCode::Unsupported,
            IoError::ShuttingDown => ErrorCode::ShuttingDown,
        }
    }

    /// The device error a client reports for this code and the peer's message.
    pub fn to_io(self, message: &str) -> IoError {
        match self {
            ErrorCode::Io => IoError::Io(message.to_owned()),
            ErrorCode::NoSpace => IoError::NoSpace,
            ErrorCode::OutOfRange => IoError::OutOfRange,
            ErrorCode::Invalid => IoError::Invalid(message.to_owned()),
            ErrorCode::Faulted => IoError::Faulted(message.to_owned()),
            ErrorCode::Unsupported => IoError::Unsupported,
            ErrorCode::ShuttingDown => IoError::ShuttingDown,
            ErrorCode::Protocol => IoError::Io(format!("peer reports a protocol error: {message}")),
            ErrorCode::Unknown(c) => IoError::Io(format!("peer error code {c}: {message}")),
        }
    }
}

/// A reply decoded from its header; the body (data, extents, message) is read separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHead {
    Ok,
    /// `len` bytes of read data follow.
    Data {
        len: u32,
    },
    /// `count` extents follow ([`parse_extents`]).
    Extents {
        count: u32,
    },
    /// A message of `body_len` bytes follows ([`parse_message`]).
    Error {
        code: ErrorCode,
    },
    /// The replica admitted a newer generation; a message follows.
    Fenced {
        highest: Generation,
    },
    Pong,
    /// v2, the answer to READ_META: `present` → a blob of `len` bytes follows (maybe 0);
    /// otherwise none was ever written (and `len` is 0).
    Meta {
        present: bool,
        len: u32,
    },
}

impl ReplyHead {
    /// Decodes a reply header; anything a v1 server never sends is a fatal framing error.
    pub fn decode(h: &FrameHeader) -> Result<ReplyHead, ProtoError> {
        let no_body = |r: ReplyHead| {
            if h.body_len == 0 {
                Ok(r)
            } else {
                Err(ProtoError::Malformed {
                    what: "reply with a body where none belongs",
                })
            }
        };
        match h.kind {
            MSG_REPLY_OK => no_body(ReplyHead::Ok),
            MSG_REPLY_PONG => no_body(ReplyHead::Pong),
            MSG_REPLY_DATA => Ok(ReplyHead::Data { len: h.body_len }),
            MSG_REPLY_EXTENTS => {
                let n = h.body_len as usize / EXTENT_WIRE_LEN;
                if !(h.body_len as usize).is_multiple_of(EXTENT_WIRE_LEN)
                    || n == 0
                    || n > MAX_EXTENTS
                {
                    return Err(ProtoError::Malformed {
                        what: "extents reply length",
                    });
                }
                Ok(ReplyHead::Extents { count: n as u32 })
            }
            MSG_REPLY_ERROR | MSG_REPLY_FENCED if h.body_len as usize > MAX_MESSAGE_LEN => {
                Err(ProtoError::TooLong {
                    what: "error message",
                    len: h.body_len.into(),
                    max: MAX_MESSAGE_LEN as u64,
                })
            }
            MSG_REPLY_ERROR => {
                let code = u16::try_from(h.length).unwrap_or(u16::MAX);
                Ok(ReplyHead::Error {
                    code: ErrorCode::from_wire(code),
                })
            }
            MSG_REPLY_FENCED => Ok(ReplyHead::Fenced {
                highest: Generation(h.offset),
            }),
            MSG_REPLY_META => {
                let present = h.flags & FLAG_META_PRESENT != 0;
                if h.flags & !FLAG_META_PRESENT != 0 || (!present && h.body_len != 0) {
                    return Err(ProtoError::Malformed {
                        what: "metadata reply flags",
                    });
                }
                if h.body_len > MAX_META_BYTES {
                    return Err(ProtoError::TooLong {
                        what: "replication metadata",
                        len: h.body_len.into(),
                        max: MAX_META_BYTES.into(),
                    });
                }
                Ok(ReplyHead::Meta {
                    present,
                    len: h.body_len,
                })
            }
            other => Err(ProtoError::UnexpectedType(other)),
        }
    }
}

fn reply_header(kind: u16, id: u64, offset: u64, length: u64, body_len: usize) -> FrameHeader {
    FrameHeader {
        kind,
        flags: 0,
        body_len: body_len as u32,
        id,
        offset,
        length,
    }
}

/// Appends an OK reply.
pub fn encode_ok(out: &mut Vec<u8>, id: u64) {
    reply_header(MSG_REPLY_OK, id, 0, 0, 0).encode(out);
}

/// Appends a PONG reply.
pub fn encode_pong(out: &mut Vec<u8>, id: u64) {
    reply_header(MSG_REPLY_PONG, id, 0, 0, 0).encode(out);
}

/// The header of a DATA reply; the `len` data bytes follow it (sent from their own buffer,
/// without copying). `len` ≤ [`MAX_IO_BYTES`].
pub fn data_header(id: u64, len: u32) -> [u8; FRAME_HEADER_LEN] {
    debug_assert!(len <= MAX_IO_BYTES);
    reply_header(MSG_REPLY_DATA, id, 0, 0, len as usize).to_bytes()
}

/// The header of a META reply: `Some(len)` → a blob of `len` bytes follows it (sent from
/// its own buffer), `None` → no blob was ever written. `len` ≤ [`MAX_META_BYTES`].
pub fn meta_header(id: u64, blob_len: Option<u32>) -> [u8; FRAME_HEADER_LEN] {
    debug_assert!(blob_len.is_none_or(|l| l <= MAX_META_BYTES));
    let mut h = reply_header(MSG_REPLY_META, id, 0, 0, blob_len.unwrap_or(0) as usize);
    if blob_len.is_some() {
        h.flags = FLAG_META_PRESENT;
    }
    h.to_bytes()
}

/// Appends an EXTENTS reply; only the first [`MAX_EXTENTS`] are sent (a prefix is a valid
/// answer: the caller asks again from where it ends). `extents` must not be empty.
pub fn encode_extents(out: &mut Vec<u8>, id: u64, extents: &[Extent]) {
    debug_assert!(!extents.is_empty());
    let extents = &extents[..extents.len().min(MAX_EXTENTS)];
    let body = extents.len() * EXTENT_WIRE_LEN;
    out.reserve(FRAME_HEADER_LEN + body);
    reply_header(MSG_REPLY_EXTENTS, id, 0, 0, body).encode(out);
    for e in extents {
        let flags = if e.hole { EXTENT_HOLE } else { 0 } | if e.zero { EXTENT_ZERO } else { 0 };
        out.extend_from_slice(&e.len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
    }
}

/// Parses the body of an EXTENTS reply. Unknown flag bits are ignored (a newer server may
/// report more states); an extent of length 0 is malformed.
pub fn parse_extents(body: &[u8]) -> Result<Vec<Extent>, ProtoError> {
    if body.is_empty()
        || !body.len().is_multiple_of(EXTENT_WIRE_LEN)
        || body.len() / EXTENT_WIRE_LEN > MAX_EXTENTS
    {
        return Err(ProtoError::Malformed {
            what: "extents reply length",
        });
    }
    body.chunks_exact(EXTENT_WIRE_LEN)
        .map(|c| {
            let len = u64::from_be_bytes(c[0..8].try_into().expect("8 bytes"));
            let flags = u32::from_be_bytes(c[8..12].try_into().expect("4 bytes"));
            if len == 0 {
                return Err(ProtoError::Malformed {
                    what: "extent of length 0",
                });
            }
            Ok(Extent {
                len,
                hole: flags & EXTENT_HOLE != 0,
                zero: flags & EXTENT_ZERO != 0,
            })
        })
        .collect()
}

/// Appends an ERROR reply; the message is cut to [`MAX_MESSAGE_LEN`] bytes.
pub fn encode_error(out: &mut Vec<u8>, id: u64, code: ErrorCode, message: &str) {
    let msg = truncate_str(message, MAX_MESSAGE_LEN);
    reply_header(MSG_REPLY_ERROR, id, 0, code.to_wire().into(), msg.len()).encode(out);
    out.extend_from_slice(msg.as_bytes());
}

/// Appends the ERROR reply for a device error. Variants with a message send that message
/// alone (not their `Display`), so the client's [`ErrorCode::to_io`] rebuilds the same error.
pub fn encode_io_error(out: &mut Vec<u8>, id: u64, e: &IoError) {
    let message = match e {
        IoError::Io(m) | IoError::Invalid(m) | IoError::Faulted(m) => m.as_str(),
        _ => "",
    };
    encode_error(out, id, ErrorCode::from_io(e), message);
}

/// Appends a FENCED reply; the message is cut to [`MAX_MESSAGE_LEN`] bytes.
pub fn encode_fenced(out: &mut Vec<u8>, id: u64, highest: Generation, message: &str) {
    let msg = truncate_str(message, MAX_MESSAGE_LEN);
    reply_header(MSG_REPLY_FENCED, id, highest.0, 0, msg.len()).encode(out);
    out.extend_from_slice(msg.as_bytes());
}

/// The message of an ERROR or FENCED reply; invalid UTF-8 is replaced, not refused (the
/// message is for humans; the code already says what happened).
pub fn parse_message(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(MAX_MESSAGE_LEN)]).into_owned()
}
