//! ESP encapsulation and decapsulation per packet, for each transform and
//! inner size, measured in the same run as the raw ring AES-GCM seal/open of
//! the same payload; the summary prints ESP cost / raw AEAD cost.
//!
//! Goal: at 1400 octets, ESP with AES-GCM costs at most 1.3x the raw AEAD.
//!
//! The `policy` group measures what traffic selectors (RFC 4301 §5.1, §5.2)
//! add per packet: decapsulation without selectors, with 0.0.0.0/0 and with
//! narrowed ones, and the SA database's choice of an outbound SA (the
//! routed one covering the packet, or the tunnel's second SA).

#![allow(clippy::unwrap_used)] // a benchmark: a failed step is a failed run

use std::{hint::black_box, net::Ipv4Addr, path::PathBuf, time::Instant};

use criterion::{BatchSize, Criterion, Throughput};
use datapath_user::sadb::SaDb;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use xesp_esp::{
    alg::{AesKeyBits, Encr, Integ, Suite},
    policy::{Selector, Selectors},
    sa::{InboundSa, Lifetime, NattPorts, OutboundSa, SaParams, Tunnel},
};

const SIZES: [usize; 3] = [64, 512, 1400];
const HEAD: usize = 128;

fn suites() -> Vec<(&'static str, Suite)> {
    vec![
        (
            "gcm128",
            Suite::new(Encr::AesGcm16(AesKeyBits::B128), None).unwrap(),
        ),
        (
            "gcm256",
            Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap(),
        ),
        (
            "cbc128-sha1",
            Suite::new(Encr::AesCbc(AesKeyBits::B128), Some(Integ::HmacSha1_96)).unwrap(),
        ),
        (
            "cbc256-sha1",
            Suite::new(Encr::AesCbc(AesKeyBits::B256), Some(Integ::HmacSha1_96)).unwrap(),
        ),
        (
            "cbc256-sha256",
            Suite::new(
                Encr::AesCbc(AesKeyBits::B256),
                Some(Integ::HmacSha2_256_128),
            )
            .unwrap(),
        ),
    ]
}

fn params(suite: Suite, keymat: &[u8]) -> SaParams<'_> {
    SaParams {
        spi: 0x1000,
        suite,
        keymat,
        esn: false,
        replay_window: 1024,
        tunnel: Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(203, 0, 113, 11),
            natt: Some(NattPorts {
                local: 4500,
                remote: 4500,
            }),
        },
        lifetime: Lifetime::default(),
    }
}

/// A buffer with an IPv4 UDP packet of `len` octets at HEAD, 10.0.0.10 ->
/// 10.2.0.4.
fn packet(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; HEAD + len + 64];
    b[HEAD] = 0x45;
    b[HEAD + 2..HEAD + 4].copy_from_slice(&(len as u16).to_be_bytes());
    b[HEAD + 9] = 17;
    b[HEAD + 12..HEAD + 16].copy_from_slice(&[10, 0, 0, 10]);
    b[HEAD + 16..HEAD + 20].copy_from_slice(&[10, 2, 0, 4]);
    b
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    let size = 1400;
    let (_, suite) = suites()[1];
    let keymat = vec![3u8; suite.keymat_len()];
    let now = Instant::now();
    let template = packet(size);
    let net = |a: [u8; 4], l| Selector::prefix(Ipv4Addr::from(a), l);
    // The receiver's view: ours 10.2.0.0/24, the peer's 10.0.0.0/24.
    let narrowed = Selectors::new(
        &[net([10, 2, 0, 0], 24)],
        &[net([10, 1, 10, 0], 25), net([10, 0, 0, 0], 24)],
    );
    for (name, sel) in [
        ("none", None),
        ("any", Some(Selectors::any_v4())),
        ("narrowed", Some(narrowed)),
    ] {
        let sender = OutboundSa::new(&params(suite, &keymat), now).unwrap();
        let mut inb = InboundSa::new(&params(suite, &keymat), now).unwrap();
        if let Some(s) = sel {
            inb.set_selectors(s);
        }
        g.bench_function(format!("gcm256/decap_selectors_{name}/{size}"), |b| {
            b.iter_batched_ref(
                || {
                    let mut buf = template.clone();
                    let outer = sender.encapsulate(&mut buf, HEAD..HEAD + size).unwrap();
                    (buf, outer.start + 28..outer.end)
                },
                |(buf, esp)| black_box(inb.decapsulate(buf, esp.clone()).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    // A tunnel with the lab's two CHILD_SAs: the BGP session's (routed) and
    // the networks'; and a tunnel with one 0.0.0.0/0 SA.
    let db = SaDb::new();
    let sa = |spi| {
        let mut p = params(suite, &keymat);
        p.spi = spi;
        OutboundSa::new(&p, now).unwrap()
    };
    db.install_outbound(0, sa(0x100), Selectors::any_v4());
    assert!(db.route(0, Some(0x100)));
    let nets = Selectors::new(&[net([10, 0, 0, 0], 24)], &[net([10, 2, 0, 0], 24)]);
    db.install_outbound(1, sa(0x200), nets);
    let bgp = Selectors::new(&[net([172, 16, 0, 3], 32)], &[net([10, 2, 0, 228], 32)]);
    db.install_outbound(1, sa(0x201), bgp);
    assert!(db.route(1, Some(0x201)));
    let pkt = &template[HEAD..HEAD + size];
    g.bench_function("sadb/outbound_for/routed_any", |b| {
        b.iter(|| black_box(db.outbound_for(0, black_box(pkt)).is_ok()))
    });
    g.bench_function("sadb/outbound_for/second_sa", |b| {
        b.iter(|| black_box(db.outbound_for(1, black_box(pkt)).is_ok()))
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("esp");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        // The raw AEAD on the same octets ESP encrypts: inner packet + trailer
        // (+ padding to 4), with the 8-octet SPI||seq AAD.
        let payload = size + 2 + (4 - (size + 2) % 4) % 4;
        for (name, alg, klen) in [("gcm128", &AES_128_GCM, 16), ("gcm256", &AES_256_GCM, 32)] {
            let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; klen]).unwrap());
            let mut buf = vec![0u8; payload];
            let mut n = 0u64;
            g.bench_function(format!("{name}/raw_seal/{size}"), |b| {
                b.iter(|| {
                    n += 1;
                    let mut nonce = [0u8; 12];
                    nonce[4..].copy_from_slice(&n.to_be_bytes());
                    let tag = key
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce),
                            Aad::from([0u8; 8]),
                            &mut buf,
                        )
                        .unwrap();
                    black_box(tag)
                })
            });
            let mut sealed = vec![0u8; payload];
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([1; 12]),
                    Aad::from([0u8; 8]),
                    &mut sealed,
                )
                .unwrap();
            sealed.extend_from_slice(tag.as_ref());
            g.bench_function(format!("{name}/raw_open/{size}"), |b| {
                b.iter_batched_ref(
                    || sealed.clone(),
                    |s| {
                        key.open_in_place(
                            Nonce::assume_unique_for_key([1; 12]),
                            Aad::from([0u8; 8]),
                            s,
                        )
                        .unwrap();
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        for (name, suite) in suites() {
            let keymat = vec![3u8; suite.keymat_len()];
            let now = Instant::now();
            let out = OutboundSa::new(&params(suite, &keymat), now).unwrap();
            let template = packet(size);
            g.bench_function(format!("{name}/encap/{size}"), |b| {
                b.iter_batched_ref(
                    || template.clone(),
                    |buf| black_box(out.encapsulate(buf, HEAD..HEAD + size).unwrap()),
                    BatchSize::SmallInput,
                )
            });
            let sender = OutboundSa::new(&params(suite, &keymat), now).unwrap();
            let inb = InboundSa::new(&params(suite, &keymat), now).unwrap();
            g.bench_function(format!("{name}/decap/{size}"), |b| {
                b.iter_batched_ref(
                    || {
                        let mut buf = template.clone();
                        let outer = sender.encapsulate(&mut buf, HEAD..HEAD + size).unwrap();
                        (buf, outer.start + 28..outer.end)
                    },
                    |(buf, esp)| black_box(inb.decapsulate(buf, esp.clone()).unwrap()),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn criterion_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/criterion")
}

/// Mean time of one benchmark from criterion's estimates, in ns.
fn mean_ns(id: &str) -> Option<f64> {
    let path = criterion_dir()
        .join("esp")
        .join(id.replace('/', "_"))
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn summary() {
    println!("\nESP per packet vs the raw ring AES-GCM of the same payload (same run)");
    println!(
        "| transform | size | encap ns | decap ns | raw seal ns | raw open ns | encap/raw | decap/raw |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for size in SIZES {
        for (name, suite) in suites() {
            let raw = if suite.encr == Encr::AesGcm16(AesKeyBits::B128) {
                "gcm128"
            } else {
                "gcm256"
            };
            let cells = (
                mean_ns(&format!("{name}/encap/{size}")),
                mean_ns(&format!("{name}/decap/{size}")),
                mean_ns(&format!("{raw}/raw_seal/{size}")),
                mean_ns(&format!("{raw}/raw_open/{size}")),
            );
            let (Some(e), Some(d), Some(s), Some(o)) = cells else {
                continue;
            };
            println!(
                "| {name} | {size} | {e:.0} | {d:.0} | {s:.0} | {o:.0} | {:.2}x | {:.2}x |",
                e / s,
                d / o
            );
        }
    }
    println!(
        "(CBC rows are compared with raw AES-256-GCM: the cost of the article's transform next to the fastest one.)"
    );
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();
    bench(&mut c);
    policy(&mut c);
    c.final_summary();
    summary();
}
