//! Volume lifecycle: create, delete, resize, and the local replica files behind them.
//!
//! Order of writes (so that `kill -9` anywhere leaves the whole volume or none, see
//! `recovery` and `docs/design/storage.md`):
//!
//! - create: record `creating` (placement chosen) → each placed node creates its file and
//!   metadata → record `ready`. The API node does its own replica inline; other nodes' come
//!   from their reconciler, which the API node waits for.
//! - delete: record `deleting` → each replica node closes and removes its files and takes
//!   itself off `replicas_placed` → the last one removes the record.
//! - resize: grow the local file (durable) → record the size → other replica nodes grow
//!   theirs when their reconciler sees it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{ApiError, ErrorCode};
use bw_types::{format_size, Generation, Name, VolumeId};
use catalog::{
    ClusterStore, Expect, Level, Mode, ReplicaRecord, ReplicaState, VolumeRecord, VolumeState,
};
use store::{LocalVolume, Replica, ReplicaOptions, VolumeErrorEvent, VolumeOptions};

use super::datadir::DataDir;
use super::node::{catalog_error, check_size, internal, Node, REMOTE_ACTION_TIMEOUT};
use super::placement::{place, Candidate, Policy};
use crate::logging::now_ms;

/// Longest pause between two reads of a record another node is expected to change. The wait
/// starts at 10 ms and doubles; capping it at 50 ms keeps the added latency of a create placed
/// on another node under one cap (a 250 ms cap made such creates' p99 quantised by it).
/// Replicas one volume may have: each one is written on every write, so more than a few
/// multiplies the write cost for no real gain in safety.
pub const MAX_REPLICAS: u32 = 5;

const POLL_CAP: Duration = Duration::from_millis(50);

impl<C: ClusterStore> Node<C> {
    /// `volume create`.
    pub async fn create_volume(
        self: &Arc<Self>,
        req: api::CreateVolume,
    ) -> Result<VolumeRecord, ApiError> {
        check_size(req.size_bytes)?;
        let replicas = match req.replicas {
            Some(n) => n,
            // `--node a --node b` alone means "on these nodes".
            None if !req.nodes.is_empty() => req.nodes.len() as u32,
            None => self.default_replicas().await?,
        };
        if replicas == 0 {
            return Err(ApiError::bad_request("--replicas must be at least 1"));
        }
        if replicas > MAX_REPLICAS {
            return Err(ApiError::bad_request(format!(
                "--replicas {replicas}: at most {MAX_REPLICAS} replicas per volume"
            )));
        }
        if let Some(k) = req.min_in_sync {
            if k == 0 || k > replicas {
                return Err(ApiError::bad_request(format!(
                    "--min-in-sync {k}: must be between 1 and the number of replicas ({replicas})"
                )));
            }
        }
        if req.mode == Some(api::Mode::Async) {
            return Err(ApiError::bad_request(
                "--mode async (geographic replication) is not available in this build",
            ));
        }
        let chosen = self.place(&req, replicas).await?;
        let _ops = self.ops_lock.lock().await;
        let id = VolumeId(bw_types::ids::random_hex_id().map_err(internal("choose a volume id"))?);
        let mut rec = VolumeRecord {
            id: id.clone(),
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            replicas,
            mode: Mode::Sync,
            spread: req.spread.clone(),
            pinned_nodes: req.nodes.iter().map(|n| n.to_string()).collect(),
            state: VolumeState::Creating,
            created_at_ms: now_ms(),
            generation: Generation(0),
            attachment: None,
            replicas_placed: chosen
                .iter()
                .enumerate()
                .map(|(i, (id, name))| ReplicaRecord {
                    node_id: id.clone(),
                    node_name: name.clone(),
                    state: ReplicaState::Creating,
                    id: i as u64 + 1,
                    in_sync_generation: Generation(0),
                })
                .collect(),
            resync_rate_bytes_per_s: req.resync_rate_bytes_per_s,
            min_in_sync: req.min_in_sync,
            last_replica_id: 0,
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
        if rec.replicas_placed.iter().any(|r| r.node_id == self.me.id) {
            if let Err(e) = self.materialize(&rec).await {
                // Roll back; recovery would do the same after a crash here.
                let _ = self.catalog.delete_volume(&rec.name, Expect::At(rev)).await;
                return Err(e);
            }
            // This node's reconciler may mark it too; either way the record ends up ready.
            super::reconcile::mark_created(self, &rec).await;
            rec = self.wait_until_ready(&rec.name, rev).await?;
        } else {
            rec = self.wait_until_ready(&rec.name, rev).await?;
        }
        let on = rec
            .replicas_placed
            .iter()
            .map(|r| r.node_name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let msg = format!(
            "volume {} created ({}, replica on {on})",
            rec.name,
            format_size(rec.size_bytes)
        );
        self.event(Level::Info, "volume.created", Some(&rec.name), msg)
            .await;
        Ok(rec)
    }

    /// Replicas of a volume created without `--replicas`: 2 once the cluster has two or
    /// more nodes (a VM disk should survive a host), else 1.
    async fn default_replicas(&self) -> Result<u32, ApiError> {
        if !self.cluster {
            return Ok(1);
        }
        let nodes = self.node_records().await?;
        Ok(if nodes.len() >= 2 { 2 } else { 1 })
    }

    /// Chooses nodes for `replicas` replicas by the request's policy.
    async fn place(
        &self,
        req: &api::CreateVolume,
        replicas: u32,
    ) -> Result<Vec<(bw_types::NodeId, Name)>, ApiError> {
        let nodes = self.node_records().await?;
        let alive = self.catalog.list_alive().await.map_err(catalog_error)?;
        let mut committed: std::collections::BTreeMap<bw_types::NodeId, u64> = Default::default();
        for (v, _) in self.catalog.list_volumes().await.map_err(catalog_error)? {
            for r in &v.replicas_placed {
                *committed.entry(r.node_id.clone()).or_default() += v.size_bytes;
            }
        }
        let mut candidates: Vec<Candidate> = nodes
            .values()
            .map(|n| Candidate {
                name: n.name.to_string(),
                alive: alive.iter().any(|(id, _)| *id == n.id),
                labels: n.labels.clone(),
                free_bytes: n.free_bytes,
                committed_bytes: committed.get(&n.id).copied().unwrap_or(0),
            })
            .collect();
        if !self.cluster && candidates.is_empty() {
            let me = self.own_record();
            let committed_bytes = committed.get(&me.id).copied().unwrap_or(0);
            candidates.push(Candidate {
                name: me.name.to_string(),
                alive: true,
                labels: me.labels,
                free_bytes: me.free_bytes,
                committed_bytes,
            });
        }
        let policy = Policy {
            replicas,
            size_bytes: req.size_bytes,
            spread: req.spread.clone(),
            pinned: req.nodes.iter().map(|n| n.to_string()).collect(),
        };
        let names = match place(&candidates, &policy) {
            Ok(n) => n,
            Err(e) => {
                let msg = format!("volume {}: {e}", req.name);
                self.event(
                    Level::Warning,
                    "volume.placement_failed",
                    Some(&req.name),
                    msg,
                )
                .await;
                return Err(ApiError::new(ErrorCode::NoSpace, e.to_string()));
            }
        };
        let by_name = |n: &String| {
            nodes
                .values()
                .find(|r| r.name.as_str() == n)
                .map(|r| (r.id.clone(), r.name.clone()))
        };
        Ok(names
            .iter()
            .map(|n| by_name(n).unwrap_or_else(|| (self.me.id.clone(), self.me.name.clone())))
            .collect())
    }

    /// Waits for the placed node's reconciler to turn `creating` into `ready`; rolls the
    /// record back if it does not within [`REMOTE_ACTION_TIMEOUT`].
    async fn wait_until_ready(
        &self,
        name: &Name,
        rev: catalog::Revision,
    ) -> Result<VolumeRecord, ApiError> {
        let deadline = Instant::now() + REMOTE_ACTION_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        while Instant::now() < deadline {
            match self.catalog.get_volume(name).await.map_err(catalog_error)? {
                Some((r, _)) if r.state == VolumeState::Ready => return Ok(r),
                Some(_) => {}
                None => {
                    return Err(ApiError::internal(format!(
                        "volume {name} disappeared while being created"
                    )))
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_CAP);
        }
        let target = match self.catalog.get_volume(name).await.map_err(catalog_error)? {
            Some((r, rv)) if r.state == VolumeState::Creating && rv == rev => {
                let _ = self.catalog.delete_volume(name, Expect::At(rev)).await;
                r.replicas_placed
                    .first()
                    .map(|p| p.node_name.to_string())
                    .unwrap_or_default()
            }
            Some((r, _)) if r.state == VolumeState::Ready => return Ok(r),
            _ => String::new(),
        };
        Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("node {target} did not create the replica of {name} within {REMOTE_ACTION_TIMEOUT:?}; the create was rolled back"),
        ))
    }

    /// Creates this node's replica files of `rec` (idempotent) and opens the replica.
    pub async fn materialize(
        self: &Arc<Self>,
        rec: &VolumeRecord,
    ) -> Result<Arc<Replica>, ApiError> {
        let _one_at_a_time = self.materialize_lock.lock().await;
        if let Some(r) = self.replica(&rec.id) {
            return Ok(r);
        }
        let dir = self.volumes_dir.clone();
        let file = DataDir::volume_file_name(&rec.id.0);
        let size = rec.size_bytes;
        let path = self.volume_path(&rec.id);
        let made = tokio::task::spawn_blocking(move || -> Result<(), String> {
            match store::create_volume_file(&dir, &file, size) {
                Ok(_) | Err(store::VolumeFileError::AlreadyExists { .. }) => {}
                Err(e) => return Err(error_chain(&e)),
            }
            Replica::create_meta(&store::default_meta_path(&path)).map_err(|e| error_chain(&e))?;
            Ok(())
        })
        .await
        .map_err(internal("create the volume file"))?;
        if let Err(e) = made {
            let code = if e.contains("No space left") || e.contains("quota") {
                ErrorCode::NoSpace
            } else {
                ErrorCode::Internal
            };
            return Err(ApiError::new(
                code,
                format!(
                    "cannot create volume {} on node {}: {e}",
                    rec.name, self.me.name
                ),
            ));
        }
        self.open_replica(rec)
    }

    /// Opens the existing replica files of `rec` and registers the replica.
    pub fn open_replica(self: &Arc<Self>, rec: &VolumeRecord) -> Result<Arc<Replica>, ApiError> {
        let path = self.volume_path(&rec.id);
        let meta = store::default_meta_path(&path);
        Replica::create_meta(&meta).map_err(|e| ApiError::internal(error_chain(&e)))?;
        let on_error = self.error_callback(rec.name.clone());
        let options = VolumeOptions {
            on_error: Some(on_error),
            ..VolumeOptions::default()
        };
        let volume = LocalVolume::open(&path, rec.size_bytes, options).map_err(|e| {
            ApiError::internal(format!(
                "cannot open volume {}: {}",
                rec.name,
                error_chain(&e)
            ))
        })?;
        let options = ReplicaOptions {
            on_advance: Some(self.advance_callback(rec.name.clone())),
        };
        let replica = Replica::open(volume, &meta, options).map_err(|e| {
            ApiError::internal(format!(
                "cannot open replica of {}: {}",
                rec.name,
                error_chain(&e)
            ))
        })?;
        let replica = Arc::new(replica);
        self.replicas
            .lock()
            .unwrap()
            .insert(rec.id.clone(), replica.clone());
        Ok(replica)
    }

    /// Closes and removes this node's replica of volume `id` (files included).
    pub async fn remove_replica_files(&self, id: &VolumeId) -> Result<(), ApiError> {
        let replica = self.replicas.lock().unwrap().remove(id);
        let path = self.volume_path(id);
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            if let Some(r) = replica {
                r.volume().close();
            }
            store::remove_volume_file(&path).map_err(|e| error_chain(&e))?;
            // The generation fence and the replication metadata go with the data.
            for side in [
                store::default_meta_path(&path),
                store::default_repl_meta_path(&path),
            ] {
                match std::fs::remove_file(&side) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("cannot remove {}: {e}", side.display())),
                }
            }
            Ok(())
        })
        .await
        .map_err(internal("remove the volume files"))?
        .map_err(ApiError::internal)
    }

    /// `volume delete`: refused while in use unless `force`, which disconnects clients first.
    pub async fn delete_volume(self: &Arc<Self>, name: &Name, force: bool) -> Result<(), ApiError> {
        let _ops = self.ops_lock.lock().await;
        let (mut rec, rev) = self.get_record(name).await?;
        if let Some(held) = self.catalog.get_owner(name).await.map_err(catalog_error)? {
            if !force {
                let holder = self.node_name(&held.holder).await;
                let local = self
                    .attachment(name)
                    .map(|a| a.usage_text())
                    .unwrap_or_default();
                return Err(ApiError::new(
                    ErrorCode::InUse,
                    format!("volume {name} is in use: attached on node {holder} (generation {}){local}; use --force to disconnect and delete it", held.generation),
                ));
            }
        }
        if rec.state != VolumeState::Deleting {
            rec.state = VolumeState::Deleting;
            self.catalog
                .put_volume(&rec, Expect::At(rev))
                .await
                .map_err(catalog_error)?;
        }
        if self.attachment(name).is_some() {
            self.force_detach(name, "the volume is being deleted").await;
        }
        if rec.replicas_placed.iter().any(|r| r.node_id == self.me.id) {
            self.finish_local_delete(&rec).await?;
        }
        self.wait_until_gone(name).await?;
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

    /// Removes this node's replica of a `deleting` volume and takes it off the record; the
    /// last replica node removes the record.
    pub async fn finish_local_delete(&self, rec: &VolumeRecord) -> Result<(), ApiError> {
        self.remove_replica_files(&rec.id).await?;
        for _ in 0..super::attach::CAS_RETRIES {
            let Some((mut cur, rev)) = self
                .catalog
                .get_volume(&rec.name)
                .await
                .map_err(catalog_error)?
            else {
                return Ok(());
            };
            if cur.id != rec.id {
                return Ok(());
            }
            cur.replicas_placed.retain(|r| r.node_id != self.me.id);
            let r = if cur.replicas_placed.is_empty() {
                self.catalog.delete_volume(&cur.name, Expect::At(rev)).await
            } else {
                self.catalog
                    .put_volume(&cur, Expect::At(rev))
                    .await
                    .map(|_| ())
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(catalog_error(e)),
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            format!("volume {}: its record kept changing; try again", rec.name),
        ))
    }

    async fn wait_until_gone(&self, name: &Name) -> Result<(), ApiError> {
        let deadline = Instant::now() + REMOTE_ACTION_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            let Some((r, _)) = self.catalog.get_volume(name).await.map_err(catalog_error)? else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                let pending: Vec<&str> = r
                    .replicas_placed
                    .iter()
                    .map(|p| p.node_name.as_str())
                    .collect();
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("volume {name} is marked for deletion, but node(s) {} have not removed their replica yet (down?); they will when they return", pending.join(", ")),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_CAP);
        }
    }

    /// `volume resize`: grow only.
    pub async fn resize_volume(
        &self,
        name: &Name,
        size_bytes: u64,
    ) -> Result<VolumeRecord, ApiError> {
        check_size(size_bytes)?;
        let _ops = self.ops_lock.lock().await;
        let (mut rec, rev) = self.get_record(name).await?;
        if rec.state != VolumeState::Ready {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("volume {name} is not ready ({:?})", rec.state),
            ));
        }
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
        if let Some(replica) = self.replica(&rec.id) {
            let path = self.volume_path(&rec.id);
            let grown =
                tokio::task::spawn_blocking(move || store::grow_volume_file(&path, size_bytes))
                    .await
                    .map_err(internal("grow the volume file"))?;
            if let Err(e) = grown {
                let msg = error_chain(&e);
                let code = if msg.contains("No space left") {
                    ErrorCode::NoSpace
                } else {
                    ErrorCode::Internal
                };
                return Err(ApiError::new(
                    code,
                    format!("cannot grow volume {name}: {msg}"),
                ));
            }
            replica
                .volume()
                .set_size(size_bytes)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
        let old = rec.size_bytes;
        rec.size_bytes = size_bytes;
        self.catalog
            .put_volume(&rec, Expect::At(rev))
            .await
            .map_err(catalog_error)?;
        let msg = format!(
            "volume {name} grown from {} to {}",
            format_size(old),
            format_size(size_bytes)
        );
        self.event(Level::Info, "volume.resized", Some(name), msg)
            .await;
        Ok(rec)
    }

    /// A node's name from its id (the id itself if unknown).
    pub async fn node_name(&self, id: &bw_types::NodeId) -> String {
        if *id == self.me.id {
            return self.me.name.to_string();
        }
        match self.catalog.get_node(id).await {
            Ok(Some((n, _))) => n.name.to_string(),
            _ => id.to_string(),
        }
    }

    /// A newer generation was admitted by a replica held here (another node attached the
    /// volume): an older attachment on this node is void — its I/O already fails at the
    /// fence; this closes its connections, releases it and says so.
    fn advance_callback(self: &Arc<Self>, name: Name) -> store::AdvanceCallback {
        let node = Arc::downgrade(self);
        Arc::new(move |_previous: Generation, new: Generation| {
            let Some(node) = node.upgrade() else { return };
            if node.attachment(&name).is_some_and(|a| a.generation < new) {
                let msg = format!("volume {name}: generation {new} was admitted by the replica on node {}; the older attachment here is fenced", node.me.name);
                node.event_later(Level::Warning, "volume.fenced", Some(name.clone()), msg);
                let (n, name) = (node.clone(), name.clone());
                node.runtime.spawn(async move {
                    n.force_detach(&name, "fenced by a newer generation").await
                });
            }
        })
    }

    /// Turns the store's error reports into events (I/O thread → runtime task).
    fn error_callback(self: &Arc<Self>, name: Name) -> store::ErrorCallback {
        let node = Arc::downgrade(self);
        Arc::new(move |ev: VolumeErrorEvent| {
            let Some(node) = node.upgrade() else { return };
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
            node.event_later(level, kind, Some(name.clone()), msg);
        })
    }
}

/// An error and its sources as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
