//! xesp on the lab's on-prem device: its binary (built by cargo), its
//! configuration for the lab's addresses, the daemon and its status.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, Result, anyhow, bail};

use super::{
    bird::Bird,
    topology::{
        AZURE_ASN, AZURE_PUBLIC_PREFIX, GW_BGP, GW_PUBLIC, ONPREM_ASN, ONPREM_DMZ_IF,
        ONPREM_LAN_IF, ONPREM_LOOPBACK, ONPREM_NETS, ONPREM_PUBLIC, TUNNEL_ADDR,
    },
};
use crate::{
    netns::{Daemon, Netns, output, wait_until},
    setup::project_root,
};

/// Tunnel interface names, as the article's VTIs.
pub const TUNNEL_IFS: [&str; 2] = ["Tunnel0", "Tunnel1"];

/// What xesp is told beyond the lab's addresses.
#[derive(Debug, Clone)]
pub struct XespSettings {
    /// `tun` or `xdp` (see `xesp.example.toml`).
    pub datapath: String,
    /// Lines for the `[ike]` section (proposals, lifetimes, DPD, initiator).
    pub ike: String,
    /// Lines for each `[[tunnel]]` (per-tunnel overrides).
    pub tunnels: [String; 2],
}

impl Default for XespSettings {
    fn default() -> Self {
        Self {
            datapath: "xdp".into(),
            ike: ARTICLE_IKE.into(),
            tunnels: [String::new(), String::new()],
        }
    }
}

/// The article's settings: Azure's defaults first, then the Cisco proposal.
pub const ARTICLE_IKE: &str = r#"proposals = ["aes256-sha256-modp2048", "aes256-sha1-modp1024", "aes128-sha1-modp1024"]
esp_proposals = ["aes256gcm16", "aes256-sha1"]
allow_legacy = true
dpd = { interval = "10s", retry = "2s", on_demand = true }
"#;

/// Sets `key` in `table`, with a comment saying the lab chose it (not the
/// import's note of where the value came from).
fn set_by_lab(table: &mut toml_edit::Table, key: &str, v: toml_edit::Item) {
    table[key] = v;
    if let Some(mut k) = table.key_mut(key) {
        k.leaf_decor_mut().set_prefix("# the lab's setting\n");
    }
}

/// Table `name` of `doc`.
fn table<'a>(doc: &'a mut toml_edit::DocumentMut, name: &str) -> Result<&'a mut toml_edit::Table> {
    doc.get_mut(name)
        .and_then(toml_edit::Item::as_table_mut)
        .ok_or_else(|| anyhow!("the imported xesp.toml has no [{name}]"))
}

/// Where xesp serves Prometheus metrics, inside the on-prem namespace.
pub const METRICS: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9962,
));

/// The lab's settings over an imported xesp.toml (`text`): the datapath,
/// the sockets, the DMZ allowlist, short BGP timers, then each line of the
/// test's `[ike]` and `[[tunnel]]` settings replacing the imported value.
fn lab_settings(text: &str, s: &XespSettings, socket: &Path, bird_ctl: &Path) -> Result<String> {
    use toml_edit::{DocumentMut, Item, value};
    let mut doc: DocumentMut = text.parse().context("the imported xesp.toml")?;
    let device = table(&mut doc, "device")?;
    set_by_lab(device, "datapath", value(s.datapath.as_str()));
    set_by_lab(
        device,
        "control_socket",
        value(socket.display().to_string()),
    );
    set_by_lab(device, "bird_socket", value(bird_ctl.display().to_string()));
    // On the on-prem namespace's own loopback: `Xesp::scrape` reads it.
    set_by_lab(device, "metrics_listen", value(METRICS.to_string()));
    let mut allow = toml_edit::Array::new();
    allow.push(AZURE_PUBLIC_PREFIX);
    set_by_lab(table(&mut doc, "dmz")?, "allow", value(allow));
    // Short timers, so that tests see sessions fail and return quickly.
    let bgp = table(&mut doc, "bgp")?;
    for (k, v) in [
        ("hold_time", "9s"),
        ("keepalive", "3s"),
        ("connect_retry", "5s"),
    ] {
        set_by_lab(bgp, k, value(v));
    }
    let fragment = |text: &str| -> Result<DocumentMut> {
        text.parse()
            .with_context(|| format!("the lab's settings {text:?}"))
    };
    let ike = fragment(&s.ike)?;
    let t = table(&mut doc, "ike")?;
    for (k, v) in ike.iter() {
        set_by_lab(t, k, v.clone());
    }
    let Some(tunnels) = doc.get_mut("tunnel").and_then(Item::as_array_of_tables_mut) else {
        bail!("the imported xesp.toml has no [[tunnel]]");
    };
    for (t, text) in tunnels.iter_mut().zip(&s.tunnels) {
        for (k, v) in fragment(text)?.iter() {
            set_by_lab(t, k, v.clone());
        }
    }
    Ok(doc.to_string())
}

/// The xesp binary, built once per process (`XESP_BIN` overrides). In the
/// test VM (`XESP_VM` set) nothing is built, the project being read-only
/// there: it is `XESP_BIN`, or the host's `target/debug/xesp`.
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("XESP_BIN") {
            return Ok(PathBuf::from(p));
        }
        let root = project_root();
        if std::env::var_os("XESP_VM").is_some() {
            let built = root.join("target/debug/xesp");
            return if built.is_file() {
                Ok(built)
            } else {
                Err(format!(
                    "in the VM, xesp cannot be built: set XESP_BIN or build {} on the host first",
                    built.display()
                ))
            };
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        output(Command::new(cargo).current_dir(&root).args([
            "build",
            "--quiet",
            "--locked",
            "-p",
            "ike-control",
            "--bin",
            "xesp",
        ]))
        .map_err(|e| format!("building xesp: {e:#}"))?;
        Ok(root.join("target/debug/xesp"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// xesp's files in the lab directory.
#[derive(Debug, Clone)]
pub struct Xesp {
    pub dir: PathBuf,
}

impl Xesp {
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    pub fn conf(&self) -> PathBuf {
        self.dir.join("xesp.toml")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("xesp.sock")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("xesp.log")
    }

    /// The lab's Azure side as Azure prints it: the active-active gateway
    /// (`az network vnet-gateway show`) and the connection with its shared key.
    fn azure_json(psk: &str) -> (serde_json::Value, serde_json::Value) {
        let sub = "/subscriptions/0/resourceGroups/lab/providers/Microsoft.Network";
        let peerings: Vec<_> = (0..2)
            .map(|i| {
                serde_json::json!({
                    "ipconfigurationId": format!("{sub}/virtualNetworkGateways/azgw/ipConfigurations/ip{i}"),
                    "defaultBgpIpAddresses": [GW_BGP[i].to_string()],
                    "customBgpIpAddresses": [],
                    "tunnelIpAddresses": [GW_PUBLIC[i].to_string()],
                })
            })
            .collect();
        let gateway = serde_json::json!({
            "name": "azgw",
            "type": "Microsoft.Network/virtualNetworkGateways",
            "gatewayType": "Vpn",
            "vpnType": "RouteBased",
            "enableBgp": true,
            "activeActive": true,
            "bgpSettings": { "asn": AZURE_ASN, "peerWeight": 0, "bgpPeeringAddresses": peerings },
        });
        let connection = serde_json::json!({
            "name": "onprem",
            "type": "Microsoft.Network/connections",
            "connectionType": "IPsec",
            "connectionProtocol": "IKEv2",
            "enableBgp": true,
            "usePolicyBasedTrafficSelectors": false,
            "sharedKey": psk,
        });
        (gateway, connection)
    }

    /// xesp.toml for the lab, built as a user would: `xesp azure import`
    /// from the lab's gateway and connection JSON and the on-prem addresses,
    /// then the lab's own settings (datapath, sockets, short BGP timers, the
    /// test's [ike] and [[tunnel]] lines) over it. Checked by `xesp check`.
    pub fn write_conf(&self, psk: &str, s: &XespSettings, bird_ctl: &Path) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        let (gateway, connection) = Self::azure_json(psk);
        let (gw_file, conn_file) = (
            self.dir.join("azure-gateway.json"),
            self.dir.join("azure-connection.json"),
        );
        fs::write(&gw_file, serde_json::to_string_pretty(&gateway)?)?;
        fs::write(&conn_file, serde_json::to_string_pretty(&connection)?)?;
        // It holds the key.
        fs::set_permissions(&conn_file, fs::Permissions::from_mode(0o600))?;
        let mut cmd = Command::new(binary()?);
        cmd.args(["azure", "import", "--gateway"])
            .arg(&gw_file)
            .arg("--connection")
            .arg(&conn_file)
            .args(["--public-address", &ONPREM_PUBLIC.to_string()])
            .args(["--loopback", &ONPREM_LOOPBACK.to_string()])
            .args(["--asn", &ONPREM_ASN.to_string()])
            .args([
                "--dmz-interface",
                ONPREM_DMZ_IF,
                "--lan-interface",
                ONPREM_LAN_IF,
            ]);
        for a in TUNNEL_ADDR {
            cmd.args(["--tunnel-address", &a.to_string()]);
        }
        for (n, _) in ONPREM_NETS {
            cmd.args(["--network", n]);
        }
        cmd.arg("-o").arg(self.conf()).arg("--force");
        output(&mut cmd).context("xesp azure import refused the lab's Azure side")?;
        let text = fs::read_to_string(self.conf())?;
        let text = lab_settings(&text, s, &self.socket(), bird_ctl)?;
        fs::write(self.conf(), text)?;
        output(
            Command::new(binary()?)
                .arg("check")
                .arg("-c")
                .arg(self.conf()),
        )
        .context("xesp check refused the lab's configuration")?;
        Ok(())
    }

    /// BIRD's configuration, as `xesp bgp-config --bird` writes it from
    /// this xesp's configuration (the article's router bgp 65010).
    pub fn bird_conf(&self, bird: &Bird) -> Result<String> {
        output(
            Command::new(binary()?)
                .arg("bgp-config")
                .arg("--bird")
                .arg("-c")
                .arg(self.conf())
                .arg("--log")
                .arg(bird.log()),
        )
        .context("xesp bgp-config --bird")
    }

    /// Starts `xesp run` in `ns`; waits for its control socket.
    pub fn start(&self, ns: &Netns, env: &[(String, String)]) -> Result<Daemon> {
        let _ = fs::remove_file(self.socket());
        let log = fs::File::create(self.log())?;
        let mut cmd = ns.cmd(binary()?);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.arg("run")
            .arg("-c")
            .arg(self.conf())
            .env("RUST_LOG", "debug")
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut d = Daemon::spawn(&format!("xesp in {}", ns.name()), &mut cmd)?;
        if !wait_until(super::DAEMON_START, || {
            self.socket().exists() || !d.is_running()
        }) || !self.socket().exists()
        {
            bail!(
                "xesp in {} did not start; see {}:\n{}",
                ns.name(),
                self.log().display(),
                fs::read_to_string(self.log()).unwrap_or_default()
            );
        }
        Ok(d)
    }

    /// `xesp status --json`.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = output(
            Command::new(binary()?)
                .args(["status", "--json", "-s"])
                .arg(self.socket()),
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `xesp status`, or why it failed.
    pub fn status_text(&self) -> String {
        binary()
            .and_then(|b| output(Command::new(b).args(["status", "-s"]).arg(self.socket())))
            .unwrap_or_else(|e| format!("(xesp status failed: {e:#})"))
    }

    /// `xesp ARGS -s SOCKET` (a control command): its exit status, and
    /// what it printed on standard output then standard error.
    pub fn ctl(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new(binary()?)
            .args(args)
            .arg("-s")
            .arg(self.socket())
            .output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    }

    /// Changes the running daemon's xesp.toml (for `xesp reload`).
    pub fn edit_conf(&self, f: impl FnOnce(&mut toml_edit::DocumentMut)) -> Result<()> {
        let text = std::fs::read_to_string(self.conf())?;
        let mut doc: toml_edit::DocumentMut = text.parse().context("the lab's xesp.toml")?;
        f(&mut doc);
        std::fs::write(self.conf(), doc.to_string())?;
        Ok(())
    }

    /// Tunnels whose outbound traffic has an SA.
    pub fn tunnels_up(&self) -> usize {
        self.status_json()
            .ok()
            .and_then(|v| {
                v["tunnels"]
                    .as_array()
                    .map(|t| t.iter().filter(|t| t["up"] == true).count())
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `xesp azure import` writes (its golden file).
    const IMPORTED: &str = include_str!("../../../ike-control/tests/data/azure/golden/import.toml");

    #[test]
    fn the_labs_settings_replace_the_imported_ones_and_say_so() {
        let s = XespSettings {
            datapath: "tun".into(),
            ike: "lifetime = \"40s\"\nallow_legacy = true\n".into(),
            tunnels: [
                "proposals = [\"aes256-sha1-modp1024\"]".into(),
                String::new(),
            ],
        };
        let out = lab_settings(
            IMPORTED,
            &s,
            Path::new("/x/xesp.sock"),
            Path::new("/x/bird.ctl"),
        )
        .unwrap();
        let doc: toml_edit::DocumentMut = out.parse().unwrap();
        assert_eq!(doc["device"]["datapath"].as_str(), Some("tun"));
        assert_eq!(doc["device"]["bird_socket"].as_str(), Some("/x/bird.ctl"));
        assert_eq!(doc["ike"]["lifetime"].as_str(), Some("40s"));
        assert_eq!(doc["ike"]["allow_legacy"].as_bool(), Some(true));
        assert_eq!(doc["bgp"]["hold_time"].as_str(), Some("9s"));
        let t = doc["tunnel"].as_array_of_tables().unwrap();
        assert_eq!(
            t.get(0).unwrap()["proposals"].to_string().trim(),
            "[\"aes256-sha1-modp1024\"]"
        );
        // Tunnel1 keeps the imported proposal; the imported values stay.
        assert!(t.get(1).unwrap().get("proposals").is_none());
        assert_eq!(doc["tunnel"][1]["remote"].as_str(), Some("52.175.250.191"));
        // The replaced value's comment is the lab's, not the import's.
        assert!(
            out.contains("# the lab's setting\nlifetime = \"40s\""),
            "{out}"
        );
        assert!(
            !out.contains("28800 s, fixed)\nlifetime = \"40s\""),
            "{out}"
        );
        // A fragment that is not TOML is an error, not a panic.
        let bad = XespSettings {
            ike: "lifetime = ".into(),
            ..XespSettings::default()
        };
        assert!(lab_settings(IMPORTED, &bad, Path::new("s"), Path::new("b")).is_err());
    }
}
