//! The HTTP API's view of the cluster: implements [`api::Control`] over [`Node`]. Any agent
//! answers any call; attach and detach aimed at another node are forwarded to that node's
//! API, since the attachment must live where the NBD export is served. A single volume's GET
//! is forwarded to the node it is attached on too, since only that node knows its replicas'
//! live state and resync progress; everything else is answered from the catalog.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::{
    AddReplica, ApiError, Attached, AttachmentView, Control, CreateVolume, ErrorCode, EventFollow,
    EventQuery, EventView, NodeView, ReplicaView, StatusView, VolumeSettings, VolumeView,
};
use bw_types::{Name, NodeId};
use catalog::{
    ClusterStore, EventRecord, Expect, Level, NodeRecord, OwnerRecord, Prefix, ReplicaState,
    VolumeRecord,
};
use tokio::sync::mpsc;

use super::attach::HeldBy;
use super::node::{attach_error, catalog_error, Node};
use crate::logging::now_ms;

pub struct AgentControl<C: ClusterStore>(pub Arc<Node<C>>);

/// How long a volume's GET waits for the node it is attached on before answering from the
/// catalog instead: a live view is worth a short wait, but `volume show` (and the CLI's
/// `--wait` polling every 500 ms) must not hang on a node that is down or partitioned.
const FORWARD_VIEW_TIMEOUT: Duration = Duration::from_secs(2);

/// Read-modify-write attempts of `set_volume` when a concurrent change wins the revision race;
/// then the caller gets `conflict` and may retry.
const SET_ATTEMPTS: usize = 5;

/// What a view needs besides the record: nodes, alive set and owner keys, read once per call.
struct Context {
    nodes: BTreeMap<NodeId, NodeRecord>,
    alive: Vec<NodeId>,
    owners: BTreeMap<String, (OwnerRecord, u64)>,
}

impl<C: ClusterStore> AgentControl<C> {
    async fn context(&self) -> Result<Context, ApiError> {
        let c = &self.0.catalog;
        let nodes = self.0.node_records().await?;
        let alive = c
            .list_alive()
            .await
            .map_err(catalog_error)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let (rows, _) = c.list_at(Prefix::Owners).await.map_err(catalog_error)?;
        let owners = rows
            .into_iter()
            .filter_map(|(k, v, rev)| {
                let name = k.as_str().rsplit('/').next()?.to_owned();
                serde_json::from_slice::<OwnerRecord>(&v)
                    .ok()
                    .map(|o| (name, (o, rev.0)))
            })
            .collect();
        Ok(Context {
            nodes,
            alive,
            owners,
        })
    }

    fn node_name(&self, ctx: &Context, id: &NodeId) -> String {
        ctx.nodes
            .get(id)
            .map(|n| n.name.to_string())
            .unwrap_or_else(|| id.to_string())
    }

    fn view(&self, ctx: &Context, rec: &VolumeRecord) -> VolumeView {
        let node = &self.0;
        let owner = ctx.owners.get(rec.name.as_str());
        let attached = owner.map(|(o, generation)| AttachmentView {
            node: self.node_name(ctx, &o.node),
            generation: *generation,
            since_ms: o.since_ms,
            explicit: rec
                .attachment
                .as_ref()
                .is_some_and(|a| a.explicit && a.generation.0 == *generation),
        });
        let local = node.attachment(&rec.name);
        let nbd_uri = owner
            .and_then(|(o, _)| ctx.nodes.get(&o.node))
            .map(|n| uri_for(&n.nbd_addr, &rec.name));
        // The replication engine of an attachment here is authoritative; the catalog's states
        // lag it (they are written on transitions only, and carry no progress).
        let replica_set = node
            .live_replicas(&rec.name)
            .unwrap_or_else(|| catalog_replicas(ctx, rec, node.cluster));
        let degraded = replica_set.iter().any(|r| !r.in_sync);
        VolumeView {
            name: rec.name.to_string(),
            id: rec.id.0.clone(),
            size_bytes: rec.size_bytes,
            replicas: rec.replicas,
            mode: match rec.mode {
                catalog::Mode::Sync => api::Mode::Sync,
                catalog::Mode::Async => api::Mode::Async,
            },
            state: match rec.state {
                catalog::VolumeState::Creating => api::VolumeState::Creating,
                catalog::VolumeState::Ready => api::VolumeState::Ready,
                catalog::VolumeState::Deleting => api::VolumeState::Deleting,
            },
            degraded,
            generation: rec.generation.0.max(owner.map(|(_, g)| *g).unwrap_or(0)),
            in_use_connections: local.map(|a| a.usage().connections).unwrap_or(0),
            nbd_uri,
            attached,
            replica_set,
            spread: rec.spread.clone(),
            resync_rate_bytes_per_s: rec.resync_rate_bytes_per_s,
            min_in_sync: rec.min_in_sync.unwrap_or(1),
            created_at_ms: rec.created_at_ms,
        }
    }

    /// The view of the node `name` is attached on, if that is another live node that answers
    /// within `FORWARD_VIEW_TIMEOUT`. The answering node does not forward again unless it
    /// no longer holds the volume itself, so a request cannot bounce between two nodes
    /// unless the attachment itself moves back and forth meanwhile.
    async fn forwarded_view(&self, ctx: &Context, name: &Name) -> Option<VolumeView> {
        let (owner, _) = ctx.owners.get(name.as_str())?;
        if owner.node == self.0.me.id || !ctx.alive.contains(&owner.node) {
            return None;
        }
        let holder = ctx.nodes.get(&owner.node)?;
        let client = api::Client::new(&format!("http://{}", holder.api_addr)).ok()?;
        match tokio::time::timeout(FORWARD_VIEW_TIMEOUT, client.get_volume(name.as_str())).await {
            Ok(Ok(v)) if v.name == name.as_str() => Some(v),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                log::debug!(
                    "volume {name}: live view from node {} failed: {e}",
                    holder.name
                );
                None
            }
            Err(_) => {
                log::debug!(
                    "volume {name}: node {} gave no live view within {FORWARD_VIEW_TIMEOUT:?}",
                    holder.name
                );
                None
            }
        }
    }

    /// The API client of another node, by name.
    async fn remote_api(&self, node: &Name) -> Result<api::Client, ApiError> {
        let nodes = self.0.node_records().await?;
        let rec = nodes
            .values()
            .find(|n| n.name == *node)
            .ok_or_else(|| ApiError::not_found(format!("no node named {node}")))?;
        api::Client::new(&format!("http://{}", rec.api_addr))
            .map_err(|e| ApiError::internal(e.to_string()))
    }
}

/// The wire spelling of a catalog replica state (`in_sync`, …).
fn replica_state_str(s: ReplicaState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Replicas as the catalog records them (no live engine here): the desired state, with what
/// the holding node last reported when that differs, or that the node is down, in `error`.
/// Only cluster nodes publish reports, so a missing one is worth a note only there.
fn catalog_replicas(ctx: &Context, rec: &VolumeRecord, cluster: bool) -> Vec<ReplicaView> {
    let now = now_ms();
    rec.replicas_placed
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let state = replica_state_str(r.state);
            let report = ctx.nodes.get(&r.node_id).and_then(|n| {
                n.replicas
                    .get(&rec.id.0)
                    .map(|rep| (rep, now.saturating_sub(n.last_seen_ms)))
            });
            let error = if !ctx.alive.contains(&r.node_id) {
                Some(format!("node {} is down", r.node_name))
            } else {
                match report {
                    Some((rep, age)) if rep.state != state => Some(format!(
                        "its node reports {} ({}s ago){}",
                        rep.state,
                        age / 1000,
                        rep.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )),
                    Some((rep, _)) => rep.error.clone(),
                    None if cluster && r.state == ReplicaState::InSync => {
                        Some("not reported by its node yet".into())
                    }
                    None => None,
                }
            };
            ReplicaView {
                // Records written before replication have no ids: position + 1, as the
                // catalog assigns them.
                id: if r.id == 0 { i as u64 + 1 } else { r.id },
                node: r.node_name.to_string(),
                state,
                in_sync: r.state == ReplicaState::InSync,
                error,
                resync: None,
                lag_bytes: None,
            }
        })
        .collect()
}

/// `nbd://HOST:PORT/NAME`; a wildcard listen address is shown as 127.0.0.1.
pub fn uri_for(listen: &str, name: &Name) -> String {
    let addr: Option<std::net::SocketAddr> = listen.parse().ok();
    match addr {
        Some(a) => {
            let host = if a.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                a.ip().to_string()
            };
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            format!("nbd://{host}:{}/{name}", a.port())
        }
        None => format!("nbd://{listen}/{name}"),
    }
}

pub fn event_view(e: EventRecord) -> EventView {
    EventView {
        seq: e.seq,
        time_ms: e.time_ms,
        level: match e.level {
            Level::Info => api::Level::Info,
            Level::Warning => api::Level::Warning,
            Level::Error => api::Level::Error,
        },
        kind: e.kind,
        volume: e.volume,
        node: e.node,
        message: e.message,
    }
}

fn forwarded(e: api::ClientError) -> ApiError {
    match e.api_error() {
        Some(a) => a.clone(),
        None => ApiError::new(ErrorCode::Unavailable, e.to_string()),
    }
}

impl<C: ClusterStore> Control for AgentControl<C> {
    async fn create_volume(&self, req: CreateVolume) -> Result<VolumeView, ApiError> {
        let rec = self.0.create_volume(req).await?;
        Ok(self.view(&self.context().await?, &rec))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeView>, ApiError> {
        let recs = self.0.catalog.list_volumes().await.map_err(catalog_error)?;
        let ctx = self.context().await?;
        Ok(recs.iter().map(|(r, _)| self.view(&ctx, r)).collect())
    }

    async fn get_volume(&self, name: Name) -> Result<VolumeView, ApiError> {
        let (rec, _) = self.0.get_record(&name).await?;
        let ctx = self.context().await?;
        if self.0.attachment(&name).is_none() {
            if let Some(v) = self.forwarded_view(&ctx, &name).await {
                return Ok(v);
            }
        }
        Ok(self.view(&ctx, &rec))
    }

    async fn resize_volume(&self, name: Name, size_bytes: u64) -> Result<VolumeView, ApiError> {
        let rec = self.0.resize_volume(&name, size_bytes).await?;
        Ok(self.view(&self.context().await?, &rec))
    }

    async fn delete_volume(&self, name: Name, force: bool) -> Result<(), ApiError> {
        self.0.delete_volume(&name, force).await
    }

    async fn attach_volume(&self, name: Name, node: Option<Name>) -> Result<Attached, ApiError> {
        if let Some(target) = node.filter(|n| *n != self.0.me.name) {
            let client = self.remote_api(&target).await?;
            return client
                .attach_volume(name.as_str(), Some(target.as_str()))
                .await
                .map_err(forwarded);
        }
        let att = self.0.acquire(&name, true).await.map_err(attach_error)?;
        Ok(Attached {
            nbd_uri: uri_for(&self.0.config.nbd_listen.to_string(), &name),
            node: self.0.me.name.to_string(),
            generation: att.generation.0,
        })
    }

    async fn detach_volume(&self, name: Name) -> Result<(), ApiError> {
        self.0.get_record(&name).await?;
        match self
            .0
            .catalog
            .get_owner(&name)
            .await
            .map_err(catalog_error)?
        {
            None => Ok(()),
            Some(held) if held.holder == self.0.me.id => self.0.detach_local(&name).await,
            Some(held) => {
                let holder = self.0.node_name(&held.holder).await;
                let holder = Name::new(&holder).map_err(|e| ApiError::internal(e.to_string()))?;
                let client = self.remote_api(&holder).await.map_err(|e| {
                    let h = HeldBy {
                        volume: name.clone(),
                        holder: holder.to_string(),
                        generation: held.generation,
                        since_ms: held.since_ms,
                    };
                    ApiError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "{}; cannot reach that node to detach: {}",
                            super::attach::AttachError::Held(h),
                            e.message
                        ),
                    )
                })?;
                client.detach_volume(name.as_str()).await.map_err(forwarded)
            }
        }
    }

    async fn set_volume(
        &self,
        name: Name,
        settings: VolumeSettings,
    ) -> Result<VolumeView, ApiError> {
        if settings.mode == Some(api::Mode::Async) {
            return Err(ApiError::bad_request(
                "--mode async (geographic replication) is not available in this build",
            ));
        }
        // Serialised with create / delete / resize issued here; other nodes' writers are
        // caught by the revision check.
        let _ops = self.0.ops_lock.lock().await;
        for _ in 0..SET_ATTEMPTS {
            let (mut rec, rev) = self.0.get_record(&name).await?;
            if let Some(k) = settings.min_in_sync {
                if k == 0 || k > rec.replicas {
                    return Err(ApiError::bad_request(format!(
                        "--min-in-sync {k}: must be between 1 and the number of replicas of volume {name} ({})",
                        rec.replicas
                    )));
                }
                rec.min_in_sync = Some(k);
            }
            if let Some(r) = settings.resync_rate_bytes_per_s {
                rec.resync_rate_bytes_per_s = Some(r);
            }
            match self.0.catalog.put_volume(&rec, Expect::At(rev)).await {
                Ok(_) => return Ok(self.view(&self.context().await?, &rec)),
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(catalog_error(e)),
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            format!("volume {name} kept changing while its settings were being saved; try again"),
        ))
    }

    async fn add_replica(&self, name: Name, req: AddReplica) -> Result<VolumeView, ApiError> {
        let rec = self
            .0
            .add_replica(&name, &req.node, req.resync_rate_bytes_per_s)
            .await?;
        Ok(self.view(&self.context().await?, &rec))
    }

    async fn remove_replica(&self, name: Name, node: Name) -> Result<VolumeView, ApiError> {
        let rec = self.0.remove_replica(&name, &node).await?;
        Ok(self.view(&self.context().await?, &rec))
    }

    async fn list_nodes(&self) -> Result<Vec<NodeView>, ApiError> {
        let ctx = self.context().await?;
        // This node's own record is built fresh (free space, last seen) rather than read back
        // from its last heartbeat; the others are as they last published them.
        let me = self.0.own_record();
        let mut nodes: Vec<NodeRecord> = ctx
            .nodes
            .values()
            .filter(|n| n.id != me.id)
            .cloned()
            .collect();
        nodes.push(me);
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes
            .into_iter()
            .map(|fresh| {
                let alive = ctx.alive.contains(&fresh.id);
                NodeView {
                    id: fresh.id.0.clone(),
                    name: fresh.name.to_string(),
                    labels: fresh.labels.clone(),
                    nbd_addr: fresh.nbd_addr.clone(),
                    api_addr: fresh.api_addr.clone(),
                    peer_addr: fresh.peer_addr.clone(),
                    capacity_bytes: fresh.capacity_bytes,
                    free_bytes: fresh.free_bytes,
                    started_at_ms: fresh.started_at_ms,
                    last_seen_ms: fresh.last_seen_ms,
                    alive,
                }
            })
            .collect())
    }

    async fn status(&self) -> Result<StatusView, ApiError> {
        let n = &self.0;
        let recs = n.catalog.list_volumes().await.map_err(catalog_error)?;
        let ctx = self.context().await?;
        let views: Vec<VolumeView> = recs.iter().map(|(r, _)| self.view(&ctx, r)).collect();
        Ok(StatusView {
            node: n.me.name.to_string(),
            node_id: n.me.id.0.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            catalog: if n.cluster {
                "etcd".into()
            } else {
                "embedded".into()
            },
            uptime_ms: now_ms().saturating_sub(n.started_at_ms),
            nodes: ctx.nodes.len().max(1) as u32,
            volumes: views.len() as u32,
            volumes_size_bytes: views.iter().map(|v| v.size_bytes).sum(),
            attached: views.iter().filter(|v| v.attached.is_some()).count() as u32,
            degraded: views.iter().filter(|v| v.degraded).count() as u32,
        })
    }

    async fn events(&self, q: EventQuery) -> Result<Vec<EventView>, ApiError> {
        let c = &self.0.catalog;
        let after = match q.since {
            Some(s) => s,
            None => c
                .last_event_seq()
                .await
                .map_err(catalog_error)?
                .saturating_sub(u64::from(q.limit)),
        };
        let evs = c
            .events_since(after, q.limit as usize)
            .await
            .map_err(catalog_error)?;
        Ok(evs.into_iter().map(event_view).collect())
    }

    async fn follow_events(&self, since: Option<u64>) -> Result<EventFollow, ApiError> {
        let c = self.0.catalog.clone();
        let after = match since {
            Some(s) => s,
            None => c.last_event_seq().await.map_err(catalog_error)?,
        };
        let mut src = catalog::follow_events(c, after);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(item) = src.recv().await {
                match item {
                    Ok(e) => {
                        if tx.send(event_view(e)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        log::warn!("event stream ended: {e}");
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn metrics_text(&self) -> String {
        super::metrics::render(&self.0).await
    }
}
