//! The XFRM module against a real kernel: SAs (GCM with NAT-T, ESN and
//! if_id; CBC + HMAC-SHA1-96), narrowed policies, an xfrm interface,
//! counters after traffic, a hard expire, NAT-T's socket option, and
//! `flush_ours` leaving the host's own SA and policy alone.
//!
//! Runs as root in a network namespace of its own (the test thread
//! unshares one). Kernels without ESP or xfrm interfaces (the build
//! machines' own) skip it, unless `XESP_EXPECT_XFRM=1`, which makes missing
//! support a failure: the VM harness sets it (Debian's kernel under QEMU).
//!
//! With `XESP_XFRM_CAPTURE=<dir>`, the raw messages the kernel sends
//! (NEWSA and NEWPOLICY notifications, the EXPIRE, a GETSA answer) are
//! written there as hex, one file each: that is how the golden fixtures in
//! `src/xfrm/fixtures/` were made.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use datapath_user::xfrm::{
    self, EncapPorts, ExpireEvents, PolicyDir, SaId, Xfrm, XfrmError, XfrmSa, natt, tunnel_policies,
};
use ike_proto::{
    backend::{ChildSaSpec, Direction},
    ts::TsRange,
};
use netlink_packet_core::{
    NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_xfrm::{UserSaId, XfrmMessage, state::DelGetMessage};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_XFRM};
use xesp_esp::{
    alg::{AesKeyBits, Encr, Integ, Suite},
    sa::{Lifetime, Limits},
};
use zeroize::Zeroizing;

const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const FOREIGN_PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const IF_ID: u32 = 7;
const SPI_OUT: u32 = 0xc000_0001;
const SPI_IN: u32 = 0xc000_0002;
const SPI_CBC: u32 = 0xc000_0003;
const SPI_SHORT: u32 = 0xc000_0004;
const SPI_FOREIGN: u32 = 0x0000_2222;

fn sh(cmd: &str) -> Result<(), String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(cmd: &str) {
    if let Err(e) = sh(cmd) {
        panic!("{e}");
    }
}

fn gcm() -> Suite {
    Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).expect("GCM is a suite")
}

fn cbc_sha1() -> Suite {
    Suite::new(Encr::AesCbc(AesKeyBits::B256), Some(Integ::HmacSha1_96)).expect("a suite")
}

fn keymat(suite: Suite, first: u8) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        (0..suite.keymat_len())
            .map(|i| first.wrapping_add(i as u8))
            .collect(),
    )
}

fn spec(direction: Direction, spi: u32) -> ChildSaSpec {
    ChildSaSpec {
        tunnel: 0,
        spi,
        direction,
        suite: gcm(),
        esn: true,
        keymat: keymat(gcm(), 1),
        local: SocketAddr::new(LOCAL.into(), 4500),
        remote: SocketAddr::new(REMOTE.into(), 4500),
        udp_encap: true,
        lifetime: Lifetime {
            soft: Limits {
                bytes: Some(900_000_000),
                packets: None,
                seconds: Some(3000),
            },
            hard: Limits {
                bytes: Some(1_000_000_000),
                packets: None,
                seconds: Some(3600),
            },
        },
        replay_window: 128,
        local_ts: vec![TsRange::any_v4()],
        remote_ts: vec![TsRange::any_v4()],
    }
}

/// Moves the calling thread into a new network namespace with `lo` up and
/// a dummy underlay carrying LOCAL.
fn enter_netns() -> Result<(), String> {
    // SAFETY: affects only the calling thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (run as root)",
            std::io::Error::last_os_error()
        ));
    }
    sh("ip link set lo up")?;
    sh(
        "ip link add xdum0 type dummy && ip addr add 192.0.2.1/24 dev xdum0 && ip link set xdum0 up",
    )?;
    Ok(())
}

/// Whether this kernel takes ESP SAs and xfrm interfaces.
fn support(x: &mut Xfrm) -> Result<(), String> {
    let probe = XfrmSa::from_spec(
        &spec(Direction::Inbound, 0x0bad_cafe),
        99,
        xfrm::reqid(99).map_err(|e| e.to_string())?,
    );
    x.add_sa(&probe).map_err(|e| format!("ESP SA: {e}"))?;
    x.delete_sa(SaId::esp(LOCAL.into(), 0x0bad_cafe))
        .map_err(|e| e.to_string())?;
    let i = xfrm::create_interface("xprobe0", 99, 0).map_err(|e| format!("xfrm interface: {e}"))?;
    xfrm::delete_interface(i).map_err(|e| e.to_string())?;
    Ok(())
}

/// Collects the raw messages of XFRM's multicast groups.
struct Monitor {
    sock: Socket,
    seen: Vec<Vec<u8>>,
}

/// XFRMNLGRP_EXPIRE, _SA, _POLICY (include/uapi/linux/xfrm.h).
const GROUPS: [u32; 3] = [
    netlink_packet_xfrm::XFRMNLGRP_EXPIRE,
    netlink_packet_xfrm::XFRMNLGRP_SA,
    netlink_packet_xfrm::XFRMNLGRP_POLICY,
];

impl Monitor {
    fn open() -> Self {
        let mut sock = Socket::new(NETLINK_XFRM).expect("NETLINK_XFRM");
        sock.bind_auto().expect("bind");
        for g in GROUPS {
            sock.add_membership(g).expect("join an XFRM group");
        }
        sock.set_non_blocking(true).expect("non-blocking");
        sock.set_rx_buf_sz(1 << 20).expect("a large receive buffer");
        Self {
            sock,
            seen: Vec::new(),
        }
    }

    fn poll(&mut self) {
        let mut buf = vec![0u8; 65536];
        loop {
            match self.sock.recv(&mut &mut buf[..], 0) {
                Ok(n) => self.seen.extend(split(&buf[..n])),
                // Overflowed: what is left in the queue is still worth reading.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(_) => return,
            }
        }
    }

    /// The first message of `kind` whose body `pick` accepts.
    fn find(&self, kind: u16, pick: impl Fn(&[u8]) -> bool) -> Option<&Vec<u8>> {
        self.seen.iter().find(|m| {
            NetlinkBuffer::new_checked(&m[..])
                .map(|b| b.message_type() == kind && pick(b.payload()))
                .unwrap_or(false)
        })
    }
}

fn split(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Ok(b) = NetlinkBuffer::new_checked(bytes) {
        let len = b.length() as usize;
        if len < 16 || len > bytes.len() {
            break;
        }
        out.push(bytes[..len].to_vec());
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    out
}

/// The SPI in an SA message body (`xfrm_usersa_info.id.spi`, after the
/// 56-octet selector and the 16-octet address).
fn spi_of_sa(body: &[u8]) -> Option<u32> {
    body.get(72..76)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A GETSA answer exactly as the kernel sends it.
fn raw_getsa(dst: Ipv4Addr, spi: u32) -> Vec<u8> {
    let mut sock = Socket::new(NETLINK_XFRM).expect("NETLINK_XFRM");
    sock.bind_auto().expect("bind");
    sock.connect(&NlAddr::new(0, 0)).expect("connect");
    let mut id = UserSaId::default();
    id.destination(&IpAddr::V4(dst));
    id.spi = spi;
    id.proto = 50;
    let mut h = NetlinkHeader::default();
    h.flags = NLM_F_REQUEST;
    h.sequence_number = 77;
    let mut m = NetlinkMessage::new(
        h,
        NetlinkPayload::InnerMessage(XfrmMessage::GetSa(DelGetMessage {
            user_sa_id: id,
            nlas: vec![],
        })),
    );
    m.finalize();
    let mut out = vec![0; m.header.length as usize];
    m.serialize(&mut out);
    sock.send(&out, 0).expect("send GETSA");
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut &mut buf[..], 0).expect("GETSA answer");
    split(&buf[..n]).into_iter().next().expect("one message")
}

fn capture(name: &str, bytes: &[u8]) {
    let Ok(dir) = std::env::var("XESP_XFRM_CAPTURE") else {
        return;
    };
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(format!("{dir}/{name}.hex"), hex + "\n").expect("write a capture");
}

#[test]
fn xfrm_against_the_kernel() {
    let expect = std::env::var("XESP_EXPECT_XFRM").as_deref() == Ok("1");
    let ready = enter_netns().and_then(|()| {
        let mut x = Xfrm::open().map_err(|e| e.to_string())?;
        support(&mut x)
    });
    if let Err(why) = ready {
        assert!(!expect, "XESP_EXPECT_XFRM=1 but this kernel cannot: {why}");
        eprintln!(
            "skipped: this kernel cannot run XFRM tests ({why}); XESP_EXPECT_XFRM=1 makes this fail"
        );
        return;
    }
    run();
}

fn run() {
    let mut monitor = Monitor::open();
    let mut events = ExpireEvents::open().expect("expire events");
    let mut x = Xfrm::open().expect("XFRM socket");
    let reqid = xfrm::reqid(0).expect("tunnel 0 has a reqid");
    assert!(xfrm::is_ours(reqid));

    // --- the tunnel's interface
    let dum = datapath_user::netlink::ifindex("xdum0");
    assert_ne!(dum, 0);
    let tun = xfrm::create_interface("Tunnel0", IF_ID, dum).expect("xfrm interface");
    assert!(matches!(
        xfrm::create_interface("Tunnel0", IF_ID, dum),
        Err(XfrmError::Kernel {
            errno: libc::EEXIST,
            ..
        })
    ));
    must(
        "ip link set Tunnel0 up && ip addr add 172.16.0.1/32 dev Tunnel0 && ip route add 10.2.0.0/24 dev Tunnel0 src 172.16.0.1",
    );
    let details = Command::new("ip")
        .args(["-d", "link", "show", "Tunnel0"])
        .output()
        .expect("ip");
    let details = String::from_utf8_lossy(&details.stdout);
    assert!(
        details.contains("xfrm") && details.contains("if_id 0x7"),
        "{details}"
    );

    // --- SAs: GCM with NAT-T, ESN and if_id both ways, from CHILD_SA specs
    let out_sa = XfrmSa::from_spec(&spec(Direction::Outbound, SPI_OUT), IF_ID, reqid);
    let in_sa = XfrmSa::from_spec(&spec(Direction::Inbound, SPI_IN), IF_ID, reqid);
    assert_eq!(
        (out_sa.src, out_sa.dst),
        (IpAddr::V4(LOCAL), IpAddr::V4(REMOTE))
    );
    assert_eq!(
        (in_sa.src, in_sa.dst),
        (IpAddr::V4(REMOTE), IpAddr::V4(LOCAL))
    );
    x.add_sa(&out_sa).expect("outbound SA");
    x.add_sa(&in_sa).expect("inbound SA");
    assert_eq!(
        x.add_sa(&in_sa).map_err(|e| e.errno()).err(),
        Some(Some(libc::EEXIST)),
        "NEWSA is exclusive"
    );
    // CBC + HMAC-SHA1-96, no NAT-T, no ESN, a 32-packet window.
    let cbc = XfrmSa {
        spi: SPI_CBC,
        suite: cbc_sha1(),
        keymat: keymat(cbc_sha1(), 0x41),
        esn: false,
        replay_window: 32,
        encap: None,
        ..in_sa.clone()
    };
    x.add_sa(&cbc).expect("CBC SA");
    // Bad input is refused before the kernel sees it.
    let short = XfrmSa {
        keymat: Zeroizing::new(vec![1; 5]),
        ..cbc.clone()
    };
    assert!(matches!(x.add_sa(&short), Err(XfrmError::InvalidSa { .. })));

    // UPDSA: new NAT-T ports for the inbound SA (the peer's mapping moved).
    let moved = XfrmSa {
        encap: Some(EncapPorts {
            sport: 4501,
            dport: 4500,
        }),
        ..in_sa.clone()
    };
    x.update_sa(&moved).expect("UPDSA");
    monitor.poll();

    let sas = x.dump_sas().expect("SA dump");
    let got_in = sas
        .iter()
        .find(|s| s.id.spi == SPI_IN)
        .expect("the inbound SA is in the dump");
    assert_eq!(got_in.src, IpAddr::V4(REMOTE));
    assert_eq!(got_in.reqid, reqid);
    assert_eq!(got_in.if_id, IF_ID);
    assert_eq!(got_in.mode, 1);
    assert!(got_in.esn());
    assert_eq!(got_in.replay_window, 128);
    assert_eq!(
        got_in.encap,
        Some(EncapPorts {
            sport: 4501,
            dport: 4500
        })
    );
    let aead = got_in.aead.as_ref().expect("AEAD");
    assert_eq!(
        (aead.name.as_str(), aead.key_bits, aead.icv_bits),
        ("rfc4106(gcm(aes))", 288, 128)
    );
    assert_eq!(got_in.lifetime, spec(Direction::Inbound, 0).lifetime);
    let got_out = sas
        .iter()
        .find(|s| s.id.spi == SPI_OUT)
        .expect("outbound SA");
    assert_eq!(
        got_out.replay_window, 1,
        "ESN outbound keeps the kernel's minimum window"
    );
    let got_cbc = sas.iter().find(|s| s.id.spi == SPI_CBC).expect("CBC SA");
    assert!(!got_cbc.esn());
    assert_eq!(got_cbc.replay_window, 32);
    assert_eq!(got_cbc.encap, None);
    let integ = got_cbc.integrity.as_ref().expect("integrity");
    assert_eq!(
        (integ.name.as_str(), integ.key_bits, integ.icv_bits),
        ("hmac(sha1)", 160, 96)
    );
    let enc = got_cbc.encryption.as_ref().expect("encryption");
    assert_eq!((enc.name.as_str(), enc.key_bits), ("cbc(aes)", 256));

    // --- policies: 0/0 both ways for Tunnel0
    let any = [TsRange::any_v4()];
    let policies =
        tunnel_policies(&any, &any, LOCAL.into(), REMOTE.into(), IF_ID, reqid).expect("policies");
    assert_eq!(policies.len(), 3);
    for p in &policies {
        x.add_policy(p).expect("policy");
    }
    // Narrowed selectors for a second tunnel: 10.0.0.1-10.0.0.6 is four
    // prefixes; TCP port 443 on the remote side.
    let local_ts = [TsRange {
        start: Ipv4Addr::new(10, 0, 0, 1),
        end: Ipv4Addr::new(10, 0, 0, 6),
        protocol: 0,
        start_port: 0,
        end_port: 65535,
    }];
    let remote_ts = [TsRange {
        protocol: 6,
        start_port: 443,
        end_port: 443,
        ..TsRange::prefix(Ipv4Addr::new(10, 2, 0, 0), 24)
    }];
    let reqid1 = xfrm::reqid(1).expect("tunnel 1");
    let narrowed = tunnel_policies(
        &local_ts,
        &remote_ts,
        LOCAL.into(),
        REMOTE.into(),
        8,
        reqid1,
    )
    .expect("narrowed policies");
    assert_eq!(narrowed.len(), 4 * 3);
    for p in &narrowed {
        x.add_policy(p).expect("narrowed policy");
    }
    monitor.poll();
    let dumped = x.dump_policies().expect("policy dump");
    for p in policies.iter().chain(&narrowed) {
        assert!(
            dumped.iter().any(|d| &d.policy == p),
            "{p:?} is not in the dump: {dumped:#?}"
        );
    }
    // UPDPOLICY replaces, DELPOLICY by selector removes.
    x.update_policy(&narrowed[0]).expect("UPDPOLICY");
    assert!(x.delete_policy(&narrowed[0]).expect("DELPOLICY"));
    assert!(!x.delete_policy(&narrowed[0]).expect("DELPOLICY again"));

    // --- traffic out of Tunnel0: the outbound SA counts it
    let udp = UdpSocket::bind("172.16.0.1:0").expect("bind on Tunnel0's address");
    for _ in 0..3 {
        udp.send_to(b"through the tunnel", "10.2.0.4:9")
            .expect("send");
    }
    let counters = x
        .counters(SaId::esp(REMOTE.into(), SPI_OUT))
        .expect("GETSA")
        .expect("the SA exists");
    assert_eq!(counters.packets, 3, "{counters:?}");
    assert!(counters.bytes >= 3 * 46, "{counters:?}");
    assert_ne!(counters.add_time, 0);
    assert_eq!(counters.to_sa_counters().packets, 3);
    assert_eq!(
        x.counters(SaId::esp(REMOTE.into(), 0x1234_5678))
            .expect("GETSA of none"),
        None
    );
    capture("getsa_gcm_out", &raw_getsa(REMOTE, SPI_OUT));

    // --- NAT-T: the IKE socket on 4500 hands ESP to the kernel
    let ike = UdpSocket::bind("192.0.2.1:4500").expect("IKE socket");
    assert_eq!(natt::espinudp(&ike).expect("UDP_ENCAP"), 0);
    xfrm::set_espinudp(&ike).expect("UDP_ENCAP_ESPINUDP");
    assert_eq!(
        natt::espinudp(&ike).expect("UDP_ENCAP"),
        natt::UDP_ENCAP_ESPINUDP
    );

    // --- a hard expire: 2 s of hard lifetime
    let short = XfrmSa {
        spi: SPI_SHORT,
        lifetime: Lifetime {
            soft: Limits {
                seconds: Some(1),
                ..Limits::default()
            },
            hard: Limits {
                seconds: Some(2),
                ..Limits::default()
            },
        },
        ..in_sa.clone()
    };
    x.add_sa(&short).expect("short-lived SA");
    monitor.poll();
    let start = Instant::now();
    let mut got = Vec::new();
    while !got
        .iter()
        .any(|e: &xfrm::SaExpire| e.hard && e.spi == SPI_SHORT)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no hard expire in 60 s: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        got.extend(events.drain().expect("events"));
        monitor.poll();
    }
    let soft = got
        .iter()
        .find(|e| !e.hard)
        .expect("a soft expire came first");
    assert_eq!(soft.spi, SPI_SHORT);
    let hard = got.iter().find(|e| e.hard).expect("hard");
    assert_eq!(hard.id(), SaId::esp(LOCAL.into(), SPI_SHORT));
    assert!(xfrm::is_ours(hard.reqid));
    assert_eq!(hard.if_id, IF_ID);
    assert_eq!(
        x.get_sa(SaId::esp(LOCAL.into(), SPI_SHORT)).expect("GETSA"),
        None,
        "hard expiry removes it"
    );

    // --- the host's own SA and policy (another reqid), then flush ours
    must(&format!(
        "ip xfrm state add src {FOREIGN_PEER} dst {LOCAL} proto esp spi {SPI_FOREIGN} reqid 5 mode tunnel \
         aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324 128"
    ));
    must(&format!(
        "ip xfrm policy add src 10.9.0.0/24 dst 10.8.0.0/24 dir out tmpl src {LOCAL} dst {FOREIGN_PEER} proto esp reqid 5 mode tunnel"
    ));
    let flushed = x.flush_ours().expect("flush_ours");
    assert_eq!(flushed.sas, 3, "{flushed:?}");
    assert_eq!(flushed.policies, 3 + 11, "{flushed:?}");
    let left = x.dump_sas().expect("SA dump");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].id.spi, SPI_FOREIGN);
    assert_eq!(left[0].reqid, 5);
    let left = x.dump_policies().expect("policy dump");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].policy.dir, PolicyDir::Out);
    assert_eq!(left[0].policy.templates[0].reqid, 5);
    assert_eq!(x.flush_ours().expect("again"), xfrm::Flushed::default());

    // --- the interface goes
    assert!(xfrm::delete_interface(tun).expect("DELLINK"));
    assert!(!xfrm::delete_interface(tun).expect("DELLINK again"));

    // --- the fixtures
    monitor.poll();
    let sa = |spi: u32| move |b: &[u8]| spi_of_sa(b) == Some(spi);
    let newsa = 0x10;
    let updsa = 0x1a;
    let expire = 0x18;
    let newpolicy = 0x13;
    let dir_out = |b: &[u8]| b.get(160) == Some(&1); // xfrm_userpolicy_info.dir
    for (name, kind, pick) in [
        (
            "newsa_gcm_in",
            newsa,
            Box::new(sa(SPI_IN)) as Box<dyn Fn(&[u8]) -> bool>,
        ),
        ("newsa_cbc", newsa, Box::new(sa(SPI_CBC))),
        ("updsa_gcm_in", updsa, Box::new(sa(SPI_IN))),
        (
            "expire_hard",
            expire,
            Box::new(|b: &[u8]| spi_of_sa(b) == Some(SPI_SHORT) && b.get(224) == Some(&1)),
        ),
        ("newpolicy_out", newpolicy, Box::new(dir_out)),
    ] {
        let m = monitor.find(kind, pick).unwrap_or_else(|| {
            let seen: Vec<(u16, Option<u32>)> = monitor
                .seen
                .iter()
                .map(|m| (u16::from_ne_bytes([m[4], m[5]]), spi_of_sa(&m[16..])))
                .collect();
            panic!("no {name} among {seen:x?}")
        });
        capture(name, m);
    }
}
