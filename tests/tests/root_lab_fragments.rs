//! Needs root: fragmented ESP in the reference lab. The Azure gateway
//! instances' interface towards the device has an MTU (1200) smaller than
//! their ESP for 1300-octet datagrams from the VNet, so every such ESP
//! packet arrives at the device in two RFC 791 fragments. The DMZ filter
//! passes each fragment to the kernel (counted as `fragment`, never steered
//! to an AF_XDP worker, which would drop it), the kernel reassembles the ESP,
//! and xesp's socket datapath decrypts it: every datagram reaches the LAN
//! host.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use serde_json::Value;
use xtask::lab::{
    Lab, LabConfig, OnpremMode,
    topology::{LAN_HOSTS, VM},
};

fn counter(list: &Value, name: &str) -> u64 {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or_else(|| panic!("no counter {name} in {list}"))
}

#[test]
fn root_lab_fragmented_esp_goes_through_the_stack_and_is_decrypted() {
    const DATAGRAMS: u64 = 5;
    const PORT: u16 = 9911;
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    lab.ping_vm(LAN_HOSTS[0], 2)
        .unwrap_or_else(|e| panic!("ping {VM}: {e:#}\n{}", lab.status()));
    for gw in &lab.ns.azgw {
        gw.ip(&["link", "set", "wan0", "mtu", "1200"]).unwrap();
    }
    let rx = lab
        .ns
        .lan
        .enter(|| {
            let s = UdpSocket::bind(SocketAddrV4::new(LAN_HOSTS[0], PORT)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        })
        .unwrap();
    let status = || lab.xesp.as_ref().unwrap().0.status_json().unwrap();
    let before = status();
    lab.ns
        .vnet
        .enter(|| {
            let s = UdpSocket::bind(SocketAddrV4::new(VM, 0)).unwrap();
            for i in 0..DATAGRAMS {
                let mut d = vec![i as u8; 1300];
                d[..8].copy_from_slice(b"xespFRAG");
                s.send_to(&d, SocketAddrV4::new(LAN_HOSTS[0], PORT))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..DATAGRAMS {
        let (n, _) = rx
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of {DATAGRAMS}: {e}\n{}", lab.status()));
        assert_eq!(n, 1300);
        assert_eq!(&buf[..8], b"xespFRAG");
        assert_eq!(buf[8], i as u8, "datagram {i}");
    }
    let after = status();
    let delta = |list: &str, name: &str| counter(&after[list], name) - counter(&before[list], name);
    // Each datagram's ESP came in exactly two fragments, all passed to the stack.
    assert_eq!(
        delta("dmz", "fragment"),
        2 * DATAGRAMS,
        "DMZ counters {:#}",
        after["dmz"]
    );
    // None of them went through a worker: the socket path decrypted them.
    assert_eq!(
        delta("workers", "decap_forwarded"),
        0,
        "{:#}",
        after["workers"]
    );
}
