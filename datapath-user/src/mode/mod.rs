//! The datapath modes, one type each, behind one small interface
//! ([`Datapath`]): built from a [`DatapathConfig`], they give each tunnel's
//! IKE connection its [`SaBackend`], set the tunnels' carrier, report
//! counters for `xesp status`, and stop.
//!
//! * [`sockets::SocketDatapath`] (`datapath = "tun"`): TUN devices and
//!   sockets, ESP in user space;
//! * [`xdp::XdpDatapath`] (`datapath = "xdp"`): the socket datapath behind
//!   the XDP DMZ filter, with ESP and the LAN's tunnel traffic steered to
//!   AF_XDP workers;
//! * [`xfrm::XfrmDatapath`] (`datapath = "xfrm"`): the kernel's ESP through
//!   XFRM, xfrm interfaces, behind the XDP DMZ filter.
//!
//! The daemon only wires the IKE driver, the chosen datapath and the control
//! socket.

mod backend;
pub mod cpus;
mod slots;
pub mod sockets;
mod workers;
pub mod xdp;
pub mod xfrm;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Instant,
};

use ike_proto::backend::{Direction, SaBackend};
use ipnet::IpNet;
use xesp_esp::sa::Expiry;

pub use self::backend::selectors;
use crate::{DatapathError, sadb::TunnelTotals, xdp::TunnelTraffic};

/// Which datapath runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Xdp,
    Tun,
    Xfrm,
}

/// One tunnel, as the datapath sees it.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Its interface (the article's Tunnel0).
    pub name: String,
    /// The interface's /32 (the article's 172.16.0.1).
    pub address: Ipv4Addr,
    /// The peer's public address: IKE on UDP 4500 from elsewhere is dropped.
    pub peer: IpAddr,
}

/// What a datapath is built from (the daemon's configuration, checked).
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub mode: Mode,
    pub public_address: Ipv4Addr,
    /// Tunnel N is `tunnels[N]`.
    pub tunnels: Vec<TunnelConfig>,
    pub tunnel_mtu: u16,
    pub mss_clamp: u16,
    pub dmz_interface: String,
    pub lan_interfaces: Vec<String>,
    /// Source prefixes the DMZ filter lets through (the peers included).
    pub dmz_allow: Vec<IpNet>,
    pub dmz_pass_unclassified: bool,
}

/// Where IKE that arrives on UDP 4500 (non-ESP marker removed) goes, with
/// its source. It is called on a datapath thread and must not block.
pub type IkeSink = Box<dyn Fn(SocketAddr, &[u8]) + Send + 'static>;

/// An SA that reached a lifetime limit in the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaExpiry {
    pub tunnel: u32,
    pub spi: u32,
    pub direction: Direction,
    pub expiry: Expiry,
}

/// One tunnel's traffic as the datapath counts it.
#[derive(Debug, Clone, Default)]
pub struct TunnelCounters {
    /// Over every SA the tunnel had, rekeys included.
    pub totals: TunnelTotals,
    /// What the XDP programs steered (`xdp` only).
    pub xdp: Option<TunnelTraffic>,
    /// The tunnel interface's own statistics, as the kernel counts them
    /// (`xfrm` only: there the kernel, not xesp, moves the packets).
    pub interface: Option<InterfaceCounters>,
}

/// A network interface's statistics (rtnetlink's `IFLA_STATS64`, the
/// numbers `ip -s link` shows): received (from the tunnel, decrypted) and
/// transmitted (into the tunnel, before encryption).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InterfaceCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// The datapath's counters for `xesp status`.
#[derive(Debug, Clone, Default)]
pub struct DatapathStatus {
    /// How the mode is shown.
    pub description: &'static str,
    /// Tunnel N is `tunnels[N]`.
    pub tunnels: Vec<TunnelCounters>,
    /// The DMZ XDP classifier's and ESP steering's counters.
    pub dmz: Vec<(String, u64)>,
    /// The LAN XDP program's counters.
    pub lan: Vec<(String, u64)>,
    /// The AF_XDP workers' counters.
    pub workers: Vec<(String, u64)>,
    /// The socket datapath's counters.
    pub socket_path: Vec<(String, u64)>,
    /// ESP whose SPI no SA has; tunnel packets with no outbound SA.
    pub unknown_spi: u64,
    pub no_outbound_sa: u64,
}

/// A running datapath.
pub trait Datapath: Send {
    /// Tunnel `tunnel`'s SA backend: its connection installs, routes and
    /// removes CHILD_SAs through it, and the tunnel's carrier follows.
    fn tunnel(&mut self, tunnel: u32) -> Box<dyn SaBackend + '_>;
    /// SAs that reached a byte or packet limit since the last call.
    fn expiries(&mut self, now: Instant) -> Vec<SaExpiry>;
    /// Once a second: supervision (workers), logs. An error ends the daemon.
    fn tick(&mut self, now: Instant) -> Result<(), DatapathError>;
    fn status(&mut self) -> DatapathStatus;
    /// The DMZ filter's allowlist and whether it passes what it cannot
    /// classify, applied at once (`xesp reload`). Without a filter there is
    /// nothing to apply.
    fn set_dmz(&mut self, allow: &[IpNet], pass_unclassified: bool) -> Result<(), DatapathError>;
    /// Adds tunnel `t` while running (`xesp reload`): its interface (no
    /// carrier until its connection routes an SA) in the lowest free slot,
    /// whose index it returns and which stays its index. The other tunnels
    /// keep their SAs and indexes. A mode that cannot says so.
    fn add_tunnel(&mut self, t: &TunnelConfig) -> Result<u32, DatapathError> {
        Err(DatapathError::Config(format!(
            "{}: this datapath adds tunnels only at a restart",
            t.name
        )))
    }
    /// Removes tunnel `tunnel` (`xesp reload`): its SAs (their counters stay
    /// in the slot's totals, as closed SAs' do) and its interface. Its index
    /// becomes free; the other tunnels keep theirs.
    fn remove_tunnel(&mut self, tunnel: u32) -> Result<(), DatapathError> {
        Err(DatapathError::Config(format!(
            "tunnel {tunnel}: this datapath removes tunnels only at a restart"
        )))
    }
    /// Stops the datapath's threads and waits for them.
    fn stop(self: Box<Self>);
}

/// Builds the datapath `cfg.mode` names. `udp4500` is the IKE daemon's
/// socket on UDP 4500 (it sends IKE on it); the datapath reads it, keeps
/// ESP and gives IKE to `ike`.
pub fn start(
    cfg: &DatapathConfig,
    udp4500: Arc<UdpSocket>,
    ike: IkeSink,
) -> Result<Box<dyn Datapath>, DatapathError> {
    Ok(match cfg.mode {
        Mode::Tun => Box::new(sockets::SocketDatapath::start(cfg, udp4500, ike)?),
        Mode::Xdp => Box::new(xdp::XdpDatapath::start(cfg, udp4500, ike)?),
        Mode::Xfrm => Box::new(xfrm::XfrmDatapath::start(cfg, udp4500, ike)?),
    })
}

/// `io::Error` with what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}
