//! Interop in the reference lab with kernel ESP on every side, in one boot
//! of Debian's 6.1 kernel under QEMU (this machine's kernel has no ESP):
//! xesp with `datapath = "xfrm"` on on-prem, and two strongSwan 5.9.8
//! gateways with kernel-netlink (no libipsec): route-based, each CHILD_SA
//! bound by `if_id` to an xfrm interface `ipsec0`, BIRD running eBGP over
//! it. The guest runs this very test binary's `guest_lab_...` test, which
//! builds the lab twice, once per ESP suite xesp proposes:
//!
//! | suite | IKE (xesp's first proposal) | ESP | kernel algorithm |
//! | --- | --- | --- | --- |
//! | gcm | aes256-sha256-modp2048 (Azure's default) | aes256gcm16 | `rfc4106(gcm(aes))`, ICV 128 |
//! | cbc | aes256-sha1-modp1024 (the article's Cisco set) | aes256-sha1 | `cbc(aes)` + `hmac(sha1)` truncated to 96 |
//!
//! and checks, for each: both tunnels up on both sides (xesp's status,
//! `swanctl --list-sas` INSTALLED with that algorithm), the SAs in the
//! gateways' kernels (`ip xfrm state`: the algorithm, tunnel mode, the
//! interface's if_id, plain ESP since the lab has no NAT) and in on-prem's
//! (xesp's, if_id 1 and 2), BGP Established over both tunnels with the
//! VNet's route on on-prem over both (ECMP), pings from both LAN networks to
//! the VNet's VM all answered, and UDP flows from 16 source ports spread
//! over both tunnels, each gateway's inbound SA counting at least one flow
//! and together at least every datagram sent; then, under 60 echo requests,
//! a CHILD_SA rekey and an IKE_SA rekey of each tunnel with none lost, and
//! each gateway's kernel left with the new CHILD_SA's SAs only.
//!
//! The guest writes what it measured to `matrix.json` in the shared work
//! directory; the host checks the guest test passed and that matrix.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    env, fs,
    net::{SocketAddrV4, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use xtask::{
    lab::{
        Lab, LabConfig, OnpremMode, kernel_sa,
        strongswan::EspBackend,
        topology::{GW_IF_ID, GW_PUBLIC, LAN_HOSTS, ONPREM_PUBLIC, VM, VNET},
        xesp::{ARTICLE_IKE, XespSettings},
    },
    netns::wait_until,
    vm::VmCommand,
};

/// The guest's half, by its exact name.
const GUEST_TEST: &str = "guest_lab_xesp_xfrm_with_kernel_strongswan_gateways";
/// Echo requests from each LAN network.
const PINGS: u32 = 5;
/// UDP flows (source ports) and datagrams in each.
const FLOWS: u16 = 16;
const PER_FLOW: u64 = 40;
/// The UDP port the flows go to on the VM (discard: nothing listens).
const FLOW_PORT: u16 = 9;
/// Echo requests sent (at 10 a second) while both tunnels rekey.
const REKEY_PINGS: u32 = 60;

/// Whether `sa` has exactly the suite's algorithms.
fn has_suite(sa: &kernel_sa::KernelSa, suite: &Suite) -> bool {
    suite.kernel.iter().all(|(kind, name, key_bits, bits)| {
        sa.algorithm(kind)
            .is_some_and(|a| a.name == *name && a.key_bits == *key_bits && a.bits == *bits)
    })
}

/// The suite's kernel algorithms as the matrix shows them.
fn kernel_algorithms(suite: &Suite) -> Vec<String> {
    suite
        .kernel
        .iter()
        .map(|(kind, name, key_bits, bits)| match bits {
            Some(b) => format!("{kind} {name} key {key_bits} bits {b}"),
            None => format!("{kind} {name} key {key_bits}"),
        })
        .collect()
}

/// One ESP suite of the matrix.
struct Suite {
    name: &'static str,
    ike: &'static str,
    esp: &'static str,
    /// What `swanctl --list-sas` shows for the CHILD_SA.
    swanctl: &'static str,
    /// The SAs' algorithms in the kernel: `(kind, name, key bits, ICV or
    /// truncation bits)` as `ip xfrm state` shows them.
    kernel: &'static [(&'static str, &'static str, usize, Option<u32>)],
}

const SUITES: [Suite; 2] = [
    Suite {
        name: "gcm",
        ike: "aes256-sha256-modp2048",
        esp: "aes256gcm16",
        swanctl: "AES_GCM_16-256",
        // 256-bit key and the 32-bit salt (RFC 4106 §8.1), 16-octet ICV.
        kernel: &[("aead", "rfc4106(gcm(aes))", 288, Some(128))],
    },
    Suite {
        name: "cbc",
        ike: "aes256-sha1-modp1024",
        esp: "aes256-sha1",
        swanctl: "AES_CBC-256/HMAC_SHA1_96",
        // RFC 3602, and RFC 2404's HMAC-SHA1-96.
        kernel: &[
            ("enc", "cbc(aes)", 256, None),
            ("auth-trunc", "hmac(sha1)", 160, Some(96)),
        ],
    },
];

#[test]
fn root_vm_lab_xesp_xfrm_with_kernel_strongswan_gateways() -> Result<()> {
    let started = Instant::now();
    let root = xtask::setup::project_root();
    let xesp = xtask::lab::xesp::binary()?;
    let work = xtask::vm::fresh_work_dir("root_vm_lab")?;
    let exe = env::current_exe().context("this test binary's path")?;
    let mut cmd = VmCommand::new([
        exe.display().to_string(),
        "--exact".into(),
        GUEST_TEST.into(),
        "--ignored".into(),
        "--nocapture".into(),
        "--test-threads".into(),
        "1".into(),
        "--color".into(),
        "never".into(),
    ])
    .env("XESP_BIN", xesp.display().to_string())
    // The project is read-only in the guest; sockets want a tmpfs.
    .env("XESP_LAB_DIR", "/tmp/xesp-lab")
    .env("RESULTS", work.display().to_string())
    .work_dir(&work)
    .cwd(&root)
    // A guard against a hung guest, not a time limit: about 110-190 s of
    // guest time on this 2-core machine, more when other builds load it.
    .timeout(Duration::from_secs(480));
    cmd.mem_mb = 1536;
    let out = xtask::vm::run(&cmd)?;
    eprintln!(
        "[root_vm_lab] boot {:.1} s, VM {:.1} s, test {:.1} s",
        out.boot_secs,
        out.total_secs,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(out.status, 0, "the guest test failed:\n{}", out.output);
    assert!(
        out.output.contains("test result: ok. 1 passed"),
        "{}",
        out.output
    );
    let text = fs::read_to_string(work.join("matrix.json")).context("the guest wrote no matrix")?;
    let matrix: Value = serde_json::from_str(&text)?;
    let rows = matrix.as_array().context("the matrix is not a list")?;
    assert_eq!(rows.len(), SUITES.len(), "{text}");
    for (row, suite) in rows.iter().zip(&SUITES) {
        assert_eq!(row["suite"], suite.name, "{row:#}");
        assert_eq!(row["tunnels_up"], 2, "{row:#}");
        assert_eq!(row["gateway_children_installed"], json!([1, 1]), "{row:#}");
        assert_eq!(row["gateway_kernel_sas"], json!([2, 2]), "{row:#}");
        assert_eq!(row["onprem_kernel_sas"], 4, "{row:#}");
        assert_eq!(
            row["kernel_algorithms"],
            json!(kernel_algorithms(suite)),
            "{row:#}"
        );
        assert_eq!(row["bgp_established"], json!([1, 1, 2]), "{row:#}");
        assert_eq!(row["ecmp_nexthops"], 2, "{row:#}");
        assert_eq!(row["pings_received"], 2 * PINGS, "{row:#}");
        assert_eq!(row["rekey_pings_received"], REKEY_PINGS, "{row:#}");
        assert_eq!(row["gateway_sas_replaced"], json!([true, true]), "{row:#}");
        let rekeys: Vec<u64> = serde_json::from_value(row["rekeys"].clone())?;
        assert!(rekeys.iter().all(|r| *r >= 2), "{row:#}");
        let flows: Vec<u64> = serde_json::from_value(row["gateway_in_packets_flows"].clone())?;
        assert!(flows.iter().all(|d| *d >= PER_FLOW), "{row:#}");
        assert!(
            flows.iter().sum::<u64>() >= u64::from(FLOWS) * PER_FLOW,
            "{row:#}"
        );
        // The gateways' SAs as the guest saw them: one each way with the
        // suite's algorithms, bound to the gateway's xfrm interface.
        for (i, if_id) in GW_IF_ID.iter().enumerate() {
            let name = format!("xfrm-state-{}-azgw{}.txt", suite.name, i + 1);
            let text = fs::read_to_string(work.join(&name))
                .with_context(|| format!("the guest wrote no {name}"))?;
            let sas = kernel_sa::parse(&text)?;
            assert_eq!(sas.len(), 2, "{name}:\n{text}");
            assert!(
                sas.iter().any(|sa| sa.dst == GW_PUBLIC[i])
                    && sas.iter().any(|sa| sa.src == GW_PUBLIC[i]),
                "{name}:\n{text}"
            );
            for sa in &sas {
                assert!(has_suite(sa, suite), "{name}:\n{text}");
                assert!(
                    sa.text.contains(&format!("if_id {if_id:#x}\n")),
                    "{name}:\n{text}"
                );
                assert!(sa.packets > 0, "{name}: an SA carried nothing:\n{text}");
            }
        }
    }
    eprintln!("[root_vm_lab] matrix: {text}");
    Ok(())
}

/// Runs inside the VM only (started by the test above): both suites'
/// labs, one after the other; writes `$RESULTS/matrix.json`.
#[test]
#[ignore = "runs inside the test VM, started by root_vm_lab_xesp_xfrm_with_kernel_strongswan_gateways"]
fn guest_lab_xesp_xfrm_with_kernel_strongswan_gateways() -> Result<()> {
    ensure!(
        env::var_os("XESP_VM").is_some(),
        "this test needs the VM's kernel (ESP, xfrm interfaces): run {} instead",
        "root_vm_lab_xesp_xfrm_with_kernel_strongswan_gateways"
    );
    let results = env::var_os("RESULTS").context("RESULTS (the shared work directory) unset")?;
    let mut rows = Vec::new();
    for suite in &SUITES {
        let t = Instant::now();
        let mut row =
            interop(suite, Path::new(&results)).with_context(|| format!("suite {}", suite.name))?;
        row["seconds"] = json!((t.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        eprintln!("[guest] {}: {row}", suite.name);
        rows.push(row);
    }
    fs::write(
        Path::new(&results).join("matrix.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    Ok(())
}

/// The lab for `suite`: xesp xfrm on on-prem proposing only that ESP suite,
/// the gateways on kernel ESP; every check, and what it measured.
fn interop(suite: &Suite, results: &Path) -> Result<Value> {
    let ike = ARTICLE_IKE
        .replace(
            r#"esp_proposals = ["aes256gcm16", "aes256-sha1"]"#,
            &format!(r#"esp_proposals = ["{}"]"#, suite.esp),
        )
        .replace(
            r#"proposals = ["aes256-sha256-modp2048", "aes256-sha1-modp1024", "aes128-sha1-modp1024"]"#,
            &format!(r#"proposals = ["{}"]"#, suite.ike),
        );
    ensure!(
        ike.contains(suite.esp) && !ike.contains("aes128-sha1-modp1024"),
        "ARTICLE_IKE changed: {ike}"
    );
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        gateway_backend: EspBackend::Kernel,
        xesp: XespSettings {
            datapath: "xfrm".into(),
            ike,
            ..XespSettings::default()
        },
        ..LabConfig::default()
    })?;
    let fail = |what: String| -> anyhow::Error { anyhow::anyhow!("{what}\n{}", lab.status()) };
    // Tunnels, CHILD_SAs, BGP on all three sides, the ECMP route: TCG is
    // slow, so generously.
    lab.wait_ready(Duration::from_secs(180))?;
    let (x, onprem_bird) = lab.xesp.as_ref().context("no xesp")?;

    let status = x.status_json()?;
    let tunnels = status["tunnels"].as_array().context("no tunnels")?;
    let tunnels_up = tunnels.iter().filter(|t| t["up"] == true).count();

    // The gateways: CHILD_SA installed with the suite, its SAs in the
    // kernel bound to ipsec0's if_id, plain ESP (no NAT in the lab).
    let mut children = Vec::new();
    let mut kernel_sas = Vec::new();
    for (i, gw) in lab.gateways.iter().enumerate() {
        let sas = gw.charon.list_sas();
        if !sas.contains(suite.swanctl) {
            return Err(fail(format!(
                "azgw{}: no {} CHILD_SA",
                i + 1,
                suite.swanctl
            )));
        }
        children.push(gw.charon.installed_children());
        let k = kernel_sa::list(&lab.ns.azgw[i])?;
        let text: String = k.iter().map(|sa| sa.text.as_str()).collect();
        fs::write(
            results.join(format!("xfrm-state-{}-azgw{}.txt", suite.name, i + 1)),
            text,
        )?;
        for sa in &k {
            let ends = [sa.src, sa.dst];
            let if_id = format!("if_id {:#x}\n", GW_IF_ID[i]);
            if !(ends == [GW_PUBLIC[i], ONPREM_PUBLIC] || ends == [ONPREM_PUBLIC, GW_PUBLIC[i]])
                || !sa.text.contains("mode tunnel")
                || !sa.text.contains(&if_id)
                || !has_suite(sa, suite)
                || sa.encapsulated()
            {
                return Err(fail(format!(
                    "azgw{}: SA {} is not {:?} in tunnel mode on {if_id:?}, plain ESP with on-prem:\n{}",
                    i + 1,
                    sa.spi,
                    suite.kernel,
                    sa.text
                )));
            }
        }
        kernel_sas.push(k.len());
    }
    // On-prem: xesp's SAs, two per tunnel, on Tunnel0's and Tunnel1's if_id.
    let onprem_sas = kernel_sa::list(&lab.ns.onprem)?;
    for (i, id) in [1u32, 2].iter().enumerate() {
        let on = onprem_sas
            .iter()
            .filter(|sa| sa.text.contains(&format!("if_id {id:#x}\n")))
            .filter(|sa| has_suite(sa, suite))
            .filter(|sa| sa.src == GW_PUBLIC[i] || sa.dst == GW_PUBLIC[i])
            .count();
        if on != 2 {
            return Err(fail(format!(
                "onprem: {on} SAs of Tunnel{i} (if_id {id}) with {:?}",
                suite.kernel
            )));
        }
    }

    // BGP over both xfrm interfaces, and the VNet's route over both tunnels.
    let bgp = [
        lab.gateways[0].bird.established(),
        lab.gateways[1].bird.established(),
        onprem_bird.established(),
    ];
    let route = lab.ns.onprem.exec("ip", &["route", "show", VNET])?;
    let ecmp = route.matches("nexthop").count();
    if !(route.contains("dev Tunnel0") && route.contains("dev Tunnel1")) {
        return Err(fail(format!("{VNET} is not over both tunnels: {route}")));
    }

    // Pings from both LAN networks, counted by the gateways' kernels.
    let before = gateway_packets(&lab)?;
    let mut received = 0;
    for src in LAN_HOSTS {
        let out = lab
            .ping_vm(src, PINGS)
            .map_err(|e| fail(format!("ping {VM} from {src}: {e:#}")))?;
        if out.contains(&format!("{PINGS} packets transmitted, {PINGS} received")) {
            received += PINGS;
        } else {
            return Err(fail(format!("ping {VM} from {src}: {out}")));
        }
    }
    let after_pings = gateway_packets(&lab)?;
    let ping_in = delta(&before, &after_pings, 0);
    let ping_out = delta(&before, &after_pings, 1);
    if ping_in.iter().sum::<u64>() < u64::from(2 * PINGS)
        || ping_out.iter().sum::<u64>() < u64::from(2 * PINGS)
    {
        return Err(fail(format!(
            "the gateways' SAs counted {ping_in:?} in and {ping_out:?} out for {} echo requests",
            2 * PINGS
        )));
    }

    // UDP flows from FLOWS source ports: on-prem's ECMP hashes ports too
    // (fib_multipath_hash_policy 1), so both tunnels carry some.
    let sent = udp_flows(&lab)?;
    // Each gateway's SAs count what reached it; wait for the last ones.
    let mut flows = [0; 2];
    wait_until(Duration::from_secs(20), || {
        gateway_packets(&lab).is_ok_and(|now| {
            flows = delta(&after_pings, &now, 0);
            flows.iter().sum::<u64>() >= sent
        })
    });
    if flows.iter().sum::<u64>() < sent || flows.iter().any(|d| *d < PER_FLOW) {
        return Err(fail(format!(
            "{sent} datagrams in {FLOWS} flows: the gateways' inbound SAs counted {flows:?}"
        )));
    }
    let rekeys = rekeys_under_ping(&lab, x).map_err(|e| fail(format!("{e:#}")))?;
    let xesp_children: Vec<Value> = tunnels
        .iter()
        .map(|t| t["connection"]["children"][0]["suite"].clone())
        .collect();
    Ok(json!({
        "suite": suite.name,
        "ike": suite.ike,
        "esp": suite.esp,
        "xesp_child_suites": xesp_children,
        "tunnels_up": tunnels_up,
        "gateway_children_installed": children,
        "gateway_kernel_sas": kernel_sas,
        "onprem_kernel_sas": onprem_sas.len(),
        // Checked on every SA of all three kernels above.
        "kernel_algorithms": kernel_algorithms(suite),
        "bgp_established": bgp,
        "ecmp_nexthops": ecmp,
        "pings_received": received,
        "gateway_in_packets_pings": ping_in,
        "gateway_out_packets_pings": ping_out,
        "datagrams_sent": sent,
        "gateway_in_packets_flows": flows,
        "rekey_pings_sent": REKEY_PINGS,
        "rekey_pings_received": rekeys.received,
        "rekeys": rekeys.counted,
        "gateway_sas_replaced": rekeys.replaced,
    }))
}

/// Each gateway's packets from on-prem (its inbound SA) and to on-prem
/// (outbound), as its kernel counts them.
fn gateway_packets(lab: &Lab) -> Result<[[u64; 2]; 2]> {
    let mut out = [[0; 2]; 2];
    for (i, gw) in lab.ns.azgw.iter().enumerate() {
        for sa in kernel_sa::list(gw)? {
            if sa.dst == GW_PUBLIC[i] {
                out[i][0] += sa.packets;
            } else {
                out[i][1] += sa.packets;
            }
        }
    }
    Ok(out)
}

/// Per gateway, how much `dir` (0 in, 1 out) grew from `a` to `b`.
fn delta(a: &[[u64; 2]; 2], b: &[[u64; 2]; 2], dir: usize) -> [u64; 2] {
    [0, 1].map(|i| b[i][dir].saturating_sub(a[i][dir]))
}

/// [`FLOWS`] UDP flows of [`PER_FLOW`] datagrams each from the first LAN
/// host to the VM, paced (TCG is slow and queues are short); returns how
/// many were sent.
fn udp_flows(lab: &Lab) -> Result<u64> {
    lab.ns.lan.enter(|| -> Result<u64> {
        let mut sent = 0;
        for port in 41000..41000 + FLOWS {
            let sock = UdpSocket::bind(SocketAddrV4::new(LAN_HOSTS[0], port))
                .with_context(|| format!("binding {}:{port}", LAN_HOSTS[0]))?;
            for n in 0..PER_FLOW {
                let payload = format!("xesp flow {port} datagram {n}");
                sock.send_to(payload.as_bytes(), SocketAddrV4::new(VM, FLOW_PORT))
                    .with_context(|| format!("sending from port {port}"))?;
                sent += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if sent == 0 {
            bail!("no datagram sent");
        }
        Ok(sent)
    })?
}

/// What the rekeys under ping measured.
struct Rekeys {
    /// Echo replies of the [`REKEY_PINGS`] sent while both tunnels rekeyed.
    received: u32,
    /// Each tunnel's rekeys as xesp counts them (a CHILD_SA and an IKE_SA).
    counted: [u64; 2],
    /// Per gateway: its kernel holds two SAs again, none of them from
    /// before the rekeys (the CHILD_SA's new SAs installed, the old deleted).
    replaced: [bool; 2],
}

/// Under [`REKEY_PINGS`] echo requests from a LAN host to the VM, xesp
/// rekeys each tunnel's CHILD_SA, then its IKE_SA (RFC 7296 §1.3.2, §1.3.3),
/// with strongSwan's kernel backend on the other side: no echo request may
/// be lost (make-before-break on both ends), and each gateway's kernel ends
/// with the new CHILD_SA's two SAs only.
fn rekeys_under_ping(lab: &Lab, x: &xtask::lab::xesp::Xesp) -> Result<Rekeys> {
    let before: Vec<Vec<String>> = lab
        .ns
        .azgw
        .iter()
        .map(|gw| Ok(kernel_sa::list(gw)?.into_iter().map(|sa| sa.spi).collect()))
        .collect::<Result<_>>()?;
    let (src, dst, count) = (
        LAN_HOSTS[0].to_string(),
        VM.to_string(),
        REKEY_PINGS.to_string(),
    );
    let ping = lab
        .ns
        .lan
        .cmd("ping")
        .args(["-c", &count, "-i", "0.1", "-W", "3", "-I", &src, &dst])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting ping")?;
    let rekeyed = (|| -> Result<()> {
        for tunnel in ["Tunnel0", "Tunnel1"] {
            for extra in [&[][..], &["--ike"][..]] {
                let mut args = vec!["tunnel", "rekey", tunnel];
                args.extend_from_slice(extra);
                let (ok, out) = x.ctl(&args)?;
                ensure!(ok, "xesp {}: {out}", args.join(" "));
            }
        }
        Ok(())
    })();
    let out = ping.wait_with_output().context("waiting for ping")?;
    rekeyed?;
    let text = String::from_utf8_lossy(&out.stdout);
    let received = text
        .lines()
        .find_map(|l| {
            l.split(", ")
                .find_map(|p| p.strip_suffix(" received"))
                .and_then(|n| n.trim().parse().ok())
        })
        .with_context(|| format!("no summary in ping's output: {text}"))?;
    ensure!(
        received == REKEY_PINGS,
        "{received} of {REKEY_PINGS} echo requests answered during the rekeys:\n{text}"
    );
    // Both rekeys of each tunnel done (under TCG the IKE_SA's DH can
    // outlast the pings).
    let mut counted = [0u64; 2];
    let done = wait_until(Duration::from_secs(90), || {
        x.status_json().is_ok_and(|st| {
            for (i, c) in counted.iter_mut().enumerate() {
                *c = st["tunnels"][i]["connection"]["stats"]["rekeys"]
                    .as_u64()
                    .unwrap_or(0);
            }
            counted.iter().all(|c| *c >= 2)
        })
    });
    ensure!(done, "rekeys counted {counted:?}, want 2 per tunnel");
    let mut replaced = [false; 2];
    for (i, gw) in lab.ns.azgw.iter().enumerate() {
        let mut now = Vec::new();
        replaced[i] = wait_until(Duration::from_secs(60), || {
            kernel_sa::list(gw).is_ok_and(|sas| {
                now = sas.into_iter().map(|sa| sa.spi).collect();
                now.len() == 2 && now.iter().all(|spi| !before[i].contains(spi))
            })
        });
        ensure!(
            replaced[i],
            "azgw{}: SAs {:?} before the rekeys, {now:?} after",
            i + 1,
            before[i]
        );
    }
    Ok(Rekeys {
        received,
        counted,
        replaced,
    })
}
