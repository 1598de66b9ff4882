//! `cargo xtask test`: everything CI runs, in the order that fails fastest.
//!
//! 1. setup (installs what is missing);
//! 2. stale lab namespaces swept;
//! 3. `cargo fmt --check` and `cargo clippy -D warnings`;
//! 4. each fuzz target for a few seconds;
//! 5. the xesp binary built, for the lab tests;
//! 6. `cargo test` of the whole workspace, whose summary ends the output
//!    (killed with everything it started if it outlives `--timeout-mins`).
//!
//! Tests need root (namespaces, eBPF).

use std::{process::Command, time::Duration};

use anyhow::{Context, Result};

use crate::{
    netns,
    setup::{self, host_cargo, project_root, run_cmd, run_cmd_within},
};

#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    pub no_lint: bool,
    /// Seconds each fuzz target runs (0 skips fuzzing).
    #[arg(long, default_value_t = 20)]
    pub fuzz_secs: u32,
    /// Minutes `cargo test` (build and run) may take before it is killed as hung.
    #[arg(long, default_value_t = 40)]
    pub timeout_mins: u32,
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

/// Fuzz workspaces and their targets: (directory under the project root, target).
pub const FUZZ_TARGETS: &[(&str, &str)] = &[
    ("fuzz", "esp_decap"),
    ("fuzz", "ike_parse"),
    ("fuzz", "ike_datagram"),
    ("fuzz", "ike_authenticated"),
    ("fuzz-daemon", "config_text"),
];

pub fn run(args: &TestArgs) -> Result<()> {
    setup::require_root("run the tests (they create network namespaces and load eBPF programs)")?;
    setup::ensure()?;
    let swept = netns::sweep_stale();
    if !swept.is_empty() {
        eprintln!(
            "[test] removed {} namespace(s) left by dead runs: {}",
            swept.len(),
            swept.join(" ")
        );
    }
    let root = project_root();
    let cargo = host_cargo();
    if !args.no_lint {
        step("cargo fmt --check");
        run_cmd(
            Command::new(&cargo)
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]),
        )
        .context("formatting differs: run `cargo fmt --all`")?;
        step("cargo clippy");
        run_cmd(Command::new(&cargo).current_dir(&root).args([
            "clippy",
            "--locked",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    if args.fuzz_secs > 0 {
        for (dir, target) in FUZZ_TARGETS {
            step(&format!("fuzz {target} for {} s", args.fuzz_secs));
            // cargo-fuzz needs nightly (sanitizers); rustup picks it.
            run_cmd(
                Command::new("rustup")
                    .current_dir(&root)
                    .args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir", dir])
                    .args([target, "--"])
                    .arg(format!("-max_total_time={}", args.fuzz_secs)),
            )
            .with_context(|| format!("fuzz target {target} found a crash (see {dir}/artifacts)"))?;
        }
    }
    step("cargo build of the xesp binary (the lab tests run it)");
    run_cmd(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--locked",
        "-p",
        "ike-control",
        "--bin",
        "xesp",
    ]))?;
    step("cargo test");
    run_cmd_within(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["test", "--locked", "--no-fail-fast", "--"])
            .args(&args.cargo_test_args),
        Duration::from_secs(u64::from(args.timeout_mins) * 60),
    )
}

fn step(what: &str) {
    eprintln!("\n[test] ==> {what}");
}
