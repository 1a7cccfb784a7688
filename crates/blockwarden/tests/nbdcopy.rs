//! nbdcopy as a client: 1 GiB of random data copied into a volume and back out, checksums
//! equal. This is the bulk-throughput path (multi-conn, large requests) end to end.

use std::process::Command;
use std::time::{Duration, Instant};

use testkit::cmd::run_ok;
use testkit::e2e::{sha256, urandom_file};
use testkit::{require_tool, start_agent};

const GIB: u64 = 1 << 30;

#[test]
fn copy_one_gib_in_and_out_checksums_equal() {
    if !require_tool("nbdcopy") || !require_tool("sha256sum") {
        return;
    }
    let agent = start_agent!();
    let dir = agent.scratch_dir();
    let src = dir.join("in.bin");
    let back = dir.join("out.bin");
    urandom_file(&src, GIB);
    agent.create_volume("big", "1G");
    let uri = agent.nbd_uri("big");

    let t = Instant::now();
    run_ok(
        Command::new("nbdcopy").arg(&src).arg(&uri),
        Duration::from_secs(600),
    );
    eprintln!("nbdcopy in: 1 GiB in {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    run_ok(
        Command::new("nbdcopy").arg(&uri).arg(&back),
        Duration::from_secs(600),
    );
    eprintln!("nbdcopy out: 1 GiB in {:.1} s", t.elapsed().as_secs_f64());

    assert_eq!(std::fs::metadata(&back).unwrap().len(), GIB);
    assert_eq!(
        sha256(&src),
        sha256(&back),
        "data read back differs from data written"
    );
}
