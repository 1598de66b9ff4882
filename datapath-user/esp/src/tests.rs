//! Behaviour of whole SAs: every transform both ways, and every way a packet
//! can be wrong.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::{
    alg::{AesKeyBits, Encr, Integ, Suite},
    sa::{
        DropReason, Expiry, InboundSa, Lifetime, Limit, Limits, NattPorts, OutboundSa, SaParams,
        Tunnel,
    },
    wire::{Outer, parse_outer},
};

const HEADROOM: usize = 128;

pub(crate) fn suites() -> Vec<Suite> {
    vec![
        Suite::new(Encr::AesGcm16(AesKeyBits::B128), None).unwrap(),
        Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap(),
        Suite::new(Encr::AesCbc(AesKeyBits::B128), Some(Integ::HmacSha1_96)).unwrap(),
        Suite::new(Encr::AesCbc(AesKeyBits::B256), Some(Integ::HmacSha1_96)).unwrap(),
        Suite::new(
            Encr::AesCbc(AesKeyBits::B256),
            Some(Integ::HmacSha2_256_128),
        )
        .unwrap(),
        Suite::new(Encr::Des3Cbc, Some(Integ::HmacSha2_512_256)).unwrap(),
    ]
}

fn tunnel(natt: bool) -> Tunnel {
    Tunnel {
        local: Ipv4Addr::new(192, 0, 2, 1),
        remote: Ipv4Addr::new(203, 0, 113, 11),
        natt: natt.then_some(NattPorts {
            local: 4500,
            remote: 4500,
        }),
    }
}

fn params(suite: Suite, keymat: &[u8], esn: bool, natt: bool) -> SaParams<'_> {
    SaParams {
        spi: 0xc0ffee01,
        suite,
        keymat,
        esn,
        replay_window: 64,
        tunnel: tunnel(natt),
        lifetime: Lifetime::default(),
    }
}

fn pair(suite: Suite, esn: bool, natt: bool) -> (OutboundSa, InboundSa) {
    let keymat: Vec<u8> = (0..suite.keymat_len()).map(|i| (i * 7 + 3) as u8).collect();
    let now = Instant::now();
    (
        OutboundSa::new(&params(suite, &keymat, esn, natt), now).unwrap(),
        InboundSa::new(&params(suite, &keymat, esn, natt), now).unwrap(),
    )
}

/// An IPv4 UDP packet of `len` octets at HEADROOM in a buffer with room.
fn inner_v4(len: usize) -> (Vec<u8>, core::ops::Range<usize>) {
    let mut buf = vec![0u8; HEADROOM + len + 64];
    let p = &mut buf[HEADROOM..HEADROOM + len];
    p[0] = 0x45;
    p[1] = 0xb8; // DSCP EF, copied outward
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 0, 0, 10]);
    p[16..20].copy_from_slice(&[10, 2, 0, 4]);
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = i as u8;
    }
    (buf, HEADROOM..HEADROOM + len)
}

/// Encapsulates, parses the outer packet like a receiver, decapsulates.
fn round_trip(out: &mut OutboundSa, inb: &mut InboundSa, len: usize) -> Vec<u8> {
    let (mut buf, inner) = inner_v4(len);
    let original = buf[inner.clone()].to_vec();
    let outer = out.encapsulate(&mut buf, inner).unwrap();
    let Ok(Outer::Esp { spi, esp, .. }) = parse_outer(&buf[outer.clone()]) else {
        panic!("not ESP")
    };
    assert_eq!(spi, inb.spi());
    let esp = outer.start + esp.start..outer.start + esp.end;
    let d = inb.decapsulate(&mut buf, esp).unwrap();
    assert_eq!(d.next_header, 4);
    assert_eq!(&buf[d.inner], &original[..]);
    buf[outer].to_vec()
}

#[test]
fn every_transform_round_trips_at_every_size() {
    for suite in suites() {
        for esn in [false, true] {
            for natt in [false, true] {
                let (mut out, mut inb) = pair(suite, esn, natt);
                for len in [20, 21, 64, 511, 512, 1400, 1500] {
                    let outer = round_trip(&mut out, &mut inb, len);
                    assert_eq!(outer[1], 0xb8, "TOS copied");
                    assert_eq!(outer[6] & 0x40, 0x40, "DF copied");
                    assert_eq!(outer[9], if natt { 17 } else { 50 });
                    assert_eq!(
                        crate::wire::checksum(&outer[..20]),
                        0,
                        "outer header checksum"
                    );
                    if natt {
                        assert_eq!(&outer[26..28], &[0, 0], "UDP checksum zero (RFC 3948)");
                    }
                    let ct = outer.len() - out.headroom() - suite.icv_len();
                    assert_eq!(ct % suite.encr.block_len().max(4), 0, "{suite} aligned");
                }
                let c = inb.counters();
                assert_eq!((c.packets, c.drops.total()), (7, 0), "{suite}");
                assert_eq!(out.counters().bytes, c.bytes);
            }
        }
    }
}

#[test]
fn ipv6_inner_packets() {
    for suite in suites() {
        let (mut out, mut inb) = pair(suite, false, true);
        let mut buf = vec![0u8; HEADROOM + 100 + 64];
        let p = &mut buf[HEADROOM..HEADROOM + 100];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&60u16.to_be_bytes());
        p[6] = 59;
        let outer = out.encapsulate(&mut buf, HEADROOM..HEADROOM + 100).unwrap();
        let Ok(Outer::Esp { esp, .. }) = parse_outer(&buf[outer.clone()]) else {
            panic!()
        };
        let d = inb
            .decapsulate(&mut buf, outer.start + esp.start..outer.start + esp.end)
            .unwrap();
        assert_eq!((d.next_header, d.inner.len()), (41, 100));
    }
}

#[test]
fn tampering_anywhere_is_an_authentication_failure() {
    for suite in suites() {
        let (mut out, mut inb) = pair(suite, false, false);
        let (mut buf, inner) = inner_v4(100);
        let outer = out.encapsulate(&mut buf, inner).unwrap();
        let esp = outer.start + 20..outer.end;
        // Every octet after the SPI (the SPI selects the SA itself).
        for at in esp.start + 4..esp.end {
            let mut b = buf.clone();
            b[at] ^= 0x01;
            let r = inb.decapsulate(&mut b, esp.clone());
            // A changed sequence number may become 0 (never valid) but never passes.
            let seq_octet = at < esp.start + 8;
            assert!(
                matches!(r, Err(DropReason::Authentication))
                    || (seq_octet && r == Err(DropReason::Replay)),
                "{suite}: octet {at}: {r:?}"
            );
        }
        assert_eq!(inb.counters().packets, 0);
        assert_eq!(inb.counters().drops.total(), (esp.len() - 4) as u64);
        // The untouched packet still decapsulates: failures did not move the window.
        inb.decapsulate(&mut buf, esp).unwrap();
    }
}

#[test]
fn replayed_and_old_packets_are_dropped_before_decryption() {
    let (mut out, mut inb) = pair(suites()[1], false, true);
    let (mut buf, inner) = inner_v4(80);
    let outer = out.encapsulate(&mut buf, inner).unwrap();
    let esp = outer.start + 28..outer.end;
    let copy = buf.clone();
    inb.decapsulate(&mut buf, esp.clone()).unwrap();
    let mut again = copy.clone();
    assert_eq!(
        inb.decapsulate(&mut again, esp.clone()),
        Err(DropReason::Replay)
    );
    assert_eq!(again, copy, "a replayed packet is not touched");
    // Far beyond the window, then the first one again: too old.
    for _ in 0..100 {
        round_trip(&mut out, &mut inb, 60);
    }
    let mut old = copy;
    assert_eq!(inb.decapsulate(&mut old, esp), Err(DropReason::Replay));
    assert_eq!(inb.counters().drops.get(DropReason::Replay), 2);
}

#[test]
fn truncated_and_garbage_packets_are_counted_never_panic() {
    for suite in suites() {
        let (mut out, mut inb) = pair(suite, true, false);
        let (mut buf, inner) = inner_v4(64);
        let outer = out.encapsulate(&mut buf, inner).unwrap();
        let esp = outer.start + 20..outer.end;
        for end in esp.start..esp.end {
            let mut b = buf.clone();
            assert!(inb.decapsulate(&mut b, esp.start..end).is_err());
        }
        for bad in [esp.end..esp.start, 0..buf.len() + 1] {
            assert_eq!(
                inb.decapsulate(&mut buf.clone(), bad),
                Err(DropReason::Malformed)
            );
        }
        let mut garbage: Vec<u8> = (0..200u32).map(|i| (i * 31) as u8).collect();
        garbage[..4].copy_from_slice(&0xc0ffee01u32.to_be_bytes());
        for len in 0..garbage.len() {
            let _ = inb.decapsulate(&mut garbage.clone(), 0..len);
        }
        assert_eq!(inb.counters().packets, 0);
        assert!(inb.counters().drops.total() > 0);
    }
}

/// Builds a packet whose ICV verifies but whose padding or content is wrong.
fn forged(
    suite: Suite,
    keymat: &[u8],
    payload: &[u8],
    pad: &[u8],
    next_header: u8,
    seq: u32,
) -> Vec<u8> {
    use crate::crypto::{Cipher, Mac};
    let (ek, ik) = keymat.split_at(suite.encr.keymat_len());
    let cipher = Cipher::new(suite.encr, ek).unwrap();
    let iv_len = suite.encr.iv_len();
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&0xc0ffee01u32.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend(std::iter::repeat_n(9u8, iv_len));
    let ct_start = pkt.len();
    pkt.extend_from_slice(payload);
    pkt.extend_from_slice(pad);
    pkt.push(pad.len() as u8);
    pkt.push(next_header);
    let ct_end = pkt.len();
    if suite.encr.is_aead() {
        pkt.extend_from_slice(&[0; 16]);
        let aad = pkt[..8].to_vec();
        let (h, r) = pkt.split_at_mut(ct_start);
        cipher.aead_seal(&h[8..], &aad, r).unwrap();
    } else {
        let (h, r) = pkt.split_at_mut(ct_start);
        cipher
            .cbc_encrypt(&h[8..], &mut r[..ct_end - ct_start])
            .unwrap();
        let mac = Mac::new(suite.integ.unwrap(), ik).unwrap();
        let mut icv = vec![0; suite.icv_len()];
        mac.sign(&[&pkt[..ct_end]], &mut icv).unwrap();
        pkt.extend_from_slice(&icv);
    }
    pkt
}

#[test]
fn bad_padding_dummy_and_bad_inner_after_a_valid_icv() {
    for suite in [suites()[1], suites()[3]] {
        let keymat: Vec<u8> = (0..suite.keymat_len()).map(|i| (i * 7 + 3) as u8).collect();
        let mut inb =
            InboundSa::new(&params(suite, &keymat, false, false), Instant::now()).unwrap();
        let (ibuf, r) = inner_v4(44);
        let ip = ibuf[r].to_vec();
        let align = |n: usize| {
            (suite.encr.block_len().max(4) - n % suite.encr.block_len().max(4))
                % suite.encr.block_len().max(4)
        };
        let good_pad: Vec<u8> = (1..=align(ip.len() + 2) as u8).collect();
        let mut bad_pad = good_pad.clone();
        let last = bad_pad.len();
        if last > 0 {
            bad_pad[last - 1] = 0x77;
        } else {
            bad_pad = vec![1, 2, 3, 0x55];
        }
        let cases = [
            (forged(suite, &keymat, &ip, &good_pad, 4, 1), Ok(())),
            (
                forged(suite, &keymat, &ip, &bad_pad, 4, 2),
                Err(DropReason::BadPadding),
            ),
            (
                forged(suite, &keymat, &ip, &good_pad, 59, 3),
                Err(DropReason::Dummy),
            ),
            (
                forged(suite, &keymat, &ip, &good_pad, 6, 4),
                Err(DropReason::BadInner),
            ),
            (
                forged(
                    suite,
                    &keymat,
                    &ip[..ip.len() - 4],
                    &(1..=align(ip.len() - 2) as u8).collect::<Vec<_>>(),
                    4,
                    5,
                ),
                Err(DropReason::BadInner),
            ),
        ];
        for (i, (mut pkt, want)) in cases.into_iter().enumerate() {
            let len = pkt.len();
            let got = inb.decapsulate(&mut pkt, 0..len).map(|_| ());
            assert_eq!(got, want, "{suite} case {i}");
        }
        // TFC padding after the inner packet is removed, not delivered.
        let mut with_tfc = ip.clone();
        with_tfc.extend_from_slice(&[0xee; 8]);
        let mut pkt = forged(
            suite,
            &keymat,
            &with_tfc,
            &(1..=align(with_tfc.len() + 2) as u8).collect::<Vec<_>>(),
            4,
            6,
        );
        let len = pkt.len();
        let d = inb.decapsulate(&mut pkt, 0..len).unwrap();
        assert_eq!(&pkt[d.inner], &ip[..]);
    }
}

#[test]
fn no_room_and_bad_inner_on_encapsulation() {
    let (mut out, _) = pair(suites()[0], false, true);
    let (mut buf, inner) = inner_v4(100);
    let head = out.headroom();
    assert_eq!(
        out.encapsulate(&mut buf, head - 1..head - 1 + 100),
        Err(DropReason::NoRoom)
    );
    let end = buf.len();
    assert_eq!(
        out.encapsulate(&mut buf, end - 100..end),
        Err(DropReason::NoRoom)
    );
    buf[inner.start] = 0x15;
    assert_eq!(out.encapsulate(&mut buf, inner), Err(DropReason::BadInner));
    assert_eq!(out.counters().drops.total(), 3);
    assert_eq!(out.next_seq(), 1, "failed packets use no sequence number");
}

/// The room behind a packet (worked out once per SA from its suite): the
/// padding brings payload and trailer to the cipher's block and to 4 (RFC
/// 4303 §2.4), and the ICV follows; the headroom holds the outer headers
/// and the IV.
#[test]
fn headroom_and_tailroom_follow_the_suite() {
    for suite in suites() {
        for natt in [false, true] {
            let (out, _) = pair(suite, false, natt);
            let udp = if natt { 8 } else { 0 };
            assert_eq!(
                out.headroom(),
                20 + udp + 8 + suite.encr.iv_len(),
                "{suite}"
            );
            let block = suite.encr.block_len().max(4);
            for len in 20..100 {
                let pad = out.tailroom(len) - 2 - suite.icv_len();
                assert!(pad < block, "{suite} {len}");
                assert_eq!((len + pad + 2) % block, 0, "{suite} {len}");
            }
        }
    }
}

#[test]
fn lifetimes_fire_once_each() {
    let suite = suites()[0];
    let keymat = vec![1u8; suite.keymat_len()];
    let t0 = Instant::now();
    let mut p = params(suite, &keymat, false, false);
    p.lifetime = Lifetime {
        soft: Limits {
            bytes: Some(250),
            packets: None,
            seconds: Some(100),
        },
        hard: Limits {
            bytes: None,
            packets: Some(5),
            seconds: Some(200),
        },
    };
    let mut out = OutboundSa::new(&p, t0).unwrap();
    let mut inb = InboundSa::new(&p, t0).unwrap();
    assert_eq!(out.poll_expiry(t0), None);
    for _ in 0..3 {
        round_trip(&mut out, &mut inb, 100);
    }
    assert_eq!(out.poll_expiry(t0), Some(Expiry::Soft(Limit::Bytes)));
    assert_eq!(
        out.poll_expiry(t0 + Duration::from_secs(150)),
        None,
        "soft fires once"
    );
    round_trip(&mut out, &mut inb, 100);
    round_trip(&mut out, &mut inb, 100);
    assert_eq!(out.poll_expiry(t0), Some(Expiry::Hard(Limit::Packets)));
    let (mut buf, inner) = inner_v4(100);
    assert_eq!(out.encapsulate(&mut buf, inner), Err(DropReason::Expired));
    assert_eq!(inb.poll_expiry(t0), Some(Expiry::Soft(Limit::Bytes)));
    assert_eq!(inb.poll_expiry(t0), Some(Expiry::Hard(Limit::Packets)));
    // Time alone.
    let mut p2 = params(suite, &keymat, false, false);
    p2.lifetime = p.lifetime;
    let mut idle = OutboundSa::new(&p2, t0).unwrap();
    assert_eq!(idle.poll_expiry(t0 + Duration::from_secs(99)), None);
    assert_eq!(
        idle.poll_expiry(t0 + Duration::from_secs(100)),
        Some(Expiry::Soft(Limit::Seconds))
    );
    assert_eq!(
        idle.poll_expiry(t0 + Duration::from_secs(200)),
        Some(Expiry::Hard(Limit::Seconds))
    );
    assert_eq!(idle.poll_expiry(t0 + Duration::from_secs(300)), None);
}

#[test]
fn sequence_exhaustion_signals_rekey_and_never_wraps() {
    let (mut out, mut inb) = pair(suites()[0], false, false);
    let (mut buf, inner) = inner_v4(60);
    // Jump close to the end of the 32-bit space.
    out.encapsulate_with(&mut buf, inner.clone(), u64::from(u32::MAX) - 2, &[0; 8])
        .unwrap();
    assert_eq!(
        out.poll_expiry(Instant::now()),
        Some(Expiry::Soft(Limit::Sequence)),
        "rekey due"
    );
    for _ in 0..2 {
        let (mut b, r) = inner_v4(60);
        out.encapsulate(&mut b, r).unwrap();
    }
    let (mut b, r) = inner_v4(60);
    assert_eq!(
        out.encapsulate(&mut b, r),
        Err(DropReason::SequenceExhausted)
    );
    assert_eq!(
        out.poll_expiry(Instant::now()),
        Some(Expiry::Hard(Limit::Sequence))
    );
    assert_eq!(out.counters().drops.get(DropReason::SequenceExhausted), 1);
    // With ESN the same point is unremarkable.
    let (mut out, _) = pair(suites()[0], true, false);
    out.encapsulate_with(&mut buf, inner.clone(), u64::from(u32::MAX), &[1; 8])
        .unwrap();
    let (mut b, r) = inner_v4(60);
    out.encapsulate(&mut b, r).unwrap();
    assert_eq!(out.next_seq(), (1 << 32) + 1);
    let _ = &mut inb;
}

#[test]
fn reserved_spi_and_wrong_key_length_are_refused() {
    let suite = suites()[0];
    let keymat = vec![0u8; suite.keymat_len()];
    let mut p = params(suite, &keymat, false, false);
    p.spi = 255;
    assert!(OutboundSa::new(&p, Instant::now()).is_err());
    let short = vec![0u8; 10];
    let p = params(suite, &short, false, false);
    assert!(InboundSa::new(&p, Instant::now()).is_err());
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// draft-mcgrew-gcm-test-01 §4, the AES-GCM cases with 128- and 256-bit keys
/// (ring has no 192-bit GCM): (key || salt, IV, SPI, sequence number, ESN,
/// the AAD the draft lists, ciphertext || ICV).
const GCM_VECTORS: &[(&str, &str, u32, u64, bool, &str, &str)] = &[
    (
        "4c80cdefbb5d10da906ac73c3613a634 2e443b68", "4956ed7e3b244cfe", 0x4321, 0x8765_4321_0000_0000, true,
        "000043218765432100000000",
        "fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34cfa2436f14a3f3cf65925bf1f4a13c5d
         15b21e1884f5ff6247aeabb786b93bce61bc17d768fd9732 459018148f6cbe722fd04796562dfdb4",
    ),
    (
        "feffe9928665731c6d6a8f9467308308 cafebabe", "facedbaddecaf888", 0xa5f8, 0x0a, false, "0000a5f80000000a",
        "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c3de81827c10e9a4f51330d0eec416642
         cfbb85a5b47e48a4ec3b9ba95d918bd1 83b70d3aa8bc6ee4c309e9d85a41ad4a",
    ),
    (
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab 11223344", "0102030405060708",
        0x4a2c_bfe3, 2, false, "4a2cbfe300000002",
        "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763748a637985771d347f0545659f14e99d
         ef842d8e b335f4eecfdbf831824b4c4915956c96",
    ),
    (
        "00000000000000000000000000000000 00000000", "0000000000000000", 0, 1, false, "0000000000000001",
        "4688daf2f973a392732909c331d56d60f694abaa414b5e7ff5fdcdfff5e9a284456476492719ffb64de7d9dca1e1d894
         bc3bd57873ed4d181d19d4d5c8c18af3 f821d496eeb096e98ad2b69e4799c71d",
    ),
    (
        "3de09874b388e6491988d0c3607eae1f 57690e43", "4e280000a2fca1a3", 0x42f6_7e3f, 0x1010_1010_1010_1010, true,
        "42f67e3f1010101010101010",
        "fba2caa4853cf9f0f22cb10d86dd83b0fec75691cf1a04b00d1138ec9c35791765acbd8701ad79845bf9fe3fba487bc9
         1755e6662b4c8d0d1f5e22739530320a e0d731cc978ecafaeae88f00e80d6e48",
    ),
    (
        "abbccddef00112233445566778899aab decaf888", "cafedebaceface74", 0x100, 1, true, "000001000000000000000001",
        "18a6fd42f72cbf4ab2a2ea901f73d814e3e7f243d95412e1c349c1d2fbec168f9190feebaf2cb01984e65863965d7472
         b79da345e0e780191f0d2f0e0f496c226f2127b27db35724e7845d68 651f57e65f354f75ff17015769623436",
    ),
    (
        "abbccddef00112233445566778899aababbccddef00112233445566778899aab 73616c74", "616e640169766563",
        0x1740_5e67, 0x156f_3126_dd0d_b99b, true, "17405e67156f3126dd0db99b",
        "f2d69ecdbd5a0d5b8d5ef38bad4da58d1f278fde98ef67549d524a3018d9a57ff4d3a31ce673119e
         451626c2415771e3b7eebca614c89b35",
    ),
    (
        "7d773d00c144c525ac619d18c84a3f47 d9664267", "43457e9182443bc6", 0x3354_67ae, 0xffff_ffff, false,
        "335467aeffffffff", "437f866b cb3f699fe9b0822bac961c4504bef270",
    ),
    (
        "6c6567616c697a656d6172696a75616e61616e64646f69746265666f72656961 7475726e", "333021696765746d",
        0x796b_6963, u64::MAX, true, "796b6963ffffffffffffffff",
        "f97ab2aa356d8edce17644ac8c78e25dd24dedbb29ebf1b64a274b39b49c3a864cd3d78ca4ae68a32b42458fb57dbe82
         1dcc63b9 d0937ba2945f669368661a329fb4c053",
    ),
];

#[test]
fn gcm_esp_vectors_from_draft_mcgrew_gcm_test_01() {
    let mut checked = 0;
    for (i, (keymat, iv, spi, seq, esn, aad, sealed)) in GCM_VECTORS.iter().enumerate() {
        let keymat = unhex(keymat);
        let bits = if keymat.len() == 20 {
            AesKeyBits::B128
        } else {
            AesKeyBits::B256
        };
        let cipher = crate::crypto::Cipher::new(Encr::AesGcm16(bits), &keymat).unwrap();
        let (our_aad, n) = crate::sa::esp_aad(*spi, *seq, *esn);
        assert_eq!(our_aad[..n].to_vec(), unhex(aad), "case {i}: AAD");
        let iv = unhex(iv);
        let sealed = unhex(sealed);
        let mut buf = sealed.clone();
        cipher
            .aead_open(&iv, &our_aad[..n], &mut buf)
            .unwrap_or_else(|e| panic!("case {i}: {e}"));
        if i == 0 {
            let pt = unhex(
                "45000048699a000080114db7c0a80102c0a801010a9bf15638d3010000010000
                 00000000045f736970045f756470037369700963796265726369747902646b00 0021000101020201",
            );
            assert_eq!(&buf[..buf.len() - 16], &pt[..]);
        }
        // Sealing the plaintext again gives the draft's bytes.
        buf[sealed.len() - 16..].fill(0);
        cipher.aead_seal(&iv, &our_aad[..n], &mut buf).unwrap();
        assert_eq!(buf, sealed, "case {i}: re-sealed");
        checked += 1;
    }
    assert_eq!(checked, GCM_VECTORS.len());
}

/// RFC 4301 §5.2: an authentic packet whose inner addresses the SA's
/// selectors do not cover is dropped and counted; one they cover passes.
#[test]
fn decrypted_packets_outside_the_selectors_are_dropped() {
    use crate::policy::{Selector, Selectors};
    let suite = suites()[1];
    let (mut out, mut inb) = pair(suite, false, true);
    // inner_v4 carries 10.0.0.10 -> 10.2.0.4. Seen from the receiver, the
    // peer's network must hold the source, ours the destination.
    let vnet = Selector::prefix(Ipv4Addr::new(10, 2, 0, 0), 24);
    let lan = Selector::prefix(Ipv4Addr::new(10, 0, 0, 0), 24);
    // Selectors of the sender's side (ours 10.0.0.0/24, the peer's
    // 10.2.0.0/24) turned the wrong way for the receiver:
    inb.set_selectors(Selectors::new(&[lan], &[vnet]));
    let send = |out: &mut OutboundSa, inb: &mut InboundSa| {
        let (mut buf, inner) = inner_v4(100);
        let outer = out.encapsulate(&mut buf, inner).unwrap();
        let Ok(Outer::Esp { esp, .. }) = parse_outer(&buf[outer.clone()]) else {
            panic!("not ESP");
        };
        let esp = outer.start + esp.start..outer.start + esp.end;
        inb.decapsulate(&mut buf, esp).map(|d| d.inner.len())
    };
    assert_eq!(send(&mut out, &mut inb), Err(DropReason::SelectorMismatch));
    assert_eq!(inb.counters().drops.get(DropReason::SelectorMismatch), 1);
    assert_eq!(inb.counters().packets, 0);
    // The receiver's own view (ours 10.2.0.0/24, the peer's 10.0.0.0/24) passes it.
    inb.set_selectors(Selectors::new(&[vnet], &[lan]));
    assert_eq!(send(&mut out, &mut inb), Ok(100));
    assert_eq!(inb.counters().packets, 1);
    assert_eq!(inb.counters().drops.total(), 1);
    // 0.0.0.0/0 both ways covers it.
    inb.set_selectors(Selectors::any_v4());
    assert_eq!(send(&mut out, &mut inb), Ok(100));
}
