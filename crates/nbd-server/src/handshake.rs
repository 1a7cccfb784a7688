//! Option haggling: answers each client option until the client enters transmission
//! (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`), aborts, or breaks the protocol.

use nbd_proto::consts::*;
use nbd_proto::handshake::{self as hs, parse_client_flags, parse_option};
use nbd_proto::{ClientFlags, InfoRequest, MetaRequest, OptionBody};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::exports::{ExportInfo, Exports, OpenExport};
use crate::framed::{FrameError, FrameReader};

/// The id we give `base:allocation` in `NBD_OPT_SET_META_CONTEXT` replies and block-status
/// chunks. Any value works; nonzero so a client that wrongly treats 0 as "none" still works.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed on; everything transmission needs.
pub(crate) struct Session {
    pub(crate) export: OpenExport,
    /// Export size sent to the client; requests are checked against it.
    pub(crate) size: u64,
    /// Structured replies negotiated: READ answers with chunks, errors carry messages.
    pub(crate) structured: bool,
    /// `base:allocation` selected for this export: BLOCK_STATUS allowed.
    pub(crate) block_status: bool,
}

/// Why a handshake ended without a session (a clean `NBD_OPT_ABORT` is not an error).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("reading the client failed")]
    Frame(#[from] FrameError),
    #[error("writing to the client failed")]
    Write(#[from] std::io::Error),
    #[error("client ended the connection during negotiation")]
    Eof,
    #[error("NBD_OPT_EXPORT_NAME for {name:?} refused: {reason}")]
    ExportNameRefused { name: String, reason: String },
}

/// State that options build up before transmission.
#[derive(Default)]
struct Haggle {
    client: ClientFlags,
    structured: bool,
    /// The export named by the last successful SET_META_CONTEXT that selected
    /// `base:allocation` (spec: it only counts if GO names the same export).
    meta_export: Option<String>,
}

/// Runs the handshake; `Ok(None)` when the client aborted.
pub(crate) async fn negotiate<R, W>(
    reader: &mut FrameReader<R>,
    w: &mut W,
    exports: &dyn Exports,
) -> Result<Option<Session>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    hs::encode_greeting(&mut out);
    w.write_all(&out).await?;
    let client = reader
        .next(parse_client_flags)
        .await?
        .ok_or(HandshakeError::Eof)?;
    let mut st = Haggle {
        client,
        ..Haggle::default()
    };
    loop {
        let opt = reader
            .next(parse_option)
            .await?
            .ok_or(HandshakeError::Eof)?;
        out.clear();
        let step = match opt.body {
            OptionBody::ExportName(name) => {
                return export_name(w, exports, &st, name).await.map(Some)
            }
            OptionBody::Abort => {
                hs::encode_rep_ack(&mut out, opt.code);
                // The client may already have closed; its reply is a courtesy.
                let _ = w.write_all(&out).await;
                return Ok(None);
            }
            OptionBody::TooBig { len } => {
                if opt.code == OPT_EXPORT_NAME {
                    return Err(refused("?", "export name too long"));
                }
                reader.discard(len.into()).await?;
                hs::encode_rep_error(&mut out, opt.code, REP_ERR_TOO_BIG, "option data too long");
                None
            }
            OptionBody::Malformed(why) if opt.code == OPT_EXPORT_NAME => {
                return Err(refused("?", why))
            }
            OptionBody::Go(req) => go(&mut out, exports, &st, req),
            body => {
                answer(&mut out, exports, &mut st, opt.code, body);
                None
            }
        };
        w.write_all(&out).await?;
        if step.is_some() {
            return Ok(step);
        }
    }
}

fn refused(name: &str, reason: &str) -> HandshakeError {
    HandshakeError::ExportNameRefused {
        name: name.into(),
        reason: reason.into(),
    }
}

/// `NBD_OPT_EXPORT_NAME`: the old way in; a refusal can only be a hard disconnect.
async fn export_name<W: AsyncWrite + Unpin>(
    w: &mut W,
    exports: &dyn Exports,
    st: &Haggle,
    name: String,
) -> Result<Session, HandshakeError> {
    let export = exports
        .open(&name)
        .map_err(|e| refused(&name, &e.to_string()))?;
    let size = export.device.size_bytes();
    let mut out = Vec::new();
    let flags = hs::server_transmission_flags(st.structured);
    hs::encode_export_name_reply(&mut out, size, flags, st.client.no_zeroes);
    w.write_all(&out).await?;
    let block_status = st.structured && st.meta_export.as_deref() == Some(name.as_str());
    Ok(Session {
        export,
        size,
        structured: st.structured,
        block_status,
    })
}

/// `NBD_OPT_GO`: opens the export and enters transmission, or replies with the error.
fn go(out: &mut Vec<u8>, exports: &dyn Exports, st: &Haggle, req: InfoRequest) -> Option<Session> {
    match exports.open(&req.name) {
        Ok(export) => {
            let size = export.device.size_bytes();
            info_replies(
                out,
                OPT_GO,
                &export.info,
                size,
                st.structured,
                &req.info_types,
            );
            let block_status =
                st.structured && st.meta_export.as_deref() == Some(req.name.as_str());
            Some(Session {
                export,
                size,
                structured: st.structured,
                block_status,
            })
        }
        Err(e) => {
            hs::encode_rep_error(out, OPT_GO, e.reply_type(), &e.to_string());
            None
        }
    }
}

/// Every option that does not end the handshake.
fn answer(out: &mut Vec<u8>, exports: &dyn Exports, st: &mut Haggle, code: u32, body: OptionBody) {
    match body {
        OptionBody::List => {
            for e in exports.list() {
                hs::encode_rep_server(out, &e.name, &e.description);
            }
            hs::encode_rep_ack(out, code);
        }
        OptionBody::Info(req) => match exports.info(&req.name) {
            Ok(info) => info_replies(
                out,
                code,
                &info,
                info.size_bytes,
                st.structured,
                &req.info_types,
            ),
            Err(e) => hs::encode_rep_error(out, code, e.reply_type(), &e.to_string()),
        },
        OptionBody::StructuredReply => {
            st.structured = true;
            hs::encode_rep_ack(out, code);
        }
        OptionBody::ListMetaContext(req) => meta_context(out, exports, st, code, req, false),
        OptionBody::SetMetaContext(req) => meta_context(out, exports, st, code, req, true),
        OptionBody::Malformed(why) => hs::encode_rep_error(out, code, REP_ERR_INVALID, why),
        OptionBody::Unsupported => hs::encode_rep_error(
            out,
            code,
            REP_ERR_UNSUP,
            &format!("option {code} is not supported"),
        ),
        // Handled by the caller; listed so a new variant is a compile error here.
        OptionBody::ExportName(_)
        | OptionBody::Abort
        | OptionBody::Go(_)
        | OptionBody::TooBig { .. } => {
            unreachable!("handled in negotiate")
        }
    }
}

/// The `NBD_REP_INFO` replies and the final ACK of a successful INFO or GO.
fn info_replies(
    out: &mut Vec<u8>,
    code: u32,
    info: &ExportInfo,
    size: u64,
    structured: bool,
    asked: &[u16],
) {
    hs::encode_info_export(out, code, size, hs::server_transmission_flags(structured));
    if asked.contains(&INFO_NAME) {
        hs::encode_info_string(out, code, INFO_NAME, &info.name);
    }
    if asked.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
        hs::encode_info_string(out, code, INFO_DESCRIPTION, &info.description);
    }
    // Sent even when not asked: they are the spec's defaults, so a client that ignores them
    // loses nothing, and one that reads them learns our 32 MiB payload limit.
    hs::encode_info_block_size(out, code);
    hs::encode_rep_ack(out, code);
}

/// LIST_META_CONTEXT (`set == false`) and SET_META_CONTEXT (`set == true`).
fn meta_context(
    out: &mut Vec<u8>,
    exports: &dyn Exports,
    st: &mut Haggle,
    code: u32,
    req: MetaRequest,
    set: bool,
) {
    if set {
        // Spec: a SET replaces the previous selection even when it fails.
        st.meta_export = None;
    }
    if !st.structured {
        let why = "negotiate NBD_OPT_STRUCTURED_REPLY first";
        return hs::encode_rep_error(out, code, REP_ERR_INVALID, why);
    }
    if let Err(e) = exports.info(&req.name) {
        return hs::encode_rep_error(out, code, e.reply_type(), &e.to_string());
    }
    let matches = if set {
        req.queries.iter().any(|q| q == META_BASE_ALLOCATION)
    } else {
        // No query lists everything; "base:" is the namespace wildcard.
        req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| q == "base:" || q == META_BASE_ALLOCATION)
    };
    if matches {
        // LIST replies carry id 0 (spec: reserved, clients disregard it).
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        hs::encode_rep_meta_context(out, code, id, META_BASE_ALLOCATION);
        if set {
            st.meta_export = Some(req.name);
        }
    }
    hs::encode_rep_ack(out, code);
}
