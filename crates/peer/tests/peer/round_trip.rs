//! Every request type through RemoteReplica → peer server → Replica → LocalVolume and back,
//! deep pipelines, and out-of-order replies.

use std::sync::Arc;
use std::time::Duration;

use bw_types::{BlockDevice, Extent, IoError, IoReply, IoRequest};
use peer::ConnectOptions;
use peer_proto::consts::{MSG_REPLY_DATA, MSG_REPLY_OK};
use peer_proto::Request;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

// Goal: each request type round-trips with the right effect, over 1 and 2 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_type_round_trips() {
    for connections in [1, 2] {
        let server = Server::start().await;
        let opts = ConnectOptions {
            connections,
            ..Default::default()
        };
        let dev = server.connect_with(7, opts).await.unwrap();
        assert_eq!(dev.size_bytes(), VOLUME_BYTES);
        assert_eq!(dev.accept().highest_generation.0, 7);
        let mib = 1 << 20;
        assert_eq!(write(&dev, 0, vec![0xab; mib]).await, Ok(IoReply::Done));
        assert_filled(&read(&dev, 0, mib as u32).await, 0xab);
        let fua = IoRequest::Write {
            offset: 8192,
            data: vec![1; 4096].into(),
            fua: true,
        };
        assert_eq!(run(&dev, fua).await, Ok(IoReply::Done));
        assert_eq!(run(&dev, IoRequest::Flush).await, Ok(IoReply::Done));
        let trim = IoRequest::Trim {
            offset: 0,
            len: 4096,
            fua: false,
        };
        assert_eq!(run(&dev, trim).await, Ok(IoReply::Done));
        assert_filled(&read(&dev, 0, 4096).await, 0);
        let zero = IoRequest::WriteZeroes {
            offset: 4096,
            len: 4096,
            may_punch: false,
            fua: true,
        };
        assert_eq!(run(&dev, zero).await, Ok(IoReply::Done));
        let punch = IoRequest::WriteZeroes {
            offset: 16384,
            len: 4096,
            may_punch: true,
            fua: false,
        };
        assert_eq!(run(&dev, punch).await, Ok(IoReply::Done));
        assert_filled(&read(&dev, 4096, 4096).await, 0);
        assert_filled(&read(&dev, 8192, 4096).await, 1);
        // Block status: the written megabyte is data, the untouched tail is a hole.
        let status = IoRequest::BlockStatus {
            offset: 2 * mib as u64,
            len: 4 * mib as u64,
        };
        match run(&dev, status).await {
            Ok(IoReply::Extents(e)) => {
                assert_eq!(
                    e[0],
                    Extent {
                        len: 4 * mib as u64,
                        hole: true,
                        zero: true
                    },
                    "{e:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        match run(
            &dev,
            IoRequest::BlockStatus {
                offset: 0,
                len: 65536,
            },
        )
        .await
        {
            Ok(IoReply::Extents(e)) => assert!(e.iter().any(|x| !x.hole), "{e:?}"),
            other => panic!("{other:?}"),
        }
        // Errors cross the wire as themselves.
        let past_end = IoRequest::Read {
            offset: VOLUME_BYTES,
            len: 512,
        };
        assert_eq!(run(&dev, past_end).await, Err(IoError::OutOfRange));
        let huge = IoRequest::Read {
            offset: 0,
            len: (32 << 20) + 1,
        };
        assert!(matches!(run(&dev, huge).await, Err(IoError::Invalid(_))));
    }
}

// Goal: hundreds of mixed requests in flight at once all complete with the right data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight() {
    let server = Server::start().await;
    let dev = Arc::new(server.connect(1).await);
    let blocks = 512u64;
    let mut pending = Vec::new();
    for i in 0..blocks {
        let req = IoRequest::Write {
            offset: i * 4096,
            data: vec![i as u8; 4096].into(),
            fua: i % 64 == 0,
        };
        pending.push(start(&*dev, req));
    }
    for p in pending {
        assert_eq!(p.await.unwrap(), Ok(IoReply::Done));
    }
    let mut reads = Vec::new();
    for i in 0..blocks {
        reads.push((
            i,
            start(
                &*dev,
                IoRequest::Read {
                    offset: i * 4096,
                    len: 4096,
                },
            ),
        ));
        if i % 100 == 0 {
            reads.push((u64::MAX, start(&*dev, IoRequest::Flush)));
        }
    }
    for (i, r) in reads {
        match r.await.unwrap() {
            Ok(IoReply::Data(d)) => assert_filled(&d, i as u8),
            Ok(IoReply::Done) => assert_eq!(i, u64::MAX),
            other => panic!("{other:?}"),
        }
    }
}

// Goal: replies come back in completion order, not request order: a FLUSH stuck in a slow
// fdatasync does not hold up a READ sent after it (raw protocol, to see the order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_out_of_order() {
    let server = Server::start_with(|inner| {
        Arc::new(SlowSync {
            inner,
            delay: Duration::from_millis(300),
        })
    })
    .await;
    let (mut s, answer) = raw::handshake(server.addr, &raw::hello(1, "vol")).await;
    assert!(
        matches!(answer, peer_proto::ServerAnswer::Accept(_)),
        "{answer:?}"
    );
    let mut out = Request::Flush.header(1).to_bytes().to_vec();
    out.extend_from_slice(
        &Request::Read {
            offset: 0,
            len: 4096,
        }
        .header(2)
        .to_bytes(),
    );
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let (first, body) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (first.id, first.kind, body.len()),
        (2, MSG_REPLY_DATA, 4096)
    );
    let (second, _) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!((second.id, second.kind), (1, MSG_REPLY_OK));
}
