//! Needs root: xesp's XDP datapath follows its interfaces. When the DMZ
//! interface is deleted the AF_XDP workers stop and `xesp status` says the
//! link is missing; when it is created again (a new interface index, and
//! here two queues), the DMZ filter and the workers are attached to it anew:
//! the tunnels' traffic goes through the workers again and the allowlist
//! drops outsiders again.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::Duration;

use serde_json::Value;
use xtask::{
    lab::{
        Lab, LabConfig, OnpremMode,
        topology::{LAN_HOSTS, ONPREM_PUBLIC, OUTSIDER},
    },
    netns::wait_until,
};

/// Counter `name` of a status list (pairs of name and value).
fn counter(list: &Value, name: &str) -> u64 {
    list.as_array()
        .and_then(|l| l.iter().find(|p| p[0] == name))
        .and_then(|p| p[1].as_u64())
        .unwrap_or_else(|| panic!("no counter {name}: {list:#}"))
}

fn status(lab: &Lab) -> Value {
    lab.xesp.as_ref().unwrap().0.status_json().unwrap()
}

#[test]
fn root_links_a_recreated_dmz_interface_gets_the_filter_and_the_workers_back() {
    let lab = Lab::up(LabConfig {
        onprem: OnpremMode::Xesp,
        ..LabConfig::default()
    })
    .unwrap();
    lab.wait_ready(Duration::from_secs(60)).unwrap();
    let st = status(&lab);
    assert_eq!(counter(&st["workers"], "links_reattached"), 0);
    assert_eq!(counter(&st["workers"], "links_missing"), 0);

    lab.delete_dmz().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let w = &status(&lab)["workers"];
            counter(w, "links_missing") == 1 && counter(w, "workers_running") == 0
        }),
        "the workers did not stop with dmz0: {:#}",
        status(&lab)["workers"]
    );

    lab.recreate_dmz(2).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let w = &status(&lab)["workers"];
            counter(w, "links_missing") == 0
                && counter(w, "links_reattached") == 1
                && counter(w, "workers_running") == counter(w, "workers")
                && counter(w, "workers") >= 1
        }),
        "the workers did not come back: {:#}",
        status(&lab)["workers"]
    );
    // The IKE_SAs lived through the gap (retransmissions, DPD) or were set
    // up again; either way the tunnels come back and carry the LAN.
    lab.wait_ready(Duration::from_secs(90)).unwrap();
    let before = counter(&status(&lab)["workers"], "encap_sent");
    for src in LAN_HOSTS {
        let out = lab
            .ping_vm(src, 5)
            .unwrap_or_else(|e| panic!("ping from {src}: {e:#}\n{}", lab.status()));
        assert!(out.contains(" 5 received"), "{out}");
    }
    // The first packet to a destination the new workers have no next hop
    // for yet may take the stack's path while the lookup runs.
    let sent = counter(&status(&lab)["workers"], "encap_sent") - before;
    assert!(
        sent >= 2 * 5 - 2,
        "the workers encapsulated {sent} packets of the 10 pings"
    );

    // The filter is on the new interface: an outsider is dropped there.
    let dropped = counter(&status(&lab)["dmz"], "drop_not_allowed");
    let r = lab.ping_public_from_outsider();
    assert!(r.is_err(), "{OUTSIDER} got an answer from {ONPREM_PUBLIC}");
    assert!(counter(&status(&lab)["dmz"], "drop_not_allowed") >= dropped + 3);
}
