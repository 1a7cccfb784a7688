//! Transmission: data path, limits, error mapping, ordering, disconnects, kill, shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bw_types::{IoError, IoKind};
use nbd_proto::client::Reply;
use nbd_proto::consts::*;
use nbd_server::{serve_unix, ServerStats, MAX_INFLIGHT_REQUESTS};

use crate::devices::{FailDevice, GateDevice, MemDevice};
use crate::harness::*;

fn chunk_payload(r: &Reply) -> (u16, u16, &[u8]) {
    match r {
        Reply::Chunk {
            flags,
            kind,
            payload,
            ..
        } => (*flags, *kind, payload),
        other => panic!("expected a chunk, got {other:?}"),
    }
}

// Goal: write then read back, with simple and with structured replies; metrics count both.
#[tokio::test]
async fn write_read_round_trip_simple_and_structured() {
    let srv = TestServer::with_mem().await;
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    let (mut cl, _, _) = Client::open(srv.addr, "vol", false, false).await;
    cl.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8192, &pattern)
        .await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: 0,
            cookie: 1
        }
    );
    cl.request(CMD_READ, 0, 2, 4096, 8192, &[]).await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: 0,
            cookie: 2
        }
    );
    assert_eq!(cl.data(8192).await, pattern);

    let (mut cl, _, flags) = Client::open(srv.addr, "vol", true, false).await;
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    cl.request(CMD_READ, CMD_FLAG_DF, 3, 4096, 8192, &[]).await;
    let r = cl.reply().await;
    let (f, kind, payload) = chunk_payload(&r);
    assert_eq!((f, kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
    assert_eq!(payload[..8], 4096u64.to_be_bytes());
    assert_eq!(&payload[8..], &pattern[..]);
    // Zero-length read: an empty success (NONE chunk), no disconnect.
    cl.request(CMD_READ, 0, 4, 0, 0, &[]).await;
    assert_eq!(chunk_payload(&cl.reply().await).1, REPLY_TYPE_NONE);

    let m = &srv.exports.vols.lock().unwrap()["vol"].metrics;
    assert_eq!((m.ops(IoKind::Write), m.bytes(IoKind::Write)), (1, 8192));
    assert_eq!((m.ops(IoKind::Read), m.bytes(IoKind::Read)), (3, 16384));
}

// Goal: range errors follow the spec (reads/trims/block status EINVAL, writes ENOSPC), a
// refused write's payload is consumed, and the connection stays usable.
#[tokio::test]
async fn out_of_range_requests() {
    let srv = TestServer::with_mem().await;
    let (mut cl, size, _) = Client::open(srv.addr, "vol", false, false).await;
    let cases: Vec<(u16, u64, u32, u32)> = vec![
        (CMD_READ, size - 511, 512, EINVAL),
        (CMD_READ, u64::MAX, 1, EINVAL),
        (CMD_WRITE, size, 512, ENOSPC),
        (CMD_WRITE, u64::MAX - 100, 512, ENOSPC),
        (CMD_TRIM, size - 1, 2, EINVAL),
        (CMD_WRITE_ZEROES, size - 1, 2, ENOSPC),
    ];
    for (i, (cmd, offset, len, want)) in cases.into_iter().enumerate() {
        let payload = if cmd == CMD_WRITE {
            vec![0xee; len as usize]
        } else {
            vec![]
        };
        cl.request(cmd, 0, i as u64, offset, len, &payload).await;
        assert_eq!(
            cl.reply().await,
            Reply::Simple {
                error: want,
                cookie: i as u64
            },
            "case {i}"
        );
    }
    cl.request(CMD_READ, 0, 99, size - 512, 512, &[]).await;
    assert_eq!(reply_error(&cl.reply().await), 0);
    assert_eq!(cl.data(512).await, vec![0; 512]);
}

// Goal: payloads over 32 MiB: a write's bytes are read and dropped (EINVAL), a read is
// refused up front (EINVAL simple, EOVERFLOW structured); the stream stays in sync.
#[tokio::test]
async fn oversize_payloads() {
    let exports = TestExports::default();
    exports.add("big", MemDevice::new(64 << 20), false);
    let srv = TestServer::start(exports).await;
    let too_big = MAX_PAYLOAD_LEN + 1;
    let (mut cl, _, _) = Client::open(srv.addr, "big", false, false).await;
    cl.request(CMD_WRITE, 0, 1, 0, too_big, &vec![0x55; too_big as usize])
        .await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: EINVAL,
            cookie: 1
        }
    );
    cl.request(CMD_READ, 0, 2, 0, too_big, &[]).await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: EINVAL,
            cookie: 2
        }
    );
    cl.request(CMD_READ, 0, 3, 0, 16, &[]).await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: 0,
            cookie: 3
        }
    );
    assert_eq!(
        cl.data(16).await,
        vec![0; 16],
        "the refused write must not have landed"
    );

    let (mut cl, _, _) = Client::open(srv.addr, "big", true, false).await;
    cl.request(CMD_READ, 0, 4, 0, too_big, &[]).await;
    assert_eq!(reply_error(&cl.reply().await), EOVERFLOW);
    // Exactly the maximum works.
    cl.request(CMD_READ, 0, 5, 0, MAX_PAYLOAD_LEN, &[]).await;
    assert_eq!(
        chunk_payload(&cl.reply().await).2.len(),
        MAX_PAYLOAD_LEN as usize + 8
    );
}

// Goal: unknown commands, CACHE and invalid flags get EINVAL; the connection stays usable.
#[tokio::test]
async fn unknown_command_and_bad_flags() {
    let srv = TestServer::with_mem().await;
    let (mut cl, _, _) = Client::open(srv.addr, "vol", true, false).await;
    let cases = [
        (42u16, 0u16),
        (CMD_CACHE, 0),
        (CMD_WRITE_ZEROES, CMD_FLAG_DF),
        (CMD_READ, CMD_FLAG_FAST_ZERO),
        (CMD_FLUSH, 1 << 9),
    ];
    for (i, (cmd, flags)) in cases.into_iter().enumerate() {
        cl.request(cmd, flags, i as u64, 0, 512, &[]).await;
        let r = cl.reply().await;
        assert_eq!(
            (reply_error(&r), reply_cookie(&r)),
            (EINVAL, i as u64),
            "case {i}"
        );
        assert!(!error_message(&r).is_empty());
    }
    // Without structured replies DF is not advertised, hence invalid.
    let (mut cl, _, flags) = Client::open(srv.addr, "vol", false, false).await;
    assert_eq!(flags & TFLAG_SEND_DF, 0);
    cl.request(CMD_READ, CMD_FLAG_DF, 9, 0, 512, &[]).await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: EINVAL,
            cookie: 9
        }
    );
    cl.request(CMD_FLUSH, CMD_FLAG_FUA, 10, 0, 0, &[]).await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: 0,
            cookie: 10
        }
    );
}

// Goal: a bad request magic closes only that connection and is counted.
#[tokio::test]
async fn bad_magic_closes_only_that_connection() {
    let srv = TestServer::with_mem().await;
    let (mut good, _, _) = Client::open(srv.addr, "vol", false, false).await;
    let (mut bad, _, _) = Client::open(srv.addr, "vol", false, false).await;
    bad.send(&[0xde; 28]).await;
    bad.expect_closed().await;
    assert_eq!(srv.stat(|s| &s.protocol_errors_total), 1);
    good.request(CMD_FLUSH, 0, 1, 0, 0, &[]).await;
    assert_eq!(reply_error(&good.reply().await), 0);
}

// Goal: base:allocation extents with and without REQ_ONE; refused without negotiation.
#[tokio::test]
async fn block_status() {
    let srv = TestServer::with_mem().await;
    let (mut cl, _, _) = Client::open(srv.addr, "vol", true, true).await;
    cl.request(CMD_WRITE, 0, 1, 0, 4096, &[1; 4096]).await;
    cl.reply().await;
    cl.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 2, 65536, 4096, &[])
        .await;
    cl.reply().await;
    cl.request(CMD_BLOCK_STATUS, 0, 3, 0, 16384, &[]).await;
    let r = cl.reply().await;
    let (flags, kind, p) = chunk_payload(&r);
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(
        p,
        [
            &[0, 0, 0, 1][..],
            &[0, 0, 0x10, 0, 0, 0, 0, 0],
            &[0, 0, 0x30, 0, 0, 0, 0, 3]
        ]
        .concat()
    );
    cl.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4, 4096, 65536, &[])
        .await;
    let r = cl.reply().await;
    assert_eq!(chunk_payload(&r).2, [0, 0, 0, 1, 0, 0, 0xf0, 0, 0, 0, 0, 3]);
    cl.request(CMD_BLOCK_STATUS, 0, 5, 1 << 20, 1, &[]).await;
    assert_eq!(reply_error(&cl.reply().await), EINVAL);

    let (mut no_meta, _, _) = Client::open(srv.addr, "vol", true, false).await;
    no_meta.request(CMD_BLOCK_STATUS, 0, 6, 0, 4096, &[]).await;
    assert_eq!(reply_error(&no_meta.reply().await), EINVAL);
    let (mut simple, _, _) = Client::open(srv.addr, "vol", false, false).await;
    simple.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096, &[]).await;
    assert_eq!(
        simple.reply().await,
        Reply::Simple {
            error: EINVAL,
            cookie: 7
        }
    );
}

// Goal: replies follow completion order, not request order (the device completes the
// later requests first) and each carries its own cookie and data.
#[tokio::test]
async fn replies_follow_completion_order() {
    let exports = TestExports::default();
    let gate = GateDevice::new(1 << 20, 4);
    exports.add("g", gate.clone(), false);
    let srv = TestServer::start(exports).await;
    let (mut cl, _, _) = Client::open(srv.addr, "g", true, false).await;
    for i in 0..4u64 {
        cl.request(CMD_WRITE, 0, 100 + i, i * 4096, 4096, &[i as u8 + 1; 4096])
            .await;
    }
    for i in (0..4u64).rev() {
        assert_eq!(reply_cookie(&cl.reply().await), 100 + i);
    }
    for i in 0..4u64 {
        cl.request(CMD_READ, 0, i, i * 4096, 4096, &[]).await;
    }
    for i in (0..4u64).rev() {
        let r = cl.reply().await;
        assert_eq!(reply_cookie(&r), i);
        assert_eq!(chunk_payload(&r).2[8..], [i as u8 + 1; 4096]);
    }
}

// Goal: device errors map to NBD errors with the message in structured replies.
#[tokio::test]
async fn device_errors_are_mapped() {
    let exports = TestExports::default();
    exports.add("full", Arc::new(FailDevice(IoError::NoSpace)), false);
    exports.add("down", Arc::new(FailDevice(IoError::ShuttingDown)), false);
    exports.add(
        "broken",
        Arc::new(FailDevice(IoError::Faulted("replica lost".into()))),
        false,
    );
    let srv = TestServer::start(exports).await;
    let (mut cl, _, _) = Client::open(srv.addr, "full", true, false).await;
    cl.request(CMD_WRITE, 0, 1, 0, 4, b"abcd").await;
    let r = cl.reply().await;
    assert_eq!(
        (reply_error(&r), error_message(&r)),
        (ENOSPC, "no space left on the volume's storage".into())
    );
    let (mut cl, _, _) = Client::open(srv.addr, "down", false, false).await;
    cl.request(CMD_READ, 0, 2, 0, 4, &[]).await;
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: ESHUTDOWN,
            cookie: 2
        }
    );
    let (mut cl, _, _) = Client::open(srv.addr, "broken", true, false).await;
    cl.request(CMD_READ, 0, 3, 0, 4, &[]).await;
    let r = cl.reply().await;
    assert_eq!(
        (reply_error(&r), error_message(&r)),
        (EIO, "volume is faulted: replica lost".into())
    );
    let m = &srv.exports.vols.lock().unwrap()["broken"].metrics;
    assert_eq!(m.errors(IoKind::Read), 1);
}

// Goal: a client vanishing mid-payload and another vanishing with a request in flight
// (completed later, into a closed channel) do not disturb a third client.
#[tokio::test]
async fn client_vanishing_mid_request_affects_no_one_else() {
    let exports = TestExports::default();
    let gate = GateDevice::new(1 << 20, 0);
    exports.add("g", gate.clone(), false);
    exports.add("vol", MemDevice::new(1 << 20), false);
    let srv = TestServer::start(exports).await;
    let (mut steady, _, _) = Client::open(srv.addr, "vol", false, false).await;

    let (mut half, _, _) = Client::open(srv.addr, "vol", false, false).await;
    half.request(CMD_WRITE, 0, 1, 0, 65536, &[9; 1000]).await;
    drop(half);

    let (mut pending, _, _) = Client::open(srv.addr, "g", true, false).await;
    pending.request(CMD_READ, 0, 1, 0, 4096, &[]).await;
    wait_until("request reached the device", || gate.held() == 1).await;
    drop(pending);
    wait_until("both connections gone", || {
        srv.stat(|s| &s.connections_open) == 2
    })
    .await;
    gate.release_reversed(); // completion after the client is gone: must not panic

    for i in 0..10 {
        steady
            .request(CMD_WRITE, 0, i, 0, 512, &[i as u8; 512])
            .await;
        assert_eq!(reply_error(&steady.reply().await), 0);
    }
    steady.request(CMD_READ, 0, 50, 0, 512, &[]).await;
    steady.reply().await;
    assert_eq!(
        steady.data(512).await,
        vec![9; 512],
        "the truncated write must not land"
    );
}

// Goal: DISC closes only after in-flight requests were answered.
#[tokio::test]
async fn disc_waits_for_in_flight_requests() {
    let exports = TestExports::default();
    let gate = GateDevice::new(1 << 20, 0);
    exports.add("g", gate.clone(), false);
    let srv = TestServer::start(exports).await;
    let (mut cl, _, _) = Client::open(srv.addr, "g", false, false).await;
    cl.request(CMD_WRITE, 0, 7, 0, 4, b"data").await;
    cl.request(CMD_DISC, 0, 8, 0, 0, &[]).await;
    wait_until("write held", || gate.held() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.release_reversed();
    assert_eq!(
        cl.reply().await,
        Reply::Simple {
            error: 0,
            cookie: 7
        }
    );
    cl.expect_closed().await;
}

// Goal: the kill signal closes the connection at once (with a request stuck in the
// device), releases the guard, and the late completion is harmless.
#[tokio::test]
async fn kill_closes_connection_now() {
    let exports = TestExports::default();
    let gate = GateDevice::new(1 << 20, 0);
    let vol = exports.add("g", gate.clone(), true);
    let srv = TestServer::start(exports).await;
    let (mut cl, _, _) = Client::open(srv.addr, "g", false, false).await;
    cl.request(CMD_READ, 0, 1, 0, 4096, &[]).await;
    wait_until("read held", || gate.held() == 1).await;
    vol.kill.send(true).unwrap();
    cl.expect_closed().await;
    wait_until("guard released", || {
        vol.open_guards.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(srv.stat(|s| &s.connections_killed_total), 1);
    gate.release_reversed();
}

// Goal: the reader stops reading at MAX_INFLIGHT_REQUESTS and resumes when replies drain.
#[tokio::test]
async fn in_flight_request_limit_applies_backpressure() {
    let exports = TestExports::default();
    let gate = GateDevice::new(1 << 20, 0);
    exports.add("g", gate.clone(), false);
    let srv = TestServer::start(exports).await;
    let (mut cl, _, _) = Client::open(srv.addr, "g", false, false).await;
    let total = MAX_INFLIGHT_REQUESTS + 20;
    for i in 0..total {
        cl.request(CMD_FLUSH, 0, i as u64, 0, 0, &[]).await;
    }
    wait_until("limit reached", || gate.held() == MAX_INFLIGHT_REQUESTS).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        gate.held(),
        MAX_INFLIGHT_REQUESTS,
        "must not read past the limit"
    );
    gate.release_reversed();
    for _ in 0..MAX_INFLIGHT_REQUESTS {
        cl.reply().await;
    }
    wait_until("the rest read", || gate.held() == 20).await;
    gate.release_reversed();
    for _ in 0..20 {
        cl.reply().await;
    }
}

// Goal: shutdown closes transmission connections and serve_tcp returns.
#[tokio::test]
async fn shutdown_closes_connections_and_returns() {
    let srv = TestServer::with_mem().await;
    let (mut cl, _, _) = Client::open(srv.addr, "vol", false, false).await;
    let mut negotiating = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    srv.shutdown.send(true).unwrap();
    cl.expect_closed().await;
    negotiating.expect_closed().await;
    tokio::time::timeout(DEADLINE, srv.task)
        .await
        .expect("serve_tcp returns")
        .unwrap();
}

// Goal: the Unix-socket listener serves the same protocol.
#[tokio::test]
async fn unix_socket_serves() {
    let dir = std::env::temp_dir().join(format!("nbd-server-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let exports = TestExports::default();
    exports.add("vol", MemDevice::new(4096), false);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve_unix(
        listener,
        Arc::new(exports),
        Arc::new(ServerStats::new()),
        rx,
    ));
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let mut out = vec![0, 0, 0, 3];
    nbd_proto::client::encode_option(&mut out, OPT_EXPORT_NAME, b"vol");
    s.write_all(&out).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 4096);
    tx.send(true).unwrap();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
