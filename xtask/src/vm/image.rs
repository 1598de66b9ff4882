//! The guest's ingredients: Debian's 6.1 kernel (`linux-image-6.1.0-<n>-amd64`,
//! `<n>` resolved from `apt-cache depends linux-image-amd64`), `busybox-static`
//! and `kmod` (for `depmod`), fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x` under `target/vm/` — never installed into the host's /boot.
//!
//! Layout of `target/vm/`:
//!
//! * `debs/` the downloaded packages;
//! * `unpacked/` the three packages unpacked together (`boot/vmlinuz-*`,
//!   `lib/modules/<release>/` with the `modules.dep` that `depmod` wrote,
//!   `bin/busybox`, `bin/kmod`);
//! * `vmlinux-<release>` the kernel's ELF image taken out of `vmlinuz` (QEMU
//!   boots it directly through its PVH entry: no firmware-loaded bzImage
//!   decompressing itself under emulation, which took 15-20 s of each boot on
//!   a loaded machine);
//! * `unpacked.stamp` the kernel package they came from (fetched again when
//!   Debian's `linux-image-amd64` moves to another ABI);
//! * `initramfs.cpio.gz` and its stamp (see [`super::initramfs`]);
//! * `work/` the per-run work directories.

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::host::{project_root, run_cmd};

/// The meta-package whose dependency names the current 6.1 kernel.
pub const KERNEL_META: &str = "linux-image-amd64";
/// The other packages the initramfs is made of.
pub const TOOL_PACKAGES: &[&str] = &["busybox-static", "kmod"];

/// Where the unpacked kernel, modules and busybox are.
#[derive(Debug, Clone)]
pub struct Assets {
    /// `target/vm`.
    pub dir: PathBuf,
    /// `6.1.0-<n>-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The uncompressed ELF kernel, booted through PVH.
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>` of the unpacked kernel (with `modules.dep`).
    pub modules: PathBuf,
    pub busybox: PathBuf,
    /// The unpacked kmod under the name `modprobe` (the guest's module
    /// requests run it chrooted into the host's root).
    pub modprobe: PathBuf,
    /// The root the packages were unpacked into (`modprobe -d`).
    pub root: PathBuf,
}

/// `target/vm` of this project.
pub fn vm_dir() -> PathBuf {
    project_root().join("target/vm")
}

fn unpacked_dir(dir: &Path) -> PathBuf {
    dir.join("unpacked")
}

fn stamp_path(dir: &Path) -> PathBuf {
    dir.join("unpacked.stamp")
}

impl Assets {
    fn at(dir: &Path, release: &str) -> Self {
        let root = unpacked_dir(dir);
        Self {
            dir: dir.to_path_buf(),
            release: release.to_string(),
            vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
            vmlinux: dir.join(format!("vmlinux-{release}")),
            modules: root.join(format!("lib/modules/{release}")),
            busybox: root.join("bin/busybox"),
            modprobe: dir.join("bin/modprobe"),
            root,
        }
    }

    fn complete(&self) -> bool {
        self.vmlinuz.is_file()
            && self.vmlinux.is_file()
            && self.modules.join("modules.dep").is_file()
            && self.busybox.is_file()
            && self.modprobe.exists()
    }

    /// The assets already unpacked, whatever kernel they are (no apt, no output).
    pub fn present() -> Option<Self> {
        let dir = vm_dir();
        let package = fs::read_to_string(stamp_path(&dir)).ok()?;
        let release = release_of_package(package.trim())?;
        let assets = Self::at(&dir, &release);
        assets.complete().then_some(assets)
    }
}

/// `linux-image-6.1.0-57-amd64` -> `6.1.0-57-amd64`.
fn release_of_package(package: &str) -> Option<String> {
    let release = package.strip_prefix("linux-image-")?;
    (!release.is_empty()
        && release
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.+_".contains(c)))
    .then(|| release.to_string())
}

/// The kernel package `linux-image-amd64` depends on, from `apt-cache depends`'
/// output (`  Depends: linux-image-6.1.0-57-amd64`).
pub fn parse_kernel_dependency(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && release_of_package(p).is_some())
        .map(str::to_string)
}

/// Resolves the kernel package with `apt-cache depends linux-image-amd64`,
/// running `apt-get update` once if apt knows nothing yet.
fn resolve_kernel_package() -> Result<String> {
    let query = || -> Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_META])
            .output()
            .context("running apt-cache (is this a Debian machine?)")?;
        Ok(parse_kernel_dependency(&String::from_utf8_lossy(
            &out.stdout,
        )))
    };
    if let Some(p) = query()? {
        return Ok(p);
    }
    println!("[setup] vm: apt knows no {KERNEL_META} yet: apt-get update");
    run_cmd(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    query()?.with_context(|| {
        format!("`apt-cache depends {KERNEL_META}` names no linux-image-<release> package")
    })
}

/// An exclusive lock on `target/vm/.lock`, held while assets are written (two
/// tests, or a test and `cargo xtask vm`, may ask at once).
pub struct DirLock(fs::File);

impl DirLock {
    pub fn take(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(".lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Fetches and unpacks what is missing; quick (one `apt-cache` call) when all is there.
pub fn ensure(quiet: bool) -> Result<Assets> {
    let dir = vm_dir();
    let _lock = DirLock::take(&dir)?;
    let package = match resolve_kernel_package() {
        Ok(p) => p,
        Err(e) => {
            // Offline or no apt lists: what is unpacked still boots.
            if let Some(a) = Assets::present() {
                eprintln!("[setup] vm: {e:#}; using the unpacked kernel {}", a.release);
                return Ok(a);
            }
            return Err(e);
        }
    };
    let release = release_of_package(&package)
        .with_context(|| format!("unexpected kernel package name {package:?}"))?;
    let assets = Assets::at(&dir, &release);
    let stamp = fs::read_to_string(stamp_path(&dir)).unwrap_or_default();
    if stamp.trim() == package && assets.vmlinuz.is_file() {
        // Caches from before these steps.
        if !assets.vmlinux.is_file() {
            extract_vmlinux(&assets.vmlinuz, &assets.vmlinux)?;
        }
        if !assets.modprobe.exists() {
            tool_links(&dir)?;
        }
    }
    if stamp.trim() == package && assets.complete() {
        if !quiet {
            println!(
                "[setup] vm: kernel {release}, busybox and modules: present in {}",
                dir.display()
            );
        }
        return Ok(assets);
    }
    if let Err(e) = fetch(&dir, &package, &assets) {
        // Stale apt lists name a kernel the archive has replaced: refresh
        // them once and take the kernel they name then.
        eprintln!("[setup] vm: {e:#}; apt-get update and trying again");
        run_cmd(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        let package = resolve_kernel_package()?;
        let release = release_of_package(&package)
            .with_context(|| format!("unexpected kernel package name {package:?}"))?;
        let assets = Assets::at(&dir, &release);
        fetch(&dir, &package, &assets)?;
        return Ok(assets);
    }
    Ok(assets)
}

fn fetch(dir: &Path, package: &str, assets: &Assets) -> Result<()> {
    let started = Instant::now();
    let debs = dir.join("debs");
    let root = unpacked_dir(dir);
    for d in [&debs, &root] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let _ = fs::remove_file(stamp_path(dir));
    let mut packages = vec![package];
    packages.extend_from_slice(TOOL_PACKAGES);
    println!(
        "[setup] vm: apt-get download {} (about 70 MB) into {}",
        packages.join(" "),
        debs.display()
    );
    run_cmd(
        Command::new("apt-get")
            // Downloading as root into a folder apt's sandbox user cannot
            // write is fine: say so instead of warning.
            .args(["-o", "APT::Sandbox::User=root", "-q", "download"])
            .args(&packages)
            .current_dir(&debs),
    )?;
    let mut found = Vec::new();
    for entry in fs::read_dir(&debs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            found.push(path);
        }
    }
    if found.len() != packages.len() {
        bail!(
            "apt-get download left {} .deb files in {} for {} packages",
            found.len(),
            debs.display(),
            packages.len()
        );
    }
    println!("[setup] vm: unpacking them with dpkg-deb -x (about 400 MB, 10-20 s)");
    for deb in &found {
        run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    let depmod = tool_links(dir)?;
    println!("[setup] vm: depmod for {}", assets.release);
    run_cmd(
        Command::new(&depmod)
            .arg("-b")
            .arg(&root)
            .arg(&assets.release),
    )?;
    extract_vmlinux(&assets.vmlinuz, &assets.vmlinux)?;
    if !assets.complete() {
        bail!(
            "after unpacking, {} lacks {}, {}, {} or {}",
            root.display(),
            assets.vmlinuz.display(),
            assets.vmlinux.display(),
            assets.modules.join("modules.dep").display(),
            assets.busybox.display()
        );
    }
    fs::write(stamp_path(dir), format!("{package}\n"))?;
    println!(
        "[setup] vm: kernel {} ready in {:.0} s",
        assets.release,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The unpacked kmod's depmod and modprobe are symlinks to /bin/kmod, which
/// the host may not have: links under those names to the unpacked kmod, in
/// `target/vm/bin/`. Returns depmod's.
fn tool_links(dir: &Path) -> Result<PathBuf> {
    let tools = dir.join("bin");
    fs::create_dir_all(&tools)?;
    for name in ["depmod", "modprobe"] {
        let link = tools.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(unpacked_dir(dir).join("bin/kmod"), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(tools.join("depmod"))
}

/// Where the compressed kernel starts inside a bzImage, and the command that
/// decompresses it (a single stream: what follows it is not the kernel's).
pub fn payload_of(bzimage: &[u8]) -> Option<(usize, &'static [&'static str])> {
    const XZ: &[u8] = b"\xfd7zXZ\x00";
    const GZIP: &[u8] = b"\x1f\x8b\x08";
    let find = |magic: &[u8]| bzimage.windows(magic.len()).position(|w| w == magic);
    if let Some(at) = find(XZ) {
        return Some((at, &["xz", "-dc", "--single-stream"]));
    }
    find(GZIP).map(|at| (at, &["gzip", "-dc"][..]))
}

/// Takes the ELF kernel out of `vmlinuz` (xz or gzip payload).
fn extract_vmlinux(vmlinuz: &Path, vmlinux: &Path) -> Result<()> {
    let data = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let (at, decompress) = payload_of(&data)
        .with_context(|| format!("{}: no xz or gzip payload found", vmlinuz.display()))?;
    println!(
        "[setup] vm: decompressing the kernel to {} ({})",
        vmlinux.display(),
        decompress[0]
    );
    let tmp = vmlinux.with_extension(format!("tmp{}", std::process::id()));
    let out = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut child = Command::new(decompress[0])
        .args(&decompress[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(out)
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (package xz-utils or gzip)", decompress[0]))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("decompressor's stdin")?;
        // It may stop reading at the end of the stream: a broken pipe then is fine.
        let _ = stdin.write_all(&data[at..]);
    }
    child.wait()?;
    let head = fs::read(&tmp)
        .map(|d| d.get(..4).map(<[u8]>::to_vec).unwrap_or_default())
        .unwrap_or_default();
    if head != b"\x7fELF" {
        let _ = fs::remove_file(&tmp);
        bail!(
            "{} did not decompress to an ELF kernel ({} from offset {at})",
            vmlinuz.display(),
            decompress.join(" ")
        );
    }
    fs::rename(&tmp, vmlinux)
        .with_context(|| format!("renaming {} to {}", tmp.display(), vmlinux.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_payload_is_found_after_the_setup_code() {
        let mut image = vec![0u8; 100];
        image.extend_from_slice(b"\x1f\x8b\x08 not this one");
        assert_eq!(payload_of(&image).map(|p| p.0), Some(100));
        image.extend_from_slice(b"\xfd7zXZ\x00...");
        let (at, cmd) = payload_of(&image).unwrap();
        assert_eq!((at, cmd[0]), (100 + 16, "xz"));
        assert_eq!(payload_of(&[0u8; 64]), None);
    }

    #[test]
    fn the_kernel_package_comes_from_the_meta_package_dependency() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_kernel_dependency(out).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        assert_eq!(parse_kernel_dependency("linux-image-amd64\n"), None);
        assert_eq!(parse_kernel_dependency("  Depends: linux-image-\n"), None);
        assert_eq!(
            parse_kernel_dependency("  Depends: linux-image-6.1 /x\n"),
            None
        );
        assert_eq!(
            release_of_package("linux-image-6.1.0-57-amd64").as_deref(),
            Some("6.1.0-57-amd64")
        );
    }
}
