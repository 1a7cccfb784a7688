//! What the driver tells the core when it attaches a volume: tuning, limits, and the state
//! the catalog and the persisted metadata hold about each replica.

use bw_types::Generation;

use crate::ids::{RegionSet, ReplicaId};

/// Default region size: 1 MiB. One bit of dirty bitmap per MiB keeps a 1 TiB volume's
/// bitmap at 128 KiB, and one activity-log entry per MiB makes a 4 KiB random write re-log
/// its region only when it went cold; DRBD's 4 MiB AL extents / 4 KiB bitmap granularity
/// sit on either side of it.
pub const DEFAULT_REGION_SIZE_BYTES: u64 = 1 << 20;

/// Default number of regions the activity log may hold at once (DRBD's `al-extents`).
/// 4096 × 1 MiB = at most 4 GiB to reconcile after an attachment crash (a few seconds on
/// the disks and links we target; usually far less, since idle regions go cold after
/// `DEFAULT_AL_HOT_MS`). DRBD's default covers ~4.8 GiB (1237 × 4 MiB extents). When the log
/// is full, a write that needs a new region evicts the least recently used flushed regions
/// (see the design doc); a working set larger than the log costs a flush per eviction
/// round on every replica.
pub const DEFAULT_MAX_ACTIVE_REGIONS: usize = 4096;

/// Default time a region stays in the activity log after its last write, so a burst of
/// writes to one region costs one durable log update, not one per write.
pub const DEFAULT_AL_HOT_MS: u64 = 2_000;

/// Default wait before retrying a catalog transaction that came back `Unavailable`. The
/// catalog client already tries every endpoint for up to 2.5 s (control-plane.md), so
/// retrying faster only adds load to a struggling store.
pub const DEFAULT_CATALOG_RETRY_MS: u64 = 500;

/// Default time a new attachment waits for the catalog's in-sync replicas to connect before
/// it drops the missing ones from the in-sync set (through the catalog, like any failure)
/// and reconciles from those that answered. Longer than a replica agent restart is likely to
/// take, shorter than an operator's patience.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Client requests the core holds at once (queued plus in flight). Beyond it a request is
/// refused with [`crate::RequestError::Busy`]; the driver's own limits (the NBD server's
/// 128 requests per connection) normally apply backpressure long before.
pub const MAX_CLIENT_REQUESTS: usize = 4096;

/// Resync credits the core keeps per replica. A credit is the driver's rate limiter saying
/// "you may start one more region copy"; credits beyond this are dropped, so a driver that
/// over-grants cannot make the core start a burst of copies that would stall writes to
/// every region being copied.
pub const MAX_RESYNC_CREDITS: u32 = 8;

/// Reconciliation copies in flight at once after a takeover. Reconciliation blocks all I/O,
/// so it runs unthrottled, but bounded so the driver is not handed a thousand copies at once.
pub const MAX_RECONCILE_COPIES: usize = 16;

/// Rules the core enforces. Every field is `true` in production ([`Rules::default`]); the
/// simulation's "teeth" tests switch one off to prove the checkers catch the violation.
/// Never change these outside tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// A failed in-sync replica leaves the set only after the catalog committed
    /// "out of sync, conditioned on our generation". Off: it is dropped at once (split brain).
    pub require_catalog_to_drop: bool,
    /// A write is acknowledged only once its regions are durably dirty for every replica
    /// that did not apply it. Off: acknowledged on the in-memory bitmap. (With the ordered
    /// metadata stream the activity log already covers this case, and the simulation does
    /// not catch it switched off; see the design doc.)
    pub bitmap_durable_before_ack: bool,
    /// Writes to a region wait while the region is being copied to a resyncing replica.
    /// Off: they go out at once and may be overwritten on the target by the older copy.
    pub hold_writes_during_copy: bool,
    /// A new attachment reconciles the previous activity log before serving I/O. Off: it
    /// serves at once and the replicas may differ where writes were in flight (G5).
    pub reconcile_before_serving: bool,
    /// A replica that finished its resync drains the writes in flight to it before its
    /// barrier flush, so the barrier covers every write acknowledged without it. Off: the
    /// barrier is sent at once and may miss an acknowledged, flushed write.
    pub drain_before_barrier: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            require_catalog_to_drop: true,
            bitmap_durable_before_ack: true,
            hold_writes_during_copy: true,
            reconcile_before_serving: true,
            drain_before_barrier: true,
        }
    }
}

/// Tuning of one attached volume.
#[derive(Clone, Debug)]
pub struct Config {
    pub volume_size_bytes: u64,
    /// Unit of the activity log, the dirty bitmaps and resync.
    pub region_size_bytes: u64,
    /// Fewest in-sync replicas that still accept writes (`--min-in-sync`, default 1). Below
    /// it, writes and flushes are held, never acknowledged.
    pub min_in_sync: usize,
    pub max_active_regions: usize,
    pub al_hot_ms: u64,
    pub catalog_retry_ms: u64,
    pub connect_timeout_ms: u64,
    pub rules: Rules,
}

impl Config {
    /// Defaults for a volume of `volume_size_bytes`.
    pub fn new(volume_size_bytes: u64) -> Config {
        Config {
            volume_size_bytes,
            region_size_bytes: DEFAULT_REGION_SIZE_BYTES,
            min_in_sync: 1,
            max_active_regions: DEFAULT_MAX_ACTIVE_REGIONS,
            al_hot_ms: DEFAULT_AL_HOT_MS,
            catalog_retry_ms: DEFAULT_CATALOG_RETRY_MS,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            rules: Rules::default(),
        }
    }
}

/// What is known about one replica when the volume is attached.
#[derive(Clone, Debug)]
pub struct ReplicaInit {
    pub id: ReplicaId,
    /// On this node: reads prefer it.
    pub local: bool,
    /// The catalog lists it in the in-sync set.
    pub in_sync: bool,
    /// The latest generation at which the catalog had it in sync (the reconciliation source
    /// choice prefers the highest).
    pub last_in_sync_generation: Generation,
    /// Its persisted dirty bitmap (regions it may lack). Ignored when `in_sync`. A replica
    /// added to a live volume starts with every (allocated) region here.
    pub dirty: RegionSet,
}

/// Everything the core needs to start serving an attachment of generation `generation`.
#[derive(Clone, Debug)]
pub struct AttachInit {
    pub generation: Generation,
    pub replicas: Vec<ReplicaInit>,
    /// The activity log persisted by the previous attachment: the regions that may have had
    /// writes in flight when it ended. Empty after a clean detach.
    pub previous_activity_log: RegionSet,
    /// The driver's clock at attach time (milliseconds, any epoch; only differences count).
    pub now_ms: u64,
}
