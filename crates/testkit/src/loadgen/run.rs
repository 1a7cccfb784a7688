//! Running the load over NBD: [`write`] and [`verify`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::block::{check_block, encode, Violation};
use super::state::State;
use crate::nbd::{consts::*, ClientError, NbdClient};
use crate::rng::SplitMix64;

/// Upper bound on the number of blocks (the state file holds 8 bytes per block and is
/// rewritten at every flush: 1 Mi blocks = 8 MiB per flush is already slow).
pub const MAX_BLOCKS: u64 = 1 << 20;
/// Upper bound on requests in flight.
pub const MAX_QUEUE_DEPTH: usize = 256;
/// How much `verify` reads per request.
const VERIFY_CHUNK: u32 = 1 << 20;
/// How many violations a report keeps in full (the count is always exact).
const MAX_REPORTED: usize = 100;

#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// `nbd://host:port/export`.
    pub uri: String,
    pub state_path: PathBuf,
    pub block_size: u32,
    /// Blocks to cover from offset 0; `None` = the whole export.
    pub blocks: Option<u64>,
    /// A FLUSH after this many WRITEs have been sent.
    pub flush_every: u64,
    pub queue_depth: usize,
    /// Stop sending new writes after this long (then drain, flush, save).
    pub duration: Duration,
    /// Stop after this many writes (whichever comes first).
    pub max_writes: Option<u64>,
    pub seed: u64,
    /// Incremented after every completed FLUSH whose state was saved (for tests that kill the
    /// server once enough flushes are durable).
    pub flushes_done: Option<Arc<AtomicU64>>,
}

impl WriteOptions {
    pub fn new(uri: impl Into<String>, state_path: impl Into<PathBuf>) -> Self {
        Self {
            uri: uri.into(),
            state_path: state_path.into(),
            block_size: 4096,
            blocks: None,
            flush_every: 64,
            queue_depth: 8,
            duration: Duration::from_secs(10),
            max_writes: None,
            seed: 1,
            flushes_done: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WriteSummary {
    pub seed: u64,
    pub blocks: u64,
    pub writes_sent: u64,
    pub writes_acked: u64,
    pub flushes: u64,
    pub elapsed: Duration,
    /// Set when the run ended early: the transport failed or the server returned an error.
    pub error: Option<String>,
    /// The error was the connection going away (expected when the test kills the server).
    pub connection_lost: bool,
}

impl std::fmt::Display for WriteSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "seed {:#x}: {} writes sent, {} acked, {} flushes completed over {} blocks in {:.1} s ({:.0} writes/s)",
            self.seed,
            self.writes_sent,
            self.writes_acked,
            self.flushes,
            self.blocks,
            secs,
            self.writes_acked as f64 / secs
        )?;
        if let Some(e) = &self.error {
            write!(f, "; stopped by: {e}")?;
        }
        Ok(())
    }
}

fn is_connection_loss(e: &ClientError) -> bool {
    use std::io::ErrorKind::*;
    matches!(e, ClientError::Io(io) if matches!(
        io.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | ConnectionRefused
    ))
}

fn geometry(client: &NbdClient, block_size: u32, blocks: Option<u64>) -> Result<u64, String> {
    if (block_size as usize) < super::block::MIN_BLOCK_SIZE || !block_size.is_multiple_of(512) {
        return Err(format!("block size {block_size} must be a multiple of 512"));
    }
    let fit = client.size() / u64::from(block_size);
    let blocks = blocks.unwrap_or(fit);
    if blocks > fit {
        return Err(format!(
            "{blocks} blocks of {block_size} bytes do not fit in the export ({} bytes)",
            client.size()
        ));
    }
    if blocks == 0 || blocks > MAX_BLOCKS {
        return Err(format!("block count {blocks} outside 1..={MAX_BLOCKS}"));
    }
    Ok(blocks)
}

/// Runs the write load. `Err` only for setup problems (cannot connect, bad geometry); a run
/// cut short by the server is `Ok` with `summary.error` set.
pub fn write(opts: &WriteOptions) -> Result<WriteSummary, String> {
    let start = Instant::now();
    let mut client = NbdClient::connect_uri(&opts.uri).map_err(|e| format!("{}: {e}", opts.uri))?;
    let blocks = geometry(&client, opts.block_size, opts.blocks)?;
    if client.export().flags & FLAG_SEND_FLUSH == 0 {
        return Err("export does not advertise NBD_FLAG_SEND_FLUSH".into());
    }
    let qd = opts
        .queue_depth
        .clamp(1, MAX_QUEUE_DEPTH)
        .min((blocks / 2).max(1) as usize);
    let mut state = State::new(opts.block_size, blocks, opts.seed);
    state
        .save(&opts.state_path)
        .map_err(|e| format!("{}: {e}", opts.state_path.display()))?;

    let mut sum = WriteSummary {
        seed: opts.seed,
        blocks,
        ..Default::default()
    };
    let result = write_loop(&mut client, opts, qd, &mut state, &mut sum, start);
    sum.elapsed = start.elapsed();
    match result {
        Ok(()) => {
            let _ = client.disconnect();
        }
        Err(e) => {
            sum.connection_lost = is_connection_loss(&e);
            sum.error = Some(e.to_string());
        }
    }
    Ok(sum)
}

fn write_loop(
    client: &mut NbdClient,
    opts: &WriteOptions,
    qd: usize,
    state: &mut State,
    sum: &mut WriteSummary,
    start: Instant,
) -> Result<(), ClientError> {
    let blocks = state.blocks();
    let bs = opts.block_size as usize;
    let mut rng = SplitMix64::new(opts.seed);
    // Newest acked seq per block; a FLUSH snapshots it when sent.
    let mut acked = vec![0u64; blocks as usize];
    let mut busy = vec![false; blocks as usize];
    // handle → (block, seq) for writes; the one FLUSH in flight with its snapshot.
    let mut writes: std::collections::HashMap<u64, (u64, u64)> = Default::default();
    let mut flush: Option<(u64, Vec<u64>, u64)> = None;
    let mut seq = 0u64;
    let mut since_flush = 0u64;
    let mut buf = vec![0u8; bs];
    let mut draining = false;
    let mut final_flush_sent = false;
    loop {
        let stop = start.elapsed() >= opts.duration
            || opts.max_writes.is_some_and(|m| sum.writes_sent >= m);
        if stop && !draining {
            draining = true;
        }
        // Fill the queue.
        while !draining && client.in_flight() < qd {
            if since_flush >= opts.flush_every.max(1) && flush.is_none() {
                let h = client.submit(CMD_FLUSH, 0, 0, 0, &[])?;
                flush = Some((h, acked.clone(), sum.writes_acked));
                since_flush = 0;
                continue;
            }
            let block = loop {
                let b = rng.below(blocks);
                if !busy[b as usize] {
                    break b;
                }
            };
            seq += 1;
            encode(&mut buf, opts.seed, block, seq);
            let h = client.submit(CMD_WRITE, 0, block * bs as u64, bs as u32, &buf)?;
            busy[block as usize] = true;
            writes.insert(h, (block, seq));
            sum.writes_sent += 1;
            since_flush += 1;
        }
        if draining && writes.is_empty() && flush.is_none() {
            if final_flush_sent {
                return Ok(());
            }
            // Everything acked: one last FLUSH makes the whole run durable.
            let h = client.submit(CMD_FLUSH, 0, 0, 0, &[])?;
            flush = Some((h, acked.clone(), sum.writes_acked));
            final_flush_sent = true;
        }
        let r = client.receive()?;
        if r.error != 0 {
            return Err(ClientError::Nbd {
                errno: r.error,
                handle: r.handle,
            });
        }
        if let Some((block, s)) = writes.remove(&r.handle) {
            let slot = &mut acked[block as usize];
            *slot = (*slot).max(s);
            busy[block as usize] = false;
            sum.writes_acked += 1;
        } else if flush.as_ref().is_some_and(|f| f.0 == r.handle) {
            let (_, snapshot, writes_acked) = flush.take().expect("checked");
            state.durable = snapshot;
            state.flushes += 1;
            state.writes_acked = writes_acked;
            state
                .save(&opts.state_path)
                .map_err(|e| ClientError::Protocol(format!("saving state: {e}")))?;
            sum.flushes = state.flushes;
            if let Some(c) = &opts.flushes_done {
                c.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub uri: String,
    pub state_path: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub blocks: u64,
    pub flushes: u64,
    pub durable_blocks: u64,
    pub zero_blocks: u64,
    pub written_blocks: u64,
    /// Blocks holding a newer write than the durable one (allowed: written after the flush).
    pub newer_than_durable: u64,
    pub violation_count: u64,
    /// The first violations, in block order.
    pub violations: Vec<Violation>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.violation_count == 0
    }

    fn add(&mut self, r: Result<u64, Violation>, durable: u64) {
        match r {
            Ok(0) => self.zero_blocks += 1,
            Ok(seq) => {
                self.written_blocks += 1;
                if seq > durable {
                    self.newer_than_durable += 1;
                }
            }
            Err(v) => {
                self.violation_count += 1;
                if self.violations.len() < MAX_REPORTED {
                    self.violations.push(v);
                }
            }
        }
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: {} blocks checked after {} flushes: {} durably written, {} zero or from an earlier run, {} written ({} newer than their last flush), {} violations",
            if self.ok() { "VERIFY OK" } else { "VERIFY FAILED" },
            self.blocks,
            self.flushes,
            self.durable_blocks,
            self.zero_blocks,
            self.written_blocks,
            self.newer_than_durable,
            self.violation_count
        )?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        if self.violation_count as usize > self.violations.len() {
            writeln!(
                f,
                "  … and {} more",
                self.violation_count as usize - self.violations.len()
            )?;
        }
        Ok(())
    }
}

fn new_report(state: &State) -> VerifyReport {
    VerifyReport {
        blocks: state.blocks(),
        flushes: state.flushes,
        durable_blocks: state.durable_blocks(),
        ..Default::default()
    }
}

/// Checks an in-memory image (at least `blocks × block_size` bytes) against a state.
pub fn verify_image(image: &[u8], state: &State) -> VerifyReport {
    let bs = state.block_size as usize;
    let mut rep = new_report(state);
    for (i, &durable) in state.durable.iter().enumerate() {
        let b = &image[i * bs..(i + 1) * bs];
        rep.add(check_block(b, state.seed, i as u64, durable), durable);
    }
    rep
}

/// Reads every block of the state's range over NBD and checks it.
pub fn verify(opts: &VerifyOptions) -> Result<VerifyReport, String> {
    let state = State::load(&opts.state_path)?;
    let mut client = NbdClient::connect_uri(&opts.uri).map_err(|e| format!("{}: {e}", opts.uri))?;
    geometry(&client, state.block_size, Some(state.blocks()))?;
    let bs = u64::from(state.block_size);
    let max = client
        .export()
        .block_size
        .map_or(VERIFY_CHUNK, |(_, _, m)| m.min(VERIFY_CHUNK));
    let per_read = (u64::from(max) / bs).max(1);
    let mut rep = new_report(&state);
    let mut block = 0u64;
    while block < state.blocks() {
        let n = per_read.min(state.blocks() - block);
        let data = client
            .read(block * bs, (n * bs) as u32)
            .map_err(|e| format!("reading blocks {block}..{}: {e}", block + n))?;
        for (j, b) in data.chunks(bs as usize).enumerate() {
            let i = block + j as u64;
            let durable = state.durable[i as usize];
            rep.add(check_block(b, state.seed, i, durable), durable);
        }
        block += n;
    }
    let _ = client.disconnect();
    Ok(rep)
}

#[cfg(test)]
mod tests;
