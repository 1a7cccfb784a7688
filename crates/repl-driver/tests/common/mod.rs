//! Test harness: in-process replicas over real files (`store::Replica` on `FileBackend` in a
//! temporary directory), sessions that can be killed, partitions that refuse reconnects,
//! injected I/O errors, a metadata slot per replica, and a catalog with switchable answers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bw_types::{BlockDevice, Generation, IoDone, IoError, IoReply, IoRequest};
use repl_driver::{
    BoxFut, CatalogPort, ConnectError, Connector, DriverOptions, Leg, LegError, ReplicaSpec,
    ReplicatedDevice, StartError,
};
use replication::{CatalogOp, Notice, ReplicaId, ReplicaState, TxnOutcome};
use store::testing::TempDir;
use store::{LocalVolume, Replica, ReplicaDevice, ReplicaOptions, VolumeOptions};
use tokio::sync::{mpsc, oneshot, watch};

/// How long a test waits for something that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub const MIB: u64 = 1 << 20;

/// One replica: a store replica over a file, plus the harness's fault switches.
pub struct TestReplica {
    pub id: ReplicaId,
    pub path: PathBuf,
    pub size: u64,
    pub store: Arc<Replica>,
    /// The replication metadata blob (the store API for it is not used here).
    pub meta: Mutex<Option<Vec<u8>>>,
    /// Partition: connects are refused until then.
    refuse_until: Mutex<Option<Instant>>,
    /// The next write-like request on any session fails with an I/O error.
    fail_next_write: AtomicBool,
    /// Requests on any session are swallowed (never answered) while set: a hung replica.
    hang: AtomicBool,
    /// Completions of swallowed requests, kept so they are never called.
    swallowed: Mutex<Vec<IoDone>>,
    current: Mutex<Option<Arc<TestLeg>>>,
}

impl TestReplica {
    /// Ends the current session (as if the peer died) and refuses reconnects for `for_`.
    pub fn kill(&self, for_: Duration) {
        self.partition(for_);
        if let Some(l) = self.current.lock().unwrap().take() {
            l.end("killed");
        }
    }

    pub fn partition(&self, for_: Duration) {
        *self.refuse_until.lock().unwrap() = Some(Instant::now() + for_);
    }

    pub fn heal(&self) {
        *self.refuse_until.lock().unwrap() = None;
    }

    pub fn set_hang(&self, on: bool) {
        self.hang.store(on, SeqCst);
    }

    pub fn fail_next_write(&self) {
        self.fail_next_write.store(true, SeqCst);
    }

    /// The file's content, padded to the volume size (a sparse tail reads as zeroes).
    pub fn content(&self) -> Vec<u8> {
        let mut v = std::fs::read(&self.path).unwrap();
        v.resize(self.size as usize, 0);
        v
    }
}

/// One session: a fenced device of (generation, session), killable.
pub struct TestLeg {
    shared: Arc<LegShared>,
}

struct LegShared {
    rep: Arc<TestReplica>,
    dev: Arc<ReplicaDevice>,
    generation: Generation,
    closed: watch::Sender<Option<String>>,
}

impl LegShared {
    fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }
}

impl TestLeg {
    fn end(&self, why: &str) {
        self.shared.closed.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some(why.to_string());
            }
            first
        });
    }
}

impl BlockDevice for LegShared {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        if self.is_closed() {
            return done(Err(IoError::Io("session closed".into())));
        }
        let writes = matches!(
            req,
            IoRequest::Write { .. } | IoRequest::Trim { .. } | IoRequest::WriteZeroes { .. }
        );
        if self.rep.hang.load(SeqCst) {
            return self.rep.swallowed.lock().unwrap().push(done);
        }
        if writes && self.rep.fail_next_write.swap(false, SeqCst) {
            return done(Err(IoError::Io("injected I/O error".into())));
        }
        self.dev.submit(req, done);
    }
}

impl Leg for TestLeg {
    fn device(&self) -> Arc<dyn BlockDevice> {
        self.shared.clone()
    }

    fn fenced(&self) -> Option<Generation> {
        let h = self.shared.rep.store.highest();
        (h > self.shared.generation).then_some(h)
    }

    fn read_meta(&self) -> BoxFut<'_, Result<Option<Vec<u8>>, LegError>> {
        Box::pin(async move {
            if let Some(h) = self.fenced() {
                return Err(LegError::Fenced(h));
            }
            if self.shared.is_closed() {
                return Err(LegError::Failed("session closed".into()));
            }
            Ok(self.shared.rep.meta.lock().unwrap().clone())
        })
    }

    fn write_meta(&self, blob: Vec<u8>) -> BoxFut<'_, Result<(), LegError>> {
        Box::pin(async move {
            if let Some(h) = self.fenced() {
                return Err(LegError::Fenced(h));
            }
            if self.shared.is_closed() {
                return Err(LegError::Failed("session closed".into()));
            }
            *self.shared.rep.meta.lock().unwrap() = Some(blob);
            Ok(())
        })
    }

    fn closed(&self) -> BoxFut<'static, String> {
        let mut rx = self.shared.closed.subscribe();
        Box::pin(async move {
            match rx.wait_for(|c| c.is_some()).await {
                Ok(c) => c.clone().unwrap_or_default(),
                Err(_) => "leg dropped".into(),
            }
        })
    }

    fn close(&self) {
        self.end("closed by the driver");
    }
}

/// Opens sessions of one generation to the harness's replicas.
pub struct TestConnector {
    pub replicas: BTreeMap<ReplicaId, Arc<TestReplica>>,
    pub generation: Generation,
    pub connects: Mutex<Vec<(ReplicaId, u64)>>,
}

impl Connector for TestConnector {
    fn connect(
        &self,
        replica: ReplicaId,
        session: u64,
    ) -> BoxFut<'static, Result<Arc<dyn Leg>, ConnectError>> {
        let rep = self.replicas[&replica].clone();
        let generation = self.generation;
        self.connects.lock().unwrap().push((replica, session));
        Box::pin(async move {
            if rep
                .refuse_until
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() < t)
            {
                return Err(ConnectError::Unreachable("partitioned".into()));
            }
            // The store's session admission drains every older session's requests: driver
            // requirement 4.
            let store = rep.store.clone();
            let admitted =
                tokio::task::spawn_blocking(move || store.device_for_session(generation, session))
                    .await
                    .unwrap();
            let dev = match admitted {
                Ok(d) => d,
                Err(store::AdmitError::Fenced(f)) if f.highest > generation => {
                    return Err(ConnectError::Fenced(f.highest))
                }
                Err(e) => return Err(ConnectError::Unreachable(e.to_string())),
            };
            let leg = Arc::new(TestLeg {
                shared: Arc::new(LegShared {
                    rep: rep.clone(),
                    dev: dev.into(),
                    generation,
                    closed: watch::channel(None).0,
                }),
            });
            if let Some(old) = rep.current.lock().unwrap().replace(leg.clone()) {
                old.end("replaced by a newer session");
            }
            Ok(leg as Arc<dyn Leg>)
        })
    }
}

/// How the test catalog answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogMode {
    Normal,
    Unavailable,
    Refuse,
}

pub struct CatalogState {
    pub generation: Generation,
    pub in_sync: BTreeMap<ReplicaId, bool>,
    pub last_in_sync: BTreeMap<ReplicaId, Generation>,
    pub mode: CatalogMode,
    pub log: Vec<(CatalogOp, TxnOutcome)>,
}

pub struct TestCatalog {
    pub state: Mutex<CatalogState>,
}

impl TestCatalog {
    pub fn set_mode(&self, m: CatalogMode) {
        self.state.lock().unwrap().mode = m;
    }

    pub fn committed(&self, op: CatalogOp) -> bool {
        let st = self.state.lock().unwrap();
        st.log
            .iter()
            .any(|(o, r)| *o == op && *r == TxnOutcome::Committed)
    }
}

impl CatalogPort for TestCatalog {
    fn txn(&self, op: CatalogOp) -> BoxFut<'static, TxnOutcome> {
        let mut st = self.state.lock().unwrap();
        let (replica, generation, in_sync) = match op {
            CatalogOp::MarkOutOfSync {
                replica,
                generation,
            } => (replica, generation, false),
            CatalogOp::MarkInSync {
                replica,
                generation,
            } => (replica, generation, true),
        };
        let outcome = match st.mode {
            CatalogMode::Unavailable => TxnOutcome::Unavailable,
            CatalogMode::Refuse => TxnOutcome::Refused,
            CatalogMode::Normal if generation != st.generation => TxnOutcome::Refused,
            CatalogMode::Normal => {
                st.in_sync.insert(replica, in_sync);
                if in_sync {
                    st.last_in_sync.insert(replica, generation);
                }
                TxnOutcome::Committed
            }
        };
        st.log.push((op, outcome));
        Box::pin(async move { outcome })
    }
}

/// Replicas, a catalog, and the options the tests run with.
pub struct Cluster {
    _dir: TempDir,
    pub size: u64,
    pub replicas: BTreeMap<ReplicaId, Arc<TestReplica>>,
    pub catalog: Arc<TestCatalog>,
}

/// Options for fast tests: short timeouts and retries.
pub fn test_options(size: u64) -> DriverOptions {
    let mut o = DriverOptions::new(size);
    o.core.connect_timeout_ms = 2_000;
    o.core.catalog_retry_ms = 100;
    o.core.al_hot_ms = 300;
    o.reconnect_interval = Duration::from_millis(100);
    o.request_timeout = Duration::from_secs(5);
    o
}

impl Cluster {
    pub fn new(label: &str, n: u64, size: u64) -> Cluster {
        let dir = TempDir::new(label).unwrap();
        let mut replicas = BTreeMap::new();
        for i in 0..n {
            let name = format!("r{i}.vol");
            let path = store::create_volume_file(dir.path(), &name, size).unwrap();
            let meta = store::default_meta_path(&path);
            Replica::create_meta(&meta).unwrap();
            let vol = LocalVolume::open(&path, size, VolumeOptions::default()).unwrap();
            let store = Replica::open(vol, &meta, ReplicaOptions::default()).unwrap();
            let r = TestReplica {
                id: ReplicaId(i),
                path,
                size,
                store: Arc::new(store),
                meta: Mutex::new(None),
                refuse_until: Mutex::new(None),
                fail_next_write: AtomicBool::new(false),
                hang: AtomicBool::new(false),
                swallowed: Mutex::new(Vec::new()),
                current: Mutex::new(None),
            };
            replicas.insert(ReplicaId(i), Arc::new(r));
        }
        let catalog = TestCatalog {
            state: Mutex::new(CatalogState {
                generation: Generation(1),
                in_sync: replicas.keys().map(|r| (*r, true)).collect(),
                last_in_sync: replicas.keys().map(|r| (*r, Generation(1))).collect(),
                mode: CatalogMode::Normal,
                log: Vec::new(),
            }),
        };
        Cluster {
            _dir: dir,
            size,
            replicas,
            catalog: Arc::new(catalog),
        }
    }

    pub fn replica(&self, i: u64) -> &Arc<TestReplica> {
        &self.replicas[&ReplicaId(i)]
    }

    /// Starts an attachment of `generation` (the catalog moves to it) from the catalog's
    /// current view.
    pub async fn attach(&self, generation: u64, opts: DriverOptions) -> Attached {
        self.try_attach(generation, opts).await.expect("start")
    }

    pub async fn try_attach(
        &self,
        generation: u64,
        opts: DriverOptions,
    ) -> Result<Attached, StartError> {
        let all: Vec<u64> = self.replicas.keys().map(|r| r.0).collect();
        self.attach_members(generation, opts, &all).await
    }

    /// Attaches with only `members` as the volume's replicas.
    pub async fn attach_members(
        &self,
        generation: u64,
        opts: DriverOptions,
        members: &[u64],
    ) -> Result<Attached, StartError> {
        let generation = Generation(generation);
        let specs = {
            let mut st = self.catalog.state.lock().unwrap();
            st.generation = generation;
            self.replicas
                .keys()
                .filter(|id| members.contains(&id.0))
                .map(|id| ReplicaSpec {
                    id: *id,
                    label: format!("node{}", id.0),
                    local: id.0 == 0,
                    in_sync: st.in_sync[id],
                    last_in_sync_generation: st.last_in_sync[id],
                })
                .collect()
        };
        let connector = Arc::new(TestConnector {
            replicas: self.replicas.clone(),
            generation,
            connects: Mutex::new(Vec::new()),
        });
        let (lease_tx, lease_rx) = watch::channel(false);
        let (ntx, nrx) = mpsc::unbounded_channel();
        let dev = repl_driver::start(
            opts,
            generation,
            specs,
            connector.clone(),
            self.catalog.clone(),
            lease_rx,
            ntx,
        )
        .await?;
        Ok(Attached {
            dev,
            connector,
            lease: lease_tx,
            notices: Mutex::new(nrx),
        })
    }

    /// Asserts every replica holds the same bytes.
    #[track_caller]
    pub fn assert_identical(&self) {
        let first = self.replica(0).content();
        for r in self.replicas.values().skip(1) {
            let other = r.content();
            if let Some(i) = (0..first.len()).find(|i| first[*i] != other[*i]) {
                panic!("replica {} differs from replica 0 at byte {i}", r.id);
            }
        }
    }
}

pub struct Attached {
    pub dev: Arc<ReplicatedDevice>,
    pub connector: Arc<TestConnector>,
    pub lease: watch::Sender<bool>,
    pub notices: Mutex<mpsc::UnboundedReceiver<Notice>>,
}

impl Attached {
    pub fn state(&self, i: u64) -> ReplicaState {
        let st = self.dev.status();
        st.core
            .replicas
            .iter()
            .find(|r| r.id == ReplicaId(i))
            .map(|r| r.state)
            .expect("replica in status")
    }

    /// Waits until replica `i` is in `state`.
    pub async fn wait_state(&self, i: u64, state: ReplicaState) {
        let what = format!("replica {i} {state:?}");
        wait_until(&what, || self.state(i) == state).await;
    }

    pub async fn wait_serving(&self) {
        wait_until("serving", || self.dev.status().core.serving).await;
    }
}

/// Polls `cond` every 10 ms until it holds; panics after [`DEADLINE`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Submits one request and waits for its completion.
pub async fn io(dev: &Arc<ReplicatedDevice>, req: IoRequest) -> Result<IoReply, IoError> {
    let rx = start_io(dev, req);
    tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("completion within the deadline")
        .expect("completion called")
}

/// Submits one request; the receiver yields its completion.
pub fn start_io(
    dev: &Arc<ReplicatedDevice>,
    req: IoRequest,
) -> oneshot::Receiver<Result<IoReply, IoError>> {
    let (tx, rx) = oneshot::channel();
    dev.submit(
        req,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx
}

pub async fn write(dev: &Arc<ReplicatedDevice>, offset: u64, data: Vec<u8>) {
    let r = io(
        dev,
        IoRequest::Write {
            offset,
            data: data.into(),
            fua: false,
        },
    )
    .await;
    assert_eq!(r, Ok(IoReply::Done), "write at {offset}");
}

pub async fn flush(dev: &Arc<ReplicatedDevice>) {
    assert_eq!(io(dev, IoRequest::Flush).await, Ok(IoReply::Done), "flush");
}

/// A tiny deterministic generator (SplitMix64), so failures replay.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random 4 KiB-aligned writes of 4 KiB inside `[lo, hi)`, `depth` at a time, with a
/// flush every 50; returns how many succeeded.
pub async fn write_load(
    dev: &Arc<ReplicatedDevice>,
    rng: &mut Rng,
    (lo, hi): (u64, u64),
    count: usize,
    depth: usize,
) -> usize {
    let mut ok = 0;
    let mut i = 0;
    while i < count {
        let mut batch = Vec::new();
        for _ in 0..depth.min(count - i) {
            let block = (
                lo + rng.below((hi - lo) / 4096) * 4096,
                rng.next() as u8 | 1,
            );
            batch.push(start_io(
                dev,
                IoRequest::Write {
                    offset: block.0,
                    data: vec![block.1; 4096].into(),
                    fua: false,
                },
            ));
            i += 1;
        }
        for rx in batch {
            let r = tokio::time::timeout(DEADLINE, rx).await.unwrap().unwrap();
            ok += usize::from(r == Ok(IoReply::Done));
        }
        if i % 50 < depth {
            let _ = io(dev, IoRequest::Flush).await;
        }
    }
    ok
}
