//! `blockwarden`: the agent and the command-line client in one binary.
//!
//! - `config`: TOML config + flags for the agent.
//! - `agent`: the long-running node process (catalog, volumes, NBD, HTTP API).
//! - `cli`: the client commands, over the HTTP API.
//! - `logging`: a minimal stderr logger and UTC time formatting.

mod agent;
mod cli;
mod config;
mod logging;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "blockwarden",
    version,
    about = "Replicated block volumes for small VM clusters, served over NBD"
)]
struct Args {
    /// Agent API URL.
    #[arg(
        long,
        global = true,
        env = "BLOCKWARDEN_API",
        default_value = "http://127.0.0.1:7800"
    )]
    api: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent on this host (embedded mode unless --etcd is given).
    Agent(config::AgentFlags),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(cli::VolumeCmd),
    /// Inspect nodes.
    #[command(subcommand)]
    Node(cli::NodeCmd),
    /// Show the event history; --follow streams new events.
    Events {
        #[arg(short, long)]
        follow: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
    },
    /// The cluster at a glance.
    Status {
        #[arg(short, long, value_enum, default_value_t)]
        output: cli::Output,
    },
}

fn main() {
    let args = Args::parse();
    let code = match args.command {
        Command::Agent(flags) => match agent::run(&flags) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        },
        cmd => run_client(&args.api, cmd),
    };
    std::process::exit(code);
}

fn run_client(url: &str, cmd: Command) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let result = rt.block_on(async {
        let client = api::Client::new(url).map_err(cli::Failure::from)?;
        match cmd {
            Command::Volume(c) => cli::volume(&client, c).await,
            Command::Node(c) => cli::node(&client, c).await,
            Command::Events { follow, output } => cli::events(&client, follow, output).await,
            Command::Status { output } => cli::status(&client, output).await,
            Command::Agent(_) => unreachable!("handled in main"),
        }
    });
    match result {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    }
}
