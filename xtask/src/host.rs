//! What every xtask command needs from the host: where the project and
//! cargo are, running commands (with a time limit), and the root check.
//! The commands' own modules (setup, package, vm, lab, bench) build on it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// `$CARGO_HOME`, or `~/.cargo`.
pub fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// The cargo that runs this xtask (rustup's), falling back to Debian's.
pub fn host_cargo() -> PathBuf {
    env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("need root to {what}: run this command as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Like [`run_cmd`], but a command still running after `limit` is killed
/// with everything it started (a hung test must fail with its output, not
/// hold CI until CI's own limit).
pub fn run_cmd_within(cmd: &mut Command, limit: Duration) -> Result<()> {
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{cmd:?} failed: {status}");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            kill_tree(child.id());
            let _ = child.wait();
            bail!(
                "{cmd:?} still ran after {} min and was killed: a test hangs \
                 (cargo names it above: 'has been running for over 60 seconds')",
                limit.as_secs() / 60
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILL to `pid` and all its descendants, children first.
fn kill_tree(pid: u32) {
    let children = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    for c in children {
        kill_tree(c);
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// The project root (the workspace this xtask belongs to).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_past_its_limit_is_killed_with_its_children() {
        // A shell with a child of its own, sleeping for a duration no other
        // process is likely to use.
        let secs = 3000 + std::process::id() % 1000;
        let marker = format!("sleep {secs}");
        let started = Instant::now();
        let err = run_cmd_within(
            Command::new("sh").args(["-c", &format!("{marker} & {marker}.5; wait")]),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("was killed"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(200));
        let left = Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        if !left.stdout.is_empty() {
            let _ = Command::new("pkill").args(["-f", &marker]).status();
        }
        assert!(left.stdout.is_empty(), "still running: {left:?}");
        run_cmd_within(&mut Command::new("true"), Duration::from_secs(5)).unwrap();
        assert!(run_cmd_within(&mut Command::new("false"), Duration::from_secs(5)).is_err());
    }
}
