//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bw_types::{BlockDevice, IoError, IoReply, IoRequest};
use store::Backend;

/// How long a test waits for something that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Submits `req` and waits for its completion.
pub fn run(dev: &dyn BlockDevice, req: IoRequest) -> Result<IoReply, IoError> {
    let rx = start(dev, req);
    rx.recv_timeout(DEADLINE)
        .expect("completion within the deadline")
}

/// Submits `req`; the receiver yields its completion.
pub fn start(dev: &dyn BlockDevice, req: IoRequest) -> mpsc::Receiver<Result<IoReply, IoError>> {
    let (tx, rx) = mpsc::channel();
    dev.submit(req, Box::new(move |r| tx.send(r).unwrap()));
    rx
}

pub fn write(dev: &dyn BlockDevice, offset: u64, data: Vec<u8>) {
    assert_eq!(
        run(
            dev,
            IoRequest::Write {
                offset,
                data: data.into(),
                fua: false
            }
        ),
        Ok(IoReply::Done)
    );
}

pub fn read(dev: &dyn BlockDevice, offset: u64, len: u32) -> Vec<u8> {
    match run(dev, IoRequest::Read { offset, len }) {
        Ok(IoReply::Data(d)) => d,
        other => panic!("read failed: {other:?}"),
    }
}

/// Asserts that `data` is `len` copies of `byte` (without printing kilobytes on failure).
#[track_caller]
pub fn assert_filled(data: &[u8], byte: u8, len: usize) {
    assert_eq!(data.len(), len, "length");
    if let Some(i) = data.iter().position(|&b| b != byte) {
        panic!("byte {i} is {} instead of {byte}", data[i]);
    }
}

pub fn flush(dev: &dyn BlockDevice) -> Result<IoReply, IoError> {
    run(dev, IoRequest::Flush)
}

/// A backend whose `sync_data` first syncs `inner` (so the durable snapshot is taken) and
/// then blocks until the test releases it: lets a test hold a sync "in flight".
pub struct GateBackend {
    pub inner: Arc<dyn Backend>,
    /// (syncs entered, syncs released)
    gate: Mutex<(u64, u64)>,
    changed: Condvar,
}

impl GateBackend {
    pub fn new(inner: Arc<dyn Backend>) -> GateBackend {
        GateBackend {
            inner,
            gate: Mutex::new((0, 0)),
            changed: Condvar::new(),
        }
    }

    /// Waits until `n` syncs have entered the gate.
    pub fn wait_entered(&self, n: u64) {
        let g = self.gate.lock().unwrap();
        let (g, t) = self
            .changed
            .wait_timeout_while(g, DEADLINE, |g| g.0 < n)
            .unwrap();
        assert!(!t.timed_out(), "sync {n} never started (entered {})", g.0);
    }

    pub fn entered(&self) -> u64 {
        self.gate.lock().unwrap().0
    }

    /// Lets syncs up to number `n` return.
    pub fn release(&self, n: u64) {
        self.gate.lock().unwrap().1 = n;
        self.changed.notify_all();
    }
}

impl Backend for GateBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64, keep: bool) -> std::io::Result<()> {
        self.inner.zero_range(offset, len, keep)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()?;
        let mut g = self.gate.lock().unwrap();
        g.0 += 1;
        let me = g.0;
        self.changed.notify_all();
        let (_g, t) = self
            .changed
            .wait_timeout_while(g, DEADLINE, |g| g.1 < me)
            .unwrap();
        assert!(!t.timed_out(), "sync {me} was never released");
        Ok(())
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn next_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> std::io::Result<u64> {
        self.inner.next_hole(offset)
    }
}
