//! The socket datapath: ESP through ordinary sockets and the tunnels' TUN
//! devices. It carries the host's own tunnel traffic (BGP, pings to the
//! peers' tunnel addresses) and, until AF_XDP workers take them over, the
//! LAN's.
//!
//! * outbound: a packet the kernel routes into tunnel N's TUN device is MSS
//!   clamped, encapsulated with N's outbound SA whose traffic selectors
//!   cover it (RFC 4301 §5.1; none: dropped, counted per tunnel) and sent as ESP in UDP from
//!   port 4500 (RFC 3948) or as plain ESP (IP protocol 50) on a raw socket;
//! * inbound: UDP 4500 carries IKE behind the non-ESP marker (handed to the
//!   IKE daemon), NAT-keepalives (counted) and ESP; the raw socket carries
//!   plain ESP. ESP is decapsulated with the SA its SPI names, which checks
//!   the inner packet against its selectors (RFC 4301 §5.2), and the inner
//!   packet, MSS clamped, is written into that SA's tunnel device.
//!
//! One thread per TUN device and one per receiving socket; buffers are
//! allocated once per thread, and each thread holds its own view of the SA
//! database (no lock per packet, see [`crate::sadb`]).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use xesp_esp::{
    sa::Tunnel,
    wire::{IPPROTO_ESP, Outer, parse_outer},
};

use crate::{
    mss::{Clamp, clamp_mss},
    rxq,
    sadb::{SaDb, SaView},
    tun::Tun,
};

/// Room in front of a packet read from a TUN device: outer IPv4, UDP, ESP
/// header and the longest IV.
const HEADROOM: usize = 20 + 8 + 8 + 16;
/// Largest packet handled (jumbo frames included), and tailroom for padding
/// and the longest ICV.
const MAX_PACKET: usize = 9216;
const TAILROOM: usize = 16 + 2 + 32;
/// How often blocked threads look at the stop flag.
const TICK: Duration = Duration::from_millis(200);

/// Counters of the socket datapath (the SAs count their own packets and drops).
#[derive(Debug, Default)]
pub struct SlowCounters {
    pub keepalives: AtomicU64,
    pub ike_on_4500: AtomicU64,
    /// Outer packets that are not ESP, IKE or keepalives, or are truncated.
    pub malformed: AtomicU64,
    /// Inner packets a tunnel could not take (the TUN device refused them).
    pub tun_write_errors: AtomicU64,
    /// ESP the sockets could not send.
    pub send_errors: AtomicU64,
    /// Inner packets that are not IP, read from a TUN device.
    pub tun_malformed: AtomicU64,
    /// TCP SYNs whose MSS was lowered.
    pub mss_clamped: AtomicU64,
    /// Datagrams the kernel dropped at a full receive buffer (SO_RXQ_OVFL),
    /// per socket: UDP 4500, raw ESP.
    pub udp4500_buffer_drops: AtomicU64,
    pub esp_buffer_drops: AtomicU64,
}

impl SlowCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("keepalives", g(&self.keepalives)),
            ("ike_on_4500", g(&self.ike_on_4500)),
            ("malformed", g(&self.malformed)),
            ("tun_write_errors", g(&self.tun_write_errors)),
            ("send_errors", g(&self.send_errors)),
            ("tun_malformed", g(&self.tun_malformed)),
            ("mss_clamped", g(&self.mss_clamped)),
            ("udp4500_buffer_drops", g(&self.udp4500_buffer_drops)),
            ("esp_buffer_drops", g(&self.esp_buffer_drops)),
        ]
    }
}

/// Opens the raw socket that sends and receives plain ESP, bound to `local`.
pub fn raw_esp_socket(local: Ipv4Addr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(i32::from(IPPROTO_ESP))),
    )?;
    s.bind(&SocketAddrV4::new(local, 0).into())?;
    s.set_read_timeout(Some(TICK))?;
    Ok(s)
}

/// What the socket datapath is given.
pub struct SlowPath {
    pub sadb: Arc<SaDb>,
    /// Tunnel N's device is `tuns[N]`; `None`: a slot freed by a removed
    /// tunnel (`xesp reload`), so that the others keep their indexes.
    pub tuns: Vec<Option<Arc<Tun>>>,
    /// The UDP 4500 socket, shared with the IKE daemon (which sends on it).
    pub udp4500: Arc<UdpSocket>,
    pub raw_esp: Arc<Socket>,
    pub mss_clamp: u16,
    pub counters: Arc<SlowCounters>,
    pub stop: Arc<AtomicBool>,
}

/// Its threads; dropping this does not stop them (set the stop flag).
pub struct SlowPathThreads {
    pub handles: Vec<JoinHandle<()>>,
}

impl SlowPath {
    /// Starts the threads. IKE messages that arrive on UDP 4500 (marker
    /// removed) are passed to `ike` with their source.
    pub fn start(
        self: Arc<Self>,
        ike: impl Fn(SocketAddr, &[u8]) + Send + 'static,
    ) -> io::Result<SlowPathThreads> {
        self.udp4500.set_read_timeout(Some(TICK))?;
        rxq::enable(self.udp4500.as_raw_fd())?;
        rxq::enable(self.raw_esp.as_raw_fd())?;
        let mut handles = Vec::new();
        for n in (0..self.tuns.len()).filter(|n| self.tuns[*n].is_some()) {
            let me = self.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("tun{n}-tx"))
                    .spawn(move || me.tun_loop(n))?,
            );
        }
        let me = self.clone();
        handles.push(
            std::thread::Builder::new()
                .name("udp4500-rx".into())
                .spawn(move || me.udp_loop(ike))?,
        );
        let me = self.clone();
        handles.push(
            std::thread::Builder::new()
                .name("esp-rx".into())
                .spawn(move || me.raw_loop())?,
        );
        Ok(SlowPathThreads { handles })
    }

    fn count(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Tunnel `n`'s device → ESP.
    fn tun_loop(&self, n: usize) {
        let Some(tun) = &self.tuns[n] else {
            return;
        };
        let mut buf = vec![0u8; HEADROOM + MAX_PACKET + TAILROOM];
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut view = self.sadb.view();
        while !self.stop.load(Ordering::Relaxed) {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as i32) };
            if r <= 0 {
                continue;
            }
            loop {
                let len = match tun.recv(&mut buf[HEADROOM..HEADROOM + MAX_PACKET]) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("reading {}: {e}", tun.name());
                        break;
                    }
                };
                self.sadb.refresh(&mut view);
                self.send_outbound(&view, n as u32, &mut buf, HEADROOM..HEADROOM + len);
            }
        }
    }

    fn send_outbound(
        &self,
        view: &SaView,
        tunnel: u32,
        buf: &mut [u8],
        inner: std::ops::Range<usize>,
    ) {
        if inner.is_empty() || !matches!(buf[inner.start] >> 4, 4 | 6) {
            Self::count(&self.counters.tun_malformed);
            return;
        }
        // RFC 4301 §5.1: the tunnel's SA whose selectors cover the packet.
        // No SA, or none covers it: counted by the SA database (per tunnel);
        // a tunnel without SA has no carrier, so routing moves elsewhere.
        let Ok(entry) = view.outbound_for(&self.sadb, tunnel, &buf[inner.clone()]) else {
            return;
        };
        if let Clamp::Lowered(_) = clamp_mss(&mut buf[inner.clone()], self.mss_clamp) {
            Self::count(&self.counters.mss_clamped);
        }
        let Ok(outer) = entry.encapsulate(buf, inner) else {
            return; // counted by the SA
        };
        self.send_esp(entry.endpoints, &buf[outer]);
    }

    /// Sends the outer packet `pkt` (IPv4 header first) of an SA with tunnel
    /// endpoints `t` through the sockets, which leave the IPv4 (and UDP)
    /// header to the kernel.
    pub fn send_esp(&self, t: Tunnel, pkt: &[u8]) {
        let sent = match t.natt {
            Some(p) => self.udp4500.send_to(
                pkt.get(28..).unwrap_or_default(),
                SocketAddr::V4(SocketAddrV4::new(t.remote, p.remote)),
            ),
            None => self.raw_esp.send_to(
                pkt.get(20..).unwrap_or_default(),
                &SocketAddr::V4(SocketAddrV4::new(t.remote, 0)).into(),
            ),
        };
        if let Err(e) = sent {
            log::debug!("sending ESP to {}: {e}", t.remote);
            Self::count(&self.counters.send_errors);
        }
    }

    /// Writes a decapsulated packet into tunnel `tunnel`'s device, MSS clamped.
    pub fn deliver_inner(&self, tunnel: usize, pkt: &mut [u8]) {
        let Some(Some(tun)) = self.tuns.get(tunnel) else {
            Self::count(&self.counters.tun_write_errors);
            return;
        };
        if let Clamp::Lowered(_) = clamp_mss(pkt, self.mss_clamp) {
            Self::count(&self.counters.mss_clamped);
        }
        if tun.send(pkt).is_err() {
            Self::count(&self.counters.tun_write_errors);
        }
    }

    /// UDP 4500 → IKE, keepalives, ESP.
    fn udp_loop(&self, ike: impl Fn(SocketAddr, &[u8])) {
        let mut buf = vec![0u8; MAX_PACKET + 64];
        let mut view = self.sadb.view();
        while !self.stop.load(Ordering::Relaxed) {
            let (len, from) = match rxq::recv(self.udp4500.as_raw_fd(), &mut buf) {
                Ok(r) => {
                    rxq::note(&self.counters.udp4500_buffer_drops, &r);
                    let Some(from) = r.from else {
                        Self::count(&self.counters.malformed);
                        continue;
                    };
                    (r.len, from)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    log::warn!("UDP 4500: {e}");
                    std::thread::sleep(TICK);
                    continue;
                }
            };
            match &buf[..len] {
                [0xff] => Self::count(&self.counters.keepalives),
                [0, 0, 0, 0, rest @ ..] => {
                    Self::count(&self.counters.ike_on_4500);
                    ike(from, rest);
                }
                [a, b, c, d, _, ..] => {
                    let spi = u32::from_be_bytes([*a, *b, *c, *d]);
                    self.sadb.refresh(&mut view);
                    self.receive_esp(&view, &mut buf, spi, 0..len);
                }
                _ => Self::count(&self.counters.malformed),
            }
        }
    }

    /// Raw IP protocol 50 → ESP.
    fn raw_loop(&self) {
        let mut buf = vec![0u8; MAX_PACKET + 64];
        let mut view = self.sadb.view();
        while !self.stop.load(Ordering::Relaxed) {
            let Ok(r) = rxq::recv(self.raw_esp.as_raw_fd(), &mut buf) else {
                continue;
            };
            rxq::note(&self.counters.esp_buffer_drops, &r);
            match parse_outer(&buf[..r.len]) {
                Ok(Outer::Esp { spi, esp, .. }) => {
                    self.sadb.refresh(&mut view);
                    self.receive_esp(&view, &mut buf, spi, esp);
                }
                _ => Self::count(&self.counters.malformed),
            }
        }
    }

    fn receive_esp(&self, view: &SaView, buf: &mut [u8], spi: u32, esp: std::ops::Range<usize>) {
        // An unknown SPI is counted by the SA database.
        let Some(entry) = view.inbound(&self.sadb, spi) else {
            return;
        };
        let Ok(d) = entry.sa.decapsulate(buf, esp) else {
            return; // counted by the SA
        };
        let inner = d.inner;
        self.deliver_inner(entry.tunnel as usize, &mut buf[inner]);
    }
}
