use anyhow::Result;
use clap::{Parser, Subcommand};

/// xesp project tasks.
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
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            xtask::setup::run(false)?;
        }
    }
    Ok(())
}
