//! The agent's core: one node's identity, catalog, session, replicas and attachments.
//!
//! - A **replica** ([`store::Replica`]) is a volume's copy on this node's disk; it is opened
//!   from start-up (or creation) until deletion and carries the durable generation fence.
//! - An **attachment** ([`super::attach::Attachment`]) exists while a volume is active on
//!   this node: it owns the volume's owner key in the catalog (whose creation revision is the
//!   generation), the device the NBD server writes to (the local replica, or a
//!   [`peer::RemoteReplica`] when the data lives on another node), and the use count.
//!
//! Embedded and cluster mode run the same code: the embedded catalog implements leases and
//! owner keys in-process, so the single-node tests exercise the cluster paths too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{ApiError, ErrorCode};
use bw_types::{IoMetrics, Name, NodeId, VolumeId};
use catalog::{ClusterStore, Level, NewEvent, NodeRecord, VolumeRecord};
use store::Replica;

use super::attach::{AttachError, Attachment};
use super::datadir::DataDir;
use super::hooks::AlertHook;
use super::session::Session;
use crate::config::AgentConfig;
use crate::logging::now_ms;

/// Sizes must be whole sectors: every NBD client and qemu expect it.
pub const SIZE_ALIGN_BYTES: u64 = 512;

/// How long a command waits for another node to act on a catalog change (materialise a
/// replica, remove one) before answering that the change is pending.
pub const REMOTE_ACTION_TIMEOUT: Duration = Duration::from_secs(15);

/// Who this node is.
#[derive(Debug, Clone)]
pub struct Me {
    pub id: NodeId,
    pub name: Name,
}

pub struct Node<C: ClusterStore> {
    pub me: Me,
    pub config: AgentConfig,
    pub catalog: Arc<C>,
    pub volumes_dir: PathBuf,
    /// True with `--etcd`: replicas are materialised by the reconciler, peers serve them.
    pub cluster: bool,
    /// The current session; replaced when a lost lease is re-established.
    pub session: Mutex<Arc<Session>>,
    /// Replicas held on this node's disk, by volume id.
    pub replicas: Mutex<BTreeMap<VolumeId, Arc<Replica>>>,
    /// Volumes active on this node, by name.
    pub attachments: Mutex<BTreeMap<Name, Arc<Attachment>>>,
    /// Per-volume I/O metrics, kept across attachments.
    pub metrics: Mutex<BTreeMap<Name, Arc<IoMetrics>>>,
    /// Serialises attach and release on this node (the owner-key transactions are atomic
    /// across nodes already; this keeps one node's use counts and keys in step).
    pub attach_lock: tokio::sync::Mutex<()>,
    /// Serialises create / delete / resize issued through this node.
    pub ops_lock: tokio::sync::Mutex<()>,
    /// Serialises creating replica files here: the command that created a volume and this
    /// node's reconciler may both try to materialise the same replica.
    pub materialize_lock: tokio::sync::Mutex<()>,
    pub started_at_ms: u64,
    pub nbd_stats: Arc<nbd_server::ServerStats>,
    pub peer_stats: Arc<peer::PeerStats>,
    pub runtime: tokio::runtime::Handle,
    /// Runs the operator's alert command for warnings and errors.
    pub hooks: Arc<AlertHook>,
    /// Events that could not be stored yet (catalog unreachable), oldest first.
    pending_events: Arc<PendingEvents>,
}

/// Most events kept while the catalog cannot store them; older ones are dropped (counted,
/// and reported by an event once the catalog is back).
pub const MAX_PENDING_EVENTS: usize = 10_000;
/// How often queued events are retried.
const EVENT_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Default)]
struct PendingEvents {
    queue: Mutex<std::collections::VecDeque<NewEvent>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl<C: ClusterStore> Node<C> {
    pub fn new(
        config: AgentConfig,
        data: &DataDir,
        catalog: Arc<C>,
        node_id: String,
        session: Arc<Session>,
    ) -> Node<C> {
        let name = Name::new(&config.node_name).expect("validated in config");
        Node {
            me: Me {
                id: NodeId(node_id),
                name,
            },
            volumes_dir: data.volumes_dir(),
            cluster: !config.etcd.is_empty(),
            hooks: Arc::new(AlertHook::new(config.alert_command.clone())),
            config,
            catalog,
            session: Mutex::new(session),
            replicas: Mutex::new(BTreeMap::new()),
            attachments: Mutex::new(BTreeMap::new()),
            metrics: Mutex::new(BTreeMap::new()),
            attach_lock: tokio::sync::Mutex::new(()),
            ops_lock: tokio::sync::Mutex::new(()),
            materialize_lock: tokio::sync::Mutex::new(()),
            started_at_ms: now_ms(),
            nbd_stats: Arc::new(nbd_server::ServerStats::default()),
            peer_stats: Arc::new(peer::PeerStats::new()),
            runtime: tokio::runtime::Handle::current(),
            pending_events: Arc::default(),
        }
    }

    pub fn session(&self) -> Arc<Session> {
        self.session.lock().unwrap().clone()
    }

    pub fn volume_path(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir.join(DataDir::volume_file_name(&id.0))
    }

    pub fn replica(&self, id: &VolumeId) -> Option<Arc<Replica>> {
        self.replicas.lock().unwrap().get(id).cloned()
    }

    pub fn attachment(&self, name: &Name) -> Option<Arc<Attachment>> {
        self.attachments.lock().unwrap().get(name).cloned()
    }

    pub fn metrics_for(&self, name: &Name) -> Arc<IoMetrics> {
        self.metrics
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default()
            .clone()
    }

    /// Appends an event to the history, logs it and runs the alert hook. Never fails the
    /// caller: an event the catalog cannot store now (a node cut off from etcd is exactly
    /// when the events matter) is queued, in order, and stored by a retry task once the
    /// catalog answers again (at most [`MAX_PENDING_EVENTS`]; beyond that the oldest are
    /// dropped and counted).
    pub async fn event(&self, level: Level, kind: &str, volume: Option<&Name>, message: String) {
        log_event(level, kind, volume.map(Name::as_str), &message);
        let mut ev = NewEvent::now(level, kind, message).node(self.me.name.as_str());
        if let Some(v) = volume {
            ev = ev.volume(v.as_str());
        }
        self.hooks.fire(&ev, &self.runtime);
        if self.pending_events.queue.lock().unwrap().is_empty() {
            match self.catalog.append_event(ev.clone()).await {
                Ok(_) => return,
                Err(e) => log::warn!("cannot store event {kind} now ({e}); queued for retry"),
            }
        }
        self.queue_event(ev);
    }

    fn queue_event(&self, ev: NewEvent) {
        let start_retry = {
            let mut q = self.pending_events.queue.lock().unwrap();
            if q.len() >= MAX_PENDING_EVENTS {
                q.pop_front();
                self.pending_events
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            q.push_back(ev);
            q.len() == 1
        };
        if !start_retry {
            return;
        }
        // One retry task while the queue is non-empty: it started with the first entry and
        // ends when it emptied the queue (checked under the lock).
        let (pending, catalog) = (self.pending_events.clone(), self.catalog.clone());
        let node = self.me.name.to_string();
        self.runtime.spawn(async move {
            loop {
                tokio::time::sleep(EVENT_RETRY).await;
                loop {
                    let Some(ev) = pending.queue.lock().unwrap().front().cloned() else {
                        break;
                    };
                    if catalog.append_event(ev).await.is_err() {
                        break;
                    }
                    let emptied = {
                        let mut q = pending.queue.lock().unwrap();
                        q.pop_front();
                        q.is_empty()
                    };
                    if emptied {
                        let lost = pending
                            .dropped
                            .swap(0, std::sync::atomic::Ordering::Relaxed);
                        if lost > 0 {
                            let msg = format!("{lost} events were dropped while the catalog could not store them (more than {MAX_PENDING_EVENTS} queued)");
                            let ev = NewEvent::now(Level::Warning, "node.events_dropped", msg)
                                .node(node.as_str());
                            let _ = catalog.append_event(ev).await;
                        }
                        log::info!("queued events stored");
                        return;
                    }
                }
            }
        });
    }

    /// [`Node::event`] from synchronous code (completion callbacks, drops).
    pub fn event_later(
        self: &Arc<Self>,
        level: Level,
        kind: &'static str,
        volume: Option<Name>,
        message: String,
    ) {
        let node = self.clone();
        self.runtime
            .spawn(async move { node.event(level, kind, volume.as_ref(), message).await });
    }

    pub async fn get_record(
        &self,
        name: &Name,
    ) -> Result<(VolumeRecord, catalog::Revision), ApiError> {
        self.catalog
            .get_volume(name)
            .await
            .map_err(catalog_error)?
            .ok_or_else(|| ApiError::not_found(format!("volume {name} does not exist")))
    }

    /// Node records by id, for names, addresses and replica reports.
    pub async fn node_records(&self) -> Result<BTreeMap<NodeId, NodeRecord>, ApiError> {
        let nodes = self.catalog.list_nodes().await.map_err(catalog_error)?;
        Ok(nodes.into_iter().map(|(n, _)| (n.id.clone(), n)).collect())
    }

    /// This node's record as it should be published now.
    pub fn own_record(&self) -> NodeRecord {
        let (capacity, free) = fs_space(&self.volumes_dir);
        let replicas = self
            .replicas
            .lock()
            .unwrap()
            .iter()
            .map(|(id, r)| (id.0.clone(), super::reconcile::report(r)))
            .collect();
        NodeRecord {
            id: self.me.id.clone(),
            name: self.me.name.clone(),
            labels: self.config.labels.clone(),
            nbd_addr: self.config.nbd_listen.to_string(),
            api_addr: self.config.api_listen.to_string(),
            peer_addr: self.cluster.then(|| self.config.peer_listen.to_string()),
            capacity_bytes: capacity,
            free_bytes: free,
            started_at_ms: self.started_at_ms,
            last_seen_ms: now_ms(),
            replicas,
        }
    }
}

pub fn check_size(size: u64) -> Result<(), ApiError> {
    if size == 0 {
        return Err(ApiError::new(
            ErrorCode::InvalidSize,
            "size must be greater than 0",
        ));
    }
    if !size.is_multiple_of(SIZE_ALIGN_BYTES) {
        return Err(ApiError::new(
            ErrorCode::InvalidSize,
            format!("size {size} is not a multiple of {SIZE_ALIGN_BYTES} bytes"),
        ));
    }
    if size > store::MAX_VOLUME_BYTES {
        let max = store::MAX_VOLUME_BYTES;
        return Err(ApiError::new(
            ErrorCode::InvalidSize,
            format!("size {size} is larger than the largest volume ({max} bytes)"),
        ));
    }
    Ok(())
}

pub fn catalog_error(e: catalog::CatalogError) -> ApiError {
    if e.is_conflict() {
        return ApiError::new(ErrorCode::Conflict, format!("{e}; try again"));
    }
    if e.is_unavailable() {
        return ApiError::new(ErrorCode::Unavailable, e.to_string());
    }
    ApiError::new(ErrorCode::Unavailable, format!("catalog error: {e}"))
}

pub fn attach_error(e: AttachError) -> ApiError {
    match e {
        AttachError::NotFound(_) => ApiError::not_found(e.to_string()),
        AttachError::Held(_) | AttachError::Deleting(_) => {
            ApiError::new(ErrorCode::InUse, e.to_string())
        }
        AttachError::NotReady(_) | AttachError::NoSession | AttachError::Replica(_) => {
            ApiError::new(ErrorCode::Unavailable, e.to_string())
        }
        AttachError::Catalog(c) => catalog_error(c),
    }
}

pub fn internal<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ApiError {
    move |e| ApiError::internal(format!("cannot {what}: {e}"))
}

pub fn log_event(level: Level, kind: &str, volume: Option<&str>, message: &str) {
    let l = match level {
        Level::Info => log::Level::Info,
        Level::Warning => log::Level::Warn,
        Level::Error => log::Level::Error,
    };
    log::log!(target: "event", l, "{kind}{} {message}", volume.map(|v| format!(" [{v}]")).unwrap_or_default());
}

/// Capacity and free bytes of the file system holding `path`.
pub fn fs_space(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frag = st.f_frsize as u64;
    (st.f_blocks as u64 * frag, st.f_bavail as u64 * frag)
}
