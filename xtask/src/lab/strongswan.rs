//! strongSwan 5.9.8, one charon per namespace, each with its own
//! configuration, vici socket and `/run` (its pid file path is fixed), driven
//! through `swanctl`. Its ESP runs either in user space (kernel-libipsec over
//! a TUN device, for kernels without ESP such as this machine's) or in the
//! kernel (kernel-netlink: XFRM SAs and policies bound to an xfrm interface
//! by `if_id`, as a route-based gateway does; needs a kernel with ESP, e.g.
//! the test VM's).

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::netns::{Daemon, Netns, output, wait_until};

pub const CHARON: &str = "/usr/lib/ipsec/charon";

/// Where a charon's ESP runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EspBackend {
    /// kernel-libipsec: user-space ESP over a TUN device `ipsec0` that
    /// charon creates; always UDP-encapsulated (it fakes NAT detection).
    #[default]
    Libipsec,
    /// kernel-netlink only: the kernel's ESP. The CHILD_SAs' SAs and
    /// policies carry an `if_id` (swanctl's `if_id_in`/`if_id_out`), so only
    /// traffic routed into the xfrm interface with that id is protected;
    /// charon installs no routes (`install_routes = no`), the routes through
    /// the interface are BIRD's. Plain ESP (IP protocol 50) unless a NAT is
    /// detected (RFC 7296 §2.23).
    Kernel,
}

impl EspBackend {
    /// The plugins charon loads. The first ESP backend in the list wins, so
    /// kernel-libipsec comes before kernel-netlink (which it still needs for
    /// addresses and routes); the kernel backend has kernel-netlink alone.
    pub fn plugins(self) -> &'static str {
        match self {
            Self::Libipsec => {
                "random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 x509 pubkey revocation \
                 constraints kernel-libipsec kernel-netlink socket-default updown vici"
            }
            Self::Kernel => {
                "random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 x509 pubkey revocation \
                 constraints kernel-netlink socket-default updown vici"
            }
        }
    }
}

/// A charon's files: configuration, sockets, logs.
#[derive(Debug, Clone)]
pub struct Charon {
    pub dir: PathBuf,
}

impl Charon {
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("strongswan.conf")
    }

    pub fn vici(&self) -> PathBuf {
        self.dir.join("charon.vici")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("charon.log")
    }

    /// Writes strongswan.conf for kernel-libipsec (see [`Self::write_conf_for`]).
    pub fn write_conf(&self, routing_table: u32, keylog: bool) -> Result<()> {
        self.write_conf_for(EspBackend::Libipsec, routing_table, keylog)
    }

    /// Writes strongswan.conf for ESP in `backend`. `routing_table` 0 puts
    /// libipsec's routes in the main table (the gateways: a 0.0.0.0/0
    /// selector must not hide the connected networks); the kernel backend
    /// installs no routes at all. `keylog` logs keys (for captures only).
    pub fn write_conf_for(
        &self,
        backend: EspBackend,
        routing_table: u32,
        keylog: bool,
    ) -> Result<()> {
        fs::create_dir_all(self.dir.join("swanctl"))?;
        fs::create_dir_all(self.dir.join("run"))?;
        fs::write(
            self.conf(),
            strongswan_conf(&self.dir, backend, routing_table, keylog),
        )?;
        Ok(())
    }

    pub fn write_swanctl(&self, text: &str) -> Result<()> {
        fs::write(self.dir.join("swanctl/swanctl.conf"), text)?;
        Ok(())
    }

    /// Starts charon in `ns` and loads swanctl.conf.
    pub fn start(&self, ns: &Netns) -> Result<Daemon> {
        let _ = fs::remove_file(self.vici());
        let stdout = fs::File::create(self.dir.join("charon.stdout"))?;
        let stderr = stdout.try_clone()?;
        let mut cmd = ns.cmd("sh");
        cmd.arg("-c")
            .arg(format!(
                "mount --bind {} /run && exec {CHARON}",
                self.dir.join("run").display()
            ))
            .env("STRONGSWAN_CONF", self.conf())
            .stdout(stdout)
            .stderr(stderr);
        let mut d = Daemon::spawn(&format!("charon in {}", ns.name()), &mut cmd)?;
        if !wait_until(super::DAEMON_START, || {
            self.vici().exists() || !d.is_running()
        }) || !self.vici().exists()
        {
            bail!(
                "charon in {} did not start; see {}",
                ns.name(),
                self.log().display()
            );
        }
        self.swanctl(&["--load-all", "--noprompt"])
            .with_context(|| format!("loading swanctl.conf in {}", ns.name()))?;
        Ok(d)
    }

    /// Runs `swanctl` against this charon.
    pub fn swanctl(&self, args: &[&str]) -> Result<String> {
        output(
            Command::new("swanctl")
                .args(args)
                .env("STRONGSWAN_CONF", self.conf())
                .env("SWANCTL_DIR", self.dir.join("swanctl"))
                .stdin(Stdio::null()),
        )
    }

    pub fn list_sas(&self) -> String {
        self.swanctl(&["--list-sas"])
            .unwrap_or_else(|e| format!("(swanctl --list-sas failed: {e:#})"))
    }

    /// CHILD_SAs in state INSTALLED.
    pub fn installed_children(&self) -> usize {
        self.swanctl(&["--list-sas"])
            .map(|s| s.matches("INSTALLED").count())
            .unwrap_or(0)
    }

    /// IKE_SAs in state ESTABLISHED.
    pub fn established_ike_sas(&self) -> usize {
        self.swanctl(&["--list-sas"])
            .map(|s| s.matches("ESTABLISHED").count())
            .unwrap_or(0)
    }
}

/// strongswan.conf of one charon whose files are in `dir`.
fn strongswan_conf(dir: &Path, backend: EspBackend, routing_table: u32, keylog: bool) -> String {
    let d = dir.display();
    let (ike, chd) = if keylog { (4, 4) } else { (2, 1) };
    let plugins = backend.plugins();
    let (comment, routes, plugin_conf) = match backend {
        EspBackend::Libipsec => (
            "kernel-libipsec must come before kernel-netlink: the first ESP backend wins.",
            format!("routing_table = {routing_table}"),
            "\n        kernel-libipsec {\n            allow_peer_ts = no\n        }",
        ),
        EspBackend::Kernel => (
            "kernel-netlink alone: ESP in the kernel (XFRM), bound to ipsec0 by if_id.",
            // Route-based: the routes through the xfrm interface are BIRD's.
            "install_routes = no".to_string(),
            "",
        ),
    };
    format!(
        r#"# strongswan.conf of one lab namespace (selected with STRONGSWAN_CONF)
charon {{
    # {comment}
    load = {plugins}
    install_virtual_ip = no
    {routes}
    retransmit_tries = 3
    syslog {{
        daemon {{
            default = -1
        }}
    }}
    filelog {{
        lab {{
            path = {d}/charon.log
            time_format = %H:%M:%S
            default = 1
            ike = {ike}
            chd = {chd}
            cfg = 1
            knl = 1
            esp = 1
            flush_line = yes
            append = yes
        }}
    }}
    plugins {{
        vici {{
            socket = unix://{d}/charon.vici
        }}{plugin_conf}
    }}
}}
swanctl {{
    socket = unix://{d}/charon.vici
}}
"#
    )
}

/// The IKE and ESP proposals a gateway accepts: Azure's defaults first, then
/// the article's Cisco-style ones and the elliptic-curve groups.
pub const GATEWAY_IKE_PROPOSALS: &str = "aes256-sha256-modp2048,aes256-sha1-modp1024,aes128-sha1-modp1024,\
aes256-sha1-modp2048,aes256-sha256-modp1024,aes256-sha256-ecp256,aes256-sha384-ecp384,aes128-sha256-ecp256,\
aes256gcm16-prfsha256-modp2048,aes256-sha256-curve25519";
pub const GATEWAY_ESP_PROPOSALS: &str = "aes256gcm16,aes128gcm16,aes256-sha1,aes128-sha1,aes256-sha256,aes256gcm16-ecp384,aes128gcm16-ecp256";

/// swanctl.conf of a gateway instance: the Azure side, a responder with
/// 0.0.0.0/0 selectors narrowed to what on-prem proposes. `child_lifetimes`
/// are the CHILD_SA's swanctl lifetime lines (`rekey_time = 27000s`, ...).
/// `children` replaces that one CHILD_SA by several with narrowed selectors,
/// `(local_ts, remote_ts)` each (what the gateway proposes when it initiates).
/// `if_id` binds every CHILD_SA's SAs and policies to the xfrm interface
/// with that id ([`EspBackend::Kernel`]; libipsec has no if_id).
#[allow(clippy::too_many_arguments)]
pub fn gateway_swanctl(
    me: Ipv4Addr,
    peer: Ipv4Addr,
    psk: &str,
    ike: &str,
    esp: &str,
    initiate: bool,
    child_lifetimes: &str,
    children: &[(String, String)],
    if_id: Option<u32>,
) -> String {
    let if_ids = if_id.map_or(String::new(), |id| {
        format!("if_id_in = {id}\n                if_id_out = {id}\n                ")
    });
    let start_action = if initiate { "start" } else { "none" };
    let any = [("0.0.0.0/0".to_string(), "0.0.0.0/0".to_string())];
    let children = if children.is_empty() {
        &any[..]
    } else {
        children
    };
    let mut child_confs = String::new();
    for (i, (local_ts, remote_ts)) in children.iter().enumerate() {
        let name = if i == 0 {
            "s2s".to_string()
        } else {
            format!("s2s-{i}")
        };
        let _ = write!(
            child_confs,
            r#"            {name} {{
                local_ts = {local_ts}
                remote_ts = {remote_ts}
                esp_proposals = {esp}
                {if_ids}{child_lifetimes}
                start_action = {start_action}
                dpd_action = clear
            }}
"#
        );
    }
    format!(
        r#"connections {{
    onprem {{
        version = 2
        local_addrs = {me}
        remote_addrs = {peer}
        proposals = {ike}
        mobike = no
        rekey_time = 28800s
        dpd_delay = 10s
        local {{
            auth = psk
            id = {me}
        }}
        remote {{
            auth = psk
            id = {peer}
        }}
        children {{
{child_confs}        }}
    }}
}}
secrets {{
    ike-onprem {{
        id-a = {me}
        id-b = {peer}
        secret = "{psk}"
    }}
}}
"#
    )
}

/// swanctl.conf of the strongSwan stand-in for the on-prem device: one
/// connection per gateway. libipsec is policy based, so each tunnel needs
/// selectors of its own: one CHILD_SA for the BGP session (Loopback0 to the
/// instance's BGP address) and one for the networks.
pub fn standin_swanctl(
    me: Ipv4Addr,
    gateways: &[(Ipv4Addr, Ipv4Addr)],
    psk: &str,
    ike: &str,
    esp: &str,
) -> String {
    let mut s = String::from("connections {\n");
    for (i, (public, bgp)) in gateways.iter().enumerate() {
        let name = format!("az{}", i + 1);
        let _ = write!(
            s,
            r#"    {name} {{
        version = 2
        local_addrs = {me}
        remote_addrs = {public}
        proposals = {ike}
        mobike = no
        rekey_time = 28800s
        dpd_delay = 10s
        local {{
            auth = psk
            id = {me}
        }}
        remote {{
            auth = psk
            id = {public}
        }}
        children {{
            {name} {{
                local_ts = {lo}/32
                remote_ts = {bgp}/32
                esp_proposals = {esp}
                start_action = start
                dpd_action = restart
                close_action = start
            }}
            {name}-net {{
                local_ts = 10.0.0.0/24,10.1.10.0/25
                remote_ts = 10.2.0.0/24
                esp_proposals = {esp}
                start_action = start
                dpd_action = restart
                close_action = start
            }}
        }}
    }}
"#,
            lo = super::topology::ONPREM_LOOPBACK,
        );
    }
    s.push_str("}\nsecrets {\n");
    for (i, (public, _)) in gateways.iter().enumerate() {
        let _ = write!(
            s,
            "    ike-az{} {{\n        id-a = {me}\n        id-b = {public}\n        secret = \"{psk}\"\n    }}\n",
            i + 1
        );
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_backend_loads_kernel_netlink_alone_and_installs_no_routes() {
        let dir = Path::new("/lab/azgw1");
        let k = strongswan_conf(dir, EspBackend::Kernel, 0, false);
        let load = k.lines().find(|l| l.trim().starts_with("load =")).unwrap();
        assert!(load.contains(" kernel-netlink "), "{load}");
        assert!(!load.contains("libipsec"), "{load}");
        assert!(k.contains("\n    install_routes = no\n"), "{k}");
        assert!(
            !k.contains("routing_table") && !k.contains("kernel-libipsec {"),
            "{k}"
        );
        assert!(k.contains("socket = unix:///lab/azgw1/charon.vici"), "{k}");

        // libipsec: as before, its plugin first.
        let l = strongswan_conf(dir, EspBackend::Libipsec, 220, false);
        let load = l.lines().find(|l| l.trim().starts_with("load =")).unwrap();
        let (lib, net) = (
            load.find("kernel-libipsec").unwrap(),
            load.find("kernel-netlink").unwrap(),
        );
        assert!(lib < net, "{load}");
        assert!(l.contains("\n    routing_table = 220\n"), "{l}");
        assert!(
            l.contains("allow_peer_ts = no") && !l.contains("install_routes"),
            "{l}"
        );
    }

    #[test]
    fn a_kernel_gateways_children_carry_the_interfaces_if_id() {
        let (me, peer) = (Ipv4Addr::new(203, 0, 113, 11), Ipv4Addr::new(192, 0, 2, 1));
        let children = [
            ("10.2.0.0/24".to_string(), "10.0.0.0/24".to_string()),
            ("10.2.0.0/24".to_string(), "10.1.10.0/25".to_string()),
        ];
        let s = gateway_swanctl(
            me,
            peer,
            "k",
            "aes256-sha256-modp2048",
            "aes256gcm16",
            false,
            "rekey_time = 27000s",
            &children,
            Some(11),
        );
        assert_eq!(s.matches("if_id_in = 11\n").count(), 2, "{s}");
        assert_eq!(s.matches("if_id_out = 11\n").count(), 2, "{s}");
        assert!(
            s.contains("if_id_out = 11\n                rekey_time = 27000s\n"),
            "{s}"
        );
        let none = gateway_swanctl(
            me,
            peer,
            "k",
            "a",
            "e",
            false,
            "rekey_time = 27000s",
            &[],
            None,
        );
        assert!(!none.contains("if_id"), "{none}");
        assert!(
            none.contains("esp_proposals = e\n                rekey_time = 27000s\n"),
            "{none}"
        );
    }
}
