//! Network namespaces and processes that clean up after themselves.
//!
//! Every namespace gets a name unique to this run (`xesp-<role>-<pid>-<n>`), so
//! tests can run in parallel, and is deleted when its guard drops, also when a
//! test panics. Processes started in it are tracked by PID and killed first.
//! Namespaces left behind by a process that died without unwinding are swept
//! by [`sweep_stale`].

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Prefix of every namespace this project creates.
pub const PREFIX: &str = "xesp";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// Creates `xesp-<role>-<pid>-<n>` with its loopback up.
    pub fn create(role: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{role}-{}-{n}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name} (needs root)"))?;
        let ns = Self { name, keep: false };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a namespace with exactly this name (for a lab that outlives
    /// the process: such names are not swept as leftovers of dead runs).
    pub fn create_named(name: &str) -> Result<Self> {
        sh(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("creating network namespace {name} (needs root)"))?;
        let ns = Self {
            name: name.to_string(),
            keep: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adopts an existing namespace (for `lab down`/`status` across processes).
    pub fn adopt(name: &str) -> Self {
        Self {
            name: name.to_string(),
            keep: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keep the namespace when the guard drops (for `cargo xtask lab up`).
    pub fn persist(mut self) -> String {
        self.keep = true;
        self.name.clone()
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args` in the namespace; fails with its stderr if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        output(self.cmd(program).args(args))
    }

    /// `sysctl -qw key=value` in the namespace.
    pub fn sysctl(&self, kv: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", kv]).map(|_| ())
    }

    /// Runs `f` on a thread that has entered the namespace: sockets, netlink
    /// and interface look-ups made there belong to it.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening /run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd only changes this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns({}): {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// PIDs of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        output(Command::new("ip").args(["netns", "pids", &self.name]))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        delete(&self.name);
    }
}

/// Kills what still runs in `name`, then deletes it.
pub fn delete(name: &str) {
    let ns = Netns {
        name: name.to_string(),
        keep: true,
    };
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let pids = ns.pids();
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(*pid, sig) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !ns.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Deletes `xesp-*` namespaces whose creating process no longer exists.
pub fn sweep_stale() -> Vec<String> {
    let mut swept = Vec::new();
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return swept;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete(&name);
            swept.push(name);
        }
    }
    swept
}

/// The PID embedded in `xesp-<role>-<pid>-<n>`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let mut parts = rest.rsplitn(3, '-');
    let _n: u32 = parts.next()?.parse().ok()?;
    parts.next()?.parse().ok()
}

/// A veth pair between two namespaces, with the given interface names.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    veth_queues(a, a_if, b, b_if, 1)
}

/// A veth pair with `queues` transmit and receive queues on each side.
pub fn veth_queues(a: &Netns, a_if: &str, b: &Netns, b_if: &str, queues: u32) -> Result<()> {
    let q = queues.max(1).to_string();
    sh(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
        "numtxqueues",
        &q,
        "numrxqueues",
        &q,
    ]))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// A child process tracked by PID: SIGTERM, then SIGKILL, when dropped.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
}

impl Daemon {
    /// Starts `cmd` in a process group of its own (a terminal's Ctrl-C
    /// reaches the test, whose guards then stop the daemon).
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let child = cmd
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit code, once it has exited (None while it runs, or if a
    /// signal ended it).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// Sends it `signal` (if it still runs).
    pub fn signal(&mut self, signal: i32) {
        if self.is_running() {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }
    }

    /// Stops it now (SIGTERM, up to 3 s, then SIGKILL).
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it now with SIGKILL (no chance to clean up).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Forget the child without stopping it (it outlives this process).
    pub fn detach(self) -> u32 {
        let pid = self.child.id();
        std::mem::forget(self);
        pid
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &mut Command) -> Result<()> {
    output(cmd).map(|_| ())
}

/// Runs a command and returns its stdout, failing with its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_our_names_only() {
        assert_eq!(owner_pid("xesp-onprem-1234-0"), Some(1234));
        assert_eq!(owner_pid("xesp-az-gw-77-12"), Some(77));
        assert_eq!(owner_pid("other-1-2"), None);
        assert_eq!(owner_pid("xesp-onprem"), None);
    }
}
