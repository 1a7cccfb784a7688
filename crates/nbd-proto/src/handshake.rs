//! Server side of the fixed-newstyle handshake: the greeting, the client's flags, the
//! client's options and every reply the server sends before transmission.
//!
//! ```text
//! S: NBDMAGIC(8) IHAVEOPT(8) handshake-flags(2)
//! C: client-flags(4)
//! C: IHAVEOPT(8) option(4) length(4) data(length)            ← repeated
//! S: REPLY_MAGIC(8) option(4) reply-type(4) length(4) data   ← zero or more per option
//! ```
//!
//! Parsers take the bytes received so far and return `Ok(None)` when more are needed.

use crate::consts::*;
use crate::error::ProtoError;
use crate::Parsed;

/// What the client announced in its 32-bit flags word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle (it may send options other than EXPORT_NAME).
    pub fixed_newstyle: bool,
    /// Omit the 124 zero bytes after an EXPORT_NAME reply.
    pub no_zeroes: bool,
}

/// One option sent by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    /// The option number as sent; every reply echoes it.
    pub code: u32,
    pub body: OptionBody,
}

/// The decoded payload of an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionBody {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    /// An option this implementation does not support (→ `NBD_REP_ERR_UNSUP`); its data has
    /// been consumed.
    Unsupported,
    /// A supported option whose data is malformed (→ `NBD_REP_ERR_INVALID`); consumed.
    Malformed(&'static str),
    /// The data is longer than [`MAX_OPTION_DATA_LEN`]. Only the 16-byte header was
    /// consumed: the caller must skip `len` more bytes, then reply `NBD_REP_ERR_TOO_BIG`.
    TooBig {
        len: u32,
    },
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Requested `NBD_INFO_*` types, as sent (unknown ones included; the server ignores them).
    pub info_types: Vec<u16>,
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// The transmission flags of every export we serve: the v1 feature set. `SEND_DF` only with
/// structured replies (the spec forbids it otherwise); `CAN_MULTI_CONN` because a
/// block device flush (`bw_types::BlockDevice`) covers writes completed on every connection.
pub fn server_transmission_flags(structured_replies: bool) -> u16 {
    let base = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    if structured_replies {
        base | TFLAG_SEND_DF
    } else {
        base
    }
}

/// Appends the 18-byte greeting the server sends on accept.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
}

/// Parses the client's 4-byte flags. Unknown bits are an error: the spec says the server MUST
/// drop the connection.
pub fn parse_client_flags(buf: &[u8]) -> Parsed<ClientFlags> {
    let Some(raw) = buf.get(..4) else {
        return Ok(None);
    };
    let flags = u32::from_be_bytes(raw.try_into().expect("4 bytes"));
    if flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    let parsed = ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    };
    Ok(Some((parsed, 4)))
}

/// Parses one option (header and data). A bad magic is fatal; anything wrong inside a
/// well-framed option is reported as [`OptionBody::Malformed`] so negotiation can continue.
pub fn parse_option(buf: &[u8]) -> Parsed<OptionRequest> {
    if buf.len() < OPTION_HEADER_LEN {
        return Ok(None);
    }
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    let code = be_u32(&buf[8..12]);
    let len = be_u32(&buf[12..16]);
    if len > MAX_OPTION_DATA_LEN {
        let body = OptionBody::TooBig { len };
        return Ok(Some((OptionRequest { code, body }, OPTION_HEADER_LEN)));
    }
    let total = OPTION_HEADER_LEN + len as usize;
    let Some(data) = buf.get(OPTION_HEADER_LEN..total) else {
        return Ok(None);
    };
    let body = parse_option_body(code, data);
    Ok(Some((OptionRequest { code, body }, total)))
}

fn parse_option_body(code: u32, data: &[u8]) -> OptionBody {
    let result = match code {
        OPT_EXPORT_NAME => parse_string(data).map(OptionBody::ExportName),
        // The spec asks servers to ignore data sent with ABORT.
        OPT_ABORT => Ok(OptionBody::Abort),
        OPT_LIST if data.is_empty() => Ok(OptionBody::List),
        OPT_LIST => Err("NBD_OPT_LIST carries no data"),
        OPT_INFO => parse_info(data).map(OptionBody::Info),
        OPT_GO => parse_info(data).map(OptionBody::Go),
        OPT_STRUCTURED_REPLY if data.is_empty() => Ok(OptionBody::StructuredReply),
        OPT_STRUCTURED_REPLY => Err("NBD_OPT_STRUCTURED_REPLY carries no data"),
        OPT_LIST_META_CONTEXT => parse_meta(data).map(OptionBody::ListMetaContext),
        OPT_SET_META_CONTEXT => parse_meta(data).map(OptionBody::SetMetaContext),
        _ => Ok(OptionBody::Unsupported),
    };
    result.unwrap_or_else(OptionBody::Malformed)
}

/// `name_len(4) name info_count(2) info_type(2)*n`, nothing after.
fn parse_info(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let mut r = Cursor(data);
    let name_len = r.u32().ok_or("option data too short for the name length")?;
    if name_len as usize > data.len().saturating_sub(6) {
        return Err("export name length exceeds the option data");
    }
    let name = parse_string(r.take(name_len as usize).ok_or("truncated export name")?)?;
    let count = r
        .u16()
        .ok_or("option data too short for the info request count")?;
    let mut info_types = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        info_types.push(r.u16().ok_or("fewer info requests than announced")?);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the info requests");
    }
    Ok(InfoRequest { name, info_types })
}

/// `name_len(4) name query_count(4) (query_len(4) query)*n`, nothing after.
fn parse_meta(data: &[u8]) -> Result<MetaRequest, &'static str> {
    let mut r = Cursor(data);
    let name_len = r.u32().ok_or("option data too short for the name length")?;
    let name = parse_string(
        r.take(name_len as usize)
            .ok_or("export name exceeds the option data")?,
    )?;
    let count = r.u32().ok_or("option data too short for the query count")?;
    if count > MAX_META_QUERIES {
        return Err("too many metadata context queries");
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = r.u32().ok_or("fewer queries than announced")?;
        queries.push(parse_string(
            r.take(len as usize)
                .ok_or("query exceeds the option data")?,
        )?);
    }
    if !r.0.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok(MetaRequest { name, queries })
}

/// A protocol string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
fn parse_string(bytes: &[u8]) -> Result<String, &'static str> {
    if bytes.len() > MAX_STRING_LEN {
        return Err("string longer than 4096 bytes");
    }
    if bytes.contains(&0) {
        return Err("string contains NUL");
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8")
}

// ----- Replies ------------------------------------------------------------------------------

/// Appends an option reply header followed by `data`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    option_reply_header(out, option, reply_type, data.len());
    out.extend_from_slice(data);
}

fn option_reply_header(out: &mut Vec<u8>, option: u32, reply_type: u32, len: usize) {
    // Every reply we build is far below 4 GiB (strings are capped at 4 KiB).
    let len = u32::try_from(len).expect("option reply under 4 GiB");
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// `NBD_REP_ACK`.
pub fn encode_rep_ack(out: &mut Vec<u8>, option: u32) {
    option_reply_header(out, option, REP_ACK, 0);
}

/// An error reply carrying a human-readable message (cut to [`MAX_STRING_LEN`]).
pub fn encode_rep_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(is_rep_error(reply_type));
    encode_option_reply(
        out,
        option,
        reply_type,
        truncate_str(message, MAX_STRING_LEN).as_bytes(),
    );
}

/// One `NBD_REP_SERVER` entry of an `NBD_OPT_LIST` answer: name, then the description.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let name = truncate_str(name, MAX_STRING_LEN);
    let description = truncate_str(description, MAX_STRING_LEN);
    option_reply_header(
        out,
        OPT_LIST,
        REP_SERVER,
        4 + name.len() + description.len(),
    );
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, transmission_flags: u16) {
    option_reply_header(out, option, REP_INFO, 12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: a type followed by a string.
pub fn encode_info_string(out: &mut Vec<u8>, option: u32, info_type: u16, text: &str) {
    let text = truncate_str(text, MAX_STRING_LEN);
    option_reply_header(out, option, REP_INFO, 2 + text.len());
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// `NBD_INFO_BLOCK_SIZE` with our constraints.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32) {
    option_reply_header(out, option, REP_INFO, 14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
    out.extend_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
    out.extend_from_slice(&MAX_PAYLOAD_LEN.to_be_bytes());
}

/// `NBD_REP_META_CONTEXT`: a context id and its name.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, context_id: u32, name: &str) {
    option_reply_header(out, option, REP_META_CONTEXT, 4 + name.len());
    out.extend_from_slice(&context_id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// The reply that ends an `NBD_OPT_EXPORT_NAME` negotiation.
pub fn encode_export_name_reply(
    out: &mut Vec<u8>,
    size: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_PAD]);
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ----- Little readers -----------------------------------------------------------------------

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}

/// Consumes a byte slice front to back; every getter returns `None` when short.
pub(crate) struct Cursor<'a>(pub(crate) &'a [u8]);

impl<'a> Cursor<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be_u16)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be_u32)
    }
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
