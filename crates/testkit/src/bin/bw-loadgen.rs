//! `bw-loadgen`: write a verifiable load to an NBD export, then verify it after a crash.
//!
//! ```text
//! bw-loadgen write  --uri nbd://127.0.0.1:10809/vol --state FILE [--block-size 4096]
//!                   [--blocks N] [--flush-every 64] [--queue-depth 8] [--duration 10]
//!                   [--max-writes N] [--seed X]
//! bw-loadgen verify --uri nbd://127.0.0.1:10809/vol --state FILE
//! ```
//! Exit status: 0 success; 1 verification failed or the server returned an error; 2 usage or
//! setup error; 3 `write` stopped because the connection was lost (expected when the server is
//! killed: the state file is valid and `verify` can run after a restart).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use testkit::loadgen::{self, VerifyOptions, WriteOptions};

#[derive(Parser)]
#[command(
    name = "bw-loadgen",
    about = "Verifying NBD load generator (crash-consistency checks)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write self-describing blocks in random order with periodic FLUSH; record durable state.
    Write {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        state: PathBuf,
        #[arg(long, default_value_t = 4096)]
        block_size: u32,
        /// Blocks from offset 0 (default: the whole export).
        #[arg(long)]
        blocks: Option<u64>,
        #[arg(long, default_value_t = 64)]
        flush_every: u64,
        #[arg(long, default_value_t = 8)]
        queue_depth: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long)]
        max_writes: Option<u64>,
        /// Seed (decimal or 0x-hex); random if omitted (printed).
        #[arg(long)]
        seed: Option<String>,
    },
    /// Read every block back and check it against the state file.
    Verify {
        #[arg(long)]
        uri: String,
        #[arg(long)]
        state: PathBuf,
    },
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("bad seed {s:?}: {e}"))
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Write {
            uri,
            state,
            block_size,
            blocks,
            flush_every,
            queue_depth,
            duration,
            max_writes,
            seed,
        } => {
            let seed = match seed.as_deref().map(parse_seed).transpose() {
                Ok(s) => s.unwrap_or_else(testkit::rng::seed_from_time),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if !(duration.is_finite() && duration > 0.0 && duration <= 86_400.0) {
                eprintln!("error: --duration must be between 0 and 86400 seconds");
                return ExitCode::from(2);
            }
            let mut o = WriteOptions::new(uri, state);
            o.block_size = block_size;
            o.blocks = blocks;
            o.flush_every = flush_every;
            o.queue_depth = queue_depth;
            o.duration = Duration::from_secs_f64(duration);
            o.max_writes = max_writes;
            o.seed = seed;
            eprintln!("bw-loadgen: seed {seed:#x}");
            match loadgen::write(&o) {
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Ok(sum) => {
                    println!("{sum}");
                    match (&sum.error, sum.connection_lost) {
                        (None, _) => ExitCode::SUCCESS,
                        (Some(_), true) => ExitCode::from(3),
                        (Some(_), false) => ExitCode::from(1),
                    }
                }
            }
        }
        Cmd::Verify { uri, state } => match loadgen::verify(&VerifyOptions {
            uri,
            state_path: state,
        }) {
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
            Ok(rep) => {
                print!("{rep}");
                if rep.ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
        },
    }
}
