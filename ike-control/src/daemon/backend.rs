//! The [`SaBackend`] of the user-space datapath: CHILD_SA directions become
//! ESP SAs in the [`SaDb`] the packet paths read, and a tunnel's device has
//! carrier exactly while the tunnel has an outbound SA (so the kernel FIB, and
//! BGP next hops over it, follow the tunnel's state). With XDP, inbound SPIs
//! are steered to their tunnel's AF_XDP sockets and the LAN program learns
//! which tunnels are live.
//!
//! Each SA takes the traffic selectors its CHILD_SA was negotiated with, so
//! that the datapath enforces them (RFC 4301 §5.1, §5.2). Outbound SPIs are
//! the peers' choice: they are kept per tunnel, so each connection reaches
//! the datapath through its own [`TunnelBackend`], which knows its tunnel.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use datapath_user::{sadb::SaDb, tun::Tun, xdp::XdpPrograms};
use ike_proto::random::{Random, SystemRandom};
use xesp_esp::{
    policy::{Selector, Selectors},
    sa::{InboundSa, NattPorts, OutboundSa, SaCounters},
};

use ike_proto::{
    backend::{BackendError, ChildSaSpec, Direction, SaBackend},
    ts::TsRange,
};

/// SAs into the SA database, carrier onto the tunnel devices.
pub struct UserBackend {
    pub sadb: Arc<SaDb>,
    /// Tunnel N's device is `tuns[N]`.
    pub tuns: Vec<Arc<Tun>>,
    /// The XDP programs (`xdp` datapath).
    pub xdp: Option<XdpPrograms>,
    rng: SystemRandom,
    /// Allocated inbound SPIs not installed yet.
    reserved: HashSet<u32>,
}

impl UserBackend {
    pub fn new(sadb: Arc<SaDb>, tuns: Vec<Arc<Tun>>, xdp: Option<XdpPrograms>) -> Self {
        Self {
            sadb,
            tuns,
            xdp,
            rng: SystemRandom::new(),
            reserved: HashSet::new(),
        }
    }
}

fn system(m: impl Into<String>) -> BackendError {
    BackendError::System(m.into())
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

impl UserBackend {
    /// The backend as tunnel `tunnel`'s connection sees it.
    pub fn tunnel(&mut self, tunnel: u32) -> TunnelBackend<'_> {
        TunnelBackend {
            inner: self,
            tunnel,
        }
    }
}

/// One tunnel's view of the [`UserBackend`]: the SPIs it names in
/// `update`, `delete` and `counters` are that tunnel's.
pub struct TunnelBackend<'a> {
    inner: &'a mut UserBackend,
    tunnel: u32,
}

impl SaBackend for TunnelBackend<'_> {
    fn allocate_spi(&mut self) -> Result<u32, BackendError> {
        self.inner.allocate_spi()
    }

    fn install(&mut self, spec: &ChildSaSpec) -> Result<(), BackendError> {
        if spec.tunnel != self.tunnel {
            return Err(BackendError::NoTunnel(spec.tunnel));
        }
        self.inner.install(spec)
    }

    fn route(&mut self, tunnel: u32, spi: Option<u32>) -> Result<(), BackendError> {
        if tunnel != self.tunnel {
            return Err(BackendError::NoTunnel(tunnel));
        }
        self.inner.route(tunnel, spi)
    }

    fn update(
        &mut self,
        spi: u32,
        direction: Direction,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<(), BackendError> {
        self.inner
            .update(self.tunnel, spi, direction, local, remote)
    }

    fn delete(&mut self, spi: u32, direction: Direction) -> Result<(), BackendError> {
        self.inner.delete(self.tunnel, spi, direction)
    }

    fn counters(&mut self, spi: u32, direction: Direction) -> Option<SaCounters> {
        match direction {
            Direction::Inbound => self.inner.sadb.inbound_counters(spi),
            Direction::Outbound => self.inner.sadb.outbound_counters(self.tunnel, spi),
        }
    }
}

impl UserBackend {
    fn allocate_spi(&mut self) -> Result<u32, BackendError> {
        for _ in 0..64 {
            let mut b = [0u8; 4];
            self.rng.fill(&mut b).map_err(|_| BackendError::Random)?;
            let spi = u32::from_be_bytes(b);
            if spi >= 256 && !self.reserved.contains(&spi) && !self.sadb.contains_inbound(spi) {
                self.reserved.insert(spi);
                return Ok(spi);
            }
        }
        Err(BackendError::NoFreeSpi)
    }

    fn install(&mut self, spec: &ChildSaSpec) -> Result<(), BackendError> {
        if spec.tunnel as usize >= self.tuns.len() {
            return Err(BackendError::NoTunnel(spec.tunnel));
        }
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
                self.reserved.remove(&spec.spi);
                if let Some(x) = &mut self.xdp {
                    x.steer(spec.spi, spec.tunnel)
                        .map_err(|e| system(format!("steering SPI {:08x}: {e}", spec.spi)))?;
                }
            }
            Direction::Outbound => {
                let sa = OutboundSa::new(&params, Instant::now()).map_err(bad)?;
                self.sadb.install_outbound(spec.tunnel, sa, selectors(spec));
            }
        }
        Ok(())
    }

    fn route(&mut self, tunnel: u32, spi: Option<u32>) -> Result<(), BackendError> {
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
        if let Some(t) = self.tuns.get(tunnel as usize) {
            t.set_carrier(spi.is_some())
                .map_err(|e| system(format!("{}: setting carrier: {e}", t.name())))?;
        }
        Ok(())
    }

    fn update(
        &mut self,
        tunnel: u32,
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
        let moved = self
            .sadb
            .update_endpoints(tunnel, spi, direction == Direction::Inbound, |t| {
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

    fn delete(&mut self, tunnel: u32, spi: u32, direction: Direction) -> Result<(), BackendError> {
        match direction {
            Direction::Inbound => {
                self.reserved.remove(&spi);
                self.sadb.delete_inbound(spi);
                if let Some(x) = &mut self.xdp {
                    x.unsteer(spi)
                        .map_err(|e| system(format!("unsteering SPI {spi:08x}: {e}")))?;
                }
            }
            Direction::Outbound => self.sadb.delete_outbound(tunnel, spi),
        }
        Ok(())
    }
}
