//! `GET /metrics`: node, NBD server, peer server and per-volume series in the Prometheus
//! text format.

use std::fmt::Write as _;

use catalog::ClusterStore;

use super::node::{fs_space, Node};
use crate::logging::now_ms;

pub async fn render<C: ClusterStore>(node: &Node<C>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let (capacity, free) = fs_space(&node.volumes_dir);
    let l = format!("node=\"{}\"", node.me.name);
    let session = node.session();
    let _ = write!(
        out,
        "# HELP blockwarden_up 1 while the agent runs.\n# TYPE blockwarden_up gauge\nblockwarden_up{{{l}}} 1\n\
         # HELP blockwarden_uptime_seconds Seconds since the agent started.\n# TYPE blockwarden_uptime_seconds gauge\n\
         blockwarden_uptime_seconds{{{l}}} {}\n\
         # HELP blockwarden_pool_capacity_bytes Size of the file system holding the volumes.\n# TYPE blockwarden_pool_capacity_bytes gauge\n\
         blockwarden_pool_capacity_bytes{{{l}}} {capacity}\n\
         # HELP blockwarden_pool_free_bytes Free bytes on that file system.\n# TYPE blockwarden_pool_free_bytes gauge\n\
         blockwarden_pool_free_bytes{{{l}}} {free}\n\
         # HELP blockwarden_lease_valid 1 while this node may acknowledge I/O (its lease is renewed).\n# TYPE blockwarden_lease_valid gauge\n\
         blockwarden_lease_valid{{{l}}} {}\n\
         # HELP blockwarden_lease_remaining_seconds Time until this node self-fences without a renewal.\n# TYPE blockwarden_lease_remaining_seconds gauge\n\
         blockwarden_lease_remaining_seconds{{{l}}} {}\n\
         # HELP blockwarden_lease_ttl_seconds TTL of this node's session lease.\n# TYPE blockwarden_lease_ttl_seconds gauge\n\
         blockwarden_lease_ttl_seconds{{{l}}} {}\n",
        now_ms().saturating_sub(node.started_at_ms) as f64 / 1000.0,
        u8::from(session.is_valid()),
        session.remaining().as_secs_f64(),
        session.ttl().as_secs_f64(),
    );
    node.nbd_stats.render_prometheus(&mut out);
    node.peer_stats.render_prometheus(&mut out);
    out.push_str(
        "# HELP blockwarden_replica_size_bytes Size of a replica held on this node.\n# TYPE blockwarden_replica_size_bytes gauge\n\
         # HELP blockwarden_replica_faulted 1 if the replica is faulted (fail-stop after an I/O error).\n# TYPE blockwarden_replica_faulted gauge\n\
         # HELP blockwarden_replica_generation Highest generation the replica has admitted.\n# TYPE blockwarden_replica_generation gauge\n\
         # HELP blockwarden_replica_syncs_total fdatasync calls made for the replica.\n# TYPE blockwarden_replica_syncs_total counter\n\
         # HELP blockwarden_volume_connections Open NBD connections to a volume attached here.\n# TYPE blockwarden_volume_connections gauge\n",
    );
    let replicas: Vec<_> = node
        .replicas
        .lock()
        .unwrap()
        .iter()
        .map(|(id, r)| (id.clone(), r.clone()))
        .collect();
    for (id, r) in &replicas {
        let l = format!("volume_id=\"{id}\"");
        let _ = writeln!(
            out,
            "blockwarden_replica_size_bytes{{{l}}} {}",
            bw_types::BlockDevice::size_bytes(r.volume())
        );
        let _ = writeln!(
            out,
            "blockwarden_replica_faulted{{{l}}} {}",
            u8::from(r.volume().fault_reason().is_some())
        );
        let _ = writeln!(
            out,
            "blockwarden_replica_generation{{{l}}} {}",
            r.highest().0
        );
        let _ = writeln!(
            out,
            "blockwarden_replica_syncs_total{{{l}}} {}",
            r.volume().stats().syncs
        );
    }
    let attachments: Vec<_> = node.attachments.lock().unwrap().values().cloned().collect();
    for a in &attachments {
        let _ = writeln!(
            out,
            "blockwarden_volume_connections{{volume=\"{}\"}} {}",
            a.name,
            a.usage().connections
        );
    }
    render_replication(&attachments, &mut out);
    bw_types::metrics::render_headers(&mut out);
    let metrics: Vec<_> = node
        .metrics
        .lock()
        .unwrap()
        .iter()
        .map(|(n, m)| (n.clone(), m.clone()))
        .collect();
    for (name, m) in &metrics {
        m.render(name.as_str(), &mut out);
    }
    out
}

/// Per-replica series of the volumes attached here with replication: the attachment is the
/// authority on its replicas' state, lag and resync progress.
fn render_replication(attachments: &[std::sync::Arc<super::attach::Attachment>], out: &mut String) {
    out.push_str(
        "# HELP blockwarden_replica_in_sync 1 if the replica holds every acknowledged write of the attached volume.\n# TYPE blockwarden_replica_in_sync gauge\n\
         # HELP blockwarden_replica_connected 1 while the attachment has a session to the replica.\n# TYPE blockwarden_replica_connected gauge\n\
         # HELP blockwarden_replica_lag_bytes Bytes the replica may lack (changed regions not yet copied to it).\n# TYPE blockwarden_replica_lag_bytes gauge\n\
         # HELP blockwarden_replica_resync_remaining_bytes Bytes left in the current resync pass.\n# TYPE blockwarden_replica_resync_remaining_bytes gauge\n\
         # HELP blockwarden_replica_resync_rate_bytes_per_second Resync copy rate over the last seconds.\n# TYPE blockwarden_replica_resync_rate_bytes_per_second gauge\n\
         # HELP blockwarden_replica_resynced_bytes_total Bytes copied to the replica by resync since the volume was attached here.\n# TYPE blockwarden_replica_resynced_bytes_total counter\n\
         # HELP blockwarden_volume_in_sync_replicas Replicas of the attached volume that are in sync.\n# TYPE blockwarden_volume_in_sync_replicas gauge\n\
         # HELP blockwarden_volume_reconciled_regions_total Regions copied by crash reconciliation since the volume was attached here.\n# TYPE blockwarden_volume_reconciled_regions_total counter\n\
         # HELP blockwarden_volume_activity_log_regions Regions in the activity log (what a crash of this attachment would make the next one reconcile).\n# TYPE blockwarden_volume_activity_log_regions gauge\n\
         # HELP blockwarden_volume_activity_log_evictions_total Regions evicted from the full activity log since the volume was attached here (a working set larger than the log; each round costs a flush on every replica).\n# TYPE blockwarden_volume_activity_log_evictions_total counter\n",
    );
    for a in attachments {
        let Some(r) = a.replicated.get() else {
            continue;
        };
        let status = r.status();
        let mut in_sync = 0;
        for x in &status.replicas {
            let sync = matches!(x.state, replication::ReplicaState::InSync);
            in_sync += u32::from(sync);
            let l = format!(
                "volume=\"{}\",replica=\"{}\",node=\"{}\"",
                a.name, x.id.0, x.label
            );
            let remaining = x.resync_total_bytes.saturating_sub(x.resync_copied_bytes);
            let _ = writeln!(out, "blockwarden_replica_in_sync{{{l}}} {}", u8::from(sync));
            let _ = writeln!(
                out,
                "blockwarden_replica_connected{{{l}}} {}",
                u8::from(x.connected)
            );
            let _ = writeln!(
                out,
                "blockwarden_replica_lag_bytes{{{l}}} {}",
                x.dirty_bytes
            );
            let _ = writeln!(
                out,
                "blockwarden_replica_resync_remaining_bytes{{{l}}} {remaining}"
            );
            let _ = writeln!(
                out,
                "blockwarden_replica_resync_rate_bytes_per_second{{{l}}} {}",
                x.resync_rate_bytes_per_s
            );
            let _ = writeln!(
                out,
                "blockwarden_replica_resynced_bytes_total{{{l}}} {}",
                x.resynced_bytes_total
            );
        }
        let l = format!("volume=\"{}\"", a.name);
        let _ = writeln!(out, "blockwarden_volume_in_sync_replicas{{{l}}} {in_sync}");
        let _ = writeln!(
            out,
            "blockwarden_volume_reconciled_regions_total{{{l}}} {}",
            status.reconciled_regions
        );
        let _ = writeln!(
            out,
            "blockwarden_volume_activity_log_regions{{{l}}} {}",
            status.core.active_regions
        );
        let _ = writeln!(
            out,
            "blockwarden_volume_activity_log_evictions_total{{{l}}} {}",
            status.core.evicted_regions
        );
    }
}
