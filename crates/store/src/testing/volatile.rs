//! [`VolatileBackend`]: an in-memory disk with a volatile write cache that can "crash".

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::backend::Backend;

/// Granularity of the simulated disk: allocation, holes and crash loss work on pages of this
/// size (the block size of ext4 and XFS).
pub const VOLATILE_PAGE_BYTES: u64 = 4096;
const PAGE: u64 = VOLATILE_PAGE_BYTES;

type Page = Box<[u8]>;

#[derive(Default)]
struct State {
    /// What reads see now: present pages are allocated ("data"), absent ones are holes.
    pages: BTreeMap<u64, Page>,
    len: u64,
    /// What survives a crash: the state as of the last completed `sync_data`.
    durable_pages: BTreeMap<u64, Page>,
    durable_len: u64,
    /// Page indexes changed since the last sync.
    dirty: BTreeSet<u64>,
}

/// An in-memory sparse "file" that keeps every change since the last [`Backend::sync_data`]
/// in a volatile cache. [`VolatileBackend::crash`] throws that cache away, so tests can check
/// that everything a completed flush covered survives and nothing else is relied on.
#[derive(Default)]
pub struct VolatileBackend {
    state: Mutex<State>,
    syncs: AtomicU64,
}

impl std::fmt::Debug for VolatileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock().unwrap();
        f.debug_struct("VolatileBackend")
            .field("len", &s.len)
            .field("pages", &s.pages.len())
            .field("dirty", &s.dirty.len())
            .finish()
    }
}

impl VolatileBackend {
    pub fn new() -> VolatileBackend {
        VolatileBackend::default()
    }

    /// Power loss: every change since the last completed sync is lost.
    pub fn crash(&self) {
        self.crash_keeping(|_| false);
    }

    /// Power loss where the disk had already written some cached pages: `keep(page_offset)`
    /// decides, per page changed since the last sync, whether its new content survived.
    pub fn crash_keeping(&self, mut keep: impl FnMut(u64) -> bool) {
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        let mut len = s.durable_len;
        for idx in std::mem::take(&mut s.dirty) {
            if keep(idx * PAGE) {
                persist_page(&s.pages, &mut s.durable_pages, idx);
                if s.pages.contains_key(&idx) {
                    len = len.max(((idx + 1) * PAGE).min(s.len));
                }
            }
        }
        s.durable_len = len;
        s.durable_pages.retain(|idx, _| idx * PAGE < len);
        s.pages = s.durable_pages.clone();
        s.len = len;
    }

    /// Number of completed `sync_data` calls.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Number of allocated pages (for checking that punching deallocates).
    pub fn allocated_pages(&self) -> usize {
        self.state.lock().unwrap().pages.len()
    }
}

fn persist_page(pages: &BTreeMap<u64, Page>, durable: &mut BTreeMap<u64, Page>, idx: u64) {
    match pages.get(&idx) {
        Some(p) => durable.insert(idx, p.clone()),
        None => durable.remove(&idx),
    };
}

/// Calls `f(page_index, range_within_page, range_within_request)` for each page touched by
/// `len` bytes at `offset`.
fn for_pages(offset: u64, len: u64, mut f: impl FnMut(u64, std::ops::Range<usize>, usize)) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let idx = pos / PAGE;
        let start = (pos % PAGE) as usize;
        let stop = ((end - idx * PAGE).min(PAGE)) as usize;
        f(idx, start..stop, (pos - offset) as usize);
        pos = idx * PAGE + stop as u64;
    }
}

impl State {
    fn page_mut(&mut self, idx: u64) -> &mut Page {
        self.dirty.insert(idx);
        self.pages
            .entry(idx)
            .or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice())
    }

    fn deallocate(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.len);
        if offset >= end {
            return;
        }
        for_pages(offset, end - offset, |idx, r, _| {
            if r.len() == PAGE as usize {
                self.pages.remove(&idx);
                self.dirty.insert(idx);
            } else if self.pages.contains_key(&idx) {
                self.page_mut(idx)[r].fill(0);
            }
        });
    }
}

impl Backend for VolatileBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock().unwrap();
        for_pages(offset, buf.len() as u64, |idx, r, at| {
            let dst = &mut buf[at..at + r.len()];
            match s.pages.get(&idx) {
                Some(p) if idx * PAGE < s.len => dst.copy_from_slice(&p[r]),
                _ => dst.fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        for_pages(offset, buf.len() as u64, |idx, r, at| {
            let n = r.len();
            s.page_mut(idx)[r].copy_from_slice(&buf[at..at + n]);
        });
        s.len = s.len.max(offset + buf.len() as u64);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.state.lock().unwrap().deallocate(offset, len);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if !keep_allocated {
            s.deallocate(offset, len);
            return Ok(());
        }
        for_pages(offset, len, |idx, r, _| s.page_mut(idx)[r].fill(0));
        s.len = s.len.max(offset + len);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        for idx in std::mem::take(&mut s.dirty) {
            persist_page(&s.pages, &mut s.durable_pages, idx);
        }
        s.durable_len = s.len;
        s.durable_pages.retain(|idx, _| idx * PAGE < s.len);
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if len < s.len {
            let old = s.len;
            s.deallocate(len, old - len);
            let dropped: Vec<u64> = s
                .pages
                .range(len.div_ceil(PAGE)..)
                .map(|(k, _)| *k)
                .collect();
            for idx in dropped {
                s.pages.remove(&idx);
                s.dirty.insert(idx);
            }
        }
        s.len = len;
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let s = self.state.lock().unwrap();
        if offset >= s.len {
            return Ok(None);
        }
        let first = s.pages.range(offset / PAGE..).next().map(|(idx, _)| *idx);
        Ok(first
            .map(|idx| (idx * PAGE).max(offset))
            .filter(|&at| at < s.len))
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        let s = self.state.lock().unwrap();
        let mut idx = offset / PAGE;
        while s.pages.contains_key(&idx) && idx * PAGE < s.len {
            idx += 1;
        }
        Ok((idx * PAGE).max(offset).min(s.len.max(offset)))
    }
}
