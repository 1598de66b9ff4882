//! The SA database of the user-space datapath: inbound SAs by SPI, outbound
//! SAs by SPI, and which outbound SA each tunnel sends on. Filled by the IKE
//! controller (through its SaBackend), read by the packet paths.
//!
//! Lookups take a read lock on the tables and clone an `Arc`; each SA has
//! its own lock, held while one packet (or one batch) is processed. A worker
//! that owns a queue rarely meets another on the same SA.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use std::time::Instant;

use xesp_esp::sa::{DropCounters, DropReason, Expiry, InboundSa, OutboundSa, SaCounters, Tunnel};

/// An inbound SA and the tunnel it belongs to.
pub struct InboundEntry {
    pub tunnel: u32,
    pub sa: Mutex<InboundSa>,
}

/// An outbound SA and the tunnel it belongs to.
pub struct OutboundEntry {
    pub tunnel: u32,
    pub sa: Mutex<OutboundSa>,
}

#[derive(Default)]
struct Tables {
    inbound: HashMap<u32, Arc<InboundEntry>>,
    outbound: HashMap<u32, Arc<OutboundEntry>>,
    routes: HashMap<u32, Arc<OutboundEntry>>,
    /// Totals of deleted SAs, per tunnel, so that tunnel counters survive rekeys.
    retired: HashMap<u32, TunnelTotals>,
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

/// The SA database.
#[derive(Default)]
pub struct SaDb {
    tables: RwLock<Tables>,
    /// ESP whose SPI no SA has (RFC 4303 §3.4.2: audited, dropped).
    unknown_spi: AtomicU64,
    /// Tunnel traffic with no outbound SA (the tunnel is down).
    no_sa: AtomicU64,
}

fn lock_poisoned<T>(e: std::sync::PoisonError<T>) -> T {
    // A panic while holding the lock is a bug elsewhere; the tables
    // themselves are always consistent between statements.
    e.into_inner()
}

impl SaDb {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn install_inbound(&self, tunnel: u32, sa: InboundSa) {
        let spi = sa.spi();
        let mut t = self.tables.write().unwrap_or_else(lock_poisoned);
        t.inbound.insert(
            spi,
            Arc::new(InboundEntry {
                tunnel,
                sa: Mutex::new(sa),
            }),
        );
    }

    pub fn install_outbound(&self, tunnel: u32, sa: OutboundSa) {
        let spi = sa.spi();
        let mut t = self.tables.write().unwrap_or_else(lock_poisoned);
        t.outbound.insert(
            spi,
            Arc::new(OutboundEntry {
                tunnel,
                sa: Mutex::new(sa),
            }),
        );
    }

    /// Moves one direction to new outer endpoints (the peer's NAT mapping
    /// changed), keeping its keys, sequence numbers and counters. False if
    /// it is not installed.
    pub fn update_endpoints(
        &self,
        spi: u32,
        inbound: bool,
        f: impl FnOnce(Tunnel) -> Tunnel,
    ) -> bool {
        let t = self.tables.read().unwrap_or_else(lock_poisoned);
        if inbound {
            let Some(e) = t.inbound.get(&spi) else {
                return false;
            };
            let mut sa = e.sa.lock().unwrap_or_else(lock_poisoned);
            let next = f(sa.tunnel());
            sa.set_tunnel(next);
        } else {
            let Some(e) = t.outbound.get(&spi) else {
                return false;
            };
            let mut sa = e.sa.lock().unwrap_or_else(lock_poisoned);
            let next = f(sa.tunnel());
            sa.set_tunnel(next);
        }
        true
    }

    /// Makes outbound `spi` the one `tunnel` sends on (or none). False if
    /// no such outbound SA is installed.
    pub fn route(&self, tunnel: u32, spi: Option<u32>) -> bool {
        let mut t = self.tables.write().unwrap_or_else(lock_poisoned);
        match spi {
            None => {
                t.routes.remove(&tunnel);
                true
            }
            Some(s) => match t.outbound.get(&s).cloned() {
                Some(e) => {
                    t.routes.insert(tunnel, e);
                    true
                }
                None => false,
            },
        }
    }

    /// Removes one direction; its counters go to the tunnel's totals.
    pub fn delete_inbound(&self, spi: u32) {
        let mut t = self.tables.write().unwrap_or_else(lock_poisoned);
        if let Some(e) = t.inbound.remove(&spi) {
            let c = e.sa.lock().unwrap_or_else(lock_poisoned).counters();
            t.retired.entry(e.tunnel).or_default().add(&c, true);
        }
    }

    pub fn delete_outbound(&self, spi: u32) {
        let mut t = self.tables.write().unwrap_or_else(lock_poisoned);
        if let Some(e) = t.outbound.remove(&spi) {
            let c = e.sa.lock().unwrap_or_else(lock_poisoned).counters();
            t.retired.entry(e.tunnel).or_default().add(&c, false);
            t.routes.retain(|_, r| !Arc::ptr_eq(r, &e));
        }
    }

    pub fn inbound(&self, spi: u32) -> Option<Arc<InboundEntry>> {
        let e = self
            .tables
            .read()
            .unwrap_or_else(lock_poisoned)
            .inbound
            .get(&spi)
            .cloned();
        if e.is_none() {
            self.unknown_spi.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    /// The SA `tunnel` sends on; counts a drop when there is none.
    pub fn outbound_of(&self, tunnel: u32) -> Option<Arc<OutboundEntry>> {
        let e = self
            .tables
            .read()
            .unwrap_or_else(lock_poisoned)
            .routes
            .get(&tunnel)
            .cloned();
        if e.is_none() {
            self.no_sa.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    pub fn inbound_counters(&self, spi: u32) -> Option<SaCounters> {
        let e = self
            .tables
            .read()
            .unwrap_or_else(lock_poisoned)
            .inbound
            .get(&spi)
            .cloned()?;
        let c = e.sa.lock().unwrap_or_else(lock_poisoned).counters();
        Some(c)
    }

    pub fn outbound_counters(&self, spi: u32) -> Option<SaCounters> {
        let e = self
            .tables
            .read()
            .unwrap_or_else(lock_poisoned)
            .outbound
            .get(&spi)
            .cloned()?;
        let c = e.sa.lock().unwrap_or_else(lock_poisoned).counters();
        Some(c)
    }

    /// A tunnel's totals: live SAs plus those deleted.
    pub fn tunnel_totals(&self, tunnel: u32) -> TunnelTotals {
        let t = self.tables.read().unwrap_or_else(lock_poisoned);
        let mut out = t.retired.get(&tunnel).copied().unwrap_or_default();
        for e in t.inbound.values().filter(|e| e.tunnel == tunnel) {
            out.add(&e.sa.lock().unwrap_or_else(lock_poisoned).counters(), true);
        }
        for e in t.outbound.values().filter(|e| e.tunnel == tunnel) {
            out.add(&e.sa.lock().unwrap_or_else(lock_poisoned).counters(), false);
        }
        out
    }

    pub fn contains_inbound(&self, spi: u32) -> bool {
        self.tables
            .read()
            .unwrap_or_else(lock_poisoned)
            .inbound
            .contains_key(&spi)
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
        entry.sa.lock().unwrap_or_else(lock_poisoned).record_drop(r);
    }

    /// Lifetime events of every SA as of `now`: `(tunnel, spi, inbound, event)`.
    pub fn poll_expiries(&self, now: Instant) -> Vec<(u32, u32, bool, Expiry)> {
        let t = self.tables.read().unwrap_or_else(lock_poisoned);
        let mut out = Vec::new();
        for (spi, e) in &t.inbound {
            let mut sa = e.sa.lock().unwrap_or_else(lock_poisoned);
            for x in std::iter::from_fn(|| sa.poll_expiry(now)).take(4) {
                out.push((e.tunnel, *spi, true, x));
            }
        }
        for (spi, e) in &t.outbound {
            let mut sa = e.sa.lock().unwrap_or_else(lock_poisoned);
            for x in std::iter::from_fn(|| sa.poll_expiry(now)).take(4) {
                out.push((e.tunnel, *spi, false, x));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use xesp_esp::{
        alg::{AesKeyBits, Encr, Suite},
        sa::{Lifetime, SaParams, Tunnel},
    };

    use super::*;

    const KEY: [u8; 36] = [7; 36];

    fn params(spi: u32) -> SaParams<'static> {
        SaParams {
            spi,
            suite: Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap(),
            keymat: &KEY,
            esn: false,
            replay_window: 64,
            tunnel: Tunnel {
                local: Ipv4Addr::new(192, 0, 2, 1),
                remote: Ipv4Addr::new(203, 0, 113, 11),
                natt: None,
            },
            lifetime: Lifetime::default(),
        }
    }

    /// Encapsulates one 40-octet packet on `tunnel`'s routed SA and
    /// decapsulates it with inbound `spi`.
    fn carry(db: &SaDb, tunnel: u32, spi: u32) -> bool {
        let mut buf = vec![0u8; 256];
        buf[64] = 0x45;
        buf[66..68].copy_from_slice(&40u16.to_be_bytes());
        let Some(out) = db.outbound_of(tunnel) else {
            return false;
        };
        let outer = out
            .sa
            .lock()
            .unwrap()
            .encapsulate(&mut buf, 64..104)
            .unwrap();
        let Some(inb) = db.inbound(spi) else {
            return false;
        };
        let r = inb
            .sa
            .lock()
            .unwrap()
            .decapsulate(&mut buf, outer.start + 20..outer.end);
        r.is_ok()
    }

    #[test]
    fn routes_switch_and_totals_survive_deletion() {
        let now = Instant::now();
        let db = SaDb::new();
        assert!(!db.route(0, Some(0x1000)), "no such outbound SA");
        db.install_inbound(0, InboundSa::new(&params(0x1000), now).unwrap());
        db.install_outbound(0, OutboundSa::new(&params(0x1000), now).unwrap());
        assert!(!carry(&db, 0, 0x1000), "not routed yet");
        assert_eq!(db.orphans(), (0, 1));
        assert!(db.route(0, Some(0x1000)));
        assert!(carry(&db, 0, 0x1000));
        // A rekey: the new SA pair, routed; the old one deleted.
        db.install_inbound(0, InboundSa::new(&params(0x2000), now).unwrap());
        db.install_outbound(0, OutboundSa::new(&params(0x2000), now).unwrap());
        assert!(db.route(0, Some(0x2000)));
        db.delete_outbound(0x1000);
        db.delete_inbound(0x1000);
        assert!(carry(&db, 0, 0x2000));
        assert!(db.inbound(0x1000).is_none());
        let t = db.tunnel_totals(0);
        assert_eq!((t.packets_in, t.packets_out), (2, 2));
        assert_eq!((t.bytes_in, t.bytes_out), (80, 80));
        assert_eq!(db.tunnel_totals(1), TunnelTotals::default());
        // Deleting the routed SA takes the tunnel down.
        db.delete_outbound(0x2000);
        assert!(db.outbound_of(0).is_none());
        assert_eq!(db.orphans(), (1, 2));
    }

    #[test]
    fn updated_endpoints_keep_the_sa_and_move_its_outer_addresses() {
        let db = SaDb::new();
        db.install_outbound(0, OutboundSa::new(&params(0x300), Instant::now()).unwrap());
        db.install_inbound(0, InboundSa::new(&params(0x301), Instant::now()).unwrap());
        let moved = Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(198, 51, 100, 7),
            natt: None,
        };
        assert!(db.update_endpoints(0x300, false, |_| moved));
        assert!(db.update_endpoints(0x301, true, |_| moved));
        assert!(!db.update_endpoints(0x999, false, |t| t), "not installed");
        assert!(db.route(0, Some(0x300)));
        let out = db.outbound_of(0).unwrap();
        assert_eq!(out.sa.lock().unwrap().tunnel(), moved);
        assert_eq!(
            db.inbound(0x301).unwrap().sa.lock().unwrap().tunnel(),
            moved
        );
    }
}
