//! The QEMU command line: TCG by default (nested KVM hangs in early boot on
//! these machines), `XESP_VM_ACCEL=kvm` to try KVM; no network card, no
//! display, the serial console on QEMU's stdout; the host's root shared
//! read-only and the work directory read-write over 9p.
//!
//! The kernel is the uncompressed ELF (PVH entry), and the crypto API's
//! self-tests are off (`cryptomgr.notests`): under TCG on a loaded 2-core
//! machine these took 15-20 s and 5-10 s of each boot.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

pub const QEMU: &str = "qemu-system-x86_64";
/// Chooses the accelerator: `tcg` (default) or `kvm`.
pub const ACCEL_ENV: &str = "XESP_VM_ACCEL";
/// Extra kernel parameters, for debugging a boot (e.g. `loglevel=7 printk.time=1`).
pub const APPEND_ENV: &str = "XESP_VM_APPEND";

/// `qemu-system-x86_64` on PATH (or in /usr/bin), if installed.
pub fn find_qemu() -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(QEMU))
        .find(|p| p.is_file())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    /// From `XESP_VM_ACCEL` (unset: TCG).
    pub fn from_env() -> Result<Self> {
        match env::var(ACCEL_ENV).ok().as_deref().map(str::trim) {
            None | Some("") | Some("tcg") => Ok(Self::Tcg),
            Some("kvm") => {
                if !Path::new("/dev/kvm").exists() {
                    bail!("{ACCEL_ENV}=kvm but there is no /dev/kvm");
                }
                Ok(Self::Kvm)
            }
            Some(other) => bail!("{ACCEL_ENV}={other:?}: expected tcg or kvm"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcg => "TCG",
            Self::Kvm => "KVM",
        }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            Self::Tcg => ["-accel", "tcg", "-cpu", "max"],
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
        }
    }
}

/// What one boot needs.
pub struct Boot<'a> {
    pub qemu: &'a Path,
    pub accel: Accel,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub work: &'a Path,
    pub nonce: &'a str,
    pub mem_mb: u32,
    pub cpus: u32,
}

/// QEMU's option syntax doubles a comma inside a value.
fn qemu_value(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

impl Boot<'_> {
    pub fn command(&self) -> Command {
        let mut c = Command::new(self.qemu);
        c.args(self.accel.args())
            .args(["-m", &self.mem_mb.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-display", "none", "-vga", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-nic", "none"])
            .arg("-kernel")
            .arg(self.kernel)
            .arg("-initrd")
            .arg(self.initramfs)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests {} xesp.work={} xesp.nonce={}",
                env::var(APPEND_ENV).unwrap_or_default(),
                self.work.display(),
                self.nonce
            ))
            .arg("-virtfs")
            .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=work,security_model=none,multidevs=remap",
                qemu_value(self.work)
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}
