//! `datapath = "xdp"`: the socket datapath behind the XDP DMZ filter, with
//! ESP and the LAN's tunnel traffic steered to AF_XDP workers (one per
//! receive queue, supervised by [`Workers`]).
//!
//! The DMZ and LAN interfaces are watched: when one is deleted the workers
//! stop (their sockets died with it) and the filter waits; when it is there
//! again, re-created or with another queue count, the programs and workers
//! are attached anew. Queue counts change without an rtnetlink event
//! (`ethtool -L`), so the watch reads the interfaces' index and queues once
//! a tick, two cheap system calls.

use std::{net::UdpSocket, sync::Arc, time::Instant};

use ike_proto::backend::SaBackend;
use ipnet::IpNet;
use xesp_common::{LanCounter, SteerCounter};

use super::{
    DatapathConfig, DatapathStatus, IkeSink, SaExpiry, TunnelConfig, sockets::SocketDatapath,
    workers::Workers,
};
use crate::{
    DatapathError,
    netlink::ifindex,
    xdp::{XdpAttach, XdpPrograms},
};

/// Receive queues of `iface` (1 when sysfs does not say), at most MAX_QUEUES.
fn queue_count(iface: &str) -> u32 {
    let n = std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1);
    n.clamp(1, xesp_common::MAX_QUEUES)
}

/// What the workers run on: an interface's index and receive queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    ifindex: u32,
    queues: u32,
}

impl Link {
    /// Interface `name` now, if there is one.
    fn of(name: &str) -> Option<Self> {
        let ifindex = ifindex(name);
        (ifindex != 0).then(|| Self {
            ifindex,
            queues: queue_count(name),
        })
    }
}

/// The DMZ and LAN interfaces, both there.
type Links = (Link, Link);

/// Attaches the DMZ filter and LAN steering to the interfaces of that name
/// (again, after they changed).
fn attach_links(x: &mut XdpPrograms, dmz: &str, lan: &str) -> Result<(), DatapathError> {
    x.detach(dmz);
    x.detach(lan);
    let mode = x.attach_dmz(dmz, XdpAttach::Auto)?;
    log::info!("{dmz}: DMZ filter attached ({mode:?} mode)");
    let mode = x.attach_lan(lan, XdpAttach::Auto)?;
    log::info!("{lan}: LAN steering attached ({mode:?} mode)");
    Ok(())
}

/// Loads the programs and attaches them: the DMZ filter with its allowlist,
/// LAN steering.
fn attach(cfg: &DatapathConfig, lan_if: &str) -> Result<XdpPrograms, DatapathError> {
    let mut x = XdpPrograms::load()?;
    attach_links(&mut x, &cfg.dmz_interface, lan_if)?;
    configure_dmz(&mut x, cfg)?;
    Ok(x)
}

/// Loads the programs and attaches the DMZ filter alone (the `xfrm` mode:
/// no ESP steered, no LAN program), configured.
pub(super) fn dmz_filter_only(cfg: &DatapathConfig) -> Result<XdpPrograms, DatapathError> {
    let mut x = XdpPrograms::load()?;
    let mode = x.attach_dmz(&cfg.dmz_interface, XdpAttach::Auto)?;
    log::info!("{}: DMZ filter attached ({mode:?} mode)", cfg.dmz_interface);
    configure_dmz(&mut x, cfg)?;
    Ok(x)
}

/// The DMZ filter's allowlist and flags from the configuration.
fn configure_dmz(x: &mut XdpPrograms, cfg: &DatapathConfig) -> Result<(), DatapathError> {
    for p in &cfg.dmz_allow {
        x.allow(*p)?;
    }
    if cfg.dmz_pass_unclassified {
        x.set_dmz_flags(xesp_common::dmz_flags::PASS_UNCLASSIFIED)?;
        log::warn!(
            "{}: DMZ filter passes frames it cannot classify (dmz.pass_unclassified)",
            cfg.dmz_interface
        );
    }
    log::info!(
        "{}: DMZ filter allows {} prefixes",
        cfg.dmz_interface,
        cfg.dmz_allow.len()
    );
    Ok(())
}

/// Changes the DMZ filter's allowlist from `allowed` to `allow`, and its
/// flags (`xesp reload`). New prefixes go in first: nothing allowed before
/// is dropped meanwhile.
pub(super) fn change_dmz(
    x: &mut XdpPrograms,
    allowed: &mut Vec<IpNet>,
    allow: &[IpNet],
    pass_unclassified: bool,
) -> Result<(), DatapathError> {
    for p in allow.iter().filter(|p| !allowed.contains(p)) {
        x.allow(*p)?;
    }
    for p in allowed.iter().filter(|p| !allow.contains(p)) {
        x.disallow(*p)?;
    }
    *allowed = allow.to_vec();
    let flags = if pass_unclassified {
        xesp_common::dmz_flags::PASS_UNCLASSIFIED
    } else {
        0
    };
    x.set_dmz_flags(flags)?;
    log::info!(
        "DMZ filter allows {} prefixes{}",
        allow.len(),
        if pass_unclassified {
            ", passes what it cannot classify"
        } else {
            ""
        }
    );
    Ok(())
}

/// The DMZ program's and the ESP steering's counters, into `st.dmz`.
pub(super) fn dmz_status(x: &XdpPrograms, st: &mut DatapathStatus) {
    match x.dmz_counters() {
        Ok(c) => st.dmz.extend(c.iter().map(|(k, v)| (k.to_string(), v))),
        Err(e) => log::warn!("reading the DMZ counters: {e}"),
    }
    if let Ok(c) = x.steer_counters() {
        st.dmz.extend(
            SteerCounter::ALL
                .iter()
                .map(|k| (format!("esp_{}", k.name()), c[*k as usize])),
        );
    }
}

/// The XDP datapath.
pub struct XdpDatapath {
    sockets: SocketDatapath,
    xdp: XdpPrograms,
    workers: Workers,
    dmz_if: String,
    lan_if: String,
    /// The interfaces the programs and workers are attached to; `None`
    /// while one of them is missing.
    links: Option<Links>,
    /// Times they were attached again after a change.
    reattached: u64,
    /// The DMZ filter's allowlist as installed.
    allowed: Vec<IpNet>,
}

impl XdpDatapath {
    pub fn start(
        cfg: &DatapathConfig,
        udp4500: Arc<UdpSocket>,
        ike: IkeSink,
    ) -> Result<Self, DatapathError> {
        let Some(lan_if) = cfg.lan_interfaces.first() else {
            return Err(DatapathError::Config(
                "the xdp datapath needs a LAN interface (device.lan_interfaces)".into(),
            ));
        };
        let (Some(dmz), Some(lan)) = (Link::of(&cfg.dmz_interface), Link::of(lan_if)) else {
            return Err(DatapathError::Config(format!(
                "the interfaces {} and {lan_if} must exist",
                cfg.dmz_interface
            )));
        };
        let mut xdp = attach(cfg, lan_if)?;
        let sockets = SocketDatapath::start(cfg, udp4500, ike)?;
        for (i, t) in cfg.tunnels.iter().enumerate() {
            xdp.set_tunnel_ifindex(ifindex(&t.name), i as u32)?;
        }
        let queues = dmz.queues.min(lan.queues);
        let workers = Workers::start(
            queues,
            &cfg.dmz_interface,
            lan_if,
            sockets.path.clone(),
            &mut xdp,
        );
        let workers = match workers {
            Ok(w) => w,
            Err(e) => {
                sockets.join();
                return Err(e);
            }
        };
        log::info!(
            "{queues} AF_XDP worker(s) on {} and {lan_if}",
            cfg.dmz_interface
        );
        Ok(Self {
            sockets,
            xdp,
            workers,
            dmz_if: cfg.dmz_interface.clone(),
            lan_if: lan_if.clone(),
            links: Some((dmz, lan)),
            reattached: 0,
            allowed: cfg.dmz_allow.clone(),
        })
    }

    /// The workers again on the socket datapath's new generation (one
    /// AF_XDP socket per tunnel of it). Meanwhile the programs pass what
    /// they cannot redirect to the kernel, and so to the socket path.
    fn renew_workers(&mut self) -> Result<(), DatapathError> {
        self.workers.set_path(self.sockets.path.clone());
        if let Some((dmz, lan)) = self.links {
            self.workers
                .restart(dmz.queues.min(lan.queues), &mut self.xdp)?;
        }
        Ok(())
    }

    /// Follows the DMZ and LAN interfaces: stops the workers when one is
    /// gone, attaches everything again when they are back or changed.
    fn follow_links(&mut self) -> Result<(), DatapathError> {
        let now = match (Link::of(&self.dmz_if), Link::of(&self.lan_if)) {
            (Some(d), Some(l)) => Some((d, l)),
            _ => None,
        };
        if now == self.links {
            return Ok(());
        }
        self.workers.stop(None);
        let Some((dmz, lan)) = now else {
            log::warn!(
                "{} or {} is gone: AF_XDP workers stopped until it is back",
                self.dmz_if,
                self.lan_if
            );
            self.links = None;
            return Ok(());
        };
        attach_links(&mut self.xdp, &self.dmz_if, &self.lan_if)?;
        let queues = dmz.queues.min(lan.queues);
        self.workers.restart(queues, &mut self.xdp)?;
        self.links = now;
        self.reattached += 1;
        log::warn!(
            "{} (index {}) and {} (index {}) changed: programs and {queues} AF_XDP worker(s) attached again",
            self.dmz_if,
            dmz.ifindex,
            self.lan_if,
            lan.ifindex
        );
        Ok(())
    }
}

impl super::Datapath for XdpDatapath {
    fn tunnel(&mut self, tunnel: u32) -> Box<dyn SaBackend + '_> {
        Box::new(self.sockets.backend(tunnel, Some(&mut self.xdp)))
    }

    fn expiries(&mut self, now: Instant) -> Vec<SaExpiry> {
        self.sockets.expiries(now)
    }

    fn tick(&mut self, now: Instant) -> Result<(), DatapathError> {
        self.xdp.flush_logs();
        self.follow_links()?;
        self.workers.watch(&mut self.xdp, now)
    }

    fn status(&mut self) -> DatapathStatus {
        let mut st = self.sockets.status("xdp + AF_XDP workers");
        dmz_status(&self.xdp, &mut st);
        if let Ok(c) = self.xdp.lan_counters() {
            st.lan.extend(
                LanCounter::ALL
                    .iter()
                    .map(|k| (k.name().to_string(), c[*k as usize])),
            );
        }
        for (i, t) in st.tunnels.iter_mut().enumerate() {
            t.xdp = self.xdp.tunnel_counters(i as u32).ok();
        }
        st.workers = self.workers.snapshot();
        st.workers.extend([
            ("links_missing".to_string(), u64::from(self.links.is_none())),
            ("links_reattached".to_string(), self.reattached),
        ]);
        st
    }

    fn set_dmz(&mut self, allow: &[IpNet], pass_unclassified: bool) -> Result<(), DatapathError> {
        change_dmz(&mut self.xdp, &mut self.allowed, allow, pass_unclassified)
    }

    /// The tunnel's device (down), then the LAN program learns it (not live
    /// until its SA is routed), then the workers start again with its
    /// sockets, and only then does the device come up. A restart loses no
    /// packet of the other tunnels (see `Workers::stop`): while no worker
    /// has a queue's sockets, the programs pass its ESP and LAN traffic to
    /// the kernel, and so to the socket path. The device must not be up
    /// meanwhile: the routing daemon then puts its next hop, without
    /// carrier, into the ECMP route, and the kernel's forwarding here
    /// dropped packets through that route although the next hop was marked
    /// `dead linkdown` (pings passed to the stack during the restart
    /// vanished, sent through no interface). Once the workers are back,
    /// the LAN program moves a flow the route gives such a tunnel onto a
    /// live one itself.
    fn add_tunnel(&mut self, t: &TunnelConfig) -> Result<u32, DatapathError> {
        let slot = self.sockets.add_tunnel_down(t)?;
        self.xdp.set_tunnel_live(slot, false)?;
        self.xdp.set_tunnel_ifindex(ifindex(&t.name), slot)?;
        self.renew_workers()?;
        self.sockets.bring_up(t, slot)?;
        Ok(slot)
    }

    /// Its SAs unsteered and deleted, the LAN program told it is down, its
    /// device gone, the workers without its sockets. (The LAN program's
    /// entry for the gone device's ifindex stays: no route names it.)
    fn remove_tunnel(&mut self, tunnel: u32) -> Result<(), DatapathError> {
        self.sockets.remove_tunnel(tunnel, Some(&mut self.xdp))?;
        self.renew_workers()
    }

    fn stop(self: Box<Self>) {
        let Self {
            sockets,
            mut workers,
            mut xdp,
            ..
        } = *self;
        workers.stop(Some(&mut xdp));
        sockets.join();
    }
}
