//! Needs root: the operator's commands on a running xesp (reference lab,
//! xdp datapath, strongSwan gateways).
//!
//! * `xesp reload` under ping: a wider DMZ allowlist applies at once (an
//!   outsider's packets now pass the filter), a device setting that needs
//!   a restart is named, and the tunnels keep their SAs: no ping is lost.
//! * `xesp tunnel down` deletes the tunnel's SAs at the gateway and keeps it
//!   down; `xesp tunnel up` brings it back; `xesp tunnel rekey` makes a new
//!   CHILD_SA; `xesp sa list` shows them; a wrong name is an error.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::Duration;

use serde_json::Value;
use xtask::{
    lab::{
        Lab, LabConfig, OnpremMode,
        topology::{LAN_HOSTS, vnet_routes},
    },
    netns::wait_until,
};

fn status(lab: &Lab) -> Value {
    lab.xesp.as_ref().unwrap().0.status_json().unwrap()
}

fn dmz(st: &Value, name: &str) -> u64 {
    st["dmz"]
        .as_array()
        .and_then(|l| l.iter().find(|p| p[0] == name))
        .and_then(|p| p[1].as_u64())
        .unwrap_or_else(|| panic!("no DMZ counter {name}"))
}

/// Tunnel `i`'s CHILD_SA inbound SPIs.
fn child_spis(st: &Value, i: usize) -> Vec<String> {
    st["tunnels"][i]["connection"]["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["spi_in"].as_str().unwrap().to_string())
        .collect()
}

fn ctl(lab: &Lab, args: &[&str]) -> (bool, String) {
    lab.xesp.as_ref().unwrap().0.ctl(args).unwrap()
}

/// `GET /metrics` from inside the on-prem namespace.
fn scrape(lab: &Lab) -> String {
    use std::io::{Read, Write};
    lab.ns
        .onprem
        .enter(|| {
            let mut s = std::net::TcpStream::connect(xtask::lab::xesp::METRICS).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: xesp\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .unwrap()
}

/// The value of the metric line that starts with `series` (name and labels).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// A Prometheus scrape agrees with `xesp status --json` taken just before
/// and just after it (counters only grow in between).
fn metrics_agree_with_status(lab: &Lab) {
    let before = status(lab);
    let text = scrape(lab);
    let after = status(lab);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    // The tunnels' series, for the reader of the test's output.
    for l in text
        .lines()
        .filter(|l| l.starts_with("xesp_tunnel_up") || l.starts_with("xesp_child_sa_packets_total"))
    {
        eprintln!("scraped: {l}");
    }
    let within = |series: &str, get: &dyn Fn(&Value) -> u64| {
        let m = metric(&text, series);
        let (a, b) = (get(&before), get(&after));
        assert!(a <= m && m <= b, "{series} {m}, status {a} then {b}");
    };
    for i in 0..2 {
        let t = &before["tunnels"][i];
        let labels = format!(
            "tunnel=\"{}\",peer=\"{}\"",
            t["name"].as_str().unwrap(),
            t["remote"].as_str().unwrap()
        );
        assert_eq!(
            metric(&text, &format!("xesp_tunnel_up{{{labels}}}")),
            u64::from(t["up"] == true)
        );
        for (dir, field) in [("in", "packets_in"), ("out", "packets_out")] {
            within(
                &format!("xesp_child_sa_packets_total{{{labels},direction=\"{dir}\"}}"),
                &|st| st["tunnels"][i]["totals"][field].as_u64().unwrap(),
            );
        }
        within(
            &format!("xesp_ike_sas_established_total{{{labels}}}"),
            &|st| {
                st["tunnels"][i]["connection"]["stats"]["ike_sas_established"]
                    .as_u64()
                    .unwrap()
            },
        );
    }
    for class in ["drop_not_allowed", "natt_esp"] {
        within(
            &format!("xesp_dmz_packets_total{{class=\"{class}\"}}"),
            &|st| dmz(st, class),
        );
    }
}

fn ping_outsider(lab: &Lab) {
    let _ = lab.ping_public_from_outsider();
}

#[test]
fn root_control_reload_under_ping_and_tunnel_commands() {
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    let x = &lab.xesp.as_ref().unwrap().0;
    let st = status(&lab);
    let spis = [child_spis(&st, 0), child_spis(&st, 1)];

    metrics_agree_with_status(&lab);

    // The outsider is dropped by the DMZ filter.
    let before = dmz(&status(&lab), "drop_not_allowed");
    ping_outsider(&lab);
    assert!(dmz(&status(&lab), "drop_not_allowed") >= before + 3);

    // Reload under ping: the outsider's prefix allowed, the MTU changed.
    let ((ok, answer), lost, pings) = xesp_tests::pings_during(&lab, || {
        x.edit_conf(|doc| {
            doc["dmz"]["allow"]
                .as_array_mut()
                .unwrap()
                .push("198.51.100.0/24");
            doc["device"]["tunnel_mtu"] = toml_edit::value(1300);
        })
        .unwrap();
        ctl(&lab, &["reload"])
    });
    assert!(ok, "{answer}");
    assert!(answer.contains("dmz:"), "{answer}");
    assert!(
        answer.contains("not applied: device.tunnel_mtu changed"),
        "{answer}"
    );
    assert_eq!(lost, 0, "pings during the reload: {pings}");
    let st = status(&lab);
    assert_eq!([child_spis(&st, 0), child_spis(&st, 1)], spis, "SAs kept");
    // Now the outsider passes the filter (counted as allowed).
    let (allowed, dropped) = (dmz(&st, "allowed"), dmz(&st, "drop_not_allowed"));
    ping_outsider(&lab);
    let st = status(&lab);
    assert_eq!(dmz(&st, "drop_not_allowed"), dropped);
    assert!(dmz(&st, "allowed") >= allowed + 3);

    // A wrong name is an error naming the tunnels.
    let (ok, out) = ctl(&lab, &["tunnel", "down", "Tunnel9"]);
    assert!(!ok && out.contains("Tunnel0, Tunnel1"), "{out}");

    // Down: the gateway's IKE_SA goes and stays gone.
    let (ok, out) = ctl(&lab, &["tunnel", "down", "Tunnel1"]);
    assert!(ok, "{out}");
    let gw = &lab.gateways[1].charon;
    assert!(
        wait_until(Duration::from_secs(10), || gw.established_ike_sas() == 0),
        "{}",
        gw.list_sas()
    );
    let st = status(&lab);
    assert_eq!(st["tunnels"][1]["up"], false);
    assert_eq!(st["tunnels"][1]["connection"]["closed"], true);
    let (_, list) = ctl(&lab, &["sa", "list"]);
    assert!(
        list.contains("Tunnel1: no IKE_SA") || list.contains("down by the operator"),
        "{list}"
    );
    // Tunnel0 carries the LAN meanwhile, once the Azure fabric stops
    // sending the replies to the instance without a tunnel.
    vnet_routes(&lab.ns.vnet, &[0]).unwrap();
    let out = lab.ping_vm(LAN_HOSTS[0], 3).unwrap();
    assert!(out.contains(" 3 received"), "{out}");

    // Up: back.
    let (ok, out) = ctl(&lab, &["tunnel", "up", "Tunnel1"]);
    assert!(ok, "{out}");
    assert!(
        wait_until(Duration::from_secs(30), || status(&lab)["tunnels"][1]["up"]
            == true),
        "{}",
        lab.status()
    );
    vnet_routes(&lab.ns.vnet, &[0, 1]).unwrap();

    // Rekey: a new CHILD_SA on Tunnel0.
    let (ok, out) = ctl(&lab, &["tunnel", "rekey", "Tunnel0"]);
    assert!(ok, "{out}");
    assert!(
        wait_until(Duration::from_secs(20), || {
            let now = child_spis(&status(&lab), 0);
            now.len() == 1 && now != spis[0]
        }),
        "{:?} -> {:?}",
        spis[0],
        child_spis(&status(&lab), 0)
    );
    let (ok, list) = ctl(&lab, &["sa", "list"]);
    assert!(ok && list.contains("Tunnel0: IKE_SA ESTABLISHED"), "{list}");
    assert!(list.contains("CHILD_SA"), "{list}");
}
