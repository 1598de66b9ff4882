//! The `xesp azure ...` commands: arguments, files, output.

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use clap::{Args, ValueEnum};
use ipnet::Ipv4Net;

use super::{
    AzureError,
    export::{Names, arm_template, az_commands, azure_side},
    import::{Imported, OnPrem, Options, import},
    json::{Node, parse},
};
use crate::config::{Config, ConfigError};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Azure(#[from] AzureError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path} exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("the configuration written from Azure's values does not pass xesp check: {0}")]
    Check(ConfigError),
}

fn read(path: &Path) -> Result<String, CmdError> {
    fs::read_to_string(path).map_err(|source| CmdError::Io {
        path: path.into(),
        source,
    })
}

const IMPORT_EXAMPLE: &str = "\
Example (the article's device; gateway.json from `az network vnet-gateway show -g RG -n GW`,
connection.json from `az network vpn-connection show` with its sharedKey):
  xesp azure import --gateway gateway.json --connection connection.json \\
      --public-address 192.0.2.1 --loopback 172.16.0.3 --asn 65010 \\
      --tunnel-address 172.16.0.1 --tunnel-address 172.16.0.2 \\
      --network 10.0.0.0/24 --network 10.1.10.0/25 -o /etc/xesp/xesp.toml

It writes xesp.toml (and the sharedKey to xesp.psk beside it, mode 0600), then
lists every value and where it came from.";

/// `xesp azure import`.
#[derive(Debug, Args)]
#[command(after_help = IMPORT_EXAMPLE)]
pub struct ImportArgs {
    /// The VPN gateway's JSON (`az network vnet-gateway show`, the ARM GET or
    /// PowerShell's Get-AzVirtualNetworkGateway | ConvertTo-Json -Depth 10).
    #[arg(long, value_name = "FILE")]
    pub gateway: PathBuf,
    /// The connection's JSON: its ipsecPolicies, dpdTimeoutSeconds and sharedKey.
    #[arg(long, value_name = "FILE")]
    pub connection: Option<PathBuf>,
    /// This device's address on the Microsoft-peering side (the article's X.243.229.110).
    #[arg(long, value_name = "IPV4")]
    pub public_address: Ipv4Addr,
    /// Loopback0: the BGP source and router id (172.16.0.3).
    #[arg(long, value_name = "IPV4")]
    pub loopback: Ipv4Addr,
    /// One per gateway instance, in order: Tunnel0's, Tunnel1's (172.16.0.1, 172.16.0.2).
    #[arg(long = "tunnel-address", value_name = "IPV4", required = true)]
    pub tunnel_addresses: Vec<Ipv4Addr>,
    /// This device's ASN (65010; not one Azure reserves).
    #[arg(long, value_name = "ASN")]
    pub asn: u32,
    /// An on-prem network to advertise (repeat: 10.0.0.0/24, 10.1.10.0/25).
    #[arg(long = "network", value_name = "PREFIX", required = true)]
    pub networks: Vec<Ipv4Net>,
    #[arg(long, default_value = "dmz0")]
    pub dmz_interface: String,
    #[arg(long, default_value = "lan0")]
    pub lan_interface: String,
    /// Where the pre-shared key goes (the connection's sharedKey, mode 0600),
    /// or an existing file holding it. Default: xesp.psk beside --out.
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// Accept a gateway that is not active-active (one tunnel).
    #[arg(long)]
    pub allow_passive: bool,
    /// Peer with the instances' custom (APIPA) BGP addresses.
    #[arg(long)]
    pub custom_bgp: bool,
    /// The xesp.toml to write.
    #[arg(short, long, value_name = "FILE")]
    pub out: PathBuf,
    /// Overwrite --out and the psk file if they exist.
    #[arg(long)]
    pub force: bool,
}

/// How the TOML at `out` should name `psk` (relative to its directory when
/// beside it, absolute otherwise).
fn psk_name(out: &Path, psk: &Path) -> String {
    let dir = |p: &Path| {
        std::path::absolute(p.parent().unwrap_or(Path::new("")))
            .unwrap_or_else(|_| p.parent().unwrap_or(Path::new("")).to_path_buf())
    };
    if dir(out) == dir(psk)
        && let Some(f) = psk.file_name()
    {
        return f.to_string_lossy().into_owned();
    }
    std::path::absolute(psk)
        .unwrap_or_else(|_| psk.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Writes the key readable by its owner only, whatever the umask.
fn write_secret(path: &Path, key: &str, force: bool) -> Result<(), CmdError> {
    let io = |source| CmdError::Io {
        path: path.into(),
        source,
    };
    if path.exists() && !force {
        return Err(CmdError::Exists { path: path.into() });
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(key.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)
}

/// Runs `xesp azure import`; returns what to print.
pub fn run_import(a: &ImportArgs) -> Result<String, CmdError> {
    let gw_text = read(&a.gateway)?;
    let gw_name = a.gateway.display().to_string();
    let gw = parse(&gw_text, &gw_name)?;
    let conn_text = a.connection.as_deref().map(read).transpose()?;
    let conn_name = a.connection.as_ref().map(|c| c.display().to_string());
    let conn = match (&conn_text, &conn_name) {
        (Some(t), Some(n)) => Some(parse(t, n)?),
        _ => None,
    };
    let psk_path = a
        .psk_file
        .clone()
        .unwrap_or_else(|| a.out.parent().unwrap_or(Path::new("")).join("xesp.psk"));
    if a.out.exists() && !a.force {
        return Err(CmdError::Exists {
            path: a.out.clone(),
        });
    }
    let onprem = OnPrem {
        public_address: a.public_address,
        dmz_interface: a.dmz_interface.clone(),
        lan_interface: a.lan_interface.clone(),
        loopback: a.loopback,
        tunnel_addresses: a.tunnel_addresses.clone(),
        asn: a.asn,
        networks: a.networks.clone(),
    };
    let opts = Options {
        allow_passive: a.allow_passive,
        custom_bgp: a.custom_bgp,
        psk_file: psk_name(&a.out, &psk_path),
        psk_file_exists: a.psk_file.is_some() && psk_path.exists(),
    };
    let conn_node = conn
        .as_ref()
        .zip(conn_name.as_deref())
        .map(|(v, n)| Node::root(v, n));
    let imported: Imported = import(
        &Node::root(&gw, &gw_name),
        conn_node.as_ref(),
        &onprem,
        &opts,
    )?;
    let mut wrote_psk = false;
    if let Some(key) = &imported.psk {
        write_secret(&psk_path, key, a.force)?;
        wrote_psk = true;
    }
    let text = imported.toml();
    let checked = match Config::parse(&text, &a.out) {
        Ok(c) => c,
        Err(e) => {
            if wrote_psk {
                let _ = fs::remove_file(&psk_path);
            }
            return Err(CmdError::Check(e));
        }
    };
    fs::write(&a.out, &text).map_err(|source| CmdError::Io {
        path: a.out.clone(),
        source,
    })?;
    let mut s = format!(
        "wrote {} ({} tunnels){} from {}; values taken:\n",
        a.out.display(),
        checked.tunnels.len(),
        if wrote_psk {
            format!(" and {} (mode 0600, the sharedKey)", psk_path.display())
        } else {
            String::new()
        },
        imported.sources.join(" and ")
    );
    for l in imported.summary() {
        s.push_str(&format!("  {l}\n"));
    }
    for w in imported.warnings.iter().chain(&checked.warnings) {
        s.push_str(&format!("warning: {w}\n"));
    }
    s.push_str(&format!(
        "next: xesp check -c {0}; xesp bgp-config --bird -c {0}\n",
        a.out.display()
    ));
    Ok(s)
}

const EXPORT_EXAMPLE: &str = "\
Examples:
  xesp azure export -c /etc/xesp/xesp.toml > azure-side.sh     az CLI commands
  xesp azure export -c /etc/xesp/xesp.toml --format arm > azure-side.json
  az deployment group create -g RG --template-file azure-side.json \\
      --parameters virtualNetworkGatewayName=GW sharedKey=\"$(cat /etc/xesp/xesp.psk)\"";

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// `az` CLI commands.
    Az,
    /// An ARM template.
    Arm,
}

/// `xesp azure export`.
#[derive(Debug, Args)]
#[command(after_help = EXPORT_EXAMPLE)]
pub struct ExportArgs {
    #[arg(short, long, default_value = "/etc/xesp/xesp.toml")]
    pub config: PathBuf,
    #[arg(long, value_enum, default_value = "az")]
    pub format: ExportFormat,
    /// Resource group (az commands).
    #[arg(long, default_value = "$RG")]
    pub resource_group: String,
    /// The VPN gateway's name (az commands).
    #[arg(long, default_value = "$GATEWAY")]
    pub gateway: String,
    /// The local network gateway to create.
    #[arg(long, default_value = "xesp-onprem")]
    pub local_gateway_name: String,
    /// The connection to create.
    #[arg(long, default_value = "xesp-to-azure")]
    pub connection_name: String,
}

/// Runs `xesp azure export`: (stdout, warnings).
pub fn run_export(a: &ExportArgs) -> Result<(String, Vec<String>), CmdError> {
    let cfg = Config::load(&a.config)?;
    let side = azure_side(&cfg)?;
    let names = Names {
        resource_group: a.resource_group.clone(),
        gateway: a.gateway.clone(),
        local_gateway: a.local_gateway_name.clone(),
        connection: a.connection_name.clone(),
    };
    let out = match a.format {
        ExportFormat::Az => az_commands(&side, &names),
        ExportFormat::Arm => {
            let mut s =
                serde_json::to_string_pretty(&arm_template(&side, &names)).unwrap_or_default();
            s.push('\n');
            s
        }
    };
    Ok((out, side.warnings))
}

const ALLOWLIST_EXAMPLE: &str = "\
Examples:
  Get-AzBgpServiceCommunity | ConvertTo-Json -Depth 5 > communities.json   (PowerShell)
  xesp azure allowlist -c /etc/xesp/xesp.toml --communities communities.json --community 12076:51026
  xesp azure allowlist -c /etc/xesp/xesp.toml --service-tags ServiceTags_Public_20261130.json \\
      --tag AzureCloud.westus2 --write

Without --write it prints the difference only. The list becomes exactly the
prefixes named; the gateways' addresses are always allowed besides. A running
daemon takes the new list when restarted.";

/// `xesp azure allowlist`.
#[derive(Debug, Args)]
#[command(after_help = ALLOWLIST_EXAMPLE)]
pub struct AllowlistArgs {
    #[arg(short, long, default_value = "/etc/xesp/xesp.toml")]
    pub config: PathBuf,
    /// Get-AzBgpServiceCommunity's output as JSON (PowerShell or REST form).
    #[arg(long, value_name = "FILE", conflicts_with = "service_tags")]
    pub communities: Option<PathBuf>,
    /// A community to allow, by value (12076:51026) or name (AzureWestUS2); repeat.
    #[arg(long = "community", value_name = "COMMUNITY", requires = "communities")]
    pub community: Vec<String>,
    /// A Service Tags file (ServiceTags_Public_YYYYMMDD.json).
    #[arg(long, value_name = "FILE")]
    pub service_tags: Option<PathBuf>,
    /// A service tag to allow (AzureCloud.westus2); repeat.
    #[arg(long = "tag", value_name = "TAG", requires = "service_tags")]
    pub tag: Vec<String>,
    /// Update the configuration (comments and everything else kept).
    #[arg(long)]
    pub write: bool,
}

/// Replaces `path` with `text`, keeping its permissions (it may hold a key).
fn replace_file(path: &Path, text: &str) -> Result<(), CmdError> {
    let io = |source| CmdError::Io {
        path: path.into(),
        source,
    };
    let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o7777;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.xesp-{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| f.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Runs `xesp azure allowlist`; returns what to print.
pub fn run_allowlist(a: &AllowlistArgs) -> Result<String, CmdError> {
    use super::allowlist::{current, diff, from_communities, from_service_tags, set};
    let text = read(&a.config)?;
    // Checked first: its errors never show a line holding the key.
    Config::parse(&text, &a.config)?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|_| CmdError::Azure(super::refused(a.config.display().to_string(), "not TOML")))?;
    let mut warnings = vec![];
    let (file, new) = match (&a.communities, &a.service_tags) {
        (Some(f), None) => {
            if a.community.is_empty() {
                return Err(super::refused(
                    "--community",
                    "name one or more communities, e.g. 12076:51026",
                )
                .into());
            }
            let name = f.display().to_string();
            let v = parse(&read(f)?, &name)?;
            let new = from_communities(&Node::root(&v, &name), &a.community, &mut warnings)?;
            (name, new)
        }
        (None, Some(f)) => {
            if a.tag.is_empty() {
                return Err(super::refused(
                    "--tag",
                    "name one or more service tags, e.g. AzureCloud.westus2",
                )
                .into());
            }
            let name = f.display().to_string();
            let v = parse(&read(f)?, &name)?;
            (
                name.clone(),
                from_service_tags(&Node::root(&v, &name), &a.tag)?,
            )
        }
        _ => {
            return Err(super::refused(
                "input",
                "give --communities FILE with --community, or --service-tags FILE with --tag",
            )
            .into());
        }
    };
    let cur = current(&doc)?;
    let d = diff(&cur, &new);
    let mut s = format!(
        "{}: [dmz] allow has {} prefixes; {} name {}\n",
        a.config.display(),
        cur.len(),
        file,
        new.len()
    );
    s.push_str(&d.render());
    for w in &warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    if d.is_empty() {
        s.push_str("nothing to change\n");
    } else if a.write {
        let names = if a.communities.is_some() {
            &a.community
        } else {
            &a.tag
        };
        set(
            &mut doc,
            &new,
            &format!("from {file}: {} (xesp azure allowlist)", names.join(", ")),
        );
        let out = doc.to_string();
        Config::parse(&out, &a.config).map_err(CmdError::Check)?;
        replace_file(&a.config, &out)?;
        s.push_str(&format!(
            "wrote {}; restart xesp to apply the new list\n",
            a.config.display()
        ));
    } else {
        s.push_str("not written: run again with --write to update the file\n");
    }
    Ok(s)
}
