//! `xesp.toml`: the device, its DMZ filter, IKE defaults and the tunnels.
//! Loading checks everything and names the field at fault; see
//! `xesp.example.toml` for every setting with the article's values.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use ike_proto::{
    config::{Dpd, EspProposal, IkeProposal, Lifetimes, PeerConfig},
    crypto::Psk,
    ts::TsRange,
};

mod bgp;
pub mod limits;
mod perms;
mod syntax;
#[cfg(test)]
mod tests_table;

pub use bgp::{AZURE_RESERVED_ASNS, Bgp, reserved_asn};
pub use syntax::SyntaxError;

use limits::{
    CHILD_LIFETIME_KB, DPD_INTERVAL, DPD_RETRY, DPD_TRIES, LIFETIME, MSS_CLAMP, REPLAY_WINDOW,
    TUNNEL_MTU, max_xdp_tunnel_mtu,
};

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML itself is wrong; never shows a line that may hold a secret.
    #[error("{path}: {error}")]
    Syntax { path: PathBuf, error: SyntaxError },
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    /// A value outside what can work.
    #[error("{field} = {value}: {reason} (allowed: {allowed})")]
    Range {
        field: String,
        value: String,
        reason: String,
        allowed: String,
    },
}

fn field(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// How packets are processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// XDP filters the DMZ interface and steers ESP and the LAN's tunnel
    /// traffic to AF_XDP workers; the TUN devices carry the host's own.
    Xdp,
    /// TUN devices and sockets only (no XDP, no DMZ filter).
    Tun,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    device: DeviceFile,
    #[serde(default)]
    dmz: DmzFile,
    #[serde(default)]
    ike: IkeFile,
    #[serde(default)]
    bgp: Option<bgp::BgpFile>,
    #[serde(default, rename = "tunnel")]
    tunnels: Vec<TunnelFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFile {
    public_address: String,
    #[serde(default = "default_dmz_if")]
    dmz_interface: String,
    #[serde(default)]
    lan_interfaces: Vec<String>,
    #[serde(default = "default_datapath")]
    datapath: DatapathMode,
    #[serde(default = "default_socket")]
    control_socket: PathBuf,
    #[serde(default)]
    control_group: Option<String>,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default = "default_mss")]
    mss_clamp: i64,
    #[serde(default = "default_mtu")]
    tunnel_mtu: i64,
    #[serde(default)]
    bird_socket: Option<PathBuf>,
}

fn default_dmz_if() -> String {
    "dmz0".into()
}
fn default_datapath() -> DatapathMode {
    DatapathMode::Xdp
}
fn default_socket() -> PathBuf {
    "/run/xesp/xesp.sock".into()
}
fn default_mss() -> i64 {
    1350
}
fn default_mtu() -> i64 {
    1400
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DmzFile {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    pass_unclassified: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpdFile {
    interval: Option<String>,
    retry: Option<String>,
    tries: Option<i64>,
    on_demand: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct IkeFile {
    psk: Option<String>,
    psk_file: Option<PathBuf>,
    proposals: Option<Vec<String>>,
    esp_proposals: Option<Vec<String>>,
    allow_legacy: Option<bool>,
    lifetime: Option<String>,
    child_lifetime: Option<String>,
    child_lifetime_kb: Option<i64>,
    dpd: Option<DpdFile>,
    initiator: Option<bool>,
    replay_window: Option<i64>,
    local_ts: Option<Vec<String>>,
    remote_ts: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelFile {
    name: String,
    remote: String,
    address: String,
    #[serde(default)]
    bgp_peer: Option<String>,
    #[serde(flatten)]
    ike: IkeFile,
}

/// The device-wide settings.
#[derive(Debug, Clone)]
pub struct Device {
    pub public_address: Ipv4Addr,
    pub dmz_interface: String,
    pub lan_interfaces: Vec<String>,
    pub datapath: DatapathMode,
    pub control_socket: PathBuf,
    /// The control socket's group (mode 0660); `None`: root's.
    pub control_group: Option<String>,
    /// Where Prometheus scrapes `/metrics` (off when `None`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub mss_clamp: u16,
    pub tunnel_mtu: u16,
    pub bird_socket: Option<PathBuf>,
}

/// One tunnel: its TUN device and its connection.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub name: String,
    /// The tunnel interface's address (the article's 172.16.0.1/32).
    pub address: Ipv4Addr,
    /// The peer's BGP address reached through this tunnel, for status.
    pub bgp_peer: Option<Ipv4Addr>,
    pub peer: PeerConfig,
}

/// A loaded, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub device: Device,
    /// Allowed source prefixes on the DMZ (the gateways' addresses are added).
    pub dmz_allow: Vec<IpNet>,
    /// Pass frames the DMZ filter cannot classify (ethertypes other than
    /// IPv4, IPv6 and ARP, a third VLAN tag) instead of dropping them.
    pub dmz_pass_unclassified: bool,
    pub tunnels: Vec<Tunnel>,
    /// `[bgp]`, for `xesp bgp-config`.
    pub bgp: Option<Bgp>,
    /// Things worth a warning (weak PSK, legacy algorithms, risky values).
    pub warnings: Vec<String>,
    /// A `psk` is written in the file itself.
    psk_inline: bool,
}

/// Parses `30s`, `10m`, `8h`, `7h30m`, `1d` or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let mut total = 0u64;
    let mut num = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return None,
        };
        total = total.checked_add(num.parse::<u64>().ok()?.checked_mul(unit)?)?;
        num.clear();
        any = true;
    }
    (any && num.is_empty()).then(|| Duration::from_secs(total))
}

pub(crate) fn ipv4(field_name: &str, s: &str) -> Result<Ipv4Addr, ConfigError> {
    Ipv4Addr::from_str(s.trim())
        .map_err(|_| field(field_name, format!("{s:?} is not an IPv4 address")))
}

/// Characters of a PSK shorter than this get a warning (the article: use a stronger key).
const WEAK_PSK: usize = 16;

const MAX_TUNNELS: usize = xesp_common::MAX_TUNNELS as usize;

impl Config {
    /// Reads, parses and checks `path`; warns if it holds a pre-shared key
    /// and other users may read it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut c = Self::parse(&text, path)?;
        if c.psk_inline
            && let Some(w) = perms::secret_file_warning(path, "a pre-shared key (psk)")
        {
            c.warnings.push(w);
        }
        Ok(c)
    }

    /// Parses and checks `text` (read from `path`, which relative files are
    /// resolved against).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let f: File = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.into(),
            error: syntax::redact(text, &e),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut warnings = Vec::new();
        let psk_inline = f.ike.psk.is_some() || f.tunnels.iter().any(|t| t.ike.psk.is_some());
        let public = ipv4("device.public_address", &f.device.public_address)?;
        let mss_clamp = MSS_CLAMP.check(
            "device.mss_clamp",
            f.device.mss_clamp,
            "out of range for a TCP MSS",
        )? as u16;
        let tunnel_mtu = TUNNEL_MTU.check(
            "device.tunnel_mtu",
            f.device.tunnel_mtu,
            "out of range for an IPv4 MTU",
        )? as u16;
        if f.device.datapath == DatapathMode::Xdp && u32::from(tunnel_mtu) > max_xdp_tunnel_mtu() {
            return Err(ConfigError::Range {
                field: "device.tunnel_mtu".into(),
                value: tunnel_mtu.to_string(),
                reason: format!(
                    "with datapath = \"xdp\" an encrypted packet must fit one AF_XDP frame \
                     ({} octets, {} of headroom, up to {} of Ethernet, IPv4, UDP, ESP and padding)",
                    datapath_user::xsk::PortConfig::default().frame_size,
                    limits::XDP_HEADROOM,
                    limits::ESP_WORST_OVERHEAD
                ),
                allowed: format!("{} to {} octets", TUNNEL_MTU.min, max_xdp_tunnel_mtu()),
            });
        }
        if f.device.datapath == DatapathMode::Xdp && f.device.lan_interfaces.len() != 1 {
            return Err(field(
                "device.lan_interfaces",
                "the xdp datapath takes exactly one LAN interface (bond or bridge several)",
            ));
        }
        let device = Device {
            public_address: public,
            dmz_interface: f.device.dmz_interface,
            lan_interfaces: f.device.lan_interfaces,
            datapath: f.device.datapath,
            control_socket: f.device.control_socket,
            control_group: f.device.control_group,
            metrics_listen: f
                .device
                .metrics_listen
                .as_deref()
                .map(|a| {
                    a.trim().parse().map_err(|_| {
                        field(
                            "device.metrics_listen",
                            format!("{a:?} is not an address and port like 127.0.0.1:9962"),
                        )
                    })
                })
                .transpose()?,
            mss_clamp,
            tunnel_mtu,
            bird_socket: f.device.bird_socket,
        };
        let mut dmz_allow = Vec::new();
        for (i, a) in f.dmz.allow.iter().enumerate() {
            dmz_allow.push(IpNet::from_str(a.trim()).map_err(|_| {
                field(
                    format!("dmz.allow[{i}]"),
                    format!("{a:?} is not a prefix like 203.0.113.0/24"),
                )
            })?);
        }
        let bgp = f.bgp.map(|b| b.check(&mut warnings)).transpose()?;
        if f.tunnels.is_empty() {
            return Err(field("tunnel", "no [[tunnel]] configured"));
        }
        if f.tunnels.len() > MAX_TUNNELS {
            return Err(field("tunnel", format!("at most {} tunnels", MAX_TUNNELS)));
        }
        let mut tunnels: Vec<Tunnel> = Vec::new();
        for (i, t) in f.tunnels.into_iter().enumerate() {
            let at = format!("tunnel[{i}]");
            if t.name.is_empty()
                || t.name.len() > 15
                || !t
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(field(
                    format!("{at}.name"),
                    "1 to 15 letters, digits, '-' or '_' (it names the tunnel interface)",
                ));
            }
            if tunnels.iter().any(|o| o.name == t.name) {
                return Err(field(
                    format!("{at}.name"),
                    format!("{:?} is used twice", t.name),
                ));
            }
            let remote = ipv4(&format!("{at}.remote"), &t.remote)?;
            if tunnels.iter().any(|o| o.peer.remote == IpAddr::V4(remote)) {
                return Err(field(
                    format!("{at}.remote"),
                    format!("{remote} is used by two tunnels"),
                ));
            }
            if remote == public {
                return Err(field(
                    format!("{at}.remote"),
                    format!(
                        "{remote} is this device's own device.public_address; remote is the \
                         Azure gateway instance's public IP (bgpSettings.bgpPeeringAddresses[].tunnelIpAddresses)"
                    ),
                ));
            }
            let address = ipv4(&format!("{at}.address"), &t.address)?;
            let bgp_peer = t
                .bgp_peer
                .as_deref()
                .map(|b| ipv4(&format!("{at}.bgp_peer"), b))
                .transpose()?;
            check_addresses(
                &at,
                &t.name,
                address,
                bgp_peer,
                public,
                &tunnels,
                bgp.as_ref(),
            )?;
            let ike = merge(&f.ike, &t.ike);
            let psk = match (&ike.psk, &ike.psk_file) {
                (Some(_), Some(_)) => {
                    return Err(field(format!("{at}.psk"), "give psk or psk_file, not both"));
                }
                (Some(p), None) => p.clone(),
                (None, Some(file)) => {
                    let p = base.join(file);
                    let key = read_psk_file(&p).map_err(|e| {
                        field(format!("{at}.psk_file"), format!("{}: {e}", p.display()))
                    })?;
                    if let Some(w) = perms::secret_file_warning(&p, "the pre-shared key")
                        && !warnings.contains(&w)
                    {
                        warnings.push(w);
                    }
                    key
                }
                (None, None) => {
                    return Err(field(
                        format!("{at}.psk"),
                        "no pre-shared key (psk or psk_file, here or in [ike])",
                    ));
                }
            };
            if psk.is_empty() {
                return Err(field(format!("{at}.psk"), "the pre-shared key is empty"));
            }
            if psk.len() < WEAK_PSK {
                warnings.push(format!(
                    "{}: the pre-shared key is only {} characters; use {WEAK_PSK} or more random ones",
                    t.name,
                    psk.len()
                ));
            }
            let mut peer = PeerConfig::new(
                &t.name,
                i as u32,
                IpAddr::V4(public),
                IpAddr::V4(remote),
                Psk::new(psk.as_bytes()),
            );
            if let Some(p) = &ike.proposals {
                if p.is_empty() {
                    return Err(no_proposal(
                        &format!("{at}.proposals"),
                        "aes256-sha256-modp2048",
                    ));
                }
                peer.ike_proposals = p
                    .iter()
                    .enumerate()
                    .map(|(k, s)| {
                        IkeProposal::parse(s)
                            .map_err(|e| field(format!("{at}.proposals[{k}]"), e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
            }
            if let Some(p) = &ike.esp_proposals {
                if p.is_empty() {
                    return Err(no_proposal(&format!("{at}.esp_proposals"), "aes256gcm16"));
                }
                peer.esp_proposals = p
                    .iter()
                    .enumerate()
                    .map(|(k, s)| {
                        EspProposal::parse(s)
                            .map_err(|e| field(format!("{at}.esp_proposals[{k}]"), e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
            }
            peer.allow_legacy = ike.allow_legacy.unwrap_or(false);
            let legacy = peer.ike_proposals.iter().any(IkeProposal::uses_legacy)
                || peer.esp_proposals.iter().any(EspProposal::uses_legacy);
            if legacy && !peer.allow_legacy {
                return Err(field(
                    format!("{at}.proposals"),
                    "uses legacy algorithms (DH group 2 / modp1024, 3DES): set allow_legacy = true to accept them",
                ));
            }
            if legacy {
                warnings.push(format!(
                    "{}: legacy algorithms (DH group 2, 3DES) are allowed",
                    t.name
                ));
            }
            let mut dur = |name: &str,
                           v: &Option<String>,
                           limit: &limits::DurationLimit,
                           d: Duration|
             -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(d),
                    Some(s) => limit.check(&format!("{at}.{name}"), s, &mut warnings),
                }
            };
            let defaults = Lifetimes::default();
            let ike_lifetime = dur("lifetime", &ike.lifetime, &LIFETIME, defaults.ike)?;
            let child_lifetime = dur(
                "child_lifetime",
                &ike.child_lifetime,
                &LIFETIME,
                defaults.child,
            )?;
            let d = ike.dpd.clone().unwrap_or_default();
            let dd = Dpd::default();
            let dpd_interval = dur("dpd.interval", &d.interval, &DPD_INTERVAL, dd.interval)?;
            let dpd_retry = dur("dpd.retry", &d.retry, &DPD_RETRY, dd.retry)?;
            let child_bytes = match ike.child_lifetime_kb {
                Some(kb) => Some(
                    CHILD_LIFETIME_KB.check(
                        &format!("{at}.child_lifetime_kb"),
                        kb,
                        "a CHILD_SA this small dies after a handful of packets; Azure's minimum is 1024",
                    )? as u64
                        * 1024,
                ),
                None => defaults.child_bytes,
            };
            peer.lifetimes = Lifetimes {
                ike: ike_lifetime,
                child: child_lifetime,
                child_bytes,
                ..defaults
            };
            peer.dpd = Dpd {
                interval: dpd_interval,
                retry: dpd_retry,
                tries: match d.tries {
                    Some(n) => DPD_TRIES.check(
                        &format!("{at}.dpd.tries"),
                        n,
                        "the peer must be probed at least once",
                    )? as u32,
                    None => dd.tries,
                },
                on_demand: d.on_demand.unwrap_or(dd.on_demand),
            };
            peer.initiator = ike.initiator.unwrap_or(true);
            if let Some(w) = ike.replay_window {
                let f = format!("{at}.replay_window");
                peer.replay_window =
                    REPLAY_WINDOW.check(&f, w, "beyond the anti-replay window")? as u32;
                if w == 0 {
                    warnings.push(format!(
                        "{f} = 0: turns anti-replay off, so replayed ESP packets are accepted \
                         (allowed: {}; default {})",
                        REPLAY_WINDOW.allowed(),
                        xesp_esp::replay::DEFAULT_WINDOW
                    ));
                }
            }
            let ts = |name: &str,
                      v: &Option<Vec<String>>|
             -> Result<Option<Vec<TsRange>>, ConfigError> {
                v.as_ref()
                    .map(|l| {
                        l.iter()
                            .enumerate()
                            .map(|(k, s)| {
                                TsRange::parse(s).ok_or_else(|| {
                                    field(
                                        format!("{at}.{name}[{k}]"),
                                        format!("{s:?} is not an IPv4 prefix"),
                                    )
                                })
                            })
                            .collect()
                    })
                    .transpose()
            };
            if let Some(l) = ts("local_ts", &ike.local_ts)? {
                peer.local_ts = l;
            }
            if let Some(r) = ts("remote_ts", &ike.remote_ts)? {
                peer.remote_ts = r;
            }
            tunnels.push(Tunnel {
                name: t.name,
                address,
                bgp_peer,
                peer,
            });
        }
        // The gateways must get through the DMZ filter.
        for t in &tunnels {
            if let IpAddr::V4(a) = t.peer.remote {
                let host = IpNet::new(IpAddr::V4(a), 32).unwrap_or_else(|_| unreachable!());
                if !dmz_allow.iter().any(|n| n.contains(&host)) {
                    dmz_allow.push(host);
                }
            }
        }
        Ok(Self {
            device,
            dmz_allow,
            dmz_pass_unclassified: f.dmz.pass_unclassified,
            tunnels,
            bgp,
            warnings,
            psk_inline,
        })
    }
}

/// A key file is small and regular: a device or a huge file is a mistake,
/// not a key (and /dev/zero would never end).
const MAX_PSK_FILE: u64 = 4096;

fn read_psk_file(p: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_PSK_FILE {
        return Err(format!(
            "{} bytes: a key file holds at most {MAX_PSK_FILE}",
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

fn no_proposal(field: &str, example: &str) -> ConfigError {
    ConfigError::Range {
        field: field.into(),
        value: "[]".into(),
        reason: "no proposal: no SA could ever be negotiated".into(),
        allowed: format!(
            "one or more proposals, e.g. [\"{example}\"] (keywords: {})",
            ike_proto::config::KEYWORDS
        ),
    }
}

/// A tunnel's own /32 and its BGP peer must be distinct from every other
/// address the device routes: another tunnel's, the LAN's, Loopback0's.
fn check_addresses(
    at: &str,
    name: &str,
    address: Ipv4Addr,
    bgp_peer: Option<Ipv4Addr>,
    public: Ipv4Addr,
    earlier: &[Tunnel],
    bgp: Option<&Bgp>,
) -> Result<(), ConfigError> {
    let clash = |what: &str, value: Ipv4Addr, reason: String| ConfigError::Range {
        field: format!("{at}.{what}"),
        value: value.to_string(),
        reason,
        allowed: "an address of its own, outside the on-prem networks (the article: Tunnel0 \
                  172.16.0.1, Tunnel1 172.16.0.2)"
            .into(),
    };
    if let Some(o) = earlier.iter().find(|o| o.address == address) {
        return Err(clash(
            "address",
            address,
            format!("also the address of {} ({name} needs its own /32)", o.name),
        ));
    }
    if address == public {
        return Err(clash(
            "address",
            address,
            "is device.public_address, which carries the tunnel itself".into(),
        ));
    }
    if let Some(b) = bgp {
        if let Some((k, n)) = b
            .networks
            .iter()
            .enumerate()
            .find(|(_, n)| n.contains(&address))
        {
            return Err(clash(
                "address",
                address,
                format!(
                    "inside the on-prem network bgp.networks[{k}] = {n}: the LAN's traffic \
                     would be routed into the tunnel interface"
                ),
            ));
        }
        if b.source == address {
            return Err(clash(
                "address",
                address,
                "is bgp.source (Loopback0), which must be an address of its own".into(),
            ));
        }
    }
    if let Some(p) = bgp_peer {
        if p == address {
            return Err(clash(
                "bgp_peer",
                p,
                "is the tunnel's own address; bgp_peer is the Azure instance's BGP address \
                 (defaultBgpIpAddresses, 10.2.0.228 in the article)"
                    .into(),
            ));
        }
        if let Some(n) = bgp.and_then(|b| b.networks.iter().find(|n| n.contains(&p))) {
            return Err(clash(
                "bgp_peer",
                p,
                format!("inside the on-prem network {n}: it must be reached through the tunnel"),
            ));
        }
    }
    Ok(())
}

/// A tunnel's IKE settings over the [ike] defaults.
fn merge(d: &IkeFile, t: &IkeFile) -> IkeFile {
    IkeFile {
        psk: t.psk.clone().or_else(|| {
            if t.psk_file.is_some() {
                None
            } else {
                d.psk.clone()
            }
        }),
        psk_file: t.psk_file.clone().or_else(|| {
            if t.psk.is_some() {
                None
            } else {
                d.psk_file.clone()
            }
        }),
        proposals: t.proposals.clone().or_else(|| d.proposals.clone()),
        esp_proposals: t.esp_proposals.clone().or_else(|| d.esp_proposals.clone()),
        allow_legacy: t.allow_legacy.or(d.allow_legacy),
        lifetime: t.lifetime.clone().or_else(|| d.lifetime.clone()),
        child_lifetime: t
            .child_lifetime
            .clone()
            .or_else(|| d.child_lifetime.clone()),
        child_lifetime_kb: t.child_lifetime_kb.or(d.child_lifetime_kb),
        dpd: t.dpd.clone().or_else(|| d.dpd.clone()),
        initiator: t.initiator.or(d.initiator),
        replay_window: t.replay_window.or(d.replay_window),
        local_ts: t.local_ts.clone().or_else(|| d.local_ts.clone()),
        remote_ts: t.remote_ts.clone().or_else(|| d.remote_ts.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../xesp.example.toml");

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/xesp/xesp.toml"))
    }

    #[test]
    fn the_example_mirrors_the_article() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.tunnels.len(), 2);
        assert_eq!(c.tunnels[0].address, Ipv4Addr::new(172, 16, 0, 1));
        assert_eq!(c.tunnels[1].bgp_peer, Some(Ipv4Addr::new(10, 2, 0, 229)));
        assert_eq!(c.device.mss_clamp, 1350);
        let p = &c.tunnels[0].peer;
        assert_eq!(p.dpd.interval, Duration::from_secs(10));
        assert_eq!(p.dpd.retry, Duration::from_secs(2));
        assert!(p.dpd.on_demand);
        assert_eq!(p.lifetimes.ike, Duration::from_secs(28800));
        assert_eq!(p.lifetimes.child, Duration::from_secs(27000));
        let b = c.bgp.as_ref().unwrap();
        assert_eq!((b.asn, b.peer_asn), (65010, 65000));
        assert_eq!(b.source, Ipv4Addr::new(172, 16, 0, 3));
        assert_eq!(b.networks.len(), 2);
        assert!(
            c.warnings.iter().any(|w| w.contains("pre-shared key")),
            "the article's PSK is weak"
        );
        // The PSK is in no Debug output.
        assert!(!format!("{c:?}").contains("secret*1234"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("public_address = \"192.0.2.300\"", "device.public_address"),
            ("remote = \"gateway\"", "tunnel[0].remote"),
            (
                "proposals = [\"aes256-md5-modp2048\"]",
                "tunnel[0].proposals[0]",
            ),
            ("allow_legacy = false", "allow_legacy = true"),
            ("child_lifetime = \"soon\"", "tunnel[0].child_lifetime"),
            ("mss_clamp = 10", "device.mss_clamp"),
        ];
        for (line, want) in cases {
            let key = line.split(" = ").next().unwrap();
            let text: String = EXAMPLE
                .lines()
                .map(|l| {
                    if l.trim_start().starts_with(&format!("{key} =")) {
                        line.to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let text = if text.contains(line) {
                text
            } else {
                text.replacen("[[tunnel]]\n", &format!("[[tunnel]]\n{line}\n"), 1)
            };
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
        assert!(
            parse("[device]\npublic_address = \"192.0.2.1\"\nfoo = 1")
                .unwrap_err()
                .to_string()
                .contains("foo")
        );
        assert!(
            parse("[device]\npublic_address = \"192.0.2.1\"\ndatapath = \"tun\"")
                .unwrap_err()
                .to_string()
                .contains("no [[tunnel]]")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7h30m"), Some(Duration::from_secs(27000)));
        assert_eq!(parse_duration("28800"), Some(Duration::from_secs(28800)));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        for bad in ["", "h", "10x", "1h30", "-5s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn gateways_are_always_allowed_through_the_dmz() {
        let c = parse(EXAMPLE).unwrap();
        for t in &c.tunnels {
            let host = IpNet::new(t.peer.remote, 32).unwrap();
            assert!(c.dmz_allow.iter().any(|n| n.contains(&host)));
        }
    }

    #[test]
    fn the_dmz_drops_unclassified_frames_unless_told_otherwise() {
        assert!(!parse(EXAMPLE).unwrap().dmz_pass_unclassified);
        let on = EXAMPLE.replace("pass_unclassified = false", "pass_unclassified = true");
        assert_ne!(on, EXAMPLE);
        assert!(parse(&on).unwrap().dmz_pass_unclassified);
    }
}
