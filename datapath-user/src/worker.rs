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
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use xesp_esp::wire::{Outer, parse_outer};

use crate::{
    mss::{Clamp, checksum_replace, clamp_mss},
    netlink::ifindex,
    nexthop::{NextHop, NextHopStats, NextHops},
    slowpath::SlowPath,
    xsk::{Frame, KernelDrops, Port, PortConfig, SockId, Verdict, XskError},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const BATCH: u32 = 64;
/// How often a worker reads the kernel's drop counters of its sockets.
const DROPS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// What the workers did, summed over workers.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// ESP frames from the DMZ sockets.
    pub esp_rx: AtomicU64,
    /// Decapsulated and sent to the LAN without the stack.
    pub decap_forwarded: AtomicU64,
    /// Decapsulated and handed to the tunnel's TUN device (local, IPv6,
    /// unresolved, TTL expiring).
    pub decap_to_stack: AtomicU64,
    /// Frames from the LAN sockets.
    pub lan_rx: AtomicU64,
    /// Encapsulated and sent on the DMZ socket.
    pub encap_sent: AtomicU64,
    /// Encapsulated and sent through the socket datapath (gateway MAC unknown).
    pub encap_via_socket: AtomicU64,
    /// Not Ethernet + IP, or not ESP.
    pub malformed: AtomicU64,
    /// LAN packets whose TTL or hop limit ran out.
    pub ttl_expired: AtomicU64,
    /// TCP SYNs whose MSS was lowered.
    pub mss_clamped: AtomicU64,
    /// Frames that found the TX ring full.
    pub tx_full: AtomicU64,
    /// Dropped by the kernel before a worker saw them (`XDP_STATISTICS`):
    /// the RX ring was full, or no free frame (the workers fell behind).
    pub xsk_rx_ring_full: AtomicU64,
    pub xsk_rx_dropped: AtomicU64,
    /// Times a fill ring was found empty.
    pub xsk_fill_ring_empty: AtomicU64,
    /// TX descriptors the kernel refused.
    pub xsk_tx_invalid: AtomicU64,
    /// The next-hop caches' kernel lookups, and the destinations not looked
    /// up because the lookup budget was spent (sent through the stack).
    pub nexthop_lookups: AtomicU64,
    pub nexthop_rate_limited: AtomicU64,
    /// A frame without room for the Ethernet header in front of the packet.
    pub no_headroom: AtomicU64,
}

impl WorkerCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("esp_rx", g(&self.esp_rx)),
            ("decap_forwarded", g(&self.decap_forwarded)),
            ("decap_to_stack", g(&self.decap_to_stack)),
            ("lan_rx", g(&self.lan_rx)),
            ("encap_sent", g(&self.encap_sent)),
            ("encap_via_socket", g(&self.encap_via_socket)),
            ("malformed", g(&self.malformed)),
            ("ttl_expired", g(&self.ttl_expired)),
            ("mss_clamped", g(&self.mss_clamped)),
            ("tx_full", g(&self.tx_full)),
            ("xsk_rx_ring_full", g(&self.xsk_rx_ring_full)),
            ("xsk_rx_dropped", g(&self.xsk_rx_dropped)),
            ("xsk_fill_ring_empty", g(&self.xsk_fill_ring_empty)),
            ("xsk_tx_invalid", g(&self.xsk_tx_invalid)),
            ("nexthop_lookups", g(&self.nexthop_lookups)),
            ("nexthop_rate_limited", g(&self.nexthop_rate_limited)),
            ("no_headroom", g(&self.no_headroom)),
        ]
    }
}

pub(crate) fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
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
    counters: Arc<WorkerCounters>,
}

impl Worker {
    /// Opens queue `queue`'s sockets on both interfaces, one per tunnel.
    pub fn new(
        queue: u32,
        dmz_if: &str,
        lan_if: &str,
        path: Arc<SlowPath>,
        counters: Arc<WorkerCounters>,
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
        Ok((
            Self {
                port,
                dmz,
                lan,
                dmz_ifindex: ifindex(dmz_if),
                lan_ifindex: ifindex(lan_if),
                path,
                counters,
            },
            socks,
        ))
    }

    /// Runs until `stop` is set.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut hops = match NextHops::new() {
            Ok(h) => h,
            Err(e) => {
                log::error!("AF_XDP worker: rtnetlink: {e}");
                return;
            }
        };
        let (dmz_tx, lan_tx) = (self.dmz[0], self.lan[0]);
        let mut tx_full_seen = 0;
        let mut drops_seen = KernelDrops::default();
        let mut hops_seen = NextHopStats::default();
        let mut drops_read = Instant::now();
        let mut busy = false;
        while !stop.load(Ordering::Relaxed) {
            // Sleep in poll() only when the last round found nothing to do.
            if !busy && let Err(e) = self.port.poll(100) {
                log::warn!("AF_XDP worker: poll: {e}");
            }
            busy = false;
            let now = Instant::now();
            for t in 0..self.dmz.len() {
                let mut ctx = Ctx {
                    hops: &mut hops,
                    path: &self.path,
                    c: &self.counters,
                    now,
                    tunnel: t,
                    dmz_ifindex: self.dmz_ifindex,
                    lan_ifindex: self.lan_ifindex,
                };
                // No more than the outgoing TX ring can take (see Port::tx_room).
                let room = self.port.tx_room(lan_tx).min(BATCH);
                let mut n = self
                    .port
                    .recv(self.dmz[t], room, |f| ctx.decrypt_to_lan(f, lan_tx));
                let room = self.port.tx_room(dmz_tx).min(BATCH);
                n += self
                    .port
                    .recv(self.lan[t], room, |f| ctx.encrypt_to_dmz(f, dmz_tx));
                busy |= n > 0;
            }
            busy |= self.port.flush();
            let full = self.port.stats().tx_ring_full;
            self.counters
                .tx_full
                .fetch_add(full - tx_full_seen, Ordering::Relaxed);
            tx_full_seen = full;
            // The kernel's drops cost a system call per socket: read them now and then.
            if now.duration_since(drops_read) >= DROPS_EVERY {
                drops_read = now;
                drops_seen = self.add_kernel_drops(drops_seen);
                hops_seen = self.add_nexthop_stats(&hops, hops_seen);
            }
        }
        self.add_kernel_drops(drops_seen);
        self.add_nexthop_stats(&hops, hops_seen);
    }

    /// Adds the next-hop cache's lookups since `seen` to the counters.
    fn add_nexthop_stats(&self, hops: &NextHops, seen: NextHopStats) -> NextHopStats {
        let now = hops.stats();
        let c = &self.counters;
        c.nexthop_lookups
            .fetch_add(now.lookups - seen.lookups, Ordering::Relaxed);
        c.nexthop_rate_limited
            .fetch_add(now.rate_limited - seen.rate_limited, Ordering::Relaxed);
        now
    }

    /// Adds the kernel's drops since `seen` to the counters; returns the new totals.
    fn add_kernel_drops(&self, seen: KernelDrops) -> KernelDrops {
        let d = self.port.kernel_drops();
        let c = &self.counters;
        for (counter, now, before) in [
            (&c.xsk_rx_ring_full, d.rx_ring_full, seen.rx_ring_full),
            (&c.xsk_rx_dropped, d.rx_dropped, seen.rx_dropped),
            (
                &c.xsk_fill_ring_empty,
                d.fill_ring_empty,
                seen.fill_ring_empty,
            ),
            (&c.xsk_tx_invalid, d.tx_invalid, seen.tx_invalid),
        ] {
            counter.fetch_add(now.saturating_sub(before), Ordering::Relaxed);
        }
        d
    }
}

struct Ctx<'a> {
    hops: &'a mut NextHops,
    path: &'a SlowPath,
    c: &'a WorkerCounters,
    now: Instant,
    tunnel: usize,
    dmz_ifindex: u32,
    lan_ifindex: u32,
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
    #[cfg_attr(feature = "null-forwarder", allow(unreachable_code))]
    fn decrypt_to_lan(&mut self, f: &mut Frame<'_>, lan_tx: SockId) -> Verdict {
        #[cfg(feature = "null-forwarder")]
        return crate::null::decrypt_to_lan(self.null_env(), f, lan_tx);
        count(&self.c.esp_rx);
        let Some((ETH_P_IP, ip)) = ip_of(f) else {
            count(&self.c.malformed);
            return Verdict::Drop;
        };
        let Ok(Outer::Esp { spi, esp, .. }) = parse_outer(&f.buf[ip.clone()]) else {
            count(&self.c.malformed);
            return Verdict::Drop;
        };
        // Unknown SPIs and failed checks (the selectors of RFC 4301 §5.2
        // among them) are counted by the SA database and the SA.
        let Some(entry) = self.path.sadb.inbound(spi) else {
            return Verdict::Drop;
        };
        let esp = ip.start + esp.start..ip.start + esp.end;
        let d = {
            let mut sa = entry.sa.lock().unwrap_or_else(|e| e.into_inner());
            match sa.decapsulate(f.buf, esp) {
                Ok(d) => d,
                Err(_) => return Verdict::Drop,
            }
        };
        let inner = d.inner;
        let tunnel = entry.tunnel as usize;
        if d.next_header == xesp_esp::wire::IPPROTO_IPIP {
            let p = &f.buf[inner.clone()];
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            if let NextHop::Ether { ifindex, src, dst } = self.hops.resolve(dst, self.now)
                && ifindex == self.lan_ifindex
                && decrement_ttl(&mut f.buf[inner.clone()])
            {
                if let Clamp::Lowered(_) = clamp_mss(&mut f.buf[inner.clone()], self.path.mss_clamp)
                {
                    count(&self.c.mss_clamped);
                }
                let Some(at) = inner.start.checked_sub(ETH_HLEN) else {
                    count(&self.c.no_headroom);
                    return Verdict::Drop;
                };
                write_eth(f.buf, at, src, dst, ETH_P_IP);
                count(&self.c.decap_forwarded);
                return Verdict::Transmit {
                    on: lan_tx,
                    offset: at as u32,
                    len: (inner.len() + ETH_HLEN) as u32,
                };
            }
        }
        count(&self.c.decap_to_stack);
        self.path.deliver_inner(tunnel, &mut f.buf[inner]);
        Verdict::Drop
    }

    /// A LAN packet routed into tunnel `self.tunnel` → ESP on the DMZ.
    #[cfg_attr(feature = "null-forwarder", allow(unreachable_code))]
    fn encrypt_to_dmz(&mut self, f: &mut Frame<'_>, dmz_tx: SockId) -> Verdict {
        #[cfg(feature = "null-forwarder")]
        return crate::null::encrypt_to_dmz(self.null_env(), f, dmz_tx);
        count(&self.c.lan_rx);
        let Some((_, inner)) = ip_of(f) else {
            count(&self.c.malformed);
            return Verdict::Drop;
        };
        // RFC 4301 §5.1: the tunnel's SA whose selectors cover the packet.
        // None (the tunnel just went down, or no selector covers it):
        // counted by the SA database, per tunnel.
        let Ok(entry) = self
            .path
            .sadb
            .outbound_for(self.tunnel as u32, &f.buf[inner.clone()])
        else {
            return Verdict::Drop;
        };
        if !decrement_ttl(&mut f.buf[inner.clone()]) {
            count(&self.c.ttl_expired);
            return Verdict::Drop;
        }
        if let Clamp::Lowered(_) = clamp_mss(&mut f.buf[inner.clone()], self.path.mss_clamp) {
            count(&self.c.mss_clamped);
        }
        let (outer, t) = {
            let mut sa = entry.sa.lock().unwrap_or_else(|e| e.into_inner());
            match sa.encapsulate(f.buf, inner) {
                Ok(o) => (o, sa.tunnel()),
                Err(_) => return Verdict::Drop,
            }
        };
        match self.hops.resolve(t.remote, self.now) {
            NextHop::Ether { ifindex, src, dst } if ifindex == self.dmz_ifindex => {
                let Some(at) = outer.start.checked_sub(ETH_HLEN) else {
                    count(&self.c.no_headroom);
                    return Verdict::Drop;
                };
                write_eth(f.buf, at, src, dst, ETH_P_IP);
                count(&self.c.encap_sent);
                Verdict::Transmit {
                    on: dmz_tx,
                    offset: at as u32,
                    len: (outer.len() + ETH_HLEN) as u32,
                }
            }
            _ => {
                count(&self.c.encap_via_socket);
                self.path.send_esp(t, &f.buf[outer]);
                Verdict::Drop
            }
        }
    }
}

/// The benchmark's null forwarder (see `null.rs`): bench builds only.
#[cfg(feature = "null-forwarder")]
impl Ctx<'_> {
    fn null_env(&mut self) -> crate::null::Env<'_> {
        crate::null::Env {
            hops: self.hops,
            path: self.path,
            c: self.c,
            now: self.now,
            tunnel: self.tunnel,
            dmz_ifindex: self.dmz_ifindex,
            lan_ifindex: self.lan_ifindex,
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
