//! Builds the eBPF object (`datapath-ebpf`) and hands its path to the crate.
//!
//! The eBPF crate is compiled for `bpfel-unknown-none` by Debian's rustc (it
//! ships the library source `-Z build-std=core` needs; rustup's toolchains here
//! do not) and linked by bpf-linker, both installed by `cargo xtask setup`.
//! The crate itself is built by whichever toolchain runs this build.
//!
//! Knobs: `XESP_EBPF_OBJ` (use a prebuilt object), `BPF_LINKER`,
//! `XESP_EBPF_CARGO`, `XESP_EBPF_RUSTC`.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, exit},
};

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(1);
}

fn bpf_linker() -> PathBuf {
    if let Some(p) = env::var_os("BPF_LINKER") {
        return p.into();
    }
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    match home.map(|h| h.join("bin/bpf-linker")) {
        Some(p) if p.exists() => p,
        _ => "bpf-linker".into(),
    }
}

fn main() {
    for v in [
        "XESP_EBPF_OBJ",
        "BPF_LINKER",
        "XESP_EBPF_CARGO",
        "XESP_EBPF_RUSTC",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR not set")));
    let dest = out_dir.join("xesp.bpf.o");
    if let Some(obj) = env::var_os("XESP_EBPF_OBJ") {
        println!("cargo:rerun-if-changed={}", Path::new(&obj).display());
        if let Err(e) = std::fs::copy(&obj, &dest) {
            fail(&format!("XESP_EBPF_OBJ={}: {e}", Path::new(&obj).display()));
        }
        return;
    }

    let manifest = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| fail("no CARGO_MANIFEST_DIR")),
    );
    let root = manifest
        .parent()
        .unwrap_or_else(|| fail("datapath-user has no parent directory"));
    for p in [
        "datapath-ebpf/src",
        "datapath-ebpf/Cargo.toml",
        "datapath-ebpf/common/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let cargo = env::var_os("XESP_EBPF_CARGO").unwrap_or_else(|| "/usr/bin/cargo".into());
    let rustc = env::var_os("XESP_EBPF_RUSTC").unwrap_or_else(|| "/usr/bin/rustc".into());
    let linker = bpf_linker();
    for (what, path) in [
        ("Debian's cargo", &PathBuf::from(&cargo)),
        ("Debian's rustc", &PathBuf::from(&rustc)),
    ] {
        if !path.exists() {
            fail(&format!(
                "{what} ({}) is missing: run `cargo xtask setup` first",
                path.display()
            ));
        }
    }
    // One target directory for every profile of the outer build.
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--locked",
            "--release",
            "--package",
            "datapath-ebpf",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        // What the outer cargo sets for build scripts must not leak into the nested build.
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_PRIMARY_PACKAGE")
        .env_remove("RUSTDOC")
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // BTF for readable verifier logs and aya-log.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    let status = cmd
        .status()
        .unwrap_or_else(|e| fail(&format!("starting {cmd:?}: {e}")));
    if !status.success() {
        fail(&format!(
            "building the eBPF object failed ({status}); if bpf-linker ({}) is missing, run `cargo xtask setup`",
            linker.display()
        ));
    }
    let obj = target_dir.join("bpfel-unknown-none/release/xesp-ebpf");
    if let Err(e) = std::fs::copy(&obj, &dest) {
        fail(&format!("copying {}: {e}", obj.display()));
    }
}
