//! What `xesp reload` (and SIGHUP) can apply to a running daemon: the
//! comparison of the running configuration with the file's, as a plan.
//! Tunnels are matched by name.
//!
//! * `[dmz]`: applied at once (the DMZ filter's allowlist and flags);
//! * a tunnel only in the file: added (its interface, its connection,
//!   started as configured);
//! * a tunnel no longer in the file: removed (its IKE_SA deleted at the
//!   peer, its SAs and interface removed); a renamed tunnel is one removed
//!   and one added, and so is one whose address changed;
//! * a tunnel whose IKE settings changed (PSK, proposals, lifetimes, DPD,
//!   traffic selectors, ...): re-established with them;
//! * an unchanged tunnel: untouched, its SAs and traffic go on;
//! * `device.bird_socket`: taken at once;
//! * everything else (the device's addresses, interfaces, datapath, MTU,
//!   MSS clamp, control socket): named as needing a restart.

use crate::config::{Config, Tunnel};

/// What a reload does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub dmz_changed: bool,
    /// Tunnels to re-establish with their new settings: (index in the
    /// running configuration, index in the new one).
    pub reconfigured: Vec<(usize, usize)>,
    /// Tunnels to remove, by index in the running configuration.
    pub removed: Vec<usize>,
    /// Tunnels to add, by index in the new configuration.
    pub added: Vec<usize>,
    pub bird_socket_changed: bool,
    /// Changes that need a restart, each named.
    pub not_applied: Vec<String>,
}

/// Whether tunnel `b` (new) has other IKE settings than `a` (running). The
/// tunnel index is the datapath's, not the file's position: not compared.
fn ike_changed(a: &Tunnel, b: &Tunnel) -> bool {
    let mut b = b.peer.clone();
    b.tunnel = a.peer.tunnel;
    a.peer != b
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
    let find = |c: &Config, name: &str| c.tunnels.iter().position(|t| t.name == name);
    for (i, a) in old.tunnels.iter().enumerate() {
        match find(new, &a.name) {
            None => p.removed.push(i),
            Some(j) if a.address != new.tunnels[j].address => {
                p.removed.push(i);
                p.added.push(j);
            }
            Some(j) if ike_changed(a, &new.tunnels[j]) => p.reconfigured.push((i, j)),
            Some(_) => {}
        }
    }
    for (j, b) in new.tunnels.iter().enumerate() {
        if find(old, &b.name).is_none() {
            p.added.push(j);
        }
    }
    p.added.sort_unstable();
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
        assert_eq!(p.reconfigured, vec![(1, 1)]);
        assert!(!p.dmz_changed && p.not_applied.is_empty());
    }

    #[test]
    fn what_needs_a_restart_is_named() {
        let new = BASE.replace("[device]\n", "[device]\ntunnel_mtu = 1300\n");
        let p = plan(&cfg(BASE), &cfg(&new));
        assert_eq!(p.not_applied.len(), 1, "{:?}", p.not_applied);
        assert!(p.not_applied[0].contains("device.tunnel_mtu"));
        assert!(p.added.is_empty() && p.removed.is_empty() && p.reconfigured.is_empty());
    }

    /// BASE with Tunnel1 left out.
    fn tunnel0_only() -> String {
        BASE.split("[[tunnel]]\nname = \"Tunnel1\"")
            .next()
            .unwrap()
            .to_string()
    }

    #[test]
    fn a_new_tunnel_is_added_and_the_others_stay() {
        let p = plan(&cfg(&tunnel0_only()), &cfg(BASE));
        assert_eq!(p.added, vec![1]);
        assert!(p.removed.is_empty() && p.reconfigured.is_empty(), "{p:?}");
        assert!(p.not_applied.is_empty(), "{p:?}");
        // Its peer joins the DMZ allowlist.
        assert!(p.dmz_changed);
    }

    #[test]
    fn a_tunnel_left_out_is_removed_and_the_others_stay() {
        let p = plan(&cfg(BASE), &cfg(&tunnel0_only()));
        assert_eq!(p.removed, vec![1]);
        assert!(p.added.is_empty() && p.reconfigured.is_empty(), "{p:?}");
        // Tunnel0 removed: Tunnel1 is first in the file now, and unchanged.
        let without0 = BASE.replace(
            "[[tunnel]]\nname = \"Tunnel0\"\nremote = \"203.0.113.11\"\naddress = \"172.16.0.1\"\n",
            "",
        );
        let p = plan(&cfg(BASE), &cfg(&without0));
        assert_eq!(p.removed, vec![0]);
        assert!(p.added.is_empty() && p.reconfigured.is_empty(), "{p:?}");
    }

    #[test]
    fn a_renamed_or_readdressed_tunnel_is_removed_and_added() {
        let renamed = BASE.replace("name = \"Tunnel1\"", "name = \"Tunnel7\"");
        let p = plan(&cfg(BASE), &cfg(&renamed));
        assert_eq!((p.removed, p.added), (vec![1], vec![1]));
        let readdressed = BASE.replace("address = \"172.16.0.2\"", "address = \"172.16.0.9\"");
        let p = plan(&cfg(BASE), &cfg(&readdressed));
        assert_eq!((p.removed, p.added), (vec![1], vec![1]));
        assert!(p.reconfigured.is_empty() && p.not_applied.is_empty());
    }

    #[test]
    fn with_xfrm_tunnels_are_added_and_removed_live_too() {
        let xfrm = |t: &str| t.replace("[device]\n", "[device]\ndatapath = \"xfrm\"\n");
        let p = plan(&cfg(&xfrm(BASE)), &cfg(&xfrm(&tunnel0_only())));
        assert_eq!((p.removed, p.added), (vec![1], vec![]));
        let p = plan(&cfg(&xfrm(&tunnel0_only())), &cfg(&xfrm(BASE)));
        assert!(p.not_applied.is_empty(), "{p:?}");
        assert_eq!((p.removed, p.added), (vec![], vec![1]));
    }
}
