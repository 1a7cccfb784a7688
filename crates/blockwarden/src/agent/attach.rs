//! Attachments: a volume active on this node.
//!
//! Attaching (`volume attach`, or the first NBD connection) is one catalog transaction that
//! creates the volume's owner key bound to this node's session lease; the key's creation
//! revision is the new **generation** (strictly higher than any before, cluster-wide). The
//! generation is then admitted by the replica — the local one through its fence
//! ([`store::Replica::device_for`]) or a remote one over the peer protocol — before any I/O.
//! Every request also passes [`SessionGuard`], which refuses I/O once the session's
//! self-fence deadline has passed. Releasing deletes the owner key only if it is still ours
//! (same creation revision).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bw_types::{BlockDevice, Generation, IoDone, IoError, IoRequest, Name};
use catalog::{CatalogError, ClusterStore, Expect, Level, VolumeRecord, VolumeState};
use peer::{ConnectOptions, PeerState, RemoteReplica};
use tokio::sync::watch;

use super::node::Node;
use super::session::Session;
use super::switch::SwitchDevice;
use crate::logging::{format_utc_ms, now_ms};

/// How often a read-modify-write of one record is retried on a revision conflict; conflicts
/// mean concurrent commands on one volume, rare and short, so a handful bounds a storm.
pub const CAS_RETRIES: usize = 16;

/// Who holds a volume, for the "in use" error (G2: name the holder).
#[derive(Debug, Clone)]
pub struct HeldBy {
    pub volume: Name,
    pub holder: String,
    pub generation: Generation,
    pub since_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("volume {0} does not exist")]
    NotFound(Name),
    #[error("volume {0} is not ready yet")]
    NotReady(Name),
    #[error("volume {0} is being deleted")]
    Deleting(Name),
    #[error("volume {} is attached on node {} (generation {}, since {})", .0.volume, .0.holder, .0.generation, format_utc_ms(.0.since_ms))]
    Held(HeldBy),
    #[error("this node's lease is not valid (the cluster store is unreachable or the lease expired); attach refused")]
    NoSession,
    #[error("{0}")]
    Replica(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// How this node uses an attachment.
#[derive(Debug, Default, Clone)]
pub struct Use {
    pub connections: u32,
    pub explicit: bool,
}

/// A volume active on this node.
pub struct Attachment {
    pub name: Name,
    pub generation: Generation,
    pub since_ms: u64,
    /// What the NBD server writes to: the session guard over the replica device.
    pub device: Arc<dyn BlockDevice>,
    /// Set when the data lives on another node.
    pub remote: Option<Arc<RemoteReplica>>,
    /// Set when the volume has more than one replica: the replication driver behind
    /// `device`. Set at attach, or later by [`Node::upgrade_to_replicated`] when a replica
    /// is added to a one-replica volume in use.
    pub replicated: OnceLock<super::replicated::Replicated>,
    /// The switchable device under a one-replica attachment, local or remote (see
    /// `switch.rs`).
    pub switch: Option<Arc<SwitchDevice>>,
    pub usage: Mutex<Use>,
    /// `true` → close every NBD connection of this attachment now.
    pub kill: watch::Sender<bool>,
    /// Set once the attachment is being torn down: no new uses.
    pub closing: AtomicBool,
}

impl Attachment {
    pub fn usage(&self) -> Use {
        self.usage.lock().unwrap().clone()
    }

    /// " (2 NBD connections, attached explicitly)" for messages; empty when unused.
    pub fn usage_text(&self) -> String {
        let u = self.usage();
        let mut why = Vec::new();
        if u.connections > 0 {
            why.push(format!("{} NBD connection(s)", u.connections));
        }
        if u.explicit {
            why.push("attached explicitly".to_owned());
        }
        if why.is_empty() {
            String::new()
        } else {
            format!(" ({})", why.join(", "))
        }
    }
}

/// Refuses every request once the session can no longer vouch for the lease.
pub struct SessionGuard {
    inner: Arc<dyn BlockDevice>,
    session: Arc<Session>,
}

impl BlockDevice for SessionGuard {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        if !self.session.is_valid() {
            done(Err(IoError::Faulted(
                "self-fenced: this node cannot renew its lease, so it may no longer write".into(),
            )));
            return;
        }
        self.inner.submit(req, done);
    }
}

impl<C: ClusterStore> Node<C> {
    /// Takes one use of `name` on this node (an NBD connection, or the explicit attachment),
    /// attaching it first if needed.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &Name,
        explicit: bool,
    ) -> Result<Arc<Attachment>, AttachError> {
        let _serial = self.attach_lock.lock().await;
        if let Some(a) = self
            .attachment(name)
            .filter(|a| !a.closing.load(Ordering::Acquire))
        {
            let newly_explicit = {
                let mut u = a.usage.lock().unwrap();
                let newly = explicit && !u.explicit;
                if explicit {
                    u.explicit = true
                } else {
                    u.connections += 1
                }
                newly
            };
            if newly_explicit {
                self.record_attachment(name, Some(&a), true).await;
            }
            return Ok(a);
        }
        let session = self.session();
        if !session.is_valid() {
            return Err(AttachError::NoSession);
        }
        let Some((rec, _)) = self.catalog.get_volume(name).await? else {
            return Err(AttachError::NotFound(name.clone()));
        };
        match rec.state {
            VolumeState::Ready => {}
            VolumeState::Creating => return Err(AttachError::NotReady(name.clone())),
            VolumeState::Deleting => return Err(AttachError::Deleting(name.clone())),
        }
        let generation = match self
            .catalog
            .acquire_owner(name, &self.me.id, session.lease_id())
            .await?
        {
            Ok(acquired) => acquired.generation,
            Err(held) if held.holder == self.me.id && held.lease == session.lease_id() => {
                held.generation
            }
            Err(held) => {
                let holder = self.node_name(&held.holder).await;
                return Err(AttachError::Held(HeldBy {
                    volume: name.clone(),
                    holder,
                    generation: held.generation,
                    since_ms: held.since_ms,
                }));
            }
        };
        let opened = if rec.replicas_placed.len() > 1 {
            self.start_replicated(&rec, generation, session.clone())
                .await
                .map(|r| {
                    let guard: Arc<dyn BlockDevice> = Arc::new(SessionGuard {
                        inner: r.device.clone(),
                        session,
                    });
                    (guard, None, Some(r), None)
                })
        } else {
            self.open_device(&rec, generation, session)
                .await
                .map(|(d, remote, switch)| (d, remote, None, switch))
        };
        let (device, remote, replicated, switch) = match opened {
            Ok(d) => d,
            Err(e) => {
                let _ = self.catalog.release_owner(name, generation).await;
                return Err(e);
            }
        };
        let att = Arc::new(Attachment {
            name: name.clone(),
            generation,
            since_ms: now_ms(),
            device,
            remote,
            replicated: replicated.map(OnceLock::from).unwrap_or_default(),
            switch,
            usage: Mutex::new(Use {
                connections: u32::from(!explicit),
                explicit,
            }),
            kill: watch::channel(false).0,
            closing: AtomicBool::new(false),
        });
        self.attachments
            .lock()
            .unwrap()
            .insert(name.clone(), att.clone());
        self.record_attachment(name, Some(&att), explicit).await;
        let how = if explicit {
            "by volume attach"
        } else {
            "by an NBD client"
        };
        let msg = format!(
            "volume {name} attached on node {} (generation {generation}) {how}",
            self.me.name
        );
        self.event(Level::Info, "volume.attached", Some(name), msg)
            .await;
        Ok(att)
    }

    /// The device of a new one-replica attachment: the local replica behind its fence (on a
    /// [`SwitchDevice`], so an added replica can take over online), or the replica on
    /// another node over the peer protocol; both admit `generation` first.
    #[allow(clippy::type_complexity)]
    async fn open_device(
        self: &Arc<Self>,
        rec: &VolumeRecord,
        generation: Generation,
        session: Arc<Session>,
    ) -> Result<
        (
            Arc<dyn BlockDevice>,
            Option<Arc<RemoteReplica>>,
            Option<Arc<SwitchDevice>>,
        ),
        AttachError,
    > {
        let placed = rec
            .replicas_placed
            .first()
            .ok_or_else(|| AttachError::Replica(format!("volume {} has no replica", rec.name)))?;
        let (inner, remote): (Arc<dyn BlockDevice>, _) = if placed.node_id == self.me.id {
            let replica = self.replica(&rec.id).ok_or_else(|| {
                AttachError::Replica(format!(
                    "the replica of {} on this node is not open",
                    rec.name
                ))
            })?;
            let dev = tokio::task::spawn_blocking(move || replica.device_for(generation))
                .await
                .map_err(|e| AttachError::Replica(e.to_string()))?
                .map_err(|e| {
                    AttachError::Replica(format!(
                        "the local replica refused generation {generation}: {e}"
                    ))
                })?;
            let switch = Arc::new(SwitchDevice::new(dev));
            return Ok((
                Arc::new(SessionGuard {
                    inner: switch.clone(),
                    session,
                }),
                None,
                Some(switch),
            ));
        } else {
            let node = self
                .catalog
                .get_node(&placed.node_id)
                .await?
                .ok_or_else(|| {
                    AttachError::Replica(format!(
                        "node {} holding the replica is unknown",
                        placed.node_name
                    ))
                })?
                .0;
            let addr = node
                .peer_addr
                .as_deref()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| {
                    AttachError::Replica(format!("node {} has no peer address", node.name))
                })?;
            let opts = ConnectOptions {
                on_state: Some(self.peer_state_callback(rec.name.clone(), generation)),
                ..ConnectOptions::default()
            };
            let remote =
                RemoteReplica::connect(addr, self.me.id.clone(), rec.id.clone(), generation, opts)
                    .await
                    .map_err(|e| {
                        AttachError::Replica(format!(
                            "cannot reach the replica of {} on node {}: {e}",
                            rec.name, node.name
                        ))
                    })?;
            let remote = Arc::new(remote);
            (remote.clone() as Arc<dyn BlockDevice>, Some(remote))
        };
        // Switchable too: an added replica turns this into a replicated attachment online.
        let switch = Arc::new(SwitchDevice::new(inner));
        Ok((
            Arc::new(SessionGuard {
                inner: switch.clone(),
                session,
            }),
            remote,
            Some(switch),
        ))
    }

    fn peer_state_callback(
        self: &Arc<Self>,
        name: Name,
        generation: Generation,
    ) -> peer::StateCallback {
        let node = Arc::downgrade(self);
        Arc::new(move |state: &PeerState| {
            let Some(node) = node.upgrade() else { return };
            match state {
                PeerState::Fenced { highest } => {
                    let msg = format!("volume {name}: generation {generation} was fenced by the replica (it has admitted {highest}); the attachment stops");
                    node.event_later(Level::Warning, "volume.fenced", Some(name.clone()), msg);
                    let (n, name) = (node.clone(), name.clone());
                    node.runtime.spawn(async move {
                        n.force_detach(&name, "fenced by a newer generation").await
                    });
                }
                PeerState::Unreachable { reason } => {
                    let msg = format!("volume {name}: the replica became unreachable ({reason}); I/O fails until it is re-attached");
                    node.event_later(
                        Level::Error,
                        "volume.replica_unreachable",
                        Some(name.clone()),
                        msg,
                    );
                }
                PeerState::Connected | PeerState::Closed => {}
            }
        })
    }

    /// Records (or clears) the attachment in the volume record, for display. Best effort:
    /// the owner key is the authority, so a failure here is logged, not fatal.
    pub async fn record_attachment(
        &self,
        name: &Name,
        att: Option<&Arc<Attachment>>,
        explicit: bool,
    ) {
        for _ in 0..CAS_RETRIES {
            let Ok(Some((mut rec, rev))) = self.catalog.get_volume(name).await else {
                return;
            };
            match att {
                Some(a) => {
                    rec.generation = rec.generation.max(a.generation);
                    rec.attachment = Some(catalog::Attachment {
                        node_id: self.me.id.clone(),
                        node_name: self.me.name.clone(),
                        generation: a.generation,
                        explicit,
                        since_ms: a.since_ms,
                    });
                }
                None => {
                    if rec
                        .attachment
                        .as_ref()
                        .is_none_or(|a| a.node_id != self.me.id)
                    {
                        return;
                    }
                    rec.attachment = None;
                }
            }
            match self.catalog.put_volume(&rec, Expect::At(rev)).await {
                Ok(_) => return,
                Err(e) if e.is_conflict() => continue,
                Err(e) => {
                    log::warn!("cannot record the attachment of {name}: {e}");
                    return;
                }
            }
        }
    }

    /// Drops one NBD connection's use; releases the attachment when it was the last use.
    pub fn release_connection(self: &Arc<Self>, name: Name) {
        let node = self.clone();
        self.runtime.spawn(async move {
            let _serial = node.attach_lock.lock().await;
            let Some(att) = node.attachment(&name) else {
                return;
            };
            let done = {
                let mut u = att.usage.lock().unwrap();
                u.connections = u.connections.saturating_sub(1);
                u.connections == 0 && !u.explicit
            };
            if done {
                node.teardown(
                    &att,
                    "volume.released",
                    "its last NBD connection closed",
                    true,
                )
                .await;
            }
        });
    }

    /// `volume detach` on this node.
    pub async fn detach_local(self: &Arc<Self>, name: &Name) -> Result<(), api::ApiError> {
        let _serial = self.attach_lock.lock().await;
        let Some(att) = self.attachment(name) else {
            return Ok(());
        };
        let u = att.usage();
        if u.connections > 0 {
            return Err(api::ApiError::new(
                api::ErrorCode::InUse,
                format!("volume {name} has {} open NBD connection(s) on node {}; close them before detaching", u.connections, self.me.name),
            ));
        }
        self.teardown(&att, "volume.detached", "volume detach", true)
            .await;
        Ok(())
    }

    /// Closes every connection of `name` at once and releases it (forced delete, fencing).
    pub async fn force_detach(self: &Arc<Self>, name: &Name, why: &str) {
        let _serial = self.attach_lock.lock().await;
        if let Some(att) = self.attachment(name) {
            let _ = att.kill.send(true);
            self.teardown(&att, "volume.detached", why, false).await;
        }
    }

    /// Removes an attachment: stop its device, delete the owner key if still ours, clear the
    /// record. Called with `attach_lock` held. `clean`: no client I/O is left (detach, last
    /// connection closed), so a replicated device first empties its activity log.
    pub async fn teardown(
        &self,
        att: &Arc<Attachment>,
        kind: &'static str,
        why: &str,
        clean: bool,
    ) {
        att.closing.store(true, Ordering::Release);
        self.attachments.lock().unwrap().remove(&att.name);
        if let Some(r) = &att.remote {
            r.close();
        }
        if let Some(r) = att.replicated.get() {
            if clean {
                super::replicated::detach(&r.device).await;
            } else {
                super::replicated::stop(&r.device).await;
            }
        }
        match self.catalog.release_owner(&att.name, att.generation).await {
            Ok(_) => {}
            Err(e) => log::warn!(
                "cannot release the owner key of {} (it expires with the lease): {e}",
                att.name
            ),
        }
        self.record_attachment(&att.name, None, false).await;
        let msg = format!(
            "volume {} released on node {} (generation {}): {why}",
            att.name, self.me.name, att.generation
        );
        self.event(Level::Info, kind, Some(&att.name), msg).await;
    }
}
