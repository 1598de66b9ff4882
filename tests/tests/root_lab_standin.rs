//! Needs root: the reference lab with the strongSwan stand-in on onprem
//! proves itself: both gateway instances up, four CHILD_SAs, three BGP
//! sessions, 10.2.0.0/24 as an ECMP route with two next hops, pings from both
//! on-prem networks to the VNet's VM; dropping the lab removes everything.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{path::Path, time::Duration};

use xtask::lab::{
    Lab, LabConfig, OnpremMode,
    topology::{LAN_HOSTS, VM, VNET},
};

#[test]
fn root_lab_standin_tunnels_bgp_ecmp_and_pings() {
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::StrongSwan,
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_standin_ready(Duration::from_secs(60)).unwrap();
    for gw in &lab.gateways {
        assert_eq!(gw.charon.established_ike_sas(), 1);
        assert_eq!(gw.charon.installed_children(), 2);
        let learned = gw
            .bird
            .birdc(&["show", "route", "protocol", "onprem"])
            .unwrap();
        assert!(
            learned.contains("10.0.0.0/24") && learned.contains("10.1.10.0/25"),
            "{learned}"
        );
    }
    let route = lab.ns.onprem.exec("ip", &["route", "show", VNET]).unwrap();
    assert_eq!(
        route.matches("nexthop").count(),
        2,
        "ECMP over both instances: {route}"
    );
    for src in LAN_HOSTS {
        lab.ping_vm(src, 2)
            .unwrap_or_else(|e| panic!("ping {VM} from {src}: {e:#}\n{}", lab.status()));
    }
    let names: Vec<String> = lab
        .ns
        .all()
        .iter()
        .map(|(_, n)| n.name().to_string())
        .collect();
    drop(lab);
    for n in names {
        assert!(
            !Path::new("/run/netns").join(&n).exists(),
            "{n} left behind"
        );
    }
}
