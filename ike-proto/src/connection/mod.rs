//! One connection: the IKE_SAs and CHILD_SAs with one configured peer (one
//! tunnel to one gateway instance). Sans-IO, in quinn's shape:
//!
//! * in: [`Connection::handle_datagram`] (an IKE message, non-ESP marker
//!   removed), [`Connection::handle_timeout`] (the time is passed in);
//! * out: [`Connection::poll_transmit`], [`Connection::poll_timeout`],
//!   [`Connection::poll_event`]; SAs are installed through the
//!   [`SaBackend`] given to each call, in make-before-break order.
//!
//! This module holds the connection's state, its timers (one table per
//! IKE_SA, `timers`) and the initiator's next attempt; `receive` finds
//! the IKE_SA a message belongs to and keeps the message-ID window and the
//! retransmission cache. Each exchange lives in its own module, both roles
//! together:
//!
//! * `ike_sa_init`: IKE_SA_INIT, with COOKIE and INVALID_KE_PAYLOAD retries
//!   and the responder's half-open limits;
//! * `ike_auth`: IKE_AUTH with a pre-shared key and the first CHILD_SA;
//! * `create_child_sa`: CREATE_CHILD_SA for new and rekeyed CHILD_SAs
//!   (optional PFS), with rekey collisions (§2.8.1);
//! * `ike_rekey`: CREATE_CHILD_SA rekeying the IKE_SA (§2.8, §2.18);
//! * `informational`: INFORMATIONAL for DELETE and dead peer detection.
//!
//! `child` is a CHILD_SA's life in the datapath, whichever exchange made it.

mod child;
mod create_child_sa;
mod ike_auth;
mod ike_rekey;
mod ike_sa_init;
mod informational;
mod payloads;
mod receive;
mod reject;
mod sa;
mod status;
#[cfg(test)]
mod tests;
mod timers;

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use xesp_esp::sa::{Lifetime, Limits};
use zeroize::Zeroizing;

pub use self::reject::Reject;
use self::{ike_sa_init::Cookies, payloads::*, reject::Verdict, sa::*, timers::Timer};
use crate::{
    backend::{ChildSaSpec, Direction, SaBackend},
    codec::{
        Body, Delete, ExchangeType, FLAG_RESPONSE, Header, IKE_VERSION, Identification, Message,
        Notify, NotifyType, Payload, PayloadType, ProtocolId,
    },
    config::{Identity, PeerConfig},
    crypto::{self, DhGroup, DhPrivate},
    proposal::{self, ChildSuite},
    random::Random,
    status::{ChildStatus, ConnStats, ConnStatus, IkeStatus},
    ts,
};

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Our port: 500, or 4500 after NAT-T (then with the non-ESP marker).
    pub local_port: u16,
    pub remote: SocketAddr,
    /// The IKE message, or a one-octet NAT-keepalive (RFC 3948 §2.3).
    pub data: Vec<u8>,
}

/// Severity of a log event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// What happened, for logs and the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Log {
        level: Level,
        message: String,
        /// The exchange the message is about (`IKE_SA_INIT`, `IKE_AUTH`,
        /// `CREATE_CHILD_SA`, `INFORMATIONAL`, RFC 7296 §3.1), when it is
        /// about one: a structured field of the daemon's logs.
        exchange: Option<&'static str>,
        /// The IKE_SA whose message or timer it comes from.
        ike_spi: Option<IkeSpis>,
        /// The CHILD_SA it is about.
        spi: Option<ChildSpis>,
    },
    /// The tunnel's outbound traffic has an SA.
    TunnelUp { tunnel: u32 },
    /// It has none any more.
    TunnelDown { tunnel: u32, reason: String },
    /// A message was dropped before it changed anything (counted in
    /// [`ConnStats::invalid_messages`]).
    Rejected { from: SocketAddr, reason: Reject },
}

/// An IKE_SA's SPIs (§3.1; the responder's is 0 before the peer chose it),
/// shown as `initiator/responder` in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IkeSpis {
    pub initiator: u64,
    pub responder: u64,
}

impl std::fmt::Display for IkeSpis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}/{:016x}", self.initiator, self.responder)
    }
}

/// A CHILD_SA's SPIs (§3.3.1): the inbound one, and the outbound one when
/// it is known; shown as `inbound/outbound` in hex, or the inbound alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildSpis {
    pub inbound: u32,
    pub outbound: Option<u32>,
}

impl std::fmt::Display for ChildSpis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.inbound)?;
        match self.outbound {
            Some(o) => write!(f, "/{o:08x}"),
            None => Ok(()),
        }
    }
}

/// The longest wait between two attempts of an initiator.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A CHILD_SA rekey the peer refused with TEMPORARY_FAILURE is tried again
/// this soon (§2.25), one refused otherwise this much later.
const REKEY_RETRY_SOON: Duration = Duration::from_secs(2);
const REKEY_RETRY_LATER: Duration = Duration::from_secs(10);

/// Accumulates a call's output.
struct Out {
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// The IKE_SA whose message or timer is being handled: its logs
    /// carry it.
    ike_spi: Option<IkeSpis>,
}

impl Out {
    fn log(&mut self, level: Level, cfg: &PeerConfig, msg: impl Into<String>) {
        self.push(level, cfg, None, None, msg.into());
    }

    /// A log event about `exchange`.
    fn log_in(
        &mut self,
        exchange: &'static str,
        level: Level,
        cfg: &PeerConfig,
        msg: impl Into<String>,
    ) {
        self.push(level, cfg, Some(exchange), None, msg.into());
    }

    /// A log event about the CHILD_SA of inbound SPI `inbound` (and
    /// `outbound`, when known).
    fn log_child(
        &mut self,
        level: Level,
        cfg: &PeerConfig,
        (inbound, outbound): (u32, Option<u32>),
        msg: impl Into<String>,
    ) {
        let spi = ChildSpis { inbound, outbound };
        self.push(level, cfg, None, Some(spi), msg.into());
    }

    fn push(
        &mut self,
        level: Level,
        cfg: &PeerConfig,
        exchange: Option<&'static str>,
        spi: Option<ChildSpis>,
        msg: String,
    ) {
        let mut message = String::with_capacity(cfg.name.len() + 2 + msg.len());
        message.push_str(&cfg.name);
        message.push_str(": ");
        message.push_str(&msg);
        self.events.push_back(Event::Log {
            level,
            message,
            exchange,
            ike_spi: self.ike_spi,
            spi,
        });
    }
}

/// The IKE side of one tunnel.
pub struct Connection {
    cfg: Arc<PeerConfig>,
    rng: Arc<dyn Random>,
    sas: SaTable,
    out: Out,
    /// When a configured initiator tries again: a new IKE_SA, or a new
    /// CHILD_SA on an IKE_SA without one ([`Connection::settle`]).
    next_attempt: Option<Instant>,
    initiate_backoff: Duration,
    /// Closed by [`Connection::close`]: no further attempts.
    closed: bool,
    cookies: Cookies,
    tunnel_up: bool,
    last_established: Option<Instant>,
    /// Counters for status.
    pub stats: ConnStats,
}

impl Connection {
    pub fn new(cfg: Arc<PeerConfig>, rng: Arc<dyn Random>, now: Instant) -> Self {
        let cookies = Cookies::new(now);
        let next_attempt = cfg.initiator.then_some(now);
        Self {
            cfg,
            rng,
            sas: SaTable::default(),
            out: Out {
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                ike_spi: None,
            },
            next_attempt,
            initiate_backoff: Duration::from_secs(1),
            closed: false,
            cookies,
            tunnel_up: false,
            last_established: None,
            stats: ConnStats::default(),
        }
    }

    pub fn config(&self) -> &PeerConfig {
        &self.cfg
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.events.pop_front()
    }

    /// True when an IKE_SA is established and the tunnel has an outbound SA.
    pub fn is_up(&self) -> bool {
        self.tunnel_up
    }

    fn random(&self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        // A failing generator leaves zeros: the SPI loop below and the
        // peer's checks see them. The system's does not fail on Linux.
        let _ = self.rng.fill(&mut v);
        v
    }

    fn random_spi(&self) -> u64 {
        loop {
            let b = self.random(8);
            let s = u64::from_be_bytes(b.try_into().unwrap_or([1; 8]));
            if s != 0 {
                return s;
            }
        }
    }

    /// A jittered rekey delay for `lifetime` (§2.8: rekey well before it ends).
    fn rekey_delay(&self, lifetime: Duration) -> Duration {
        let l = &self.cfg.lifetimes;
        let r = f64::from(
            self.random(2)
                .iter()
                .fold(0u16, |a, b| (a << 8) | u16::from(*b)),
        ) / 65535.0;
        lifetime.mul_f64((1.0 - l.margin - l.jitter * r).clamp(0.05, 1.0))
    }

    fn nonce(&self) -> Vec<u8> {
        self.random(32)
    }

    // ------------------------------------------------------------------ timers

    /// The next time [`Connection::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sas
            .iter()
            .filter_map(IkeSa::next_timer)
            .chain(self.next_attempt)
            .min()
    }

    /// Test aid: IKE_SAs held, whatever their state.
    #[cfg(test)]
    pub(crate) fn ike_sa_count(&self) -> usize {
        self.sas.len()
    }

    /// Test aid: each IKE_SA's state and the timers it holds that are due at `now`.
    #[cfg(test)]
    pub(crate) fn due_timers(&self, now: Instant) -> String {
        self.sas
            .iter()
            .map(|sa| format!("{:?} {:?}", sa.state, sa.timers.due(now)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn handle_timeout(&mut self, now: Instant, backend: &mut dyn SaBackend) {
        if self.next_attempt.is_some_and(|t| t <= now) {
            self.next_attempt = None;
            self.attempt(now, backend);
        }
        for i in self.sas.ids() {
            if self.sas[i].state == IkeState::Dead {
                continue;
            }
            self.out.ike_spi = Some(IkeSpis {
                initiator: self.sas[i].spi_i,
                responder: self.sas[i].spi_r,
            });
            for timer in self.sas[i].timers.expire(now) {
                if self.sas[i].state == IkeState::Dead {
                    break;
                }
                self.fire(i, timer, now, backend);
            }
            self.pump(i, now);
        }
        self.out.ike_spi = None;
        self.settle(now);
    }

    /// One of an IKE_SA's timers is due.
    fn fire(&mut self, i: SaId, timer: Timer, now: Instant, backend: &mut dyn SaBackend) {
        match timer {
            Timer::Retransmit => self.retransmit(i, now, backend),
            Timer::Negotiation => self.kill(i, backend, "negotiation timed out"),
            Timer::Linger => {
                self.out.log(
                    Level::Info,
                    &self.cfg,
                    "rekeyed IKE_SA dropped: no DELETE ended it",
                );
                self.kill_quietly(i, backend);
            }
            Timer::IkeRekey => self.queue_ike_rekey(i),
            Timer::Dpd => self.dpd_check(i, now, backend),
            Timer::Keepalive => {
                let sa = &mut self.sas[i];
                sa.timers
                    .set(Timer::Keepalive, now + self.cfg.natt_keepalive);
                let t = Transmit {
                    local_port: 4500,
                    remote: sa.remote,
                    data: vec![0xff],
                };
                self.out.transmits.push_back(t);
            }
            Timer::ChildRekey(spi) => {
                if self.sas[i]
                    .child(spi)
                    .is_some_and(|c| c.state == ChildState::Installed)
                {
                    self.queue_child_rekey(i, spi, backend);
                }
            }
            Timer::ChildExpire(spi) => self.child_expired(i, spi, "time", backend),
        }
    }

    /// Our request in flight is resent, or the IKE_SA given up (§2.1, §2.4).
    fn retransmit(&mut self, i: SaId, now: Instant, backend: &mut dyn SaBackend) {
        let (port, remote) = (self.sas[i].local_port(), self.sas[i].remote);
        let Some(o) = self.sas[i].outstanding.as_mut() else {
            return;
        };
        let tries = if o.interval.is_some() {
            self.cfg.dpd.tries
        } else {
            self.cfg.retransmit_tries
        };
        if o.sent >= tries {
            let what = o.task.exchange();
            let dpd = matches!(o.task, Task::Dpd);
            if dpd {
                self.stats.dpd_failures += 1;
            }
            let reason = if dpd {
                "dead peer detected (no answer to DPD)".to_string()
            } else {
                format!("no answer to {what} after {tries} tries")
            };
            self.kill(i, backend, &reason);
            return;
        }
        let delay = o
            .interval
            .unwrap_or(self.cfg.retransmit_timeout * 2u32.saturating_pow(o.sent));
        o.sent += 1;
        let t = Transmit {
            local_port: port,
            remote,
            data: o.bytes.clone(),
        };
        self.sas[i].timers.set(Timer::Retransmit, now + delay);
        self.stats.retransmits += 1;
        self.out.transmits.push_back(t);
    }

    /// Sends `bytes` as our request `message_id` for `task` and keeps it
    /// for retransmission.
    fn send_request(&mut self, i: SaId, now: Instant, message_id: u32, task: Task, bytes: Vec<u8>) {
        let interval = matches!(task, Task::Dpd).then_some(self.cfg.dpd.retry);
        let sa = &mut self.sas[i];
        sa.outstanding = Some(Outstanding {
            message_id,
            task,
            bytes: bytes.clone(),
            sent: 1,
            interval,
        });
        sa.timers.set(
            Timer::Retransmit,
            now + interval.unwrap_or(self.cfg.retransmit_timeout),
        );
        let port = if message_id == 0 {
            500
        } else {
            sa.local_port()
        };
        self.out.transmits.push_back(Transmit {
            local_port: port,
            remote: sa.remote,
            data: bytes,
        });
    }

    /// The configured initiator's next attempt is due: a new IKE_SA, or a
    /// new CHILD_SA on an IKE_SA that has none.
    fn attempt(&mut self, now: Instant, backend: &mut dyn SaBackend) {
        if self.closed {
            return;
        }
        if self.sas.iter().any(|s| s.is_usable() && s.carries_tunnel()) {
            return;
        }
        if let Some(i) = self.active() {
            if !self.sas[i].child_pending() {
                self.out.log(
                    Level::Info,
                    &self.cfg,
                    "the IKE_SA has no CHILD_SA: creating one",
                );
                match self.new_child_draft(backend, None, false) {
                    Ok(d) => self.sas[i].tasks.push_back(Task::CreateChild(d)),
                    Err(e) => self
                        .out
                        .log(Level::Error, &self.cfg, format!("new CHILD_SA: {e}")),
                }
                self.pump(i, now);
            }
            return;
        }
        if !self.sas.iter().any(IkeSa::is_negotiating) {
            self.initiate(now);
        }
    }

    /// After each input: dead IKE_SAs go, and a configured initiator keeps a
    /// next attempt unless the tunnel is up or an attempt is under way (the
    /// invariant the two-peer harness checks after every step).
    fn settle(&mut self, now: Instant) {
        self.sas.reap();
        if !self.cfg.initiator || self.closed || self.next_attempt.is_some() {
            return;
        }
        if !self.sas.iter().any(IkeSa::keeps_the_tunnel_going) {
            self.next_attempt = Some(now + self.initiate_backoff);
            self.initiate_backoff = (self.initiate_backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Test aid: the invariant [`Connection::settle`] keeps.
    #[cfg(test)]
    pub(crate) fn has_next_attempt(&self) -> bool {
        !self.cfg.initiator
            || self.closed
            || self.next_attempt.is_some()
            || self.sas.iter().any(IkeSa::keeps_the_tunnel_going)
    }

    /// The newest established IKE_SA.
    fn active(&self) -> Option<SaId> {
        self.sas.newest(IkeSa::is_usable)
    }

    fn pump_all(&mut self, now: Instant) {
        for i in self.sas.ids() {
            self.pump(i, now);
        }
    }

    /// Sends the next queued request if none is outstanding (window 1, §2.3).
    fn pump(&mut self, i: SaId, now: Instant) {
        let sa = &mut self.sas[i];
        if sa.outstanding.is_some()
            || !matches!(
                sa.state,
                IkeState::Established | IkeState::AuthSent | IkeState::Rekeyed
            )
        {
            return;
        }
        let Some(task) = sa.tasks.pop_front() else {
            return;
        };
        let payloads = match &task {
            // Sent by their exchanges directly, never queued.
            Task::IkeInit | Task::IkeAuth(_) => return,
            Task::CreateChild(d) => match self.create_child_payloads(i, d) {
                Some(p) => p,
                None => return,
            },
            Task::RekeyIke(d) => match self.ike_rekey_payloads(d) {
                Some(p) => p,
                None => return,
            },
            Task::DeleteChildren(_) | Task::DeleteIke | Task::Dpd => {
                informational::request_payloads(&task)
            }
        };
        let exchange = task.exchange();
        let sa = &mut self.sas[i];
        let mid = sa.my_mid;
        let header = sa.header(exchange, false, mid);
        let Some(sk) = &sa.sk_out else { return };
        let bytes = match sk.seal(header, &payloads, &*self.rng) {
            Ok(b) => b,
            Err(e) => {
                self.out
                    .log(Level::Error, &self.cfg, format!("sealing {exchange}: {e}"));
                return;
            }
        };
        sa.my_mid = sa.my_mid.wrapping_add(1);
        self.send_request(i, now, mid, task, bytes);
    }

    /// For tests and fuzzing: seals `plain` (payload octets as they are, the
    /// first of type `first`) as our next request of `exchange` on the newest
    /// established IKE_SA and sends it, the way a peer that holds the keys
    /// but breaks the rules would. Its response is not awaited. False if no
    /// IKE_SA is established.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn send_raw_request(
        &mut self,
        exchange: ExchangeType,
        first: PayloadType,
        plain: Vec<u8>,
    ) -> bool {
        let Some(i) = self.active() else {
            return false;
        };
        let sa = &mut self.sas[i];
        let header = sa.header(exchange, false, sa.my_mid);
        let Some(sk) = &sa.sk_out else {
            return false;
        };
        let Ok(bytes) = sk.seal_plain(header, first, plain, &*self.rng) else {
            return false;
        };
        sa.my_mid = sa.my_mid.wrapping_add(1);
        self.out.transmits.push_back(Transmit {
            local_port: sa.local_port(),
            remote: sa.remote,
            data: bytes,
        });
        true
    }

    fn tunnel_up(&mut self) {
        if !self.tunnel_up {
            self.tunnel_up = true;
            self.out.events.push_back(Event::TunnelUp {
                tunnel: self.cfg.tunnel,
            });
        }
    }

    fn tunnel_down(&mut self, reason: &str) {
        if self.tunnel_up {
            self.tunnel_up = false;
            self.out.events.push_back(Event::TunnelDown {
                tunnel: self.cfg.tunnel,
                reason: reason.to_string(),
            });
        }
    }

    // ------------------------------------------------------------------ death

    /// The IKE_SA failed: its CHILD_SAs go, and the tunnel goes down unless
    /// another IKE_SA carries it. An initiator tries again later ([`Self::settle`]).
    fn kill(&mut self, i: SaId, backend: &mut dyn SaBackend, reason: &str) {
        self.out
            .log(Level::Warn, &self.cfg, format!("IKE_SA down: {reason}"));
        self.kill_quietly(i, backend);
        if !self.sas.iter().any(|s| s.is_usable()) {
            self.tunnel_down(reason);
        }
    }

    fn kill_quietly(&mut self, i: SaId, backend: &mut dyn SaBackend) {
        let spis: Vec<u32> = self.sas[i].children.iter().map(|c| c.spi_in).collect();
        for spi in spis {
            self.remove_child(i, spi, backend);
        }
        self.sas[i].die();
    }
}
