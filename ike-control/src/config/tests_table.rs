//! What a new user gets wrong, and what `xesp check` says about it: every
//! case names the field, the value and what is allowed.

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use super::{Config, ConfigError};

/// One edit of a correct two-tunnel configuration: lines added to a section.
#[derive(Clone, Copy)]
struct Edit {
    device: &'static str,
    ike: &'static str,
    bgp: &'static str,
    t0: &'static str,
    t1: &'static str,
}

const BASE: Edit = Edit {
    device: "",
    ike: "",
    bgp: "",
    t0: "address = \"172.16.0.1\"",
    t1: "address = \"172.16.0.2\"",
};

fn text(e: Edit) -> String {
    format!(
        r#"[device]
public_address = "192.0.2.1"
lan_interfaces = ["lan0"]
{}
[ike]
psk = "a-long-enough-test-key"
{}
[bgp]
asn = 65010
peer_asn = 65000
source = "172.16.0.3"
networks = ["10.0.0.0/24", "10.1.10.0/25"]
{}
[[tunnel]]
name = "Tunnel0"
remote = "52.175.253.112"
bgp_peer = "10.2.0.228"
{}
[[tunnel]]
name = "Tunnel1"
remote = "52.175.250.191"
bgp_peer = "10.2.0.229"
{}
"#,
        e.device, e.ike, e.bgp, e.t0, e.t1
    )
}

fn parse(e: Edit) -> Result<Config, ConfigError> {
    Config::parse(&text(e), Path::new("/etc/xesp/xesp.toml"))
}

#[test]
fn the_base_is_accepted_without_warnings() {
    let c = parse(BASE).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let b = c.bgp.unwrap();
    assert_eq!((b.asn, b.peer_asn, b.multihop), (65010, 65000, 5));
}

/// Errors: the edit, then what the message must say (field, value, range).
#[test]
fn what_cannot_work_is_refused() {
    let cases: &[(&str, Edit, &[&str])] = &[
        (
            "one address on two tunnels",
            Edit {
                t1: "address = \"172.16.0.1\"",
                ..BASE
            },
            &["tunnel[1].address = 172.16.0.1", "Tunnel0", "allowed:"],
        ),
        (
            "no ESP proposal",
            Edit {
                ike: "esp_proposals = []",
                ..BASE
            },
            &[
                "tunnel[0].esp_proposals = []",
                "allowed: one or more",
                "aes256gcm16",
            ],
        ),
        (
            "no IKE proposal",
            Edit {
                t1: "address = \"172.16.0.2\"\nproposals = []",
                ..BASE
            },
            &["tunnel[1].proposals = []", "allowed: one or more"],
        ),
        (
            "a rekey storm",
            Edit {
                ike: "lifetime = \"1s\"",
                ..BASE
            },
            &[
                "tunnel[0].lifetime = \"1s\"",
                "rekey storm",
                "allowed: 10s to 30d",
            ],
        ),
        (
            "a tunnel address inside the LAN",
            Edit {
                t0: "address = \"10.0.0.7\"",
                ..BASE
            },
            &[
                "tunnel[0].address = 10.0.0.7",
                "bgp.networks[0] = 10.0.0.0/24",
            ],
        ),
        (
            "a lifetime that overflows a clock",
            Edit {
                ike: "child_lifetime = \"9223372036854775807\"",
                ..BASE
            },
            &[
                "tunnel[0].child_lifetime = \"9223372036854775807\"",
                "too large",
                "allowed: 10s to 30d",
            ],
        ),
        (
            "a DPD interval that overflows a clock",
            Edit {
                ike: "dpd = { interval = \"9223372036854775807\" }",
                ..BASE
            },
            &["tunnel[0].dpd.interval", "too large", "allowed: 1s to 1d"],
        ),
        (
            "a DPD retry of days",
            Edit {
                ike: "dpd = { retry = \"200000000000000000000d\" }",
                ..BASE
            },
            &["tunnel[0].dpd.retry", "too large", "allowed: 1s to 10m"],
        ),
        (
            "no DPD probe",
            Edit {
                ike: "dpd = { tries = 0 }",
                ..BASE
            },
            &["tunnel[0].dpd.tries = 0", "allowed: 1 to 100 probes"],
        ),
        (
            "a CHILD_SA of no bytes",
            Edit {
                ike: "child_lifetime_kb = 0",
                ..BASE
            },
            &["tunnel[0].child_lifetime_kb = 0", "allowed: 1024 to"],
        ),
        (
            "a negative volume",
            Edit {
                ike: "child_lifetime_kb = -5",
                ..BASE
            },
            &["tunnel[0].child_lifetime_kb = -5", "allowed: 1024 to"],
        ),
        (
            "a replay window beyond the bitmap",
            Edit {
                ike: "replay_window = 100000",
                ..BASE
            },
            &[
                "tunnel[0].replay_window = 100000",
                "allowed: 0 to 4096 packets",
            ],
        ),
        (
            "a tunnel MTU no AF_XDP frame holds",
            Edit {
                device: "tunnel_mtu = 9000",
                ..BASE
            },
            &[
                "device.tunnel_mtu = 9000",
                "AF_XDP frame",
                "allowed: 576 to 3725 octets",
            ],
        ),
        (
            "keepalives rarer than the hold time",
            Edit {
                bgp: "hold_time = \"9s\"\nkeepalive = \"30s\"",
                ..BASE
            },
            &[
                "bgp.keepalive = \"30s\"",
                "longer than bgp.hold_time",
                "allowed: 1s to the hold time (9s)",
            ],
        ),
        (
            "a hold time BGP forbids",
            Edit {
                bgp: "hold_time = \"1s\"",
                ..BASE
            },
            &["bgp.hold_time = \"1s\"", "RFC 4271", "allowed: 3s to"],
        ),
        (
            "a TTL beyond 255",
            Edit {
                bgp: "multihop = 300",
                ..BASE
            },
            &["bgp.multihop = 300", "allowed: 1 to 255 hops"],
        ),
        (
            "an MSS no TCP can have",
            Edit {
                device: "mss_clamp = 70000",
                ..BASE
            },
            &["device.mss_clamp = 70000", "allowed: 536 to 9000 octets"],
        ),
        (
            "an MTU below IPv4's minimum",
            Edit {
                device: "tunnel_mtu = 100",
                ..BASE
            },
            &["device.tunnel_mtu = 100", "allowed: 576 to 9000 octets"],
        ),
    ];
    for (what, edit, want) in cases {
        let e = parse(*edit)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        let s = e.to_string();
        for w in *want {
            assert!(s.contains(w), "{what}: {s:?} lacks {w:?}");
        }
    }
}

/// Cases whose key is already in the base: the line is replaced.
#[test]
fn what_cannot_work_is_refused_when_replacing_a_line() {
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "remote is the device itself",
            "remote = \"52.175.253.112\"",
            "remote = \"192.0.2.1\"",
            &["tunnel[0].remote", "192.0.2.1", "public_address"],
        ),
        (
            "a BGP peer inside the LAN",
            "bgp_peer = \"10.2.0.228\"",
            "bgp_peer = \"10.1.10.5\"",
            &["tunnel[0].bgp_peer = 10.1.10.5", "10.1.10.0/25"],
        ),
        (
            "Azure's own ASN on-prem",
            "asn = 65010",
            "asn = 65515",
            &["bgp.asn = 65515", "Azure refuses it", "allowed:"],
        ),
        (
            "Microsoft's ASN on-prem",
            "asn = 65010",
            "asn = 12076",
            &["bgp.asn = 12076", "Microsoft"],
        ),
        (
            "both ends in one AS",
            "asn = 65010",
            "asn = 65000",
            &["bgp.asn = 65000", "peer_asn"],
        ),
        (
            "an ASN beyond 32 bits",
            "asn = 65010",
            "asn = 4294967296",
            &["bgp.asn = 4294967296", "allowed: 1 to 4294967294"],
        ),
        (
            "a network with host bits",
            "networks = [\"10.0.0.0/24\"",
            "networks = [\"10.0.0.1/24\"",
            &["bgp.networks[0]", "host bits", "10.0.0.0/24"],
        ),
        (
            "Loopback0 on a tunnel address",
            "source = \"172.16.0.3\"",
            "source = \"172.16.0.1\"",
            &["tunnel[0].address = 172.16.0.1", "bgp.source"],
        ),
    ];
    for (what, from, to, want) in cases {
        let t = text(BASE).replacen(from, to, 1);
        assert_ne!(t, text(BASE), "{what}");
        let e = Config::parse(&t, Path::new("/etc/xesp/xesp.toml"))
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        let s = e.to_string();
        for w in *want {
            assert!(s.contains(w), "{what}: {s:?} lacks {w:?}");
        }
    }
}

#[test]
fn what_is_unwise_is_warned_about() {
    let cases: &[(&str, Edit, &[&str])] = &[
        (
            "anti-replay off",
            Edit {
                ike: "replay_window = 0",
                ..BASE
            },
            &[
                "tunnel[0].replay_window = 0",
                "anti-replay off",
                "allowed: 0 to 4096",
            ],
        ),
        (
            "lifetimes of seconds",
            Edit {
                ike: "lifetime = \"40s\"\nchild_lifetime = \"15s\"",
                ..BASE
            },
            &["tunnel[0].child_lifetime = \"15s\"", "advised: 5m or more"],
        ),
    ];
    for (what, edit, want) in cases {
        let c = parse(*edit).unwrap_or_else(|e| panic!("{what}: {e}"));
        let all = c.warnings.join("\n");
        for w in *want {
            assert!(all.contains(w), "{what}: {all:?} lacks {w:?}");
        }
    }
}

#[test]
fn a_syntax_error_never_shows_the_key() {
    for line in [
        "psk = \"secret*1234",
        "psk = secret*1234\"",
        "psk = 12345678901234567",
        "pks \"secret*1234\"",
    ] {
        let t = text(BASE).replace("psk = \"a-long-enough-test-key\"", line);
        let e = Config::parse(&t, Path::new("x.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{line}: {e}");
        let s = e.to_string();
        assert!(
            !s.contains("secret*1234") && !s.contains("12345678901234567"),
            "{line}: {s}"
        );
        assert!(s.contains("line 6"), "{line}: {s}");
    }
    // Elsewhere the line is quoted, to help.
    let t = text(BASE).replace("asn = 65010", "asn = 65010x");
    let s = Config::parse(&t, Path::new("x.toml"))
        .unwrap_err()
        .to_string();
    assert!(s.contains("asn = 65010x") && s.contains("line 9"), "{s}");
}

#[test]
fn secrets_open_to_other_users_are_warned_about() {
    let dir = std::env::temp_dir().join(format!("xesp-cfg-perms-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let psk = dir.join("psk");
    fs::write(&psk, "a-long-enough-test-key\n").unwrap();
    let with_file = text(BASE).replace("psk = \"a-long-enough-test-key\"", "psk_file = \"psk\"");
    let conf = dir.join("xesp.toml");
    for (conf_text, conf_mode, psk_mode, want) in [
        (&with_file, 0o644, 0o600, None),
        (
            &with_file,
            0o644,
            0o644,
            Some("psk: holds the pre-shared key but its mode is 0644"),
        ),
        (&text(BASE), 0o600, 0o600, None),
        (
            &text(BASE),
            0o640,
            0o600,
            Some("xesp.toml: holds a pre-shared key (psk) but its mode is 0640"),
        ),
    ] {
        fs::write(&conf, conf_text).unwrap();
        fs::set_permissions(&conf, fs::Permissions::from_mode(conf_mode)).unwrap();
        fs::set_permissions(&psk, fs::Permissions::from_mode(psk_mode)).unwrap();
        let c = Config::load(&conf).unwrap();
        let perm: Vec<_> = c.warnings.iter().filter(|w| w.contains("mode")).collect();
        match want {
            None => assert!(perm.is_empty(), "{conf_mode:o}/{psk_mode:o}: {perm:?}"),
            Some(w) => {
                assert_eq!(perm.len(), 1, "{perm:?}");
                assert!(perm[0].contains(w), "{perm:?} lacks {w}");
            }
        }
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_psk_file_must_be_a_small_regular_file() {
    let dir = std::env::temp_dir().join(format!("xesp-cfg-pskfile-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("big"), vec![b'k'; 5000]).unwrap();
    for (file, want) in [
        ("/dev/zero", "not a regular file"),
        ("/tmp", "not a regular file"),
        ("big", "5000 bytes"),
        ("absent", "No such file"),
    ] {
        let t = text(BASE).replace(
            "psk = \"a-long-enough-test-key\"",
            &format!("psk_file = \"{file}\""),
        );
        let e = Config::parse(&t, &dir.join("xesp.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tunnel[0].psk_file") && e.contains(want),
            "{file}: {e}"
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}
