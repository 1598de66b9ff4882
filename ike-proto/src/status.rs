//! Snapshots that answer the article's verification questions per tunnel:
//! connection status, IKE_SA details, CHILD_SA counters. Serializable for
//! `xesp status --json`.

use serde::{Deserialize, Serialize};

/// One tunnel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnStatus {
    pub name: String,
    pub tunnel: u32,
    pub peer: String,
    /// The tunnel's outbound traffic has an SA.
    pub up: bool,
    /// Taken down by the operator (`xesp tunnel down`) and not up again.
    #[serde(default)]
    pub closed: bool,
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

/// What one connection counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnStats {
    pub ike_sas_established: u64,
    pub child_sas_installed: u64,
    pub rekeys: u64,
    pub retransmits: u64,
    pub dpd_failures: u64,
    pub auth_failures: u64,
    /// Messages dropped before they changed anything.
    pub invalid_messages: u64,
    /// CREATE_CHILD_SA requests of ours the peer refused.
    pub child_sa_refusals: u64,
    /// CHILD_SAs ended by their hard lifetime (time, bytes or sequence numbers).
    pub child_sa_hard_expiries: u64,
    /// Crossing rekeys (§2.8.1, §2.8.2) in which ours survived, or went.
    pub rekey_collisions_won: u64,
    pub rekey_collisions_lost: u64,
    /// IKE_SA_INIT requests answered with a COOKIE only (§2.6).
    pub cookies_sent: u64,
    /// IKE_SA_INIT requests dropped at the half-open limit.
    pub half_open_drops: u64,
    /// CHILD_SA negotiations refused for more traffic selectors than allowed.
    pub selector_overflows: u64,
    /// Diffie-Hellman computations for the peer's IKE_SA_INIT.
    pub responder_key_exchanges: u64,
}
