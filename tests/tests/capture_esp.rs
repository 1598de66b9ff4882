//! The strongSwan 5.9.8 capture: every ESP packet decrypts, with the keys
//! strongSwan logged, to exactly the ICMP Wireshark shows, and encrypting
//! that ICMP again with the same sequence number and IV gives back the
//! captured ESP bytes.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{collections::HashMap, net::Ipv4Addr, time::Instant};

use xesp_esp::{
    alg::{AesKeyBits, Encr, Suite},
    sa::{InboundSa, Lifetime, NattPorts, OutboundSa, SaParams, Tunnel},
    wire::{Outer, checksum, parse_outer},
};
use xesp_tests::{data_dir, read_pcap, unhex};

/// One ICMP line of capture-decrypted.txt.
#[derive(Debug, PartialEq)]
struct Icmp {
    frame: usize,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    request: bool,
    id: u16,
    seq: u16,
    ttl: u8,
}

fn expected_icmp() -> Vec<Icmp> {
    let text =
        std::fs::read_to_string(data_dir().join("strongswan-5.9.8-libipsec/capture-decrypted.txt"))
            .unwrap();
    text.lines()
        .filter(|l| l.contains(" ICMP "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let field = |name: &str| {
                w.iter()
                    .find_map(|t| t.strip_prefix(name))
                    .unwrap()
                    .trim_end_matches(',')
                    .to_string()
            };
            Icmp {
                frame: w[0].parse().unwrap(),
                src: w[2].parse().unwrap(),
                dst: w[4].parse().unwrap(),
                request: l.contains("Echo (ping) request"),
                id: u16::from_str_radix(field("id=0x").as_str(), 16).unwrap(),
                seq: field("seq=").split('/').next().unwrap().parse().unwrap(),
                ttl: field("ttl=").parse().unwrap(),
            }
        })
        .collect()
}

struct EspKey {
    keymat: Vec<u8>,
}

fn esp_keys() -> HashMap<u32, EspKey> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("strongswan-5.9.8-libipsec/keys.json")).unwrap(),
    )
    .unwrap();
    json["esp_sas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sa| {
            assert_eq!(sa["alg"], "AES_GCM_16_256/NO_EXT_SEQ");
            let spi = u32::from_str_radix(sa["spi"].as_str().unwrap(), 16).unwrap();
            (
                spi,
                EspKey {
                    keymat: unhex(sa["encr_key"].as_str().unwrap()),
                },
            )
        })
        .collect()
}

const GCM256: Suite = Suite {
    encr: Encr::AesGcm16(AesKeyBits::B256),
    integ: None,
};

fn params(
    spi: u32,
    keymat: &[u8],
    local: Ipv4Addr,
    remote: Ipv4Addr,
    ports: (u16, u16),
) -> SaParams<'_> {
    SaParams {
        spi,
        suite: GCM256,
        keymat,
        esn: false,
        replay_window: 32,
        tunnel: Tunnel {
            local,
            remote,
            natt: Some(NattPorts {
                local: ports.0,
                remote: ports.1,
            }),
        },
        lifetime: Lifetime::default(),
    }
}

#[test]
fn strongswan_capture_esp_decrypts_to_the_icmp_shown_and_reencrypts_identically() {
    let frames = read_pcap(&data_dir().join("strongswan-5.9.8-libipsec/capture.pcap"));
    let keys = esp_keys();
    let expected = expected_icmp();
    assert_eq!(expected.len(), 9, "ICMP lines in capture-decrypted.txt");
    let mut inbound: HashMap<u32, InboundSa> = HashMap::new();
    let mut seen = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let number = i + 1;
        let ip = &frame[14..];
        let Ok(Outer::Esp {
            spi,
            esp,
            src,
            dst,
            udp,
        }) = parse_outer(ip)
        else {
            continue;
        };
        let key = keys
            .get(&spi)
            .unwrap_or_else(|| panic!("frame {number}: no key for SPI {spi:08x}"));
        let ports = udp.expect("libipsec always uses UDP encapsulation");
        let sa = inbound.entry(spi).or_insert_with(|| {
            InboundSa::new(&params(spi, &key.keymat, dst, src, ports), Instant::now()).unwrap()
        });
        let mut buf = ip.to_vec();
        let seq_low = u32::from_be_bytes(buf[esp.start + 4..esp.start + 8].try_into().unwrap());
        let iv = buf[esp.start + 8..esp.start + 16].to_vec();
        let original_esp = buf[esp.clone()].to_vec();
        let d = sa
            .decapsulate(&mut buf, esp)
            .unwrap_or_else(|e| panic!("frame {number}: {e:?}"));
        assert_eq!(d.seq, u64::from(seq_low));
        let inner = buf[d.inner.clone()].to_vec();

        // The inner packet is exactly the ICMP Wireshark shows for this frame.
        assert_eq!(
            checksum(&inner[..20]),
            0,
            "frame {number}: inner IPv4 checksum"
        );
        assert_eq!(inner[9], 1, "frame {number}: ICMP");
        assert_eq!(checksum(&inner[20..]), 0, "frame {number}: ICMP checksum");
        seen.push(Icmp {
            frame: number,
            src: Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
            dst: Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
            request: inner[20] == 8,
            id: u16::from_be_bytes([inner[24], inner[25]]),
            seq: u16::from_be_bytes([inner[26], inner[27]]),
            ttl: inner[8],
        });
        assert!(inner[20] == 8 || inner[20] == 0, "echo request or reply");

        // Encrypting it again, as the sender did, gives the same ESP bytes.
        let mut out =
            OutboundSa::new(&params(spi, &key.keymat, src, dst, ports), Instant::now()).unwrap();
        let mut again = vec![0u8; 64 + inner.len() + 64];
        again[64..64 + inner.len()].copy_from_slice(&inner);
        let outer = out
            .encapsulate_with(&mut again, 64..64 + inner.len(), u64::from(seq_low), &iv)
            .unwrap();
        assert_eq!(
            &again[outer.start + 28..outer.end],
            &original_esp[..],
            "frame {number}: re-encrypted ESP"
        );
        assert_eq!(outer.len(), ip.len(), "frame {number}: outer length");
    }
    assert_eq!(seen, expected);
    // Each SA counted exactly its packets, and nothing was dropped.
    let total: u64 = inbound.values().map(|sa| sa.counters().packets).sum();
    assert_eq!(total, 9);
    assert!(inbound.values().all(|sa| sa.counters().drops.total() == 0));
}
