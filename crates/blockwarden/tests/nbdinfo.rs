//! nbdinfo as a client: `--list` shows every volume with its size, and `--map` reports a hole
//! exactly where data was discarded (TRIM punches holes; BLOCK_STATUS reads them back).

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testkit::cmd::run_ok;
use testkit::{require_tool, start_agent};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

/// `nbdinfo --map --json`: (offset, length, type) extents; type bit 0 = hole, bit 1 = zero.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", uri]), T);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_array()
        .unwrap_or_else(|| panic!("map is an array: {v}"))
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The type of every byte range [lo, hi) must satisfy `pred`.
fn range_is(m: &[(u64, u64, u64)], lo: u64, hi: u64, pred: impl Fn(u64) -> bool) -> bool {
    m.iter()
        .filter(|(o, l, _)| o + l > lo && *o < hi)
        .all(|(_, _, t)| pred(*t))
}

/// Goal: nbdinfo --list shows every volume with its size. Method: three volumes, JSON and human output.
#[test]
fn list_shows_every_volume_with_its_size() {
    if !require_tool("nbdinfo") {
        return;
    }
    let agent = start_agent!();
    let vols = [
        ("alpha", 16 * MIB, "16M"),
        ("beta.b", 32 * MIB, "32M"),
        ("gamma-1", 1 << 30, "1G"),
    ];
    for (n, _, s) in vols {
        agent.create_volume(n, s);
    }
    let uri = format!("nbd://127.0.0.1:{}", agent.nbd_port());
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &uri]), T);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let exports = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports: {v}"));
    assert_eq!(exports.len(), vols.len(), "{v}");
    for (n, size, _) in vols {
        let e = exports
            .iter()
            .find(|e| e["export-name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {v}"));
        assert_eq!(e["export-size"].as_u64(), Some(size), "{e}");
    }
    // The human form too.
    let human = run_ok(Command::new("nbdinfo").args(["--list", &uri]), T);
    for (n, size, _) in vols {
        assert!(
            human.contains(n) && human.contains(&size.to_string()),
            "{human}"
        );
    }
}

/// Goal: BLOCK_STATUS reports holes from the file. Method: map a new volume (hole), fill it (data), discard 2 MiB (hole there only).
#[test]
fn map_shows_a_hole_after_trim() {
    if !require_tool("nbdinfo") || !require_tool("qemu-io") {
        return;
    }
    let agent = start_agent!();
    agent.create_volume("sparse", "8M");
    let uri = agent.nbd_uri("sparse");

    let m = map(&uri);
    assert!(
        range_is(&m, 0, 8 * MIB, |t| t & 1 == 1),
        "a new volume is one hole: {m:?}"
    );

    run_ok(
        Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 8M",
            "-c",
            "flush",
            &uri,
        ]),
        T,
    );
    let m = map(&uri);
    assert!(
        range_is(&m, 0, 8 * MIB, |t| t == 0),
        "fully written = data: {m:?}"
    );

    run_ok(
        Command::new("qemu-io").args(["-f", "raw", "-c", "discard 2M 2M", &uri]),
        T,
    );
    let m = map(&uri);
    assert!(
        range_is(&m, 2 * MIB, 4 * MIB, |t| t & 1 == 1),
        "discarded range is a hole: {m:?}"
    );
    assert!(
        range_is(&m, 0, 2 * MIB, |t| t == 0),
        "data before the hole: {m:?}"
    );
    assert!(
        range_is(&m, 4 * MIB, 8 * MIB, |t| t == 0),
        "data after the hole: {m:?}"
    );
    let covered: u64 = m.iter().map(|e| e.1).sum();
    assert_eq!(covered, 8 * MIB, "the map covers the export: {m:?}");
}
