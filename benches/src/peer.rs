//! The benchmark's IKE peer: xesp's own sans-IO IKEv2 core as a responder on
//! one address per tunnel (the two "Azure instances"), with a recording
//! backend, so that the benchmark knows every CHILD_SA's keys. With them it
//! pre-encrypts the ESP a device under test decrypts, and checks samples of
//! the ESP the device encrypts. It claims to be behind a NAT so that ESP is
//! always in UDP 4500, as strongSwan's libipsec always does: both devices
//! see the same packets.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use ike_proto::{
    backend::{ChildSaSpec, Direction, RecordingBackend},
    config::{EspProposal, IkeProposal, PeerConfig},
    connection::{Connection, Event, Level},
    crypto::Psk,
    random::SystemRandom,
};

use xesp_common::bench;
use xesp_esp::sa::{InboundSa, Lifetime, OutboundSa, SaParams};

use crate::traffic::{self, Prepared};

/// What the peer is told.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// One address per tunnel.
    pub locals: Vec<Ipv4Addr>,
    /// The device under test.
    pub dut: Ipv4Addr,
    pub psk: Vec<u8>,
    pub ike_proposal: String,
    pub esp_proposal: String,
}

/// Why the peer could not start.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("proposal {0:?}: {1}")]
    Proposal(String, String),
    #[error("binding UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// One tunnel: its connection, sockets, keys.
struct Leg {
    conn: Connection,
    backend: RecordingBackend,
    udp500: UdpSocket,
    udp4500: UdpSocket,
    /// ESP SAs built from the recorded keys, by SPI.
    outbound: HashMap<u32, OutboundSa>,
    inbound: HashMap<u32, InboundSa>,
}

/// Samples of the device's ESP the peer decrypted.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Samples {
    /// Decrypted, and the inner packet is one of ours.
    pub valid: u64,
    /// Failed to decrypt, or decrypted to something else.
    pub invalid: u64,
}

pub struct Peer {
    legs: Vec<Leg>,
    dut: Ipv4Addr,
    pub samples: Samples,
    /// ESP packets prepared so far per tunnel (their inner packet numbers).
    numbered: u64,
}

/// The ESP parameters of a recorded SA: no lifetime limits, and no replay
/// window (the sink lets only every SAMPLE_EVERY-th packet through).
fn spec_params(spec: &ChildSaSpec) -> Option<SaParams<'_>> {
    spec.sa_params().map(|p| SaParams {
        replay_window: 0,
        lifetime: Lifetime::default(),
        ..p
    })
}

impl Peer {
    pub fn new(s: &PeerSettings) -> Result<Self, PeerError> {
        let ike = IkeProposal::parse(&s.ike_proposal)
            .map_err(|e| PeerError::Proposal(s.ike_proposal.clone(), e.reason))?;
        let esp = EspProposal::parse(&s.esp_proposal)
            .map_err(|e| PeerError::Proposal(s.esp_proposal.clone(), e.reason))?;
        let rng = Arc::new(SystemRandom::new());
        let now = Instant::now();
        let mut legs = Vec::new();
        for (i, local) in s.locals.iter().enumerate() {
            let mut cfg = PeerConfig::new(
                &format!("bench{i}"),
                i as u32,
                IpAddr::V4(*local),
                IpAddr::V4(s.dut),
                Psk::new(&s.psk),
            );
            cfg.initiator = false;
            cfg.force_encap = true;
            cfg.allow_legacy = true;
            cfg.ike_proposals = vec![ike.clone()];
            cfg.esp_proposals = vec![esp.clone()];
            let bind = |port: u16| {
                let addr = SocketAddr::new(IpAddr::V4(*local), port);
                let sock =
                    UdpSocket::bind(addr).map_err(|source| PeerError::Bind { addr, source })?;
                let _ = sock.set_nonblocking(true);
                Ok::<_, PeerError>(sock)
            };
            legs.push(Leg {
                conn: Connection::new(Arc::new(cfg), rng.clone(), now),
                backend: RecordingBackend::new(0x0b00_0000 + (i as u32) * 0x0010_0000),
                udp500: bind(500)?,
                udp4500: bind(4500)?,
                outbound: HashMap::new(),
                inbound: HashMap::new(),
            });
        }
        Ok(Self {
            legs,
            dut: s.dut,
            samples: Samples::default(),
            numbered: 0,
        })
    }

    /// File descriptors to poll for input.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.legs
            .iter()
            .flat_map(|l| [l.udp500.as_raw_fd(), l.udp4500.as_raw_fd()])
            .collect()
    }

    /// How long the caller may sleep before [`Peer::service`] is due.
    pub fn timeout(&self, now: Instant) -> Duration {
        self.legs
            .iter()
            .filter_map(|l| l.conn.poll_timeout())
            .min()
            .map_or(Duration::from_millis(200), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(200))
    }

    /// Reads every waiting datagram, fires timers, sends what is due.
    pub fn service(&mut self) {
        let mut buf = vec![0u8; 65536];
        for i in 0..self.legs.len() {
            while let Ok((n, from)) = self.legs[i].udp500.recv_from(&mut buf) {
                let leg = &mut self.legs[i];
                leg.conn
                    .handle_datagram(Instant::now(), 500, from, &buf[..n], &mut leg.backend);
            }
            while let Ok((n, from)) = self.legs[i].udp4500.recv_from(&mut buf) {
                let d = &mut buf[..n];
                if d.len() >= 4 && d[..4] == [0; 4] {
                    let leg = &mut self.legs[i];
                    leg.conn
                        .handle_datagram(Instant::now(), 4500, from, &d[4..], &mut leg.backend);
                } else if d.len() > 8 {
                    self.check_sample(i, d);
                }
            }
            let now = Instant::now();
            let leg = &mut self.legs[i];
            if leg.conn.poll_timeout().is_some_and(|t| t <= now) {
                leg.conn.handle_timeout(now, &mut leg.backend);
            }
            while let Some(t) = leg.conn.poll_transmit() {
                let r = if t.local_port == 4500 {
                    let mut d = Vec::with_capacity(t.data.len() + 4);
                    if t.data != [0xff] {
                        d.extend_from_slice(&[0; 4]);
                    }
                    d.extend_from_slice(&t.data);
                    leg.udp4500.send_to(&d, t.remote)
                } else {
                    leg.udp500.send_to(&t.data, t.remote)
                };
                if let Err(e) = r {
                    eprintln!("bench{i}: sending to {}: {e}", t.remote);
                }
            }
            while let Some(e) = leg.conn.poll_event() {
                match e {
                    Event::Log { level, message, .. } if level >= Level::Info => {
                        eprintln!("bench{i}: {message}")
                    }
                    Event::Log { .. } => {}
                    other => eprintln!("bench{i}: {other:?}"),
                }
            }
        }
    }

    /// Decrypts one sampled ESP packet (a UDP 4500 payload) the sink let through.
    fn check_sample(&mut self, leg: usize, esp: &mut [u8]) {
        let spi = u32::from_be_bytes([esp[0], esp[1], esp[2], esp[3]]);
        let ok = self.inbound_sa(leg, spi).is_some_and(|sa| {
            let len = esp.len();
            match sa.decapsulate(esp, 0..len) {
                Ok(d) => {
                    d.inner.len() >= traffic::MIN_SIZE
                        && traffic::is_bench_payload(
                            &esp[d.inner.start + traffic::IP_UDP_HLEN..d.inner.end],
                        )
                }
                Err(_) => false,
            }
        });
        if ok {
            self.samples.valid += 1;
        } else {
            self.samples.invalid += 1;
        }
    }

    fn inbound_sa(&mut self, leg: usize, spi: u32) -> Option<&mut InboundSa> {
        let l = &mut self.legs[leg];
        if !l.inbound.contains_key(&spi) {
            let spec = l.backend.spec(spi, Direction::Inbound)?;
            let sa = InboundSa::new(&spec_params(spec)?, Instant::now()).ok()?;
            l.inbound.insert(spi, sa);
        }
        l.inbound.get_mut(&spi)
    }

    /// Per tunnel: up, our inbound SPI (the device's outbound), our outbound SPI.
    pub fn tunnels(&self) -> Vec<(bool, Option<u32>, Option<u32>)> {
        self.legs
            .iter()
            .map(|l| {
                let out = l.backend.route_of(l.conn.config().tunnel);
                let inbound = l
                    .backend
                    .installed
                    .iter()
                    .rev()
                    .find(|s| s.direction == Direction::Inbound)
                    .map(|s| s.spi);
                (l.conn.is_up() && out.is_some(), inbound, out)
            })
            .collect()
    }

    /// `count` ESP packets for the device to decrypt, spread over the first
    /// `tunnels` tunnels, each holding an inner packet of `size` octets from
    /// the tunnel's half of the VNet to `lan_host`. One [`Prepared`] per tunnel.
    /// With `null`, the inner packet, padding and trailer are left in the
    /// clear (for the null forwarder): the same octets around them, the
    /// same lengths.
    pub fn prepare_esp(
        &mut self,
        tunnels: usize,
        size: usize,
        count: u64,
        lan_host: Ipv4Addr,
        null: bool,
    ) -> Result<Vec<Prepared>, String> {
        let tunnels = tunnels.clamp(1, self.legs.len());
        let per = count / tunnels as u64;
        let dut = SocketAddrV4::new(self.dut, 4500);
        let mut out = Vec::new();
        for t in 0..tunnels {
            let l = &mut self.legs[t];
            let spi = l
                .backend
                .route_of(l.conn.config().tunnel)
                .ok_or_else(|| format!("tunnel {t} has no CHILD_SA yet"))?;
            if !l.outbound.contains_key(&spi) {
                let spec = l
                    .backend
                    .spec(spi, Direction::Outbound)
                    .ok_or_else(|| format!("tunnel {t}: SPI {spi:08x} not recorded"))?;
                let params = spec_params(spec).ok_or("not IPv4")?;
                let sa = OutboundSa::new(&params, Instant::now()).map_err(|e| e.to_string())?;
                l.outbound.insert(spi, sa);
            }
            let Some(sa) = l.outbound.get_mut(&spi) else {
                continue;
            };
            let head = sa.headroom();
            let mut buf = vec![0u8; head + size.max(traffic::MIN_SIZE) + sa.tailroom(size) + 64];
            let mut p = Prepared::default();
            for k in 0..per {
                self.numbered += 1;
                let flow = (k % u64::from(traffic::FLOWS)) as u8;
                let src = SocketAddrV4::new(traffic::vnet_host(t, flow), 1024 + u16::from(flow));
                let inner = traffic::write_inner(
                    &mut buf,
                    head,
                    src,
                    SocketAddrV4::new(lan_host, bench::PORT),
                    size,
                    self.numbered,
                );
                let clear = null.then(|| buf[inner.clone()].to_vec());
                let outer = sa
                    .encapsulate(&mut buf, inner.clone())
                    .map_err(|e| format!("encapsulating: {e:?}"))?;
                if let Some(clear) = clear {
                    unseal(&mut buf, inner, &clear, outer.end - sa.suite().icv_len());
                }
                // The kernel writes the outer IPv4 and UDP headers: send the ESP.
                let esp = buf[outer.start + traffic::IP_UDP_HLEN..outer.end].to_vec();
                p.datagrams.push((esp, dut));
            }
            out.push(p);
        }
        Ok(out)
    }

    /// The UDP 4500 socket of tunnel `t`, which ESP to the device leaves from.
    pub fn esp_socket(&self, t: usize) -> Option<&UdpSocket> {
        self.legs.get(t).map(|l| &l.udp4500)
    }
}

/// Puts the plaintext of an ESP packet back in the clear: the inner packet
/// `clear` at `buf[inner]`, then the padding (1, 2, 3...) and the trailer
/// up to `ct_end`, where the ICV begins (RFC 4303 §2.4-2.6).
fn unseal(buf: &mut [u8], inner: std::ops::Range<usize>, clear: &[u8], ct_end: usize) {
    let pad = ct_end - 2 - inner.end;
    buf[inner.clone()].copy_from_slice(clear);
    for (i, b) in buf[inner.end..inner.end + pad].iter_mut().enumerate() {
        *b = (i + 1) as u8;
    }
    buf[ct_end - 2] = pad as u8;
    buf[ct_end - 1] = xesp_esp::wire::IPPROTO_IPIP;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsealed_esp_holds_the_inner_packet_and_a_valid_trailer() {
        let mut buf = vec![0xaau8; 64];
        let clear = [0x45u8; 10];
        unseal(&mut buf, 20..30, &clear, 34);
        assert_eq!(&buf[20..30], &clear);
        assert_eq!(
            &buf[30..34],
            &[1, 2, 2, 4],
            "two octets of padding, pad length, IPIP"
        );
        assert_eq!(buf[34], 0xaa, "the ICV is left alone");
    }
}
