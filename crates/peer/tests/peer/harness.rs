//! Shared fixtures: a peer server over replicas on temp files, helpers to run requests
//! through any block device, raw-socket helpers, and `wait_until`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bw_types::{BlockDevice, Generation, IoError, IoReply, IoRequest, NodeId, VolumeId};
use peer::{ConnectOptions, PeerStats, ProviderError, RemoteReplica, ReplicaProvider};
use store::testing::TempDir;
use store::{Backend, FileBackend, LocalVolume, Replica, ReplicaOptions};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long a test waits for something that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(10);
pub const VOLUME_BYTES: u64 = 64 << 20;

/// A provider over a fixed map of replicas.
#[derive(Default)]
pub struct MapProvider(pub Mutex<HashMap<VolumeId, Arc<Replica>>>);

impl ReplicaProvider for MapProvider {
    fn open(&self, volume: &VolumeId) -> Result<Arc<Replica>, ProviderError> {
        self.0
            .lock()
            .unwrap()
            .get(volume)
            .cloned()
            .ok_or_else(|| ProviderError::UnknownVolume(volume.clone()))
    }
}

/// A running peer server with one volume `vol` on a temp file.
pub struct Server {
    pub addr: SocketAddr,
    pub replica: Arc<Replica>,
    pub stats: Arc<PeerStats>,
    pub shutdown: watch::Sender<bool>,
    pub task: JoinHandle<()>,
    pub _dir: TempDir,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(|b| b).await
    }

    /// Starts a server whose volume backend is wrapped by `wrap` (to slow it down or hold
    /// writes). Every write goes to the store's I/O threads (`inline_write_max: 0`): a write
    /// held for seconds inline would block a runtime worker, and a task parked in that
    /// worker's LIFO slot cannot be stolen, which stalled the test's own tasks until the
    /// hold timed out (`newer_session_drains_and_fences_older_session` then saw the drain
    /// "succeed" after the held write had panicked out).
    pub async fn start_with(wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>) -> Server {
        let dir = TempDir::new("peer").unwrap();
        let path = store::create_volume_file(dir.path(), "vol.img", VOLUME_BYTES).unwrap();
        let meta = store::default_meta_path(&path);
        Replica::create_meta(&meta).unwrap();
        let backend = wrap(Arc::new(FileBackend::open(&path).unwrap()));
        let options = store::VolumeOptions {
            inline_write_max: 0,
            ..Default::default()
        };
        let volume = LocalVolume::with_backend(backend, VOLUME_BYTES, options);
        let replica = Arc::new(Replica::open(volume, &meta, ReplicaOptions::default()).unwrap());
        let provider = MapProvider::default();
        provider
            .0
            .lock()
            .unwrap()
            .insert(vol(), Arc::clone(&replica));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(PeerStats::new());
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(peer::serve(
            listener,
            Arc::new(provider),
            Arc::clone(&stats),
            rx,
        ));
        Server {
            addr,
            replica,
            stats,
            shutdown,
            task,
            _dir: dir,
        }
    }

    pub async fn connect(&self, generation: u64) -> RemoteReplica {
        self.connect_with(generation, ConnectOptions::default())
            .await
            .unwrap()
    }

    /// Connects session `session` of `generation`.
    pub async fn connect_session(
        &self,
        generation: u64,
        session: u64,
    ) -> Result<RemoteReplica, peer::ConnectError> {
        let opts = ConnectOptions {
            session,
            ..ConnectOptions::default()
        };
        self.connect_with(generation, opts).await
    }

    pub async fn connect_with(
        &self,
        generation: u64,
        opts: ConnectOptions,
    ) -> Result<RemoteReplica, peer::ConnectError> {
        RemoteReplica::connect(
            self.addr,
            NodeId("node-a".into()),
            vol(),
            Generation(generation),
            opts,
        )
        .await
    }
}

pub fn vol() -> VolumeId {
    VolumeId("vol".into())
}

/// Runs one request through a device and waits (with a deadline) for its completion.
pub async fn run(dev: &dyn BlockDevice, req: IoRequest) -> Result<IoReply, IoError> {
    let rx = start(dev, req);
    tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("completion within the deadline")
        .expect("completion called")
}

/// Submits a request; the receiver yields its completion.
pub fn start(dev: &dyn BlockDevice, req: IoRequest) -> oneshot::Receiver<Result<IoReply, IoError>> {
    let (tx, rx) = oneshot::channel();
    dev.submit(
        req,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx
}

pub async fn write(dev: &dyn BlockDevice, offset: u64, data: Vec<u8>) -> Result<IoReply, IoError> {
    run(
        dev,
        IoRequest::Write {
            offset,
            data: data.into(),
            fua: false,
        },
    )
    .await
}

pub async fn read(dev: &dyn BlockDevice, offset: u64, len: u32) -> Vec<u8> {
    match run(dev, IoRequest::Read { offset, len }).await {
        Ok(IoReply::Data(d)) => d,
        other => panic!("read failed: {other:?}"),
    }
}

/// Asserts that `data` is all `byte` (without printing kilobytes on failure).
#[track_caller]
pub fn assert_filled(data: &[u8], byte: u8) {
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!("byte {i} is {} instead of {byte}", data[i]);
    }
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A backend whose `sync_data` first sleeps (to make flushes slow and reorder replies).
pub struct SlowSync {
    pub inner: Arc<dyn Backend>,
    pub delay: Duration,
}

impl Backend for SlowSync {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64, keep: bool) -> io::Result<()> {
        self.inner.zero_range(offset, len, keep)
    }
    fn sync_data(&self) -> io::Result<()> {
        std::thread::sleep(self.delay);
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

// ----- Raw protocol helpers ------------------------------------------------------------------

pub mod raw {
    use super::*;
    use peer_proto::{
        encode_hello, parse_frame, parse_server_answer, FrameHeader, Hello, ServerAnswer,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub fn hello(generation: u64, volume: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_hello(
            &mut out,
            &Hello {
                min_version: 1,
                max_version: 1,
                generation: Generation(generation),
                features: 0,
                node_id: NodeId("raw".into()),
                volume_id: VolumeId(volume.into()),
                session: 0,
            },
        );
        out
    }

    /// Sends `bytes` and reads the server's handshake answer.
    pub async fn handshake(addr: SocketAddr, bytes: &[u8]) -> (TcpStream, ServerAnswer) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        loop {
            if let Some((answer, _)) = parse_server_answer(&buf).unwrap() {
                return (s, answer);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(DEADLINE, s.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "server closed before answering");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads one frame (header and body).
    pub async fn frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(FrameHeader, Vec<u8>)> {
        loop {
            if let Some(((h, body), n)) = parse_frame(buf).unwrap() {
                let body = body.to_vec();
                buf.drain(..n);
                return Some((h, body));
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(DEADLINE, s.read(&mut chunk))
                .await
                .unwrap()
                .ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}
