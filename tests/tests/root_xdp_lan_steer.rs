//! Needs root: the LAN XDP program follows the kernel FIB. With an ECMP route
//! over two tunnels' TUN devices, each flow from a LAN host lands on the
//! AF_XDP socket of exactly the tunnel the kernel picks for it (`ip route
//! get` is the oracle), always the same one; when a tunnel goes down its
//! flows move to the live one, and come back when it returns.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use datapath_user::{
    tun::Tun,
    xdp::{XdpAttach, XdpPrograms},
    xsk::{Port, PortConfig, SockId, Verdict},
};
use xesp_common::LanCounter;
use xtask::netns::{Netns, veth};

const FLOWS: u16 = 64;
const FIRST_PORT: u16 = 41000;
const VM: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 4);

/// Sends one datagram per flow (source ports FIRST_PORT..) from the LAN host.
fn send_flows(lan: &Netns) {
    lan.enter(|| {
        for i in 0..FLOWS {
            let s = UdpSocket::bind(SocketAddrV4::new(
                Ipv4Addr::new(10, 0, 0, 10),
                FIRST_PORT + i,
            ))
            .unwrap();
            s.send_to(b"flow", SocketAddrV4::new(VM, 9000)).unwrap();
        }
    })
    .unwrap();
}

/// Which tunnel socket each source port arrived on.
fn collect(port: &mut Port, socks: [SockId; 2], want: usize) -> BTreeMap<u16, Vec<u32>> {
    let mut seen: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.values().map(Vec::len).sum::<usize>() < want && Instant::now() < deadline {
        port.poll(100).unwrap();
        for (tunnel, sock) in socks.iter().enumerate() {
            port.recv(*sock, 64, |f| {
                let p = f.packet();
                let l4 = 14 + usize::from(p[14] & 0xf) * 4;
                let sport = u16::from_be_bytes([p[l4], p[l4 + 1]]);
                seen.entry(sport).or_default().push(tunnel as u32);
                Verdict::Drop
            });
        }
        port.flush();
    }
    seen
}

/// The tunnel the kernel FIB chooses for a flow.
fn kernel_choice(router: &Netns, sport: u16) -> u32 {
    let out = router
        .exec(
            "ip",
            &[
                "route",
                "get",
                "10.2.0.4",
                "from",
                "10.0.0.10",
                "iif",
                "lan0",
                "ipproto",
                "udp",
                "sport",
                &sport.to_string(),
                "dport",
                "9000",
            ],
        )
        .unwrap();
    if out.contains("dev tun0") {
        0
    } else if out.contains("dev tun1") {
        1
    } else {
        panic!("unexpected route: {out}")
    }
}

#[test]
fn root_xdp_lan_follows_the_fib_per_flow_and_fails_over() {
    let router = Netns::create("router").unwrap();
    let lan = Netns::create("lanhost").unwrap();
    for ns in [&router, &lan] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6=1").unwrap();
        ns.sysctl("net.ipv6.conf.default.disable_ipv6=1").unwrap();
    }
    veth(&router, "lan0", &lan, "lanh0").unwrap();
    router
        .ip(&["addr", "add", "10.0.0.1/24", "dev", "lan0"])
        .unwrap();
    lan.ip(&["addr", "add", "10.0.0.10/24", "dev", "lanh0"])
        .unwrap();
    lan.ip(&["route", "add", "default", "via", "10.0.0.1"])
        .unwrap();
    let tuns: Vec<Tun> = ["tun0", "tun1"]
        .iter()
        .map(|n| router.enter(|| Tun::create(n)).unwrap().unwrap())
        .collect();
    for (i, t) in tuns.iter().enumerate() {
        router
            .ip(&[
                "addr",
                "add",
                &format!("172.16.0.{}/32", i + 1),
                "dev",
                t.name(),
            ])
            .unwrap();
        router.ip(&["link", "set", t.name(), "up"]).unwrap();
    }
    router.sysctl("net.ipv4.ip_forward=1").unwrap();
    router
        .sysctl("net.ipv4.fib_multipath_hash_policy=1")
        .unwrap();
    router
        .ip(&[
            "route",
            "add",
            "10.2.0.0/24",
            "nexthop",
            "dev",
            "tun0",
            "nexthop",
            "dev",
            "tun1",
        ])
        .unwrap();

    let mut xdp = router
        .enter(|| {
            let mut x = XdpPrograms::load()?;
            x.attach_lan("lan0", XdpAttach::Driver).map(|_| x)
        })
        .unwrap()
        .unwrap();
    let cfg = PortConfig {
        frames: 1024,
        frame_size: 4096,
        ring_size: 256,
    };
    let mut port = router.enter(|| Port::new(cfg)).unwrap().unwrap();
    let socks = [0u32, 1].map(|t| {
        let s = router
            .enter(|| port.add_socket("lan0", 0, true, false))
            .unwrap()
            .unwrap();
        xdp.bind_lan_xsk(0, t, port.fd(s).unwrap()).unwrap();
        let ifindex: u32 = router
            .exec("cat", &[&format!("/sys/class/net/tun{t}/ifindex")])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        xdp.set_tunnel_ifindex(ifindex, t).unwrap();
        xdp.set_tunnel_live(t, true).unwrap();
        s
    });

    // Both tunnels up: every flow on the kernel's choice, once.
    send_flows(&lan);
    let seen = collect(&mut port, socks, FLOWS as usize);
    assert_eq!(
        seen.len(),
        FLOWS as usize,
        "flows that reached a tunnel socket: {seen:?}"
    );
    let mut per_tunnel = [0; 2];
    for (sport, tunnels) in &seen {
        assert_eq!(
            tunnels,
            &vec![kernel_choice(&router, *sport)],
            "flow from port {sport}"
        );
        per_tunnel[tunnels[0] as usize] += 1;
    }
    assert!(
        per_tunnel.iter().all(|n| *n > 0),
        "ECMP used one tunnel only: {per_tunnel:?}"
    );

    // The same flows again: sticky.
    send_flows(&lan);
    let again = collect(&mut port, socks, FLOWS as usize);
    assert_eq!(again, seen, "a flow changed tunnel");

    // Tunnel 0 down: its flows move to tunnel 1, the others stay.
    xdp.set_tunnel_live(0, false).unwrap();
    send_flows(&lan);
    let failed_over = collect(&mut port, socks, FLOWS as usize);
    assert!(
        failed_over.values().all(|t| t == &vec![1]),
        "{failed_over:?}"
    );
    let lc = xdp.lan_counters().unwrap();
    assert_eq!(lc[LanCounter::Failover as usize], per_tunnel[0], "{lc:?}");

    // Back up: flows return to the FIB's choice.
    xdp.set_tunnel_live(0, true).unwrap();
    send_flows(&lan);
    assert_eq!(collect(&mut port, socks, FLOWS as usize), seen);
    let lc = xdp.lan_counters().unwrap();
    assert_eq!(lc[LanCounter::ToTunnel as usize], 4 * u64::from(FLOWS));
    let t0 = xdp.tunnel_counters(0).unwrap();
    let t1 = xdp.tunnel_counters(1).unwrap();
    assert_eq!(t0.lan_packets + t1.lan_packets, 4 * u64::from(FLOWS));
    assert_eq!(t0.lan_packets, 3 * per_tunnel[0]);

    // Not for a tunnel: the stack still gets it (the router answers pings).
    lan.exec("ping", &["-c", "1", "-W", "2", "10.0.0.1"])
        .unwrap();
    assert!(xdp.lan_counters().unwrap()[LanCounter::NotTunneled as usize] >= 1);
    router.enter(move || drop((port, xdp, tuns))).unwrap();
}
