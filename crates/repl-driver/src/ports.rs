//! The seams the driver reaches the outside world through: replica sessions ([`Leg`],
//! opened by a [`Connector`]) and the catalog ([`CatalogPort`]). The agent writes the
//! adapters (local store replica, remote peer replica, etcd/redb catalog); the tests use
//! in-process replicas over real files.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bw_types::{BlockDevice, Generation};
use replication::{CatalogOp, ReplicaId, TxnOutcome};

/// A boxed, sendable future (the workspace has no `futures` crate).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One session to one replica: a connection, or the local replica opened for this session.
///
/// Everything sent on a session that ended counts as failed; the driver never reuses a
/// closed leg, it asks the [`Connector`] for a new session.
pub trait Leg: Send + Sync + 'static {
    /// The data path of this session: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS.
    /// An error reply means the replica failed (or fenced us: the driver then asks
    /// [`Leg::fenced`]).
    fn device(&self) -> Arc<dyn BlockDevice>;

    /// `Some(highest)` once this session learnt that the replica admitted a newer
    /// generation than ours.
    fn fenced(&self) -> Option<Generation>;

    /// The replication metadata blob last written to this replica (`None`: never written).
    fn read_meta(&self) -> BoxFut<'_, Result<Option<Vec<u8>>, LegError>>;

    /// Durably replaces the blob, fenced by generation and session like data: when this
    /// resolves `Ok`, the blob survives a crash of the replica.
    fn write_meta(&self, blob: Vec<u8>) -> BoxFut<'_, Result<(), LegError>>;

    /// Resolves when the session ended by itself (connection lost, peer dead), with a
    /// reason. Resolving after [`Leg::close`] is allowed (the driver ignores it then).
    fn closed(&self) -> BoxFut<'static, String>;

    /// Ends the session (idempotent). Requests still in flight fail or are discarded.
    fn close(&self);
}

/// Why a metadata operation on a leg failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegError {
    /// The replica admitted a newer generation.
    #[error("fenced by generation {0}")]
    Fenced(Generation),
    /// Anything else: the replica failed for this attachment.
    #[error("{0}")]
    Failed(String),
}

/// Why a session could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The replica refused our generation: a newer attachment exists.
    #[error("fenced by generation {0}")]
    Fenced(Generation),
    /// Not reachable now; the driver retries.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

/// Opens sessions to replicas.
pub trait Connector: Send + Sync + 'static {
    /// Opens session number `session` to `replica`. Session numbers are strictly increasing
    /// per replica within one attachment, starting at 1 (a failed attempt uses up its
    /// number). The returned leg must have admitted the attachment's generation, and
    /// (design doc, driver requirement 4) the replica must have finished or discarded every
    /// request of this attachment's earlier sessions before this resolves: nothing of an
    /// older session may land after the new session's first request.
    fn connect(
        &self,
        replica: ReplicaId,
        session: u64,
    ) -> BoxFut<'static, Result<Arc<dyn Leg>, ConnectError>>;
}

/// The catalog's generation-conditioned compare-and-swap of the in-sync set.
pub trait CatalogPort: Send + Sync + 'static {
    /// Runs `op`. Idempotent; `Refused` when the volume's generation is no longer the
    /// one in `op`; `Unavailable` when the outcome is unknown (the core retries).
    fn txn(&self, op: CatalogOp) -> BoxFut<'static, TxnOutcome>;
}

/// What the catalog says about one replica at attach time.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub id: ReplicaId,
    /// Node name, for messages and status.
    pub label: String,
    /// On this node: reads, resync copies and BLOCK_STATUS prefer it.
    pub local: bool,
    /// The catalog lists it in the in-sync set.
    pub in_sync: bool,
    /// The latest generation at which the catalog had it in sync.
    pub last_in_sync_generation: Generation,
}
