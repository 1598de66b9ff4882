//! `datapath = "xdp"`: the socket datapath behind the XDP DMZ filter, with
//! ESP and the LAN's tunnel traffic steered to AF_XDP workers (one per
//! receive queue, supervised by [`Workers`]).

use std::{net::UdpSocket, sync::Arc, time::Instant};

use ike_proto::backend::SaBackend;
use xesp_common::{LanCounter, SteerCounter};

use super::{
    DatapathConfig, DatapathStatus, IkeSink, SaExpiry, sockets::SocketDatapath, workers::Workers,
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

/// Loads the programs and attaches them: the DMZ filter with its allowlist,
/// LAN steering, the tunnels' ifindexes.
fn attach(cfg: &DatapathConfig) -> Result<XdpPrograms, DatapathError> {
    let mut x = XdpPrograms::load()?;
    let mode = x.attach_dmz(&cfg.dmz_interface, XdpAttach::Auto)?;
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
        "{}: DMZ filter attached ({mode:?} mode), {} allowed prefixes",
        cfg.dmz_interface,
        cfg.dmz_allow.len()
    );
    for lan in &cfg.lan_interfaces {
        let mode = x.attach_lan(lan, XdpAttach::Auto)?;
        log::info!("{lan}: LAN steering attached ({mode:?} mode)");
    }
    Ok(x)
}

/// The XDP datapath.
pub struct XdpDatapath {
    sockets: SocketDatapath,
    xdp: XdpPrograms,
    workers: Workers,
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
        let mut xdp = attach(cfg)?;
        let sockets = SocketDatapath::start(cfg, udp4500, ike)?;
        for (i, t) in cfg.tunnels.iter().enumerate() {
            xdp.set_tunnel_ifindex(ifindex(&t.name), i as u32)?;
        }
        let queues = queue_count(&cfg.dmz_interface).min(queue_count(lan_if));
        let workers = Workers::start(
            queues,
            &cfg.dmz_interface,
            lan_if,
            sockets.path.clone(),
            &mut xdp,
            sockets.stop.clone(),
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
        })
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
        self.workers.watch(&mut self.xdp, now)
    }

    fn status(&self) -> DatapathStatus {
        let mut st = self.sockets.status("xdp + AF_XDP workers");
        match self.xdp.dmz_counters() {
            Ok(c) => st.dmz.extend(c.iter().map(|(k, v)| (k.to_string(), v))),
            Err(e) => log::warn!("reading the DMZ counters: {e}"),
        }
        if let Ok(c) = self.xdp.steer_counters() {
            st.dmz.extend(
                SteerCounter::ALL
                    .iter()
                    .map(|k| (format!("esp_{}", k.name()), c[*k as usize])),
            );
        }
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
        st
    }

    fn stop(self: Box<Self>) {
        let Self {
            sockets, workers, ..
        } = *self;
        sockets
            .stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for t in workers.into_handles() {
            let _ = t.join();
        }
        sockets.join();
    }
}
