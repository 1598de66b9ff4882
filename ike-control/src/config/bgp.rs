//! `[bgp]`: the article's `router bgp 65010`, run by a routing daemon beside
//! xesp (`xesp bgp-config` writes its configuration from this section).

use std::{net::Ipv4Addr, str::FromStr, time::Duration};

use ipnet::Ipv4Net;
use serde::Deserialize;

use super::{
    ConfigError, field, ipv4,
    limits::{BGP_HOLD, BGP_TIMER, IntLimit},
};

/// ASNs Azure refuses for the on-premises side, and whose they are.
pub const AZURE_RESERVED_ASNS: [(u32, &str); 8] = [
    (65515, "Azure's own (the VPN gateway's default)"),
    (65517, "reserved by Azure"),
    (65518, "reserved by Azure"),
    (65519, "reserved by Azure"),
    (65520, "reserved by Azure"),
    (8074, "Microsoft's"),
    (8075, "Microsoft's"),
    (12076, "Microsoft's (ExpressRoute)"),
];

/// Why Azure would refuse `asn` on the on-premises side, if it would.
pub fn reserved_asn(asn: u32) -> Option<&'static str> {
    AZURE_RESERVED_ASNS
        .iter()
        .find(|(a, _)| *a == asn)
        .map(|(_, why)| *why)
}

const ASN: IntLimit = IntLimit {
    min: 1,
    max: 4_294_967_294,
    unit: "",
};
const MULTIHOP: IntLimit = IntLimit {
    min: 1,
    max: 255,
    unit: "hops",
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BgpFile {
    asn: i64,
    #[serde(default = "default_peer_asn")]
    peer_asn: i64,
    source: String,
    #[serde(default)]
    networks: Vec<String>,
    #[serde(default = "default_multihop")]
    multihop: i64,
    hold_time: Option<String>,
    keepalive: Option<String>,
    connect_retry: Option<String>,
}

fn default_peer_asn() -> i64 {
    65515
}
fn default_multihop() -> i64 {
    5
}

/// The checked `[bgp]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bgp {
    /// This device's ASN (the article's 65010).
    pub asn: u32,
    /// The Azure gateway's ASN (`bgpSettings.asn`, 65515 unless changed; 65000 in the article).
    pub peer_asn: u32,
    /// Loopback0: the BGP source and router id (172.16.0.3).
    pub source: Ipv4Addr,
    /// The on-prem networks advertised (10.0.0.0/24, 10.1.10.0/25).
    pub networks: Vec<Ipv4Net>,
    /// `ebgp-multihop 5`.
    pub multihop: u8,
    pub hold_time: Duration,
    pub keepalive: Duration,
    pub connect_retry: Duration,
}

impl BgpFile {
    pub(super) fn check(self, warnings: &mut Vec<String>) -> Result<Bgp, ConfigError> {
        let asn = ASN.check("bgp.asn", self.asn, "not an ASN")? as u32;
        if let Some(why) = reserved_asn(asn) {
            return Err(ConfigError::Range {
                field: "bgp.asn".into(),
                value: asn.to_string(),
                reason: format!("{why}: Azure refuses it for the on-premises side"),
                allowed: "any other ASN, e.g. a private one 64512 to 65514".into(),
            });
        }
        let peer_asn = ASN.check("bgp.peer_asn", self.peer_asn, "not an ASN")? as u32;
        if peer_asn == asn {
            return Err(ConfigError::Range {
                field: "bgp.asn".into(),
                value: asn.to_string(),
                reason: "equals bgp.peer_asn: eBGP to Azure needs two ASNs".into(),
                allowed: format!("any ASN but {peer_asn}"),
            });
        }
        let source = ipv4("bgp.source", &self.source)?;
        let mut networks = Vec::new();
        for (i, n) in self.networks.iter().enumerate() {
            let net = Ipv4Net::from_str(n.trim()).map_err(|_| {
                field(
                    format!("bgp.networks[{i}]"),
                    format!("{n:?} is not an IPv4 prefix like 10.0.0.0/24"),
                )
            })?;
            if net != net.trunc() {
                return Err(field(
                    format!("bgp.networks[{i}]"),
                    format!("{n:?} has host bits set; did you mean {}?", net.trunc()),
                ));
            }
            networks.push(net);
        }
        let multihop =
            MULTIHOP.check("bgp.multihop", self.multihop, "a TTL between 1 and 255")? as u8;
        let hold_time = match &self.hold_time {
            Some(h) => BGP_HOLD.check("bgp.hold_time", h, warnings)?,
            None => Duration::from_secs(180),
        };
        let keepalive = match &self.keepalive {
            Some(k) => BGP_TIMER.check("bgp.keepalive", k, warnings)?,
            None => (hold_time / 3).max(Duration::from_secs(1)),
        };
        if keepalive > hold_time {
            return Err(ConfigError::Range {
                field: "bgp.keepalive".into(),
                value: format!("{:?}", self.keepalive.unwrap_or_default()),
                reason: "longer than bgp.hold_time: the sessions would time out".into(),
                allowed: format!("1s to the hold time ({}s)", hold_time.as_secs()),
            });
        }
        let connect_retry = match &self.connect_retry {
            Some(c) => BGP_TIMER.check("bgp.connect_retry", c, warnings)?,
            None => Duration::from_secs(120),
        };
        Ok(Bgp {
            asn,
            peer_asn,
            source,
            networks,
            multihop,
            hold_time,
            keepalive,
            connect_retry,
        })
    }
}
