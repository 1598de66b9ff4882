//! `cargo xtask vm -- <command>`: runs a command as root under Debian's 6.1
//! kernel in QEMU, for what this machine's kernel cannot do (it has no ESP,
//! no XFRM interfaces and no modules): kernel XFRM tests.
//!
//! # What the guest sees
//!
//! * **Kernel**: Debian's `linux-image-6.1.0-<n>-amd64` (the one Debian's
//!   `linux-image-amd64` names), booted under QEMU TCG (`-cpu max`, 2 vCPUs,
//!   1 GiB by default) with no network card: the guest has only `lo` and what
//!   the command creates (namespaces, veth, xfrm interfaces, TUN). Its modules
//!   for XFRM (`xfrm_user`, `xfrm_interface`, `esp4`/`esp6` and their
//!   offloads, VTI, `af_key`), the ciphers (AES-NI, GCM, GHASH, CBC, HMAC
//!   SHA-1/256/512, 3DES, ChaCha20-Poly1305, `authencesn`), `veth`, `dummy`
//!   and `tun` are loaded at boot ([`initramfs::MODULES`]); BPF, XDP and
//!   AF_XDP are built in. Every other module of that kernel loads when the
//!   kernel asks for it (an algorithm, a link type: its `/sbin/modprobe` runs
//!   the unpacked kmod on the unpacked package); to load one by hand, run
//!   `target/vm/bin/modprobe -d target/vm/unpacked <module>` (the host's root
//!   has no modprobe of its own).
//! * **Files**: the host's `/` over 9p, **read-only**, as the root of a
//!   chroot, so the host's `ip`, `ping`, strongSwan (`/usr/lib/ipsec/charon`,
//!   `swanctl`), BIRD, python3 and cargo-built binaries (`target/debug/xesp`,
//!   test binaries under `target/debug/deps/`) run unchanged, at the same
//!   paths. Writable: `/tmp`, `/var/tmp`, `/run` and `/dev/shm` (tmpfs,
//!   empty at boot, gone at power-off: pid files, vici and BIRD control
//!   sockets go there, `ip netns add` works), and the **work directory**,
//!   a host directory shared read-write over 9p at its host path
//!   ([`VmCommand::work_dir`]; by default a fresh `target/vm/work/run-*`):
//!   what the command writes there is what the host reads afterwards.
//!   Unix sockets belong on a tmpfs, not on 9p. `/proc`, `/sys`,
//!   `/sys/fs/bpf`, `/dev` (devtmpfs) and `/dev/pts` are the guest's own.
//! * **Process**: `/bin/sh` runs the command as root in the host's current
//!   directory (or [`VmCommand::cwd`]), stdin from `/dev/null`, with
//!   `PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
//!   `HOME=/tmp`, `XESP_VM=1`, `RUST_BACKTRACE` as on the host and
//!   [`VmCommand::env`]. Its stdout and stderr go, merged, to the serial
//!   console, which the host shows as it comes ([`VmOutcome::output`]).
//!   Its exit status (a signal: 128 + its number) becomes the status of
//!   `cargo xtask vm`. A command still running at the timeout is killed
//!   with QEMU, and [`run`] returns [`VmError::TimedOut`].
//!
//! Boot takes 5-15 s on an idle 2-core machine (`boot_secs`), and everything
//! runs several times slower than on the host: give guests timeouts, never
//! time assertions.
//!
//! Setup (`cargo xtask setup`, [`crate::setup`]) installs QEMU; the kernel,
//! busybox and kmod are fetched on first use into `target/vm/` ([`image`]);
//! the initramfs is rebuilt when its inputs change ([`initramfs`]).

pub mod guest;
pub mod image;
pub mod initramfs;
pub mod qemu;

use std::{
    env, fmt, fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::Child,
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};

/// One command to run in a fresh VM.
#[derive(Debug, Clone)]
pub struct VmCommand {
    /// The program and its arguments (a program without `/` is looked up on PATH).
    pub argv: Vec<String>,
    /// Extra environment of the command.
    pub env: Vec<(String, String)>,
    /// Its working directory (default: the host's current directory).
    pub cwd: Option<PathBuf>,
    /// The directory shared read-write at its own path (default: a fresh
    /// `target/vm/work/run-<pid>-<n>`). Holds `.xesp-vm/` (the run script, the status).
    pub work_dir: Option<PathBuf>,
    /// QEMU is killed after this long, boot included.
    pub timeout: Duration,
    pub mem_mb: u32,
    pub cpus: u32,
    /// Show progress on stderr and the command's output on stdout as it comes.
    pub echo: bool,
    /// Also show the kernel's boot messages.
    pub verbose: bool,
}

impl VmCommand {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            work_dir: None,
            timeout: Duration::from_secs(300),
            mem_mb: 1024,
            cpus: 2,
            echo: true,
            verbose: false,
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// How a command in the VM ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// The command's exit status (128 + signal if a signal ended it).
    pub status: i32,
    /// What it wrote to stdout and stderr (merged; `\r\n` as `\n`).
    pub output: String,
    /// The whole serial console: boot messages, the output, the markers.
    pub console: String,
    /// From starting QEMU to the command starting.
    pub boot_secs: f64,
    /// From starting QEMU to QEMU's exit.
    pub total_secs: f64,
    pub work_dir: PathBuf,
}

/// Failures of the VM itself (not of the command), for callers to tell apart.
#[derive(Debug)]
pub enum VmError {
    /// The timeout passed; QEMU (this pid) was killed.
    TimedOut {
        secs: u64,
        qemu_pid: u32,
        console_tail: String,
    },
    /// QEMU ended without the guest reporting the command's status.
    NoStatus { why: String, console_tail: String },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TimedOut {
                secs,
                qemu_pid,
                console_tail,
            } => write!(
                f,
                "the VM timed out after {secs} s: QEMU (pid {qemu_pid}) was killed; \
                 the console's last lines:\n{console_tail}"
            ),
            Self::NoStatus { why, console_tail } => write!(
                f,
                "the VM reported no exit status ({why}); the console's last lines:\n{console_tail}"
            ),
        }
    }
}

impl std::error::Error for VmError {}

/// `cargo xtask vm` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
    /// Kill the VM after this many seconds (boot included).
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mem: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Host directory shared read-write at the same path (default: a fresh
    /// one under target/vm/work/).
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Also show the kernel's boot messages.
    #[arg(long)]
    pub verbose: bool,
    /// The command to run as root in the guest (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `cargo xtask vm`: the guest's exit status, for the xtask to exit with
/// (124 when the VM timed out, like timeout(1)).
pub fn cli(args: &VmArgs) -> Result<i32> {
    let mut cmd = VmCommand::new(args.command.clone());
    cmd.timeout = Duration::from_secs(args.timeout_secs);
    cmd.mem_mb = args.mem;
    cmd.cpus = args.cpus;
    cmd.work_dir = args.work.clone();
    cmd.verbose = args.verbose;
    match run(&cmd) {
        Ok(o) => Ok(o.status),
        Err(e) => match e.downcast_ref::<VmError>() {
            Some(VmError::TimedOut { .. }) => {
                eprintln!("[vm] {e}");
                Ok(124)
            }
            _ => Err(e),
        },
    }
}

static RUNS: AtomicU32 = AtomicU32::new(0);

/// A fresh directory `target/vm/work/<label>-<pid>-<n>` (emptied if it exists).
pub fn fresh_work_dir(label: &str) -> Result<PathBuf> {
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = image::vm_dir()
        .join("work")
        .join(format!("{label}-{}-{n}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Quotes for `sh`: `'...'`, a `'` inside as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn valid_env_key(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The script the guest's init runs chrooted (`<work>/.xesp-vm/run.sh`).
fn run_script(cmd: &VmCommand, cwd: &Path) -> Result<String> {
    let Some(program) = cmd.argv.first() else {
        bail!("no command to run in the VM");
    };
    if program.is_empty() {
        bail!("the command to run in the VM is an empty string");
    }
    let cwd = cwd
        .to_str()
        .with_context(|| format!("working directory {} is not UTF-8", cwd.display()))?;
    let mut s = String::from("# written by xtask::vm for one run\n");
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("XESP_VM".into(), "1".into()),
    ];
    if let Ok(v) = env::var("RUST_BACKTRACE") {
        env.push(("RUST_BACKTRACE".into(), v));
    }
    env.extend(cmd.env.iter().cloned());
    for (k, v) in &env {
        if !valid_env_key(k) {
            bail!("environment variable name {k:?} is not a shell name ([A-Za-z_][A-Za-z0-9_]*)");
        }
        s += &format!("export {k}={}\n", shell_quote(v));
    }
    s += &format!(
        "cd {} || {{ echo \"xesp-vm: no directory {}\" >&2; exit 125; }}\n",
        shell_quote(cwd),
        cwd.replace(['"', '$', '`', '\\'], "_")
    );
    s += "exec";
    for a in &cmd.argv {
        s += " ";
        s += &shell_quote(a);
    }
    s += " 2>&1\n";
    Ok(s)
}

/// A line of the console that matters to the host.
#[derive(Debug, PartialEq, Eq)]
enum Marker {
    Start,
    Status(i32),
    Failed(String),
}

fn marker(line: &str, nonce: &str) -> Option<Marker> {
    let line = line.trim_end();
    let mut words = line.splitn(3, ' ');
    let (kind, n, rest) = (words.next()?, words.next()?, words.next());
    if n != nonce {
        return None;
    }
    match kind {
        "XESP_VM_START" if rest.is_none() => Some(Marker::Start),
        "XESP_VM_STATUS" => rest?.trim().parse().ok().map(Marker::Status),
        "XESP_VM_FAILED" => Some(Marker::Failed(rest.unwrap_or("").to_string())),
        _ => None,
    }
}

/// Where a marker starts after other text on the same line (the command's
/// last output had no newline), if it does.
fn marker_inside(line: &str, nonce: &str) -> Option<usize> {
    line.match_indices("XESP_VM_")
        .map(|(at, _)| at)
        .find(|&at| at > 0 && marker(&line[at..], nonce).is_some())
}

fn nonce() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", t & 0xffff_ffff_ffff, std::process::id())
}

/// Printable text only (the firmware sends terminal escapes to the console).
fn printable(line: &str) -> String {
    line.chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect()
}

fn tail(lines: &[String], n: usize) -> String {
    if lines.is_empty() {
        return "  (nothing: the kernel had not started yet)".to_string();
    }
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .map(|l| format!("  | {}", printable(l)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Kills QEMU if the caller unwinds while it runs.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boots a VM, runs `cmd` in it, powers it off.
pub fn run(cmd: &VmCommand) -> Result<VmOutcome> {
    let cwd = match &cmd.cwd {
        Some(d) => d.clone(),
        None => env::current_dir().context("the current directory")?,
    };
    let work = match &cmd.work_dir {
        Some(d) => {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            fs::canonicalize(d).with_context(|| format!("resolving {}", d.display()))?
        }
        None => fresh_work_dir("run")?,
    };
    let work_str = work
        .to_str()
        .with_context(|| format!("work directory {} is not UTF-8", work.display()))?;
    if work == Path::new("/")
        || work_str
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        bail!(
            "work directory {work_str:?} cannot be shared: it must not be / and its path \
             must have no spaces or control characters (it goes on the kernel command line)"
        );
    }
    if cmd.mem_mb < 256 {
        bail!(
            "--mem {} MiB is too little for the guest (at least 256)",
            cmd.mem_mb
        );
    }
    if cmd.cpus == 0 || cmd.cpus > 64 {
        bail!("--cpus {}: allowed 1 to 64", cmd.cpus);
    }
    let script = run_script(cmd, &cwd)?;
    let qemu = qemu::find_qemu()
        .with_context(|| format!("{} is not installed: run `cargo xtask setup`", qemu::QEMU))?;
    let accel = qemu::Accel::from_env()?;
    // What is unpacked boots as it is (no apt-cache, which takes seconds on
    // a busy machine); `cargo xtask setup` moves to a newer kernel.
    let assets = match image::Assets::present() {
        Some(a) => a,
        None => image::ensure(true)?,
    };
    let initramfs = initramfs::ensure(&assets, true)?;

    let meta = work.join(".xesp-vm");
    fs::create_dir_all(&meta).with_context(|| format!("creating {}", meta.display()))?;
    let status_file = meta.join("status");
    let _ = fs::remove_file(&status_file);
    fs::write(meta.join("run.sh"), &script)
        .with_context(|| format!("writing {}", meta.join("run.sh").display()))?;
    let nonce = nonce();
    let boot = qemu::Boot {
        qemu: &qemu,
        accel,
        kernel: &assets.vmlinux,
        initramfs: &initramfs,
        work: &work,
        nonce: &nonce,
        mem_mb: cmd.mem_mb,
        cpus: cmd.cpus,
    };
    if cmd.echo {
        eprintln!(
            "[vm] booting Debian's kernel {} under QEMU ({}, {} CPUs, {} MiB); work directory {}",
            assets.release,
            accel.name(),
            cmd.cpus,
            cmd.mem_mb,
            work_str
        );
    }
    let started = Instant::now();
    let mut child = KillOnDrop(
        boot.command()
            .spawn()
            .with_context(|| format!("starting {}", qemu.display()))?,
    );
    let pid = child.0.id();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.0.stdout.take().context("QEMU's stdout")?;
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut stderr = child.0.stderr.take().context("QEMU's stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = started + cmd.timeout;
    let mut lines: Vec<String> = Vec::new();
    let mut output = String::new();
    let mut boot_secs = None;
    let mut status = None;
    let mut failed = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(mut line) => {
                // Output without a final newline runs into the marker's line.
                if let Some(at) = marker_inside(&line, &nonce) {
                    let rest = line.split_off(at);
                    if boot_secs.is_some() && status.is_none() {
                        if cmd.echo {
                            println!("{line}");
                        }
                        output += &line;
                        output.push('\n');
                    }
                    lines.push(line);
                    line = rest;
                }
                match marker(&line, &nonce) {
                    Some(Marker::Start) => {
                        let secs = started.elapsed().as_secs_f64();
                        boot_secs = Some(secs);
                        if cmd.echo {
                            eprintln!("[vm] booted in {secs:.1} s; running {}", cmd.argv.join(" "));
                        }
                    }
                    Some(Marker::Status(s)) => status = Some(s),
                    Some(Marker::Failed(why)) => failed = Some(why),
                    None if boot_secs.is_some() && status.is_none() => {
                        if cmd.echo {
                            println!("{line}");
                        }
                        output += &line;
                        output.push('\n');
                    }
                    None => {
                        if cmd.verbose {
                            eprintln!(
                                "[vm console +{:.1}s] {}",
                                started.elapsed().as_secs_f64(),
                                printable(&line)
                            );
                        }
                    }
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    let _ = child.0.kill();
                    let _ = child.0.wait();
                    return Err(VmError::TimedOut {
                        secs: cmd.timeout.as_secs(),
                        qemu_pid: pid,
                        console_tail: tail(&lines, 30),
                    }
                    .into());
                }
            }
        }
    }
    // The console closed: QEMU is exiting.
    let exit = loop {
        if let Some(s) = child.0.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.0.kill();
            let _ = child.0.wait();
            return Err(VmError::TimedOut {
                secs: cmd.timeout.as_secs(),
                qemu_pid: pid,
                console_tail: tail(&lines, 30),
            }
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total_secs = started.elapsed().as_secs_f64();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    // The status file is the second witness (and the only one if the console
    // lost the marker).
    let from_file = fs::read_to_string(&status_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let status = match (status, from_file) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => {
            let why = match (failed, boot_secs) {
                (Some(w), _) => format!("the guest's init failed: {w}"),
                (None, None) => format!(
                    "QEMU exited ({exit}) before the command started{}",
                    if qemu_stderr.trim().is_empty() {
                        String::new()
                    } else {
                        format!("; QEMU said: {}", qemu_stderr.trim())
                    }
                ),
                (None, Some(_)) => format!("QEMU exited ({exit}) while the command ran"),
            };
            return Err(VmError::NoStatus {
                why,
                console_tail: tail(&lines, 40),
            }
            .into());
        }
    };
    if cmd.echo {
        eprintln!(
            "[vm] exit status {status} (boot {:.1} s, total {total_secs:.1} s)",
            boot_secs.unwrap_or(0.0)
        );
    }
    Ok(VmOutcome {
        status,
        output,
        console: lines.join("\n"),
        boot_secs: boot_secs.unwrap_or(0.0),
        total_secs,
        work_dir: work,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_need_this_runs_nonce() {
        assert_eq!(marker("XESP_VM_START abc", "abc"), Some(Marker::Start));
        assert_eq!(
            marker("XESP_VM_STATUS abc 23", "abc"),
            Some(Marker::Status(23))
        );
        assert_eq!(
            marker("XESP_VM_STATUS abc 0 ", "abc"),
            Some(Marker::Status(0))
        );
        assert_eq!(marker("XESP_VM_STATUS xyz 0", "abc"), None);
        assert_eq!(marker("XESP_VM_STATUS abc", "abc"), None);
        assert_eq!(marker("XESP_VM_STATUS abc x", "abc"), None);
        assert_eq!(marker("echo XESP_VM_STATUS abc 1", "abc"), None);
        assert_eq!(
            marker("XESP_VM_FAILED abc cannot mount", "abc"),
            Some(Marker::Failed("cannot mount".into()))
        );
    }

    #[test]
    fn a_marker_after_unterminated_output_is_found() {
        assert_eq!(
            marker_inside("no newlineXESP_VM_STATUS abc 0", "abc"),
            Some(10)
        );
        assert_eq!(marker_inside("XESP_VM_STATUS abc 0", "abc"), None);
        assert_eq!(marker_inside("say XESP_VM_STATUS xyz 0", "abc"), None);
        assert_eq!(
            marker_inside("XESP_VM_ in textXESP_VM_STATUS abc 4", "abc"),
            Some(16)
        );
    }

    #[test]
    fn the_run_script_quotes_everything() {
        let cmd = VmCommand::new(["sh", "-c", "echo 'it''s' $HOME"]).env("A_B", "x y'z");
        let s = run_script(&cmd, Path::new("/work/a b")).unwrap();
        assert!(s.contains("export A_B='x y'\\''z'\n"), "{s}");
        assert!(s.contains("cd '/work/a b' ||"), "{s}");
        assert!(
            s.ends_with("exec 'sh' '-c' 'echo '\\''it'\\'''\\''s'\\'' $HOME' 2>&1\n"),
            "{s}"
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(s.replace("cd '/work/a b'", "cd /"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "its /tmp\n");
    }

    #[test]
    fn bad_commands_are_named() {
        let e = run_script(&VmCommand::new(Vec::<String>::new()), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("no command"), "{e}");
        let e = run_script(&VmCommand::new([""]), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = run_script(&VmCommand::new(["true"]).env("A-B", "1"), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("\"A-B\""), "{e}");
    }
}
