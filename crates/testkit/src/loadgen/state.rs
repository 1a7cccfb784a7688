//! The durable-state file written by `bw-loadgen write` after every completed FLUSH.
//!
//! ```text
//! offset  size        field
//!      0     8        magic "BWLGSTAT"
//!      8     4        version (u32 LE) = 1
//!     12     4        block_size (u32 LE)
//!     16     8        blocks (u64 LE)
//!     24     8        seed (u64 LE)
//!     32     8        flushes completed (u64 LE)
//!     40     8        writes acknowledged at the last flush (u64 LE)
//!     48     8×blocks durable seq per block (u64 LE; 0 = never durably written)
//!      …     8        check: mix64 chain over every byte above
//! ```
//! It is replaced atomically: write `FILE.tmp`, fsync it, rename over `FILE`, fsync the
//! directory. A crash of the load generator itself therefore leaves the previous or the new
//! state, never a mix.

use std::io::Write;
use std::path::Path;

use crate::rng::mix64;

pub const MAGIC: [u8; 8] = *b"BWLGSTAT";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub block_size: u32,
    pub seed: u64,
    pub flushes: u64,
    pub writes_acked: u64,
    /// Per block: newest seq acknowledged before the last completed FLUSH was sent.
    pub durable: Vec<u64>,
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.chunks(8).fold(0x6a09_e667_f3bc_c908, |h, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        mix64(h ^ u64::from_le_bytes(w))
    })
}

impl State {
    pub fn new(block_size: u32, blocks: u64, seed: u64) -> Self {
        Self {
            block_size,
            seed,
            flushes: 0,
            writes_acked: 0,
            durable: vec![0; blocks as usize],
        }
    }

    pub fn blocks(&self) -> u64 {
        self.durable.len() as u64
    }

    /// Blocks with a durable write.
    pub fn durable_blocks(&self) -> u64 {
        self.durable.iter().filter(|&&s| s != 0).count() as u64
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + 8 * self.durable.len() + 8);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.blocks().to_le_bytes());
        b.extend_from_slice(&self.seed.to_le_bytes());
        b.extend_from_slice(&self.flushes.to_le_bytes());
        b.extend_from_slice(&self.writes_acked.to_le_bytes());
        for s in &self.durable {
            b.extend_from_slice(&s.to_le_bytes());
        }
        let c = checksum(&b);
        b.extend_from_slice(&c.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_LEN + 8 || b[0..8] != MAGIC {
            return Err("not a bw-loadgen state file".into());
        }
        let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
        let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        if u32at(8) != VERSION {
            return Err(format!(
                "state file version {} (expected {VERSION})",
                u32at(8)
            ));
        }
        let blocks = u64at(16);
        let want = (blocks as usize)
            .checked_mul(8)
            .and_then(|n| n.checked_add(HEADER_LEN + 8))
            .ok_or("block count overflows")?;
        if b.len() != want {
            return Err(format!("state file is {} bytes, expected {want}", b.len()));
        }
        let body = &b[..b.len() - 8];
        if checksum(body) != u64at(b.len() - 8) {
            return Err("state file checksum mismatch".into());
        }
        Ok(State {
            block_size: u32at(12),
            seed: u64at(24),
            flushes: u64at(32),
            writes_acked: u64at(40),
            durable: (0..blocks as usize)
                .map(|i| u64at(HEADER_LEN + 8 * i))
                .collect(),
        })
    }

    /// Atomically replaces `path` with this state (tmp + fsync + rename + fsync dir).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp_name);
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.to_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let b = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_bytes(&b).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_detected() {
        let mut s = State::new(4096, 10, 99);
        s.durable[3] = 17;
        s.flushes = 2;
        s.writes_acked = 30;
        let b = s.to_bytes();
        assert_eq!(State::from_bytes(&b).unwrap(), s);
        let mut bad = b.clone();
        bad[HEADER_LEN + 8 * 3] ^= 1;
        assert!(State::from_bytes(&bad).unwrap_err().contains("checksum"));
        assert!(State::from_bytes(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn save_replaces_atomically() {
        let d = crate::TempDir::new("state").unwrap();
        let p = d.path().join("st");
        let mut s = State::new(512, 4, 1);
        s.save(&p).unwrap();
        s.durable[0] = 5;
        s.save(&p).unwrap();
        assert_eq!(State::load(&p).unwrap().durable[0], 5);
        assert!(!d.path().join("st.tmp").exists());
    }
}
