//! `datapath = "xfrm"`: the kernel's ESP. CHILD_SAs become XFRM SAs and
//! policies (through [`crate::xfrm`]), each tunnel is an xfrm interface
//! (the article's Tunnel0/Tunnel1, `if_id` = tunnel + 1) whose link is up
//! exactly while the tunnel has an outbound SA, so the FIB, BGP and the ECMP
//! route follow the tunnel's state as they do with the TUN devices. UDP 4500
//! is an ESP-in-UDP socket (`UDP_ENCAP_ESPINUDP`): the kernel takes ESP,
//! IKE behind the non-ESP marker still reaches the daemon. The XDP DMZ
//! filter stays in front; ESP goes to the stack, not to AF_XDP.
//!
//! Make-before-break (as with the eBPF backend): a new inbound SA is
//! installed at once; an outbound SA is kept back until it is routed, then
//! added to the kernel, whose output lookup prefers the newest SA of the
//! tunnel's reqid; the old one goes when the core deletes it. Lifetimes are
//! the kernel's: its soft EXPIRE rekeys, its hard one ends the CHILD_SA.
//! `XFRM_MSG_ACQUIRE` is not needed: route-based tunnels have policies with
//! SAs in place before traffic is routed into them.
//!
//! Everything xesp installs carries its reqid range ([`xfrm::is_ours`]);
//! start (after a crash) and stop remove exactly that, never the host's
//! other SAs and policies.
//!
//! The TCP MSS clamp (`mss_clamp`) is the kernel's too: nftables rules in
//! xesp's own table `inet xesp` ([`crate::nft_mss`], which says why
//! nftables and not TC), defined at start (replacing a crashed run's) and
//! deleted on stop. `xesp status` shows each xfrm interface's own
//! statistics beside the SAs' counters.

use std::{
    collections::{HashMap, HashSet},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ike_proto::{
    backend::{BackendError, ChildSaSpec, Direction, SaBackend},
    random::{Random, SystemRandom},
};
use ipnet::IpNet;
use xesp_esp::sa::{Expiry, Limit, SaCounters};

use super::{
    DatapathConfig, DatapathStatus, IkeSink, InterfaceCounters, SaExpiry, TunnelCounters, io_err,
    xdp,
};
use crate::{
    DatapathError,
    netlink::{Rtnl, ifindex},
    nft_mss, rxq,
    sadb::TunnelTotals,
    xdp::XdpPrograms,
    xfrm::{self, ExpireEvents, SaId, Xfrm, XfrmError, XfrmSa, tunnel_policies},
};

use super::{
    TunnelConfig,
    slots::{drain_routes, free_slot, set_interface_flag},
};

fn backend_error(e: XfrmError) -> BackendError {
    BackendError::System(e.to_string())
}

fn xfrm_error(what: &str) -> impl FnOnce(XfrmError) -> DatapathError + '_ {
    move |e| DatapathError::Config(format!("{what}: {e}"))
}

/// One tunnel's xfrm interface.
struct Interface {
    name: String,
    ifindex: u32,
    mtu: u16,
    if_id: u32,
    reqid: u32,
}

/// An SA of ours, as installed (or held back, outbound, until routed).
struct Installed {
    tunnel: u32,
    direction: Direction,
    sa: XfrmSa,
    in_kernel: bool,
}

/// The XFRM datapath.
pub struct XfrmDatapath {
    xfrm: Xfrm,
    rtnl: Rtnl,
    events: ExpireEvents,
    /// Tunnel N's interface is `tunnels[N]`; `None`: a slot freed by a
    /// removed tunnel (`xesp reload`), so that the others keep their
    /// indexes, if_ids and reqids.
    tunnels: Vec<Option<Interface>>,
    /// The DMZ interface's index (the xfrm interfaces' underlying link).
    link: u32,
    tunnel_mtu: u16,
    mss_clamp: u16,
    sas: HashMap<(Direction, u32, u32), Installed>,
    /// Inbound SPIs handed out, not installed yet.
    reserved: HashSet<u32>,
    rng: SystemRandom,
    /// Counters of the SAs that are gone, per tunnel.
    closed: Vec<TunnelTotals>,
    dmz: XdpPrograms,
    allowed: Vec<IpNet>,
    stop: Arc<AtomicBool>,
    ike_reader: Option<JoinHandle<()>>,
}

/// Key of an SA: direction, tunnel, SPI (outbound SPIs are the peers').
fn key(direction: Direction, tunnel: u32, spi: u32) -> (Direction, u32, u32) {
    (direction, tunnel, spi)
}

/// Creates tunnel `t`'s xfrm interface for slot `slot` (if_id `slot + 1`,
/// reqid [`xfrm::reqid`]`(slot)`) on `link`, with its /32 address, down
/// until the tunnel is up. An interface of that name is replaced.
fn tunnel_interface(
    rtnl: &mut Rtnl,
    link: u32,
    slot: usize,
    t: &TunnelConfig,
    mtu: u16,
) -> Result<Interface, DatapathError> {
    let old = ifindex(&t.name);
    if old != 0 {
        log::warn!("{}: an interface of that name exists: replaced", t.name);
        xfrm::delete_interface(old).map_err(xfrm_error(&t.name))?;
    }
    let if_id = slot as u32 + 1;
    let ifindex = xfrm::create_interface(&t.name, if_id, link)
        .map_err(xfrm_error(&format!("creating {}", t.name)))?;
    set_interface_flag(
        &t.name,
        &format!("ipv6/conf/{}/disable_ipv6", t.name),
        "turning IPv6 off",
    )?;
    rtnl.replace_address(ifindex, t.address, 32)?;
    log::info!(
        "{}: xfrm interface (if_id {if_id}) with {}/32, peer {}, down until the tunnel is up",
        t.name,
        t.address,
        t.peer
    );
    Ok(Interface {
        name: t.name.clone(),
        ifindex,
        mtu,
        if_id,
        reqid: xfrm::reqid(slot as u32).map_err(xfrm_error(&t.name))?,
    })
}

impl XfrmDatapath {
    /// The MSS clamp's table again, on the interfaces there are now.
    fn clamp_interfaces(&self) -> Result<(), DatapathError> {
        let names: Vec<&str> = self
            .tunnels
            .iter()
            .flatten()
            .map(|t| t.name.as_str())
            .collect();
        if names.is_empty() {
            return Ok(nft_mss::remove()?);
        }
        nft_mss::install(&names, self.mss_clamp)?;
        Ok(())
    }

    pub fn start(
        cfg: &DatapathConfig,
        udp4500: Arc<UdpSocket>,
        ike: IkeSink,
    ) -> Result<Self, DatapathError> {
        let mut x = Xfrm::open().map_err(xfrm_error("opening NETLINK_XFRM"))?;
        let flushed = x
            .flush_ours()
            .map_err(xfrm_error("removing a previous run's SAs"))?;
        if flushed.sas + flushed.policies > 0 {
            log::warn!(
                "removed {} SAs and {} policies a previous run left",
                flushed.sas,
                flushed.policies
            );
        }
        // The clamp matches interface names, so it goes in first: without
        // nft the start fails before anything else is set up.
        let names: Vec<&str> = cfg.tunnels.iter().map(|t| t.name.as_str()).collect();
        nft_mss::install(&names, cfg.mss_clamp)?;
        log::info!(
            "TCP MSS clamped to {} on {} (nftables table {})",
            cfg.mss_clamp,
            names.join(", "),
            nft_mss::TABLE
        );
        let events = ExpireEvents::open().map_err(xfrm_error("subscribing to XFRM expires"))?;
        let dmz = xdp::dmz_filter_only(cfg)?;
        let link = ifindex(&cfg.dmz_interface);
        let mut rtnl = Rtnl::open()?;
        let mut tunnels = Vec::new();
        for (i, t) in cfg.tunnels.iter().enumerate() {
            tunnels.push(Some(tunnel_interface(
                &mut rtnl,
                link,
                i,
                t,
                cfg.tunnel_mtu,
            )?));
        }
        xfrm::set_espinudp(&*udp4500).map_err(xfrm_error("UDP_ENCAP on UDP 4500"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ike_reader = Some(start_ike_reader(udp4500, ike, stop.clone())?);
        Ok(Self {
            xfrm: x,
            rtnl,
            events,
            closed: vec![TunnelTotals::default(); tunnels.len()],
            tunnels,
            link,
            tunnel_mtu: cfg.tunnel_mtu,
            mss_clamp: cfg.mss_clamp,
            sas: HashMap::new(),
            reserved: HashSet::new(),
            rng: SystemRandom::new(),
            dmz,
            allowed: cfg.dmz_allow.clone(),
            stop,
            ike_reader,
        })
    }

    /// An SA's current counters from the kernel (zero when held back).
    fn counters_of(&mut self, k: &(Direction, u32, u32)) -> Option<SaCounters> {
        let s = self.sas.get(k)?;
        if !s.in_kernel {
            return Some(SaCounters::default());
        }
        let id = SaId::esp(s.sa.dst, s.sa.spi);
        self.xfrm
            .counters(id)
            .ok()
            .flatten()
            .map(|c| c.to_sa_counters())
    }
}

/// Reads UDP 4500 for IKE (the kernel keeps ESP and keepalives).
fn start_ike_reader(
    sock: Arc<UdpSocket>,
    ike: IkeSink,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, DatapathError> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(io_err("UDP 4500 read timeout"))?;
    rxq::enable(sock.as_raw_fd()).map_err(io_err("SO_RXQ_OVFL on UDP 4500"))?;
    std::thread::Builder::new()
        .name("udp4500-ike".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let Ok(r) = rxq::recv(sock.as_raw_fd(), &mut buf) else {
                    continue;
                };
                if let (Some(from), Some(rest)) = (r.from, buf[..r.len].strip_prefix(&[0; 4])) {
                    ike(from, rest);
                }
            }
        })
        .map_err(io_err("starting the UDP 4500 reader"))
}

/// One tunnel's view of the XFRM datapath.
struct XfrmBackend<'a> {
    dp: &'a mut XfrmDatapath,
    tunnel: u32,
}

impl XfrmBackend<'_> {
    fn interface(&self, tunnel: u32) -> Result<&Interface, BackendError> {
        if tunnel != self.tunnel {
            return Err(BackendError::NoTunnel(tunnel));
        }
        self.dp
            .tunnels
            .get(tunnel as usize)
            .and_then(Option::as_ref)
            .ok_or(BackendError::NoTunnel(tunnel))
    }

    /// Removes an SA, keeping its last counters in the tunnel's totals.
    fn remove(&mut self, k: (Direction, u32, u32)) -> Result<(), BackendError> {
        let last = self.dp.counters_of(&k);
        let Some(s) = self.dp.sas.remove(&k) else {
            return Ok(());
        };
        if let (Some(c), Some(t)) = (last, self.dp.closed.get_mut(s.tunnel as usize)) {
            add(t, &c, s.direction == Direction::Inbound);
        }
        if s.in_kernel {
            self.dp
                .xfrm
                .delete_sa(SaId::esp(s.sa.dst, s.sa.spi))
                .map_err(backend_error)?;
        }
        Ok(())
    }
}

fn add(t: &mut TunnelTotals, c: &SaCounters, inbound: bool) {
    if inbound {
        t.packets_in += c.packets;
        t.bytes_in += c.bytes;
    } else {
        t.packets_out += c.packets;
        t.bytes_out += c.bytes;
    }
    t.drops.add(&c.drops);
}

impl SaBackend for XfrmBackend<'_> {
    fn allocate_spi(&mut self) -> Result<u32, BackendError> {
        for _ in 0..64 {
            let mut b = [0u8; 4];
            self.dp.rng.fill(&mut b).map_err(|_| BackendError::Random)?;
            let spi = u32::from_be_bytes(b);
            let taken = self.dp.reserved.contains(&spi)
                || self
                    .dp
                    .sas
                    .keys()
                    .any(|(d, _, s)| *d == Direction::Inbound && *s == spi);
            if spi >= 256 && !taken {
                self.dp.reserved.insert(spi);
                return Ok(spi);
            }
        }
        Err(BackendError::NoFreeSpi)
    }

    fn install(&mut self, spec: &ChildSaSpec) -> Result<(), BackendError> {
        let (if_id, reqid) = {
            let i = self.interface(spec.tunnel)?;
            (i.if_id, i.reqid)
        };
        let sa = XfrmSa::from_spec(spec, if_id, reqid);
        sa.validate().map_err(|e| BackendError::Invalid {
            spi: spec.spi,
            reason: e.to_string(),
        })?;
        let in_kernel = spec.direction == Direction::Inbound;
        if in_kernel {
            self.dp.xfrm.add_sa(&sa).map_err(backend_error)?;
            self.dp.reserved.remove(&spec.spi);
            // The tunnel's policies, narrowed to the selectors negotiated.
            let policies = tunnel_policies(
                &spec.local_ts,
                &spec.remote_ts,
                spec.local.ip(),
                spec.remote.ip(),
                if_id,
                reqid,
            )
            .map_err(backend_error)?;
            for p in &policies {
                self.dp.xfrm.update_policy(p).map_err(backend_error)?;
            }
        }
        self.dp.sas.insert(
            key(spec.direction, spec.tunnel, spec.spi),
            Installed {
                tunnel: spec.tunnel,
                direction: spec.direction,
                sa,
                in_kernel,
            },
        );
        Ok(())
    }

    fn route(&mut self, tunnel: u32, spi: Option<u32>) -> Result<(), BackendError> {
        let (ifindex, mtu, name) = {
            let i = self.interface(tunnel)?;
            (i.ifindex, i.mtu, i.name.clone())
        };
        match spi {
            Some(spi) => {
                let Some(s) = self.dp.sas.get_mut(&key(Direction::Outbound, tunnel, spi)) else {
                    return Err(BackendError::NoSuchSa {
                        spi,
                        direction: Direction::Outbound,
                    });
                };
                if !s.in_kernel {
                    self.dp.xfrm.add_sa(&s.sa).map_err(backend_error)?;
                    s.in_kernel = true;
                }
                self.dp
                    .rtnl
                    .set_link_up(ifindex, u32::from(mtu))
                    .map_err(|e| BackendError::System(format!("{name}: up: {e}")))
            }
            None => self
                .dp
                .rtnl
                .set_link_down(ifindex)
                .map_err(|e| BackendError::System(format!("{name}: down: {e}"))),
        }
    }

    fn update(
        &mut self,
        spi: u32,
        direction: Direction,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<(), BackendError> {
        let k = key(direction, self.tunnel, spi);
        let Some(s) = self.dp.sas.get_mut(&k) else {
            return Err(BackendError::NoSuchSa { spi, direction });
        };
        let (src, dst) = match direction {
            Direction::Inbound => (remote, local),
            Direction::Outbound => (local, remote),
        };
        let moved = s.sa.src != src.ip() || s.sa.dst != dst.ip();
        let old = SaId::esp(s.sa.dst, s.sa.spi);
        s.sa.src = src.ip();
        s.sa.dst = dst.ip();
        if let Some(e) = &mut s.sa.encap {
            e.sport = src.port();
            e.dport = dst.port();
        }
        if !s.in_kernel {
            return Ok(());
        }
        if moved {
            // UPDSA cannot change addresses: the SA goes and comes back.
            self.dp.xfrm.delete_sa(old).map_err(backend_error)?;
            self.dp.xfrm.add_sa(&s.sa).map_err(backend_error)
        } else {
            self.dp.xfrm.update_sa(&s.sa).map_err(backend_error)
        }
    }

    fn delete(&mut self, spi: u32, direction: Direction) -> Result<(), BackendError> {
        if direction == Direction::Inbound {
            self.dp.reserved.remove(&spi);
        }
        self.remove(key(direction, self.tunnel, spi))
    }

    fn counters(&mut self, spi: u32, direction: Direction) -> Option<SaCounters> {
        self.dp.counters_of(&key(direction, self.tunnel, spi))
    }
}

impl super::Datapath for XfrmDatapath {
    fn tunnel(&mut self, tunnel: u32) -> Box<dyn SaBackend + '_> {
        Box::new(XfrmBackend { dp: self, tunnel })
    }

    fn expiries(&mut self, _now: Instant) -> Vec<SaExpiry> {
        let events = match self.events.drain() {
            Ok(e) => e,
            Err(e) => {
                log::warn!("XFRM expire events: {e}");
                return Vec::new();
            }
        };
        events
            .into_iter()
            .filter(|e| xfrm::is_ours(e.reqid))
            .filter_map(|e| {
                let (k, s) = self
                    .sas
                    .iter()
                    .find(|(_, s)| s.in_kernel && s.sa.spi == e.spi && s.sa.dst == e.dst)?;
                // The kernel's EXPIRE does not say which limit was reached;
                // it is reported as the byte limit (the core's answer, a
                // rekey or the end of the CHILD_SA, is the same for all).
                let limit = Limit::Bytes;
                Some(SaExpiry {
                    tunnel: s.tunnel,
                    spi: k.2,
                    direction: s.direction,
                    expiry: if e.hard {
                        Expiry::Hard(limit)
                    } else {
                        Expiry::Soft(limit)
                    },
                })
            })
            .collect()
    }

    fn tick(&mut self, _now: Instant) -> Result<(), DatapathError> {
        self.dmz.flush_logs();
        Ok(())
    }

    fn status(&mut self) -> DatapathStatus {
        let mut st = DatapathStatus {
            description: "xfrm (kernel ESP)",
            ..DatapathStatus::default()
        };
        let mut totals = self.closed.clone();
        let keys: Vec<_> = self.sas.keys().copied().collect();
        for k in keys {
            if let (Some(c), Some(t)) = (self.counters_of(&k), totals.get_mut(k.1 as usize)) {
                add(t, &c, k.0 == Direction::Inbound);
            }
        }
        let rtnl = &mut self.rtnl;
        st.tunnels = totals
            .into_iter()
            .zip(&self.tunnels)
            .map(|(totals, t)| TunnelCounters {
                totals,
                xdp: None,
                interface: t.as_ref().and_then(|t| {
                    rtnl.link_stats64(t.ifindex)
                        .map(|s| InterfaceCounters {
                            rx_packets: s.rx_packets,
                            rx_bytes: s.rx_bytes,
                            rx_errors: s.rx_errors,
                            rx_dropped: s.rx_dropped,
                            tx_packets: s.tx_packets,
                            tx_bytes: s.tx_bytes,
                            tx_errors: s.tx_errors,
                            tx_dropped: s.tx_dropped,
                        })
                        .inspect_err(|e| log::warn!("{}: statistics: {e}", t.name))
                        .ok()
                }),
            })
            .collect();
        xdp::dmz_status(&self.dmz, &mut st);
        st
    }

    /// Its xfrm interface in the lowest free slot (whose if_id and reqid
    /// follow from it), and the MSS clamp's table again with it.
    fn add_tunnel(&mut self, t: &TunnelConfig) -> Result<u32, DatapathError> {
        if self.tunnels.iter().flatten().any(|i| i.name == t.name) {
            return Err(DatapathError::Config(format!(
                "tunnel {} exists already",
                t.name
            )));
        }
        let slot = free_slot(&self.tunnels)?;
        let iface = tunnel_interface(&mut self.rtnl, self.link, slot, t, self.tunnel_mtu)?;
        if slot == self.tunnels.len() {
            self.tunnels.push(None);
            self.closed.push(TunnelTotals::default());
        }
        self.tunnels[slot] = Some(iface);
        self.closed[slot] = TunnelTotals::default();
        self.clamp_interfaces()?;
        log::info!("{}: added as tunnel {slot}", t.name);
        Ok(slot as u32)
    }

    /// Its interface down until no ECMP route goes through it, then its
    /// SAs and policies (by its reqid), its interface, and its name from
    /// the MSS clamp's table.
    fn remove_tunnel(&mut self, tunnel: u32) -> Result<(), DatapathError> {
        let Some(Some(iface)) = self.tunnels.get(tunnel as usize) else {
            return Err(DatapathError::TunnelIndex(tunnel));
        };
        let (name, ifindex, reqid) = (iface.name.clone(), iface.ifindex, iface.reqid);
        drain_routes(&name)?;
        let keys: Vec<_> = self.sas.keys().filter(|k| k.1 == tunnel).copied().collect();
        let mut backend = XfrmBackend { dp: self, tunnel };
        for k in keys {
            backend
                .remove(k)
                .map_err(|e| DatapathError::Config(format!("{name}: removing its SAs: {e}")))?;
        }
        self.xfrm
            .flush_reqid(reqid)
            .map_err(xfrm_error(&format!("{name}: its policies")))?;
        xfrm::delete_interface(ifindex).map_err(xfrm_error(&format!("deleting {name}")))?;
        self.tunnels[tunnel as usize] = None;
        while self.tunnels.last().is_some_and(Option::is_none) {
            self.tunnels.pop();
            self.closed.pop();
        }
        self.clamp_interfaces()?;
        log::info!("{name}: removed (tunnel {tunnel} is free)");
        Ok(())
    }

    fn set_dmz(&mut self, allow: &[IpNet], pass_unclassified: bool) -> Result<(), DatapathError> {
        xdp::change_dmz(&mut self.dmz, &mut self.allowed, allow, pass_unclassified)
    }

    fn stop(mut self: Box<Self>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ike_reader.take() {
            let _ = t.join();
        }
        match self.xfrm.flush_ours() {
            Ok(f) => log::info!("removed {} SAs and {} policies", f.sas, f.policies),
            Err(e) => log::error!("removing the SAs and policies: {e}"),
        }
        for t in self.tunnels.iter().flatten() {
            if let Err(e) = xfrm::delete_interface(t.ifindex) {
                log::warn!("{}: deleting the interface: {e}", t.name);
            }
        }
        match nft_mss::remove() {
            Ok(()) => log::info!("removed the MSS clamp (nftables table {})", nft_mss::TABLE),
            Err(e) => log::error!("removing the MSS clamp: {e}"),
        }
    }
}
