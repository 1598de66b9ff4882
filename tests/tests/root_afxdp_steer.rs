//! Needs root: ESP of a known inbound SPI is steered by the DMZ XDP program
//! into its tunnel's AF_XDP socket, and a frame received there can be
//! rewritten in place and transmitted back out of the same interface.
//! Unknown SPIs and tunnels without a socket go to the stack, counted.
//! One flush of a port sends everything queued, though copy mode sends at
//! most 32 frames per kick.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::{Duration, Instant};

use datapath_user::{
    xdp::XdpPrograms,
    xsk::{Port, PortConfig, SockId, Verdict},
};
use xesp_common::SteerCounter;
use xesp_tests::{
    ALLOWED_PREFIX, ALLOWED_SRC, DUT, attach_dmz, fake_esp, pair, send_esp, send_udp, udp_from,
};

const TUNNEL: u32 = 1;
const SPI: u32 = 0x1000;

/// Turns an Ethernet/IPv4/UDP frame around: MACs, addresses and ports
/// swapped, UDP checksum cleared (optional for IPv4, and what RFC 3948 uses).
fn reflect_udp(f: &mut [u8]) {
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    let ip = 14;
    let ihl = usize::from(f[ip] & 0xf) * 4;
    let (a, b) = f[ip + 12..ip + 20].split_at_mut(4);
    a.swap_with_slice(b);
    let udp = ip + ihl;
    let (sp, dp) = f[udp..udp + 4].split_at_mut(2);
    sp.swap_with_slice(dp);
    f[udp + 6] = 0;
    f[udp + 7] = 0;
}

/// A port of 512 frames with 128-entry rings (so 128 frames in the fill
/// ring) and one socket on the DUT's `dmz0` queue 0.
fn small_port(dut: &xtask::netns::Netns) -> (Port, SockId) {
    let cfg = PortConfig {
        frames: 512,
        frame_size: 4096,
        ring_size: 128,
    };
    let mut port = dut.enter(|| Port::new(cfg)).unwrap().unwrap();
    let sock = dut
        .enter(|| port.add_socket("dmz0", 0, true, true))
        .unwrap()
        .unwrap();
    (port, sock)
}

/// The DMZ filter with `ALLOWED_PREFIX` allowed and `SPI` steered to
/// `TUNNEL`, whose socket is a [`small_port`]'s.
fn steered_port(dut: &xtask::netns::Netns) -> (XdpPrograms, Port, SockId) {
    let mut filter = attach_dmz(dut);
    filter.allow(ALLOWED_PREFIX.parse().unwrap()).unwrap();
    filter.steer(SPI, TUNNEL).unwrap();
    let (port, sock) = small_port(dut);
    filter
        .bind_dmz_xsk(0, TUNNEL, port.fd(sock).unwrap())
        .unwrap();
    (filter, port, sock)
}

#[test]
fn root_afxdp_esp_is_steered_to_its_tunnel_socket_and_sent_back() {
    let p = pair();
    let (mut filter, mut port, sock) = steered_port(&p.dut);
    // Known SPI, but its tunnel has no socket: counted, passed to the stack.
    filter.steer(0x3000, 2).unwrap();

    let peer_udp = p.peer.enter(|| udp_from(ALLOWED_SRC)).unwrap();
    peer_udp
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let payloads: Vec<Vec<u8>> = (1..=5).map(|seq| fake_esp(SPI, seq)).collect();
    p.peer
        .enter(|| {
            for pl in &payloads {
                send_udp(&peer_udp, 4500, pl, 1);
            }
            send_esp(ALLOWED_SRC, SPI, 3);
            send_udp(&peer_udp, 4500, &fake_esp(0x2000, 1), 2);
            send_udp(&peer_udp, 4500, &fake_esp(0x3000, 1), 2);
        })
        .unwrap();

    // The worker side: reflect ESP-in-UDP, drop plain ESP, check every SPI.
    let (mut udp_seen, mut esp_seen, mut wrong) = (0, 0, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(5);
    while udp_seen + esp_seen < 8 && Instant::now() < deadline {
        port.poll(100).unwrap();
        port.recv(sock, 64, |f| {
            let pkt = f.packet();
            let ihl = usize::from(pkt[14] & 0xf) * 4;
            let (proto, l4) = (pkt[23], 14 + ihl);
            let spi_at = if proto == 17 { l4 + 8 } else { l4 };
            let spi = u32::from_be_bytes(pkt[spi_at..spi_at + 4].try_into().unwrap());
            if spi != SPI {
                wrong.push(spi);
                return Verdict::Drop;
            }
            if proto == 17 {
                udp_seen += 1;
                let (offset, len) = (f.offset, f.len);
                reflect_udp(&mut f.buf[offset..offset + len]);
                Verdict::Transmit {
                    on: sock,
                    offset: offset as u32,
                    len: len as u32,
                }
            } else {
                esp_seen += 1;
                Verdict::Drop
            }
        });
        port.flush();
    }
    assert!(
        wrong.is_empty(),
        "frames of other SPIs reached the tunnel socket: {wrong:x?}"
    );
    assert_eq!(
        (udp_seen, esp_seen),
        (5, 3),
        "ESP-in-UDP and ESP frames received over AF_XDP"
    );

    // Every reflected datagram arrives back at the peer, unchanged.
    let mut back = Vec::new();
    let mut buf = [0u8; 256];
    while back.len() < 5 {
        let Ok((n, from)) = peer_udp.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(from.ip(), DUT);
        back.push(buf[..n].to_vec());
    }
    back.sort();
    assert_eq!(back, payloads, "datagrams transmitted back through AF_XDP");
    let stats = port.stats();
    assert_eq!((stats.rx, stats.tx), (8, 5), "{stats:?}");

    let c = filter.steer_counters().unwrap();
    assert_eq!(c[SteerCounter::Redirected as usize], 8);
    assert_eq!(c[SteerCounter::NoSa as usize], 2);
    assert_eq!(c[SteerCounter::NoSocket as usize], 2);

    // Unsteered, the SPI's ESP goes to the stack again.
    filter.unsteer(SPI).unwrap();
    p.peer
        .enter(|| send_udp(&peer_udp, 4500, &fake_esp(SPI, 9), 1))
        .unwrap();
    xtask::netns::wait_until(Duration::from_secs(3), || {
        filter.steer_counters().unwrap()[SteerCounter::NoSa as usize] == 3
    });
    assert_eq!(
        filter.steer_counters().unwrap()[SteerCounter::NoSa as usize],
        3
    );
    p.dut.enter(move || drop((port, filter))).unwrap();
}

/// The MAC address of `dev` as seen in `ns`.
fn mac_of(ns: &xtask::netns::Netns, dev: &str) -> [u8; 6] {
    let text = ns
        .exec("cat", &[&format!("/sys/class/net/{dev}/address")])
        .unwrap();
    let mut mac = [0u8; 6];
    for (m, h) in mac.iter_mut().zip(text.trim().split(':')) {
        *m = u8::from_str_radix(h, 16).unwrap();
    }
    mac
}

/// Ethernet + IPv4 + UDP from the DUT to the peer's `port`, numbered `n`.
fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], port: u16, n: u32) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = 20 + 8 + 4;
    let mut ip = vec![0x45, 0, 0, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&DUT.octets());
    ip.extend_from_slice(&ALLOWED_SRC.octets());
    let sum = xesp_esp::wire::checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&12u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4)
    f.extend_from_slice(&n.to_be_bytes());
    f
}

#[test]
fn root_afxdp_one_flush_sends_more_than_one_copy_mode_batch() {
    let p = pair();
    let (mut port, sock) = small_port(&p.dut);
    let sink = p.peer.enter(|| udp_from(ALLOWED_SRC)).unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let dport = sink.local_addr().unwrap().port();
    let (src, dst) = (mac_of(&p.dut, "dmz0"), mac_of(&p.peer, "peer0"));

    // Copy mode sends at most 32 frames per kick; queue three times that.
    const N: u32 = 100;
    assert_eq!(port.tx_room(sock), 128);
    for n in 0..N {
        let frame = udp_frame(src, dst, dport, n);
        assert!(port.transmit_new(sock, |buf| {
            buf[256..256 + frame.len()].copy_from_slice(&frame);
            Some((256, frame.len() as u32))
        }));
    }
    assert_eq!(port.tx_room(sock), 128 - N, "batched frames take room");
    let pending = port.flush();
    assert!(!pending, "one flush kicks until the TX ring is empty");
    assert_eq!(port.tx_room(sock), 128);
    assert_eq!(port.stats().tx, u64::from(N));

    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < N as usize {
        let Ok(n) = sink.recv(&mut buf) else { break };
        got.push(u32::from_be_bytes(buf[..n].try_into().unwrap()));
    }
    got.sort();
    assert_eq!(got, (0..N).collect::<Vec<_>>(), "every frame arrived once");
}

#[test]
fn root_afxdp_a_frame_built_past_its_end_is_refused() {
    let p = pair();
    let (mut port, sock) = small_port(&p.dut);
    let room = port.tx_room(sock);
    // An offset and length whose sum overflows, and one just past the frame.
    assert!(!port.transmit_new(sock, |_| Some((u32::MAX - 5, 10))));
    assert!(!port.transmit_new(sock, |buf| Some((0, buf.len() as u32 + 1))));
    assert_eq!(port.tx_room(sock), room, "nothing queued");
    // The frames went back: one that fits is still taken.
    assert!(port.transmit_new(sock, |buf| Some((0, buf.len() as u32))));
    assert_eq!(port.tx_room(sock), room - 1);
}

#[test]
fn root_afxdp_kernel_drops_at_a_full_socket_are_counted() {
    let p = pair();
    let (filter, mut port, sock) = steered_port(&p.dut);
    assert_eq!(port.kernel_drops(), Default::default());

    // Nobody receives while 200 arrive: 72 cannot be placed.
    let peer_udp = p.peer.enter(|| udp_from(ALLOWED_SRC)).unwrap();
    p.peer
        .enter(|| send_udp(&peer_udp, 4500, &fake_esp(SPI, 1), 200))
        .unwrap();
    xtask::netns::wait_until(Duration::from_secs(3), || {
        filter.steer_counters().unwrap()[SteerCounter::Redirected as usize] == 200
    });
    let mut got = 0;
    while port.recv(sock, 64, |_| Verdict::Drop) > 0 {
        got += 1;
    }
    let d = port.kernel_drops();
    assert_eq!(port.stats().rx, 128, "{d:?}");
    assert!(got > 0);
    assert_eq!(d.rx_ring_full + d.rx_dropped, 72, "{d:?}");
    assert_eq!(d.tx_invalid, 0);
}

/// Receiving in uneven batches, with the fill ring refilled after each, no
/// frame goes missing: the ring writer reserves from a cached view of the
/// ring, so a refill often gets fewer slots than it asks for, and must
/// neither lose the frames it could not place nor stop short of a full ring.
#[test]
fn root_afxdp_frames_are_conserved_across_partial_refills() {
    let p = pair();
    let (filter, mut port, sock) = steered_port(&p.dut);
    // 512 frames, 128 lent to the kernel, none in flight.
    assert_eq!(port.free_frames(), 512 - 128);
    assert_eq!(port.frames_accounted(), 512);

    let peer_udp = p.peer.enter(|| udp_from(ALLOWED_SRC)).unwrap();
    let mut sent = 0;
    let send = |n: usize, sent: &mut u64| {
        p.peer
            .enter(|| send_udp(&peer_udp, 4500, &fake_esp(SPI, 1), n))
            .unwrap();
        *sent += n as u64;
        let want = *sent;
        assert!(
            xtask::netns::wait_until(Duration::from_secs(3), || {
                filter.steer_counters().unwrap()[SteerCounter::Redirected as usize] == want
            }),
            "{want} redirected"
        );
    };
    for _ in 0..20 {
        // 60 arrive; 30 are read (and their frames handed back), 60 more
        // arrive, then the 90 waiting are read: the second refill asks for
        // more than the ring writer's cached view has room for.
        send(60, &mut sent);
        assert_eq!(port.recv(sock, 30, |_| Verdict::Drop), 30);
        send(60, &mut sent);
        let mut got = 0;
        while got < 90 {
            let n = port.recv(sock, 64, |_| Verdict::Drop);
            assert!(n > 0, "{got} of 90 read");
            got += n;
        }
        assert_eq!(got, 90);
        assert_eq!(port.free_frames(), 512 - 128, "the ring is full again");
        assert_eq!(port.frames_accounted(), 512);
    }
    assert_eq!(port.stats().rx, sent);
    assert_eq!(port.kernel_drops(), Default::default(), "nothing dropped");
    p.dut.enter(move || drop((port, filter))).unwrap();
}
