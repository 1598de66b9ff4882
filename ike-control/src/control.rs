//! The daemon's control socket: a Unix stream socket where a client writes
//! one request line ([`Request`]) and reads one JSON document back. `xesp
//! status` is its client; it prints the article's verification answers per
//! tunnel (connection status, ingress/egress bytes, last established time in
//! UTC, IKE_SA details, CHILD_SA counters) as tables, or the JSON. `xesp
//! tunnel up|down|rekey`, `xesp sa list` and `xesp reload` are the others
//! (strongSwan's `--initiate`, `--terminate`, `--rekey`, `--list-sas`,
//! `--load-all` habits).

use std::{
    fmt::Write as _,
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use datapath_user::{mode::InterfaceCounters, sadb::TunnelTotals};
use serde::{Deserialize, Serialize};

use ike_proto::status::ConnStatus;

/// The status request's line.
pub const STATUS_REQUEST: &str = "status";

/// Longest request line the daemon reads.
pub const MAX_REQUEST: usize = 256;

/// What a client asks for, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `status`: a [`DeviceStatus`].
    Status,
    /// `tunnel up NAME`: open the tunnel (initiate, or accept the peer again).
    Up(String),
    /// `tunnel down NAME`: delete its IKE_SAs and refuse the peer's until up.
    Down(String),
    /// `tunnel rekey NAME child|ike`.
    Rekey(String, RekeyWhat),
    /// `reload`: read the configuration file again and apply what changed.
    Reload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RekeyWhat {
    Child,
    Ike,
}

impl Request {
    /// Parses a request line; the error says what is understood.
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => Ok(Self::Status),
            ["reload"] => Ok(Self::Reload),
            ["tunnel", "up", name] => Ok(Self::Up((*name).into())),
            ["tunnel", "down", name] => Ok(Self::Down((*name).into())),
            ["tunnel", "rekey", name] | ["tunnel", "rekey", name, "child"] => {
                Ok(Self::Rekey((*name).into(), RekeyWhat::Child))
            }
            ["tunnel", "rekey", name, "ike"] => Ok(Self::Rekey((*name).into(), RekeyWhat::Ike)),
            _ => Err(format!(
                "unknown request {:?}: one of \"status\", \"reload\", \"tunnel up|down NAME\", \"tunnel rekey NAME [child|ike]\"",
                line.chars().take(MAX_REQUEST).collect::<String>()
            )),
        }
    }

    /// The request's line.
    pub fn line(&self) -> String {
        match self {
            Self::Status => STATUS_REQUEST.into(),
            Self::Reload => "reload".into(),
            Self::Up(n) => format!("tunnel up {n}"),
            Self::Down(n) => format!("tunnel down {n}"),
            Self::Rekey(n, RekeyWhat::Child) => format!("tunnel rekey {n} child"),
            Self::Rekey(n, RekeyWhat::Ike) => format!("tunnel rekey {n} ike"),
        }
    }
}

/// The daemon's answer to every request but `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    /// What was done, or why not.
    pub message: String,
    /// `reload`: changes that need a restart of the daemon, by name.
    #[serde(default)]
    pub not_applied: Vec<String>,
}

impl Answer {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            not_applied: Vec::new(),
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            not_applied: Vec::new(),
        }
    }
}

/// Everything `xesp status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub version: String,
    pub public_address: String,
    pub datapath: String,
    pub started_utc: String,
    pub tunnels: Vec<TunnelStatus>,
    /// The DMZ XDP classifier's and ESP steering's counters (`xdp` datapath only).
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
    /// `birdc show protocols`, when a BIRD socket is configured.
    pub bgp: Option<String>,
    /// What the configuration check warned about at start (weak PSK,
    /// legacy algorithms, risky values).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// One tunnel (the article's Tunnel0 / Tunnel1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub name: String,
    pub address: String,
    pub remote: String,
    pub bgp_peer: Option<String>,
    pub up: bool,
    pub last_established_utc: Option<String>,
    /// Over every SA the tunnel had, rekeys included.
    pub totals: TunnelTotals,
    /// Drops per reason, both directions.
    pub drops: Vec<(String, u64)>,
    /// RFC 4301 §5.1: packets routed into the tunnel that no CHILD_SA's
    /// traffic selectors cover, dropped (also in `drops`).
    #[serde(default)]
    pub no_selector: u64,
    /// RFC 4301 §5.2: decrypted packets outside their CHILD_SA's traffic
    /// selectors, dropped (also in `drops`).
    #[serde(default)]
    pub selector_mismatch: u64,
    /// What the XDP programs steered to this tunnel's AF_XDP sockets.
    pub xdp: Option<XdpTraffic>,
    /// The tunnel interface's statistics as the kernel counts them
    /// (`xfrm` datapath: the xfrm interface; rx is what came out of the
    /// tunnel, tx what went into it).
    #[serde(default)]
    pub interface: Option<InterfaceCounters>,
    pub connection: ConnStatus,
}

/// Packets and octets the XDP programs redirected to one tunnel's workers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct XdpTraffic {
    pub lan_packets: u64,
    pub lan_bytes: u64,
    pub esp_packets: u64,
    pub esp_bytes: u64,
}

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connecting to {path}: {source} (is `xesp run` running, with this control_socket?)")]
    Connect { path: String, source: io::Error },
    #[error("talking to the daemon: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon's answer is not what was asked for: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends `request` to the daemon at `path` and returns its answer's text.
fn ask(path: &Path, request: &Request) -> Result<String, ControlError> {
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("{}\n", request.line()).as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// Asks the daemon at `path` for its status.
pub fn query_status(path: &Path) -> Result<DeviceStatus, ControlError> {
    Ok(serde_json::from_str(&ask(path, &Request::Status)?)?)
}

/// Sends a command (anything but `status`) to the daemon at `path`.
pub fn command(path: &Path, request: &Request) -> Result<Answer, ControlError> {
    Ok(serde_json::from_str(&ask(path, request)?)?)
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    // Days to civil date (proleptic Gregorian), after H. Hinnant's algorithm.
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The UTC time `ago` seconds before now.
pub fn utc_ago(ago: u64) -> String {
    utc(unix_now().saturating_sub(ago))
}

fn duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// One CHILD_SA, two lines (`show crypto ipsec sa`).
fn write_child(o: &mut String, ch: &ike_proto::status::ChildStatus) {
    let _ = writeln!(
        o,
        "  CHILD_SA {}{}  SPI in {} out {}  {}  {} === {}",
        ch.state,
        if ch.routed { " (routed)" } else { "" },
        ch.spi_in,
        ch.spi_out,
        ch.suite,
        ch.local_ts.join(","),
        ch.remote_ts.join(",")
    );
    let _ = writeln!(
        o,
        "    #pkts encaps {}, #bytes {}; #pkts decaps {}, #bytes {}; drops in {} out {}; age {}, rekey in {}",
        ch.packets_out,
        ch.bytes_out,
        ch.packets_in,
        ch.bytes_in,
        ch.drops_in,
        ch.drops_out,
        duration(ch.age_secs),
        duration(ch.rekey_in_secs)
    );
}

/// `xesp sa list`: each tunnel's IKE_SA and CHILD_SAs (`swanctl --list-sas`).
pub fn render_sas(st: &DeviceStatus) -> String {
    let mut o = String::new();
    for t in &st.tunnels {
        let c = &t.connection;
        let state = if c.closed {
            " (down by the operator)"
        } else {
            ""
        };
        match &c.ike {
            Some(i) => {
                let _ = writeln!(
                    o,
                    "{}: IKE_SA {} {} {} === {}  SPIs {}/{}{}{state}",
                    t.name,
                    i.state,
                    i.role,
                    i.local,
                    i.remote,
                    i.spi_i,
                    i.spi_r,
                    if i.nat_t { "  NAT-T" } else { "" }
                );
            }
            None => {
                let _ = writeln!(o, "{}: no IKE_SA (peer {}){state}", t.name, c.peer);
            }
        }
        for ch in &c.children {
            write_child(&mut o, ch);
        }
    }
    o
}

/// The human rendering of `xesp status`.
pub fn render(st: &DeviceStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "xesp {}  public address {}  datapath {}  running since {}",
        st.version, st.public_address, st.datapath, st.started_utc
    );
    for w in &st.warnings {
        let _ = writeln!(o, "warning: {w}");
    }
    let _ = writeln!(
        o,
        "\n{:<10} {:<5} {:<16} {:<15} {:>14} {:>14} {:>9}  LAST ESTABLISHED",
        "TUNNEL", "STATE", "PEER", "ADDRESS", "INGRESS BYTES", "EGRESS BYTES", "DROPS"
    );
    for t in &st.tunnels {
        let drops: u64 = t.drops.iter().map(|(_, n)| n).sum();
        let _ = writeln!(
            o,
            "{:<10} {:<5} {:<16} {:<15} {:>14} {:>14} {:>9}  {}",
            t.name,
            if t.up { "UP" } else { "DOWN" },
            t.remote,
            t.address,
            t.totals.bytes_in,
            t.totals.bytes_out,
            drops,
            t.last_established_utc.as_deref().unwrap_or("never")
        );
    }
    for t in &st.tunnels {
        let c = &t.connection;
        let _ = writeln!(o, "\n{} (peer {}):", t.name, c.peer);
        match &c.ike {
            Some(i) => {
                let _ = writeln!(
                    o,
                    "  IKE_SA {}  {}  SPIs {}/{}  {} -> {}{}",
                    i.state,
                    i.role,
                    i.spi_i,
                    i.spi_r,
                    i.local,
                    i.remote,
                    if i.nat_t { "  NAT-T" } else { "" }
                );
                let _ = writeln!(
                    o,
                    "    encryption {}, keysize {}, PRF {}, integrity {}, DH group {}, auth {}",
                    i.encryption.as_deref().unwrap_or("-"),
                    i.key_size.map_or("-".into(), |k| k.to_string()),
                    i.prf.as_deref().unwrap_or("-"),
                    i.integrity.as_deref().unwrap_or("none (AEAD)"),
                    i.dh_group.as_deref().unwrap_or("-"),
                    i.auth
                );
                let _ = writeln!(
                    o,
                    "    lifetime {}, active {}{}",
                    duration(i.lifetime_secs),
                    i.active_secs.map_or("-".into(), duration),
                    i.rekey_in_secs
                        .map_or(String::new(), |r| format!(", rekey in {}", duration(r)))
                );
            }
            None => {
                let _ = writeln!(o, "  no IKE_SA");
            }
        }
        for ch in &c.children {
            write_child(&mut o, ch);
        }
        let nonzero: Vec<String> = t
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if let Some(x) = &t.xdp {
            let _ = writeln!(
                o,
                "  AF_XDP: from the LAN {} pkts / {} bytes, ESP from the DMZ {} pkts / {} bytes",
                x.lan_packets, x.lan_bytes, x.esp_packets, x.esp_bytes
            );
        }
        if let Some(i) = &t.interface {
            let _ = writeln!(
                o,
                "  interface {}: rx {} pkts / {} bytes, {} errors, {} dropped; tx {} pkts / {} bytes, {} errors, {} dropped",
                t.name,
                i.rx_packets,
                i.rx_bytes,
                i.rx_errors,
                i.rx_dropped,
                i.tx_packets,
                i.tx_bytes,
                i.tx_errors,
                i.tx_dropped
            );
        }
        let _ = writeln!(
            o,
            "  traffic selectors: {} out dropped (no CHILD_SA covers them: no_selector), {} in dropped (outside their CHILD_SA's: selector_mismatch)",
            t.no_selector, t.selector_mismatch
        );
        let s = &c.stats;
        let _ = writeln!(
            o,
            "  totals: in {} pkts / {} bytes, out {} pkts / {} bytes; drops: {}",
            t.totals.packets_in,
            t.totals.bytes_in,
            t.totals.packets_out,
            t.totals.bytes_out,
            if nonzero.is_empty() {
                "none".to_string()
            } else {
                nonzero.join(", ")
            }
        );
        let _ = writeln!(
            o,
            "  IKE: {} established, {} CHILD_SAs installed, {} rekeys, {} retransmits, {} DPD failures, {} auth failures, {} invalid messages",
            s.ike_sas_established,
            s.child_sas_installed,
            s.rekeys,
            s.retransmits,
            s.dpd_failures,
            s.auth_failures,
            s.invalid_messages
        );
    }
    let counters = |o: &mut String, title: &str, c: &[(String, u64)]| {
        if !c.is_empty() {
            let list: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(o, "\n{title}: {}", list.join(", "));
        }
    };
    counters(&mut o, "DMZ (XDP) packets", &st.dmz);
    counters(&mut o, "LAN (XDP) packets", &st.lan);
    counters(&mut o, "AF_XDP workers", &st.workers);
    counters(&mut o, "Socket datapath", &st.socket_path);
    let _ = writeln!(
        o,
        "ESP with an unknown SPI {}, tunnel packets without an SA {}",
        st.unknown_spi, st.no_outbound_sa
    );
    if let Some(b) = &st.bgp {
        let _ = writeln!(o, "\nBGP (birdc show protocols):\n{}", b.trim_end());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status as the daemon sends it, with `interface` when given.
    fn status(interface: serde_json::Value) -> DeviceStatus {
        let mut tunnel = serde_json::json!({
            "name": "Tunnel0", "address": "172.16.0.1", "remote": "203.0.113.11",
            "bgp_peer": null, "up": true, "last_established_utc": null,
            "totals": {"packets_in": 7, "bytes_in": 700, "packets_out": 9, "bytes_out": 900},
            "drops": [], "xdp": null,
            "connection": {
                "name": "Tunnel0", "tunnel": 0, "peer": "203.0.113.11", "up": true,
                "established_secs_ago": null, "ike": null, "children": [],
                "stats": serde_json::to_value(ike_proto::status::ConnStats::default()).unwrap()
            }
        });
        if !interface.is_null() {
            tunnel["interface"] = interface;
        }
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "public_address": "192.0.2.1", "datapath": "xfrm (kernel ESP)",
            "started_utc": "2026-12-01 00:00:00 UTC", "tunnels": [tunnel],
            "dmz": [], "lan": [], "workers": [], "socket_path": [],
            "unknown_spi": 0, "no_outbound_sa": 0, "bgp": null
        }))
        .unwrap()
    }

    #[test]
    fn interface_statistics_are_shown_when_the_datapath_gives_them() {
        let st = status(serde_json::json!({
            "rx_packets": 11, "rx_bytes": 1100, "rx_errors": 1, "rx_dropped": 2,
            "tx_packets": 13, "tx_bytes": 1300, "tx_errors": 3, "tx_dropped": 4
        }));
        let text = render(&st);
        assert!(
            text.contains(
                "  interface Tunnel0: rx 11 pkts / 1100 bytes, 1 errors, 2 dropped; tx 13 pkts / 1300 bytes, 3 errors, 4 dropped\n"
            ),
            "{text}"
        );
        // --json carries them under the tunnel, by name.
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["tunnels"][0]["interface"]["tx_dropped"], 4);
        assert_eq!(json["tunnels"][0]["interface"]["rx_packets"], 11);
        // An older daemon's answer (no field) and the user-space modes
        // (null) show no interface line.
        let text = render(&status(serde_json::Value::Null));
        assert!(!text.contains("interface Tunnel0"), "{text}");
    }

    #[test]
    fn requests_parse_and_print_back() {
        for r in [
            Request::Status,
            Request::Reload,
            Request::Up("Tunnel0".into()),
            Request::Down("Tunnel1".into()),
            Request::Rekey("Tunnel0".into(), RekeyWhat::Child),
            Request::Rekey("Tunnel0".into(), RekeyWhat::Ike),
        ] {
            assert_eq!(Request::parse(&r.line()), Ok(r.clone()));
        }
        assert_eq!(
            Request::parse(" tunnel  rekey Tunnel1 \n"),
            Ok(Request::Rekey("Tunnel1".into(), RekeyWhat::Child))
        );
        for bad in [
            "",
            "statusx",
            "tunnel up",
            "tunnel sideways Tunnel0",
            "tunnel rekey T esp",
        ] {
            let e = Request::parse(bad).unwrap_err();
            assert!(
                e.contains("unknown request") && e.contains("tunnel up|down NAME"),
                "{e}"
            );
        }
        let long = "x".repeat(10_000);
        assert!(Request::parse(&long).unwrap_err().len() < MAX_REQUEST + 200);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_606_245), "2026-11-25 11:30:45 UTC");
    }

    #[test]
    fn durations_read_like_uptimes() {
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(61), "1m01s");
        assert_eq!(duration(28800), "8h00m00s");
    }
}
