//! `datapath = "tun"`: the tunnels' TUN devices and the sockets of the
//! [`SlowPath`], with ESP in user space and no XDP. The `xdp` mode runs this
//! too, for the host's own tunnel traffic and for what XDP passes up.

use std::{
    io,
    net::UdpSocket,
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use super::{
    DatapathConfig, DatapathStatus, IkeSink, SaExpiry, TunnelCounters,
    backend::{SpiAllocator, UserBackend},
    io_err,
};
use crate::{
    DatapathError,
    netlink::{Rtnl, ifindex},
    sadb::SaDb,
    slowpath::{SlowCounters, SlowPath, raw_esp_socket},
    tun::Tun,
    xdp::XdpPrograms,
};
use ike_proto::backend::{Direction, SaBackend};

/// Creates tunnel `name`'s TUN device with its /32 address, up, carrier off.
fn tunnel_device(
    rtnl: &mut Rtnl,
    name: &str,
    addr: std::net::Ipv4Addr,
    mtu: u16,
) -> Result<Tun, DatapathError> {
    let tun = Tun::create(name).map_err(io_err(format!("creating tunnel interface {name}")))?;
    let ifindex = ifindex(name);
    if ifindex == 0 {
        return Err(io_err(format!("finding interface {name}"))(
            io::Error::last_os_error(),
        ));
    }
    tun.set_carrier(false)
        .map_err(io_err(format!("{name}: carrier")))?;
    // The tunnels carry IPv4 selectors only: without this the device's own
    // IPv6 (router solicitations, MLD) would go in and count as no_selector.
    let v6 = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if std::path::Path::new(&v6).exists() {
        std::fs::write(&v6, "1").map_err(io_err(format!("{name}: turning IPv6 off")))?;
    }
    rtnl.set_link_up(ifindex, u32::from(mtu))?;
    rtnl.replace_address(ifindex, addr, 32)?;
    Ok(tun)
}

/// The socket datapath.
pub struct SocketDatapath {
    pub(super) sadb: Arc<SaDb>,
    pub(super) path: Arc<SlowPath>,
    pub(super) stop: Arc<AtomicBool>,
    spis: SpiAllocator,
    threads: Vec<JoinHandle<()>>,
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
            tuns.push(Arc::new(tunnel_device(
                &mut rtnl,
                &t.name,
                t.address,
                cfg.tunnel_mtu,
            )?));
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
        let threads = path
            .clone()
            .start(ike)
            .map_err(io_err("starting the datapath threads"))?
            .handles;
        Ok(Self {
            sadb,
            path,
            stop,
            spis: SpiAllocator::new(),
            threads,
        })
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
            tunnels: (0..self.path.tuns.len() as u32)
                .map(|t| TunnelCounters {
                    totals: self.sadb.tunnel_totals(t),
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

    fn stop(self: Box<Self>) {
        self.join();
    }
}
