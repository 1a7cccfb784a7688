//! Throughput of remote attach over loopback: RemoteReplica (1 and 2 connections) → peer
//! server → Replica → LocalVolume, next to the same LocalVolume driven directly.
//!
//! Jobs: 1 MiB sequential writes at QD1 and QD8 (256 MiB each), 4 KiB random writes at
//! QD32 (100 000 within 1 GiB). No flush inside the timed part: this measures the data
//! path's per-request and per-byte cost, not the disk (both sides write to the page cache).
//!
//! Run: `cargo run --release -p peer --example remote_bench [dir]` (the volume file goes
//! into `dir`, default the system temp dir).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bw_types::{BlockDevice, Generation, IoRequest, NodeId, VolumeId};
use peer::{ConnectOptions, PeerStats, ProviderError, RemoteReplica, ReplicaProvider};
use store::{LocalVolume, Replica, ReplicaOptions};
use tokio::sync::{watch, Semaphore};

const VOLUME_BYTES: u64 = 1 << 30;

struct One(Arc<Replica>);

impl ReplicaProvider for One {
    fn open(&self, _: &VolumeId) -> Result<Arc<Replica>, ProviderError> {
        Ok(Arc::clone(&self.0))
    }
}

/// Keeps `qd` requests in flight until `count` were submitted, then waits for all.
async fn drive(
    dev: &Arc<dyn BlockDevice>,
    qd: usize,
    count: u64,
    mut next: impl FnMut(u64) -> IoRequest,
) -> Duration {
    let slots = Arc::new(Semaphore::new(qd));
    let began = Instant::now();
    for i in 0..count {
        let permit = Arc::clone(&slots).acquire_owned().await.unwrap();
        dev.submit(
            next(i),
            Box::new(move |r| {
                r.expect("request failed");
                drop(permit);
            }),
        );
    }
    let _all = slots.acquire_many(qd as u32).await.unwrap();
    began.elapsed()
}

/// Runs `f` `ROUNDS` times and returns the median rate.
async fn median<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        rates.push(f().await);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    rates[ROUNDS / 2]
}

/// Each job runs this many times; the median is reported (the machine is shared and noisy).
const ROUNDS: usize = 5;

async fn jobs(name: &str, dev: Arc<dyn BlockDevice>) {
    let mib = 1u64 << 20;
    for qd in [1, 8] {
        let n = 512;
        let mb_s = median(|| async {
            let t = drive(&dev, qd, n, |i| IoRequest::Write {
                offset: (i * mib) % VOLUME_BYTES,
                data: vec![i as u8; mib as usize].into(),
                fua: false,
            })
            .await;
            (n * mib) as f64 / t.as_secs_f64() / 1e6
        })
        .await;
        println!("{name:<22} 1 MiB seq write QD{qd:<2}  {mb_s:8.0} MB/s");
    }
    let n = 100_000;
    let iops = median(|| async {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let t = drive(&dev, 32, n, |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            IoRequest::Write {
                offset: (x % (VOLUME_BYTES / 4096)) * 4096,
                data: vec![0x5a; 4096].into(),
                fua: false,
            }
        })
        .await;
        n as f64 / t.as_secs_f64()
    })
    .await;
    println!("{name:<22} 4 KiB rand write QD32 {iops:8.0} IOPS");
}

/// The wire's own limit for comparison: 1 MiB writes over one loopback TCP connection into
/// a reader that discards them.
async fn raw_tcp() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while s.read(&mut buf).await.unwrap() > 0 {}
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = vec![7u8; 1 << 20];
    let n = 2048u64;
    let began = Instant::now();
    for _ in 0..n {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    sink.await.unwrap();
    let mb_s = (n << 20) as f64 / began.elapsed().as_secs_f64() / 1e6;
    println!(
        "{:<22} 1 MiB writes           {mb_s:8.0} MB/s",
        "raw TCP loopback"
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let base = std::env::args()
            .nth(1)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("peer-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = store::create_volume_file(&dir, "bench.img", VOLUME_BYTES).unwrap();
        let meta = store::default_meta_path(&path);
        Replica::create_meta(&meta).unwrap();
        let volume = LocalVolume::open(&path, VOLUME_BYTES, Default::default()).unwrap();
        let replica = Arc::new(Replica::open(volume, &meta, ReplicaOptions::default()).unwrap());

        // Warm the page cache and allocate the file once, so every run writes over data.
        let local: Arc<dyn BlockDevice> = replica.device_for(Generation(1)).unwrap();
        drive(&local, 8, VOLUME_BYTES >> 20, |i| IoRequest::Write {
            offset: i << 20,
            data: vec![1; 1 << 20].into(),
            fua: false,
        })
        .await;
        raw_tcp().await;
        jobs("LocalVolume (fenced)", local).await;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let server = tokio::spawn(peer::serve(
            listener,
            Arc::new(One(Arc::clone(&replica))),
            Arc::new(PeerStats::new()),
            rx,
        ));
        for connections in [1, 2] {
            let opts = ConnectOptions {
                connections,
                ..Default::default()
            };
            let remote = RemoteReplica::connect(
                addr,
                NodeId("bench".into()),
                VolumeId("bench".into()),
                Generation(1),
                opts,
            )
            .await
            .unwrap();
            jobs(&format!("RemoteReplica x{connections}"), Arc::new(remote)).await;
        }
        stop.send(true).unwrap();
        server.await.unwrap();
        drop(replica);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
