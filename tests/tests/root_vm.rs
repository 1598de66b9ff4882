//! The VM harness (`xtask::vm`) end to end, in one boot of Debian's 6.1
//! kernel under QEMU: `tests/vm/xfrm_esp.sh` checks the XFRM modules, starts
//! the host's strongSwan and xesp binaries in the guest, and pings through
//! kernel ESP (AES-GCM in UDP 4500, ESN, replay window 128) between two
//! namespaces joined by xfrm interfaces. The guest runs this very test binary
//! too, for the UDP_ENCAP socket the kernel needs (`guest_udp_encap_holder`).
//!
//! Asserted here, on the host: the guest's exit status (the script ends with
//! a status chosen here, 23, so a non-zero status is seen to cross intact and
//! any other one is a failure), and each SA's packet counter against the
//! echo requests sent. A second test checks that the timeout kills QEMU.

use std::{
    env, fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use xtask::vm::{VmCommand, VmError};

const PINGS: u64 = 5;
/// The guest script's status when every check passed.
const SUCCESS_STATUS: i32 = 23;
const SPI_ONPREM_TO_AZURE: &str = "0xa0000001";
const SPI_AZURE_TO_ONPREM: &str = "0xb0000001";

/// One SA of `ip -s xfrm state`.
#[derive(Debug)]
struct State {
    spi: String,
    text: String,
    packets: u64,
}

/// Splits `ip -s xfrm state` into SAs (each starts with `src ... dst ...` at
/// the start of a line) and reads each one's SPI and current packet count
/// (`  336(bytes), 5(packets)` under `lifetime current:`).
fn parse_states(text: &str) -> Result<Vec<State>> {
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("src ") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
        .into_iter()
        .map(|text| {
            let spi = text
                .split_whitespace()
                .skip_while(|w| *w != "spi")
                .nth(1)
                .and_then(|w| w.split('(').next())
                .with_context(|| format!("no spi in\n{text}"))?
                .to_string();
            let packets = text
                .lines()
                .skip_while(|l| !l.contains("lifetime current:"))
                .nth(1)
                .and_then(|l| l.split(',').find(|p| p.contains("(packets)")))
                .and_then(|p| p.trim().strip_suffix("(packets)"))
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no current packet count in\n{text}"))?;
            Ok(State { spi, text, packets })
        })
        .collect()
}

fn state<'a>(states: &'a [State], spi: &str, side: &str) -> &'a State {
    states
        .iter()
        .find(|s| s.spi == spi)
        .unwrap_or_else(|| panic!("{side} has no SA with SPI {spi}: {states:#?}"))
}

#[test]
fn root_vm_kernel_esp_in_udp_through_xfrm_interfaces() -> Result<()> {
    let started = Instant::now();
    let root = xtask::setup::project_root();
    let script = root.join("tests/vm/xfrm_esp.sh");
    let work = xtask::vm::fresh_work_dir("root_vm")?;
    let exe = env::current_exe().context("this test binary's path")?;
    let holder = format!(
        "{} --exact guest_udp_encap_holder --ignored --nocapture",
        exe.display()
    );
    let mut cmd = VmCommand::new(["sh".to_string(), script.display().to_string()])
        .env("RESULTS", work.display().to_string())
        .env("ENCAP_HOLDER", holder)
        .env("PINGS", PINGS.to_string())
        .env("SUCCESS_STATUS", SUCCESS_STATUS.to_string())
        .work_dir(&work)
        .cwd(&root)
        .timeout(Duration::from_secs(170));
    // `cargo xtask test` builds xesp first; a bare `cargo test` may not have.
    let xesp = root.join("target/debug/xesp");
    if xesp.is_file() {
        cmd = cmd.env("XESP_BIN", xesp.display().to_string());
    }
    let out = xtask::vm::run(&cmd)?;
    eprintln!(
        "[root_vm] boot {:.1} s, VM {:.1} s, test {:.1} s",
        out.boot_secs,
        out.total_secs,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        out.status, SUCCESS_STATUS,
        "the guest script failed (status {}); its output:\n{}",
        out.status, out.output
    );
    assert!(
        out.output.contains("== all checks passed"),
        "{}",
        out.output
    );

    let read = |name: &str| {
        fs::read_to_string(work.join(name)).with_context(|| format!("the guest wrote no {name}"))
    };
    let ping = read("ping.txt")?;
    assert!(
        ping.contains(&format!("{PINGS} packets transmitted, {PINGS} received")),
        "{ping}"
    );
    for (side, file, out_spi, in_spi) in [
        (
            "onprem",
            "xfrm-onprem.txt",
            SPI_ONPREM_TO_AZURE,
            SPI_AZURE_TO_ONPREM,
        ),
        (
            "azure",
            "xfrm-azure.txt",
            SPI_AZURE_TO_ONPREM,
            SPI_ONPREM_TO_AZURE,
        ),
    ] {
        let states = parse_states(&read(file)?)?;
        assert_eq!(states.len(), 2, "{side}: {states:#?}");
        for s in &states {
            for expected in [
                "mode tunnel",
                "rfc4106(gcm(aes))",
                "encap type espinudp sport 4500 dport 4500",
                "anti-replay esn context",
                "replay_window 128",
                "if_id 0x2a",
            ] {
                assert!(
                    s.text.contains(expected),
                    "{side} SA {}: no {expected:?} in\n{}",
                    s.spi,
                    s.text
                );
            }
        }
        // Every echo request went out in one SA and every reply came back in
        // the other: nothing else crossed the tunnel.
        let sent = state(&states, out_spi, side);
        let received = state(&states, in_spi, side);
        assert_eq!(sent.packets, PINGS, "{side} outbound SA:\n{}", sent.text);
        assert_eq!(
            received.packets, PINGS,
            "{side} inbound SA:\n{}",
            received.text
        );
    }
    let stats = read("swanctl-stats.txt")?;
    assert!(stats.contains("uptime"), "swanctl --stats said:\n{stats}");
    let modules = read("modules.txt")?;
    for m in ["xfrm_user", "xfrm_interface", "esp4", "veth"] {
        assert!(modules.lines().any(|l| l == m), "{m} not loaded: {modules}");
    }
    Ok(())
}

#[test]
fn root_vm_timeout_kills_qemu() {
    let mut cmd = VmCommand::new(["sleep", "600"]).timeout(Duration::from_secs(3));
    cmd.echo = false;
    let err = xtask::vm::run(&cmd).expect_err("a 3 s timeout on sleep 600 must fail");
    match err.downcast_ref::<VmError>() {
        Some(VmError::TimedOut { qemu_pid, secs, .. }) => {
            assert_eq!(*secs, 3);
            assert!(
                !Path::new(&format!("/proc/{qemu_pid}")).exists(),
                "QEMU (pid {qemu_pid}) still runs after the timeout"
            );
            assert!(err.to_string().contains("timed out after 3 s"), "{err}");
        }
        _ => panic!("expected VmError::TimedOut, got: {err:#}"),
    }
}

/// Runs inside the VM only (started by `tests/vm/xfrm_esp.sh` through
/// `ENCAP_HOLDER`); without `ENCAP_READY` it does nothing.
#[test]
#[ignore = "runs inside the test VM, started by tests/vm/xfrm_esp.sh"]
fn guest_udp_encap_holder() {
    let (Some(ready), Some(stop)) = (env::var_os("ENCAP_READY"), env::var_os("ENCAP_STOP")) else {
        return;
    };
    xtask::vm::guest::hold_udp_encap(
        4500,
        Path::new(&ready),
        Path::new(&stop),
        Duration::from_secs(300),
    )
    .expect("holding a UDP_ENCAP socket on 4500");
}

#[test]
fn ip_xfrm_state_output_is_parsed() {
    let text = "src 192.0.2.1 dst 192.0.2.2
\tproto esp spi 0xa0000001(2684354561) reqid 42(0x0000002a) mode tunnel
\treplay-window 0 seq 0x00000000 flag esn (0x00000080)
\tlifetime current:
\t  420(bytes), 5(packets)
\t  add 2026-12-01 13:50:00 use 2026-12-01 13:50:01
src 192.0.2.2 dst 192.0.2.1
\tproto esp spi 0xb0000001(2952790017) reqid 42(0x0000002a) mode tunnel
\tlifetime current:
\t  0(bytes), 0(packets)
";
    let s = parse_states(text).unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!((s[0].spi.as_str(), s[0].packets), ("0xa0000001", 5));
    assert_eq!((s[1].spi.as_str(), s[1].packets), ("0xb0000001", 0));
    assert!(parse_states("src 1 dst 2\n\tproto esp spi 0x1(1)\n").is_err());
}

/// The path of the `xfrm_kernel` test binary of datapath-user, built if
/// needed (`cargo test --no-run` prints where).
fn xfrm_kernel_binary(root: &Path) -> Result<String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(root)
        .args([
            "test",
            "--locked",
            "-p",
            "datapath-user",
            "--test",
            "xfrm_kernel",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("cargo test --no-run")?;
    anyhow::ensure!(
        out.status.success(),
        "building xfrm_kernel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["target"]["name"] == "xfrm_kernel" && m["executable"].is_string())
        .and_then(|m| m["executable"].as_str().map(String::from))
        .context("cargo named no xfrm_kernel executable")
}

/// datapath-user's XFRM layer against Debian's kernel: its own kernel test
/// (SAs, narrowed policies, an xfrm interface, counters, a hard expire,
/// `flush_ours` sparing the host's SAs) run in the guest, where missing
/// kernel support is a failure, not a skip.
#[test]
fn root_vm_xfrm_netlink_layer_against_the_kernel() -> Result<()> {
    let root = xtask::setup::project_root();
    let bin = xfrm_kernel_binary(&root)?;
    let work = xtask::vm::fresh_work_dir("root_vm_xfrm")?;
    let cmd = VmCommand::new([bin.as_str(), "--test-threads", "1", "--color", "never"])
        .env("XESP_EXPECT_XFRM", "1")
        .work_dir(&work)
        .cwd(root.join("datapath-user"))
        .timeout(Duration::from_secs(240));
    let out = xtask::vm::run(&cmd)?;
    eprintln!(
        "[root_vm_xfrm] boot {:.1} s, VM {:.1} s",
        out.boot_secs, out.total_secs
    );
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(
        out.output.contains("test result: ok. 1 passed"),
        "{}",
        out.output
    );
    Ok(())
}
