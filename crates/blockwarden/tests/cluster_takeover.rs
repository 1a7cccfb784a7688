//! Goal: a dead holder's volume can be taken over within 10 s (SPEC §6; sanlock needs 140 s).
//! Method: the replica lives on n3; the volume is attached on n1 and written; `kill -9` n1's
//! agent; n2 retries `volume attach --node n2` until it succeeds. The test prints the
//! takeover time and checks the bound, the higher generation, and that n2 serves the data.

use std::time::{Duration, Instant};

use testkit::cluster::inspect::{attachment, mentions, qemu_io_ok};
use testkit::cluster::lease_ttl;
use testkit::{require_tool, start_cluster};

/// SPEC §6: lease takeover after a host dies.
const TAKEOVER_BOUND: Duration = Duration::from_secs(10);
/// For process scheduling and the CLI round trip on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

#[test]
fn holder_killed_with_sigkill_is_taken_over_within_ten_seconds() {
    if !require_tool("qemu-io") {
        return;
    }
    let Some(mut c) = start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])]) else {
        return;
    };
    let ttl = lease_ttl(env!("CARGO_BIN_EXE_blockwarden").as_ref());
    eprintln!("agent lease TTL {ttl:?}; takeover bound {TAKEOVER_BOUND:?} + {SLACK:?} slack");

    let (a, b) = (c.agent("n1"), c.agent("n2"));
    a.cli_ok(&["volume", "create", "vm", "--size", "32M", "--node", "n3"]);
    let uri = a.cli_ok(&["volume", "attach", "vm"]);
    assert_eq!(uri.trim(), a.nbd_uri("vm"));
    let g1 = attachment(b, "vm").expect("attached").generation;
    qemu_io_ok(&a.nbd_uri("vm"), &["write -P 0x5a 0 1M", "flush"]);

    c.agent_mut("n1").kill9();
    let killed = Instant::now();
    let b = c.agent("n2");
    let mut first_refusal = None;
    let mut tries = 0;
    let took = loop {
        tries += 1;
        let out = b.cli(&["volume", "attach", "vm", "--node", "n2"]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), b.nbd_uri("vm"));
            break killed.elapsed();
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        first_refusal.get_or_insert(err);
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no takeover 30 s after kill -9 of the holder; last error: {first_refusal:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("TAKEOVER after kill -9 of the holder: {took:?} ({tries} attach attempts)");
    if let Some(err) = &first_refusal {
        assert!(
            mentions(err, "n1"),
            "while n1's lease lives, the refusal names it: {err}"
        );
    }
    assert!(
        took <= TAKEOVER_BOUND + SLACK,
        "takeover took {took:?}, bound {TAKEOVER_BOUND:?} + {SLACK:?}"
    );

    let att = attachment(b, "vm").expect("attached on n2");
    assert_eq!(att.node, "n2");
    assert!(att.generation > g1, "generation {g1} -> {}", att.generation);
    qemu_io_ok(
        &b.nbd_uri("vm"),
        &[
            "read -P 0x5a 0 1M",
            "write -P 0x6b 1M 1M",
            "flush",
            "read -P 0x6b 1M 1M",
        ],
    );
}
