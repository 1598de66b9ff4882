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
//! `-- --paired-only` skips criterion and runs the cases interleaved batch
//! by batch (the fairest ratios on a loaded machine). Goal: ESP at most
//! 1.1x the raw AEAD at every size.
//!
//! Measured here (AMD EPYC, KVM, 2 cores, loaded), interleaved: the
//! `aes-gcm` crate is slower than ring at every size, 1.2x at 64 octets to
//! 2.4x at 1400 for sealing and 1.4x to 2.5x for opening, so there is no
//! crossover and the ESP core uses ring alone.

#![allow(clippy::unwrap_used)] // a benchmark: a failed step is a failed run

use std::{
    hint::black_box,
    net::Ipv4Addr,
    ops::Range,
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

/// The octets ESP encrypts for an inner packet of `size`: the packet and
/// its trailer, padded to 4.
fn payload(size: usize) -> usize {
    size + 2 + (4 - (size + 2) % 4) % 4
}

#[allow(clippy::large_enum_variant)] // one of each, for the whole run
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

/// `len` octets that start on a cache line, so that every case's data
/// lies the same way across cache lines, in every run (where the allocator
/// puts a plain `Vec` varies): the raw AEAD's plaintext, and ESP's
/// ciphertext at `HEAD`.
struct Lines {
    v: Vec<u8>,
    at: usize,
    len: usize,
}

impl Lines {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 64];
        let at = v.as_ptr().align_offset(64);
        Self { v, at, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.v[self.at..self.at + self.len]
    }
}

/// A buffer with an IPv4 UDP packet of `len` octets at HEAD.
fn packet(len: usize) -> Lines {
    let mut l = Lines::new(HEAD + len + 64);
    let b = l.get();
    b[HEAD] = 0x45;
    b[HEAD + 2..HEAD + 4].copy_from_slice(&(len as u16).to_be_bytes());
    b[HEAD + 9] = 17;
    b[HEAD + 12..HEAD + 16].copy_from_slice(&[10, 0, 0, 10]);
    b[HEAD + 16..HEAD + 20].copy_from_slice(&[10, 2, 0, 4]);
    l
}

const CASES: [&str; 6] = [
    "ring_seal",
    "soft_seal",
    "ring_open",
    "soft_open",
    "esp_encap",
    "esp_decap",
];

/// The payload (`len` octets) and its ICV after it; the ICV once more apart
/// (for the `aes-gcm` crate's detached open); the nonce's counter.
type Sealed = (Lines, [u8; 16], u64);

/// The six cases of one key size and packet size, each timing `n` (at most
/// `BATCH`) packets prepared outside the clock.
#[allow(clippy::type_complexity)]
fn cases(bits: AesKeyBits, size: usize) -> Vec<Box<dyn FnMut(usize) -> Duration>> {
    let len = payload(size);
    let key = vec![9u8; bits.bytes()];
    let alg = if bits == AesKeyBits::B128 {
        &AES_128_GCM
    } else {
        &AES_256_GCM
    };
    let ring = std::rc::Rc::new(LessSafeKey::new(UnboundKey::new(alg, &key).unwrap()));
    let soft = std::rc::Rc::new(if bits == AesKeyBits::B128 {
        Soft::A128(Aes128Gcm::new_from_slice(&key).unwrap())
    } else {
        Soft::A256(Aes256Gcm::new_from_slice(&key).unwrap())
    });
    let aad = [1u8; 8];
    let counter = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let next = {
        let c = counter.clone();
        move || {
            c.set(c.get() + 1);
            c.get()
        }
    };
    // Freshly sealed by ring (both give the same bytes).
    let reseal = {
        let ring = ring.clone();
        let next = next.clone();
        move |v: &mut [Sealed]| {
            for x in v {
                let n = next();
                let (text, tag) = x.0.get().split_at_mut(len);
                text.fill(0x42);
                let t = ring
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce(n)),
                        Aad::from(aad),
                        text,
                    )
                    .unwrap();
                tag.copy_from_slice(t.as_ref());
                x.1.copy_from_slice(t.as_ref());
                x.2 = n;
            }
        }
    };
    let bufs = || -> Vec<Sealed> {
        (0..BATCH)
            .map(|_| (Lines::new(len + 16), [0; 16], 0))
            .collect()
    };
    let suite = Suite::new(Encr::AesGcm16(bits), None).unwrap();
    let keymat = vec![3u8; suite.keymat_len()];
    let now = Instant::now();
    let out = OutboundSa::new(&params(suite, &keymat), now).unwrap();
    let sender = OutboundSa::new(&params(suite, &keymat), now).unwrap();
    let inb = InboundSa::new(&params(suite, &keymat), now).unwrap();
    let mut template = packet(size);
    let template = template.get().to_vec();
    let frames =
        || -> Vec<(Lines, Range<usize>)> { (0..BATCH).map(|_| (packet(size), 0..0)).collect() };
    let mut v: Vec<Box<dyn FnMut(usize) -> Duration>> = Vec::new();
    // The raw seals write their ICV after the ciphertext, as ESP does.
    {
        let (ring, next, mut b) = (ring.clone(), next.clone(), bufs());
        v.push(Box::new(move |n| {
            timed(
                &mut b[..n],
                |x| {
                    x.0.get()[..len].fill(0x42);
                    x.2 = next();
                },
                |x| {
                    let (text, tag) = x.0.get().split_at_mut(len);
                    let t = ring
                        .seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce(x.2)),
                            Aad::from(aad),
                            text,
                        )
                        .unwrap();
                    tag.copy_from_slice(t.as_ref());
                },
            )
        }));
    }
    {
        let (soft, next, mut b) = (soft.clone(), next.clone(), bufs());
        v.push(Box::new(move |n| {
            timed(
                &mut b[..n],
                |x| {
                    x.0.get()[..len].fill(0x42);
                    x.2 = next();
                },
                |x| {
                    let (text, tag) = x.0.get().split_at_mut(len);
                    tag.copy_from_slice(&soft.seal(&nonce(x.2), &aad, text));
                },
            )
        }));
    }
    {
        let (ring, reseal, mut b) = (ring.clone(), reseal.clone(), bufs());
        v.push(Box::new(move |n| {
            let b = &mut b[..n];
            reseal(b);
            timed(
                b,
                |_| {},
                |x| {
                    ring.open_in_place(
                        Nonce::assume_unique_for_key(nonce(x.2)),
                        Aad::from(aad),
                        x.0.get(),
                    )
                    .unwrap();
                },
            )
        }));
    }
    {
        let (soft, reseal, mut b) = (soft.clone(), reseal.clone(), bufs());
        v.push(Box::new(move |n| {
            let b = &mut b[..n];
            reseal(b);
            timed(
                b,
                |_| {},
                |x| soft.open(&nonce(x.2), &aad, &mut x.0.get()[..len], &x.1),
            )
        }));
    }
    {
        // As a worker does: one lease of sequence numbers for the batch.
        let (template, mut f) = (template.clone(), frames());
        v.push(Box::new(move |n| {
            let f = &mut f[..n];
            f.iter_mut()
                .for_each(|x| x.0.get().copy_from_slice(&template));
            let tunnel = out.tunnel();
            let t = Instant::now();
            let mut lease = out.lease();
            lease.ahead(n as u64);
            for x in f.iter_mut() {
                black_box(
                    lease
                        .encapsulate_on(&tunnel, x.0.get(), HEAD..HEAD + size)
                        .unwrap(),
                );
            }
            drop(lease);
            t.elapsed()
        }));
    }
    {
        let mut f = frames();
        v.push(Box::new(move |n| {
            timed(
                &mut f[..n],
                |x| {
                    x.0.get().copy_from_slice(&template);
                    let o = sender.encapsulate(x.0.get(), HEAD..HEAD + size).unwrap();
                    x.1 = o.start + 28..o.end;
                },
                |x| {
                    black_box(inb.decapsulate(x.0.get(), x.1.clone()).unwrap());
                },
            )
        }));
    }
    v
}

/// Prepares every element of `batch` (untimed), then times `work` on each.
fn timed<T>(
    batch: &mut [T],
    prepare: impl FnMut(&mut T),
    mut work: impl FnMut(&mut T),
) -> Duration {
    batch.iter_mut().for_each(prepare);
    let t = Instant::now();
    for x in batch.iter_mut() {
        work(x);
    }
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead");
    for size in SIZES {
        for (name, bits) in [("gcm128", AesKeyBits::B128), ("gcm256", AesKeyBits::B256)] {
            for (case, mut f) in CASES.iter().zip(cases(bits, size)) {
                g.bench_function(format!("{name}/{case}/{size}"), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        let mut left = iters;
                        while left > 0 {
                            let n = left.min(BATCH as u64);
                            total += f(n as usize);
                            left -= n;
                        }
                        total
                    })
                });
            }
        }
    }
    g.finish();
}

/// The same cases interleaved batch by batch, each case's fastest batch
/// kept: on a loaded machine, the fairest ratios (every case sees the same
/// load, and the minimum drops the batches a preemption hit).
fn paired(rounds: usize) {
    println!(
        "\nInterleaved: {rounds} rounds of one {BATCH}-packet batch per case, fastest batch, ns per packet"
    );
    println!(
        "| key | size | ring seal | soft seal | ring open | soft open | esp encap | esp decap | encap/best seal | decap/best open | soft/ring seal | soft/ring open |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for size in SIZES {
        for (name, bits) in [("gcm128", AesKeyBits::B128), ("gcm256", AesKeyBits::B256)] {
            let mut fs = cases(bits, size);
            let mut best = [f64::MAX; CASES.len()];
            for _ in 0..rounds {
                for (i, f) in fs.iter_mut().enumerate() {
                    let ns = f(BATCH).as_nanos() as f64 / BATCH as f64;
                    best[i] = best[i].min(ns);
                }
            }
            let [rs, ss, ro, so, e, d] = best;
            println!(
                "| {name} | {size} | {rs:.0} | {ss:.0} | {ro:.0} | {so:.0} | {e:.0} | {d:.0} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
                e / rs.min(ss),
                d / ro.min(so),
                ss / rs,
                so / ro
            );
        }
    }
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
    let mut c = Criterion::default().output_directory(&criterion_dir());
    if !std::env::args().any(|a| a == "--paired-only") {
        c = c.configure_from_args();
    }
    // `cargo bench --bench aead -- --paired-only` skips criterion's runs.
    let paired_only = std::env::args().any(|a| a == "--paired-only");
    if !paired_only {
        bench(&mut c);
        c.final_summary();
        summary();
    }
    paired(if paired_only { 2000 } else { 500 });
}
