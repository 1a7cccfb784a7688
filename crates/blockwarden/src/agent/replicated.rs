//! Replicated attachments: the replication driver (`repl-driver`) wired to this node's
//! replicas, its peers and the catalog.
//!
//! - [`LocalLeg`]: the replica on this node, opened for one session through its
//!   generation/session fence (`Replica::device_for_session`); its metadata blob is a file
//!   next to the volume file.
//! - [`RemoteLeg`]: a replica on another node, one `RemoteReplica` (peer protocol) per
//!   session; the session number travels in the handshake, so the peer discards everything
//!   of our earlier sessions before it accepts this one.
//! - [`NodeConnector`] maps the core's replica ids to nodes and opens sessions.
//! - [`NodeCatalog`] runs the in-sync-set transactions conditioned on the generation
//!   (`insync.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bw_types::{BlockDevice, Generation, Name, NodeId, VolumeId};
use catalog::{ClusterStore, Level, ReplicaState, VolumeRecord};
use peer::{ConnectOptions, PeerState, RemoteReplica};
use repl_driver::{
    BoxFut, CatalogPort, ConnectError, Connector, DriverOptions, Leg, LegError, ReplicaSpec,
    ReplicatedDevice,
};
use replication::{CatalogOp, Notice, ReplicaId, ReplicaState as CoreState, TxnOutcome};
use store::{Replica, ReplicaDevice};
use tokio::sync::{mpsc, watch};

use super::attach::AttachError;
use super::node::Node;
use super::session::{Session, SessionState};

/// The replica on this node, for one session.
pub struct LocalLeg {
    replica: Arc<Replica>,
    device: Arc<ReplicaDevice>,
    generation: Generation,
    session: u64,
    closed: watch::Sender<bool>,
}

impl Leg for LocalLeg {
    fn device(&self) -> Arc<dyn BlockDevice> {
        self.device.clone()
    }

    fn fenced(&self) -> Option<Generation> {
        let highest = self.replica.highest();
        (highest > self.generation || self.device.is_fenced()).then_some(highest)
    }

    fn read_meta(&self) -> BoxFut<'_, Result<Option<Vec<u8>>, LegError>> {
        let replica = self.replica.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || replica.read_repl_meta())
                .await
                .map_err(|e| LegError::Failed(e.to_string()))?
                .map_err(|e| LegError::Failed(super::lifecycle::error_chain(&e)))
        })
    }

    fn write_meta(&self, blob: Vec<u8>) -> BoxFut<'_, Result<(), LegError>> {
        let replica = self.replica.clone();
        let (generation, session) = (self.generation, self.session);
        Box::pin(async move {
            let r = tokio::task::spawn_blocking(move || {
                replica.write_repl_meta(generation, session, &blob)
            })
            .await
            .map_err(|e| LegError::Failed(e.to_string()))?;
            match r {
                Ok(()) => Ok(()),
                Err(store::ReplMetaError::Fenced { highest }) => Err(LegError::Fenced(highest)),
                Err(e) => Err(LegError::Failed(super::lifecycle::error_chain(&e))),
            }
        })
    }

    fn closed(&self) -> BoxFut<'static, String> {
        let mut rx = self.closed.subscribe();
        Box::pin(async move {
            let _ = rx.wait_for(|c| *c).await;
            "closed".to_owned()
        })
    }

    fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// A replica on another node, for one session.
pub struct RemoteLeg {
    remote: Arc<RemoteReplica>,
}

impl Leg for RemoteLeg {
    fn device(&self) -> Arc<dyn BlockDevice> {
        self.remote.clone()
    }

    fn fenced(&self) -> Option<Generation> {
        match self.remote.state() {
            PeerState::Fenced { highest } => Some(highest),
            _ => None,
        }
    }

    fn read_meta(&self) -> BoxFut<'_, Result<Option<Vec<u8>>, LegError>> {
        Box::pin(async move { self.remote.read_meta().await.map_err(meta_error) })
    }

    fn write_meta(&self, blob: Vec<u8>) -> BoxFut<'_, Result<(), LegError>> {
        Box::pin(async move { self.remote.write_meta(blob).await.map_err(meta_error) })
    }

    fn closed(&self) -> BoxFut<'static, String> {
        let mut rx = self.remote.subscribe();
        Box::pin(async move {
            loop {
                let state = rx.borrow_and_update().clone();
                match state {
                    PeerState::Connected => {}
                    PeerState::Unreachable { reason } => return reason,
                    PeerState::Fenced { highest } => {
                        return format!("fenced by generation {highest}")
                    }
                    PeerState::Closed => return "closed".to_owned(),
                }
                if rx.changed().await.is_err() {
                    return "closed".to_owned();
                }
            }
        })
    }

    fn close(&self) {
        self.remote.close();
    }
}

fn meta_error(e: peer::MetaError) -> LegError {
    match e {
        peer::MetaError::Fenced { highest } => LegError::Fenced(highest),
        other => LegError::Failed(super::lifecycle::error_chain(&other)),
    }
}

/// Where each replica of one attachment lives.
#[derive(Debug, Clone)]
pub struct Placement {
    pub node_id: NodeId,
    pub node_name: Name,
}

/// The replicas one attachment works with, shared by its connector and the agent: the
/// agent tells it about replicas added or removed by `volume add-replica/remove-replica`.
#[derive(Default)]
pub struct ReplicaSet {
    /// Every replica id the driver knows (placed at attach time or added since).
    known: std::sync::Mutex<std::collections::BTreeSet<ReplicaId>>,
    /// Removed from the volume: never connected again. The driver sees the session end,
    /// drops the replica through the catalog (where it is already gone: committed at once)
    /// and keeps it as a stale replica nobody waits for.
    removed: std::sync::Mutex<std::collections::BTreeSet<ReplicaId>>,
    /// The current session's leg of each replica, to close it on removal.
    legs: std::sync::Mutex<BTreeMap<ReplicaId, Weak<dyn Leg>>>,
    /// Node name of every replica the driver knows, for events.
    labels: std::sync::Mutex<BTreeMap<ReplicaId, String>>,
}

impl ReplicaSet {
    fn is_removed(&self, id: ReplicaId) -> bool {
        self.removed.lock().unwrap().contains(&id)
    }

    /// Replicas in `placed` the driver does not know yet (to add), after noting them.
    pub fn learn(&self, placed: &[ReplicaId]) -> Vec<ReplicaId> {
        let mut known = self.known.lock().unwrap();
        placed
            .iter()
            .copied()
            .filter(|id| known.insert(*id))
            .collect()
    }

    /// Closes and forgets every known replica not in `placed`; returns them.
    pub fn forget_missing(&self, placed: &[ReplicaId]) -> Vec<ReplicaId> {
        let gone: Vec<ReplicaId> = {
            let known = self.known.lock().unwrap();
            let removed = self.removed.lock().unwrap();
            known
                .iter()
                .copied()
                .filter(|id| !placed.contains(id) && !removed.contains(id))
                .collect()
        };
        for id in &gone {
            self.removed.lock().unwrap().insert(*id);
            let leg = self.legs.lock().unwrap().remove(id);
            if let Some(leg) = leg.and_then(|w| w.upgrade()) {
                leg.close();
            }
        }
        gone
    }
}

/// Opens sessions to the replicas of one attachment.
pub struct NodeConnector<C: ClusterStore>(Arc<ConnectorInner<C>>);

struct ConnectorInner<C: ClusterStore> {
    node: Weak<Node<C>>,
    volume: VolumeId,
    name: Name,
    generation: Generation,
    /// Replica ids → nodes; replicas added later are looked up in the catalog.
    placement: std::sync::Mutex<BTreeMap<ReplicaId, Placement>>,
    set: Arc<ReplicaSet>,
}

impl<C: ClusterStore> NodeConnector<C> {
    pub fn new(
        node: &Arc<Node<C>>,
        volume: VolumeId,
        name: Name,
        generation: Generation,
        placement: BTreeMap<ReplicaId, Placement>,
        set: Arc<ReplicaSet>,
    ) -> NodeConnector<C> {
        NodeConnector(Arc::new(ConnectorInner {
            node: Arc::downgrade(node),
            volume,
            name,
            generation,
            placement: std::sync::Mutex::new(placement),
            set,
        }))
    }
}

impl<C: ClusterStore> ConnectorInner<C> {
    async fn where_is(
        &self,
        node: &Node<C>,
        replica: ReplicaId,
    ) -> Result<Placement, ConnectError> {
        if let Some(p) = self.placement.lock().unwrap().get(&replica).cloned() {
            return Ok(p);
        }
        let mut rec = node
            .catalog
            .get_volume(&self.name)
            .await
            .map_err(|e| ConnectError::Unreachable(format!("catalog: {e}")))?
            .ok_or_else(|| ConnectError::Unreachable(format!("volume {} is gone", self.name)))?
            .0;
        rec.assign_replica_ids();
        let p = rec
            .replicas_placed
            .iter()
            .find(|r| r.id == replica.0)
            .map(|r| Placement {
                node_id: r.node_id.clone(),
                node_name: r.node_name.clone(),
            })
            .ok_or_else(|| {
                ConnectError::Unreachable(format!("replica {} is no longer placed", replica.0))
            })?;
        self.placement.lock().unwrap().insert(replica, p.clone());
        Ok(p)
    }

    async fn connect(
        &self,
        replica: ReplicaId,
        session: u64,
    ) -> Result<Arc<dyn Leg>, ConnectError> {
        if self.set.is_removed(replica) {
            return Err(ConnectError::Unreachable(format!(
                "replica {} was removed from the volume",
                replica.0
            )));
        }
        let leg = self.open(replica, session).await?;
        self.set
            .legs
            .lock()
            .unwrap()
            .insert(replica, Arc::downgrade(&leg));
        Ok(leg)
    }

    async fn open(&self, replica: ReplicaId, session: u64) -> Result<Arc<dyn Leg>, ConnectError> {
        let node = self
            .node
            .upgrade()
            .ok_or_else(|| ConnectError::Unreachable("the agent is shutting down".into()))?;
        let at = self.where_is(&node, replica).await?;
        let generation = self.generation;
        if at.node_id == node.me.id {
            let local = node.replica(&self.volume).ok_or_else(|| {
                ConnectError::Unreachable(format!(
                    "the replica of {} on this node is not open",
                    self.name
                ))
            })?;
            let r = local.clone();
            let device =
                tokio::task::spawn_blocking(move || r.device_for_session(generation, session))
                    .await
                    .map_err(|e| ConnectError::Unreachable(e.to_string()))?;
            let device = match device {
                Ok(d) => d,
                Err(_) if local.highest() > generation => {
                    return Err(ConnectError::Fenced(local.highest()))
                }
                Err(e) => return Err(ConnectError::Unreachable(super::lifecycle::error_chain(&e))),
            };
            return Ok(Arc::new(LocalLeg {
                replica: local,
                device: Arc::new(device),
                generation,
                session,
                closed: watch::channel(false).0,
            }));
        }
        let rec = node
            .catalog
            .get_node(&at.node_id)
            .await
            .map_err(|e| ConnectError::Unreachable(format!("catalog: {e}")))?
            .ok_or_else(|| ConnectError::Unreachable(format!("node {} is unknown", at.node_name)))?
            .0;
        let addr = rec
            .peer_addr
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                ConnectError::Unreachable(format!("node {} has no peer address", at.node_name))
            })?;
        let opts = ConnectOptions {
            session,
            ..ConnectOptions::default()
        };
        match RemoteReplica::connect(
            addr,
            node.me.id.clone(),
            self.volume.clone(),
            generation,
            opts,
        )
        .await
        {
            Ok(remote) => Ok(Arc::new(RemoteLeg {
                remote: Arc::new(remote),
            })),
            Err(e) if e.is_fenced() => {
                let highest = match &e {
                    peer::ConnectError::Refused { highest, .. } => *highest,
                    _ => Generation(generation.0 + 1),
                };
                Err(ConnectError::Fenced(highest))
            }
            Err(e) => Err(ConnectError::Unreachable(format!(
                "node {}: {}",
                at.node_name,
                super::lifecycle::error_chain(&e)
            ))),
        }
    }
}

impl<C: ClusterStore> Connector for NodeConnector<C> {
    fn connect(
        &self,
        replica: ReplicaId,
        session: u64,
    ) -> BoxFut<'static, Result<Arc<dyn Leg>, ConnectError>> {
        let inner = self.0.clone();
        Box::pin(async move { inner.connect(replica, session).await })
    }
}

/// Runs the in-sync-set transactions of one attachment.
pub struct NodeCatalog<C: ClusterStore> {
    pub node: Weak<Node<C>>,
    pub name: Name,
}

impl<C: ClusterStore> CatalogPort for NodeCatalog<C> {
    fn txn(&self, op: CatalogOp) -> BoxFut<'static, TxnOutcome> {
        let node = self.node.clone();
        let name = self.name.clone();
        Box::pin(async move {
            match node.upgrade() {
                Some(node) => node.in_sync_txn(&name, op).await,
                // Shutting down: the outcome is unknown to the core; it stops with the lease.
                None => TxnOutcome::Unavailable,
            }
        })
    }
}

/// How long a detach waits for the driver to close its sessions.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resync rate when the volume has none set: fast enough to heal a replica of a busy VM
/// disk in minutes, low enough that the copy (which holds writes to each region it copies)
/// leaves most of a disk's bandwidth to the VM. `volume set --resync-rate 0` lifts it.
pub const DEFAULT_RESYNC_RATE_BYTES_PER_S: u64 = 256 << 20;

/// Resync progress is an event at most this often per replica (the core reports every 64
/// regions; a large resync would otherwise flood the event log).
const PROGRESS_EVENT_INTERVAL: Duration = Duration::from_secs(10);

/// The resync rate the driver should use for a volume's setting (`0` = unthrottled).
pub fn resync_rate(setting: Option<u64>) -> Option<u64> {
    match setting {
        None => Some(DEFAULT_RESYNC_RATE_BYTES_PER_S),
        Some(0) => None,
        Some(r) => Some(r),
    }
}

/// The API's name of a replica state.
fn state_name(s: CoreState) -> &'static str {
    match s {
        CoreState::Connecting => "connecting",
        CoreState::InSync => "in_sync",
        CoreState::Leaving => "leaving",
        CoreState::Stale => "stale",
        CoreState::Faulted => "faulted",
        CoreState::Resyncing => "resyncing",
        CoreState::Rejoining => "rejoining",
    }
}

/// A running replication driver and the replica set it works with.
pub struct Replicated {
    pub device: Arc<ReplicatedDevice>,
    pub set: Arc<ReplicaSet>,
}

impl Replicated {
    /// The driver's status with removed replicas left out (they are closed and gone from
    /// the volume record, only the core still remembers them until the next attach).
    pub fn status(&self) -> repl_driver::DriverStatus {
        let removed = self.set.removed.lock().unwrap().clone();
        let mut status = self.device.status();
        status.replicas.retain(|x| !removed.contains(&x.id));
        status
    }
}

/// Whether a one-replica attachment of `rec` should switch to the driver now: the record
/// lists more replicas and every added one exists on its node (no longer `creating`).
pub fn wants_replication(rec: &VolumeRecord) -> bool {
    rec.state == catalog::VolumeState::Ready
        && rec.replicas_placed.len() > 1
        && rec
            .replicas_placed
            .iter()
            .all(|r| r.state != ReplicaState::Creating)
}

/// Longest a switch to replication waits for the old device to answer the requests it
/// already has (the NBD client's requests in flight; a remote replica's request timeout is
/// of the same order).
pub const SWITCH_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a clean detach waits for the activity log to empty (a flush on every replica,
/// then one metadata write) before it stops anyway and leaves the log to the next
/// attachment's reconciliation.
pub const DETACH_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Detaches a replicated attachment cleanly: empties its activity log (bounded by
/// [`DETACH_DRAIN_TIMEOUT`]), then stops and waits (bounded) until its sessions are closed.
pub async fn detach(r: &Arc<ReplicatedDevice>) {
    // A log left behind is logged by the driver (with its size).
    let drain = r.detach(DETACH_DRAIN_TIMEOUT);
    if tokio::time::timeout(DETACH_DRAIN_TIMEOUT + STOP_TIMEOUT, drain)
        .await
        .is_err()
    {
        log::warn!("the replication driver did not finish the detach; stopping it");
        stop(r).await;
    }
}

/// Stops a replicated attachment and waits (bounded) until its sessions are closed.
pub async fn stop(r: &Arc<ReplicatedDevice>) {
    r.stop("detached");
    if tokio::time::timeout(STOP_TIMEOUT, r.closed())
        .await
        .is_err()
    {
        log::warn!("the replication driver did not close its sessions within {STOP_TIMEOUT:?}");
    }
}

impl<C: ClusterStore> Node<C> {
    /// Starts the replication driver for a new attachment of `rec` at `generation`.
    pub async fn start_replicated(
        self: &Arc<Self>,
        rec: &VolumeRecord,
        generation: Generation,
        session: Arc<Session>,
    ) -> Result<Replicated, AttachError> {
        let mut rec = rec.clone();
        rec.assign_replica_ids();
        let mut specs = Vec::new();
        let mut placement = BTreeMap::new();
        for r in &rec.replicas_placed {
            let id = ReplicaId(r.id);
            specs.push(ReplicaSpec {
                id,
                label: r.node_name.to_string(),
                local: r.node_id == self.me.id,
                in_sync: r.state == ReplicaState::InSync,
                last_in_sync_generation: r.in_sync_generation,
            });
            placement.insert(
                id,
                Placement {
                    node_id: r.node_id.clone(),
                    node_name: r.node_name.clone(),
                },
            );
        }
        let labels: BTreeMap<ReplicaId, String> =
            specs.iter().map(|s| (s.id, s.label.clone())).collect();
        let set = Arc::new(ReplicaSet::default());
        *set.labels.lock().unwrap() = labels;
        set.learn(&specs.iter().map(|s| s.id).collect::<Vec<_>>());
        let mut core = replication::Config::new(rec.size_bytes);
        core.min_in_sync = rec.min_in_sync.unwrap_or(1).max(1) as usize;
        let mut opts = DriverOptions::new(rec.size_bytes);
        opts.core = core;
        opts.resync_rate_bytes_per_s = resync_rate(rec.resync_rate_bytes_per_s);
        let connector = Arc::new(NodeConnector::new(
            self,
            rec.id.clone(),
            rec.name.clone(),
            generation,
            placement,
            set.clone(),
        ));
        let catalog = Arc::new(NodeCatalog {
            node: Arc::downgrade(self),
            name: rec.name.clone(),
        });
        let (lease_tx, lease_rx) = watch::channel(false);
        let mut states = session.subscribe();
        self.runtime.spawn(async move {
            loop {
                if *states.borrow_and_update() != SessionState::Valid {
                    let _ = lease_tx.send(true);
                    return;
                }
                tokio::select! {
                    changed = states.changed() => if changed.is_err() { let _ = lease_tx.send(true); return },
                    _ = lease_tx.closed() => return,
                }
            }
        });
        let (notice_tx, notice_rx) = mpsc::unbounded_channel();
        self.spawn_notice_loop(rec.name.clone(), set.clone(), notice_rx);
        let dev = repl_driver::start(
            opts, generation, specs, connector, catalog, lease_rx, notice_tx,
        )
        .await
        .map_err(|e| AttachError::Replica(format!("volume {}: {e}", rec.name)))?;
        self.spawn_stop_watch(rec.name.clone(), generation, dev.clone());
        Ok(Replicated { device: dev, set })
    }

    /// Switches the one-replica attachment of `name` on this node to the replication driver
    /// once its record lists more replicas (`volume add-replica` on a volume in use), while
    /// its NBD connections stay open: new requests are held (`SwitchDevice::pause`), the
    /// driver starts on the same generation (its first session on the local replica is
    /// admitted only after the direct device's requests drained), then the held requests go
    /// to the driver. The added replica is filled by the driver's resync like any new one.
    /// If the driver cannot start, the held requests fail and the attachment is torn down
    /// (the old device was fenced by the driver's session): an error event says so and a
    /// new attach starts cleanly.
    pub async fn upgrade_to_replicated(self: &Arc<Self>, name: &Name) {
        let _serial = self.attach_lock.lock().await;
        let Some(att) = self.attachment(name) else {
            return;
        };
        let Some(switch) = att.switch.clone() else {
            return;
        };
        if att.replicated.get().is_some() || att.closing.load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let rec = match self.catalog.get_volume(name).await {
            Ok(Some((rec, _))) => rec,
            Ok(None) => return,
            Err(e) => {
                log::warn!("volume {name}: cannot read its record to start replication: {e}");
                return;
            }
        };
        if !wants_replication(&rec) || !switch.pause() {
            return;
        }
        let started = Instant::now();
        // The old device answers what it was given before the driver's sessions fence it.
        // Locally the store's admission would wait for those requests anyway; a remote
        // replica may still have some on the wire, which the fence would refuse.
        let drained = async {
            while switch.outstanding() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let started_driver = match tokio::time::timeout(SWITCH_DRAIN_TIMEOUT, drained).await {
            Err(_) => Err(format!(
                "the replica did not answer {} request(s) within {SWITCH_DRAIN_TIMEOUT:?}",
                switch.outstanding()
            )),
            Ok(()) => {
                // Closed by us: its end is not reported as the replica becoming unreachable.
                if let Some(r) = &att.remote {
                    r.close();
                }
                self.start_replicated(&rec, att.generation, self.session())
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        match started_driver {
            Ok(r) => {
                switch.resume(r.device.clone());
                let n = rec.replicas_placed.len();
                let _ = att.replicated.set(r);
                let msg = format!(
                    "volume {name}: now replicated to {n} replicas without detaching (I/O held for {} ms); the added replica is filled by a resync",
                    started.elapsed().as_millis()
                );
                self.event(Level::Info, "volume.replication_started", Some(name), msg)
                    .await;
            }
            Err(e) => {
                let why = format!("cannot switch the attachment to replication: {e}");
                switch.fail_paused(&why);
                self.event(
                    Level::Error,
                    "volume.replication_failed",
                    Some(name),
                    format!("volume {name}: {why}; the attachment is released, attach it again"),
                )
                .await;
                let _ = att.kill.send(true);
                self.teardown(&att, "volume.detached", &why, false).await;
            }
        }
    }

    /// The live replica states of `name` when it is attached here with replication: the
    /// attachment is the authority on them (the catalog only learns of a failure once the
    /// drop committed, and never of progress).
    pub fn live_replicas(&self, name: &Name) -> Option<Vec<api::ReplicaView>> {
        let att = self.attachment(name)?;
        let status = att.replicated.get()?.status();
        Some(
            status
                .replicas
                .iter()
                .map(|x| {
                    let resyncing = matches!(x.state, CoreState::Resyncing);
                    api::ReplicaView {
                        id: x.id.0,
                        node: x.label.clone(),
                        state: state_name(x.state).to_owned(),
                        in_sync: matches!(x.state, CoreState::InSync),
                        error: x.last_error.clone(),
                        resync: resyncing.then_some(api::ResyncView {
                            copied_bytes: x.resync_copied_bytes,
                            total_bytes: x.resync_total_bytes,
                            rate_bytes_per_s: x.resync_rate_bytes_per_s,
                            eta_s: x.resync_eta_s,
                        }),
                        lag_bytes: Some(x.dirty_bytes),
                    }
                })
                .collect(),
        )
    }

    /// Brings a running attachment in line with its volume record: replicas added by
    /// `volume add-replica` join the driver (out of sync, every region to copy), removed ones
    /// are closed and never reconnected, and a changed resync rate applies to the next copy.
    pub fn sync_replicas(&self, dev: &Arc<ReplicatedDevice>, set: &ReplicaSet, rec: &VolumeRecord) {
        let mut rec = rec.clone();
        rec.assign_replica_ids();
        let ids: Vec<ReplicaId> = rec
            .replicas_placed
            .iter()
            .map(|r| ReplicaId(r.id))
            .collect();
        for id in set.forget_missing(&ids) {
            log::info!(
                "volume {}: replica {} removed; its session is closed",
                rec.name,
                id.0
            );
        }
        for id in set.learn(&ids) {
            let Some(r) = rec.replicas_placed.iter().find(|r| r.id == id.0) else {
                continue;
            };
            // A new replica holds nothing: every region is to be copied (a region that is a
            // hole on the source costs one block-status round trip, no read, no rate).
            let regions = rec
                .size_bytes
                .div_ceil(replication::config::DEFAULT_REGION_SIZE_BYTES);
            let dirty: replication::RegionSet =
                (0..regions).map(replication::RegionIndex).collect();
            set.labels
                .lock()
                .unwrap()
                .insert(id, r.node_name.to_string());
            dev.add_replica(
                ReplicaSpec {
                    id,
                    label: r.node_name.to_string(),
                    local: r.node_id == self.me.id,
                    in_sync: false,
                    last_in_sync_generation: r.in_sync_generation,
                },
                dirty,
            );
        }
        dev.set_resync_rate(resync_rate(rec.resync_rate_bytes_per_s));
    }

    /// Turns the core's notices into events (and alerts, through `event`).
    fn spawn_notice_loop(
        self: &Arc<Self>,
        name: Name,
        set: Arc<ReplicaSet>,
        mut rx: mpsc::UnboundedReceiver<Notice>,
    ) {
        let node = Arc::downgrade(self);
        self.runtime.spawn(async move {
            let mut last_progress: BTreeMap<ReplicaId, Instant> = BTreeMap::new();
            while let Some(n) = rx.recv().await {
                let Some(node) = node.upgrade() else { return };
                let on = |r: &ReplicaId| {
                    let labels = set.labels.lock().unwrap();
                    format!(
                        "replica {} on node {}",
                        r.0,
                        labels.get(r).map(String::as_str).unwrap_or("?")
                    )
                };
                let (level, kind, msg) = match &n {
                    Notice::ReplicaFailed { replica, reason } => (
                        Level::Warning,
                        "replica.failed",
                        format!("volume {name}: {} failed: {reason}", on(replica)),
                    ),
                    Notice::Degraded { replica, in_sync } => (
                        Level::Warning,
                        "volume.degraded",
                        format!("volume {name}: {} left the in-sync set ({in_sync} in sync); its changed regions are tracked for resync", on(replica)),
                    ),
                    Notice::WritesHeld { replica } => (
                        Level::Error,
                        "volume.writes_held",
                        format!("volume {name}: {} failed and the catalog cannot be reached to drop it; writes are held until it can", on(replica)),
                    ),
                    Notice::ResyncStarted { replica, regions } => (
                        Level::Info,
                        "resync.started",
                        format!("volume {name}: resync of {} started ({regions} regions)", on(replica)),
                    ),
                    Notice::ResyncProgress {
                        replica,
                        copied,
                        total,
                    } => {
                        let now = Instant::now();
                        let due = last_progress
                            .get(replica)
                            .is_none_or(|t| now.duration_since(*t) >= PROGRESS_EVENT_INTERVAL);
                        if !due || copied >= total {
                            continue;
                        }
                        last_progress.insert(*replica, now);
                        (
                            Level::Info,
                            "resync.progress",
                            format!("volume {name}: resync of {}: {copied}/{total} regions", on(replica)),
                        )
                    }
                    Notice::ResyncFinished { replica } => (
                        Level::Info,
                        "resync.finished",
                        format!("volume {name}: resync of {} finished", on(replica)),
                    ),
                    Notice::Rejoined { replica } => (
                        Level::Info,
                        "replica.rejoined",
                        format!("volume {name}: {} is in sync again", on(replica)),
                    ),
                    Notice::WaitingForInSyncReplica => (
                        Level::Error,
                        "volume.waiting",
                        format!("volume {name}: no in-sync replica is reachable; I/O waits until one is"),
                    ),
                    Notice::ReconcileStarted { source, regions } => (
                        Level::Info,
                        "volume.reconcile",
                        format!("volume {name}: reconciling {regions} region(s) that may have been in flight at the last crash, from {}", on(source)),
                    ),
                    Notice::Serving => {
                        log::info!("volume {name}: replication serving");
                        continue;
                    }
                };
                node.event(level, kind, Some(&name), msg).await;
            }
        });
    }

    /// When the driver stops by itself (fenced, superseded, lease lost, last in-sync replica
    /// failed), release the attachment so the NBD clients see the volume go away.
    fn spawn_stop_watch(
        self: &Arc<Self>,
        name: Name,
        generation: Generation,
        dev: Arc<ReplicatedDevice>,
    ) {
        let node = Arc::downgrade(self);
        self.runtime.spawn(async move {
            dev.closed().await;
            let Some(node) = node.upgrade() else { return };
            let still_ours = node
                .attachment(&name)
                .is_some_and(|a| a.generation == generation);
            if !still_ours {
                return;
            }
            let why = dev
                .stopped()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "the replication driver stopped".to_owned());
            let msg =
                format!("volume {name}: the attachment (generation {generation}) stopped: {why}");
            node.event(Level::Error, "volume.stopped", Some(&name), msg)
                .await;
            node.force_detach(&name, &why).await;
        });
    }
}
