//! The replica commands and replication flags of the CLI against a real embedded agent: what
//! a single node can answer (unknown nodes, the replica it already holds, settings), and the
//! argument errors, each one clear `error:` line with the right exit code. Method: spawn the
//! agent, drive `blockwarden --api URL volume …`, check exit codes, stderr and `-o json`.
//! (Copying to a second node is covered by the cluster tests, which need namespaces.)

use testkit::start_agent;

/// Asserts one `error:` line on stderr mentioning every `words` (case-insensitive).
#[track_caller]
fn assert_error_mentions(stderr: &str, words: &[&str]) {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("error:"), "{stderr}");
    for w in words {
        assert!(
            lines[0].to_lowercase().contains(&w.to_lowercase()),
            "error should mention {w:?}: {stderr}"
        );
    }
}

/// Runs the CLI expecting exit code `code`; returns stderr.
#[track_caller]
fn fails_with(agent: &testkit::Agent, args: &[&str], code: i32) -> String {
    let out = agent.cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "blockwarden {}: {stderr}",
        args.join(" ")
    );
    stderr
}

/// Goal: on a single node, add-replica says the node is unknown (or already holds the
/// replica), remove-replica says there is no such replica, and nothing changes. Method: one
/// volume, every refusal, then the replica set is still the one replica.
#[test]
fn add_and_remove_replica_refusals_on_a_single_node() {
    let agent = start_agent!();
    agent.create_volume("v", "8M");

    let err = fails_with(
        &agent,
        &["volume", "add-replica", "v", "--node", "nosuch"],
        1,
    );
    assert_error_mentions(&err, &["unknown node", "nosuch", "node-a"]);
    let err = fails_with(
        &agent,
        &["volume", "add-replica", "v", "--node", "nosuch", "--wait"],
        1,
    );
    assert_error_mentions(&err, &["nosuch"]);
    let err = fails_with(
        &agent,
        &["volume", "add-replica", "v", "--node", "node-a"],
        1,
    );
    assert_error_mentions(&err, &["already has a replica", "node-a"]);
    let err = fails_with(
        &agent,
        &["volume", "add-replica", "ghost", "--node", "node-a"],
        1,
    );
    assert_error_mentions(&err, &["ghost"]);

    let err = fails_with(
        &agent,
        &["volume", "remove-replica", "v", "--node", "nosuch"],
        1,
    );
    assert_error_mentions(&err, &["no replica on node nosuch", "node-a"]);
    let err = fails_with(
        &agent,
        &["volume", "remove-replica", "ghost", "--node", "node-a"],
        1,
    );
    assert_error_mentions(&err, &["ghost"]);

    let show = agent.cli_json(&["volume", "show", "v"]);
    let set = show["replica_set"].as_array().expect("replica_set");
    assert_eq!(set.len(), 1, "{show}");
    assert_eq!(set[0]["node"], "node-a");
    assert_eq!(set[0]["id"], 1, "the first replica is number 1: {show}");
    assert_eq!(
        set[0]["in_sync"].as_bool(),
        Some(set[0]["state"] == "in_sync"),
        "in_sync agrees with state: {show}"
    );
    assert_eq!(show["min_in_sync"], 1, "{show}");
}

/// Goal: bad arguments of the new commands and flags are usage errors (exit 2) naming the
/// flag, refused before anything reaches the agent.
#[test]
fn replica_argument_errors_name_the_flag() {
    let agent = start_agent!();
    agent.create_volume("v", "8M");
    for (args, flag) in [
        (&["volume", "add-replica", "v"][..], "--node"),
        (
            &["volume", "add-replica", "v", "--node", "Bad Node"],
            "--node",
        ),
        (
            &[
                "volume",
                "add-replica",
                "v",
                "--node",
                "n2",
                "--resync-rate",
                "fast",
            ],
            "--resync-rate",
        ),
        (
            &[
                "volume",
                "add-replica",
                "v",
                "--node",
                "n2",
                "--timeout",
                "5s",
            ],
            "--wait",
        ),
        (
            &[
                "volume",
                "add-replica",
                "v",
                "--node",
                "n2",
                "--wait",
                "--timeout",
                "soon",
            ],
            "--timeout",
        ),
        (&["volume", "remove-replica", "v"], "--node"),
        (
            &["volume", "set", "v", "--min-in-sync", "0"],
            "--min-in-sync",
        ),
        (&["volume", "set", "v", "--resync-rate=-1"], "--resync-rate"),
        (&["volume", "set", "v"], "--min-in-sync"),
        (
            &[
                "volume",
                "create",
                "w",
                "--size",
                "1M",
                "--resync-rate",
                "1X",
            ],
            "--resync-rate",
        ),
        (
            &[
                "volume",
                "create",
                "w",
                "--size",
                "1M",
                "--min-in-sync",
                "none",
            ],
            "--min-in-sync",
        ),
    ] {
        let err = fails_with(&agent, args, 2);
        assert!(
            err.contains(flag),
            "`blockwarden {}` should name {flag}: {err}",
            args.join(" ")
        );
    }
    let list = agent.cli_json(&["volume", "list"]);
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "nothing created: {list}"
    );
}

/// Goal: the replication settings reach the agent from create and set, show up in `show`,
/// and out-of-range ones are refused by the agent with a clear reason. Method: create with
/// the flags, set both, read back as JSON and as text.
#[test]
fn replication_settings_through_create_and_set() {
    let agent = start_agent!();
    let v = agent.cli_json(&[
        "volume",
        "create",
        "r",
        "--size",
        "4M",
        "--min-in-sync",
        "1",
        "--resync-rate",
        "0",
    ]);
    assert_eq!(v["min_in_sync"], 1, "{v}");
    assert_eq!(v["resync_rate_bytes_per_s"], 0, "{v}");
    let err = fails_with(
        &agent,
        &[
            "volume",
            "create",
            "k",
            "--size",
            "4M",
            "--min-in-sync",
            "2",
        ],
        1,
    );
    assert_error_mentions(&err, &["min-in-sync"]);

    let v = agent.cli_json(&["volume", "set", "r", "--resync-rate", "100M/s"]);
    assert_eq!(
        v["resync_rate_bytes_per_s"].as_u64(),
        Some(100 << 20),
        "{v}"
    );
    let v = agent.cli_json(&["volume", "set", "r", "--min-in-sync", "1"]);
    assert_eq!(v["min_in_sync"], 1, "{v}");
    let err = fails_with(&agent, &["volume", "set", "r", "--min-in-sync", "2"], 1);
    assert_error_mentions(&err, &["min-in-sync", "1"]);

    let human = agent.cli_ok(&["volume", "show", "r"]);
    assert!(human.contains("100 MiB/s"), "resync rate shown: {human}");
    let replica_line = human
        .lines()
        .find(|l| l.contains("node-a"))
        .unwrap_or_else(|| panic!("a line for the replica on node-a:\n{human}"));
    assert!(
        replica_line.split_whitespace().next() == Some("1"),
        "the replica line starts with its id: {replica_line}"
    );
}

/// Goal: asking for more replicas is no longer refused by the CLI: the agent decides, and
/// on one node it explains it cannot place them.
#[test]
fn replicas_over_one_are_decided_by_the_agent() {
    let agent = start_agent!();
    let err = fails_with(
        &agent,
        &["volume", "create", "two", "--size", "4M", "--replicas", "2"],
        1,
    );
    assert_error_mentions(&err, &["2"]);
    assert!(
        !err.contains("not available in this build"),
        "no blanket refusal any more: {err}"
    );
}
