//! The [`SaBackend`] of the user-space datapath: CHILD_SA directions become
//! ESP SAs in the [`SaDb`] the packet paths read, and a tunnel's device has
//! carrier exactly while the tunnel has an outbound SA (so the kernel FIB, and
//! BGP next hops over it, follow the tunnel's state). With XDP, inbound SPIs
//! are steered to their tunnel's AF_XDP sockets and the LAN program learns
//! which tunnels are live.

use std::{collections::HashSet, sync::Arc, time::Instant};

use datapath_user::{sadb::SaDb, tun::Tun, xdp::XdpPrograms};
use ring::rand::{SecureRandom, SystemRandom};
use xesp_esp::sa::{InboundSa, OutboundSa, SaCounters};

use crate::backend::{BackendError, ChildSaSpec, Direction, SaBackend};

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

fn err(m: impl Into<String>) -> BackendError {
    BackendError(m.into())
}

impl SaBackend for UserBackend {
    fn allocate_spi(&mut self) -> Result<u32, BackendError> {
        for _ in 0..64 {
            let mut b = [0u8; 4];
            self.rng
                .fill(&mut b)
                .map_err(|_| err("the system random number generator failed"))?;
            let spi = u32::from_be_bytes(b);
            if spi >= 256 && !self.reserved.contains(&spi) && !self.sadb.contains_inbound(spi) {
                self.reserved.insert(spi);
                return Ok(spi);
            }
        }
        Err(err("no free inbound SPI found"))
    }

    fn install(&mut self, spec: &ChildSaSpec) -> Result<(), BackendError> {
        if spec.tunnel as usize >= self.tuns.len() {
            return Err(err(format!("tunnel {} has no device", spec.tunnel)));
        }
        let Some(params) = spec.sa_params() else {
            return Err(err(format!(
                "SPI {:08x}: the user-space datapath has IPv4 outer addresses only ({} -> {})",
                spec.spi, spec.local, spec.remote
            )));
        };
        let bad = |e: xesp_esp::sa::SaError| err(format!("SPI {:08x}: {e}", spec.spi));
        match spec.direction {
            Direction::Inbound => {
                let sa = InboundSa::new(&params, Instant::now()).map_err(bad)?;
                self.sadb.install_inbound(spec.tunnel, sa);
                self.reserved.remove(&spec.spi);
                if let Some(x) = &mut self.xdp {
                    x.steer(spec.spi, spec.tunnel)
                        .map_err(|e| err(format!("steering SPI {:08x}: {e}", spec.spi)))?;
                }
            }
            Direction::Outbound => {
                let sa = OutboundSa::new(&params, Instant::now()).map_err(bad)?;
                self.sadb.install_outbound(spec.tunnel, sa);
            }
        }
        Ok(())
    }

    fn route(&mut self, tunnel: u32, spi: Option<u32>) -> Result<(), BackendError> {
        if !self.sadb.route(tunnel, spi) {
            return Err(err(format!(
                "tunnel {tunnel}: no outbound SA {:08x} to route",
                spi.unwrap_or(0)
            )));
        }
        if let Some(x) = &mut self.xdp {
            x.set_tunnel_live(tunnel, spi.is_some())
                .map_err(|e| err(format!("tunnel {tunnel}: {e}")))?;
        }
        if let Some(t) = self.tuns.get(tunnel as usize) {
            t.set_carrier(spi.is_some())
                .map_err(|e| err(format!("{}: setting carrier: {e}", t.name())))?;
        }
        Ok(())
    }

    fn delete(&mut self, spi: u32, direction: Direction) -> Result<(), BackendError> {
        match direction {
            Direction::Inbound => {
                self.reserved.remove(&spi);
                self.sadb.delete_inbound(spi);
                if let Some(x) = &mut self.xdp {
                    x.unsteer(spi)
                        .map_err(|e| err(format!("unsteering SPI {spi:08x}: {e}")))?;
                }
            }
            Direction::Outbound => self.sadb.delete_outbound(spi),
        }
        Ok(())
    }

    fn counters(&mut self, spi: u32, direction: Direction) -> Option<SaCounters> {
        match direction {
            Direction::Inbound => self.sadb.inbound_counters(spi),
            Direction::Outbound => self.sadb.outbound_counters(spi),
        }
    }
}
