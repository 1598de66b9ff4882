//! Needs root: the DMZ XDP classifier, loaded from the real eBPF object and
//! attached to a veth in a fresh namespace, classifies each kind of packet sent
//! from a peer namespace into exactly the expected counter, and what it drops
//! never reaches the kernel's IP stack.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use datapath_user::xdp::{DmzCounters, XdpPrograms};
use xesp_common::DmzCounter;
use xesp_tests::{
    ALLOWED_PREFIX, ALLOWED_SRC, DENIED_SRC, DUT, Pair, attach_dmz, pair, send_esp, send_udp,
    udp_from,
};
use xtask::netns::wait_until;

const APP_PORT: u16 = 7777;

/// The IPv4 `InReceives` counter of the calling thread's namespace.
fn ip_in_receives() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InReceives")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn wait_for_total(filter: &XdpPrograms, total: u64) -> DmzCounters {
    let mut last = DmzCounters::default();
    let ok = wait_until(Duration::from_secs(5), || {
        last = filter.dmz_counters().unwrap();
        last.iter()
            .filter(|(n, _)| *n != DmzCounter::Arp.name())
            .map(|(_, v)| v)
            .sum::<u64>()
            >= total
    });
    assert!(
        ok,
        "the classifier saw fewer than {total} IP packets: {last:?}"
    );
    last
}

#[test]
fn root_xdp_dmz_classifies_every_kind_and_drops_disallowed_sources() {
    let Pair { dut, peer } = pair();
    let mut filter = attach_dmz(&dut);
    filter.allow(ALLOWED_PREFIX.parse().unwrap()).unwrap();
    let (app, in_receives_before) = dut
        .enter(|| {
            let app = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, APP_PORT)).unwrap();
            app.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            (app, ip_in_receives())
        })
        .unwrap();

    let ike_header = [0u8; 28];
    let mut natt_ike = vec![0u8; 4];
    natt_ike.extend_from_slice(&ike_header);
    let natt_esp = xesp_tests::fake_esp(0x1000, 1);
    peer.enter(|| {
        let ok = udp_from(ALLOWED_SRC);
        send_udp(&ok, 500, &ike_header, 3);
        send_udp(&ok, 4500, &natt_ike, 4);
        send_udp(&ok, 4500, &[0xff], 2);
        send_udp(&ok, 4500, &natt_esp, 5);
        send_esp(ALLOWED_SRC, 0x2000, 6);
        send_udp(&ok, APP_PORT, b"allowed", 7);
        // Malformed: a 3-octet UDP-4500 payload, and ESP with a reserved SPI.
        send_udp(&ok, 4500, &[1, 2, 3], 1);
        send_esp(ALLOWED_SRC, 5, 1);
        // Not allowed: application traffic and IKE alike.
        let denied = udp_from(DENIED_SRC);
        send_udp(&denied, APP_PORT, b"denied", 8);
        send_udp(&denied, 500, &ike_header, 2);
        send_esp(DENIED_SRC, 0x3000, 1);
    })
    .unwrap();

    let c = wait_for_total(&filter, 3 + 4 + 2 + 5 + 6 + 7 + 2 + 11);
    let expect = [
        (DmzCounter::Ike, 3),
        (DmzCounter::NattIke, 4),
        (DmzCounter::NattKeepalive, 2),
        (DmzCounter::NattEsp, 5),
        (DmzCounter::Esp, 6),
        (DmzCounter::Allowed, 7),
        (DmzCounter::DropMalformed, 2),
        (DmzCounter::DropNotAllowed, 11),
    ];
    for (counter, n) in expect {
        assert_eq!(c.get(counter), n, "{} in {c:?}", counter.name());
    }

    // The application saw exactly the allowed datagrams, none of the denied ones.
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok((len, from)) = app.recv_from(&mut buf) {
        got.push((buf[..len].to_vec(), from));
    }
    assert_eq!(got.len(), 7, "{got:?}");
    assert!(
        got.iter()
            .all(|(p, from)| p == b"allowed" && from.ip() == ALLOWED_SRC)
    );
    // And the stack itself received only what XDP passed: 27 IP packets.
    let passed = dut.enter(ip_in_receives).unwrap() - in_receives_before;
    assert_eq!(
        passed,
        3 + 4 + 2 + 5 + 6 + 7,
        "IP packets that reached the stack"
    );

    // Removing the prefix closes the door for that source too.
    filter.disallow(ALLOWED_PREFIX.parse().unwrap()).unwrap();
    peer.enter(|| send_udp(&udp_from(ALLOWED_SRC), APP_PORT, b"late", 4))
        .unwrap();
    let c = wait_for_total(&filter, 40 + 4);
    assert_eq!(c.get(DmzCounter::DropNotAllowed), 11 + 4);
    assert!(
        app.recv_from(&mut buf).is_err(),
        "a datagram got through after disallow"
    );
    filter.flush_logs();
    dut.enter(move || drop(filter)).unwrap();
}

/// RFC 791 fragments of ESP in UDP 4500 and of ESP, from a peer whose
/// datagrams exceed the link MTU: every fragment, first or later, goes to
/// the stack (counted as `fragment`, never steered even when the SPI has an
/// SA), and the stack hands the reassembled packet to the sockets the
/// daemon's socket path reads (UDP 4500 and the raw ESP socket).
#[test]
fn root_xdp_dmz_sends_fragments_whole_to_the_stack() {
    const SPI: u32 = 0x4000;
    let Pair { dut, peer } = pair();
    let mut filter = attach_dmz(&dut);
    filter.allow(ALLOWED_PREFIX.parse().unwrap()).unwrap();
    filter.steer(SPI, 0).unwrap();
    let (udp4500, raw) = dut
        .enter(|| {
            let u = UdpSocket::bind(SocketAddrV4::new(DUT, 4500)).unwrap();
            u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let r = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(50)),
            )
            .unwrap();
            r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            (u, r)
        })
        .unwrap();

    // 2000 octets of "ESP" over a 1500-octet link: two fragments each.
    let mut big = xesp_tests::fake_esp(SPI, 1);
    big.resize(2000, 0xcd);
    peer.enter(|| {
        send_udp(&udp_from(ALLOWED_SRC), 4500, &big, 1);
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(50)),
        )
        .unwrap();
        s.bind(&std::net::SocketAddr::from(SocketAddrV4::new(ALLOWED_SRC, 0)).into())
            .unwrap();
        s.send_to(
            &big,
            &std::net::SocketAddr::from(SocketAddrV4::new(DUT, 0)).into(),
        )
        .unwrap();
        // And the same from a source outside the allowlist: four drops.
        send_udp(&udp_from(DENIED_SRC), 4500, &big, 2);
    })
    .unwrap();

    let c = wait_for_total(&filter, 8);
    for k in DmzCounter::ALL {
        let want = match k {
            DmzCounter::Fragment | DmzCounter::DropNotAllowed => 4,
            _ => 0,
        };
        if k != DmzCounter::Arp {
            assert_eq!(c.get(k), want, "{} in {c:?}", k.name());
        }
    }
    assert_eq!(
        filter.steer_counters().unwrap(),
        [0; xesp_common::SteerCounter::COUNT as usize],
        "a fragment was steered"
    );
    let mut buf = [0u8; 4096];
    let (n, from) = udp4500.recv_from(&mut buf).unwrap();
    assert_eq!((n, from.ip()), (2000, std::net::IpAddr::V4(ALLOWED_SRC)));
    assert_eq!(&buf[..n], &big[..], "reassembled ESP in UDP");
    let mut rbuf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
    let n = raw.recv(&mut rbuf).unwrap();
    // SAFETY: recv initialised the first n octets.
    let got: Vec<u8> = rbuf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    assert_eq!(n, 20 + 2000, "reassembled ESP with its IPv4 header");
    assert_eq!(&got[20..], &big[..]);
    // Nothing else arrives: the denied datagrams never reached the stack.
    udp4500
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        udp4500.recv_from(&mut buf).is_err(),
        "a denied datagram got through"
    );
    dut.enter(move || drop(filter)).unwrap();
}
