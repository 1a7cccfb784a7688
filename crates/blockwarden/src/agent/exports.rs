//! The cluster's volumes as NBD exports: export name = volume name. Opening an export
//! attaches the volume on this node (SPEC §4: the first opener wins; a second host gets
//! an error naming the holder); the connection's guard releases that use.

use std::sync::Arc;

use bw_types::{format_size, Name};
use catalog::{ClusterStore, VolumeState};
use nbd_server::{ExportInfo, Exports, OpenError, OpenExport};

use super::attach::AttachError;
use super::node::Node;

pub struct NodeExports<C: ClusterStore>(pub Arc<Node<C>>);

fn info(name: &Name, size: u64) -> ExportInfo {
    ExportInfo {
        name: name.to_string(),
        size_bytes: size,
        description: format!("blockwarden volume {name} ({})", format_size(size)),
    }
}

impl<C: ClusterStore> NodeExports<C> {
    /// Runs catalog work from a connection task (which is on a runtime worker).
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::task::block_in_place(|| self.0.runtime.block_on(f))
    }
}

/// Releases one connection's use of a volume when the connection ends.
struct ConnectionGuard<C: ClusterStore> {
    node: Arc<Node<C>>,
    name: Name,
}

impl<C: ClusterStore> Drop for ConnectionGuard<C> {
    fn drop(&mut self) {
        self.node.release_connection(self.name.clone());
    }
}

impl<C: ClusterStore> Exports for NodeExports<C> {
    fn list(&self) -> Vec<ExportInfo> {
        match self.block_on(self.0.catalog.list_volumes()) {
            Ok(v) => v
                .iter()
                .filter(|(r, _)| r.state == VolumeState::Ready)
                .map(|(r, _)| info(&r.name, r.size_bytes))
                .collect(),
            Err(e) => {
                log::warn!("NBD export list: {e}");
                Vec::new()
            }
        }
    }

    fn info(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let unknown = || OpenError::Unknown(format!("no volume named {name:?}"));
        let n = Name::new(name).map_err(|_| unknown())?;
        match self.block_on(self.0.catalog.get_volume(&n)) {
            Ok(Some((r, _))) if r.state == VolumeState::Ready => Ok(info(&r.name, r.size_bytes)),
            Ok(Some((r, _))) => Err(OpenError::Unavailable(
                format!("volume {name} is {:?}", r.state).to_lowercase(),
            )),
            Ok(None) => Err(unknown()),
            Err(e) => Err(OpenError::Unavailable(e.to_string())),
        }
    }

    fn open(&self, name: &str) -> Result<OpenExport, OpenError> {
        let n =
            Name::new(name).map_err(|_| OpenError::Unknown(format!("no volume named {name:?}")))?;
        let att = self
            .block_on(self.0.acquire(&n, false))
            .map_err(|e| match e {
                AttachError::NotFound(_) => OpenError::Unknown(e.to_string()),
                AttachError::Held(_) => OpenError::InUse(e.to_string()),
                other => OpenError::Unavailable(other.to_string()),
            })?;
        let guard = ConnectionGuard {
            node: self.0.clone(),
            name: n.clone(),
        };
        let size = att.device.size_bytes();
        Ok(OpenExport {
            info: info(&n, size),
            device: att.device.clone(),
            metrics: self.0.metrics_for(&n),
            guard: Box::new(guard),
            kill: att.kill.subscribe(),
        })
    }
}
