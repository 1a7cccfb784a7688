//! The HTTP API's view of the node: implements [`api::Control`] over [`Node`].

use std::sync::Arc;

use api::{
    ApiError, Attached, AttachmentView, Control, CreateVolume, ErrorCode, EventFollow, EventQuery,
    EventView, NodeView, ReplicaView, StatusView, VolumeSettings, VolumeView,
};
use bw_types::Name;
use catalog::{Catalog, EventRecord, Level, VolumeRecord};
use tokio::sync::mpsc;

use super::node::{catalog_error, Node};
use crate::logging::now_ms;

pub struct AgentControl<C: Catalog>(pub Arc<Node<C>>);

impl<C: Catalog> AgentControl<C> {
    fn view(&self, rec: &VolumeRecord) -> VolumeView {
        let node = &self.0;
        let served = node.served(&rec.name);
        let usage = served.as_ref().map(|s| s.usage()).unwrap_or_default();
        let attached = rec.attachment.as_ref().map(|a| AttachmentView {
            node: a.node_name.to_string(),
            generation: a.generation.0,
            since_ms: a.since_ms,
            explicit: a.explicit,
        });
        let faulted = served.as_ref().and_then(|s| s.device.fault_reason());
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
            degraded: faulted.is_some(),
            generation: rec.generation.0,
            in_use_connections: usage.connections,
            nbd_uri: Some(nbd_uri(&node.config.nbd_listen, &rec.name)),
            attached,
            replica_set: rec
                .replicas_placed
                .iter()
                .map(|r| ReplicaView {
                    node: r.node_name.to_string(),
                    state: if faulted.is_some() {
                        "faulted".into()
                    } else {
                        replica_state(r.state).into()
                    },
                })
                .collect(),
            spread: rec.spread.clone(),
            resync_rate_bytes_per_s: rec.resync_rate_bytes_per_s,
            created_at_ms: rec.created_at_ms,
        }
    }
}

fn replica_state(s: catalog::ReplicaState) -> &'static str {
    match s {
        catalog::ReplicaState::Creating => "creating",
        catalog::ReplicaState::InSync => "in_sync",
        catalog::ReplicaState::Stale => "stale",
        catalog::ReplicaState::Faulted => "faulted",
    }
}

/// `nbd://HOST:PORT/NAME`; a wildcard listen address is shown as 127.0.0.1 (what a local
/// client can reach).
pub fn nbd_uri(listen: &std::net::SocketAddr, name: &Name) -> String {
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen.ip().to_string()
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    format!("nbd://{host}:{}/{name}", listen.port())
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

impl<C: Catalog> Control for AgentControl<C> {
    async fn create_volume(&self, req: CreateVolume) -> Result<VolumeView, ApiError> {
        let rec = self.0.create_volume(req).await?;
        Ok(self.view(&rec))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeView>, ApiError> {
        let recs = self.0.catalog.list_volumes().await.map_err(catalog_error)?;
        Ok(recs.iter().map(|(r, _)| self.view(r)).collect())
    }

    async fn get_volume(&self, name: Name) -> Result<VolumeView, ApiError> {
        let (rec, _) = self.0.get_record(&name).await?;
        Ok(self.view(&rec))
    }

    async fn resize_volume(&self, name: Name, size_bytes: u64) -> Result<VolumeView, ApiError> {
        let rec = self.0.resize_volume(&name, size_bytes).await?;
        Ok(self.view(&rec))
    }

    async fn delete_volume(&self, name: Name, force: bool) -> Result<(), ApiError> {
        self.0.delete_volume(&name, force).await
    }

    async fn attach_volume(&self, name: Name, node: Option<Name>) -> Result<Attached, ApiError> {
        let (rec, generation) = self.0.attach_volume(&name, node.as_ref()).await?;
        Ok(Attached {
            nbd_uri: nbd_uri(&self.0.config.nbd_listen, &rec.name),
            node: self.0.me.name.to_string(),
            generation: generation.0,
        })
    }

    async fn detach_volume(&self, name: Name) -> Result<(), ApiError> {
        self.0.detach_volume(&name).await
    }

    async fn set_volume(
        &self,
        name: Name,
        settings: VolumeSettings,
    ) -> Result<VolumeView, ApiError> {
        let (rec, _) = self.0.get_record(&name).await?;
        if settings.mode == Some(api::Mode::Async) {
            return Err(ApiError::bad_request(
                "--mode async needs a second site; an embedded agent has one node",
            ));
        }
        if settings.resync_rate_bytes_per_s.is_some() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("volume {name} has one replica: there is nothing to resync (replication needs a cluster)"),
            ));
        }
        Ok(self.view(&rec))
    }

    async fn list_nodes(&self) -> Result<Vec<NodeView>, ApiError> {
        let n = &self.0;
        let (capacity, free) = fs_space(&n.volumes_dir);
        Ok(vec![NodeView {
            id: n.me.id.0.clone(),
            name: n.me.name.to_string(),
            labels: n.config.labels.clone(),
            nbd_addr: n.config.nbd_listen.to_string(),
            api_addr: n.config.api_listen.to_string(),
            peer_addr: None,
            capacity_bytes: capacity,
            free_bytes: free,
            started_at_ms: n.started_at_ms,
            last_seen_ms: now_ms(),
            alive: true,
        }])
    }

    async fn status(&self) -> Result<StatusView, ApiError> {
        let n = &self.0;
        let recs = n.catalog.list_volumes().await.map_err(catalog_error)?;
        let views: Vec<VolumeView> = recs.iter().map(|(r, _)| self.view(r)).collect();
        Ok(StatusView {
            node: n.me.name.to_string(),
            node_id: n.me.id.0.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            catalog: "embedded".into(),
            uptime_ms: now_ms().saturating_sub(n.started_at_ms),
            nodes: 1,
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
