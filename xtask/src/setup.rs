//! `cargo xtask setup`: installs, idempotently, what building and testing xesp
//! needs on a fresh Debian 12 machine, and finds it again for the other commands.
//!
//! * Debian packages (apt-get): Debian's Rust compiler with its library source
//!   (the eBPF crate is built by it with `-Z build-std=core`), strongSwan and
//!   BIRD for the reference lab, and the network tools the lab and tests use.
//! * bpf-linker, built against the libLLVM that Debian's rustc itself links
//!   (its major version is read from `/usr/bin/rustc -vV`, never pinned);
//! * cargo-fuzz, which runs the fuzz targets (with rustup's nightly);
//! * for the test VM ([`crate::vm`]): QEMU (`qemu-system-x86`, from
//!   `<codename>-backports` when the preinstalled `qemu-utils` comes from
//!   there, since the release's own QEMU `Breaks` it; never removing a
//!   package), and Debian's kernel, busybox and kmod unpacked under
//!   `target/vm/` with the initramfs built from them;
//! * cargo-deb and what packaging needs ([`crate::package::ensure_tools`]).

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

pub use crate::host::{
    cargo_home, host_cargo, project_root, require_root, run_cmd, run_cmd_within,
};

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
    // The xfrm datapath's TCP MSS clamp (nft -f), in the VM tests too.
    "nftables",
    // The test VM's kernel is taken out of its xz-compressed bzImage.
    "xz-utils",
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
    crate::package::ensure_tools(quiet)?;
    qemu(quiet)?;
    let assets = crate::vm::image::ensure(quiet)?;
    crate::vm::initramfs::ensure(&assets, quiet)?;
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
        && crate::vm::qemu::find_qemu().is_some()
        && crate::vm::image::Assets::present().is_some()
        && crate::package::tools_present()
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

/// The QEMU package the test VM boots with.
pub const QEMU_PACKAGE: &str = "qemu-system-x86";

/// Installs QEMU if `qemu-system-x86_64` is missing. When the installed
/// `qemu-utils` comes from backports (`~bpo`), the release's own
/// `qemu-system-x86` declares `Breaks` against it, so QEMU comes from
/// `<codename>-backports` too (its apt source added if none names it, on the
/// mirror the release's own source uses). `--no-remove`: apt aborts rather
/// than remove an installed package.
fn qemu(quiet: bool) -> Result<()> {
    if let Some(path) = crate::vm::qemu::find_qemu() {
        if !quiet {
            println!("[setup] qemu: present at {}", path.display());
        }
        return Ok(());
    }
    require_root("install QEMU")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends", "--no-remove"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    let utils = installed_version("qemu-utils");
    if let Some(version) = utils.as_deref().filter(|v| v.contains("~bpo")) {
        let codename = os_codename()?;
        let suite = format!("{codename}-backports");
        let sources = read_apt_sources();
        if has_suite(&sources, &suite) {
            println!("[setup] qemu: qemu-utils {version} is from {suite}; its apt source is there");
        } else {
            let (uri, signed_by) = release_source(&sources, &codename).with_context(|| {
                format!(
                    "no apt source for {codename} in /etc/apt/sources.list* to take the mirror from"
                )
            })?;
            let file = format!("/etc/apt/sources.list.d/xesp-{suite}.sources");
            println!("[setup] qemu: qemu-utils {version} is from {suite}: adding {file} ({uri})");
            std::fs::write(&file, backports_source(&uri, &suite, signed_by.as_deref()))
                .with_context(|| format!("writing {file}"))?;
        }
        run_cmd(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        install.args(["-t", &suite]);
    } else {
        run_cmd(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    println!("[setup] qemu: installing {QEMU_PACKAGE}");
    run_cmd(install.arg(QEMU_PACKAGE))?;
    crate::vm::qemu::find_qemu().map(|_| ()).with_context(|| {
        format!(
            "{QEMU_PACKAGE} is installed but there is no {}",
            crate::vm::qemu::QEMU
        )
    })
}

/// The installed version of a Debian package, if it is installed.
fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}|${Version}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('|')?;
    status
        .contains("install ok installed")
        .then(|| version.trim().to_string())
}

/// `VERSION_CODENAME` of /etc/os-release (`bookworm`).
fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME")
}

/// One apt source: its URIs, suites, and `Signed-By` (one-line sources as well as deb822).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub signed_by: Option<String>,
}

/// The binary (`deb`) sources apt reads: /etc/apt/sources.list and the
/// `.list` and `.sources` files beside it (others apt ignores, and so do we).
fn read_apt_sources() -> Vec<AptSource> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut sources = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => sources.extend(parse_deb822_sources(&text)),
            Some("list") => sources.extend(parse_one_line_sources(&text)),
            _ => {}
        }
    }
    sources
}

/// deb822 stanzas (`Types: deb`, `URIs:`, `Suites:`, `Signed-By:`), skipping
/// `Enabled: no` and non-`deb` ones.
pub fn parse_deb822_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields = std::collections::BTreeMap::new();
        for line in stanza.lines() {
            if line.starts_with('#') || line.starts_with(char::is_whitespace) {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let words = |k: &str| -> Vec<String> {
            fields
                .get(k)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        if !words("types").iter().any(|t| t == "deb")
            || fields
                .get("enabled")
                .is_some_and(|v| v.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        out.push(AptSource {
            uris: words("uris"),
            suites: words("suites"),
            signed_by: fields.get("signed-by").filter(|v| !v.is_empty()).cloned(),
        });
    }
    out
}

/// `deb [signed-by=...] URI SUITE COMPONENT...` lines.
pub fn parse_one_line_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(str::to_string);
            rest = after.trim();
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(AptSource {
                uris: vec![uri.to_string()],
                suites: vec![suite.to_string()],
                signed_by,
            });
        }
    }
    out
}

fn has_suite(sources: &[AptSource], suite: &str) -> bool {
    sources.iter().any(|s| s.suites.iter().any(|x| x == suite))
}

/// The mirror (and key) of the release's own source (`Suites: bookworm`).
pub fn release_source(sources: &[AptSource], codename: &str) -> Option<(String, Option<String>)> {
    sources
        .iter()
        .filter(|s| s.suites.iter().any(|x| x == codename))
        .find_map(|s| Some((s.uris.first()?.clone(), s.signed_by.clone())))
}

/// The deb822 source for `suite` on `uri`.
pub fn backports_source(uri: &str, suite: &str, signed_by: Option<&str>) -> String {
    let mut s = format!(
        "# Added by xesp's `cargo xtask setup`: QEMU for the test VM comes from here.\n\
         Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\n"
    );
    if let Some(k) = signed_by {
        s += &format!("Signed-By: {k}\n");
    }
    s
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backports_source_reuses_the_release_mirror() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n\
Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n\
Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n";
        let sources = parse_deb822_sources(deb822);
        assert_eq!(sources.len(), 2);
        assert_eq!(
            release_source(&sources, "bookworm"),
            Some((
                "http://mirror.example/debian".to_string(),
                Some("/usr/share/keyrings/k.gpg".to_string())
            ))
        );
        assert!(!has_suite(&sources, "bookworm-backports"));
        let one = "# old style\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n\
deb-src http://m.example/debian bookworm main\ndeb http://m.example/debian bookworm-backports main\n";
        let sources = parse_one_line_sources(one);
        assert_eq!(sources.len(), 2);
        assert_eq!(
            release_source(&sources, "bookworm"),
            Some((
                "http://m.example/debian".to_string(),
                Some("/k.gpg".to_string())
            ))
        );
        assert!(has_suite(&sources, "bookworm-backports"));
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://x.example/\nSuites: bookworm\n";
        assert!(parse_deb822_sources(disabled).is_empty());
        let text = backports_source(
            "http://mirror.example/debian",
            "bookworm-backports",
            Some("/k.gpg"),
        );
        let back = parse_deb822_sources(&text);
        assert_eq!(back[0].suites, ["bookworm-backports"]);
        assert_eq!(back[0].uris, ["http://mirror.example/debian"]);
        assert_eq!(back[0].signed_by.as_deref(), Some("/k.gpg"));
    }
}
