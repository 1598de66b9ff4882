//! `dist/xesp.service`, the unit the package installs: `systemd-analyze
//! verify` (in a scratch root holding the xesp binary its `ExecStart=`
//! runs), `systemd-analyze security --offline=yes` (exposure at most
//! [`MAX_EXPOSURE`]), the settings the daemon relies on, and capabilities
//! that match what `xesp run` checks for at start. Each check is also run
//! on broken copies of the unit, which it must refuse.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use ike_control::{
    config::{Config, DatapathMode},
    service::{Environment, needed},
};
use xtask::{
    lab,
    package::{MAX_EXPOSURE, UNIT_INSTALLED, UNIT_SOURCE, unit_exposure, unit_root, verify_unit},
    setup::project_root,
};

fn unit_text() -> String {
    fs::read_to_string(project_root().join(UNIT_SOURCE)).unwrap()
}

/// A directory of this test process, removed first if a dead run left it;
/// under target/ so that the xesp binary can be hard-linked into it.
fn scratch(name: &str) -> PathBuf {
    let d = project_root()
        .join("target/tmp")
        .join(format!("xesp-unit-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// The unit's `Key=value` lines (comments and sections left out); a key
/// set twice keeps both values, in order.
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn value<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Verifies `text` as the installed unit of a fresh scratch root.
fn verify_text(name: &str, text: &str) -> anyhow::Result<()> {
    let dir = scratch(name);
    let unit = dir.join("xesp.service");
    fs::write(&unit, text).unwrap();
    let bin = lab::xesp::binary().unwrap();
    let root = unit_root(&dir.join("root"), &unit, &bin).unwrap();
    assert!(root.join(UNIT_INSTALLED).exists());
    let r = verify_unit(&root);
    fs::remove_dir_all(&dir).unwrap();
    r
}

fn exposure_of(name: &str, text: &str) -> f64 {
    let dir = scratch(name);
    let unit = dir.join("xesp.service");
    fs::write(&unit, text).unwrap();
    let e = unit_exposure(&unit).unwrap();
    fs::remove_dir_all(&dir).unwrap();
    e
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    verify_text("ok", &unit_text()).unwrap();
}

#[test]
fn unit_exposure_stays_at_the_measured_level() {
    let e = unit_exposure(&project_root().join(UNIT_SOURCE)).unwrap();
    eprintln!("systemd-analyze security --offline=yes {UNIT_SOURCE}: exposure {e:.1}");
    assert!(
        e <= MAX_EXPOSURE,
        "exposure {e} is above {MAX_EXPOSURE}: a hardening line was lost"
    );
}

#[test]
fn broken_units_are_refused() {
    let good = unit_text();
    let broken = |from: &str, to: &str| {
        assert!(good.contains(from), "{from:?} not in the unit");
        good.replacen(from, to, 1)
    };
    for (name, text) in [
        // A misspelt key: systemd ignores it, so the sandbox loses it.
        (
            "typo",
            broken("ProtectSystem=strict", "ProtectSytem=strict"),
        ),
        // ExecStart= naming a binary the root does not have.
        (
            "exec",
            broken("ExecStart=/usr/bin/xesp ", "ExecStart=/usr/bin/xesp-gone "),
        ),
        ("type", broken("Type=notify", "Type=notifyy")),
        (
            "family",
            broken(
                "RestrictAddressFamilies=AF_UNIX",
                "RestrictAddressFamilies=AF_UNIX AF_NOPE",
            ),
        ),
    ] {
        match verify_text(name, &text) {
            Ok(()) => panic!("systemd-analyze verify accepted the {name} breakage"),
            Err(e) => eprintln!("{name}: refused: {e:#}"),
        }
    }
    // Hardening taken away: verify has nothing to say, the exposure does.
    let weaker = good
        .lines()
        .filter(|l| {
            !l.starts_with("SystemCallFilter=")
                && !l.starts_with("ProtectSystem=")
                && !l.starts_with("NoNewPrivileges=")
        })
        .collect::<Vec<_>>()
        .join("\n");
    verify_text("weaker", &weaker).unwrap();
    let e = exposure_of("weaker", &weaker);
    assert!(e > MAX_EXPOSURE, "exposure {e} without the filters");
}

#[test]
fn unit_has_the_service_settings_the_daemon_relies_on() {
    let s = settings(&unit_text());
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("User", "xesp"),
        ("Group", "xesp"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("LimitMEMLOCK", "infinity"),
        ("ExecStart", "/usr/bin/xesp run -c /etc/xesp/xesp.toml"),
        ("ExecStartPre", "/usr/bin/xesp check -c /etc/xesp/xesp.toml"),
        ("ExecReload", "/usr/bin/xesp reload -c /etc/xesp/xesp.toml"),
        ("DeviceAllow", "/dev/net/tun rw"),
    ] {
        assert_eq!(value(&s, key), [want], "{key}");
    }
    // The default control socket (the example's, and the built-in default)
    // lies in the runtime directory systemd creates for the xesp user:
    // /run is read-only to the daemon everywhere else.
    let example = project_root().join("xesp.example.toml");
    let cfg = Config::load(&example).unwrap();
    let runtime = value(&s, "RuntimeDirectory");
    assert_eq!(runtime.len(), 1);
    assert_eq!(
        cfg.device.control_socket.parent(),
        Some(Path::new("/run").join(runtime[0]).as_path()),
        "control_socket {} is outside RuntimeDirectory={}",
        cfg.device.control_socket.display(),
        runtime[0]
    );
}

#[test]
fn unit_grants_exactly_what_xesp_checks_for() {
    let s = settings(&unit_text());
    let set = |key: &str| -> BTreeSet<String> {
        let v = value(&s, key);
        assert_eq!(v.len(), 1, "{key}");
        v[0].split_whitespace().map(str::to_string).collect()
    };
    let ambient = set("AmbientCapabilities");
    assert_eq!(ambient, set("CapabilityBoundingSet"));
    // As the unit runs xesp: its memlock limit, Linux's default port range.
    let env = Environment {
        memlock_unlimited: value(&s, "LimitMEMLOCK") == ["infinity"],
        unprivileged_port_start: Environment::DEFAULT.unprivileged_port_start,
    };
    let want: BTreeSet<String> = needed(DatapathMode::Xdp, env)
        .iter()
        .map(|n| n.cap.name().to_string())
        .collect();
    assert_eq!(ambient, want);
    // The tun datapath needs a subset of them.
    assert!(
        needed(DatapathMode::Tun, env)
            .iter()
            .all(|n| ambient.contains(n.cap.name()))
    );
}
