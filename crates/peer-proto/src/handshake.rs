//! The handshake: the client's [`Hello`], the server's [`Accept`] or [`Refuse`].
//!
//! ```text
//! C: magic "BWPEERC\n"(8) min_version(2) max_version(2) body_len(4) body
//!    v1 body: generation(8) features(8) node_id_len(2) node_id volume_id_len(2) volume_id
//!    v2 body (max_version ≥ 2): the v1 body, then session(8)
//! S: magic "BWPEERS\n"(8) kind(2) version(2) body_len(4) body
//!    kind 1 = accept, v1 body: size(8) highest_generation(8) features(8)
//!             max_io_bytes(4) max_inflight_requests(4) max_inflight_bytes(4)
//!    kind 2 = refuse, v1 body: code(2) server_min(2) server_max(2) message_len(2)
//!             highest_generation(8) message
//! ```
//!
//! A hello whose `max_version` is 2 or more carries the v2 fields, whatever version the
//! server then picks (the client cannot know it yet); a v1 server skips them as the tail
//! of a newer version. A hello with `max_version` 1 has none (its session is 0).
//!
//! Extensibility: the 16-byte prefix never changes. A later version may only *append*
//! fields to a body, so every version can parse the fields it knows and skip the rest
//! (the body length says how much). The client offers a version range; the server picks
//! the highest version both speak ([`choose_version`]) and states it in its answer.

use bw_types::{Generation, NodeId, VolumeId};

use crate::consts::*;
use crate::error::ProtoError;
use crate::wire::{truncate_str, Cursor};
use crate::Parsed;

/// The client's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// The attachment's generation; the replica admits it or refuses (fencing).
    pub generation: Generation,
    /// Feature bits the client would like ([`KNOWN_FEATURES`]).
    pub features: u64,
    /// Who is asking (for logs and, later, replication bookkeeping).
    pub node_id: NodeId,
    pub volume_id: VolumeId,
    /// v2: the attachment's session number (strictly increasing per attachment, 0 = no
    /// session). The replica refuses a session below the highest it admitted for this
    /// generation, and fences that generation's older sessions. Sent only when
    /// `max_version` ≥ 2 (a v1 hello always parses with 0).
    pub session: u64,
}

/// The server admitted the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// The version both sides speak from now on.
    pub version: u16,
    /// The replica's size in bytes.
    pub size_bytes: u64,
    /// The replica's highest generation after admitting the client (equal to the client's
    /// generation in v1: a lower one is refused, a higher one becomes the highest).
    pub highest_generation: Generation,
    /// Granted features (a subset of the requested ones).
    pub features: u64,
    /// Largest READ/WRITE the server accepts.
    pub max_io_bytes: u32,
    /// The server's per-connection in-flight limits (it stops reading when they are hit).
    pub max_inflight_requests: u32,
    pub max_inflight_bytes: u32,
}

/// Why a server refused a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    /// The server holds no replica of that volume.
    UnknownVolume,
    /// The hello's generation is below the replica's highest: a newer attachment exists.
    StaleGeneration,
    /// No protocol version in common.
    VersionUnsupported,
    /// The server cannot take the connection now (connection limit, shutting down).
    Busy,
    /// v2: the hello's generation is the replica's highest, but its session is below the
    /// one the replica admitted for it: a newer session of the same attachment exists.
    /// Sent only to clients that negotiated v2 (others get `StaleGeneration`).
    StaleSession,
    /// The hello is malformed (bad magic, bad lengths, bad ids).
    BadRequest,
    /// The replica exists but cannot serve (faulted, its metadata unreadable, I/O error).
    Unavailable,
    /// A code this build does not know (sent by a newer server).
    Unknown(u16),
}

impl RefuseCode {
    pub fn to_wire(self) -> u16 {
        match self {
            RefuseCode::UnknownVolume => 1,
            RefuseCode::StaleGeneration => 2,
            RefuseCode::VersionUnsupported => 3,
            RefuseCode::Busy => 4,
            RefuseCode::BadRequest => 5,
            RefuseCode::Unavailable => 6,
            RefuseCode::StaleSession => 7,
            RefuseCode::Unknown(c) => c,
        }
    }

    pub fn from_wire(c: u16) -> RefuseCode {
        match c {
            1 => RefuseCode::UnknownVolume,
            2 => RefuseCode::StaleGeneration,
            3 => RefuseCode::VersionUnsupported,
            4 => RefuseCode::Busy,
            5 => RefuseCode::BadRequest,
            6 => RefuseCode::Unavailable,
            7 => RefuseCode::StaleSession,
            c => RefuseCode::Unknown(c),
        }
    }
}

/// The server refused the client; the connection is closed after this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    pub code: RefuseCode,
    /// The server's supported version range (so a client can tell what to upgrade).
    pub server_min_version: u16,
    pub server_max_version: u16,
    /// For `StaleGeneration` and `StaleSession`: the replica's highest generation;
    /// otherwise 0.
    pub highest_generation: Generation,
    /// A sentence for logs and operators.
    pub message: String,
}

/// The server's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAnswer {
    Accept(Accept),
    Refuse(Refuse),
}

/// The highest version both `[client_min, client_max]` and this build speak.
pub fn choose_version(client_min: u16, client_max: u16) -> Option<u16> {
    let v = client_max.min(PROTOCOL_VERSION);
    (v >= client_min.max(MIN_PROTOCOL_VERSION)).then_some(v)
}

/// Appends a hello. Ids longer than [`MAX_ID_LEN`] are the caller's bug (the server would
/// refuse them); they are encoded as given so the refusal can be tested. The v2 fields
/// are appended when `max_version` ≥ 2 (a v1-only hello cannot carry a session: its
/// `session` is not sent).
pub fn encode_hello(out: &mut Vec<u8>, h: &Hello) {
    let node = h.node_id.0.as_bytes();
    let vol = h.volume_id.0.as_bytes();
    let v2 = h.max_version >= SESSION_VERSION;
    let tail = if v2 { HELLO_V2_TAIL_LEN } else { 0 };
    let body_len = HELLO_V1_FIXED_LEN + 2 + node.len() + 2 + vol.len() + tail;
    out.extend_from_slice(&HELLO_MAGIC);
    out.extend_from_slice(&h.min_version.to_be_bytes());
    out.extend_from_slice(&h.max_version.to_be_bytes());
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.extend_from_slice(&h.generation.0.to_be_bytes());
    out.extend_from_slice(&h.features.to_be_bytes());
    out.extend_from_slice(&(node.len() as u16).to_be_bytes());
    out.extend_from_slice(node);
    out.extend_from_slice(&(vol.len() as u16).to_be_bytes());
    out.extend_from_slice(vol);
    if v2 {
        out.extend_from_slice(&h.session.to_be_bytes());
    }
}

/// Parses a hello. Fails as soon as a received byte contradicts the magic, so garbage is
/// refused at once instead of after a timeout.
pub fn parse_hello(buf: &[u8]) -> Parsed<Hello> {
    let Some((min_version, max_version, body)) =
        parse_prefix(buf, &HELLO_MAGIC, MAX_HELLO_BODY_LEN, "hello body")?
    else {
        return Ok(None);
    };
    if min_version > max_version {
        return Err(ProtoError::BadVersionRange {
            min: min_version,
            max: max_version,
        });
    }
    let mut c = Cursor::new(body);
    let short = || ProtoError::TooShort {
        what: "hello body",
        len: body.len(),
        need: HELLO_V1_FIXED_LEN + 4,
    };
    let generation = Generation(c.u64().ok_or_else(short)?);
    let features = c.u64().ok_or_else(short)?;
    let node_id = NodeId(read_id(&mut c, "node id", body.len())?);
    let volume_id = VolumeId(read_id(&mut c, "volume id", body.len())?);
    let session = if max_version >= SESSION_VERSION {
        c.u64().ok_or(ProtoError::TooShort {
            what: "v2 hello body",
            len: body.len(),
            need: body.len() + HELLO_V2_TAIL_LEN,
        })?
    } else {
        0
    };
    // Whatever follows was appended by a newer version: skipped on purpose.
    let hello = Hello {
        min_version,
        max_version,
        generation,
        features,
        node_id,
        volume_id,
        session,
    };
    Ok(Some((hello, HANDSHAKE_PREFIX_LEN + body.len())))
}

fn read_id(c: &mut Cursor<'_>, what: &'static str, body_len: usize) -> Result<String, ProtoError> {
    let short = ProtoError::TooShort {
        what: "hello body",
        len: body_len,
        need: body_len + 1,
    };
    let len = usize::from(c.u16().ok_or(short.clone())?);
    if len == 0 {
        return Err(ProtoError::Empty { what });
    }
    if len > MAX_ID_LEN {
        return Err(ProtoError::TooLong {
            what,
            len: len as u64,
            max: MAX_ID_LEN as u64,
        });
    }
    let bytes = c.take(len).ok_or(short)?;
    let s = std::str::from_utf8(bytes).map_err(|_| ProtoError::NotUtf8 { what })?;
    Ok(s.to_owned())
}

/// Appends an accept answer.
pub fn encode_accept(out: &mut Vec<u8>, a: &Accept) {
    out.extend_from_slice(&SERVER_MAGIC);
    out.extend_from_slice(&ANSWER_ACCEPT.to_be_bytes());
    out.extend_from_slice(&a.version.to_be_bytes());
    out.extend_from_slice(&(ACCEPT_V1_LEN as u32).to_be_bytes());
    out.extend_from_slice(&a.size_bytes.to_be_bytes());
    out.extend_from_slice(&a.highest_generation.0.to_be_bytes());
    out.extend_from_slice(&a.features.to_be_bytes());
    out.extend_from_slice(&a.max_io_bytes.to_be_bytes());
    out.extend_from_slice(&a.max_inflight_requests.to_be_bytes());
    out.extend_from_slice(&a.max_inflight_bytes.to_be_bytes());
}

/// Appends a refusal; the message is cut to [`MAX_MESSAGE_LEN`] bytes. The version field
/// of the prefix carries the server's newest version.
pub fn encode_refuse(out: &mut Vec<u8>, r: &Refuse) {
    let msg = truncate_str(&r.message, MAX_MESSAGE_LEN).as_bytes();
    out.extend_from_slice(&SERVER_MAGIC);
    out.extend_from_slice(&ANSWER_REFUSE.to_be_bytes());
    out.extend_from_slice(&r.server_max_version.to_be_bytes());
    out.extend_from_slice(&((REFUSE_V1_FIXED_LEN + msg.len()) as u32).to_be_bytes());
    out.extend_from_slice(&r.code.to_wire().to_be_bytes());
    out.extend_from_slice(&r.server_min_version.to_be_bytes());
    out.extend_from_slice(&r.server_max_version.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(&r.highest_generation.0.to_be_bytes());
    out.extend_from_slice(msg);
}

/// Parses the server's answer to a hello.
pub fn parse_server_answer(buf: &[u8]) -> Parsed<ServerAnswer> {
    let Some((kind, version, body)) = parse_prefix(
        buf,
        &SERVER_MAGIC,
        MAX_SERVER_BODY_LEN,
        "server answer body",
    )?
    else {
        return Ok(None);
    };
    let used = HANDSHAKE_PREFIX_LEN + body.len();
    let mut c = Cursor::new(body);
    let answer = match kind {
        ANSWER_ACCEPT => {
            if body.len() < ACCEPT_V1_LEN {
                return Err(ProtoError::TooShort {
                    what: "accept body",
                    len: body.len(),
                    need: ACCEPT_V1_LEN,
                });
            }
            let bad = || ProtoError::Malformed {
                what: "accept body",
            };
            ServerAnswer::Accept(Accept {
                version,
                size_bytes: c.u64().ok_or_else(bad)?,
                highest_generation: Generation(c.u64().ok_or_else(bad)?),
                features: c.u64().ok_or_else(bad)?,
                max_io_bytes: c.u32().ok_or_else(bad)?,
                max_inflight_requests: c.u32().ok_or_else(bad)?,
                max_inflight_bytes: c.u32().ok_or_else(bad)?,
            })
        }
        ANSWER_REFUSE => ServerAnswer::Refuse(parse_refuse_body(body)?),
        other => return Err(ProtoError::UnknownAnswer(other)),
    };
    Ok(Some((answer, used)))
}

fn parse_refuse_body(body: &[u8]) -> Result<Refuse, ProtoError> {
    if body.len() < REFUSE_V1_FIXED_LEN {
        return Err(ProtoError::TooShort {
            what: "refuse body",
            len: body.len(),
            need: REFUSE_V1_FIXED_LEN,
        });
    }
    let mut c = Cursor::new(body);
    let bad = || ProtoError::Malformed {
        what: "refuse body",
    };
    let code = RefuseCode::from_wire(c.u16().ok_or_else(bad)?);
    let server_min_version = c.u16().ok_or_else(bad)?;
    let server_max_version = c.u16().ok_or_else(bad)?;
    let msg_len = usize::from(c.u16().ok_or_else(bad)?);
    let highest_generation = Generation(c.u64().ok_or_else(bad)?);
    if msg_len > MAX_MESSAGE_LEN {
        return Err(ProtoError::TooLong {
            what: "refusal message",
            len: msg_len as u64,
            max: MAX_MESSAGE_LEN as u64,
        });
    }
    let msg = c.take(msg_len).ok_or(ProtoError::TooShort {
        what: "refuse body",
        len: body.len(),
        need: REFUSE_V1_FIXED_LEN + msg_len,
    })?;
    let message = std::str::from_utf8(msg)
        .map_err(|_| ProtoError::NotUtf8 {
            what: "refusal message",
        })?
        .to_owned();
    Ok(Refuse {
        code,
        server_min_version,
        server_max_version,
        highest_generation,
        message,
    })
}

/// The two u16 fields of a handshake prefix and the complete body.
type Prefix<'a> = (u16, u16, &'a [u8]);

/// The common 16-byte prefix: checks the magic (byte by byte, as far as received) and the
/// body limit, and returns the two u16 fields and the whole body once it is complete.
fn parse_prefix<'a>(
    buf: &'a [u8],
    magic: &[u8; 8],
    max_body: u32,
    what: &'static str,
) -> Result<Option<Prefix<'a>>, ProtoError> {
    let seen = buf.len().min(magic.len());
    if buf[..seen] != magic[..seen] {
        return Err(if magic == &HELLO_MAGIC {
            ProtoError::BadHelloMagic
        } else {
            ProtoError::BadServerMagic
        });
    }
    if buf.len() < HANDSHAKE_PREFIX_LEN {
        return Ok(None);
    }
    let mut c = Cursor::new(&buf[8..HANDSHAKE_PREFIX_LEN]);
    let (a, b, body_len) = (c.u16(), c.u16(), c.u32());
    let (Some(a), Some(b), Some(body_len)) = (a, b, body_len) else {
        unreachable!("the prefix is 16 bytes");
    };
    if body_len > max_body {
        return Err(ProtoError::TooLong {
            what,
            len: body_len.into(),
            max: max_body.into(),
        });
    }
    let end = HANDSHAKE_PREFIX_LEN + body_len as usize;
    Ok(buf.get(HANDSHAKE_PREFIX_LEN..end).map(|body| (a, b, body)))
}
