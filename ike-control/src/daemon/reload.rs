//! What `xesp reload` (and SIGHUP) can apply to a running daemon: the
//! comparison of the running configuration with the file's, as a plan.
//!
//! * `[dmz]`: applied at once (the DMZ filter's allowlist and flags);
//! * a tunnel whose IKE settings changed (PSK, proposals, lifetimes, DPD,
//!   traffic selectors, ...): re-established with them;
//! * an unchanged tunnel: untouched, its SAs and traffic go on;
//! * `device.bird_socket`: taken at once;
//! * everything else (the device's addresses, interfaces, datapath, MTU,
//!   MSS clamp, control socket; tunnels added, removed, renamed or
//!   readdressed): named as needing a restart.

use crate::config::Config;

/// What a reload does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub dmz_changed: bool,
    /// Tunnels (by index) to re-establish with their new settings.
    pub reconfigured: Vec<usize>,
    pub bird_socket_changed: bool,
    /// Changes that need a restart, each named.
    pub not_applied: Vec<String>,
}

/// Compares the running configuration with the new one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    let (o, n) = (&old.device, &new.device);
    let device = [
        ("public_address", o.public_address == n.public_address),
        ("dmz_interface", o.dmz_interface == n.dmz_interface),
        ("lan_interfaces", o.lan_interfaces == n.lan_interfaces),
        ("datapath", o.datapath == n.datapath),
        ("control_socket", o.control_socket == n.control_socket),
        ("control_group", o.control_group == n.control_group),
        ("metrics_listen", o.metrics_listen == n.metrics_listen),
        ("mss_clamp", o.mss_clamp == n.mss_clamp),
        ("tunnel_mtu", o.tunnel_mtu == n.tunnel_mtu),
    ];
    for (field, same) in device {
        if !same {
            p.not_applied
                .push(format!("device.{field} changed: restart xesp to apply it"));
        }
    }
    p.bird_socket_changed = o.bird_socket != n.bird_socket;
    p.dmz_changed =
        old.dmz_allow != new.dmz_allow || old.dmz_pass_unclassified != new.dmz_pass_unclassified;
    let names = |c: &Config| c.tunnels.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    if names(old) != names(new) {
        p.not_applied.push(format!(
            "the tunnels changed from [{}] to [{}]: restart xesp to add, remove or rename tunnels",
            names(old).join(", "),
            names(new).join(", ")
        ));
        return p;
    }
    for (i, (a, b)) in old.tunnels.iter().zip(&new.tunnels).enumerate() {
        if a.address != b.address {
            p.not_applied.push(format!(
                "tunnel {}: address {} -> {}: restart xesp to apply it",
                a.name, a.address, b.address
            ));
        } else if a.peer != b.peer {
            p.reconfigured.push(i);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[device]
public_address = "192.0.2.1"
lan_interfaces = ["lan0"]

[dmz]
allow = ["52.175.0.0/16"]

[ike]
psk = "a long enough pre-shared key, 1234"

[[tunnel]]
name = "Tunnel0"
remote = "203.0.113.11"
address = "172.16.0.1"

[[tunnel]]
name = "Tunnel1"
remote = "203.0.113.12"
address = "172.16.0.2"
"#;

    fn cfg(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("xesp.toml")).unwrap()
    }

    #[test]
    fn the_same_file_changes_nothing() {
        assert_eq!(plan(&cfg(BASE), &cfg(BASE)), Plan::default());
    }

    #[test]
    fn the_allowlist_applies_and_the_tunnels_stay() {
        let new = BASE.replace(
            r#"allow = ["52.175.0.0/16"]"#,
            r#"allow = ["52.175.0.0/16", "198.51.100.0/24"]"#,
        );
        let p = plan(&cfg(BASE), &cfg(&new));
        assert!(p.dmz_changed);
        assert!(p.reconfigured.is_empty() && p.not_applied.is_empty());
    }

    #[test]
    fn a_changed_tunnel_is_reestablished_alone() {
        let new = BASE.replace(
            "name = \"Tunnel1\"\nremote = \"203.0.113.12\"\naddress = \"172.16.0.2\"\n",
            "name = \"Tunnel1\"\nremote = \"203.0.113.12\"\naddress = \"172.16.0.2\"\ndpd = { interval = \"3s\" }\n",
        );
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.reconfigured, vec![1]);
        assert!(!p.dmz_changed && p.not_applied.is_empty());
    }

    #[test]
    fn what_needs_a_restart_is_named() {
        let new = BASE
            .replace("[device]\n", "[device]\ntunnel_mtu = 1300\n")
            .replace("address = \"172.16.0.2\"", "address = \"172.16.0.9\"");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.not_applied.len(), 2, "{:?}", p.not_applied);
        assert!(p.not_applied[0].contains("device.tunnel_mtu"));
        assert!(p.not_applied[1].contains("tunnel Tunnel1: address"));
        let fewer = BASE.split("[[tunnel]]\nname = \"Tunnel1\"").next().unwrap();
        let p = plan(&cfg(BASE), &cfg(fewer));
        assert!(
            p.not_applied[0].contains("[Tunnel0, Tunnel1] to [Tunnel0]"),
            "{p:?}"
        );
    }
}
