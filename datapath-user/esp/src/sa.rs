//! One direction of a CHILD_SA: ESP tunnel mode (RFC 4303) over IPv4, with
//! optional UDP encapsulation (RFC 3948), processed in place.
//!
//! Encapsulation takes an inner IPv4 or IPv6 packet lying in a buffer with
//! headroom before it and tailroom after it, and writes the outer IPv4 header,
//! the UDP header (NAT-T), the ESP header and IV in front and the padding,
//! trailer and ICV behind. Decapsulation verifies and decrypts in place and
//! says where the inner packet is. Neither allocates.
//!
//! An SA is shared by every thread that uses it (`&self`), without a lock
//! per packet held across the crypto: its keys are fixed when it is
//! created; the outbound sequence number is an atomic, taken with a
//! compare-and-swap that never lets it wrap (exhaustion is exact, with or
//! without ESN), and counts the packets sent (the byte counter and the
//! lifetime thresholds share its cache line), the line every outbound packet of the SA
//! must own anyway. Inbound, a packet ahead of the anti-replay window's top
//! (read without a lock) goes straight to the ICV check; the window's commit
//! and the counters then take one short lock together, after the crypto (a
//! packet behind the top also takes it for the check). Crossing a byte or
//! packet limit takes a slow path that fires the lifetime event once; the
//! hard lifetime stops the SA for every thread (a packet already past the
//! check may still complete). Drops are counted in atomics of their own.

use core::ops::Range;
use std::{
    net::Ipv4Addr,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use aes::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};

use crate::{
    alg::Suite,
    crypto::{Cipher, CryptoError, Mac},
    policy::Selectors,
    replay::{ReplayError, ReplayWindow},
    wire::{
        ESP_HLEN, ESP_TRAILER, IPPROTO_ESP, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_NONE, IPPROTO_UDP,
        IPV4_HLEN, IPV6_HLEN, Ipv4Header, UDP_HLEN,
    },
};

/// UDP ports of an SA that is UDP-encapsulated (NAT-T).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NattPorts {
    pub local: u16,
    pub remote: u16,
}

/// The outer addresses of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    /// `Some` when ESP travels in UDP (RFC 3948).
    pub natt: Option<NattPorts>,
}

/// Limits of one kind of lifetime; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub bytes: Option<u64>,
    pub packets: Option<u64>,
    pub seconds: Option<u64>,
}

/// Soft (rekey) and hard (stop) lifetimes (RFC 4301 §4.4.2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    pub soft: Limits,
    pub hard: Limits,
}

/// Everything needed to create one direction of a CHILD_SA.
#[derive(Clone, Copy)]
pub struct SaParams<'a> {
    pub spi: u32,
    pub suite: Suite,
    /// This direction's KEYMAT slice (RFC 7296 §2.17): encryption key (with
    /// the salt for GCM), then the integrity key.
    pub keymat: &'a [u8],
    /// Extended (64-bit) sequence numbers, RFC 4304.
    pub esn: bool,
    /// Anti-replay window in packets (inbound; 0 disables it).
    pub replay_window: u32,
    pub tunnel: Tunnel,
    pub lifetime: Lifetime,
}

impl core::fmt::Debug for SaParams<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SaParams")
            .field("spi", &format_args!("{:08x}", self.spi))
            .field("suite", &self.suite)
            .field("keymat", &format_args!("<{} octets>", self.keymat.len()))
            .field("esn", &self.esn)
            .field("replay_window", &self.replay_window)
            .field("tunnel", &self.tunnel)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Errors creating an SA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaError {
    #[error("SPI {0:#x} is reserved (RFC 4303 §2.1: SPIs 0-255 are not used)")]
    ReservedSpi(u32),
    #[error("key material: {0}")]
    Key(#[from] CryptoError),
    #[error("random number generator failed")]
    Random,
}

/// Why a packet was not processed. Every drop is counted under its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Truncated or inconsistent outer packet or ESP payload.
    Malformed,
    /// No SA has this SPI (counted by the SA table, not an SA).
    UnknownSpi,
    /// Outside the anti-replay window, or a duplicate.
    Replay,
    /// The ICV did not verify.
    Authentication,
    /// Padding not as RFC 4303 §2.4 says, after a valid ICV.
    BadPadding,
    /// A TFC dummy packet (Next Header 59): dropped by design.
    Dummy,
    /// The decrypted inner packet is not IPv4/IPv6 or its length is wrong.
    BadInner,
    /// Not enough headroom or tailroom for the ESP overhead.
    NoRoom,
    /// The SA's hard lifetime is over.
    Expired,
    /// The sequence number space is used up (rekey was due).
    SequenceExhausted,
    /// Inbound: the decrypted packet is outside the SA's traffic selectors
    /// (RFC 4301 §5.2: its source not in the peer's, or its destination not
    /// in ours).
    SelectorMismatch,
    /// Outbound: no SA of the tunnel has selectors that cover the packet
    /// (RFC 4301 §5.1; counted by the SA table, per tunnel, not an SA).
    NoSelector,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        Self::Malformed,
        Self::UnknownSpi,
        Self::Replay,
        Self::Authentication,
        Self::BadPadding,
        Self::Dummy,
        Self::BadInner,
        Self::NoRoom,
        Self::Expired,
        Self::SequenceExhausted,
        Self::SelectorMismatch,
        Self::NoSelector,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownSpi => "unknown_spi",
            Self::Replay => "replay",
            Self::Authentication => "authentication",
            Self::BadPadding => "bad_padding",
            Self::Dummy => "dummy",
            Self::BadInner => "bad_inner",
            Self::NoRoom => "no_room",
            Self::Expired => "expired",
            Self::SequenceExhausted => "sequence_exhausted",
            Self::SelectorMismatch => "selector_mismatch",
            Self::NoSelector => "no_selector",
        }
    }
}

/// Drops, counted per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    pub fn record(&mut self, r: DropReason) {
        self.0[r as usize] += 1;
    }
    /// Adds `n` drops for reason `r` (counted elsewhere, e.g. per tunnel).
    pub fn record_n(&mut self, r: DropReason, n: u64) {
        self.0[r as usize] += n;
    }
    pub fn get(&self, r: DropReason) -> u64 {
        self.0[r as usize]
    }
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }
    pub fn add(&mut self, other: &DropCounters) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
}

/// What one SA direction has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaCounters {
    /// Packets encapsulated (outbound) or decapsulated (inbound).
    pub packets: u64,
    /// Inner-packet octets of those packets.
    pub bytes: u64,
    pub drops: DropCounters,
}

/// Which limit a lifetime event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Bytes,
    Packets,
    Seconds,
    /// The sequence number space (RFC 4303 §3.3.3): soft at 7/8 of it.
    Sequence,
}

/// A lifetime event; each fires once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Time to rekey.
    Soft(Limit),
    /// The SA no longer processes packets.
    Hard(Limit),
}

/// Lifetime events not yet fired or taken.
#[derive(Debug, Clone, Default)]
struct Events {
    soft: Option<Limit>,
    hard: Option<Limit>,
    /// Events not yet taken by `poll_expiry`.
    pending: [Option<Expiry>; 2],
}

/// What every packet of one direction touches, on one cache line: the
/// outbound sequence number and byte counter, the totals at which the next
/// lifetime limit is reached, and whether the hard lifetime is over.
#[derive(Debug, Default)]
#[repr(C, align(64))]
struct Hot {
    /// Next sequence number to send (outbound only; starts at 1, 0 once the
    /// space is used up).
    next_seq: AtomicU64,
    /// Numbers below `next_seq` that are no packet sent (skipped by a
    /// known-answer test, taken by a packet that failed after, or left
    /// unused in a [`SeqLease`] that could not give them back), wrapping:
    /// the packets sent are `next_seq - 1 - unsent`, one locked
    /// instruction fewer than a counter of their own.
    unsent: AtomicU64,
    bytes: AtomicU64,
    /// Totals at which a limit not yet fired is reached (`u64::MAX`: none).
    packets_limit: AtomicU64,
    bytes_limit: AtomicU64,
    /// The hard lifetime is over: nothing more is processed.
    expired: AtomicBool,
    /// The soft sequence-number limit has been signalled.
    seq_soft: AtomicBool,
}

/// Drops, counted per reason, by any thread.
#[derive(Debug, Default)]
struct AtomicDrops([AtomicU64; DropReason::ALL.len()]);

impl AtomicDrops {
    fn record(&self, r: DropReason) {
        self.0[r as usize].fetch_add(1, Ordering::Relaxed);
    }
    fn load(&self) -> DropCounters {
        let mut d = DropCounters::default();
        for r in DropReason::ALL {
            d.record_n(r, self.0[r as usize].load(Ordering::Relaxed));
        }
        d
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lifetime accounting of one direction; the counters it watches are in
/// its [`Hot`] line.
#[derive(Debug)]
struct Life {
    lifetime: Lifetime,
    created: Instant,
    /// Taken only when a limit is crossed and by `poll_expiry`.
    events: Mutex<Events>,
}

impl Life {
    fn new(lifetime: Lifetime, now: Instant, hot: &Hot) -> Self {
        let life = Self {
            lifetime,
            created: now,
            events: Mutex::new(Events::default()),
        };
        life.set_thresholds(&Events::default(), hot);
        life
    }

    /// The totals at which the next limit not yet fired is reached.
    fn set_thresholds(&self, ev: &Events, hot: &Hot) {
        let (soft, hard) = (&self.lifetime.soft, &self.lifetime.hard);
        let next = |s: Option<u64>, h: Option<u64>| {
            if ev.hard.is_some() {
                return u64::MAX;
            }
            let s = if ev.soft.is_none() { s } else { None };
            s.unwrap_or(u64::MAX).min(h.unwrap_or(u64::MAX))
        };
        hot.packets_limit
            .store(next(soft.packets, hard.packets), Ordering::Relaxed);
        hot.bytes_limit
            .store(next(soft.bytes, hard.bytes), Ordering::Relaxed);
    }

    fn fire(&self, e: Expiry, hot: &Hot) {
        let mut ev = lock(&self.events);
        self.fire_locked(&mut ev, e, hot);
    }

    fn fire_locked(&self, ev: &mut Events, e: Expiry, hot: &Hot) {
        match e {
            Expiry::Soft(l) if ev.soft.is_none() && ev.hard.is_none() => ev.soft = Some(l),
            Expiry::Hard(l) if ev.hard.is_none() => {
                ev.hard = Some(l);
                hot.expired.store(true, Ordering::Relaxed);
            }
            _ => return,
        }
        if let Some(slot) = ev.pending.iter_mut().find(|p| p.is_none()) {
            *slot = Some(e);
        }
        self.set_thresholds(ev, hot);
    }

    /// Checks the byte and packet limits for outbound packet `seq` of
    /// `bytes` octets, `pending` octets before it not yet added to `hot`
    /// (a lease's); fires what is crossed (rarely).
    #[inline]
    fn account(&self, hot: &Hot, seq: u64, pending: u64, bytes: u64) {
        let total = hot.bytes.load(Ordering::Relaxed) + pending + bytes;
        let packets = seq.wrapping_sub(hot.unsent.load(Ordering::Relaxed));
        self.check(hot, packets, total);
    }

    /// Whether totals of `packets` and `total` octets reach a limit.
    fn crossed(hot: &Hot, packets: u64, total: u64) -> bool {
        packets >= hot.packets_limit.load(Ordering::Relaxed)
            || total >= hot.bytes_limit.load(Ordering::Relaxed)
    }

    /// Fires what totals of `packets` and `total` octets reach.
    #[inline]
    fn check(&self, hot: &Hot, packets: u64, total: u64) {
        if Self::crossed(hot, packets, total) {
            self.fire_crossed(hot, packets, total);
        }
    }

    /// The slow path of [`Life::check`], once a threshold is crossed.
    #[cold]
    #[inline(never)]
    fn fire_crossed(&self, hot: &Hot, packets: u64, total: u64) {
        let mut ev = lock(&self.events);
        let over = |l: &Limits| {
            if l.bytes.is_some_and(|b| total >= b) {
                Some(Limit::Bytes)
            } else if l.packets.is_some_and(|p| packets >= p) {
                Some(Limit::Packets)
            } else {
                None
            }
        };
        if ev.hard.is_none()
            && let Some(l) = over(&self.lifetime.hard)
        {
            self.fire_locked(&mut ev, Expiry::Hard(l), hot);
        } else if ev.soft.is_none()
            && let Some(l) = over(&self.lifetime.soft)
        {
            self.fire_locked(&mut ev, Expiry::Soft(l), hot);
        }
    }

    fn poll(&self, now: Instant, hot: &Hot) -> Option<Expiry> {
        let mut ev = lock(&self.events);
        let age = now.saturating_duration_since(self.created).as_secs();
        if self.lifetime.hard.seconds.is_some_and(|s| age >= s) {
            self.fire_locked(&mut ev, Expiry::Hard(Limit::Seconds), hot);
        } else if self.lifetime.soft.seconds.is_some_and(|s| age >= s) {
            self.fire_locked(&mut ev, Expiry::Soft(Limit::Seconds), hot);
        }
        let first = ev.pending[0].take();
        ev.pending[0] = ev.pending[1].take();
        first
    }
}

fn counters_of(hot: &Hot, drops: &AtomicDrops) -> SaCounters {
    let unsent = hot.unsent.load(Ordering::Relaxed);
    let next = hot.next_seq.load(Ordering::Relaxed);
    SaCounters {
        packets: next.wrapping_sub(1).wrapping_sub(unsent),
        bytes: hot.bytes.load(Ordering::Relaxed),
        drops: drops.load(),
    }
}

/// Unpredictable, unique CBC IVs: each is the packet's sequence number
/// (unique per SA) encrypted under a random per-SA key (RFC 3602 §2 wants
/// IVs that cannot be predicted).
struct IvGen {
    key: aes::Aes128,
}

impl IvGen {
    fn new() -> Result<Self, SaError> {
        use ring::rand::SecureRandom;
        let mut k = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| SaError::Random)?;
        Ok(Self {
            key: aes::Aes128::new(GenericArray::from_slice(&k)),
        })
    }

    fn iv(&self, seq: u64, out: &mut [u8]) {
        let mut block = GenericArray::from(u128::from(seq).to_be_bytes());
        self.key.encrypt_block(&mut block);
        let n = out.len().min(16);
        out[..n].copy_from_slice(&block[..n]);
    }
}

fn check_spi(spi: u32) -> Result<(), SaError> {
    if spi < 256 {
        Err(SaError::ReservedSpi(spi))
    } else {
        Ok(())
    }
}

/// Keys one direction's cipher and MAC from its KEYMAT slice.
fn key(suite: Suite, keymat: &[u8]) -> Result<(Cipher, Option<Mac>), SaError> {
    if keymat.len() != suite.keymat_len() {
        return Err(SaError::Key(CryptoError::KeyLength {
            alg: "CHILD_SA",
            got: keymat.len(),
            want: suite.keymat_len(),
        }));
    }
    let (ek, ik) = keymat.split_at(suite.encr.keymat_len());
    let cipher = Cipher::new(suite.encr, ek)?;
    let mac = match suite.integ {
        Some(i) => Some(Mac::new(i, ik)?),
        None => None,
    };
    Ok((cipher, mac))
}

/// The AAD of AES-GCM in ESP (RFC 4106 §5): SPI and sequence number, the
/// high half of an extended sequence number between them. Returns the
/// buffer and how much of it is used (8 or 12 octets).
pub fn esp_aad(spi: u32, seq: u64, esn: bool) -> ([u8; 12], usize) {
    let mut aad = [0u8; 12];
    aad[..4].copy_from_slice(&spi.to_be_bytes());
    if esn {
        aad[4..8].copy_from_slice(&((seq >> 32) as u32).to_be_bytes());
        aad[8..12].copy_from_slice(&(seq as u32).to_be_bytes());
        (aad, 12)
    } else {
        aad[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        (aad, 8)
    }
}

/// The sizes of a suite that every packet needs, worked out once when the
/// SA is created: the `Suite` methods match on its algorithms, a few
/// instructions each, several times per packet.
#[derive(Debug, Clone, Copy)]
struct Shape {
    aead: bool,
    iv: usize,
    icv: usize,
    /// The padding block, less one (blocks are powers of two: 4, 8, 16).
    mask: usize,
}

impl Shape {
    fn of(suite: Suite) -> Self {
        Self {
            aead: suite.encr.is_aead(),
            iv: suite.encr.iv_len(),
            icv: suite.icv_len(),
            mask: suite.encr.block_len().max(4) - 1,
        }
    }

    /// Padding so that payload + pad + trailer is a multiple of the
    /// cipher's block and of 4 (RFC 4303 §2.4): a mask, not a division (a
    /// 64-bit division is tens of cycles, on every packet).
    fn pad(self, payload: usize) -> usize {
        (self.mask + 1 - ((payload + ESP_TRAILER) & self.mask)) & self.mask
    }
}

/// What encapsulation takes from the inner header.
#[derive(Clone, Copy)]
struct InnerInfo {
    next_header: u8,
    tos: u8,
    df: bool,
}

/// The outbound direction of a CHILD_SA.
pub struct OutboundSa {
    hot: Hot,
    spi: u32,
    suite: Suite,
    shape: Shape,
    cipher: Cipher,
    mac: Option<Mac>,
    esn: bool,
    /// The outer addresses it was created with (see [`OutboundSa::encapsulate_on`]).
    tunnel: Tunnel,
    iv: Option<IvGen>,
    life: Life,
    drops: AtomicDrops,
}

impl core::fmt::Debug for OutboundSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "OutboundSa(spi {:08x}, {}, next seq {})",
            self.spi,
            self.suite,
            self.next_seq()
        )
    }
}

impl OutboundSa {
    pub fn new(p: &SaParams<'_>, now: Instant) -> Result<Self, SaError> {
        check_spi(p.spi)?;
        let (cipher, mac) = key(p.suite, p.keymat)?;
        let iv = if p.suite.encr.is_aead() {
            None
        } else {
            Some(IvGen::new()?)
        };
        let hot = Hot {
            next_seq: AtomicU64::new(1),
            ..Hot::default()
        };
        let life = Life::new(p.lifetime, now, &hot);
        Ok(Self {
            hot,
            spi: p.spi,
            suite: p.suite,
            shape: Shape::of(p.suite),
            cipher,
            mac,
            esn: p.esn,
            tunnel: p.tunnel,
            iv,
            life,
            drops: AtomicDrops::default(),
        })
    }

    pub fn spi(&self) -> u32 {
        self.spi
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    pub fn tunnel(&self) -> Tunnel {
        self.tunnel
    }

    /// Updates the outer addresses/ports (NAT-T port float, RFC 7296 §2.23)
    /// of an SA that one owner uses; a shared SA is given its current outer
    /// addresses with each packet ([`OutboundSa::encapsulate_on`]).
    pub fn set_tunnel(&mut self, tunnel: Tunnel) {
        self.tunnel = tunnel;
    }

    pub fn counters(&self) -> SaCounters {
        counters_of(&self.hot, &self.drops)
    }

    /// The next sequence number this SA would send.
    pub fn next_seq(&self) -> u64 {
        self.hot.next_seq.load(Ordering::Relaxed)
    }

    /// Octets needed in front of the inner packet.
    pub fn headroom(&self) -> usize {
        headroom(self.shape, &self.tunnel)
    }

    /// Octets needed behind an inner packet of `inner_len` octets.
    pub fn tailroom(&self, inner_len: usize) -> usize {
        self.shape.pad(inner_len) + ESP_TRAILER + self.shape.icv
    }

    fn max_seq(&self) -> u64 {
        if self.esn {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        }
    }

    /// Takes up to `n` (at least 1) consecutive sequence numbers, `start..end`
    /// (`end` wrapping to 0 after `u64::MAX`), or refuses when the space is
    /// used up. A compare-and-swap, so that the counter never moves past the
    /// end of the space (with ESN it becomes 0 after `u64::MAX` and stays
    /// there): no number is ever given twice, whatever the threads.
    fn take_block(&self, n: u64) -> Result<(u64, u64), DropReason> {
        let (max, n) = (self.max_seq(), n.max(1));
        // `s..=max` are left: `max - s + 1` of them.
        let end = |s: u64| {
            if n > max - s {
                max.wrapping_add(1)
            } else {
                s + n
            }
        };
        match self
            .hot
            .next_seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s != 0 && s <= max).then(|| end(s))
            }) {
            Ok(s) => Ok((s, end(s))),
            Err(_) => {
                self.life.fire(Expiry::Hard(Limit::Sequence), &self.hot);
                Err(self.drop(DropReason::SequenceExhausted))
            }
        }
    }

    /// An empty lease of sequence numbers on this SA, for one thread's
    /// batch of packets (see [`SeqLease`]).
    pub fn lease(&self) -> SeqLease<'_> {
        self.lease_to(&self.tunnel)
    }

    /// [`OutboundSa::lease`] with its outer headers ready for `tunnel`,
    /// the outer addresses its packets will be given.
    pub fn lease_to(&self, tunnel: &Tunnel) -> SeqLease<'_> {
        SeqLease {
            sa: self,
            next: 0,
            end: 0,
            ahead: 1,
            bytes: 0,
            unsent: 0,
            outer: OuterHeaders::new(tunnel),
        }
    }

    fn drop(&self, r: DropReason) -> DropReason {
        self.drops.record(r);
        r
    }

    /// Encapsulates the inner packet at `buf[inner]` in place; returns where
    /// the outer IPv4 packet now lies in `buf`. For a batch, a
    /// [`SeqLease`] takes the shared counters once, not per packet.
    pub fn encapsulate(
        &self,
        buf: &mut [u8],
        inner: Range<usize>,
    ) -> Result<Range<usize>, DropReason> {
        self.encapsulate_on(&self.tunnel, buf, inner)
    }

    /// [`OutboundSa::encapsulate`] with the outer addresses `tunnel` (those
    /// of the SA once its endpoints moved; its NAT-T must not change).
    pub fn encapsulate_on(
        &self,
        tunnel: &Tunnel,
        buf: &mut [u8],
        inner: Range<usize>,
    ) -> Result<Range<usize>, DropReason> {
        self.lease_to(tunnel).encapsulate_on(tunnel, buf, inner)
    }

    /// Encapsulates with a given sequence number and IV, for known-answer
    /// tests. The caller must never reuse a (key, IV) pair.
    pub fn encapsulate_with(
        &mut self,
        buf: &mut [u8],
        inner: Range<usize>,
        seq: u64,
        iv: &[u8],
    ) -> Result<Range<usize>, DropReason> {
        let tunnel = self.tunnel;
        let info = self.check(&tunnel, buf, &inner)?;
        if iv.len() != self.shape.iv {
            return Err(self.drop(DropReason::Malformed));
        }
        let next = self.hot.next_seq.get_mut();
        let old = *next;
        *next = old.max(seq.wrapping_add(1));
        // The numbers jumped over are no packets; one behind `next` is one more.
        let jumped = (*next).wrapping_sub(old);
        let unsent = self.hot.unsent.get_mut();
        *unsent = unsent.wrapping_add(jumped).wrapping_sub(1);
        let bytes = inner.len() as u64;
        let outer = OuterHeaders::new(&tunnel);
        let r = self.seal(&outer, buf, inner, info, seq, iv, 0);
        match r {
            Ok(_) => *self.hot.bytes.get_mut() += bytes,
            Err(_) => {
                let unsent = self.hot.unsent.get_mut();
                *unsent = unsent.wrapping_add(1);
            }
        }
        r
    }

    /// Checks the room around the inner packet and reads from its header the
    /// Next Header value and the outer TOS and DF bit.
    fn check(
        &self,
        tunnel: &Tunnel,
        buf: &[u8],
        inner: &Range<usize>,
    ) -> Result<InnerInfo, DropReason> {
        let len = buf.len();
        if inner.start > inner.end || inner.end > len {
            return Err(self.drop(DropReason::Malformed));
        }
        if inner.start < headroom(self.shape, tunnel)
            || len - inner.end < self.tailroom(inner.len())
        {
            return Err(self.drop(DropReason::NoRoom));
        }
        let p = &buf[inner.clone()];
        match p.first().map(|b| b >> 4) {
            Some(4) if p.len() >= IPV4_HLEN => Ok(InnerInfo {
                next_header: IPPROTO_IPIP,
                tos: p[1],
                df: p[6] & 0x40 != 0,
            }),
            Some(6) if p.len() >= IPV6_HLEN => Ok(InnerInfo {
                next_header: IPPROTO_IPV6,
                tos: (p[0] << 4) | (p[1] >> 4),
                df: false,
            }),
            _ => Err(self.drop(DropReason::BadInner)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn seal(
        &self,
        outer: &OuterHeaders,
        buf: &mut [u8],
        inner: Range<usize>,
        InnerInfo {
            next_header,
            tos,
            df,
        }: InnerInfo,
        seq: u64,
        iv: &[u8],
        pending: u64,
    ) -> Result<Range<usize>, DropReason> {
        let shape = self.shape;
        let inner_len = inner.len();
        // The limits are checked before the packet is sealed; its octets
        // are counted by the caller once it is (not at all if it fails).
        self.life.account(&self.hot, seq, pending, inner_len as u64);
        if seq >= self.max_seq() / 8 * 7
            && !self.hot.seq_soft.load(Ordering::Relaxed)
            && !self.hot.seq_soft.swap(true, Ordering::Relaxed)
        {
            self.life.fire(Expiry::Soft(Limit::Sequence), &self.hot);
        }
        let pad = shape.pad(inner_len);
        let ct_start = inner.start;
        let ct_end = inner.end + pad + ESP_TRAILER;
        match buf.get_mut(inner.end..inner.end + PADDING.len()) {
            // One store of all the padding there could be: what lies past
            // the trailer is where the ICV goes (at least 16 octets), and
            // is written over by it.
            Some(w) if shape.icv >= PADDING.len() => w.copy_from_slice(&PADDING),
            _ => buf[inner.end..inner.end + pad].copy_from_slice(&PADDING[..pad]),
        }
        buf[ct_end - 2] = pad as u8;
        buf[ct_end - 1] = next_header;

        let iv_len = shape.iv;
        let esp = ct_start - iv_len - ESP_HLEN;
        let start = esp - outer.header_len();
        buf[esp..esp + 4].copy_from_slice(&self.spi.to_be_bytes());
        buf[esp + 4..esp + 8].copy_from_slice(&(seq as u32).to_be_bytes());
        buf[esp + 8..ct_start].copy_from_slice(iv);
        let icv = shape.icv;
        let seq_hi = ((seq >> 32) as u32).to_be_bytes();
        if shape.aead {
            let (aad, aad_len) = esp_aad(self.spi, seq, self.esn);
            let aad = &aad[..aad_len];
            // The IV from the caller, not read back from `buf`: a load of
            // octets just stored would wait for the store.
            if self
                .cipher
                .aead_seal(iv, aad, &mut buf[ct_start..ct_end + icv])
                .is_err()
            {
                return Err(self.drop(DropReason::Malformed));
            }
        } else {
            let (head, rest) = buf.split_at_mut(ct_start);
            if self
                .cipher
                .cbc_encrypt(&head[esp + 8..], &mut rest[..ct_end - ct_start])
                .is_err()
            {
                return Err(self.drop(DropReason::Malformed));
            }
            let Some(mac) = &self.mac else {
                return Err(self.drop(DropReason::Malformed));
            };
            let (covered, tail) = buf.split_at_mut(ct_end);
            // RFC 4303 §3.3.2.1: with ESN the high half is appended for the ICV only.
            let hi: &[u8] = if self.esn { &seq_hi } else { &[] };
            if mac.sign(&[&covered[esp..], hi], &mut tail[..icv]).is_err() {
                return Err(self.drop(DropReason::Malformed));
            }
        }
        let end = ct_end + icv;
        // The identification only has to differ between the SA's packets in
        // flight (RFC 6864): the low half of the unique sequence number does.
        outer.write(
            &mut buf[start..esp],
            tos,
            (end - start) as u16,
            seq as u16,
            df,
        );
        Ok(start..end)
    }

    /// The next lifetime event, if any (call periodically with the time).
    pub fn poll_expiry(&self, now: Instant) -> Option<Expiry> {
        self.life.poll(now, &self.hot)
    }
}

/// The outer IPv4 header and, with NAT-T, UDP header (RFC 3948 §2.1) in
/// front of the packets to one tunnel, with what stays the same written
/// once (see [`Ipv4Header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterHeaders {
    tunnel: Tunnel,
    ip: Ipv4Header,
    /// The ports; the length is written per packet, and the checksum
    /// SHOULD be zero (RFC 3948 §2.1): it stays so.
    udp: [u8; UDP_HLEN],
}

impl OuterHeaders {
    pub fn new(tunnel: &Tunnel) -> Self {
        let proto = if tunnel.natt.is_some() {
            IPPROTO_UDP
        } else {
            IPPROTO_ESP
        };
        let mut udp = [0u8; UDP_HLEN];
        if let Some(ports) = tunnel.natt {
            udp[..2].copy_from_slice(&ports.local.to_be_bytes());
            udp[2..4].copy_from_slice(&ports.remote.to_be_bytes());
        }
        Self {
            tunnel: *tunnel,
            ip: Ipv4Header::new(proto, tunnel.local, tunnel.remote),
            udp,
        }
    }

    pub fn tunnel(&self) -> Tunnel {
        self.tunnel
    }

    /// Octets of the headers: IPv4, and UDP with NAT-T.
    pub fn header_len(&self) -> usize {
        IPV4_HLEN
            + if self.tunnel.natt.is_some() {
                UDP_HLEN
            } else {
                0
            }
    }

    /// Writes the headers into `h` (at least [`OuterHeaders::header_len`] octets)
    /// for an outer packet of `total` octets.
    pub fn write(&self, h: &mut [u8], tos: u8, total: u16, id: u16, df: bool) {
        self.ip.write(h, tos, total, id, df);
        if self.tunnel.natt.is_some() {
            let u = &mut h[IPV4_HLEN..IPV4_HLEN + UDP_HLEN];
            u.copy_from_slice(&self.udp);
            u[4..6].copy_from_slice(&(total - IPV4_HLEN as u16).to_be_bytes());
        }
    }
}

/// The padding octets of RFC 4303 §2.4 (1, 2, 3, ...), as many as the
/// largest block (16) can need.
const PADDING: [u8; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

/// Sequence numbers that an [`OutboundSa`] gave one thread in one go, and
/// the packets that thread sealed with them, settled with the SA when the
/// lease is dropped. A batch of packets then costs the SA's shared line one
/// locked instruction for its numbers and one for its octets, not one of
/// each per packet: a locked instruction waits for every store before it,
/// so per packet it also kept one packet's crypto from overlapping the
/// next one's, and with several workers on one SA it moves the line
/// between their cores.
///
/// Numbers stay unique whatever the threads: each block is taken by one
/// compare-and-swap that never passes the end of the space. The numbers a
/// lease did not use go back to the SA if nobody took any after them (one
/// thread per SA, the usual case), and are otherwise skipped: RFC 4303
/// §3.3.3 has the sender count up by one per packet, and to the receiver
/// (§3.4.3) a skipped number is a packet lost, which its window accepts
/// as it does any loss. Two threads sending on one SA put their
/// blocks on the wire in either order, as their TX batches already did
/// with numbers taken one by one, so the reordering a receiver's window
/// sees is bounded by the batches either way.
///
/// The lifetime limits are checked per packet against the SA's octets plus
/// this lease's; the octets of other threads' open leases (a batch each)
/// are seen once those are settled.
pub struct SeqLease<'a> {
    sa: &'a OutboundSa,
    /// The next number to use, and the end of the block (exclusive,
    /// wrapping to 0 after `u64::MAX`); equal when the lease holds none.
    next: u64,
    end: u64,
    /// How many numbers the next block takes.
    ahead: u64,
    /// The octets sealed with this lease, and the numbers it used for
    /// packets that failed after.
    bytes: u64,
    unsent: u64,
    /// The outer headers of the tunnel its last packet went to.
    outer: OuterHeaders,
}

impl SeqLease<'_> {
    /// How many packets (this one included) the caller expects to seal in
    /// this lease: the size of the next block it takes, when it holds no
    /// number. More than it uses wastes numbers only when another thread
    /// takes a block of the same SA before this lease is dropped.
    pub fn ahead(&mut self, n: u64) {
        self.ahead = n.max(1);
    }

    /// Whether this lease is on `sa`.
    pub fn is_of(&self, sa: &OutboundSa) -> bool {
        core::ptr::eq(self.sa, sa)
    }

    /// [`OutboundSa::encapsulate_on`] with a number from this lease.
    pub fn encapsulate_on(
        &mut self,
        tunnel: &Tunnel,
        buf: &mut [u8],
        inner: Range<usize>,
    ) -> Result<Range<usize>, DropReason> {
        let sa = self.sa;
        let mut iv = [0u8; 16];
        let iv_len = sa.shape.iv;
        let info = sa.check(tunnel, buf, &inner)?;
        if sa.hot.expired.load(Ordering::Relaxed) {
            return Err(sa.drop(DropReason::Expired));
        }
        if self.next == self.end {
            (self.next, self.end) = sa.take_block(self.ahead)?;
        }
        let seq = self.next;
        self.next = seq.wrapping_add(1);
        match &sa.iv {
            Some(g) => g.iv(seq, &mut iv[..iv_len]),
            // GCM: the sequence number is unique per key, which is all RFC 4106 §3.1 asks.
            None => iv[..8].copy_from_slice(&seq.to_be_bytes()),
        }
        let bytes = inner.len() as u64;
        if self.outer.tunnel != *tunnel {
            self.outer = OuterHeaders::new(tunnel);
        }
        let r = sa.seal(
            &self.outer,
            buf,
            inner,
            info,
            seq,
            &iv[..iv_len],
            self.bytes,
        );
        match r {
            Ok(_) => self.bytes += bytes,
            Err(_) => self.unsent += 1,
        }
        r
    }
}

impl Drop for SeqLease<'_> {
    /// Gives back the numbers not used, if nobody took any after them, and
    /// adds the lease's counts to the SA.
    fn drop(&mut self) {
        let hot = &self.sa.hot;
        let unused = self.end.wrapping_sub(self.next);
        if unused != 0
            && hot
                .next_seq
                .compare_exchange(self.end, self.next, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unsent = self.unsent.wrapping_add(unused);
        }
        if self.unsent != 0 {
            hot.unsent.fetch_add(self.unsent, Ordering::Relaxed);
        }
        if self.bytes != 0 {
            hot.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Octets an SA of this `shape` needs in front of the inner packet.
fn headroom(shape: Shape, tunnel: &Tunnel) -> usize {
    IPV4_HLEN + if tunnel.natt.is_some() { UDP_HLEN } else { 0 } + ESP_HLEN + shape.iv
}

/// Where a decapsulated packet is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decapsulated {
    /// The inner IP packet, TFC padding removed.
    pub inner: Range<usize>,
    /// 4 (IPv4) or 41 (IPv6).
    pub next_header: u8,
    /// Its full (ESN-inferred) sequence number.
    pub seq: u64,
}

/// What the inbound direction changes per packet, under one short lock:
/// the window's commit and the counters, together.
#[derive(Debug)]
struct Received {
    window: ReplayWindow,
    packets: u64,
    bytes: u64,
}

/// The inbound direction of a CHILD_SA.
pub struct InboundSa {
    /// Its lifetime thresholds and expiry (its counters are in `received`).
    hot: Hot,
    /// The window's top, read without the lock: a packet ahead of it needs
    /// the lock only for its commit (in-order traffic, the common case).
    top: AtomicU64,
    window_size: u32,
    spi: u32,
    suite: Suite,
    shape: Shape,
    cipher: Cipher,
    mac: Option<Mac>,
    esn: bool,
    /// Taken once per packet, for the commit after the ICV verified (and
    /// for the check before it when the packet is not ahead of `top`);
    /// never across the crypto.
    received: Mutex<Received>,
    tunnel: Tunnel,
    life: Life,
    drops: AtomicDrops,
    /// Checked against every decrypted packet; `None` checks nothing.
    selectors: Option<Selectors>,
}

impl core::fmt::Debug for InboundSa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "InboundSa(spi {:08x}, {}, {:?})",
            self.spi,
            self.suite,
            lock(&self.received).window
        )
    }
}

impl InboundSa {
    pub fn new(p: &SaParams<'_>, now: Instant) -> Result<Self, SaError> {
        check_spi(p.spi)?;
        let (cipher, mac) = key(p.suite, p.keymat)?;
        let hot = Hot::default();
        let life = Life::new(p.lifetime, now, &hot);
        let window = ReplayWindow::new(p.replay_window, p.esn);
        Ok(Self {
            hot,
            top: AtomicU64::new(window.top()),
            window_size: window.size(),
            spi: p.spi,
            suite: p.suite,
            shape: Shape::of(p.suite),
            cipher,
            mac,
            esn: p.esn,
            received: Mutex::new(Received {
                window,
                packets: 0,
                bytes: 0,
            }),
            tunnel: p.tunnel,
            life,
            drops: AtomicDrops::default(),
            selectors: None,
        })
    }

    /// The traffic selectors every decrypted packet must match (RFC 4301
    /// §5.2); until set, none are checked.
    pub fn set_selectors(&mut self, s: Selectors) {
        self.selectors = Some(s);
    }

    pub fn selectors(&self) -> Option<&Selectors> {
        self.selectors.as_ref()
    }

    pub fn spi(&self) -> u32 {
        self.spi
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    pub fn tunnel(&self) -> Tunnel {
        self.tunnel
    }

    pub fn set_tunnel(&mut self, tunnel: Tunnel) {
        self.tunnel = tunnel;
    }

    pub fn counters(&self) -> SaCounters {
        let r = lock(&self.received);
        SaCounters {
            packets: r.packets,
            bytes: r.bytes,
            drops: self.drops.load(),
        }
    }

    /// Counts a drop that happened before this SA could look at the packet
    /// (e.g. the worker found the outer packet malformed after the SPI).
    pub fn record_drop(&self, r: DropReason) {
        self.drops.record(r);
    }

    fn drop(&self, r: DropReason) -> DropReason {
        self.drops.record(r);
        r
    }

    /// Verifies, decrypts and unwraps the ESP packet at `buf[esp]` (from the
    /// ESP header to the end of the ICV) in place.
    pub fn decapsulate(
        &self,
        buf: &mut [u8],
        esp: Range<usize>,
    ) -> Result<Decapsulated, DropReason> {
        if esp.start > esp.end || esp.end > buf.len() {
            return Err(self.drop(DropReason::Malformed));
        }
        if self.hot.expired.load(Ordering::Relaxed) {
            return Err(self.drop(DropReason::Expired));
        }
        let shape = self.shape;
        let (iv_len, icv) = (shape.iv, shape.icv);
        let overhead = ESP_HLEN + iv_len + icv;
        let ct_start = esp.start + ESP_HLEN + iv_len;
        let Some(ct_len) = esp.len().checked_sub(overhead) else {
            return Err(self.drop(DropReason::Malformed));
        };
        if ct_len < ESP_TRAILER || ct_len & shape.mask != 0 {
            return Err(self.drop(DropReason::Malformed));
        }
        let ct_end = ct_start + ct_len;
        let h = &buf[esp.start..esp.start + ESP_HLEN];
        if u32::from_be_bytes([h[0], h[1], h[2], h[3]]) != self.spi {
            return Err(self.drop(DropReason::UnknownSpi));
        }
        let seq_low = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        // RFC 4303 §3.4.3: the replay check comes before the ICV check.
        let top = self.top.load(Ordering::Acquire);
        let checked = match ReplayWindow::ahead_of(top, self.window_size, self.esn, seq_low) {
            Some(seq) => Ok(seq),
            None => lock(&self.received).window.check(seq_low),
        };
        let seq = match checked {
            Ok(s) => s,
            Err(ReplayError::Duplicate | ReplayError::TooOld) => {
                return Err(self.drop(DropReason::Replay));
            }
        };
        let seq_hi = ((seq >> 32) as u32).to_be_bytes();
        if shape.aead {
            let (aad, aad_len) = esp_aad(self.spi, seq, self.esn);
            let aad = &aad[..aad_len];
            let (head, rest) = buf.split_at_mut(ct_start);
            if self
                .cipher
                .aead_open(
                    &head[esp.start + ESP_HLEN..],
                    aad,
                    &mut rest[..ct_len + icv],
                )
                .is_err()
            {
                return Err(self.drop(DropReason::Authentication));
            }
        } else {
            let Some(mac) = &self.mac else {
                return Err(self.drop(DropReason::Malformed));
            };
            let hi: &[u8] = if self.esn { &seq_hi } else { &[] };
            if mac
                .verify(&[&buf[esp.start..ct_end], hi], &buf[ct_end..ct_end + icv])
                .is_err()
            {
                return Err(self.drop(DropReason::Authentication));
            }
            let (head, rest) = buf.split_at_mut(ct_start);
            if self
                .cipher
                .cbc_decrypt(&head[esp.start + ESP_HLEN..], &mut rest[..ct_len])
                .is_err()
            {
                return Err(self.drop(DropReason::Malformed));
            }
        }
        // Authentic: what it holds is read now, and the commit that marks
        // its number (whatever it holds) and counts it is one lock.
        let unwrapped = self.unwrap(buf, ct_start, ct_end, ct_len);
        let mut r = lock(&self.received);
        // Another thread may have had the same number meanwhile: the commit
        // decides which one passes.
        if r.window.commit(seq).is_err() {
            drop(r);
            return Err(self.drop(DropReason::Replay));
        }
        self.top.store(r.window.top(), Ordering::Release);
        let (inner, next_header) = match unwrapped {
            Ok(u) => u,
            Err(e) => {
                drop(r);
                return Err(self.drop(e));
            }
        };
        r.packets += 1;
        r.bytes += inner.len() as u64;
        let (packets, bytes) = (r.packets, r.bytes);
        drop(r);
        self.life.check(&self.hot, packets, bytes);
        Ok(Decapsulated {
            inner,
            next_header,
            seq,
        })
    }

    /// Reads the decrypted payload `buf[ct_start..ct_end]`: padding, Next
    /// Header, the inner packet and its selectors. Returns where the inner
    /// packet is and its Next Header.
    fn unwrap(
        &self,
        buf: &[u8],
        ct_start: usize,
        ct_end: usize,
        ct_len: usize,
    ) -> Result<(Range<usize>, u8), DropReason> {
        let pad = usize::from(buf[ct_end - 2]);
        let next_header = buf[ct_end - 1];
        if pad + ESP_TRAILER > ct_len {
            return Err(DropReason::BadPadding);
        }
        let payload_end = ct_end - ESP_TRAILER - pad;
        if buf[payload_end..payload_end + pad]
            .iter()
            .enumerate()
            .any(|(i, b)| usize::from(*b) != i + 1)
        {
            return Err(DropReason::BadPadding);
        }
        let payload = ct_start..payload_end;
        let inner_len = match next_header {
            IPPROTO_NONE => return Err(DropReason::Dummy),
            IPPROTO_IPIP => match buf.get(payload.start..payload.start + IPV4_HLEN) {
                Some(ih) if ih[0] >> 4 == 4 => usize::from(u16::from_be_bytes([ih[2], ih[3]])),
                _ => return Err(DropReason::BadInner),
            },
            IPPROTO_IPV6 => match buf.get(payload.start..payload.start + IPV6_HLEN) {
                Some(ih) if ih[0] >> 4 == 6 => {
                    IPV6_HLEN + usize::from(u16::from_be_bytes([ih[4], ih[5]]))
                }
                _ => return Err(DropReason::BadInner),
            },
            _ => return Err(DropReason::BadInner),
        };
        // Anything past the inner packet's own length is TFC padding (RFC 4303 §2.7).
        if inner_len > payload.len() || inner_len < IPV4_HLEN {
            return Err(DropReason::BadInner);
        }
        let inner = payload.start..payload.start + inner_len;
        // RFC 4301 §5.2 step 4: an authentic packet the SA does not cover is
        // dropped (its sequence number stays used: it was not a replay).
        if let Some(s) = &self.selectors
            && !s.covers_inbound(&buf[inner.clone()])
        {
            return Err(DropReason::SelectorMismatch);
        }
        Ok((inner, next_header))
    }

    /// The next lifetime event, if any.
    pub fn poll_expiry(&self, now: Instant) -> Option<Expiry> {
        self.life.poll(now, &self.hot)
    }

    /// Highest sequence number received so far.
    pub fn highest_seq(&self) -> u64 {
        lock(&self.received).window.top()
    }
}
