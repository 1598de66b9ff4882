//! ESP encapsulation and decapsulation per packet, for each transform and
//! inner size, measured in the same run as the raw ring AES-GCM seal/open of
//! the same payload; the summary prints ESP cost / raw AEAD cost.
//!
//! Goal: at 1400 octets, ESP with AES-GCM costs at most 1.3x the raw AEAD.

#![allow(clippy::unwrap_used)] // a benchmark: a failed step is a failed run

use std::{hint::black_box, net::Ipv4Addr, path::PathBuf, time::Instant};

use criterion::{BatchSize, Criterion, Throughput};
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use xesp_esp::{
    alg::{AesKeyBits, Encr, Integ, Suite},
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

/// A buffer with an IPv4 packet of `len` octets at HEAD.
fn packet(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; HEAD + len + 64];
    b[HEAD] = 0x45;
    b[HEAD + 2..HEAD + 4].copy_from_slice(&(len as u16).to_be_bytes());
    b[HEAD + 9] = 17;
    b
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
            let mut out = OutboundSa::new(&params(suite, &keymat), now).unwrap();
            let template = packet(size);
            g.bench_function(format!("{name}/encap/{size}"), |b| {
                b.iter_batched_ref(
                    || template.clone(),
                    |buf| black_box(out.encapsulate(buf, HEAD..HEAD + size).unwrap()),
                    BatchSize::SmallInput,
                )
            });
            let mut sender = OutboundSa::new(&params(suite, &keymat), now).unwrap();
            let mut inb = InboundSa::new(&params(suite, &keymat), now).unwrap();
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
    c.final_summary();
    summary();
}
