//! The SA database of the user-space datapath: inbound SAs by SPI (ours,
//! unique on the device), outbound SAs by tunnel and SPI (the peer chooses
//! those, and two peers may choose the same), and which outbound SA each
//! tunnel sends on. Filled by the IKE controller (through its SaBackend),
//! read by the packet paths.
//!
//! Policy (RFC 4301 §5.1, §5.2): every SA carries the traffic selectors its
//! CHILD_SA was negotiated with. An outbound packet leaves in the tunnel's
//! routed SA if its selectors cover it, else in the newest other SA of the
//! tunnel that covers it, else it is dropped and counted per tunnel
//! (`no_selector`). Inbound SAs check each decrypted packet themselves
//! (`selector_mismatch`, see [`xesp_esp::policy`]).
//!
//! No lock per packet: every change (install, rekey, route, delete,
//! endpoint update) publishes a new immutable snapshot of the tables and
//! bumps a generation counter. Each packet thread holds its own [`SaView`]
//! and refreshes it when the generation moved (one atomic load per batch);
//! its lookups borrow from the snapshot, and the SAs themselves are used
//! through `&self` (see [`xesp_esp::sa`]). An SA deleted while a thread still
//! holds a snapshot with it goes on counting; its counters join its tunnel's
//! totals once nobody holds it.

use std::{
    collections::HashMap,
    ops::Range,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use std::time::Instant;

use xesp_esp::{
    policy::{Flow, Selectors},
    sa::{DropCounters, DropReason, Expiry, InboundSa, OutboundSa, SaCounters, Tunnel},
};

/// An inbound SA and the tunnel it belongs to (the SA holds its selectors).
pub struct InboundEntry {
    pub tunnel: u32,
    /// Its outer addresses (decapsulation does not look at them).
    pub endpoints: Tunnel,
    pub sa: Arc<InboundSa>,
}

/// An outbound SA, the tunnel it belongs to, the traffic it may carry and
/// the outer addresses it sends to now.
pub struct OutboundEntry {
    pub tunnel: u32,
    pub selectors: Selectors,
    pub endpoints: Tunnel,
    pub sa: Arc<OutboundSa>,
}

impl OutboundEntry {
    /// Encapsulates `buf[inner]` towards the SA's current endpoints.
    pub fn encapsulate(
        &self,
        buf: &mut [u8],
        inner: Range<usize>,
    ) -> Result<Range<usize>, DropReason> {
        self.sa.encapsulate_on(&self.endpoints, buf, inner)
    }
}

/// One immutable version of the tables, shared by the packet threads.
#[derive(Clone, Default)]
struct Tables {
    inbound: HashMap<u32, Arc<InboundEntry>>,
    /// By `(tunnel, SPI)`.
    outbound: HashMap<(u32, u32), Arc<OutboundEntry>>,
    /// The SA each live tunnel sends on by preference.
    routes: HashMap<u32, Arc<OutboundEntry>>,
    /// Each tunnel's outbound SAs, newest first: the choice when the routed
    /// one does not cover a packet.
    by_tunnel: HashMap<u32, Vec<Arc<OutboundEntry>>>,
}

/// An SA taken out of the tables that a snapshot may still hold.
enum Leaving {
    In(u32, Arc<InboundSa>),
    Out(u32, Arc<OutboundSa>),
}

/// What the control plane changes, under one lock.
#[derive(Default)]
struct Control {
    current: Arc<Tables>,
    /// Totals of SAs deleted and no longer used, per tunnel, so that tunnel
    /// counters survive rekeys.
    retired: HashMap<u32, TunnelTotals>,
    leaving: Vec<Leaving>,
}

/// Packets and octets a tunnel carried, and what it dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TunnelTotals {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    #[serde(skip)]
    pub drops: DropCounters,
}

impl TunnelTotals {
    /// Adds one SA direction's counters.
    fn add(&mut self, c: &SaCounters, inbound: bool) {
        if inbound {
            self.packets_in += c.packets;
            self.bytes_in += c.bytes;
        } else {
            self.packets_out += c.packets;
            self.bytes_out += c.bytes;
        }
        self.drops.add(&c.drops);
    }
}

/// Why a tunnel's packet found no outbound SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoOutbound {
    /// The tunnel has no routed SA (it is down).
    NoSa,
    /// None of the tunnel's SAs has selectors that cover the packet.
    NoSelector,
}

/// The SA database.
pub struct SaDb {
    control: Mutex<Control>,
    /// Bumped after each new snapshot is published.
    generation: AtomicU64,
    /// ESP whose SPI no SA has (RFC 4303 §3.4.2: audited, dropped).
    unknown_spi: AtomicU64,
    /// Tunnel traffic with no outbound SA (the tunnel is down).
    no_sa: AtomicU64,
    /// Per tunnel: packets no outbound SA's selectors cover (RFC 4301 §5.1).
    no_selector: Box<[AtomicU64]>,
}

impl Default for SaDb {
    fn default() -> Self {
        Self {
            control: Mutex::default(),
            generation: AtomicU64::new(0),
            unknown_spi: AtomicU64::new(0),
            no_sa: AtomicU64::new(0),
            no_selector: (0..xesp_common::MAX_TUNNELS)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }
}

fn lock_poisoned<T>(e: std::sync::PoisonError<T>) -> T {
    // A panic while holding the lock is a bug elsewhere; the tables
    // themselves are always consistent between statements.
    e.into_inner()
}

/// A packet thread's own view of the SA database: a snapshot and its
/// generation. Lookups borrow from it without any lock.
pub struct SaView {
    generation: u64,
    tables: Arc<Tables>,
}

impl SaView {
    /// The inbound SA `spi` names; counts an unknown one in `db`.
    pub fn inbound(&self, db: &SaDb, spi: u32) -> Option<&Arc<InboundEntry>> {
        let e = self.tables.inbound.get(&spi);
        if e.is_none() {
            db.unknown_spi.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    /// The SA `tunnel` sends the inner packet `pkt` in (RFC 4301 §5.1): the
    /// routed one if its selectors cover the packet, else the newest other
    /// SA of the tunnel that covers it. Counts the drop in `db` when there
    /// is none.
    pub fn outbound_for(
        &self,
        db: &SaDb,
        tunnel: u32,
        pkt: &[u8],
    ) -> Result<&Arc<OutboundEntry>, NoOutbound> {
        let t = &self.tables;
        let Some(routed) = t.routes.get(&tunnel) else {
            db.no_sa.fetch_add(1, Ordering::Relaxed);
            return Err(NoOutbound::NoSa);
        };
        let chosen = Flow::parse(pkt).and_then(|f| {
            if routed.selectors.covers_outbound_flow(&f) {
                return Some(routed);
            }
            t.by_tunnel
                .get(&tunnel)?
                .iter()
                .find(|e| !Arc::ptr_eq(e, routed) && e.selectors.covers_outbound_flow(&f))
        });
        match chosen {
            Some(e) => Ok(e),
            None => {
                if let Some(c) = db.no_selector.get(tunnel as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                Err(NoOutbound::NoSelector)
            }
        }
    }

    /// The generation of the snapshot held.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl SaDb {
    pub fn new() -> Self {
        Self::default()
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(lock_poisoned)
    }

    /// Applies `f` to a copy of the tables and publishes it.
    fn change<R>(&self, f: impl FnOnce(&mut Tables, &mut Vec<Leaving>) -> R) -> R {
        let mut c = self.control();
        let mut t = (*c.current).clone();
        let r = f(&mut t, &mut c.leaving);
        c.current = Arc::new(t);
        self.generation.fetch_add(1, Ordering::Release);
        c.settle();
        r
    }

    /// A view of the tables as they are now.
    pub fn view(&self) -> SaView {
        let generation = self.generation.load(Ordering::Acquire);
        SaView {
            generation,
            tables: self.control().current.clone(),
        }
    }

    /// Brings `v` up to date if the tables changed since it was taken
    /// (one atomic load when they did not); true if it was.
    pub fn refresh(&self, v: &mut SaView) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if generation == v.generation {
            return false;
        }
        // Published before the generation moved: at least as new.
        v.tables = self.control().current.clone();
        v.generation = generation;
        true
    }

    /// Installs an inbound SA that admits what `selectors` cover (ours
    /// local, the peer's remote).
    pub fn install_inbound(&self, tunnel: u32, mut sa: InboundSa, selectors: Selectors) {
        let spi = sa.spi();
        sa.set_selectors(selectors);
        let e = Arc::new(InboundEntry {
            tunnel,
            endpoints: sa.tunnel(),
            sa: Arc::new(sa),
        });
        self.change(|t, leaving| {
            if let Some(old) = t.inbound.insert(spi, e) {
                leaving.push(Leaving::In(old.tunnel, old.sa.clone()));
            }
        });
    }

    /// Installs an outbound SA of `tunnel` that may carry what `selectors`
    /// cover. It replaces only an SA of the same tunnel and SPI.
    pub fn install_outbound(&self, tunnel: u32, sa: OutboundSa, selectors: Selectors) {
        let spi = sa.spi();
        let e = Arc::new(OutboundEntry {
            tunnel,
            selectors,
            endpoints: sa.tunnel(),
            sa: Arc::new(sa),
        });
        self.change(|t, leaving| {
            if let Some(old) = t.outbound.insert((tunnel, spi), e.clone()) {
                t.unlink_outbound(&old);
                leaving.push(Leaving::Out(tunnel, old.sa.clone()));
            }
            t.by_tunnel.entry(tunnel).or_default().insert(0, e);
        });
    }

    /// Moves one direction to new outer endpoints (the peer's NAT mapping
    /// changed), keeping its keys, sequence numbers and counters. False if
    /// `tunnel` has no such SA.
    pub fn update_endpoints(
        &self,
        tunnel: u32,
        spi: u32,
        inbound: bool,
        f: impl FnOnce(Tunnel) -> Tunnel,
    ) -> bool {
        self.change(|t, _| {
            if inbound {
                let Some(e) = t.inbound.get(&spi).filter(|e| e.tunnel == tunnel) else {
                    return false;
                };
                let moved = Arc::new(InboundEntry {
                    tunnel,
                    endpoints: f(e.endpoints),
                    sa: e.sa.clone(),
                });
                t.inbound.insert(spi, moved);
            } else {
                let Some(old) = t.outbound.get(&(tunnel, spi)).cloned() else {
                    return false;
                };
                let moved = Arc::new(OutboundEntry {
                    tunnel,
                    selectors: old.selectors.clone(),
                    endpoints: f(old.endpoints),
                    sa: old.sa.clone(),
                });
                t.outbound.insert((tunnel, spi), moved.clone());
                if t.routes.get(&tunnel).is_some_and(|r| Arc::ptr_eq(r, &old)) {
                    t.routes.insert(tunnel, moved.clone());
                }
                if let Some(v) = t.by_tunnel.get_mut(&tunnel) {
                    for e in v.iter_mut().filter(|e| Arc::ptr_eq(e, &old)) {
                        *e = moved.clone();
                    }
                }
            }
            true
        })
    }

    /// Makes outbound `spi` of `tunnel` the one it sends on by preference
    /// (or none: the tunnel is down). False if `tunnel` has no such SA.
    pub fn route(&self, tunnel: u32, spi: Option<u32>) -> bool {
        self.change(|t, _| match spi {
            None => {
                t.routes.remove(&tunnel);
                true
            }
            Some(s) => match t.outbound.get(&(tunnel, s)).cloned() {
                Some(e) => {
                    t.routes.insert(tunnel, e);
                    true
                }
                None => false,
            },
        })
    }

    /// Removes one direction; its counters go to the tunnel's totals.
    pub fn delete_inbound(&self, spi: u32) {
        self.change(|t, leaving| {
            if let Some(e) = t.inbound.remove(&spi) {
                leaving.push(Leaving::In(e.tunnel, e.sa.clone()));
            }
        });
    }

    pub fn delete_outbound(&self, tunnel: u32, spi: u32) {
        self.change(|t, leaving| {
            if let Some(e) = t.outbound.remove(&(tunnel, spi)) {
                t.unlink_outbound(&e);
                leaving.push(Leaving::Out(tunnel, e.sa.clone()));
            }
        });
    }

    /// The inbound SA `spi` names (counts an unknown one). Packet threads
    /// use their [`SaView`] instead.
    pub fn inbound(&self, spi: u32) -> Option<Arc<InboundEntry>> {
        self.view().inbound(self, spi).cloned()
    }

    /// [`SaView::outbound_for`] on the tables as they are now.
    pub fn outbound_for(&self, tunnel: u32, pkt: &[u8]) -> Result<Arc<OutboundEntry>, NoOutbound> {
        self.view().outbound_for(self, tunnel, pkt).cloned()
    }

    pub fn inbound_counters(&self, spi: u32) -> Option<SaCounters> {
        let c = self.control();
        c.current.inbound.get(&spi).map(|e| e.sa.counters())
    }

    pub fn outbound_counters(&self, tunnel: u32, spi: u32) -> Option<SaCounters> {
        let c = self.control();
        c.current
            .outbound
            .get(&(tunnel, spi))
            .map(|e| e.sa.counters())
    }

    /// A tunnel's totals: live SAs plus those deleted, and its packets that
    /// no SA's selectors covered (as drops `no_selector`).
    pub fn tunnel_totals(&self, tunnel: u32) -> TunnelTotals {
        let mut c = self.control();
        c.settle();
        let mut out = c.retired.get(&tunnel).copied().unwrap_or_default();
        for l in &c.leaving {
            match l {
                Leaving::In(t, sa) if *t == tunnel => out.add(&sa.counters(), true),
                Leaving::Out(t, sa) if *t == tunnel => out.add(&sa.counters(), false),
                _ => {}
            }
        }
        let t = &c.current;
        for e in t.inbound.values().filter(|e| e.tunnel == tunnel) {
            out.add(&e.sa.counters(), true);
        }
        for e in t.by_tunnel.get(&tunnel).into_iter().flatten() {
            out.add(&e.sa.counters(), false);
        }
        out.drops
            .record_n(DropReason::NoSelector, self.no_selector_of(tunnel));
        out
    }

    /// Packets of `tunnel` that no outbound SA's selectors covered.
    pub fn no_selector_of(&self, tunnel: u32) -> u64 {
        self.no_selector
            .get(tunnel as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub fn contains_inbound(&self, spi: u32) -> bool {
        self.control().current.inbound.contains_key(&spi)
    }

    /// ESP with an unknown SPI, and tunnel traffic without an SA.
    pub fn orphans(&self) -> (u64, u64) {
        (
            self.unknown_spi.load(Ordering::Relaxed),
            self.no_sa.load(Ordering::Relaxed),
        )
    }

    /// Counts a drop against an SA found by SPI (e.g. malformed after lookup).
    pub fn record_inbound_drop(&self, entry: &InboundEntry, r: DropReason) {
        entry.sa.record_drop(r);
    }

    /// Lifetime events of every SA as of `now`: `(tunnel, spi, inbound, event)`.
    pub fn poll_expiries(&self, now: Instant) -> Vec<(u32, u32, bool, Expiry)> {
        let t = {
            let mut c = self.control();
            c.settle();
            c.current.clone()
        };
        let mut out = Vec::new();
        for (spi, e) in &t.inbound {
            for x in std::iter::from_fn(|| e.sa.poll_expiry(now)).take(4) {
                out.push((e.tunnel, *spi, true, x));
            }
        }
        for (&(tunnel, spi), e) in &t.outbound {
            for x in std::iter::from_fn(|| e.sa.poll_expiry(now)).take(4) {
                out.push((tunnel, spi, false, x));
            }
        }
        out
    }
}

impl Control {
    /// Folds the counters of deleted SAs that no snapshot holds any more
    /// into their tunnels' totals (they can no longer change).
    fn settle(&mut self) {
        let retired = &mut self.retired;
        self.leaving.retain(|l| match l {
            Leaving::In(t, sa) if Arc::strong_count(sa) == 1 => {
                retired.entry(*t).or_default().add(&sa.counters(), true);
                false
            }
            Leaving::Out(t, sa) if Arc::strong_count(sa) == 1 => {
                retired.entry(*t).or_default().add(&sa.counters(), false);
                false
            }
            _ => true,
        });
    }
}

impl Tables {
    /// Takes a removed (or replaced) outbound SA out of its tunnel's lists.
    fn unlink_outbound(&mut self, e: &Arc<OutboundEntry>) {
        if self
            .routes
            .get(&e.tunnel)
            .is_some_and(|r| Arc::ptr_eq(r, e))
        {
            self.routes.remove(&e.tunnel);
        }
        if let Some(v) = self.by_tunnel.get_mut(&e.tunnel) {
            v.retain(|o| !Arc::ptr_eq(o, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use xesp_esp::{
        alg::{AesKeyBits, Encr, Suite},
        policy::Selector,
        sa::{Lifetime, SaParams, Tunnel},
    };

    use super::*;

    const KEY: [u8; 36] = [7; 36];

    fn params(spi: u32) -> SaParams<'static> {
        params_to(spi, Ipv4Addr::new(203, 0, 113, 11))
    }

    fn params_to(spi: u32, remote: Ipv4Addr) -> SaParams<'static> {
        SaParams {
            spi,
            suite: Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap(),
            keymat: &KEY,
            esn: false,
            replay_window: 64,
            tunnel: Tunnel {
                local: Ipv4Addr::new(192, 0, 2, 1),
                remote,
                natt: None,
            },
            lifetime: Lifetime::default(),
        }
    }

    fn net(a: [u8; 4], len: u8) -> Selector {
        Selector::prefix(Ipv4Addr::from(a), len)
    }

    fn any() -> Selectors {
        Selectors::any_v4()
    }

    /// A buffer with a 40-octet ICMP echo `src` -> `dst` at 64..104.
    fn packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        buf[64] = 0x45;
        buf[66..68].copy_from_slice(&40u16.to_be_bytes());
        buf[73] = 1;
        buf[76..80].copy_from_slice(&src);
        buf[80..84].copy_from_slice(&dst);
        buf[84] = 8;
        buf
    }

    /// Encapsulates one packet `src` -> `dst` on the SA `tunnel` chooses and
    /// decapsulates it with inbound `spi`.
    fn carry_from(db: &SaDb, tunnel: u32, spi: u32, src: [u8; 4], dst: [u8; 4]) -> bool {
        let mut buf = packet(src, dst);
        let Ok(out) = db.outbound_for(tunnel, &buf[64..104]) else {
            return false;
        };
        let outer = out.encapsulate(&mut buf, 64..104).unwrap();
        let Some(inb) = db.inbound(spi) else {
            return false;
        };
        let r = inb.sa.decapsulate(&mut buf, outer.start + 20..outer.end);
        r.is_ok()
    }

    fn carry(db: &SaDb, tunnel: u32, spi: u32) -> bool {
        carry_from(db, tunnel, spi, [10, 0, 0, 10], [10, 2, 0, 4])
    }

    /// The SPI of the SA `tunnel` chooses for `src` -> `dst`.
    fn chosen(db: &SaDb, tunnel: u32, src: [u8; 4], dst: [u8; 4]) -> Result<u32, NoOutbound> {
        let buf = packet(src, dst);
        db.outbound_for(tunnel, &buf[64..104]).map(|e| e.sa.spi())
    }

    #[test]
    fn routes_switch_and_totals_survive_deletion() {
        let now = Instant::now();
        let db = SaDb::new();
        assert!(!db.route(0, Some(0x1000)), "no such outbound SA");
        db.install_inbound(0, InboundSa::new(&params(0x1000), now).unwrap(), any());
        db.install_outbound(0, OutboundSa::new(&params(0x1000), now).unwrap(), any());
        assert!(!carry(&db, 0, 0x1000), "not routed yet");
        assert_eq!(db.orphans(), (0, 1));
        assert!(db.route(0, Some(0x1000)));
        assert!(!db.route(1, Some(0x1000)), "another tunnel's SA");
        assert!(carry(&db, 0, 0x1000));
        // A rekey: the new SA pair, routed; the old one deleted.
        db.install_inbound(0, InboundSa::new(&params(0x2000), now).unwrap(), any());
        db.install_outbound(0, OutboundSa::new(&params(0x2000), now).unwrap(), any());
        assert!(db.route(0, Some(0x2000)));
        db.delete_outbound(0, 0x1000);
        db.delete_inbound(0x1000);
        assert!(carry(&db, 0, 0x2000));
        assert!(db.inbound(0x1000).is_none());
        let t = db.tunnel_totals(0);
        assert_eq!((t.packets_in, t.packets_out), (2, 2));
        assert_eq!((t.bytes_in, t.bytes_out), (80, 80));
        assert_eq!(db.tunnel_totals(1), TunnelTotals::default());
        // Deleting the routed SA takes the tunnel down.
        db.delete_outbound(0, 0x2000);
        assert_eq!(
            chosen(&db, 0, [10, 0, 0, 10], [10, 2, 0, 4]),
            Err(NoOutbound::NoSa)
        );
        assert_eq!(db.orphans(), (1, 2));
        assert_eq!(db.no_selector_of(0), 0);
    }

    #[test]
    fn updated_endpoints_keep_the_sa_and_move_its_outer_addresses() {
        let db = SaDb::new();
        let now = Instant::now();
        db.install_outbound(0, OutboundSa::new(&params(0x300), now).unwrap(), any());
        db.install_inbound(0, InboundSa::new(&params(0x301), now).unwrap(), any());
        let moved = Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(198, 51, 100, 7),
            natt: None,
        };
        assert!(db.update_endpoints(0, 0x300, false, |_| moved));
        assert!(db.update_endpoints(0, 0x301, true, |_| moved));
        assert!(
            !db.update_endpoints(0, 0x999, false, |t| t),
            "not installed"
        );
        assert!(
            !db.update_endpoints(1, 0x300, false, |t| t),
            "another tunnel's"
        );
        assert!(
            !db.update_endpoints(1, 0x301, true, |t| t),
            "another tunnel's"
        );
        assert!(db.route(0, Some(0x300)));
        let buf = packet([10, 0, 0, 10], [10, 2, 0, 4]);
        let out = db.outbound_for(0, &buf[64..104]).unwrap();
        assert_eq!(out.endpoints, moved);
        assert_eq!(db.inbound(0x301).unwrap().endpoints, moved);
    }

    /// Two peers chose the same outbound SPI: each tunnel keeps its own SA
    /// (keys, peer, counters), and deleting one leaves the other.
    #[test]
    fn two_tunnels_with_the_same_outbound_spi_keep_their_own_sas() {
        let now = Instant::now();
        let db = SaDb::new();
        let gws = [
            Ipv4Addr::new(203, 0, 113, 11),
            Ipv4Addr::new(203, 0, 113, 12),
        ];
        for (tunnel, gw) in gws.iter().enumerate() {
            let tunnel = tunnel as u32;
            db.install_outbound(
                tunnel,
                OutboundSa::new(&params_to(0xc0de, *gw), now).unwrap(),
                any(),
            );
            assert!(db.route(tunnel, Some(0xc0de)));
        }
        // Encapsulates one packet on `tunnel`; the outer destination.
        let send = |tunnel| {
            let mut buf = packet([10, 0, 0, 10], [10, 2, 0, 4]);
            let e = db.outbound_for(tunnel, &buf[64..104]).unwrap();
            let outer = e.encapsulate(&mut buf, 64..104).unwrap();
            Ipv4Addr::from(<[u8; 4]>::try_from(&buf[outer.start + 16..outer.start + 20]).unwrap())
        };
        assert_eq!(send(0), gws[0]);
        assert_eq!(send(1), gws[1]);
        assert_eq!(send(1), gws[1]);
        assert_eq!(db.outbound_counters(0, 0xc0de).unwrap().packets, 1);
        assert_eq!(db.outbound_counters(1, 0xc0de).unwrap().packets, 2);
        db.delete_outbound(0, 0xc0de);
        assert!(db.outbound_counters(0, 0xc0de).is_none());
        assert_eq!(
            send(1),
            gws[1],
            "tunnel 1's SA survives tunnel 0's deletion"
        );
        assert_eq!(db.tunnel_totals(0).packets_out, 1);
        assert_eq!(db.tunnel_totals(1).packets_out, 3);
    }

    /// RFC 4301 §5.1: a tunnel with several CHILD_SAs sends each packet in
    /// the one whose selectors cover it, the routed one first; a packet none
    /// covers is dropped and counted against the tunnel.
    #[test]
    fn outbound_sa_is_chosen_by_selector() {
        let now = Instant::now();
        let db = SaDb::new();
        let lan = net([10, 0, 0, 0], 24);
        let vnet = net([10, 2, 0, 0], 24);
        let lo = net([172, 16, 0, 3], 32);
        let bgp = net([10, 2, 0, 228], 32);
        // The networks' CHILD_SA, then the BGP session's (routed: newest).
        let nets = Selectors::new(&[lan], &[vnet]);
        db.install_outbound(0, OutboundSa::new(&params(0x100), now).unwrap(), nets);
        let host = Selectors::new(&[lo], &[bgp]);
        db.install_outbound(0, OutboundSa::new(&params(0x200), now).unwrap(), host);
        assert!(db.route(0, Some(0x200)));
        assert_eq!(chosen(&db, 0, [172, 16, 0, 3], [10, 2, 0, 228]), Ok(0x200));
        assert_eq!(chosen(&db, 0, [10, 0, 0, 10], [10, 2, 0, 4]), Ok(0x100));
        assert_eq!(chosen(&db, 0, [10, 0, 0, 10], [10, 2, 0, 228]), Ok(0x100));
        assert_eq!(db.no_selector_of(0), 0);
        // Neither covers these.
        for (src, dst) in [
            ([10, 1, 10, 10], [10, 2, 0, 4]),
            ([172, 16, 0, 3], [10, 2, 0, 229]),
            ([10, 0, 0, 10], [8, 8, 8, 8]),
        ] {
            assert_eq!(chosen(&db, 0, src, dst), Err(NoOutbound::NoSelector));
        }
        assert_eq!(db.no_selector_of(0), 3);
        assert_eq!(db.no_selector_of(1), 0);
        assert_eq!(db.tunnel_totals(0).drops.get(DropReason::NoSelector), 3);
        // Not IPv4: no IPv4 selector covers it.
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        assert_eq!(
            db.outbound_for(0, &v6).map(|_| ()),
            Err(NoOutbound::NoSelector)
        );
        assert_eq!(db.no_selector_of(0), 4);
        // A rekey of the networks' SA: the routed SA still wins where it
        // covers; the new networks' SA (newest) carries the rest.
        let nets = Selectors::new(&[lan], &[vnet]);
        db.install_outbound(0, OutboundSa::new(&params(0x101), now).unwrap(), nets);
        db.delete_outbound(0, 0x100);
        assert_eq!(chosen(&db, 0, [10, 0, 0, 10], [10, 2, 0, 4]), Ok(0x101));
        assert_eq!(chosen(&db, 0, [172, 16, 0, 3], [10, 2, 0, 228]), Ok(0x200));
        // With overlapping selectors the routed SA wins (make-before-break).
        db.install_outbound(0, OutboundSa::new(&params(0x300), now).unwrap(), any());
        assert_eq!(chosen(&db, 0, [10, 0, 0, 10], [10, 2, 0, 4]), Ok(0x300));
        assert!(db.route(0, Some(0x101)));
        assert_eq!(chosen(&db, 0, [10, 0, 0, 10], [10, 2, 0, 4]), Ok(0x101));
        assert_eq!(chosen(&db, 0, [10, 1, 10, 10], [10, 2, 0, 4]), Ok(0x300));
        // The tunnel down: nothing is sent, counted as no SA, not no selector.
        assert!(db.route(0, None));
        assert_eq!(
            chosen(&db, 0, [10, 0, 0, 10], [10, 2, 0, 4]),
            Err(NoOutbound::NoSa)
        );
        assert_eq!(db.no_selector_of(0), 4);
    }

    /// RFC 4301 §5.2: the selectors given at installation are checked on
    /// every decrypted packet, and the drop counts in the tunnel's totals.
    #[test]
    fn inbound_sas_admit_only_what_their_selectors_cover() {
        let now = Instant::now();
        let db = SaDb::new();
        let lan = net([10, 0, 0, 0], 24);
        let vnet = net([10, 2, 0, 0], 24);
        // The sender's side: 10.0.0.0/24 -> 10.2.0.0/24 on any.
        db.install_outbound(0, OutboundSa::new(&params(0x400), now).unwrap(), any());
        assert!(db.route(0, Some(0x400)));
        // The receiver (here the same device, for the test) admits only
        // 10.0.0.0/24 (the peer's) -> 10.2.0.0/24 (ours).
        db.install_inbound(
            0,
            InboundSa::new(&params(0x400), now).unwrap(),
            Selectors::new(&[vnet], &[lan]),
        );
        assert!(carry_from(&db, 0, 0x400, [10, 0, 0, 10], [10, 2, 0, 4]));
        assert!(!carry_from(&db, 0, 0x400, [10, 1, 10, 10], [10, 2, 0, 4]));
        assert!(!carry_from(&db, 0, 0x400, [10, 0, 0, 10], [10, 0, 0, 11]));
        let t = db.tunnel_totals(0);
        assert_eq!(t.drops.get(DropReason::SelectorMismatch), 2);
        assert_eq!(t.packets_in, 1);
        assert_eq!(db.inbound_counters(0x400).unwrap().drops.total(), 2);
    }

    /// A packet thread's view sees a change only once it refreshes, and a
    /// refresh costs nothing when nothing changed.
    #[test]
    fn views_change_on_refresh_when_the_generation_moved() {
        let now = Instant::now();
        let db = SaDb::new();
        let mut v = db.view();
        assert!(!db.refresh(&mut v), "nothing changed");
        db.install_inbound(0, InboundSa::new(&params(0x500), now).unwrap(), any());
        assert!(v.inbound(&db, 0x500).is_none(), "not before a refresh");
        assert!(db.refresh(&mut v));
        assert!(v.inbound(&db, 0x500).is_some());
        assert!(!db.refresh(&mut v));
        let g = v.generation();
        let moved = Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(198, 51, 100, 9),
            natt: None,
        };
        db.install_outbound(0, OutboundSa::new(&params(0x501), now).unwrap(), any());
        assert!(db.route(0, Some(0x501)));
        assert!(db.update_endpoints(0, 0x501, false, |_| moved));
        assert!(db.refresh(&mut v));
        assert!(v.generation() > g);
        let mut buf = packet([10, 0, 0, 10], [10, 2, 0, 4]);
        let e = v.outbound_for(&db, 0, &buf[64..104]).unwrap();
        let outer = e.encapsulate(&mut buf, 64..104).unwrap();
        assert_eq!(&buf[outer.start + 16..outer.start + 20], &[198, 51, 100, 9]);
        // Same SA (sequence numbers, counters) behind the moved entry.
        assert_eq!(db.outbound_counters(0, 0x501).unwrap().packets, 1);
        assert_eq!(e.sa.next_seq(), 2);
    }

    /// Threads send and receive on their own views while the control plane
    /// rekeys and deletes: no packet is lost from the tunnel's totals, even
    /// those processed on an SA already deleted from the tables.
    #[test]
    fn totals_stay_exact_while_threads_use_views_across_rekeys() {
        use std::sync::atomic::AtomicBool;
        let now = Instant::now();
        let db = SaDb::new();
        db.install_inbound(0, InboundSa::new(&params(0x1000), now).unwrap(), any());
        db.install_outbound(0, OutboundSa::new(&params(0x1000), now).unwrap(), any());
        assert!(db.route(0, Some(0x1000)));
        let stop = AtomicBool::new(false);
        let (sent, carried) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let mut v = db.view();
                    while !stop.load(Ordering::Relaxed) {
                        db.refresh(&mut v);
                        let mut buf = packet([10, 0, 0, 10], [10, 2, 0, 4]);
                        let Ok(out) = v.outbound_for(&db, 0, &buf[64..104]) else {
                            continue;
                        };
                        let spi = out.sa.spi();
                        let outer = out.encapsulate(&mut buf, 64..104).unwrap();
                        sent.fetch_add(1, Ordering::Relaxed);
                        // The same view has the inbound SA of the same SPI.
                        let inb = v.inbound(&db, spi).unwrap();
                        if inb
                            .sa
                            .decapsulate(&mut buf, outer.start + 20..outer.end)
                            .is_ok()
                        {
                            carried.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            for k in 1..=20u32 {
                std::thread::sleep(std::time::Duration::from_millis(5));
                let (old, new) = (0x1000 + k - 1, 0x1000 + k);
                db.install_inbound(0, InboundSa::new(&params(new), now).unwrap(), any());
                db.install_outbound(0, OutboundSa::new(&params(new), now).unwrap(), any());
                assert!(db.route(0, Some(new)));
                db.delete_outbound(0, old);
                db.delete_inbound(old);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
            stop.store(true, Ordering::Relaxed);
        });
        let (sent, carried) = (sent.into_inner(), carried.into_inner());
        assert!(carried > 0);
        let t = db.tunnel_totals(0);
        assert_eq!(
            (t.packets_out, t.packets_in),
            (sent, carried),
            "every packet counted"
        );
        // Threads sharing an SA reorder its packets: a few fall out of the
        // 64-packet window, counted as replays, nothing else.
        assert_eq!(t.drops.get(DropReason::Replay), sent - carried);
        assert_eq!(t.drops.total(), sent - carried);
    }
}
