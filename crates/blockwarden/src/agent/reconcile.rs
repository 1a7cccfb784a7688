//! Background work of a node: the session (lease renewal, re-establishment after loss),
//! membership (heartbeat, node up/down events) and the reconciler that makes this node's
//! disk match the catalog (materialise placed replicas, grow them, remove deleted ones).

use std::sync::Arc;
use std::time::{Duration, Instant};

use catalog::{
    ClusterStore, Level, Prefix, ReplicaReport, ReplicaState, Revision, VolumeRecord, VolumeState,
    WatchEvent,
};
use store::Replica;
use tokio::sync::watch;

use super::node::Node;
use super::session::{keepalive_loop, Session, SessionState};

/// How often a node rewrites its record (free space, replica reports, last seen). The
/// record is informational (liveness is the lease-bound `alive/` key), so seconds suffice.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);

/// Pause before listing again after the catalog failed or a watch ended.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// What this node reports about one replica.
pub fn report(r: &Replica) -> ReplicaReport {
    let fault = r.volume().fault_reason();
    ReplicaReport {
        volume: String::new(),
        state: if fault.is_some() {
            "faulted".into()
        } else {
            "in_sync".into()
        },
        size_bytes: bw_types::BlockDevice::size_bytes(r.volume()),
        generation: r.highest().0,
        error: fault,
    }
}

/// Grants a lease, registers this node as alive and publishes its record.
pub async fn start_session<C: ClusterStore>(
    catalog: &C,
    node_id: &bw_types::NodeId,
    ttl: Duration,
) -> Result<Arc<Session>, catalog::CatalogError> {
    let sent = Instant::now();
    let lease = catalog.grant(ttl).await?;
    catalog.register_alive(node_id, lease.id).await?;
    Ok(Session::new(lease, sent))
}

/// Renews the session; when the lease is lost, voids every attachment and starts a new
/// session (retrying until the store answers or shutdown).
pub async fn session_supervisor<C: ClusterStore>(
    node: Arc<Node<C>>,
    shutdown: watch::Receiver<bool>,
) {
    let mut watchdog_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        let session = node.session();
        let _watchdog = super::session::spawn_watchdog(session.clone(), watchdog_stop.clone());
        let mut states = session.subscribe();
        let fence_watch = {
            let node = node.clone();
            tokio::spawn(async move {
                while states.changed().await.is_ok() {
                    let st = *states.borrow();
                    if st == SessionState::Paused {
                        let msg = format!("node {} cannot renew its lease: I/O on its attached volumes is refused until it can (self-fencing)", node.me.name);
                        node.event(Level::Error, "node.fenced", None, msg).await;
                    }
                }
            })
        };
        keepalive_loop(node.catalog.clone(), session.clone(), shutdown.clone()).await;
        watchdog_stop.store(true, std::sync::atomic::Ordering::Release);
        watchdog_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        fence_watch.abort();
        if *shutdown.borrow() {
            return;
        }
        void_attachments(&node).await;
        loop {
            match start_session(&*node.catalog, &node.me.id, node.config.lease_ttl).await {
                Ok(s) => {
                    *node.session.lock().unwrap() = s;
                    let msg = format!(
                        "node {} started a new session after losing its lease",
                        node.me.name
                    );
                    node.event(Level::Warning, "node.session_renewed", None, msg)
                        .await;
                    break;
                }
                Err(e) => {
                    log::warn!("cannot start a new session: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if *shutdown.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// The lease is gone: every attachment made under it is void (its owner keys went with it).
async fn void_attachments<C: ClusterStore>(node: &Arc<Node<C>>) {
    let names: Vec<_> = node.attachments.lock().unwrap().keys().cloned().collect();
    for name in names {
        let msg = format!(
            "volume {name}: attachment on node {} lost with the node's lease",
            node.me.name
        );
        node.event(Level::Error, "volume.lease_lost", Some(&name), msg)
            .await;
        node.force_detach(&name, "lease lost").await;
    }
}

/// Publishes this node's record every [`HEARTBEAT_INTERVAL`].
pub async fn heartbeat_loop<C: ClusterStore>(
    node: Arc<Node<C>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let mut rec = node.own_record();
        for (id, r) in rec.replicas.iter_mut() {
            r.volume = id.clone();
        }
        if let Err(e) = node.catalog.put_node(&rec, catalog::Expect::Any).await {
            log::debug!("heartbeat: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Makes this node's replicas match the catalog, from a full listing and then a watch.
pub async fn reconcile_loop<C: ClusterStore>(
    node: Arc<Node<C>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (rows, rev) = match node.catalog.list_at(Prefix::Volumes).await {
            Ok(x) => x,
            Err(e) => {
                log::debug!("reconcile: {e}");
                tokio::select! { _ = tokio::time::sleep(RETRY_PAUSE) => continue, _ = shutdown.changed() => return }
            }
        };
        for (key, value, _) in rows {
            if let Ok(rec) = serde_json::from_slice::<VolumeRecord>(&value) {
                apply(&node, &rec).await;
            } else {
                log::warn!("reconcile: undecodable record {key}");
            }
        }
        let mut events = node
            .catalog
            .watch_prefix(Prefix::Volumes, Revision(rev.0 + 1));
        loop {
            let ev: WatchEvent = tokio::select! {
                e = events.recv() => match e { Some(e) => e, None => break },
                _ = shutdown.changed() => return,
            };
            if ev.deleted {
                continue;
            }
            if let Ok(rec) = serde_json::from_slice::<VolumeRecord>(&ev.value) {
                apply(&node, &rec).await;
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Brings one volume's local state in line with its record.
async fn apply<C: ClusterStore>(node: &Arc<Node<C>>, rec: &VolumeRecord) {
    if let Some(r) = node.attachment(&rec.name).and_then(|a| {
        a.replicated
            .get()
            .map(|r| (r.device.clone(), r.set.clone()))
    }) {
        // Attached here with replication: follow added/removed replicas and rate changes.
        node.sync_replicas(&r.0, &r.1, rec);
    } else if node
        .attachment(&rec.name)
        .is_some_and(|a| a.switch.is_some())
        && super::replicated::wants_replication(rec)
    {
        // A replica was added to a one-replica volume in use here: switch its attachment to
        // the replication driver without closing the NBD connections.
        let (node, name) = (node.clone(), rec.name.clone());
        node.runtime
            .clone()
            .spawn(async move { node.upgrade_to_replicated(&name).await });
    }
    let placed_here = rec.replicas_placed.iter().find(|r| r.node_id == node.me.id);
    let local = node.replica(&rec.id);
    if rec.state == VolumeState::Deleting {
        if node.attachment(&rec.name).is_some() {
            node.force_detach(&rec.name, "the volume is being deleted")
                .await;
        }
        if placed_here.is_some() {
            if let Err(e) = node.finish_local_delete(rec).await {
                log::warn!("volume {}: cannot finish delete: {}", rec.name, e.message);
            }
        }
        return;
    }
    let Some(placed) = placed_here else {
        if local.is_some() && rec.state == VolumeState::Ready {
            // `volume remove-replica` took this node's replica out of the record.
            match node.remove_replica_files(&rec.id).await {
                Ok(()) => log::info!("volume {}: removed the replica on this node", rec.name),
                Err(e) => log::warn!(
                    "volume {}: cannot remove the removed replica's files: {}",
                    rec.name,
                    e.message
                ),
            }
        }
        return;
    };
    match (rec.state, local) {
        (VolumeState::Creating, None) if placed.state == ReplicaState::Creating => {
            match node.materialize(rec).await {
                Ok(_) => mark_created(node, rec).await,
                Err(e) => {
                    let msg = format!(
                        "volume {}: cannot create the replica on node {}: {}",
                        rec.name, node.me.name, e.message
                    );
                    node.event(Level::Error, "volume.create_failed", Some(&rec.name), msg)
                        .await;
                }
            }
        }
        (VolumeState::Ready, None) if placed.state == ReplicaState::Creating => {
            // A replica added to a live volume (`volume add-replica`): create the empty file;
            // the attachment fills it by a full resync and marks it in sync.
            match node.materialize(rec).await {
                Ok(_) => mark_added(node, rec).await,
                Err(e) => {
                    let msg = format!(
                        "volume {}: cannot create the added replica on node {}: {}",
                        rec.name, node.me.name, e.message
                    );
                    node.event(Level::Error, "replica.create_failed", Some(&rec.name), msg)
                        .await;
                }
            }
        }
        (VolumeState::Ready, Some(r))
            if bw_types::BlockDevice::size_bytes(r.volume()) < rec.size_bytes =>
        {
            let path = node.volume_path(&rec.id);
            let size = rec.size_bytes;
            let grown =
                tokio::task::spawn_blocking(move || store::grow_volume_file(&path, size)).await;
            match grown {
                Ok(Ok(())) => {
                    let _ = r.volume().set_size(size);
                }
                Ok(Err(e)) => log::error!("volume {}: cannot grow the replica: {e}", rec.name),
                Err(e) => log::error!("volume {}: grow task failed: {e}", rec.name),
            }
        }
        _ => {}
    }
}

/// Marks a replica added to a ready volume as existing but out of sync (`stale`): it holds
/// nothing yet, and only the attachment's resync and "mark in sync" transaction make it count.
pub async fn mark_added<C: ClusterStore>(node: &Node<C>, rec: &VolumeRecord) {
    for _ in 0..super::attach::CAS_RETRIES {
        let Ok(Some((mut cur, rev))) = node.catalog.get_volume(&rec.name).await else {
            return;
        };
        if cur.id != rec.id || cur.state != VolumeState::Ready {
            return;
        }
        let mut changed = false;
        for r in cur
            .replicas_placed
            .iter_mut()
            .filter(|r| r.node_id == node.me.id && r.state == ReplicaState::Creating)
        {
            r.state = ReplicaState::Stale;
            changed = true;
        }
        if !changed {
            return;
        }
        match node
            .catalog
            .put_volume(&cur, catalog::Expect::At(rev))
            .await
        {
            Ok(_) => return,
            Err(e) if e.is_conflict() => continue,
            Err(e) => {
                log::warn!("volume {}: cannot mark the added replica: {e}", rec.name);
                return;
            }
        }
    }
}

/// Marks this node's replica created; the volume is ready once every replica is.
pub async fn mark_created<C: ClusterStore>(node: &Node<C>, rec: &VolumeRecord) {
    for _ in 0..super::attach::CAS_RETRIES {
        let Ok(Some((mut cur, rev))) = node.catalog.get_volume(&rec.name).await else {
            return;
        };
        if cur.id != rec.id || cur.state != VolumeState::Creating {
            return;
        }
        for r in cur
            .replicas_placed
            .iter_mut()
            .filter(|r| r.node_id == node.me.id)
        {
            r.state = ReplicaState::InSync;
        }
        if cur
            .replicas_placed
            .iter()
            .all(|r| r.state == ReplicaState::InSync)
        {
            cur.state = VolumeState::Ready;
        }
        match node
            .catalog
            .put_volume(&cur, catalog::Expect::At(rev))
            .await
        {
            Ok(_) => return,
            Err(e) if e.is_conflict() => continue,
            Err(e) => {
                log::warn!("volume {}: cannot mark the replica created: {e}", rec.name);
                return;
            }
        }
    }
}

/// Emits `node.up` / `node.down` events. Every node sees the same changes, so only the alive
/// node with the smallest id reports them (one event per change, not one per observer).
pub async fn membership_loop<C: ClusterStore>(
    node: Arc<Node<C>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (rows, rev) = match node.catalog.list_at(Prefix::Alive).await {
            Ok(x) => x,
            Err(_) => {
                tokio::select! { _ = tokio::time::sleep(RETRY_PAUSE) => continue, _ = shutdown.changed() => return }
            }
        };
        let mut alive: std::collections::BTreeSet<String> = rows
            .iter()
            .filter_map(|(k, _, _)| k.as_str().rsplit('/').next().map(str::to_owned))
            .collect();
        let mut events = node
            .catalog
            .watch_prefix(Prefix::Alive, Revision(rev.0 + 1));
        loop {
            let ev = tokio::select! {
                e = events.recv() => match e { Some(e) => e, None => break },
                _ = shutdown.changed() => return,
            };
            let Some(id) = ev.key.as_str().rsplit('/').next().map(str::to_owned) else {
                continue;
            };
            let changed = if ev.deleted {
                alive.remove(&id)
            } else {
                alive.insert(id.clone())
            };
            let reporter = alive
                .iter()
                .next()
                .is_some_and(|first| *first == node.me.id.0);
            if changed && reporter && id != node.me.id.0 {
                let name = node.node_name(&bw_types::NodeId(id.clone())).await;
                let (level, kind, what) = if ev.deleted {
                    (Level::Warning, "node.down", "is down (its lease expired)")
                } else {
                    (Level::Info, "node.up", "is up")
                };
                node.event(level, kind, None, format!("node {name} {what}"))
                    .await;
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}
