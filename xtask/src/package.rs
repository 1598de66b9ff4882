//! `cargo xtask package`: the Debian package of xesp (cargo-deb), and the
//! checks of its systemd unit that the tests run.
//!
//! The package (metadata in `ike-control/Cargo.toml`, `[package.metadata.deb]`)
//! holds `/usr/bin/xesp` (its eBPF object embedded, so the build needs the
//! toolchain `cargo xtask setup` installs), `/lib/systemd/system/xesp.service`
//! (`dist/xesp.service`), the system user (`/usr/lib/sysusers.d/xesp.conf`,
//! applied by the postinst), the example configuration as the conffile
//! `/etc/xesp/xesp.toml` (owned by xesp, mode 0600) and the docs.
//!
//! The unit is checked with `systemd-analyze verify` in a scratch root that
//! holds the binary its `ExecStart=` names (verify refuses a unit whose
//! binary is absent) and with `systemd-analyze security --offline=yes`,
//! whose exposure must stay at or below [`MAX_EXPOSURE`].

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::host::{cargo_home, host_cargo, project_root, require_root, run_cmd};

/// The cargo-deb that builds the package, installed by `cargo xtask setup`.
pub const CARGO_DEB_VERSION: &str = "3.8.0";
/// Debian packages packaging and its tests need: dpkg-shlibdeps (cargo-deb's
/// `$auto` dependencies), systemd-analyze and systemd-sysusers.
pub const APT_PACKAGES: &[&str] = &["dpkg-dev", "systemd"];

/// The unit in the repository, and where the package installs it.
pub const UNIT_SOURCE: &str = "dist/xesp.service";
pub const UNIT_INSTALLED: &str = "lib/systemd/system/xesp.service";
/// `systemd-analyze security --offline=yes` of `dist/xesp.service` measured
/// 2.1 ("OK") with systemd 252; a change that weakens it fails the tests.
pub const MAX_EXPOSURE: f64 = 2.1;

/// Which build goes into the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// `cargo build --release`: what a machine should run.
    Release,
    /// The debug build (`target/debug/xesp`, as the tests build it): the
    /// same files and scripts, packaged in seconds; for tests.
    Dev,
}

impl Profile {
    fn cargo_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "dev",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct PackageArgs {
    /// The build to package.
    #[arg(long, value_enum, default_value_t = Profile::Release)]
    pub profile: Profile,
    /// Package the binary already built (do not run cargo build).
    #[arg(long)]
    pub no_build: bool,
    /// Where the .deb goes.
    #[arg(long, default_value = "target/debian")]
    pub out: PathBuf,
}

/// `cargo xtask package`: builds the .deb, checks its unit, prints its path
/// and contents.
pub fn run(args: &PackageArgs) -> Result<()> {
    ensure_tools(false)?;
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        project_root().join(&args.out)
    };
    let deb = build(args.profile, !args.no_build, &out)?;
    let unit = project_root().join(UNIT_SOURCE);
    let exposure = unit_exposure(&unit)?;
    println!(
        "[package] {}\n[package] unit: systemd-analyze security exposure {exposure:.1} (at most {MAX_EXPOSURE})",
        deb.display()
    );
    print!(
        "{}",
        crate::netns::output(Command::new("dpkg-deb").arg("--contents").arg(&deb))?
    );
    Ok(())
}

/// Builds the package of `profile` into `out` (building xesp first when
/// `build`); returns the .deb's path.
pub fn build(profile: Profile, build: bool, out: &Path) -> Result<PathBuf> {
    let root = project_root();
    let cargo = host_cargo();
    if build {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args(["build", "--locked", "-p", "ike-control", "--bin", "xesp"])
            .args(["--profile", profile.cargo_name()]);
        run_cmd(&mut cmd)?;
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Only this build's .deb in `out` afterwards, so the one found is it.
    for e in fs::read_dir(out)?.flatten() {
        if e.path().extension().is_some_and(|x| x == "deb") {
            fs::remove_file(e.path())?;
        }
    }
    let mut deb = Command::new(&cargo);
    deb.current_dir(&root)
        .args(["deb", "--locked", "-p", "ike-control", "--no-build"])
        .args(["--profile", profile.cargo_name()])
        .arg("--output")
        .arg(out);
    if profile == Profile::Dev {
        // A test's package: quicker compression, a larger file. (cargo-deb
        // warns that it means the dev profile for releases; it is not one.)
        deb.arg("--fast");
    }
    run_cmd(&mut deb).context("cargo deb (installed by `cargo xtask setup`)")?;
    let debs: Vec<PathBuf> = fs::read_dir(out)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    match debs.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one .deb in {}, found {other:?}", out.display()),
    }
}

fn installed_cargo_deb() -> bool {
    Command::new(cargo_home().join("bin/cargo-deb"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
}

fn missing_apt() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// True when packaging has all it needs (no output).
pub fn tools_present() -> bool {
    installed_cargo_deb() && missing_apt().is_empty()
}

/// Installs what packaging needs and is missing: its Debian packages, and
/// cargo-deb (pinned, `--locked`).
pub fn ensure_tools(quiet: bool) -> Result<()> {
    let missing = missing_apt();
    if missing.is_empty() {
        if !quiet {
            println!(
                "[setup] apt for packaging: {} present",
                APT_PACKAGES.join(" ")
            );
        }
    } else {
        require_root("install Debian packages")?;
        println!(
            "[setup] apt for packaging: installing {}",
            missing.join(" ")
        );
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
    }
    if installed_cargo_deb() {
        if !quiet {
            println!("[setup] cargo-deb {CARGO_DEB_VERSION}: present");
        }
        return Ok(());
    }
    println!("[setup] cargo-deb {CARGO_DEB_VERSION}: installing (a few minutes)");
    run_cmd(
        Command::new(host_cargo())
            .args(["install", "--locked", "cargo-deb", "--version"])
            .arg(CARGO_DEB_VERSION)
            .arg("--root")
            .arg(cargo_home()),
    )
}

/// Lays out `root` for `systemd-analyze verify --root`: the host's own
/// units (the targets and mounts a unit is ordered against; a scratch root
/// has no systemd package), without replacing any file already there.
pub fn add_host_units(root: &Path) -> Result<()> {
    let dest = root.join("lib/systemd/system");
    fs::create_dir_all(&dest)?;
    for e in fs::read_dir("/lib/systemd/system").context("/lib/systemd/system (package systemd)")? {
        let e = e?;
        let to = dest.join(e.file_name());
        if to.symlink_metadata().is_ok() {
            continue;
        }
        let ty = e.file_type()?;
        if ty.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path())?, &to)?;
        } else if ty.is_file() {
            fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

/// A scratch root holding the repository's unit at its installed place and
/// `binary` as `/usr/bin/xesp` (what `ExecStart=` runs).
pub fn unit_root(dir: &Path, unit: &Path, binary: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    let bin = dir.join("usr/bin/xesp");
    fs::create_dir_all(bin.parent().context("no parent")?)?;
    // A hard link where it can (the debug binary is 100+ MB), else a copy.
    if fs::hard_link(binary, &bin).is_err() {
        fs::copy(binary, &bin).with_context(|| format!("copying {}", binary.display()))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    }
    let to = dir.join(UNIT_INSTALLED);
    fs::create_dir_all(to.parent().context("no parent")?)?;
    fs::copy(unit, &to).with_context(|| format!("copying {}", unit.display()))?;
    add_host_units(dir)?;
    Ok(dir.to_path_buf())
}

/// `systemd-analyze verify --root=ROOT` of the unit installed in `root`.
/// Any message fails it: verify exits 0 on warnings such as an unknown
/// key, which would silently drop a hardening line.
pub fn verify_unit(root: &Path) -> Result<()> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(root.join(UNIT_INSTALLED))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .context("running systemd-analyze (package systemd)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !text.trim().is_empty() {
        bail!(
            "systemd-analyze verify {}: {} {}",
            root.join(UNIT_INSTALLED).display(),
            out.status,
            text.trim()
        );
    }
    Ok(())
}

/// `systemd-analyze security --offline=yes` of a unit file: its overall
/// exposure (0.0 best, 10.0 worst).
pub fn unit_exposure(unit: &Path) -> Result<f64> {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .context("running systemd-analyze (package systemd)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "systemd-analyze security {}: {}: {}{}",
            unit.display(),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_exposure(&text).with_context(|| format!("systemd-analyze security said: {text}"))
}

/// The number in `Overall exposure level for xesp.service: 2.1 OK`.
pub fn parse_exposure(text: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .context("no 'Overall exposure level' line")?;
    let after = line.rsplit_once(": ").context("no ': ' in the line")?.1;
    let num = after.split_whitespace().next().context("no number")?;
    num.parse()
        .with_context(|| format!("exposure {num:?} is not a number"))
}

/// Installs `deb` into the scratch root `root` with dpkg, maintainer scripts
/// included: they run on the host with `DPKG_ROOT=root`
/// (`--force-script-chrootless`; the scripts honour it). The root holds no
/// libc, so its dependencies are not checked (`--force-depends`).
pub fn install_into_root(deb: &Path, root: &Path) -> Result<String> {
    let admin = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        fs::create_dir_all(admin.join(d))?;
    }
    for f in ["status", "available"] {
        let p = admin.join(f);
        if !p.exists() {
            fs::write(&p, "")?;
        }
    }
    // The files a postinst edits exist on every system.
    fs::create_dir_all(root.join("etc"))?;
    for f in ["passwd", "group", "shadow", "gshadow"] {
        let p = root.join("etc").join(f);
        if !p.exists() {
            let base = match f {
                "passwd" => "root:x:0:0:root:/root:/bin/sh\n",
                "group" => "root:x:0:\n",
                "shadow" => "root:*:19000:0:99999:7:::\n",
                _ => "root:*::\n",
            };
            fs::write(&p, base)?;
        }
    }
    crate::netns::output(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--no-triggers",
                "--install",
            ])
            .arg(deb),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_line_is_parsed() {
        let text = "  NAME  DESCRIPTION  EXPOSURE\n✓ X=  y\n\n\
                    → Overall exposure level for xesp.service: 2.1 OK 🙂\n";
        assert_eq!(parse_exposure(text).unwrap(), 2.1);
        assert_eq!(
            parse_exposure("→ Overall exposure level for a.service: 9.6 UNSAFE 😨").unwrap(),
            9.6
        );
        assert!(parse_exposure("nothing").is_err());
        assert!(parse_exposure("Overall exposure level for a.service: high").is_err());
    }
}
