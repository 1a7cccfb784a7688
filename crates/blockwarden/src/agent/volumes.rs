//! The volumes this node serves: their open devices, who uses them, and the catalog
//! transactions that record attachments.
//!
//! A [`Served`] exists for every `ready` volume from start-up (or creation) until deletion. It
//! owns the [`LocalVolume`] (whose I/O threads start on demand and exit when idle, so an idle
//! volume costs one file descriptor), the volume's metrics, and its use count. "In use" means
//! at least one NBD connection or an explicit `volume attach`; the first use after none
//! records a new attachment with a higher generation in the catalog, the last release clears
//! it (unless explicit).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bw_types::{Generation, IoMetrics, Name, NodeId};
use catalog::{Attachment, Catalog, CatalogError, Expect, VolumeRecord};
use store::LocalVolume;
use tokio::sync::watch;

use crate::logging::now_ms;

/// How this node uses one volume right now.
#[derive(Debug, Default, Clone)]
pub struct Use {
    /// Open NBD connections.
    pub connections: u32,
    /// Attached by `volume attach` (stays attached with no connection).
    pub explicit: bool,
    /// The attachment's generation and start, while attached.
    pub attached: Option<(Generation, u64)>,
}

impl Use {
    pub fn in_use(&self) -> bool {
        self.connections > 0 || self.explicit
    }
}

/// One volume served by this node.
pub struct Served {
    pub name: Name,
    pub device: Arc<LocalVolume>,
    pub metrics: Arc<IoMetrics>,
    /// Use count and attachment. Catalog writes that change the attachment happen while
    /// `attach_lock` is held, so two openers cannot both record a "first" attachment.
    pub usage: Mutex<Use>,
    pub attach_lock: Mutex<()>,
    /// `true` → every NBD connection to this volume closes at once (forced delete).
    pub kill: watch::Sender<bool>,
    /// Set once a delete has begun: no new connections or attachments.
    pub deleting: AtomicBool,
}

impl Served {
    pub fn new(name: Name, device: LocalVolume) -> Served {
        Served {
            name,
            device: Arc::new(device),
            metrics: Arc::new(IoMetrics::new()),
            usage: Mutex::new(Use::default()),
            attach_lock: Mutex::new(()),
            kill: watch::channel(false).0,
            deleting: AtomicBool::new(false),
        }
    }

    pub fn usage(&self) -> Use {
        self.usage.lock().unwrap().clone()
    }

    pub fn is_deleting(&self) -> bool {
        self.deleting.load(Ordering::Acquire)
    }
}

/// Who this node is, for attachment records.
#[derive(Debug, Clone)]
pub struct Me {
    pub id: NodeId,
    pub name: Name,
}

/// Records a new attachment of `name` on this node: generation = highest ever + 1.
/// Retries on a concurrent change of the record (another command raced us).
pub async fn record_attach<C: Catalog>(
    catalog: &C,
    me: &Me,
    name: &Name,
    explicit: bool,
) -> Result<(Generation, u64), AttachError> {
    for _ in 0..CAS_RETRIES {
        let Some((mut rec, rev)) = catalog.get_volume(name).await? else {
            return Err(AttachError::Gone);
        };
        if let Some(a) = &rec.attachment {
            if a.node_id != me.id {
                return Err(AttachError::HeldElsewhere(a.clone()));
            }
        }
        let generation = Generation(rec.generation.0 + 1);
        let since = now_ms();
        rec.generation = generation;
        rec.attachment = Some(Attachment {
            node_id: me.id.clone(),
            node_name: me.name.clone(),
            generation,
            explicit,
            since_ms: since,
        });
        match catalog.put_volume(&rec, Expect::At(rev)).await {
            Ok(_) => return Ok((generation, since)),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AttachError::Contended)
}

/// Updates the attachment record in place (explicit flag) or clears it (`None`).
pub async fn record_attachment_change<C: Catalog>(
    catalog: &C,
    name: &Name,
    change: impl Fn(&mut VolumeRecord),
) -> Result<(), AttachError> {
    for _ in 0..CAS_RETRIES {
        let Some((mut rec, rev)) = catalog.get_volume(name).await? else {
            return Ok(());
        };
        change(&mut rec);
        match catalog.put_volume(&rec, Expect::At(rev)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AttachError::Contended)
}

/// How often a read-modify-write of one record is retried on a revision conflict before
/// giving up; conflicts mean concurrent commands on the same volume, which are rare and
/// short, so a handful of retries suffices and bounds the work of a pathological storm.
pub const CAS_RETRIES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the volume was deleted")]
    Gone,
    #[error("volume is attached on node {} (generation {}, since {})", .0.node_name, .0.generation, crate::logging::format_utc_ms(.0.since_ms))]
    HeldElsewhere(Attachment),
    #[error("the volume's record kept changing; try again")]
    Contended,
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}
