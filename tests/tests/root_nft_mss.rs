//! Needs root and `nft` (package nftables): the xfrm datapath's MSS clamp
//! ([`datapath_user::nft_mss`]) against the host's real nf_tables, in two
//! fresh namespaces joined by veth. The near side's veth is named `Tunnel0`,
//! as the xfrm interface would be (the rules match names, and the host
//! kernel has no xfrm interfaces; the VM test runs it on a real one).
//!
//! TCP timestamps are off on both sides, so each socket's MSS
//! (`TCP_MAXSEG`) is exactly the smaller of the peer's MSS option and its
//! own link's 1460: the far side's socket shows the clamp only if the SYN
//! was rewritten leaving through Tunnel0 (postrouting), and the near side's
//! only if the SYN-ACK was rewritten arriving from it (prerouting).

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use datapath_user::nft_mss;
use socket2::SockRef;
use xtask::netns::{Netns, veth};

const CLAMP: u16 = 1000;
/// What a 1500-octet link gives without a clamp (1500 - 40).
const LINK_MSS: u32 = 1460;

/// Connects from `near` to `far`; returns the MSS each end's socket uses.
fn connect(near: &Netns, far: &Netns) -> (u32, u32) {
    let listener = far
        .enter(|| TcpListener::bind((Ipv4Addr::new(192, 0, 2, 2), 0)).unwrap())
        .unwrap();
    let to: SocketAddr = listener.local_addr().unwrap();
    let client = near
        .enter(move || TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap())
        .unwrap();
    let (server, _) = listener.accept().unwrap();
    (
        SockRef::from(&client).tcp_mss().unwrap(),
        SockRef::from(&server).tcp_mss().unwrap(),
    )
}

/// `nft list table inet xesp` in `ns`, or None when there is no such table.
fn table(ns: &Netns) -> Option<String> {
    ns.exec("nft", &["list", "table", "inet", "xesp"]).ok()
}

/// The counters of the table's rules, in order (`counter packets N`).
fn counters(text: &str) -> Vec<u64> {
    text.split("counter packets ")
        .skip(1)
        .map(|s| s.split(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn root_nft_mss_clamps_syns_both_ways_and_replaces_its_table() {
    let near = Netns::create("mss-near").unwrap();
    let far = Netns::create("mss-far").unwrap();
    veth(&near, "Tunnel0", &far, "wan0").unwrap();
    near.ip(&["addr", "add", "192.0.2.1/24", "dev", "Tunnel0"])
        .unwrap();
    far.ip(&["addr", "add", "192.0.2.2/24", "dev", "wan0"])
        .unwrap();
    for ns in [&near, &far] {
        ns.sysctl("net.ipv4.tcp_timestamps=0").unwrap();
    }

    // Without the clamp both ends use the link's MSS: the check can fail.
    assert_eq!(connect(&near, &far), (LINK_MSS, LINK_MSS));
    assert_eq!(table(&near), None);

    near.enter(|| nft_mss::install(&["Tunnel0", "Tunnel1"], CLAMP))
        .unwrap()
        .unwrap();
    let listed = table(&near).expect("the table after install");
    assert_eq!(counters(&listed), [0, 0], "{listed}");
    assert_eq!(connect(&near, &far), (u32::from(CLAMP), u32::from(CLAMP)));
    // One SYN out through Tunnel0, one SYN-ACK in from it.
    let listed = table(&near).unwrap();
    assert_eq!(counters(&listed), [1, 1], "{listed}");

    // A second install (a restart after a crash) replaces the table: one
    // rule per chain, counters from zero, another clamp applies.
    near.enter(|| nft_mss::install(&["Tunnel0"], 1200))
        .unwrap()
        .unwrap();
    let listed = table(&near).unwrap();
    assert_eq!(counters(&listed), [0, 0], "{listed}");
    assert_eq!(
        near.exec("nft", &["list", "tables"]).unwrap().trim(),
        "table inet xesp"
    );
    assert_eq!(connect(&near, &far), (1200, 1200));

    // The host's own tables are left alone.
    near.exec("nft", &["add", "table", "inet", "host"]).unwrap();
    near.enter(nft_mss::remove).unwrap().unwrap();
    assert_eq!(table(&near), None);
    assert_eq!(
        near.exec("nft", &["list", "tables"]).unwrap().trim(),
        "table inet host"
    );
    assert_eq!(connect(&near, &far), (LINK_MSS, LINK_MSS));
    // Removing what is not there is not an error (a stop after a failed start).
    near.enter(nft_mss::remove).unwrap().unwrap();
}

#[test]
fn root_nft_mss_refuses_a_name_before_running_nft() {
    let ns = Netns::create("mss-bad").unwrap();
    let e = ns
        .enter(|| nft_mss::install(&["Tunnel0\"; flush ruleset"], CLAMP))
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, nft_mss::NftError::InterfaceName(_)), "{e}");
    assert_eq!(table(&ns), None);
}
