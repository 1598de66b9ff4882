//! `datapath = "tun"`: the tunnels' TUN devices and the sockets of the
//! [`SlowPath`], with ESP in user space and no XDP. The `xdp` mode runs this
//! too, for the host's own tunnel traffic and for what XDP passes up.

use std::{
    io,
    net::UdpSocket,
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use super::{
    DatapathConfig, DatapathStatus, IkeSink, SaExpiry, TunnelConfig, TunnelCounters,
    backend::{SpiAllocator, UserBackend},
    io_err,
    slots::{drain_routes, free_slot, set_interface_flag},
};
use crate::{
    DatapathError,
    netlink::{Rtnl, ifindex},
    sadb::{SaDb, TunnelTotals},
    slowpath::{SlowCounters, SlowPath, raw_esp_socket},
    tun::Tun,
    xdp::XdpPrograms,
};
use ike_proto::backend::{Direction, SaBackend};

/// Creates tunnel `name`'s TUN device, down, carrier off (see
/// [`bring_up`]).
fn tunnel_device(name: &str) -> Result<Tun, DatapathError> {
    let tun = Tun::create(name).map_err(io_err(format!("creating tunnel interface {name}")))?;
    existing_ifindex(name)?;
    tun.set_carrier(false)
        .map_err(io_err(format!("{name}: carrier")))?;
    // A tunnel has carrier exactly while it has an outbound SA; with this
    // the kernel's FIB (and XDP's bpf_fib_lookup) passes over its next hops
    // meanwhile, in an ECMP route too, so that a tunnel being added (or one
    // whose SA is gone) is never chosen before the routing daemon sees it.
    set_interface_flag(
        name,
        &format!("ipv4/conf/{name}/ignore_routes_with_linkdown"),
        "ignore_routes_with_linkdown",
    )?;
    // The tunnels carry IPv4 selectors only: without this the device's own
    // IPv6 (router solicitations, MLD) would go in and count as no_selector.
    set_interface_flag(
        name,
        &format!("ipv6/conf/{name}/disable_ipv6"),
        "turning IPv6 off",
    )?;
    Ok(tun)
}

/// Brings tunnel `name`'s device up with its /32 address: from then on the
/// routing daemon puts its next hops into routes (without carrier at
/// first, see [`tunnel_device`]).
fn bring_up(
    rtnl: &mut Rtnl,
    name: &str,
    addr: std::net::Ipv4Addr,
    mtu: u16,
) -> Result<(), DatapathError> {
    let ifindex = existing_ifindex(name)?;
    rtnl.set_link_up(ifindex, u32::from(mtu))?;
    rtnl.replace_address(ifindex, addr, 32)?;
    Ok(())
}

/// Interface `name`'s index, an error if there is none.
fn existing_ifindex(name: &str) -> Result<u32, DatapathError> {
    match ifindex(name) {
        0 => Err(io_err(format!("finding interface {name}"))(
            io::Error::last_os_error(),
        )),
        i => Ok(i),
    }
}

/// `now - base`: a tunnel's totals since its slot was given to it (the
/// slot's earlier tunnel's SAs stay in the SA database's totals).
fn since(now: TunnelTotals, base: &TunnelTotals) -> TunnelTotals {
    let mut out = TunnelTotals {
        packets_in: now.packets_in.saturating_sub(base.packets_in),
        bytes_in: now.bytes_in.saturating_sub(base.bytes_in),
        packets_out: now.packets_out.saturating_sub(base.packets_out),
        bytes_out: now.bytes_out.saturating_sub(base.bytes_out),
        ..TunnelTotals::default()
    };
    for (r, n) in now.drops.iter() {
        out.drops.record_n(r, n.saturating_sub(base.drops.get(r)));
    }
    out
}

/// The socket datapath.
pub struct SocketDatapath {
    pub(super) sadb: Arc<SaDb>,
    /// The current generation of the socket paths: a new one (same SA
    /// database, sockets and counters; new threads) each time a tunnel is
    /// added or removed.
    pub(super) path: Arc<SlowPath>,
    pub(super) stop: Arc<AtomicBool>,
    spis: SpiAllocator,
    threads: Vec<JoinHandle<()>>,
    /// Where IKE from UDP 4500 goes, kept for the next generation.
    ike: Arc<Mutex<IkeSink>>,
    tunnel_mtu: u16,
    /// Slot N's totals when its current tunnel got it.
    baselines: Vec<TunnelTotals>,
}

impl SocketDatapath {
    /// Creates the tunnel devices and starts the socket threads.
    pub fn start(
        cfg: &DatapathConfig,
        udp4500: Arc<UdpSocket>,
        ike: IkeSink,
    ) -> Result<Self, DatapathError> {
        let mut rtnl = Rtnl::open()?;
        let mut tuns = Vec::new();
        for t in &cfg.tunnels {
            tuns.push(Some(Arc::new(tunnel_device(&t.name)?)));
            bring_up(&mut rtnl, &t.name, t.address, cfg.tunnel_mtu)?;
            log::info!(
                "{}: interface up with {}/32, peer {}",
                t.name,
                t.address,
                t.peer
            );
        }
        let raw =
            raw_esp_socket(cfg.public_address).map_err(io_err("opening the raw ESP socket"))?;
        let sadb = Arc::new(SaDb::new());
        let stop = Arc::new(AtomicBool::new(false));
        let path = Arc::new(SlowPath {
            sadb: sadb.clone(),
            tuns,
            udp4500,
            raw_esp: Arc::new(raw),
            mss_clamp: cfg.mss_clamp,
            counters: Arc::new(SlowCounters::default()),
            stop: stop.clone(),
        });
        let ike = Arc::new(Mutex::new(ike));
        let threads = start_threads(&path, &ike)?;
        Ok(Self {
            sadb,
            path,
            stop,
            spis: SpiAllocator::new(),
            threads,
            ike,
            tunnel_mtu: cfg.tunnel_mtu,
            baselines: vec![TunnelTotals::default(); cfg.tunnels.len()],
        })
    }

    /// Adds tunnel `t` (`xesp reload`): its device, in the lowest free
    /// slot, whose index it returns, then up. The socket paths start again
    /// with it (packets wait in the sockets' queues meanwhile); the SAs stay.
    pub(super) fn add_tunnel(&mut self, t: &TunnelConfig) -> Result<u32, DatapathError> {
        let slot = self.add_tunnel_down(t)?;
        self.bring_up(t, slot)?;
        Ok(slot)
    }

    /// [`SocketDatapath::add_tunnel`] with the device left down, for a
    /// datapath that has more to do before routes may name it.
    pub(super) fn add_tunnel_down(&mut self, t: &TunnelConfig) -> Result<u32, DatapathError> {
        if self.path.tuns.iter().flatten().any(|d| d.name() == t.name) {
            return Err(DatapathError::Config(format!(
                "tunnel {} exists already",
                t.name
            )));
        }
        let slot = free_slot(&self.path.tuns)?;
        let dev = Arc::new(tunnel_device(&t.name)?);
        let mut tuns = self.path.tuns.clone();
        if slot == tuns.len() {
            tuns.push(None);
        }
        tuns[slot] = Some(dev);
        self.restart(tuns)?;
        self.baselines
            .resize(self.path.tuns.len(), TunnelTotals::default());
        self.baselines[slot] = self.sadb.tunnel_totals(slot as u32);
        Ok(slot as u32)
    }

    /// Brings added tunnel `t`'s device up, in `slot`.
    pub(super) fn bring_up(&mut self, t: &TunnelConfig, slot: u32) -> Result<(), DatapathError> {
        bring_up(&mut Rtnl::open()?, &t.name, t.address, self.tunnel_mtu)?;
        log::info!(
            "{}: added as tunnel {slot}, interface up with {}/32, peer {}",
            t.name,
            t.address,
            t.peer
        );
        Ok(())
    }

    /// Removes tunnel `slot`: its device down until no ECMP route goes
    /// through it ([`drain_routes`]), then its SAs (their counters stay in
    /// the slot's totals), then its device; the slot becomes free, the other
    /// tunnels keep their indexes.
    pub(super) fn remove_tunnel(
        &mut self,
        slot: u32,
        xdp: Option<&mut XdpPrograms>,
    ) -> Result<(), DatapathError> {
        let Some(Some(dev)) = self.path.tuns.get(slot as usize) else {
            return Err(DatapathError::TunnelIndex(slot));
        };
        let name = dev.name().to_string();
        // Its routes first, while its SAs still carry what is on its way
        // through it; then its SAs.
        drain_routes(&name)?;
        self.backend(slot, xdp)
            .delete_all()
            .map_err(|e| DatapathError::Config(format!("{name}: removing its SAs: {e}")))?;
        let mut tuns = self.path.tuns.clone();
        tuns[slot as usize] = None;
        while tuns.last().is_some_and(Option::is_none) {
            tuns.pop();
        }
        // The device goes with the last reference to it: the old
        // generation's threads, joined here.
        self.restart(tuns)?;
        log::info!("{name}: removed (tunnel {slot} is free)");
        Ok(())
    }

    /// Stops the socket paths' threads and starts the next generation on
    /// `tuns`.
    fn restart(&mut self, tuns: Vec<Option<Arc<Tun>>>) -> Result<(), DatapathError> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let old = &self.path;
        let path = Arc::new(SlowPath {
            sadb: self.sadb.clone(),
            tuns,
            udp4500: old.udp4500.clone(),
            raw_esp: old.raw_esp.clone(),
            mss_clamp: old.mss_clamp,
            counters: old.counters.clone(),
            stop: stop.clone(),
        });
        self.path = path;
        self.stop = stop;
        self.threads = start_threads(&self.path, &self.ike)?;
        Ok(())
    }

    pub(super) fn backend<'a>(
        &'a mut self,
        tunnel: u32,
        xdp: Option<&'a mut XdpPrograms>,
    ) -> UserBackend<'a> {
        UserBackend {
            tunnel,
            sadb: &self.sadb,
            tuns: &self.path.tuns,
            spis: &mut self.spis,
            xdp,
        }
    }

    pub(super) fn expiries(&self, now: Instant) -> Vec<SaExpiry> {
        self.sadb
            .poll_expiries(now)
            .into_iter()
            .map(|(tunnel, spi, inbound, expiry)| SaExpiry {
                tunnel,
                spi,
                direction: if inbound {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                expiry,
            })
            .collect()
    }

    pub(super) fn status(&self, description: &'static str) -> DatapathStatus {
        // Drops after a burst's last datagram, which no datagram reported.
        let c = &self.path.counters;
        crate::rxq::sync(&c.udp4500_buffer_drops, self.path.udp4500.as_raw_fd());
        crate::rxq::sync(&c.esp_buffer_drops, self.path.raw_esp.as_raw_fd());
        let (unknown_spi, no_outbound_sa) = self.sadb.orphans();
        DatapathStatus {
            description,
            tunnels: (0..self.path.tuns.len())
                .map(|t| TunnelCounters {
                    totals: since(
                        self.sadb.tunnel_totals(t as u32),
                        self.baselines.get(t).unwrap_or(&TunnelTotals::default()),
                    ),
                    xdp: None,
                    interface: None,
                })
                .collect(),
            socket_path: self
                .path
                .counters
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            unknown_spi,
            no_outbound_sa,
            ..DatapathStatus::default()
        }
    }

    /// Sets the stop flag; the threads end within a tick.
    pub(super) fn join(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts `path`'s threads; IKE goes to `ike`.
fn start_threads(
    path: &Arc<SlowPath>,
    ike: &Arc<Mutex<IkeSink>>,
) -> Result<Vec<JoinHandle<()>>, DatapathError> {
    let ike = ike.clone();
    let threads = path
        .clone()
        .start(move |from, data| {
            let sink = ike
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            sink(from, data)
        })
        .map_err(io_err("starting the datapath threads"))?;
    Ok(threads.handles)
}

impl super::Datapath for SocketDatapath {
    fn tunnel(&mut self, tunnel: u32) -> Box<dyn SaBackend + '_> {
        Box::new(self.backend(tunnel, None))
    }

    fn expiries(&mut self, now: Instant) -> Vec<SaExpiry> {
        SocketDatapath::expiries(self, now)
    }

    fn tick(&mut self, _now: Instant) -> Result<(), DatapathError> {
        Ok(())
    }

    fn status(&mut self) -> DatapathStatus {
        SocketDatapath::status(self, "sockets")
    }

    fn set_dmz(&mut self, _: &[ipnet::IpNet], _: bool) -> Result<(), DatapathError> {
        Ok(())
    }

    fn add_tunnel(&mut self, t: &TunnelConfig) -> Result<u32, DatapathError> {
        SocketDatapath::add_tunnel(self, t)
    }

    fn remove_tunnel(&mut self, tunnel: u32) -> Result<(), DatapathError> {
        SocketDatapath::remove_tunnel(self, tunnel, None)
    }

    fn stop(self: Box<Self>) {
        self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xesp_esp::sa::DropReason;

    #[test]
    fn a_reused_slot_counts_from_zero_for_its_new_tunnel() {
        let mut base = TunnelTotals {
            packets_in: 10,
            bytes_in: 1000,
            packets_out: 20,
            bytes_out: 2000,
            ..TunnelTotals::default()
        };
        base.drops.record_n(DropReason::NoSelector, 3);
        let mut now = base;
        now.packets_in += 5;
        now.bytes_out += 70;
        now.drops.record_n(DropReason::NoSelector, 2);
        let t = since(now, &base);
        assert_eq!(
            (t.packets_in, t.bytes_in, t.packets_out, t.bytes_out),
            (5, 0, 0, 70)
        );
        assert_eq!(t.drops.get(DropReason::NoSelector), 2);
        assert_eq!(since(base, &TunnelTotals::default()), base);
    }
}
