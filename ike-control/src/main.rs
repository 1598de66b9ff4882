//! `xesp`: the on-premises end of a site-to-site IPsec VPN to Azure over
//! ExpressRoute Microsoft peering.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use ike_control::{
    azure::cmd::{AllowlistArgs, ExportArgs, ImportArgs, run_allowlist, run_export, run_import},
    bgp_config,
    config::{Config, ConfigError, DatapathMode},
    control::{self, Answer, RekeyWhat, Request},
    daemon, logging, service,
};

/// The on-premises end of a site-to-site IPsec VPN to an active-active Azure
/// VPN gateway (IKEv2 with a pre-shared key, one tunnel per gateway instance,
/// BGP over the tunnels by a routing daemon beside xesp).
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = "\
Examples:
  xesp azure import --gateway gw.json --connection conn.json ... -o xesp.toml
                                         write xesp.toml from Azure's values
  xesp check -c /etc/xesp/xesp.toml      check a configuration, show warnings
  xesp bgp-config --bird -c /etc/xesp/xesp.toml > /etc/bird/bird.conf
  xesp run -c /etc/xesp/xesp.toml        run the daemon (as root)
  xesp check-caps --datapath xdp         has this process the capabilities xesp run needs?
  xesp status -c /etc/xesp/xesp.toml     tunnels, IKE_SAs, CHILD_SAs, counters
  xesp status --json -s /run/xesp/xesp.sock
  xesp sa list                           IKE_SAs and CHILD_SAs, one line each
  xesp tunnel down Tunnel0               delete its SAs, refuse the peer until up
  xesp tunnel up Tunnel0                 initiate again (or accept the peer)
  xesp tunnel rekey Tunnel1 --ike        rekey the IKE_SA (default: the CHILD_SA)
  xesp reload                            apply a changed xesp.toml (also SIGHUP)

Logs go to standard error (or the journal under systemd, or JSON with
--log-format json); RUST_LOG=debug shows every IKE exchange.
The pre-shared key is never logged or shown.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: auto (the journal under systemd, text otherwise), text,
    /// json (one object per line) or journald.
    #[arg(long, global = true, default_value = "auto")]
    log_format: logging::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Check a configuration file: errors name the field at fault.
    Check {
        /// The configuration (see xesp.example.toml).
        #[arg(short, long, default_value = "/etc/xesp/xesp.toml")]
        config: PathBuf,
    },
    /// Check that this process has the capabilities `xesp run` needs for
    /// the datapath (as root, or as the xesp service, it has): names each
    /// one missing and what it is for.
    CheckCaps {
        /// Take the datapath from this configuration.
        #[arg(
            short,
            long,
            default_value = "/etc/xesp/xesp.toml",
            conflicts_with = "datapath"
        )]
        config: PathBuf,
        /// The datapath to check for (instead of --config).
        #[arg(long, value_parser = ["xdp", "tun", "xfrm"])]
        datapath: Option<String>,
    },
    /// Run the daemon: create the tunnel interfaces, negotiate the IKE_SAs
    /// and CHILD_SAs, carry the tunnels' traffic. Stops on SIGTERM or
    /// SIGINT, deleting its SAs at the peers first.
    Run {
        #[arg(short, long, default_value = "/etc/xesp/xesp.toml")]
        config: PathBuf,
    },
    /// Per tunnel: state, peer, ingress/egress bytes, last established time
    /// (UTC), IKE_SA details, CHILD_SA counters, drops by reason.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Bring a tunnel up or down, or rekey it, without stopping the daemon.
    Tunnel {
        #[command(subcommand)]
        action: TunnelAction,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// The IKE_SAs and CHILD_SAs (`xesp sa list`).
    Sa {
        #[command(subcommand)]
        action: SaAction,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Read the configuration file again and apply what changed: [dmz] at
    /// once, tunnels added or removed (matched by name), a tunnel whose IKE
    /// settings changed is re-established, the others keep their SAs. What
    /// needs a restart is named. SIGHUP does the same.
    Reload {
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Print the routing daemon's configuration for BGP over the tunnels
    /// (the article's `router bgp 65010`) from [bgp] and the tunnels.
    #[command(after_help = "\
Example:
  xesp bgp-config --bird -c /etc/xesp/xesp.toml > /etc/bird/bird.conf && birdc configure

BIRD peers with each tunnel's bgp_peer (eBGP multihop from bgp.source, Loopback0),
routes each peer's /32 through its tunnel interface (unreachable once the interface
is gone, so that a session ends with its tunnel), advertises bgp.networks and
merges the routes learned over both tunnels into one ECMP route.")]
    BgpConfig {
        #[arg(short, long, default_value = "/etc/xesp/xesp.toml")]
        config: PathBuf,
        /// BIRD 2 (the only routing daemon supported so far).
        #[arg(long, required = true)]
        bird: bool,
        /// A file BIRD logs to (`log "FILE" all;`).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
    },
    /// Azure in and out: write xesp.toml from the gateway's JSON, print the
    /// matching Azure side, build the DMZ allowlist.
    #[command(subcommand)]
    Azure(AzureCommand),
}

#[derive(Subcommand)]
enum AzureCommand {
    /// Write a complete xesp.toml from the VPN gateway's JSON (and the
    /// connection's) and the on-prem values, checked as `xesp check` does;
    /// every value says where it came from. The sharedKey goes to a psk_file
    /// (mode 0600), never into the TOML.
    Import(ImportArgs),
    /// Print the Azure side matching this device: the local network gateway
    /// and the connection (its IPsec policy = xesp's first proposals), as az
    /// commands or an ARM template.
    Export(ExportArgs),
    /// Set [dmz] allow from Microsoft's published prefixes: the communities
    /// named in Get-AzBgpServiceCommunity's output, or service tags. Prints
    /// the difference; --write updates the file.
    Allowlist(AllowlistArgs),
}

/// How a client finds the running daemon.
#[derive(Args)]
struct DaemonArgs {
    /// Find the control socket in this configuration.
    #[arg(
        short,
        long,
        default_value = "/etc/xesp/xesp.toml",
        conflicts_with = "socket",
        global = true
    )]
    config: PathBuf,
    /// The daemon's control socket (instead of --config).
    #[arg(short, long, global = true)]
    socket: Option<PathBuf>,
}

impl DaemonArgs {
    fn socket(&self) -> Result<PathBuf, String> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => load(&self.config).map(|c| c.device.control_socket),
        }
    }

    /// Sends `request`; an answer that says no is an error.
    fn command(&self, request: &Request) -> Result<(), String> {
        let a: Answer = control::command(&self.socket()?, request).map_err(|e| e.to_string())?;
        for n in &a.not_applied {
            eprintln!("not applied: {n}");
        }
        if a.ok {
            println!("{}", a.message);
            Ok(())
        } else {
            Err(a.message)
        }
    }
}

#[derive(Subcommand)]
enum TunnelAction {
    /// Initiate the tunnel (or accept the peer's again, as responder).
    Up {
        /// The tunnel, as named in xesp.toml (e.g. Tunnel0).
        name: String,
    },
    /// Delete the tunnel's IKE_SAs at the peer and refuse its new ones
    /// until `xesp tunnel up`.
    Down {
        /// The tunnel, as named in xesp.toml (e.g. Tunnel0).
        name: String,
    },
    /// Rekey the tunnel's CHILD_SA (make-before-break), or its IKE_SA.
    Rekey {
        /// The tunnel, as named in xesp.toml (e.g. Tunnel0).
        name: String,
        /// Rekey the IKE_SA instead of the CHILD_SA.
        #[arg(long)]
        ike: bool,
    },
}

#[derive(Subcommand)]
enum SaAction {
    /// Each tunnel's IKE_SA and CHILD_SAs with their SPIs, algorithms,
    /// traffic selectors and counters.
    List {
        /// Print JSON (the status document) instead.
        #[arg(long)]
        json: bool,
    },
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| match e {
        // These name the file already.
        ConfigError::Read { .. } | ConfigError::Syntax { .. } => e.to_string(),
        _ => format!("{}: {e}", path.display()),
    })
}

/// IKE allocates per message (parsed and built payloads, keys): a setup
/// makes about 370 allocations. With mimalloc rather than glibc's malloc
/// `cargo bench -p xesp-benches --bench ike` (which runs with the same
/// allocator) sets up about 4% more IKE_SAs per second per core with ECP256
/// and Curve25519. The datapath does not allocate per packet.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Check { config } => load(&config).map(|c| {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: OK, {} tunnels ({}), public address {}, datapath {:?}",
                config.display(),
                c.tunnels.len(),
                c.tunnels
                    .iter()
                    .map(|t| format!("{} to {}", t.name, t.peer.remote))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.device.public_address,
                c.device.datapath
            );
        }),
        Command::CheckCaps { config, datapath } => {
            let mode = match datapath.as_deref() {
                Some("tun") => Ok(DatapathMode::Tun),
                Some("xfrm") => Ok(DatapathMode::Xfrm),
                Some(_) => Ok(DatapathMode::Xdp),
                None => load(&config).map(|c| c.device.datapath),
            };
            mode.and_then(|mode| {
                service::check_capabilities(mode).map_err(|e| e.to_string())?;
                println!(
                    "capabilities: OK for datapath = \"{}\"",
                    format!("{mode:?}").to_lowercase()
                );
                Ok(())
            })
        }
        Command::Run { config } => load(&config).and_then(|c| {
            // Name every missing capability now, not the first failing call.
            service::check_capabilities(c.device.datapath).map_err(|e| e.to_string())?;
            daemon::run(c, config.clone()).map_err(|e| e.to_string())
        }),
        Command::Status { daemon, json } => daemon.socket().and_then(|s| {
            let st = control::query_status(&s).map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", control::render(&st));
            }
            Ok(())
        }),
        Command::Sa {
            action: SaAction::List { json },
            daemon,
        } => daemon.socket().and_then(|s| {
            let st = control::query_status(&s).map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&st.tunnels).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", control::render_sas(&st));
            }
            Ok(())
        }),
        Command::Tunnel { action, daemon } => daemon.command(&match action {
            TunnelAction::Up { name } => Request::Up(name),
            TunnelAction::Down { name } => Request::Down(name),
            TunnelAction::Rekey { name, ike } => Request::Rekey(
                name,
                if ike {
                    RekeyWhat::Ike
                } else {
                    RekeyWhat::Child
                },
            ),
        }),
        Command::Reload { daemon } => daemon.command(&Request::Reload),
        Command::Azure(AzureCommand::Import(a)) => run_import(&a)
            .map(|s| print!("{s}"))
            .map_err(|e| e.to_string()),
        Command::BgpConfig {
            config,
            bird: _,
            log,
        } => load(&config).and_then(|c| {
            bgp_config::bird(&c, log.as_deref())
                .map(|s| print!("{s}"))
                .map_err(|e| format!("{}: {e}", config.display()))
        }),
        Command::Azure(AzureCommand::Allowlist(a)) => run_allowlist(&a)
            .map(|s| print!("{s}"))
            .map_err(|e| e.to_string()),
        Command::Azure(AzureCommand::Export(a)) => run_export(&a)
            .map(|(s, warnings)| {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
                print!("{s}");
            })
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xesp: {e}");
            ExitCode::FAILURE
        }
    }
}
