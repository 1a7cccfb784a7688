//! qemu-io as a client: patterned writes at odd offsets and lengths (sync and aio), write
//! zeroes, discard, then `read -P` verification — first on the same connection, then on a new
//! one (the data is in the volume, not in a client cache).

use std::process::Command;
use std::time::Duration;

use testkit::cmd::{describe, run_with_timeout};
use testkit::{require_tool, start_agent};

/// Runs one qemu-io process with the given `-c` commands; fails on a non-zero exit or any
/// failure message (qemu-io prints pattern mismatches and errors but not always in its exit
/// status).
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_with_timeout(&mut c, Duration::from_secs(120)).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lower = text.to_lowercase();
    assert!(
        out.status.success()
            && !lower.contains("fail")
            && !lower.contains("error")
            && !lower.contains("mismatch"),
        "{}",
        describe(&c, &out)
    );
    text
}

#[test]
fn patterns_at_odd_offsets_zeroes_and_discard_read_back_verified() {
    if !require_tool("qemu-io") {
        return;
    }
    let agent = start_agent!();
    agent.create_volume("io", "32M");
    let uri = agent.nbd_uri("io");

    let writes = [
        "write -P 0xab 1000 5000",        // unaligned start and length
        "write -P 0x11 12287 2",          // straddles a 4 KiB boundary
        "aio_write -P 0xcd 123457 65537", // odd everything, asynchronous
        "aio_write -P 0xce 1048575 3",
        "aio_flush",
        "write -P 0x5a 2M 2M",   // to be discarded below
        "write -P 0x77 8M 1M",   // to be zeroed below (partly)
        "write -z 8388708 4000", // write zeroes at an odd offset
        "discard 2M 2M",
        "write -P 0x3c 33554431 1", // the very last byte
        "flush",
    ];
    let reads = [
        "read -P 0xab 1000 5000",
        "read -P 0 0 1000",
        "read -P 0 6000 6287",
        "read -P 0x11 12287 2",
        "read -P 0xcd 123457 65537",
        "read -P 0xce 1048575 3",
        "read -P 0 2M 2M",
        "read -P 0x77 8M 100",
        "read -P 0 8388708 4000",
        "read -P 0x77 8392708 1044476",
        "read -P 0x3c 33554431 1",
    ];
    let mut all: Vec<&str> = writes.to_vec();
    all.extend(reads);
    let out = qemu_io(&uri, &all);
    assert!(out.contains("read 5000/5000 bytes"), "{out}");

    // A new connection (new process) sees the same data.
    let out = qemu_io(&uri, &reads);
    assert_eq!(out.matches("bytes at offset").count(), reads.len(), "{out}");

    // Reading past the end is refused by the server, and the export still works after.
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", "-c", "read 33554431 2"]).arg(&uri);
    let past = run_with_timeout(&mut c, Duration::from_secs(60)).unwrap();
    let text =
        String::from_utf8_lossy(&past.stdout).to_string() + &String::from_utf8_lossy(&past.stderr);
    assert!(
        !text.contains("read 2/2 bytes"),
        "a read past the end must fail: {text}"
    );
    qemu_io(&uri, &["read -P 0x3c 33554431 1"]);
}
