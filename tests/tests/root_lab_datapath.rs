//! Needs root: the accelerated datapath end to end in the reference lab, with
//! xesp (xdp datapath) on onprem, strongSwan + BIRD on azgw1/azgw2.
//!
//! Three independent tests, each on its own lab with both tunnels and BGP
//! sessions up and 10.2.0.0/24 over both tunnels:
//! * LAN pings and TCP flows to the VM go through the AF_XDP workers (not
//!   the TUN devices), spread over both tunnels with each flow on one;
//! * when azgw1 dies, DPD takes Tunnel0 down and running TCP flows continue
//!   over Tunnel1 without a reset; when it returns, new flows use Tunnel0;
//! * a source outside the DMZ allowlist never reaches the stack.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::Duration;

use serde_json::Value;
use xtask::{
    lab::{
        Lab, LabConfig, OnpremMode,
        topology::{LAN_HOSTS, ONPREM_PUBLIC, OUTSIDER, VM, VNET},
        xesp::{ARTICLE_IKE, XespSettings},
    },
    netns::{Daemon, wait_until},
};

fn status(lab: &Lab) -> Value {
    lab.xesp.as_ref().unwrap().0.status_json().unwrap()
}

fn counter(list: &Value, name: &str) -> u64 {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {list}"))
}

/// Packets the LAN program sent to each tunnel's workers.
fn lan_packets(lab: &Lab) -> [u64; 2] {
    let st = status(lab);
    [0, 1].map(|i| st["tunnels"][i]["xdp"]["lan_packets"].as_u64().unwrap())
}

/// One TCP flow from a fixed source port: which tunnel carried it. (iperf3's
/// control connection, from another port, may take the other tunnel: a few
/// dozen packets.)
fn flow_tunnel(lab: &Lab, cport: u16) -> usize {
    let before = lan_packets(lab);
    lab.ns
        .lan
        .exec(
            "iperf3",
            &[
                "-c",
                &VM.to_string(),
                "--cport",
                &cport.to_string(),
                "-t",
                "1",
                "-b",
                "20M",
            ],
        )
        .unwrap_or_else(|e| panic!("iperf3 from port {cport}: {e:#}\n{}", lab.status()));
    let after = lan_packets(lab);
    let d = [after[0] - before[0], after[1] - before[1]];
    assert!(
        d[0].min(d[1]) * 20 < d[0].max(d[1]) && d[0].max(d[1]) > 100,
        "flow from port {cport} did not stay on one tunnel: {d:?}"
    );
    usize::from(d[1] > d[0])
}

/// The lab with xesp's xdp datapath and a quick DPD, both tunnels and
/// their BGP routes up.
fn lab_up() -> Lab {
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        xesp: XespSettings {
            datapath: "xdp".into(),
            ike: ARTICLE_IKE.replace(
                "dpd = { interval = \"10s\", retry = \"2s\", on_demand = true }",
                "dpd = { interval = \"2s\", retry = \"1s\", tries = 3, on_demand = false }",
            ),
            ..XespSettings::default()
        },
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || both_tunnels(&lab)),
        "10.2.0.0/24 not learned via both tunnels:\n{}",
        lab.status()
    );
    lab
}

/// The VNet's route goes over both tunnels.
fn both_tunnels(lab: &Lab) -> bool {
    lab.ns
        .onprem
        .exec("ip", &["route", "show", VNET])
        .is_ok_and(|r| r.contains("dev Tunnel0") && r.contains("dev Tunnel1"))
}

/// iperf3's server on the VM, listening.
fn iperf_server(lab: &Lab) -> Daemon {
    let server = Daemon::spawn(
        "iperf3 server",
        lab.ns
            .vnet
            .cmd("iperf3")
            .arg("-s")
            .stdout(std::process::Stdio::null()),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .ns
            .vnet
            .exec("ss", &["-ltnH", "sport", "= :5201"])
            .is_ok_and(|o| !o.trim().is_empty())),
        "the iperf3 server does not listen"
    );
    server
}

#[test]
fn root_datapath_flows_spread_over_both_tunnels_through_the_workers() {
    let lab = lab_up();
    for src in LAN_HOSTS {
        let out = lab
            .ping_vm(src, 3)
            .unwrap_or_else(|e| panic!("ping {VM} from {src}: {e:#}\n{}", lab.status()));
        assert!(out.contains(" 3 received"), "{out}");
    }
    let _server = iperf_server(&lab);

    // Each flow on one tunnel; both tunnels in use.
    let mut seen = [false; 2];
    for cport in 40000..40016 {
        seen[flow_tunnel(&lab, cport)] = true;
        if seen == [true, true] {
            break;
        }
    }
    assert_eq!(seen, [true, true], "16 flows all on one tunnel");

    // The workers carried it, not the TUN devices: most of what the workers
    // decrypted left on the LAN, most of what the tunnels carried out went
    // through the workers (how many packets depends on how many flows it
    // took to see both tunnels, so the checks are ratios).
    let st = status(&lab);
    let forwarded = counter(&st["workers"], "decap_forwarded");
    let to_stack = counter(&st["workers"], "decap_to_stack");
    let encap = counter(&st["workers"], "encap_sent");
    assert!(
        forwarded > 0 && encap > 0 && to_stack * 2 < forwarded,
        "{:#}",
        st["workers"]
    );
    for tun in ["Tunnel0", "Tunnel1"] {
        let s = lab
            .ns
            .onprem
            .exec(
                "cat",
                &[&format!("/sys/class/net/{tun}/statistics/tx_packets")],
            )
            .unwrap();
        let through_tun: u64 = s.trim().parse().unwrap();
        assert!(
            through_tun * 10 < encap,
            "{tun} carried {through_tun} packets, the workers {encap}"
        );
    }
}

#[test]
fn root_datapath_failover_keeps_tcp_flows_and_tunnel0_returns() {
    let mut lab = lab_up();
    let _server = iperf_server(&lab);
    // azgw1 dies during 8 TCP flows: they finish over Tunnel1, no reset.
    let charon = lab.gateway_ike_pid(0).unwrap();
    let flows = std::thread::scope(|s| {
        let flows = s.spawn(|| {
            lab.ns.lan.exec(
                "iperf3",
                &["-c", &VM.to_string(), "-P", "8", "-t", "20", "-b", "5M"],
            )
        });
        // The flows run (their packets reach the workers) before the kill.
        let start = lan_packets(&lab);
        assert!(
            wait_until(Duration::from_secs(15), || {
                let now = lan_packets(&lab);
                now[0] + now[1] > start[0] + start[1] + 2000
            }),
            "the flows did not start"
        );
        // strongSwan of instance 0 dies; the fabric stops using it.
        std::process::Command::new("kill")
            .args(["-KILL", &charon.to_string()])
            .status()
            .unwrap();
        xtask::lab::topology::vnet_routes(&lab.ns.vnet, &[1]).unwrap();
        assert!(
            wait_until(Duration::from_secs(15), || status(&lab)["tunnels"][0]["up"]
                == false),
            "DPD did not take Tunnel0 down:\n{}",
            lab.status()
        );
        let at_down = lan_packets(&lab);
        (flows.join().unwrap(), at_down)
    });
    let (flows, at_down) = flows;
    let at_end = lan_packets(&lab);
    let out = flows
        .unwrap_or_else(|e| panic!("TCP flows broke during failover: {e:#}\n{}", lab.status()));
    assert!(out.contains("[SUM]") && !out.contains("reset"), "{out}");
    lab.kill_gateway_ike(0); // reaps it
    let st = status(&lab);
    assert!(
        st["tunnels"][0]["connection"]["stats"]["dpd_failures"]
            .as_u64()
            .unwrap()
            >= 1
    );
    // Once Tunnel0 was down, the LAN program (live-tunnel check) or the FIB
    // (carrier off, BGP withdrawal) sent every flow to Tunnel1.
    assert!(
        at_end[1] > at_down[1] + 1000 && at_end[0] == at_down[0],
        "after Tunnel0 went down: {at_down:?} -> {at_end:?}; LAN program {:#}",
        st["lan"]
    );

    // azgw1 returns: Tunnel0 and its BGP session come back (the lab's hold
    // time, 9 s, let the session die meanwhile), and new flows use Tunnel0.
    lab.restore_gateway(0).unwrap();
    let bird = &lab.xesp.as_ref().unwrap().1;
    assert!(
        wait_until(Duration::from_secs(60), || {
            status(&lab)["tunnels"][0]["up"] == true
                && bird.established() == 2
                && lab
                    .ns
                    .onprem
                    .exec("ip", &["route", "show", VNET])
                    .is_ok_and(|r| r.contains("dev Tunnel0") && r.contains("dev Tunnel1"))
        }),
        "Tunnel0 did not come back:\n{}",
        lab.status()
    );
    let back = (41000..41016).any(|cport| flow_tunnel(&lab, cport) == 0);
    assert!(back, "no new flow used Tunnel0 after it returned");
}

#[test]
fn root_datapath_dmz_filter_drops_sources_outside_the_allowlist() {
    let lab = lab_up();
    // A source outside the allowlist never reaches the stack.
    let dropped = counter(&status(&lab)["dmz"], "drop_not_allowed");
    let r = lab.ping_public_from_outsider();
    assert!(r.is_err(), "{OUTSIDER} got an answer from {ONPREM_PUBLIC}");
    assert!(counter(&status(&lab)["dmz"], "drop_not_allowed") >= dropped + 3);
}
