//! Between the IKE controller and a datapath: install, switch and delete
//! CHILD_SA directions, read their counters. strongSwan's kernel-interface
//! split: one trait, several backends (the user-space datapath, a recording
//! mock for the protocol tests; XFRM on kernels with ESP).

use core::fmt;
use std::net::SocketAddr;

use xesp_esp::{
    alg::Suite,
    sa::{Lifetime, NattPorts, SaCounters, SaParams, Tunnel},
};
use zeroize::Zeroizing;

use crate::ts::TsRange;

/// Which way an SA carries traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// One direction of a CHILD_SA, as negotiated.
#[derive(Clone)]
pub struct ChildSaSpec {
    pub tunnel: u32,
    pub spi: u32,
    pub direction: Direction,
    pub suite: Suite,
    pub esn: bool,
    /// This direction's KEYMAT slice: encryption key (+ salt), integrity key.
    pub keymat: Zeroizing<Vec<u8>>,
    /// Outer endpoints: for inbound, `local` receives; for outbound, it sends.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// ESP travels in UDP (NAT-T) between those ports.
    pub udp_encap: bool,
    pub lifetime: Lifetime,
    pub replay_window: u32,
    pub local_ts: Vec<TsRange>,
    pub remote_ts: Vec<TsRange>,
}

impl fmt::Debug for ChildSaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChildSaSpec(tunnel {}, {:?} spi {:08x}, {}{}, {} -> {}{})",
            self.tunnel,
            self.direction,
            self.spi,
            self.suite,
            if self.esn { "/ESN" } else { "" },
            self.local,
            self.remote,
            if self.udp_encap { ", UDP" } else { "" }
        )
    }
}

impl ChildSaSpec {
    /// The ESP core's parameters for this direction; `None` unless both
    /// outer addresses are IPv4 (the only outer family the ESP core has).
    pub fn sa_params(&self) -> Option<SaParams<'_>> {
        let (std::net::IpAddr::V4(local), std::net::IpAddr::V4(remote)) =
            (self.local.ip(), self.remote.ip())
        else {
            return None;
        };
        Some(SaParams {
            spi: self.spi,
            suite: self.suite,
            keymat: &self.keymat,
            esn: self.esn,
            replay_window: self.replay_window,
            tunnel: Tunnel {
                local,
                remote,
                natt: self.udp_encap.then_some(NattPorts {
                    local: self.local.port(),
                    remote: self.remote.port(),
                }),
            },
            lifetime: self.lifetime,
        })
    }
}

/// What a datapath refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("no free inbound SPI")]
    NoFreeSpi,
    #[error("the random number generator failed")]
    Random,
    #[error("tunnel {0} has no device")]
    NoTunnel(u32),
    #[error("SPI {spi:08x}: {reason}")]
    Unsupported { spi: u32, reason: String },
    #[error("SPI {spi:08x} ({direction:?}) is not installed")]
    NoSuchSa { spi: u32, direction: Direction },
    #[error("SPI {spi:08x}: {reason}")]
    Invalid { spi: u32, reason: String },
    #[error("the datapath failed: {0}")]
    System(String),
}

/// What the controller asks of a datapath. Calls are made in the order that
/// keeps traffic flowing across rekeys (make-before-break): a new inbound SA
/// is installed before the peer can use it; the tunnel's outbound traffic
/// is switched to a new SA only once the peer has its inbound half.
pub trait SaBackend {
    /// A fresh inbound SPI, unique on this device and at least 256.
    fn allocate_spi(&mut self) -> Result<u32, BackendError>;
    /// Installs one direction. An outbound SA carries nothing until routed.
    fn install(&mut self, sa: &ChildSaSpec) -> Result<(), BackendError>;
    /// Makes `spi` the outbound SA of `tunnel`, or takes the tunnel down.
    fn route(&mut self, tunnel: u32, outbound_spi: Option<u32>) -> Result<(), BackendError>;
    /// Moves one direction to new outer endpoints: the peer's NAT mapping
    /// changed (RFC 7296 §2.23; strongSwan's `update_sa`).
    fn update(
        &mut self,
        spi: u32,
        direction: Direction,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<(), BackendError>;
    /// Removes one direction (not an error if it is already gone).
    fn delete(&mut self, spi: u32, direction: Direction) -> Result<(), BackendError>;
    /// Counters of one direction, if installed.
    fn counters(&mut self, spi: u32, direction: Direction) -> Option<SaCounters>;
}

/// A call a backend received, as the recording mock keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendCall {
    Allocate(u32),
    Install {
        tunnel: u32,
        spi: u32,
        direction: Direction,
        udp_encap: bool,
        keymat_len: usize,
    },
    Route {
        tunnel: u32,
        spi: Option<u32>,
    },
    Update {
        spi: u32,
        direction: Direction,
        remote: SocketAddr,
    },
    Delete {
        spi: u32,
        direction: Direction,
    },
}

/// Records every call; installed SAs get counters a test can set.
#[derive(Debug, Default)]
pub struct RecordingBackend {
    pub calls: Vec<BackendCall>,
    next_spi: u32,
    /// Installed directions with their keys (for tests that compare peers).
    pub installed: Vec<ChildSaSpec>,
    pub routes: std::collections::HashMap<u32, Option<u32>>,
    pub counters: std::collections::HashMap<(u32, Direction), SaCounters>,
    /// When set, `install` fails with this error.
    pub fail_install: Option<BackendError>,
}

impl RecordingBackend {
    /// SPIs start at `first` so that two peers' SPIs differ in tests.
    pub fn new(first: u32) -> Self {
        Self {
            next_spi: first,
            ..Self::default()
        }
    }

    pub fn spec(&self, spi: u32, direction: Direction) -> Option<&ChildSaSpec> {
        self.installed
            .iter()
            .find(|s| s.spi == spi && s.direction == direction)
    }

    /// The outbound SPI `tunnel` uses now.
    pub fn route_of(&self, tunnel: u32) -> Option<u32> {
        self.routes.get(&tunnel).copied().flatten()
    }
}

impl SaBackend for RecordingBackend {
    fn allocate_spi(&mut self) -> Result<u32, BackendError> {
        self.next_spi = self.next_spi.max(256) + 1;
        self.calls.push(BackendCall::Allocate(self.next_spi));
        Ok(self.next_spi)
    }

    fn install(&mut self, sa: &ChildSaSpec) -> Result<(), BackendError> {
        if let Some(e) = &self.fail_install {
            return Err(e.clone());
        }
        self.calls.push(BackendCall::Install {
            tunnel: sa.tunnel,
            spi: sa.spi,
            direction: sa.direction,
            udp_encap: sa.udp_encap,
            keymat_len: sa.keymat.len(),
        });
        self.installed
            .retain(|s| !(s.spi == sa.spi && s.direction == sa.direction));
        self.installed.push(sa.clone());
        Ok(())
    }

    fn route(&mut self, tunnel: u32, spi: Option<u32>) -> Result<(), BackendError> {
        self.calls.push(BackendCall::Route { tunnel, spi });
        self.routes.insert(tunnel, spi);
        Ok(())
    }

    fn update(
        &mut self,
        spi: u32,
        direction: Direction,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<(), BackendError> {
        let sa = self
            .installed
            .iter_mut()
            .find(|s| s.spi == spi && s.direction == direction)
            .ok_or(BackendError::NoSuchSa { spi, direction })?;
        sa.local = local;
        sa.remote = remote;
        self.calls.push(BackendCall::Update {
            spi,
            direction,
            remote,
        });
        Ok(())
    }

    fn delete(&mut self, spi: u32, direction: Direction) -> Result<(), BackendError> {
        self.calls.push(BackendCall::Delete { spi, direction });
        self.installed
            .retain(|s| !(s.spi == spi && s.direction == direction));
        Ok(())
    }

    fn counters(&mut self, spi: u32, direction: Direction) -> Option<SaCounters> {
        self.spec(spi, direction)?;
        Some(
            self.counters
                .get(&(spi, direction))
                .copied()
                .unwrap_or_default(),
        )
    }
}
