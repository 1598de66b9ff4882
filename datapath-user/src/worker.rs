//! The AF_XDP workers: one per receive queue, each with one UMEM ([`Port`])
//! holding that queue's sockets on the DMZ and the LAN interface, one pair
//! per tunnel (the slots the XDP programs redirect into).
//!
//! * ESP steered from the DMZ is decapsulated in its frame and must match
//!   its SA's traffic selectors (RFC 4301 §5.2, checked by the SA); an IPv4 packet
//!   whose FIB next hop is out of the LAN interface gets its TTL lowered, its
//!   MSS clamped and an Ethernet header, and leaves on the LAN socket without
//!   touching the stack. Anything else (for this host, IPv6, unresolved
//!   neighbours, TTL running out) goes into the tunnel's TUN device, where the
//!   kernel takes it as if it had come through the tunnel.
//! * Traffic from the LAN that the FIB routes into a live tunnel is
//!   encapsulated in its frame with the tunnel's outbound SA whose traffic
//!   selectors cover it (RFC 4301 §5.1; none: dropped, counted per tunnel as
//!   `no_selector`) and leaves on the
//!   DMZ socket; if the gateway's MAC is not known yet it is sent through
//!   the socket datapath instead, which resolves it.
//!
//! Frames are reused in place; nothing is allocated per packet.

use std::{
    net::Ipv4Addr,
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use xesp_esp::{
    sa::{SeqLease, Tunnel},
    wire::{Outer, parse_outer},
};

use crate::{
    mss::{Clamp, checksum_replace, clamp_mss},
    netlink::ifindex,
    nexthop::{NextHop, NextHopStats, NextHops},
    sadb::SaView,
    slowpath::SlowPath,
    xsk::{BusyPoll, Frame, KernelDrops, Port, PortConfig, PortStats, SockId, Verdict, XskError},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const BATCH: u32 = 64;
/// Rounds a stopping worker takes at most to empty its RX rings: a ring's
/// worth of batches ([`PortConfig`]'s default ring size).
const DRAIN_ROUNDS: u32 = 2048 / BATCH;
/// How often a worker reads the kernel's drop counters of its sockets.
const DROPS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// How long an idle worker sleeps in `poll()` (it wakes at once for
/// packets), and how long while frames it sent are not yet completed:
/// `poll()` does not watch the completion rings, and those frames are
/// wanted back in the fill rings.
const IDLE_WAIT_MS: i32 = 100;
const IN_FLIGHT_WAIT_MS: i32 = 1;

/// One counter of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// ESP frames from the DMZ sockets.
    EspRx,
    /// Decapsulated and sent to the LAN without the stack.
    DecapForwarded,
    /// Decapsulated and handed to the tunnel's TUN device (local, IPv6,
    /// unresolved, TTL expiring).
    DecapToStack,
    /// Frames from the LAN sockets.
    LanRx,
    /// Encapsulated and sent on the DMZ socket.
    EncapSent,
    /// Encapsulated and sent through the socket datapath (gateway MAC unknown).
    EncapViaSocket,
    /// Not Ethernet + IP, or not ESP.
    Malformed,
    /// LAN packets whose TTL or hop limit ran out.
    TtlExpired,
    /// TCP SYNs whose MSS was lowered.
    MssClamped,
    /// Frames that found the TX ring full.
    TxFull,
    /// Dropped by the kernel before a worker saw them (`XDP_STATISTICS`):
    /// the RX ring was full, or no free frame (the workers fell behind).
    XskRxRingFull,
    XskRxDropped,
    /// Times a fill ring was found empty.
    XskFillRingEmpty,
    /// TX descriptors the kernel refused.
    XskTxInvalid,
    /// The next-hop caches' kernel lookups, and the destinations not looked
    /// up because the lookup budget was spent (sent through the stack).
    NexthopLookups,
    NexthopRateLimited,
    /// A frame without room for the Ethernet header in front of the packet.
    NoHeadroom,
    /// Rounds of the worker's loop that found packets (each one RX batch per
    /// socket, one TX submission and at most one kick per TX ring).
    Batches,
    /// System calls: `poll()` waits for RX (made only after an idle round),
    /// `sendto()` kicks of a TX ring (in copy mode the kernel sends 32
    /// frames per kick, or a ring's worth where it takes
    /// `XDP_MAX_TX_SKB_BUDGET`), fill-ring wakeups, `XDP_STATISTICS` reads, and
    /// busy polls of the RX queues (busy polling only).
    RxPolls,
    TxKicks,
    FillWakeups,
    StatsReads,
    BusyPolls,
}

impl Counter {
    pub const ALL: [Counter; 23] = [
        Self::EspRx,
        Self::DecapForwarded,
        Self::DecapToStack,
        Self::LanRx,
        Self::EncapSent,
        Self::EncapViaSocket,
        Self::Malformed,
        Self::TtlExpired,
        Self::MssClamped,
        Self::TxFull,
        Self::XskRxRingFull,
        Self::XskRxDropped,
        Self::XskFillRingEmpty,
        Self::XskTxInvalid,
        Self::NexthopLookups,
        Self::NexthopRateLimited,
        Self::NoHeadroom,
        Self::Batches,
        Self::RxPolls,
        Self::TxKicks,
        Self::FillWakeups,
        Self::StatsReads,
        Self::BusyPolls,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::EspRx => "esp_rx",
            Self::DecapForwarded => "decap_forwarded",
            Self::DecapToStack => "decap_to_stack",
            Self::LanRx => "lan_rx",
            Self::EncapSent => "encap_sent",
            Self::EncapViaSocket => "encap_via_socket",
            Self::Malformed => "malformed",
            Self::TtlExpired => "ttl_expired",
            Self::MssClamped => "mss_clamped",
            Self::TxFull => "tx_full",
            Self::XskRxRingFull => "xsk_rx_ring_full",
            Self::XskRxDropped => "xsk_rx_dropped",
            Self::XskFillRingEmpty => "xsk_fill_ring_empty",
            Self::XskTxInvalid => "xsk_tx_invalid",
            Self::NexthopLookups => "nexthop_lookups",
            Self::NexthopRateLimited => "nexthop_rate_limited",
            Self::NoHeadroom => "no_headroom",
            Self::Batches => "batches",
            Self::RxPolls => "syscall_rx_polls",
            Self::TxKicks => "syscall_tx_kicks",
            Self::FillWakeups => "syscall_fill_wakeups",
            Self::StatsReads => "syscall_stats_reads",
            Self::BusyPolls => "syscall_busy_polls",
        }
    }
}

/// One worker's counters. Only that worker writes them (a plain load and
/// store, no locked instruction, on lines no other worker writes); readers
/// sum every worker's, as the eBPF per-CPU counters are summed.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct WorkerStats([AtomicU64; Counter::ALL.len()]);

impl WorkerStats {
    /// Adds `n` to counter `c` (the owning worker only).
    pub fn add(&self, c: Counter, n: u64) {
        let a = &self.0[c as usize];
        a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize].load(Ordering::Relaxed)
    }
}

/// What the workers did: each worker's [`WorkerStats`], summed when read.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// One per worker started (a restarted worker gets a new one; the old
    /// one's counts stay in the sums).
    workers: Mutex<Vec<Arc<WorkerStats>>>,
}

impl WorkerCounters {
    /// A new worker's own counters.
    pub fn register(&self) -> Arc<WorkerStats> {
        let s = Arc::new(WorkerStats::default());
        self.workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(s.clone());
        s
    }

    /// Counter `c` summed over the workers.
    pub fn get(&self, c: Counter) -> u64 {
        self.workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|w| w.get(c))
            .sum()
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Counter::ALL
            .iter()
            .map(|c| (c.name(), workers.iter().map(|w| w.get(*c)).sum()))
            .collect()
    }
}

/// One queue's sockets, to be registered in the XDP maps.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSockets {
    pub queue: u32,
    /// `(tunnel, fd)` of the DMZ sockets and of the LAN sockets.
    pub dmz: [Option<i32>; xesp_common::MAX_TUNNELS as usize],
    pub lan: [Option<i32>; xesp_common::MAX_TUNNELS as usize],
}

/// A worker, ready to run on its own thread.
pub struct Worker {
    port: Port,
    dmz: Vec<SockId>,
    lan: Vec<SockId>,
    dmz_ifindex: u32,
    lan_ifindex: u32,
    path: Arc<SlowPath>,
    counters: Arc<WorkerStats>,
    busy_poll: bool,
}

impl Worker {
    /// Opens queue `queue`'s sockets on both interfaces, one per tunnel,
    /// with busy polling if `busy_poll` says so.
    pub fn new(
        queue: u32,
        dmz_if: &str,
        lan_if: &str,
        path: Arc<SlowPath>,
        counters: Arc<WorkerCounters>,
        busy_poll: Option<BusyPoll>,
    ) -> Result<(Self, WorkerSockets), XskError> {
        let mut port = Port::new(PortConfig::default())?;
        let tunnels = path.tuns.len();
        let mut socks = WorkerSockets {
            queue,
            dmz: [None; xesp_common::MAX_TUNNELS as usize],
            lan: [None; xesp_common::MAX_TUNNELS as usize],
        };
        let (mut dmz, mut lan) = (Vec::new(), Vec::new());
        for t in 0..tunnels {
            let d = port.add_socket(dmz_if, queue, true, true)?;
            socks.dmz[t] = port.fd(d);
            dmz.push(d);
            let l = port.add_socket(lan_if, queue, true, true)?;
            socks.lan[t] = port.fd(l);
            lan.push(l);
        }
        if let Some(bp) = busy_poll {
            port.set_busy_poll(bp)?;
        }
        // Frames in the fill rings before the XDP programs are given the
        // sockets: a worker started while traffic flows (a restart, a
        // reload) drops nothing for want of a frame before its first round.
        port.refill();
        Ok((
            Self {
                port,
                dmz,
                lan,
                dmz_ifindex: ifindex(dmz_if),
                lan_ifindex: ifindex(lan_if),
                path,
                counters: counters.register(),
                busy_poll: busy_poll.is_some(),
            },
            socks,
        ))
    }

    /// Runs until `stop` is set. Each round: refresh the SA view if the SA
    /// database changed (one atomic load), busy-poll the RX queues if that
    /// is on, take a batch from each RX ring (no more than the TX ring it
    /// feeds can take), process it in place and hand its frames' worth back
    /// to the fill ring, then submit each TX ring's batch with one kick
    /// (copy mode: one per 32 frames on kernels before 6.17, the limit per
    /// `sendto()` there),
    /// reap completions and refill the fill rings. `poll()` only after an
    /// idle round, for a millisecond while frames are still in flight.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut hops = match NextHops::new() {
            Ok(h) => h,
            Err(e) => {
                log::error!("AF_XDP worker: rtnetlink: {e}");
                return;
            }
        };
        let (dmz_tx, lan_tx) = (self.dmz[0], self.lan[0]);
        let mut port_seen = PortStats::default();
        let mut drops_seen = KernelDrops::default();
        let mut hops_seen = NextHopStats::default();
        let mut drops_read = Instant::now();
        let mut busy = false;
        let mut draining = 0;
        let mut sas = self.path.sadb.view();
        let c = self.counters.clone();
        loop {
            // Once told to stop (its sockets out of the XDP programs' maps
            // already, see `Workers::stop`), rounds go on until the RX
            // rings are empty (at most a ring's worth of rounds).
            let last = stop.load(Ordering::Relaxed);
            if last {
                draining += 1;
            }
            // Sleep in poll() only when the last round found nothing to do.
            if !busy && !last {
                c.add(Counter::RxPolls, 1);
                let wait = if self.port.in_flight() > 0 {
                    IN_FLIGHT_WAIT_MS
                } else {
                    IDLE_WAIT_MS
                };
                if let Err(e) = self.port.poll(wait) {
                    log::warn!("AF_XDP worker: poll: {e}");
                }
            }
            if self.busy_poll {
                self.port.busy_poll();
            }
            busy = false;
            let now = Instant::now();
            self.path.sadb.refresh(&mut sas);
            let mut got = 0;
            for t in 0..self.dmz.len() {
                let mut ctx = Ctx {
                    hops: &mut hops,
                    path: &self.path,
                    sas: &sas,
                    c: &c,
                    now,
                    tunnel: t,
                    dmz_ifindex: self.dmz_ifindex,
                    lan_ifindex: self.lan_ifindex,
                    lease: None,
                };
                // No more than the outgoing TX ring can take (see Port::tx_room).
                let room = self.port.tx_room(lan_tx).min(BATCH);
                let n = self
                    .port
                    .recv(self.dmz[t], room, |f| ctx.decrypt_to_lan(f, lan_tx));
                c.add(Counter::EspRx, u64::from(n));
                let room = self.port.tx_room(dmz_tx).min(BATCH);
                let m = self
                    .port
                    .recv(self.lan[t], room, |f| ctx.encrypt_to_dmz(f, dmz_tx));
                c.add(Counter::LanRx, u64::from(m));
                got += n + m;
            }
            busy |= got > 0;
            if got > 0 {
                c.add(Counter::Batches, 1);
            }
            busy |= self.port.flush();
            let ps = self.port.stats();
            c.add(Counter::TxFull, ps.tx_ring_full - port_seen.tx_ring_full);
            c.add(Counter::TxKicks, ps.tx_kicks - port_seen.tx_kicks);
            c.add(
                Counter::FillWakeups,
                ps.fill_wakeups - port_seen.fill_wakeups,
            );
            c.add(Counter::BusyPolls, ps.busy_polls - port_seen.busy_polls);
            port_seen = ps;
            // The kernel's drops cost a system call per socket: read them now and then.
            if now.duration_since(drops_read) >= DROPS_EVERY {
                drops_read = now;
                drops_seen = self.add_kernel_drops(drops_seen);
                hops_seen = self.add_nexthop_stats(&hops, hops_seen);
            }
            if last && (got == 0 || draining > DRAIN_ROUNDS) {
                break;
            }
        }
        self.add_kernel_drops(drops_seen);
        self.add_nexthop_stats(&hops, hops_seen);
    }

    /// Adds the next-hop cache's lookups since `seen` to the counters.
    fn add_nexthop_stats(&self, hops: &NextHops, seen: NextHopStats) -> NextHopStats {
        let now = hops.stats();
        let c = &self.counters;
        c.add(Counter::NexthopLookups, now.lookups - seen.lookups);
        c.add(
            Counter::NexthopRateLimited,
            now.rate_limited - seen.rate_limited,
        );
        now
    }

    /// Adds the kernel's drops since `seen` to the counters; returns the new totals.
    fn add_kernel_drops(&self, seen: KernelDrops) -> KernelDrops {
        let d = self.port.kernel_drops();
        let c = &self.counters;
        c.add(Counter::StatsReads, self.port.sockets() as u64);
        for (counter, now, before) in [
            (Counter::XskRxRingFull, d.rx_ring_full, seen.rx_ring_full),
            (Counter::XskRxDropped, d.rx_dropped, seen.rx_dropped),
            (
                Counter::XskFillRingEmpty,
                d.fill_ring_empty,
                seen.fill_ring_empty,
            ),
            (Counter::XskTxInvalid, d.tx_invalid, seen.tx_invalid),
        ] {
            c.add(counter, now.saturating_sub(before));
        }
        d
    }
}

/// What a worker's packet handlers share; the null forwarder (bench
/// builds) uses the same, with only the ESP work replaced.
pub(crate) struct Ctx<'a> {
    pub(crate) hops: &'a mut NextHops,
    pub(crate) path: &'a SlowPath,
    pub(crate) sas: &'a SaView,
    pub(crate) c: &'a WorkerStats,
    pub(crate) now: Instant,
    pub(crate) tunnel: usize,
    pub(crate) dmz_ifindex: u32,
    pub(crate) lan_ifindex: u32,
    /// Sequence numbers of the outbound SA this batch sends on, taken once
    /// for the RX burst (see `SeqLease`); settled when the `Ctx` is dropped.
    pub(crate) lease: Option<SeqLease<'a>>,
}

/// The IP packet after the Ethernet header of `f`: `(ethertype, range)`,
/// trimmed to the IP length (short frames carry padding).
pub(crate) fn ip_of(f: &Frame<'_>) -> Option<(u16, Range<usize>)> {
    let p = f.packet();
    let ty = u16::from_be_bytes([*p.get(12)?, *p.get(13)?]);
    let ip = &p[ETH_HLEN..];
    let len = match ty {
        ETH_P_IP if ip.len() >= 20 => usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        ETH_P_IPV6 if ip.len() >= 40 => 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
        _ => return None,
    };
    (len <= ip.len() && len >= 20).then(|| {
        let start = f.offset + ETH_HLEN;
        (ty, start..start + len)
    })
}

/// Lowers the TTL (IPv4, with the header checksum updated) or hop limit
/// (IPv6) of the packet at `pkt`; false if it runs out.
pub(crate) fn decrement_ttl(pkt: &mut [u8]) -> bool {
    match pkt[0] >> 4 {
        4 => {
            let ttl = pkt[8];
            if ttl <= 1 {
                return false;
            }
            let old = u16::from_be_bytes([pkt[8], pkt[9]]);
            pkt[8] = ttl - 1;
            let new = u16::from_be_bytes([pkt[8], pkt[9]]);
            let sum = checksum_replace(u16::from_be_bytes([pkt[10], pkt[11]]), old, new);
            pkt[10..12].copy_from_slice(&sum.to_be_bytes());
            true
        }
        _ => {
            if pkt[7] <= 1 {
                return false;
            }
            pkt[7] -= 1;
            true
        }
    }
}

pub(crate) fn write_eth(buf: &mut [u8], at: usize, src: [u8; 6], dst: [u8; 6], ty: u16) {
    buf[at..at + 6].copy_from_slice(&dst);
    buf[at + 6..at + 12].copy_from_slice(&src);
    buf[at + 12..at + 14].copy_from_slice(&ty.to_be_bytes());
}

impl Ctx<'_> {
    /// ESP from the DMZ → the LAN (or the tunnel's device).
    fn decrypt_to_lan(&mut self, f: &mut Frame<'_>, lan_tx: SockId) -> Verdict {
        #[cfg(feature = "null-forwarder")]
        return crate::null::decrypt_to_lan(self, f, lan_tx);
        #[cfg(not(feature = "null-forwarder"))]
        self.decrypt_esp_to_lan(f, lan_tx)
    }

    /// A LAN packet routed into tunnel `self.tunnel` → ESP on the DMZ.
    fn encrypt_to_dmz(&mut self, f: &mut Frame<'_>, dmz_tx: SockId) -> Verdict {
        #[cfg(feature = "null-forwarder")]
        return crate::null::encrypt_to_dmz(self, f, dmz_tx);
        #[cfg(not(feature = "null-forwarder"))]
        self.encrypt_esp_to_dmz(f, dmz_tx)
    }

    #[cfg_attr(feature = "null-forwarder", allow(dead_code))]
    fn decrypt_esp_to_lan(&mut self, f: &mut Frame<'_>, lan_tx: SockId) -> Verdict {
        let Some((spi, esp)) = self.esp_of(f) else {
            return Verdict::Drop;
        };
        // Unknown SPIs and failed checks (the selectors of RFC 4301 §5.2
        // among them) are counted by the SA database and the SA.
        let Some(entry) = self.sas.inbound(&self.path.sadb, spi) else {
            return Verdict::Drop;
        };
        let Ok(d) = entry.sa.decapsulate(f.buf, esp) else {
            return Verdict::Drop;
        };
        self.forward_inner(f, d.inner, d.next_header, entry.tunnel as usize, lan_tx)
    }

    #[cfg_attr(feature = "null-forwarder", allow(dead_code))]
    fn encrypt_esp_to_dmz(&mut self, f: &mut Frame<'_>, dmz_tx: SockId) -> Verdict {
        let Some((_, inner)) = ip_of(f) else {
            self.c.add(Counter::Malformed, 1);
            return Verdict::Drop;
        };
        // RFC 4301 §5.1: the tunnel's SA whose selectors cover the packet.
        // None (the tunnel just went down, or no selector covers it):
        // counted by the SA database, per tunnel.
        let Ok(entry) =
            self.sas
                .outbound_for(&self.path.sadb, self.tunnel as u32, &f.buf[inner.clone()])
        else {
            return Verdict::Drop;
        };
        if !self.prepare_inner(f, inner.clone()) {
            return Verdict::Drop;
        }
        let lease = match &mut self.lease {
            Some(l) if l.is_of(&entry.sa) => l,
            // Another SA than the last packet's (or the first packet): the
            // old lease is settled as it is replaced.
            slot => slot.insert(entry.sa.lease_to(&entry.endpoints)),
        };
        lease.ahead(u64::from(f.ahead));
        let Ok(outer) = lease.encapsulate_on(&entry.endpoints, f.buf, inner) else {
            return Verdict::Drop;
        };
        self.send_outer(f, outer, entry.endpoints, dmz_tx)
    }

    /// The SPI and the ESP (header to ICV) of an IPv4 ESP or ESP-in-UDP
    /// frame, as ranges of `f.buf`; `None` (counted) for anything else.
    pub(crate) fn esp_of(&self, f: &Frame<'_>) -> Option<(u32, Range<usize>)> {
        let Some((ETH_P_IP, ip)) = ip_of(f) else {
            self.c.add(Counter::Malformed, 1);
            return None;
        };
        let Ok(Outer::Esp { spi, esp, .. }) = parse_outer(&f.buf[ip.clone()]) else {
            self.c.add(Counter::Malformed, 1);
            return None;
        };
        Some((spi, ip.start + esp.start..ip.start + esp.end))
    }

    /// The tail of decapsulation: the inner packet at `inner` (Next Header
    /// `next_header`) of tunnel `tunnel` goes out on the LAN socket if it is
    /// IPv4 whose FIB next hop is out of the LAN interface (TTL lowered, MSS
    /// clamped, Ethernet header written in front); anything else into the
    /// tunnel's TUN device.
    pub(crate) fn forward_inner(
        &mut self,
        f: &mut Frame<'_>,
        inner: Range<usize>,
        next_header: u8,
        tunnel: usize,
        lan_tx: SockId,
    ) -> Verdict {
        if next_header == xesp_esp::wire::IPPROTO_IPIP && inner.len() >= 20 {
            let p = &f.buf[inner.clone()];
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            if let NextHop::Ether { ifindex, src, dst } = self.hops.resolve(dst, self.now)
                && ifindex == self.lan_ifindex
                && decrement_ttl(&mut f.buf[inner.clone()])
            {
                if let Clamp::Lowered(_) = clamp_mss(&mut f.buf[inner.clone()], self.path.mss_clamp)
                {
                    self.c.add(Counter::MssClamped, 1);
                }
                let Some(at) = inner.start.checked_sub(ETH_HLEN) else {
                    self.c.add(Counter::NoHeadroom, 1);
                    return Verdict::Drop;
                };
                write_eth(f.buf, at, src, dst, ETH_P_IP);
                self.c.add(Counter::DecapForwarded, 1);
                return Verdict::Transmit {
                    on: lan_tx,
                    offset: at as u32,
                    len: (inner.len() + ETH_HLEN) as u32,
                };
            }
        }
        self.c.add(Counter::DecapToStack, 1);
        self.path.deliver_inner(tunnel, &mut f.buf[inner]);
        Verdict::Drop
    }

    /// Before encapsulation: the TTL lowered and the MSS clamped (counted);
    /// false (counted) if the TTL runs out.
    pub(crate) fn prepare_inner(&mut self, f: &mut Frame<'_>, inner: Range<usize>) -> bool {
        if !decrement_ttl(&mut f.buf[inner.clone()]) {
            self.c.add(Counter::TtlExpired, 1);
            return false;
        }
        if let Clamp::Lowered(_) = clamp_mss(&mut f.buf[inner], self.path.mss_clamp) {
            self.c.add(Counter::MssClamped, 1);
        }
        true
    }

    /// The tail of encapsulation: the outer packet at `outer` goes out on
    /// the DMZ socket with an Ethernet header if the tunnel's remote end is
    /// reached through the DMZ interface and its MAC is known; otherwise
    /// through the socket datapath, which resolves it.
    pub(crate) fn send_outer(
        &mut self,
        f: &mut Frame<'_>,
        outer: Range<usize>,
        t: Tunnel,
        dmz_tx: SockId,
    ) -> Verdict {
        match self.hops.resolve(t.remote, self.now) {
            NextHop::Ether { ifindex, src, dst } if ifindex == self.dmz_ifindex => {
                let Some(at) = outer.start.checked_sub(ETH_HLEN) else {
                    self.c.add(Counter::NoHeadroom, 1);
                    return Verdict::Drop;
                };
                write_eth(f.buf, at, src, dst, ETH_P_IP);
                self.c.add(Counter::EncapSent, 1);
                Verdict::Transmit {
                    on: dmz_tx,
                    offset: at as u32,
                    len: (outer.len() + ETH_HLEN) as u32,
                }
            }
            _ => {
                self.c.add(Counter::EncapViaSocket, 1);
                self.path.send_esp(t, &f.buf[outer]);
                Verdict::Drop
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use xesp_esp::wire::checksum;

    use super::*;

    fn ipv4(ttl: u8) -> Vec<u8> {
        let mut h = vec![
            0x45, 0, 0, 20, 0, 0, 0x40, 0, ttl, 6, 0, 0, 10, 0, 0, 10, 10, 2, 0, 4,
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn ttl_is_lowered_with_a_valid_checksum_and_never_below_one() {
        let mut h = ipv4(64);
        assert!(decrement_ttl(&mut h));
        assert_eq!(h[8], 63);
        assert_eq!(checksum(&h), 0, "header checksum still verifies");
        let mut last = ipv4(1);
        assert!(!decrement_ttl(&mut last));
        assert_eq!(last, ipv4(1), "left alone");
        let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 17, 2];
        assert!(decrement_ttl(&mut v6));
        assert!(!decrement_ttl(&mut v6));
    }
}
