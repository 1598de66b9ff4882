use anyhow::Result;
use clap::{Parser, Subcommand};

/// xesp's project tasks. Run as root on Debian 12; each command installs what
/// it needs first.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing needs (Debian packages, bpf-linker); idempotent.
    Setup,
    /// Run every check CI runs: lint, fuzz briefly, then all tests (needs root).
    Test(xtask::test::TestArgs),
    /// Measure xesp's datapath next to strongSwan's user-space ESP and the raw
    /// crypto limit, in one run: a Markdown table on stdout, JSON and a chart
    /// in the report folder (needs root).
    Bench(xtask::bench::BenchArgs),
    /// Build the Debian package (cargo-deb): xesp, its systemd unit, the
    /// example configuration as /etc/xesp/xesp.toml, the system user.
    Package(xtask::package::PackageArgs),
    /// The reference lab in network namespaces: without an action, bring it up
    /// (if it is not) and show its status.
    Lab {
        #[command(subcommand)]
        action: Option<LabAction>,
    },
    /// Run a command as root under Debian's 6.1 kernel in QEMU (kernel ESP and
    /// XFRM, which this machine's kernel lacks): the host's / read-only, the
    /// command's exit status as this command's, e.g.
    /// `cargo xtask vm -- ip xfrm state`.
    Vm(xtask::vm::VmArgs),
}

#[derive(Subcommand)]
enum LabAction {
    /// Build the topology and start every daemon; it keeps running.
    Up,
    /// SAs, BGP sessions and routes on every side.
    Status,
    /// Stop the daemons and remove the namespaces.
    Down,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            xtask::setup::run(false)?;
        }
        Cmd::Test(args) => xtask::test::run(&args)?,
        Cmd::Bench(args) => xtask::bench::run(&args)?,
        Cmd::Package(args) => xtask::package::run(&args)?,
        Cmd::Vm(args) => {
            let status = xtask::vm::cli(&args)?;
            std::process::exit(status);
        }
        Cmd::Lab { action } => match action {
            None => {
                xtask::lab::cli_up()?;
                xtask::lab::cli_status()?;
            }
            Some(LabAction::Up) => xtask::lab::cli_up()?,
            Some(LabAction::Status) => xtask::lab::cli_status()?,
            Some(LabAction::Down) => xtask::lab::cli_down()?,
        },
    }
    Ok(())
}
