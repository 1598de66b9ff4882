//! Needs root: the benchmark's XDP sink (`xdp_sink`, what `cargo xtask bench`
//! counts with), loaded from the real eBPF object on a veth in a fresh
//! namespace, counts each kind of packet exactly: ESP in UDP 4500 per tunnel
//! by SPI (unknown SPIs apart), the plaintext benchmark packets with and
//! without their magic; it drops what it counts except one ESP sample in
//! `SAMPLE_EVERY`, which reaches the stack, and lets everything else pass.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{net::UdpSocket, time::Duration};

use datapath_user::xdp::{XdpAttach, XdpPrograms};
use xesp_common::{SinkCounter, bench};
use xesp_tests::{ALLOWED_SRC, Pair, fake_esp, pair, send_udp, udp_from};
use xtask::netns::wait_until;

#[test]
fn root_xdp_sink_counts_by_spi_and_magic_and_passes_only_samples() {
    let Pair { dut, peer } = pair();
    let (sink, natt, other) = dut
        .enter(|| {
            let mut x = XdpPrograms::load().unwrap();
            x.attach_sink("dmz0", XdpAttach::Driver).unwrap();
            x.sink_expect_spi(0x1000, 0).unwrap();
            x.sink_expect_spi(0x2000, 1).unwrap();
            let natt = UdpSocket::bind("192.0.2.1:4500").unwrap();
            let other = UdpSocket::bind("192.0.2.1:7777").unwrap();
            for s in [&natt, &other] {
                s.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
            }
            (x, natt, other)
        })
        .unwrap();
    let mut magic = bench::MAGIC.to_vec();
    magic.extend_from_slice(&[0; 20]);
    peer.enter(|| {
        let s = udp_from(ALLOWED_SRC);
        // Tunnel 0: sequence numbers 1..=3 and one sample (SAMPLE_EVERY).
        for seq in [1, 2, 3, bench::SAMPLE_EVERY] {
            send_udp(&s, 4500, &fake_esp(0x1000, seq), 1);
        }
        send_udp(&s, 4500, &fake_esp(0x2000, 5), 2);
        send_udp(&s, 4500, &fake_esp(0x3000, 1), 3); // unknown SPI
        send_udp(&s, 4500, &[0, 0, 0, 0, 1, 2, 3, 4], 1); // IKE behind the non-ESP marker
        send_udp(&s, bench::PORT, &magic, 6);
        send_udp(&s, bench::PORT, b"not the magic at all", 2);
        send_udp(&s, 7777, b"anything else", 1);
    })
    .unwrap();
    let mut c = [0u64; SinkCounter::COUNT as usize];
    wait_until(Duration::from_secs(5), || {
        c = sink.sink_counters().unwrap();
        c.iter().sum::<u64>()
            - c[SinkCounter::EspBytes as usize]
            - c[SinkCounter::PlainBytes as usize]
            - c[SinkCounter::EspSampled as usize]
            > 18 // 4 + 2 ESP, 3 unknown, 1 IKE, 6 + 2 plaintext, 1 other
    });
    let at = |k: SinkCounter| c[k as usize];
    assert_eq!(at(SinkCounter::EspTunnel0), 4, "{c:?}");
    assert_eq!(at(SinkCounter::EspTunnel1), 2, "{c:?}");
    // IPv4 20 + UDP 8 + 40 octets of fake ESP.
    assert_eq!(at(SinkCounter::EspBytes), 6 * 68);
    assert_eq!(at(SinkCounter::EspUnknownSpi), 3);
    assert_eq!(at(SinkCounter::EspSampled), 1);
    assert_eq!(at(SinkCounter::PlainValid), 6);
    assert_eq!(at(SinkCounter::PlainBytes), 6 * (28 + 28));
    assert_eq!(at(SinkCounter::PlainInvalid), 2);
    // The IKE message and the other UDP; ARP and the like may add to it.
    assert!(at(SinkCounter::Other) >= 2, "{c:?}");

    // What reached the stack: the sample and the IKE message on 4500, the
    // other datagram on 7777; nothing of the counted-and-dropped rest.
    let got = dut
        .enter(|| {
            let mut buf = [0u8; 128];
            let mut on4500 = Vec::new();
            while let Ok(n) = natt.recv(&mut buf) {
                on4500.push(buf[..n].to_vec());
            }
            (on4500, other.recv(&mut buf).ok())
        })
        .unwrap();
    assert_eq!(
        got.0,
        vec![
            fake_esp(0x1000, bench::SAMPLE_EVERY),
            vec![0, 0, 0, 0, 1, 2, 3, 4]
        ]
    );
    assert_eq!(got.1, Some(13));
}
