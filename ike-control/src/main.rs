//! `xesp`: the on-premises end of a site-to-site IPsec VPN to Azure over
//! ExpressRoute Microsoft peering.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use ike_control::{
    config::{Config, ConfigError},
    control, daemon,
};

/// The on-premises end of a site-to-site IPsec VPN to an active-active Azure
/// VPN gateway (IKEv2 with a pre-shared key, one tunnel per gateway instance,
/// BGP over the tunnels by a routing daemon beside xesp).
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = "\
Examples:
  xesp check -c /etc/xesp/xesp.toml      check a configuration, show warnings
  xesp run -c /etc/xesp/xesp.toml        run the daemon (as root)
  xesp status -c /etc/xesp/xesp.toml     tunnels, IKE_SAs, CHILD_SAs, counters
  xesp status --json -s /run/xesp/xesp.sock

Logs go to standard error; RUST_LOG=debug shows every IKE exchange.
The pre-shared key is never logged or shown.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a configuration file: errors name the field at fault.
    Check {
        /// The configuration (see xesp.example.toml).
        #[arg(short, long, default_value = "/etc/xesp/xesp.toml")]
        config: PathBuf,
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
        /// Find the control socket in this configuration.
        #[arg(
            short,
            long,
            default_value = "/etc/xesp/xesp.toml",
            conflicts_with = "socket"
        )]
        config: PathBuf,
        /// The daemon's control socket (instead of --config).
        #[arg(short, long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of tables.
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
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
        Command::Run { config } => {
            load(&config).and_then(|c| daemon::run(c).map_err(|e| e.to_string()))
        }
        Command::Status {
            config,
            socket,
            json,
        } => {
            let socket = match socket {
                Some(s) => Ok(s),
                None => load(&config).map(|c| c.device.control_socket),
            };
            socket.and_then(|s| {
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
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xesp: {e}");
            ExitCode::FAILURE
        }
    }
}
