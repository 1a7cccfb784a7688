//! Bad input on the peer port is refused with a clear message and never disturbs other
//! connections: a good client keeps writing and verifying data through all of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bw_types::{Generation, IoReply};
use peer_proto::consts::*;
use peer_proto::{
    parse_message, ErrorCode, FrameHeader, RefuseCode, ReplyHead, Request, ServerAnswer,
};
use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// Writes and verifies blocks until `stop`; returns how many rounds it did.
async fn good_client(dev: Arc<peer::RemoteReplica>, stop: Arc<AtomicBool>) -> u64 {
    let mut rounds = 0u64;
    while !stop.load(Ordering::Relaxed) || rounds == 0 {
        let byte = (rounds % 251) as u8;
        let offset = (rounds % 64) * 65536;
        assert_eq!(
            write(&*dev, offset, vec![byte; 65536]).await,
            Ok(IoReply::Done)
        );
        assert_filled(&read(&*dev, offset, 65536).await, byte);
        rounds += 1;
    }
    rounds
}

fn refusal(answer: ServerAnswer) -> peer_proto::Refuse {
    match answer {
        ServerAnswer::Refuse(r) => r,
        ServerAnswer::Accept(a) => panic!("accepted: {a:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_while_a_good_client_works() {
    let server = Server::start().await;
    let dev = Arc::new(server.connect(10).await);
    let stop = Arc::new(AtomicBool::new(false));
    let good = tokio::spawn(good_client(Arc::clone(&dev), Arc::clone(&stop)));

    // Garbage and other protocols: refused at the first wrong byte.
    for garbage in [
        &b"\x00\x01\x02garbage"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"BWPEERS\n",
    ] {
        let r = refusal(raw::handshake(server.addr, garbage).await.1);
        assert_eq!(r.code, RefuseCode::BadRequest);
        assert!(r.message.contains("bad magic"), "{}", r.message);
    }
    // A hello with a broken body (empty node id).
    let mut empty_id = raw::hello(10, "vol");
    empty_id[32..34].copy_from_slice(&0u16.to_be_bytes());
    let r = refusal(raw::handshake(server.addr, &empty_id).await.1);
    assert_eq!(r.code, RefuseCode::BadRequest, "{}", r.message);

    // Old generation, unknown volume, unsupported version.
    let r = refusal(raw::handshake(server.addr, &raw::hello(9, "vol")).await.1);
    assert_eq!(
        (r.code, r.highest_generation),
        (RefuseCode::StaleGeneration, Generation(10))
    );
    let r = refusal(raw::handshake(server.addr, &raw::hello(10, "nope")).await.1);
    assert_eq!(r.code, RefuseCode::UnknownVolume);
    assert!(
        r.message.contains("no replica of volume nope"),
        "{}",
        r.message
    );
    let mut future = Vec::new();
    let (min, max) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2);
    peer_proto::encode_hello(
        &mut future,
        &peer_proto::Hello {
            min_version: min,
            max_version: max,
            generation: Generation(10),
            features: 0,
            node_id: bw_types::NodeId("raw".into()),
            volume_id: vol(),
            session: 0,
        },
    );
    let r = refusal(raw::handshake(server.addr, &future).await.1);
    assert_eq!(r.code, RefuseCode::VersionUnsupported);
    assert_eq!(
        (r.server_min_version, r.server_max_version),
        (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION)
    );
    assert!(
        r.message.contains(&format!("{min}..={max}")),
        "{}",
        r.message
    );

    // After a good handshake: an unknown request type is answered and the connection lives;
    // an oversize frame ends it with a connection-level protocol error.
    let (mut s, answer) = raw::handshake(server.addr, &raw::hello(10, "vol")).await;
    assert!(matches!(answer, ServerAnswer::Accept(_)));
    let unknown = FrameHeader {
        kind: 0x0150,
        flags: 0,
        body_len: 3,
        id: 5,
        offset: 0,
        length: 0,
    };
    let mut out = unknown.to_bytes().to_vec();
    out.extend_from_slice(b"xyz");
    out.extend_from_slice(&Request::Ping.header(6).to_bytes());
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let (h, body) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (h.id, ReplyHead::decode(&h).unwrap()),
        (
            5,
            ReplyHead::Error {
                code: ErrorCode::Unsupported
            }
        )
    );
    assert!(parse_message(&body).contains("unknown request type 0x0150"));
    let (h, _) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!((h.id, h.kind), (6, MSG_REPLY_PONG));

    let oversize = FrameHeader {
        kind: MSG_WRITE,
        flags: 0,
        body_len: MAX_BODY_LEN + 1,
        id: 7,
        offset: 0,
        length: u64::from(MAX_BODY_LEN) + 1,
    };
    s.write_all(&oversize.to_bytes()).await.unwrap();
    let (h, body) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (h.id, ReplyHead::decode(&h).unwrap()),
        (
            CONNECTION_ID,
            ReplyHead::Error {
                code: ErrorCode::Protocol
            }
        )
    );
    assert!(
        parse_message(&body).contains("longer than the limit"),
        "{}",
        parse_message(&body)
    );
    assert!(
        raw::frame(&mut s, &mut buf).await.is_none(),
        "connection closed"
    );

    // A frame with a bad magic mid-stream: same.
    let (mut s, _) = raw::handshake(server.addr, &raw::hello(10, "vol")).await;
    s.write_all(b"NOPE and more").await.unwrap();
    let mut buf = Vec::new();
    let (h, _) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!((h.id, h.kind), (CONNECTION_ID, MSG_REPLY_ERROR));

    stop.store(true, Ordering::Relaxed);
    let rounds = good.await.unwrap();
    assert!(rounds > 0);
    let refused = server
        .stats
        .handshakes_refused_total
        .load(Ordering::Relaxed);
    assert_eq!(refused, 7, "every bad handshake counted");
    assert_eq!(
        server.stats.protocol_errors_total.load(Ordering::Relaxed),
        2
    );
}
