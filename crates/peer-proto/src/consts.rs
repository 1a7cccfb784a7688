//! Numbers of the peer wire format: magics, versions, the message-type registry, flags and
//! the named limits. Every multi-byte field on the wire is big-endian.
//!
//! Nothing here may change meaning once released; new values are added, old ones retired
//! (never reused). `docs/design/peer-protocol.md` is the narrative version of this file.

// ----- Magics and versions -------------------------------------------------------------------

/// First 8 bytes of the client's hello ("BWPEERC\n"). The trailing newline makes a
/// text-mode or line-based mangling of the stream fail at the first message.
pub const HELLO_MAGIC: [u8; 8] = *b"BWPEERC\n";
/// First 8 bytes of the server's answer to a hello ("BWPEERS\n"). Different from the
/// hello's, so a connection looped back to itself fails instead of talking to itself.
pub const SERVER_MAGIC: [u8; 8] = *b"BWPEERS\n";
/// First 4 bytes of every frame after the handshake ("BWPF"): a cheap check that the two
/// sides still agree where frames start.
pub const FRAME_MAGIC: u32 = 0x4257_5046;

/// The newest protocol version this build speaks (see the history in the crate docs).
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The first version with sessions (the hello's `session` field, refusal
/// `StaleSession`) and the replication-metadata requests (READ_META, WRITE_META). A client
/// that needs them offers this as its minimum, so an older server refuses it with
/// `VersionUnsupported` instead of silently ignoring the session.
pub const SESSION_VERSION: u16 = 2;

// ----- Handshake layout and limits -----------------------------------------------------------

/// Fixed prefix of a hello and of a server answer: magic (8), two u16, body length (4).
pub const HANDSHAKE_PREFIX_LEN: usize = 16;
/// Fixed part of a v1 hello body before the two ids: generation (8), features (8).
pub const HELLO_V1_FIXED_LEN: usize = 16;
/// Bytes a v2 hello appends after the volume id: session (8).
pub const HELLO_V2_TAIL_LEN: usize = 8;
/// Largest hello body. Hit → the server refuses with `BadRequest` and closes. Two ids of
/// [`MAX_ID_LEN`] plus the fixed fields need 530 bytes; the rest is room for later versions
/// to append fields.
pub const MAX_HELLO_BODY_LEN: u32 = 4096;
/// Longest node or volume id in a hello. Ids are 32 hex digits, names at most 63 bytes;
/// 255 leaves room without letting a hello carry a blob. Hit → refused with `BadRequest`.
pub const MAX_ID_LEN: usize = 255;
/// Length of the v1 accept body: size, highest generation, features (8 each), max I/O
/// bytes, max in-flight requests, max in-flight bytes (4 each).
pub const ACCEPT_V1_LEN: usize = 36;
/// Fixed part of the v1 refuse body: code, server min/max version, message length (2 each),
/// highest generation (8); the message follows.
pub const REFUSE_V1_FIXED_LEN: usize = 16;
/// Largest server answer body. Hit (by a broken or hostile server) → the client fails the
/// connect with a protocol error.
pub const MAX_SERVER_BODY_LEN: u32 = 8192;
/// Longest human-readable message in a refusal or an error reply; longer ones are cut (on a
/// character boundary) by the encoders and refused by the parsers.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Handshake answer kinds.
pub const ANSWER_ACCEPT: u16 = 1;
pub const ANSWER_REFUSE: u16 = 2;

// ----- Frames --------------------------------------------------------------------------------

/// Every frame starts with this header: magic (4), type (2), flags (2), body length (4),
/// request id (8), offset (8), length (8).
pub const FRAME_HEADER_LEN: usize = 36;
/// Largest read or write payload: 32 MiB, the NBD maximum, so a remote attachment can pass
/// any NBD request through unsplit. A larger READ/WRITE is answered `Invalid`.
pub const MAX_IO_BYTES: u32 = 32 << 20;
/// Largest replication-metadata blob in WRITE_META and the META reply (v2): 16 MiB, as
/// `store::MAX_REPL_META_BYTES`. A larger WRITE_META is answered `Invalid` (its body
/// skipped; the client refuses locally first); a larger META reply is fatal for the client.
pub const MAX_META_BYTES: u32 = 16 << 20;
/// Largest frame body (bytes after the header). Hit → fatal framing error: the receiver
/// sends a connection-level `Error{Protocol}` (server) and closes, because skipping a
/// body that large would be a way to make it read gigabytes. Equal to [`MAX_IO_BYTES`]:
/// no body is larger than a maximal write (a metadata blob, [`MAX_META_BYTES`], is half).
pub const MAX_BODY_LEN: u32 = MAX_IO_BYTES;
const _: () = assert!(
    MAX_META_BYTES <= MAX_BODY_LEN,
    "a maximal blob fits one frame"
);
/// Largest frame on the wire.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + MAX_BODY_LEN as usize;
/// Most extents in one `EXTENTS` reply (as `store::MAX_BLOCK_STATUS_EXTENTS`). A server
/// with more answers a prefix; a reply with more is a fatal framing error for the client.
pub const MAX_EXTENTS: usize = 1024;
/// Bytes per extent on the wire: length (8), flags (4), reserved (4).
pub const EXTENT_WIRE_LEN: usize = 16;

/// Request id 0 is never used by a client: a reply with id 0 is a connection-level message
/// (the server explains why it is closing the connection).
pub const CONNECTION_ID: u64 = 0;

// ----- Message-type registry -----------------------------------------------------------------
//
// Types are u16. Bit 15 set = reply (server → client), clear = request (client → server).
// Ranges of request types:
//   0x0001-0x00ff  data path (v1)
//   0x0100-0x01ff  replication and resync (C3): 0x0100 READ_META, 0x0101 WRITE_META (v2);
//                  the rest reserved (resync reads/writes with region checksums, rejoin)
//   0x0200-0x7fff  unassigned
// Unknown request type → the server answers `Error{Unsupported}` and skips the body (the
// header's body length keeps the stream in sync), so a client may probe for new messages.
// Unknown reply type → fatal for the client (it never asked for one).

pub const MSG_READ: u16 = 0x0001;
pub const MSG_WRITE: u16 = 0x0002;
pub const MSG_FLUSH: u16 = 0x0003;
pub const MSG_TRIM: u16 = 0x0004;
pub const MSG_WRITE_ZEROES: u16 = 0x0005;
pub const MSG_BLOCK_STATUS: u16 = 0x0006;
pub const MSG_PING: u16 = 0x0007;

/// v2: read the replica's replication-metadata blob; answered with META (or FENCED, ERROR).
/// No body; offset and length are reserved (sent as 0, ignored).
pub const MSG_READ_META: u16 = 0x0100;
/// v2: replace the replica's replication-metadata blob with the body (≤ [`MAX_META_BYTES`],
/// `length == body_len`, offset reserved); durable before the OK; fenced like a write.
pub const MSG_WRITE_META: u16 = 0x0101;

/// First and last request type reserved for replication and resync (C3).
pub const MSG_REPLICATION_FIRST: u16 = 0x0100;
pub const MSG_REPLICATION_LAST: u16 = 0x01ff;
/// The largest request type value; above it (bit 15) are replies.
pub const MAX_REQUEST_TYPE: u16 = 0x7fff;

/// Set on every reply type.
pub const REPLY_BIT: u16 = 0x8000;
pub const MSG_REPLY_OK: u16 = 0x8001;
pub const MSG_REPLY_DATA: u16 = 0x8002;
pub const MSG_REPLY_EXTENTS: u16 = 0x8003;
pub const MSG_REPLY_ERROR: u16 = 0x8004;
pub const MSG_REPLY_FENCED: u16 = 0x8005;
pub const MSG_REPLY_PONG: u16 = 0x8006;
/// v2: the answer to READ_META. Flag [`FLAG_META_PRESENT`] set: the body is the blob
/// (possibly empty); clear: no blob was ever written (body must be empty).
pub const MSG_REPLY_META: u16 = 0x8007;

// ----- Flags ---------------------------------------------------------------------------------

/// WRITE, TRIM, WRITE_ZEROES: durable before the reply.
pub const FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES: the range may be deallocated.
pub const FLAG_MAY_PUNCH: u16 = 1 << 1;

/// META reply: a blob exists (the body, possibly empty); clear = none was ever written.
pub const FLAG_META_PRESENT: u16 = 1 << 0;

/// Extent flags.
pub const EXTENT_HOLE: u32 = 1 << 0;
pub const EXTENT_ZERO: u32 = 1 << 1;

/// Feature bits negotiated in the handshake (the server answers with the subset it
/// grants). v1 defines none; bits unknown to the server are simply not granted.
pub const KNOWN_FEATURES: u64 = 0;
