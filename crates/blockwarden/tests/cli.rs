//! The CLI end to end: every subcommand against a real agent, human and JSON output, and the
//! error contract (one `error:` line on stderr, non-zero exit). Method: spawn the agent on a
//! temp data dir and free ports, drive `blockwarden --api URL …`, parse `-o json` output.

use std::time::Duration;

use serde_json::Value;
use testkit::cmd::{describe, run_with_timeout};
use testkit::nbd::{consts::REP_ERR_UNKNOWN, ClientError, NbdClient};
use testkit::{start_agent, wait_until};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Asserts the error contract: exactly one line on stderr, starting with `error:`.
#[track_caller]
fn assert_one_error_line(stderr: &str, must_mention: &str) {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(
        lines[0].starts_with("error:"),
        "error line must start with `error:`: {stderr}"
    );
    assert!(
        lines[0]
            .to_lowercase()
            .contains(&must_mention.to_lowercase()),
        "error line should mention {must_mention:?}: {stderr}"
    );
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("volume list -o json is an array")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_owned())
        .collect()
}

/// Goal: the volume verbs work and print names and human sizes. Method: create three, list/show in both formats, grow, refuse a shrink, delete one.
#[test]
fn volume_create_list_show_resize_delete_in_table_and_json() {
    let agent = start_agent!();
    agent.cli_ok(&["volume", "create", "db1", "--size", "1G"]);
    agent.cli_ok(&["volume", "create", "web.2", "--size", "512M"]);
    agent.cli_ok(&["volume", "create", "raw-bytes", "--size", "1048576"]);

    let table = agent.cli_ok(&["volume", "list"]);
    for (name, unit) in [("db1", "GiB"), ("web.2", "MiB"), ("raw-bytes", "MiB")] {
        let line = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{table}"));
        assert!(line.contains(unit), "size of {name} in human units: {line}");
    }
    let explicit = agent.cli_ok(&["volume", "list", "-o", "table"]);
    assert_eq!(explicit, table, "-o table is the default");

    let list = agent.cli_json(&["volume", "list"]);
    let mut got = names(&list);
    got.sort();
    assert_eq!(got, ["db1", "raw-bytes", "web.2"]);

    let show = agent.cli_json(&["volume", "show", "db1"]);
    assert_eq!(show["name"], "db1");
    assert_eq!(show["size_bytes"].as_u64(), Some(GIB));
    assert_eq!(show["state"], "ready", "{show}");
    let human = agent.cli_ok(&["volume", "show", "db1"]);
    assert!(human.contains("db1") && human.contains("GiB"), "{human}");

    agent.cli_ok(&["volume", "resize", "db1", "--size", "2G"]);
    assert_eq!(
        agent.cli_json(&["volume", "show", "db1"])["size_bytes"].as_u64(),
        Some(2 * GIB)
    );
    let err = agent.cli_err(&["volume", "resize", "db1", "--size", "1G"]);
    assert_one_error_line(&err, "error:");
    assert_eq!(
        agent.cli_json(&["volume", "show", "db1"])["size_bytes"].as_u64(),
        Some(2 * GIB),
        "a refused shrink changes nothing"
    );

    agent.cli_ok(&["volume", "delete", "web.2"]);
    let mut got = names(&agent.cli_json(&["volume", "list"]));
    got.sort();
    assert_eq!(got, ["db1", "raw-bytes"]);
    assert_eq!(
        agent.cli_json(&["volume", "show", "raw-bytes"])["size_bytes"].as_u64(),
        Some(MIB)
    );
}

/// Goal: status, node list and events answer in both formats. Method: one create, then look for the node and the creation event.
#[test]
fn status_node_list_and_events_in_table_and_json() {
    let agent = start_agent!();
    agent.create_volume("ev1", "16M");

    let status = agent.cli_ok(&["status"]);
    assert!(
        status.contains("node-a"),
        "status names the node:\n{status}"
    );
    let status = agent.cli_json(&["status"]);
    assert!(status.is_object(), "{status}");

    let nodes = agent.cli_ok(&["node", "list"]);
    assert!(nodes.contains("node-a"), "{nodes}");
    let nodes = agent.cli_json(&["node", "list"]);
    let nodes = nodes.as_array().expect("node list -o json is an array");
    assert_eq!(nodes.len(), 1, "embedded mode has one node: {nodes:?}");
    assert_eq!(nodes[0]["name"], "node-a");

    // `events -o json` prints one JSON object per line (so `--follow` can stream); a single
    // array is accepted too.
    let out = agent.cli_ok(&["events", "-o", "json"]);
    let events: Vec<Value> = match serde_json::from_str::<Value>(&out) {
        Ok(Value::Array(a)) => a,
        _ => out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect(),
    };
    assert!(
        events.iter().any(|e| e.to_string().contains("ev1")
            && e["kind"].as_str().is_some_and(|k| k.contains("creat"))),
        "a creation event names the volume: {events:?}"
    );
    let human = agent.cli_ok(&["events"]);
    assert!(human.contains("ev1"), "{human}");
}

/// Goal: `volume attach` prints a working NBD URI and `detach` undoes it. Method: attach, use the URI with our client, check `attached` in JSON.
#[test]
fn attach_prints_the_nbd_uri_and_detach_releases_it() {
    let agent = start_agent!();
    agent.create_volume("att", "8M");
    let uri = agent.cli_ok(&["volume", "attach", "att"]);
    let uri = uri.trim();
    assert_eq!(
        uri,
        agent.nbd_uri("att"),
        "attach prints exactly the NBD URI"
    );
    let mut c = NbdClient::connect_uri(uri).expect("the printed URI works");
    c.write(0, b"attached", true).unwrap();
    assert_eq!(c.read(0, 8).unwrap(), b"attached");
    c.disconnect().unwrap();

    let show = agent.cli_json(&["volume", "show", "att"]);
    assert!(
        !show["attached"].is_null(),
        "explicit attach survives the last close: {show}"
    );
    agent.cli_ok(&["volume", "detach", "att"]);
    let show = agent.cli_json(&["volume", "show", "att"]);
    assert!(show["attached"].is_null(), "detached: {show}");
}

/// Goal: every failure is one `error:` line and a non-zero exit. Method: unknown volumes, bad sizes, bad names, a duplicate.
#[test]
fn errors_are_one_line_on_stderr_with_nonzero_exit() {
    let agent = start_agent!();
    agent.create_volume("dup", "1M");
    for args in [
        &["volume", "show", "ghost"][..],
        &["volume", "delete", "ghost"],
        &["volume", "resize", "ghost", "--size", "1G"],
        &["volume", "attach", "ghost"],
    ] {
        assert_one_error_line(&agent.cli_err(args), "ghost");
    }
    for size in ["12Q", "abc", "1.5", ""] {
        let err = agent.cli_err(&["volume", "create", "sz", "--size", size]);
        assert_one_error_line(&err, "size");
    }
    for name in ["Bad_Name", ".lead", "a b", &"x".repeat(64)] {
        let err = agent.cli_err(&["volume", "create", name, "--size", "1M"]);
        assert_one_error_line(&err, "name");
    }
    assert_one_error_line(
        &agent.cli_err(&["volume", "create", "dup", "--size", "1M"]),
        "dup",
    );
    assert_eq!(
        names(&agent.cli_json(&["volume", "list"])),
        ["dup"],
        "nothing was created"
    );
}

/// Goal: a CLI pointed at nothing says so in one line; BLOCKWARDEN_API sets the default URL. Method: a free port, then the env var.
#[test]
fn cli_without_a_running_agent_fails_clearly() {
    let agent = start_agent!();
    let port = testkit::agent::free_ports(1)[0];
    let url = format!("http://127.0.0.1:{port}");
    let mut dead = std::process::Command::new(agent.bin());
    dead.args(["--api", &url, "volume", "list"]);
    let out = run_with_timeout(&mut dead, Duration::from_secs(30)).unwrap();
    assert!(!out.status.success(), "{}", describe(&dead, &out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_one_error_line(&err, "error:");
    assert!(
        err.contains(&port.to_string()) || err.to_lowercase().contains("connect"),
        "the error says what it could not reach: {err}"
    );

    // BLOCKWARDEN_API is the default for --api.
    let mut env_cmd = std::process::Command::new(agent.bin());
    env_cmd
        .args(["volume", "list", "-o", "json"])
        .env("BLOCKWARDEN_API", agent.api_url());
    let out = run_with_timeout(&mut env_cmd, Duration::from_secs(30)).unwrap();
    assert!(out.status.success(), "{}", describe(&env_cmd, &out));
}

/// Goal: two agents never share a data dir. Method: start a second one on the same dir with other ports; it must exit non-zero by itself.
#[test]
fn second_agent_on_the_same_data_dir_is_refused() {
    let mut agent = start_agent!();
    let ports = testkit::agent::free_ports(2);
    let mut second = agent.agent_command(ports[0], ports[1]);
    let out = run_with_timeout(&mut second, Duration::from_secs(30))
        .expect("the second agent must exit by itself, not run or hang");
    assert!(!out.status.success(), "{}", describe(&second, &out));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("in use") || err.contains("lock"),
        "the error says the data dir is in use: {err}"
    );
    assert!(
        err.contains(&agent.data_dir().display().to_string().to_lowercase())
            || err.contains("data dir"),
        "the error names the data dir: {err}"
    );
    assert!(agent.is_running(), "the first agent is unaffected");
    agent.cli_ok(&["status"]);
}

/// Goal: an open volume is not deleted by accident. Method: hold an NBD connection, delete (refused), delete --force (client cut off, export gone).
#[test]
fn deleting_an_in_use_volume_needs_force_which_disconnects_the_client() {
    let agent = start_agent!();
    agent.create_volume("busy", "8M");
    let mut client = NbdClient::connect_uri(&agent.nbd_uri("busy")).unwrap();
    client.write(0, &[1u8; 4096], false).unwrap();

    let err = agent.cli_err(&["volume", "delete", "busy"]);
    assert_one_error_line(&err, "use");
    assert_eq!(names(&agent.cli_json(&["volume", "list"])), ["busy"]);
    assert_eq!(
        client.read(0, 4096).unwrap(),
        vec![1u8; 4096],
        "the client still works"
    );

    agent.cli_ok(&["volume", "delete", "busy", "--force"]);
    assert!(names(&agent.cli_json(&["volume", "list"])).is_empty());
    assert!(
        wait_until(Duration::from_secs(10), || client.read(0, 512).is_err()),
        "the forced delete disconnects the client"
    );
    match NbdClient::connect_uri(&agent.nbd_uri("busy")) {
        Err(ClientError::OptionRejected { reply, .. }) => assert_eq!(reply, REP_ERR_UNKNOWN),
        other => panic!("expected NBD_REP_ERR_UNKNOWN for a deleted volume, got {other:?}"),
    }
}
