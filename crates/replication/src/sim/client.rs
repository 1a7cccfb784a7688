//! The simulated client (a VM's disk driver) and the model of what it was promised.
//!
//! Every write writes its own index into each block it covers, so a block's content names
//! the write that produced it. The model keeps, per block, the *floor*: the newest write that
//! was acknowledged and then covered by an acknowledged flush (or was FUA). G1 says every
//! surviving in-sync copy holds the floor or something newer; since overlapping writes are
//! applied in issue order, "newer" is simply a larger index.

use std::collections::BTreeMap;

use crate::ids::{DataHandle, RequestId};
use crate::io::{Completion, Event, RequestError};

use super::rng::Rng;

/// What the client was promised.
#[derive(Debug)]
pub(super) struct Model {
    /// Write index → (first block, block count); index 0 is the initial (zero) content.
    writes: Vec<(usize, usize)>,
    /// Per block: the newest write index that must survive (G1).
    pub floor: Vec<u64>,
}

impl Model {
    pub fn new(blocks: usize) -> Model {
        Model {
            writes: vec![(0, blocks)],
            floor: vec![0; blocks],
        }
    }

    fn new_write(&mut self, first: usize, n: usize) -> u64 {
        self.writes.push((first, n));
        (self.writes.len() - 1) as u64
    }

    /// Write `idx` is durable: raise the floor of its blocks.
    fn durable(&mut self, idx: u64) {
        let (first, n) = self.writes[idx as usize];
        for b in first..first + n {
            self.floor[b] = self.floor[b].max(idx);
        }
    }

    /// Block `b` reads `v`: it must be a write that covered `b`, no older than `floor`.
    pub fn check_block(&self, b: usize, v: u64, floor: u64) -> Result<(), String> {
        let Some(&(first, n)) = self.writes.get(v as usize) else {
            return Err(format!("block {b} holds {v}, which was never written"));
        };
        if v != 0 && !(first..first + n).contains(&b) {
            return Err(format!(
                "block {b} holds write {v}, which covered blocks {first}..{}",
                first + n
            ));
        }
        if v < floor {
            return Err(format!(
                "block {b} holds write {v} but write {floor} was acknowledged durable"
            ));
        }
        Ok(())
    }

    /// Every block of `view` holds its floor or newer.
    pub fn check_view(&self, view: &[u64]) -> Result<(), String> {
        for (b, v) in view.iter().enumerate() {
            self.check_block(b, *v, self.floor[b])?;
        }
        Ok(())
    }
}

/// A request the client is waiting for.
#[derive(Debug)]
enum Pending {
    Write {
        idx: u64,
        fua: bool,
    },
    /// The writes acknowledged before the flush was issued: durable once it succeeds.
    Flush {
        covers: Vec<u64>,
    },
    /// The floor of the range when the read was issued: the read must return at least that.
    Read {
        first: usize,
        floor: Vec<u64>,
    },
}

/// One attachment's client.
#[derive(Debug, Default)]
pub(super) struct Client {
    next_req: u64,
    pending: BTreeMap<RequestId, Pending>,
    /// Acknowledged writes no flush has covered yet.
    acked_unflushed: Vec<u64>,
}

/// Most requests a client keeps in flight (a guest's queue depth).
const CLIENT_QUEUE_DEPTH: usize = 8;
/// Largest write, in blocks.
const MAX_WRITE_BLOCKS: u64 = 6;

impl Client {
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Maybe issues one request; returns the event to feed the attachment.
    pub fn issue(&mut self, rng: &mut Rng, model: &mut Model, block_size: u64) -> Option<Event> {
        if self.pending.len() >= CLIENT_QUEUE_DEPTH || !rng.chance(500_000) {
            return None;
        }
        self.next_req += 1;
        let req = RequestId(self.next_req);
        let blocks = model.floor.len() as u64;
        let roll = rng.below(100);
        if roll < 60 {
            let n = rng.range(1, MAX_WRITE_BLOCKS);
            let first = rng.below(blocks - n + 1);
            let idx = model.new_write(first as usize, n as usize);
            let fua = rng.chance(100_000);
            self.pending.insert(req, Pending::Write { idx, fua });
            let (offset, len) = (first * block_size, n * block_size);
            Some(Event::Write {
                req,
                offset,
                len,
                data: DataHandle(idx),
                fua,
            })
        } else if roll < 80 {
            Some(self.flush(req))
        } else {
            let n = rng.range(1, MAX_WRITE_BLOCKS);
            let first = rng.below(blocks - n + 1) as usize;
            let floor = model.floor[first..first + n as usize].to_vec();
            self.pending.insert(req, Pending::Read { first, floor });
            Some(Event::Read {
                req,
                offset: first as u64 * block_size,
                len: n * block_size,
            })
        }
    }

    /// A flush covering every write acknowledged so far.
    pub fn flush(&mut self, req: RequestId) -> Event {
        let covers = std::mem::take(&mut self.acked_unflushed);
        self.pending.insert(req, Pending::Flush { covers });
        Event::Flush { req }
    }

    pub fn next_req(&mut self) -> RequestId {
        self.next_req += 1;
        RequestId(self.next_req)
    }

    /// The attachment answered `req`; `read` resolves a read's data handle to its blocks.
    /// Returns true for a successful flush (the end-of-run flush waits for one).
    pub fn reply(
        &mut self,
        req: RequestId,
        result: &Result<Completion, RequestError>,
        model: &mut Model,
        read: impl FnOnce(DataHandle) -> Vec<u64>,
    ) -> Result<bool, String> {
        let Some(p) = self.pending.remove(&req) else {
            return Err(format!("reply to {req}, which is not pending"));
        };
        match (p, result) {
            (Pending::Write { idx, fua }, Ok(Completion::Written)) => {
                self.acked_unflushed.push(idx);
                if fua {
                    model.durable(idx);
                }
            }
            (Pending::Flush { covers }, Ok(Completion::Flushed)) => {
                for idx in covers {
                    model.durable(idx);
                }
                return Ok(true);
            }
            // A failed flush promises nothing: its writes wait for a later one.
            (Pending::Flush { mut covers }, Err(_)) => self.acked_unflushed.append(&mut covers),
            (Pending::Read { first, floor }, Ok(Completion::Data(h))) => {
                let vals = read(*h);
                for (i, (v, f)) in vals.iter().zip(&floor).enumerate() {
                    model
                        .check_block(first + i, *v, *f)
                        .map_err(|e| format!("read {req}: {e}"))?;
                }
            }
            (_, Err(_)) => {}
            (p, Ok(c)) => return Err(format!("{req}: {p:?} completed as {c:?}")),
        }
        Ok(false)
    }
}
