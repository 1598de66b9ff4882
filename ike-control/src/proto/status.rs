//! Snapshots that answer the article's verification questions per tunnel:
//! connection status, IKE_SA details, CHILD_SA counters. Serializable for
//! `xesp status --json`.

use serde::{Deserialize, Serialize};

use super::connection::ConnStats;

/// One tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnStatus {
    pub name: String,
    pub tunnel: u32,
    pub peer: String,
    /// The tunnel's outbound traffic has an SA.
    pub up: bool,
    /// Seconds since an IKE_SA was last established (the daemon turns it into UTC).
    pub established_secs_ago: Option<u64>,
    pub ike: Option<IkeStatus>,
    pub children: Vec<ChildStatus>,
    pub stats: ConnStats,
}

/// The IKE_SA (`show crypto ikev2 sa detailed`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IkeStatus {
    pub spi_i: String,
    pub spi_r: String,
    pub role: String,
    pub state: String,
    pub local: String,
    pub remote: String,
    pub nat_t: bool,
    pub encryption: Option<String>,
    pub key_size: Option<u16>,
    pub prf: Option<String>,
    pub integrity: Option<String>,
    pub dh_group: Option<String>,
    pub auth: String,
    pub lifetime_secs: u64,
    pub active_secs: Option<u64>,
    pub rekey_in_secs: Option<u64>,
}

/// One CHILD_SA (`show crypto ipsec sa`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildStatus {
    pub spi_in: String,
    pub spi_out: String,
    pub state: String,
    /// Carries the tunnel's outbound traffic.
    pub routed: bool,
    pub suite: String,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    /// Decapsulated (in) and encapsulated (out) packets and inner octets.
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub drops_in: u64,
    pub drops_out: u64,
    pub age_secs: u64,
    pub rekey_in_secs: u64,
    pub lifetime_secs: u64,
}
