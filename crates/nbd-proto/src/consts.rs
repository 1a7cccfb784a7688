//! Numbers of the NBD wire format (magics, flags, option/reply/info types, commands, errors)
//! and the limits this implementation enforces.
//!
//! Values are from the NBD protocol specification (`doc/proto.md` of NetworkBlockDevice/nbd).
//! Every multi-byte field on the wire is big-endian.

// ----- Magics -------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the newstyle greeting and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every server reply to an option (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ----- Handshake flags (server, 16 bits) and client flags (32 bits) -------------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// The handshake flags our server sends: both flags we understand.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
/// Client flags we accept; any other bit makes the server drop the connection (spec: MUST).
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ----- Transmission flags (16 bits, sent with the export size) ------------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Only meaningful (and only sent) once structured replies are negotiated.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ----- Options ------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ----- Option reply types -------------------------------------------------------------------

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// True for option reply types that are errors (bit 31 set).
pub fn is_rep_error(reply_type: u32) -> bool {
    reply_type & REP_ERR != 0
}

// ----- Info types (NBD_REP_INFO payloads) ---------------------------------------------------

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ----- Commands and command flags -----------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ----- Structured replies -------------------------------------------------------------------

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const META_BASE_ALLOCATION: &str = "base:allocation";

// ----- Error values (transmission) ----------------------------------------------------------

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ----- Sizes of fixed wire structures -------------------------------------------------------

/// NBDMAGIC + IHAVEOPT + handshake flags.
pub const GREETING_LEN: usize = 18;
/// Magic + option + length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Magic + option + reply type + length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size + transmission flags (+ 124 zero bytes unless NO_ZEROES).
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
pub const EXPORT_NAME_REPLY_PAD: usize = 124;

// ----- Limits -------------------------------------------------------------------------------

/// Longest option payload we buffer. The longest legitimate option is a
/// `SET_META_CONTEXT` naming an export (≤ 4 KiB, the spec's string limit) plus a few queries
/// (each ≤ 4 KiB); 64 KiB leaves room for 15 maximal queries. Hit → the server skips the
/// payload without buffering it and replies `NBD_REP_ERR_TOO_BIG`, negotiation continues.
pub const MAX_OPTION_DATA_LEN: u32 = 64 * 1024;

/// The spec's upper bound on any string (export names, queries, error messages).
pub const MAX_STRING_LEN: usize = 4096;

/// Most metadata-context queries accepted in one option (each can select at most one context
/// of ours anyway). Hit → `NBD_REP_ERR_TOO_BIG`.
pub const MAX_META_QUERIES: u32 = 128;

/// Minimum block size we advertise: any byte alignment works (the device handles it).
pub const BLOCK_SIZE_MIN: u32 = 1;
/// Preferred block size: the page size, which avoids read-modify-write in the store.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Largest READ/WRITE payload we accept and advertise (2^25, the spec's interoperability
/// default, which every client already honours). Hit on WRITE → the payload is read and
/// discarded and the request fails with `EINVAL`; on READ → `EINVAL` (`EOVERFLOW` with
/// structured replies, which invites the client to retry smaller).
pub const MAX_PAYLOAD_LEN: u32 = 32 * 1024 * 1024;

/// Most extents in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (spec: SHOULD NOT exceed 2^20).
/// Hit → the reply is truncated, which the spec allows (the client asks again).
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1 << 20;
