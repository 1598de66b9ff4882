//! Needs root: the AF_XDP workers enforce a CHILD_SA's traffic selectors on
//! decrypted packets (RFC 4301 §5.2). The device under test runs xesp's
//! `xdp` datapath ([`datapath_user::mode`]) between a DMZ (`dmz0`, to the
//! peer) and a LAN (`lan0`, to a host), and its SA backend installs one
//! CHILD_SA whose selectors are 10.0.0.0/24 (ours) <-> 10.2.0.0/24 (the
//! peer's). The peer encrypts with the ESP core and sends ESP in UDP: the
//! DMZ program steers it to a worker, which forwards to the LAN only what
//! the selectors cover and counts the rest as `selector_mismatch`.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use datapath_user::mode::{self, DatapathConfig, Mode, TunnelConfig};
use ike_proto::{
    backend::{ChildSaSpec, Direction},
    ts::TsRange,
};
use xesp_esp::{
    alg::{AesKeyBits, Encr, Suite},
    sa::{DropReason, Lifetime, NattPorts, OutboundSa, SaParams, Tunnel},
};
use xesp_tests::{ALLOWED_PREFIX, ALLOWED_SRC, DUT, INNER_PORT as PORT, inner_udp as inner, pair};
use xtask::netns::{Netns, veth, wait_until};

const SPI_IN: u32 = 0x7000;
const SPI_OUT: u32 = 0x7100;
const LAN_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);

fn suite() -> Suite {
    Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap()
}

/// One direction of the CHILD_SA, as the IKE core would hand it over.
fn spec(spi: u32, direction: Direction, keymat: &[u8]) -> ChildSaSpec {
    ChildSaSpec {
        tunnel: 0,
        spi,
        direction,
        suite: suite(),
        esn: false,
        keymat: zeroize::Zeroizing::new(keymat.to_vec()),
        local: SocketAddr::V4(SocketAddrV4::new(DUT, 4500)),
        remote: SocketAddr::V4(SocketAddrV4::new(ALLOWED_SRC, 4500)),
        udp_encap: true,
        lifetime: Lifetime::default(),
        replay_window: 64,
        local_ts: vec![TsRange::prefix(Ipv4Addr::new(10, 0, 0, 0), 24)],
        remote_ts: vec![TsRange::prefix(Ipv4Addr::new(10, 2, 0, 0), 24)],
    }
}

/// A counter of a status list.
fn counter(list: &[(String, u64)], name: &str) -> u64 {
    list.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no counter {name} in {list:?}"))
}

#[test]
fn root_workers_forward_only_what_the_selectors_cover() {
    let p = pair();
    let lan = Netns::create("lan").unwrap();
    lan.sysctl("net.ipv6.conf.all.disable_ipv6=1").unwrap();
    veth(&p.dut, "lan0", &lan, "eth0").unwrap();
    p.dut
        .ip(&["addr", "add", "10.0.0.1/24", "dev", "lan0"])
        .unwrap();
    lan.ip(&["addr", "add", "10.0.0.10/24", "dev", "eth0"])
        .unwrap();
    p.dut.sysctl("net.ipv4.ip_forward=1").unwrap();
    // The LAN host's MAC is known, so the worker's next-hop lookup finds
    // it at once and forwards rather than handing the packet to the stack.
    p.dut
        .exec("ping", &["-c", "1", "-W", "2", &LAN_HOST.to_string()])
        .unwrap();
    // What reaches the LAN host, on the port the test sends to.
    let lan_sock = lan
        .enter(|| UdpSocket::bind(SocketAddrV4::new(LAN_HOST, PORT)).unwrap())
        .unwrap();
    lan_sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();

    let keys_in: Vec<u8> = (0..36).map(|i| 0x40 | i as u8).collect();
    let keys_out: Vec<u8> = (0..36).map(|i| 0xc0 | i as u8).collect();
    let cfg = DatapathConfig {
        mode: Mode::Xdp,
        public_address: DUT,
        tunnels: vec![TunnelConfig {
            name: "Tunnel0".into(),
            address: Ipv4Addr::new(172, 16, 0, 1),
            peer: ALLOWED_SRC.into(),
        }],
        tunnel_mtu: 1400,
        mss_clamp: 1350,
        dmz_interface: "dmz0".into(),
        lan_interfaces: vec!["lan0".into()],
        dmz_allow: vec![ALLOWED_PREFIX.parse().unwrap()],
        dmz_pass_unclassified: false,
    };
    let mut dp = p
        .dut
        .enter(|| {
            let udp4500 = Arc::new(UdpSocket::bind(SocketAddrV4::new(DUT, 4500)).unwrap());
            mode::start(&cfg, udp4500, Box::new(|_, _| {})).unwrap()
        })
        .unwrap();
    {
        let mut b = dp.tunnel(0);
        b.install(&spec(SPI_IN, Direction::Inbound, &keys_in))
            .unwrap();
        b.install(&spec(SPI_OUT, Direction::Outbound, &keys_out))
            .unwrap();
        b.route(0, Some(SPI_OUT)).unwrap();
    }

    // The peer's half of the inbound SA.
    let peer_out = OutboundSa::new(
        &SaParams {
            spi: SPI_IN,
            suite: suite(),
            keymat: &keys_in,
            esn: false,
            replay_window: 64,
            tunnel: Tunnel {
                local: ALLOWED_SRC,
                remote: DUT,
                natt: Some(NattPorts {
                    local: 4500,
                    remote: 4500,
                }),
            },
            lifetime: Lifetime::default(),
        },
        Instant::now(),
    )
    .unwrap();
    let peer_sock = p
        .peer
        .enter(|| UdpSocket::bind(SocketAddrV4::new(ALLOWED_SRC, 4500)).unwrap())
        .unwrap();

    // 3 covered, 2 from outside the peer's selector, 2 to outside ours.
    let sends: [([u8; 4], [u8; 4], usize); 3] = [
        ([10, 2, 0, 4], [10, 0, 0, 10], 3),
        ([10, 9, 9, 9], [10, 0, 0, 10], 2),
        ([10, 2, 0, 4], [10, 0, 1, 10], 2),
    ];
    let mut tag = 0;
    for (src, dst, n) in sends {
        for _ in 0..n {
            let (mut buf, range) = inner(src, dst, tag);
            tag += 1;
            let outer = peer_out.encapsulate(&mut buf, range).unwrap();
            peer_sock
                .send_to(
                    &buf[outer.start + 28..outer.end],
                    SocketAddrV4::new(DUT, 4500),
                )
                .unwrap();
        }
    }

    let ok = wait_until(Duration::from_secs(10), || {
        let s = dp.status();
        s.tunnels[0].totals.drops.get(DropReason::SelectorMismatch) == 4
            && counter(&s.workers, "esp_rx") == 7
    });
    let s = dp.status();
    assert!(ok, "{s:?}");
    // The workers saw all seven: the DMZ program steered them, none went
    // through the sockets.
    assert_eq!(counter(&s.dmz, "esp_redirected"), 7, "{:?}", s.dmz);
    assert_eq!(s.tunnels[0].totals.drops.total(), 4);
    // The covered three reached the LAN host, and nothing else.
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Ok((n, from)) = lan_sock.recv_from(&mut buf) {
        assert_eq!(from.ip(), Ipv4Addr::new(10, 2, 0, 4));
        got.push(buf[..n].to_vec());
    }
    assert_eq!(
        got,
        (0..3u8)
            .map(|t| vec![b'x', b'e', b's', t])
            .collect::<Vec<_>>()
    );
    assert_eq!(counter(&s.workers, "decap_forwarded"), 3, "{:?}", s.workers);
    dp.stop();
}
