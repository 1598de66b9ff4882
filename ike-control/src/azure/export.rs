//! `xesp azure export`: the Azure side matching this device, the article's
//! PowerShell section generated: the local network gateway (this device as
//! Azure sees it) and the connection with xesp's first proposals as its
//! IPsec policy, as `az` commands or an ARM template.

use serde_json::{Value, json};

use super::{
    AzureError, apipa_outside_azure,
    policy::{
        AzurePolicy, SA_DATA_SIZE_KB, SA_LIFETIME_SECONDS, esp_string, export_esp, export_ike,
        ike_string,
    },
    refused, timeout_from_dpd,
};
use crate::config::Config;

/// Names of the Azure resources (shell variables by default).
#[derive(Debug, Clone)]
pub struct Names {
    pub resource_group: String,
    /// The active-active VPN gateway the connection attaches to.
    pub gateway: String,
    pub local_gateway: String,
    pub connection: String,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            resource_group: "$RG".into(),
            gateway: "$GATEWAY".into(),
            local_gateway: "xesp-onprem".into(),
            connection: "xesp-to-azure".into(),
        }
    }
}

/// The Azure side, ready to print.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureSide {
    pub gateway_ip: String,
    pub address_prefixes: Vec<String>,
    pub asn: u32,
    pub bgp_peering_address: String,
    pub policy: AzurePolicy,
    pub dpd_timeout_seconds: u64,
    pub warnings: Vec<String>,
}

/// Works out the Azure side of `cfg`; a proposal or lifetime Azure cannot
/// express is an error naming its field.
pub fn azure_side(cfg: &Config) -> Result<AzureSide, AzureError> {
    let Some(bgp) = &cfg.bgp else {
        return Err(refused(
            "[bgp]",
            "missing: the local network gateway needs this device's ASN, Loopback0 and networks",
        ));
    };
    if apipa_outside_azure(bgp.source) {
        return Err(refused(
            format!("bgp.source = {}", bgp.source),
            "an APIPA address outside 169.254.21.0-169.254.22.255: Azure refuses it as bgpPeeringAddress",
        ));
    }
    let mut warnings = vec![];
    let mut policy: Option<(AzurePolicy, String)> = None;
    for (i, t) in cfg.tunnels.iter().enumerate() {
        let p = &t.peer;
        let ike_field = format!("tunnel[{i}].proposals[0]");
        let esp_field = format!("tunnel[{i}].esp_proposals[0]");
        let ike = p
            .ike_proposals
            .first()
            .ok_or_else(|| refused(&ike_field, "no proposal"))?;
        let esp = p
            .esp_proposals
            .first()
            .ok_or_else(|| refused(&esp_field, "no proposal"))?;
        let (ike_encryption, ike_integrity, dh_group) =
            export_ike(ike, &ike_field, &ike_string(ike))?;
        let (ipsec_encryption, ipsec_integrity, pfs_group) =
            export_esp(esp, &esp_field, &esp_string(esp))?;
        let life = p.lifetimes.child.as_secs();
        if !(SA_LIFETIME_SECONDS.0..=SA_LIFETIME_SECONDS.1).contains(&life) {
            return Err(AzureError::Inexpressible {
                field: format!("tunnel[{i}].child_lifetime"),
                proposal: format!("{life}s"),
                reason: format!(
                    "saLifeTimeSeconds lies between {} and {}",
                    SA_LIFETIME_SECONDS.0, SA_LIFETIME_SECONDS.1
                ),
            });
        }
        let kb = p
            .lifetimes
            .child_bytes
            .map_or(SA_DATA_SIZE_KB.1, |b| b / 1024);
        if !(SA_DATA_SIZE_KB.0..=SA_DATA_SIZE_KB.1).contains(&kb) {
            return Err(AzureError::Inexpressible {
                field: format!("tunnel[{i}].child_lifetime_kb"),
                proposal: kb.to_string(),
                reason: format!(
                    "saDataSizeKilobytes lies between {} and {}",
                    SA_DATA_SIZE_KB.0, SA_DATA_SIZE_KB.1
                ),
            });
        }
        if p.lifetimes.ike.as_secs() != super::AZURE_IKE_LIFETIME_SECS {
            warnings.push(format!(
                "tunnel[{i}].lifetime = {}s: Azure's IKE_SA lifetime is 28800 s and cannot be changed; the shorter one rekeys",
                p.lifetimes.ike.as_secs()
            ));
        }
        let this = AzurePolicy {
            sa_life_time_seconds: life,
            sa_data_size_kilobytes: kb,
            ipsec_encryption,
            ipsec_integrity,
            ike_encryption,
            ike_integrity,
            dh_group,
            pfs_group,
        };
        match &policy {
            None => policy = Some((this, t.name.clone())),
            Some((first, name)) if *first != this => {
                return Err(AzureError::Inexpressible {
                    field: format!("tunnel[{i}]"),
                    proposal: format!("{this:?}"),
                    reason: format!(
                        "one connection carries both tunnels with one policy, and {name}'s first proposals or lifetimes differ"
                    ),
                });
            }
            Some(_) => {}
        }
    }
    let (policy, _) = policy.ok_or_else(|| refused("tunnel", "no tunnel"))?;
    let d = cfg.tunnels[0].peer.dpd;
    let mut dpd = timeout_from_dpd(d.interval.as_secs(), d.retry.as_secs(), d.tries);
    if !(9..=3600).contains(&dpd) {
        warnings.push(format!(
            "tunnel[0].dpd: declares a peer dead after {dpd} s; Azure's dpdTimeoutSeconds lies between 9 and 3600, so {} is written",
            dpd.clamp(9, 3600)
        ));
        dpd = dpd.clamp(9, 3600);
    }
    Ok(AzureSide {
        gateway_ip: cfg.device.public_address.to_string(),
        address_prefixes: bgp.networks.iter().map(|n| n.to_string()).collect(),
        asn: bgp.asn,
        bgp_peering_address: bgp.source.to_string(),
        policy,
        dpd_timeout_seconds: dpd,
        warnings,
    })
}

/// The connection's `properties`, as ARM takes (and returns) them, with
/// `shared_key` (an ARM expression or, for tests, the key) and the gateways' ids.
pub fn connection_properties(
    side: &AzureSide,
    shared_key: &str,
    gateway_id: &str,
    local_gateway_id: &str,
) -> Value {
    json!({
        "connectionType": "IPsec",
        "connectionProtocol": "IKEv2",
        "enableBgp": true,
        "usePolicyBasedTrafficSelectors": false,
        "dpdTimeoutSeconds": side.dpd_timeout_seconds,
        "sharedKey": shared_key,
        "virtualNetworkGateway1": { "id": gateway_id },
        "localNetworkGateway2": { "id": local_gateway_id },
        "ipsecPolicies": [side.policy],
    })
}

/// The local network gateway's `properties`.
pub fn local_gateway_properties(side: &AzureSide) -> Value {
    json!({
        "gatewayIpAddress": side.gateway_ip,
        "localNetworkAddressSpace": { "addressPrefixes": side.address_prefixes },
        "bgpSettings": { "asn": side.asn, "bgpPeeringAddress": side.bgp_peering_address },
    })
}

const API_VERSION: &str = "2023-09-01";

/// An ARM template creating the local network gateway and the connection.
pub fn arm_template(side: &AzureSide, names: &Names) -> Value {
    let lng_id = format!(
        "[resourceId('Microsoft.Network/localNetworkGateways', '{}')]",
        names.local_gateway
    );
    json!({
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "parameters": {
            "location": { "type": "string", "defaultValue": "[resourceGroup().location]" },
            "virtualNetworkGatewayName": {
                "type": "string",
                "metadata": { "description": "The active-active VPN gateway (route-based, BGP on)." }
            },
            "sharedKey": {
                "type": "securestring",
                "metadata": { "description": "The pre-shared key in xesp's psk_file." }
            }
        },
        "resources": [
            {
                "type": "Microsoft.Network/localNetworkGateways",
                "apiVersion": API_VERSION,
                "name": names.local_gateway,
                "location": "[parameters('location')]",
                "properties": local_gateway_properties(side),
            },
            {
                "type": "Microsoft.Network/connections",
                "apiVersion": API_VERSION,
                "name": names.connection,
                "location": "[parameters('location')]",
                "dependsOn": [lng_id],
                "properties": connection_properties(
                    side,
                    "[parameters('sharedKey')]",
                    "[resourceId('Microsoft.Network/virtualNetworkGateways', parameters('virtualNetworkGatewayName'))]",
                    &lng_id,
                ),
            }
        ]
    })
}

/// A shell word: bare if safe, else single-quoted; `$VAR` stays expandable.
fn sh(s: &str) -> String {
    if s.starts_with('$')
        && s[1..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        format!("\"{s}\"")
    } else if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The same as `az` commands (the article's PowerShell section, in the CLI).
pub fn az_commands(side: &AzureSide, names: &Names) -> String {
    let p = &side.policy;
    let rg = sh(&names.resource_group);
    format!(
        "# The Azure side of this xesp device (xesp azure export).\n\
         # Set RG (resource group), GATEWAY (the active-active VPN gateway) and\n\
         # XESP_PSK (the pre-shared key in xesp's psk_file) first, e.g.\n\
         #   XESP_PSK=$(cat /etc/xesp/xesp.psk)\n\
         az network local-gateway create --resource-group {rg} --name {lng} \\\n\
         \x20   --gateway-ip-address {ip} \\\n\
         \x20   --local-address-prefixes {prefixes} \\\n\
         \x20   --asn {asn} --bgp-peering-address {peer}\n\
         az network vpn-connection create --resource-group {rg} --name {conn} \\\n\
         \x20   --vnet-gateway1 {gw} --local-gateway2 {lng} \\\n\
         \x20   --shared-key \"$XESP_PSK\" --enable-bgp\n\
         az network vpn-connection ipsec-policy add --resource-group {rg} --connection-name {conn} \\\n\
         \x20   --ike-encryption {ie} --ike-integrity {ii} --dh-group {dh} \\\n\
         \x20   --ipsec-encryption {pe} --ipsec-integrity {pi} --pfs-group {pfs} \\\n\
         \x20   --sa-lifetime {life} --sa-max-size {kb}\n\
         az network vpn-connection update --resource-group {rg} --name {conn} \\\n\
         \x20   --set dpdTimeoutSeconds={dpd}\n",
        lng = sh(&names.local_gateway),
        conn = sh(&names.connection),
        gw = sh(&names.gateway),
        ip = side.gateway_ip,
        prefixes = side.address_prefixes.join(" "),
        asn = side.asn,
        peer = side.bgp_peering_address,
        ie = p.ike_encryption,
        ii = p.ike_integrity,
        dh = p.dh_group,
        pe = p.ipsec_encryption,
        pi = p.ipsec_integrity,
        pfs = p.pfs_group,
        life = p.sa_life_time_seconds,
        kb = p.sa_data_size_kilobytes,
        dpd = side.dpd_timeout_seconds,
    )
}
