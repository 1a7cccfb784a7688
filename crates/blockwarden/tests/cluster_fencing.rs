//! Goal: G2 under a partition. A holder cut off from etcd stops acknowledging writes before
//! its lease can be handed over (self-fencing); the new holder attaches with a higher
//! generation; after the partition heals, the old holder's generation is refused, and no
//! write from it lands after the new holder's first write.
//! Method: replica and attachment on A (n1) with a timestamped writer on A's export; nftables
//! in A's namespace drops all traffic to and from the three etcd members (B and the test can
//! still reach A); B (n2) retries `volume attach --node n2` until it wins, then writes over
//! the peer protocol to A's replica; heal; check the timeline and the blocks.

use std::time::{Duration, Instant};

use testkit::cluster::inspect::{attachment, mentions};
use testkit::cluster::lease_ttl;
use testkit::cluster::writer::{decode, encode, TimedWriter, BLOCK};
use testkit::nbd::NbdClient;
use testkit::{start_cluster, wait_until};

const BLOCKS: u64 = 256;
const B_BLOCKS: u64 = 64;
const TAG_A: [u8; 8] = *b"GEN-A---";
const TAG_B: [u8; 8] = *b"GEN-B---";

#[test]
fn holder_cut_from_etcd_fences_itself_before_takeover_and_its_old_generation_is_refused() {
    let Some(c) = start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])]) else {
        return;
    };
    let ttl = lease_ttl(env!("CARGO_BIN_EXE_blockwarden").as_ref());
    let (a, b) = (c.agent("n1"), c.agent("n2"));
    a.cli_ok(&[
        "volume", "create", "fenced", "--size", "16M", "--node", "n1",
    ]);
    a.cli_ok(&["volume", "attach", "fenced"]);
    let g_a = attachment(b, "fenced").expect("attached on n1").generation;

    let writer = TimedWriter::start(&a.nbd_uri("fenced"), TAG_A, BLOCKS, 0);
    assert!(
        writer.wait_progress(50, Duration::from_secs(20)),
        "A's writer makes progress"
    );

    // Fault: A loses etcd (all three members), nothing else.
    let t0 = Instant::now();
    c.lab.partition("n1", &c.etcd.addrs());

    // B retries until it wins the lease.
    let give_up = ttl * 3 + Duration::from_secs(15);
    let t_attach_b = loop {
        let out = b.cli(&["volume", "attach", "fenced", "--node", "n2"]);
        if out.status.success() {
            break Instant::now();
        }
        let last_err = String::from_utf8_lossy(&out.stderr);
        assert!(
            t0.elapsed() < give_up,
            "B could not attach {give_up:?} after the partition: {last_err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        wait_until(Duration::from_secs(70), || writer.finished()),
        "A's writer neither failed nor stopped"
    );
    let mut report_a = writer.stop();
    let att_b = attachment(b, "fenced").expect("attached on n2");
    assert_eq!(att_b.node, "n2");
    assert!(
        att_b.generation > g_a,
        "generation {g_a} -> {}",
        att_b.generation
    );

    // B writes its blocks (remote attach: A's replica over the peer port).
    let mut on_b = NbdClient::connect_uri(&b.nbd_uri("fenced")).expect("B serves the volume");
    let t_b_first_sent = Instant::now();
    let mut t_b_first_ack = None;
    for blk in 0..B_BLOCKS {
        on_b.write(
            blk * BLOCK as u64,
            &encode(&TAG_B, 1_000_000 + blk, blk),
            true,
        )
        .unwrap_or_else(|e| panic!("B's write of block {blk}: {e}"));
        t_b_first_ack.get_or_insert_with(Instant::now);
    }
    on_b.flush().unwrap();

    // Heal A; its old connection and a new open must not write.
    c.lab.heal("n1");
    let t_heal = Instant::now();
    let old_write = report_a
        .client
        .take()
        .map(|mut cl| cl.write(0, &encode(&TAG_A, u64::MAX, 0), true));
    assert!(
        wait_until(ttl * 2 + Duration::from_secs(10), || a
            .cli(&["node", "list"])
            .status
            .success()),
        "A answers the API again after the heal"
    );
    let new_open = NbdClient::connect_uri(&a.nbd_uri("fenced"))
        .and_then(|mut cl| cl.write(BLOCK as u64, &encode(&TAG_A, u64::MAX - 1, 1), true));

    let ms = |t: Instant| t.saturating_duration_since(t0).as_millis();
    let (err_sent, err_at, err_text) = report_a.first_error.clone().unwrap_or_else(|| {
        panic!(
            "A's writer never got an error ({} acks)",
            report_a.acks.len()
        )
    });
    let last_ack_a = report_a
        .last_ack()
        .expect("A acknowledged writes before the partition");
    eprintln!(
        "TIMELINE (ms after partition): A last ack {} | A first error sent {} answered {} ({err_text}) | \
         B attached {} | B first write sent {} acked {} | heal {} | lease TTL {ttl:?}",
        ms(last_ack_a),
        ms(err_sent),
        ms(err_at),
        ms(t_attach_b),
        ms(t_b_first_sent),
        ms(t_b_first_ack.unwrap()),
        ms(t_heal)
    );
    assert!(
        last_ack_a < t_attach_b,
        "A acknowledged a write after B got the lease"
    );
    assert!(
        err_at < t_attach_b,
        "A's client must see errors (self-fencing) before B can attach"
    );
    assert!(last_ack_a < t_b_first_sent);
    match old_write {
        Some(Ok(())) => {
            panic!("A's old connection (generation {g_a}) still accepts writes after the heal")
        }
        Some(Err(e)) => eprintln!("old connection after heal: {e}"),
        None => {}
    }
    match new_open {
        Ok(()) => panic!("a new NBD open on A wrote while B holds the volume"),
        Err(e) => {
            eprintln!("new open on A after heal: {e}");
            if let testkit::nbd::ClientError::OptionRejected { message, .. } = &e {
                assert!(
                    mentions(message, "n2"),
                    "refusal names the holder n2: {message}"
                );
            }
        }
    }

    // The data: B's blocks hold B's writes; the rest hold an A write that was sent before the
    // fence (or zeroes); nothing carries the writes attempted after the heal.
    let mut reader = NbdClient::connect_uri(&b.nbd_uri("fenced")).expect("B serves reads");
    let max_seq_a = report_a.acks.last().map(|x| x.seq).unwrap_or(0) + 1;
    for blk in 0..BLOCKS {
        let got = reader.read(blk * BLOCK as u64, BLOCK as u32).unwrap();
        let d = decode(&got);
        if blk < B_BLOCKS {
            assert_eq!(
                d,
                Some((TAG_B, 1_000_000 + blk, blk)),
                "block {blk} must hold B's write; an old-generation write landed after B's"
            );
        } else if let Some((tag, seq, at)) = d {
            assert!(
                tag == TAG_A && at == blk && seq <= max_seq_a,
                "block {blk}: unexpected {:?} seq {seq}",
                String::from_utf8_lossy(&tag)
            );
        } else {
            assert!(
                got.iter().all(|&x| x == 0),
                "block {blk} is torn or foreign"
            );
        }
    }
    reader.disconnect().unwrap();
}
