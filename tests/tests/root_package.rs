//! Needs root: the Debian package, installed by dpkg into a scratch root
//! with its maintainer scripts (`--force-script-chrootless`, `DPKG_ROOT`),
//! then checked: its files and their modes, the system user, the
//! configuration's owner, the unit (`systemd-analyze verify` in that root),
//! `xesp check` on the installed configuration, `xesp check-caps` as the
//! xesp user with and without the unit's capabilities, a reinstall that
//! keeps the administrator's mode, and a purge.
//!
//! It packages the debug build the other tests use (`cargo xtask package
//! --profile dev --no-build`): the same files and scripts as the release
//! package, in seconds rather than the release build's minutes on two
//! cores. `cargo xtask package` builds the release one.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use xtask::{
    lab,
    package::{self, Profile, UNIT_INSTALLED, UNIT_SOURCE},
    setup::project_root,
};

/// The scratch directory, removed at the end even when the test fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `name`'s numeric id in the root's passwd or group file.
fn id_in(file: &Path, name: &str) -> Option<u32> {
    fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
    })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    eprintln!(
        "$ {cmd:?} -> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The unit's capabilities (dist/xesp.service's AmbientCapabilities=), as
/// setpriv spells them.
const UNIT_CAPS: &str = "+net_admin,+net_raw,+net_bind_service,+bpf,+perfmon";

/// `xesp check-caps` in `root` as the xesp user, with `caps` ambient.
fn check_caps(root: &Path, uid: u32, gid: u32, caps: Option<&str>, datapath: &str) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups");
    if let Some(c) = caps {
        cmd.arg(format!("--inh-caps={c}"))
            .arg(format!("--ambient-caps={c}"));
    }
    cmd.arg(root.join("usr/bin/xesp"))
        .args(["check-caps", "--datapath", datapath])
        .env_remove("RUST_LOG");
    run(&mut cmd)
}

#[test]
fn root_package_installs_into_a_scratch_root() {
    let dir = Scratch(std::env::temp_dir().join(format!("xesp-package-{}", std::process::id())));
    let _ = fs::remove_dir_all(&dir.0);
    let root = dir.0.join("root");
    fs::create_dir_all(&root).unwrap();
    // The xesp user walks into it (whatever the umask).
    for d in [&dir.0, &root] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }

    let t = Instant::now();
    lab::xesp::binary().unwrap();
    let built = t.elapsed();
    package::ensure_tools(true).unwrap();
    let t = Instant::now();
    let deb = package::build(Profile::Dev, false, &dir.0.join("out")).unwrap();
    eprintln!(
        "xesp built in {built:.1?}, packaged in {:.1?}: {} ({} kB)",
        t.elapsed(),
        deb.display(),
        fs::metadata(&deb).unwrap().len() / 1024
    );
    let fields = run(Command::new("dpkg-deb").arg("--field").arg(&deb));
    let fields = text(&fields);
    assert!(fields.contains("Package: xesp"), "{fields}");
    assert!(fields.contains("libc6"), "no libc6 in Depends: {fields}");

    let out = package::install_into_root(&deb, &root).unwrap();
    eprintln!("{out}");

    // The files, each where and as the package says.
    let repo = project_root();
    let same = |installed: &str, source: &str| {
        assert_eq!(
            fs::read(root.join(installed)).unwrap(),
            fs::read(repo.join(source)).unwrap(),
            "{installed} is not {source}"
        );
    };
    same(UNIT_INSTALLED, UNIT_SOURCE);
    same("usr/lib/sysusers.d/xesp.conf", "dist/xesp.sysusers");
    same("etc/xesp/xesp.toml", "xesp.example.toml");
    same("usr/share/doc/xesp/xesp.example.toml", "xesp.example.toml");
    same("usr/share/doc/xesp/README.md", "README.md");
    let xesp = fs::metadata(root.join("usr/bin/xesp")).unwrap();
    assert_eq!(xesp.mode() & 0o7777, 0o755);
    let status = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--status", "xesp"]));
    assert!(
        text(&status).contains("Status: install ok installed"),
        "{}",
        text(&status)
    );
    let conffiles = fs::read_to_string(root.join("var/lib/dpkg/info/xesp.conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/xesp/xesp.toml");

    // The postinst made the user, and gave it the configuration, mode 0600.
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("xesp:"))
        .unwrap_or_else(|| panic!("no user xesp in {passwd}"));
    assert!(line.ends_with(":/usr/sbin/nologin"), "{line}");
    let uid = id_in(&root.join("etc/passwd"), "xesp").unwrap();
    let gid = id_in(&root.join("etc/group"), "xesp").unwrap();
    assert!(uid > 0 && uid < 1000, "not a system uid: {uid}");
    let conf = root.join("etc/xesp/xesp.toml");
    let meta = fs::metadata(&conf).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert_eq!(meta.mode() & 0o777, 0o600);

    // The unit, in this root (with the host's targets it is ordered after).
    package::add_host_units(&root).unwrap();
    package::verify_unit(&root).unwrap();

    // xesp check on the installed configuration: root, then the xesp user
    // (who owns it), without the warning about a key others can read.
    for user in [None, Some((uid, gid))] {
        let mut cmd = match user {
            None => Command::new(root.join("usr/bin/xesp")),
            Some((u, g)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={u}"))
                    .arg(format!("--regid={g}"))
                    .arg("--clear-groups")
                    .arg(root.join("usr/bin/xesp"));
                c
            }
        };
        let out = run(cmd.arg("check").arg("-c").arg(&conf));
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(t.contains("OK, 2 tunnels"), "{t}");
        assert!(!t.contains("open to other users"), "{t}");
    }

    // xesp check-caps as the xesp user: nothing without capabilities ...
    let none = check_caps(&root, uid, gid, None, "xdp");
    let t = text(&none);
    assert!(!none.status.success());
    for cap in [
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_NET_BIND_SERVICE",
        "CAP_BPF",
        "CAP_PERFMON",
    ] {
        assert!(t.contains(&format!("{cap}: to ")), "{cap} not named: {t}");
    }
    // `xesp run` checks first, and stops before touching anything.
    let run_out = run(Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(root.join("usr/bin/xesp"))
        .arg("run")
        .arg("-c")
        .arg(&conf));
    let t = text(&run_out);
    assert!(!run_out.status.success());
    assert!(t.contains("CAP_BPF: to load the XDP programs"), "{t}");
    // ... all the tun datapath needs with the unit's ...
    let tun = check_caps(&root, uid, gid, Some(UNIT_CAPS), "tun");
    assert!(tun.status.success(), "{}", text(&tun));
    // ... and for xdp, with a finite memlock limit (the unit sets
    // LimitMEMLOCK=infinity; this process cannot raise its own), only
    // CAP_IPC_LOCK is missing, which in turn completes the set.
    let xdp = check_caps(&root, uid, gid, Some(UNIT_CAPS), "xdp");
    let memlock_unlimited = fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Max locked memory") && l.contains("unlimited"));
    if memlock_unlimited {
        assert!(xdp.status.success(), "{}", text(&xdp));
    } else {
        let t = text(&xdp);
        assert!(!xdp.status.success());
        assert!(t.contains("missing 1 capability"), "{t}");
        assert!(
            t.contains("CAP_IPC_LOCK: to lock the AF_XDP workers' UMEM"),
            "{t}"
        );
        let with_lock = check_caps(
            &root,
            uid,
            gid,
            Some(&format!("{UNIT_CAPS},+ipc_lock")),
            "xdp",
        );
        assert!(with_lock.status.success(), "{}", text(&with_lock));
    }

    // A reinstall (an upgrade's postinst) keeps the administrator's mode.
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).unwrap();
    package::install_into_root(&deb, &root).unwrap();
    assert_eq!(fs::metadata(&conf).unwrap().mode() & 0o777, 0o640);

    // Purge: the files and the conffile go, the user stays.
    let purge = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--purge", "xesp"]));
    assert!(purge.status.success(), "{}", text(&purge));
    for gone in ["usr/bin/xesp", UNIT_INSTALLED, "etc/xesp/xesp.toml"] {
        assert!(!root.join(gone).exists(), "{gone} still there");
    }
    assert!(id_in(&root.join("etc/passwd"), "xesp").is_some());
}
