//! BIRD 2, one per namespace: eBGP over the tunnels, as the article's
//! `router bgp 65010` (on-prem) and the Azure gateway instances (AS 65000).

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use super::topology::{AZURE_ASN, GW_BGP, ONPREM_ASN, ONPREM_LOOPBACK, ONPREM_NETS, VNET};
use crate::netns::{Daemon, Netns, output, wait_until};

/// A BIRD's files: configuration, control socket, log.
#[derive(Debug, Clone)]
pub struct Bird {
    pub dir: PathBuf,
}

impl Bird {
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("bird.conf")
    }

    pub fn ctl(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("bird.log")
    }

    pub fn write_conf(&self, text: &str) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        fs::write(self.conf(), text)?;
        output(Command::new("bird").arg("-p").arg("-c").arg(self.conf()))?;
        Ok(())
    }

    /// Starts BIRD in `ns`.
    pub fn start(&self, ns: &Netns) -> Result<Daemon> {
        let _ = fs::remove_file(self.ctl());
        let stdout = fs::File::create(self.dir.join("bird.stdout"))?;
        let stderr = stdout.try_clone()?;
        let mut cmd = ns.cmd("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(self.conf())
            .arg("-s")
            .arg(self.ctl())
            .arg("-P")
            .arg(self.dir.join("bird.pid"))
            .stdout(stdout)
            .stderr(stderr);
        let mut d = Daemon::spawn(&format!("bird in {}", ns.name()), &mut cmd)?;
        if !wait_until(super::DAEMON_START, || {
            self.ctl().exists() || !d.is_running()
        }) || !self.ctl().exists()
        {
            bail!(
                "bird in {} did not start; see {}",
                ns.name(),
                self.dir.join("bird.stdout").display()
            );
        }
        Ok(d)
    }

    /// Runs `birdc` against this BIRD.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new("birdc")
                .arg("-s")
                .arg(self.ctl())
                .args(args)
                .stdin(Stdio::null()),
        )
    }

    /// Whether every on-prem network has been learned from the on-prem
    /// peer (an Established session exchanges its UPDATEs a moment later).
    pub fn learned_onprem_nets(&self) -> bool {
        self.birdc(&["show", "route", "protocol", "onprem"])
            .is_ok_and(|s| ONPREM_NETS.iter().all(|(net, _)| s.contains(net)))
    }

    /// BGP sessions in state Established.
    pub fn established(&self) -> usize {
        self.birdc(&["show", "protocols"])
            .map(|s| s.matches("Established").count())
            .unwrap_or(0)
    }
}

fn header(bird: &Bird, router_id: Ipv4Addr) -> String {
    format!(
        "log \"{}\" all;\nrouter id {router_id};\nprotocol device {{ scan time 2; }}\n",
        bird.log().display()
    )
}

/// A gateway instance: AS 65000 from its BGP address, advertising the VNet to
/// on-prem's Loopback0, which it reaches through its tunnel (`ipsec0`).
pub fn gateway_conf(bird: &Bird, me: Ipv4Addr) -> String {
    let mut s = header(bird, me);
    let _ = write!(
        s,
        r#"protocol static adv {{ ipv4; route {VNET} blackhole; }}
protocol static tun {{ ipv4; route {ONPREM_LOOPBACK}/32 via "ipsec0"; }}
protocol kernel {{
    ipv4 {{
        import none;
        export filter {{ if proto = "adv" then reject; krt_prefsrc = {me}; accept; }};
    }};
}}
protocol bgp onprem {{
    local {me} as {AZURE_ASN};
    neighbor {ONPREM_LOOPBACK} as {ONPREM_ASN};
    multihop 5;
    hold time 9;
    connect retry time 5;
    error wait time 1, 5;
    ipv4 {{
        import all;
        export where proto = "adv";
        next hop self;
    }};
}}
"#
    );
    s
}

/// On-prem with the strongSwan stand-in: AS 65010 from Loopback0, eBGP
/// multihop to both instances, advertising the on-prem networks, ECMP over
/// both (`maximum-paths 2`). The stand-in has one TUN (`dev`) for both
/// tunnels, so each peer is its own on-link next hop there. (With xesp on
/// on-prem, `xesp bgp-config --bird` writes this configuration instead.)
pub fn standin_conf(bird: &Bird, dev: &str) -> String {
    let mut s = header(bird, ONPREM_LOOPBACK);
    s.push_str("protocol static adv {\n    ipv4;\n");
    for (net, _) in ONPREM_NETS {
        let _ = writeln!(s, "    route {net} blackhole;");
    }
    s.push_str("}\nprotocol static tun {\n    ipv4;\n");
    for peer in GW_BGP {
        let _ = writeln!(s, "    route {peer}/32 via {peer}%{dev} onlink;");
    }
    let _ = write!(
        s,
        r#"}}
protocol kernel {{
    ipv4 {{
        import none;
        export filter {{ if proto = "adv" then reject; krt_prefsrc = {ONPREM_LOOPBACK}; accept; }};
    }};
    merge paths on;
}}
template bgp azgw {{
    local {ONPREM_LOOPBACK} as {ONPREM_ASN};
    multihop 5;
    hold time 9;
    connect retry time 5;
    error wait time 1, 5;
    ipv4 {{
        import all;
        export where proto = "adv";
        next hop self;
    }};
}}
protocol bgp az1 from azgw {{ neighbor {} as {AZURE_ASN}; }}
protocol bgp az2 from azgw {{ neighbor {} as {AZURE_ASN}; }}
"#,
        GW_BGP[0], GW_BGP[1]
    );
    s
}
