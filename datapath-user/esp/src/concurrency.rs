//! One SA shared by several threads at once (`&self`): sequence numbers,
//! the anti-replay window and the lifetimes stay exact.

use std::{net::Ipv4Addr, ops::Range, sync::Mutex, time::Instant};

use crate::{
    alg::{AesKeyBits, Encr, Suite},
    replay::MAX_WINDOW,
    sa::{
        DropReason, Expiry, InboundSa, Lifetime, Limit, Limits, NattPorts, OutboundSa, SaParams,
        Tunnel,
    },
    wire::{Outer, parse_outer},
};

const THREADS: usize = 4;
const HEADROOM: usize = 128;

/// xorshift64*: seeded, so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next() % (i as u64 + 1)) as usize);
        }
    }
}

fn gcm() -> Suite {
    Suite::new(Encr::AesGcm16(AesKeyBits::B128), None).unwrap()
}

const KEYMAT: [u8; 20] = [0x5a; 20];

fn params(esn: bool, replay_window: u32, lifetime: Lifetime) -> SaParams<'static> {
    SaParams {
        spi: 0x0bad_cafe,
        suite: gcm(),
        keymat: &KEYMAT,
        esn,
        replay_window,
        tunnel: Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(203, 0, 113, 11),
            natt: Some(NattPorts {
                local: 4500,
                remote: 4500,
            }),
        },
        lifetime,
    }
}

/// An IPv4 packet of 60 octets, 10.0.0.10 -> 10.2.0.4, at HEADROOM.
fn inner() -> (Vec<u8>, Range<usize>) {
    let mut buf = vec![0u8; HEADROOM + 60 + 64];
    buf[HEADROOM] = 0x45;
    buf[HEADROOM + 2..HEADROOM + 4].copy_from_slice(&60u16.to_be_bytes());
    buf[HEADROOM + 9] = 17;
    buf[HEADROOM + 12..HEADROOM + 16].copy_from_slice(&[10, 0, 0, 10]);
    buf[HEADROOM + 16..HEADROOM + 20].copy_from_slice(&[10, 2, 0, 4]);
    (buf, HEADROOM..HEADROOM + 60)
}

/// An encapsulated packet: its buffer, where its ESP is, its full sequence
/// number (GCM's explicit IV is the 64-bit sequence number).
struct Sealed {
    buf: Vec<u8>,
    esp: Range<usize>,
    seq: u64,
}

fn sealed(buf: Vec<u8>, outer: Range<usize>) -> Sealed {
    let Ok(Outer::Esp { esp, .. }) = parse_outer(&buf[outer.clone()]) else {
        panic!("not ESP");
    };
    let esp = outer.start + esp.start..outer.start + esp.end;
    let iv = &buf[esp.start + 8..esp.start + 16];
    let seq = u64::from_be_bytes(iv.try_into().unwrap());
    Sealed { buf, esp, seq }
}

/// How the threads of [`hammer`] take their sequence numbers.
#[derive(Clone, Copy)]
enum Take {
    /// `OutboundSa::encapsulate`, packet by packet.
    OneByOne,
    /// Leases: each asks for a random block (1 to 64) and seals a random
    /// number of packets in it, fewer than asked (the rest given back or
    /// skipped) or more (a second block), drawn from `seed`.
    Leased { seed: u64 },
}

/// `THREADS` threads encapsulate `per_thread` packets each on one SA; the
/// sequence numbers they got, sorted, and how many were refused and why.
fn hammer(out: &OutboundSa, per_thread: usize, take: Take) -> (Vec<u64>, Vec<DropReason>) {
    let seqs = Mutex::new(Vec::new());
    let refused = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (seqs, refused) = (&seqs, &refused);
            s.spawn(move || {
                let seed = match take {
                    Take::OneByOne => 1,
                    Take::Leased { seed } => seed,
                };
                let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let (mut mine, mut no) = (Vec::new(), Vec::new());
                let mut left = per_thread;
                while left > 0 {
                    let (mut lease, k) = match take {
                        Take::OneByOne => (None, 1),
                        Take::Leased { .. } => {
                            let mut l = out.lease();
                            l.ahead(rng.next() % 64 + 1);
                            (Some(l), ((rng.next() % 80) as usize + 1).min(left))
                        }
                    };
                    for _ in 0..k {
                        let (mut buf, r) = inner();
                        let done = match &mut lease {
                            None => out.encapsulate(&mut buf, r),
                            Some(l) => l.encapsulate_on(&out.tunnel(), &mut buf, r),
                        };
                        match done {
                            Ok(outer) => mine.push(sealed(buf, outer).seq),
                            Err(e) => no.push(e),
                        }
                    }
                    left -= k;
                }
                seqs.lock().unwrap().extend(mine);
                refused.lock().unwrap().extend(no);
            });
        }
    });
    let mut seqs = seqs.into_inner().unwrap();
    seqs.sort_unstable();
    (seqs, refused.into_inner().unwrap())
}

#[test]
fn threads_sharing_an_outbound_sa_never_get_the_same_sequence_number() {
    let out = OutboundSa::new(&params(false, 64, Lifetime::default()), Instant::now()).unwrap();
    let n = 3000;
    let (seqs, refused) = hammer(&out, n, Take::OneByOne);
    assert!(refused.is_empty(), "{refused:?}");
    let want: Vec<u64> = (1..=(THREADS * n) as u64).collect();
    assert_eq!(seqs, want, "each number once, none skipped");
    assert_eq!(out.counters().packets, (THREADS * n) as u64);
    assert_eq!(out.next_seq(), (THREADS * n) as u64 + 1);
}

#[test]
fn sequence_exhaustion_is_exact_under_contention_with_and_without_esn() {
    for (esn, last) in [(false, u64::from(u32::MAX)), (true, u64::MAX)] {
        let mut out =
            OutboundSa::new(&params(esn, 64, Lifetime::default()), Instant::now()).unwrap();
        let left = 1000u64;
        let (mut buf, r) = inner();
        let start = last - left;
        out.encapsulate_with(&mut buf, r, start, &start.to_be_bytes())
            .unwrap();
        let (seqs, refused) = hammer(&out, 600, Take::OneByOne);
        let want: Vec<u64> = (start + 1..=last).collect();
        assert_eq!(seqs, want, "esn {esn}: the last {left} numbers, once each");
        assert_eq!(refused.len(), THREADS * 600 - left as usize);
        // The first refusals find the space used up; once that has fired
        // the hard lifetime, the SA refuses as expired.
        assert!(
            refused
                .iter()
                .all(|r| matches!(r, DropReason::SequenceExhausted | DropReason::Expired)),
            "esn {esn}"
        );
        let d = out.counters().drops;
        assert!(d.get(DropReason::SequenceExhausted) >= 1);
        assert_eq!(d.total(), refused.len() as u64);
        let t = Instant::now();
        let events: Vec<_> = std::iter::from_fn(|| out.poll_expiry(t)).collect();
        assert_eq!(
            events,
            [Expiry::Soft(Limit::Sequence), Expiry::Hard(Limit::Sequence)],
            "esn {esn}: each once"
        );
        // Nothing wrapped: still refused.
        let (mut b, r) = inner();
        assert_eq!(out.encapsulate(&mut b, r), Err(DropReason::Expired));
        assert_eq!(out.next_seq(), if esn { 0 } else { last + 1 });
    }
}

/// Decapsulates `packets` on `inb` from `THREADS` threads, each taking
/// every `THREADS`-th packet; the sequence numbers accepted and the drops.
fn receive(inb: &InboundSa, packets: Vec<Sealed>) -> (Vec<u64>, Vec<DropReason>) {
    let mut shares: Vec<Vec<Sealed>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, p) in packets.into_iter().enumerate() {
        shares[i % THREADS].push(p);
    }
    let accepted = Mutex::new(Vec::new());
    let dropped = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for share in shares {
            let (accepted, dropped) = (&accepted, &dropped);
            s.spawn(move || {
                let (mut ok, mut no) = (Vec::new(), Vec::new());
                for mut p in share {
                    match inb.decapsulate(&mut p.buf, p.esp.clone()) {
                        Ok(d) => {
                            assert_eq!(d.seq, p.seq, "ESN inferred right");
                            ok.push(d.seq);
                        }
                        Err(e) => no.push(e),
                    }
                }
                accepted.lock().unwrap().extend(ok);
                dropped.lock().unwrap().extend(no);
            });
        }
    });
    let mut accepted = accepted.into_inner().unwrap();
    accepted.sort_unstable();
    (accepted, dropped.into_inner().unwrap())
}

/// Every packet twice, shuffled, spread over threads, across the 2^32 wrap
/// of extended sequence numbers: each number is accepted exactly once, each
/// copy is a replay, and the window ends exact.
#[test]
fn threads_sharing_an_inbound_sa_accept_each_sequence_number_once() {
    let mut rng = Rng(0x1605_2026);
    for esn in [false, true] {
        let p = params(esn, MAX_WINDOW, Lifetime::default());
        let mut out = OutboundSa::new(&p, Instant::now()).unwrap();
        let inb = InboundSa::new(&p, Instant::now()).unwrap();
        let n = 3000u64;
        // With ESN the numbers run from 2^32 - n/2 to 2^32 + n/2.
        let first = if esn { (1u64 << 32) - n / 2 } else { 1 };
        let (mut buf, r) = inner();
        let outer = out
            .encapsulate_with(&mut buf, r, first, &first.to_be_bytes())
            .unwrap();
        // The first packet alone: the window starts where the sender does.
        let mut p0 = sealed(buf, outer);
        assert_eq!(
            inb.decapsulate(&mut p0.buf, p0.esp.clone()).unwrap().seq,
            first
        );
        let mut packets = Vec::new();
        for _ in 1..n {
            let (mut buf, r) = inner();
            let outer = out.encapsulate(&mut buf, r).unwrap();
            let p = sealed(buf, outer);
            packets.push(Sealed {
                buf: p.buf.clone(),
                esp: p.esp.clone(),
                seq: p.seq,
            });
            packets.push(p);
        }
        let mut later_copy: Vec<Sealed> = packets
            .iter()
            .step_by(97)
            .map(|p| Sealed {
                buf: p.buf.clone(),
                esp: p.esp.clone(),
                seq: p.seq,
            })
            .collect();
        rng.shuffle(&mut packets);
        let (accepted, dropped) = receive(&inb, packets);
        let want: Vec<u64> = (first + 1..first + n).collect();
        assert_eq!(accepted, want, "esn {esn}: each number once");
        assert_eq!(dropped.len(), (n - 1) as usize, "esn {esn}: one copy each");
        assert!(dropped.iter().all(|d| *d == DropReason::Replay), "{esn}");
        let c = inb.counters();
        assert_eq!(
            (c.packets, c.drops.get(DropReason::Replay), c.drops.total()),
            (n, n - 1, n - 1)
        );
        assert_eq!(inb.highest_seq(), first + n - 1);
        // The window is exact afterwards: every number seen is refused, the
        // next one is accepted.
        for p in &mut later_copy {
            assert_eq!(
                inb.decapsulate(&mut p.buf, p.esp.clone()),
                Err(DropReason::Replay)
            );
        }
        let (mut buf, r) = inner();
        let outer = out.encapsulate(&mut buf, r).unwrap();
        let mut next = sealed(buf, outer);
        assert_eq!(
            inb.decapsulate(&mut next.buf, next.esp.clone())
                .unwrap()
                .seq,
            first + n
        );
    }
}

/// A small window and heavy reordering: packets may be too old, but no
/// number is ever accepted twice, and every refusal is counted. (Without
/// ESN: with it, a number below the window means the next 2^32 block, and
/// such a packet fails its ICV instead.)
#[test]
fn a_small_window_under_contention_never_accepts_a_number_twice() {
    let mut rng = Rng(42);
    let p = params(false, 32, Lifetime::default());
    let out = OutboundSa::new(&p, Instant::now()).unwrap();
    let inb = InboundSa::new(&p, Instant::now()).unwrap();
    let mut packets = Vec::new();
    for _ in 0..4000 {
        let (mut buf, r) = inner();
        let outer = out.encapsulate(&mut buf, r).unwrap();
        let p = sealed(buf, outer);
        packets.push(Sealed {
            buf: p.buf.clone(),
            esp: p.esp.clone(),
            seq: p.seq,
        });
        packets.push(p);
    }
    // Reordered within windows of 64 packets (twice the replay window).
    for chunk in packets.chunks_mut(64) {
        rng.shuffle(chunk);
    }
    let total = packets.len() as u64;
    let (accepted, dropped) = receive(&inb, packets);
    let mut unique = accepted.clone();
    unique.dedup();
    assert_eq!(unique, accepted, "no number accepted twice");
    assert!(accepted.len() > 1000, "most pass: {}", accepted.len());
    assert!(dropped.iter().all(|d| *d == DropReason::Replay));
    let c = inb.counters();
    assert_eq!(c.packets, accepted.len() as u64);
    assert_eq!(c.packets + c.drops.total(), total);
}

/// A hard packet limit reached by several threads at once: it fires once,
/// and at most the packets already under way pass it.
#[test]
fn lifetimes_fire_once_under_contention() {
    let life = Lifetime {
        soft: Limits {
            packets: Some(500),
            ..Limits::default()
        },
        hard: Limits {
            packets: Some(1000),
            ..Limits::default()
        },
    };
    let out = OutboundSa::new(&params(false, 64, life), Instant::now()).unwrap();
    let (seqs, refused) = hammer(&out, 400, Take::OneByOne);
    assert!(
        (1000..1000 + THREADS).contains(&seqs.len()),
        "{} sent",
        seqs.len()
    );
    assert!(refused.iter().all(|r| *r == DropReason::Expired));
    let t = Instant::now();
    let events: Vec<_> = std::iter::from_fn(|| out.poll_expiry(t)).collect();
    assert_eq!(
        events,
        [Expiry::Soft(Limit::Packets), Expiry::Hard(Limit::Packets)]
    );
}

/// Leases of blocks from several threads: no number is sealed twice, the
/// numbers only grow with gaps where a block was left, and the SA's packet
/// and octet counts are exact once the leases are dropped.
#[test]
fn leases_from_several_threads_never_give_a_number_twice() {
    for seed in [1u64, 0x5eed_1ea5e, 0xdead_beef] {
        let out = OutboundSa::new(&params(false, 64, Lifetime::default()), Instant::now()).unwrap();
        let n = 2000;
        let (seqs, refused) = hammer(&out, n, Take::Leased { seed });
        assert!(refused.is_empty(), "seed {seed:#x}: {refused:?}");
        assert_eq!(seqs.len(), THREADS * n, "seed {seed:#x}");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seed {seed:#x}: a number sealed twice"
        );
        assert!(*seqs.last().unwrap() < out.next_seq(), "seed {seed:#x}");
        let c = out.counters();
        assert_eq!(c.packets, (THREADS * n) as u64, "seed {seed:#x}");
        assert_eq!(c.bytes, (THREADS * n * 60) as u64, "seed {seed:#x}");
    }
}

/// One lease at a time gives its unused numbers back; two interleaved, the
/// first one's are skipped, never given again.
#[test]
fn a_lease_gives_back_what_nobody_took_after_it() {
    let out = OutboundSa::new(&params(false, 64, Lifetime::default()), Instant::now()).unwrap();
    let send = |lease: &mut crate::sa::SeqLease<'_>| {
        let (mut buf, r) = inner();
        let outer = lease.encapsulate_on(&out.tunnel(), &mut buf, r).unwrap();
        sealed(buf, outer).seq
    };
    let mut a = out.lease();
    a.ahead(32);
    assert_eq!((send(&mut a), send(&mut a)), (1, 2));
    assert_eq!(out.next_seq(), 33, "the block is taken at once");
    drop(a);
    assert_eq!(out.next_seq(), 3, "30 given back");
    assert_eq!(out.counters().packets, 2);

    let (mut a, mut b) = (out.lease(), out.lease());
    a.ahead(10);
    b.ahead(10);
    assert_eq!(send(&mut a), 3);
    assert_eq!(send(&mut b), 13);
    drop(a); // 4..13 cannot go back: 13 was taken after them
    assert_eq!(out.next_seq(), 23);
    drop(b);
    assert_eq!(out.next_seq(), 14, "b's rest given back");
    assert_eq!(
        out.counters().packets,
        4,
        "a's 9 skipped numbers are no packets"
    );
    assert_eq!(
        out.encapsulate(&mut inner().0, HEADROOM..HEADROOM + 60)
            .map(|_| ()),
        Ok(())
    );
    assert_eq!(out.next_seq(), 15);
}

/// The end of the sequence space through leases under contention: the last
/// numbers are sealed once each and never wrap, with and without ESN.
#[test]
fn leases_stop_exactly_at_the_end_of_the_sequence_space() {
    for (esn, last) in [(false, u64::from(u32::MAX)), (true, u64::MAX)] {
        let mut out =
            OutboundSa::new(&params(esn, 64, Lifetime::default()), Instant::now()).unwrap();
        let (mut buf, r) = inner();
        let start = last - 1000;
        out.encapsulate_with(&mut buf, r, start, &start.to_be_bytes())
            .unwrap();
        let (seqs, refused) = hammer(&out, 600, Take::Leased { seed: 7 });
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "esn {esn}: twice");
        assert!(
            seqs.iter().all(|s| (start + 1..=last).contains(s)),
            "esn {esn}: only the numbers that were left"
        );
        assert_eq!(seqs.len() + refused.len(), THREADS * 600);
        assert!(
            refused
                .iter()
                .all(|r| matches!(r, DropReason::SequenceExhausted | DropReason::Expired)),
            "esn {esn}"
        );
        let (mut b, r) = inner();
        assert_eq!(out.encapsulate(&mut b, r), Err(DropReason::Expired));
    }
}

/// A hard byte limit inside one lease fires at the packet that reaches it,
/// before the lease's octets are added to the SA.
#[test]
fn a_lease_checks_the_byte_limit_per_packet() {
    let life = Lifetime {
        hard: Limits {
            bytes: Some(600),
            ..Limits::default()
        },
        ..Lifetime::default()
    };
    let out = OutboundSa::new(&params(false, 64, life), Instant::now()).unwrap();
    let mut lease = out.lease();
    lease.ahead(64);
    // Twice the packets the limit allows (a bounded loop: a limit that
    // never fires fails the assertion, it does not spin).
    let sent = (0..20)
        .take_while(|_| {
            lease
                .encapsulate_on(&out.tunnel(), &mut inner().0, HEADROOM..HEADROOM + 60)
                .is_ok()
        })
        .count();
    // The tenth packet reaches 600 octets: it is sealed and fires the limit.
    assert_eq!(sent, 10);
    drop(lease);
    assert_eq!(out.counters().bytes, 600);
    assert_eq!(out.counters().packets, 10);
    assert_eq!(
        out.poll_expiry(Instant::now()),
        Some(Expiry::Hard(Limit::Bytes))
    );
}
