//! Goal: the etcd catalog stays consistent under concurrent commands from several hosts (no
//! controller process, every mutation a guarded transaction). Method: three etcd members and
//! three agents in their own network namespaces; 200 `volume create` through all three agents
//! at once (16 in flight), then 20 rounds of one name created through two agents at the same
//! instant; afterwards every agent lists exactly the names created, each with one replica on
//! an alive node, and every node got some of them (placement by free space).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::cluster::inspect::replica_nodes;
use testkit::start_cluster;

const CREATES: usize = 200;
const PARALLEL: usize = 16;
const DUP_ROUNDS: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn creates_racing_through_three_agents_are_all_placed_and_one_name_wins_once() {
    let Some(c) = start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])]) else {
        return;
    };

    // 200 creates, volume i through agent i % 3, 16 at a time.
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let latencies = Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= CREATES {
                    break;
                }
                let agent = &c.agents[i % c.agents.len()];
                let name = format!("c{i:03}");
                let t0 = Instant::now();
                let out = agent.cli(&[
                    "volume",
                    "create",
                    &name,
                    "--size",
                    "64M",
                    "--replicas",
                    "1",
                ]);
                latencies.lock().unwrap().push(t0.elapsed());
                if !out.status.success() {
                    failures.lock().unwrap().push(format!(
                        "{name} via {}: {}",
                        agent.name(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            });
        }
    });
    let elapsed = t.elapsed();
    let mut lat = latencies.into_inner().unwrap();
    lat.sort();
    eprintln!(
        "{CREATES} creates, {PARALLEL} in flight: {elapsed:?} total; CLI latency p50 {:?} p99 {:?} max {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().unwrap()
    );
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {CREATES} concurrent creates failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The same name through two agents at the same instant: exactly one succeeds.
    let mut expected: BTreeSet<String> = (0..CREATES).map(|i| format!("c{i:03}")).collect();
    for r in 0..DUP_ROUNDS {
        let name = format!("dup{r:02}");
        let pair = [&c.agents[r % 3], &c.agents[(r + 1) % 3]];
        let barrier = Barrier::new(2);
        let outs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = pair
                .iter()
                .map(|a| {
                    let (b, name) = (&barrier, &name);
                    s.spawn(move || {
                        b.wait();
                        a.cli(&["volume", "create", name, "--size", "16M", "--replicas", "1"])
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wins = outs.iter().filter(|o| o.status.success()).count();
        let text: Vec<String> = outs
            .iter()
            .zip(pair)
            .map(|(o, a)| {
                format!(
                    "via {}: {} {}{}",
                    a.name(),
                    o.status,
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            })
            .collect();
        assert_eq!(
            wins, 1,
            "round {r}: `volume create {name}` through two agents at once must succeed exactly once:\n{}",
            text.join("\n")
        );
        let loser = outs.iter().find(|o| !o.status.success()).unwrap();
        let err = String::from_utf8_lossy(&loser.stderr).to_lowercase();
        assert!(
            err.contains("exist") && err.contains(&name),
            "round {r}: the loser is told {name} already exists:\n{}",
            text.join("\n")
        );
        expected.insert(name);
    }

    // Every agent lists exactly the names created.
    for a in &c.agents {
        let list = a.cli_json(&["volume", "list"]);
        let got: BTreeSet<String> = list
            .as_array()
            .unwrap_or_else(|| panic!("volume list -o json is an array: {list}"))
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_owned())
            .collect();
        let missing: Vec<_> = expected.difference(&got).collect();
        let extra: Vec<_> = got.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "volume list via {}: missing {missing:?}, unexpected {extra:?}",
            a.name()
        );
    }

    // Each volume has one replica, on a node that is alive; every node got some.
    let nodes = c.agents[0].cli_json(&["node", "list"]);
    let alive: BTreeSet<String> = nodes
        .as_array()
        .expect("node list -o json is an array")
        .iter()
        .filter(|n| n["alive"] == Value::Bool(true))
        .map(|n| n["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(alive.len(), 3, "all three nodes alive: {nodes}");
    let names: Vec<String> = expected.iter().cloned().collect();
    let placed = Mutex::new(BTreeMap::<String, usize>::new());
    let bad = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for w in 0..8 {
            let (placed, bad, next, names, alive, c) = (&placed, &bad, &next, &names, &alive, &c);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(name) = names.get(i) else { break };
                let show = c.agents[w % 3].cli_json(&["volume", "show", name]);
                let replicas = replica_nodes(&show);
                if replicas.len() != 1 || !alive.contains(&replicas[0]) {
                    bad.lock()
                        .unwrap()
                        .push(format!("{name}: replicas {replicas:?}"));
                } else {
                    *placed
                        .lock()
                        .unwrap()
                        .entry(replicas[0].clone())
                        .or_default() += 1;
                }
            });
        }
    });
    let bad = bad.into_inner().unwrap();
    assert!(
        bad.is_empty(),
        "volumes without exactly one replica on an alive node:\n{}",
        bad.join("\n")
    );
    let placed = placed.into_inner().unwrap();
    eprintln!("placement of {} volumes: {placed:?}", names.len());
    for n in &alive {
        assert!(
            placed.get(n).copied().unwrap_or(0) > 0,
            "placement by free space gives every node some volumes: {placed:?}"
        );
    }
}
