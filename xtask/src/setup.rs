//! `cargo xtask setup`: installs, idempotently, what building and testing xesp
//! needs on a fresh Debian 12 machine, and finds it again for the other commands.
//!
//! * Debian packages (apt-get): Debian's Rust compiler with its library source
//!   (the eBPF crate is built by it with `-Z build-std=core`), strongSwan and
//!   BIRD for the reference lab, and the network tools the lab and tests use.
//! * bpf-linker, built against the libLLVM that Debian's rustc itself links
//!   (its major version is read from `/usr/bin/rustc -vV`, never pinned);
//! * cargo-fuzz, which runs the fuzz targets (with rustup's nightly).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Debian packages the build, the lab and the tests need.
pub const APT_PACKAGES: &[&str] = &[
    // Debian's rustc 1.96 + library source: builds the eBPF object.
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    // strongSwan playing the Azure gateway instances (kernel-libipsec = user-space ESP).
    "strongswan-charon",
    "strongswan-swanctl",
    "libcharon-extra-plugins",
    "libstrongswan-standard-plugins",
    // BGP on both sides of the tunnels.
    "bird2",
    // The font of `cargo xtask bench`'s chart.
    "fonts-dejavu-core",
    // Namespaces, veth, traffic and captures.
    "iproute2",
    "iputils-ping",
    "iperf3",
    "tcpdump",
    "ethtool",
    "procps",
    // Build scripts of C-using crates (ring).
    "gcc",
    "libc6-dev",
];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The fuzzing front end `cargo xtask test` runs the fuzz targets with.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// LLVM majors bpf-linker 0.13 has a feature for.
const BPF_LINKER_LLVM_MAJORS: &[u32] = &[21, 22, 23];

pub const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";

/// Where the tools are, once set up.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub bpf_linker: PathBuf,
    pub llvm_major: u32,
}

/// Installs what is missing; says what it installs and what it skips.
pub fn run(quiet: bool) -> Result<Toolchain> {
    apt(quiet)?;
    let llvm_major = debian_llvm_major()?;
    let bpf_linker = bpf_linker(llvm_major, quiet)?;
    cargo_fuzz(quiet)?;
    Ok(Toolchain {
        bpf_linker,
        llvm_major,
    })
}

/// True when everything `run` would install is already present (no output).
pub fn is_complete() -> bool {
    missing_packages().map(|m| m.is_empty()).unwrap_or(false)
        && debian_llvm_major().is_ok()
        && installed_bpf_linker().is_some()
        && installed_cargo_fuzz()
}

fn installed_cargo_fuzz() -> bool {
    Command::new(cargo_home().join("bin/cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
}

fn cargo_fuzz(quiet: bool) -> Result<()> {
    if installed_cargo_fuzz() {
        if !quiet {
            println!("[setup] cargo-fuzz {CARGO_FUZZ_VERSION}: present");
        }
        return Ok(());
    }
    println!("[setup] cargo-fuzz {CARGO_FUZZ_VERSION}: installing (about a minute)");
    run_cmd(
        Command::new(host_cargo())
            .args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
                "--root",
            ])
            .arg(cargo_home()),
    )
}

/// Runs `setup` only if something is missing (quietly when nothing is).
pub fn ensure() -> Result<()> {
    if !is_complete() {
        eprintln!("[setup] something is missing: running `cargo xtask setup`");
        run(false)?;
    }
    Ok(())
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for pkg in APT_PACKAGES {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .context("running dpkg-query (is this a Debian machine?)")?;
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            missing.push(*pkg);
        }
    }
    Ok(missing)
}

fn apt(quiet: bool) -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        if !quiet {
            println!("[setup] apt: all {} packages present", APT_PACKAGES.len());
        }
        return Ok(());
    }
    require_root("install Debian packages")?;
    println!("[setup] apt: installing {}", missing.join(" "));
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

/// The LLVM major version Debian's rustc was built against (`LLVM version: 22.1.x`).
pub fn debian_llvm_major() -> Result<u32> {
    let out = Command::new(DEBIAN_RUSTC)
        .arg("-vV")
        .output()
        .with_context(|| format!("running {DEBIAN_RUSTC} -vV (package rustc-web)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("no 'LLVM version' line in `{DEBIAN_RUSTC} -vV`: {text}"))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// The bpf-linker binary, if the right version is installed.
pub fn installed_bpf_linker() -> Option<PathBuf> {
    let path = cargo_home().join("bin/bpf-linker");
    let out = Command::new(&path).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .contains(BPF_LINKER_VERSION)
        .then_some(path)
}

fn bpf_linker(llvm_major: u32, quiet: bool) -> Result<PathBuf> {
    if let Some(path) = installed_bpf_linker() {
        if !quiet {
            println!(
                "[setup] bpf-linker {BPF_LINKER_VERSION}: present at {}",
                path.display()
            );
        }
        return Ok(path);
    }
    if !BPF_LINKER_LLVM_MAJORS.contains(&llvm_major) {
        bail!(
            "Debian's rustc uses LLVM {llvm_major}; bpf-linker {BPF_LINKER_VERSION} supports LLVM {BPF_LINKER_LLVM_MAJORS:?}"
        );
    }
    // bpf-linker's build script looks for LLVM_PREFIX/lib/libLLVM.so; Debian's
    // libllvmNN ships only the versioned library, so point a private prefix at it.
    let lib = PathBuf::from(format!("/usr/lib/x86_64-linux-gnu/libLLVM-{llvm_major}.so"));
    let lib = std::fs::canonicalize(&lib)
        .with_context(|| format!("{} (package libllvm{llvm_major})", lib.display()))?;
    let prefix = env::temp_dir().join(format!("xesp-llvm-prefix-{llvm_major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    println!(
        "[setup] bpf-linker {BPF_LINKER_VERSION}: building against {} (about a minute)",
        lib.display()
    );
    run_cmd(
        Command::new(host_cargo())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .arg("--root")
            .arg(cargo_home())
            .env("LLVM_PREFIX", &prefix),
    )?;
    installed_bpf_linker().context("bpf-linker was installed but does not answer --version")
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
