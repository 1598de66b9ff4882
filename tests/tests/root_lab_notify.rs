//! Needs root: `xesp run` speaks systemd's notify protocol (Type=notify) in
//! the reference lab: READY=1 once its datapath and control socket are up,
//! STATUS= with the tunnels' states as they change, WATCHDOG=1 from the IKE
//! loop when a watchdog is asked for, STOPPING=1 on SIGTERM. The test plays
//! systemd: it binds the notify socket and hands xesp its address.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{os::unix::net::UnixDatagram, time::Duration};

use xtask::lab::{Lab, LabConfig, OnpremMode};

/// Datagrams until one contains `what` (each kept), or a panic after 60 s.
fn until(sock: &UnixDatagram, seen: &mut Vec<String>, what: &str) {
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|m| m.contains(what)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what:?} among {seen:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn root_notify_ready_status_watchdog_and_stopping() {
    let path = std::env::temp_dir().join(format!("xesp-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        xesp_env: vec![
            ("NOTIFY_SOCKET".into(), path.display().to_string()),
            ("WATCHDOG_USEC".into(), "4000000".into()),
        ],
        ..LabConfig::default()
    })
    .unwrap();
    let mut seen = Vec::new();
    until(&sock, &mut seen, "READY=1");
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    until(
        &sock,
        &mut seen,
        "STATUS=2 of 2 tunnels up: Tunnel0 up, Tunnel1 up",
    );
    until(&sock, &mut seen, "WATCHDOG=1");
    assert!(lab.terminate_xesp());
    until(&sock, &mut seen, "STOPPING=1");
    let _ = std::fs::remove_file(&path);
}
