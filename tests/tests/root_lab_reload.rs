//! Needs root: `xesp reload` adds and removes tunnels live (reference lab,
//! xdp and tun datapaths, strongSwan gateways, BIRD).
//!
//! 1. Tunnel1 left out of xesp.toml, reload: gateway 1's IKE_SA is gone
//!    (the DELETE reached it), Tunnel1's interface too, and its BGP session
//!    (its address unreachable, not routed through Tunnel0); Tunnel0
//!    carries the LAN. xesp now runs with Tunnel0 alone.
//! 2. Tunnel1 back in the file, reload under ping through Tunnel0: Tunnel1
//!    comes up with gateway 1 (its IKE_SA there), BGP over it, on-prem's
//!    ECMP route to the VNet gains its next hop; Tunnel0 keeps its SAs and
//!    loses no ping.
//! 3. Tunnel0 left out, reload: gateway 0's IKE_SA is gone, Tunnel0's
//!    interface too, and the LAN's traffic goes on over Tunnel1.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::{
    lab::{
        Lab, LabConfig, OnpremMode,
        topology::{GW_BGP, LAN_HOSTS, VNET, vnet_routes},
        xesp::XespSettings,
    },
    netns::wait_until,
};

fn status(lab: &Lab) -> Value {
    lab.xesp.as_ref().unwrap().0.status_json().unwrap()
}

/// The tunnels `xesp status` lists, by name.
fn tunnel_names(st: &Value) -> Vec<String> {
    st["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// Tunnel `name`'s status.
fn tunnel<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no tunnel {name} in {st}"))
}

/// Tunnel `name`'s CHILD_SAs' inbound SPIs.
fn child_spis(st: &Value, name: &str) -> Vec<String> {
    tunnel(st, name)["connection"]["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["spi_in"].as_str().unwrap().to_string())
        .collect()
}

fn reload(lab: &Lab) -> String {
    let (ok, answer) = lab.xesp.as_ref().unwrap().0.ctl(&["reload"]).unwrap();
    assert!(ok, "{answer}");
    answer
}

fn has_interface(lab: &Lab, name: &str) -> bool {
    lab.ns.onprem.exec("ip", &["link", "show", name]).is_ok()
}

/// Next hops of on-prem's route to the VNet.
fn vnet_next_hops(lab: &Lab) -> usize {
    let r = lab
        .ns
        .onprem
        .exec("ip", &["route", "show", VNET])
        .unwrap_or_default();
    match r.matches("nexthop").count() {
        0 if r.contains(" via ") || r.contains(" dev ") => 1,
        n => n,
    }
}

/// Takes tunnel `name`'s table out of the lab's xesp.toml.
fn leave_out(lab: &Lab, name: &str) -> toml_edit::Table {
    let mut taken = None;
    lab.xesp
        .as_ref()
        .unwrap()
        .0
        .edit_conf(|doc| {
            let t = doc["tunnel"].as_array_of_tables_mut().unwrap();
            let i = t
                .iter()
                .position(|t| t["name"].as_str() == Some(name))
                .unwrap();
            taken = t.get(i).cloned();
            t.remove(i);
        })
        .unwrap();
    taken.unwrap()
}

#[test]
fn root_reload_adds_and_removes_tunnels() {
    adds_and_removes_tunnels("xdp", 0);
}

/// The same with the socket datapath (TUN devices, ESP in user space).
/// Over about 30 runs it lost none in most, and 1 to 5 pings in three (at
/// the reload's start: the socket path's threads start again with the new
/// set of devices, and the kernel's routing through a device without
/// carrier is still involved; not explained yet): the test prints what it
/// lost and allows 5 of 100.
#[test]
fn root_reload_adds_and_removes_tunnels_tun() {
    adds_and_removes_tunnels("tun", 5);
}

/// `allowed`: pings of 100 a reload may lose.
fn adds_and_removes_tunnels(datapath: &str, allowed: u32) {
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        xesp: XespSettings {
            datapath: datapath.into(),
            ..XespSettings::default()
        },
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    let x = &lab.xesp.as_ref().unwrap().0;
    let bird = &lab.xesp.as_ref().unwrap().1;
    let log = || std::fs::read_to_string(x.log()).unwrap_or_default();

    // 1. Tunnel1 removed: the VNet answers through gateway 0 alone first.
    vnet_routes(&lab.ns.vnet, &[0]).unwrap();
    let tunnel1 = leave_out(&lab, "Tunnel1");
    let (answer, lost_removing, pings) = xesp_tests::pings_during(&lab, || reload(&lab));
    assert!(answer.contains("Tunnel1: removed"), "{answer}");
    // None lost: Tunnel1's device goes down first, and is deleted only once
    // BIRD has taken it out of the ECMP route (deleting it would delete the
    // route whole); the AF_XDP workers leave the XDP programs' maps, empty
    // their RX rings, and start again without Tunnel1's sockets, their fill
    // rings full before they are bound.
    assert!(
        lost_removing <= allowed,
        "{lost_removing} pings through Tunnel0 lost while Tunnel1 was removed:\n{pings}\n{}\n{}",
        lab.status(),
        log()
    );
    let st = assert_removed(&lab, 1);
    assert!(
        wait_until(Duration::from_secs(20), || vnet_next_hops(&lab) == 1),
        "{}",
        lab.status()
    );
    // Gateway 1's BGP session ends with its tunnel (the lab's hold time is
    // 9 s): its address is unreachable, not routed through Tunnel0 by the
    // VNet route that covers it.
    let gw1_bgp = format!("{}/32", GW_BGP[1]);
    let route = || {
        lab.ns
            .onprem
            .exec("ip", &["route", "show", &gw1_bgp])
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(30), || bird.established() == 1
            && route().starts_with("unreachable")),
        "the BGP session with gateway 1 outlived Tunnel1 ({}):\n{}",
        route(),
        lab.status()
    );
    let out = lab.ping_vm(LAN_HOSTS[0], 3).unwrap();
    assert!(out.contains(" 3 received"), "{out}");
    let spis0 = child_spis(&st, "Tunnel0");

    // 2. Tunnel1 added under ping through Tunnel0.
    x.edit_conf(|doc| {
        doc["tunnel"]
            .as_array_of_tables_mut()
            .unwrap()
            .push(tunnel1.clone());
    })
    .unwrap();
    let mut started = Instant::now();
    let (answer, lost_adding, pings) = xesp_tests::pings_during(&lab, || {
        started = Instant::now();
        reload(&lab)
    });
    assert!(answer.contains("Tunnel1: added"), "{answer}");
    // None lost: until Tunnel1 has its SA it has no carrier, and the kernel
    // passes over its next hops (ignore_routes_with_linkdown), which BIRD
    // adds to the ECMP route as soon as the device is up.
    assert!(
        lost_adding <= allowed,
        "{lost_adding} pings through Tunnel0 lost while Tunnel1 was added:\n{pings}\n{}\n{}",
        lab.status(),
        log()
    );
    assert!(
        wait_until(Duration::from_secs(30), || tunnel(&status(&lab), "Tunnel1")
            ["up"]
            == true),
        "{}\n{}",
        lab.status(),
        log()
    );
    let up_after = started.elapsed();
    assert!(has_interface(&lab, "Tunnel1"));
    let gw1 = &lab.gateways[1].charon;
    assert!(
        wait_until(Duration::from_secs(10), || gw1.established_ike_sas() == 1),
        "{}",
        gw1.list_sas()
    );
    assert!(
        wait_until(Duration::from_secs(30), || bird.established() == 2
            && vnet_next_hops(&lab) == 2),
        "BGP over Tunnel1 or the second next hop missing:\n{}",
        lab.status()
    );
    let bgp_after = started.elapsed();
    let st = status(&lab);
    assert_eq!(tunnel_names(&st), ["Tunnel0", "Tunnel1"]);
    assert_eq!(child_spis(&st, "Tunnel0"), spis0, "Tunnel0 kept its SAs");
    vnet_routes(&lab.ns.vnet, &[0, 1]).unwrap();
    // Its up event names its SPIs as fields, and so does the IKE core's
    // own message about the new CHILD_SA.
    let spis1 = child_spis(&st, "Tunnel1");
    let log = log();
    for event in ["Tunnel1: tunnel up", "Tunnel1: CHILD_SA established"] {
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(event))
            .unwrap_or_default();
        assert!(
            line.contains(&format!("spi=\"{}/", spis1[0])) && line.contains("ike_spi=\""),
            "{event}: {line}"
        );
    }
    eprintln!(
        "{datapath}: Tunnel1 up, then BGP and ECMP, {:.1} s and {:.1} s after the reload \
         (checked once the 5 s of pings ended); pings of 100 lost while it was removed: \
         {lost_removing}, while it was added: {lost_adding}",
        up_after.as_secs_f64(),
        bgp_after.as_secs_f64(),
    );

    // 3. Tunnel0 removed: the VNet answers through gateway 1 alone.
    vnet_routes(&lab.ns.vnet, &[1]).unwrap();
    leave_out(&lab, "Tunnel0");
    let answer = reload(&lab);
    assert!(answer.contains("Tunnel0: removed"), "{answer}");
    assert_removed(&lab, 0);
    let out = lab.ping_vm(LAN_HOSTS[0], 5).unwrap();
    assert!(out.contains(" 5 received"), "{out}");
    // The commands follow the new set of tunnels.
    let (ok, out) = x.ctl(&["tunnel", "rekey", "Tunnel0"]).unwrap();
    assert!(!ok && out.contains("the tunnels are Tunnel1"), "{out}");
}

/// Tunnel `i` was removed: its gateway's IKE_SA is gone (the DELETE reached
/// it), its interface too, and xesp's status lists the other tunnel alone,
/// up. Returns that status.
fn assert_removed(lab: &Lab, i: usize) -> Value {
    let (gone, kept) = (format!("Tunnel{i}"), format!("Tunnel{}", 1 - i));
    let gw = &lab.gateways[i].charon;
    assert!(
        wait_until(Duration::from_secs(10), || gw.established_ike_sas() == 0),
        "gateway {i} kept its IKE_SA:\n{}",
        gw.list_sas()
    );
    assert!(!has_interface(lab, &gone), "{gone} is still there");
    let st = status(lab);
    assert_eq!(tunnel_names(&st), [kept.as_str()]);
    assert_eq!(tunnel(&st, &kept)["up"], true);
    st
}
