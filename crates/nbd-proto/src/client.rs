//! Client side of the codec: what a client sends and how it reads the server's messages.
//! Used by our protocol tests, the fuzz targets and test tools; the server never calls it.

use crate::consts::*;
use crate::error::ProtoError;
use crate::handshake::{be_u16, be_u32, be_u64};
use crate::Parsed;

/// Largest option-reply payload a client accepts (our server sends at most a few KiB).
pub const MAX_OPTION_REPLY_LEN: u32 = MAX_OPTION_DATA_LEN;
/// Largest structured-chunk payload a client accepts: a full read plus its offset field, or
/// a block-status chunk of the maximum extent count.
pub const MAX_CHUNK_PAYLOAD_LEN: u32 = MAX_PAYLOAD_LEN + 8;

/// The server's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

/// One reply to an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// A transmission reply. For a simple reply to a successful READ the data follows on the
/// wire; only the client knows its length (from its own request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

pub fn encode_client_flags(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&flags.to_be_bytes());
}

/// An option header and its data.
pub fn encode_option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// `NBD_OPT_INFO` or `NBD_OPT_GO` (`code`) for `name`, requesting `info_types`.
pub fn encode_info_option(out: &mut Vec<u8>, code: u32, name: &str, info_types: &[u16]) {
    let mut data = Vec::with_capacity(6 + name.len() + 2 * info_types.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(info_types.len() as u16).to_be_bytes());
    for t in info_types {
        data.extend_from_slice(&t.to_be_bytes());
    }
    encode_option(out, code, &data);
}

/// `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT` (`code`).
pub fn encode_meta_option(out: &mut Vec<u8>, code: u32, name: &str, queries: &[&str]) {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q.as_bytes());
    }
    encode_option(out, code, &data);
}

pub fn parse_greeting(buf: &[u8]) -> Parsed<Greeting> {
    let Some(b) = buf.get(..GREETING_LEN) else {
        return Ok(None);
    };
    if be_u64(&b[0..8]) != NBD_MAGIC || be_u64(&b[8..16]) != IHAVEOPT {
        return Err(ProtoError::BadGreeting);
    }
    Ok(Some((
        Greeting {
            handshake_flags: be_u16(&b[16..18]),
        },
        GREETING_LEN,
    )))
}

pub fn parse_option_reply(buf: &[u8]) -> Parsed<OptionReply> {
    let Some(b) = buf.get(..OPTION_REPLY_HEADER_LEN) else {
        return Ok(None);
    };
    let magic = be_u64(&b[0..8]);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadOptionReplyMagic(magic));
    }
    let len = be_u32(&b[16..20]);
    if len > MAX_OPTION_REPLY_LEN {
        return Err(ProtoError::TooLong {
            what: "option reply",
            len: len.into(),
            max: MAX_OPTION_REPLY_LEN.into(),
        });
    }
    let total = OPTION_REPLY_HEADER_LEN + len as usize;
    let Some(data) = buf.get(OPTION_REPLY_HEADER_LEN..total) else {
        return Ok(None);
    };
    let reply = OptionReply {
        option: be_u32(&b[8..12]),
        reply_type: be_u32(&b[12..16]),
        data: data.to_vec(),
    };
    Ok(Some((reply, total)))
}

/// The size and transmission flags that end an `NBD_OPT_EXPORT_NAME` negotiation.
pub fn parse_export_name_reply(buf: &[u8], no_zeroes: bool) -> Parsed<(u64, u16)> {
    let total = EXPORT_NAME_REPLY_LEN + if no_zeroes { 0 } else { EXPORT_NAME_REPLY_PAD };
    let Some(b) = buf.get(..total) else {
        return Ok(None);
    };
    Ok(Some(((be_u64(&b[0..8]), be_u16(&b[8..10])), total)))
}

/// One simple reply header or one whole structured chunk.
pub fn parse_reply(buf: &[u8]) -> Parsed<Reply> {
    let Some(m) = buf.get(..4) else {
        return Ok(None);
    };
    match be_u32(m) {
        SIMPLE_REPLY_MAGIC => {
            let Some(b) = buf.get(..SIMPLE_REPLY_LEN) else {
                return Ok(None);
            };
            Ok(Some((
                Reply::Simple {
                    error: be_u32(&b[4..8]),
                    cookie: be_u64(&b[8..16]),
                },
                SIMPLE_REPLY_LEN,
            )))
        }
        STRUCTURED_REPLY_MAGIC => {
            let Some(b) = buf.get(..CHUNK_HEADER_LEN) else {
                return Ok(None);
            };
            let len = be_u32(&b[16..20]);
            if len > MAX_CHUNK_PAYLOAD_LEN {
                return Err(ProtoError::TooLong {
                    what: "reply chunk",
                    len: len.into(),
                    max: MAX_CHUNK_PAYLOAD_LEN.into(),
                });
            }
            let total = CHUNK_HEADER_LEN + len as usize;
            let Some(payload) = buf.get(CHUNK_HEADER_LEN..total) else {
                return Ok(None);
            };
            let chunk = Reply::Chunk {
                flags: be_u16(&b[4..6]),
                kind: be_u16(&b[6..8]),
                cookie: be_u64(&b[8..16]),
                payload: payload.to_vec(),
            };
            Ok(Some((chunk, total)))
        }
        other => Err(ProtoError::BadReplyMagic(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the client-side parsers refuse wrong magics and oversized lengths.
    #[test]
    fn malformed_server_messages() {
        assert_eq!(parse_greeting(&[0; 18]), Err(ProtoError::BadGreeting));
        assert_eq!(parse_greeting(&[0; 17]), Ok(None));
        assert!(matches!(
            parse_option_reply(&[1; 20]),
            Err(ProtoError::BadOptionReplyMagic(_))
        ));
        assert!(matches!(
            parse_reply(&[1; 20]),
            Err(ProtoError::BadReplyMagic(0x0101_0101))
        ));
        let mut big =
            crate::transmission::chunk_header(0, 1, 0, MAX_CHUNK_PAYLOAD_LEN + 1).to_vec();
        assert!(matches!(parse_reply(&big), Err(ProtoError::TooLong { .. })));
        big[19] = 0; // a length that fits, but the payload has not arrived
        assert_eq!(parse_reply(&big), Ok(None));
        let mut rep = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        rep.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            parse_option_reply(&rep),
            Err(ProtoError::TooLong { .. })
        ));
    }
}
