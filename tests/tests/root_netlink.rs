//! Needs root: the datapath's rtnetlink questions answered by a real kernel
//! in a fresh namespace: routes via a gateway and on-link, local addresses,
//! neighbours (resolved or not) and interface MACs.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::net::Ipv4Addr;

use std::time::{Duration, Instant};

use datapath_user::{
    netlink::Rtnl,
    nexthop::{Limits, NextHop, NextHops},
};
use xtask::netns::{Netns, veth};

#[test]
fn root_netlink_routes_neighbours_and_macs() {
    let a = Netns::create("nl-a").unwrap();
    let b = Netns::create("nl-b").unwrap();
    veth(&a, "a0", &b, "b0").unwrap();
    a.ip(&["link", "set", "a0", "address", "02:00:00:00:00:0a"])
        .unwrap();
    b.ip(&["link", "set", "b0", "address", "02:00:00:00:00:0b"])
        .unwrap();
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "a0"]).unwrap();
    b.ip(&["addr", "add", "192.0.2.254/24", "dev", "b0"])
        .unwrap();
    a.ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.254"])
        .unwrap();
    let ifindex: u32 = a
        .exec("cat", &["/sys/class/net/a0/ifindex"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    a.enter(|| {
        let mut nl = Rtnl::open().unwrap();
        let via = nl.route_get(Ipv4Addr::new(203, 0, 113, 11)).unwrap();
        assert_eq!(
            (via.oif, via.gateway, via.local),
            (ifindex, Some(Ipv4Addr::new(192, 0, 2, 254)), false)
        );
        let onlink = nl.route_get(Ipv4Addr::new(192, 0, 2, 7)).unwrap();
        assert_eq!((onlink.oif, onlink.gateway), (ifindex, None));
        assert!(nl.route_get(Ipv4Addr::new(192, 0, 2, 1)).unwrap().local);
        assert!(
            nl.route_get(Ipv4Addr::new(198, 51, 100, 1)).is_err(),
            "no route: a kernel error"
        );

        assert_eq!(nl.link_mac(ifindex).unwrap(), [2, 0, 0, 0, 0, 0x0a]);
        // Not resolved yet, then resolved by traffic through the stack.
        assert_eq!(
            nl.neighbour(ifindex, Ipv4Addr::new(192, 0, 2, 254))
                .unwrap(),
            None
        );
    })
    .unwrap();
    a.exec("ping", &["-c", "1", "-W", "2", "192.0.2.254"])
        .unwrap();
    a.enter(|| {
        let mut nl = Rtnl::open().unwrap();
        assert_eq!(
            nl.neighbour(ifindex, Ipv4Addr::new(192, 0, 2, 254))
                .unwrap(),
            Some([2, 0, 0, 0, 0, 0x0b])
        );
    })
    .unwrap();
}

#[test]
fn root_nexthops_resolve_cache_and_expire() {
    let a = Netns::create("nh-a").unwrap();
    let b = Netns::create("nh-b").unwrap();
    veth(&a, "a0", &b, "b0").unwrap();
    a.ip(&["link", "set", "a0", "address", "02:00:00:00:01:0a"])
        .unwrap();
    b.ip(&["link", "set", "b0", "address", "02:00:00:00:01:0b"])
        .unwrap();
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "a0"]).unwrap();
    b.ip(&["addr", "add", "192.0.2.254/24", "dev", "b0"])
        .unwrap();
    a.ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.254"])
        .unwrap();
    let ifindex: u32 = a
        .exec("cat", &["/sys/class/net/a0/ifindex"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gw_host = Ipv4Addr::new(203, 0, 113, 11);

    let mut hops = a.enter(|| NextHops::new().unwrap()).unwrap();
    let t0 = Instant::now();
    assert_eq!(
        hops.resolve(Ipv4Addr::new(192, 0, 2, 1), t0),
        NextHop::Local
    );
    assert_eq!(
        hops.resolve(gw_host, t0),
        NextHop::Unresolved,
        "neighbour not resolved yet"
    );
    a.exec("ping", &["-c", "1", "-W", "2", "192.0.2.254"])
        .unwrap();
    // The miss is cached briefly, then asked again.
    assert_eq!(hops.resolve(gw_host, t0), NextHop::Unresolved);
    let t1 = t0 + Duration::from_secs(1);
    let want = NextHop::Ether {
        ifindex,
        src: [2, 0, 0, 0, 1, 0x0a],
        dst: [2, 0, 0, 0, 1, 0x0b],
    };
    assert_eq!(hops.resolve(gw_host, t1), want);
    // Cached: a changed neighbour is seen only after the entry expires.
    a.ip(&[
        "neigh",
        "replace",
        "192.0.2.254",
        "lladdr",
        "02:00:00:00:01:0c",
        "dev",
        "a0",
    ])
    .unwrap();
    assert_eq!(hops.resolve(gw_host, t1 + Duration::from_secs(1)), want);
    let later = hops.resolve(gw_host, t1 + Duration::from_secs(6));
    assert_eq!(
        later,
        NextHop::Ether {
            ifindex,
            src: [2, 0, 0, 0, 1, 0x0a],
            dst: [2, 0, 0, 0, 1, 0x0c]
        }
    );
    a.enter(move || drop(hops)).unwrap();
}

#[test]
fn root_nexthops_a_sweep_keeps_its_bound_and_the_known_hop() {
    let a = Netns::create("nh-sweep-a").unwrap();
    let b = Netns::create("nh-sweep-b").unwrap();
    veth(&a, "a0", &b, "b0").unwrap();
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "a0"]).unwrap();
    b.ip(&["addr", "add", "192.0.2.254/24", "dev", "b0"])
        .unwrap();
    a.ip(&["route", "add", "203.0.113.0/24", "via", "192.0.2.254"])
        .unwrap();
    a.exec("ping", &["-c", "1", "-W", "2", "192.0.2.254"])
        .unwrap();
    let limits = Limits {
        entries: 256,
        lookups_per_sec: 1000,
    };
    let mut hops = a.enter(|| NextHops::with_limits(limits).unwrap()).unwrap();
    let t0 = Instant::now();
    let peer = Ipv4Addr::new(203, 0, 113, 11);
    let known = hops.resolve(peer, t0);
    assert!(matches!(known, NextHop::Ether { .. }), "{known:?}");
    // 100,000 destinations with no route (looked up, not sent to).
    for i in 0..100_000u32 {
        let _ = hops.resolve(Ipv4Addr::from(0xc633_0000 + i), t0);
    }
    let s = hops.stats();
    // Fuller than its bound: the misses went, the resolved hop stayed.
    assert!(hops.len() <= 256, "{}", hops.len());
    assert!(s.evicted > 0, "{s:?}");
    assert_eq!(s.lookups, 1000, "{s:?}");
    assert_eq!(s.rate_limited, 100_001 - 1000, "{s:?}");
    // The tunnel peer's hop stays, answered from the cache.
    assert_eq!(hops.resolve(peer, t0), known);
    assert_eq!(hops.stats().lookups, 1000);
}

/// What a tunnel's removal relies on (`drain_routes`): an ECMP route over
/// two devices is counted for each; setting one down keeps the route (its
/// next hop dead, the other one carries on); deleting a device deletes the
/// route whole.
#[test]
fn root_netlink_multipath_routes_through_a_device() {
    let ns = Netns::create("nl-mp").unwrap();
    for (d, peer) in [("t0", "p0"), ("t1", "p1")] {
        ns.ip(&["link", "add", d, "type", "veth", "peer", "name", peer])
            .unwrap();
        ns.ip(&["link", "set", d, "up"]).unwrap();
        ns.ip(&["link", "set", peer, "up"]).unwrap();
    }
    ns.ip(&[
        "route",
        "add",
        "10.2.0.0/24",
        "nexthop",
        "dev",
        "t0",
        "nexthop",
        "dev",
        "t1",
    ])
    .unwrap();
    ns.ip(&["route", "add", "10.3.0.0/24", "dev", "t1"])
        .unwrap();
    let index = |d: &str| -> u32 {
        ns.exec("cat", &[&format!("/sys/class/net/{d}/ifindex")])
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (t0, t1) = (index("t0"), index("t1"));
    let routes = || ns.exec("ip", &["route", "show", "10.2.0.0/24"]).unwrap();
    ns.enter(|| {
        let mut nl = Rtnl::open().unwrap();
        // The single-next-hop route through t1 is not counted.
        assert_eq!(nl.multipath_routes_via(t0).unwrap(), 1);
        assert_eq!(nl.multipath_routes_via(t1).unwrap(), 1);
        nl.set_link_down(t1).unwrap();
        assert_eq!(nl.multipath_routes_via(t1).unwrap(), 1);
        assert_eq!(nl.multipath_routes_via(t0).unwrap(), 1);
    })
    .unwrap();
    let r = routes();
    assert!(r.contains("dev t1") && r.contains("dead"), "{r}");
    ns.ip(&["link", "del", "t1"]).unwrap();
    assert_eq!(routes().trim(), "", "deleting t1 deleted the route whole");
    let left = ns.enter(|| Rtnl::open().unwrap().multipath_routes_via(t0).unwrap());
    assert_eq!(left.unwrap(), 0);
}
