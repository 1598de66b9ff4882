//! `xesp azure import|export` end to end, on sample inputs written from the
//! shapes in AZURE.md (tests/data/azure): golden outputs, refusals, and the
//! round trip export -> the JSON Azure would return -> import.
//!
//! XESP_BLESS=1 rewrites the golden files.
#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

const XESP: &str = env!("CARGO_BIN_EXE_xesp");

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/azure")
}

/// A fresh directory with the sample inputs copied in, so that outputs name
/// them relatively.
fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xesp-azure-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    for e in fs::read_dir(data()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
    }
    d
}

/// Runs xesp in `dir`: (success, stdout, stderr).
fn xesp(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(XESP)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

fn golden(name: &str, got: &str) {
    let p = data().join("golden").join(name);
    if std::env::var_os("XESP_BLESS").is_some() {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, got).unwrap();
    }
    let want = fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (XESP_BLESS=1 writes it)", p.display()));
    assert_eq!(got, want, "{name} differs from {}", p.display());
}

const ONPREM: &[&str] = &[
    "--public-address",
    "192.0.2.1",
    "--loopback",
    "172.16.0.3",
    "--asn",
    "65010",
    "--tunnel-address",
    "172.16.0.1",
    "--tunnel-address",
    "172.16.0.2",
    "--network",
    "10.0.0.0/24",
    "--network",
    "10.1.10.0/25",
];

const SHARED_KEY: &str = "Sample-shared-key-for-tests-0123456789";

fn import(dir: &Path, gateway: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["azure", "import", "--gateway", gateway];
    // A flag of `extra` that can be given once replaces ONPREM's.
    let mut i = 0;
    while i < ONPREM.len() {
        let once = ["--asn", "--loopback", "--public-address"].contains(&ONPREM[i]);
        if !(once && extra.contains(&ONPREM[i])) {
            args.extend_from_slice(&ONPREM[i..i + 2]);
        }
        i += 2;
    }
    args.extend_from_slice(extra);
    xesp(dir, &args)
}

#[test]
fn import_writes_the_golden_configuration_and_the_key_apart() {
    let d = workdir("import");
    let (ok, out, err) = import(
        &d,
        "gateway.json",
        &["--connection", "connection.json", "-o", "xesp.toml"],
    );
    assert!(ok, "{err}");
    let toml = fs::read_to_string(d.join("xesp.toml")).unwrap();
    golden("import.toml", &toml);
    golden("import.out", &out);
    // The key is in the psk file, mode 0600, and nowhere else.
    let psk = d.join("xesp.psk");
    assert_eq!(fs::read_to_string(&psk).unwrap(), format!("{SHARED_KEY}\n"));
    assert_eq!(
        fs::metadata(&psk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!toml.contains(SHARED_KEY) && !out.contains(SHARED_KEY) && !err.contains(SHARED_KEY));
    // It passes check without a warning.
    let (ok, out, err) = xesp(&d, &["check", "-c", "xesp.toml"]);
    assert!(
        ok && out.contains("OK, 2 tunnels") && !err.contains("warning"),
        "{out}{err}"
    );
    // A second run does not overwrite without --force.
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &["--connection", "connection.json", "-o", "xesp.toml"],
    );
    assert!(
        !ok && err.contains("xesp.toml exists") && err.contains("--force"),
        "{err}"
    );
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &[
            "--connection",
            "connection.json",
            "-o",
            "xesp.toml",
            "--force",
        ],
    );
    assert!(ok, "{err}");
}

/// The TOML without its comments, for comparing what was taken regardless of
/// how the inputs spelt their paths.
fn values(toml: &str) -> String {
    toml.lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_cli_and_powershell_shapes_give_the_same_tunnels() {
    let d = workdir("shapes");
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &["--connection", "connection.json", "-o", "arm.toml"],
    );
    assert!(ok, "{err}");
    let want = values(&fs::read_to_string(d.join("arm.toml")).unwrap());
    for (gw, spelt) in [
        (
            "gateway-cli.json",
            "gateway-cli.json: bgpSettings.bgpPeeringAddresses[0].tunnelIpAddresses[0]",
        ),
        (
            "gateway-ps.json",
            "gateway-ps.json: BgpSettings.BgpPeeringAddresses[0].TunnelIpAddresses[0]",
        ),
    ] {
        let out = format!("{gw}.toml");
        let (ok, stdout, err) = import(
            &d,
            gw,
            &[
                "--connection",
                "connection.json",
                "-o",
                &out,
                "--psk-file",
                "other.psk",
                "--force",
            ],
        );
        assert!(ok, "{gw}: {err}");
        let got = fs::read_to_string(d.join(&out)).unwrap();
        assert_eq!(values(&got).replace("other.psk", "xesp.psk"), want, "{gw}");
        assert!(stdout.contains(spelt), "{gw}: {stdout}");
    }
}

#[test]
fn round_trip_export_then_azure_json_then_import() {
    let d = workdir("round");
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &["--connection", "connection.json", "-o", "xesp.toml"],
    );
    assert!(ok, "{err}");
    let (ok, az, err) = xesp(&d, &["azure", "export", "-c", "xesp.toml"]);
    assert!(ok, "{err}");
    golden("export.az.sh", &az);
    let (ok, arm, err) = xesp(
        &d,
        &["azure", "export", "-c", "xesp.toml", "--format", "arm"],
    );
    assert!(ok, "{err}");
    golden("export.arm.json", &arm);
    assert!(!az.contains(SHARED_KEY) && !arm.contains(SHARED_KEY));

    // What Azure returns for the connection the template creates: its
    // properties, resolved, plus the fields Azure adds.
    let t: serde_json::Value = serde_json::from_str(&arm).unwrap();
    let res = t["resources"].as_array().unwrap();
    let conn = res
        .iter()
        .find(|r| r["type"] == "Microsoft.Network/connections")
        .unwrap();
    let mut props = conn["properties"].clone();
    props["sharedKey"] = SHARED_KEY.into();
    props["provisioningState"] = "Succeeded".into();
    props["connectionStatus"] = "Connected".into();
    props["ingressBytesTransferred"] = 0.into();
    props["egressBytesTransferred"] = 0.into();
    props["connectionMode"] = "Default".into();
    let returned = serde_json::json!({
        "name": conn["name"],
        "id": "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Network/connections/xesp-to-azure",
        "type": "Microsoft.Network/connections",
        "location": "westus2",
        "properties": props,
    });
    fs::write(
        d.join("returned.json"),
        serde_json::to_string_pretty(&returned).unwrap(),
    )
    .unwrap();
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &[
            "--connection",
            "returned.json",
            "-o",
            "again.toml",
            "--psk-file",
            "again.psk",
        ],
    );
    assert!(ok, "{err}");
    let first = fs::read_to_string(d.join("xesp.toml")).unwrap();
    let again = fs::read_to_string(d.join("again.toml")).unwrap();
    // Identical but for the input's name.
    assert_eq!(
        again
            .replace("returned.json", "connection.json")
            .replace("again.psk", "xesp.psk"),
        first
    );
    // And the local network gateway is this device.
    let lng = &res[0]["properties"];
    assert_eq!(lng["gatewayIpAddress"], "192.0.2.1");
    assert_eq!(lng["bgpSettings"]["asn"], 65010);
    assert_eq!(lng["bgpSettings"]["bgpPeeringAddress"], "172.16.0.3");
}

fn edit_json(dir: &Path, from: &str, to: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join(from)).unwrap()).unwrap();
    f(&mut v);
    fs::write(dir.join(to), serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn what_cannot_work_is_refused_with_the_reason() {
    let d = workdir("refuse");
    edit_json(&d, "gateway.json", "apipa.json", |v| {
        v["properties"]["bgpSettings"]["bgpPeeringAddresses"][1]["customBgpIpAddresses"][0] =
            "169.254.30.1".into();
    });
    edit_json(&d, "gateway.json", "typo.json", |v| {
        v["properties"]["bgpSettings"]["bgpPeeringAddresses"][0]["tunnelIpAdresses"] =
            serde_json::json!(["52.175.253.112"]);
    });
    edit_json(&d, "gateway.json", "nobgp.json", |v| {
        v["properties"]
            .as_object_mut()
            .unwrap()
            .remove("bgpSettings");
    });
    edit_json(&d, "gateway.json", "notunnel.json", |v| {
        v["properties"]["bgpSettings"]["bgpPeeringAddresses"][0]["tunnelIpAddresses"] =
            serde_json::json!([]);
    });
    edit_json(&d, "connection.json", "policy.json", |v| {
        v["properties"]["connectionProtocol"] = "IKEv1".into();
    });
    edit_json(&d, "connection.json", "selectors.json", |v| {
        v["properties"]["usePolicyBasedTrafficSelectors"] = true.into();
    });
    edit_json(&d, "connection.json", "md5.json", |v| {
        v["properties"]["ipsecPolicies"][0]["ikeIntegrity"] = "MD5".into();
    });
    fs::write(
        d.join("broken.json"),
        "{\"sharedKey\": \"Sample-shared-key\" ,, }",
    )
    .unwrap();
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "gateway-passive.json",
            &["--connection", "connection.json"],
            &[
                "properties.activeActive = false",
                "not active-active",
                "--allow-passive",
            ],
        ),
        (
            "apipa.json",
            &["--connection", "connection.json", "--custom-bgp"],
            &[
                "bgpPeeringAddresses[1].customBgpIpAddresses[0] = \"169.254.30.1\"",
                "169.254.21.0-169.254.22.255",
            ],
        ),
        (
            "typo.json",
            &["--connection", "connection.json"],
            &[
                "bgpPeeringAddresses[0].tunnelIpAdresses is not a field",
                "tunnelIpAddresses",
            ],
        ),
        (
            "nobgp.json",
            &[],
            &["nobgp.json: properties.bgpSettings is missing"],
        ),
        (
            "notunnel.json",
            &["--connection", "connection.json"],
            &["tunnelIpAddresses = []", "empty"],
        ),
        (
            "connection.json",
            &["--connection", "connection.json"],
            &["connection's JSON", "--connection"],
        ),
        (
            "gateway.json",
            &["--connection", "policy.json"],
            &["connectionProtocol = \"IKEv1\"", "IKEv2 only"],
        ),
        (
            "gateway.json",
            &["--connection", "selectors.json"],
            &["usePolicyBasedTrafficSelectors = true", "route-based"],
        ),
        (
            "gateway.json",
            &["--connection", "md5.json"],
            &["ipsecPolicies[0].ikeIntegrity = \"MD5\""],
        ),
        (
            "gateway.json",
            &["--connection", "broken.json"],
            &["broken.json: line 1, column", "not valid JSON"],
        ),
        ("gateway.json", &[], &["no", "pre-shared key", "sharedKey"]),
        (
            "gateway.json",
            &["--connection", "connection.json", "--asn", "65515"],
            &["--asn 65515", "Azure refuses it"],
        ),
        (
            "gateway.json",
            &["--connection", "connection.json", "--asn", "12076"],
            &["--asn 12076", "Microsoft"],
        ),
        (
            "gateway.json",
            &["--connection", "connection.json", "--asn", "65000"],
            &["eBGP needs two ASNs"],
        ),
        (
            "gateway.json",
            &[
                "--connection",
                "connection.json",
                "--tunnel-address",
                "172.16.0.9",
            ],
            &["--tunnel-address", "given 3 times", "2 instance"],
        ),
        (
            "gateway.json",
            &[
                "--connection",
                "connection.json",
                "--loopback",
                "169.254.40.1",
            ],
            &["--loopback 169.254.40.1", "APIPA"],
        ),
    ];
    for (gw, extra, want) in cases {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["-o", "out.toml"]);
        let (ok, out, err) = import(&d, gw, &args);
        assert!(!ok, "{gw} {extra:?} accepted: {out}");
        for w in *want {
            assert!(err.contains(w), "{gw} {extra:?}: {err:?} lacks {w:?}");
        }
        assert!(!err.contains("Sample-shared-key"), "{err}");
        assert!(!d.join("out.toml").exists(), "{gw}: written anyway");
    }
}

#[test]
fn choices_the_inputs_leave_open() {
    let d = workdir("choices");
    // A passive gateway when asked for: one tunnel, a warning.
    let (ok, out, err) = import(
        &d,
        "gateway-passive.json",
        &[
            "--connection",
            "connection.json",
            "--allow-passive",
            "-o",
            "p.toml",
            "--tunnel-address",
            "172.16.0.1",
        ],
    );
    assert!(!ok, "three --tunnel-address for one instance: {out}");
    assert!(err.contains("1 instance"), "{err}");
    let mut args = vec!["azure", "import", "--gateway", "gateway-passive.json"];
    args.extend_from_slice(&ONPREM[..6]);
    args.extend([
        "--tunnel-address",
        "172.16.0.1",
        "--network",
        "10.0.0.0/24",
        "--connection",
        "connection.json",
        "--allow-passive",
        "-o",
        "p.toml",
    ]);
    let (ok, out, err) = xesp(&d, &args);
    assert!(ok, "{err}");
    assert!(
        out.contains("(1 tunnels)")
            && out.contains("warning: gateway-passive.json: properties.activeActive = false"),
        "{out}"
    );
    // Custom APIPA BGP addresses.
    let (ok, out, err) = import(
        &d,
        "gateway.json",
        &[
            "--connection",
            "connection.json",
            "--custom-bgp",
            "-o",
            "c.toml",
            "--psk-file",
            "c.psk",
        ],
    );
    assert!(ok, "{err}");
    let t = fs::read_to_string(d.join("c.toml")).unwrap();
    assert!(
        t.contains("bgp_peer = \"169.254.21.1\"") && t.contains("bgp_peer = \"169.254.22.1\""),
        "{t}"
    );
    assert!(out.contains("customBgpIpAddresses[0]"));
    // The connection can choose them too (gatewayCustomBgpIpAddresses).
    edit_json(&d, "connection.json", "custom.json", |v| {
        let id = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/xesp-rg/providers/Microsoft.Network/virtualNetworkGateways/vnet-gw/ipConfigurations/activeActive";
        v["properties"]["gatewayCustomBgpIpAddresses"] = serde_json::json!([{"ipConfigurationId": id.to_uppercase(), "customBgpIpAddress": "169.254.22.5"}]);
    });
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &[
            "--connection",
            "custom.json",
            "-o",
            "k.toml",
            "--psk-file",
            "k.psk",
        ],
    );
    assert!(ok, "{err}");
    let t = fs::read_to_string(d.join("k.toml")).unwrap();
    assert!(
        t.contains("bgp_peer = \"10.2.0.228\"") && t.contains("bgp_peer = \"169.254.22.5\""),
        "{t}"
    );
    // Without a connection: Azure's default policy and an existing key file.
    fs::write(d.join("mine.psk"), "an-existing-key-of-enough-length\n").unwrap();
    fs::set_permissions(d.join("mine.psk"), fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out, err) = import(
        &d,
        "gateway.json",
        &["--psk-file", "mine.psk", "-o", "n.toml"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("Azure's default policy"), "{out}");
    let t = fs::read_to_string(d.join("n.toml")).unwrap();
    assert!(
        t.contains("proposals = [\"aes256-sha256-modp2048\"]")
            && t.contains("psk_file = \"mine.psk\""),
        "{t}"
    );
}

#[test]
fn export_names_what_azure_cannot_express() {
    let d = workdir("inexpressible");
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &["--connection", "connection.json", "-o", "x.toml"],
    );
    assert!(ok, "{err}");
    let t = fs::read_to_string(d.join("x.toml")).unwrap();
    for (from, to, want) in [
        (
            "proposals = [\"aes256gcm16-prfsha384-ecp384\"]",
            "proposals = [\"aes256-sha256-curve25519\"]",
            "tunnel[0].proposals[0] = \"aes256-sha256-curve25519\": Azure cannot express it: Azure has no Curve25519",
        ),
        (
            "esp_proposals = [\"aes256gcm16-ecp384\"]",
            "esp_proposals = [\"aes256-sha512\"]",
            "tunnel[0].esp_proposals[0] = \"aes256-sha512\": Azure cannot express it",
        ),
        (
            "child_lifetime = \"27000s\"",
            "child_lifetime = \"60s\"",
            "tunnel[0].child_lifetime = \"60s\"",
        ),
        ("[bgp]\n", "[bgpx]\n", "bgpx"),
    ] {
        let bad = t.replacen(from, to, 1);
        assert_ne!(bad, t, "{from}");
        fs::write(d.join("bad.toml"), &bad).unwrap();
        let (ok, out, err) = xesp(&d, &["azure", "export", "-c", "bad.toml"]);
        assert!(!ok && out.is_empty(), "{to}: {out}");
        assert!(err.contains(want), "{to}: {err}");
    }
    // Tunnels with different first proposals cannot share one connection.
    let two = t.replacen(
        "bgp_peer = \"10.2.0.229\"",
        "bgp_peer = \"10.2.0.229\"\nproposals = [\"aes256-sha256-modp2048\"]",
        1,
    );
    fs::write(d.join("two.toml"), two).unwrap();
    let (ok, _, err) = xesp(&d, &["azure", "export", "-c", "two.toml"]);
    assert!(
        !ok && err.contains("tunnel[1]") && err.contains("Tunnel0"),
        "{err}"
    );
}

#[test]
fn every_command_help_has_an_example() {
    let d = std::env::temp_dir();
    for cmd in [
        &["azure", "import", "--help"][..],
        &["azure", "export", "--help"],
        &["azure", "allowlist", "--help"],
    ] {
        let (ok, out, _) = xesp(&d, cmd);
        assert!(
            ok && out.contains("Example") && out.contains("xesp azure"),
            "{cmd:?}: {out}"
        );
    }
}

#[test]
fn allowlist_from_communities_or_service_tags() {
    let d = workdir("allowlist");
    let (ok, _, err) = import(
        &d,
        "gateway.json",
        &["--connection", "connection.json", "-o", "xesp.toml"],
    );
    assert!(ok, "{err}");
    fs::set_permissions(d.join("xesp.toml"), fs::Permissions::from_mode(0o640)).unwrap();
    let before = fs::read_to_string(d.join("xesp.toml")).unwrap();
    let args = |extra: &[&'static str]| {
        let mut a = vec!["azure", "allowlist", "-c", "xesp.toml"];
        a.extend_from_slice(extra);
        a
    };
    // A dry run prints the difference and leaves the file alone.
    let (ok, out, err) = xesp(
        &d,
        &args(&[
            "--communities",
            "communities-ps.json",
            "--community",
            "12076:51026",
        ]),
    );
    assert!(ok, "{err}");
    golden("allowlist.out", &out);
    assert_eq!(fs::read_to_string(d.join("xesp.toml")).unwrap(), before);
    // --write updates [dmz] allow only, keeps comments and the mode.
    let (ok, out, err) = xesp(
        &d,
        &args(&[
            "--communities",
            "communities-ps.json",
            "--community",
            "12076:51026",
            "--write",
        ]),
    );
    assert!(ok && out.contains("wrote xesp.toml"), "{out}{err}");
    let after = fs::read_to_string(d.join("xesp.toml")).unwrap();
    golden("allowlist.toml", &after);
    assert_eq!(
        fs::metadata(d.join("xesp.toml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    let (ok, out, err) = xesp(&d, &["check", "-c", "xesp.toml"]);
    assert!(ok, "{out}{err}");
    // The REST form by name, and the service tag of the region, say the same.
    for extra in [
        &[
            "--communities",
            "communities-rest.json",
            "--community",
            "azurewestus2",
        ][..],
        &[
            "--service-tags",
            "servicetags.json",
            "--tag",
            "AzureCloud.westus2",
        ],
    ] {
        let (ok, out, err) = xesp(&d, &args(extra));
        assert!(
            ok && out.contains("nothing to change"),
            "{extra:?}: {out}{err}"
        );
    }
    // Two communities add the second's prefixes.
    let (ok, out, _) = xesp(
        &d,
        &args(&[
            "--communities",
            "communities-ps.json",
            "--community",
            "12076:51026",
            "--community",
            "12076:51004",
        ]),
    );
    assert!(
        ok && out.contains("+ 20.42.0.0/17") && out.contains("2 added, 0 removed, 5 unchanged"),
        "{out}"
    );
    // What is not there is named, with what is.
    for (extra, want) in [
        (
            &[
                "--communities",
                "communities-ps.json",
                "--community",
                "12076:99999",
            ][..],
            &[
                "community 12076:99999",
                "communities-ps.json",
                "12076:51026 AzureWestUS2",
            ][..],
        ),
        (
            &[
                "--service-tags",
                "servicetags.json",
                "--tag",
                "AzureCloud.mars",
            ],
            &["service tag AzureCloud.mars", "AzureCloud.eastus"],
        ),
        (&["--service-tags", "servicetags.json"], &["--tag"]),
        (
            &["--communities", "servicetags.json", "--community", "x"],
            &["not Get-AzBgpServiceCommunity's output"],
        ),
    ] {
        let (ok, out, err) = xesp(&d, &args(extra));
        assert!(!ok, "{extra:?}: {out}");
        for w in want {
            assert!(err.contains(w), "{extra:?}: {err:?} lacks {w:?}");
        }
    }
    assert_eq!(fs::read_to_string(d.join("xesp.toml")).unwrap(), after);
}
