//! `volume add-replica` and `volume remove-replica`: operator changes to a volume's replica
//! set, by compare-and-swap on the volume record.
//!
//! Adding appends a `creating` replica; the target node's reconciler creates the empty file
//! and marks it `stale` (exists, holds nothing yet). The attachment — whichever node the
//! volume is active on — picks it up from the record, connects, copies every region to it
//! (a full resync: holes are written as holes) and marks it in sync through its
//! generation-conditioned transaction. A one-replica volume attached on its replica's node
//! switches to the replication driver online (`Node::upgrade_to_replicated`). An
//! unattached volume's new replica is filled on the next attach.
//!
//! Removing never removes the last in-sync replica, nor takes the in-sync count below the
//! volume's `min_in_sync`: either would leave writes with no durable home (or held forever).
//! The attachment stops sending to a removed replica once it sees the record; until then it
//! may still count it, which only makes acknowledgements wait for one more copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{ApiError, ErrorCode};
use bw_types::{format_size, Generation, Name};
use catalog::{
    ClusterStore, Expect, Level, ReplicaRecord, ReplicaState, VolumeRecord, VolumeState,
};

use super::attach::CAS_RETRIES;
use super::lifecycle::MAX_REPLICAS;
use super::node::{catalog_error, Node, REMOTE_ACTION_TIMEOUT};

/// How often `add_replica` checks whether the target node created the file.
const CREATE_POLL: Duration = Duration::from_millis(50);

impl<C: ClusterStore> Node<C> {
    /// `volume add-replica NAME --node NODE`.
    pub async fn add_replica(
        self: &Arc<Self>,
        name: &Name,
        node: &Name,
        resync_rate: Option<u64>,
    ) -> Result<VolumeRecord, ApiError> {
        let _ops = self.ops_lock.lock().await;
        let nodes = self.node_records().await?;
        // This node answers even before its first heartbeat reached the catalog.
        let target = if *node == self.me.name {
            Some(self.own_record())
        } else {
            nodes.values().find(|n| n.name == *node).cloned()
        };
        let Some(target) = target else {
            let mut known: Vec<String> = nodes.values().map(|n| n.name.to_string()).collect();
            if !known.contains(&self.me.name.to_string()) {
                known.push(self.me.name.to_string());
            }
            known.sort();
            return Err(ApiError::not_found(format!(
                "unknown node {node}: no agent by that name has joined (nodes: {})",
                known.join(", ")
            )));
        };
        let alive = self.catalog.list_alive().await.map_err(catalog_error)?;
        let target_alive = alive.iter().any(|(id, _)| *id == target.id);
        let mut added = None;
        for _ in 0..CAS_RETRIES {
            let Some((mut rec, rev)) =
                self.catalog.get_volume(name).await.map_err(catalog_error)?
            else {
                return Err(ApiError::not_found(format!("volume {name} does not exist")));
            };
            if rec.state != VolumeState::Ready {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("volume {name} is {:?}, not ready", rec.state).to_lowercase(),
                ));
            }
            rec.assign_replica_ids();
            if let Some(r) = rec.replicas_placed.iter().find(|r| r.node_id == target.id) {
                return Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "volume {name} already has a replica on node {node} (replica {})",
                        r.id
                    ),
                ));
            }
            if !target_alive {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("node {node} is down; a replica can only be added on a live node"),
                ));
            }
            if rec.replicas_placed.len() as u32 >= MAX_REPLICAS {
                return Err(ApiError::bad_request(format!(
                    "volume {name} already has {} replicas, the most a volume may have",
                    rec.replicas_placed.len()
                )));
            }
            if target.free_bytes < rec.size_bytes {
                return Err(ApiError::new(
                    ErrorCode::NoSpace,
                    format!(
                        "node {node} has {} free, volume {name} needs {}",
                        format_size(target.free_bytes),
                        format_size(rec.size_bytes)
                    ),
                ));
            }
            let id = rec.take_replica_id();
            rec.replicas_placed.push(ReplicaRecord {
                node_id: target.id.clone(),
                node_name: target.name.clone(),
                state: ReplicaState::Creating,
                id,
                in_sync_generation: Generation(0),
            });
            rec.replicas = rec.replicas_placed.len() as u32;
            if let Some(rate) = resync_rate {
                rec.resync_rate_bytes_per_s = Some(rate);
            }
            match self.catalog.put_volume(&rec, Expect::At(rev)).await {
                Ok(_) => {
                    added = Some(id);
                    break;
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(catalog_error(e)),
            }
        }
        let Some(id) = added else {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("volume {name} kept changing; try again"),
            ));
        };
        if target.id == self.me.id {
            if let Some((rec, _)) = self.catalog.get_volume(name).await.map_err(catalog_error)? {
                if let Err(e) = self.materialize(&rec).await {
                    log::warn!(
                        "volume {name}: cannot create the added replica: {}",
                        e.message
                    );
                } else {
                    super::reconcile::mark_added(self, &rec).await;
                }
            }
        }
        let rec = self.wait_replica_created(name, id, node).await?;
        let msg = format!(
            "volume {name}: replica {id} added on node {node}; it is filled by a resync while the volume is attached"
        );
        self.event(Level::Info, "replica.added", Some(name), msg)
            .await;
        Ok(rec)
    }

    /// Waits until the target node created replica `id`'s file (state leaves `creating`);
    /// removes the replica from the record again if it does not within
    /// [`REMOTE_ACTION_TIMEOUT`].
    async fn wait_replica_created(
        &self,
        name: &Name,
        id: u64,
        node: &Name,
    ) -> Result<VolumeRecord, ApiError> {
        let deadline = Instant::now() + REMOTE_ACTION_TIMEOUT;
        loop {
            let Some((rec, rev)) = self.catalog.get_volume(name).await.map_err(catalog_error)?
            else {
                return Err(ApiError::not_found(format!(
                    "volume {name} was deleted while the replica was being added"
                )));
            };
            let state = rec
                .replicas_placed
                .iter()
                .find(|r| r.id == id)
                .map(|r| r.state);
            match state {
                None => {
                    return Err(ApiError::new(
                        ErrorCode::Conflict,
                        format!("replica {id} of {name} was removed while it was being added"),
                    ))
                }
                Some(ReplicaState::Creating) if Instant::now() >= deadline => {
                    let mut back = rec.clone();
                    back.replicas_placed.retain(|r| r.id != id);
                    back.replicas = back.replicas_placed.len() as u32;
                    let _ = self.catalog.put_volume(&back, Expect::At(rev)).await;
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        format!("node {node} did not create the replica of {name} within {REMOTE_ACTION_TIMEOUT:?}; the change was rolled back"),
                    ));
                }
                Some(ReplicaState::Creating) => tokio::time::sleep(CREATE_POLL).await,
                Some(_) => return Ok(rec),
            }
        }
    }

    /// `volume remove-replica NAME --node NODE`.
    pub async fn remove_replica(
        self: &Arc<Self>,
        name: &Name,
        node: &Name,
    ) -> Result<VolumeRecord, ApiError> {
        let _ops = self.ops_lock.lock().await;
        for _ in 0..CAS_RETRIES {
            let Some((mut rec, rev)) =
                self.catalog.get_volume(name).await.map_err(catalog_error)?
            else {
                return Err(ApiError::not_found(format!("volume {name} does not exist")));
            };
            rec.assign_replica_ids();
            let Some(victim) = rec
                .replicas_placed
                .iter()
                .find(|r| r.node_name == *node)
                .cloned()
            else {
                let on: Vec<&str> = rec
                    .replicas_placed
                    .iter()
                    .map(|r| r.node_name.as_str())
                    .collect();
                return Err(ApiError::not_found(format!(
                    "volume {name} has no replica on node {node} (its replicas are on {})",
                    on.join(", ")
                )));
            };
            if rec.replicas_placed.len() == 1 {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "node {node} holds the only replica of {name}; delete the volume instead"
                    ),
                ));
            }
            let in_sync_after = rec
                .replicas_placed
                .iter()
                .filter(|r| r.id != victim.id && r.state == ReplicaState::InSync)
                .count() as u32;
            if in_sync_after == 0 {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("the replica on node {node} is the last in-sync replica of {name}; add another replica and let it finish its resync first"),
                ));
            }
            let min = rec.min_in_sync.unwrap_or(1);
            if victim.state == ReplicaState::InSync && in_sync_after < min {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("removing the replica on node {node} would leave {in_sync_after} in-sync replica(s), fewer than the volume's --min-in-sync {min}; lower it with `volume set {name} --min-in-sync` first"),
                ));
            }
            // Never give the removed id out again (see `VolumeRecord::last_replica_id`).
            rec.last_replica_id = rec.last_replica_id.max(rec.next_replica_id() - 1);
            rec.replicas_placed.retain(|r| r.id != victim.id);
            rec.replicas = rec.replicas_placed.len() as u32;
            match self.catalog.put_volume(&rec, Expect::At(rev)).await {
                Ok(_) => {
                    if victim.node_id == self.me.id && self.attachment(name).is_none() {
                        let _ = self.remove_replica_files(&rec.id).await;
                    }
                    let msg = format!(
                        "volume {name}: replica {} on node {node} removed ({} left)",
                        victim.id,
                        rec.replicas_placed.len()
                    );
                    self.event(Level::Info, "replica.removed", Some(name), msg)
                        .await;
                    return Ok(rec);
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(catalog_error(e)),
            }
        }
        Err(ApiError::new(
            ErrorCode::Conflict,
            format!("volume {name} kept changing; try again"),
        ))
    }
}
