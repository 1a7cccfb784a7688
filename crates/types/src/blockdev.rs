//! The seam between an I/O front end and a volume's data path.
//!
//! A front end (the NBD server) turns each client command into an [`IoRequest`] and calls
//! [`BlockDevice::submit`] with a completion callback ([`IoDone`]). The device calls the
//! callback exactly once, from any thread, possibly before `submit` returns. Requests
//! submitted concurrently may complete in any order; the device gives the guarantees of a
//! disk with a volatile write cache:
//!
//! - a write is visible to every later read once its completion ran;
//! - a [`IoRequest::Flush`] completes only after every write whose completion had run before
//!   the flush was submitted (on any connection) is durable;
//! - a write with `fua` is durable before its completion runs.
//!
//! Offsets and lengths have been checked against [`BlockDevice::size_bytes`] by the front
//! end; a device still refuses out-of-range requests with [`IoError::OutOfRange`].

use std::fmt;

/// One request to a block device. Lengths are in bytes.
#[derive(Debug)]
pub enum IoRequest {
    Read {
        offset: u64,
        len: u32,
    },
    /// `data` is shared, not copied, when the request fans out to several replicas.
    Write {
        offset: u64,
        data: crate::DataBuf,
        fua: bool,
    },
    Flush,
    /// Discard: the range may read back as anything afterwards (we return zeroes).
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// Make the range read as zeroes. With `may_punch` the device may deallocate it (NBD
    /// without `NO_HOLE`); without, the range stays allocated.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    },
    /// Allocation status of the range (`base:allocation`).
    BlockStatus {
        offset: u64,
        len: u64,
    },
}

impl IoRequest {
    /// A short name for metrics and logs.
    pub fn kind(&self) -> IoKind {
        match self {
            IoRequest::Read { .. } => IoKind::Read,
            IoRequest::Write { .. } => IoKind::Write,
            IoRequest::Flush => IoKind::Flush,
            IoRequest::Trim { .. } => IoKind::Trim,
            IoRequest::WriteZeroes { .. } => IoKind::WriteZeroes,
            IoRequest::BlockStatus { .. } => IoKind::BlockStatus,
        }
    }
}

/// Request kinds, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl IoKind {
    pub const ALL: [IoKind; 6] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Trim,
        IoKind::WriteZeroes,
        IoKind::BlockStatus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Trim => "trim",
            IoKind::WriteZeroes => "write_zeroes",
            IoKind::BlockStatus => "block_status",
        }
    }
}

/// A successful completion.
#[derive(Debug, PartialEq, Eq)]
pub enum IoReply {
    /// The bytes of a read, exactly `len` long.
    Data(Vec<u8>),
    /// Write, flush, trim or write-zeroes done.
    Done,
    /// Block status: consecutive extents starting at the request's offset, covering at least
    /// one byte and at most the requested range.
    Extents(Vec<Extent>),
}

/// One run of bytes with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads as zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// Why a request failed. Each maps onto one NBD error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("no space left on the volume's storage")]
    NoSpace,
    #[error("request is outside the volume")]
    OutOfRange,
    #[error("request is malformed: {0}")]
    Invalid(String),
    /// The volume is faulted after an earlier write or sync failure (fail-stop) or was
    /// fenced; it accepts no I/O until it is recovered.
    #[error("volume is faulted: {0}")]
    Faulted(String),
    #[error("operation is not supported")]
    Unsupported,
    #[error("the volume is shutting down")]
    ShuttingDown,
}

/// The completion callback: called exactly once.
pub type IoDone = Box<dyn FnOnce(Result<IoReply, IoError>) + Send + 'static>;

/// A block device a front end can serve.
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size in bytes. May grow while the device is open (resize); a front end reads
    /// it when a client connects.
    fn size_bytes(&self) -> u64;

    /// Starts one request; `done` is called exactly once with its outcome.
    fn submit(&self, req: IoRequest, done: IoDone);
}

impl fmt::Display for IoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
