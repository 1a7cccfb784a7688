//! The agent's core: one node's catalog, volumes and their lifecycle.
//!
//! Every mutating operation (create, delete, resize) runs under `ops_lock`, so on one node
//! they are serialised; each is written so that a crash at any point leaves the catalog and
//! the files in a state [`crate::agent::recovery`] completes or rolls back (see
//! `docs/design/storage.md`, "volume lifecycle").

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{ApiError, ErrorCode};
use bw_types::{format_size, Generation, Name, NodeId, VolumeId};
use catalog::{Catalog, Expect, Level, Mode, NewEvent, VolumeRecord, VolumeState};
use store::{LocalVolume, VolumeErrorEvent, VolumeOptions};

use super::datadir::DataDir;
use super::hooks::AlertHook;
use super::volumes::{record_attach, record_attachment_change, AttachError, Me, Served};
use crate::config::AgentConfig;
use crate::logging::now_ms;

/// Sizes must be whole sectors: every NBD client and qemu expect it.
pub const SIZE_ALIGN_BYTES: u64 = 512;

/// How long a forced delete waits for the volume's connections to close after telling them
/// to; connections close within one request's service time, so seconds is generous.
pub const FORCE_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One node: its identity, catalog and served volumes.
pub struct Node<C: Catalog> {
    pub me: Me,
    pub config: AgentConfig,
    pub catalog: Arc<C>,
    pub volumes_dir: PathBuf,
    /// Ready volumes this node serves, by name.
    pub served: Mutex<BTreeMap<Name, Arc<Served>>>,
    /// Serialises create / delete / resize on this node.
    pub ops_lock: tokio::sync::Mutex<()>,
    pub started_at_ms: u64,
    pub nbd_stats: Arc<nbd_server::ServerStats>,
    pub runtime: tokio::runtime::Handle,
    /// Runs the operator's alert command for warnings and errors.
    pub hooks: Arc<AlertHook>,
}

impl<C: Catalog> Node<C> {
    pub fn new(config: AgentConfig, data: &DataDir, catalog: Arc<C>, node_id: String) -> Node<C> {
        let name = Name::new(&config.node_name).expect("validated in config");
        Node {
            me: Me {
                id: NodeId(node_id),
                name,
            },
            volumes_dir: data.volumes_dir(),
            hooks: Arc::new(AlertHook::new(config.alert_command.clone())),
            config,
            catalog,
            served: Mutex::new(BTreeMap::new()),
            ops_lock: tokio::sync::Mutex::new(()),
            started_at_ms: now_ms(),
            nbd_stats: Arc::new(nbd_server::ServerStats::default()),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    pub fn volume_path(&self, id: &VolumeId) -> PathBuf {
        self.volumes_dir.join(DataDir::volume_file_name(&id.0))
    }

    pub fn served(&self, name: &Name) -> Option<Arc<Served>> {
        self.served.lock().unwrap().get(name).cloned()
    }

    /// Appends an event to the history (and logs it). Never fails the caller: an event that
    /// cannot be stored is logged as such.
    pub async fn event(&self, level: Level, kind: &str, volume: Option<&Name>, message: String) {
        log_event(level, kind, volume.map(Name::as_str), &message);
        let mut ev = NewEvent::now(level, kind, message).node(self.me.name.as_str());
        if let Some(v) = volume {
            ev = ev.volume(v.as_str());
        }
        self.hooks.fire(&ev, &self.runtime);
        if let Err(e) = self.catalog.append_event(ev).await {
            log::error!("cannot store event {kind}: {e}");
        }
    }

    /// Opens the device of a ready volume and starts serving it.
    pub fn serve(&self, rec: &VolumeRecord) -> Result<Arc<Served>, ApiError> {
        let path = self.volume_path(&rec.id);
        let on_error = error_callback(self.catalog.clone(), self.hooks.clone(), self.runtime.clone(), rec.name.clone());
        let options = VolumeOptions {
            on_error: Some(on_error),
            ..VolumeOptions::default()
        };
        let device = LocalVolume::open(&path, rec.size_bytes, options)
            .map_err(|e| ApiError::internal(format!("cannot open volume {}: {e}", rec.name)))?;
        let served = Arc::new(Served::new(rec.name.clone(), device));
        self.served
            .lock()
            .unwrap()
            .insert(rec.name.clone(), served.clone());
        Ok(served)
    }

    /// `volume create`: record (`creating`) → file → record (`ready`) → serve.
    pub async fn create_volume(&self, req: api::CreateVolume) -> Result<VolumeRecord, ApiError> {
        check_size(req.size_bytes)?;
        let replicas = req.replicas.unwrap_or(1);
        if replicas != 1 {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("--replicas {replicas}: this agent runs embedded (one node), so a volume has exactly 1 replica; start agents with --etcd to form a cluster"),
            ));
        }
        if req.mode == Some(api::Mode::Async) {
            return Err(ApiError::bad_request(
                "--mode async needs a second site; an embedded agent has one node",
            ));
        }
        if let Some(n) = req.nodes.iter().find(|n| **n != self.me.name) {
            return Err(ApiError::bad_request(format!(
                "--node {n}: no such node (this embedded agent is node {})",
                self.me.name
            )));
        }
        let _ops = self.ops_lock.lock().await;
        let id = VolumeId(bw_types::ids::random_hex_id().map_err(internal("choose a volume id"))?);
        let mut rec = VolumeRecord {
            id: id.clone(),
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            replicas: 1,
            mode: Mode::Sync,
            spread: req.spread.clone(),
            pinned_nodes: req.nodes.iter().map(|n| n.to_string()).collect(),
            state: VolumeState::Creating,
            created_at_ms: now_ms(),
            generation: Generation(0),
            attachment: None,
            replicas_placed: vec![catalog::ReplicaRecord {
                node_id: self.me.id.clone(),
                node_name: self.me.name.clone(),
                state: catalog::ReplicaState::InSync,
            }],
            resync_rate_bytes_per_s: None,
        };
        let rev = match self.catalog.put_volume(&rec, Expect::Absent).await {
            Ok(rev) => rev,
            Err(e) if e.is_conflict() => {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("volume {} already exists", req.name),
                ))
            }
            Err(e) => return Err(catalog_error(e)),
        };
        let file = DataDir::volume_file_name(&id.0);
        let dir = self.volumes_dir.clone();
        let size = req.size_bytes;
        let made =
            tokio::task::spawn_blocking(move || store::create_volume_file(&dir, &file, size))
                .await
                .map_err(internal("create the volume file"))?;
        if let Err(e) = made {
            // Roll back the record; recovery would do the same after a crash here.
            let _ = self.catalog.delete_volume(&rec.name, Expect::At(rev)).await;
            let code = if is_enospc(&e) {
                ErrorCode::NoSpace
            } else {
                ErrorCode::Internal
            };
            return Err(ApiError::new(
                code,
                format!("cannot create volume {}: {e}", req.name),
            ));
        }
        rec.state = VolumeState::Ready;
        self.catalog
            .put_volume(&rec, Expect::At(rev))
            .await
            .map_err(catalog_error)?;
        self.serve(&rec)?;
        self.event(
            Level::Info,
            "volume.created",
            Some(&rec.name),
            format!(
                "volume {} created ({})",
                rec.name,
                format_size(rec.size_bytes)
            ),
        )
        .await;
        Ok(rec)
    }

    /// `volume delete`: refused while in use unless `force`, which disconnects clients first.
    /// Order: record `deleting` → stop serving → remove file → remove record.
    pub async fn delete_volume(&self, name: &Name, force: bool) -> Result<(), ApiError> {
        let _ops = self.ops_lock.lock().await;
        let (mut rec, rev) = self.get_record(name).await?;
        let served = self.served(name);
        if let Some(s) = &served {
            let u = s.usage();
            if u.in_use() && !force {
                return Err(ApiError::new(
                    ErrorCode::InUse,
                    in_use_message(name, &self.me.name, &u),
                ));
            }
            s.deleting.store(true, Ordering::Release);
        }
        if rec.state != VolumeState::Deleting {
            rec.state = VolumeState::Deleting;
            self.catalog
                .put_volume(&rec, Expect::At(rev))
                .await
                .map_err(catalog_error)?;
        }
        if let Some(s) = served {
            let _ = s.kill.send(true);
            let deadline = Instant::now() + FORCE_DISCONNECT_TIMEOUT;
            while s.usage().connections > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.served.lock().unwrap().remove(name);
            let dev = s.device.clone();
            tokio::task::spawn_blocking(move || dev.close())
                .await
                .map_err(internal("close the volume"))?;
        }
        let path = self.volume_path(&rec.id);
        tokio::task::spawn_blocking(move || store::remove_volume_file(&path))
            .await
            .map_err(internal("remove the volume file"))?
            .map_err(|e| {
                ApiError::internal(format!("cannot remove the file of volume {name}: {e}"))
            })?;
        let (_, rev) = self.get_record(name).await?;
        self.catalog
            .delete_volume(name, Expect::At(rev))
            .await
            .map_err(catalog_error)?;
        let how = if force { " (forced)" } else { "" };
        self.event(
            Level::Info,
            "volume.deleted",
            Some(name),
            format!("volume {name} deleted{how}"),
        )
        .await;
        Ok(())
    }

    /// `volume resize`: grow only. Order: grow file (durable) → commit size → device size.
    pub async fn resize_volume(
        &self,
        name: &Name,
        size_bytes: u64,
    ) -> Result<VolumeRecord, ApiError> {
        check_size(size_bytes)?;
        let _ops = self.ops_lock.lock().await;
        let (mut rec, rev) = self.get_record(name).await?;
        self.check_ready(&rec)?;
        if size_bytes < rec.size_bytes {
            return Err(ApiError::new(
                ErrorCode::InvalidSize,
                format!(
                    "volume {name} is {}; shrinking to {} is not supported (it would discard data)",
                    format_size(rec.size_bytes),
                    format_size(size_bytes)
                ),
            ));
        }
        if size_bytes == rec.size_bytes {
            return Ok(rec);
        }
        let path = self.volume_path(&rec.id);
        let grown = tokio::task::spawn_blocking(move || store::grow_volume_file(&path, size_bytes))
            .await
            .map_err(internal("grow the volume file"))?;
        if let Err(e) = grown {
            let code = if is_enospc(&e) {
                ErrorCode::NoSpace
            } else {
                ErrorCode::Internal
            };
            return Err(ApiError::new(
                code,
                format!("cannot grow volume {name}: {e}"),
            ));
        }
        let old = rec.size_bytes;
        rec.size_bytes = size_bytes;
        self.catalog
            .put_volume(&rec, Expect::At(rev))
            .await
            .map_err(catalog_error)?;
        if let Some(s) = self.served(name) {
            s.device
                .set_size(size_bytes)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        self.event(
            Level::Info,
            "volume.resized",
            Some(name),
            format!(
                "volume {name} grown from {} to {}",
                format_size(old),
                format_size(size_bytes)
            ),
        )
        .await;
        Ok(rec)
    }

    /// `volume attach`: marks the volume attached here until `detach`.
    pub async fn attach_volume(
        &self,
        name: &Name,
        node: Option<&Name>,
    ) -> Result<(VolumeRecord, Generation), ApiError> {
        if let Some(n) = node.filter(|n| **n != self.me.name) {
            return Err(ApiError::bad_request(format!(
                "--node {n}: no such node (this embedded agent is node {})",
                self.me.name
            )));
        }
        let (rec, _) = self.get_record(name).await?;
        self.check_ready(&rec)?;
        let served = self.served(name).ok_or_else(|| not_ready(name))?;
        let generation = self.acquire(&served, true).await?;
        let (rec, _) = self.get_record(name).await?;
        Ok((rec, generation))
    }

    /// `volume detach`: drops the explicit attachment; refused while connections are open.
    pub async fn detach_volume(&self, name: &Name) -> Result<(), ApiError> {
        let (_, _) = self.get_record(name).await?;
        let Some(served) = self.served(name) else {
            return Ok(());
        };
        let _attach = served.attach_lock.lock().unwrap();
        let u = served.usage();
        if u.connections > 0 {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "volume {name} has {} open NBD connection(s); close them before detaching",
                    u.connections
                ),
            ));
        }
        if !u.explicit {
            return Ok(());
        }
        served.usage.lock().unwrap().explicit = false;
        served.usage.lock().unwrap().attached = None;
        let r = tokio::task::block_in_place(|| {
            self.runtime
                .block_on(record_attachment_change(&*self.catalog, name, |r| {
                    r.attachment = None
                }))
        });
        drop(_attach);
        r.map_err(attach_error)?;
        self.event(
            Level::Info,
            "volume.detached",
            Some(name),
            format!("volume {name} detached from node {}", self.me.name),
        )
        .await;
        Ok(())
    }

    /// Takes one use of `served` (a connection, or the explicit attachment), recording a new
    /// attachment in the catalog when it is the first. Blocking: runs the catalog write to
    /// completion (callers on the runtime use `block_in_place`).
    pub async fn acquire(
        &self,
        served: &Arc<Served>,
        explicit: bool,
    ) -> Result<Generation, ApiError> {
        tokio::task::block_in_place(|| self.acquire_blocking(served, explicit))
            .map_err(attach_error)
    }

    pub fn acquire_blocking(
        &self,
        served: &Served,
        explicit: bool,
    ) -> Result<Generation, AttachError> {
        let _attach = served.attach_lock.lock().unwrap();
        if served.is_deleting() {
            return Err(AttachError::Gone);
        }
        let current = served.usage();
        let generation = match current.attached {
            Some((g, _)) => {
                if explicit && !current.explicit {
                    self.runtime.block_on(record_attachment_change(
                        &*self.catalog,
                        &served.name,
                        |r| {
                            if let Some(a) = r.attachment.as_mut() {
                                a.explicit = true;
                            }
                        },
                    ))?;
                }
                g
            }
            None => {
                let (g, since) = self.runtime.block_on(record_attach(
                    &*self.catalog,
                    &self.me,
                    &served.name,
                    explicit,
                ))?;
                served.usage.lock().unwrap().attached = Some((g, since));
                let catalog = self.catalog.clone();
                let (name, node) = (served.name.clone(), self.me.name.clone());
                let how = if explicit {
                    "by volume attach"
                } else {
                    "by an NBD client"
                };
                let msg = format!("volume {name} attached on node {node} (generation {g}) {how}");
                log_event(Level::Info, "volume.attached", Some(name.as_str()), &msg);
                self.runtime.spawn(async move {
                    let ev = NewEvent::now(Level::Info, "volume.attached", msg)
                        .volume(name.as_str())
                        .node(node.as_str());
                    let _ = catalog.append_event(ev).await;
                });
                g
            }
        };
        let mut u = served.usage.lock().unwrap();
        if explicit {
            u.explicit = true;
        } else {
            u.connections += 1;
        }
        Ok(generation)
    }

    /// Drops one NBD connection's use; clears the attachment when it was the last use.
    pub fn release_connection(self: &Arc<Self>, served: Arc<Served>) {
        let node = self.clone();
        // Off the connection's task: the catalog write may take a disk sync.
        self.runtime.spawn_blocking(move || {
            let _attach = served.attach_lock.lock().unwrap();
            let mut u = served.usage.lock().unwrap();
            u.connections = u.connections.saturating_sub(1);
            if u.in_use() || u.attached.is_none() {
                return;
            }
            u.attached = None;
            drop(u);
            if served.is_deleting() {
                return;
            }
            let r = node.runtime.block_on(record_attachment_change(
                &*node.catalog,
                &served.name,
                |r| r.attachment = None,
            ));
            if let Err(e) = r {
                log::warn!("cannot record that volume {} is released: {e}", served.name);
            }
        });
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

    fn check_ready(&self, rec: &VolumeRecord) -> Result<(), ApiError> {
        match rec.state {
            VolumeState::Ready => Ok(()),
            VolumeState::Creating => Err(ApiError::new(
                ErrorCode::Conflict,
                format!("volume {} is still being created", rec.name),
            )),
            VolumeState::Deleting => Err(ApiError::new(
                ErrorCode::Conflict,
                format!("volume {} is being deleted", rec.name),
            )),
        }
    }
}

pub fn in_use_message(name: &Name, node: &Name, u: &super::volumes::Use) -> String {
    let mut why = Vec::new();
    if u.connections > 0 {
        why.push(format!("{} open NBD connection(s)", u.connections));
    }
    if u.explicit {
        why.push("an explicit attachment".to_owned());
    }
    format!(
        "volume {name} is in use on node {node} ({}); use --force to disconnect and delete it",
        why.join(" and ")
    )
}

fn not_ready(name: &Name) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("volume {name} is not being served on this node"),
    )
}

pub fn check_size(size: u64) -> Result<(), ApiError> {
    if size == 0 {
        return Err(ApiError::new(
            ErrorCode::InvalidSize,
            "size must be greater than 0",
        ));
    }
    if size % SIZE_ALIGN_BYTES != 0 {
        return Err(ApiError::new(
            ErrorCode::InvalidSize,
            format!("size {size} is not a multiple of {SIZE_ALIGN_BYTES} bytes"),
        ));
    }
    if size > store::MAX_VOLUME_BYTES {
        return Err(ApiError::new(
            ErrorCode::InvalidSize,
            format!(
                "size {size} is larger than the largest volume ({} bytes)",
                store::MAX_VOLUME_BYTES
            ),
        ));
    }
    Ok(())
}

fn is_enospc(e: &store::VolumeFileError) -> bool {
    use std::error::Error as _;
    let mut src: Option<&dyn std::error::Error> = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
        }
        src = s.source();
    }
    false
}

pub fn catalog_error(e: catalog::CatalogError) -> ApiError {
    if e.is_conflict() {
        return ApiError::new(ErrorCode::Conflict, format!("{e}; try again"));
    }
    ApiError::new(ErrorCode::Unavailable, format!("catalog unavailable: {e}"))
}

pub fn attach_error(e: AttachError) -> ApiError {
    match e {
        AttachError::Gone => ApiError::not_found("the volume was deleted"),
        AttachError::HeldElsewhere(_) | AttachError::Contended => {
            ApiError::new(ErrorCode::InUse, e.to_string())
        }
        AttachError::Catalog(c) => catalog_error(c),
    }
}

fn internal<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ApiError {
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

/// Turns the store's error reports into events (I/O thread → runtime task).
fn error_callback<C: Catalog>(
    catalog: Arc<C>,
    hooks: Arc<AlertHook>,
    rt: tokio::runtime::Handle,
    name: Name,
) -> store::ErrorCallback {
    Arc::new(move |ev: VolumeErrorEvent| {
        let (level, kind, msg) = match &ev {
            VolumeErrorEvent::Faulted { reason } => (
                Level::Error,
                "volume.faulted",
                format!("volume {name} is faulted and refuses I/O until the agent restarts: {reason}"),
            ),
            VolumeErrorEvent::NoSpace { kind, offset, len } => (
                Level::Error,
                "volume.no_space",
                format!("volume {name}: {kind} of {len} bytes at offset {offset} failed: no space left in the pool"),
            ),
            VolumeErrorEvent::ReadFailed { offset, len, error } => (
                Level::Error,
                "volume.io_error",
                format!("volume {name}: read of {len} bytes at offset {offset} failed: {error}"),
            ),
        };
        log_event(level, kind, Some(name.as_str()), &msg);
        let catalog = catalog.clone();
        let ev = NewEvent::now(level, kind, msg).volume(name.as_str());
        hooks.fire(&ev, &rt);
        rt.spawn(async move {
            let _ = catalog.append_event(ev).await;
        });
    })
}
