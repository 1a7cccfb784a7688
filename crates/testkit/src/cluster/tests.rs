//! The harness itself, without any blockwarden agent: namespaces come up and go away, traffic
//! flows between them, nftables faults cut and restore it, a delay line slows exactly one pair
//! of namespaces (measured round trips and transfer times, the line's own counters) and random
//! loss drops about the given share of datagrams, and a 3-member etcd keeps quorum with one
//! member killed and loses it with two. Method: real namespaces, TCP listeners made inside them
//! with `Lab::in_netns`, real etcd processes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use super::agent::parse_duration;
use super::*;
use crate::wait::wait_until;

fn ns_exists(kernel_name: &str) -> bool {
    std::path::Path::new("/run/netns")
        .join(kernel_name)
        .exists()
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// An echo-once listener inside `ns` on port `port`; serves connections until the lab drops.
fn listen_in(lab: &Lab, ns: &str, port: u16) -> SocketAddr {
    let addr = SocketAddr::from((lab.addr(ns), port));
    let l: TcpListener = lab.in_netns(ns, || TcpListener::bind(addr).expect("bind in netns"));
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut b = [0u8; 4];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
        }
    });
    addr
}

fn echo(lab: &Lab, from: Option<&str>, to: SocketAddr) -> bool {
    let Ok(mut s) = lab.tcp_connect(from, to, Duration::from_millis(800)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(800)));
    let mut b = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
}

#[test]
fn namespaces_come_up_talk_over_the_bridge_and_are_removed_on_drop() {
    let Some(lab) = Lab::new(&["a", "b"]) else {
        return;
    };
    let (na, nb) = (
        lab.netns_name("a").to_owned(),
        lab.netns_name("b").to_owned(),
    );
    let bridge = lab.bridge().to_owned();
    assert!(link_exists(&bridge));
    assert!(ns_exists(&na) && ns_exists(&nb));
    assert_ne!(lab.addr("a"), lab.addr("b"));

    let to_b = listen_in(&lab, "b", 5555);
    assert!(echo(&lab, Some("a"), to_b), "a -> b over the bridge");
    assert!(
        echo(&lab, None, to_b),
        "root namespace -> b over the bridge"
    );
    // lo is up inside a namespace.
    let lo = lab.in_netns("a", || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::net::TcpStream::connect(addr).is_ok()
    });
    assert!(lo, "loopback works inside a namespace");

    // A process spawned inside a namespace sees only that namespace's interfaces.
    let mut c = Command::new("ip");
    c.args(["-4", "-o", "addr", "show"]);
    let out = lab.output_in("a", &mut c, Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&lab.addr("a").to_string()), "{text}");
    assert!(!text.contains(&lab.addr("b").to_string()), "{text}");

    // A long-lived process is killed with the lab.
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let pid = lab.spawn_in("b", sleep, "sleep");
    assert!(lab.try_wait(pid).is_none());

    drop(lab);
    assert!(!ns_exists(&na) && !ns_exists(&nb), "namespaces removed");
    // SAFETY: signal 0 only probes for existence.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    assert!(!alive, "the lab killed its process");
    let veth_prefix = format!("bw{}v", &bridge[lab::PREFIX.len()..]);
    assert!(
        wait_until(Duration::from_secs(5), || {
            !link_exists(&bridge)
                && std::fs::read_dir("/sys/class/net")
                    .unwrap()
                    .flatten()
                    .all(|e| !e.file_name().to_string_lossy().starts_with(&veth_prefix))
        }),
        "veths and bridge {bridge} removed"
    );
}

#[test]
fn two_labs_at_once_get_different_subnets() {
    let Some(l1) = Lab::new(&["x"]) else { return };
    let Some(l2) = Lab::new(&["x"]) else { return };
    assert_ne!(l1.addr("x"), l2.addr("x"));
    assert_ne!(l1.netns_name("x"), l2.netns_name("x"));
    let to = listen_in(&l2, "x", 6000);
    assert!(echo(&l2, None, to));
}

#[test]
fn partition_blocks_both_directions_and_heal_restores() {
    let Some(lab) = Lab::new(&["a", "b", "c"]) else {
        return;
    };
    let to_a = listen_in(&lab, "a", 5000);
    let to_b = listen_in(&lab, "b", 5000);
    let to_c = listen_in(&lab, "c", 5000);
    assert!(echo(&lab, Some("a"), to_b) && echo(&lab, Some("b"), to_a));

    lab.partition("a", &[lab.addr("b")]);
    assert!(!echo(&lab, Some("a"), to_b), "a -> b is cut");
    assert!(!echo(&lab, Some("b"), to_a), "b -> a is cut");
    assert!(echo(&lab, Some("a"), to_c), "a -> c still works");
    assert!(echo(&lab, None, to_a), "root -> a still works");

    lab.heal("a");
    assert!(
        echo(&lab, Some("a"), to_b) && echo(&lab, Some("b"), to_a),
        "healed"
    );

    lab.isolate("b");
    assert!(
        !echo(&lab, Some("a"), to_b) && !echo(&lab, None, to_b),
        "b isolated"
    );
    let lo_ok = lab.in_netns("b", || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        std::net::TcpStream::connect_timeout(&l.local_addr().unwrap(), Duration::from_secs(1))
            .is_ok()
    });
    assert!(lo_ok, "loopback still works when isolated");
    lab.heal("b");
    lab.heal("b"); // healing twice is harmless
    assert!(echo(&lab, None, to_b));
}

#[test]
fn etcd_three_members_survive_one_kill_and_lose_quorum_with_two() {
    if !lab_available() || !require_etcd() {
        return;
    }
    let Some(lab) = Lab::new(&ETCD_MEMBERS) else {
        return;
    };
    let mut etcd = EtcdCluster::start(&lab, &ETCD_MEMBERS);
    assert!(etcd.healthy());
    assert_eq!(etcd.endpoints().split(',').count(), 3);

    etcd.kill_member(0);
    assert!(
        wait_until(Duration::from_secs(10), || etcd.member_healthy(1)
            && etcd.member_healthy(2)),
        "two of three keep quorum\n{}",
        etcd.logs()
    );

    etcd.kill_member(1);
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || !etcd.healthy()),
        "one of three has no quorum\n{}",
        etcd.logs()
    );
    eprintln!("quorum loss noticed after {:?}", t.elapsed());

    etcd.restart_member(1);
    assert!(etcd.healthy(), "quorum is back with a restarted member");
}

#[test]
fn durations_in_help_texts_parse() {
    assert_eq!(parse_duration("6s"), Some(Duration::from_secs(6)));
    assert_eq!(parse_duration("6000ms"), Some(Duration::from_secs(6)));
    assert_eq!(parse_duration("6"), Some(Duration::from_secs(6)));
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("soon"), None);
}

/// A sink inside `ns` on `port`: reads each connection to EOF, then answers one byte.
fn sink_in(lab: &Lab, ns: &str, port: u16) -> SocketAddr {
    let addr = SocketAddr::from((lab.addr(ns), port));
    let l: TcpListener = lab.in_netns(ns, || TcpListener::bind(addr).expect("bind in netns"));
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut sink = Vec::new();
            if c.read_to_end(&mut sink).is_ok() {
                let _ = c.write_all(&[1]);
            }
        }
    });
    addr
}

/// Time to send `bytes` to a [`sink_in`] from inside `from` and get its answer.
fn transfer(lab: &Lab, from: &str, to: SocketAddr, bytes: usize) -> Duration {
    let mut s = lab
        .tcp_connect(Some(from), to, Duration::from_secs(5))
        .expect("connect to the sink");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    s.write_all(&vec![0x5a; bytes]).expect("send to the sink");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("the sink's answer");
    t.elapsed()
}

/// The fastest of five connect + 4-byte echo round trips (two RTTs), or `None` if one failed.
fn echo_time(lab: &Lab, from: Option<&str>, to: SocketAddr) -> Option<Duration> {
    let mut best = None::<Duration>;
    for _ in 0..5 {
        let t = Instant::now();
        if !echo(lab, from, to) {
            return None;
        }
        let e = t.elapsed();
        best = Some(best.map_or(e, |b| b.min(e)));
    }
    best
}

/// Whether no `dl*` device is left in the lab's namespaces.
fn link_gone(lab: &Lab) -> bool {
    wait_until(Duration::from_secs(5), || {
        lab.names().iter().all(|ns| {
            let mut c = Command::new("ip");
            c.args(["-o", "link", "show"]);
            let out = lab.output_in(ns, &mut c, Duration::from_secs(10)).unwrap();
            !String::from_utf8_lossy(&out.stdout).contains(": dl")
        })
    })
}

fn routes_in(lab: &Lab, ns: &str) -> String {
    let mut c = Command::new("ip");
    c.args(["-4", "route", "show"]);
    let out = lab.output_in(ns, &mut c, Duration::from_secs(10)).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn slow_link_delays_and_rate_limits_only_its_pair_and_is_gone_after_removal() {
    if !lab::slow_link_available() {
        return;
    }
    let Some(lab) = Lab::new(&["a", "b", "c"]) else {
        return;
    };
    let to_b = listen_in(&lab, "b", 5000);
    let to_c = listen_in(&lab, "c", 5000);
    let to_a = listen_in(&lab, "a", 5000);
    let sink_b = sink_in(&lab, "b", 5001);
    let base = echo_time(&lab, Some("a"), to_b).expect("a -> b before the slow link");
    const SIZE: usize = 128 << 10;
    let base_xfer = transfer(&lab, "a", sink_b, SIZE);
    eprintln!("before: a -> b echo {base:?}, {SIZE} bytes in {base_xfer:?}");

    // 40 ms one way: a connect plus an echo is two round trips, at least 160 ms.
    let link = lab.slow_link("a", "b", Duration::from_millis(40), 1_000_000);
    let routes = routes_in(&lab, "a");
    assert!(
        routes.contains(&format!("{} dev dlb", lab.addr("b"))),
        "a routes b through the line:\n{routes}"
    );
    let slow = echo_time(&lab, Some("a"), to_b).expect("a -> b through the slow link");
    let slow_back = echo_time(&lab, Some("b"), to_a).expect("b -> a through the slow link");
    // 128 KiB at 1 Mbit/s: at least 1.05 s of serialisation.
    let slow_xfer = transfer(&lab, "a", sink_b, SIZE);
    let other = echo_time(&lab, Some("a"), to_c).expect("a -> c beside the slow link");
    let root = echo_time(&lab, None, to_b).expect("root -> b beside the slow link");
    eprintln!(
        "slowed: a -> b echo {slow:?}, b -> a echo {slow_back:?}, {SIZE} bytes in {slow_xfer:?}; \
         a -> c echo {other:?}, root -> b echo {root:?}"
    );
    assert!(
        slow >= Duration::from_millis(160) && slow_back >= Duration::from_millis(160),
        "a <-> b takes the 40 ms line (two round trips >= 160 ms): {slow:?} / {slow_back:?}"
    );
    assert!(
        slow < Duration::from_millis(600),
        "the line adds its delay, not more: {slow:?}"
    );
    assert!(
        slow_xfer >= Duration::from_millis(1000),
        "{SIZE} bytes at 1 Mbit/s take at least 1 s: {slow_xfer:?} (unslowed {base_xfer:?})"
    );
    assert!(
        other < Duration::from_millis(100) && root < Duration::from_millis(100),
        "only the a <-> b pair is slowed: a -> c {other:?}, root -> b {root:?}"
    );

    let offered = link.offered().expect("the TUN devices' counters");
    assert!(
        offered.a_to_b.bytes >= SIZE as u64 && offered.b_to_a.fwd > 0,
        "the kernels handed the a <-> b traffic to the line: {offered:?}"
    );
    let counters = link.remove().expect("the delay line's counters");
    assert!(link_gone(&lab), "the TUN devices are gone with the line");
    assert!(
        counters.a_to_b.fwd > 0 && counters.b_to_a.fwd > 0,
        "packets went through the line both ways: {counters:?}"
    );
    assert!(
        counters.a_to_b.bytes >= SIZE as u64,
        "the transfer went through the line: {counters:?}"
    );
    let routes = routes_in(&lab, "a");
    assert!(
        !routes.contains("dlb"),
        "the route through the line is gone:\n{routes}"
    );
    let after = echo_time(&lab, Some("a"), to_b).expect("a -> b after removal");
    let after_xfer = transfer(&lab, "a", sink_b, SIZE);
    eprintln!("after: a -> b echo {after:?}, {SIZE} bytes in {after_xfer:?}");
    assert!(
        after < Duration::from_millis(100) && after_xfer < Duration::from_millis(500),
        "a <-> b is fast again: echo {after:?}, transfer {after_xfer:?}"
    );

    // Dropping the guard (e.g. on panic) restores the link too.
    let link = lab.slow_link("b", "c", Duration::from_millis(40), 0);
    let pid = link.pid().expect("running");
    assert!(echo_time(&lab, Some("b"), to_c).unwrap() >= Duration::from_millis(160));
    drop(link);
    assert!(lab.try_wait(pid).is_none(), "reaped: no longer tracked");
    // SAFETY: signal 0 only probes for existence.
    assert!(
        unsafe { libc::kill(pid as libc::pid_t, 0) } != 0,
        "the delay line is gone"
    );
    assert!(echo_time(&lab, Some("b"), to_c).unwrap() < Duration::from_millis(100));
}

/// Sends `n` datagrams from inside `from` to `to`'s namespace; returns how many arrived.
fn udp_delivered(lab: &Lab, from: &str, to: &str, port: u16, n: u32) -> u32 {
    let dst = SocketAddr::from((lab.addr(to), port));
    let rx = lab.in_netns(to, || std::net::UdpSocket::bind(dst).expect("bind udp"));
    let tx = lab.in_netns(from, || {
        std::net::UdpSocket::bind(SocketAddr::from((lab.addr(from), 0))).expect("bind udp")
    });
    let mut b = [0u8; 16];
    // Warm up (neighbour resolution queues only a few packets) until one datagram arrives.
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let warm = (0..50).any(|_| {
        // An output drop answers EPERM: that datagram is lost, as intended.
        let _ = tx.send_to(b"warm", dst);
        rx.recv_from(&mut b).is_ok()
    });
    assert!(warm, "no datagram from {from} reached {to} in 50 tries");
    while rx.recv_from(&mut b).is_ok() {}
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Counted while they come (the receive buffer holds only a few hundred).
    let counter = std::thread::spawn(move || {
        let (mut got, mut b) = (0u32, [0u8; 16]);
        while rx.recv_from(&mut b).is_ok() {
            got += 1;
        }
        got
    });
    for i in 0..n {
        let _ = tx.send_to(&i.to_be_bytes(), dst);
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    counter.join().expect("the counting thread")
}

#[test]
fn lossy_drops_about_the_given_share_between_the_pair_only() {
    let Some(lab) = Lab::new(&["a", "b", "c"]) else {
        return;
    };
    assert_eq!(udp_delivered(&lab, "a", "b", 7000, 400), 400, "no loss yet");
    lab.lossy("a", &[lab.addr("b")], 30);
    let lossy = udp_delivered(&lab, "a", "b", 7001, 400);
    let back = udp_delivered(&lab, "b", "a", 7002, 400);
    let other = udp_delivered(&lab, "a", "c", 7003, 400);
    eprintln!("30 % loss: a -> b {lossy}/400, b -> a {back}/400, a -> c {other}/400");
    // Binomial(400, 0.7): mean 280, sd 9.2; the bounds are > 6 sd away.
    assert!(
        (220..=340).contains(&lossy) && (220..=340).contains(&back),
        "about 70 % arrive each way: {lossy} / {back}"
    );
    assert_eq!(other, 400, "a <-> c is not affected");
    lab.heal("a");
    assert_eq!(udp_delivered(&lab, "a", "b", 7004, 400), 400, "healed");
}
