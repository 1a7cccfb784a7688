//! `GET /metrics`: node, NBD server and per-volume series in the Prometheus text format.

use std::fmt::Write as _;

use catalog::Catalog;

use super::control::fs_space;
use super::node::Node;
use crate::logging::now_ms;

pub async fn render<C: Catalog>(node: &Node<C>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let (capacity, free) = fs_space(&node.volumes_dir);
    let node_label = format!("node=\"{}\"", node.me.name);
    let _ = write!(
        out,
        "# HELP blockwarden_up 1 while the agent runs.\n# TYPE blockwarden_up gauge\nblockwarden_up{{{node_label}}} 1\n\
         # HELP blockwarden_uptime_seconds Seconds since the agent started.\n# TYPE blockwarden_uptime_seconds gauge\n\
         blockwarden_uptime_seconds{{{node_label}}} {}\n\
         # HELP blockwarden_pool_capacity_bytes Size of the file system holding the volumes.\n# TYPE blockwarden_pool_capacity_bytes gauge\n\
         blockwarden_pool_capacity_bytes{{{node_label}}} {capacity}\n\
         # HELP blockwarden_pool_free_bytes Free bytes on that file system.\n# TYPE blockwarden_pool_free_bytes gauge\n\
         blockwarden_pool_free_bytes{{{node_label}}} {free}\n",
        now_ms().saturating_sub(node.started_at_ms) as f64 / 1000.0
    );
    node.nbd_stats.render_prometheus(&mut out);
    let served: Vec<_> = node.served.lock().unwrap().values().cloned().collect();
    out.push_str(
        "# HELP blockwarden_volume_size_bytes Provisioned size of the volume.\n# TYPE blockwarden_volume_size_bytes gauge\n\
         # HELP blockwarden_volume_connections Open NBD connections to the volume.\n# TYPE blockwarden_volume_connections gauge\n\
         # HELP blockwarden_volume_faulted 1 if the volume is faulted (fail-stop after an I/O error).\n# TYPE blockwarden_volume_faulted gauge\n\
         # HELP blockwarden_volume_syncs_total fdatasync calls made for the volume.\n# TYPE blockwarden_volume_syncs_total counter\n",
    );
    for s in &served {
        let l = format!("volume=\"{}\"", s.name);
        let st = s.device.stats();
        let _ = writeln!(
            out,
            "blockwarden_volume_size_bytes{{{l}}} {}",
            bw_types::BlockDevice::size_bytes(&*s.device)
        );
        let _ = writeln!(
            out,
            "blockwarden_volume_connections{{{l}}} {}",
            s.usage().connections
        );
        let _ = writeln!(
            out,
            "blockwarden_volume_faulted{{{l}}} {}",
            u8::from(s.device.fault_reason().is_some())
        );
        let _ = writeln!(out, "blockwarden_volume_syncs_total{{{l}}} {}", st.syncs);
    }
    bw_types::metrics::render_headers(&mut out);
    for s in &served {
        s.metrics.render(s.name.as_str(), &mut out);
    }
    out
}
