//! Errors of the codec: input that cannot be resynchronised (the only safe reaction is to
//! drop the connection). Recoverable problems inside a well-framed option are not errors:
//! they parse to [`crate::OptionBody::Malformed`] so negotiation can go on.

/// A frame that breaks the protocol so badly that the byte stream cannot be trusted further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("client flags {0:#x} contain bits this server does not know")]
    UnknownClientFlags(u32),
    #[error("option does not start with IHAVEOPT (got {0:#018x})")]
    BadOptionMagic(u64),
    #[error("request does not start with the request magic (got {0:#010x})")]
    BadRequestMagic(u32),
    #[error("server greeting does not start with NBDMAGIC/IHAVEOPT")]
    BadGreeting,
    #[error("option reply does not start with the reply magic (got {0:#018x})")]
    BadOptionReplyMagic(u64),
    #[error("reply does not start with a known reply magic (got {0:#010x})")]
    BadReplyMagic(u32),
    #[error("{what} of {len} bytes is longer than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
}
