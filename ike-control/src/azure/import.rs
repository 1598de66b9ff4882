//! `xesp azure import`: the VPN gateway's JSON (and optionally the
//! connection's) plus the on-prem values given as flags, to a complete
//! `xesp.toml` in which every value says where it came from.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use zeroize::Zeroizing;

use super::{
    AZURE_DPD_TIMEOUT_SECS, AZURE_IKE_LIFETIME_SECS, AzureError, apipa_outside_azure,
    dpd_from_timeout,
    json::Node,
    policy::{ImportedPolicy, import_policy},
    refused, secs,
};
use crate::config::reserved_asn;

/// The on-prem side, from the command line.
#[derive(Debug, Clone)]
pub struct OnPrem {
    /// The device's address on the Microsoft-peering side (IKE and ESP source).
    pub public_address: Ipv4Addr,
    pub dmz_interface: String,
    pub lan_interface: String,
    /// Loopback0: BGP source and router id.
    pub loopback: Ipv4Addr,
    /// One per gateway instance, in order (Tunnel0, Tunnel1).
    pub tunnel_addresses: Vec<Ipv4Addr>,
    pub asn: u32,
    /// The on-prem networks advertised.
    pub networks: Vec<Ipv4Net>,
}

/// Choices the inputs leave open.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Accept a gateway that is not active-active (one tunnel only).
    pub allow_passive: bool,
    /// Peer with the instances' custom (APIPA) BGP addresses.
    pub custom_bgp: bool,
    /// How the written file names its psk_file.
    pub psk_file: String,
    /// The psk_file exists already (given by the user): no sharedKey needed.
    pub psk_file_exists: bool,
}

/// One line of the written file: `key = value`, and where the value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    /// A TOML value (quoted as TOML quotes it).
    pub value: String,
    pub from: String,
}

/// A `[table]` or `[[tunnel]]` of the written file.
#[derive(Debug, Clone)]
pub struct Section {
    pub header: &'static str,
    /// Field prefix for the summary (`device`, `tunnel[0]`).
    pub name: String,
    pub items: Vec<Item>,
}

/// What import produced.
#[derive(Debug)]
pub struct Imported {
    pub sections: Vec<Section>,
    /// The connection's sharedKey, for the psk_file; never in the TOML.
    pub psk: Option<Zeroizing<String>>,
    pub warnings: Vec<String>,
    /// The input files, for the header.
    pub sources: Vec<String>,
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list<T: ToString>(v: &[T]) -> String {
    format!(
        "[{}]",
        v.iter()
            .map(|x| q(&x.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn item(key: &str, value: String, from: impl Into<String>) -> Item {
    Item {
        key: key.into(),
        value,
        from: from.into(),
    }
}

impl Imported {
    /// The `xesp.toml` text.
    pub fn toml(&self) -> String {
        let mut s = format!(
            "# Written by `xesp azure import` from {}.\n\
             # Each value names where it came from. Check with: xesp check -c <this file>\n",
            self.sources.join(" and ")
        );
        for sec in &self.sections {
            s.push_str(&format!("\n{}\n", sec.header));
            for i in &sec.items {
                s.push_str(&format!("# {}\n{} = {}\n", i.from, i.key, i.value));
            }
        }
        s
    }

    /// `field = value  <- from`, one line per value taken.
    pub fn summary(&self) -> Vec<String> {
        self.sections
            .iter()
            .flat_map(|sec| {
                sec.items
                    .iter()
                    .map(move |i| format!("{}.{} = {}  <- {}", sec.name, i.key, i.value, i.from))
            })
            .collect()
    }
}

/// One gateway instance: a tunnel.
struct Instance {
    remote: Ipv4Addr,
    remote_from: String,
    bgp_peer: Ipv4Addr,
    bgp_from: String,
}

const GATEWAY_BGP_FIELDS: [&str; 4] = [
    "asn",
    "bgpPeeringAddress",
    "peerWeight",
    "bgpPeeringAddresses",
];
const PEERING_FIELDS: [&str; 4] = [
    "ipconfigurationId",
    "defaultBgpIpAddresses",
    "customBgpIpAddresses",
    "tunnelIpAddresses",
];

fn first_ipv4<'a>(n: &Node<'a>, key: &str, what: &str) -> Result<(Ipv4Addr, Node<'a>), AzureError> {
    let list = n.req(key, what)?;
    let items = list.items()?;
    let Some(first) = items.first() else {
        return Err(list.invalid(format!("empty: {what}")));
    };
    Ok((first.ipv4()?, first.clone()))
}

fn check_apipa(n: &Node<'_>, a: Ipv4Addr) -> Result<(), AzureError> {
    if apipa_outside_azure(a) {
        return Err(n.invalid(
            "an APIPA BGP address outside 169.254.21.0-169.254.22.255, the only range Azure accepts",
        ));
    }
    Ok(())
}

/// Reads the gateway: (peer ASN and where from, the instances).
fn gateway(
    gw: &Node<'_>,
    conn: Option<&Node<'_>>,
    opts: &Options,
    warnings: &mut Vec<String>,
) -> Result<(u32, String, Vec<Instance>), AzureError> {
    if gw.get("connectionType").is_some() || gw.properties().get("connectionType").is_some() {
        return Err(refused(
            gw.file,
            "this is a connection's JSON (it has connectionType); give the gateway's (az network vnet-gateway show) and this one with --connection",
        ));
    }
    let p = gw.properties();
    if let Some(t) = p.get("gatewayType")
        && !t.str()?.eq_ignore_ascii_case("Vpn")
    {
        return Err(t.invalid("not a VPN gateway (gatewayType must be \"Vpn\")"));
    }
    if let Some(t) = p.get("vpnType")
        && !t.str()?.eq_ignore_ascii_case("RouteBased")
    {
        return Err(t.invalid(
            "a policy-based gateway has neither active-active instances nor BGP; the article needs RouteBased",
        ));
    }
    if let Some(b) = p.get("enableBgp")
        && !b.bool()?
    {
        return Err(b.invalid(
            "BGP is off on the gateway; the article runs eBGP over both tunnels (az network vnet-gateway update --enable-bgp true --asn ...)",
        ));
    }
    let aa = p.req("activeActive", "whether the gateway has two instances")?;
    let active_active = aa.bool()?;
    let bgp = p.req(
        "bgpSettings",
        "the gateway's ASN and per-instance addresses",
    )?;
    bgp.only(&GATEWAY_BGP_FIELDS)?;
    let asn_node = bgp.req("asn", "the gateway's ASN")?;
    let asn = asn_node.u64()?;
    let asn = u32::try_from(asn)
        .ok()
        .filter(|a| *a != 0 && *a != u32::MAX)
        .ok_or_else(|| asn_node.invalid("not an ASN (1 to 4294967294)"))?;
    let list = bgp.req(
        "bgpPeeringAddresses",
        "per instance: its public IP (tunnelIpAddresses) and BGP address",
    )?;
    let peerings = list.items()?;
    if !active_active {
        if !opts.allow_passive {
            return Err(aa.invalid(
                "the gateway is not active-active: it has one instance, so one tunnel and no second path when it \
                 fails over; the article's design needs both (az network vnet-gateway update --set activeActive=true \
                 with a second public IP), or pass --allow-passive to build one tunnel",
            ));
        }
        warnings.push(format!(
            "{}: {} = false: one tunnel only, nothing to balance over and no second path while Azure fails over",
            aa.file,
            aa.path()
        ));
    }
    let want = if active_active { 2 } else { 1 };
    if peerings.len() != want {
        return Err(list.invalid(format!(
            "{} entries for a{} gateway, which has {want} instance{}",
            peerings.len(),
            if active_active {
                "n active-active"
            } else {
                " passive"
            },
            if want == 1 { "" } else { "s" }
        )));
    }
    // The connection may name custom BGP addresses per IP configuration.
    let conn_custom = match conn {
        Some(c) => match c.properties().get("gatewayCustomBgpIpAddresses") {
            Some(l) => l.items()?,
            None => vec![],
        },
        None => vec![],
    };
    let mut out = Vec::new();
    for pa in &peerings {
        pa.only(&PEERING_FIELDS)?;
        let (remote, rn) = first_ipv4(
            pa,
            "tunnelIpAddresses",
            "the instance's public IP, the tunnel's remote",
        )?;
        if remote.is_link_local() || remote.is_private() || remote.is_unspecified() {
            return Err(
                rn.invalid("not a public address: the tunnel's remote is the instance's public IP")
            );
        }
        let config_id = pa.get("ipconfigurationId").map(|n| n.str()).transpose()?;
        let from_conn = match config_id {
            Some(id) => conn_custom
                .iter()
                .find(|e| {
                    e.get("ipConfigurationId")
                        .and_then(|i| i.value.as_str())
                        .is_some_and(|i| i.eq_ignore_ascii_case(id))
                })
                .map(|e| e.req("customBgpIpAddress", "the custom BGP address"))
                .transpose()?,
            None => None,
        };
        let (bgp_peer, bn) = if let Some(n) = from_conn {
            (n.ipv4()?, n)
        } else if opts.custom_bgp {
            first_ipv4(
                pa,
                "customBgpIpAddresses",
                "the instance's custom (APIPA) BGP address, asked for by --custom-bgp",
            )?
        } else {
            first_ipv4(pa, "defaultBgpIpAddresses", "the instance's BGP address")?
        };
        check_apipa(&bn, bgp_peer)?;
        out.push(Instance {
            remote,
            remote_from: rn.origin(),
            bgp_peer,
            bgp_from: bn.origin(),
        });
    }
    if out.len() == 2 && out[0].remote == out[1].remote {
        return Err(list.invalid("both instances have one public IP"));
    }
    Ok((asn, asn_node.origin(), out))
}

/// The connection's values.
struct Connection {
    policy: Option<(ImportedPolicy, String)>,
    dpd_timeout: Option<(u64, String)>,
    psk: Option<(Zeroizing<String>, String)>,
    initiator: Option<(bool, String)>,
}

fn connection(c: &Node<'_>, warnings: &mut Vec<String>) -> Result<Connection, AzureError> {
    let p = c.properties();
    if p.get("bgpSettings").is_some() && p.get("activeActive").is_some() {
        return Err(refused(
            c.file,
            "this is a gateway's JSON, not a connection's",
        ));
    }
    if let Some(t) = p.get("connectionType")
        && !t.str()?.eq_ignore_ascii_case("IPsec")
    {
        return Err(
            t.invalid("xesp builds site-to-site IPsec connections (connectionType \"IPsec\")")
        );
    }
    if let Some(t) = p.get("connectionProtocol")
        && !t.str()?.eq_ignore_ascii_case("IKEv2")
    {
        return Err(t.invalid("xesp speaks IKEv2 only (connectionProtocol \"IKEv2\")"));
    }
    if let Some(t) = p.get("usePolicyBasedTrafficSelectors")
        && t.bool()?
    {
        return Err(t.invalid(
            "xesp's tunnels are route-based (0.0.0.0/0 both ways); set usePolicyBasedTrafficSelectors to false",
        ));
    }
    if let Some(b) = p.get("enableBgp")
        && !b.bool()?
    {
        warnings.push(format!(
            "{}: {} = false: Azure will not peer over this connection; az network vpn-connection update --enable-bgp true",
            b.file,
            b.path()
        ));
    }
    let policy = match p.get("ipsecPolicies") {
        Some(l) => {
            let items = l.items()?;
            match items.as_slice() {
                [] => None,
                [one] => Some((import_policy(one)?, one.origin())),
                more => {
                    return Err(l.invalid(format!(
                        "{} policies; Azure takes one per connection",
                        more.len()
                    )));
                }
            }
        }
        None => None,
    };
    let dpd_timeout = match p.get("dpdTimeoutSeconds") {
        Some(d) => {
            let t = d.u64()?;
            if !(9..=3600).contains(&t) {
                return Err(d.invalid("Azure's DPD timeout lies between 9 and 3600 seconds"));
            }
            Some((t, d.origin()))
        }
        None => None,
    };
    let psk = match p.get("sharedKey") {
        Some(k) => {
            // Never shown: the error names the field only.
            let s = k.value.as_str().ok_or_else(|| AzureError::Invalid {
                file: k.file.into(),
                path: k.path().into(),
                value: "(not shown)".into(),
                reason: "expected a string".into(),
            })?;
            if s.is_empty() {
                return Err(AzureError::Invalid {
                    file: k.file.into(),
                    path: k.path().into(),
                    value: "\"\"".into(),
                    reason: "the shared key is empty".into(),
                });
            }
            Some((Zeroizing::new(s.to_string()), k.origin()))
        }
        None => None,
    };
    let initiator = match p.get("connectionMode") {
        Some(m) => match m.str()?.to_ascii_lowercase().as_str() {
            "default" | "responderonly" => None,
            // Azure starts every exchange: xesp waits.
            "initiatoronly" => Some((false, m.origin())),
            _ => {
                return Err(
                    m.invalid("not a connectionMode (Default, InitiatorOnly, ResponderOnly)")
                );
            }
        },
        None => None,
    };
    Ok(Connection {
        policy,
        dpd_timeout,
        psk,
        initiator,
    })
}

/// Builds the file from the inputs; `gw` and `conn` are the parsed JSON.
pub fn import(
    gw: &Node<'_>,
    conn: Option<&Node<'_>>,
    onprem: &OnPrem,
    opts: &Options,
) -> Result<Imported, AzureError> {
    let mut warnings = Vec::new();
    if let Some(why) = reserved_asn(onprem.asn) {
        return Err(refused(
            format!("--asn {}", onprem.asn),
            format!(
                "{why}: Azure refuses it for the on-premises side; choose another, e.g. 65010 as the article"
            ),
        ));
    }
    if apipa_outside_azure(onprem.loopback) {
        return Err(refused(
            format!("--loopback {}", onprem.loopback),
            "an APIPA address outside 169.254.21.0-169.254.22.255: Azure refuses it as the local network gateway's BGP address",
        ));
    }
    let (peer_asn, asn_from, instances) = gateway(gw, conn, opts, &mut warnings)?;
    if peer_asn == onprem.asn {
        return Err(refused(
            format!("--asn {}", onprem.asn),
            format!("the gateway's ASN ({asn_from}) too: eBGP needs two ASNs"),
        ));
    }
    if onprem.tunnel_addresses.len() != instances.len() {
        return Err(refused(
            "--tunnel-address",
            format!(
                "given {} times, but the gateway has {} instance(s): one tunnel address each (the article: 172.16.0.1, 172.16.0.2)",
                onprem.tunnel_addresses.len(),
                instances.len()
            ),
        ));
    }
    let mut sources = vec![gw.file.to_string()];
    sources.extend(conn.map(|c| c.file.to_string()));
    let conn = conn.map(|c| connection(c, &mut warnings)).transpose()?;

    let flag = |f: &str| format!("--{f}");
    let device = Section {
        header: "[device]",
        name: "device".into(),
        items: vec![
            item(
                "public_address",
                q(&onprem.public_address.to_string()),
                flag("public-address"),
            ),
            item(
                "dmz_interface",
                q(&onprem.dmz_interface),
                flag("dmz-interface"),
            ),
            item(
                "lan_interfaces",
                list(std::slice::from_ref(&onprem.lan_interface)),
                flag("lan-interface"),
            ),
            item(
                "datapath",
                q("xdp"),
                "xesp's default: XDP filter and AF_XDP workers",
            ),
            item(
                "mss_clamp",
                "1350".into(),
                "the article: ip tcp adjust-mss 1350",
            ),
        ],
    };
    let dmz = Section {
        header: "[dmz]",
        name: "dmz".into(),
        items: vec![item(
            "allow",
            "[]".into(),
            "none yet (the gateways are always allowed): fill with `xesp azure allowlist`",
        )],
    };
    let mut ike = vec![];
    match (
        conn.as_ref().and_then(|c| c.psk.as_ref()),
        opts.psk_file_exists,
    ) {
        (Some((_, from)), _) => ike.push(item(
            "psk_file",
            q(&opts.psk_file),
            format!("{from}, written there with mode 0600 (never into this file)"),
        )),
        (None, true) => ike.push(item("psk_file", q(&opts.psk_file), flag("psk-file"))),
        (None, false) => {
            return Err(refused(
                "pre-shared key",
                "none: give --connection with its sharedKey (az network vpn-connection shared-key show) \
                 or --psk-file naming an existing file that holds it",
            ));
        }
    }
    let (policy, defaults) = match conn.as_ref().and_then(|c| c.policy.as_ref()) {
        Some((p, from)) => (p.clone(), from.clone()),
        None => (
            ImportedPolicy {
                ike: "aes256-sha256-modp2048".into(),
                esp: "aes256gcm16".into(),
                child_lifetime_secs: 27_000,
                child_lifetime_kb: 102_400_000,
                legacy: false,
            },
            "Azure's default policy (no custom ipsecPolicies)".to_string(),
        ),
    };
    ike.push(item(
        "proposals",
        list(std::slice::from_ref(&policy.ike)),
        defaults.clone(),
    ));
    ike.push(item(
        "esp_proposals",
        list(std::slice::from_ref(&policy.esp)),
        defaults.clone(),
    ));
    if policy.legacy {
        ike.push(item(
            "allow_legacy",
            "true".into(),
            format!("{defaults}: DH group 2 or 3DES"),
        ));
        warnings.push(format!(
            "{defaults} uses legacy algorithms (DH group 2 or 3DES)"
        ));
    }
    ike.push(item(
        "lifetime",
        q(&secs(AZURE_IKE_LIFETIME_SECS)),
        "Azure's IKE_SA lifetime (28800 s, fixed)",
    ));
    ike.push(item(
        "child_lifetime",
        q(&format!("{}s", policy.child_lifetime_secs)),
        format!(
            "{defaults}: saLifeTimeSeconds {}",
            policy.child_lifetime_secs
        ),
    ));
    ike.push(item(
        "child_lifetime_kb",
        policy.child_lifetime_kb.to_string(),
        format!("{defaults}: saDataSizeKilobytes"),
    ));
    let (timeout, from) = match conn.as_ref().and_then(|c| c.dpd_timeout.clone()) {
        Some((t, from)) => (t, format!("{from} = {t}")),
        None => (
            AZURE_DPD_TIMEOUT_SECS,
            format!("Azure's default DPD timeout ({AZURE_DPD_TIMEOUT_SECS} s)"),
        ),
    };
    let (interval, retry, tries) = dpd_from_timeout(timeout);
    ike.push(item(
        "dpd",
        format!(
            "{{ interval = {}, retry = {}, tries = {tries}, on_demand = true }}",
            q(&secs(interval)),
            q(&secs(retry))
        ),
        format!("{from}: a silent peer is declared dead after {timeout} s"),
    ));
    match conn.as_ref().and_then(|c| c.initiator.clone()) {
        Some((i, from)) => ike.push(item(
            "initiator",
            i.to_string(),
            format!("{from}: Azure starts the exchanges"),
        )),
        None => ike.push(item(
            "initiator",
            "true".into(),
            "xesp starts the tunnels (Azure answers)",
        )),
    }
    let bgp = Section {
        header: "[bgp]",
        name: "bgp".into(),
        items: vec![
            item("asn", onprem.asn.to_string(), flag("asn")),
            item("peer_asn", peer_asn.to_string(), asn_from),
            item("source", q(&onprem.loopback.to_string()), flag("loopback")),
            item("networks", list(&onprem.networks), flag("network")),
            item("multihop", "5".into(), "the article: ebgp-multihop 5"),
        ],
    };
    let mut sections = vec![
        device,
        dmz,
        Section {
            header: "[ike]",
            name: "ike".into(),
            items: ike,
        },
        bgp,
    ];
    for (i, (inst, addr)) in instances.iter().zip(&onprem.tunnel_addresses).enumerate() {
        sections.push(Section {
            header: "[[tunnel]]",
            name: format!("tunnel[{i}]"),
            items: vec![
                item(
                    "name",
                    q(&format!("Tunnel{i}")),
                    format!("instance {i} of the gateway"),
                ),
                item(
                    "remote",
                    q(&inst.remote.to_string()),
                    inst.remote_from.clone(),
                ),
                item(
                    "address",
                    q(&addr.to_string()),
                    format!("--tunnel-address (#{})", i + 1),
                ),
                item(
                    "bgp_peer",
                    q(&inst.bgp_peer.to_string()),
                    inst.bgp_from.clone(),
                ),
            ],
        });
    }
    Ok(Imported {
        sections,
        psk: conn.and_then(|c| c.psk.map(|(k, _)| k)),
        warnings,
        sources,
    })
}
