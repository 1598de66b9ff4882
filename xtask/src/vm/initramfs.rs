//! The guest's initramfs: busybox, the kernel modules XFRM tests need (with
//! their dependencies, from the unpacked `modules.dep`) and an `/init` that
//! loads them, mounts the host's root and runs the command chrooted into it.
//!
//! The archive is written here in the `newc` cpio format and compressed with
//! the `gzip` command. It is rebuilt only when its inputs change (kernel
//! release, busybox, the module list, the init script), which a stamp beside
//! it records; building takes under a second.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::image::Assets;

/// Modules loaded at boot, in this order (each after its dependencies).
/// Names as `modprobe` takes them; `-` and `_` are the same. Modules the
/// kernel has built in are skipped. Any other module of the kernel is
/// loaded on demand once the host's root is mounted (see [`modprobe_script`]).
pub const MODULES: &[&str] = &[
    // The host's root and the work directory over 9p on virtio.
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    // XFRM: netlink configuration, xfrm interfaces, ESP, VTI, PF_KEY.
    "xfrm_user",
    "xfrm_interface",
    "esp4",
    "esp6",
    "esp4_offload",
    "esp6_offload",
    "xfrm4_tunnel",
    "xfrm6_tunnel",
    "ip_vti",
    "ip6_vti",
    "af_key",
    // Links tests build.
    "veth",
    "dummy",
    "tun",
    // ESP's IV generators (seqiv, echainiv) take their salt from the
    // default RNG ("stdrng": drbg). Its seed source, jitterentropy_rng, has
    // a soft dependency insmod does not follow: it loads on demand.
    "drbg",
    // The ciphers and integrity algorithms xesp proposes.
    "crypto_null",
    "aesni_intel",
    "gcm",
    "ghash_generic",
    "ghash_clmulni_intel",
    "ctr",
    "seqiv",
    "echainiv",
    "authenc",
    "authencesn",
    "cbc",
    "hmac",
    "sha1_ssse3",
    "sha256_ssse3",
    "sha512_ssse3",
    "sha512_generic",
    "des_generic",
    "des3_ede_x86_64",
    "chacha20poly1305",
    "chacha_x86_64",
    "poly1305_x86_64",
];

/// Busybox applets the init script uses.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "chroot", "cat", "echo", "poweroff", "ip",
];

/// Bumped when the layout below changes, so old archives are rebuilt.
const FORMAT: u32 = 1;

/// `modprobe`'s notion of a module's name: the file stem, `-` as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The `.ko` paths (relative to `lib/modules/<release>`) to load for
/// `wanted`, each after its dependencies, from `modules.dep` and
/// `modules.builtin`. A wanted module that is neither is an error.
pub fn load_order(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
) -> Result<Vec<String>> {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let path = path.trim();
        if path.is_empty() {
            continue;
        }
        deps.insert(
            module_name(path),
            (
                path.to_string(),
                rest.split_whitespace().map(str::to_string).collect(),
            ),
        );
    }
    let builtin: BTreeSet<String> = modules_builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if depth > 64 {
            bail!("modules.dep: dependency chain of {name} is deeper than 64 (a cycle?)");
        }
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (path, its_deps) = deps.get(name).with_context(|| {
            format!("modules.dep names a dependency {name} that it does not list")
        })?;
        for d in its_deps {
            visit(&module_name(d), deps, seen, order, depth + 1)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for w in wanted {
        let name = module_name(w);
        if deps.contains_key(&name) {
            visit(&name, &deps, &mut seen, &mut order, 0)?;
        } else if !builtin.contains(&name) {
            bail!("kernel module {w} is neither in modules.dep nor built in");
        }
    }
    Ok(order)
}

/// The `/init` busybox runs as PID 1.
///
/// Kernel command line: `xesp.work=<dir>` (the host directory shared
/// read-write as tag `work`, mounted at the same path inside the chroot) and
/// `xesp.nonce=<hex>` (marks the lines the host looks for). The command is
/// `<work>/.xesp-vm/run.sh`, written by the host.
pub fn init_script(release: &str) -> String {
    format!(
        r#"#!/bin/sh
# /init of xesp's test VM (written by xtask::vm::initramfs).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
WORK=
NONCE=
for w in $(cat /proc/cmdline); do
    case "$w" in
        xesp.work=*) WORK="${{w#xesp.work=}}" ;;
        xesp.nonce=*) NONCE="${{w#xesp.nonce=}}" ;;
    esac
done
fail() {{
    echo "xesp-vm: $*"
    echo "XESP_VM_FAILED $NONCE $*"
    poweroff -f
}}
while read -r m; do
    insmod "/lib/modules/{release}/$m" || echo "xesp-vm: insmod $m failed"
done < /modules.load
O=trans=virtio,version=9p2000.L,msize=262144
mkdir -p /host
mount -t 9p -o "$O,ro,cache=loose" hostroot /host || fail "cannot mount the host's root (9p tag hostroot)"
mount -t proc proc /host/proc || fail "cannot mount /proc"
mount -t sysfs sysfs /host/sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /host/dev || fail "cannot mount /dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs -o mode=1777 shm /host/dev/shm
mount -t bpf bpf /host/sys/fs/bpf 2>/dev/null
# The guest's own /tmp and /var/tmp, with what the host has there (a
# project cloned under /tmp, say) still seen, read-only, by name.
for d in /tmp /var/tmp; do
    mkdir -p "/hostdirs$d"
    mount -o bind "/host$d" "/hostdirs$d" || fail "cannot keep the host's $d"
    mount -t tmpfs -o mode=1777 tmpfs "/host$d" || fail "cannot mount a tmpfs on $d"
    for e in "/hostdirs$d"/* "/hostdirs$d"/.[!.]*; do
        n="${{e##*/}}"
        if [ -d "$e" ] && [ ! -L "$e" ]; then
            mkdir -p "/host$d/$n" && mount -o bind "$e" "/host$d/$n"
        elif [ -f "$e" ] && [ ! -L "$e" ]; then
            : > "/host$d/$n" && mount -o bind "$e" "/host$d/$n"
        fi
    done
done
mount -t tmpfs -o mode=0755 tmpfs /host/run || fail "cannot mount a tmpfs on /run"
[ -n "$WORK" ] || fail "no xesp.work= on the kernel command line"
mount -t 9p -o "$O" work "/host$WORK" || fail "cannot mount the work directory $WORK (9p tag work)"
ip link set lo up
echo "XESP_VM_START $NONCE"
chroot /host /bin/sh "$WORK/.xesp-vm/run.sh" </dev/null
rc=$?
echo "$rc" > "/host$WORK/.xesp-vm/status"
echo "XESP_VM_STATUS $NONCE $rc"
poweroff -f
"#
    )
}

/// `/sbin/modprobe`, which the kernel runs for modules it wants (an
/// algorithm, a link type, a protocol): Debian's modprobe from the unpacked
/// kmod, chrooted into the host's root (where its libraries are), with the
/// unpacked kernel package as its module root. Before the host's root is
/// mounted it fails, and the kernel goes on without the module.
pub fn modprobe_script(assets: &Assets) -> String {
    format!(
        r#"#!/bin/sh
# Module requests of the kernel (written by xtask::vm::initramfs).
# (Its path is a symlink into the host's root: test what it points to.)
[ -e "/host{root}/bin/kmod" ] || exit 1
exec /bin/chroot /host "{modprobe}" -d "{root}" "$@"
"#,
        modprobe = assets.modprobe.display(),
        root = assets.root.display(),
    )
}

/// A `newc` ("070701") cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> Result<()> {
        let size = u32::try_from(data.len()).with_context(|| format!("{name} is over 4 GiB"))?;
        if name.is_empty() || name.contains('\0') {
            bail!("bad cpio entry name {name:?}");
        }
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: reproducible
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            u32::try_from(namesize).context("cpio name too long")?,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            write!(self.out, "{f:08x}")?;
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) -> Result<()> {
        self.entry(name, 0o040755, &[], (0, 0))
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.entry(name, 0o100000 | (mode & 0o7777), data, (0, 0))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.entry(name, 0o120777, target.as_bytes(), (0, 0))
    }

    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(name, 0o020000 | (mode & 0o7777), &[], (major, minor))
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        Ok(self.out)
    }
}

fn fingerprint(assets: &Assets, order: &[String], init: &str) -> Result<String> {
    let bb =
        fs::metadata(&assets.busybox).with_context(|| format!("{}", assets.busybox.display()))?;
    Ok(format!(
        "format {FORMAT}\nrelease {}\nbusybox {}\nmodules {}\ninit {:016x}\n",
        assets.release,
        bb.len(),
        order.join(" "),
        fnv1a(init.as_bytes()),
    ))
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `target/vm/initramfs.cpio.gz`, built if its inputs changed.
pub fn ensure(assets: &Assets, quiet: bool) -> Result<PathBuf> {
    let out = assets.dir.join("initramfs.cpio.gz");
    let stamp_path = assets.dir.join("initramfs.stamp");
    let read = |name: &str| {
        let p = assets.modules.join(name);
        fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let order = load_order(&read("modules.dep")?, &read("modules.builtin")?, MODULES)?;
    let init = init_script(&assets.release);
    let modprobe = modprobe_script(assets);
    let stamp = fingerprint(assets, &order, &format!("{init}{modprobe}"))?;
    if out.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        if !quiet {
            println!("[setup] vm: initramfs up to date ({})", out.display());
        }
        return Ok(out);
    }
    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "host",
        "tmp",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(d)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    let bb = fs::read(&assets.busybox)
        .with_context(|| format!("reading {}", assets.busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &bb)?;
    for a in APPLETS {
        cpio.symlink(&format!("bin/{a}"), "busybox")?;
    }
    cpio.file("init", 0o755, init.as_bytes())?;
    cpio.file("sbin/modprobe", 0o755, modprobe.as_bytes())?;
    let base = format!("lib/modules/{}", assets.release);
    let mut dirs = BTreeSet::new();
    for path in &order {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    cpio.dir(&base)?;
    for d in &dirs {
        cpio.dir(&format!("{base}/{}", d.display()))?;
    }
    for path in &order {
        let src = assets.modules.join(path);
        let data = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        cpio.file(&format!("{base}/{path}"), 0o644, &data)?;
    }
    cpio.file(
        "modules.load",
        0o644,
        format!("{}\n", order.join("\n")).as_bytes(),
    )?;
    let archive = cpio.finish()?;
    let tmp = assets
        .dir
        .join(format!("initramfs.cpio.gz.{}", std::process::id()));
    gzip(&archive, &tmp)?;
    fs::rename(&tmp, &out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    fs::write(&stamp_path, stamp)?;
    println!(
        "[setup] vm: initramfs built: {} modules, {} KiB ({})",
        order.len(),
        fs::metadata(&out)?.len() / 1024,
        out.display()
    );
    Ok(out)
}

fn gzip(data: &[u8], out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut child = Command::new("gzip")
        .args(["-1", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("starting gzip (package gzip)")?;
    let mut stdin = child.stdin.take().context("gzip's stdin")?;
    stdin.write_all(data).context("writing to gzip")?;
    drop(stdin);
    let status = child.wait()?;
    if !status.success() {
        bail!("gzip failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/net/xfrm/xfrm_user.ko: kernel/net/xfrm/xfrm_algo.ko\n\
kernel/net/xfrm/xfrm_algo.ko:\n\
kernel/arch/x86/crypto/aesni-intel.ko: kernel/crypto/crypto_simd.ko kernel/crypto/cryptd.ko\n\
kernel/crypto/crypto_simd.ko: kernel/crypto/cryptd.ko\n\
kernel/crypto/cryptd.ko:\n\
kernel/net/ipv4/esp4.ko: kernel/net/xfrm/xfrm_algo.ko\n";
    const BUILTIN: &str = "kernel/crypto/cbc.ko\nkernel/crypto/hmac.ko\n";

    #[test]
    fn modules_load_after_their_dependencies_once_each() {
        let order = load_order(DEP, BUILTIN, &["xfrm_user", "aesni-intel", "cbc", "esp4"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/xfrm/xfrm_algo.ko",
                "kernel/net/xfrm/xfrm_user.ko",
                "kernel/crypto/cryptd.ko",
                "kernel/crypto/crypto_simd.ko",
                "kernel/arch/x86/crypto/aesni-intel.ko",
                "kernel/net/ipv4/esp4.ko",
            ]
        );
        // cryptd is listed after crypto_simd in aesni-intel's line, but
        // crypto_simd's own line needs it first: the recursion honours that.
    }

    #[test]
    fn an_unknown_module_is_named() {
        let err = load_order(DEP, BUILTIN, &["esp4", "no_such_mod"]).unwrap_err();
        assert!(err.to_string().contains("no_such_mod"), "{err}");
        let err = load_order("a.ko: b.ko\n", "", &["a"]).unwrap_err();
        assert!(err.to_string().contains("dependency b"), "{err}");
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("bin").unwrap();
        c.file("bin/x", 0o755, b"hello").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        let a = c.finish().unwrap();
        assert_eq!(a.len() % 4, 0);
        // Walk the archive back.
        let mut off = 0;
        let mut names = Vec::new();
        while off < a.len() {
            assert_eq!(&a[off..off + 6], b"070701");
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[off + 6 + i * 8..off + 14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&a[off + 110..off + 110 + namesize - 1]).unwrap();
            assert_eq!(a[off + 110 + namesize - 1], 0);
            let data_at = (off + 110 + namesize).next_multiple_of(4);
            let data = &a[data_at..data_at + size];
            names.push((name.to_string(), mode, data.to_vec()));
            off = (data_at + size).next_multiple_of(4);
        }
        assert_eq!(names[0], ("bin".into(), 0o040755, vec![]));
        assert_eq!(names[1], ("bin/x".into(), 0o100755, b"hello".to_vec()));
        assert_eq!(names[2], ("bin/sh".into(), 0o120777, b"busybox".to_vec()));
        assert_eq!(names[3].0, "TRAILER!!!");
        assert_eq!(names.len(), 4);
    }

    #[test]
    fn the_init_script_takes_work_and_nonce_from_the_command_line() {
        let s = init_script("6.1.0-57-amd64");
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("xesp.work=*) WORK=\"${w#xesp.work=}\""));
        assert!(s.contains("/lib/modules/6.1.0-57-amd64/$m"));
        assert!(s.contains("XESP_VM_STATUS $NONCE $rc"));
        // A project under the host's /tmp stays visible under the guest's.
        let keep = s.find("mount -o bind \"/host$d\" \"/hostdirs$d\"").unwrap();
        let tmpfs = s
            .find("mount -t tmpfs -o mode=1777 tmpfs \"/host$d\"")
            .unwrap();
        let work = s.find("mount -t 9p -o \"$O\" work").unwrap();
        assert!(keep < tmpfs && tmpfs < work, "{s}");
        assert!(s.contains("mount -o bind \"$e\" \"/host$d/$n\""));
    }
}
