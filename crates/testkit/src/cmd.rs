//! Running outside programs from tests: with a deadline, output captured, and a failure
//! message that shows the command line, exit status, stdout and stderr.

use std::io::Read;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr. If it has not
/// exited after `timeout` it is killed (SIGKILL) and an error is returned: a test must never
/// hang on a stuck tool.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {}: {e}", show(cmd))))?;
    let out_reader = drain(child.stdout.take());
    let err_reader = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{} did not finish within {timeout:?}; stderr so far:\n{}",
                    show(cmd),
                    String::from_utf8_lossy(&stderr)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// The command line as a shell-ish string, for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Describes an output for a failure message.
pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        show(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` with a deadline and panics with the full output unless it exits 0; returns
/// stdout as text.
#[track_caller]
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let out = run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}", describe(cmd, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `CI` is set (to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    matches!(std::env::var("CI"), Ok(v) if !v.is_empty() && v != "0" && v != "false")
}

/// Is `tool` an executable on `PATH` (or an existing path)?
pub fn have_tool(tool: &str) -> bool {
    if tool.contains('/') {
        return std::path::Path::new(tool).exists();
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let p = dir.join(tool);
        std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false)
    })
}

/// Returns true if `tool` is installed. If not: under `CI` this panics (everything must run in
/// CI: a missing tool is a broken install script, not a reason to pass); elsewhere it prints a
/// loud SKIPPED line and returns false, and the test returns early.
#[track_caller]
pub fn require_tool(tool: &str) -> bool {
    if have_tool(tool) {
        return true;
    }
    skip_or_panic(&format!(
        "missing tool {tool}; run scripts/install-test-deps.sh"
    ))
}

/// Like [`require_tool`] for tests that need root (loop devices, mounts).
#[track_caller]
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_panic("this test needs root (loop devices, mount, FUSE)")
}

#[track_caller]
fn skip_or_panic(why: &str) -> bool {
    let at = std::panic::Location::caller();
    if in_ci() {
        panic!(
            "\n\n########## NOT RUNNABLE IN CI ##########\n{why}\n(at {at}; CI must run every \
             test)\n########################################\n"
        );
    }
    eprintln!(
        "\n########## SKIPPED ({why}) at {at} ##########\n\
         ########## this test did NOT run; CI would fail here ##########\n"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_kills_a_stuck_command() {
        let start = Instant::now();
        let err = run_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn output_is_captured() {
        let out = run_ok(
            Command::new("sh").args(["-c", "echo hello; echo oops >&2"]),
            Duration::from_secs(10),
        );
        assert_eq!(out, "hello\n");
        assert!(have_tool("sh"));
        assert!(!have_tool("no-such-tool-blockwarden"));
    }
}
