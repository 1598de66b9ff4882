//! The [`SaBackend`] of the user-space datapaths: CHILD_SA directions become
//! ESP SAs in the [`SaDb`] the packet paths read, and a tunnel's device has
//! carrier exactly while the tunnel has an outbound SA (so the kernel FIB, and
//! BGP next hops over it, follow the tunnel's state). With XDP, inbound SPIs
//! are steered to their tunnel's AF_XDP sockets and the LAN program learns
//! which tunnels are live.
//!
//! Each SA takes the traffic selectors its CHILD_SA was negotiated with, so
//! that the datapath enforces them (RFC 4301 §5.1, §5.2). Outbound SPIs are
//! the peers' choice: they are kept per tunnel, so each connection reaches
//! the datapath through its own [`UserBackend`], which knows its tunnel.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use ike_proto::{
    backend::{BackendError, ChildSaSpec, Direction, SaBackend},
    random::{Random, SystemRandom},
    ts::TsRange,
};
use xesp_esp::{
    policy::{Selector, Selectors},
    sa::{InboundSa, NattPorts, OutboundSa, SaCounters},
};

use crate::{sadb::SaDb, tun::Tun, xdp::XdpPrograms};

/// Inbound SPIs handed out and not installed yet, so that two exchanges in
/// flight never get the same one; and each tunnel's installed SAs, so that
/// a tunnel removed by `xesp reload` takes all of them with it.
pub(crate) struct SpiAllocator {
    rng: SystemRandom,
    reserved: HashSet<u32>,
    /// Tunnel → its installed `(SPI, inbound)` SA directions.
    installed: BTreeMap<u32, BTreeSet<(u32, bool)>>,
}

impl SpiAllocator {
    pub fn new() -> Self {
        Self {
            rng: SystemRandom::new(),
            reserved: HashSet::new(),
            installed: BTreeMap::new(),
        }
    }

    /// Tunnel `tunnel`'s installed SA directions, `(SPI, inbound)`.
    pub fn installed(&self, tunnel: u32) -> Vec<(u32, bool)> {
        self.installed
            .get(&tunnel)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    fn note(&mut self, tunnel: u32, spi: u32, inbound: bool, present: bool) {
        let set = self.installed.entry(tunnel).or_default();
        if present {
            set.insert((spi, inbound));
        } else {
            set.remove(&(spi, inbound));
            if set.is_empty() {
                self.installed.remove(&tunnel);
            }
        }
    }
}

fn selector(t: &TsRange) -> Selector {
    Selector {
        start: t.start,
        end: t.end,
        protocol: t.protocol,
        start_port: t.start_port,
        end_port: t.end_port,
    }
}

/// The selectors a CHILD_SA was negotiated with, for the datapath.
pub fn selectors(spec: &ChildSaSpec) -> Selectors {
    let local: Vec<Selector> = spec.local_ts.iter().map(selector).collect();
    let remote: Vec<Selector> = spec.remote_ts.iter().map(selector).collect();
    Selectors::new(&local, &remote)
}

fn system(m: impl Into<String>) -> BackendError {
    BackendError::System(m.into())
}

/// One tunnel's view of the user-space datapath: the SPIs it names in
/// `update`, `delete` and `counters` are that tunnel's.
pub(crate) struct UserBackend<'a> {
    pub tunnel: u32,
    pub sadb: &'a SaDb,
    /// Tunnel N's device is `tuns[N]` (`None`: a free slot).
    pub tuns: &'a [Option<Arc<Tun>>],
    pub spis: &'a mut SpiAllocator,
    /// The XDP programs (`xdp` datapath).
    pub xdp: Option<&'a mut XdpPrograms>,
}

impl UserBackend<'_> {
    /// Deletes every SA the tunnel has and takes its route away (the
    /// tunnel is being removed): their counters go to its totals.
    pub fn delete_all(&mut self) -> Result<(), BackendError> {
        self.sadb.route(self.tunnel, None);
        if let Some(x) = &mut self.xdp {
            x.set_tunnel_live(self.tunnel, false)
                .map_err(|e| system(format!("tunnel {}: {e}", self.tunnel)))?;
        }
        for (spi, inbound) in self.spis.installed(self.tunnel) {
            let direction = if inbound {
                Direction::Inbound
            } else {
                Direction::Outbound
            };
            self.delete(spi, direction)?;
        }
        Ok(())
    }

    fn mine(&self, tunnel: u32) -> Result<(), BackendError> {
        if tunnel == self.tunnel && self.tuns.get(tunnel as usize).is_some_and(Option::is_some) {
            Ok(())
        } else {
            Err(BackendError::NoTunnel(tunnel))
        }
    }
}

impl SaBackend for UserBackend<'_> {
    fn allocate_spi(&mut self) -> Result<u32, BackendError> {
        for _ in 0..64 {
            let mut b = [0u8; 4];
            self.spis
                .rng
                .fill(&mut b)
                .map_err(|_| BackendError::Random)?;
            let spi = u32::from_be_bytes(b);
            if spi >= 256 && !self.spis.reserved.contains(&spi) && !self.sadb.contains_inbound(spi)
            {
                self.spis.reserved.insert(spi);
                return Ok(spi);
            }
        }
        Err(BackendError::NoFreeSpi)
    }

    fn install(&mut self, spec: &ChildSaSpec) -> Result<(), BackendError> {
        self.mine(spec.tunnel)?;
        let Some(params) = spec.sa_params() else {
            return Err(BackendError::Unsupported {
                spi: spec.spi,
                reason: format!(
                    "the user-space datapath has IPv4 outer addresses only ({} -> {})",
                    spec.local, spec.remote
                ),
            });
        };
        let bad = |e: xesp_esp::sa::SaError| BackendError::Invalid {
            spi: spec.spi,
            reason: e.to_string(),
        };
        match spec.direction {
            Direction::Inbound => {
                let sa = InboundSa::new(&params, Instant::now()).map_err(bad)?;
                self.sadb.install_inbound(spec.tunnel, sa, selectors(spec));
                self.spis.reserved.remove(&spec.spi);
                self.spis.note(spec.tunnel, spec.spi, true, true);
                if let Some(x) = &mut self.xdp {
                    x.steer(spec.spi, spec.tunnel)
                        .map_err(|e| system(format!("steering SPI {:08x}: {e}", spec.spi)))?;
                }
            }
            Direction::Outbound => {
                let sa = OutboundSa::new(&params, Instant::now()).map_err(bad)?;
                self.sadb.install_outbound(spec.tunnel, sa, selectors(spec));
                self.spis.note(spec.tunnel, spec.spi, false, true);
            }
        }
        Ok(())
    }

    fn route(&mut self, tunnel: u32, spi: Option<u32>) -> Result<(), BackendError> {
        self.mine(tunnel)?;
        if !self.sadb.route(tunnel, spi) {
            return Err(BackendError::NoSuchSa {
                spi: spi.unwrap_or(0),
                direction: Direction::Outbound,
            });
        }
        if let Some(x) = &mut self.xdp {
            x.set_tunnel_live(tunnel, spi.is_some())
                .map_err(|e| system(format!("tunnel {tunnel}: {e}")))?;
        }
        let Some(Some(t)) = self.tuns.get(tunnel as usize) else {
            return Err(BackendError::NoTunnel(tunnel));
        };
        t.set_carrier(spi.is_some())
            .map_err(|e| system(format!("{}: setting carrier: {e}", t.name())))
    }

    fn update(
        &mut self,
        spi: u32,
        direction: Direction,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<(), BackendError> {
        let (IpAddr::V4(local_ip), IpAddr::V4(remote_ip)) = (local.ip(), remote.ip()) else {
            return Err(BackendError::Unsupported {
                spi,
                reason: format!("IPv4 outer addresses only ({local} -> {remote})"),
            });
        };
        let moved =
            self.sadb
                .update_endpoints(self.tunnel, spi, direction == Direction::Inbound, |t| {
                    xesp_esp::sa::Tunnel {
                        local: local_ip,
                        remote: remote_ip,
                        natt: t.natt.map(|_| NattPorts {
                            local: local.port(),
                            remote: remote.port(),
                        }),
                    }
                });
        if moved {
            Ok(())
        } else {
            Err(BackendError::NoSuchSa { spi, direction })
        }
    }

    fn delete(&mut self, spi: u32, direction: Direction) -> Result<(), BackendError> {
        self.spis
            .note(self.tunnel, spi, direction == Direction::Inbound, false);
        match direction {
            Direction::Inbound => {
                self.spis.reserved.remove(&spi);
                self.sadb.delete_inbound(spi);
                if let Some(x) = &mut self.xdp {
                    x.unsteer(spi)
                        .map_err(|e| system(format!("unsteering SPI {spi:08x}: {e}")))?;
                }
            }
            Direction::Outbound => self.sadb.delete_outbound(self.tunnel, spi),
        }
        Ok(())
    }

    fn counters(&mut self, spi: u32, direction: Direction) -> Option<SaCounters> {
        match direction {
            Direction::Inbound => self.sadb.inbound_counters(spi),
            Direction::Outbound => self.sadb.outbound_counters(self.tunnel, spi),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tunnels_installed_sas_are_kept_for_its_removal() {
        let mut s = SpiAllocator::new();
        s.note(1, 0x100, true, true);
        s.note(1, 0x200, false, true);
        s.note(0, 0x300, true, true);
        assert_eq!(s.installed(1), [(0x100, true), (0x200, false)]);
        s.note(1, 0x100, true, false);
        assert_eq!(s.installed(1), [(0x200, false)]);
        s.note(1, 0x200, false, false);
        assert!(s.installed(1).is_empty() && !s.installed.contains_key(&1));
        assert_eq!(s.installed(0), [(0x300, true)]);
    }
}
