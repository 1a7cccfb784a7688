//! The node's volumes as NBD exports: export name = volume name. Opening an export uses the
//! volume (SPEC §4: the first opener attaches it); the connection's guard releases that use.

use std::sync::Arc;

use bw_types::{format_size, Name};
use catalog::Catalog;
use nbd_server::{ExportInfo, Exports, OpenError, OpenExport};

use super::node::Node;
use super::volumes::{AttachError, Served};

pub struct NodeExports<C: Catalog>(pub Arc<Node<C>>);

impl<C: Catalog> NodeExports<C> {
    fn lookup(&self, name: &str) -> Result<Arc<Served>, OpenError> {
        let unknown = || {
            OpenError::Unknown(format!(
                "no volume named {name:?} on node {}",
                self.0.me.name
            ))
        };
        let name = Name::new(name).map_err(|_| unknown())?;
        let served = self.0.served(&name).ok_or_else(unknown)?;
        if served.is_deleting() {
            return Err(OpenError::Unavailable(format!(
                "volume {name} is being deleted"
            )));
        }
        if let Some(reason) = served.device.fault_reason() {
            return Err(OpenError::Unavailable(format!(
                "volume {name} is faulted: {reason}"
            )));
        }
        Ok(served)
    }
}

fn info_of(s: &Served) -> ExportInfo {
    let size = bw_types::BlockDevice::size_bytes(&*s.device);
    ExportInfo {
        name: s.name.to_string(),
        size_bytes: size,
        description: format!("blockwarden volume {} ({})", s.name, format_size(size)),
    }
}

/// Releases one connection's use of a volume when the connection ends.
struct ConnectionGuard<C: Catalog> {
    node: Arc<Node<C>>,
    served: Option<Arc<Served>>,
}

impl<C: Catalog> Drop for ConnectionGuard<C> {
    fn drop(&mut self) {
        if let Some(s) = self.served.take() {
            self.node.release_connection(s);
        }
    }
}

impl<C: Catalog> Exports for NodeExports<C> {
    fn list(&self) -> Vec<ExportInfo> {
        let served: Vec<Arc<Served>> = self.0.served.lock().unwrap().values().cloned().collect();
        served
            .iter()
            .filter(|s| !s.is_deleting())
            .map(|s| info_of(s))
            .collect()
    }

    fn info(&self, name: &str) -> Result<ExportInfo, OpenError> {
        self.lookup(name).map(|s| info_of(&s))
    }

    fn open(&self, name: &str) -> Result<OpenExport, OpenError> {
        let served = self.lookup(name)?;
        // The catalog write of a first attachment blocks this connection's task briefly
        // (one durable commit); other connections run on the runtime's other workers.
        tokio::task::block_in_place(|| self.0.acquire_blocking(&served, false)).map_err(
            |e| match e {
                AttachError::Gone => OpenError::Unknown(format!("volume {name} was deleted")),
                AttachError::HeldElsewhere(_) | AttachError::Contended => {
                    OpenError::InUse(e.to_string())
                }
                AttachError::Catalog(c) => {
                    OpenError::Unavailable(format!("cluster store unavailable: {c}"))
                }
            },
        )?;
        let guard = ConnectionGuard {
            node: self.0.clone(),
            served: Some(served.clone()),
        };
        Ok(OpenExport {
            info: info_of(&served),
            device: served.device.clone(),
            metrics: served.metrics.clone(),
            guard: Box::new(guard),
            kill: served.kill.subscribe(),
        })
    }
}
