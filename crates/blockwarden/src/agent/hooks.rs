//! Alert hooks: every event of warning level or higher runs the configured command
//! (`alert_command` in the config), so an operator learns of a failed replica or a full pool
//! without watching the event stream (SPEC §1 item 8).
//!
//! The command runs as `sh -c <command>` with the event as JSON on stdin and in the
//! environment (`BLOCKWARDEN_EVENT_KIND`, `_LEVEL`, `_VOLUME`, `_NODE`, `_MESSAGE`,
//! `BLOCKWARDEN_EVENT_JSON`). A hook that runs longer than [`HOOK_TIMEOUT`] is killed; at most
//! [`MAX_HOOKS_IN_FLIGHT`] run at once, and events beyond that are logged as not delivered
//! rather than queued without bound.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use catalog::{Level, NewEvent};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::Semaphore;

/// A hook that has not finished by then is killed (a stuck mailer must not pile up processes).
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// Hooks running at once; more events than this in one burst are logged and not delivered.
pub const MAX_HOOKS_IN_FLIGHT: usize = 8;

pub struct AlertHook {
    command: Option<String>,
    slots: Arc<Semaphore>,
}

impl AlertHook {
    pub fn new(command: Option<String>) -> AlertHook {
        AlertHook {
            command,
            slots: Arc::new(Semaphore::new(MAX_HOOKS_IN_FLIGHT)),
        }
    }

    /// Runs the hook for `ev` in the background if it is a warning or worse.
    pub fn fire(&self, ev: &NewEvent, rt: &tokio::runtime::Handle) {
        let Some(cmd) = self.command.clone() else {
            return;
        };
        if ev.level == Level::Info {
            return;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            log::error!(
                "alert hook not run for {} ({MAX_HOOKS_IN_FLIGHT} hooks already running): {}",
                ev.kind,
                ev.message
            );
            return;
        };
        let ev = ev.clone();
        rt.spawn(async move {
            let _permit = permit;
            if let Err(e) = run_hook(&cmd, &ev).await {
                log::error!("alert hook for {} failed: {e}", ev.kind);
            }
        });
    }
}

async fn run_hook(cmd: &str, ev: &NewEvent) -> std::io::Result<()> {
    let json = serde_json::to_string(ev).unwrap_or_default();
    let level = serde_json::to_value(ev.level)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("BLOCKWARDEN_EVENT_KIND", &ev.kind)
        .env("BLOCKWARDEN_EVENT_LEVEL", level)
        .env(
            "BLOCKWARDEN_EVENT_VOLUME",
            ev.volume.as_deref().unwrap_or(""),
        )
        .env("BLOCKWARDEN_EVENT_NODE", ev.node.as_deref().unwrap_or(""))
        .env("BLOCKWARDEN_EVENT_MESSAGE", &ev.message)
        .env("BLOCKWARDEN_EVENT_JSON", &json)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(json.as_bytes()).await;
        let _ = stdin.write_all(b"\n").await;
    }
    match tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                log::warn!("alert hook exited with {status}");
            }
            Ok(())
        }
        Err(_) => {
            let _ = child.kill().await;
            Err(std::io::Error::other(format!(
                "killed after {HOOK_TIMEOUT:?}"
            )))
        }
    }
}
