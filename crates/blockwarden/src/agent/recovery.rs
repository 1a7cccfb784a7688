//! Start-up reconciliation of the catalog with this node's volume files.
//!
//! The catalog is the truth for which volumes exist, where their replicas are and how large
//! they are. A crash can interrupt each lifecycle operation at one of a few points
//! (`docs/design/storage.md`):
//!
//! | record says | file | what a crash interrupted | recovery |
//! |---|---|---|---|
//! | `creating`, replica here (embedded) | any | create, before it committed `ready` | remove files, remove record |
//! | `creating`, replica here (cluster) | any | materialising | the reconciler finishes it |
//! | `deleting`, replica here | any | delete | remove files, drop this node from the record (the last one removes it) |
//! | `ready`, file longer than size | | resize, after growing the file, before the commit | truncate to the recorded size (the tail was never visible) |
//! | `ready`, file missing | | lost outside our control | keep the record, error event, do not serve |
//! | no record here | `volumes/<id>.img` | impossible by the order above: a lost or replaced catalog, or a foreign file | move to `<data-dir>/lost+found/` (never delete data we cannot account for) and warn |
//! | no record | `.*.tmp` | `create_volume_file` before its link | remove |
//!
//! Attachments do not survive a restart: NBD connections died with the process, and owner
//! keys with the old lease. An explicit attachment made here is re-acquired (with a new,
//! higher generation) if no other node took the volume meanwhile.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::sync::Arc;

use anyhow::{Context, Result};
use catalog::{ClusterStore, Expect, Level, VolumeRecord, VolumeState};

use super::datadir::DataDir;
use super::node::Node;

/// Reconciles, then opens every ready replica placed here. Returns the explicit attachments
/// to restore once the node serves.
pub async fn recover<C: ClusterStore>(node: &Arc<Node<C>>) -> Result<Vec<VolumeRecord>> {
    let dir = node.volumes_dir.clone();
    let removed_tmp = store::remove_temp_files(&dir).context("cannot clean temporary files")?;
    if removed_tmp > 0 {
        log::info!("removed {removed_tmp} temporary file(s) left by an interrupted create");
    }
    let records = node
        .catalog
        .list_volumes()
        .await
        .context("cannot read the catalog")?;
    let mut known = HashSet::new();
    let mut reattach = Vec::new();
    for (rec, rev) in records {
        if rec
            .attachment
            .as_ref()
            .is_some_and(|a| a.explicit && a.node_id == node.me.id)
            && rec.state == VolumeState::Ready
        {
            reattach.push(rec.clone());
        }
        if !rec.replicas_placed.iter().any(|r| r.node_id == node.me.id) {
            continue;
        }
        let file = DataDir::volume_file_name(&rec.id.0);
        known.insert(file.clone());
        match rec.state {
            VolumeState::Creating if !node.cluster => {
                node.remove_replica_files(&rec.id)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                node.catalog
                    .delete_volume(&rec.name, Expect::At(rev))
                    .await?;
                let msg = format!("volume {}: rolled back an interrupted create", rec.name);
                node.event(Level::Warning, "volume.recovered", Some(&rec.name), msg)
                    .await;
                continue;
            }
            VolumeState::Creating => continue,
            VolumeState::Deleting => {
                node.finish_local_delete(&rec)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.message))?;
                let msg = format!("volume {}: finished an interrupted delete", rec.name);
                node.event(Level::Warning, "volume.recovered", Some(&rec.name), msg)
                    .await;
                continue;
            }
            VolumeState::Ready => {}
        }
        let path = node.volume_path(&rec.id);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > rec.size_bytes => {
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(rec.size_bytes)?;
                f.sync_all()?;
                let msg = format!(
                    "volume {}: rolled back an interrupted resize to {} bytes",
                    rec.name, rec.size_bytes
                );
                node.event(Level::Warning, "volume.recovered", Some(&rec.name), msg)
                    .await;
            }
            Ok(_) => {}
            Err(e) => {
                let msg = format!(
                    "volume {}: data file {} cannot be opened ({e}); the replica is not served",
                    rec.name,
                    path.display()
                );
                node.event(Level::Error, "volume.missing_file", Some(&rec.name), msg)
                    .await;
                continue;
            }
        }
        if let Err(e) = node.open_replica(&rec) {
            node.event(
                Level::Error,
                "volume.open_failed",
                Some(&rec.name),
                e.message,
            )
            .await;
        }
    }
    quarantine_orphans(node, &known).await?;
    Ok(reattach)
}

/// Moves volume files no record accounts for to `lost+found/`.
async fn quarantine_orphans<C: ClusterStore>(
    node: &Node<C>,
    known: &HashSet<String>,
) -> Result<()> {
    let dir = &node.volumes_dir;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let base = name
            .strip_suffix(".meta")
            .or_else(|| name.strip_suffix(store::REPL_META_SUFFIX))
            .unwrap_or(&name);
        if base.ends_with(".img") && !known.contains(base) {
            let lost = dir.parent().unwrap_or(dir).join("lost+found");
            std::fs::create_dir_all(&lost)?;
            std::fs::rename(entry.path(), lost.join(&name))?;
            store::fsync_dir(dir)?;
            let msg = format!(
                "volume file {name} has no catalog record; moved to {} for inspection",
                lost.display()
            );
            node.event(Level::Warning, "volume.orphan_file", None, msg)
                .await;
        }
    }
    Ok(())
}
