//! Errors of the codec. A [`ProtoError`] means the byte stream can no longer be trusted: the
//! only safe reaction is to close the connection (the server first says why). Problems
//! inside a well-framed request are not `ProtoError`s but [`crate::RequestError`]s, answered
//! with an error reply while the connection goes on.

/// Input that can never become a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("not a blockwarden peer hello (bad magic)")]
    BadHelloMagic,
    #[error("not a blockwarden peer server answer (bad magic)")]
    BadServerMagic,
    #[error("{what} of {len} bytes is longer than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what} is {len} bytes, shorter than the {need} bytes it must have")]
    TooShort {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("hello offers versions {min}..={max}, an empty range")]
    BadVersionRange { min: u16, max: u16 },
    #[error("unknown handshake answer kind {0}")]
    UnknownAnswer(u16),
    #[error("frame does not start with the frame magic (got {0:#010x})")]
    BadFrameMagic(u32),
    #[error("unexpected frame type {0:#06x}")]
    UnexpectedType(u16),
    #[error("malformed {what}")]
    Malformed { what: &'static str },
}
