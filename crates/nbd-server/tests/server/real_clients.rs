//! Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io, qemu-img) against the in-process
//! server. Skipped, loudly, when a tool is missing; CI installs them.

use std::process::Command;

use crate::devices::MemDevice;
use crate::harness::*;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("!!!!! SKIPPING: `{tool}` is not installed; this test did NOT run !!!!!");
    }
    found
}

/// Runs a command off the async runtime; returns stdout, panics with stderr on failure.
async fn run(cmd: &'static str, args: Vec<String>) -> String {
    let a = args.clone();
    let out = tokio::task::spawn_blocking(move || Command::new(cmd).args(&a).output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn server() -> (TestServer, String) {
    let exports = TestExports::default();
    exports.add("vol", MemDevice::new(64 << 20), false);
    let srv = TestServer::start(exports).await;
    let uri = format!("nbd://{}/vol", srv.addr);
    (srv, uri)
}

// Goal: nbdinfo negotiates (GO, structured replies, meta contexts, block size) and sees
// our size, flags and contexts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_describes_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let (_srv, uri) = server().await;
    let out = run("nbdinfo", vec!["--json".into(), uri.clone()]).await;
    assert!(out.contains("\"export-size\": 67108864"), "{out}");
    assert!(out.contains("\"can_multi_conn\": true"), "{out}");
    assert!(out.contains("\"block_size_maximum\": 33554432"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    let list = run(
        "nbdinfo",
        vec!["--list".into(), format!("nbd://{}", _srv.addr)],
    )
    .await;
    assert!(list.contains("vol"), "{list}");
}

// Goal: qemu-io writes, reads back and verifies a pattern; qemu-img map sees the data
// and the holes through block status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_and_qemu_img_map() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let (_srv, uri) = server().await;
    let cmds = [
        "write -P 0xab 1M 64k",
        "write -z 3M 64k",
        "flush",
        "read -P 0xab 1M 64k",
        "read -P 0 0 4k",
    ];
    let mut args = vec!["-f".to_string(), "raw".into()];
    for c in cmds {
        args.extend(["-c".to_string(), c.to_string()]);
    }
    args.push(uri.clone());
    let out = run("qemu-io", args).await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let map = run(
        "qemu-img",
        vec![
            "map".into(),
            "--output=json".into(),
            "-f".into(),
            "raw".into(),
            uri,
        ],
    )
    .await;
    assert!(
        map.contains("\"start\": 1048576, \"length\": 65536") && map.contains("\"data\": true"),
        "{map}"
    );
}

// Goal: nbdcopy (multi-conn, deep queues) copies 64 MiB in and out intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip() {
    if !have("nbdcopy") {
        return;
    }
    let (_srv, uri) = server().await;
    let dir = std::env::temp_dir().join(format!("nbdcopy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run("nbdcopy", vec![src.display().to_string(), uri.clone()]).await;
    run("nbdcopy", vec![uri, dst.display().to_string()]).await;
    assert!(std::fs::read(&dst).unwrap() == data, "copy differs");
    let _ = std::fs::remove_dir_all(&dir);
}
