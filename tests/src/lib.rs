//! Helpers shared by the integration tests under `tests/`: a device under
//! test wired to a peer over veth, and senders for the packets it classifies.
#![allow(clippy::unwrap_used)] // test scaffolding: a failed step is a failed test

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};

use datapath_user::xdp::{XdpAttach, XdpPrograms};
use socket2::{Domain, Protocol, Socket, Type};
use xtask::netns::{Netns, veth};

/// The device under test's DMZ address.
pub const DUT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A peer address inside the prefix the tests allow, 192.0.2.0/26.
pub const ALLOWED_SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// A peer address on the same link, outside the allowed prefix.
pub const DENIED_SRC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
/// The prefix the tests allow.
pub const ALLOWED_PREFIX: &str = "192.0.2.0/26";

/// `dut` (interface `dmz0`, [`DUT`]) and `peer` (`peer0`, [`ALLOWED_SRC`] and
/// [`DENIED_SRC`]) joined by veth, IPv6 off so that counts are exact.
pub struct Pair {
    pub dut: Netns,
    pub peer: Netns,
}

pub fn pair() -> Pair {
    let dut = Netns::create("dut").unwrap();
    let peer = Netns::create("peer").unwrap();
    for ns in [&dut, &peer] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6=1").unwrap();
        ns.sysctl("net.ipv6.conf.default.disable_ipv6=1").unwrap();
    }
    veth(&dut, "dmz0", &peer, "peer0").unwrap();
    dut.ip(&["addr", "add", "192.0.2.1/24", "dev", "dmz0"])
        .unwrap();
    peer.ip(&["addr", "add", "192.0.2.2/24", "dev", "peer0"])
        .unwrap();
    peer.ip(&["addr", "add", "192.0.2.66/24", "dev", "peer0"])
        .unwrap();
    Pair { dut, peer }
}

/// A UDP socket bound to `src` (any port), in the calling thread's namespace.
pub fn udp_from(src: Ipv4Addr) -> UdpSocket {
    UdpSocket::bind(SocketAddrV4::new(src, 0)).unwrap()
}

/// Sends `payload` `n` times to [`DUT`]:`dport`.
pub fn send_udp(sock: &UdpSocket, dport: u16, payload: &[u8], n: usize) {
    for _ in 0..n {
        sock.send_to(payload, SocketAddrV4::new(DUT, dport))
            .unwrap();
    }
}

/// An ESP header (SPI, sequence number) followed by 32 octets of fake ciphertext.
pub fn fake_esp(spi: u32, seq: u32) -> Vec<u8> {
    let mut pkt = Vec::with_capacity(40);
    pkt.extend_from_slice(&spi.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(&[0xab; 32]);
    pkt
}

/// Sends `n` ESP packets (IP protocol 50) from `src` to [`DUT`].
pub fn send_esp(src: Ipv4Addr, spi: u32, n: usize) {
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(50))).unwrap();
    s.bind(&SocketAddr::from(SocketAddrV4::new(src, 0)).into())
        .unwrap();
    for seq in 1..=n as u32 {
        s.send_to(
            &fake_esp(spi, seq),
            &SocketAddr::from(SocketAddrV4::new(DUT, 0)).into(),
        )
        .unwrap();
    }
}

/// Loads the XDP programs and attaches the DMZ classifier to `dmz0` of `ns`
/// in native (driver) mode.
pub fn attach_dmz(ns: &Netns) -> XdpPrograms {
    ns.enter(|| {
        let mut x = XdpPrograms::load()?;
        x.attach_dmz("dmz0", XdpAttach::Driver).map(|_| x)
    })
    .unwrap()
    .unwrap()
}

/// The UDP port of the inner packets [`inner_udp`] builds.
pub const INNER_PORT: u16 = 9999;

/// An IPv4 UDP packet `src` -> `dst`:[`INNER_PORT`] carrying `tag`, at
/// offset 64 of a buffer with room for ESP around it; returns the buffer
/// and the packet's range.
pub fn inner_udp(src: [u8; 4], dst: [u8; 4], tag: u8) -> (Vec<u8>, std::ops::Range<usize>) {
    let len = 20 + 8 + 4;
    let mut buf = vec![0u8; 64 + len + 64];
    let p = &mut buf[64..64 + len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = xesp_esp::wire::IPPROTO_UDP;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let c = xesp_esp::wire::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&INNER_PORT.to_be_bytes());
    p[24..26].copy_from_slice(&12u16.to_be_bytes());
    p[28..32].copy_from_slice(&[b'x', b'e', b's', tag]);
    (buf, 64..64 + len)
}

/// The test data directory (`tests/data`).
pub fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// The packets of a classic pcap file (microsecond or nanosecond, either
/// byte order), as captured (link-layer header included).
pub fn read_pcap(path: &std::path::Path) -> Vec<Vec<u8>> {
    let d = std::fs::read(path).unwrap();
    let magic = u32::from_le_bytes(d[..4].try_into().unwrap());
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => panic!("{}: not a pcap file (magic {m:#x})", path.display()),
    };
    let u32_at = |o: usize| {
        let b: [u8; 4] = d[o..o + 4].try_into().unwrap();
        if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= d.len() {
        let caplen = u32_at(off + 8) as usize;
        off += 16;
        out.push(d[off..off + caplen].to_vec());
        off += caplen;
    }
    out
}

/// Hex string (whitespace allowed) to bytes.
pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs `f` while the LAN pings the VM 100 times at 20 per second (half a
/// second of them before `f`); `f`'s result, how many pings were lost, and
/// ping's output.
pub fn pings_during<R: Send>(
    lab: &xtask::lab::Lab,
    f: impl FnOnce() -> R + Send,
) -> (R, u32, String) {
    std::thread::scope(|s| {
        let pings = s.spawn(|| {
            lab.ns.lan.exec(
                "ping",
                &[
                    "-c",
                    "100",
                    "-i",
                    "0.05",
                    "-W",
                    "2",
                    "-I",
                    &xtask::lab::topology::LAN_HOSTS[0].to_string(),
                    &xtask::lab::topology::VM.to_string(),
                ],
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        let r = f();
        // ping fails when a reply is missing: its summary says how many.
        let out = match pings.join().unwrap() {
            Ok(o) => o,
            Err(e) => format!("{e:#}"),
        };
        let received = out
            .lines()
            .find_map(|l| l.split(" packets transmitted, ").nth(1))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no ping summary in {out}"));
        (r, 100 - received, out)
    })
}
