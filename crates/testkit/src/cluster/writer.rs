//! A timestamped NBD writer for fault tests: writes self-describing blocks (writer tag,
//! sequence number, block index) with FUA, one at a time, and records when each write was
//! acknowledged and when the first error came. Fencing tests compare these instants with the
//! moment another node took over; the tag tells later readers whose write a block holds.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::nbd::NbdClient;

/// Bytes per block written.
pub const BLOCK: usize = 4096;

/// One acknowledged write.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub seq: u64,
    pub block: u64,
    /// When the write was sent and when its reply came.
    pub sent: Instant,
    pub acked: Instant,
}

/// What a writer did, returned when it stops.
#[derive(Debug)]
pub struct WriterReport {
    pub acks: Vec<Ack>,
    /// When the first failed request was sent and answered, and the error.
    pub first_error: Option<(Instant, Instant, String)>,
    /// Read-back mismatches (block, what was expected, what was read).
    pub mismatches: Vec<String>,
    /// The connection, if it was opened (kept so a test can try it again later).
    pub client: Option<NbdClient>,
}

impl WriterReport {
    pub fn last_ack(&self) -> Option<Instant> {
        self.acks.last().map(|a| a.acked)
    }
}

/// A background writer; stops at the first error or when told to.
#[derive(Debug)]
pub struct TimedWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    handle: Option<JoinHandle<WriterReport>>,
}

/// Encodes block `block` of write `seq` by writer `tag`.
pub fn encode(tag: &[u8; 8], seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(tag);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (seq as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    b
}

/// Decodes a block written by [`encode`]: (tag, seq, block), or `None` for anything else
/// (zeroes, torn or foreign data).
pub fn decode(b: &[u8]) -> Option<([u8; 8], u64, u64)> {
    if b.len() != BLOCK {
        return None;
    }
    let tag: [u8; 8] = b[..8].try_into().ok()?;
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let block = u64::from_le_bytes(b[16..24].try_into().ok()?);
    (encode(&tag, seq, block) == b).then_some((tag, seq, block))
}

impl TimedWriter {
    /// Connects to `uri` and writes blocks `0..blocks` round-robin (block = seq % blocks),
    /// each with FUA; every `verify_every`-th write (0: never) is read back and checked.
    pub fn start(uri: &str, tag: [u8; 8], blocks: u64, verify_every: u64) -> TimedWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let (s, a, f) = (Arc::clone(&stop), Arc::clone(&acked), Arc::clone(&failed));
        let uri = uri.to_owned();
        let handle = std::thread::spawn(move || {
            let mut report = WriterReport {
                acks: Vec::new(),
                first_error: None,
                mismatches: Vec::new(),
                client: None,
            };
            let t = Instant::now();
            let mut client = match NbdClient::connect_uri(&uri) {
                Ok(c) => c,
                Err(e) => {
                    report.first_error = Some((t, Instant::now(), format!("connect: {e}")));
                    f.store(true, Ordering::SeqCst);
                    return report;
                }
            };
            let mut seq = 0u64;
            while !s.load(Ordering::SeqCst) {
                let block = seq % blocks;
                let data = encode(&tag, seq, block);
                let sent = Instant::now();
                let r = client.write(block * BLOCK as u64, &data, true);
                let acked_at = Instant::now();
                let r = r.and_then(|()| {
                    if verify_every > 0 && seq.is_multiple_of(verify_every) {
                        let back = client.read(block * BLOCK as u64, BLOCK as u32)?;
                        if back != data {
                            report.mismatches.push(format!(
                                "block {block}: wrote seq {seq}, read {:?}",
                                decode(&back)
                            ));
                        }
                    }
                    Ok(())
                });
                match r {
                    Ok(()) => {
                        report.acks.push(Ack {
                            seq,
                            block,
                            sent,
                            acked: acked_at,
                        });
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        report.first_error = Some((sent, Instant::now(), e.to_string()));
                        f.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                seq += 1;
            }
            report.client = Some(client);
            report
        });
        TimedWriter {
            stop,
            acked,
            failed,
            handle: Some(handle),
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Whether the writer has hit an error (and stopped).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Whether the writer thread has ended (error, or stopped).
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits until at least `n` more writes are acknowledged; false on timeout or error.
    pub fn wait_progress(&self, n: u64, timeout: Duration) -> bool {
        let target = self.acked() + n;
        crate::wait::wait_until(timeout, || self.acked() >= target || self.failed())
            && self.acked() >= target
    }

    /// Stops the writer and returns its report (the thread finishes its current request,
    /// which the client's socket timeout bounds).
    pub fn stop(mut self) -> WriterReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("writer thread panicked")
    }
}

impl Drop for TimedWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_foreign_data_is_rejected() {
        let b = encode(b"GEN-A   ", 77, 5);
        assert_eq!(decode(&b), Some((*b"GEN-A   ", 77, 5)));
        assert_eq!(decode(&vec![0u8; BLOCK]), None);
        let mut torn = b.clone();
        torn[BLOCK - 1] ^= 1;
        assert_eq!(decode(&torn), None);
    }
}
