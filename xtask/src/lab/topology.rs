//! The reference topology: the article's addresses, in namespaces.
//!
//! ```text
//!  lan ──lan0── onprem ──dmz0── msee ══br-az══ azgw1 ──vnet── vnet (VM 10.2.0.4)
//!                                      ╚═════ azgw2 ──vnet──╝
//! ```
//!
//! * `lan`: a host with 10.0.0.10/24 and 10.1.10.10/25 behind the device;
//! * `onprem`: the device under test, with its public (DMZ) address on
//!   `dmz0`, the LAN gateways on `lan0` and Loopback0 on `lo`;
//! * `msee`: the Microsoft-peering edge routing between the DMZ and the
//!   gateways' public addresses; it also owns an address outside any allowed
//!   prefix, to send traffic the DMZ filter must drop;
//! * `azgw1`, `azgw2`: the two instances of the active-active Azure VPN
//!   gateway, each with a public address and a BGP address in the VNet;
//! * `vnet`: the Azure VNet with a VM, reaching on-prem through either
//!   instance.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::netns::{Netns, veth, veth_queues};

/// The article's example pre-shared key (it says: use a stronger one).
pub const DEFAULT_PSK: &str = "secret*1234";

/// On-prem public address on the Microsoft-peering side (X.243.229.110 in the article).
pub const ONPREM_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The Microsoft-peering edge's address toward on-prem.
pub const MSEE_DMZ: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// The edge's address toward the gateways.
pub const MSEE_AZURE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
/// An address of the edge outside every allowed prefix.
pub const OUTSIDER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Public addresses of the two gateway instances (52.175.253.112 and 52.175.250.191).
pub const GW_PUBLIC: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 11),
    Ipv4Addr::new(203, 0, 113, 12),
];
/// The prefix the gateways' public addresses are in (what the DMZ filter allows).
pub const AZURE_PUBLIC_PREFIX: &str = "203.0.113.0/24";
/// BGP peer addresses of the two instances, in the GatewaySubnet.
pub const GW_BGP: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 2, 0, 228), Ipv4Addr::new(10, 2, 0, 229)];
pub const AZURE_ASN: u32 = 65000;
pub const ONPREM_ASN: u32 = 65010;
/// On-prem Loopback0: BGP source and router id.
pub const ONPREM_LOOPBACK: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 3);
/// On-prem tunnel interface addresses (Tunnel0, Tunnel1).
pub const TUNNEL_ADDR: [Ipv4Addr; 2] = [Ipv4Addr::new(172, 16, 0, 1), Ipv4Addr::new(172, 16, 0, 2)];
/// The networks on-prem advertises, and its gateway address in each.
pub const ONPREM_NETS: [(&str, Ipv4Addr); 2] = [
    ("10.0.0.0/24", Ipv4Addr::new(10, 0, 0, 1)),
    ("10.1.10.0/25", Ipv4Addr::new(10, 1, 10, 1)),
];
/// The LAN host's address in each on-prem network.
pub const LAN_HOSTS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 1, 10, 10)];
/// The Azure VNet, and a VM in it.
pub const VNET: &str = "10.2.0.0/24";
pub const VM: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 4);

/// The gateways' tunnel interface: libipsec's TUN, or an xfrm interface
/// with the kernel backend (the same name, so BIRD's routes are the same).
pub const GW_TUNNEL_IF: &str = "ipsec0";
/// The `if_id` of each gateway's xfrm interface and CHILD_SAs (kernel backend).
pub const GW_IF_ID: [u32; 2] = [11, 12];

/// Interface names.
pub const ONPREM_DMZ_IF: &str = "dmz0";
pub const ONPREM_LAN_IF: &str = "lan0";

/// The namespaces of one lab.
pub struct Namespaces {
    pub lan: Netns,
    pub onprem: Netns,
    pub msee: Netns,
    pub azgw: [Netns; 2],
    pub vnet: Netns,
}

impl Namespaces {
    /// `(role, namespace)` for every namespace.
    pub fn all(&self) -> [(&'static str, &Netns); 6] {
        [
            ("lan", &self.lan),
            ("onprem", &self.onprem),
            ("msee", &self.msee),
            ("azgw1", &self.azgw[0]),
            ("azgw2", &self.azgw[1]),
            ("vnet", &self.vnet),
        ]
    }
}

/// Creates the namespaces with `make(role)` and wires them up.
pub fn build(make: impl Fn(&str) -> Result<Netns>) -> Result<Namespaces> {
    let ns = Namespaces {
        lan: make("lan")?,
        onprem: make("onprem")?,
        msee: make("msee")?,
        azgw: [make("azgw1")?, make("azgw2")?],
        vnet: make("vnet")?,
    };
    wire(&ns).context("wiring the lab's namespaces")?;
    Ok(ns)
}

/// The DMZ link between on-prem and the Microsoft-peering edge, with
/// `queues` queues each way: built with the lab, and again by a test that
/// deleted it.
pub fn wire_dmz(ns: &Namespaces, queues: u32) -> Result<()> {
    veth_queues(&ns.onprem, ONPREM_DMZ_IF, &ns.msee, "dmz-p", queues)?;
    ns.onprem.ip(&[
        "addr",
        "add",
        &format!("{ONPREM_PUBLIC}/24"),
        "dev",
        ONPREM_DMZ_IF,
    ])?;
    ns.onprem.ip(&[
        "route",
        "replace",
        "203.0.113.0/24",
        "via",
        &MSEE_DMZ.to_string(),
    ])?;
    ns.msee
        .ip(&["addr", "add", &format!("{MSEE_DMZ}/24"), "dev", "dmz-p"])
}

fn wire(ns: &Namespaces) -> Result<()> {
    for (_, n) in ns.all() {
        // Multi-hop BGP and replies arrive on other interfaces than they leave by.
        n.sysctl("net.ipv4.conf.all.rp_filter=0")?;
        n.sysctl("net.ipv4.conf.default.rp_filter=0")?;
        n.sysctl("net.ipv6.conf.all.disable_ipv6=1")?;
        n.sysctl("net.ipv6.conf.default.disable_ipv6=1")?;
    }

    // LAN host.
    veth(&ns.onprem, ONPREM_LAN_IF, &ns.lan, "eth0")?;
    ns.lan.ip(&[
        "addr",
        "add",
        &format!("{}/24", LAN_HOSTS[0]),
        "dev",
        "eth0",
    ])?;
    ns.lan.ip(&[
        "addr",
        "add",
        &format!("{}/25", LAN_HOSTS[1]),
        "dev",
        "eth0",
    ])?;
    ns.lan.ip(&[
        "route",
        "add",
        "default",
        "via",
        &ONPREM_NETS[0].1.to_string(),
    ])?;
    // The host fills in its own checksums, as a physical NIC would deliver
    // them: veth would otherwise pass TCP with only the pseudo-header sum,
    // which an AF_XDP datapath forwards as it is.
    crate::netns::sh(ns.lan.cmd("ethtool").args(["-K", "eth0", "tx", "off"]))?;

    // On-prem device.
    ns.onprem.ip(&[
        "addr",
        "add",
        &format!("{}/24", ONPREM_NETS[0].1),
        "dev",
        ONPREM_LAN_IF,
    ])?;
    ns.onprem.ip(&[
        "addr",
        "add",
        &format!("{}/25", ONPREM_NETS[1].1),
        "dev",
        ONPREM_LAN_IF,
    ])?;
    ns.onprem
        .ip(&["addr", "add", &format!("{ONPREM_LOOPBACK}/32"), "dev", "lo"])?;
    wire_dmz(ns, 1)?;
    ns.onprem.sysctl("net.ipv4.ip_forward=1")?;
    // maximum-paths: flows (not just address pairs) spread over the tunnels.
    ns.onprem.sysctl("net.ipv4.fib_multipath_hash_policy=1")?;

    // Microsoft-peering edge.
    ns.msee
        .ip(&["addr", "add", &format!("{OUTSIDER}/32"), "dev", "lo"])?;
    ns.msee.ip(&["link", "add", "br-az", "type", "bridge"])?;
    ns.msee.ip(&["link", "set", "br-az", "up"])?;
    ns.msee
        .ip(&["addr", "add", &format!("{MSEE_AZURE}/24"), "dev", "br-az"])?;
    ns.msee.sysctl("net.ipv4.ip_forward=1")?;

    // VNet.
    ns.vnet.ip(&["link", "add", "br0", "type", "bridge"])?;
    ns.vnet.ip(&["link", "set", "br0", "up"])?;
    ns.vnet
        .ip(&["addr", "add", &format!("{VM}/24"), "dev", "br0"])?;

    for (i, gw) in ns.azgw.iter().enumerate() {
        let port = format!("az{}-p", i + 1);
        veth(gw, "wan0", &ns.msee, &port)?;
        ns.msee.ip(&["link", "set", &port, "master", "br-az"])?;
        gw.ip(&[
            "addr",
            "add",
            &format!("{}/24", GW_PUBLIC[i]),
            "dev",
            "wan0",
        ])?;
        gw.ip(&["route", "add", "default", "via", &MSEE_AZURE.to_string()])?;
        // More specific than the 0/1 + 128/1 routes libipsec installs for a
        // 0.0.0.0/0 selector: ESP to the peer must not loop into the tunnel.
        gw.ip(&[
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            &MSEE_AZURE.to_string(),
        ])?;
        let vport = format!("gw{}", i + 1);
        veth(gw, "vnet0", &ns.vnet, &vport)?;
        ns.vnet.ip(&["link", "set", &vport, "master", "br0"])?;
        gw.ip(&["addr", "add", &format!("{}/24", GW_BGP[i]), "dev", "vnet0"])?;
        gw.sysctl("net.ipv4.ip_forward=1")?;
    }

    // The VNet's system routes: on-prem through both instances (ECMP).
    ns.vnet.sysctl("net.ipv4.fib_multipath_hash_policy=1")?;
    vnet_routes(&ns.vnet, &[0, 1])
}

/// Gateway `i`'s xfrm interface ([`GW_TUNNEL_IF`], `if_id` [`GW_IF_ID`]`[i]`
/// over `wan0`), for strongSwan's kernel backend. It stands where libipsec's
/// TUN would: no address (BGP and the VNet's traffic leave from the
/// gateway's VNet address), and the routes into it are BIRD's (the static
/// route to on-prem's Loopback0 and what BGP learns), none of charon's.
pub fn gateway_xfrm_interface(ns: &Namespaces, i: usize) -> Result<()> {
    let gw = &ns.azgw[i];
    let if_id = GW_IF_ID[i].to_string();
    let add = [
        "link",
        "add",
        GW_TUNNEL_IF,
        "type",
        "xfrm",
        "dev",
        "wan0",
        "if_id",
        &if_id,
    ];
    gw.ip(&add).with_context(|| {
        format!(
            "azgw{}: an xfrm interface (does this kernel have XFRM interfaces?)",
            i + 1
        )
    })?;
    gw.ip(&["link", "set", GW_TUNNEL_IF, "up"])
}

/// Points the VNet's routes to on-prem at the gateway instances `via`, as
/// the Azure fabric does when an instance fails or returns.
pub fn vnet_routes(vnet: &Netns, via: &[usize]) -> Result<()> {
    for net in [ONPREM_NETS[0].0, ONPREM_NETS[1].0, "172.16.0.0/24"] {
        let mut args = vec!["route".to_string(), "replace".into(), net.into()];
        for i in via {
            args.extend(["nexthop".into(), "via".into(), GW_BGP[*i].to_string()]);
        }
        vnet.ip(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}
