//! Frames after the handshake: the 36-byte [`FrameHeader`] shared by both directions, the
//! requests ([`Request`]) and their conversion to and from [`bw_types::IoRequest`].
//!
//! ```text
//! magic "BWPF"(4) type(2) flags(2) body_len(4) id(8) offset(8) length(8) body(body_len)
//! ```
//!
//! Requests carry their arguments in the header (`offset`, `length`); only WRITE and
//! WRITE_META have a body (the data or the blob, `body_len == length`). Many requests may be in flight; each reply carries the
//! request's id and replies come in any order (see `reply`).
//!
//! Framing rule: `body_len` alone says where the next frame starts, whatever the type. So a
//! well-framed request the server cannot execute (unknown type, bad flags, too long) is
//! answered with an error and its body skipped, while a broken frame (bad magic, body over
//! [`MAX_BODY_LEN`]) ends the connection.

use bw_types::IoRequest;

use crate::consts::*;
use crate::error::ProtoError;
use crate::reply::ErrorCode;
use crate::wire::Cursor;
use crate::Parsed;

/// The header of every frame, as sent; the type is kept raw so unknown types can be
/// answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type (`MSG_*`); bit 15 marks replies.
    pub kind: u16,
    pub flags: u16,
    /// Bytes following the header (≤ [`MAX_BODY_LEN`], checked by the parser).
    pub body_len: u32,
    /// Request id chosen by the client, echoed by the reply; 0 = connection-level.
    pub id: u64,
    /// Request: byte offset. Reply: type-specific (FENCED: the highest generation).
    pub offset: u64,
    /// Request: byte count. Reply: type-specific (ERROR: the error code).
    pub length: u64,
}

impl FrameHeader {
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.kind.to_be_bytes());
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.body_len.to_be_bytes());
        b[12..20].copy_from_slice(&self.id.to_be_bytes());
        b[20..28].copy_from_slice(&self.offset.to_be_bytes());
        b[28..36].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    pub fn is_reply(&self) -> bool {
        self.kind & REPLY_BIT != 0
    }
}

/// Parses one frame header (not its body). Fails as soon as the received bytes contradict
/// the magic, and on a body longer than [`MAX_BODY_LEN`].
pub fn parse_frame_header(buf: &[u8]) -> Parsed<FrameHeader> {
    let magic = FRAME_MAGIC.to_be_bytes();
    let seen = buf.len().min(4);
    if buf[..seen] != magic[..seen] {
        let mut got = [0u8; 4];
        got[..seen].copy_from_slice(&buf[..seen]);
        return Err(ProtoError::BadFrameMagic(u32::from_be_bytes(got)));
    }
    let Some(b) = buf.get(4..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let mut c = Cursor::new(b);
    let field = "frame header";
    let bad = || ProtoError::Malformed { what: field };
    let h = FrameHeader {
        kind: c.u16().ok_or_else(bad)?,
        flags: c.u16().ok_or_else(bad)?,
        body_len: c.u32().ok_or_else(bad)?,
        id: c.u64().ok_or_else(bad)?,
        offset: c.u64().ok_or_else(bad)?,
        length: c.u64().ok_or_else(bad)?,
    };
    if h.body_len > MAX_BODY_LEN {
        return Err(ProtoError::TooLong {
            what: "frame body",
            len: h.body_len.into(),
            max: MAX_BODY_LEN.into(),
        });
    }
    Ok(Some((h, FRAME_HEADER_LEN)))
}

/// A whole frame, header and body, borrowed from the buffer (for small frames, tools,
/// tests and fuzzing; connections read large bodies straight into their own buffers).
pub fn parse_frame(buf: &[u8]) -> Parsed<(FrameHeader, &[u8])> {
    let Some((h, n)) = parse_frame_header(buf)? else {
        return Ok(None);
    };
    let end = n + h.body_len as usize;
    Ok(buf.get(n..end).map(|body| ((h, body), end)))
}

/// A data-path request, decoded from its header. A WRITE's data is the frame's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u64,
    },
    /// Liveness probe; answered with PONG and touches no replica.
    Ping,
    /// v2: read the replication-metadata blob; answered with META.
    ReadMeta,
    /// v2: replace the replication-metadata blob with the `len` body bytes
    /// (≤ [`MAX_META_BYTES`]); answered with OK once durable.
    WriteMeta {
        len: u32,
    },
}

/// A well-framed request the server cannot execute; answered with an error reply, and the
/// connection goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown request type {0:#06x}")]
    UnknownType(u16),
    #[error("frame type {0:#06x} is a reply, not a request")]
    ReplyAsRequest(u16),
    #[error("flags {flags:#06x} are not valid on request type {kind:#06x}")]
    BadFlags { kind: u16, flags: u16 },
    #[error("request type {kind:#06x} carries a body of {body_len} bytes; it must carry {want}")]
    BadBody { kind: u16, body_len: u32, want: u64 },
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("request id 0 is reserved for connection-level messages")]
    ReservedId,
}

impl RequestError {
    /// The error code the reply carries.
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::UnknownType(_) => ErrorCode::Unsupported,
            _ => ErrorCode::Invalid,
        }
    }
}

impl Request {
    /// The wire type.
    pub fn kind(&self) -> u16 {
        match self {
            Request::Read { .. } => MSG_READ,
            Request::Write { .. } => MSG_WRITE,
            Request::Flush => MSG_FLUSH,
            Request::Trim { .. } => MSG_TRIM,
            Request::WriteZeroes { .. } => MSG_WRITE_ZEROES,
            Request::BlockStatus { .. } => MSG_BLOCK_STATUS,
            Request::Ping => MSG_PING,
            Request::ReadMeta => MSG_READ_META,
            Request::WriteMeta { .. } => MSG_WRITE_META,
        }
    }

    /// The frame header of this request (a WRITE's data follows it).
    pub fn header(&self, id: u64) -> FrameHeader {
        let fua_flag = |fua: bool| if fua { FLAG_FUA } else { 0 };
        let (flags, offset, length, body_len) = match *self {
            Request::Read { offset, len } => (0, offset, u64::from(len), 0),
            Request::Write { offset, len, fua } => (fua_flag(fua), offset, u64::from(len), len),
            Request::Flush | Request::Ping | Request::ReadMeta => (0, 0, 0, 0),
            Request::WriteMeta { len } => (0, 0, u64::from(len), len),
            Request::Trim { offset, len, fua } => (fua_flag(fua), offset, len, 0),
            Request::WriteZeroes {
                offset,
                len,
                may_punch,
                fua,
            } => {
                let punch = if may_punch { FLAG_MAY_PUNCH } else { 0 };
                (fua_flag(fua) | punch, offset, len, 0)
            }
            Request::BlockStatus { offset, len } => (0, offset, len, 0),
        };
        FrameHeader {
            kind: self.kind(),
            flags,
            body_len,
            id,
            offset,
            length,
        }
    }

    /// Decodes a request header. The body (if any) has not been read yet: on `Err` the
    /// caller skips `h.body_len` bytes and answers with [`RequestError::code`].
    pub fn decode(h: &FrameHeader) -> Result<Request, RequestError> {
        if h.is_reply() {
            return Err(RequestError::ReplyAsRequest(h.kind));
        }
        let allowed = match h.kind {
            MSG_WRITE | MSG_TRIM => FLAG_FUA,
            MSG_WRITE_ZEROES => FLAG_FUA | FLAG_MAY_PUNCH,
            MSG_READ | MSG_FLUSH | MSG_BLOCK_STATUS | MSG_PING => 0,
            MSG_READ_META | MSG_WRITE_META => 0,
            other => return Err(RequestError::UnknownType(other)),
        };
        if h.id == CONNECTION_ID {
            return Err(RequestError::ReservedId);
        }
        if h.flags & !allowed != 0 {
            return Err(RequestError::BadFlags {
                kind: h.kind,
                flags: h.flags,
            });
        }
        let want_body = match h.kind {
            MSG_WRITE | MSG_WRITE_META => h.length,
            _ => 0,
        };
        if u64::from(h.body_len) != want_body {
            return Err(RequestError::BadBody {
                kind: h.kind,
                body_len: h.body_len,
                want: want_body,
            });
        }
        let (offset, fua) = (h.offset, h.flags & FLAG_FUA != 0);
        Ok(match h.kind {
            MSG_READ => Request::Read {
                offset,
                len: io_len("read", h.length)?,
            },
            MSG_WRITE => Request::Write {
                offset,
                len: io_len("write", h.length)?,
                fua,
            },
            MSG_FLUSH => Request::Flush,
            MSG_TRIM => Request::Trim {
                offset,
                len: h.length,
                fua,
            },
            MSG_WRITE_ZEROES => Request::WriteZeroes {
                offset,
                len: h.length,
                may_punch: h.flags & FLAG_MAY_PUNCH != 0,
                fua,
            },
            MSG_BLOCK_STATUS => Request::BlockStatus {
                offset,
                len: h.length,
            },
            MSG_READ_META => Request::ReadMeta,
            MSG_WRITE_META => Request::WriteMeta {
                len: meta_len(h.length)?,
            },
            _ => Request::Ping,
        })
    }

    /// The request for a device request (the caller sends a WRITE's data after the header).
    /// `None` for a write longer than [`MAX_IO_BYTES`], which the peer would refuse.
    pub fn from_io(req: &IoRequest) -> Option<Request> {
        Some(match *req {
            IoRequest::Read { offset, len } if len <= MAX_IO_BYTES => Request::Read { offset, len },
            IoRequest::Read { .. } => return None,
            IoRequest::Write {
                offset,
                ref data,
                fua,
            } => Request::Write {
                offset,
                len: u32::try_from(data.len())
                    .ok()
                    .filter(|l| *l <= MAX_IO_BYTES)?,
                fua,
            },
            IoRequest::Flush => Request::Flush,
            IoRequest::Trim { offset, len, fua } => Request::Trim { offset, len, fua },
            IoRequest::WriteZeroes {
                offset,
                len,
                may_punch,
                fua,
            } => Request::WriteZeroes {
                offset,
                len,
                may_punch,
                fua,
            },
            IoRequest::BlockStatus { offset, len } => Request::BlockStatus { offset, len },
        })
    }

    /// The device request, given a WRITE's data (ignored for other types). `None` for PING
    /// and the metadata requests, which the server answers itself.
    pub fn into_io(self, data: Vec<u8>) -> Option<IoRequest> {
        Some(match self {
            Request::Read { offset, len } => IoRequest::Read { offset, len },
            Request::Write { offset, fua, .. } => IoRequest::Write {
                offset,
                data: data.into(),
                fua,
            },
            Request::Flush => IoRequest::Flush,
            Request::Trim { offset, len, fua } => IoRequest::Trim { offset, len, fua },
            Request::WriteZeroes {
                offset,
                len,
                may_punch,
                fua,
            } => IoRequest::WriteZeroes {
                offset,
                len,
                may_punch,
                fua,
            },
            Request::BlockStatus { offset, len } => IoRequest::BlockStatus { offset, len },
            Request::Ping | Request::ReadMeta | Request::WriteMeta { .. } => return None,
        })
    }

    /// Payload bytes this request moves (READ data back, WRITE data out, a metadata blob
    /// either way), for in-flight byte budgets. READ_META counts as a maximal blob: its
    /// size is unknown until it was read.
    pub fn payload_bytes(&self) -> u32 {
        match *self {
            Request::Read { len, .. } | Request::Write { len, .. } | Request::WriteMeta { len } => {
                len
            }
            Request::ReadMeta => MAX_META_BYTES,
            _ => 0,
        }
    }
}

fn meta_len(len: u64) -> Result<u32, RequestError> {
    if len > u64::from(MAX_META_BYTES) {
        return Err(RequestError::TooLong {
            what: "replication metadata",
            len,
            max: MAX_META_BYTES.into(),
        });
    }
    Ok(len as u32)
}

fn io_len(what: &'static str, len: u64) -> Result<u32, RequestError> {
    if len > u64::from(MAX_IO_BYTES) {
        return Err(RequestError::TooLong {
            what,
            len,
            max: MAX_IO_BYTES.into(),
        });
    }
    Ok(len as u32)
}
