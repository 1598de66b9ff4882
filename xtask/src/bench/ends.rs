//! The two ends of the benchmark (`xesp-loadgen serve` in the `lan` and
//! `az` namespaces) and how the driver talks to them: one command line in,
//! one JSON line out.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::netns::Netns;

/// One `xesp-loadgen serve` process, killed when dropped.
pub struct End {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: std::path::PathBuf,
}

impl End {
    /// Starts `loadgen serve <args>` in `ns`, its stderr in `log`; waits until ready.
    pub fn start(
        name: &str,
        ns: &Netns,
        loadgen: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let err = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = ns.cmd(loadgen);
        cmd.arg("serve")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the {name} end: {cmd:?}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("the {name} end has no pipes");
        };
        let mut end = Self {
            name: name.to_string(),
            child,
            stdin,
            stdout: BufReader::new(stdout),
            log: log.to_path_buf(),
        };
        let first = end.read_line()?;
        if first.get("ready") != Some(&Value::Bool(true)) {
            bail!("the {name} end said {first} instead of ready");
        }
        Ok(end)
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line)?;
        if n == 0 {
            bail!(
                "the {} end stopped; its log {}:\n{}",
                self.name,
                self.log.display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        serde_json::from_str(&line)
            .with_context(|| format!("the {} end answered {line:?}", self.name))
    }

    /// Sends one command and returns its answer; an `error` answer is an error.
    pub fn request(&mut self, line: &str) -> Result<Value> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .with_context(|| format!("writing to the {} end", self.name))?;
        let v = self.read_line()?;
        if let Some(e) = v.get("error") {
            return Err(anyhow!("{} end, {line:?}: {e}", self.name));
        }
        Ok(v)
    }
}

impl Drop for End {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        for _ in 0..20 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// CPU time (ns) every thread of `pid` has run, from /proc/PID/task/*/schedstat.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The release binaries the benchmark runs.
pub struct Binaries {
    pub xesp: std::path::PathBuf,
    /// xesp with datapath-user's `null-forwarder` feature: the benchmark's
    /// own build, copied aside; never installed or packaged.
    pub null: std::path::PathBuf,
    pub loadgen: std::path::PathBuf,
}

/// User-mode CPU time (ns) of every thread of `pid`, from
/// /proc/PID/task/*/stat (utime, in clock ticks: coarse, 10 ms at 100 Hz).
pub fn user_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|s| utime_ticks(&s))
        .sum::<u64>()
        * (1_000_000_000 / hz)
}

/// The utime field (14th) of a /proc stat line; the command name in
/// parentheses may hold spaces, so fields are counted after its `)`.
fn utime_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(11)?.parse().ok()
}

/// Builds the release binaries: first the null forwarder (copied to
/// `target/bench/xesp-null-forwarder`), then xesp and xesp-loadgen, so that
/// `target/release/xesp` is always the gateway without the feature.
pub fn build_release() -> Result<Binaries> {
    let root = crate::setup::project_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = |extra: &[&str]| {
        let mut c = Command::new(&cargo);
        c.current_dir(&root)
            .args([
                "build",
                "--release",
                "--locked",
                "-p",
                "ike-control",
                "--bin",
                "xesp",
            ])
            .args(extra);
        crate::setup::run_cmd(&mut c)
    };
    build(&["--features", "datapath-user/null-forwarder"])
        .context("building the null forwarder (release)")?;
    let null = root.join("target/bench/xesp-null-forwarder");
    fs::create_dir_all(root.join("target/bench"))?;
    fs::copy(root.join("target/release/xesp"), &null)
        .context("copying the null forwarder aside")?;
    build(&["-p", "xesp-benches", "--bin", "xesp-loadgen"])
        .context("building xesp and xesp-loadgen (release)")?;
    Ok(Binaries {
        xesp: root.join("target/release/xesp"),
        null,
        loadgen: root.join("target/release/xesp-loadgen"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_of_this_process_grows() {
        let me = std::process::id();
        let a = cpu_ns(me);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(cpu_ns(me) > a && a > 0);
        assert_eq!(cpu_ns(u32::MAX), 0, "no such process");
        assert_eq!(user_ns(u32::MAX), 0);
    }

    #[test]
    fn utime_is_the_14th_field_even_with_spaces_in_the_name() {
        let line = "1234 (xsk q0 (x)) S 1 2 3 4 5 6 7 8 9 10 4321 99 0 0 20 0";
        assert_eq!(utime_ticks(line), Some(4321));
        assert_eq!(utime_ticks("garbage"), None);
    }
}
