//! Start-up reconciliation of the catalog with the volume files.
//!
//! The catalog is the truth for which volumes exist and how large they are. A crash can
//! interrupt each lifecycle operation at one of a few points (`docs/design/storage.md`):
//!
//! | record says | file | what a crash interrupted | recovery |
//! |---|---|---|---|
//! | `creating` | any | create, before it committed `ready` | remove file, remove record |
//! | `deleting` | any | delete, after it committed `deleting` | remove file, remove record |
//! | `ready`, file longer than size | | resize, after growing the file, before the commit | truncate to the recorded size (the tail was never visible) |
//! | `ready`, file missing | | lost outside our control | keep the record, report an error event, do not serve |
//! | no record | `volumes/<id>.img` | impossible by the order above: a lost or replaced catalog, or a foreign file | move to `<data-dir>/lost+found/` (never delete data we cannot account for) and warn |
//! | no record | `.*.tmp` | `create_volume_file` before its rename | remove |
//!
//! Attachments do not survive a restart unless explicit: NBD connections died with the
//! process.

use std::collections::HashSet;
use std::fs::OpenOptions;

use anyhow::{Context, Result};
use catalog::{Catalog, Expect, Level, VolumeState};

use super::datadir::DataDir;
use super::node::Node;

/// Reconciles, then opens every ready volume. Returns the number of volumes served.
pub async fn recover<C: Catalog>(node: &Node<C>) -> Result<usize> {
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
    let mut served = 0;
    for (mut rec, rev) in records {
        let path = node.volume_path(&rec.id);
        known.insert(DataDir::volume_file_name(&rec.id.0));
        match rec.state {
            VolumeState::Creating | VolumeState::Deleting => {
                let what = if rec.state == VolumeState::Creating {
                    "create"
                } else {
                    "delete"
                };
                store::remove_volume_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                node.catalog
                    .delete_volume(&rec.name, Expect::At(rev))
                    .await?;
                let msg = format!(
                    "volume {}: finished an interrupted {what} (volume removed)",
                    rec.name
                );
                node.event(Level::Warning, "volume.recovered", Some(&rec.name), msg)
                    .await;
                known.remove(&DataDir::volume_file_name(&rec.id.0));
                continue;
            }
            VolumeState::Ready => {}
        }
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
                    "volume {}: data file {} cannot be opened ({e}); the volume is not served",
                    rec.name,
                    path.display()
                );
                node.event(Level::Error, "volume.missing_file", Some(&rec.name), msg)
                    .await;
                continue;
            }
        }
        let explicit = rec
            .attachment
            .as_ref()
            .is_some_and(|a| a.explicit && a.node_id == node.me.id);
        if rec.attachment.is_some() && !explicit {
            rec.attachment = None;
            node.catalog.put_volume(&rec, Expect::At(rev)).await?;
        }
        let s = node.serve(&rec).map_err(|e| anyhow::anyhow!(e.message))?;
        if let Some(a) = rec.attachment.as_ref().filter(|_| explicit) {
            let mut u = s.usage.lock().unwrap();
            u.explicit = true;
            u.attached = Some((a.generation, a.since_ms));
        }
        served += 1;
    }
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".img") && !known.contains(&name) {
            let lost = dir.parent().unwrap_or(&dir).join("lost+found");
            std::fs::create_dir_all(&lost)?;
            std::fs::rename(entry.path(), lost.join(&name))?;
            store::fsync_dir(&dir)?;
            let msg = format!(
                "volume file {name} has no catalog record; moved to {} for inspection",
                lost.display()
            );
            node.event(Level::Warning, "volume.orphan_file", None, msg)
                .await;
        }
    }
    Ok(served)
}
