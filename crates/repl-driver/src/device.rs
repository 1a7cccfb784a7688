//! [`ReplicatedDevice`]: the handle the NBD server and the agent hold. It implements
//! [`BlockDevice`] by posting each request to the event loop, and exposes status, the
//! resync rate, and stopping.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bw_types::{BlockDevice, Generation, IoDone, IoError, IoRequest};
use replication::{Config, RegionSet, ReplicaId, ReplicaState, Status};
use tokio::sync::{mpsc, watch};

use crate::driver::Msg;
use crate::meta::MetaError;
use crate::ports::ReplicaSpec;

/// Default wait between reconnect attempts to a replica that is down.
pub const DEFAULT_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// Default longest a replica request (data, metadata, copy chunk) or a catalog transaction
/// may take. Hit by a replica request → that session is failed and closed (the core then
/// drops the replica through the catalog, or stops if it was the last in-sync one); by a
/// catalog transaction → answered `Unavailable` (retried). 10 s is far beyond a healthy
/// disk or link, short enough that a hung peer does not stall the guest for long.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How one attachment is run.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// The core's tuning (volume size, region size, limits, timeouts).
    pub core: Config,
    /// Resync rate per replica being resynced (`--resync-rate`); `None` = unthrottled.
    pub resync_rate_bytes_per_s: Option<u64>,
    /// Wait between reconnect attempts to a replica that is down.
    pub reconnect_interval: Duration,
    /// See [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
}

impl DriverOptions {
    /// Defaults for a volume of `volume_size_bytes`.
    pub fn new(volume_size_bytes: u64) -> DriverOptions {
        DriverOptions {
            core: Config::new(volume_size_bytes),
            resync_rate_bytes_per_s: None,
            reconnect_interval: DEFAULT_RECONNECT_INTERVAL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// Why the driver stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopReason {
    /// The core ended the attachment (fenced, lease lost, superseded, last replica lost).
    #[error(transparent)]
    Core(replication::StopReason),
    /// [`ReplicatedDevice::stop`] was called, or the device was dropped.
    #[error("stopped: {0}")]
    Requested(String),
}

/// Why [`crate::start`] failed. Every session it opened is closed again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("invalid driver options: {0}")]
    InvalidOptions(String),
    /// A replica refused our generation, or holds metadata of a newer one.
    #[error("fenced by generation {0}")]
    Fenced(Generation),
    /// No replica the catalog lists in sync answered within the connect timeout. The
    /// caller may retry the attachment later.
    #[error("no in-sync replica was reachable within the connect timeout")]
    NoInSyncReplica,
    /// A metadata blob could not be read (never guessed around).
    #[error("replica {replica}: unreadable replication metadata")]
    Meta {
        replica: String,
        #[source]
        source: MetaError,
    },
    #[error("replica {replica}: metadata uses {found}-byte regions, the volume {expected}-byte")]
    RegionSize {
        replica: String,
        found: u64,
        expected: u64,
    },
}

/// One replica in [`DriverStatus`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaDriverStatus {
    pub id: ReplicaId,
    pub label: String,
    pub state: ReplicaState,
    /// A session is open (and reported to the core).
    pub connected: bool,
    /// Progress of the current resync pass.
    pub resync_copied_regions: u64,
    pub resync_total_regions: u64,
    pub resync_copied_bytes: u64,
    pub resync_total_bytes: u64,
    /// Copy rate over the last few seconds ([`crate::RATE_WINDOW`]).
    pub resync_rate_bytes_per_s: u64,
    /// Time left at the current rate (`None` when not resyncing or not moving).
    pub resync_eta_s: Option<u64>,
    /// Bytes copied to this replica by resync since the attachment started.
    pub resynced_bytes_total: u64,
    /// Bytes this replica may lack (its dirty regions × region size): what a resync still
    /// has to copy before it can rejoin. 0 for an in-sync replica.
    pub dirty_bytes: u64,
    pub last_error: Option<String>,
}

/// Status of one attachment: the core's view plus the driver's per-replica figures.
/// Refreshed by the event loop after every batch of messages and tick, and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverStatus {
    pub core: Status,
    pub replicas: Vec<ReplicaDriverStatus>,
    pub stopped: Option<StopReason>,
    /// Regions copied by crash reconciliation since the attachment started.
    pub reconciled_regions: u64,
}

/// State shared between the handle and the event loop.
pub(crate) struct Shared {
    pub status: Mutex<DriverStatus>,
    pub stopped: Mutex<Option<StopReason>>,
    pub rate: Mutex<Option<u64>>,
    /// True once the loop ended and every session was closed.
    pub closed: watch::Sender<bool>,
}

/// A replicated volume as a block device. Dropping the last handle stops the attachment
/// like [`ReplicatedDevice::stop`] (no clean detach: the next attachment reconciles the
/// activity log).
pub struct ReplicatedDevice {
    pub(crate) tx: mpsc::UnboundedSender<Msg>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) size_bytes: u64,
}

impl std::fmt::Debug for ReplicatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedDevice")
            .field("size_bytes", &self.size_bytes)
            .field("stopped", &self.stopped())
            .finish()
    }
}

impl ReplicatedDevice {
    /// The latest status (as of the event loop's last iteration).
    pub fn status(&self) -> DriverStatus {
        self.shared.status.lock().unwrap().clone()
    }

    /// Changes the resync rate (bytes per second per replica, `None` = unthrottled); it
    /// applies from the next tick's credit.
    pub fn set_resync_rate(&self, rate_bytes_per_s: Option<u64>) {
        *self.shared.rate.lock().unwrap() = rate_bytes_per_s;
    }

    /// Ends the attachment now: requests not yet answered fail, every session is closed.
    /// Not a drain: call it once the front end has no request in flight. Idempotent.
    pub fn stop(&self, reason: &str) {
        let _ = self
            .tx
            .send(Msg::Stop(StopReason::Requested(reason.to_string())));
    }

    /// Clean detach: call once the front end has no request in flight. Empties the
    /// activity log (a flush on every replica, then the removal of every region, persisted
    /// on every replica that counts), then stops like [`ReplicatedDevice::stop`]. True if
    /// the log was emptied within `timeout`: the next attachment then has nothing to
    /// reconcile. False (timeout, a counted replica down, already stopped): it stopped
    /// anyway and the next attachment reconciles what the log holds, as after a crash.
    pub async fn detach(&self, timeout: Duration) -> bool {
        let (done, rx) = tokio::sync::oneshot::channel();
        let deadline = std::time::Instant::now() + timeout;
        if self.tx.send(Msg::Detach { deadline, done }).is_err() {
            return false;
        }
        // The loop stops after answering (or dropped the sender because it already stopped).
        let emptied = rx.await.unwrap_or(false);
        self.closed().await;
        emptied
    }

    /// Adds a replica to the live volume (`volume add-replica`): out of sync, with `dirty`
    /// to copy (every allocated region for a new empty replica). The driver connects it
    /// (session 1, then retries), resyncs it, and it joins the in-sync set through the
    /// catalog like a replica coming back. An id already attached is ignored.
    pub fn add_replica(&self, spec: ReplicaSpec, dirty: RegionSet) {
        let _ = self.tx.send(Msg::AddReplica(spec, dirty));
    }

    pub fn stopped(&self) -> Option<StopReason> {
        self.shared.stopped.lock().unwrap().clone()
    }

    /// Resolves once the attachment stopped and every session is closed.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

impl BlockDevice for ReplicatedDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        if let Some(reason) = self.stopped() {
            return done(Err(IoError::Faulted(reason.to_string())));
        }
        if let Err(mpsc::error::SendError(Msg::Client { done, .. })) =
            self.tx.send(Msg::Client { req, done })
        {
            done(Err(IoError::ShuttingDown));
        }
    }
}

impl Drop for ReplicatedDevice {
    fn drop(&mut self) {
        let _ = self
            .tx
            .send(Msg::Stop(StopReason::Requested("device dropped".into())));
    }
}
