//! The AES-GCM of ESP, in one run: ring against the `aes-gcm` crate for
//! seal and open at each size (where they cross decides which one the ESP
//! core uses below and above it), and the ESP core's encapsulation and
//! decapsulation next to the raw AEAD of the same octets.
//!
//! Every case is timed the same way, so that the ratios hold on a loaded
//! machine: a batch of 32 packets is prepared outside the timing (fresh
//! plaintext, or freshly sealed packets with new sequence numbers, hot in
//! the cache as a worker's RX batch is), then the 32 are processed under
//! the clock. The summary prints the ratios; criterion keeps the details.
//! Goal: ESP at most 1.1x the raw AEAD at every size.

#![allow(clippy::unwrap_used)] // a benchmark: a failed step is a failed run

use std::{
    hint::black_box,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use aes_gcm::{
    Aes128Gcm, Aes256Gcm, KeyInit,
    aead::{AeadInPlace, generic_array::GenericArray},
};
use criterion::Criterion;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use xesp_esp::{
    alg::{AesKeyBits, Encr, Suite},
    sa::{InboundSa, Lifetime, NattPorts, OutboundSa, SaParams, Tunnel},
};

const SIZES: [usize; 5] = [64, 128, 256, 512, 1400];
const BATCH: usize = 32;
const HEAD: usize = 128;

/// Times `work` on batches of `BATCH` prepared by `prepare` (untimed).
fn batched<T>(
    iters: u64,
    batch: &mut [T],
    mut prepare: impl FnMut(&mut [T]),
    mut work: impl FnMut(&mut T),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH as u64) as usize;
        prepare(&mut batch[..n]);
        let t = Instant::now();
        for x in &mut batch[..n] {
            work(x);
        }
        total += t.elapsed();
        left -= n as u64;
    }
    total
}

/// The octets ESP encrypts for an inner packet of `size`: the packet and
/// its trailer, padded to 4.
fn payload(size: usize) -> usize {
    size + 2 + (4 - (size + 2) % 4) % 4
}

enum Soft {
    A128(Aes128Gcm),
    A256(Aes256Gcm),
}

impl Soft {
    fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        let n = GenericArray::from_slice(nonce);
        let tag = match self {
            Soft::A128(c) => c.encrypt_in_place_detached(n, aad, buf),
            Soft::A256(c) => c.encrypt_in_place_detached(n, aad, buf),
        }
        .unwrap();
        tag.into()
    }
    fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8], tag: &[u8; 16]) {
        let n = GenericArray::from_slice(nonce);
        let t = GenericArray::from_slice(tag);
        match self {
            Soft::A128(c) => c.decrypt_in_place_detached(n, aad, buf, t),
            Soft::A256(c) => c.decrypt_in_place_detached(n, aad, buf, t),
        }
        .unwrap()
    }
}

fn nonce(n: u64) -> [u8; 12] {
    let mut x = [7u8; 12];
    x[4..].copy_from_slice(&n.to_be_bytes());
    x
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

/// A buffer with an IPv4 UDP packet of `len` octets at HEAD.
fn packet(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; HEAD + len + 64];
    b[HEAD] = 0x45;
    b[HEAD + 2..HEAD + 4].copy_from_slice(&(len as u16).to_be_bytes());
    b[HEAD + 9] = 17;
    b[HEAD + 12..HEAD + 16].copy_from_slice(&[10, 0, 0, 10]);
    b[HEAD + 16..HEAD + 20].copy_from_slice(&[10, 2, 0, 4]);
    b
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead");
    for size in SIZES {
        let len = payload(size);
        for (name, bits) in [("gcm128", AesKeyBits::B128), ("gcm256", AesKeyBits::B256)] {
            let key = vec![9u8; bits.bytes()];
            let alg = if bits == AesKeyBits::B128 {
                &AES_128_GCM
            } else {
                &AES_256_GCM
            };
            let ring = LessSafeKey::new(UnboundKey::new(alg, &key).unwrap());
            let soft = if bits == AesKeyBits::B128 {
                Soft::A128(Aes128Gcm::new_from_slice(&key).unwrap())
            } else {
                Soft::A256(Aes256Gcm::new_from_slice(&key).unwrap())
            };
            let aad = [1u8; 8];
            let mut n = 0u64;
            let mut bufs: Vec<(Vec<u8>, [u8; 16], u64)> =
                (0..BATCH).map(|_| (vec![0u8; len], [0; 16], 0)).collect();
            g.bench_function(format!("{name}/ring_seal/{size}"), |b| {
                b.iter_custom(|iters| {
                    batched(
                        iters,
                        &mut bufs,
                        |v| v.iter_mut().for_each(|x| x.0.fill(0x42)),
                        |x| {
                            n += 1;
                            let t = ring
                                .seal_in_place_separate_tag(
                                    Nonce::assume_unique_for_key(nonce(n)),
                                    Aad::from(aad),
                                    &mut x.0,
                                )
                                .unwrap();
                            let _ = black_box(t);
                        },
                    )
                })
            });
            g.bench_function(format!("{name}/soft_seal/{size}"), |b| {
                b.iter_custom(|iters| {
                    batched(
                        iters,
                        &mut bufs,
                        |v| v.iter_mut().for_each(|x| x.0.fill(0x42)),
                        |x| {
                            n += 1;
                            black_box(soft.seal(&nonce(n), &aad, &mut x.0));
                        },
                    )
                })
            });
            // Open: each batch freshly sealed (by ring; both give the same bytes).
            let reseal = |v: &mut [(Vec<u8>, [u8; 16], u64)], n: &mut u64| {
                for x in v {
                    *n += 1;
                    x.0.fill(0x42);
                    let t = ring
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce(*n)),
                            Aad::from(aad),
                            &mut x.0,
                        )
                        .unwrap();
                    x.1.copy_from_slice(t.as_ref());
                    x.2 = *n;
                }
            };
            let mut sealed: Vec<(Vec<u8>, [u8; 16], u64)> = (0..BATCH)
                .map(|_| (vec![0u8; len + 16], [0; 16], 0))
                .collect();
            g.bench_function(format!("{name}/ring_open/{size}"), |b| {
                b.iter_custom(|iters| {
                    batched(
                        iters,
                        &mut sealed,
                        |v| {
                            for x in v.iter_mut() {
                                x.0.truncate(len);
                            }
                            reseal(v, &mut n);
                            for x in v.iter_mut() {
                                let t = x.1;
                                x.0.extend_from_slice(&t);
                            }
                        },
                        |x| {
                            ring.open_in_place(
                                Nonce::assume_unique_for_key(nonce(x.2)),
                                Aad::from(aad),
                                &mut x.0,
                            )
                            .unwrap();
                        },
                    )
                })
            });
            g.bench_function(format!("{name}/soft_open/{size}"), |b| {
                b.iter_custom(|iters| {
                    batched(
                        iters,
                        &mut sealed,
                        |v| {
                            for x in v.iter_mut() {
                                x.0.truncate(len);
                            }
                            reseal(v, &mut n);
                        },
                        |x| soft.open(&nonce(x.2), &aad, &mut x.0, &x.1),
                    )
                })
            });
            // The ESP core on the same sizes, timed the same way.
            let suite = Suite::new(Encr::AesGcm16(bits), None).unwrap();
            let keymat = vec![3u8; suite.keymat_len()];
            let now = Instant::now();
            let out = OutboundSa::new(&params(suite, &keymat), now).unwrap();
            let template = packet(size);
            let mut frames: Vec<(Vec<u8>, core::ops::Range<usize>)> =
                (0..BATCH).map(|_| (template.clone(), 0..0)).collect();
            g.bench_function(format!("{name}/esp_encap/{size}"), |b| {
                b.iter_custom(|iters| {
                    batched(
                        iters,
                        &mut frames,
                        |v| v.iter_mut().for_each(|x| x.0.copy_from_slice(&template)),
                        |x| {
                            black_box(out.encapsulate(&mut x.0, HEAD..HEAD + size).unwrap());
                        },
                    )
                })
            });
            let sender = OutboundSa::new(&params(suite, &keymat), now).unwrap();
            let inb = InboundSa::new(&params(suite, &keymat), now).unwrap();
            g.bench_function(format!("{name}/esp_decap/{size}"), |b| {
                b.iter_custom(|iters| {
                    batched(
                        iters,
                        &mut frames,
                        |v| {
                            for x in v.iter_mut() {
                                x.0.copy_from_slice(&template);
                                let o = sender.encapsulate(&mut x.0, HEAD..HEAD + size).unwrap();
                                x.1 = o.start + 28..o.end;
                            }
                        },
                        |x| {
                            black_box(inb.decapsulate(&mut x.0, x.1.clone()).unwrap());
                        },
                    )
                })
            });
        }
    }
    g.finish();
}

fn criterion_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/criterion")
}

/// Mean time of one benchmark from criterion's estimates, in ns.
fn mean_ns(id: &str) -> Option<f64> {
    let path = criterion_dir()
        .join("aead")
        .join(id.replace('/', "_"))
        .join("new/estimates.json");
    let s = std::fs::read_to_string(path).ok()?;
    // {"mean":{"confidence_interval":{...},"point_estimate":N,...
    let m = s.find("\"mean\"")?;
    let p = s[m..].find("\"point_estimate\":")? + m + "\"point_estimate\":".len();
    let end = s[p..].find([',', '}'])? + p;
    s[p..end].trim().parse().ok()
}

fn summary() {
    println!("\nAES-GCM per packet, one run: ring and the aes-gcm crate (soft), and ESP");
    println!(
        "| key | size | ring seal | soft seal | ring open | soft open | esp encap | esp decap | encap/best seal | decap/best open | encap/ring | decap/ring |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size in SIZES {
        for name in ["gcm128", "gcm256"] {
            let m = |k: &str| mean_ns(&format!("{name}/{k}/{size}"));
            let (Some(rs), Some(ss), Some(ro), Some(so), Some(e), Some(d)) = (
                m("ring_seal"),
                m("soft_seal"),
                m("ring_open"),
                m("soft_open"),
                m("esp_encap"),
                m("esp_decap"),
            ) else {
                continue;
            };
            println!(
                "| {name} | {size} | {rs:.0} | {ss:.0} | {ro:.0} | {so:.0} | {e:.0} | {d:.0} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
                e / rs.min(ss),
                d / ro.min(so),
                e / rs,
                d / ro
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&criterion_dir())
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    summary();
}
