//! Needs root: the generator's AF_XDP sender puts exactly the datagrams it
//! was given on the wire, flat out and paced, on either queue of a
//! two-queue veth, with headers the receiving stack accepts (checksums):
//! a UDP socket at the far end of a veth pair between two namespaces this
//! test creates (removed when it ends, also on failure) receives each one
//! once, intact.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use datapath_user::nexthop::NextHops;
use xesp_benches::{
    afxdp::{self, XskSender},
    traffic::{self, Prepared},
};
use xtask::netns::{Netns, veth_queues};

const SRC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 1), 40000);
const DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 2), 5001);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Sends `n` numbered datagrams of `size` from `gen` on `queue`, at `rate`
/// if given, while a socket in `sink` receives; returns what the sender
/// counted and the packet numbers received (each once).
fn send_and_receive(
    generator: &Netns,
    sink: &Netns,
    queue: u32,
    n: u64,
    size: usize,
    rate: Option<f64>,
) -> (afxdp::TxCount, Vec<u64>) {
    let rx = sink.enter(|| UdpSocket::bind(DST).unwrap()).unwrap();
    // Room for every datagram, however fast they come.
    let big: libc::c_int = 16 << 20;
    // SAFETY: setting an int socket option of the size given.
    unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const big).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(10);
            while (got.len() as u64) < n && Instant::now() < deadline {
                let Ok(len) = rx.recv(&mut buf) else { continue };
                let p = &buf[..len];
                assert!(traffic::is_bench_payload(p), "not ours: {p:?}");
                assert_eq!(len, size - traffic::IP_UDP_HLEN);
                got.push(u64::from_be_bytes(p[8..16].try_into().unwrap()));
            }
            // Anything more would be a duplicate or a stray.
            if rx.recv(&mut buf).is_ok() {
                got.push(u64::MAX);
            }
            got
        });
        let count = generator
            .enter(|| {
                let mut hops = NextHops::new().unwrap();
                let p = Prepared {
                    datagrams: (0..n).map(|k| (traffic::payload(size, k), DST)).collect(),
                };
                let framed = afxdp::frame_all(&mut hops, SRC, &p).unwrap();
                assert_eq!(framed.egress.as_ref().unwrap().iface, "gen0");
                let mut tx = XskSender::open("gen0", queue).unwrap();
                let t = Instant::now();
                let c = tx.send_all(&framed.frames, rate);
                if let Some(r) = rate {
                    // The last batch is due after (n - BATCH) / rate seconds.
                    let due = (n.saturating_sub(traffic::BATCH as u64)) as f64 / r;
                    assert!(t.elapsed().as_secs_f64() >= due, "paced");
                }
                c
            })
            .unwrap();
        (count, receiver.join().unwrap())
    })
}

#[test]
fn root_afxdp_sender_sends_exactly_what_it_is_given() {
    if !is_root() {
        eprintln!("skipped: needs root (namespaces, AF_XDP)");
        return;
    }
    let generator = Netns::create("gentx").unwrap();
    let sink = Netns::create("gensink").unwrap();
    for ns in [&generator, &sink] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6=1").unwrap();
        ns.sysctl("net.ipv6.conf.default.disable_ipv6=1").unwrap();
    }
    veth_queues(&generator, "gen0", &sink, "sink0", 2).unwrap();
    generator
        .ip(&["addr", "add", "10.9.0.1/24", "dev", "gen0"])
        .unwrap();
    sink.ip(&["addr", "add", "10.9.0.2/24", "dev", "sink0"])
        .unwrap();
    let mac = sink.exec("cat", &["/sys/class/net/sink0/address"]).unwrap();
    generator
        .ip(&[
            "neigh",
            "replace",
            "10.9.0.2",
            "lladdr",
            mac.trim(),
            "dev",
            "gen0",
            "nud",
            "permanent",
        ])
        .unwrap();

    for (queue, n, size, rate) in [
        (0, 600, 64, None),
        (1, 600, 1400, None),
        (1, 3000, 64, Some(60_000.0)),
    ] {
        let (count, got) = send_and_receive(&generator, &sink, queue, n, size, rate);
        let what = format!("queue {queue}, {n} x {size} B, rate {rate:?}");
        assert_eq!(count.sent, n, "{what}: {count:?}");
        assert_eq!(count.not_sent, 0, "{what}");
        assert!(count.kicks > 0, "{what}");
        assert_eq!(got.len() as u64, n, "{what}: received");
        let distinct: HashSet<u64> = got.iter().copied().collect();
        assert_eq!(distinct, (0..n).collect::<HashSet<u64>>(), "{what}");
    }

    // No neighbour entry: a clear error, nothing sent.
    let e = generator
        .enter(|| {
            let mut hops = NextHops::new().unwrap();
            let p = Prepared {
                datagrams: vec![(
                    traffic::payload(64, 0),
                    SocketAddrV4::new(Ipv4Addr::new(10, 9, 0, 3), 5001),
                )],
            };
            afxdp::frame_all(&mut hops, SRC, &p).unwrap_err()
        })
        .unwrap();
    assert!(e.contains("neighbour"), "{e}");
    // No such interface: an error, not a panic.
    assert!(
        generator
            .enter(|| XskSender::open("nonesuch0", 0).err())
            .unwrap()
            .is_some()
    );
}
