//! The reference lab: the article's topology in network namespaces, with two
//! strongSwan + BIRD instances playing the active-active Azure VPN gateway and
//! a VNet behind them. The on-prem device is whatever the caller puts in the
//! `onprem` namespace: xesp with BIRD beside it (the product), a strongSwan
//! stand-in (the lab proving itself), or nothing (the caller starts its own).
//!
//! The gateways' ESP is strongSwan's kernel-libipsec by default (this
//! machine's kernel has no ESP); [`LabConfig::gateway_backend`] puts it in
//! the kernel instead (xfrm interfaces, for a kernel with ESP such as the
//! test VM's). Its files go under `target/lab/`, or under `$XESP_LAB_DIR`
//! (a writable place where the project is read-only, as in the VM).
//!
//! A [`Lab`] tears everything down when dropped, also when a test panics.
//! `cargo xtask lab up` keeps one running and records it in a state file, so
//! that `status` and `down` find it again.

pub mod bird;
pub mod kernel_sa;
pub mod strongswan;
pub mod topology;
pub mod xesp;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use self::{
    bird::Bird,
    strongswan::{Charon, EspBackend},
    topology::{GW_BGP, GW_IF_ID, GW_PUBLIC, Namespaces, ONPREM_PUBLIC},
    xesp::{Xesp, XespSettings},
};
use crate::{
    netns::{self, Daemon, Netns, wait_until},
    setup::project_root,
};

/// What runs on the on-prem device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnpremMode {
    /// xesp, with BIRD running BGP over its tunnel interfaces.
    Xesp,
    /// strongSwan (libipsec) and BIRD, with per-tunnel selectors.
    StrongSwan,
    /// Nothing: the caller runs the device (xesp and its BIRD).
    Bare,
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub onprem: OnpremMode,
    pub psk: String,
    /// IKE and ESP proposals the gateways accept (strongSwan syntax).
    pub gateway_ike: String,
    pub gateway_esp: String,
    /// What the strongSwan stand-in proposes.
    pub standin_ike: String,
    pub standin_esp: String,
    /// xesp's settings, in [`OnpremMode::Xesp`].
    pub xesp: XespSettings,
    /// The gateways start their CHILD_SA themselves (xesp then responds).
    pub gateway_initiates: bool,
    /// The gateways' CHILD_SA lifetimes, as swanctl.conf lines.
    pub gateway_child_lifetimes: String,
    /// Each gateway's CHILD_SAs, as `(local_ts, remote_ts)` from the
    /// gateway's side (swanctl syntax, e.g. `10.2.0.0/24`); empty: one
    /// CHILD_SA with 0.0.0.0/0 both ways, as Azure's route-based gateway.
    pub gateway_children: [Vec<(String, String)>; 2],
    /// Environment variables for xesp (e.g. `XESP_FAULT_INJECT` in tests).
    pub xesp_env: Vec<(String, String)>,
    /// Where the gateways' ESP runs: libipsec (a TUN `ipsec0`), or the
    /// kernel (an xfrm interface `ipsec0`, CHILD_SAs bound to it by if_id).
    pub gateway_backend: EspBackend,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            onprem: OnpremMode::Xesp,
            psk: topology::DEFAULT_PSK.to_string(),
            gateway_ike: strongswan::GATEWAY_IKE_PROPOSALS.to_string(),
            gateway_esp: strongswan::GATEWAY_ESP_PROPOSALS.to_string(),
            standin_ike: "aes256-sha256-modp2048".to_string(),
            standin_esp: "aes256gcm16".to_string(),
            xesp: XespSettings::default(),
            gateway_initiates: false,
            gateway_child_lifetimes: "rekey_time = 27000s".to_string(),
            gateway_children: [Vec::new(), Vec::new()],
            xesp_env: Vec::new(),
            gateway_backend: EspBackend::Libipsec,
        }
    }
}

/// One gateway instance's daemons' files.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub charon: Charon,
    pub bird: Bird,
}

/// A running lab.
pub struct Lab {
    /// Configuration files and logs of every daemon.
    pub dir: PathBuf,
    pub ns: Namespaces,
    pub gateways: [Gateway; 2],
    /// The stand-in's daemons, in [`OnpremMode::StrongSwan`].
    pub onprem: Option<Gateway>,
    /// xesp and its BIRD, in [`OnpremMode::Xesp`].
    pub xesp: Option<(Xesp, Bird)>,
    pub config: LabConfig,
    // Dropped before `ns`: daemons stop before their namespaces go.
    daemons: Vec<Daemon>,
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// How long a daemon may take to open its control socket (or charon to
/// create its TUN). Generous: under QEMU's TCG on a busy machine, xesp's
/// start (the eBPF verifier, a debug build) took over 10 s. The wait ends
/// at once when the daemon exits instead.
pub const DAEMON_START: Duration = Duration::from_secs(60);

fn say(quiet: bool, what: &str) {
    if !quiet {
        eprintln!("[lab] {what}");
    }
}

impl Lab {
    /// Builds a lab whose namespaces are removed when it is dropped. Needs
    /// root. Its files go to a fresh directory under [`labs_dir`].
    pub fn up(config: LabConfig) -> Result<Self> {
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let dir = labs_dir().join(format!("{}-{n}", std::process::id()));
        Self::build(config, dir, Netns::create, true)
    }

    fn build(
        config: LabConfig,
        dir: PathBuf,
        make: impl Fn(&str) -> Result<Netns>,
        quiet: bool,
    ) -> Result<Self> {
        crate::setup::require_root("build the lab (network namespaces)")?;
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        say(quiet, "creating namespaces and links");
        let ns = topology::build(make)?;
        let gateways = [0, 1].map(|i| Gateway {
            charon: Charon::at(&dir.join(format!("azgw{}", i + 1))),
            bird: Bird::at(&dir.join(format!("azgw{}", i + 1))),
        });
        let mut lab = Self {
            dir,
            ns,
            gateways,
            onprem: None,
            xesp: None,
            config,
            daemons: Vec::new(),
        };
        for i in 0..2 {
            let gw = lab.gateways[i].clone();
            say(
                quiet,
                &format!(
                    "azgw{}: starting strongSwan ({}) and BIRD (AS 65000, {})",
                    i + 1,
                    GW_PUBLIC[i],
                    GW_BGP[i]
                ),
            );
            let backend = lab.config.gateway_backend;
            let if_id = (backend == EspBackend::Kernel).then_some(GW_IF_ID[i]);
            if if_id.is_some() {
                topology::gateway_xfrm_interface(&lab.ns, i)?;
            }
            gw.charon.write_conf_for(backend, 0, false)?;
            gw.charon.write_swanctl(&strongswan::gateway_swanctl(
                GW_PUBLIC[i],
                ONPREM_PUBLIC,
                &lab.config.psk,
                &lab.config.gateway_ike,
                &lab.config.gateway_esp,
                lab.config.gateway_initiates,
                &lab.config.gateway_child_lifetimes,
                &lab.config.gateway_children[i],
                if_id,
            ))?;
            let d = gw.charon.start(&lab.ns.azgw[i])?;
            lab.daemons.push(d);
            gw.bird
                .write_conf(&bird::gateway_conf(&gw.bird, GW_BGP[i]))?;
            let d = gw.bird.start(&lab.ns.azgw[i])?;
            lab.daemons.push(d);
        }
        if lab.config.onprem == OnpremMode::StrongSwan {
            say(
                quiet,
                "onprem: starting the strongSwan stand-in and BIRD (AS 65010)",
            );
            let gw = Gateway {
                charon: Charon::at(&lab.dir.join("onprem")),
                bird: Bird::at(&lab.dir.join("onprem")),
            };
            gw.charon.write_conf(220, false)?;
            gw.charon.write_swanctl(&strongswan::standin_swanctl(
                ONPREM_PUBLIC,
                &[(GW_PUBLIC[0], GW_BGP[0]), (GW_PUBLIC[1], GW_BGP[1])],
                &lab.config.psk,
                &lab.config.standin_ike,
                &lab.config.standin_esp,
            ))?;
            let d = gw.charon.start(&lab.ns.onprem)?;
            lab.daemons.push(d);
            gw.bird
                .write_conf(&bird::standin_conf(&gw.bird, "ipsec0"))?;
            // BIRD needs ipsec0, which libipsec creates at start-up.
            if !wait_until(DAEMON_START, || {
                lab.ns.onprem.ip(&["link", "show", "ipsec0"]).is_ok()
            }) {
                bail!(
                    "onprem: strongSwan created no ipsec0; see {}",
                    gw.charon.log().display()
                );
            }
            let d = gw.bird.start(&lab.ns.onprem)?;
            lab.daemons.push(d);
            lab.onprem = Some(gw);
        }
        if lab.config.onprem == OnpremMode::Xesp {
            say(
                quiet,
                "onprem: starting xesp (Tunnel0, Tunnel1) and BIRD (AS 65010)",
            );
            let dir = lab.dir.join("onprem");
            let (x, bird) = (Xesp::at(&dir), Bird::at(&dir));
            x.write_conf(&lab.config.psk, &lab.config.xesp, &bird.ctl())?;
            let d = x.start(&lab.ns.onprem, &lab.config.xesp_env)?;
            lab.daemons.push(d);
            // BIRD as xesp bgp-config --bird writes it, checked by BIRD itself.
            bird.write_conf(&x.bird_conf(&bird)?)?;
            let d = bird.start(&lab.ns.onprem)?;
            lab.daemons.push(d);
            lab.xesp = Some((x, bird));
        }
        Ok(lab)
    }

    /// Waits until the on-prem device has both tunnels up (xesp) or its four
    /// CHILD_SAs (stand-in), and every BGP session is Established.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        match self.config.onprem {
            OnpremMode::StrongSwan => self.wait_standin_ready(timeout),
            OnpremMode::Xesp => self.wait_xesp_ready(timeout),
            OnpremMode::Bare => bail!("a bare lab has no on-prem device to wait for"),
        }
    }

    /// xesp: both tunnels up, one CHILD_SA at each gateway, three BGP sessions.
    pub fn wait_xesp_ready(&self, timeout: Duration) -> Result<()> {
        let Some((x, bird)) = &self.xesp else {
            bail!("the lab runs no xesp")
        };
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        if !wait_until(left(), || {
            x.tunnels_up() == 2
                && self
                    .gateways
                    .iter()
                    .all(|g| g.charon.installed_children() >= 1)
        }) {
            bail!(
                "xesp: {} of 2 tunnels up after {timeout:?}; see {}\n{}",
                x.tunnels_up(),
                x.log().display(),
                self.status()
            );
        }
        if !wait_until(left(), || {
            bird.established() == 2 && self.bgp_routes_exchanged()
        }) {
            bail!(
                "BGP sessions or routes not in place after {timeout:?}:\n{}",
                self.status()
            );
        }
        Ok(())
    }

    /// Both gateway sessions Established, each gateway has learned both
    /// on-prem networks, and on-prem routes the VNet over both instances.
    fn bgp_routes_exchanged(&self) -> bool {
        self.gateways
            .iter()
            .all(|g| g.bird.established() == 1 && g.bird.learned_onprem_nets())
            && self
                .ns
                .onprem
                .exec("ip", &["route", "show", topology::VNET])
                .is_ok_and(|r| r.matches("nexthop").count() == 2)
    }

    /// Kills gateway `i`'s strongSwan with SIGKILL, as a failed instance
    /// dies: no DELETE reaches on-prem, only DPD can tell.
    pub fn kill_gateway_ike(&mut self, i: usize) {
        let name = format!("charon in {}", self.ns.azgw[i].name());
        for d in self.daemons.iter_mut().filter(|d| d.name() == name) {
            d.kill();
        }
        self.daemons
            .retain_mut(|d| d.is_running() || d.name() != name);
    }

    /// Deletes on-prem's DMZ interface (both ends of its veth go), as an
    /// operator or a driver reload would.
    pub fn delete_dmz(&self) -> Result<()> {
        self.ns.onprem.ip(&["link", "del", topology::ONPREM_DMZ_IF])
    }

    /// Builds on-prem's DMZ interface again, with `queues` queues.
    pub fn recreate_dmz(&self, queues: u32) -> Result<()> {
        topology::wire_dmz(&self.ns, queues)
    }

    /// Three pings from outside the DMZ allowlist (the edge's 198.51.100.1)
    /// to on-prem's public address: `Err` when none is answered.
    pub fn ping_public_from_outsider(&self) -> Result<String> {
        let (src, dst) = (
            topology::OUTSIDER.to_string(),
            topology::ONPREM_PUBLIC.to_string(),
        );
        let args = ["-c", "3", "-i", "0.2", "-W", "1", "-I", &src, &dst];
        self.ns.msee.exec("ping", &args)
    }

    /// Pings the VNet's VM `count` times from LAN host address `src`.
    pub fn ping_vm(&self, src: std::net::Ipv4Addr, count: u32) -> Result<String> {
        let (src, dst, count) = (src.to_string(), topology::VM.to_string(), count.to_string());
        let args = ["-c", &count, "-i", "0.2", "-W", "2", "-I", &src, &dst];
        self.ns.lan.exec("ping", &args)
    }

    /// The PID of gateway `i`'s strongSwan.
    pub fn gateway_ike_pid(&self, i: usize) -> Option<u32> {
        let name = format!("charon in {}", self.ns.azgw[i].name());
        self.daemons
            .iter()
            .find(|d| d.name() == name)
            .map(Daemon::pid)
    }

    /// On-prem's BIRD hangs: it is stopped, and its control socket becomes a
    /// listener that never answers (kept open while the returned value lives).
    pub fn hang_onprem_bird(&mut self) -> Result<std::os::unix::net::UnixListener> {
        let name = format!("bird in {}", self.ns.onprem.name());
        for d in self.daemons.iter_mut().filter(|d| d.name() == name) {
            d.stop();
        }
        self.daemons
            .retain_mut(|d| d.is_running() || d.name() != name);
        let ctl = Bird::at(&self.dir.join("onprem")).ctl();
        let _ = std::fs::remove_file(&ctl);
        std::os::unix::net::UnixListener::bind(&ctl)
            .with_context(|| format!("binding {}", ctl.display()))
    }

    /// The xesp daemon's process, in [`OnpremMode::Xesp`].
    fn xesp_daemon(&mut self) -> Option<&mut Daemon> {
        let name = format!("xesp in {}", self.ns.onprem.name());
        self.daemons.iter_mut().find(|d| d.name() == name)
    }

    /// SIGHUP to the xesp daemon; false if it does not run.
    pub fn hangup_xesp(&mut self) -> bool {
        self.signal_xesp(libc::SIGHUP)
    }

    /// SIGTERM to the xesp daemon (it deletes its IKE_SAs and exits);
    /// false if it does not run.
    pub fn terminate_xesp(&mut self) -> bool {
        self.signal_xesp(libc::SIGTERM)
    }

    fn signal_xesp(&mut self, signal: i32) -> bool {
        let Some(d) = self.xesp_daemon() else {
            return false;
        };
        let running = d.is_running();
        d.signal(signal);
        running
    }

    /// Whether the xesp daemon still runs.
    pub fn xesp_running(&mut self) -> bool {
        self.xesp_daemon().is_some_and(Daemon::is_running)
    }

    /// The xesp daemon's exit code, once it has exited.
    pub fn xesp_exit_code(&mut self) -> Option<i32> {
        self.xesp_daemon().and_then(Daemon::exit_code)
    }

    /// Starts gateway `i`'s strongSwan again.
    pub fn start_gateway_ike(&mut self, i: usize) -> Result<()> {
        let d = self.gateways[i].charon.start(&self.ns.azgw[i])?;
        self.daemons.push(d);
        Ok(())
    }

    /// Instance `i` fails: its strongSwan dies (SIGKILL) and the VNet's
    /// routes to on-prem leave it, as Azure's fabric does.
    pub fn fail_gateway(&mut self, i: usize) -> Result<()> {
        self.kill_gateway_ike(i);
        topology::vnet_routes(&self.ns.vnet, &[1 - i])
    }

    /// Instance `i` returns: strongSwan again, the VNet's routes over both.
    pub fn restore_gateway(&mut self, i: usize) -> Result<()> {
        self.start_gateway_ike(i)?;
        topology::vnet_routes(&self.ns.vnet, &[0, 1])
    }

    /// Waits until the stand-in has its four CHILD_SAs and every BGP session
    /// is Established on all three sides.
    pub fn wait_standin_ready(&self, timeout: Duration) -> Result<()> {
        let Some(onprem) = &self.onprem else {
            bail!("the lab has no strongSwan stand-in")
        };
        let deadline = Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        if !wait_until(left(), || onprem.charon.installed_children() >= 4) {
            bail!(
                "onprem: {} of 4 CHILD_SAs installed after {timeout:?}; see {}",
                onprem.charon.installed_children(),
                onprem.charon.log().display()
            );
        }
        if !wait_until(left(), || {
            onprem.bird.established() == 2 && self.bgp_routes_exchanged()
        }) {
            bail!(
                "BGP sessions or routes not in place after {timeout:?}:\n{}",
                self.status()
            );
        }
        Ok(())
    }

    /// Human status: SAs, BGP sessions and routes on every side (and the
    /// gateways' kernel SAs with the kernel backend).
    pub fn status(&self) -> String {
        let mut out = status_of(&self.dir, &self.ns.onprem, self.config.onprem);
        if self.config.gateway_backend == EspBackend::Kernel {
            for (i, gw) in self.ns.azgw.iter().enumerate() {
                // Keys redacted.
                let sas = kernel_sa::list(gw).map_or_else(
                    |e| format!("{e:#}"),
                    |sas| sas.iter().map(|sa| sa.text.as_str()).collect(),
                );
                section(&mut out, &format!("azgw{}: ip -s xfrm state", i + 1), &sas);
            }
        }
        out
    }

    /// Keeps the lab running after this process exits; returns its state.
    fn persist(mut self) -> State {
        let pids = self
            .daemons
            .drain(..)
            .map(|d| (d.name().to_string(), d.detach()))
            .collect();
        let namespaces = self
            .ns
            .all()
            .iter()
            .map(|(role, n)| (role.to_string(), n.name().to_string()))
            .collect();
        let state = State {
            dir: self.dir.clone(),
            onprem: self.config.onprem,
            namespaces,
            pids,
        };
        let Lab { ns, .. } = self;
        let Namespaces {
            lan,
            onprem,
            msee,
            azgw: [a, b],
            vnet,
        } = ns;
        for n in [lan, onprem, msee, a, b, vnet] {
            n.persist();
        }
        state
    }
}

fn section(out: &mut String, title: &str, body: &str) {
    out.push_str(&format!("===== {title}\n{}\n", body.trim_end()));
}

fn status_of(dir: &Path, onprem: &Netns, mode: OnpremMode) -> String {
    let mut out = String::new();
    for i in 0..2 {
        let d = dir.join(format!("azgw{}", i + 1));
        let (c, b) = (Charon::at(&d), Bird::at(&d));
        section(
            &mut out,
            &format!("azgw{}: swanctl --list-sas", i + 1),
            &c.list_sas(),
        );
        let protos = b
            .birdc(&["show", "protocols"])
            .unwrap_or_else(|e| format!("{e:#}"));
        section(
            &mut out,
            &format!("azgw{}: birdc show protocols", i + 1),
            &protos,
        );
        let routes = b
            .birdc(&["show", "route"])
            .unwrap_or_else(|e| format!("{e:#}"));
        section(
            &mut out,
            &format!("azgw{}: birdc show route", i + 1),
            &routes,
        );
    }
    if mode == OnpremMode::Xesp {
        let d = dir.join("onprem");
        section(&mut out, "onprem: xesp status", &Xesp::at(&d).status_text());
    }
    if mode == OnpremMode::StrongSwan {
        let d = dir.join("onprem");
        let (c, b) = (Charon::at(&d), Bird::at(&d));
        section(
            &mut out,
            "onprem (strongSwan stand-in): swanctl --list-sas",
            &c.list_sas(),
        );
        let protos = b
            .birdc(&["show", "protocols"])
            .unwrap_or_else(|e| format!("{e:#}"));
        section(&mut out, "onprem: birdc show protocols", &protos);
    }
    let route = onprem
        .exec("ip", &["route", "show", topology::VNET])
        .unwrap_or_else(|e| format!("{e:#}"));
    section(
        &mut out,
        &format!("onprem: ip route show {}", topology::VNET),
        &route,
    );
    out
}

/// A persistent lab, as `cargo xtask lab up` left it.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    dir: PathBuf,
    onprem: OnpremMode,
    namespaces: Vec<(String, String)>,
    pids: Vec<(String, u32)>,
}

/// The directory labs keep their files in: `$XESP_LAB_DIR` if set (the
/// project is read-only in the test VM; daemons' control sockets need a
/// local file system, not 9p), else `target/lab` of the project.
pub fn labs_dir() -> PathBuf {
    labs_dir_from(std::env::var_os("XESP_LAB_DIR"))
}

fn labs_dir_from(var: Option<std::ffi::OsString>) -> PathBuf {
    match var {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => project_root().join("target/lab"),
    }
}

fn state_file() -> PathBuf {
    labs_dir().join("state.json")
}

fn load_state() -> Result<Option<State>> {
    match fs::read_to_string(state_file()) {
        Ok(s) => {
            Ok(Some(serde_json::from_str(&s).with_context(|| {
                format!("reading {}", state_file().display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", state_file().display())),
    }
}

impl State {
    fn onprem_ns(&self) -> Option<Netns> {
        self.namespaces
            .iter()
            .find(|(r, _)| r == "onprem")
            .map(|(_, n)| Netns::adopt(n))
    }

    fn alive(&self) -> bool {
        self.namespaces
            .iter()
            .all(|(_, n)| Path::new("/run/netns").join(n).exists())
    }
}

/// `cargo xtask lab up`: builds the lab (if none runs) and leaves it running.
pub fn cli_up() -> Result<()> {
    crate::setup::require_root("build the lab (network namespaces)")?;
    crate::setup::ensure()?;
    if let Some(s) = load_state()? {
        if s.alive() {
            eprintln!(
                "[lab] already up (namespaces {}); `cargo xtask lab down` removes it",
                s.namespaces[0].1
            );
            return Ok(());
        }
        cli_down()?;
    }
    let started = Instant::now();
    let id = std::process::id();
    let dir = labs_dir().join(format!("up-{id}"));
    // Persistent names: not matched by the sweep of dead test runs.
    let lab = Lab::build(
        LabConfig::default(),
        dir,
        |role| Netns::create_named(&format!("{}-lab{id}-{role}", netns::PREFIX)),
        false,
    )?;
    eprintln!("[lab] waiting for both tunnels and the three BGP sessions...");
    let ready = lab.wait_ready(Duration::from_secs(90));
    if ready.is_ok() {
        // Traffic: each LAN network to the VM, through the tunnels.
        let dst = topology::VM;
        for src in topology::LAN_HOSTS {
            match lab.ping_vm(src, 3) {
                Ok(out) => eprintln!(
                    "[lab] ping {dst} from {src}: {}",
                    out.lines()
                        .find(|l| l.contains("packet loss"))
                        .unwrap_or("")
                ),
                Err(e) => eprintln!("[lab] ping {dst} from {src} failed: {e:#}"),
            }
        }
    }
    let state = lab.persist();
    fs::write(state_file(), serde_json::to_string_pretty(&state)?)?;
    ready?;
    eprintln!(
        "[lab] up in {:.1} s; logs and configurations under {}",
        started.elapsed().as_secs_f64(),
        state.dir.display()
    );
    Ok(())
}

/// `cargo xtask lab status`.
pub fn cli_status() -> Result<()> {
    let Some(s) = load_state()? else {
        bail!("no lab is up: `cargo xtask lab up` starts one")
    };
    let Some(onprem) = s.onprem_ns() else {
        bail!("{} names no onprem namespace", state_file().display())
    };
    if !s.alive() {
        bail!(
            "the lab recorded in {} is gone: `cargo xtask lab down` cleans up",
            state_file().display()
        );
    }
    print!("{}", status_of(&s.dir, &onprem, s.onprem));
    onprem.persist();
    Ok(())
}

/// `cargo xtask lab down`: stops the persistent lab and sweeps leftovers.
pub fn cli_down() -> Result<()> {
    crate::setup::require_root("remove the lab (network namespaces)")?;
    if let Some(s) = load_state()? {
        for (name, pid) in &s.pids {
            // SAFETY: kill has no memory-safety preconditions.
            if unsafe { libc::kill(*pid as i32, libc::SIGTERM) } == 0 {
                eprintln!("[lab] stopped {name} (pid {pid})");
            }
        }
        for (_, n) in &s.namespaces {
            netns::delete(n);
        }
        eprintln!("[lab] removed {} namespaces", s.namespaces.len());
        fs::remove_file(state_file())?;
    } else {
        eprintln!("[lab] no lab recorded in {}", state_file().display());
    }
    let swept = netns::sweep_stale();
    if !swept.is_empty() {
        eprintln!(
            "[lab] also removed namespaces of dead runs: {}",
            swept.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_labs_directory_is_the_environments_when_set() {
        assert_eq!(
            labs_dir_from(Some("/tmp/labs".into())),
            PathBuf::from("/tmp/labs")
        );
        let default = project_root().join("target/lab");
        assert_eq!(labs_dir_from(None), default);
        assert_eq!(labs_dir_from(Some("".into())), default);
    }
}
