//! Needs root: the socket datapath enforces a CHILD_SA's traffic selectors
//! on real packets (RFC 4301 §5.1, §5.2). The device under test runs
//! xesp's socket path (UDP 4500, a TUN device) with one SA pair whose
//! selectors are 10.0.0.0/24 (ours) <-> 10.2.0.0/24 (the peer's); the peer
//! namespace encrypts with the ESP core and sends ESP in UDP over veth.
//!
//! * Inbound: of the decrypted packets, only those from 10.2.0.0/24 to
//!   10.0.0.0/24 reach the tunnel device; the others are dropped and
//!   counted as `selector_mismatch`.
//! * Outbound: a packet the kernel routes into the tunnel from an address
//!   outside 10.0.0.0/24 is dropped and counted as `no_selector`; one from
//!   inside it reaches the peer, encrypted.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use datapath_user::{
    sadb::SaDb,
    slowpath::{SlowCounters, SlowPath, raw_esp_socket},
    tun::Tun,
};
use xesp_esp::{
    alg::{AesKeyBits, Encr, Suite},
    policy::{Selector, Selectors},
    sa::{DropReason, InboundSa, Lifetime, NattPorts, OutboundSa, SaParams, Tunnel},
};
use xesp_tests::{ALLOWED_SRC, DUT, inner_udp as inner, pair};
use xtask::netns::wait_until;

/// The peer -> DUT SA, and the DUT -> peer SA.
const SPI_IN: u32 = 0x5000;
const SPI_OUT: u32 = 0x6000;

fn params(spi: u32, local: Ipv4Addr, remote: Ipv4Addr, keymat: &[u8]) -> SaParams<'_> {
    SaParams {
        spi,
        suite: Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap(),
        keymat,
        esn: false,
        replay_window: 64,
        tunnel: Tunnel {
            local,
            remote,
            natt: Some(NattPorts {
                local: 4500,
                remote: 4500,
            }),
        },
        lifetime: Lifetime::default(),
    }
}

fn net(a: [u8; 4], len: u8) -> Selector {
    Selector::prefix(Ipv4Addr::from(a), len)
}

fn rx_packets(ns: &xtask::netns::Netns, dev: &str) -> u64 {
    ns.exec(
        "cat",
        &[&format!("/sys/class/net/{dev}/statistics/rx_packets")],
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn root_socket_path_enforces_the_selectors_both_ways() {
    let p = pair();
    let keys_in: Vec<u8> = (0..36).map(|i| i as u8).collect();
    let keys_out: Vec<u8> = (0..36).map(|i| 0x80 | i as u8).collect();
    let ours = net([10, 0, 0, 0], 24);
    let theirs = net([10, 2, 0, 0], 24);
    let selectors = || Selectors::new(&[ours], &[theirs]);

    // The DUT: a TUN device, the sockets, the SA pair, the socket path.
    let tun = Arc::new(p.dut.enter(|| Tun::create("tun0")).unwrap().unwrap());
    tun.set_carrier(true).unwrap();
    p.dut.ip(&["link", "set", "tun0", "up"]).unwrap();
    p.dut
        .ip(&["addr", "add", "172.16.0.1/32", "dev", "tun0"])
        .unwrap();
    p.dut
        .ip(&["route", "add", "10.2.0.0/24", "dev", "tun0"])
        .unwrap();
    let now = Instant::now();
    let sadb = Arc::new(SaDb::new());
    sadb.install_inbound(
        0,
        InboundSa::new(&params(SPI_IN, DUT, ALLOWED_SRC, &keys_in), now).unwrap(),
        selectors(),
    );
    sadb.install_outbound(
        0,
        OutboundSa::new(&params(SPI_OUT, DUT, ALLOWED_SRC, &keys_out), now).unwrap(),
        selectors(),
    );
    assert!(sadb.route(0, Some(SPI_OUT)));
    let (udp4500, raw) = p
        .dut
        .enter(|| {
            (
                UdpSocket::bind(SocketAddrV4::new(DUT, 4500)).unwrap(),
                raw_esp_socket(DUT).unwrap(),
            )
        })
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let path = Arc::new(SlowPath {
        sadb: sadb.clone(),
        tuns: vec![Some(tun)],
        udp4500: Arc::new(udp4500),
        raw_esp: Arc::new(raw),
        mss_clamp: 1350,
        counters: Arc::new(SlowCounters::default()),
        stop: stop.clone(),
    });
    let threads = path.clone().start(|_, _| {}).unwrap();

    // The peer: its halves of the SAs and a UDP 4500 socket.
    let peer_out = OutboundSa::new(&params(SPI_IN, ALLOWED_SRC, DUT, &keys_in), now).unwrap();
    let peer_in = InboundSa::new(&params(SPI_OUT, ALLOWED_SRC, DUT, &keys_out), now).unwrap();
    let peer_sock = p
        .peer
        .enter(|| UdpSocket::bind(SocketAddrV4::new(ALLOWED_SRC, 4500)).unwrap())
        .unwrap();
    peer_sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();

    // Inbound: 3 covered, 2 from outside the peer's selector, 2 to outside ours.
    let rx_before = rx_packets(&p.dut, "tun0");
    let sends: [([u8; 4], [u8; 4], usize); 3] = [
        ([10, 2, 0, 4], [10, 0, 0, 10], 3),
        ([10, 9, 9, 9], [10, 0, 0, 10], 2),
        ([10, 2, 0, 4], [10, 1, 10, 10], 2),
    ];
    for (src, dst, n) in sends {
        for k in 0..n {
            let (mut buf, range) = inner(src, dst, k as u8);
            let outer = peer_out.encapsulate(&mut buf, range).unwrap();
            // The UDP payload: everything after the outer IPv4 and UDP headers.
            peer_sock
                .send_to(
                    &buf[outer.start + 28..outer.end],
                    SocketAddrV4::new(DUT, 4500),
                )
                .unwrap();
        }
    }
    let counters = || sadb.inbound_counters(SPI_IN).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let c = counters();
            c.packets == 3 && c.drops.get(DropReason::SelectorMismatch) == 4
        }),
        "{:?}",
        counters()
    );
    assert_eq!(counters().drops.total(), 4);
    // Exactly the covered packets reached the tunnel device.
    assert!(wait_until(Duration::from_secs(2), || rx_packets(
        &p.dut, "tun0"
    ) - rx_before
        == 3));
    assert_eq!(
        sadb.tunnel_totals(0)
            .drops
            .get(DropReason::SelectorMismatch),
        4
    );

    // Outbound: from the tunnel's address (outside 10.0.0.0/24), then from
    // inside it.
    p.dut
        .ip(&["addr", "add", "10.0.0.1/32", "dev", "lo"])
        .unwrap();
    p.dut
        .enter(|| {
            let outside = UdpSocket::bind("172.16.0.1:0").unwrap();
            for _ in 0..2 {
                outside.send_to(b"no selector", "10.2.0.4:9999").unwrap();
            }
        })
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || sadb.no_selector_of(0) == 2),
        "{}",
        sadb.no_selector_of(0)
    );
    p.dut
        .enter(|| {
            let inside = UdpSocket::bind("10.0.0.1:0").unwrap();
            for _ in 0..3 {
                inside.send_to(b"covered", "10.2.0.4:9999").unwrap();
            }
        })
        .unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..3 {
        let (n, _) = peer_sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("ESP {i} of 3 at the peer: {e}"));
        // The peer decrypts from the ESP header on.
        let d = peer_in.decapsulate(&mut buf, 0..n).unwrap();
        let pkt = &buf[d.inner];
        assert_eq!(&pkt[12..16], &[10, 0, 0, 1]);
        assert_eq!(&pkt[16..20], &[10, 2, 0, 4]);
        assert!(pkt.ends_with(b"covered"));
    }
    assert_eq!(
        sadb.no_selector_of(0),
        2,
        "the covered ones were not counted"
    );
    assert_eq!(sadb.outbound_counters(0, SPI_OUT).unwrap().packets, 3);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads.handles {
        t.join().unwrap();
    }
}
