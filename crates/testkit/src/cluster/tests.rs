//! The harness itself, without any blockwarden agent: namespaces come up and go away, traffic
//! flows between them, nftables faults cut and restore it, and a 3-member etcd keeps quorum
//! with one member killed and loses it with two. Method: real namespaces, TCP listeners made
//! inside them with `Lab::in_netns`, real etcd processes.

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
