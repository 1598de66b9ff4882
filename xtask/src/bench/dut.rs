//! The benchmark's namespaces and the devices under test in the middle.
//!
//! ```text
//!  lan (10.0.0.10)  ──lanh0 · lan0──  dut  ──dmz0 · az0──  az (IKE peer 203.0.113.11, .12)
//!  plaintext in/out                  192.0.2.1             ESP in UDP 4500 in/out
//! ```
//!
//! Both veth pairs have two queues; XPS maps CPU n to transmit queue n on
//! the generating side, so tunnel n's traffic (sent from a thread on CPU n)
//! arrives on the device's receive queue n.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use super::Suite;
use crate::{
    lab::strongswan::Charon,
    netns::{Daemon, Netns, output, veth_queues, wait_until},
};

/// Receive and transmit queues of each veth pair.
const QUEUES: u32 = 2;

pub const LAN_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
pub const DUT_PUBLIC: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PEERS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(203, 0, 113, 11),
    Ipv4Addr::new(203, 0, 113, 12),
];

/// The three namespaces, removed when dropped.
pub struct Topology {
    pub lan: Netns,
    pub dut: Netns,
    pub az: Netns,
}

fn mac(ns: &Netns, iface: &str) -> Result<String> {
    Ok(ns
        .exec("cat", &[&format!("/sys/class/net/{iface}/address")])?
        .trim()
        .to_string())
}

/// CPU n transmits on queue n of `iface` in `ns`.
fn xps(ns: &Netns, iface: &str) -> Result<()> {
    for q in 0..2 {
        ns.exec(
            "sh",
            &[
                "-c",
                &format!(
                    "echo {:x} > /sys/class/net/{iface}/queues/tx-{q}/xps_cpus",
                    1 << q
                ),
            ],
        )
        .with_context(|| format!("XPS on {iface}"))?;
    }
    Ok(())
}

impl Topology {
    pub fn build() -> Result<Self> {
        let t = Self {
            lan: Netns::create("bench-lan")?,
            dut: Netns::create("bench-dut")?,
            az: Netns::create("bench-az")?,
        };
        veth_queues(&t.lan, "lanh0", &t.dut, "lan0", QUEUES)?;
        veth_queues(&t.dut, "dmz0", &t.az, "az0", QUEUES)?;
        for ns in [&t.lan, &t.dut, &t.az] {
            ns.ip(&["link", "set", "lo", "up"])?;
        }
        t.lan.ip(&["addr", "add", "10.0.0.10/24", "dev", "lanh0"])?;
        t.lan.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        t.dut.ip(&["addr", "add", "10.0.0.1/24", "dev", "lan0"])?;
        t.dut.ip(&["addr", "add", "192.0.2.1/24", "dev", "dmz0"])?;
        t.dut
            .ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.254"])?;
        t.az.ip(&["addr", "add", "192.0.2.254/24", "dev", "az0"])?;
        // The kernel forwarding baseline sends plaintext to the LAN host.
        t.az.ip(&["route", "add", "10.0.0.0/24", "via", "192.0.2.1"])?;
        for p in PEERS {
            t.az.ip(&["addr", "add", &format!("{p}/24"), "dev", "az0"])?;
        }
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            t.dut.sysctl(kv)?;
        }
        // Neighbours fixed: no ARP in the middle of a measurement.
        let (lanh, lan0) = (mac(&t.lan, "lanh0")?, mac(&t.dut, "lan0")?);
        let (dmz0, az0) = (mac(&t.dut, "dmz0")?, mac(&t.az, "az0")?);
        let perm = |ns: &Netns, ip: &str, ll: &str, dev: &str| {
            ns.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                ll,
                "dev",
                dev,
                "nud",
                "permanent",
            ])
        };
        perm(&t.dut, "10.0.0.10", &lanh, "lan0")?;
        perm(&t.dut, "192.0.2.254", &az0, "dmz0")?;
        perm(&t.lan, "10.0.0.1", &lan0, "lanh0")?;
        perm(&t.az, "192.0.2.1", &dmz0, "az0")?;
        xps(&t.lan, "lanh0")?;
        xps(&t.az, "az0")?;
        Ok(t)
    }
}

/// Which device is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DutKind {
    Xesp,
    /// xesp built with the `null-forwarder` feature (bench only): the same
    /// datapath with the ESP work replaced by adding and removing as many
    /// octets (see datapath-user/src/null.rs).
    #[serde(rename = "null-forwarder")]
    Null,
    /// xesp and the null forwarder with their AF_XDP sockets busy-polled
    /// (`--busy-poll`), to be compared with the two above in the same run.
    #[serde(rename = "xesp-busy-poll")]
    XespBusyPoll,
    #[serde(rename = "null-forwarder-busy-poll")]
    NullBusyPoll,
    /// The device namespace's kernel routing the inner packets: no IPsec,
    /// no XDP.
    #[serde(rename = "kernel-forwarding")]
    Kernel,
    #[serde(rename = "strongswan")]
    StrongSwan,
}

impl DutKind {
    pub const ALL: [DutKind; 6] = [
        DutKind::Xesp,
        DutKind::Null,
        DutKind::XespBusyPoll,
        DutKind::NullBusyPoll,
        DutKind::Kernel,
        DutKind::StrongSwan,
    ];
    /// Measured when `--devices` is not given.
    pub const DEFAULT: [DutKind; 4] = [
        DutKind::Xesp,
        DutKind::Null,
        DutKind::Kernel,
        DutKind::StrongSwan,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Xesp => "xesp",
            Self::Null => "null-fwd",
            Self::XespBusyPoll => "xesp-bp",
            Self::NullBusyPoll => "null-bp",
            Self::Kernel => "kernel-fwd",
            Self::StrongSwan => "strongSwan",
        }
    }

    /// Whether it sets up tunnels with the benchmark's peer.
    pub fn has_tunnels(self) -> bool {
        self != Self::Kernel
    }

    /// Whether the transform matters (the kernel forwards plaintext).
    pub fn has_suite(self) -> bool {
        self != Self::Kernel
    }

    /// Whether it runs xesp's AF_XDP workers (overload steps, `xesp status`).
    pub fn has_workers(self) -> bool {
        matches!(
            self,
            Self::Xesp | Self::Null | Self::XespBusyPoll | Self::NullBusyPoll
        )
    }

    /// What the DMZ end sends it to decrypt: `prepare`'s mode.
    pub fn dmz_mode(self) -> &'static str {
        match self {
            Self::Xesp | Self::XespBusyPoll | Self::StrongSwan => "esp",
            Self::Null | Self::NullBusyPoll => "null",
            Self::Kernel => "plain",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| {
            k.label().eq_ignore_ascii_case(s)
                || matches!(
                    (k, s),
                    (Self::Null, "null")
                        | (Self::Kernel, "kernel")
                        | (Self::StrongSwan, "strongswan")
                )
        })
    }
}

/// A running device under test with two tunnels to the peer (the kernel
/// forwarding baseline: no process, only a route).
pub struct Dut {
    pub kind: DutKind,
    daemon: Option<Daemon>,
    dir: PathBuf,
}

impl Dut {
    /// Starts `kind` in the `dut` namespace with `suite`, configured to reach
    /// both peers; the caller waits for the tunnels. `busy_poll` is the
    /// workers' busy polling setting of the busy-polled kinds.
    pub fn start(
        kind: DutKind,
        topo: &Topology,
        suite: Suite,
        psk: &str,
        (bins, busy_poll): (&super::ends::Binaries, &str),
        dir: &Path,
    ) -> Result<Self> {
        let dir = dir.join(format!("{}-{}", kind.label(), suite.name()));
        fs::create_dir_all(&dir)?;
        let xesp = |bin: &Path, bp: &str| start_xesp(topo, suite, psk, bin, bp, &dir);
        let daemon = match kind {
            DutKind::Xesp => Some(xesp(&bins.xesp, "off")?),
            DutKind::Null => Some(xesp(&bins.null, "off")?),
            DutKind::XespBusyPoll => Some(xesp(&bins.xesp, busy_poll)?),
            DutKind::NullBusyPoll => Some(xesp(&bins.null, busy_poll)?),
            DutKind::Kernel => None,
            DutKind::StrongSwan => Some(start_strongswan(topo, suite, psk, &dir)?),
        };
        Ok(Self { kind, daemon, dir })
    }

    /// The device's process, if it has one.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.as_mut().is_none_or(Daemon::is_running)
    }

    /// xesp's control socket (xesp and the null forwarder).
    pub fn control_socket(&self) -> Option<PathBuf> {
        self.kind.has_workers().then(|| self.dir.join("xesp.sock"))
    }

    /// Where its configuration and log are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// After the tunnels are up: xesp's routes into the tunnel interfaces
    /// (strongSwan installs its own from the traffic selectors).
    pub fn route(&self, topo: &Topology) -> Result<()> {
        match self.kind {
            DutKind::Xesp | DutKind::Null | DutKind::XespBusyPoll | DutKind::NullBusyPoll => {
                for (t, dev) in ["Tunnel0", "Tunnel1"].iter().enumerate() {
                    topo.dut
                        .ip(&["route", "replace", vnet_half(t), "dev", dev])?;
                }
            }
            DutKind::Kernel => {
                topo.dut
                    .ip(&["route", "replace", "10.2.0.0/24", "via", "192.0.2.254"])?;
            }
            DutKind::StrongSwan => {}
        }
        Ok(())
    }

    pub fn stop(mut self, topo: &Topology) {
        if let Some(d) = self.daemon.as_mut() {
            d.stop();
        }
        // Whatever it left behind must not steer the next device's traffic.
        let _ = topo.dut.ip(&["route", "flush", "10.2.0.0/24"]);
        for dev in ["Tunnel0", "Tunnel1", "ipsec0"] {
            let _ = topo.dut.ip(&["link", "del", dev]);
        }
        for dev in ["lan0", "dmz0"] {
            let _ = topo.dut.ip(&["link", "set", dev, "xdp", "off"]);
        }
    }
}

/// Tunnel `t`'s half of the VNet (as xesp-loadgen's flows use it).
pub fn vnet_half(t: usize) -> &'static str {
    if t == 0 {
        "10.2.0.0/25"
    } else {
        "10.2.0.128/25"
    }
}

/// The workers' busy polling setting (datapath-user's `BusyPoll::ENV`).
const BUSY_POLL_ENV: &str = "XESP_AF_XDP_BUSY_POLL";
/// The workers' CPUs (datapath-user's `WorkerCpus::ENV`).
pub const WORKER_CPUS_ENV: &str = "XESP_AF_XDP_CPUS";

/// [`worker_cpus`] for this process and machine.
pub fn workers_here() -> String {
    worker_cpus(
        std::env::var(WORKER_CPUS_ENV).ok(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )
}

/// Where xesp's workers run in the benchmark, as `XESP_AF_XDP_CPUS` says
/// it: the caller's own setting if it has one, else queue q's worker on
/// CPU q+1 (mod `cpus`). Tunnel q's generator runs on CPU q and the
/// receive softirq that fills queue q runs there with it, so each worker
/// gets the CPU that does not feed it, as the daemon's documentation
/// advises for the NIC's interrupts. Unpinned, a worker follows its
/// wake-ups onto the generator's CPU, and at 64 B the two then share it.
pub fn worker_cpus(from_env: Option<String>, cpus: usize) -> String {
    from_env.unwrap_or_else(|| {
        (0..QUEUES)
            .map(|q| ((q as usize + 1) % cpus.max(1)).to_string())
            .collect::<Vec<_>>()
            .join(",")
    })
}

fn start_xesp(
    topo: &Topology,
    suite: Suite,
    psk: &str,
    bin: &Path,
    busy_poll: &str,
    dir: &Path,
) -> Result<Daemon> {
    let sock = dir.join("xesp.sock");
    let mut t = format!(
        r#"# xesp under test (cargo xtask bench)
[device]
public_address = "{DUT_PUBLIC}"
dmz_interface = "dmz0"
lan_interfaces = ["lan0"]
datapath = "xdp"
control_socket = "{}"
mss_clamp = 1350

[dmz]
allow = ["203.0.113.0/24", "192.0.2.0/24"]

[ike]
psk = "{psk}"
proposals = ["{}"]
esp_proposals = ["{}"]
allow_legacy = true
"#,
        sock.display(),
        suite.ike_proposal(),
        suite.esp_proposal(),
    );
    for (i, p) in PEERS.iter().enumerate() {
        t.push_str(&format!(
            "\n[[tunnel]]\nname = \"Tunnel{i}\"\nremote = \"{p}\"\naddress = \"172.16.0.{}\"\n",
            i + 1
        ));
    }
    let conf = dir.join("xesp.toml");
    write_secret(&conf, &t)?;
    output(Command::new(bin).arg("check").arg("-c").arg(&conf))
        .context("xesp check refused the benchmark's configuration")?;
    let log = fs::File::create(dir.join("xesp.log"))?;
    let mut cmd = topo.dut.cmd(bin);
    cmd.arg("run")
        .arg("-c")
        .arg(&conf)
        .env("RUST_LOG", "info")
        .env(BUSY_POLL_ENV, busy_poll)
        .env(WORKER_CPUS_ENV, workers_here())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut d = Daemon::spawn("xesp under test", &mut cmd)?;
    if !wait_until(Duration::from_secs(10), || sock.exists() || !d.is_running()) || !sock.exists() {
        bail!(
            "xesp did not start:\n{}",
            fs::read_to_string(dir.join("xesp.log")).unwrap_or_default()
        );
    }
    Ok(d)
}

fn start_strongswan(topo: &Topology, suite: Suite, psk: &str, dir: &Path) -> Result<Daemon> {
    let charon = Charon::at(dir);
    charon.write_conf(0, false)?;
    let mut s = String::from("connections {\n");
    for (i, p) in PEERS.iter().enumerate() {
        s.push_str(&format!(
            r#"    bench{i} {{
        version = 2
        local_addrs = {DUT_PUBLIC}
        remote_addrs = {p}
        proposals = {ike}
        mobike = no
        local {{
            auth = psk
            id = {DUT_PUBLIC}
        }}
        remote {{
            auth = psk
            id = {p}
        }}
        children {{
            net{i} {{
                local_ts = 10.0.0.0/24
                remote_ts = {half}
                esp_proposals = {esp}
                start_action = start
            }}
        }}
    }}
"#,
            ike = suite.ike_proposal(),
            esp = suite.esp_proposal(),
            half = vnet_half(i),
        ));
    }
    s.push_str("}\nsecrets {\n");
    for (i, p) in PEERS.iter().enumerate() {
        s.push_str(&format!(
            "    ike-bench{i} {{\n        id-a = {DUT_PUBLIC}\n        id-b = {p}\n        secret = \"{psk}\"\n    }}\n"
        ));
    }
    s.push_str("}\n");
    charon.write_swanctl(&s)?;
    charon.start(&topo.dut)
}

/// Writes a file only root can read (it holds the PSK).
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::worker_cpus;

    #[test]
    fn each_worker_runs_off_the_cpu_that_feeds_its_queue() {
        assert_eq!(worker_cpus(None, 2), "1,0");
        assert_eq!(worker_cpus(None, 4), "1,2");
        assert_eq!(worker_cpus(None, 1), "0,0");
        assert_eq!(worker_cpus(Some("3".into()), 4), "3", "the caller's own");
    }
}
