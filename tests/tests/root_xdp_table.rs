//! Needs root: table tests of both XDP programs through `BPF_PROG_TEST_RUN`
//! (aya's `TestRun`). Each crafted frame has the verdict it must get and the
//! one counter it must add to; after every frame the test reads all the
//! program's counters and checks that exactly that one moved, by one (and,
//! for ESP, exactly the steering counter it names).

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::net::{Ipv4Addr, Ipv6Addr};

use datapath_user::{
    tun::Tun,
    xdp::XdpPrograms,
    xsk::{Port, PortConfig},
};
use xesp_common::{DmzCounter, LanCounter, SteerCounter, dmz_flags, prog};
use xesp_tests::pair;
use xtask::netns::Netns;

const DROP: u32 = 1;
const PASS: u32 = 2;
const REDIRECT: u32 = 4;

const ALLOWED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const DENIED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
const DUT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const DENIED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
const DUT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2);

/// An SPI with an inbound SA and a bound socket, one with an SA but no
/// socket, and one without an SA.
const SPI_SOCKET: u32 = 0x1000;
const SPI_NO_SOCKET: u32 = 0x2000;
const SPI_UNKNOWN: u32 = 0x3000;

// ---- frame builders -------------------------------------------------------

/// Ethernet header with VLAN tags (`(TPID, VLAN id)`, outermost first).
fn eth(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The fields of an IPv4 header a case varies.
#[derive(Clone, Copy)]
struct V4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    /// Flags and fragment offset (RFC 791: 0x2000 is More Fragments).
    frag: u16,
    ttl: u8,
    /// Octets of options (a multiple of 4).
    options: usize,
    /// Overrides the IHL nibble.
    ihl: Option<u8>,
}

fn v4(src: Ipv4Addr, proto: u8) -> V4 {
    V4 {
        src,
        dst: DUT,
        proto,
        frag: 0,
        ttl: 64,
        options: 0,
        ihl: None,
    }
}

fn ipv4(h: V4, payload: &[u8]) -> Vec<u8> {
    let hlen = 20 + h.options;
    let ihl = h.ihl.unwrap_or((hlen / 4) as u8);
    let total = (hlen + payload.len()) as u16;
    let mut p = vec![0x40 | ihl, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34]);
    p.extend_from_slice(&h.frag.to_be_bytes());
    p.extend_from_slice(&[h.ttl, h.proto, 0, 0]);
    p.extend_from_slice(&h.src.octets());
    p.extend_from_slice(&h.dst.octets());
    p.extend(std::iter::repeat_n(1u8, h.options)); // NOP options (RFC 791)
    let sum = checksum(&p[..hlen]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&40000u16.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn esp(spi: u32) -> Vec<u8> {
    let mut e = spi.to_be_bytes().to_vec();
    e.extend_from_slice(&1u32.to_be_bytes());
    e.extend_from_slice(&[0xab; 32]);
    e
}

/// IKE behind the non-ESP marker (RFC 3948 §2.2).
fn natt_ike() -> Vec<u8> {
    vec![0u8; 4 + 28]
}

fn udp4(src: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    eth(&[], 0x0800, &ipv4(v4(src, 17), &udp(dport, payload)))
}

fn ipv6(src: Ipv6Addr, next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&DUT6.octets());
    p.extend_from_slice(payload);
    p
}

/// An 8-octet hop-by-hop/routing/destination-options header (RFC 8200 §4.3).
fn ext(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut x = vec![next, 0, 1, 4, 0, 0, 0, 0]; // PadN over 6 octets
    x.extend_from_slice(rest);
    x
}

/// ICMPv6 of `kind` with an 20-octet body (a neighbour solicitation's size).
fn icmp6(kind: u8) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&[0u8; 20]);
    m
}

fn arp() -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 192, 0, 2, 2]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 1]);
    eth(&[], 0x0806, &a)
}

const Q: u16 = 0x8100;
const AD: u16 = 0x88a8;

// ---- the DMZ program --------------------------------------------------------

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    counter: DmzCounter,
    steer: Option<SteerCounter>,
}

fn case(name: &'static str, frame: Vec<u8>, verdict: u32, counter: DmzCounter) -> Case {
    Case {
        name,
        frame,
        verdict,
        counter,
        steer: None,
    }
}

fn esp_case(name: &'static str, frame: Vec<u8>, counter: DmzCounter, steer: SteerCounter) -> Case {
    let verdict = if steer == SteerCounter::Redirected {
        REDIRECT
    } else {
        PASS
    };
    Case {
        name,
        frame,
        verdict,
        counter,
        steer: Some(steer),
    }
}

fn dmz_cases() -> Vec<Case> {
    use DmzCounter::*;
    let keepalive = [0xffu8];
    let v4_frag = |frag: u16, proto: u8, payload: &[u8]| {
        eth(
            &[],
            0x0800,
            &ipv4(
                V4 {
                    frag,
                    ..v4(ALLOWED, proto)
                },
                payload,
            ),
        )
    };
    let with_options = |proto: u8, payload: &[u8]| {
        eth(
            &[],
            0x0800,
            &ipv4(
                V4 {
                    options: 8,
                    ..v4(ALLOWED, proto)
                },
                payload,
            ),
        )
    };
    let mut short_v4 = eth(&[], 0x0800, &ipv4(v4(ALLOWED, 17), &[]));
    short_v4.truncate(14 + 12);
    let mut short_v6 = eth(&[], 0x86dd, &ipv6(ALLOWED6, 17, 64, &[]));
    short_v6.truncate(14 + 30);
    let mut opts_cut = with_options(17, &udp(500, &[0; 28]));
    opts_cut.truncate(14 + 24);
    vec![
        // Untagged basics.
        case("IKE", udp4(ALLOWED, 500, &[0; 28]), PASS, Ike),
        case(
            "IKE, denied source",
            udp4(DENIED, 500, &[0; 28]),
            DROP,
            DropNotAllowed,
        ),
        case(
            "NAT-T IKE (non-ESP marker)",
            udp4(ALLOWED, 4500, &natt_ike()),
            PASS,
            NattIke,
        ),
        case(
            "NAT-keepalive",
            udp4(ALLOWED, 4500, &keepalive),
            PASS,
            NattKeepalive,
        ),
        case(
            "NAT-keepalive, not 0xFF",
            udp4(ALLOWED, 4500, &[0]),
            DROP,
            DropMalformed,
        ),
        case(
            "UDP 4500, 3 octets",
            udp4(ALLOWED, 4500, &[1, 2, 3]),
            DROP,
            DropMalformed,
        ),
        case(
            "non-ESP marker, 7 octets",
            udp4(ALLOWED, 4500, &[0; 7]),
            DROP,
            DropMalformed,
        ),
        case("other UDP", udp4(ALLOWED, 7777, b"hello"), PASS, Allowed),
        case(
            "ESP reserved SPI",
            eth(&[], 0x0800, &ipv4(v4(ALLOWED, 50), &esp(5))),
            DROP,
            DropMalformed,
        ),
        esp_case(
            "ESP, SA and socket",
            eth(&[], 0x0800, &ipv4(v4(ALLOWED, 50), &esp(SPI_SOCKET))),
            Esp,
            SteerCounter::Redirected,
        ),
        esp_case(
            "ESP, SA, no socket",
            eth(&[], 0x0800, &ipv4(v4(ALLOWED, 50), &esp(SPI_NO_SOCKET))),
            Esp,
            SteerCounter::NoSocket,
        ),
        esp_case(
            "ESP, unknown SPI",
            eth(&[], 0x0800, &ipv4(v4(ALLOWED, 50), &esp(SPI_UNKNOWN))),
            Esp,
            SteerCounter::NoSa,
        ),
        esp_case(
            "ESP in UDP, SA and socket",
            udp4(ALLOWED, 4500, &esp(SPI_SOCKET)),
            NattEsp,
            SteerCounter::Redirected,
        ),
        esp_case(
            "ESP in UDP, SA, no socket",
            udp4(ALLOWED, 4500, &esp(SPI_NO_SOCKET)),
            NattEsp,
            SteerCounter::NoSocket,
        ),
        esp_case(
            "ESP in UDP, unknown SPI",
            udp4(ALLOWED, 4500, &esp(SPI_UNKNOWN)),
            NattEsp,
            SteerCounter::NoSa,
        ),
        case(
            "ESP, denied source",
            eth(&[], 0x0800, &ipv4(v4(DENIED, 50), &esp(SPI_SOCKET))),
            DROP,
            DropNotAllowed,
        ),
        // VLAN: 802.1Q, 802.1ad QinQ; the rules apply to what the tags carry.
        case(
            "802.1Q IKE",
            eth(
                &[(Q, 100)],
                0x0800,
                &ipv4(v4(ALLOWED, 17), &udp(500, &[0; 28])),
            ),
            PASS,
            Ike,
        ),
        case(
            "802.1Q denied source",
            eth(&[(Q, 100)], 0x0800, &ipv4(v4(DENIED, 17), &udp(7777, b"x"))),
            DROP,
            DropNotAllowed,
        ),
        esp_case(
            "802.1Q ESP in UDP with an SA and socket: to the stack",
            eth(
                &[(Q, 100)],
                0x0800,
                &ipv4(v4(ALLOWED, 17), &udp(4500, &esp(SPI_SOCKET))),
            ),
            NattEsp,
            SteerCounter::Tagged,
        ),
        case(
            "QinQ keepalive",
            eth(
                &[(AD, 10), (Q, 100)],
                0x0800,
                &ipv4(v4(ALLOWED, 17), &udp(4500, &keepalive)),
            ),
            PASS,
            NattKeepalive,
        ),
        case(
            "QinQ denied source",
            eth(
                &[(AD, 10), (Q, 100)],
                0x0800,
                &ipv4(v4(DENIED, 50), &esp(SPI_SOCKET)),
            ),
            DROP,
            DropNotAllowed,
        ),
        esp_case(
            "QinQ ESP: to the stack",
            eth(
                &[(AD, 10), (Q, 100)],
                0x0800,
                &ipv4(v4(ALLOWED, 50), &esp(SPI_UNKNOWN)),
            ),
            Esp,
            SteerCounter::Tagged,
        ),
        case(
            "QinQ IPv6 denied source",
            eth(
                &[(AD, 10), (Q, 100)],
                0x86dd,
                &ipv6(DENIED6, 17, 64, &udp(500, &[0; 28])),
            ),
            DROP,
            DropNotAllowed,
        ),
        case(
            "three tags",
            eth(
                &[(AD, 10), (Q, 100), (Q, 200)],
                0x0800,
                &ipv4(v4(ALLOWED, 17), &udp(500, &[0; 28])),
            ),
            DROP,
            DropUnclassified,
        ),
        case(
            "802.1Q tag, no ethertype",
            eth(&[], Q, &[0, 100]),
            DROP,
            DropMalformed,
        ),
        case(
            "QinQ, inner tag cut",
            eth(&[(AD, 10)], Q, &[0, 100]),
            DROP,
            DropMalformed,
        ),
        case(
            "802.1Q, IPv4 header cut",
            eth(&[(Q, 100)], 0x0800, &[0x45, 0, 0, 20]),
            DROP,
            DropMalformed,
        ),
        // Ethertypes.
        case("ARP", arp(), PASS, Arp),
        case(
            "802.1Q ARP",
            {
                let a = arp();
                eth(&[(Q, 100)], 0x0806, &a[14..])
            },
            PASS,
            Arp,
        ),
        case("LLDP", eth(&[], 0x88cc, &[0; 32]), DROP, DropUnclassified),
        case(
            "802.1Q MPLS",
            eth(&[(Q, 100)], 0x8847, &[0; 32]),
            DROP,
            DropUnclassified,
        ),
        // IPv4 fragments: first (MF, offset 0) and later, any protocol; never steered.
        case(
            "first fragment of ESP",
            v4_frag(0x2000, 50, &esp(SPI_SOCKET)),
            PASS,
            Fragment,
        ),
        case(
            "first fragment of ESP in UDP",
            v4_frag(0x2000, 17, &udp(4500, &esp(SPI_SOCKET))),
            PASS,
            Fragment,
        ),
        case(
            "later fragment of ESP in UDP",
            v4_frag(185, 17, &[0xab; 64]),
            PASS,
            Fragment,
        ),
        case(
            "last fragment of ESP (offset, no MF)",
            v4_frag(185, 50, &[0xab; 64]),
            PASS,
            Fragment,
        ),
        case(
            "middle fragment, DF and MF",
            v4_frag(0x6000 | 10, 50, &[0xab; 64]),
            PASS,
            Fragment,
        ),
        case(
            "DF only: not a fragment",
            v4_frag(0x4000, 17, &udp(500, &[0; 28])),
            PASS,
            Ike,
        ),
        case(
            "fragment, denied source",
            eth(
                &[],
                0x0800,
                &ipv4(
                    V4 {
                        frag: 0x2000,
                        ..v4(DENIED, 50)
                    },
                    &esp(SPI_SOCKET),
                ),
            ),
            DROP,
            DropNotAllowed,
        ),
        case(
            "802.1Q fragment",
            eth(
                &[(Q, 100)],
                0x0800,
                &ipv4(
                    V4 {
                        frag: 0x2000,
                        ..v4(ALLOWED, 50)
                    },
                    &esp(SPI_SOCKET),
                ),
            ),
            PASS,
            Fragment,
        ),
        // IPv4 header shapes.
        case(
            "IP options, IKE",
            with_options(17, &udp(500, &[0; 28])),
            PASS,
            Ike,
        ),
        esp_case(
            "IP options, ESP",
            with_options(50, &esp(SPI_SOCKET)),
            Esp,
            SteerCounter::Redirected,
        ),
        case("IP options, UDP header cut", opts_cut, DROP, DropMalformed),
        case(
            "IHL 4",
            eth(
                &[],
                0x0800,
                &ipv4(
                    V4 {
                        ihl: Some(4),
                        ..v4(ALLOWED, 17)
                    },
                    &udp(500, &[0; 28]),
                ),
            ),
            DROP,
            DropMalformed,
        ),
        case(
            "IHL 0",
            eth(
                &[],
                0x0800,
                &ipv4(
                    V4 {
                        ihl: Some(0),
                        ..v4(ALLOWED, 17)
                    },
                    &udp(500, &[0; 28]),
                ),
            ),
            DROP,
            DropMalformed,
        ),
        case("IPv4 header cut", short_v4, DROP, DropMalformed),
        case(
            "version 6 in an IPv4 ethertype",
            eth(&[], 0x0800, &ipv6(ALLOWED6, 17, 64, &udp(500, &[0; 28]))),
            DROP,
            DropMalformed,
        ),
        case(
            "UDP header cut",
            {
                let mut f = udp4(ALLOWED, 500, &[]);
                f.truncate(14 + 20 + 6);
                f
            },
            DROP,
            DropMalformed,
        ),
        case(
            "ESP header cut",
            {
                let mut f = eth(&[], 0x0800, &ipv4(v4(ALLOWED, 50), &esp(SPI_SOCKET)));
                f.truncate(14 + 20 + 6);
                f
            },
            DROP,
            DropMalformed,
        ),
        case(
            "UDP length < 8",
            {
                let mut f = udp4(ALLOWED, 500, &[0; 28]);
                f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&[0, 4]);
                f
            },
            DROP,
            DropMalformed,
        ),
        // IPv6.
        case(
            "IPv6 IKE",
            eth(&[], 0x86dd, &ipv6(ALLOWED6, 17, 64, &udp(500, &[0; 28]))),
            PASS,
            Ike,
        ),
        case(
            "IPv6 denied source",
            eth(&[], 0x86dd, &ipv6(DENIED6, 17, 64, &udp(500, &[0; 28]))),
            DROP,
            DropNotAllowed,
        ),
        case("IPv6 header cut", short_v6, DROP, DropMalformed),
        case(
            "version 4 in an IPv6 ethertype",
            eth(&[], 0x86dd, &ipv4(v4(ALLOWED, 17), &[0; 40])),
            DROP,
            DropMalformed,
        ),
        case(
            "IPv6 hop-by-hop, IKE",
            eth(
                &[],
                0x86dd,
                &ipv6(ALLOWED6, 0, 64, &ext(17, &udp(500, &[0; 28]))),
            ),
            PASS,
            Ike,
        ),
        esp_case(
            "IPv6 dest-opts + routing, ESP",
            eth(
                &[],
                0x86dd,
                &ipv6(ALLOWED6, 60, 64, &ext(43, &ext(50, &esp(SPI_UNKNOWN)))),
            ),
            Esp,
            SteerCounter::NoSa,
        ),
        case(
            "IPv6 three extension headers",
            eth(
                &[],
                0x86dd,
                &ipv6(
                    ALLOWED6,
                    0,
                    64,
                    &ext(60, &ext(60, &ext(17, &udp(500, &[0; 28])))),
                ),
            ),
            PASS,
            Allowed,
        ),
        case(
            "IPv6 Fragment header",
            eth(
                &[],
                0x86dd,
                &ipv6(ALLOWED6, 44, 64, &[50, 0, 0, 1, 0, 0, 0, 1]),
            ),
            PASS,
            Fragment,
        ),
        case(
            "IPv6 hop-by-hop, Fragment",
            eth(
                &[],
                0x86dd,
                &ipv6(ALLOWED6, 0, 64, &ext(44, &[50, 0, 0, 1, 0, 0, 0, 1])),
            ),
            PASS,
            Fragment,
        ),
        case(
            "IPv6 extension header cut",
            eth(&[], 0x86dd, &ipv6(ALLOWED6, 0, 64, &[])),
            DROP,
            DropMalformed,
        ),
        case(
            "IPv6 Fragment, denied source",
            eth(
                &[],
                0x86dd,
                &ipv6(DENIED6, 44, 64, &[50, 0, 0, 1, 0, 0, 0, 1]),
            ),
            DROP,
            DropNotAllowed,
        ),
        // IPv6 link-local and unspecified sources: neighbour discovery only.
        case(
            "link-local NS",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(135))),
            PASS,
            Ipv6Nd,
        ),
        case(
            "link-local NA",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(136))),
            PASS,
            Ipv6Nd,
        ),
        case(
            "link-local RS",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(133))),
            PASS,
            Ipv6Nd,
        ),
        case(
            "link-local RA",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(134))),
            PASS,
            Ipv6Nd,
        ),
        case(
            "link-local redirect",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(137))),
            PASS,
            Ipv6Nd,
        ),
        case(
            "802.1Q link-local NS",
            eth(&[(Q, 100)], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(135))),
            PASS,
            Ipv6Nd,
        ),
        case(
            "unspecified-source NS (DAD)",
            eth(
                &[],
                0x86dd,
                &ipv6(Ipv6Addr::UNSPECIFIED, 58, 255, &icmp6(135)),
            ),
            PASS,
            Ipv6Nd,
        ),
        case(
            "link-local NS, hop limit 254",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 254, &icmp6(135))),
            DROP,
            DropLinkLocal,
        ),
        case(
            "link-local echo request",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(128))),
            DROP,
            DropLinkLocal,
        ),
        case(
            "link-local MLD report",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 1, &icmp6(143))),
            DROP,
            DropLinkLocal,
        ),
        case(
            "link-local ICMPv6 type 138",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(138))),
            DROP,
            DropLinkLocal,
        ),
        case(
            "link-local IKE",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 17, 255, &udp(500, &[0; 28]))),
            DROP,
            DropLinkLocal,
        ),
        case(
            "link-local NS behind hop-by-hop",
            eth(
                &[],
                0x86dd,
                &ipv6(LINK_LOCAL, 0, 255, &ext(58, &icmp6(135))),
            ),
            DROP,
            DropLinkLocal,
        ),
        case(
            "link-local ICMPv6 cut",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &[135])),
            DROP,
            DropLinkLocal,
        ),
        case(
            "unspecified-source UDP",
            eth(
                &[],
                0x86dd,
                &ipv6(Ipv6Addr::UNSPECIFIED, 17, 64, &udp(500, &[0; 28])),
            ),
            DROP,
            DropLinkLocal,
        ),
    ]
}

/// Runs `frame` through `xdp_dmz` and checks its verdict and that exactly
/// `counter` (and `steer`, if any) moved, by one.
fn run_dmz(x: &mut XdpPrograms, c: &Case) {
    let before = x.dmz_counters().unwrap();
    let steer_before = x.steer_counters().unwrap();
    let verdict = x.test_run(prog::XDP_DMZ, &c.frame).unwrap();
    let after = x.dmz_counters().unwrap();
    let steer_after = x.steer_counters().unwrap();
    assert_eq!(verdict, c.verdict, "{}: verdict", c.name);
    for k in DmzCounter::ALL {
        let want = u64::from(k == c.counter);
        assert_eq!(
            after.get(k) - before.get(k),
            want,
            "{}: counter {} (expected only {} to move)",
            c.name,
            k.name(),
            c.counter.name()
        );
    }
    for k in SteerCounter::ALL {
        let want = u64::from(Some(k) == c.steer);
        assert_eq!(
            steer_after[k as usize] - steer_before[k as usize],
            want,
            "{}: steering counter {}",
            c.name,
            k.name()
        );
    }
}

#[test]
fn root_xdp_dmz_table() {
    // A veth to bind an AF_XDP socket on: ESP of SPI_SOCKET is redirected to it.
    let p = pair();
    let mut x = XdpPrograms::load().unwrap();
    x.allow("192.0.2.0/26".parse().unwrap()).unwrap();
    x.allow("2001:db8:1::/48".parse().unwrap()).unwrap();
    x.steer(SPI_SOCKET, 0).unwrap();
    x.steer(SPI_NO_SOCKET, 1).unwrap();
    let cfg = PortConfig {
        frames: 64,
        frame_size: 4096,
        ring_size: 32,
    };
    let mut port = p.dut.enter(|| Port::new(cfg)).unwrap().unwrap();
    let sock = p
        .dut
        .enter(|| port.add_socket("dmz0", 0, true, false))
        .unwrap()
        .unwrap();
    x.bind_dmz_xsk(0, 0, port.fd(sock).unwrap()).unwrap();

    let cases = dmz_cases();
    for c in &cases {
        run_dmz(&mut x, c);
    }
    // Every counter but the one for passed unclassified frames was hit.
    let seen = x.dmz_counters().unwrap();
    for k in DmzCounter::ALL {
        let want = cases.iter().filter(|c| c.counter == k).count() as u64;
        assert_eq!(seen.get(k), want, "{} over the table", k.name());
        assert_eq!(want > 0, k != DmzCounter::PassUnclassified, "{}", k.name());
    }

    // The setting lets unclassified frames through, counted apart; it
    // changes nothing else.
    x.set_dmz_flags(dmz_flags::PASS_UNCLASSIFIED).unwrap();
    for c in [
        case(
            "LLDP, passed by setting",
            eth(&[], 0x88cc, &[0; 32]),
            PASS,
            DmzCounter::PassUnclassified,
        ),
        case(
            "three tags, passed by setting",
            eth(&[(AD, 10), (Q, 100), (Q, 200)], 0x0800, &[0; 40]),
            PASS,
            DmzCounter::PassUnclassified,
        ),
        case("ARP with the setting", arp(), PASS, DmzCounter::Arp),
        case(
            "denied source with the setting",
            udp4(DENIED, 500, &[0; 28]),
            DROP,
            DmzCounter::DropNotAllowed,
        ),
        case(
            "link-local with the setting",
            eth(&[], 0x86dd, &ipv6(LINK_LOCAL, 58, 255, &icmp6(128))),
            DROP,
            DmzCounter::DropLinkLocal,
        ),
    ] {
        run_dmz(&mut x, &c);
    }
    x.set_dmz_flags(0).unwrap();
    run_dmz(
        &mut x,
        &case(
            "LLDP, setting off again",
            eth(&[], 0x88cc, &[0; 32]),
            DROP,
            DmzCounter::DropUnclassified,
        ),
    );
    drop(port);
    drop(x);
    drop(p);
}

// ---- the LAN program --------------------------------------------------------

const LAN_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const VM: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 4);

fn lan_v4(dst: Ipv4Addr, proto: u8) -> V4 {
    V4 {
        src: LAN_HOST,
        dst,
        ..v4(LAN_HOST, proto)
    }
}

fn lan_frame(h: V4, payload: &[u8]) -> Vec<u8> {
    eth(&[], 0x0800, &ipv4(h, payload))
}

/// Runs `frame` through `xdp_lan` in `ns` and checks the verdict and that
/// exactly `counters` moved, by one each.
fn run_lan(
    ns: &Netns,
    x: &mut XdpPrograms,
    name: &str,
    frame: &[u8],
    verdict: u32,
    counters: &[LanCounter],
) {
    let before = x.lan_counters().unwrap();
    // In the namespace: the program asks that namespace's FIB.
    let got = ns
        .enter(|| x.test_run(prog::XDP_LAN, frame))
        .unwrap()
        .unwrap();
    let after = x.lan_counters().unwrap();
    assert_eq!(got, verdict, "{name}: verdict");
    for k in LanCounter::ALL {
        assert_eq!(
            after[k as usize] - before[k as usize],
            u64::from(counters.contains(&k)),
            "{name}: counter {} (expected only {counters:?} to move)",
            k.name(),
        );
    }
}

#[test]
fn root_xdp_lan_table() {
    let ns = Netns::create("lantab").unwrap();
    ns.sysctl("net.ipv6.conf.all.disable_ipv6=1").unwrap();
    ns.sysctl("net.ipv4.ip_forward=1").unwrap();
    // tun0 (tunnel 0, no AF_XDP socket) carries 10.2.0.0/24, tun1 (tunnel
    // 1, a socket on queue 0 of a veth) 10.3.0.0/24.
    let mut x = XdpPrograms::load().unwrap();
    let mut tuns = Vec::new();
    for t in 0..2u32 {
        let name = format!("tun{t}");
        tuns.push(ns.enter(|| Tun::create(&name)).unwrap().unwrap());
        let addr = format!("172.16.0.{}/32", t + 1);
        ns.ip(&["addr", "add", &addr, "dev", &name]).unwrap();
        ns.ip(&["link", "set", &name, "up"]).unwrap();
        let net = format!("10.{}.0.0/24", t + 2);
        ns.ip(&["route", "add", &net, "dev", &name]).unwrap();
        let ifindex: u32 = ns
            .exec("cat", &[&format!("/sys/class/net/{name}/ifindex")])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        x.set_tunnel_ifindex(ifindex, t).unwrap();
        x.set_tunnel_live(t, true).unwrap();
    }
    ns.ip(&[
        "link", "add", "lan0", "type", "veth", "peer", "name", "lanp0",
    ])
    .unwrap();
    ns.ip(&["link", "set", "lan0", "up"]).unwrap();
    ns.ip(&["link", "set", "lanp0", "up"]).unwrap();
    let cfg = PortConfig {
        frames: 64,
        frame_size: 4096,
        ring_size: 32,
    };
    let mut port = ns.enter(|| Port::new(cfg)).unwrap().unwrap();
    let sock = ns
        .enter(|| port.add_socket("lan0", 0, true, false))
        .unwrap()
        .unwrap();
    x.bind_lan_xsk(0, 1, port.fd(sock).unwrap()).unwrap();

    let udp_vm = udp(9000, b"flow");
    let mut cut = lan_frame(lan_v4(VM, 17), &udp_vm);
    cut.truncate(14 + 16);
    use LanCounter::*;
    let to_tunnel1 = lan_frame(lan_v4(Ipv4Addr::new(10, 3, 0, 4), 17), &udp_vm);
    let table: Vec<(&str, Vec<u8>, u32, LanCounter)> = vec![
        ("UDP to tunnel 1", to_tunnel1.clone(), REDIRECT, ToTunnel),
        (
            "UDP to the VNet",
            lan_frame(lan_v4(VM, 17), &udp_vm),
            PASS,
            NoSocket,
        ),
        (
            "IP options to the VNet",
            lan_frame(
                V4 {
                    options: 8,
                    ..lan_v4(VM, 17)
                },
                &udp_vm,
            ),
            PASS,
            NoSocket,
        ),
        (
            "first fragment to the VNet",
            lan_frame(
                V4 {
                    frag: 0x2000,
                    ..lan_v4(VM, 17)
                },
                &udp_vm,
            ),
            PASS,
            NoSocket,
        ),
        (
            "later fragment to the VNet",
            lan_frame(
                V4 {
                    frag: 100,
                    ..lan_v4(VM, 17)
                },
                &[0; 64],
            ),
            PASS,
            NoSocket,
        ),
        (
            "TTL 1 to the VNet",
            lan_frame(
                V4 {
                    ttl: 1,
                    ..lan_v4(VM, 17)
                },
                &udp_vm,
            ),
            PASS,
            TtlExpired,
        ),
        (
            "no route",
            lan_frame(lan_v4(Ipv4Addr::new(198, 51, 100, 9), 17), &udp_vm),
            PASS,
            NotTunneled,
        ),
        (
            "to the device itself",
            lan_frame(lan_v4(Ipv4Addr::new(172, 16, 0, 1), 17), &udp_vm),
            PASS,
            NotTunneled,
        ),
        ("ARP", arp(), PASS, NotIpv4),
        (
            "IPv6",
            eth(&[], 0x86dd, &ipv6(ALLOWED6, 17, 64, &udp(500, &[0; 28]))),
            PASS,
            NotIpv4,
        ),
        (
            "802.1Q-tagged IPv4",
            eth(&[(Q, 100)], 0x0800, &ipv4(lan_v4(VM, 17), &udp_vm)),
            PASS,
            NotIpv4,
        ),
        (
            "IHL 4",
            lan_frame(
                V4 {
                    ihl: Some(4),
                    ..lan_v4(VM, 17)
                },
                &udp_vm,
            ),
            DROP,
            DropMalformed,
        ),
        ("IPv4 header cut", cut, DROP, DropMalformed),
        (
            "version 6 in an IPv4 ethertype",
            eth(&[], 0x0800, &ipv6(ALLOWED6, 17, 64, &[0; 8])),
            DROP,
            DropMalformed,
        ),
    ];
    for (name, frame, verdict, counter) in &table {
        run_lan(&ns, &mut x, name, frame, *verdict, &[*counter]);
    }
    let frame = lan_frame(lan_v4(VM, 17), &udp_vm);
    // Tunnel 0 down: its flows move to tunnel 1, counted as moved too.
    x.set_tunnel_live(0, false).unwrap();
    run_lan(
        &ns,
        &mut x,
        "tunnel 0 down",
        &frame,
        REDIRECT,
        &[ToTunnel, Failover],
    );
    // Both down: nothing live to move them to.
    x.set_tunnel_live(1, false).unwrap();
    run_lan(&ns, &mut x, "both down", &frame, PASS, &[NoLiveTunnel]);
    run_lan(
        &ns,
        &mut x,
        "both down, tunnel 1's",
        &to_tunnel1,
        PASS,
        &[NoLiveTunnel],
    );
    x.set_tunnel_live(0, true).unwrap();
    run_lan(&ns, &mut x, "tunnel 0 up again", &frame, PASS, &[NoSocket]);
    drop(port);
    drop(x);
    drop(tuns);
    drop(ns);
}

// ---- tagged frames on a real veth --------------------------------------------

/// Sends `frames` as they are out of `iface` (AF_PACKET), in the calling
/// thread's namespace.
fn send_raw(iface_index: i32, frames: &[Vec<u8>]) {
    use socket2::{Domain, SockAddr, SockAddrStorage, Socket, Type};
    let s = Socket::new(Domain::PACKET, Type::RAW, None).unwrap();
    let mut storage = SockAddrStorage::zeroed();
    // struct sockaddr_ll (packet(7)): family, protocol (network order),
    // ifindex, hatype, pkttype, halen, addr[8].
    let mut ll = [0u8; 20];
    ll[..2].copy_from_slice(&17u16.to_ne_bytes()); // AF_PACKET
    ll[4..8].copy_from_slice(&iface_index.to_ne_bytes());
    ll[11] = 6;
    // SAFETY: sockaddr_storage is larger than 20 octets and has no invalid bit patterns.
    unsafe { *storage.view_as::<[u8; 20]>() = ll };
    // SAFETY: the storage holds a sockaddr_ll of 20 octets.
    let to = unsafe { SockAddr::new(storage, 20) };
    for f in frames {
        assert_eq!(s.send_to(f, &to).unwrap(), f.len());
    }
}

/// Tagged frames sent over a veth reach the DMZ program with their tags, in
/// native XDP: it classifies them by the IP inside (the allowlist applies),
/// and passes tagged ESP to the stack rather than to a worker.
#[test]
fn root_xdp_dmz_tagged_frames_over_veth() {
    let p = pair();
    let mut x = xesp_tests::attach_dmz(&p.dut);
    x.allow("192.0.2.0/26".parse().unwrap()).unwrap();
    x.steer(SPI_SOCKET, 0).unwrap();
    let ifindex: i32 = p
        .peer
        .exec("cat", &["/sys/class/net/peer0/ifindex"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let tagged_udp =
        |tags: &[(u16, u16)], src| eth(tags, 0x0800, &ipv4(v4(src, 17), &udp(7777, b"tagged")));
    let mut frames = Vec::new();
    frames.extend(std::iter::repeat_n(tagged_udp(&[(Q, 100)], ALLOWED), 3));
    frames.extend(std::iter::repeat_n(tagged_udp(&[(Q, 100)], DENIED), 4));
    frames.extend(std::iter::repeat_n(
        tagged_udp(&[(AD, 10), (Q, 100)], DENIED),
        2,
    ));
    let qinq_esp = eth(
        &[(AD, 10), (Q, 100)],
        0x0800,
        &ipv4(v4(ALLOWED, 50), &esp(SPI_SOCKET)),
    );
    frames.extend(std::iter::repeat_n(qinq_esp, 2));
    frames.push(eth(&[], 0x88cc, &[0; 46]));
    p.peer.enter(|| send_raw(ifindex, &frames)).unwrap();

    let mut c = x.dmz_counters().unwrap();
    xtask::netns::wait_until(std::time::Duration::from_secs(5), || {
        c = x.dmz_counters().unwrap();
        c.total() >= frames.len() as u64
    });
    for k in DmzCounter::ALL {
        let want = match k {
            DmzCounter::Allowed => 3,
            DmzCounter::DropNotAllowed => 6,
            DmzCounter::Esp => 2,
            DmzCounter::DropUnclassified => 1,
            _ => 0,
        };
        assert_eq!(c.get(k), want, "{} in {c:?}", k.name());
    }
    let steer = x.steer_counters().unwrap();
    for k in SteerCounter::ALL {
        let want = if k == SteerCounter::Tagged { 2 } else { 0 };
        assert_eq!(steer[k as usize], want, "steering counter {}", k.name());
    }
    p.dut.enter(move || drop(x)).unwrap();
}
