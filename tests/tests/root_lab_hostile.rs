//! Needs root: a burst of hostile traffic at xesp's DMZ interface (xdp
//! datapath, reference lab) is accounted for. What the DMZ program passes
//! to the stack is counted again further down, by the sockets and the
//! daemon, or its loss is counted (the sockets' receive-buffer drops):
//! nothing vanishes between the XDP counters and `xesp status`.
//!
//! From the Microsoft-peering edge, with an address inside the allowlist
//! that is no peer (203.0.113.254), and from outside it (198.51.100.1):
//! IKE on UDP 500 and 4500, NAT-T keepalives, ESP with an unknown SPI in UDP
//! and as IP protocol 50, and the same from the outsider.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use xtask::{
    lab::{
        Lab, LabConfig, OnpremMode,
        topology::{ONPREM_PUBLIC, OUTSIDER},
    },
    netns::wait_until,
};

/// Inside the allowlist (203.0.113.0/24), and no peer: the edge's own
/// address toward the gateways.
const ALLOWED_NOT_PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// Packets of each kind.
const N: usize = 2000;

/// Every counter of `xesp status --json` by name: the DMZ's, the socket
/// path's (IKE gate included) and the SA database's orphans.
fn counters(lab: &Lab) -> BTreeMap<String, u64> {
    let st: Value = lab.xesp.as_ref().unwrap().0.status_json().unwrap();
    let mut m = BTreeMap::new();
    for list in ["dmz", "socket_path"] {
        for p in st[list].as_array().unwrap() {
            m.insert(p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap());
        }
    }
    m.insert("unknown_spi".into(), st["unknown_spi"].as_u64().unwrap());
    m
}

/// `after - before` of counter `name`.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, name: &str) -> u64 {
    let get = |m: &BTreeMap<String, u64>| {
        *m.get(name)
            .unwrap_or_else(|| panic!("no counter {name} in {m:?}"))
    };
    get(after) - get(before)
}

/// IKE behind the non-ESP marker, or on 500 without it: a header with a
/// random-looking initiator SPI and nothing else.
fn ike(marker: bool, i: usize) -> Vec<u8> {
    let mut d = Vec::new();
    if marker {
        d.extend_from_slice(&[0; 4]);
    }
    d.extend_from_slice(&(i as u64 | 0x5a5a_0000_0000).to_be_bytes());
    d.extend_from_slice(&[0; 8]);
    d.extend_from_slice(&[33, 0x20, 34, 0x08, 0, 0, 0, 0, 0, 0, 0, 28]);
    d
}

/// ESP with an SPI no SA has, and fake ciphertext.
fn esp(i: usize) -> Vec<u8> {
    let mut d = 0x0bad_5a00u32.to_be_bytes().to_vec();
    d.extend_from_slice(&(i as u32 + 1).to_be_bytes());
    d.extend_from_slice(&[0xab; 48]);
    d
}

/// Sends one packet. A full buffer on this side (ENOBUFS) is the sender's
/// loss, not xesp's: it is tried again.
fn send(mut f: impl FnMut() -> std::io::Result<usize>) {
    for _ in 0..10_000 {
        match f() {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc_enobufs()) => std::thread::yield_now(),
            Err(e) => panic!("sending: {e}"),
        }
    }
    panic!("sending: the buffer stayed full");
}

const fn libc_enobufs() -> i32 {
    105
}

fn burst(src: Ipv4Addr) {
    let to = |port| SocketAddrV4::new(ONPREM_PUBLIC, port);
    let s500 = UdpSocket::bind(SocketAddrV4::new(src, 500)).unwrap();
    let s4500 = UdpSocket::bind(SocketAddrV4::new(src, 4500)).unwrap();
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(50))).unwrap();
    raw.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())
        .unwrap();
    for i in 0..N {
        send(|| s500.send_to(&ike(false, i), to(500)));
        send(|| s4500.send_to(&ike(true, i), to(4500)));
        send(|| s4500.send_to(&[0xff], to(4500)));
        send(|| s4500.send_to(&esp(i), to(4500)));
        send(|| raw.send_to(&esp(i), &SocketAddr::V4(to(0)).into()));
    }
}

#[test]
fn root_hostile_burst_every_packet_the_dmz_passed_is_counted_further_down() {
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    let before = counters(&lab);
    lab.ns.msee.enter(|| burst(OUTSIDER)).unwrap();
    lab.ns.msee.enter(|| burst(ALLOWED_NOT_PEER)).unwrap();

    // UDP 4500 that reached the stack (IKE, keepalives, ESP without SA in
    // UDP) and plain ESP without SA: read by the sockets, or dropped at
    // their full buffers, counted either way. The peers' own IKE on 4500
    // (DPD) counts on both sides alike.
    let balanced = |a: &BTreeMap<String, u64>| {
        let d = |n| delta(&before, a, n);
        let dmz_4500_and_esp = d("natt_ike") + d("natt_keepalive") + d("esp_no_sa");
        let below = d("ike_on_4500")
            + d("keepalives")
            + d("unknown_spi")
            + d("udp4500_buffer_drops")
            + d("esp_buffer_drops");
        let dmz_500 = d("ike");
        let below_500 = d("udp500_rx") + d("udp500_buffer_drops");
        (dmz_4500_and_esp, below, dmz_500, below_500)
    };
    let mut last = (0, 0, 0, 0);
    let ok = wait_until(Duration::from_secs(30), || {
        last = balanced(&counters(&lab));
        last.0 == last.1 && last.2 == last.3 && last.0 >= (3 * N) as u64 * 9 / 10
    });
    let after = counters(&lab);
    assert!(
        ok,
        "DMZ passed {} on 4500/ESP, {} counted below; {} on 500, {} counted below\n{:?}",
        last.0, last.1, last.2, last.3, after
    );
    let d = |n| delta(&before, &after, n);
    eprintln!(
        "sent {N} of each kind from each source; counted: {:?}",
        after
            .keys()
            .map(|k| (k.as_str(), d(k)))
            .filter(|(_, v)| *v > 0)
            .collect::<Vec<_>>()
    );
    // The outsider never got past the filter: all five kinds of its packets.
    assert!(d("drop_not_allowed") >= (5 * N) as u64 * 9 / 10);
    // The allowed non-peer's IKE went no further than the gate: all of it
    // on 500, and on 4500 all but the peers' own.
    assert!(
        d("ike_not_peer") >= d("udp500_rx")
            && d("ike_not_peer") <= d("udp500_rx") + d("ike_on_4500")
            && d("ike_not_peer") + 50 >= d("udp500_rx") + d("ike_on_4500"),
        "{after:?}"
    );
}
