//! Transmission phase: the 28-byte request header and the server's replies.
//!
//! ```text
//! C: REQUEST_MAGIC(4) flags(2) type(2) cookie(8) offset(8) length(4) [data(length) if WRITE]
//! S: SIMPLE_REPLY_MAGIC(4) error(4) cookie(8) [data if READ and error == 0]
//! S: STRUCTURED_REPLY_MAGIC(4) flags(2) type(2) cookie(8) length(4) payload(length)
//! ```
//!
//! Reply headers are returned as fixed arrays so a server can send them next to a data
//! buffer (vectored write) without copying the data; `encode_*` variants append to a `Vec`.

use crate::consts::*;
use crate::error::ProtoError;
use crate::handshake::{be_u16, be_u32, be_u64, truncate_str};
use crate::Parsed;

/// A request header as sent; the command is kept raw so unknown commands can be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    /// `NBD_CMD_*`; see [`Command::from_wire`].
    pub command: u16,
    /// Opaque; echoed in every reply to this request.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The commands we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    pub fn from_wire(raw: u16) -> Option<Command> {
        Some(match raw {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    /// Command flags valid on this command (FUA is valid on every command per the spec).
    pub fn allowed_flags(self) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }
}

impl RequestHeader {
    /// Bytes of data that follow this header on the wire: `length` for WRITE (whatever its
    /// size or validity: the stream stays in sync only if they are consumed), else 0.
    pub fn payload_len(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }
}

/// Parses one request header (not its payload; see [`RequestHeader::payload_len`]).
pub fn parse_request_header(buf: &[u8]) -> Parsed<RequestHeader> {
    let Some(b) = buf.get(..REQUEST_HEADER_LEN) else {
        return Ok(None);
    };
    let magic = be_u32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    let header = RequestHeader {
        flags: be_u16(&b[4..6]),
        command: be_u16(&b[6..8]),
        cookie: be_u64(&b[8..16]),
        offset: be_u64(&b[16..24]),
        length: be_u32(&b[24..28]),
    };
    Ok(Some((header, REQUEST_HEADER_LEN)))
}

/// A simple reply header; for a successful READ the data follows it.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&simple_reply(error, cookie));
}

/// A structured reply chunk header; `length` payload bytes follow.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Length of an `OFFSET_DATA` chunk header plus its offset field; the data follows.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;

/// Header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `data_len` bytes read at
/// `offset`. Marked DONE: the server sends it only once the whole read has succeeded.
/// `data_len` must be ≥ 1 (the spec requires a chunk to describe at least one byte) and at
/// most `u32::MAX - 8`.
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; OFFSET_DATA_HEADER_LEN] {
    debug_assert!((1..=u32::MAX - 8).contains(&data_len));
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    let head = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len + 8,
    );
    b[..CHUNK_HEADER_LEN].copy_from_slice(&head);
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_NONE` chunk (success without payload).
pub fn encode_chunk_none(out: &mut Vec<u8>, cookie: u64) {
    out.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0));
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk; the message is cut to [`MAX_STRING_LEN`].
pub fn encode_chunk_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    debug_assert!(error != 0);
    let message = truncate_str(message, MAX_STRING_LEN);
    let len = 6 + message.len() as u32;
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// One block-status descriptor: `length` bytes (nonzero) with `STATE_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context. `descriptors` must
/// not be empty (the spec requires at least one) nor longer than
/// [`MAX_BLOCK_STATUS_EXTENTS`].
pub fn encode_chunk_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
) {
    debug_assert!(!descriptors.is_empty() && descriptors.len() <= MAX_BLOCK_STATUS_EXTENTS);
    let len = 4 + 8 * descriptors.len() as u32;
    out.reserve(CHUNK_HEADER_LEN + len as usize);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the header parser waits for 28 bytes, rejects a bad magic, and round-trips.
    #[test]
    fn request_header_round_trip_and_incomplete() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let bytes = h.to_bytes();
        for n in 0..REQUEST_HEADER_LEN {
            assert_eq!(parse_request_header(&bytes[..n]), Ok(None), "prefix of {n}");
        }
        let mut longer = bytes.to_vec();
        longer.extend_from_slice(&[0xaa; 10]);
        assert_eq!(parse_request_header(&longer), Ok(Some((h, 28))));
        assert_eq!(h.payload_len(), 512);
    }

    #[test]
    fn request_header_bad_magic_is_fatal() {
        let mut bytes = RequestHeader {
            flags: 0,
            command: 0,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .to_bytes();
        bytes[0] ^= 1;
        assert_eq!(
            parse_request_header(&bytes),
            Err(ProtoError::BadRequestMagic(0x2460_9513))
        );
    }

    // Goal: only WRITE carries a payload, whatever its flags or length.
    #[test]
    fn payload_len_only_for_write() {
        for cmd in 0..16u16 {
            let h = RequestHeader {
                flags: 0,
                command: cmd,
                cookie: 0,
                offset: 0,
                length: 99,
            };
            assert_eq!(h.payload_len(), if cmd == CMD_WRITE { 99 } else { 0 });
        }
    }

    #[test]
    fn command_flags_per_spec() {
        assert_eq!(Command::from_wire(8), None);
        assert_eq!(
            Command::from_wire(CMD_BLOCK_STATUS),
            Some(Command::BlockStatus)
        );
        assert_eq!(Command::Read.allowed_flags(), CMD_FLAG_FUA | CMD_FLAG_DF);
        assert_eq!(
            Command::WriteZeroes.allowed_flags(),
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE
        );
        assert_eq!(
            Command::BlockStatus.allowed_flags(),
            CMD_FLAG_FUA | CMD_FLAG_REQ_ONE
        );
        assert_eq!(Command::Write.allowed_flags(), CMD_FLAG_FUA);
    }

    // Goal: an error message longer than the spec's string limit is cut on a char boundary.
    #[test]
    fn error_chunk_message_is_truncated() {
        let long = "é".repeat(3000); // 6000 bytes
        let mut out = Vec::new();
        encode_chunk_error(&mut out, 1, EIO, &long);
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert_eq!(msg_len, 4096);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 6 + 4096);
        assert!(std::str::from_utf8(&out[26..]).is_ok());
    }
}
