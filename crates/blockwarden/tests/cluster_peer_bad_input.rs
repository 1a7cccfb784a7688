//! Goal: G6 on the peer port. Garbage, a truncated handshake, an oversize frame and a flood of
//! junk connections are refused (connection closed), the agent stays up, and the remote-attached
//! client using that same peer port keeps working without a single error.
//! Method: replica on n1, attached on n3; a verifying writer on n3's export runs throughout
//! (every write crosses n1's peer port); raw TCP to `<n1>:7801`.
//!
//! The bytes are built by hand from the wire layout in `crates/peer-proto` (hello: magic
//! "BWPEERC\n", min/max version u16, body length u32, then generation u64, features u64,
//! node id and volume id each u16-length-prefixed; frames: magic "BWPF", type u16, flags u16,
//! body length u32, id u64, offset u64, length u64), not with its encoder, so a codec bug
//! cannot hide itself here.

use std::time::{Duration, Instant};

use testkit::cluster::inspect::attachment;
use testkit::cluster::writer::TimedWriter;
use testkit::raw::RawConn;
use testkit::rng::SplitMix64;
use testkit::start_cluster;

/// How long the agent may take to drop a connection it cannot parse.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

const HELLO_MAGIC: &[u8; 8] = b"BWPEERC\n";
const SERVER_MAGIC: &[u8; 8] = b"BWPEERS\n";
const ANSWER_REFUSE: u16 = 2;
const FRAME_MAGIC: u32 = 0x4257_5046;
const MSG_WRITE: u16 = 0x0002;
/// A node id nobody has (ids are 32 hex digits).
const STRANGER: &str = "ffffffffffffffffffffffffffffffff";

/// A v1 hello, as `crates/peer-proto/src/handshake.rs` lays it out.
fn hello(generation: u64, node: &str, volume: &str) -> Vec<u8> {
    let body_len = 16 + 2 + node.len() + 2 + volume.len();
    let mut b = HELLO_MAGIC.to_vec();
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&(body_len as u32).to_be_bytes());
    b.extend_from_slice(&generation.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&(node.len() as u16).to_be_bytes());
    b.extend_from_slice(node.as_bytes());
    b.extend_from_slice(&(volume.len() as u16).to_be_bytes());
    b.extend_from_slice(volume.as_bytes());
    b
}

/// Sends `bytes` and expects a refusal answer (kind 2) followed by the close.
#[track_caller]
fn expect_refused(peer: std::net::SocketAddr, bytes: &[u8], what: &str) {
    let mut conn = RawConn::connect(peer).expect("the peer port accepts TCP");
    conn.send(bytes)
        .unwrap_or_else(|e| panic!("{what}: send: {e}"));
    let got = conn.read_for(CLOSE_BOUND, 64 << 10);
    assert!(
        got.data.len() >= 16 && &got.data[..8] == SERVER_MAGIC,
        "{what}: expected a server answer, got {:?}",
        String::from_utf8_lossy(&got.data)
    );
    let kind = u16::from_be_bytes([got.data[8], got.data[9]]);
    assert_eq!(kind, ANSWER_REFUSE, "{what}: must be refused");
    assert!(
        got.closed || conn.wait_closed(CLOSE_BOUND),
        "{what}: closed after the refusal"
    );
    eprintln!(
        "{what}: refused: {:?}",
        String::from_utf8_lossy(&got.data[16..])
    );
}

#[test]
fn garbage_truncated_and_oversize_frames_on_the_peer_port_are_refused_without_harm() {
    let Some(c) = start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])]) else {
        return;
    };
    let (a, n3) = (c.agent("n1"), c.agent("n3"));
    a.cli_ok(&[
        "volume", "create", "victim", "--size", "16M", "--node", "n1",
    ]);
    n3.cli_ok(&["volume", "attach", "victim"]);
    let writer = TimedWriter::start(&n3.nbd_uri("victim"), *b"PEERBAD-", 512, 4);
    assert!(
        writer.wait_progress(50, Duration::from_secs(20)),
        "remote-attached writer runs"
    );
    let peer = a.peer_addr();
    let mut rng = SplitMix64::new(0xBAD);
    let show = a.cli_json(&["volume", "show", "victim"]);
    let volume_id = show["id"]
        .as_str()
        .unwrap_or_else(|| panic!("volume show has an id: {show}"))
        .to_owned();
    let generation = attachment(a, "victim").expect("attached on n3").generation;

    // Well-formed hellos the replica must refuse: wrong volume, older generation.
    expect_refused(
        peer,
        &hello(generation, STRANGER, "00000000000000000000000000000000"),
        "hello for a volume n1 does not hold",
    );
    expect_refused(
        peer,
        &hello(generation - 1, STRANGER, &volume_id),
        "hello with an old generation",
    );
    assert!(
        writer.wait_progress(20, Duration::from_secs(10)),
        "remote I/O after refused hellos"
    );

    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    let mut garbage = vec![0u8; 64 << 10];
    rng.fill(&mut garbage);
    cases.push(("64 KiB of random bytes", garbage, false));
    cases.push(("3 bytes of a magic, then EOF", b"BWP".to_vec(), true));
    let full = hello(generation, STRANGER, &volume_id);
    cases.push((
        "hello cut mid-body, then EOF",
        full[..full.len() - 7].to_vec(),
        true,
    ));
    let mut huge = full[..16].to_vec();
    huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    cases.push(("hello announcing a 4 GiB body", huge, false));
    // Admitted at the current generation, then a WRITE frame announcing a 4 GiB body.
    let mut frame = full.clone();
    frame.extend_from_slice(&FRAME_MAGIC.to_be_bytes());
    frame.extend_from_slice(&MSG_WRITE.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes());
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    frame.extend_from_slice(&1u64.to_be_bytes());
    frame.extend_from_slice(&0u64.to_be_bytes());
    frame.extend_from_slice(&u64::from(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&[0xEE; 4096]);
    cases.push(("oversize WRITE frame after the handshake", frame, false));

    for (what, bytes, eof) in &cases {
        let t = Instant::now();
        let mut conn = RawConn::connect(peer).expect("the peer port accepts TCP");
        let _ = conn.send(bytes); // may fail once the agent has already closed
        if *eof {
            let _ = conn.shutdown_write();
        }
        assert!(
            conn.wait_closed(CLOSE_BOUND),
            "{what}: the peer port did not close the connection"
        );
        eprintln!("{what}: closed after {:?}", t.elapsed());
        assert!(a.is_running(), "{what}: agent n1 exited");
        assert!(
            writer.wait_progress(20, Duration::from_secs(10)),
            "{what}: remote I/O stalled"
        );
    }

    // A flood of junk connections, some idle, some garbage.
    let t = Instant::now();
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut conn = RawConn::connect(peer).expect("connect");
        if i % 2 == 0 {
            let mut junk = vec![0u8; 512];
            rng.fill(&mut junk);
            let _ = conn.send(&junk);
        } else {
            idle.push(conn);
        }
    }
    assert!(
        writer.wait_progress(50, Duration::from_secs(10)),
        "remote I/O stalled during the flood"
    );
    drop(idle);
    eprintln!("50 junk connections handled in {:?}", t.elapsed());

    assert!(a.is_running(), "agent n1 still runs");
    a.cli_ok(&["node", "list"]);
    let report = writer.stop();
    assert!(
        report.first_error.is_none(),
        "the remote client saw an error: {:?}",
        report.first_error
    );
    assert!(
        report.mismatches.is_empty(),
        "read-back mismatches: {:?}",
        report.mismatches
    );
    eprintln!(
        "remote client: {} verified writes during the bad input",
        report.acks.len()
    );
}
