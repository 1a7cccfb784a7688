//! Goal: placement follows the policy (`--node` pins, `--spread LABEL`, most free space) and
//! refuses what cannot be met with an error that names every node and why it was excluded;
//! `node list` shows every node's state, labels, capacity and attached volumes from any agent.
//! Method: three agents with labels n1 room=a, n2 room=b, n3 without a room; real etcd; CLI
//! from the root namespace; one agent killed to stage a down node.

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::cluster::inspect::{mentions, node_alive, replica_nodes};
use testkit::cluster::lease_ttl;
use testkit::{start_cluster, wait_until};

const NODES: &[(&str, &[&str])] = &[
    ("n1", &["room=a", "rack=r1"]),
    ("n2", &["room=b", "rack=r2"]),
    ("n3", &["rack=r3"]),
];

/// How long a killed agent may still be listed as up: its membership lease must expire.
fn down_bound() -> Duration {
    lease_ttl(env!("CARGO_BIN_EXE_blockwarden").as_ref()) + Duration::from_secs(5)
}

#[track_caller]
fn assert_refusal(stderr: &str, must_mention: &[&str], what: &str) {
    let line = stderr.trim();
    assert!(
        line.starts_with("error:"),
        "{what}: one `error:` line: {stderr}"
    );
    for w in must_mention {
        assert!(
            mentions(line, w) || line.to_lowercase().contains(&w.to_lowercase()),
            "{what}: the error should mention {w:?}:\n{stderr}"
        );
    }
}

#[test]
fn placement_honours_pins_and_spread_and_explains_impossible_policies() {
    let Some(mut c) = start_cluster!(NODES) else {
        return;
    };
    let a = c.agent("n1");

    // Pinned.
    a.cli_ok(&["volume", "create", "pin3", "--size", "16M", "--node", "n3"]);
    assert_eq!(
        replica_nodes(&a.cli_json(&["volume", "show", "pin3"])),
        ["n3"]
    );
    c.agent("n2")
        .cli_ok(&["volume", "create", "pin1", "--size", "16M", "--node", "n1"]);
    assert_eq!(
        replica_nodes(&a.cli_json(&["volume", "show", "pin1"])),
        ["n1"]
    );

    // --spread room: never on the node without a room label. One replica lands in either
    // room; two (the cluster default) take one room each.
    for i in 0..6 {
        let name = format!("spread{i}");
        let replicas = if i % 2 == 0 { "1" } else { "2" };
        c.agents[i % 3].cli_ok(&[
            "volume",
            "create",
            &name,
            "--size",
            "16M",
            "--spread",
            "room",
            "--replicas",
            replicas,
        ]);
        let mut on = replica_nodes(&a.cli_json(&["volume", "show", &name]));
        on.sort();
        if replicas == "1" {
            assert!(
                on == ["n1"] || on == ["n2"],
                "{name} with --spread room must land on a node with a room label: {on:?}"
            );
        } else {
            assert_eq!(on, ["n1", "n2"], "{name}: two replicas, one per room");
        }
    }

    // Impossible policies: non-zero exit, every node named with its reason, nothing created.
    let err = a.cli_err(&[
        "volume", "create", "nozone", "--size", "16M", "--spread", "zone",
    ]);
    assert_refusal(
        &err,
        &["n1", "n2", "n3", "zone"],
        "--spread zone (no node has it)",
    );
    let err = a.cli_err(&[
        "volume", "create", "badpin", "--size", "16M", "--node", "n3", "--spread", "room",
    ]);
    assert_refusal(&err, &["n1", "n2", "n3", "room"], "--node n3 --spread room");
    let err = a.cli_err(&[
        "volume", "create", "ghostpin", "--size", "16M", "--node", "ghost",
    ]);
    assert_refusal(&err, &["ghost"], "--node ghost (no such node)");

    // Three replicas in different rooms cannot be placed: there are two rooms.
    let err = a.cli_err(&[
        "volume",
        "create",
        "three",
        "--size",
        "16M",
        "--replicas",
        "3",
        "--spread",
        "room",
    ]);
    assert_refusal(
        &err,
        &["n3", "room"],
        "--replicas 3 --spread room (two rooms)",
    );
    let err = a.cli_err(&[
        "volume",
        "create",
        "many",
        "--size",
        "16M",
        "--replicas",
        "9",
    ]);
    assert!(
        err.starts_with("error:") && err.contains("at most"),
        "--replicas 9: a clear limit: {err}"
    );

    // A down node is excluded and said to be down.
    c.agent_mut("n2").kill9();
    let t = Instant::now();
    let a = c.agent("n1");
    assert!(
        wait_until(down_bound(), || node_alive(a, "n2") == Some(false)),
        "n2 listed as down within {:?} of its kill",
        down_bound()
    );
    eprintln!("n2 listed as down {:?} after kill -9", t.elapsed());
    let err = a.cli_err(&["volume", "create", "pin2", "--size", "16M", "--node", "n2"]);
    assert_refusal(&err, &["n2", "down"], "--node n2 while n2 is down");
    for i in 0..3 {
        let name = format!("after{i}");
        a.cli_ok(&[
            "volume",
            "create",
            &name,
            "--size",
            "16M",
            "--spread",
            "room",
            "--replicas",
            "1",
        ]);
        assert_eq!(
            replica_nodes(&a.cli_json(&["volume", "show", &name])),
            ["n1"],
            "with n2 down, room spread leaves only n1"
        );
    }

    // Refused creates left nothing behind.
    let list = a.cli_json(&["volume", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    for refused in ["nozone", "badpin", "ghostpin", "two", "pin2"] {
        assert!(
            !names.contains(&refused),
            "{refused} was refused but is listed: {names:?}"
        );
    }
}

#[test]
fn node_list_shows_every_node_state_labels_capacity_and_attached_volumes() {
    let Some(mut c) = start_cluster!(NODES) else {
        return;
    };

    for a in &c.agents {
        let list = a.cli_json(&["node", "list"]);
        let nodes = list.as_array().unwrap_or_else(|| panic!("array: {list}"));
        let mut names: Vec<&str> = nodes
            .iter()
            .map(|n| n["name"].as_str().expect("name"))
            .collect();
        names.sort();
        assert_eq!(names, ["n1", "n2", "n3"], "node list via {}", a.name());
        for n in nodes {
            assert_eq!(n["alive"], Value::Bool(true), "{n}");
            let cap = n["capacity_bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("capacity_bytes: {n}"));
            let free = n["free_bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("free_bytes: {n}"));
            assert!(cap > 0 && free <= cap, "{n}");
            assert!(n["last_seen_ms"].is_u64(), "last_seen_ms is a number: {n}");
            assert!(n["labels"].is_object(), "labels is an object: {n}");
        }
        let n1 = nodes.iter().find(|n| n["name"] == "n1").unwrap();
        assert_eq!(n1["labels"]["room"], "a", "{n1}");
        assert_eq!(n1["labels"]["rack"], "r1", "{n1}");
        let n3 = nodes.iter().find(|n| n["name"] == "n3").unwrap();
        assert!(n3["labels"].get("room").is_none(), "{n3}");
    }

    // Attached volumes show on their node's row.
    let a = c.agent("n1");
    a.cli_ok(&["volume", "create", "vm-disk", "--size", "16M"]);
    a.cli_ok(&["volume", "attach", "vm-disk"]);
    let human = c.agent("n3").cli_ok(&["node", "list"]);
    let row = |name: &str| -> String {
        human
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{human}"))
            .to_owned()
    };
    let r1 = row("n1");
    assert!(mentions(&r1, "up"), "state up: {r1}");
    assert!(r1.contains("room=a"), "labels: {r1}");
    assert!(
        r1.contains("vm-disk"),
        "attached volume on its node's row: {r1}"
    );
    assert!(!row("n2").contains("vm-disk"), "{human}");

    // A killed node turns down, with its age.
    c.agent_mut("n3").kill9();
    let t = Instant::now();
    let a = c.agent("n1");
    assert!(
        wait_until(down_bound(), || node_alive(a, "n3") == Some(false)),
        "n3 listed as down within {:?}",
        down_bound()
    );
    eprintln!("n3 listed as down {:?} after kill -9", t.elapsed());
    let human = a.cli_ok(&["node", "list"]);
    let r3 = human
        .lines()
        .find(|l| l.split_whitespace().next() == Some("n3"))
        .unwrap_or_else(|| panic!("a down node is still listed:\n{human}"));
    assert!(mentions(r3, "down"), "state down: {r3}");
    assert!(
        r3.chars().any(|ch| ch.is_ascii_digit()),
        "down with an age: {r3}"
    );
}
