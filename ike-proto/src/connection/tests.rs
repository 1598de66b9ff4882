//! Two connections talking in memory with a simulated clock: establishment,
//! loss, duplication, reordering, rekeys and their collisions, DELETE, DPD,
//! cookies, INVALID_KE_PAYLOAD, legacy proposals, NAT-T, authentication
//! failure. After every delivered message the make-before-break invariant is
//! checked: whatever SA a side sends on, the other side can receive on.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Connection, Event, Level, Reject, Transmit, payloads::notify};
use crate::codec::NotifyType;
use crate::{
    backend::{BackendCall, Direction, RecordingBackend, SaBackend},
    config::{EspProposal, IkeProposal, PeerConfig},
    crypto::Psk,
    random::SeededRandom,
    ts::TsRange,
};

const A_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
/// A's address as seen behind a NAT.
const NAT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

fn cfg_a() -> PeerConfig {
    PeerConfig::new(
        "Tunnel0",
        0,
        IpAddr::V4(A_IP),
        IpAddr::V4(B_IP),
        Psk::new(b"secret*1234"),
    )
}

fn cfg_b() -> PeerConfig {
    let mut c = PeerConfig::new(
        "onprem",
        7,
        IpAddr::V4(B_IP),
        IpAddr::V4(A_IP),
        Psk::new(b"secret*1234"),
    );
    c.initiator = false;
    c
}

struct Peer {
    conn: Connection,
    backend: RecordingBackend,
    events: Vec<Event>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

/// What the link does with the n-th datagram.
type Filter = Box<dyn FnMut(usize, Side, &Transmit) -> Fate>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Deliver,
    Drop,
    /// Delivered twice.
    Duplicate,
    /// Delivered after this extra delay.
    Delay(Duration),
}

struct Pair {
    a: Peer,
    b: Peer,
    now: Instant,
    latency: Duration,
    flight: Vec<(Instant, Side, Transmit)>,
    sent: usize,
    filter: Filter,
    /// A is behind a NAT mapping its ports to `nat_base` + port.
    nat_a: bool,
    nat_base: u16,
    delivered: usize,
}

impl Pair {
    fn new(a: PeerConfig, b: PeerConfig) -> Self {
        Self::seeded(a, b, 1)
    }

    /// Both sides' randomness from `seed`: a failing run replays exactly.
    fn seeded(a: PeerConfig, b: PeerConfig, seed: u64) -> Self {
        let now = Instant::now();
        Self {
            a: Peer {
                conn: Connection::new(Arc::new(a), Arc::new(SeededRandom::new(seed)), now),
                backend: RecordingBackend::new(0x1000),
                events: vec![],
            },
            b: Peer {
                conn: Connection::new(
                    Arc::new(b),
                    Arc::new(SeededRandom::new(seed ^ 0x5eed_0000)),
                    now,
                ),
                backend: RecordingBackend::new(0xc000_0000),
                events: vec![],
            },
            now,
            latency: Duration::from_millis(5),
            flight: Vec::new(),
            sent: 0,
            filter: Box::new(|_, _, _| Fate::Deliver),
            nat_a: false,
            nat_base: 6000,
            delivered: 0,
        }
    }

    fn peer(&mut self, s: Side) -> &mut Peer {
        match s {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    fn collect(&mut self) {
        for side in [Side::A, Side::B] {
            while let Some(t) = self.peer(side).conn.poll_transmit() {
                let n = self.sent;
                self.sent += 1;
                if t.data == [0xff] {
                    continue; // NAT-keepalive: nothing to deliver
                }
                let at = self.now + self.latency;
                match (self.filter)(n, side, &t) {
                    Fate::Deliver => self.flight.push((at, side, t)),
                    Fate::Drop => {}
                    Fate::Duplicate => {
                        self.flight.push((at, side, t.clone()));
                        self.flight.push((at + Duration::from_millis(1), side, t));
                    }
                    Fate::Delay(d) => self.flight.push((at + d, side, t)),
                }
            }
            while let Some(e) = self.peer(side).conn.poll_event() {
                self.peer(side).events.push(e);
            }
        }
    }

    /// Runs until `until` (simulated), delivering and firing timers in order.
    fn run_until(&mut self, until: Instant) {
        // A timer that stays due after it fired would spin a driver forever.
        let mut idle_rounds = 0;
        loop {
            self.collect();
            let next_msg = self.flight.iter().map(|f| f.0).min();
            let next_timer = [self.a.conn.poll_timeout(), self.b.conn.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let next = [next_msg, next_timer].into_iter().flatten().min();
            let Some(next) = next.filter(|n| *n <= until) else {
                self.now = until;
                return;
            };
            idle_rounds = if next > self.now || next_msg == Some(next) {
                0
            } else {
                idle_rounds + 1
            };
            assert!(
                idle_rounds < 100,
                "a timer stays due after firing: A [{}], B [{}]",
                self.a.conn.due_timers(self.now),
                self.b.conn.due_timers(self.now),
            );
            self.now = self.now.max(next);
            if next_msg == Some(next) {
                let k = self.flight.iter().position(|f| f.0 == next).unwrap_or(0);
                let (_, from, t) = self.flight.remove(k);
                self.deliver(from, t);
            } else {
                let now = self.now;
                for side in [Side::A, Side::B] {
                    let p = self.peer(side);
                    if p.conn.poll_timeout().is_some_and(|t| t <= now) {
                        p.conn.handle_timeout(now, &mut p.backend);
                    }
                }
            }
            self.check_invariant();
        }
    }

    fn run(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn deliver(&mut self, from: Side, t: Transmit) {
        self.delivered += 1;
        let now = self.now;
        let (src_ip, src_port) = match from {
            Side::A if self.nat_a => (NAT_IP, self.nat_base + t.local_port),
            Side::A => (A_IP, t.local_port),
            Side::B => (B_IP, t.local_port),
        };
        let (to, local_port) = match from {
            Side::A => (Side::B, t.remote.port()),
            // Back through the NAT: the external port maps to A's own.
            Side::B if self.nat_a => (Side::A, t.remote.port().wrapping_sub(self.nat_base)),
            Side::B => (Side::A, t.remote.port()),
        };
        let remote = SocketAddr::new(IpAddr::V4(src_ip), src_port);
        let p = self.peer(to);
        p.conn
            .handle_datagram(now, local_port, remote, &t.data, &mut p.backend);
    }

    /// Make-before-break: once both sides carry traffic, the SA a side sends
    /// on is installed, with the same keys, as the other side's inbound SA.
    /// (During the very first IKE_AUTH the responder may route a round trip
    /// before the initiator has installed anything: no traffic can be lost.)
    fn check_invariant(&self) {
        for x in [&self.a, &self.b] {
            assert!(
                x.conn.has_next_attempt(),
                "{}: configured initiator with no tunnel, no attempt under way and no timer",
                x.conn.config().name
            );
        }
        for (x, y) in [(&self.a, &self.b), (&self.b, &self.a)] {
            let tunnel = x.conn.config().tunnel;
            if y.backend.route_of(y.conn.config().tunnel).is_none() {
                continue;
            }
            if let Some(spi) = x.backend.route_of(tunnel) {
                let out = x
                    .backend
                    .spec(spi, Direction::Outbound)
                    .expect("routed SA installed");
                let inb = y.backend.spec(spi, Direction::Inbound).unwrap_or_else(|| {
                    panic!(
                        "{} sends on SPI {spi:08x} which {} cannot receive",
                        x.conn.config().name,
                        y.conn.config().name
                    )
                });
                assert_eq!(*out.keymat, *inb.keymat, "keys of SPI {spi:08x} differ");
                assert_eq!((out.suite, out.esn), (inb.suite, inb.esn));
            }
        }
    }

    fn up(&self) -> bool {
        self.a.conn.is_up() && self.b.conn.is_up()
    }

    /// Installed CHILD_SA pairs on each side (inbound SPIs).
    fn inbound(p: &Peer) -> Vec<u32> {
        let mut v: Vec<u32> = p
            .backend
            .installed
            .iter()
            .filter(|s| s.direction == Direction::Inbound)
            .map(|s| s.spi)
            .collect();
        v.sort();
        v
    }

    fn logs(p: &Peer, level: Level) -> Vec<String> {
        p.events
            .iter()
            .filter_map(|e| match e {
                Event::Log {
                    level: l, message, ..
                } if *l >= level => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    /// Both sides settled on exactly one CHILD_SA pair, the same one.
    fn assert_one_child_pair(&self) {
        let (ia, ib) = (Self::inbound(&self.a), Self::inbound(&self.b));
        assert_eq!(ia.len(), 1, "A inbound {ia:08x?}");
        assert_eq!(ib.len(), 1, "B inbound {ib:08x?}");
        assert_eq!(self.a.backend.route_of(0), Some(ib[0]));
        assert_eq!(self.b.backend.route_of(7), Some(ia[0]));
    }
}

fn established() -> Pair {
    established_seeded(1)
}

fn established_seeded(seed: u64) -> Pair {
    let mut p = Pair::seeded(cfg_a(), cfg_b(), seed);
    p.run(Duration::from_secs(5));
    assert!(
        p.up(),
        "not established: {:?} / {:?}",
        p.a.events,
        p.b.events
    );
    p
}

#[test]
fn establishes_and_installs_matching_keys() {
    let p = established();
    p.assert_one_child_pair();
    assert!(p.a.events.contains(&Event::TunnelUp { tunnel: 0 }));
    assert!(p.b.events.contains(&Event::TunnelUp { tunnel: 7 }));
    // Route-based: 0.0.0.0/0 both ways.
    let spec = &p.a.backend.installed[0];
    assert_eq!(spec.local_ts, vec![TsRange::any_v4()]);
    assert!(!spec.udp_encap, "no NAT, no UDP encapsulation");
    // Inbound installed before outbound, both before routing (per side).
    let calls: Vec<&BackendCall> =
        p.a.backend
            .calls
            .iter()
            .filter(|c| !matches!(c, BackendCall::Allocate(_)))
            .collect();
    assert!(matches!(
        calls[0],
        BackendCall::Install {
            direction: Direction::Inbound,
            ..
        }
    ));
    assert!(matches!(
        calls[1],
        BackendCall::Install {
            direction: Direction::Outbound,
            ..
        }
    ));
    assert!(matches!(calls[2], BackendCall::Route { spi: Some(_), .. }));
    let status = p.a.conn.status(p.now, &mut RecordingBackend::default());
    let ike = status.ike.unwrap();
    assert_eq!(ike.encryption.as_deref(), Some("AES-CBC-256"));
    assert_eq!(ike.dh_group.as_deref(), Some("MODP_2048 (group 14)"));
    assert_eq!(status.children.len(), 1);
}

/// The CHILD_SA's events carry its SPIs, and every event of an exchange
/// its IKE_SA's, as fields.
#[test]
fn log_events_carry_their_spis() {
    let p = established();
    let (spi_i, spi_r) = spis_of(&p.a.conn);
    let ike = format!("{spi_i:016x}/{spi_r:016x}");
    let child =
        &p.a.conn
            .status(p.now, &mut RecordingBackend::default())
            .children[0];
    let spi = format!("{}/{}", child.spi_in, child.spi_out);
    let field = |what: &str| {
        p.a.events.iter().find_map(|e| match e {
            Event::Log {
                message,
                ike_spi,
                spi,
                exchange,
                ..
            } if message.contains(what) => Some((
                ike_spi.map(|s| s.to_string()),
                spi.map(|s| s.to_string()),
                *exchange,
            )),
            _ => None,
        })
    };
    let (ike_spi, child_spi, _) = field("CHILD_SA established").expect("its event");
    assert_eq!(ike_spi.as_deref(), Some(ike.as_str()));
    assert_eq!(child_spi.as_deref(), Some(spi.as_str()));
    let (ike_spi, child_spi, exchange) =
        field(&format!("IKE_SA {ike} established")).expect("its event");
    assert_eq!(
        (ike_spi.as_deref(), exchange),
        (Some(ike.as_str()), Some("IKE_AUTH"))
    );
    assert_eq!(child_spi, None);
}

#[test]
fn survives_the_loss_of_each_message() {
    for lost in 0..4 {
        let mut p = Pair::new(cfg_a(), cfg_b());
        p.filter = Box::new(move |n, _, _| if n == lost { Fate::Drop } else { Fate::Deliver });
        p.run(Duration::from_secs(10));
        assert!(p.up(), "message {lost} lost: not established");
        p.assert_one_child_pair();
        assert!(p.a.conn.stats.retransmits >= 1);
    }
}

#[test]
fn survives_duplication_and_late_copies_of_every_message() {
    let mut p = Pair::new(cfg_a(), cfg_b());
    p.filter = Box::new(|_, _, _| Fate::Duplicate);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    p.assert_one_child_pair();
    // Old messages arriving late (reordered behind newer ones) change nothing.
    let mut p = Pair::new(cfg_a(), cfg_b());
    p.filter = Box::new(|n, _, t| {
        if n % 3 == 0 {
            Fate::Delay(Duration::from_millis(300))
        } else {
            let _ = t;
            Fate::Deliver
        }
    });
    p.run(Duration::from_secs(10));
    assert!(p.up());
    p.assert_one_child_pair();
    p.a.conn.rekey_child(p.now, &mut p.a.backend);
    p.run(Duration::from_secs(10));
    p.assert_one_child_pair();
}

#[test]
fn child_rekey_is_make_before_break() {
    let mut p = established();
    let before = Pair::inbound(&p.a);
    p.a.conn.rekey_child(p.now, &mut p.a.backend);
    p.run(Duration::from_secs(5));
    p.assert_one_child_pair();
    assert_ne!(
        Pair::inbound(&p.a),
        before,
        "a new CHILD_SA replaced the old"
    );
    // On the rekey's initiator: new inbound before new routing before deleting the old.
    let calls = &p.a.backend.calls;
    let pos = |f: &dyn Fn(&BackendCall) -> bool| calls.iter().rposition(f).unwrap();
    let new_in = pos(&|c| {
        matches!(
            c,
            BackendCall::Install {
                direction: Direction::Inbound,
                ..
            }
        )
    });
    let routed = pos(&|c| matches!(c, BackendCall::Route { spi: Some(_), .. }));
    let old_gone = pos(
        &|c| matches!(c, BackendCall::Delete { spi, direction: Direction::Inbound } if *spi == before[0]),
    );
    assert!(new_in < routed && routed < old_gone, "{calls:?}");
    assert_eq!(p.a.conn.stats.rekeys, 1);
    // And from the responder's side too.
    p.b.conn.rekey_child(p.now, &mut p.b.backend);
    p.run(Duration::from_secs(5));
    p.assert_one_child_pair();
}

#[test]
fn child_rekey_with_pfs() {
    let mut a = cfg_a();
    let mut b = cfg_b();
    a.esp_proposals = vec![EspProposal::parse("aes256gcm16-ecp256").unwrap()];
    b.esp_proposals = vec![EspProposal::parse("aes256gcm16-modp2048-ecp256").unwrap()];
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    p.a.conn.rekey_child(p.now, &mut p.a.backend);
    p.run(Duration::from_secs(5));
    p.assert_one_child_pair();
    let status = p.a.conn.status(p.now, &mut RecordingBackend::default());
    assert!(
        status.children[0].suite.contains("ECP_256"),
        "{}",
        status.children[0].suite
    );
}

#[test]
fn ike_rekey_moves_the_children() {
    let mut p = established();
    let spi_before =
        p.a.conn
            .status(p.now, &mut RecordingBackend::default())
            .ike
            .unwrap()
            .spi_i;
    let children = Pair::inbound(&p.a);
    p.b.conn.rekey_ike(p.now);
    p.run(Duration::from_secs(5));
    let sa =
        p.a.conn
            .status(p.now, &mut RecordingBackend::default())
            .ike
            .unwrap();
    assert_ne!(sa.spi_i, spi_before);
    assert_eq!(
        sa.role, "responder",
        "the rekey's initiator is the new IKE_SA's initiator (§2.18)"
    );
    assert_eq!(Pair::inbound(&p.a), children, "CHILD_SAs are untouched");
    // The new IKE_SA works: rekey a CHILD_SA on it.
    p.a.conn.rekey_child(p.now, &mut p.a.backend);
    p.run(Duration::from_secs(5));
    p.assert_one_child_pair();
    assert_eq!(
        p.a.conn
            .status(p.now, &mut RecordingBackend::default())
            .children
            .len(),
        1
    );
}

#[test]
fn a_rekeyed_ike_sa_never_deleted_keeps_no_timer_and_is_dropped() {
    let mut p = established();
    // B rekeys the IKE_SA, but its DELETE of the old one never reaches A.
    p.filter = lose_b_informational_on(spis_of(&p.a.conn).0);
    p.b.conn.rekey_ike(p.now);
    p.run(Duration::from_secs(5));
    assert_eq!(
        p.a.conn.ike_sa_count(),
        2,
        "the old IKE_SA waits for its DELETE"
    );
    // Its DPD and rekey times pass (the harness fails on a timer that stays
    // due), then it is dropped; the tunnel stays up on the new IKE_SA.
    p.run(Duration::from_secs(130));
    assert_eq!(p.a.conn.ike_sa_count(), 1, "{}", p.a.conn.due_timers(p.now));
    assert!(
        Pair::logs(&p.a, Level::Info)
            .iter()
            .any(|l| l.contains("no DELETE ended it"))
    );
    assert!(p.up());
    p.assert_one_child_pair();
}

#[test]
fn simultaneous_child_rekeys_leave_one_pair() {
    // The tie-break (§2.8.1) follows the nonces, and the nonces the seed:
    // the seeds below give both outcomes for A, each replayable.
    let mut outcomes = (0, 0);
    for seed in 1..=8 {
        let mut p = established_seeded(seed);
        let old = Pair::inbound(&p.a);
        p.a.conn.rekey_child(p.now, &mut p.a.backend);
        p.b.conn.rekey_child(p.now, &mut p.b.backend);
        p.run(Duration::from_secs(10));
        p.assert_one_child_pair();
        assert_ne!(Pair::inbound(&p.a), old);
        let (a, b) = (p.a.conn.stats, p.b.conn.stats);
        assert_eq!(
            (
                a.rekey_collisions_won + b.rekey_collisions_won,
                a.rekey_collisions_lost + b.rekey_collisions_lost
            ),
            (1, 1),
            "seed {seed}: one side's rekey survives, the other's goes"
        );
        outcomes.0 += a.rekey_collisions_won;
        outcomes.1 += a.rekey_collisions_lost;
    }
    assert!(
        outcomes.0 > 0 && outcomes.1 > 0,
        "A won {} and lost {}",
        outcomes.0,
        outcomes.1
    );
}

#[test]
fn simultaneous_ike_rekeys_leave_one_ike_sa() {
    let mut outcomes = (0, 0);
    for seed in 1..=8 {
        let mut p = established_seeded(seed);
        let children = Pair::inbound(&p.a);
        p.a.conn.rekey_ike(p.now);
        p.b.conn.rekey_ike(p.now);
        p.run(Duration::from_secs(10));
        let (sa, sb) = (
            p.a.conn
                .status(p.now, &mut RecordingBackend::default())
                .ike
                .unwrap(),
            p.b.conn
                .status(p.now, &mut RecordingBackend::default())
                .ike
                .unwrap(),
        );
        assert_eq!(
            (sa.spi_i.clone(), sa.spi_r.clone()),
            (sb.spi_i, sb.spi_r),
            "both sides use the same IKE_SA"
        );
        assert_eq!(Pair::inbound(&p.a), children);
        // It still works.
        p.a.conn.rekey_child(p.now, &mut p.a.backend);
        p.run(Duration::from_secs(5));
        p.assert_one_child_pair();
        outcomes.0 += p.a.conn.stats.rekey_collisions_won;
        outcomes.1 += p.a.conn.stats.rekey_collisions_lost;
    }
    assert!(
        outcomes.0 > 0 && outcomes.1 > 0,
        "A won {} and lost {}",
        outcomes.0,
        outcomes.1
    );
}

#[test]
fn delete_takes_everything_down_on_both_sides() {
    let mut p = established();
    p.a.conn.close(p.now);
    p.run(Duration::from_secs(5));
    assert!(!p.a.conn.is_up() && !p.b.conn.is_up());
    assert!(Pair::inbound(&p.a).is_empty() && Pair::inbound(&p.b).is_empty());
    assert!(
        p.b.events
            .iter()
            .any(|e| matches!(e, Event::TunnelDown { tunnel: 7, .. }))
    );
    p.run(Duration::from_secs(60));
    assert!(!p.a.conn.is_up(), "closed on purpose: no restart");
}

#[test]
fn dpd_detects_a_dead_peer_and_restarts() {
    let mut p = established();
    // The peer vanishes; we keep sending traffic (on-demand DPD needs outbound).
    p.filter = Box::new(|_, _, _| Fate::Drop);
    let start = p.now;
    let out = p.a.backend.route_of(0).unwrap();
    for s in 1..=30u64 {
        p.a.backend
            .counters
            .entry((out, Direction::Outbound))
            .or_default()
            .packets = s * 100;
        p.run(Duration::from_secs(1));
        if !p.a.conn.is_up() {
            break;
        }
    }
    assert!(!p.a.conn.is_up(), "DPD did not notice");
    let took = p.now - start;
    // interval 10 s + 5 probes 2 s apart, give or take the check granularity.
    assert!(
        took >= Duration::from_secs(10) && took <= Duration::from_secs(25),
        "took {took:?}"
    );
    assert_eq!(p.a.conn.stats.dpd_failures, 1);
    assert!(Pair::inbound(&p.a).is_empty());
    // The peer comes back: the initiator re-establishes on its own.
    p.filter = Box::new(|_, _, _| Fate::Deliver);
    p.b = Peer {
        conn: Connection::new(Arc::new(cfg_b()), Arc::new(SeededRandom::new(99)), p.now),
        backend: RecordingBackend::new(0xd000_0000),
        events: vec![],
    };
    p.run(Duration::from_secs(40));
    assert!(p.up(), "re-established after the peer returned");
}

#[test]
fn on_demand_dpd_is_quiet_without_traffic() {
    let mut p = established();
    let sent = p.sent;
    p.run(Duration::from_secs(60));
    assert_eq!(p.sent, sent, "no traffic, no probes");
    let mut a = cfg_a();
    a.dpd.on_demand = false;
    let mut p = Pair::new(a, cfg_b());
    p.run(Duration::from_secs(5));
    let sent = p.sent;
    p.run(Duration::from_secs(25));
    assert!(p.sent >= sent + 4, "periodic DPD probes an idle peer");
    assert!(p.up());
}

#[test]
fn cookie_is_echoed() {
    let mut b = cfg_b();
    b.require_cookie = true;
    let mut p = Pair::new(cfg_a(), b);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    assert_eq!(p.b.conn.stats.cookies_sent, 1);
    assert_eq!(
        p.sent, 6,
        "IKE_SA_INIT, COOKIE, IKE_SA_INIT again, its response, IKE_AUTH both ways"
    );
}

#[test]
fn invalid_ke_payload_retries_with_the_responders_group() {
    let mut a = cfg_a();
    a.ike_proposals = vec![IkeProposal::parse("aes256-sha256-ecp256-modp2048").unwrap()];
    let mut b = cfg_b();
    b.ike_proposals = vec![IkeProposal::parse("aes256-sha256-modp2048").unwrap()];
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    let ike =
        p.a.conn
            .status(p.now, &mut RecordingBackend::default())
            .ike
            .unwrap();
    assert_eq!(ike.dh_group.as_deref(), Some("MODP_2048 (group 14)"));
}

#[test]
fn legacy_proposals_only_when_both_allow_them() {
    let cisco = || {
        vec![
            IkeProposal::parse("aes256-sha1-modp1024").unwrap(),
            IkeProposal::parse("aes128-sha1-modp1024").unwrap(),
        ]
    };
    let esp = || vec![EspProposal::parse("aes256-sha1").unwrap()];
    // Not allowed here: nothing to offer.
    let mut a = cfg_a();
    a.ike_proposals = cisco();
    let mut p = Pair::new(a, cfg_b());
    p.run(Duration::from_secs(5));
    assert!(!p.up());
    assert!(
        Pair::logs(&p.a, Level::Error)
            .iter()
            .any(|l| l.contains("legacy"))
    );
    // Allowed here, not there: NO_PROPOSAL_CHOSEN.
    let mut a = cfg_a();
    a.ike_proposals = cisco();
    a.allow_legacy = true;
    let mut b = cfg_b();
    b.ike_proposals = cisco();
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(!p.up());
    assert!(
        Pair::logs(&p.a, Level::Warn)
            .iter()
            .any(|l| l.contains("NO_PROPOSAL_CHOSEN")),
        "{:?}",
        p.a.events
    );
    // Both allow it: up, with a warning, on the article's algorithms.
    let mut a = cfg_a();
    a.ike_proposals = cisco();
    a.esp_proposals = esp();
    a.allow_legacy = true;
    let mut b = cfg_b();
    b.ike_proposals = cisco();
    b.esp_proposals = esp();
    b.allow_legacy = true;
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    assert!(
        Pair::logs(&p.a, Level::Warn)
            .iter()
            .any(|l| l.contains("legacy"))
    );
    let s = p.a.conn.status(p.now, &mut RecordingBackend::default());
    assert_eq!(
        s.ike.unwrap().dh_group.as_deref(),
        Some("MODP_1024 (group 2)")
    );
    assert_eq!(s.children[0].suite, "AES-CBC-256/HMAC-SHA1-96");
}

#[test]
fn nat_detected_floats_to_4500_and_encapsulates_esp() {
    // The responder knows the initiator by its NAT's public address, and by its identity.
    let mut b = cfg_b();
    b.remote = IpAddr::V4(NAT_IP);
    b.remote_id = Some(crate::config::Identity::Ipv4(A_IP));
    let mut p = Pair::new(cfg_a(), b);
    p.nat_a = true;
    p.run(Duration::from_secs(5));
    assert!(p.up(), "{:?}\n{:?}", p.a.events, p.b.events);
    for peer in [&p.a, &p.b] {
        assert!(
            peer.backend.installed.iter().all(|s| s.udp_encap),
            "ESP in UDP"
        );
    }
    let b_in =
        p.b.backend
            .installed
            .iter()
            .find(|s| s.direction == Direction::Outbound)
            .unwrap();
    assert_eq!(
        b_in.remote,
        SocketAddr::new(IpAddr::V4(NAT_IP), 6000 + 4500),
        "B sends to A's NAT mapping"
    );
    assert_eq!(b_in.local.port(), 4500);
    // A is behind the NAT: it sends keepalives.
    let sent = p.sent;
    p.run(Duration::from_secs(45));
    assert!(p.sent >= sent + 2);
}

#[test]
fn forced_encapsulation_without_a_nat_floats_both_sides() {
    for forcing in [Side::A, Side::B] {
        let (mut a, mut b) = (cfg_a(), cfg_b());
        match forcing {
            Side::A => a.force_encap = true,
            Side::B => b.force_encap = true,
        }
        let mut p = Pair::new(a, b);
        p.run(Duration::from_secs(5));
        assert!(p.up(), "{forcing:?}: {:?}\n{:?}", p.a.events, p.b.events);
        for peer in [&p.a, &p.b] {
            assert!(!peer.backend.installed.is_empty());
            for s in &peer.backend.installed {
                assert!(s.udp_encap, "{forcing:?} forcing: {s:?} not in UDP");
                assert_eq!((s.local.port(), s.remote.port()), (4500, 4500));
            }
        }
    }
}

#[test]
fn wrong_psk_fails_authentication_and_retries_later() {
    let mut b = cfg_b();
    b.psk = Psk::new(b"another key");
    let mut p = Pair::new(cfg_a(), b);
    p.run(Duration::from_secs(5));
    assert!(!p.up());
    // Tried, and tried again with backoff (1 s, 2 s, ...), not hammering.
    assert!(
        (1..=3).contains(&p.b.conn.stats.auth_failures),
        "{}",
        p.b.conn.stats.auth_failures
    );
    assert!(
        Pair::logs(&p.a, Level::Warn)
            .iter()
            .any(|l| l.contains("AUTHENTICATION_FAILED"))
    );
    assert!(
        Pair::logs(&p.b, Level::Error)
            .iter()
            .any(|l| l.contains("authentication"))
    );
    // The failure is logged as an event of its exchange.
    assert!(p.b.events.iter().any(|e| matches!(
        e,
        Event::Log { level: Level::Error, message, exchange: Some("IKE_AUTH"), ike_spi: Some(_), .. }
            if message.contains("authentication")
    )));
    // No key material reaches the logs.
    for l in Pair::logs(&p.a, Level::Debug)
        .iter()
        .chain(Pair::logs(&p.b, Level::Debug).iter())
    {
        assert!(
            !l.contains("secret*1234") && !l.contains("another key"),
            "{l}"
        );
    }
    let tries = p.sent;
    p.run(Duration::from_secs(10));
    assert!(p.sent > tries, "the initiator tries again");
}

#[test]
fn narrowed_traffic_selectors() {
    let mut a = cfg_a();
    a.local_ts = vec![
        TsRange::parse("10.0.0.0/24").unwrap(),
        TsRange::parse("10.1.10.0/25").unwrap(),
    ];
    a.remote_ts = vec![TsRange::parse("10.2.0.0/24").unwrap()];
    let mut p = Pair::new(a, cfg_b());
    p.run(Duration::from_secs(5));
    assert!(p.up());
    let b_out =
        p.b.backend
            .installed
            .iter()
            .find(|s| s.direction == Direction::Outbound)
            .unwrap();
    assert_eq!(b_out.local_ts, vec![TsRange::parse("10.2.0.0/24").unwrap()]);
    assert_eq!(b_out.remote_ts.len(), 2);
    // Selectors the responder does not allow are refused, the IKE_SA stays.
    let mut a = cfg_a();
    a.local_ts = vec![TsRange::parse("10.0.0.0/24").unwrap()];
    let mut b = cfg_b();
    b.remote_ts = vec![TsRange::parse("192.168.0.0/16").unwrap()];
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(!p.a.conn.is_up());
    assert!(
        Pair::logs(&p.a, Level::Warn)
            .iter()
            .any(|l| l.contains("TS_UNACCEPTABLE"))
    );
}

#[test]
fn lifetimes_rekey_on_their_own_with_jitter() {
    let mut a = cfg_a();
    let mut b = cfg_b();
    for c in [&mut a, &mut b] {
        c.lifetimes.ike = Duration::from_secs(90);
        c.lifetimes.child = Duration::from_secs(40);
    }
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(300));
    assert!(p.up());
    p.assert_one_child_pair();
    let rekeys = p.a.conn.stats.rekeys + p.b.conn.stats.rekeys;
    assert!(rekeys >= 8, "CHILD and IKE rekeys happened: {rekeys}");
}

#[test]
fn garbage_and_replayed_messages_change_nothing() {
    let mut p = established();
    let before = Pair::inbound(&p.a);
    let now = p.now;
    let from = SocketAddr::new(IpAddr::V4(B_IP), 500);
    let mut junk: Vec<Vec<u8>> = vec![vec![], vec![0; 28], vec![0xff; 200]];
    let mut m = vec![0u8; 28];
    m[17] = 0x20;
    m[18] = 37;
    m[27] = 28;
    junk.push(m);
    for j in &junk {
        p.a.conn
            .handle_datagram(now, 500, from, j, &mut p.a.backend);
    }
    assert!(p.a.conn.stats.invalid_messages >= junk.len() as u64 - 1);
    assert_eq!(Pair::inbound(&p.a), before);
    assert!(p.up());
    let _ = p.a.backend.allocate_spi();
}

// ------------------------------------------------------------- hardening

/// A link that loses B's INFORMATIONAL requests on the IKE_SA whose
/// initiator SPI is `spi_i` (its DELETE, say).
fn lose_b_informational_on(spi_i: u64) -> Filter {
    let spi = spi_i.to_be_bytes();
    Box::new(move |_, from, t| {
        let h = &t.data;
        let informational_request =
            h.len() >= 28 && h[18] == 37 && h[19] & 0x20 == 0 && h[..8] == spi;
        if from == Side::B && informational_request {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    })
}

fn spis_of(c: &Connection) -> (u64, u64) {
    let ike = c
        .status(Instant::now(), &mut RecordingBackend::default())
        .ike
        .expect("an IKE_SA");
    let hex = |s: &str| u64::from_str_radix(s, 16).expect("hex SPI");
    (hex(&ike.spi_i), hex(&ike.spi_r))
}

fn rejections(p: &Peer) -> Vec<Reject> {
    p.events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_forged_retransmission_gets_no_cached_response() {
    let mut p = established();
    let (spi_i, spi_r) = spis_of(&p.b.conn);
    // 40 octets: B's IKE_SA, IKE_AUTH, the initiator's flag, message ID 1
    // (the last request B answered), and an SK payload of 8 junk octets.
    let mut m = Vec::new();
    m.extend_from_slice(&spi_i.to_be_bytes());
    m.extend_from_slice(&spi_r.to_be_bytes());
    m.extend_from_slice(&[46, 0x20, 35, 0x08, 0, 0, 0, 1, 0, 0, 0, 40]);
    m.extend_from_slice(&[0, 0, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(m.len(), 40);
    let from = SocketAddr::new(IpAddr::V4(A_IP), 4501);
    let now = p.now;
    let port = p.b.backend.installed[0].local.port();
    p.b.conn
        .handle_datagram(now, port, from, &m, &mut p.b.backend);
    assert_eq!(p.b.conn.poll_transmit(), None, "nothing is reflected");
    p.collect();
    assert_eq!(rejections(&p.b), [Reject::NotARetransmission]);
    assert!(p.up());
}

#[test]
fn a_deleted_tunnel_is_initiated_again_after_a_failed_auth_in_between() {
    let mut p = established();
    // The peer deletes the IKE_SA (it stops, and starts again at once), so
    // A will try again in 1 s.
    p.b.conn.close(p.now);
    p.run(Duration::from_millis(100));
    p.b.conn.open(p.now);
    assert!(!p.a.conn.is_up());
    // Within that second, someone at the peer's address with another key
    // starts an IKE_SA with A; its IKE_AUTH arrives after A's retry time.
    let mut b2_cfg = cfg_b();
    b2_cfg.initiator = true;
    b2_cfg.psk = Psk::new(b"not the key");
    let mut b2 = Connection::new(Arc::new(b2_cfg), Arc::new(SeededRandom::new(7)), p.now);
    let mut b2_backend = RecordingBackend::new(0x9000_0000);
    let from_b = |t: &Transmit| SocketAddr::new(IpAddr::V4(B_IP), t.local_port);
    let from_a = |t: &Transmit| SocketAddr::new(IpAddr::V4(A_IP), t.local_port);
    b2.handle_timeout(p.now, &mut b2_backend);
    let init = b2.poll_transmit().expect("IKE_SA_INIT");
    p.a.conn
        .handle_datagram(p.now, 500, from_b(&init), &init.data, &mut p.a.backend);
    let answer = p.a.conn.poll_transmit().expect("IKE_SA_INIT answered");
    b2.handle_datagram(p.now, 500, from_a(&answer), &answer.data, &mut b2_backend);
    let auth = b2.poll_transmit().expect("IKE_AUTH");
    p.run(Duration::from_secs(2));
    let now = p.now;
    p.a.conn.handle_datagram(
        now,
        auth.remote.port(),
        from_b(&auth),
        &auth.data,
        &mut p.a.backend,
    );
    assert_eq!(p.a.conn.stats.auth_failures, 1);
    p.run(Duration::from_secs(40));
    assert!(p.up(), "A initiated again: {:?}", p.a.events);
}

#[test]
fn a_flood_of_ike_sa_init_is_answered_with_cookies_and_the_peer_still_connects() {
    let (a, b) = (cfg_a(), cfg_b());
    let (threshold, limit) = (b.cookie_threshold, b.half_open_limit);
    // One real IKE_SA_INIT, replayed with 10,000 distinct SPIs.
    let mut flooder = Connection::new(
        Arc::new(cfg_a()),
        Arc::new(SeededRandom::new(3)),
        Instant::now(),
    );
    flooder.handle_timeout(Instant::now(), &mut RecordingBackend::default());
    let template = flooder.poll_transmit().expect("IKE_SA_INIT").data;
    let flood = |p: &mut Pair, from: u64, n: u64| {
        let src = SocketAddr::new(IpAddr::V4(A_IP), 500);
        for k in from..from + n {
            let mut m = template.clone();
            m[..8].copy_from_slice(&(0xf100_0000_0000_0000 | k).to_be_bytes());
            let now = p.now;
            p.b.conn
                .handle_datagram(now, 500, src, &m, &mut p.b.backend);
            // The COOKIEs go to the flood's source, not to A.
            while p.b.conn.poll_transmit().is_some() {}
        }
    };
    let mut p = Pair::seeded(a, b, 11);
    // The flood before A starts, and on while it connects.
    flood(&mut p, 0, 5_000);
    let start = p.now;
    let mut sent = 5_000;
    while !p.up() && p.now < start + Duration::from_secs(10) {
        p.run(Duration::from_millis(1));
        if sent < 10_000 {
            flood(&mut p, sent, 100);
            sent += 100;
        }
    }
    let took = p.now - start;
    flood(&mut p, sent, 10_000 - sent.min(10_000));
    assert!(p.up(), "A connected during the flood");
    let s = p.b.conn.stats;
    // Only `threshold` flood requests got a key exchange, A's, and (once
    // A's INITIAL_CONTACT cleared the stale half-open SAs) `threshold` more.
    assert!(
        s.responder_key_exchanges <= 2 * threshold as u64 + 1,
        "{s:?}"
    );
    assert!(p.b.conn.ike_sa_count() <= threshold + 1);
    assert!(s.cookies_sent >= 10_000 - 2 * threshold as u64, "{s:?}");
    assert_eq!(s.half_open_drops, 0);
    eprintln!(
        "flood: {} half-open kept, {} DH computed, {} COOKIEs, A up after {took:?} (simulated)",
        p.b.conn.ike_sa_count() - 1,
        s.responder_key_exchanges,
        s.cookies_sent
    );
    // Without cookies, the hard limit holds.
    let mut b = cfg_b();
    b.cookie_threshold = usize::MAX;
    let mut p = Pair::seeded(cfg_a(), b, 12);
    p.a.conn.close(p.now);
    flood(&mut p, 0, 10_000);
    assert_eq!(p.b.conn.ike_sa_count(), limit);
    assert_eq!(p.b.conn.stats.half_open_drops, 10_000 - limit as u64);
    assert_eq!(p.b.conn.stats.responder_key_exchanges, limit as u64);
}

#[test]
fn too_many_traffic_selectors_are_refused_and_counted() {
    let mut a = cfg_a();
    a.local_ts = (0..=crate::ts::MAX_SELECTORS as u8)
        .map(|i| TsRange::parse(&format!("10.{i}.0.0/24")).unwrap())
        .collect();
    let mut b = cfg_b();
    b.remote_ts = vec![TsRange::parse("10.0.0.0/8").unwrap()];
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(!p.a.conn.is_up());
    assert!(p.b.conn.stats.selector_overflows >= 1);
}

#[test]
fn the_peers_new_nat_port_reaches_the_child_sas() {
    let mut b = cfg_b();
    b.remote = IpAddr::V4(NAT_IP);
    b.remote_id = Some(crate::config::Identity::Ipv4(A_IP));
    let mut a = cfg_a();
    a.dpd.on_demand = false;
    let mut p = Pair::new(a, b);
    p.nat_a = true;
    p.run(Duration::from_secs(5));
    assert!(p.up());
    // The NAT's mapping changes; A's next message (a DPD probe) comes from it.
    p.nat_base = 7000;
    p.run(Duration::from_secs(40));
    let moved = SocketAddr::new(IpAddr::V4(NAT_IP), 7000 + 4500);
    let b_out =
        p.b.backend
            .installed
            .iter()
            .find(|s| s.direction == Direction::Outbound)
            .unwrap();
    assert_eq!(b_out.remote, moved, "B's ESP follows A's new mapping");
    assert!(p.b.backend.calls.iter().any(|c| matches!(
        c,
        BackendCall::Update { direction: Direction::Outbound, remote, .. } if *remote == moved
    )));
    assert!(p.up());
}

#[test]
fn a_soft_expiry_rekeys_the_child_sa_it_names() {
    let mut p = established();
    let before = Pair::inbound(&p.a);
    let now = p.now;
    // An SPI no CHILD_SA has: nothing happens.
    p.a.conn.expired(
        now,
        0xdead_beef,
        Direction::Inbound,
        false,
        &mut p.a.backend,
    );
    p.run(Duration::from_secs(2));
    assert_eq!(Pair::inbound(&p.a), before);
    let spi_out = p.a.backend.route_of(0).expect("routed");
    let now = p.now;
    p.a.conn
        .expired(now, spi_out, Direction::Outbound, false, &mut p.a.backend);
    p.run(Duration::from_secs(5));
    p.assert_one_child_pair();
    assert_ne!(Pair::inbound(&p.a), before, "rekeyed");
}

#[test]
fn refused_rekeys_end_in_hard_expiry_then_a_new_child_sa() {
    // B accepts no PFS group, so it refuses A's rekeys (which use PFS).
    let mut a = cfg_a();
    a.lifetimes.child = Duration::from_secs(40);
    for prop in &mut a.esp_proposals {
        prop.dh = vec![crate::crypto::DhGroup::Modp2048];
    }
    let mut b = cfg_b();
    for prop in &mut b.esp_proposals {
        prop.dh.clear();
    }
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    let first = Pair::inbound(&p.a);
    p.run(Duration::from_secs(38));
    let s = p.a.conn.stats;
    assert!(s.child_sa_refusals >= 1, "{s:?}");
    assert_eq!(s.child_sa_hard_expiries, 1, "{s:?}");
    assert!(
        p.a.backend.calls.contains(&BackendCall::Route {
            tunnel: 0,
            spi: None
        }),
        "the tunnel went down at the hard expiry"
    );
    p.run(Duration::from_secs(5));
    assert!(p.up(), "a new CHILD_SA");
    p.assert_one_child_pair();
    assert_ne!(Pair::inbound(&p.a), first);
}

#[test]
fn close_sends_delete_even_with_an_exchange_in_flight() {
    let mut p = established();
    // A rekey of A's is in flight (its request lost) when A closes.
    p.filter = Box::new(|_, side, _| {
        if side == Side::A {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    p.a.conn.rekey_child(p.now, &mut p.a.backend);
    p.collect();
    p.filter = Box::new(|_, _, _| Fate::Deliver);
    p.a.conn.close(p.now);
    p.run(Duration::from_secs(2));
    assert!(!p.b.conn.is_up(), "B got the DELETE");
}

#[test]
fn a_tampered_or_out_of_window_request_changes_nothing() {
    use crate::{
        codec::{ExchangeType, PayloadType},
        sk::SkError,
    };
    let mut p = established();
    let before = Pair::inbound(&p.b);
    let from = SocketAddr::new(IpAddr::V4(A_IP), 500);
    let now = p.now;
    // An empty INFORMATIONAL from A (a liveness check), one octet flipped.
    assert!(
        p.a.conn
            .send_raw_request(ExchangeType::INFORMATIONAL, PayloadType::NONE, vec![])
    );
    let genuine = p.a.conn.poll_transmit().expect("sealed");
    let mut tampered = genuine.data.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    p.b.conn
        .handle_datagram(now, 500, from, &tampered, &mut p.b.backend);
    assert_eq!(p.b.conn.poll_transmit(), None);
    // Two requests ahead of the window: refused before decryption.
    assert!(
        p.a.conn
            .send_raw_request(ExchangeType::INFORMATIONAL, PayloadType::NONE, vec![])
    );
    let ahead = p.a.conn.poll_transmit().expect("sealed");
    p.b.conn
        .handle_datagram(now, 500, from, &ahead.data, &mut p.b.backend);
    assert_eq!(p.b.conn.poll_transmit(), None);
    p.collect();
    let want_mid = 2; // IKE_SA_INIT and IKE_AUTH took 0 and 1.
    assert_eq!(
        rejections(&p.b),
        [
            Reject::Sk {
                exchange: ExchangeType::INFORMATIONAL,
                error: SkError::Integrity
            },
            Reject::OutOfWindow {
                got: want_mid + 1,
                want: want_mid
            },
        ]
    );
    assert_eq!(p.b.conn.stats.invalid_messages, 2);
    // The genuine request still gets its answer: nothing was consumed.
    p.b.conn
        .handle_datagram(now, 500, from, &genuine.data, &mut p.b.backend);
    assert!(p.b.conn.poll_transmit().is_some());
    assert_eq!(Pair::inbound(&p.b), before);
}

#[test]
fn a_rekey_refused_with_temporary_failure_is_retried() {
    let mut p = established();
    let before = Pair::inbound(&p.a);
    // B's datapath refuses for a moment: B answers TEMPORARY_FAILURE.
    p.b.backend.fail_install = Some(crate::backend::BackendError::System("busy".into()));
    p.a.conn.rekey_child(p.now, &mut p.a.backend);
    p.run(Duration::from_millis(500));
    assert_eq!(p.a.conn.stats.child_sa_refusals, 1);
    assert_eq!(Pair::inbound(&p.a), before, "the old CHILD_SA carries on");
    assert!(p.up());
    p.b.backend.fail_install = None;
    p.run(Duration::from_secs(5));
    p.assert_one_child_pair();
    assert_ne!(Pair::inbound(&p.a), before, "retried and rekeyed");
}

/// The device (A) answers; the gateway (B) starts the IKE_SA and its
/// CHILD_SAs, like an Azure instance that initiates.
fn gateway_initiates() -> Pair {
    let mut a = cfg_a();
    a.initiator = false;
    let mut b = cfg_b();
    b.initiator = true;
    let mut p = Pair::new(a, b);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    p
}

fn tunnel_downs(p: &Peer) -> usize {
    p.events
        .iter()
        .filter(|e| matches!(e, Event::TunnelDown { .. }))
        .count()
}

#[test]
fn the_peer_deleting_then_creating_its_child_sa_keeps_the_carrier() {
    // strongSwan at a CHILD_SA's hard expiry: DELETE, then a new CHILD_SA.
    let mut p = gateway_initiates();
    let before = Pair::inbound(&p.a);
    let spi = p.b.backend.route_of(7).expect("B routes");
    let now = p.now;
    p.b.conn
        .expired(now, spi, Direction::Outbound, true, &mut p.b.backend);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    p.assert_one_child_pair();
    assert_ne!(Pair::inbound(&p.a), before, "a new CHILD_SA");
    assert_eq!(tunnel_downs(&p.a), 0, "A's carrier never dropped");
    assert!(
        !p.a.backend.calls.contains(&BackendCall::Route {
            tunnel: 0,
            spi: None
        }),
        "A's route never went away"
    );
}

#[test]
fn without_a_new_child_sa_the_carrier_drops_after_the_grace() {
    // The peer deletes the only CHILD_SA and makes no other: A keeps the
    // route for a moment, then drops carrier and creates one itself.
    let mut p = established();
    let spi = p.b.backend.route_of(7).expect("B routes");
    let now = p.now;
    p.b.conn
        .expired(now, spi, Direction::Outbound, true, &mut p.b.backend);
    p.run(Duration::from_secs(2));
    assert_eq!(tunnel_downs(&p.a), 0, "within the grace");
    p.run(Duration::from_secs(5));
    assert_eq!(tunnel_downs(&p.a), 1, "after it");
    assert!(p.up(), "A's next attempt made a new CHILD_SA");
    p.assert_one_child_pair();
}

#[test]
fn a_responder_without_pfs_accepts_a_request_with_ke() {
    // A offers PFS first and no PFS second; B has no PFS: B chooses the
    // second and ignores A's KE (§1.3.1); A accepts the answer without KEr.
    let mut a = cfg_a();
    let mut with_pfs = a.esp_proposals[0].clone();
    with_pfs.dh = vec![crate::crypto::DhGroup::Modp2048];
    a.esp_proposals.insert(0, with_pfs);
    let mut p = Pair::new(a, cfg_b());
    p.run(Duration::from_secs(5));
    assert!(p.up());
    let before = Pair::inbound(&p.a);
    p.a.conn.rekey_child(p.now, &mut p.a.backend);
    p.run(Duration::from_secs(5));
    p.assert_one_child_pair();
    assert_ne!(Pair::inbound(&p.a), before, "rekeyed");
    assert_eq!(p.a.conn.stats.child_sa_refusals, 0);
}

#[test]
fn a_lingering_rekeyed_ike_sa_does_not_block_the_next_attempt() {
    let mut p = established();
    // B rekeys the IKE_SA; its DELETE of the old one never reaches A, so
    // the old one lingers on A (up to 120 s).
    p.filter = lose_b_informational_on(spis_of(&p.a.conn).0);
    p.b.conn.rekey_ike(p.now);
    p.run(Duration::from_secs(2));
    assert_eq!(p.a.conn.ike_sa_count(), 2, "the rekeyed IKE_SA lingers");
    // Then B vanishes while A sends: DPD kills the new IKE_SA.
    p.filter = Box::new(|_, _, _| Fate::Drop);
    let out = p.a.backend.route_of(0).unwrap();
    for s in 1..=30u64 {
        p.a.backend
            .counters
            .entry((out, Direction::Outbound))
            .or_default()
            .packets = s * 100;
        p.run(Duration::from_secs(1));
        if !p.a.conn.is_up() {
            break;
        }
    }
    assert_eq!(p.a.conn.stats.dpd_failures, 1);
    // B is back, new; A initiates again though the old IKE_SA lingers.
    p.filter = Box::new(|_, _, _| Fate::Deliver);
    p.b = Peer {
        conn: Connection::new(Arc::new(cfg_b()), Arc::new(SeededRandom::new(98)), p.now),
        backend: RecordingBackend::new(0xd000_0000),
        events: vec![],
    };
    p.run(Duration::from_secs(30));
    assert!(p.up(), "re-established while the rekeyed IKE_SA lingered");
}

#[test]
fn an_ike_sa_rekey_refused_keeps_the_ike_sa_and_is_retried() {
    use crate::codec::ExchangeType;
    let mut p = established();
    let (spi_i, _) = spis_of(&p.a.conn);
    // A's IKE_SA rekey request is lost on its way; B answers it (with its
    // keys and the request's message ID) with NO_PROPOSAL_CHOSEN, as a peer
    // that will not rekey now would.
    p.filter = Box::new(|_, from, t| {
        let create_child_request = t.data.len() >= 28 && t.data[18] == 36 && t.data[19] & 0x20 == 0;
        if from == Side::A && create_child_request {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    p.a.conn.rekey_ike(p.now);
    p.collect();
    let b = p.b.conn.active().expect("B's IKE_SA");
    let sa = &mut p.b.conn.sas[b];
    let header = sa.header(ExchangeType::CREATE_CHILD_SA, true, sa.peer_mid);
    sa.peer_mid += 1;
    let refusal = sa
        .sk_out
        .as_ref()
        .expect("keys")
        .seal(
            header,
            &[notify(NotifyType::NO_PROPOSAL_CHOSEN)],
            &SeededRandom::new(5),
        )
        .expect("sealed");
    let (from, to_port) = (
        SocketAddr::new(IpAddr::V4(B_IP), sa.local_port()),
        sa.remote.port(),
    );
    let now = p.now;
    p.a.conn
        .handle_datagram(now, to_port, from, &refusal, &mut p.a.backend);
    p.filter = Box::new(|_, _, _| Fate::Deliver);
    p.run(Duration::from_secs(1));
    assert!(p.up());
    assert_eq!(p.a.conn.ike_sa_count(), 1, "the IKE_SA goes on");
    assert_eq!(spis_of(&p.a.conn).0, spi_i);
    // Tried again later, and then rekeyed.
    p.run(Duration::from_secs(15));
    assert!(p.up());
    assert_ne!(spis_of(&p.a.conn).0, spi_i, "rekeyed on the retry");
    p.assert_one_child_pair();
}

#[test]
fn a_closed_responder_refuses_the_peer_until_opened_again() {
    // The operator takes the tunnel down on the device (A, responder here):
    // the gateway (B) keeps trying and is refused; once opened, it gets in.
    let mut p = gateway_initiates();
    p.a.conn.close(p.now);
    assert!(p.a.conn.is_closed());
    p.run(Duration::from_secs(30));
    assert!(!p.a.conn.is_up() && !p.b.conn.is_up());
    assert!(Pair::inbound(&p.a).is_empty());
    let refused = rejections(&p.a)
        .iter()
        .filter(|r| **r == Reject::Closed)
        .count();
    assert!(refused >= 2, "B tried again and was refused: {refused}");
    p.a.conn.open(p.now);
    assert!(!p.a.conn.is_closed());
    p.run(Duration::from_secs(70));
    assert!(p.up(), "B's next attempt got in");
    p.assert_one_child_pair();
}

#[test]
fn an_initiator_opened_again_initiates_at_once() {
    let mut p = established();
    p.a.conn.close(p.now);
    p.run(Duration::from_secs(5));
    assert!(!p.a.conn.is_up());
    p.run(Duration::from_secs(60));
    assert!(!p.a.conn.is_up(), "closed: no attempt");
    p.a.conn.open(p.now);
    p.run(Duration::from_secs(2));
    assert!(p.up());
    p.assert_one_child_pair();
}

#[test]
fn a_reconfigured_connection_comes_back_with_its_new_settings() {
    let mut p = established();
    let before = Pair::inbound(&p.a);
    let mut cfg = cfg_a();
    cfg.replay_window = 128;
    p.a.conn.reconfigure(Arc::new(cfg), p.now);
    assert_eq!(p.a.conn.config().replay_window, 128);
    p.run(Duration::from_secs(5));
    assert!(p.up());
    p.assert_one_child_pair();
    assert_ne!(Pair::inbound(&p.a), before, "new CHILD_SAs");
    let installed = p.a.backend.installed.last().unwrap();
    assert_eq!(installed.replay_window, 128);
}
