//! `xesp bgp-config --bird`: the routing daemon's side of the article's
//! `router bgp 65010`, from `[bgp]` and the tunnels: one eBGP multihop
//! session per tunnel's BGP peer sourced from Loopback0, a /32 to each peer
//! through its tunnel interface (unreachable when the interface is gone, so
//! that a session never runs through another tunnel), the on-prem networks
//! advertised, and ECMP over both tunnels (`maximum-paths 2`, BIRD's
//! `merge paths`).

use std::{fmt::Write as _, path::Path};

use crate::config::Config;

/// Why no configuration can be written.
#[derive(Debug, thiserror::Error)]
pub enum BgpConfigError {
    #[error("[bgp]: missing; it gives this device's ASN, Loopback0 (source) and networks")]
    NoBgp,
    #[error(
        "tunnel[{index}].bgp_peer: missing; {tunnel} needs the Azure instance's BGP address (10.2.0.228 in the article)"
    )]
    NoPeer { index: usize, tunnel: String },
    #[error(
        "tunnel[{index}].name: {name:?} and {other:?} give the same BIRD protocol name {symbol}"
    )]
    SameSymbol {
        index: usize,
        name: String,
        other: String,
        symbol: String,
    },
}

/// A BIRD symbol for a tunnel's session: `az_Tunnel0`.
fn symbol(tunnel: &str) -> String {
    let s: String = tunnel
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("az_{s}")
}

/// BIRD 2's configuration; `log` is where BIRD should log, if anywhere.
pub fn bird(cfg: &Config, log: Option<&Path>) -> Result<String, BgpConfigError> {
    let bgp = cfg.bgp.as_ref().ok_or(BgpConfigError::NoBgp)?;
    let mut peers = Vec::new();
    for (i, t) in cfg.tunnels.iter().enumerate() {
        let peer = t.bgp_peer.ok_or_else(|| BgpConfigError::NoPeer {
            index: i,
            tunnel: t.name.clone(),
        })?;
        let sym = symbol(&t.name);
        if let Some((_, other, _)) = peers.iter().find(|(s, _, _)| *s == sym) {
            return Err(BgpConfigError::SameSymbol {
                index: i,
                name: t.name.clone(),
                other: String::clone(other),
                symbol: sym,
            });
        }
        peers.push((sym, t.name.clone(), peer));
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# BIRD 2 for xesp: the article's router bgp {} (written by xesp bgp-config --bird).",
        bgp.asn
    );
    if let Some(l) = log {
        let _ = writeln!(s, "log \"{}\" all;", l.display());
    }
    let _ = write!(
        s,
        "router id {src};\n\
         protocol device {{ }}\n\
         \n\
         # The on-prem networks, advertised to Azure (network ... mask ...).\n\
         protocol static xesp_networks {{\n    ipv4;\n",
        src = bgp.source
    );
    for n in &bgp.networks {
        let _ = writeln!(s, "    route {n} blackhole;");
    }
    s.push_str(
        "}\n\n# The BGP peers through their tunnels (ip route 10.2.0.228 255.255.255.255 Tunnel0).\n\
         protocol static xesp_peers {\n    ipv4;\n",
    );
    for (_, name, peer) in &peers {
        let _ = writeln!(s, "    route {peer}/32 via \"{name}\";");
    }
    s.push_str(
        "}\n\n# A peer whose tunnel interface is gone (removed by a reload) is\n\
         # unreachable, not reached through another tunnel whose VNet route covers\n\
         # its address: its session ends with its tunnel. Below the routes above.\n\
         protocol static xesp_peers_unreachable {\n    ipv4 { preference 10; };\n",
    );
    for (_, _, peer) in &peers {
        let _ = writeln!(s, "    route {peer}/32 unreachable;");
    }
    let _ = write!(
        s,
        "}}\n\n\
         # Routes into the kernel, sourced from Loopback0; merge paths: one ECMP\n\
         # route over both tunnels (maximum-paths {n}).\n\
         protocol kernel {{\n\
         \x20   ipv4 {{\n\
         \x20       import none;\n\
         \x20       export filter {{ if proto = \"xesp_networks\" then reject; krt_prefsrc = {src}; accept; }};\n\
         \x20   }};\n\
         \x20   merge paths on;\n\
         }}\n\n\
         # neighbor ... remote-as {peer_asn}, ebgp-multihop {hops}, update-source Loopback0.\n\
         template bgp xesp_azure {{\n\
         \x20   local {src} as {asn};\n\
         \x20   multihop {hops};\n\
         \x20   hold time {hold};\n\
         \x20   keepalive time {keep};\n\
         \x20   connect retry time {retry};\n\
         \x20   error wait time {ew_min}, {ew_max};\n\
         \x20   ipv4 {{\n\
         \x20       import all;\n\
         \x20       export where proto = \"xesp_networks\";\n\
         \x20       next hop self;\n\
         \x20   }};\n\
         }}\n",
        n = peers.len(),
        src = bgp.source,
        asn = bgp.asn,
        peer_asn = bgp.peer_asn,
        hops = bgp.multihop,
        hold = bgp.hold_time.as_secs(),
        keep = bgp.keepalive.as_secs(),
        retry = bgp.connect_retry.as_secs(),
        // After an error BIRD waits before restarting the session, doubling
        // the wait from a fifth of the connect retry time up to all of it.
        ew_min = (bgp.connect_retry.as_secs() / 5).clamp(1, 60),
        ew_max = bgp.connect_retry.as_secs().clamp(1, 300),
    );
    for (sym, name, peer) in &peers {
        let _ = writeln!(
            s,
            "protocol bgp {sym} from xesp_azure {{ description \"{name}\"; neighbor {peer} as {}; }}",
            bgp.peer_asn
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../xesp.example.toml");

    fn parse(s: &str) -> Config {
        Config::parse(s, Path::new("/etc/xesp/xesp.toml")).unwrap()
    }

    #[test]
    fn the_articles_router_bgp_65010() {
        let s = bird(&parse(EXAMPLE), None).unwrap();
        for want in [
            "router id 172.16.0.3;",
            "route 10.0.0.0/24 blackhole;",
            "route 10.1.10.0/25 blackhole;",
            "route 10.2.0.228/32 via \"Tunnel0\";",
            "route 10.2.0.229/32 via \"Tunnel1\";",
            "protocol static xesp_peers_unreachable {\n    ipv4 { preference 10; };\n    route 10.2.0.228/32 unreachable;\n    route 10.2.0.229/32 unreachable;\n}",
            "merge paths on;",
            "krt_prefsrc = 172.16.0.3;",
            "local 172.16.0.3 as 65010;",
            "multihop 5;",
            "hold time 180;",
            "keepalive time 60;",
            "connect retry time 120;",
            "error wait time 24, 120;",
            "protocol bgp az_Tunnel0 from xesp_azure { description \"Tunnel0\"; neighbor 10.2.0.228 as 65000; }",
            "protocol bgp az_Tunnel1 from xesp_azure { description \"Tunnel1\"; neighbor 10.2.0.229 as 65000; }",
        ] {
            assert!(s.contains(want), "{want}\n{s}");
        }
        assert!(!s.contains("log "));
        let s = bird(&parse(EXAMPLE), Some(Path::new("/var/log/bird.log"))).unwrap();
        assert!(s.contains("log \"/var/log/bird.log\" all;"));
    }

    #[test]
    fn timers_come_from_the_config() {
        let t = EXAMPLE
            .replace("hold_time = \"180s\"", "hold_time = \"9s\"")
            .replace("keepalive = \"60s\"", "keepalive = \"3s\"")
            .replace("connect_retry = \"120s\"", "connect_retry = \"5s\"")
            .replace("multihop = 5", "multihop = 2");
        let s = bird(&parse(&t), None).unwrap();
        for want in [
            "hold time 9;",
            "keepalive time 3;",
            "connect retry time 5;",
            "error wait time 1, 5;",
            "multihop 2;",
        ] {
            assert!(s.contains(want), "{want}\n{s}");
        }
    }

    #[test]
    fn what_is_missing_is_named() {
        let no_bgp = EXAMPLE.split("[bgp]").next().unwrap().to_string()
            + "[[tunnel]]\nname = \"T0\"\nremote = \"52.175.253.112\"\naddress = \"172.16.0.1\"\n";
        let e = bird(&parse(&no_bgp), None).unwrap_err().to_string();
        assert!(e.starts_with("[bgp]: missing"), "{e}");
        let no_peer = EXAMPLE.replace("bgp_peer = \"10.2.0.229\"\n", "");
        let e = bird(&parse(&no_peer), None).unwrap_err().to_string();
        assert!(
            e.starts_with("tunnel[1].bgp_peer: missing") && e.contains("Tunnel1"),
            "{e}"
        );
        let same = EXAMPLE
            .replace("name = \"Tunnel0\"", "name = \"Tunnel-0\"")
            .replace("name = \"Tunnel1\"", "name = \"Tunnel_0\"");
        let e = bird(&parse(&same), None).unwrap_err().to_string();
        assert!(e.contains("az_Tunnel_0"), "{e}");
    }
}
