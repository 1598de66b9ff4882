//! Running under a service manager: the capability check at start and the
//! systemd notifications (`sd_notify(3)`).
//!
//! * [`check_capabilities`] reads the effective capability set
//!   (`/proc/self/status`, `CapEff`) and names each capability the datapath
//!   needs and lacks, with what it is for, so that `xesp run` can refuse to
//!   start with that list rather than fail deep inside (a `bind` on UDP 500,
//!   an eBPF load, an AF_XDP socket).
//! * [`notify_ready`], [`notify_status`], [`notify_stopping`],
//!   [`watchdog_interval`] and [`notify_watchdog`] speak to systemd through
//!   `NOTIFY_SOCKET` (`Type=notify`, `WatchdogSec=` in `dist/xesp.service`);
//!   each does nothing, successfully, when `NOTIFY_SOCKET` is unset (a run
//!   from a shell, the lab, the tests).
//!
//! The daemon is meant to call them in this order: `check_capabilities`
//! before anything else; `notify_ready` once the datapath is attached and
//! the control socket listens; `notify_status` when a tunnel goes up or
//! down ([`status_line`]); `notify_watchdog` from the IKE loop every half
//! [`watchdog_interval`]; `notify_stopping` on SIGTERM, before the DELETEs.

use std::{fmt, io, time::Duration};

use sd_notify::NotifyState;

use crate::config::DatapathMode;

/// The capabilities xesp may need (numbers from `linux/capability.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    NetBindService,
    NetAdmin,
    NetRaw,
    IpcLock,
    SysAdmin,
    Perfmon,
    Bpf,
}

impl Capability {
    /// The capability's number, its bit in `CapEff`.
    pub const fn number(self) -> u32 {
        match self {
            Self::NetBindService => 10,
            Self::NetAdmin => 12,
            Self::NetRaw => 13,
            Self::IpcLock => 14,
            Self::SysAdmin => 21,
            Self::Perfmon => 38,
            Self::Bpf => 39,
        }
    }

    /// The name systemd's `AmbientCapabilities=` and capabilities(7) use.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NetBindService => "CAP_NET_BIND_SERVICE",
            Self::NetAdmin => "CAP_NET_ADMIN",
            Self::NetRaw => "CAP_NET_RAW",
            Self::IpcLock => "CAP_IPC_LOCK",
            Self::SysAdmin => "CAP_SYS_ADMIN",
            Self::Perfmon => "CAP_PERFMON",
            Self::Bpf => "CAP_BPF",
        }
    }

    /// Whether the effective set `eff` holds it. CAP_SYS_ADMIN also stands
    /// for CAP_BPF and CAP_PERFMON, as the kernel's `bpf_capable()` and
    /// `perfmon_capable()` accept it.
    pub fn held_in(self, eff: u64) -> bool {
        let has = |c: Capability| eff & (1u64 << c.number()) != 0;
        has(self) || (matches!(self, Self::Bpf | Self::Perfmon) && has(Self::SysAdmin))
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One capability the daemon needs, and what for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub cap: Capability,
    pub why: &'static str,
}

/// What, besides the datapath mode, decides which capabilities are needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Environment {
    /// `RLIMIT_MEMLOCK` is unlimited: AF_XDP UMEMs need no CAP_IPC_LOCK.
    pub memlock_unlimited: bool,
    /// `net.ipv4.ip_unprivileged_port_start`: at 500 or below, binding
    /// UDP 500 needs no CAP_NET_BIND_SERVICE.
    pub unprivileged_port_start: u32,
}

impl Environment {
    /// Linux's defaults: a finite memlock limit, privileged ports below 1024.
    pub const DEFAULT: Environment = Environment {
        memlock_unlimited: false,
        unprivileged_port_start: 1024,
    };

    /// This process's: its `RLIMIT_MEMLOCK` and the sysctl (the default
    /// when either cannot be read).
    pub fn current() -> Environment {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit to the pointer it is given,
        // which points to a live, writable rlimit.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0;
        let port = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Environment {
            memlock_unlimited: ok && lim.rlim_cur == libc::RLIM_INFINITY,
            unprivileged_port_start: port.unwrap_or(Self::DEFAULT.unprivileged_port_start),
        }
    }
}

/// Every capability `mode` needs in `env`, with what it is for.
pub fn needed(mode: DatapathMode, env: Environment) -> Vec<Need> {
    let mut v = vec![
        Need {
            cap: Capability::NetAdmin,
            why: "create the tunnel interfaces (TUN), set their addresses, routes and \
                  sysctls over rtnetlink",
        },
        Need {
            cap: Capability::NetRaw,
            why: "open the raw ESP socket (IP protocol 50) of the socket datapath",
        },
    ];
    if env.unprivileged_port_start > 500 {
        v.push(Need {
            cap: Capability::NetBindService,
            why: "bind IKE's UDP port 500",
        });
    }
    if matches!(mode, DatapathMode::Xdp | DatapathMode::Xfrm) {
        v[0].why = "create the tunnel interfaces, set their addresses, routes and \
                    sysctls over rtnetlink, attach the XDP programs, install XFRM SAs";
        v.push(Need {
            cap: Capability::Bpf,
            why: "load the XDP programs and create their maps (datapath = \"xdp\" and \"xfrm\")",
        });
        v.push(Need {
            cap: Capability::Perfmon,
            why: "load the XDP programs under the verifier's privileged rules \
                  (without it some pointer operations are refused; datapath = \"xdp\" and \"xfrm\")",
        });
    }
    if mode == DatapathMode::Xdp {
        v[1].why = "open the raw ESP socket (IP protocol 50) and the AF_XDP sockets";
        if !env.memlock_unlimited {
            v.push(Need {
                cap: Capability::IpcLock,
                why: "lock the AF_XDP workers' UMEM frames in memory (datapath = \"xdp\" \
                      only; or run with LimitMEMLOCK=infinity)",
            });
        }
    }
    v
}

/// The capabilities `mode` needs in `env` that the effective set `eff`
/// lacks (empty when all are there).
pub fn missing(eff: u64, mode: DatapathMode, env: Environment) -> Vec<Need> {
    needed(mode, env)
        .into_iter()
        .filter(|n| !n.cap.held_in(eff))
        .collect()
}

/// The effective set from the text of `/proc/<pid>/status` (its `CapEff:`
/// line, 16 hexadecimal digits).
pub fn parse_cap_eff(status: &str) -> Result<u64, String> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or("no CapEff line")?;
    let hex = line.trim();
    if hex.is_empty() || hex.len() > 16 {
        return Err(format!("CapEff {hex:?}: not 1 to 16 hexadecimal digits"));
    }
    u64::from_str_radix(hex, 16).map_err(|e| format!("CapEff {hex:?}: {e}"))
}

/// Why the daemon cannot start with the privileges it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingCapabilities {
    pub mode: DatapathMode,
    /// Each capability lacking, with what it is for.
    pub missing: Vec<Need>,
    /// The effective set could not be read (then `missing` is everything
    /// needed, unchecked).
    pub unreadable: Option<String>,
}

fn mode_name(mode: DatapathMode) -> &'static str {
    match mode {
        DatapathMode::Xdp => "xdp",
        DatapathMode::Tun => "tun",
        DatapathMode::Xfrm => "xfrm",
    }
}

impl fmt::Display for MissingCapabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = mode_name(self.mode);
        match &self.unreadable {
            Some(e) => write!(
                f,
                "cannot read this process's capabilities ({e}); with datapath = \"{mode}\" \
                 xesp needs:"
            )?,
            None => write!(
                f,
                "missing {} capabilit{} for datapath = \"{mode}\":",
                self.missing.len(),
                if self.missing.len() == 1 { "y" } else { "ies" }
            )?,
        }
        for n in &self.missing {
            write!(f, "\n  {}: to {}", n.cap, n.why)?;
        }
        write!(
            f,
            "\nRun xesp as root, or as the xesp service (xesp.service grants them with \
             AmbientCapabilities= and LimitMEMLOCK=infinity)"
        )?;
        if self.mode == DatapathMode::Xdp {
            write!(
                f,
                ", or set datapath = \"tun\" (which needs neither CAP_BPF, CAP_PERFMON \
                 nor CAP_IPC_LOCK)"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for MissingCapabilities {}

/// Checks this process's effective capabilities against what `mode` needs
/// ([`needed`] in [`Environment::current`]). Call it first in `xesp run`.
pub fn check_capabilities(mode: DatapathMode) -> Result<(), MissingCapabilities> {
    let env = Environment::current();
    let eff = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("/proc/self/status: {e}"))
        .and_then(|s| parse_cap_eff(&s).map_err(|e| format!("/proc/self/status: {e}")));
    let (missing, unreadable) = match eff {
        Ok(eff) => (missing(eff, mode, env), None),
        Err(e) => (needed(mode, env), Some(e)),
    };
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCapabilities {
            mode,
            missing,
            unreadable,
        })
    }
}

/// `READY=1`: the datapath is attached and the control socket listens.
/// Does nothing when `NOTIFY_SOCKET` is unset (so do the others below).
pub fn notify_ready() -> io::Result<()> {
    sd_notify::notify(&[NotifyState::Ready])
}

/// `STATUS=...`, the line `systemctl status xesp` shows. Line breaks (which
/// would start another field of the datagram) become spaces.
pub fn notify_status(status: &str) -> io::Result<()> {
    let one_line: String = status
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    sd_notify::notify(&[NotifyState::Status(&one_line)])
}

/// `STOPPING=1`: the daemon is deleting its SAs and going away.
pub fn notify_stopping() -> io::Result<()> {
    sd_notify::notify(&[NotifyState::Stopping])
}

/// `WATCHDOG=1`: the loop that sends it is alive.
pub fn notify_watchdog() -> io::Result<()> {
    sd_notify::notify(&[NotifyState::Watchdog])
}

/// The unit's `WatchdogSec=` when systemd watches this process
/// (`WATCHDOG_USEC`, and `WATCHDOG_PID` unset or this process); send
/// [`notify_watchdog`] every half of it. `None`: no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// The `STATUS=` line for the tunnels' states, from (name, up) pairs, e.g.
/// `status.tunnels.iter().map(|t| (t.name.as_str(), t.up))`: `1 of 2
/// tunnels up: Tunnel0 up, Tunnel1 down`.
pub fn status_line<'a>(tunnels: impl IntoIterator<Item = (&'a str, bool)>) -> String {
    let (mut up, mut total) = (0, 0);
    let each = tunnels
        .into_iter()
        .map(|(name, is_up)| {
            total += 1;
            up += usize::from(is_up);
            format!("{name} {}", if is_up { "up" } else { "down" })
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("{up} of {total} tunnels up: {each}")
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::net::UnixDatagram,
        process::Command,
        time::{Duration, Instant},
    };

    use super::*;

    /// `CapEff` of root (every capability of a 6.x kernel).
    const ROOT: &str = "000001ffffffffff";
    /// `CapEff` of dist/xesp.service's AmbientCapabilities= (NET_BIND_SERVICE,
    /// NET_ADMIN, NET_RAW, PERFMON, BPF), as `setpriv --ambient-caps` of
    /// them shows it; the unit sets LimitMEMLOCK=infinity ([`UNIT_ENV`]).
    const UNIT: &str = "000000c000003400";
    const UNIT_ENV: Environment = Environment {
        memlock_unlimited: true,
        unprivileged_port_start: 1024,
    };
    /// Without BPF and PERFMON.
    const UNIT_NO_BPF: &str = "0000000000003400";
    /// An unprivileged user.
    const NOBODY: &str = "0000000000000000";

    fn status(capeff: &str) -> String {
        format!(
            "Name:\txesp\nUmask:\t0022\nState:\tS (sleeping)\nCapInh:\t0000000000000000\n\
             CapPrm:\t{capeff}\nCapEff:\t{capeff}\nCapBnd:\t{ROOT}\nCapAmb:\t{capeff}\n"
        )
    }

    fn names(v: &[Need]) -> Vec<&'static str> {
        v.iter().map(|n| n.cap.name()).collect()
    }

    fn eff(capeff: &str) -> u64 {
        parse_cap_eff(&status(capeff)).unwrap()
    }

    #[test]
    fn cap_eff_is_parsed_from_proc_status() {
        assert_eq!(eff(ROOT), 0x1ff_ffff_ffff);
        assert_eq!(eff(UNIT), (1 << 10) | (1 << 12) | (1 << 13) | (3 << 38));
        assert_eq!(eff(NOBODY), 0);
        for bad in [
            "Name:\txesp\n",
            "CapEff:\t\n",
            "CapEff:\tzz00000000000000\n",
            "CapEff:\t00000000000000000\n",
            "CapEff:\t-1\n",
        ] {
            assert!(parse_cap_eff(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn root_and_the_unit_have_all_they_need() {
        for mode in [DatapathMode::Xdp, DatapathMode::Tun] {
            for (capeff, env) in [(ROOT, Environment::DEFAULT), (UNIT, UNIT_ENV)] {
                assert_eq!(missing(eff(capeff), mode, env), vec![], "{capeff} {mode:?}");
            }
        }
        // The unit's set without its memlock limit: the UMEMs need IPC_LOCK.
        let m = missing(eff(UNIT), DatapathMode::Xdp, Environment::DEFAULT);
        assert_eq!(names(&m), ["CAP_IPC_LOCK"]);
        assert!(m[0].why.contains("LimitMEMLOCK=infinity"));
        assert_eq!(
            missing(eff(UNIT), DatapathMode::Tun, Environment::DEFAULT),
            vec![]
        );
    }

    #[test]
    fn nobody_misses_each_with_its_reason() {
        let m = missing(eff(NOBODY), DatapathMode::Xdp, Environment::DEFAULT);
        assert_eq!(
            names(&m),
            [
                "CAP_NET_ADMIN",
                "CAP_NET_RAW",
                "CAP_NET_BIND_SERVICE",
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_IPC_LOCK"
            ]
        );
        let tun = missing(eff(NOBODY), DatapathMode::Tun, Environment::DEFAULT);
        assert_eq!(
            names(&tun),
            ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"]
        );
        let text = MissingCapabilities {
            mode: DatapathMode::Xdp,
            missing: m,
            unreadable: None,
        }
        .to_string();
        assert!(text.starts_with("missing 6 capabilities for datapath = \"xdp\""));
        assert!(text.contains("CAP_BPF: to load the XDP programs"), "{text}");
        assert!(text.contains("CAP_NET_BIND_SERVICE: to bind IKE's UDP port 500"));
        assert!(text.contains("or set datapath = \"tun\""));
    }

    #[test]
    fn bpf_and_perfmon_only_for_the_xdp_programs() {
        let e = eff(UNIT_NO_BPF);
        assert_eq!(missing(e, DatapathMode::Tun, UNIT_ENV), vec![]);
        let x = missing(e, DatapathMode::Xfrm, UNIT_ENV);
        assert_eq!(names(&x), ["CAP_BPF", "CAP_PERFMON"]);
        let m = missing(e, DatapathMode::Xdp, UNIT_ENV);
        assert_eq!(names(&m), ["CAP_BPF", "CAP_PERFMON"]);
        assert!(
            m.iter()
                .all(|n| n.why.contains("datapath = \"xdp\" and \"xfrm\""))
        );
        let text = MissingCapabilities {
            mode: DatapathMode::Xdp,
            missing: m,
            unreadable: None,
        }
        .to_string();
        assert!(text.starts_with("missing 2 capabilities"), "{text}");
    }

    #[test]
    fn sys_admin_stands_for_bpf_and_perfmon() {
        let e = eff(UNIT_NO_BPF) | (1 << 21);
        assert_eq!(missing(e, DatapathMode::Xdp, UNIT_ENV), vec![]);
        // ... but not for the others.
        let only_sys_admin = 1u64 << 21;
        assert_eq!(
            names(&missing(
                only_sys_admin,
                DatapathMode::Xdp,
                Environment::DEFAULT
            )),
            [
                "CAP_NET_ADMIN",
                "CAP_NET_RAW",
                "CAP_NET_BIND_SERVICE",
                "CAP_IPC_LOCK"
            ]
        );
    }

    #[test]
    fn memlock_and_port_sysctl_replace_ipc_lock_and_bind_service() {
        let e = eff(UNIT) & !(1 << 10);
        let m = missing(e, DatapathMode::Xdp, Environment::DEFAULT);
        assert_eq!(names(&m), ["CAP_NET_BIND_SERVICE", "CAP_IPC_LOCK"]);
        let m = missing(
            e,
            DatapathMode::Xdp,
            Environment {
                memlock_unlimited: true,
                unprivileged_port_start: 500,
            },
        );
        assert_eq!(m, vec![]);
        let m = missing(
            e,
            DatapathMode::Xdp,
            Environment {
                memlock_unlimited: true,
                unprivileged_port_start: 501,
            },
        );
        assert_eq!(names(&m), ["CAP_NET_BIND_SERVICE"]);
    }

    #[test]
    fn unreadable_set_says_so_and_lists_everything() {
        let text = MissingCapabilities {
            mode: DatapathMode::Tun,
            missing: needed(DatapathMode::Tun, Environment::DEFAULT),
            unreadable: Some("/proc/self/status: No such file or directory".into()),
        }
        .to_string();
        assert!(text.starts_with("cannot read this process's capabilities"));
        assert!(
            text.contains("CAP_NET_RAW") && !text.contains("CAP_BPF"),
            "{text}"
        );
    }

    #[test]
    fn this_process_is_checked() {
        // Whatever this test runs as, the check agrees with its own CapEff.
        let own = parse_cap_eff(&std::fs::read_to_string("/proc/self/status").unwrap()).unwrap();
        let want = missing(own, DatapathMode::Xdp, Environment::current());
        match check_capabilities(DatapathMode::Xdp) {
            Ok(()) => assert!(want.is_empty()),
            Err(e) => {
                assert_eq!(e.missing, want);
                assert_eq!(e.unreadable, None);
            }
        }
    }

    #[test]
    fn status_line_counts_tunnels() {
        assert_eq!(
            status_line([("Tunnel0", true), ("Tunnel1", false)]),
            "1 of 2 tunnels up: Tunnel0 up, Tunnel1 down"
        );
        assert_eq!(status_line([]), "0 of 0 tunnels up: ");
    }

    /// Set in the child process the notification test starts.
    const CHILD: &str = "XESP_TEST_NOTIFY_CHILD";

    /// Runs in a child process with NOTIFY_SOCKET set (environment
    /// variables are set only there: the tests of this process run in
    /// threads, and setting one while another thread reads is undefined).
    /// A no-op test in the ordinary run.
    #[test]
    fn notify_child() {
        let Ok(what) = std::env::var(CHILD) else {
            return;
        };
        match what.as_str() {
            "send" => {
                notify_ready().unwrap();
                notify_status("1 of 2 tunnels up:\nTunnel0 up, Tunnel1 down").unwrap();
                notify_watchdog().unwrap();
                notify_stopping().unwrap();
            }
            "watchdog" => println!("watchdog={:?}", watchdog_interval()),
            other => panic!("unknown {CHILD}={other}"),
        }
    }

    fn child(what: &str, env: &[(&str, &str)]) -> String {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "service::tests::notify_child", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD, what)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    #[test]
    fn notifications_reach_notify_socket() {
        let dir = std::env::temp_dir().join(format!("xesp-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        child("send", &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 4 && Instant::now() < deadline {
            let n = sock.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1\n",
                "STATUS=1 of 2 tunnels up: Tunnel0 up, Tunnel1 down\n",
                "WATCHDOG=1\n",
                "STOPPING=1\n"
            ]
        );
        // Without NOTIFY_SOCKET: nothing is sent, nothing fails.
        child("send", &[]);
        sock.set_nonblocking(true).unwrap();
        assert_eq!(
            sock.recv(&mut buf).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn watchdog_interval_from_the_environment() {
        assert!(child("watchdog", &[]).contains("watchdog=None"));
        let set = child("watchdog", &[("WATCHDOG_USEC", "30000000")]);
        assert!(set.contains("watchdog=Some(30s)"), "{set}");
        // Another process's watchdog (a parent that did not unset it).
        let other = child(
            "watchdog",
            &[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "1")],
        );
        assert!(other.contains("watchdog=None"), "{other}");
        let zero = child("watchdog", &[("WATCHDOG_USEC", "0")]);
        assert!(zero.contains("watchdog=None"), "{zero}");
    }
}
