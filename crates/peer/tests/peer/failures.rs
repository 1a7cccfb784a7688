//! The peer goes away: server shutdown, the server killed mid-write, a peer that stops
//! answering. Requests must fail (never hang) within a bounded time, and the state change
//! must be reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bw_types::{IoError, IoReply, IoRequest};
use peer::{ConnectOptions, PeerState};
use peer_proto::{encode_accept, Accept};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::*;

fn unreachable(e: &IoError) -> bool {
    matches!(e, IoError::Io(m) if m.contains("unreachable"))
}

// Goal: shutting the server down answers what is in flight, tells the client why, and
// every later request fails at once with "unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_fails_the_client_cleanly() {
    let server = Server::start().await;
    let dev = server.connect(1).await;
    let mut state = dev.subscribe();
    assert_eq!(write(&dev, 0, vec![1; 4096]).await, Ok(IoReply::Done));
    // A client still in its handshake is refused as busy, with the reason.
    let mut idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    wait_until("the idle connection is being served", || async {
        server
            .stats
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    server.shutdown.send(true).unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, idle.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    match peer_proto::parse_server_answer(&answer) {
        Ok(Some((peer_proto::ServerAnswer::Refuse(r), _))) => {
            assert_eq!(r.code, peer_proto::RefuseCode::Busy);
            assert!(r.message.contains("shutting down"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
    tokio::time::timeout(DEADLINE, server.task)
        .await
        .unwrap()
        .unwrap();
    state
        .wait_for(|s| *s != PeerState::Connected)
        .await
        .unwrap();
    let now = state.borrow().clone();
    assert!(
        matches!(&now, PeerState::Unreachable { reason } if reason.contains("shutting down")),
        "{now:?}"
    );
    let err = write(&dev, 0, vec![2; 4096]).await.unwrap_err();
    assert!(unreachable(&err), "{err:?}");
}

// Goal: killing the server (all its tasks and sockets gone) while writes are in flight
// fails every one of them within a bounded time, never hangs, and never retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_write_fails_requests() {
    let server = Server::start().await;
    let dev = Arc::new(server.connect(1).await);
    let mut inflight = Vec::new();
    for i in 0..64u64 {
        let req = IoRequest::Write {
            offset: i << 20,
            data: vec![7; 1 << 20].into(),
            fua: true,
        };
        inflight.push(start(&*dev, req));
    }
    server.task.abort();
    // Like a killed process: the listener and every connection task are gone after this.
    assert!(server.task.await.unwrap_err().is_cancelled());
    let began = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    for r in inflight {
        match tokio::time::timeout(DEADLINE, r)
            .await
            .expect("no hang")
            .unwrap()
        {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(unreachable(&e), "{e:?}");
                failed += 1;
            }
        }
    }
    assert_eq!(ok + failed, 64);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    // The kill is noticed without any further request, within the bound.
    let mut state = dev.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(|s| *s != PeerState::Connected),
    )
    .await
    .expect("the loss is noticed in time")
    .unwrap();
    assert!(
        matches!(dev.state(), PeerState::Unreachable { .. }),
        "{:?}",
        dev.state()
    );
    let err = write(&*dev, 0, vec![0; 512]).await.unwrap_err();
    assert!(unreachable(&err), "{err:?}");
}

/// A fake peer that accepts the handshake and then reads forever without answering.
async fn silent_peer() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let mut out = Vec::new();
                encode_accept(
                    &mut out,
                    &Accept {
                        version: 1,
                        size_bytes: 1 << 20,
                        highest_generation: bw_types::Generation(1),
                        features: 0,
                        max_io_bytes: 32 << 20,
                        max_inflight_requests: 256,
                        max_inflight_bytes: 128 << 20,
                    },
                );
                s.write_all(&out).await.unwrap();
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

fn short_timeouts() -> ConnectOptions {
    ConnectOptions {
        connections: 1,
        request_timeout: Duration::from_millis(300),
        ping_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

// Goal: a peer that stops answering (no FIN, no RST: a partition) fails waiting requests
// after the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_requests() {
    let addr = silent_peer().await;
    let dev = peer::RemoteReplica::connect(
        addr,
        bw_types::NodeId("n".into()),
        vol(),
        bw_types::Generation(1),
        short_timeouts(),
    )
    .await
    .unwrap();
    let began = Instant::now();
    let err = write(&dev, 0, vec![1; 512]).await.unwrap_err();
    assert!(
        unreachable(&err) && err.to_string().contains("no reply"),
        "{err:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
}

// Goal: an idle connection to a dead peer is noticed by the pings, and the state callback
// reports it without any guest request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_dead_peer_is_noticed() {
    let addr = silent_peer().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = ConnectOptions {
        on_state: Some(Arc::new(move |s: &PeerState| {
            let _ = tx.send(s.clone());
        })),
        ..short_timeouts()
    };
    let dev = peer::RemoteReplica::connect(
        addr,
        bw_types::NodeId("n".into()),
        vol(),
        bw_types::Generation(1),
        opts,
    )
    .await
    .unwrap();
    let state = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(state, PeerState::Unreachable { .. }), "{state:?}");
    assert_eq!(dev.state(), state);
    drop(dev);
}

// Goal: connecting to a port nobody listens on fails fast with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_nothing_fails() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = peer::RemoteReplica::connect(
        addr,
        bw_types::NodeId("n".into()),
        vol(),
        bw_types::Generation(1),
        ConnectOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, peer::ConnectError::Io { .. }), "{err}");
}
