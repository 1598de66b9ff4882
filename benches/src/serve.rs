//! `xesp-loadgen serve`: one end of the benchmark, in its namespace. It
//! holds the XDP sink on its interface, optionally the IKE peer, and answers
//! one command per line on stdin with one JSON line on stdout, so that
//! `cargo xtask bench` can prepare, send and count from outside.

use std::{
    io::{self, BufRead, Write},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::mpsc,
    time::Instant,
};

use datapath_user::{
    netlink::{Rtnl, ifindex},
    nexthop::NextHops,
    xdp::{XdpAttach, XdpPrograms},
};
use serde_json::{Value, json};
use xesp_common::{SinkCounter, bench};

use crate::{
    afxdp::{self, Framed, XskSender},
    peer::{Peer, PeerSettings},
    traffic::{self, Prepared},
};

/// A command from the benchmark driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Tunnels, SPIs, and the sink's SPIs brought up to date.
    Status,
    /// Build `count` packets of `size` over `tunnels` tunnels: ESP when this
    /// end is the IKE peer, plaintext otherwise; `mode` changes that.
    Prepare {
        tunnels: usize,
        size: usize,
        count: u64,
        mode: Mode,
    },
    /// Send what was prepared, one thread per tunnel, at `rate` packets/s
    /// (all threads together) or as fast as they can.
    Send {
        rate: Option<u64>,
    },
    /// The sink's counters and the checked samples.
    Counters,
    /// Raw AES-256-GCM cost for an inner packet of `size`.
    Raw {
        size: usize,
        iterations: u32,
    },
    Quit,
}

/// What the IKE peer's end sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// ESP of the tunnels' SAs (plaintext on the LAN end).
    Esp,
    /// ESP's layout and lengths with the inner packet in the clear, for the
    /// null forwarder (`datapath_user::null`).
    Null,
    /// The inner packets themselves, from the peer's addresses to the LAN
    /// host, for the kernel forwarding baseline.
    Plain,
}

impl Mode {
    fn parse(w: Option<&&str>) -> Result<Self, String> {
        match w.copied() {
            None | Some("esp") => Ok(Self::Esp),
            Some("null") => Ok(Self::Null),
            Some("plain") => Ok(Self::Plain),
            Some(o) => Err(format!("prepare: mode {o:?} is not esp, null or plain")),
        }
    }
}

/// An inner packet size a benchmark can send: room for the headers and the
/// magic, at most an Ethernet MTU.
fn inner_size(n: u64) -> usize {
    n.clamp(traffic::MIN_SIZE as u64, 1500) as usize
}

impl Request {
    pub fn parse(line: &str) -> Result<Self, String> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize, what: &str| -> Result<u64, String> {
            w.get(i)
                .ok_or_else(|| format!("{}: missing {what}", w[0]))?
                .parse()
                .map_err(|_| format!("{}: {what} {:?} is not a number", w[0], w[i]))
        };
        match w.first().copied() {
            Some("status") => Ok(Self::Status),
            Some("prepare") => Ok(Self::Prepare {
                tunnels: num(1, "tunnels")?.clamp(1, 2) as usize,
                size: inner_size(num(2, "size")?),
                count: num(3, "count")?,
                mode: Mode::parse(w.get(4))?,
            }),
            Some("send") => Ok(Self::Send {
                rate: if w.len() > 1 {
                    Some(num(1, "rate")?).filter(|r| *r > 0)
                } else {
                    None
                },
            }),
            Some("counters") => Ok(Self::Counters),
            Some("raw") => Ok(Self::Raw {
                size: inner_size(num(1, "size")?),
                iterations: num(2, "iterations")?.min(u64::from(u32::MAX)) as u32,
            }),
            Some("quit") => Ok(Self::Quit),
            Some(other) => Err(format!(
                "unknown command {other:?} (status, prepare T S N [esp|null|plain], send [RATE], counters, raw S N, quit)"
            )),
            None => Err("empty command".into()),
        }
    }
}

/// How the generator hands its packets to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Whole frames on an AF_XDP socket's TX ring (see [`crate::afxdp`]).
    AfXdp,
    /// Datagrams with `sendmmsg(2)` on UDP sockets, through the IP stack.
    Sendmmsg,
}

impl Sender {
    pub fn name(self) -> &'static str {
        match self {
            Self::AfXdp => "afxdp",
            Self::Sendmmsg => "sendmmsg",
        }
    }
}

impl std::str::FromStr for Sender {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "afxdp" => Ok(Self::AfXdp),
            "sendmmsg" => Ok(Self::Sendmmsg),
            o => Err(format!("sender {o:?} is not afxdp or sendmmsg")),
        }
    }
}

/// How this end is set up.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Interface the XDP sink counts on.
    pub sink_if: String,
    /// The IKE peer, on the DMZ side.
    pub peer: Option<PeerSettings>,
    /// On the LAN side: the host address plaintext leaves from.
    pub lan_host: Ipv4Addr,
    /// How packets are sent.
    pub sender: Sender,
}

struct End {
    xdp: XdpPrograms,
    peer: Option<Peer>,
    lan_host: Ipv4Addr,
    /// Plaintext senders, one per tunnel: from the LAN host (LAN side) or
    /// from the tunnels' peer addresses (DMZ side).
    plain: Vec<UdpSocket>,
    /// Whether what was prepared goes out of the plaintext sockets.
    plain_prepared: bool,
    prepared: Vec<Prepared>,
    expected_spis: Vec<u32>,
    sender: Sender,
    sink_if: String,
    /// With the AF_XDP sender: what was prepared, as frames, per tunnel.
    framed: Vec<Framed>,
    /// AF_XDP senders opened so far (interface, queue = tunnel).
    xsk: Vec<XskSender>,
    /// Next hops of the frames' destinations, and the interfaces' counters.
    hops: Option<NextHops>,
    rtnl: Option<Rtnl>,
}

impl End {
    fn status(&mut self) -> Value {
        let Some(p) = &self.peer else {
            return json!({"tunnels": []});
        };
        let tunnels = p.tunnels();
        for (t, (_, inbound, _)) in tunnels.iter().enumerate() {
            if let Some(spi) = inbound
                && !self.expected_spis.contains(spi)
                && self.xdp.sink_expect_spi(*spi, t as u32).is_ok()
            {
                self.expected_spis.push(*spi);
            }
        }
        json!({"tunnels": tunnels.iter().map(|(up, i, o)| json!({
            "up": up, "inbound_spi": i, "outbound_spi": o})).collect::<Vec<_>>()})
    }

    fn prepare(
        &mut self,
        tunnels: usize,
        size: usize,
        count: u64,
        mode: Mode,
    ) -> Result<Value, String> {
        let t0 = Instant::now();
        let per = count / tunnels as u64;
        let lan_host = self.lan_host;
        self.plain_prepared = self.peer.is_none() || mode == Mode::Plain;
        self.prepared = match (&mut self.peer, mode) {
            (Some(p), Mode::Esp | Mode::Null) => {
                p.prepare_esp(tunnels, size, count, self.lan_host, mode == Mode::Null)?
            }
            (Some(_), Mode::Plain) => (0..tunnels)
                .map(|_| Prepared {
                    datagrams: (0..per)
                        .map(|n| {
                            let to = SocketAddrV4::new(lan_host, bench::PORT);
                            (traffic::payload(size, n), to)
                        })
                        .collect(),
                })
                .collect(),
            (None, _) => (0..tunnels)
                .map(|t| Prepared {
                    datagrams: (0..per)
                        .map(|n| {
                            let flow = (n % u64::from(traffic::FLOWS)) as u8;
                            let to = SocketAddrV4::new(traffic::vnet_host(t, flow), bench::PORT);
                            (traffic::payload(size, n), to)
                        })
                        .collect(),
                })
                .collect(),
        };
        let n: usize = self.prepared.iter().map(|p| p.datagrams.len()).sum();
        self.framed.clear();
        if self.sender == Sender::AfXdp {
            self.frame_prepared()?;
        }
        Ok(json!({"prepared": n, "seconds": t0.elapsed().as_secs_f64()}))
    }

    /// The socket tunnel `t`'s prepared datagrams leave from.
    fn socket(&self, t: usize) -> Option<&UdpSocket> {
        match &self.peer {
            Some(peer) if !self.plain_prepared => peer.esp_socket(t),
            _ => self.plain.get(t),
        }
    }

    /// Turns what was prepared into frames for the AF_XDP senders, as the
    /// kernel would have built them for each tunnel's socket.
    fn frame_prepared(&mut self) -> Result<(), String> {
        if self.hops.is_none() {
            self.hops = Some(NextHops::new().map_err(|e| format!("rtnetlink: {e}"))?);
        }
        let mut framed = Vec::new();
        for (t, p) in self.prepared.iter().enumerate() {
            let src = match self.socket(t).map(UdpSocket::local_addr) {
                Some(Ok(std::net::SocketAddr::V4(a))) => a,
                _ => return Err(format!("no IPv4 socket for tunnel {t}")),
            };
            let Some(hops) = self.hops.as_mut() else {
                break;
            };
            framed.push(afxdp::frame_all(hops, src, p).map_err(|e| format!("tunnel {t}: {e}"))?);
        }
        // The datagrams are in the frames now.
        self.prepared.clear();
        self.framed = framed;
        Ok(())
    }

    /// Packets the sink's interface (which the generator sends on) dropped on transmit.
    fn tx_dropped(&mut self) -> u64 {
        if self.rtnl.is_none() {
            self.rtnl = Rtnl::open().ok();
        }
        let i = ifindex(&self.sink_if);
        self.rtnl.as_mut().map_or(0, |r| afxdp::tx_dropped(r, i))
    }

    fn send_afxdp(&mut self, rate: Option<u64>) -> Result<Value, String> {
        for (t, f) in self.framed.iter().enumerate() {
            let Some(eg) = &f.egress else { continue };
            let q = t as u32;
            if !self.xsk.iter().any(|x| x.iface == eg.iface && x.queue == q) {
                self.xsk.push(XskSender::open(&eg.iface, q)?);
            }
        }
        let mut jobs = Vec::new();
        let mut senders: Vec<Option<&mut XskSender>> = self.xsk.iter_mut().map(Some).collect();
        for (t, f) in self.framed.iter().enumerate() {
            let Some(eg) = &f.egress else { continue };
            let x = senders
                .iter_mut()
                .find(|x| {
                    x.as_ref()
                        .is_some_and(|x| x.iface == eg.iface && x.queue == t as u32)
                })
                .and_then(Option::take)
                .ok_or_else(|| format!("no AF_XDP sender for tunnel {t}"))?;
            jobs.push((t, x, f));
        }
        let r = afxdp::send_parallel(jobs, rate.map(|r| r as f64));
        self.framed.clear();
        Ok(
            json!({"sent": r.count.sent, "seconds": r.seconds, "not_sent": r.count.not_sent,
            "kicks": r.count.kicks}),
        )
    }

    fn send(&mut self, rate: Option<u64>) -> Result<Value, String> {
        let dropped0 = self.tx_dropped();
        let mut v = if self.sender == Sender::AfXdp {
            self.send_afxdp(rate)?
        } else {
            let mut jobs = Vec::new();
            for (t, p) in self.prepared.iter().enumerate() {
                let sock = self
                    .socket(t)
                    .ok_or_else(|| format!("no socket for tunnel {t}"))?;
                jobs.push((sock, p));
            }
            let (sent, seconds) =
                traffic::send_parallel(&jobs, rate.map(|r| r as f64)).map_err(|e| e.to_string())?;
            self.prepared.clear();
            json!({"sent": sent, "seconds": seconds})
        };
        v["sender"] = json!(self.sender.name());
        v["tx_dropped"] = json!(self.tx_dropped().saturating_sub(dropped0));
        Ok(v)
    }

    fn counters(&self) -> Result<Value, String> {
        let c = self.xdp.sink_counters().map_err(|e| e.to_string())?;
        let mut m = serde_json::Map::new();
        for k in SinkCounter::ALL {
            m.insert(k.name().into(), json!(c[k as usize]));
        }
        let samples = self.peer.as_ref().map(|p| p.samples).unwrap_or_default();
        Ok(json!({"sink": m, "samples": samples}))
    }

    fn answer(&mut self, r: Request) -> Value {
        let res = match r {
            Request::Status => Ok(self.status()),
            Request::Prepare {
                tunnels,
                size,
                count,
                mode,
            } => self.prepare(tunnels, size, count, mode),
            Request::Send { rate } => self.send(rate),
            Request::Counters => self.counters(),
            Request::Raw { size, iterations } => {
                let (seal, open) = traffic::raw_aead_ns(size, iterations);
                Ok(json!({"seal_ns": seal, "open_ns": open}))
            }
            Request::Quit => Ok(json!({"bye": true})),
        };
        res.unwrap_or_else(|e| json!({ "error": e }))
    }
}

/// Runs until `quit` or the end of stdin.
pub fn run(s: ServeSettings) -> Result<(), String> {
    let mut xdp = XdpPrograms::load().map_err(|e| e.to_string())?;
    xdp.attach_sink(&s.sink_if, XdpAttach::Auto)
        .map_err(|e| format!("attaching the sink to {}: {e}", s.sink_if))?;
    let peer = match &s.peer {
        Some(p) => Some(Peer::new(p).map_err(|e| e.to_string())?),
        None => None,
    };
    let from: Vec<Ipv4Addr> = match &s.peer {
        Some(p) => p.locals.clone(),
        None => vec![s.lan_host; 2],
    };
    let plain = from
        .iter()
        .map(|a| UdpSocket::bind((*a, 0)).map_err(|e| format!("binding UDP on {a}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut end = End {
        xdp,
        peer,
        lan_host: s.lan_host,
        plain,
        plain_prepared: true,
        prepared: Vec::new(),
        expected_spis: Vec::new(),
        sender: s.sender,
        sink_if: s.sink_if.clone(),
        framed: Vec::new(),
        xsk: Vec::new(),
        hops: None,
        rtnl: None,
    };
    // stdin on its own thread; the main thread serves the IKE peer between commands.
    let (tx, rx) = mpsc::channel::<String>();
    let (wake_r, wake_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
            // SAFETY: writing one octet to a pipe we own.
            unsafe { libc::write(wake_w, [1u8].as_ptr().cast(), 1) };
        }
        // SAFETY: as above; closing our end tells the main thread stdin ended.
        unsafe { libc::close(wake_w) };
    });
    println!("{}", json!({"ready": true}));
    let _ = io::stdout().flush();
    loop {
        let timeout = end
            .peer
            .as_ref()
            .map_or(std::time::Duration::from_millis(500), |p| {
                p.timeout(Instant::now())
            });
        let mut fds: Vec<libc::pollfd> = std::iter::once(wake_r)
            .chain(end.peer.as_ref().map(Peer::fds).unwrap_or_default())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis().max(1) as i32,
            )
        };
        if fds[0].revents != 0 {
            let mut b = [0u8; 64];
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe { libc::read(wake_r, b.as_mut_ptr().cast(), b.len()) };
            let mut stop = n == 0;
            while let Ok(line) = rx.try_recv() {
                let reply = match Request::parse(&line) {
                    Ok(Request::Quit) => {
                        stop = true;
                        json!({"bye": true})
                    }
                    Ok(r) => end.answer(r),
                    Err(e) => json!({ "error": e }),
                };
                println!("{reply}");
                let _ = io::stdout().flush();
            }
            if stop {
                return Ok(());
            }
        }
        if let Some(p) = &mut end.peer {
            p.service();
        }
    }
}

fn pipe() -> io::Result<(i32, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_say_why() {
        assert_eq!(Request::parse("status"), Ok(Request::Status));
        assert_eq!(
            Request::parse("prepare 2 1400 1000"),
            Ok(Request::Prepare {
                tunnels: 2,
                size: 1400,
                count: 1000,
                mode: Mode::Esp,
            })
        );
        assert_eq!(
            Request::parse("prepare 1 64 10 null"),
            Ok(Request::Prepare {
                tunnels: 1,
                size: 64,
                count: 10,
                mode: Mode::Null,
            })
        );
        assert!(
            Request::parse("prepare 1 64 10 rot13")
                .unwrap_err()
                .contains("mode")
        );
        assert_eq!(Request::parse("send"), Ok(Request::Send { rate: None }));
        assert_eq!(
            Request::parse("send 250000"),
            Ok(Request::Send {
                rate: Some(250_000)
            })
        );
        assert_eq!(Request::parse("send 0"), Ok(Request::Send { rate: None }));
        assert_eq!(
            Request::parse("prepare 9 1 5"),
            Ok(Request::Prepare {
                tunnels: 2,
                size: traffic::MIN_SIZE,
                count: 5,
                mode: Mode::Esp,
            }),
            "clamped"
        );
        assert!(
            Request::parse("prepare 1 x 5")
                .unwrap_err()
                .contains("size \"x\"")
        );
        assert!(
            Request::parse("prepare 1")
                .unwrap_err()
                .contains("missing size")
        );
        assert!(
            Request::parse("fly")
                .unwrap_err()
                .contains("unknown command")
        );
        assert_eq!(
            Request::parse("raw 18446744073709551615 5"),
            Ok(Request::Raw {
                size: 1500,
                iterations: 5
            }),
            "clamped, not overflowing"
        );
        assert!(Request::parse("").is_err());
    }

    #[test]
    fn senders_parse_by_name() {
        for s in [Sender::AfXdp, Sender::Sendmmsg] {
            assert_eq!(s.name().parse::<Sender>(), Ok(s));
        }
        assert!("sendmsg".parse::<Sender>().unwrap_err().contains("afxdp"));
    }
}
