//! What the server serves: the [`Exports`] catalogue the embedding process implements, and
//! what opening one yields.

use std::sync::Arc;

use bw_types::{BlockDevice, IoMetrics};
use tokio::sync::watch;

/// The set of exports (volumes) a server offers. Implemented by the agent over its catalog;
/// called from connection tasks, so calls must not block for long.
pub trait Exports: Send + Sync + 'static {
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
    /// One export's details, for `NBD_OPT_INFO` and the metadata-context options. Must NOT
    /// mark the volume in use: a client may only be looking.
    fn info(&self, name: &str) -> Result<ExportInfo, OpenError>;
    /// Opens an export for I/O (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`); marks it in use until
    /// [`OpenExport::guard`] is dropped.
    fn open(&self, name: &str) -> Result<OpenExport, OpenError>;
}

/// What a client may learn about an export without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Shown to humans by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`; may be empty.
    pub description: String,
}

/// An export opened by one connection.
pub struct OpenExport {
    pub info: ExportInfo,
    /// Where requests go. Its `size_bytes()` at open time is the size the client sees.
    pub device: Arc<dyn BlockDevice>,
    /// Every answered request is recorded here (kind, payload bytes, latency, ok).
    pub metrics: Arc<IoMetrics>,
    /// Dropped when the connection ends; releases the in-use mark.
    pub guard: Box<dyn Send + Sync>,
    /// Becomes `true` when the connection must close at once (forced delete, fencing):
    /// in-flight requests are abandoned, their completions go nowhere.
    pub kill: watch::Receiver<bool>,
}

impl std::fmt::Debug for OpenExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenExport")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Why an export cannot be opened. The message reaches the client (qemu prints it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No such export → `NBD_REP_ERR_UNKNOWN`.
    #[error("{0}")]
    Unknown(String),
    /// Held by another attachment; the message names the holder → `NBD_REP_ERR_POLICY`
    /// (the option is valid, policy refuses it).
    #[error("{0}")]
    InUse(String),
    /// Exists but cannot serve I/O now (faulted, not ready) → `NBD_REP_ERR_UNKNOWN`, whose
    /// spec meaning is "the requested export is not available".
    #[error("{0}")]
    Unavailable(String),
}

impl OpenError {
    /// The `NBD_REP_ERR_*` reply for this error.
    pub fn reply_type(&self) -> u32 {
        use nbd_proto::consts::{REP_ERR_POLICY, REP_ERR_UNKNOWN};
        match self {
            OpenError::Unknown(_) | OpenError::Unavailable(_) => REP_ERR_UNKNOWN,
            OpenError::InUse(_) => REP_ERR_POLICY,
        }
    }
}
