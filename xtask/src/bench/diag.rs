//! Where a trial's packets went: counters read before and after each trial
//! and subtracted, so that loss can be placed (veth queues, XDP, the AF_XDP
//! rings, the workers) and the softirq work seen per CPU.
//!
//! * every interface of the three namespaces (`ip -s -j link`): packets and
//!   drops, each direction;
//! * `/proc/softirqs` (NET_RX, NET_TX per CPU) and `/proc/stat`'s softirq
//!   time per CPU (in USER_HZ ticks);
//! * for xesp and the null forwarder, `xesp status --json`: the AF_XDP
//!   workers' counters (XDP_STATISTICS among them) and the DMZ XDP
//!   program's.

use std::{collections::BTreeMap, path::Path, process::Command};

use serde_json::Value;

use super::dut::{Dut, Topology};
use crate::netns::Netns;

pub type Counters = BTreeMap<String, u64>;

/// The counters now.
pub fn snapshot(topo: &Topology, d: &Dut, xesp: &Path) -> Counters {
    let mut c = Counters::new();
    for (name, ns) in [("lan", &topo.lan), ("dut", &topo.dut), ("az", &topo.az)] {
        links(&mut c, name, ns);
    }
    softirqs(
        &mut c,
        &std::fs::read_to_string("/proc/softirqs").unwrap_or_default(),
    );
    softirq_time(
        &mut c,
        &std::fs::read_to_string("/proc/stat").unwrap_or_default(),
    );
    if let Some(sock) = d.control_socket()
        && let Ok(out) = Command::new(xesp)
            .args(["status", "--json", "-s"])
            .arg(&sock)
            .output()
        && let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
    {
        status(&mut c, &v);
    }
    c
}

/// What grew from `before` to `after` (counters that did not are left out).
pub fn delta(before: &Counters, after: &Counters) -> Counters {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(*before.get(k).unwrap_or(&0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// The drop counters among `d`, for a progress line.
pub fn drops_line(d: &Counters) -> String {
    let parts: Vec<String> = d
        .iter()
        .filter(|(k, _)| {
            k.contains("drop") || k.contains("full") || k.contains("empty") || k.contains("invalid")
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if parts.is_empty() {
        "no drops counted".into()
    } else {
        parts.join(" ")
    }
}

fn links(c: &mut Counters, ns_name: &str, ns: &Netns) {
    let Ok(out) = ns.exec("ip", &["-s", "-j", "link", "show"]) else {
        return;
    };
    let Ok(Value::Array(links)) = serde_json::from_str::<Value>(&out) else {
        return;
    };
    for l in links {
        let Some(ifname) = l["ifname"].as_str() else {
            continue;
        };
        if ifname == "lo" {
            continue;
        }
        for dir in ["rx", "tx"] {
            for field in ["packets", "dropped", "errors"] {
                if let Some(v) = l["stats64"][dir][field].as_u64() {
                    c.insert(format!("{ns_name}:{ifname}:{dir}_{field}"), v);
                }
            }
        }
    }
}

/// NET_RX and NET_TX softirqs raised per CPU.
fn softirqs(c: &mut Counters, text: &str) {
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let Some(name) = w.next() else { continue };
        let name = name.trim_end_matches(':');
        if name != "NET_RX" && name != "NET_TX" {
            continue;
        }
        for (cpu, v) in w.enumerate() {
            if let Ok(v) = v.parse() {
                c.insert(format!("cpu{cpu}:{name}"), v);
            }
        }
    }
}

/// Softirq time per CPU (the 7th value of a cpuN line of /proc/stat).
fn softirq_time(c: &mut Counters, text: &str) {
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some(cpu) if cpu.starts_with("cpu") && cpu.len() > 3 => {
                if let Some(Ok(v)) = w.nth(6).map(str::parse::<u64>) {
                    c.insert(format!("{cpu}:softirq_ticks"), v);
                }
            }
            _ => {}
        }
    }
}

/// `xesp status --json`'s worker and DMZ XDP counters.
fn status(c: &mut Counters, v: &Value) {
    for section in ["workers", "dmz"] {
        let Some(list) = v[section].as_array() else {
            continue;
        };
        for pair in list {
            if let (Some(k), Some(n)) = (pair[0].as_str(), pair[1].as_u64()) {
                c.insert(format!("xesp:{section}:{k}"), n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softirqs_and_their_time_per_cpu() {
        let mut c = Counters::new();
        softirqs(
            &mut c,
            "                    CPU0       CPU1\n          HI:          0          0\n      NET_TX:       2751       2165\n      NET_RX:    2345513    1716866\n",
        );
        softirq_time(
            &mut c,
            "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 10 0 20 30 0 1 77 0 0 0\ncpu1 1 1 1 1 1 1 5 1 1 1\nintr 5\n",
        );
        assert_eq!(c["cpu0:NET_RX"], 2345513);
        assert_eq!(c["cpu1:NET_TX"], 2165);
        assert_eq!(c["cpu0:softirq_ticks"], 77);
        assert_eq!(c["cpu1:softirq_ticks"], 5);
        assert!(!c.contains_key("cpu0:HI"));
        assert_eq!(c.len(), 6);
    }

    #[test]
    fn status_counters_and_deltas() {
        let mut before = Counters::new();
        status(
            &mut before,
            &serde_json::json!({"workers": [["xsk_rx_ring_full", 5], ["esp_rx", 10]], "dmz": [["esp", 3]]}),
        );
        let mut after = before.clone();
        after.insert("xesp:workers:xsk_rx_ring_full".into(), 9);
        after.insert("dut:dmz0:rx_dropped".into(), 2);
        let d = delta(&before, &after);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d["xesp:workers:xsk_rx_ring_full"], 4);
        assert_eq!(
            drops_line(&d),
            "dut:dmz0:rx_dropped=2 xesp:workers:xsk_rx_ring_full=4"
        );
        assert_eq!(drops_line(&Counters::new()), "no drops counted");
    }
}
