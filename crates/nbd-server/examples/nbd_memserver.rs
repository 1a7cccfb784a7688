//! Serves one in-memory volume over NBD, for benchmarks against other servers:
//! `cargo run --release -p nbd-server --example nbd_memserver -- 127.0.0.1:10809 1073741824`
//! then e.g. `fio --ioengine=nbd --uri=nbd://127.0.0.1:10809/vol ...`. A third argument
//! `null` serves a device that does nothing (reads return zeroes), to measure the server's
//! own per-request cost against e.g. `qemu-nbd --image-opts driver=null-co,...`.

use std::sync::Arc;

#[path = "../tests/server/devices.rs"]
#[allow(dead_code)]
mod devices;
#[path = "../tests/server/harness.rs"]
#[allow(dead_code)]
mod harness;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let size: u64 = args
        .next()
        .map_or(1 << 30, |s| s.parse().expect("size in bytes"));
    let exports = harness::TestExports::default();
    if args.next().as_deref() == Some("null") {
        exports.add("vol", Arc::new(NullDevice(size)), false);
    } else {
        exports.add("vol", devices::MemDevice::new(size), false);
    }
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    eprintln!("serving nbd://{addr}/vol ({size} bytes)");
    nbd_server::serve_tcp(
        listener,
        Arc::new(exports),
        Arc::new(nbd_server::ServerStats::new()),
        rx,
    )
    .await;
}

/// Completes every request at once; reads return zeroes.
struct NullDevice(u64);

impl bw_types::BlockDevice for NullDevice {
    fn size_bytes(&self) -> u64 {
        self.0
    }

    fn submit(&self, req: bw_types::IoRequest, done: bw_types::IoDone) {
        use bw_types::{Extent, IoReply, IoRequest};
        done(Ok(match req {
            IoRequest::Read { len, .. } => IoReply::Data(vec![0; len as usize]),
            IoRequest::BlockStatus { len, .. } => IoReply::Extents(vec![Extent {
                len,
                hole: true,
                zero: true,
            }]),
            _ => IoReply::Done,
        }))
    }
}
