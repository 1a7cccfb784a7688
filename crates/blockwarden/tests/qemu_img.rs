//! qemu-img as a client: import a raw image (random data with holes) and a qcow2 image into
//! volumes with `qemu-img convert -n -O raw … nbd://…`, then `qemu-img compare` must find
//! them identical, and `qemu-img info` on the export must show the volume's size, also after a
//! resize (on a new connection).

use std::process::Command;
use std::time::Duration;

use testkit::cmd::run_ok;
use testkit::e2e::random_file;
use testkit::{require_tool, start_agent};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);

fn virtual_size(uri: &str) -> u64 {
    let out = run_ok(
        Command::new("qemu-img").args(["info", "-f", "raw", "--output=json", uri]),
        T,
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    v["virtual-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no virtual-size in {v}"))
}

/// Goal: image import with holes works bit-exactly. Method: qemu-img convert raw and qcow2 into volumes, compare equal (and unequal to a different image).
#[test]
fn convert_raw_and_qcow2_into_volumes_then_compare_equal() {
    if !require_tool("qemu-img") {
        return;
    }
    let agent = start_agent!();
    let dir = agent.scratch_dir();

    // Raw: 48 MiB of random data, every third MiB a hole.
    let raw = dir.join("src.raw");
    random_file(&raw, 48 * MIB, 11, true);
    agent.create_volume("from-raw", "48M");
    let uri = agent.nbd_uri("from-raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&raw)
            .arg(&uri),
        T,
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&raw)
            .arg(&uri),
        T,
    );
    assert!(out.contains("identical"), "{out}");

    // qcow2: made from different random data, imported into a volume of the same size.
    let raw2 = dir.join("src2.raw");
    random_file(&raw2, 40 * MIB, 12, true);
    let qcow = dir.join("src.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw2)
            .arg(&qcow),
        T,
    );
    agent.create_volume("from-qcow2", "40M");
    let uri2 = agent.nbd_uri("from-qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
            .arg(&qcow)
            .arg(&uri2),
        T,
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&qcow)
            .arg(&uri2),
        T,
    );
    assert!(out.contains("identical"), "{out}");

    // And the two volumes differ from each other's source (compare is not vacuous).
    let diff = testkit::run_with_timeout(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&raw2)
            .arg(&uri),
        T,
    )
    .unwrap();
    assert_eq!(
        diff.status.code(),
        Some(1),
        "different images must compare unequal"
    );
}

/// Goal: qemu-img sees the right size. Method: info before and after `volume resize`.
#[test]
fn info_shows_the_volume_size_and_the_new_size_after_resize() {
    if !require_tool("qemu-img") {
        return;
    }
    let agent = start_agent!();
    agent.create_volume("sized", "100M");
    assert_eq!(virtual_size(&agent.nbd_uri("sized")), 100 * MIB);
    agent.cli_ok(&["volume", "resize", "sized", "--size", "300M"]);
    assert_eq!(virtual_size(&agent.nbd_uri("sized")), 300 * MIB);
}
