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
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            xtask::setup::run(false)?;
        }
        Cmd::Test(args) => xtask::test::run(&args)?,
    }
    Ok(())
}
