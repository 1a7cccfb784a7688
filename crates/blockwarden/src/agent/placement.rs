//! Placement by policy: which nodes get a new volume's replicas.
//!
//! Rules, in order: only alive nodes; pinned nodes (`--node`) first and only them when any
//! are given; nodes with room for the volume's size (thin provisioning counts the full size
//! against free space, so a pool is never promised more than it has); distinct nodes;
//! distinct values of the spread label (`--spread room`), nodes without the label excluded;
//! most free space first, where a node's free space is counted after the full provisioned
//! size of the replicas already placed on it (volumes are sparse, so the file system's free
//! space alone would rank every node of a fresh cluster equal and fill one node first). When the policy cannot be met the error names every node and why
//! it was not chosen, so the operator can fix the cluster or the request.

use std::collections::{BTreeMap, BTreeSet};

use bw_types::format_size;

/// What placement knows of one node.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub name: String,
    pub alive: bool,
    pub labels: BTreeMap<String, String>,
    /// Free bytes of the node's pool file system.
    pub free_bytes: u64,
    /// Provisioned bytes of the replicas already placed on the node.
    pub committed_bytes: u64,
}

/// Free space is compared in whole units of this size: nodes report it every few seconds
/// while other writers change it by megabytes, so finer differences are noise that would
/// otherwise outweigh the provisioned sizes of small volumes.
pub const FREE_SPACE_QUANTUM_BYTES: u64 = 1 << 30;

impl Candidate {
    fn headroom(&self) -> u64 {
        let free = self.free_bytes / FREE_SPACE_QUANTUM_BYTES * FREE_SPACE_QUANTUM_BYTES;
        free.saturating_sub(self.committed_bytes)
    }
}

/// What the volume asks for.
#[derive(Debug, Clone)]
pub struct Policy {
    pub replicas: u32,
    pub size_bytes: u64,
    pub spread: Option<String>,
    pub pinned: Vec<String>,
}

/// The policy cannot be met; `Display` lists every node and why it was excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementError {
    pub wanted: u32,
    pub chosen: Vec<String>,
    pub excluded: Vec<(String, String)>,
    pub unknown_pins: Vec<String>,
}

impl std::fmt::Display for PlacementError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot place {} replica(s): only {} node(s) qualify",
            self.wanted,
            self.chosen.len()
        )?;
        if !self.chosen.is_empty() {
            write!(f, " ({})", self.chosen.join(", "))?;
        }
        for p in &self.unknown_pins {
            write!(f, "; --node {p}: no such node")?;
        }
        for (n, why) in &self.excluded {
            write!(f, "; {n}: {why}")?;
        }
        Ok(())
    }
}

/// Chooses `policy.replicas` nodes, or explains why not.
pub fn place(candidates: &[Candidate], policy: &Policy) -> Result<Vec<String>, PlacementError> {
    let mut excluded = Vec::new();
    let unknown_pins: Vec<String> = policy
        .pinned
        .iter()
        .filter(|p| !candidates.iter().any(|c| &&c.name == p))
        .cloned()
        .collect();
    let mut eligible: Vec<&Candidate> = Vec::new();
    for c in candidates {
        let why = if !policy.pinned.is_empty() && !policy.pinned.contains(&c.name) {
            Some("not among the --node choices".to_owned())
        } else if !c.alive {
            Some("down".to_owned())
        } else if c.free_bytes < policy.size_bytes {
            Some(format!(
                "only {} free, the volume needs {}",
                format_size(c.free_bytes),
                format_size(policy.size_bytes)
            ))
        } else {
            let missing = policy
                .spread
                .as_ref()
                .filter(|l| !c.labels.contains_key(*l));
            missing.map(|label| format!("no label {label} (needed by --spread {label})"))
        };
        match why {
            Some(w) => excluded.push((c.name.clone(), w)),
            None => eligible.push(c),
        }
    }
    // Pinned nodes in the order given, then the rest by free space (ties by name, stable).
    eligible.sort_by(|a, b| {
        let pa = policy
            .pinned
            .iter()
            .position(|p| *p == a.name)
            .unwrap_or(usize::MAX);
        let pb = policy
            .pinned
            .iter()
            .position(|p| *p == b.name)
            .unwrap_or(usize::MAX);
        pa.cmp(&pb)
            .then(b.headroom().cmp(&a.headroom()))
            .then(a.name.cmp(&b.name))
    });
    let mut chosen = Vec::new();
    let mut used_values = BTreeSet::new();
    for c in eligible {
        if chosen.len() as u32 == policy.replicas {
            break;
        }
        if let Some(label) = &policy.spread {
            let v = &c.labels[label];
            if !used_values.insert(v.clone()) {
                excluded.push((
                    c.name.clone(),
                    format!("{label}={v} already holds a replica"),
                ));
                continue;
            }
        }
        chosen.push(c.name.clone());
    }
    if chosen.len() as u32 == policy.replicas && unknown_pins.is_empty() {
        return Ok(chosen);
    }
    excluded.sort();
    Err(PlacementError {
        wanted: policy.replicas,
        chosen,
        excluded,
        unknown_pins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, free_gib: u64, room: Option<&str>, alive: bool) -> Candidate {
        let mut labels = BTreeMap::new();
        if let Some(r) = room {
            labels.insert("room".to_owned(), r.to_owned());
        }
        Candidate {
            name: name.into(),
            alive,
            labels,
            free_bytes: free_gib << 30,
            committed_bytes: 0,
        }
    }

    fn policy(replicas: u32, spread: Option<&str>, pinned: &[&str]) -> Policy {
        Policy {
            replicas,
            size_bytes: 1 << 30,
            spread: spread.map(Into::into),
            pinned: pinned.iter().map(|s| (*s).into()).collect(),
        }
    }

    // Goal: most free space first, distinct spread values, pins honoured and ordered.
    #[test]
    fn chooses_by_free_space_spread_and_pins() {
        let nodes = [
            node("n1", 10, Some("a"), true),
            node("n2", 50, Some("a"), true),
            node("n3", 20, Some("b"), true),
        ];
        assert_eq!(place(&nodes, &policy(1, None, &[])).unwrap(), ["n2"]);
        assert_eq!(place(&nodes, &policy(2, None, &[])).unwrap(), ["n2", "n3"]);
        assert_eq!(
            place(&nodes, &policy(2, Some("room"), &[])).unwrap(),
            ["n2", "n3"]
        );
        assert_eq!(place(&nodes, &policy(1, None, &["n1"])).unwrap(), ["n1"]);
        assert_eq!(
            place(&nodes, &policy(2, None, &["n3", "n1"])).unwrap(),
            ["n3", "n1"]
        );
    }

    // Goal: thin provisioning spreads a fresh cluster: equal free space, so the node with
    // less already placed on it wins.
    #[test]
    fn provisioned_bytes_break_free_space_ties() {
        let mut nodes = [
            node("n1", 50, None, true),
            node("n2", 50, None, true),
            node("n3", 50, None, true),
        ];
        // A few MiB of difference in reported free space is noise, not a reason to prefer n3.
        nodes[2].free_bytes += 5 << 20;
        nodes[0].committed_bytes = 16 << 20;
        assert_eq!(place(&nodes, &policy(1, None, &[])).unwrap(), ["n2"]);
        nodes[0].committed_bytes = 2 << 30;
        nodes[1].committed_bytes = 1 << 30;
        assert_eq!(place(&nodes, &policy(1, None, &[])).unwrap(), ["n3"]);
        nodes[2].committed_bytes = 3 << 30;
        assert_eq!(place(&nodes, &policy(2, None, &[])).unwrap(), ["n2", "n1"]);
    }

    // Goal: an impossible policy names every node and the reason it was left out.
    #[test]
    fn impossible_policies_explain_every_node() {
        let nodes = [
            node("n1", 10, Some("a"), true),
            node("n2", 50, Some("a"), true),
            node("n3", 20, None, false),
        ];
        let e = place(&nodes, &policy(2, Some("room"), &[])).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("cannot place 2 replica(s): only 1 node(s) qualify (n2)"),
            "{msg}"
        );
        assert!(msg.contains("n1: room=a already holds a replica"), "{msg}");
        assert!(msg.contains("n3: down"), "{msg}");
        let e = place(&nodes, &policy(1, None, &["n9"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--node n9: no such node"), "{e}");
        let mut big = policy(1, None, &[]);
        big.size_bytes = 100 << 30;
        let e = place(&nodes, &big).unwrap_err().to_string();
        assert!(
            e.contains("n2: only 50 GiB free, the volume needs 100 GiB"),
            "{e}"
        );
        let e = place(&nodes[..2], &policy(1, Some("rack"), &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("n1: no label rack"), "{e}");
    }
}
