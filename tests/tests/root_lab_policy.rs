//! Needs root: traffic selectors enforced by xesp's datapath (RFC 4301
//! §5.1) in the reference lab. Each Azure gateway instance (strongSwan)
//! initiates and proposes narrowed selectors, in two CHILD_SAs per tunnel:
//! one for the BGP session (its BGP address <-> on-prem's Loopback0) and one
//! for the networks (10.2.0.0/24 <-> 10.0.0.0/24 only, not 10.1.10.0/25).
//! xesp responds, so each tunnel has two CHILD_SAs with different
//! selectors:
//!
//! * BGP comes up and the LAN host's 10.0.0.10 reaches the VM: each packet
//!   leaves in the CHILD_SA whose selectors cover it, routed or not;
//! * pings from 10.1.10.10 (through the AF_XDP workers) and from Tunnel0's
//!   own address (through the TUN device and the socket path), which no
//!   CHILD_SA covers, are all lost, and each one is counted as `no_selector`
//!   on its tunnel; nothing is counted as `selector_mismatch`.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::Duration;

use serde_json::Value;
use xtask::{
    lab::{
        Lab, LabConfig, OnpremMode,
        topology::{GW_BGP, LAN_HOSTS, ONPREM_LOOPBACK, TUNNEL_ADDR, VM},
        xesp::{ARTICLE_IKE, TUNNEL_IFS, XespSettings},
    },
    netns::wait_until,
};

fn status(lab: &Lab) -> Value {
    lab.xesp.as_ref().unwrap().0.status_json().unwrap()
}

/// `name` of tunnel `i`, summed over both tunnels when `i` is `None`.
fn tunnel_counter(st: &Value, i: Option<usize>, name: &str) -> u64 {
    let get = |i: usize| st["tunnels"][i][name].as_u64().unwrap();
    match i {
        Some(i) => get(i),
        None => get(0) + get(1),
    }
}

fn worker_counter(st: &Value, name: &str) -> u64 {
    st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or_else(|| panic!("no worker counter {name}"))
}

/// Each tunnel's CHILD_SAs as `local === remote` selector strings.
fn children(st: &Value, i: usize) -> Vec<String> {
    st["tunnels"][i]["connection"]["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let join = |v: &Value| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!("{} === {}", join(&c["local_ts"]), join(&c["remote_ts"]))
        })
        .collect()
}

/// `ping -c count` from `ns` with source `src`; the number of replies.
fn ping(ns: &xtask::netns::Netns, src: &str, dst: &str, count: u32) -> u32 {
    // ping exits non-zero when replies are missing: read its summary anyway.
    let cmd = format!("ping -c {count} -i 0.2 -W 1 -I {src} {dst}; true");
    let out = ns.exec("sh", &["-c", &cmd]).unwrap();
    out.split(" received")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ping summary: {out}"))
}

#[test]
fn root_lab_narrowed_selectors_choose_the_child_sa_and_drop_what_none_covers() {
    let gateway_children = [0, 1].map(|i| {
        vec![
            (format!("{}/32", GW_BGP[i]), format!("{ONPREM_LOOPBACK}/32")),
            ("10.2.0.0/24".to_string(), "10.0.0.0/24".to_string()),
        ]
    });
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        xesp: XespSettings {
            ike: format!("{ARTICLE_IKE}initiator = false\n"),
            ..XespSettings::default()
        },
        gateway_initiates: true,
        gateway_children,
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    // Both CHILD_SAs of each tunnel, as the gateway narrowed them.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let st = status(&lab);
            (0..2).all(|i| children(&st, i).len() == 2)
                && lab
                    .gateways
                    .iter()
                    .all(|g| g.charon.installed_children() == 2)
        }),
        "two CHILD_SAs per tunnel:\n{}",
        lab.status()
    );
    let st = status(&lab);
    for (i, bgp) in GW_BGP.iter().enumerate() {
        let mut c = children(&st, i);
        c.sort();
        assert_eq!(
            c,
            [
                "10.0.0.0/24 === 10.2.0.0/24".to_string(),
                format!("{ONPREM_LOOPBACK}/32 === {bgp}/32"),
            ],
            "{}",
            TUNNEL_IFS[i]
        );
    }
    // The tunnels' own IPv6 link-local traffic (router solicitations, MLD)
    // is covered by no IPv4 selector either: keep it out of the count.
    for t in TUNNEL_IFS {
        lab.ns
            .onprem
            .sysctl(&format!("net.ipv6.conf.{t}.disable_ipv6=1"))
            .unwrap();
    }

    // Covered: the LAN's 10.0.0.0/24 reaches the VM, Loopback0 both BGP peers.
    let before = status(&lab);
    let lan = LAN_HOSTS[0].to_string();
    assert_eq!(
        ping(&lab.ns.lan, &lan, &VM.to_string(), 5),
        5,
        "{}",
        lab.status()
    );
    for bgp in GW_BGP {
        let lo = ONPREM_LOOPBACK.to_string();
        assert_eq!(ping(&lab.ns.onprem, &lo, &bgp.to_string(), 3), 3);
    }
    let after = status(&lab);
    assert_eq!(
        tunnel_counter(&after, None, "no_selector"),
        tunnel_counter(&before, None, "no_selector"),
        "covered traffic was dropped:\n{after:#}"
    );

    // Not covered, through the AF_XDP workers: 10.1.10.10 to the VM.
    let before = after;
    let unlisted = LAN_HOSTS[1].to_string();
    assert_eq!(ping(&lab.ns.lan, &unlisted, &VM.to_string(), 10), 0);
    let after = status(&lab);
    let dropped =
        tunnel_counter(&after, None, "no_selector") - tunnel_counter(&before, None, "no_selector");
    assert_eq!(dropped, 10, "{after:#}");
    let lan_rx = worker_counter(&after, "lan_rx") - worker_counter(&before, "lan_rx");
    assert!(
        (1..=10).contains(&lan_rx),
        "the workers took {lan_rx} of the 10 echo requests"
    );

    // Not covered, through Tunnel0's device and the socket path: from
    // Tunnel0's own address (not Loopback0) to the BGP peer behind it.
    let before = after;
    let tunnel0 = TUNNEL_ADDR[0].to_string();
    assert_eq!(ping(&lab.ns.onprem, &tunnel0, &GW_BGP[0].to_string(), 5), 0);
    let after = status(&lab);
    assert_eq!(
        tunnel_counter(&after, Some(0), "no_selector")
            - tunnel_counter(&before, Some(0), "no_selector"),
        5,
        "{after:#}"
    );
    assert_eq!(
        tunnel_counter(&after, Some(1), "no_selector"),
        tunnel_counter(&before, Some(1), "no_selector")
    );
    // The drops are also in each tunnel's drops by reason, and nothing came
    // in outside its CHILD_SA's selectors.
    for i in 0..2 {
        let t = &after["tunnels"][i];
        let by_reason = t["drops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d[0] == "no_selector")
            .and_then(|d| d[1].as_u64());
        assert_eq!(by_reason, t["no_selector"].as_u64());
        assert_eq!(t["selector_mismatch"], 0, "{t:#}");
    }
    let text = lab.xesp.as_ref().unwrap().0.status_text();
    assert!(
        text.contains("(no CHILD_SA covers them: no_selector)"),
        "{text}"
    );
}
