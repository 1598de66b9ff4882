//! xesp on the lab's on-prem device: its binary (built by cargo), its
//! configuration for the lab's addresses, the daemon and its status.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
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

/// The xesp binary, built once per process (`XESP_BIN` overrides).
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("XESP_BIN") {
            return Ok(PathBuf::from(p));
        }
        let root = project_root();
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

    /// xesp.toml for the lab: the on-prem addresses, both gateways.
    pub fn config(&self, psk: &str, s: &XespSettings, bird_ctl: &Path) -> String {
        let mut t = format!(
            r#"[device]
public_address = "{ONPREM_PUBLIC}"
dmz_interface = "{ONPREM_DMZ_IF}"
lan_interfaces = ["{ONPREM_LAN_IF}"]
datapath = "{}"
control_socket = "{}"
bird_socket = "{}"
mss_clamp = 1350

[dmz]
allow = ["{AZURE_PUBLIC_PREFIX}"]

[bgp]
asn = {ONPREM_ASN}
peer_asn = {AZURE_ASN}
source = "{ONPREM_LOOPBACK}"
networks = [{}]
multihop = 5
# Short timers, so that tests see sessions fail and return quickly.
hold_time = "9s"
keepalive = "3s"
connect_retry = "5s"

[ike]
psk = "{psk}"
{}
"#,
            s.datapath,
            self.socket().display(),
            bird_ctl.display(),
            ONPREM_NETS
                .iter()
                .map(|(n, _)| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", "),
            s.ike
        );
        for i in 0..2 {
            t.push_str(&format!(
                "[[tunnel]]\nname = \"{}\"\nremote = \"{}\"\naddress = \"{}\"\nbgp_peer = \"{}\"\n{}\n",
                TUNNEL_IFS[i], GW_PUBLIC[i], TUNNEL_ADDR[i], GW_BGP[i], s.tunnels[i]
            ));
        }
        t
    }

    pub fn write_conf(&self, text: &str) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
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
    pub fn start(&self, ns: &Netns) -> Result<Daemon> {
        let _ = fs::remove_file(self.socket());
        let log = fs::File::create(self.log())?;
        let mut cmd = ns.cmd(binary()?);
        cmd.arg("run")
            .arg("-c")
            .arg(self.conf())
            .env("RUST_LOG", "debug")
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut d = Daemon::spawn(&format!("xesp in {}", ns.name()), &mut cmd)?;
        if !wait_until(Duration::from_secs(10), || {
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
