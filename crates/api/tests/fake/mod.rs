//! An in-memory `Control` for driving the server: a test double above the HTTP seam (the
//! real agent is tested end to end elsewhere). Just enough behaviour to exercise every route
//! and every error code path the server maps.

use std::collections::BTreeMap;
use std::sync::Mutex;

use api::{
    AddReplica, ApiError, Attached, AttachmentView, Control, CreateVolume, ErrorCode, EventFollow,
    EventQuery, EventView, Level, Mode, NodeView, ReplicaView, ResyncView, StatusView,
    VolumeSettings, VolumeState, VolumeView,
};
use bw_types::Name;
use tokio::sync::{broadcast, mpsc};

pub struct Fake {
    volumes: Mutex<BTreeMap<String, VolumeView>>,
    events: Mutex<Vec<EventView>>,
    live: broadcast::Sender<EventView>,
}

impl Default for Fake {
    fn default() -> Fake {
        Fake::new()
    }
}

impl Fake {
    pub fn new() -> Fake {
        Fake {
            volumes: Mutex::new(BTreeMap::new()),
            events: Mutex::new(Vec::new()),
            live: broadcast::channel(64).0,
        }
    }

    pub fn emit(&self, kind: &str, volume: &str) {
        let mut evs = self.events.lock().unwrap();
        let ev = EventView {
            seq: evs.len() as u64 + 1,
            time_ms: 1,
            level: Level::Info,
            kind: kind.to_owned(),
            volume: Some(volume.to_owned()),
            node: Some("node-1".to_owned()),
            message: format!("{kind} {volume}"),
        };
        evs.push(ev.clone());
        let _ = self.live.send(ev);
    }

    fn with_volume<T>(
        &self,
        name: &Name,
        f: impl FnOnce(&mut VolumeView) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut vols = self.volumes.lock().unwrap();
        let v = vols
            .get_mut(name.as_str())
            .ok_or_else(|| ApiError::not_found(format!("volume {:?} not found", name.as_str())))?;
        f(v)
    }
}

/// The nodes the fake cluster has; replicas can be added on these only.
pub const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

fn in_sync_replica(id: u64, node: &str) -> ReplicaView {
    ReplicaView {
        id,
        node: node.to_owned(),
        state: "in_sync".into(),
        in_sync: true,
        error: None,
        resync: None,
        lag_bytes: None,
    }
}

fn uri(name: &str) -> String {
    format!("nbd://127.0.0.1:10809/{name}")
}

impl Control for Fake {
    async fn create_volume(&self, req: CreateVolume) -> Result<VolumeView, ApiError> {
        if req.size_bytes > 1 << 40 {
            return Err(ApiError::new(
                ErrorCode::NoSpace,
                "not enough free space on any node",
            ));
        }
        let v = VolumeView {
            name: req.name.to_string(),
            id: format!("id-{}", req.name),
            size_bytes: req.size_bytes,
            replicas: req.replicas.unwrap_or(1),
            min_in_sync: req.min_in_sync.unwrap_or(1),
            mode: req.mode.unwrap_or(Mode::Sync),
            state: VolumeState::Ready,
            degraded: false,
            generation: 0,
            attached: None,
            in_use_connections: 0,
            nbd_uri: None,
            replica_set: NODES
                .iter()
                .take(req.replicas.unwrap_or(1) as usize)
                .enumerate()
                .map(|(i, n)| in_sync_replica(i as u64 + 1, n))
                .collect(),
            spread: req.spread,
            resync_rate_bytes_per_s: req.resync_rate_bytes_per_s,
            created_at_ms: 1,
        };
        let mut vols = self.volumes.lock().unwrap();
        if vols.contains_key(&v.name) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("volume {:?} already exists", v.name),
            ));
        }
        vols.insert(v.name.clone(), v.clone());
        drop(vols);
        self.emit("volume.created", &v.name);
        Ok(v)
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeView>, ApiError> {
        Ok(self.volumes.lock().unwrap().values().cloned().collect())
    }

    async fn get_volume(&self, name: Name) -> Result<VolumeView, ApiError> {
        self.with_volume(&name, |v| Ok(v.clone()))
    }

    async fn resize_volume(&self, name: Name, size_bytes: u64) -> Result<VolumeView, ApiError> {
        self.with_volume(&name, |v| {
            if size_bytes < v.size_bytes {
                return Err(ApiError::new(
                    ErrorCode::InvalidSize,
                    "volumes cannot shrink",
                ));
            }
            v.size_bytes = size_bytes;
            Ok(v.clone())
        })
    }

    async fn delete_volume(&self, name: Name, force: bool) -> Result<(), ApiError> {
        self.with_volume(&name, |v| match &v.attached {
            Some(a) if !force => Err(ApiError::new(
                ErrorCode::InUse,
                format!("volume is attached on {}", a.node),
            )),
            _ => Ok(()),
        })?;
        self.volumes.lock().unwrap().remove(name.as_str());
        Ok(())
    }

    async fn attach_volume(&self, name: Name, node: Option<Name>) -> Result<Attached, ApiError> {
        let node = node.map_or("node-1".to_owned(), |n| n.to_string());
        self.with_volume(&name, |v| {
            v.generation += 1;
            v.attached = Some(AttachmentView {
                node: node.clone(),
                generation: v.generation,
                since_ms: 5,
                explicit: true,
            });
            v.nbd_uri = Some(uri(&v.name));
            Ok(Attached {
                nbd_uri: uri(&v.name),
                node,
                generation: v.generation,
            })
        })
    }

    async fn detach_volume(&self, name: Name) -> Result<(), ApiError> {
        self.with_volume(&name, |v| {
            v.attached = None;
            v.nbd_uri = None;
            Ok(())
        })
    }

    async fn set_volume(&self, name: Name, s: VolumeSettings) -> Result<VolumeView, ApiError> {
        self.with_volume(&name, |v| {
            if let Some(m) = s.mode {
                v.mode = m;
            }
            if let Some(r) = s.resync_rate_bytes_per_s {
                v.resync_rate_bytes_per_s = Some(r);
            }
            if let Some(k) = s.min_in_sync {
                if k == 0 || k > v.replicas {
                    return Err(ApiError::bad_request(format!(
                        "min_in_sync {k} must be between 1 and {}",
                        v.replicas
                    )));
                }
                v.min_in_sync = k;
            }
            Ok(v.clone())
        })
    }

    async fn add_replica(&self, name: Name, req: AddReplica) -> Result<VolumeView, ApiError> {
        let node = req.node.to_string();
        if !NODES.contains(&node.as_str()) {
            return Err(ApiError::not_found(format!("no node named {node}")));
        }
        self.with_volume(&name, |v| {
            if v.replica_set.iter().any(|r| r.node == node) {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("volume {name} already has a replica on node {node}"),
                ));
            }
            let id = v.replica_set.iter().map(|r| r.id).max().unwrap_or(0) + 1;
            let rate = req
                .resync_rate_bytes_per_s
                .or(v.resync_rate_bytes_per_s)
                .unwrap_or(100 << 20);
            v.replica_set.push(ReplicaView {
                id,
                node,
                state: "resyncing".into(),
                in_sync: false,
                error: None,
                resync: Some(ResyncView {
                    copied_bytes: 0,
                    total_bytes: v.size_bytes,
                    rate_bytes_per_s: rate,
                    eta_s: None,
                }),
                lag_bytes: Some(v.size_bytes),
            });
            v.replicas += 1;
            v.degraded = true;
            Ok(v.clone())
        })
    }

    async fn remove_replica(&self, name: Name, node: Name) -> Result<VolumeView, ApiError> {
        self.with_volume(&name, |v| {
            let i = v
                .replica_set
                .iter()
                .position(|r| r.node == node.as_str())
                .ok_or_else(|| {
                    ApiError::not_found(format!("volume {name} has no replica on node {node}"))
                })?;
            if v.replica_set.len() == 1 {
                return Err(ApiError::bad_request(format!(
                    "node {node} holds the last replica of volume {name}"
                )));
            }
            v.replica_set.remove(i);
            v.replicas -= 1;
            v.min_in_sync = v.min_in_sync.min(v.replicas);
            v.degraded = v.replica_set.iter().any(|r| !r.in_sync);
            Ok(v.clone())
        })
    }

    async fn list_nodes(&self) -> Result<Vec<NodeView>, ApiError> {
        Ok(vec![NodeView {
            id: "n1".into(),
            name: "node-1".into(),
            labels: [("room".to_owned(), "a".to_owned())].into(),
            nbd_addr: "127.0.0.1:10809".into(),
            api_addr: "127.0.0.1:7800".into(),
            peer_addr: None,
            capacity_bytes: 1 << 40,
            free_bytes: 1 << 39,
            started_at_ms: 1,
            last_seen_ms: 2,
            alive: true,
        }])
    }

    async fn status(&self) -> Result<StatusView, ApiError> {
        let vols = self.volumes.lock().unwrap();
        Ok(StatusView {
            node: "node-1".into(),
            node_id: "n1".into(),
            version: "0.1.0".into(),
            catalog: "embedded".into(),
            uptime_ms: 10,
            nodes: 1,
            volumes: vols.len() as u32,
            volumes_size_bytes: vols.values().map(|v| v.size_bytes).sum(),
            attached: vols.values().filter(|v| v.attached.is_some()).count() as u32,
            degraded: 0,
        })
    }

    async fn events(&self, q: EventQuery) -> Result<Vec<EventView>, ApiError> {
        let evs = self.events.lock().unwrap();
        let after = q.since.unwrap_or(0);
        Ok(evs
            .iter()
            .filter(|e| e.seq > after)
            .take(q.limit as usize)
            .cloned()
            .collect())
    }

    async fn follow_events(&self, since: Option<u64>) -> Result<EventFollow, ApiError> {
        let mut live = self.live.subscribe();
        let history: Vec<EventView> = match since {
            Some(s) => self
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.seq > s)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = 0;
            for ev in history {
                last = ev.seq;
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            while let Ok(ev) = live.recv().await {
                if ev.seq > last && tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn metrics_text(&self) -> String {
        "# TYPE blockwarden_volumes gauge\nblockwarden_volumes 0\n".to_owned()
    }
}
