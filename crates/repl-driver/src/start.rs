//! [`start`]: the takeover. Connect session 1 to every replica, read the metadata blobs of
//! the in-sync ones, build the core from their union, and spawn the event loop.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bw_types::Generation;
use replication::{AttachInit, Event, Notice, RegionIndex, ReplicaId, ReplicaInit, Replicator};
use replication::{RegionSet, SessionId};
use tokio::sync::{mpsc, watch};

use crate::device::{DriverOptions, DriverStatus, ReplicatedDevice, Shared, StartError};
use crate::driver::{Driver, Link, Parts, ReplicaSlot};
use crate::meta::MetaState;
use crate::ports::{CatalogPort, ConnectError, Connector, Leg, LegError, ReplicaSpec};

/// Starts the attachment of generation `generation` over `replicas` (the catalog's view).
///
/// 1. Opens session 1 to every replica at once, each bounded by the core's
///    `connect_timeout_ms`. A replica that refuses our generation → [`StartError::Fenced`].
/// 2. Reads the metadata blob of every connected replica the catalog lists in sync and
///    takes the union of their activity logs and of their dirty bitmaps (any one in-sync
///    replica has every batch the previous attachment relied on; a superset only
///    reconciles or resyncs more). With **no** in-sync replica reachable it returns
///    [`StartError::NoInSyncReplica`] (the agent may retry the attachment); a blob it cannot
///    read fully is an error, never a guess.
/// 3. Builds the core, reports the open sessions, and spawns the event loop; replicas not
///    connected are retried every `reconnect_interval` (the core drops in-sync ones that
///    stay away past its connect timeout, counted from this call).
///
/// Client I/O submitted before reconciliation finished waits in the core.
pub async fn start(
    opts: DriverOptions,
    generation: Generation,
    replicas: Vec<ReplicaSpec>,
    connector: Arc<dyn Connector>,
    catalog: Arc<dyn CatalogPort>,
    lease_lost: watch::Receiver<bool>,
    notices: mpsc::UnboundedSender<Notice>,
) -> Result<Arc<ReplicatedDevice>, StartError> {
    let started = Instant::now();
    check_options(&opts, &replicas)?;
    let mut legs = connect_all(&opts, &replicas, &connector).await?;
    let state = match read_metadata(&opts, generation, &replicas, &mut legs).await {
        Ok(s) => s,
        Err(e) => {
            legs.values().for_each(|l| l.close());
            return Err(e);
        }
    };
    let init = AttachInit {
        generation,
        replicas: replicas
            .iter()
            .map(|s| ReplicaInit {
                id: s.id,
                local: s.local,
                in_sync: s.in_sync,
                last_in_sync_generation: s.last_in_sync_generation,
                dirty: state.dirty.get(&s.id).cloned().unwrap_or_default(),
            })
            .collect(),
        previous_activity_log: state.activity_log.clone(),
        now_ms: 0,
    };
    let core = Replicator::new(opts.core.clone(), init);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut slots = BTreeMap::new();
    let mut events = VecDeque::new();
    for s in &replicas {
        let mut slot = ReplicaSlot::new(s.label.clone(), s.local, 2, opts.core.region_size_bytes);
        if let Some(leg) = legs.remove(&s.id) {
            slot.link = Some(Link::new(s.id, 1, leg, true, &tx));
            events.push_back(Event::ReplicaUp {
                replica: s.id,
                session: SessionId(1),
            });
        }
        slots.insert(s.id, slot);
    }
    let status = DriverStatus {
        core: core.status(),
        replicas: Vec::new(),
        stopped: None,
        reconciled_regions: 0,
    };
    let shared = Arc::new(Shared {
        status: Mutex::new(status),
        stopped: Mutex::new(None),
        rate: Mutex::new(opts.resync_rate_bytes_per_s),
        closed: watch::channel(false).0,
    });
    let size_bytes = opts.core.volume_size_bytes;
    let driver = Driver::new(Parts {
        opts,
        core,
        meta: state,
        slots,
        events,
        connector,
        catalog,
        notices,
        shared: Arc::clone(&shared),
        tx: tx.clone(),
        started,
    });
    tokio::spawn(driver.run(rx, lease_lost));
    Ok(Arc::new(ReplicatedDevice {
        tx,
        shared,
        size_bytes,
    }))
}

fn check_options(opts: &DriverOptions, replicas: &[ReplicaSpec]) -> Result<(), StartError> {
    let bad = |m: &str| Err(StartError::InvalidOptions(m.to_string()));
    let ids: BTreeSet<ReplicaId> = replicas.iter().map(|r| r.id).collect();
    if replicas.is_empty() || ids.len() != replicas.len() {
        return bad("replica ids must be unique and at least one replica given");
    }
    if opts.core.region_size_bytes == 0 || opts.core.volume_size_bytes == 0 {
        return bad("region and volume sizes must be positive");
    }
    if opts.core.region_size_bytes > u32::MAX as u64 {
        return bad("region size must fit a single read");
    }
    if !replicas.iter().any(|r| r.in_sync) {
        return bad("the catalog lists no replica in sync");
    }
    Ok(())
}

/// Opens session 1 to every replica concurrently.
async fn connect_all(
    opts: &DriverOptions,
    replicas: &[ReplicaSpec],
    connector: &Arc<dyn Connector>,
) -> Result<BTreeMap<ReplicaId, Arc<dyn Leg>>, StartError> {
    let timeout = Duration::from_millis(opts.core.connect_timeout_ms);
    let tasks: Vec<_> = replicas
        .iter()
        .map(|s| {
            let attempt = connector.connect(s.id, 1);
            (s, tokio::spawn(tokio::time::timeout(timeout, attempt)))
        })
        .collect();
    let mut legs = BTreeMap::new();
    let mut fenced = None;
    for (spec, task) in tasks {
        match task.await {
            Ok(Ok(Ok(leg))) => {
                legs.insert(spec.id, leg);
            }
            Ok(Ok(Err(ConnectError::Fenced(g)))) => fenced = Some(g),
            Ok(Ok(Err(ConnectError::Unreachable(why)))) => {
                log::warn!("replica {}: {why}", spec.label)
            }
            Ok(Err(_)) => log::warn!("replica {}: connect timed out", spec.label),
            Err(e) => log::warn!("replica {}: connect task failed: {e}", spec.label),
        }
    }
    if let Some(g) = fenced {
        legs.values().for_each(|l| l.close());
        return Err(StartError::Fenced(g));
    }
    Ok(legs)
}

/// Reads and merges the blobs of the connected in-sync replicas. In-sync replicas whose
/// blob cannot be fetched are closed (and retried later like any failed session).
async fn read_metadata(
    opts: &DriverOptions,
    generation: Generation,
    replicas: &[ReplicaSpec],
    legs: &mut BTreeMap<ReplicaId, Arc<dyn Leg>>,
) -> Result<MetaState, StartError> {
    let region = opts.core.region_size_bytes;
    let regions = opts.core.volume_size_bytes.div_ceil(region);
    let mut state = MetaState {
        generation,
        region_size_bytes: region,
        ..MetaState::default()
    };
    let mut sources = 0;
    for spec in replicas.iter().filter(|s| s.in_sync) {
        let Some(leg) = legs.get(&spec.id) else {
            continue;
        };
        let blob = match tokio::time::timeout(opts.request_timeout, leg.read_meta()).await {
            Ok(Ok(b)) => b,
            Ok(Err(LegError::Fenced(g))) => return Err(StartError::Fenced(g)),
            Ok(Err(LegError::Failed(why))) => {
                log::warn!("replica {}: reading metadata: {why}", spec.label);
                legs.remove(&spec.id).expect("leg").close();
                continue;
            }
            Err(_) => {
                log::warn!("replica {}: reading metadata timed out", spec.label);
                legs.remove(&spec.id).expect("leg").close();
                continue;
            }
        };
        sources += 1;
        let Some(blob) = blob else { continue };
        let m = MetaState::decode(&blob).map_err(|source| StartError::Meta {
            replica: spec.label.clone(),
            source,
        })?;
        if m.generation > generation {
            return Err(StartError::Fenced(m.generation));
        }
        if m.region_size_bytes != region {
            return Err(StartError::RegionSize {
                replica: spec.label.clone(),
                found: m.region_size_bytes,
                expected: region,
            });
        }
        state.seq = state.seq.max(m.seq);
        state.activity_log.extend(m.activity_log);
        for (r, set) in m.dirty {
            state.dirty.entry(r).or_default().extend(set);
        }
    }
    if sources == 0 {
        return Err(StartError::NoInSyncReplica);
    }
    // Regions past the end (the volume never shrinks, so only a corrupt writer) and bits of
    // replicas the catalog now lists in sync or no longer lists are meaningless.
    let in_range = |set: &mut RegionSet| set.retain(|k: &RegionIndex| k.0 < regions);
    in_range(&mut state.activity_log);
    let out_of_sync: BTreeSet<ReplicaId> = replicas
        .iter()
        .filter(|s| !s.in_sync)
        .map(|s| s.id)
        .collect();
    state.dirty.retain(|r, _| out_of_sync.contains(r));
    state.dirty.values_mut().for_each(in_range);
    // A replica that was never in sync (added, its first copy unfinished) lacks everything,
    // whatever the blob says.
    for s in replicas.iter().filter(|s| !s.in_sync) {
        if s.last_in_sync_generation == Generation(0) {
            state
                .dirty
                .insert(s.id, (0..regions).map(RegionIndex).collect());
        }
    }
    Ok(state)
}
