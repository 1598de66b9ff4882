//! Prometheus metrics (OpenMetrics text) from the daemon's status, served
//! on `device.metrics_listen` at `/metrics`. Names follow the Prometheus
//! conventions: the `xesp_` prefix, counters ending in `_total`, labels
//! `tunnel`, `peer`, `direction`, `reason`, `class`, `socket` (never an SPI,
//! which a rekey would turn into a new series every few hours).

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::control::DeviceStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    tunnel: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    tunnel: String,
    peer: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    tunnel: String,
    peer: String,
    reason: String,
}

/// A class of frames (the DMZ and LAN programs', the orphans).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

/// One of a component's counters (socket path, workers).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: String,
}

/// A family of counters registered under `name` (`_total` is added).
fn counters<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, Counter>
where
    L: Clone + std::fmt::Debug + std::hash::Hash + Eq + EncodeLabelSet + Send + Sync + 'static,
{
    let f = Family::<L, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauges<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, Gauge>
where
    L: Clone + std::fmt::Debug + std::hash::Hash + Eq + EncodeLabelSet + Send + Sync + 'static,
{
    let f = Family::<L, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The OpenMetrics text of `st`, taken at `now_unix` (seconds).
pub fn render(st: &DeviceStatus, now_unix: u64) -> String {
    let mut reg = Registry::with_prefix("xesp");
    reg.register(
        "build",
        "The running xesp",
        Info::new(vec![
            ("version", st.version.clone()),
            ("datapath", st.datapath.clone()),
        ]),
    );
    let up = gauges::<TunnelLabels>(
        &mut reg,
        "tunnel_up",
        "1 while the tunnel has an outbound SA",
    );
    let established = gauges::<TunnelLabels>(
        &mut reg,
        "tunnel_last_established_timestamp_seconds",
        "When an IKE_SA of the tunnel was last established (Unix time)",
    );
    let packets = counters::<DirectionLabels>(
        &mut reg,
        "child_sa_packets",
        "Packets the tunnel's CHILD_SAs carried, every SA it had",
    );
    let bytes = counters::<DirectionLabels>(
        &mut reg,
        "child_sa_bytes",
        "Inner octets the tunnel's CHILD_SAs carried",
    );
    let drops = counters::<ReasonLabels>(&mut reg, "esp_drops", "ESP packets dropped, by reason");
    let ike = [
        ("ike_sas_established", "IKE_SAs established"),
        ("child_sas_installed", "CHILD_SAs installed"),
        ("ike_rekeys", "IKE_SA and CHILD_SA rekeys"),
        ("ike_retransmits", "IKE requests sent again"),
        ("ike_dpd_failures", "Peers found dead by DPD"),
        ("ike_auth_failures", "IKE_AUTH failures"),
        (
            "ike_invalid_messages",
            "IKE messages dropped before they changed anything",
        ),
        (
            "ike_cookies_sent",
            "IKE_SA_INIT answered with a COOKIE only",
        ),
        (
            "ike_half_open_drops",
            "IKE_SA_INIT dropped at the half-open limit",
        ),
    ]
    .map(|(name, help)| counters::<TunnelLabels>(&mut reg, name, help));
    for t in &st.tunnels {
        let l = TunnelLabels {
            tunnel: t.name.clone(),
            peer: t.remote.clone(),
        };
        up.get_or_create(&l).set(i64::from(t.up));
        if let Some(ago) = t.connection.established_secs_ago {
            established
                .get_or_create(&l)
                .set(gauge(now_unix.saturating_sub(ago)));
        }
        let dir = |direction| DirectionLabels {
            tunnel: t.name.clone(),
            peer: t.remote.clone(),
            direction,
        };
        packets
            .get_or_create(&dir("in"))
            .inc_by(t.totals.packets_in);
        packets
            .get_or_create(&dir("out"))
            .inc_by(t.totals.packets_out);
        bytes.get_or_create(&dir("in")).inc_by(t.totals.bytes_in);
        bytes.get_or_create(&dir("out")).inc_by(t.totals.bytes_out);
        for (reason, n) in &t.drops {
            drops
                .get_or_create(&ReasonLabels {
                    tunnel: t.name.clone(),
                    peer: t.remote.clone(),
                    reason: reason.clone(),
                })
                .inc_by(*n);
        }
        let s = &t.connection.stats;
        let values = [
            s.ike_sas_established,
            s.child_sas_installed,
            s.rekeys,
            s.retransmits,
            s.dpd_failures,
            s.auth_failures,
            s.invalid_messages,
            s.cookies_sent,
            s.half_open_drops,
        ];
        for (family, v) in ike.iter().zip(values) {
            family.get_or_create(&l).inc_by(v);
        }
    }
    let lists = [
        (
            "dmz_packets",
            "Frames the DMZ XDP program classified, by class",
            &st.dmz,
        ),
        (
            "lan_packets",
            "Frames the LAN XDP program saw, by outcome",
            &st.lan,
        ),
    ];
    let socket = counters::<CounterLabel>(
        &mut reg,
        "socket_path_events",
        "The socket datapath's and the IKE sockets' counters, drops included",
    );
    for (k, v) in &st.socket_path {
        socket
            .get_or_create(&CounterLabel { counter: k.clone() })
            .inc_by(*v);
    }
    for (name, help, list) in lists {
        let f = counters::<ClassLabel>(&mut reg, name, help);
        for (k, v) in list {
            f.get_or_create(&ClassLabel { class: k.clone() }).inc_by(*v);
        }
    }
    // The workers' list mixes counters and states: the states are gauges.
    let states = ["workers", "workers_running", "links_missing"];
    let worker_events =
        counters::<CounterLabel>(&mut reg, "worker_events", "The AF_XDP workers' counters");
    let worker_state = gauges::<CounterLabel>(
        &mut reg,
        "worker_state",
        "The AF_XDP workers: how many, how many run, a missing link",
    );
    for (k, v) in &st.workers {
        let l = CounterLabel { counter: k.clone() };
        if states.contains(&k.as_str()) {
            worker_state.get_or_create(&l).set(gauge(*v));
        } else {
            worker_events.get_or_create(&l).inc_by(*v);
        }
    }
    let orphans = counters::<ClassLabel>(
        &mut reg,
        "orphan_packets",
        "ESP with an unknown SPI; tunnel packets with no outbound SA",
    );
    for (class, v) in [
        ("unknown_spi", st.unknown_spi),
        ("no_outbound_sa", st.no_outbound_sa),
    ] {
        orphans
            .get_or_create(&ClassLabel {
                class: class.into(),
            })
            .inc_by(v);
    }
    let mut out = String::new();
    // Writing into a String does not fail.
    let _ = encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> DeviceStatus {
        serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "public_address": "192.0.2.1", "datapath": "sockets",
            "started_utc": "2026-12-01 00:00:00 UTC",
            "tunnels": [{
                "name": "Tunnel0", "address": "172.16.0.1", "remote": "203.0.113.11",
                "bgp_peer": null, "up": true, "last_established_utc": null,
                "totals": {"packets_in": 7, "bytes_in": 700, "packets_out": 9, "bytes_out": 900},
                "drops": [["replay", 3], ["integrity", 0]],
                "xdp": null,
                "connection": {
                    "name": "Tunnel0", "tunnel": 0, "peer": "203.0.113.11", "up": true,
                    "established_secs_ago": 100, "ike": null, "children": [],
                    "stats": {"ike_sas_established": 1, "child_sas_installed": 2, "rekeys": 4,
                        "retransmits": 5, "dpd_failures": 0, "auth_failures": 0,
                        "invalid_messages": 0, "child_sa_refusals": 0, "child_sa_hard_expiries": 0,
                        "rekey_collisions_won": 0, "rekey_collisions_lost": 0, "cookies_sent": 0,
                        "half_open_drops": 0, "selector_overflows": 0, "responder_key_exchanges": 0}
                }
            }],
            "dmz": [["drop_not_allowed", 11]], "lan": [],
            "workers": [["encap_sent", 12], ["workers", 2]],
            "socket_path": [["ike_not_peer", 13]],
            "unknown_spi": 14, "no_outbound_sa": 15, "bgp": null
        }))
        .unwrap()
    }

    #[test]
    fn the_status_becomes_openmetrics() {
        let text = render(&status(), 1_000_000);
        for line in [
            "xesp_build_info{version=\"0.1.0\",datapath=\"sockets\"} 1",
            "xesp_tunnel_up{tunnel=\"Tunnel0\",peer=\"203.0.113.11\"} 1",
            "xesp_tunnel_last_established_timestamp_seconds{tunnel=\"Tunnel0\",peer=\"203.0.113.11\"} 999900",
            "xesp_child_sa_packets_total{tunnel=\"Tunnel0\",peer=\"203.0.113.11\",direction=\"in\"} 7",
            "xesp_child_sa_bytes_total{tunnel=\"Tunnel0\",peer=\"203.0.113.11\",direction=\"out\"} 900",
            "xesp_esp_drops_total{tunnel=\"Tunnel0\",peer=\"203.0.113.11\",reason=\"replay\"} 3",
            "xesp_ike_rekeys_total{tunnel=\"Tunnel0\",peer=\"203.0.113.11\"} 4",
            "xesp_ike_retransmits_total{tunnel=\"Tunnel0\",peer=\"203.0.113.11\"} 5",
            "xesp_dmz_packets_total{class=\"drop_not_allowed\"} 11",
            "xesp_worker_events_total{counter=\"encap_sent\"} 12",
            "xesp_worker_state{counter=\"workers\"} 2",
            "xesp_socket_path_events_total{counter=\"ike_not_peer\"} 13",
            "xesp_orphan_packets_total{class=\"unknown_spi\"} 14",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            !text.contains("spi=") && !text.contains("spi_"),
            "no SPI in any label"
        );
    }
}
