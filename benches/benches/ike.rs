//! Complete IKE_SA setups per second per core (IKE_SA_INIT + IKE_AUTH with
//! its first CHILD_SA, both peers in memory on this thread, PSK), next to the
//! raw Diffie-Hellman operations of the same group measured in the same run:
//! the bound a setup cannot beat is each side's key generation and
//! agreement, two of each per setup. `cargo bench -p xesp-benches --bench ike`.
//!
//! After criterion's figures, a summary for each group: setups/s, the DH
//! bound, and their ratio (the goal is >= 0.8), the two measured in
//! alternating 50 ms slices so that a busy machine's drift falls on both.

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, criterion_group};
use ike_proto::{
    backend::RecordingBackend,
    config::{IkeProposal, PeerConfig},
    connection::Connection,
    crypto::{DhGroup, DhPrivate, Psk},
    random::SystemRandom,
};

const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const GROUPS: [(DhGroup, &str); 3] = [
    (DhGroup::Modp2048, "aes256-sha256-modp2048"),
    (DhGroup::Ecp256, "aes256-sha256-ecp256"),
    (DhGroup::Curve25519, "aes256-sha256-curve25519"),
];

fn config(initiator: bool, proposal: &str) -> Arc<PeerConfig> {
    let (me, peer) = if initiator { (A, B) } else { (B, A) };
    let mut c = PeerConfig::new(
        if initiator { "Tunnel0" } else { "peer" },
        0,
        IpAddr::V4(me),
        IpAddr::V4(peer),
        Psk::new(b"bench-psk-0123456789"),
    );
    c.initiator = initiator;
    c.ike_proposals = vec![IkeProposal::parse(proposal).expect("a valid proposal")];
    Arc::new(c)
}

/// Both peers' configurations for `proposal`, built once: the daemon builds
/// a tunnel's when it loads its configuration, not for each IKE_SA.
fn configs(proposal: &str) -> [Arc<PeerConfig>; 2] {
    [config(true, proposal), config(false, proposal)]
}

/// One IKE_SA with its first CHILD_SA set up between two fresh connections,
/// messages handed over in memory. Returns the messages exchanged.
fn setup([ca, cb]: &[Arc<PeerConfig>; 2], rng: &Arc<SystemRandom>) -> usize {
    let now = Instant::now();
    let mut a = Connection::new(ca.clone(), rng.clone(), now);
    let mut b = Connection::new(cb.clone(), rng.clone(), now);
    let (mut ba, mut bb) = (
        RecordingBackend::new(0x1000),
        RecordingBackend::new(0xc000_0000),
    );
    // The initiator's first attempt is due at once.
    a.handle_timeout(now, &mut ba);
    let mut messages = 0;
    for _ in 0..16 {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            moved = true;
            if t.data == [0xff] {
                continue; // a NAT-keepalive
            }
            messages += 1;
            let from = SocketAddr::new(IpAddr::V4(A), t.local_port);
            b.handle_datagram(now, t.remote.port(), from, &t.data, &mut bb);
        }
        while let Some(t) = b.poll_transmit() {
            moved = true;
            if t.data == [0xff] {
                continue;
            }
            messages += 1;
            let from = SocketAddr::new(IpAddr::V4(B), t.local_port);
            a.handle_datagram(now, t.remote.port(), from, &t.data, &mut ba);
        }
        while a.poll_event().is_some() {}
        while b.poll_event().is_some() {}
        if a.is_up() && b.is_up() {
            return messages;
        }
        if !moved {
            break;
        }
    }
    panic!(
        "the IKE_SA with {:?} did not come up in memory",
        ca.ike_proposals
    );
}

/// One side's DH work of a setup: generate a key pair, agree with the peer's.
fn dh_side(group: DhGroup, peer_public: &[u8], rng: &SystemRandom) -> usize {
    let k = DhPrivate::generate(group, rng).expect("key generation");
    k.agree(peer_public).expect("agreement").len()
}

fn peer_public(group: DhGroup, rng: &SystemRandom) -> Vec<u8> {
    DhPrivate::generate(group, rng)
        .expect("key generation")
        .public()
        .to_vec()
}

fn benches(c: &mut Criterion) {
    let rng = Arc::new(SystemRandom::new());
    for (group, proposal) in GROUPS {
        let mut g = c.benchmark_group(format!("ike/{group:?}"));
        let public = peer_public(group, &rng);
        g.bench_function("dh generate+agree (one side)", |b| {
            b.iter(|| black_box(dh_side(group, black_box(&public), &rng)))
        });
        let cfgs = configs(proposal);
        g.bench_function("IKE_SA setup (both sides)", |b| {
            b.iter(|| black_box(setup(&cfgs, &rng)))
        });
        g.finish();
    }
}

/// Calls per second of `a` and of `b`, measured in alternating slices of
/// `slice` for about `for_how_long` in all: a busy machine's drift falls on
/// both alike, so their ratio holds where two measurements one after the
/// other would not.
fn paired_rates(
    for_how_long: Duration,
    slice: Duration,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> (f64, f64) {
    a(); // warm
    b();
    let (mut na, mut ta, mut nb, mut tb) = (0u64, Duration::ZERO, 0u64, Duration::ZERO);
    let start = Instant::now();
    while start.elapsed() < for_how_long {
        for (f, n, t) in [
            (&mut a as &mut dyn FnMut(), &mut na, &mut ta),
            (&mut b as &mut dyn FnMut(), &mut nb, &mut tb),
        ] {
            let s = Instant::now();
            while s.elapsed() < slice {
                f();
                *n += 1;
            }
            *t += s.elapsed();
        }
    }
    (na as f64 / ta.as_secs_f64(), nb as f64 / tb.as_secs_f64())
}

/// Setups/s next to the DH bound, measured one after the other in this run.
fn summary() {
    let quick = std::env::args().any(|a| a == "--quick" || a == "--test");
    let d = Duration::from_millis(if quick { 600 } else { 4000 });
    let rng = Arc::new(SystemRandom::new());
    println!(
        "\nIKE_SA setups per second on one core (both peers on this thread) vs the DH bound\n\
         | group | DH generate+agree per s (one side) | DH bound: setups/s (two sides) | IKE_SA setups/s | setups / bound | goal >= 0.8 |\n\
         |---|---:|---:|---:|---:|---|"
    );
    for (group, proposal) in GROUPS {
        let public = peer_public(group, &rng);
        let cfgs = configs(proposal);
        let (dh, setups) = paired_rates(
            d,
            Duration::from_millis(50),
            || {
                black_box(dh_side(group, &public, &rng));
            },
            || {
                black_box(setup(&cfgs, &rng));
            },
        );
        let bound = dh / 2.0;
        let r = setups / bound;
        println!(
            "| {group} | {dh:.0} | {bound:.0} | {setups:.0} | {r:.2} | {} |",
            if r >= 0.8 { "met" } else { "not met" }
        );
    }
}

/// The daemon's allocator (`ike-control/src/main.rs`): a setup allocates
/// about 370 times, so the allocator is part of what is measured.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

criterion_group!(ike, benches);

fn main() {
    ike();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
