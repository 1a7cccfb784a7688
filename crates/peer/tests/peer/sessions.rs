//! Session fencing and the replication-metadata requests end to end (protocol v2): real
//! `Replica`s on temp files, real TCP on 127.0.0.1. A newer session of the same generation
//! drains and fences the older one; READ_META / WRITE_META round-trip and are fenced like
//! writes.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bw_types::{Generation, IoError, IoReply};
use peer::{MetaError, PeerState};
use peer_proto::consts::*;
use peer_proto::{parse_message, ErrorCode, FrameHeader, RefuseCode, ReplyHead, ServerAnswer};
use store::Backend;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// Writes block while `held`; counts the writes that reached the disk.
struct HoldWrites {
    inner: Arc<dyn Backend>,
    held: Mutex<bool>,
    changed: Condvar,
    /// Writes that entered `write_at`, and writes that completed.
    entered: AtomicU64,
    completed: AtomicU64,
}

impl HoldWrites {
    fn new(inner: Arc<dyn Backend>) -> HoldWrites {
        HoldWrites {
            inner,
            held: Mutex::new(false),
            changed: Condvar::new(),
            entered: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        }
    }

    fn hold(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.changed.notify_all();
    }
}

impl Backend for HoldWrites {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let g = self.held.lock().unwrap();
        let (g, t) = self
            .changed
            .wait_timeout_while(g, DEADLINE, |held| *held)
            .unwrap();
        assert!(!t.timed_out(), "write never released");
        drop(g);
        let r = self.inner.write_at(buf, offset);
        self.completed.fetch_add(1, Ordering::SeqCst);
        r
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64, keep: bool) -> io::Result<()> {
        self.inner.zero_range(offset, len, keep)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.next_hole(offset)
    }
}

// Goal: a write of session 1 still in the disk completes before session 2's connect
// returns; after that, session 1's requests are refused (FENCED, never reaching the disk),
// session 1 reports a stale session (highest = its own generation), session 2 works, and
// an older session is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_session_drains_and_fences_older_session() {
    let hold = Arc::new(std::sync::OnceLock::<Arc<HoldWrites>>::new());
    let h = Arc::clone(&hold);
    let server = Server::start_with(move |b| {
        let w = Arc::new(HoldWrites::new(b));
        h.set(Arc::clone(&w)).ok();
        w
    })
    .await;
    let disk = Arc::clone(hold.get().unwrap());
    let s1 = server.connect_session(5, 1).await.unwrap();
    assert_eq!(s1.session(), 1);
    assert_eq!(write(&s1, 0, vec![1; 4096]).await, Ok(IoReply::Done));

    disk.hold(true);
    let in_flight = start(
        &s1,
        bw_types::IoRequest::Write {
            offset: 4096,
            data: vec![1; 4096].into(),
            fua: false,
        },
    );
    wait_until("session 1's write reached the disk", || async {
        disk.entered.load(Ordering::SeqCst) == 2
    })
    .await;
    let server_addr = server.addr;
    let connecting = tokio::spawn(async move {
        let opts = peer::ConnectOptions {
            session: 2,
            ..Default::default()
        };
        peer::RemoteReplica::connect(
            server_addr,
            bw_types::NodeId("node-a".into()),
            vol(),
            Generation(5),
            opts,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    if connecting.is_finished() {
        // Say how it ended (a CI run once saw this; the outcome tells a drain bug from a
        // failed connect).
        let outcome = connecting.await.map(|r| r.map(|_| "connected"));
        panic!(
            "session 2 must wait for session 1's write, but its connect ended: {outcome:?} \
             (disk: {} writes entered, {} completed)",
            disk.entered.load(Ordering::SeqCst),
            disk.completed.load(Ordering::SeqCst)
        );
    }
    assert_eq!(
        server.replica.session_floor(),
        2,
        "the floor is raised at once"
    );
    disk.hold(false);
    let s2 = tokio::time::timeout(DEADLINE, connecting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        disk.completed.load(Ordering::SeqCst),
        2,
        "session 1's write was done before session 2 was admitted"
    );
    assert_eq!(
        tokio::time::timeout(DEADLINE, in_flight).await.unwrap(),
        Ok(Ok(IoReply::Done))
    );

    // Session 1's later requests are refused and never reach the disk.
    let err = write(&s1, 0, vec![9; 4096]).await.unwrap_err();
    assert!(
        matches!(&err, IoError::Faulted(m) if m.starts_with("fenced: session 1 of generation 5")),
        "{err:?}"
    );
    assert_eq!(
        s1.fenced(),
        Some(Generation(5)),
        "highest = own generation: stale session"
    );
    assert_eq!(
        s1.state(),
        PeerState::Fenced {
            highest: Generation(5)
        }
    );
    assert_eq!(disk.entered.load(Ordering::SeqCst), 2);
    assert_eq!(s2.fenced(), None);
    assert_filled(&read(&s2, 0, 8192).await, 1);
    assert_eq!(write(&s2, 0, vec![2; 4096]).await, Ok(IoReply::Done));

    // An older session cannot come back.
    let err = server.connect_session(5, 1).await.unwrap_err();
    assert!(err.is_fenced(), "{err}");
    match err {
        peer::ConnectError::Refused {
            code,
            highest,
            message,
            ..
        } => {
            assert_eq!((code, highest), (RefuseCode::StaleSession, Generation(5)));
            assert!(
                message.contains("session 1 of generation 5 < session 2"),
                "{message}"
            );
        }
        other => panic!("{other}"),
    }
    // A newer generation resets the floor: its session 1 is admitted and fences both.
    let g6 = server.connect_session(6, 1).await.unwrap();
    assert_eq!(server.replica.session_floor(), 1);
    assert!(write(&s2, 0, vec![3; 512]).await.is_err());
    assert_eq!(s2.fenced(), Some(Generation(6)));
    assert_filled(&read(&g6, 0, 4096).await, 2);
}

// Goal: READ_META / WRITE_META round trip over TCP, including an empty blob (not "none")
// and a maximal 16 MiB blob; the blob is the one the local replica reads back; an
// over-size blob is refused locally with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_round_trip_remote() {
    let server = Server::start().await;
    let s1 = server.connect_session(3, 1).await.unwrap();
    assert_eq!(s1.read_meta().await, Ok(None));
    s1.write_meta(Vec::new()).await.unwrap();
    assert_eq!(s1.read_meta().await, Ok(Some(Vec::new())));
    let big: Vec<u8> = (0..MAX_META_BYTES).map(|i| (i % 253) as u8).collect();
    s1.write_meta(big.clone()).await.unwrap();
    assert_eq!(
        server.replica.read_repl_meta().unwrap().as_ref(),
        Some(&big)
    );
    assert_eq!(s1.read_meta().await.unwrap().as_ref(), Some(&big));
    let err = s1
        .write_meta(vec![0; MAX_META_BYTES as usize + 1])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        MetaError::TooLarge {
            len: MAX_META_BYTES as usize + 1,
            max: MAX_META_BYTES as usize
        }
    );
    // Data requests still work alongside.
    assert_eq!(write(&s1, 0, vec![7; 512]).await, Ok(IoReply::Done));
    // Session 0 (an old-style connection) of the same generation is below the floor now.
    let err = server
        .connect_with(3, Default::default())
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");
}

// Goal: a connection without a session negotiates v2 with this server and may use the
// metadata requests as long as no session raised the floor of its generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_without_session() {
    let server = Server::start().await;
    let plain = server.connect(2).await;
    assert_eq!(plain.accept().version, PROTOCOL_VERSION);
    plain.write_meta(b"x".to_vec()).await.unwrap();
    assert_eq!(plain.read_meta().await, Ok(Some(b"x".to_vec())));
}

// Goal: WRITE_META is fenced like a write: an older session's and an older generation's
// writes are refused with MetaError::Fenced and leave the blob unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_writes_fenced_by_session_and_generation() {
    let server = Server::start().await;
    let s1 = server.connect_session(4, 1).await.unwrap();
    s1.write_meta(b"from session 1".to_vec()).await.unwrap();
    let s2 = server.connect_session(4, 2).await.unwrap();
    assert_eq!(
        s1.write_meta(b"late".to_vec()).await,
        Err(MetaError::Fenced {
            highest: Generation(4)
        })
    );
    s2.write_meta(b"from session 2".to_vec()).await.unwrap();
    let g5 = server.connect_session(5, 1).await.unwrap();
    assert_eq!(
        s2.write_meta(b"old generation".to_vec()).await,
        Err(MetaError::Fenced {
            highest: Generation(5)
        })
    );
    assert_eq!(g5.read_meta().await, Ok(Some(b"from session 2".to_vec())));
}

// Goal: an over-size WRITE_META (within the frame limit) is a per-request ERROR INVALID:
// its body is skipped and the connection goes on (raw protocol bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_write_meta_is_refused_per_request() {
    let server = Server::start().await;
    let mut hello = Vec::new();
    peer_proto::encode_hello(
        &mut hello,
        &peer_proto::Hello {
            min_version: 2,
            max_version: 2,
            generation: Generation(1),
            features: 0,
            node_id: bw_types::NodeId("raw".into()),
            volume_id: vol(),
            session: 1,
        },
    );
    let (mut s, answer) = raw::handshake(server.addr, &hello).await;
    assert!(matches!(answer, ServerAnswer::Accept(a) if a.version == 2));
    let len = MAX_META_BYTES + 1;
    let h = FrameHeader {
        kind: MSG_WRITE_META,
        flags: 0,
        body_len: len,
        id: 1,
        offset: 0,
        length: len.into(),
    };
    let mut out = h.to_bytes().to_vec();
    out.resize(out.len() + len as usize, 0xaa);
    peer_proto::Request::ReadMeta.header(2).encode(&mut out);
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let (h1, body) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(h1.id, 1);
    assert_eq!(
        ReplyHead::decode(&h1),
        Ok(ReplyHead::Error {
            code: ErrorCode::Invalid
        })
    );
    assert!(
        parse_message(&body).contains("exceeds the limit"),
        "{}",
        parse_message(&body)
    );
    let (h2, _) = raw::frame(&mut s, &mut buf).await.unwrap();
    assert_eq!(
        (h2.id, ReplyHead::decode(&h2)),
        (
            2,
            Ok(ReplyHead::Meta {
                present: false,
                len: 0
            })
        )
    );
    assert_eq!(server.replica.read_repl_meta().unwrap(), None);
}
