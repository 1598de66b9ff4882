//! Needs root: the AF_XDP workers of xesp on the reference lab are
//! supervised. A worker that dies is seen in `xesp status`, started again
//! with fresh sockets, and carries the traffic; one that keeps dying ends
//! the daemon with an error, after it deleted its IKE_SAs, so that a
//! supervisor restarts it whole. The failures are injected
//! (`XESP_FAULT_INJECT`, honoured by debug builds only).

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::Duration;

use serde_json::Value;
use xtask::{
    lab::{Lab, LabConfig, OnpremMode, topology::LAN_HOSTS},
    netns::wait_until,
};

/// Queue 0's worker is pinned to the last CPU this test may use
/// (`XESP_AF_XDP_CPUS`).
fn pinned_cpu() -> usize {
    *datapath_user::mode::cpus::allowed_cpus().last().unwrap()
}

fn lab(fault: &str) -> Lab {
    Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        xesp_env: vec![
            ("XESP_FAULT_INJECT".into(), fault.into()),
            ("XESP_AF_XDP_CPUS".into(), pinned_cpu().to_string()),
        ],
        ..LabConfig::default()
    })
    .unwrap()
}

/// `Cpus_allowed_list` of each AF_XDP worker thread (by name) of the xesp
/// processes started with `XESP_AF_XDP_CPUS` set.
fn worker_cpus() -> Vec<(String, String)> {
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let environ = std::fs::read(p.path().join("environ")).unwrap_or_default();
        if !environ
            .split(|b| *b == 0)
            .any(|e| e.starts_with(b"XESP_AF_XDP_CPUS="))
        {
            continue;
        }
        for t in std::fs::read_dir(p.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if !name.starts_with("xsk-q") {
                continue;
            }
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("")
                .trim()
                .to_string();
            found.push((name.trim().to_string(), cpus));
        }
    }
    found.sort();
    found
}

/// A worker counter from `xesp status --json` (pairs of name and value).
fn counter(st: &Value, name: &str) -> u64 {
    st["workers"]
        .as_array()
        .and_then(|l| l.iter().find(|p| p[0] == name))
        .and_then(|p| p[1].as_u64())
        .unwrap_or_else(|| panic!("no worker counter {name}: {:#}", st["workers"]))
}

fn status(lab: &Lab) -> Value {
    lab.xesp.as_ref().unwrap().0.status_json().unwrap()
}

#[test]
fn root_workers_dead_at_start_are_restarted_and_carry_traffic() {
    let lab = lab("worker-panic");
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    // Each queue's first worker panicked; the supervisor (1 s tick) started
    // every one again.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let st = status(&lab);
            counter(&st, "workers_running") == counter(&st, "workers")
                && counter(&st, "worker_restarts") == counter(&st, "workers")
        }),
        "{:#}",
        status(&lab)["workers"]
    );
    let before = counter(&status(&lab), "encap_sent");
    for src in LAN_HOSTS {
        lab.ping_vm(src, 5)
            .unwrap_or_else(|e| panic!("ping from {src}: {e:#}\n{}", lab.status()));
    }
    let st = status(&lab);
    assert!(
        counter(&st, "encap_sent") >= before + 10,
        "the restarted workers carried the pings: {:#}",
        st["workers"]
    );
    let (x, _) = lab.xesp.as_ref().unwrap();
    let log = std::fs::read_to_string(x.log()).unwrap();
    assert!(log.contains("ended (panicked"), "the death is logged");
    // The restarted worker runs where XESP_AF_XDP_CPUS says (the lab's
    // interfaces have one queue).
    let cpu = pinned_cpu().to_string();
    let workers = worker_cpus();
    assert!(
        workers.iter().any(|(n, c)| n == "xsk-q0" && *c == cpu),
        "queue 0's worker pinned to CPU {cpu}: {workers:?}"
    );
    assert!(
        log.contains(&format!("queue 0 on CPU {cpu}")),
        "the pinning is logged"
    );
}

#[test]
fn root_workers_that_keep_dying_end_the_daemon_with_an_error() {
    let mut lab = lab("worker-panic-always");
    // Restarted five times within a minute, then xesp gives up: it deletes
    // its IKE_SAs and exits non-zero.
    assert!(
        wait_until(Duration::from_secs(30), || !lab.xesp_running()),
        "xesp still runs"
    );
    assert_eq!(lab.xesp_exit_code(), Some(1));
    let (x, _) = lab.xesp.as_ref().unwrap();
    let log = std::fs::read_to_string(x.log()).unwrap();
    assert!(log.contains("giving up"), "{log}");
}
