//! Block devices for the tests (doubles below the seam; the real store is another crate).

use std::sync::{Arc, Mutex};

use bw_types::{BlockDevice, Extent, IoDone, IoError, IoReply, IoRequest};

/// Allocation granularity of [`MemDevice`].
pub const PAGE: u64 = 4096;

/// A RAM disk with page-granular allocation tracking, completing inline.
pub struct MemDevice {
    state: Mutex<MemState>,
}

struct MemState {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

impl MemDevice {
    pub fn new(size: u64) -> Arc<MemDevice> {
        let pages = size.div_ceil(PAGE) as usize;
        Arc::new(MemDevice {
            state: Mutex::new(MemState {
                data: vec![0; size as usize],
                allocated: vec![false; pages],
            }),
        })
    }

    pub fn execute(&self, req: IoRequest) -> Result<IoReply, IoError> {
        let mut st = self.state.lock().unwrap();
        let size = st.data.len() as u64;
        let check = |off: u64, len: u64| match off.checked_add(len) {
            Some(end) if end <= size => Ok((off as usize, end as usize)),
            _ => Err(IoError::OutOfRange),
        };
        match req {
            IoRequest::Read { offset, len } => {
                let (a, b) = check(offset, len.into())?;
                Ok(IoReply::Data(st.data[a..b].to_vec()))
            }
            IoRequest::Write { offset, data, .. } => {
                let (a, b) = check(offset, data.len() as u64)?;
                st.data[a..b].copy_from_slice(&data);
                st.mark(a, b, true);
                Ok(IoReply::Done)
            }
            IoRequest::Flush => Ok(IoReply::Done),
            IoRequest::Trim { offset, len, .. }
            | IoRequest::WriteZeroes {
                offset,
                len,
                may_punch: true,
                ..
            } => {
                let (a, b) = check(offset, len)?;
                st.data[a..b].fill(0);
                st.punch(a, b);
                Ok(IoReply::Done)
            }
            IoRequest::WriteZeroes { offset, len, .. } => {
                let (a, b) = check(offset, len)?;
                st.data[a..b].fill(0);
                st.mark(a, b, true);
                Ok(IoReply::Done)
            }
            IoRequest::BlockStatus { offset, len } => {
                let (a, b) = check(offset, len)?;
                Ok(IoReply::Extents(st.extents(a, b)))
            }
        }
    }
}

impl MemState {
    fn mark(&mut self, a: usize, b: usize, v: bool) {
        let p = PAGE as usize;
        for page in a / p..b.div_ceil(p) {
            self.allocated[page] = v;
        }
    }

    /// Deallocates the pages wholly inside `a..b`.
    fn punch(&mut self, a: usize, b: usize) {
        let p = PAGE as usize;
        for page in a.div_ceil(p)..b / p {
            self.allocated[page] = false;
        }
    }

    fn extents(&self, a: usize, b: usize) -> Vec<Extent> {
        let p = PAGE as usize;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = a;
        while pos < b {
            let end = ((pos / p + 1) * p).min(b);
            let hole = !self.allocated[pos / p];
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += (end - pos) as u64,
                _ => out.push(Extent {
                    len: (end - pos) as u64,
                    hole,
                    zero: hole,
                }),
            }
            pos = end;
        }
        out
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.state.lock().unwrap().data.len() as u64
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        done(self.execute(req));
    }
}

/// Holds every request until the test releases them (optionally in reverse order): stages
/// slow devices, out-of-order completion and completions after the client is gone.
pub struct GateDevice {
    pub inner: Arc<MemDevice>,
    held: Mutex<Vec<(IoRequest, IoDone)>>,
    /// Complete automatically, newest first, whenever this many are held (0 = never).
    pub auto_release_reversed_at: usize,
}

impl GateDevice {
    pub fn new(size: u64, auto_release_reversed_at: usize) -> Arc<GateDevice> {
        Arc::new(GateDevice {
            inner: MemDevice::new(size),
            held: Mutex::new(Vec::new()),
            auto_release_reversed_at,
        })
    }

    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Completes every held request, newest first.
    pub fn release_reversed(&self) {
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        for (req, done) in held.into_iter().rev() {
            done(self.inner.execute(req));
        }
    }
}

impl BlockDevice for GateDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        let n = {
            let mut held = self.held.lock().unwrap();
            held.push((req, done));
            held.len()
        };
        if n == self.auto_release_reversed_at {
            self.release_reversed();
        }
    }
}

/// Fails every request with one error.
pub struct FailDevice(pub IoError);

impl BlockDevice for FailDevice {
    fn size_bytes(&self) -> u64 {
        1 << 20
    }

    fn submit(&self, _req: IoRequest, done: IoDone) {
        done(Err(self.0.clone()));
    }
}
