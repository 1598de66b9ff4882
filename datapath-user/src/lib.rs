//! xesp's user-space datapath: loads the eBPF programs and owns their maps.

pub mod mode;
pub mod mss;
pub mod netlink;
pub mod nexthop;
pub mod nft_mss;
#[cfg(feature = "null-forwarder")]
pub mod null;
pub mod rxq;
pub mod sadb;
pub mod slowpath;
pub mod tun;
pub mod worker;
pub mod xdp;
pub mod xfrm;
pub mod xsk;

use aya::{Ebpf, maps::MapError, programs::ProgramError};

/// The eBPF object built from `datapath-ebpf` (see build.rs).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xesp.bpf.o"));

/// Errors from loading programs, attaching them and using their maps.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("attaching XDP to {iface} failed{}", .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Attach {
        iface: String,
        source: Option<Box<ProgramError>>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("tunnel index {0} is out of range (at most {max} tunnels)", max = xesp_common::MAX_TUNNELS)]
    TunnelIndex(u32),
    #[error("receive queue {0} is out of range (at most {max} queues)", max = xesp_common::MAX_QUEUES)]
    QueueIndex(u32),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Xsk(#[from] xsk::XskError),
    #[error("TCP MSS clamp: {0}")]
    Nft(#[from] nft_mss::NftError),
    #[error("{0}")]
    Workers(String),
    #[error("{0}")]
    Config(String),
    #[error("allowlist entry {prefix}: {source}")]
    Allowlist {
        prefix: ipnet::IpNet,
        source: MapError,
    },
}

impl DatapathError {
    fn program(name: &'static str, e: ProgramError) -> Self {
        Self::Program {
            name,
            source: Box::new(e),
        }
    }
    fn map(name: &'static str, e: MapError) -> Self {
        Self::Map {
            name,
            source: Box::new(e),
        }
    }
}

/// Loads the embedded object. Raising RLIMIT_MEMLOCK is not needed on kernels
/// that account BPF memory to cgroups (5.11+), which is all we support.
fn load_object() -> Result<Ebpf, DatapathError> {
    Ebpf::load(EBPF_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))
}
