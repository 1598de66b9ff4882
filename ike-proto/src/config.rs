//! What one connection (one tunnel to one gateway instance) is configured
//! with, as the protocol core sees it. The TOML file and its checks live in
//! the daemon; this is the validated result.

use core::fmt;
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use xesp_esp::alg::{AesKeyBits, Encr, Integ};

use super::{
    crypto::{DhGroup, Prf, Psk},
    ts::TsRange,
};

/// An IKE proposal: every combination of its transforms is acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IkeProposal {
    pub encr: Vec<Encr>,
    /// Empty for AEAD ciphers.
    pub integ: Vec<Integ>,
    pub prf: Vec<Prf>,
    pub dh: Vec<DhGroup>,
}

/// An ESP proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspProposal {
    pub encr: Vec<Encr>,
    pub integ: Vec<Integ>,
    /// PFS groups for CREATE_CHILD_SA; empty: no PFS.
    pub dh: Vec<DhGroup>,
    /// Extended sequence numbers offered, in order of preference.
    pub esn: Vec<bool>,
}

/// A proposal string that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proposal {proposal:?}: {reason}")]
pub struct ProposalError {
    pub proposal: String,
    pub reason: String,
}

fn encr_keyword(k: &str) -> Option<Encr> {
    Some(match k {
        "aes128" => Encr::AesCbc(AesKeyBits::B128),
        "aes192" => Encr::AesCbc(AesKeyBits::B192),
        "aes256" | "aes" => Encr::AesCbc(AesKeyBits::B256),
        "aes128gcm16" | "aes128gcm128" => Encr::AesGcm16(AesKeyBits::B128),
        "aes256gcm16" | "aes256gcm128" => Encr::AesGcm16(AesKeyBits::B256),
        "3des" => Encr::Des3Cbc,
        _ => return None,
    })
}

fn integ_keyword(k: &str) -> Option<(Integ, Prf)> {
    Some(match k {
        "sha1" | "sha" => (Integ::HmacSha1_96, Prf::HmacSha1),
        "sha256" | "sha2_256" => (Integ::HmacSha2_256_128, Prf::HmacSha2_256),
        "sha384" | "sha2_384" => (Integ::HmacSha2_384_192, Prf::HmacSha2_384),
        "sha512" | "sha2_512" => (Integ::HmacSha2_512_256, Prf::HmacSha2_512),
        _ => return None,
    })
}

fn prf_keyword(k: &str) -> Option<Prf> {
    Some(match k {
        "prfsha1" => Prf::HmacSha1,
        "prfsha256" => Prf::HmacSha2_256,
        "prfsha384" => Prf::HmacSha2_384,
        "prfsha512" => Prf::HmacSha2_512,
        _ => return None,
    })
}

fn dh_keyword(k: &str) -> Option<DhGroup> {
    Some(match k {
        "modp1024" => DhGroup::Modp1024,
        "modp2048" => DhGroup::Modp2048,
        "modp2048s256" => DhGroup::Modp2048s256,
        "ecp256" => DhGroup::Ecp256,
        "ecp384" => DhGroup::Ecp384,
        "curve25519" | "x25519" => DhGroup::Curve25519,
        _ => return None,
    })
}

/// The keywords a proposal string may use, for error messages and `--help`.
pub const KEYWORDS: &str = "encryption aes128 aes192 aes256 aes128gcm16 aes256gcm16 3des; integrity sha1 sha256 sha384 \
sha512; prf prfsha1 prfsha256 prfsha384 prfsha512; DH modp1024 modp2048 modp2048s256 ecp256 ecp384 curve25519; \
ESP only: esn noesn";

impl IkeProposal {
    /// Parses strongSwan's notation, e.g. `aes256-sha256-modp2048` or
    /// `aes256gcm16-prfsha256-ecp384`. With an integrity algorithm and no
    /// explicit PRF, the PRF follows the integrity hash.
    pub fn parse(s: &str) -> Result<Self, ProposalError> {
        let err = |reason: String| ProposalError {
            proposal: s.to_string(),
            reason,
        };
        let mut p = IkeProposal {
            encr: vec![],
            integ: vec![],
            prf: vec![],
            dh: vec![],
        };
        let mut implied_prf = vec![];
        for k in s.split('-').map(str::trim) {
            if let Some(e) = encr_keyword(k) {
                p.encr.push(e);
            } else if let Some((i, prf)) = integ_keyword(k) {
                p.integ.push(i);
                implied_prf.push(prf);
            } else if let Some(prf) = prf_keyword(k) {
                p.prf.push(prf);
            } else if let Some(g) = dh_keyword(k) {
                p.dh.push(g);
            } else {
                return Err(err(format!("unknown keyword {k:?} (known: {KEYWORDS})")));
            }
        }
        if p.prf.is_empty() {
            p.prf = implied_prf;
        }
        let aead = p.encr.iter().filter(|e| e.is_aead()).count();
        if p.encr.is_empty() {
            return Err(err("no encryption algorithm".into()));
        }
        if aead != 0 && aead != p.encr.len() {
            return Err(err("mixes AEAD (GCM) and non-AEAD ciphers".into()));
        }
        if aead == 0 && p.integ.is_empty() {
            return Err(err(
                "a non-AEAD cipher needs an integrity algorithm (e.g. sha256)".into(),
            ));
        }
        if aead != 0 && !p.integ.is_empty() {
            return Err(err(
                "AES-GCM takes no integrity algorithm; name the PRF with prfsha256 and the like"
                    .into(),
            ));
        }
        if p.prf.is_empty() {
            return Err(err("no PRF (e.g. prfsha256)".into()));
        }
        if p.dh.is_empty() {
            return Err(err("no Diffie-Hellman group (e.g. modp2048)".into()));
        }
        Ok(p)
    }

    /// True if any transform is legacy (3DES, DH group 2).
    pub fn uses_legacy(&self) -> bool {
        self.encr.iter().any(|e| e.is_legacy()) || self.dh.iter().any(|g| g.is_legacy())
    }
}

impl EspProposal {
    /// Parses e.g. `aes256gcm16`, `aes256-sha1`, `aes256-sha256-modp2048-esn`.
    pub fn parse(s: &str) -> Result<Self, ProposalError> {
        let err = |reason: String| ProposalError {
            proposal: s.to_string(),
            reason,
        };
        let mut p = EspProposal {
            encr: vec![],
            integ: vec![],
            dh: vec![],
            esn: vec![],
        };
        for k in s.split('-').map(str::trim) {
            if let Some(e) = encr_keyword(k) {
                p.encr.push(e);
            } else if let Some((i, _)) = integ_keyword(k) {
                p.integ.push(i);
            } else if let Some(g) = dh_keyword(k) {
                p.dh.push(g);
            } else if k == "esn" {
                p.esn.push(true);
            } else if k == "noesn" {
                p.esn.push(false);
            } else {
                return Err(err(format!("unknown keyword {k:?} (known: {KEYWORDS})")));
            }
        }
        if p.esn.is_empty() {
            p.esn.push(false);
        }
        let aead = p.encr.iter().filter(|e| e.is_aead()).count();
        if p.encr.is_empty() {
            return Err(err("no encryption algorithm".into()));
        }
        if aead != 0 && aead != p.encr.len() {
            return Err(err("mixes AEAD (GCM) and non-AEAD ciphers".into()));
        }
        if aead == 0 && p.integ.is_empty() {
            return Err(err(
                "a non-AEAD cipher needs an integrity algorithm (e.g. sha1)".into(),
            ));
        }
        if aead != 0 && !p.integ.is_empty() {
            return Err(err("AES-GCM takes no integrity algorithm".into()));
        }
        Ok(p)
    }

    pub fn uses_legacy(&self) -> bool {
        self.encr.iter().any(|e| e.is_legacy()) || self.dh.iter().any(|g| g.is_legacy())
    }
}

/// Dead peer detection (the article's `crypto ikev2 dpd 10 2 on-demand`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dpd {
    /// Silence after which the peer is probed.
    pub interval: Duration,
    /// Interval between retransmissions of a probe.
    pub retry: Duration,
    /// Probes sent before the peer is declared dead.
    pub tries: u32,
    /// Probe only when we sent traffic and heard nothing back (Cisco's
    /// on-demand); otherwise probe whenever the peer was silent.
    pub on_demand: bool,
}

impl Default for Dpd {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            retry: Duration::from_secs(2),
            tries: 5,
            on_demand: true,
        }
    }
}

/// Lifetimes and their randomization (RFC 7296 §2.8: rekey before the peer,
/// with jitter, so that both ends rarely rekey at once).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lifetimes {
    /// IKE_SA lifetime (Azure: 28800 s).
    pub ike: Duration,
    /// CHILD_SA lifetime (Azure: 27000 s).
    pub child: Duration,
    /// CHILD_SA volume limit in octets (Azure: 102400000 KB).
    pub child_bytes: Option<u64>,
    /// Rekeys happen at lifetime * (1 - margin - jitter*random).
    pub margin: f64,
    pub jitter: f64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ike: Duration::from_secs(28_800),
            child: Duration::from_secs(27_000),
            child_bytes: Some(102_400_000 * 1024),
            margin: 0.1,
            jitter: 0.05,
        }
    }
}

/// How this end identifies itself and expects the peer to.
#[derive(Clone, PartialEq, Eq)]
pub enum Identity {
    Ipv4(Ipv4Addr),
    Fqdn(String),
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ipv4(a) => write!(f, "{a}"),
            Self::Fqdn(n) => write!(f, "{n}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One connection's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// Name for logs and status (e.g. Tunnel0).
    pub name: String,
    /// Index of the tunnel in the datapath.
    pub tunnel: u32,
    /// Our public address and the peer's (port 500; NAT-T floats to 4500).
    pub local: IpAddr,
    pub remote: IpAddr,
    pub local_id: Identity,
    /// `None`: the peer's address.
    pub remote_id: Option<Identity>,
    pub psk: Psk,
    pub ike_proposals: Vec<IkeProposal>,
    pub esp_proposals: Vec<EspProposal>,
    /// Accept DH group 2 and 3DES (with a warning).
    pub allow_legacy: bool,
    /// Start the tunnel (as opposed to waiting for the peer).
    pub initiator: bool,
    /// Our and the peer's traffic selectors (0.0.0.0/0 both ways for route-based tunnels).
    pub local_ts: Vec<TsRange>,
    pub remote_ts: Vec<TsRange>,
    pub lifetimes: Lifetimes,
    pub dpd: Dpd,
    /// NAT-keepalive interval when we are behind a NAT (RFC 3948 §2.3).
    pub natt_keepalive: Duration,
    /// Anti-replay window of inbound CHILD_SAs.
    pub replay_window: u32,
    /// First retransmission timeout, doubled at each of `retransmit_tries`.
    pub retransmit_timeout: Duration,
    pub retransmit_tries: u32,
    /// Answer IKE_SA_INIT with a COOKIE first (RFC 7296 §2.6).
    pub require_cookie: bool,
    /// With this many half-open IKE_SAs (IKE_SA_INIT answered, no IKE_AUTH
    /// yet), IKE_SA_INIT is answered with a stateless COOKIE only (§2.6).
    pub cookie_threshold: usize,
    /// With this many, IKE_SA_INIT is dropped.
    pub half_open_limit: usize,
    /// Claim to be behind a NAT so that ESP is always UDP-encapsulated
    /// (RFC 3948), as strongSwan's libipsec does.
    pub force_encap: bool,
}

impl PeerConfig {
    /// A configuration with the article's defaults; callers fill in the rest.
    pub fn new(name: &str, tunnel: u32, local: IpAddr, remote: IpAddr, psk: Psk) -> Self {
        let local_id = match local {
            IpAddr::V4(a) => Identity::Ipv4(a),
            IpAddr::V6(a) => Identity::Fqdn(a.to_string()),
        };
        Self {
            name: name.to_string(),
            tunnel,
            local,
            remote,
            local_id,
            remote_id: None,
            psk,
            ike_proposals: vec![
                IkeProposal::parse("aes256-sha256-modp2048").unwrap_or_else(|_| unreachable!()),
                IkeProposal::parse("aes256gcm16-prfsha256-modp2048")
                    .unwrap_or_else(|_| unreachable!()),
            ],
            esp_proposals: vec![
                EspProposal::parse("aes256gcm16").unwrap_or_else(|_| unreachable!()),
                EspProposal::parse("aes256-sha1").unwrap_or_else(|_| unreachable!()),
            ],
            allow_legacy: false,
            initiator: true,
            local_ts: vec![TsRange::any_v4()],
            remote_ts: vec![TsRange::any_v4()],
            lifetimes: Lifetimes::default(),
            dpd: Dpd::default(),
            natt_keepalive: Duration::from_secs(20),
            replay_window: xesp_esp::replay::DEFAULT_WINDOW,
            retransmit_timeout: Duration::from_secs(2),
            retransmit_tries: 5,
            require_cookie: false,
            cookie_threshold: 5,
            half_open_limit: 25,
            force_encap: false,
        }
    }

    pub fn local_addr(&self, natt: bool) -> SocketAddr {
        SocketAddr::new(self.local, if natt { 4500 } else { 500 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proposal_strings() {
        let p = IkeProposal::parse("aes256-sha1-modp1024").unwrap();
        assert_eq!(p.encr, vec![Encr::AesCbc(AesKeyBits::B256)]);
        assert_eq!(p.prf, vec![Prf::HmacSha1]);
        assert_eq!(p.dh, vec![DhGroup::Modp1024]);
        assert!(p.uses_legacy());
        let g = IkeProposal::parse("aes256gcm16-prfsha384-ecp384").unwrap();
        assert!(g.integ.is_empty());
        assert_eq!(g.prf, vec![Prf::HmacSha2_384]);
        let e = EspProposal::parse("aes256-sha256-modp2048-esn").unwrap();
        assert_eq!(
            (e.dh.clone(), e.esn.clone()),
            (vec![DhGroup::Modp2048], vec![true])
        );
        for bad in [
            "",
            "aes256",
            "aes256gcm16-sha1-modp2048",
            "aes256-sha256",
            "aes256-md5-modp2048",
            "aes256gcm16-aes128-prfsha256-modp2048",
        ] {
            let e = IkeProposal::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(EspProposal::parse("aes256").is_err());
        assert!(
            EspProposal::parse("chacha20poly1305")
                .unwrap_err()
                .to_string()
                .contains("unknown keyword")
        );
    }
}
