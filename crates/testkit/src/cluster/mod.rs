//! Multi-host tests on one machine: network namespaces, a real etcd cluster and real agents.
//!
//! - [`lab`]: [`Lab`], N network namespaces on a bridge the test creates (unique names and a
//!   private `10.77.<tag>.0/24` per lab), processes spawned inside them and killed on drop,
//!   and faults staged with nftables inside a namespace (`partition`, `isolate`, `heal`).
//! - [`etcd`]: [`EtcdCluster`], one etcd member per namespace; kill and restart members.
//! - [`agent`]: [`ClusterAgent`], `blockwarden agent --etcd …` in its namespace, its CLI from
//!   the root namespace, `kill9`/`restart`, NBD URIs.
//! - [`inspect`]: cluster state through the CLI (`attachment`, `replica_nodes`, `node_alive`),
//!   whole-word matching for node names in messages, and qemu-io/nbdinfo runs with deadlines.
//! - [`writer`]: [`TimedWriter`], a background NBD writer of self-describing blocks that
//!   timestamps every acknowledgement and its first error (fencing timelines).
//! - [`Cluster`] (here): the usual fixture, three etcd members (`e1..e3`) and agents in their
//!   own namespaces (`n1..`), built by [`start_cluster!`].
//!
//! Everything is torn down when the last handle drops, also when the test panics: agents and
//! etcd members first (by pid), then veths, namespaces and the bridge.

pub mod agent;
pub mod etcd;
pub mod inspect;
pub mod lab;
pub mod writer;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

pub use agent::{lease_ttl, ClusterAgent, ClusterAgentOptions};
pub use etcd::EtcdCluster;
pub use lab::{lab_available, require_etcd, Lab};
pub use writer::TimedWriter;

/// Starts a [`Cluster`] from the `blockwarden` binary of the calling test crate:
/// `start_cluster!(&[("n1", &["room=a"]), ("n2", &[])])`. Evaluates to `Option<Cluster>`
/// (`None` after a loud skip when the machine cannot run it).
#[macro_export]
macro_rules! start_cluster {
    ($nodes:expr) => {
        $crate::cluster::Cluster::start(env!("CARGO_BIN_EXE_blockwarden"), $nodes)
    };
}

/// Three etcd members and one agent per node, each in its own namespace.
#[derive(Debug)]
pub struct Cluster {
    pub agents: Vec<ClusterAgent>,
    pub etcd: EtcdCluster,
    pub lab: Arc<Lab>,
}

/// The etcd namespaces of a [`Cluster`].
pub const ETCD_MEMBERS: [&str; 3] = ["e1", "e2", "e3"];

impl Cluster {
    /// `nodes`: (node name, labels `KEY=VALUE`). Returns `None` after a loud skip when the
    /// machine lacks root, `ip`, `nft` or `etcd` (panics instead under `CI`).
    #[track_caller]
    pub fn start(bin: &str, nodes: &[(&str, &[&str])]) -> Option<Cluster> {
        if !lab_available() || !require_etcd() {
            return None;
        }
        let started = Instant::now();
        let mut names: Vec<&str> = ETCD_MEMBERS.to_vec();
        names.extend(nodes.iter().map(|(n, _)| *n));
        let lab = Lab::new(&names)?;
        let etcd = EtcdCluster::start(&lab, &ETCD_MEMBERS);
        let agents = nodes
            .iter()
            .map(|(name, labels)| {
                let mut opts = ClusterAgentOptions::new(bin, etcd.endpoints());
                opts.labels = labels.iter().map(|l| (*l).to_owned()).collect();
                ClusterAgent::start(&lab, name, opts)
            })
            .collect();
        eprintln!("testkit: cluster up in {:?}", started.elapsed());
        Some(Cluster { agents, etcd, lab })
    }

    /// The agent of node `name`.
    #[track_caller]
    pub fn agent(&self, name: &str) -> &ClusterAgent {
        self.agents
            .iter()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| panic!("no agent {name:?}"))
    }

    #[track_caller]
    pub fn agent_mut(&mut self, name: &str) -> &mut ClusterAgent {
        self.agents
            .iter_mut()
            .find(|a| a.name() == name)
            .unwrap_or_else(|| panic!("no agent {name:?}"))
    }
}
