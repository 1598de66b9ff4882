//! One connection: the IKE_SAs and CHILD_SAs with one configured peer (one
//! tunnel to one gateway instance). Sans-IO, in quinn's shape:
//!
//! * in: [`Connection::handle_datagram`] (an IKE message, non-ESP marker
//!   removed), [`Connection::handle_timeout`] (the time is passed in);
//! * out: [`Connection::poll_transmit`], [`Connection::poll_timeout`],
//!   [`Connection::poll_event`]; SAs are installed through the
//!   [`SaBackend`] given to each call, in make-before-break order.
//!
//! Exchanges (RFC 7296 §1): IKE_SA_INIT (with COOKIE and INVALID_KE_PAYLOAD
//! retries), IKE_AUTH with a pre-shared key and the first CHILD_SA,
//! CREATE_CHILD_SA for new and rekeyed CHILD_SAs (optional PFS) and for IKE_SA
//! rekeying, INFORMATIONAL for DELETE and dead peer detection. One request is
//! outstanding at a time per IKE_SA (window 1, §2.3); responses are cached
//! and resent for retransmitted requests. Rekey collisions follow §2.8.1.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ring::rand::SecureRandom;
use xesp_esp::sa::{Lifetime, Limits};
use zeroize::Zeroizing;

use super::{
    codec::{
        Body, Delete, ExchangeType, FLAG_INITIATOR, FLAG_RESPONSE, Header, IKE_VERSION, IdType,
        Identification, Message, Notify, NotifyType, Payload, PayloadType, ProtocolId,
    },
    config::{Identity, PeerConfig},
    crypto::{self, DhGroup, DhPrivate, IkeKeys},
    proposal::{self, ChildSuite, IkeSuite},
    sk::SkCipher,
    status::{ChildStatus, ConnStatus, IkeStatus},
    ts::{self, TsRange},
};
use crate::backend::{ChildSaSpec, Direction, SaBackend};

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
    },
    /// The tunnel's outbound traffic has an SA.
    TunnelUp {
        tunnel: u32,
    },
    /// It has none any more.
    TunnelDown {
        tunnel: u32,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Initiator,
    Responder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IkeState {
    /// Initiator: IKE_SA_INIT sent.
    InitSent,
    /// Responder: IKE_SA_INIT answered, waiting for IKE_AUTH.
    InitDone,
    /// Initiator: IKE_AUTH sent.
    AuthSent,
    Established,
    /// Replaced by a rekeyed IKE_SA; kept until deleted.
    Rekeyed,
    Dead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChildState {
    Installed,
    /// Replaced by a rekeyed CHILD_SA; deleted when the rekey completes.
    Rekeyed,
    /// We asked the peer to delete it.
    Deleting,
}

struct ChildSa {
    spi_in: u32,
    spi_out: u32,
    suite: ChildSuite,
    local_ts: Vec<TsRange>,
    remote_ts: Vec<TsRange>,
    state: ChildState,
    created: Instant,
    rekey_at: Instant,
    expire_at: Instant,
    /// Whether the tunnel's outbound traffic uses this SA.
    routed: bool,
    /// Nonces of the exchange that created it (§2.8.1 collisions).
    nonces: (Vec<u8>, Vec<u8>),
}

/// A CHILD_SA being negotiated by us.
struct ChildDraft {
    spi_in: u32,
    nonce: Vec<u8>,
    dh: Option<DhPrivate>,
    rekey_of: Option<u32>,
}

/// An IKE_SA rekey being negotiated by us.
struct IkeDraft {
    spi: u64,
    nonce: Vec<u8>,
    dh: Option<DhPrivate>,
}

enum Task {
    IkeInit,
    IkeAuth(ChildDraft),
    CreateChild(ChildDraft),
    RekeyIke(IkeDraft),
    DeleteChildren(Vec<u32>),
    DeleteIke,
    Dpd,
}

impl Task {
    fn exchange(&self) -> ExchangeType {
        match self {
            Task::IkeInit => ExchangeType::IKE_SA_INIT,
            Task::IkeAuth(_) => ExchangeType::IKE_AUTH,
            Task::CreateChild(_) | Task::RekeyIke(_) => ExchangeType::CREATE_CHILD_SA,
            _ => ExchangeType::INFORMATIONAL,
        }
    }
}

/// Our request in flight.
struct Outstanding {
    message_id: u32,
    task: Task,
    bytes: Vec<u8>,
    next_at: Instant,
    sent: u32,
    /// DPD probes retransmit at a fixed interval.
    interval: Option<Duration>,
}

/// A CHILD_SA created by the peer's request while ours for the same one
/// was outstanding (§2.8.1).
struct Collision {
    rekey_of: u32,
    nonces: (Vec<u8>, Vec<u8>),
}

/// The new IKE_SA a peer's crossing rekey created: its initiator SPI and
/// the exchange's nonces.
struct IkeCollision {
    spi_i: u64,
    nonces: (Vec<u8>, Vec<u8>),
}

struct IkeSa {
    role: Role,
    spi_i: u64,
    spi_r: u64,
    state: IkeState,
    suite: Option<IkeSuite>,
    keys: Option<IkeKeys>,
    sk_out: Option<SkCipher>,
    sk_in: Option<SkCipher>,
    ni: Vec<u8>,
    nr: Vec<u8>,
    dh: Option<DhPrivate>,
    /// IKE_SA_INIT messages as sent, signed over by AUTH (§2.15).
    init_i: Vec<u8>,
    init_r: Vec<u8>,
    cookie: Option<Vec<u8>>,
    remote: SocketAddr,
    /// NAT-T: floated to 4500, and who is behind a NAT (§2.23).
    natt: bool,
    behind_nat: bool,
    my_mid: u32,
    outstanding: Option<Outstanding>,
    tasks: VecDeque<Task>,
    peer_mid: u32,
    last_response: Option<(u32, Vec<u8>)>,
    children: Vec<ChildSa>,
    collisions: Vec<Collision>,
    created: Instant,
    established_at: Option<Instant>,
    rekey_at: Option<Instant>,
    /// When a rekeyed IKE_SA replaced this one (state `Rekeyed`).
    rekeyed_at: Option<Instant>,
    /// When the peer was last heard from (IKE or ESP).
    last_heard: Instant,
    /// ESP counters at the last DPD check: (inbound packets, outbound packets).
    seen_traffic: (u64, u64),
    next_dpd_check: Option<Instant>,
    next_keepalive: Option<Instant>,
    /// Nonces of the IKE rekey that created this SA (for collisions).
    rekey_nonces: Option<(Vec<u8>, Vec<u8>)>,
    /// A peer's IKE rekey that crossed ours (§2.8.2).
    ike_collision: Option<IkeCollision>,
}

impl IkeSa {
    fn new(role: Role, spi_i: u64, spi_r: u64, remote: SocketAddr, now: Instant) -> Self {
        Self {
            role,
            spi_i,
            spi_r,
            state: if role == Role::Initiator {
                IkeState::InitSent
            } else {
                IkeState::InitDone
            },
            suite: None,
            keys: None,
            sk_out: None,
            sk_in: None,
            ni: Vec::new(),
            nr: Vec::new(),
            dh: None,
            init_i: Vec::new(),
            init_r: Vec::new(),
            cookie: None,
            remote,
            natt: false,
            behind_nat: false,
            my_mid: 0,
            outstanding: None,
            tasks: VecDeque::new(),
            peer_mid: 0,
            last_response: None,
            children: Vec::new(),
            collisions: Vec::new(),
            created: now,
            established_at: None,
            rekey_at: None,
            rekeyed_at: None,
            last_heard: now,
            seen_traffic: (0, 0),
            next_dpd_check: None,
            next_keepalive: None,
            rekey_nonces: None,
            ike_collision: None,
        }
    }

    fn local_port(&self) -> u16 {
        if self.natt { 4500 } else { 500 }
    }

    fn header(&self, exchange: ExchangeType, response: bool, message_id: u32) -> Header {
        let mut flags = if self.role == Role::Initiator {
            FLAG_INITIATOR
        } else {
            0
        };
        if response {
            flags |= FLAG_RESPONSE;
        }
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next_payload: PayloadType::NONE,
            version: IKE_VERSION,
            exchange,
            flags,
            message_id,
        }
    }

    fn is_usable(&self) -> bool {
        self.state == IkeState::Established
    }

    /// Replaced by a rekeyed IKE_SA (§2.8): from now on it only finishes
    /// its exchange in flight and waits for the DELETE that ends it, ours or
    /// the peer's. Its rekey, DPD and keepalive timers go with its role.
    fn retire(&mut self, now: Instant) {
        self.state = IkeState::Rekeyed;
        self.rekeyed_at = Some(now);
        self.rekey_at = None;
        self.next_dpd_check = None;
        self.next_keepalive = None;
    }

    /// The next time [`Connection::sa_timers`] has something to do for this
    /// SA: exactly the timers it acts on, so none stays due after it ran.
    fn next_timer(&self) -> Option<Instant> {
        let retransmit = self.outstanding.as_ref().map(|o| o.next_at);
        let state_timer = match self.state {
            IkeState::Dead => return None,
            IkeState::Rekeyed => self.rekeyed_at.map(|t| t + REKEYED_LINGER),
            IkeState::InitSent | IkeState::InitDone | IkeState::AuthSent => {
                Some(self.created + NEGOTIATION_TIMEOUT)
            }
            IkeState::Established => [self.rekey_at, self.next_dpd_check, self.next_keepalive]
                .into_iter()
                .chain(self.children.iter().map(|c| {
                    Some(if c.state == ChildState::Installed {
                        c.rekey_at.min(c.expire_at)
                    } else {
                        c.expire_at
                    })
                }))
                .flatten()
                .min(),
        };
        [retransmit, state_timer].into_iter().flatten().min()
    }
}

/// How long IKE_SA_INIT and IKE_AUTH may take before the attempt is dropped.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a rekeyed IKE_SA waits for the DELETE that should end it (the
/// rekey's initiator sends it, §2.8) before it is dropped without one.
const REKEYED_LINGER: Duration = Duration::from_secs(120);

/// Accumulates a call's output.
struct Out {
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Out {
    fn log(&mut self, level: Level, cfg: &PeerConfig, msg: impl Into<String>) {
        self.events.push_back(Event::Log {
            level,
            message: format!("{}: {}", cfg.name, msg.into()),
        });
    }
}

/// The IKE side of one tunnel.
pub struct Connection {
    cfg: Arc<PeerConfig>,
    rng: Arc<dyn SecureRandom + Send + Sync>,
    sas: Vec<IkeSa>,
    out: Out,
    /// When to (re)start as initiator.
    next_initiate: Option<Instant>,
    initiate_backoff: Duration,
    cookie_secret: [u8; 32],
    tunnel_up: bool,
    last_established: Option<Instant>,
    /// Counters for status.
    pub stats: ConnStats,
}

/// What the connection counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnStats {
    pub ike_sas_established: u64,
    pub child_sas_installed: u64,
    pub rekeys: u64,
    pub retransmits: u64,
    pub dpd_failures: u64,
    pub auth_failures: u64,
    pub invalid_messages: u64,
}

/// Why an incoming message was refused before any state changed.
#[derive(Debug)]
enum Reject {
    Ignore(String),
}

type Verdict = Result<(), Reject>;

fn ignore<T>(msg: impl Into<String>) -> Result<T, Reject> {
    Err(Reject::Ignore(msg.into()))
}

impl Connection {
    pub fn new(
        cfg: Arc<PeerConfig>,
        rng: Arc<dyn SecureRandom + Send + Sync>,
        now: Instant,
    ) -> Self {
        let mut cookie_secret = [0u8; 32];
        let _ = rng.fill(&mut cookie_secret);
        let next_initiate = cfg.initiator.then_some(now);
        Self {
            cfg,
            rng,
            sas: Vec::new(),
            out: Out {
                transmits: VecDeque::new(),
                events: VecDeque::new(),
            },
            next_initiate,
            initiate_backoff: Duration::from_secs(1),
            cookie_secret,
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
        // A failing system RNG leaves zeros; SPIs and nonces are then
        // checked by the peer. ring's SystemRandom does not fail on Linux.
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
            .chain(self.next_initiate)
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
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        self.sas
            .iter()
            .map(|sa| {
                format!(
                    "{:?} outstanding:{} rekey:{} dpd:{} keepalive:{} children:{:?}",
                    sa.state,
                    due(sa.outstanding.as_ref().map(|o| o.next_at)),
                    due(sa.rekey_at),
                    due(sa.next_dpd_check),
                    due(sa.next_keepalive),
                    sa.children
                        .iter()
                        .map(|c| (c.state, due(Some(c.rekey_at)), due(Some(c.expire_at))))
                        .collect::<Vec<_>>()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn handle_timeout(&mut self, now: Instant, backend: &mut dyn SaBackend) {
        if self.next_initiate.is_some_and(|t| t <= now) {
            self.next_initiate = None;
            if !self.sas.iter().any(|s| s.state != IkeState::Dead) {
                self.initiate(now, backend);
            }
        }
        for i in 0..self.sas.len() {
            self.sa_timers(i, now, backend);
        }
        self.reap(now, backend);
    }

    fn sa_timers(&mut self, i: usize, now: Instant, backend: &mut dyn SaBackend) {
        // Retransmission.
        let (port, remote) = (self.sas[i].local_port(), self.sas[i].remote);
        if let Some(o) = self.sas[i].outstanding.as_mut()
            && o.next_at <= now
        {
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
                self.kill(i, now, backend, &reason);
                return;
            }
            let delay = o
                .interval
                .unwrap_or(self.cfg.retransmit_timeout * 2u32.saturating_pow(o.sent));
            o.sent += 1;
            o.next_at = now + delay;
            let t = Transmit {
                local_port: port,
                remote,
                data: o.bytes.clone(),
            };
            self.stats.retransmits += 1;
            self.out.transmits.push_back(t);
        }
        let sa = &self.sas[i];
        match sa.state {
            IkeState::Established => {}
            IkeState::Dead => return,
            IkeState::Rekeyed => {
                if sa.rekeyed_at.is_some_and(|t| now >= t + REKEYED_LINGER) {
                    self.out.log(
                        Level::Info,
                        &self.cfg,
                        "rekeyed IKE_SA dropped: no DELETE ended it",
                    );
                    self.kill_quietly(i, now, backend);
                }
                return;
            }
            IkeState::InitSent | IkeState::InitDone | IkeState::AuthSent => {
                if now >= sa.created + NEGOTIATION_TIMEOUT {
                    self.kill(i, now, backend, "negotiation timed out");
                }
                return;
            }
        }
        // IKE_SA rekey.
        if sa.rekey_at.is_some_and(|t| t <= now) {
            self.sas[i].rekey_at = None;
            self.queue_ike_rekey(i, now, backend);
        }
        // CHILD_SA rekeys and hard expiry.
        let mut expired = Vec::new();
        let mut due = Vec::new();
        for c in &mut self.sas[i].children {
            if c.expire_at <= now {
                expired.push(c.spi_in);
            } else if c.state == ChildState::Installed && c.rekey_at <= now {
                c.rekey_at = c.expire_at;
                due.push(c.spi_in);
            }
        }
        for spi in due {
            self.queue_child_rekey(i, spi, backend);
        }
        if !expired.is_empty() {
            self.out.log(
                Level::Warn,
                &self.cfg,
                format!("CHILD_SA(s) {expired:08x?} reached their hard lifetime"),
            );
            for spi in &expired {
                self.remove_child(i, *spi, now, backend);
            }
            self.sas[i].tasks.push_back(Task::DeleteChildren(expired));
        }
        self.dpd_check(i, now, backend);
        if self.sas[i].next_keepalive.is_some_and(|t| t <= now) {
            self.sas[i].next_keepalive = Some(now + self.cfg.natt_keepalive);
            let t = Transmit {
                local_port: 4500,
                remote: self.sas[i].remote,
                data: vec![0xff],
            };
            self.out.transmits.push_back(t);
        }
        self.pump(i, now);
    }

    /// Dead peer detection (§2.4): probe when the peer has been silent for
    /// the DPD interval (on demand: only if we sent traffic meanwhile).
    fn dpd_check(&mut self, i: usize, now: Instant, backend: &mut dyn SaBackend) {
        let Some(t) = self.sas[i].next_dpd_check else {
            return;
        };
        if t > now {
            return;
        }
        let dpd = self.cfg.dpd;
        let (mut inb, mut outb) = (0, 0);
        for c in &self.sas[i].children {
            inb += backend
                .counters(c.spi_in, Direction::Inbound)
                .map_or(0, |c| c.packets);
            outb += backend
                .counters(c.spi_out, Direction::Outbound)
                .map_or(0, |c| c.packets);
        }
        let sa = &mut self.sas[i];
        let (prev_in, prev_out) = sa.seen_traffic;
        sa.seen_traffic = (inb, outb);
        if inb > prev_in {
            sa.last_heard = now;
        }
        let silent = now.saturating_duration_since(sa.last_heard) >= dpd.interval;
        let sent = outb > prev_out;
        let busy = sa.outstanding.is_some() || sa.tasks.iter().any(|t| matches!(t, Task::Dpd));
        if silent && (!dpd.on_demand || sent) && !busy {
            sa.tasks.push_back(Task::Dpd);
            sa.next_dpd_check = Some(now + dpd.interval);
            self.pump(i, now);
        } else {
            // Next look: when the peer will have been silent for an interval,
            // or one interval from now to sample the traffic counters.
            let quiet_at = sa.last_heard + dpd.interval;
            sa.next_dpd_check = Some(if quiet_at > now {
                quiet_at
            } else {
                now + dpd.interval
            });
        }
    }

    // -------------------------------------------------------------- initiating

    /// Starts IKE_SA_INIT as initiator.
    pub fn initiate(&mut self, now: Instant, backend: &mut dyn SaBackend) {
        let _ = backend;
        let remote = SocketAddr::new(self.cfg.remote, 500);
        let mut sa = IkeSa::new(Role::Initiator, self.random_spi(), 0, remote, now);
        let Some(group) = self
            .cfg
            .ike_proposals
            .iter()
            .flat_map(|p| p.dh.iter())
            .find(|g| self.cfg.allow_legacy || !g.is_legacy())
            .copied()
        else {
            self.out.log(
                Level::Error,
                &self.cfg,
                "no usable IKE proposal (legacy algorithms are not allowed)",
            );
            return;
        };
        match DhPrivate::generate(group, &*self.rng) {
            Ok(k) => sa.dh = Some(k),
            Err(e) => {
                self.out
                    .log(Level::Error, &self.cfg, format!("key exchange: {e}"));
                return;
            }
        }
        sa.ni = self.nonce();
        self.out.log(
            Level::Info,
            &self.cfg,
            format!("initiating IKE_SA with {}", self.cfg.remote),
        );
        self.sas.push(sa);
        let i = self.sas.len() - 1;
        self.send_init(i, now);
    }

    fn send_init(&mut self, i: usize, now: Instant) {
        let cfg = self.cfg.clone();
        let sa = &mut self.sas[i];
        let Some(dh) = &sa.dh else { return };
        let mut payloads = Vec::new();
        if let Some(c) = &sa.cookie {
            payloads.push(Payload::new(Body::Notify(Notify::new(
                NotifyType::COOKIE,
                c.clone(),
            ))));
        }
        payloads.push(Payload::new(Body::Sa(proposal::ike_offer(
            &cfg.ike_proposals,
            cfg.allow_legacy,
            None,
        ))));
        payloads.push(Payload::new(Body::Ke {
            group: dh.group().id(),
            reserved: [0; 2],
            data: dh.public().to_vec(),
        }));
        payloads.push(Payload::new(Body::Nonce(sa.ni.clone())));
        payloads.extend(nat_detection(
            sa.spi_i,
            0,
            SocketAddr::new(cfg.local, 500),
            sa.remote,
            cfg.force_encap,
        ));
        let msg = Message {
            header: sa.header(ExchangeType::IKE_SA_INIT, false, 0),
            payloads,
        };
        let bytes = msg.emit();
        sa.init_i = bytes.clone();
        sa.my_mid = 1;
        sa.outstanding = Some(Outstanding {
            message_id: 0,
            task: Task::IkeInit,
            bytes: bytes.clone(),
            next_at: now + cfg.retransmit_timeout,
            sent: 1,
            interval: None,
        });
        self.out.transmits.push_back(Transmit {
            local_port: 500,
            remote: sa.remote,
            data: bytes,
        });
    }

    fn new_child_draft(
        &self,
        backend: &mut dyn SaBackend,
        rekey_of: Option<u32>,
        pfs: bool,
    ) -> Result<ChildDraft, String> {
        let spi_in = backend.allocate_spi().map_err(|e| e.to_string())?;
        let dh = if pfs {
            match self
                .cfg
                .esp_proposals
                .iter()
                .flat_map(|p| p.dh.iter())
                .find(|g| self.cfg.allow_legacy || !g.is_legacy())
            {
                Some(g) => Some(DhPrivate::generate(*g, &*self.rng).map_err(|e| e.to_string())?),
                None => None,
            }
        } else {
            None
        };
        Ok(ChildDraft {
            spi_in,
            nonce: self.nonce(),
            dh,
            rekey_of,
        })
    }

    fn queue_child_rekey(&mut self, i: usize, spi_in: u32, backend: &mut dyn SaBackend) {
        match self.new_child_draft(backend, Some(spi_in), true) {
            Ok(d) => self.sas[i].tasks.push_back(Task::CreateChild(d)),
            Err(e) => self
                .out
                .log(Level::Error, &self.cfg, format!("CHILD_SA rekey: {e}")),
        }
    }

    fn queue_ike_rekey(&mut self, i: usize, _now: Instant, _backend: &mut dyn SaBackend) {
        let Some(suite) = self.sas[i].suite else {
            return;
        };
        match DhPrivate::generate(suite.dh, &*self.rng) {
            Ok(dh) => {
                let draft = IkeDraft {
                    spi: self.random_spi(),
                    nonce: self.nonce(),
                    dh: Some(dh),
                };
                self.sas[i].tasks.push_back(Task::RekeyIke(draft));
            }
            Err(e) => self
                .out
                .log(Level::Error, &self.cfg, format!("IKE_SA rekey: {e}")),
        }
    }

    /// Asks for a CHILD_SA rekey now (for tests and operators).
    pub fn rekey_child(&mut self, now: Instant, backend: &mut dyn SaBackend) {
        if let Some(i) = self.active_index()
            && let Some(spi) = self.sas[i]
                .children
                .iter()
                .find(|c| c.state == ChildState::Installed)
                .map(|c| c.spi_in)
        {
            self.queue_child_rekey(i, spi, backend);
            self.pump(i, now);
        }
    }

    /// Asks for an IKE_SA rekey now.
    pub fn rekey_ike(&mut self, now: Instant, backend: &mut dyn SaBackend) {
        if let Some(i) = self.active_index() {
            self.queue_ike_rekey(i, now, backend);
            self.pump(i, now);
        }
    }

    /// Deletes the IKE_SA (and so its CHILD_SAs), telling the peer.
    pub fn close(&mut self, now: Instant) {
        if let Some(i) = self.active_index() {
            self.next_initiate = None;
            self.sas[i].tasks.push_back(Task::DeleteIke);
            self.pump(i, now);
        }
    }

    fn active_index(&self) -> Option<usize> {
        self.sas.iter().rposition(|s| s.is_usable())
    }

    /// Sends the next queued request if none is outstanding.
    fn pump(&mut self, i: usize, now: Instant) {
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
        let cfg = self.cfg.clone();
        let payloads: Vec<Payload> = match &task {
            Task::IkeInit | Task::IkeAuth(_) => return, // sent by send_init / send_auth
            Task::CreateChild(d) => {
                let mut p = Vec::new();
                if let Some(old) = d.rekey_of {
                    let Some(c) = sa.children.iter().find(|c| c.spi_in == old) else {
                        return;
                    };
                    let mut n = Notify::new(NotifyType::REKEY_SA, vec![]);
                    n.protocol = ProtocolId::ESP;
                    n.spi = old.to_be_bytes().to_vec();
                    p.push(Payload::new(Body::Notify(n)));
                    p.push(Payload::new(Body::Sa(proposal::esp_offer(
                        &cfg.esp_proposals,
                        cfg.allow_legacy,
                        d.spi_in,
                        d.dh.is_some(),
                    ))));
                    p.push(Payload::new(Body::Nonce(d.nonce.clone())));
                    if let Some(dh) = &d.dh {
                        p.push(Payload::new(Body::Ke {
                            group: dh.group().id(),
                            reserved: [0; 2],
                            data: dh.public().to_vec(),
                        }));
                    }
                    p.push(ts_payload(true, &c.local_ts));
                    p.push(ts_payload(false, &c.remote_ts));
                } else {
                    p.push(Payload::new(Body::Sa(proposal::esp_offer(
                        &cfg.esp_proposals,
                        cfg.allow_legacy,
                        d.spi_in,
                        d.dh.is_some(),
                    ))));
                    p.push(Payload::new(Body::Nonce(d.nonce.clone())));
                    if let Some(dh) = &d.dh {
                        p.push(Payload::new(Body::Ke {
                            group: dh.group().id(),
                            reserved: [0; 2],
                            data: dh.public().to_vec(),
                        }));
                    }
                    p.push(ts_payload(true, &cfg.local_ts));
                    p.push(ts_payload(false, &cfg.remote_ts));
                }
                p
            }
            Task::RekeyIke(d) => {
                let Some(dh) = &d.dh else { return };
                vec![
                    Payload::new(Body::Sa(proposal::ike_offer(
                        &cfg.ike_proposals,
                        cfg.allow_legacy,
                        Some(d.spi),
                    ))),
                    Payload::new(Body::Nonce(d.nonce.clone())),
                    Payload::new(Body::Ke {
                        group: dh.group().id(),
                        reserved: [0; 2],
                        data: dh.public().to_vec(),
                    }),
                ]
            }
            Task::DeleteChildren(spis) => vec![Payload::new(Body::Delete(Delete {
                protocol: ProtocolId::ESP,
                spi_size: 4,
                spis: spis.iter().map(|s| s.to_be_bytes().to_vec()).collect(),
            }))],
            Task::DeleteIke => {
                vec![Payload::new(Body::Delete(Delete {
                    protocol: ProtocolId::IKE,
                    spi_size: 0,
                    spis: vec![],
                }))]
            }
            Task::Dpd => vec![],
        };
        let exchange = task.exchange();
        let mid = sa.my_mid;
        let header = sa.header(exchange, false, mid);
        let Some(sk) = &sa.sk_out else { return };
        let bytes = match sk.seal(header, &payloads, &*self.rng) {
            Ok(b) => b,
            Err(e) => {
                self.out
                    .log(Level::Error, &cfg, format!("sealing {exchange}: {e}"));
                return;
            }
        };
        sa.my_mid = sa.my_mid.wrapping_add(1);
        let dpd = matches!(task, Task::Dpd);
        let interval = dpd.then_some(cfg.dpd.retry);
        sa.outstanding = Some(Outstanding {
            message_id: mid,
            task,
            bytes: bytes.clone(),
            next_at: now + interval.unwrap_or(cfg.retransmit_timeout),
            sent: 1,
            interval,
        });
        let t = Transmit {
            local_port: sa.local_port(),
            remote: sa.remote,
            data: bytes,
        };
        self.out.transmits.push_back(t);
    }

    // --------------------------------------------------------------- receiving

    /// An IKE message arrived on `local_port` from `remote`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        data: &[u8],
        backend: &mut dyn SaBackend,
    ) {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(e) => {
                self.stats.invalid_messages += 1;
                self.out.log(
                    Level::Debug,
                    &self.cfg,
                    format!("dropped an unparsable message from {remote}: {e}"),
                );
                return;
            }
        };
        let h = msg.header;
        let result = if h.exchange == ExchangeType::IKE_SA_INIT {
            if h.is_response() {
                self.init_response(now, local_port, remote, data, &msg, backend)
            } else {
                self.init_request(now, local_port, remote, data, &msg)
            }
        } else {
            match self.find(&h) {
                Some(i) => self.encrypted(i, now, local_port, remote, data, &msg, backend),
                None => ignore(format!(
                    "{} for an unknown IKE_SA {:016x}/{:016x}",
                    h.exchange, h.spi_i, h.spi_r
                )),
            }
        };
        if let Err(Reject::Ignore(why)) = result {
            self.stats.invalid_messages += 1;
            self.out.log(
                Level::Debug,
                &self.cfg,
                format!("ignored a message from {remote}: {why}"),
            );
        }
        self.reap(now, backend);
    }

    fn find(&self, h: &Header) -> Option<usize> {
        self.sas
            .iter()
            .position(|s| s.spi_i == h.spi_i && s.spi_r == h.spi_r && s.state != IkeState::Dead)
    }

    fn init_request(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        data: &[u8],
        msg: &Message,
    ) -> Verdict {
        let cfg = self.cfg.clone();
        if remote.ip() != cfg.remote {
            return ignore("IKE_SA_INIT from an address that is not this connection's peer");
        }
        let h = msg.header;
        if h.spi_r != 0 || h.message_id != 0 || !h.is_initiator() {
            return ignore("malformed IKE_SA_INIT request header");
        }
        // A retransmission of a request we answered.
        if let Some(sa) = self.sas.iter().find(|s| {
            s.role == Role::Responder && s.spi_i == h.spi_i && s.state == IkeState::InitDone
        }) {
            if sa.init_i == data {
                let t = Transmit {
                    local_port,
                    remote,
                    data: sa.init_r.clone(),
                };
                self.out.transmits.push_back(t);
            }
            return Ok(());
        }
        let ni =
            nonce_of(&msg.payloads).ok_or(Reject::Ignore("IKE_SA_INIT without a nonce".into()))?;
        if ni.len() < 16 || ni.len() > 256 {
            return ignore("nonce length out of range (§3.9)");
        }
        let notify = |kind: NotifyType, data: Vec<u8>| {
            let m = Message {
                header: Header {
                    spi_i: h.spi_i,
                    spi_r: 0,
                    next_payload: PayloadType::NONE,
                    version: IKE_VERSION,
                    exchange: ExchangeType::IKE_SA_INIT,
                    flags: FLAG_RESPONSE,
                    message_id: 0,
                },
                payloads: vec![Payload::new(Body::Notify(Notify::new(kind, data)))],
            };
            Transmit {
                local_port,
                remote,
                data: m.emit(),
            }
        };
        // Stateless cookie (§2.6): prove the initiator's address first.
        if cfg.require_cookie {
            let want = cookie(&self.cookie_secret, &ni, remote.ip(), h.spi_i);
            let got = msg
                .notifies()
                .find(|n| n.kind == NotifyType::COOKIE)
                .map(|n| n.data.clone());
            if got.as_deref() != Some(&want[..]) {
                self.out
                    .transmits
                    .push_back(notify(NotifyType::COOKIE, want.to_vec()));
                return Ok(());
            }
        }
        let Some(Body::Sa(props)) = msg
            .payloads
            .iter()
            .map(|p| &p.body)
            .find(|b| matches!(b, Body::Sa(_)))
        else {
            return ignore("IKE_SA_INIT without an SA payload");
        };
        let Some((suite, answer)) =
            proposal::choose_ike(&cfg.ike_proposals, props, cfg.allow_legacy, None)
        else {
            self.out.log(
                Level::Warn,
                &cfg,
                "IKE_SA_INIT: no proposal chosen (the peer offered nothing we accept)",
            );
            self.out
                .transmits
                .push_back(notify(NotifyType::NO_PROPOSAL_CHOSEN, vec![]));
            return Ok(());
        };
        let Some((group, kei)) = ke_of(&msg.payloads) else {
            return ignore("IKE_SA_INIT without KE");
        };
        if group != suite.dh.id() {
            self.out.transmits.push_back(notify(
                NotifyType::INVALID_KE_PAYLOAD,
                suite.dh.id().to_be_bytes().to_vec(),
            ));
            return Ok(());
        }
        let dh =
            DhPrivate::generate(suite.dh, &*self.rng).map_err(|e| Reject::Ignore(e.to_string()))?;
        let public = dh.public().to_vec();
        let shared = match dh.agree(&kei) {
            Ok(s) => s,
            Err(e) => {
                self.out
                    .transmits
                    .push_back(notify(NotifyType::INVALID_SYNTAX, vec![]));
                return ignore(format!("IKE_SA_INIT: {e}"));
            }
        };
        let mut sa = IkeSa::new(Role::Responder, h.spi_i, self.random_spi(), remote, now);
        sa.ni = ni;
        sa.nr = self.nonce();
        sa.init_i = data.to_vec();
        // NAT detection (§2.23): compare the peer's hashes with what we see.
        let (nat_src, nat_dst) = check_nat(
            msg,
            h.spi_i,
            0,
            remote,
            SocketAddr::new(cfg.local, local_port),
        );
        sa.behind_nat = nat_dst;
        sa.natt = nat_src || nat_dst || local_port == 4500 || cfg.force_encap;
        if suite.is_legacy() {
            self.out.log(
                Level::Warn,
                &cfg,
                format!("IKE_SA uses legacy algorithms ({suite}) because allow_legacy is set"),
            );
        }
        let payloads = {
            let mut p = vec![
                Payload::new(Body::Sa(vec![answer])),
                Payload::new(Body::Ke {
                    group,
                    reserved: [0; 2],
                    data: public,
                }),
                Payload::new(Body::Nonce(sa.nr.clone())),
            ];
            p.extend(nat_detection(
                sa.spi_i,
                sa.spi_r,
                SocketAddr::new(cfg.local, local_port),
                remote,
                cfg.force_encap,
            ));
            p
        };
        let resp = Message {
            header: sa.header(ExchangeType::IKE_SA_INIT, true, 0),
            payloads,
        };
        let bytes = resp.emit();
        sa.init_r = bytes.clone();
        self.set_ike_keys(&mut sa, suite, &shared, None)?;
        sa.peer_mid = 1;
        self.out.transmits.push_back(Transmit {
            local_port,
            remote,
            data: bytes,
        });
        self.sas.push(sa);
        Ok(())
    }

    /// Derives the IKE_SA's keys (§2.14, or §2.18 with the old SK_d).
    fn set_ike_keys(
        &self,
        sa: &mut IkeSa,
        suite: IkeSuite,
        shared: &[u8],
        old_sk_d: Option<&[u8]>,
    ) -> Verdict {
        let seed = match old_sk_d {
            Some(d) => crypto::rekey_skeyseed(suite.prf, d, shared, &sa.ni, &sa.nr),
            None => crypto::skeyseed(suite.prf, &sa.ni, &sa.nr, shared),
        };
        let keys = crypto::derive_ike_keys(
            suite.prf,
            &seed,
            &sa.ni,
            &sa.nr,
            sa.spi_i,
            sa.spi_r,
            suite.suite(),
        );
        let (e_out, a_out, e_in, a_in) = match sa.role {
            Role::Initiator => (&keys.sk_ei, &keys.sk_ai, &keys.sk_er, &keys.sk_ar),
            Role::Responder => (&keys.sk_er, &keys.sk_ar, &keys.sk_ei, &keys.sk_ai),
        };
        sa.sk_out = Some(
            SkCipher::new(suite.suite(), e_out, a_out)
                .map_err(|e| Reject::Ignore(e.to_string()))?,
        );
        sa.sk_in = Some(
            SkCipher::new(suite.suite(), e_in, a_in).map_err(|e| Reject::Ignore(e.to_string()))?,
        );
        sa.suite = Some(suite);
        sa.keys = Some(keys);
        Ok(())
    }

    fn init_response(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        data: &[u8],
        msg: &Message,
        backend: &mut dyn SaBackend,
    ) -> Verdict {
        let cfg = self.cfg.clone();
        let h = msg.header;
        let Some(i) = self.sas.iter().position(|s| {
            s.role == Role::Initiator && s.spi_i == h.spi_i && s.state == IkeState::InitSent
        }) else {
            return ignore("IKE_SA_INIT response for no IKE_SA_INIT of ours");
        };
        if h.message_id != 0 || h.is_initiator() {
            return ignore("malformed IKE_SA_INIT response header");
        }
        // Error answers first: COOKIE and INVALID_KE_PAYLOAD ask for a retry (§2.6, §1.2).
        for n in msg.notifies() {
            match n.kind {
                NotifyType::COOKIE if h.spi_r == 0 => {
                    if self.sas[i].cookie.is_some()
                        && self.sas[i].cookie.as_deref() == Some(&n.data[..])
                    {
                        return ignore("the same COOKIE again");
                    }
                    self.out.log(
                        Level::Info,
                        &cfg,
                        "the responder asked for a COOKIE; retrying IKE_SA_INIT with it",
                    );
                    self.sas[i].cookie = Some(n.data.clone());
                    self.send_init(i, now);
                    return Ok(());
                }
                NotifyType::INVALID_KE_PAYLOAD if h.spi_r == 0 => {
                    let g = n
                        .data
                        .get(..2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                        .and_then(DhGroup::from_ike);
                    let offered = g.filter(|g| {
                        cfg.ike_proposals.iter().any(|p| p.dh.contains(g))
                            && (cfg.allow_legacy || !g.is_legacy())
                    });
                    let Some(g) = offered else {
                        self.kill(
                            i,
                            now,
                            backend,
                            "the responder wants a DH group we do not offer",
                        );
                        return Ok(());
                    };
                    if self.sas[i].dh.as_ref().is_some_and(|d| d.group() == g) {
                        return ignore("INVALID_KE_PAYLOAD for the group we used");
                    }
                    self.out.log(
                        Level::Info,
                        &cfg,
                        format!("the responder wants {g}; retrying IKE_SA_INIT"),
                    );
                    self.sas[i].dh = Some(
                        DhPrivate::generate(g, &*self.rng)
                            .map_err(|e| Reject::Ignore(e.to_string()))?,
                    );
                    self.send_init(i, now);
                    return Ok(());
                }
                NotifyType::NO_PROPOSAL_CHOSEN => {
                    self.kill(
                        i,
                        now,
                        backend,
                        "the responder chose none of our IKE proposals (NO_PROPOSAL_CHOSEN)",
                    );
                    return Ok(());
                }
                k if k.is_error() && h.spi_r == 0 => {
                    self.kill(i, now, backend, &format!("IKE_SA_INIT refused: {k}"));
                    return Ok(());
                }
                _ => {}
            }
        }
        if h.spi_r == 0 {
            return ignore("IKE_SA_INIT response without a responder SPI");
        }
        let Some(Body::Sa(props)) = msg
            .payloads
            .iter()
            .map(|p| &p.body)
            .find(|b| matches!(b, Body::Sa(_)))
        else {
            return ignore("IKE_SA_INIT response without SA");
        };
        let Some(suite) = proposal::accepted_ike(&cfg.ike_proposals, props, cfg.allow_legacy)
        else {
            self.kill(
                i,
                now,
                backend,
                "the responder chose a proposal we did not offer",
            );
            return Ok(());
        };
        let Some((group, ker)) = ke_of(&msg.payloads) else {
            return ignore("IKE_SA_INIT response without KE");
        };
        let nr = nonce_of(&msg.payloads)
            .ok_or(Reject::Ignore("IKE_SA_INIT response without nonce".into()))?;
        let sa = &mut self.sas[i];
        let Some(dh) = sa.dh.take() else {
            return ignore("no DH state");
        };
        if dh.group().id() != group || suite.dh != dh.group() {
            return ignore("KE group differs from the chosen proposal");
        }
        let shared = dh.agree(&ker).map_err(|e| Reject::Ignore(e.to_string()))?;
        sa.spi_r = h.spi_r;
        sa.nr = nr;
        sa.init_r = data.to_vec();
        let (nat_src, nat_dst) = check_nat(
            msg,
            sa.spi_i,
            sa.spi_r,
            remote,
            SocketAddr::new(cfg.local, local_port),
        );
        sa.behind_nat = nat_dst;
        if nat_src || nat_dst || cfg.force_encap {
            sa.natt = true;
            sa.remote = SocketAddr::new(remote.ip(), 4500);
            self.out.log(
                Level::Info,
                &cfg,
                format!(
                    "NAT detected ({}); IKE and ESP float to UDP 4500",
                    if nat_dst {
                        "we are behind it"
                    } else {
                        "the peer is behind it"
                    }
                ),
            );
        }
        let mut sa = self.sas.remove(i);
        self.set_ike_keys(&mut sa, suite, &shared, None)?;
        if suite.is_legacy() {
            self.out.log(
                Level::Warn,
                &cfg,
                format!("IKE_SA uses legacy algorithms ({suite}) because allow_legacy is set"),
            );
        }
        sa.outstanding = None;
        sa.state = IkeState::AuthSent;
        self.sas.insert(i, sa);
        self.send_auth(i, now, backend);
        Ok(())
    }

    fn id_payload(&self) -> Identification {
        identification(&self.cfg.local_id)
    }

    fn send_auth(&mut self, i: usize, now: Instant, backend: &mut dyn SaBackend) {
        let cfg = self.cfg.clone();
        let draft = match self.new_child_draft(backend, None, false) {
            Ok(d) => d,
            Err(e) => {
                self.kill(i, now, backend, &format!("allocating an SPI: {e}"));
                return;
            }
        };
        let id = self.id_payload();
        let initial_contact = !self
            .sas
            .iter()
            .enumerate()
            .any(|(j, s)| j != i && s.is_usable());
        let sa = &mut self.sas[i];
        let (Some(suite), Some(keys)) = (sa.suite, &sa.keys) else {
            return;
        };
        let auth = crypto::psk_auth(
            suite.prf,
            &cfg.psk,
            &sa.init_i,
            &sa.nr,
            &keys.sk_pi,
            &id.body(),
        );
        let mut p = vec![
            Payload::new(Body::IdI(id)),
            Payload::new(Body::Auth {
                method: super::codec::AuthMethod::SHARED_KEY_MIC,
                reserved: [0; 3],
                data: auth,
            }),
        ];
        if initial_contact {
            p.push(Payload::new(Body::Notify(Notify::new(
                NotifyType::INITIAL_CONTACT,
                vec![],
            ))));
        }
        p.push(Payload::new(Body::Sa(proposal::esp_offer(
            &cfg.esp_proposals,
            cfg.allow_legacy,
            draft.spi_in,
            false,
        ))));
        p.push(ts_payload(true, &cfg.local_ts));
        p.push(ts_payload(false, &cfg.remote_ts));
        let header = sa.header(ExchangeType::IKE_AUTH, false, 1);
        let Some(sk) = &sa.sk_out else { return };
        let Ok(bytes) = sk.seal(header, &p, &*self.rng) else {
            return;
        };
        sa.my_mid = 2;
        sa.outstanding = Some(Outstanding {
            message_id: 1,
            task: Task::IkeAuth(draft),
            bytes: bytes.clone(),
            next_at: now + cfg.retransmit_timeout,
            sent: 1,
            interval: None,
        });
        let t = Transmit {
            local_port: sa.local_port(),
            remote: sa.remote,
            data: bytes,
        };
        self.out.transmits.push_back(t);
    }

    #[allow(clippy::too_many_arguments)]
    fn encrypted(
        &mut self,
        i: usize,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        data: &[u8],
        msg: &Message,
        backend: &mut dyn SaBackend,
    ) -> Verdict {
        let h = msg.header;
        // Our own messages have our role's I flag; the peer's the other.
        let from_initiator = h.is_initiator();
        if from_initiator == (self.sas[i].role == Role::Initiator) {
            return ignore("message with our own role's flag");
        }
        if h.is_response() {
            let Some(o) = &self.sas[i].outstanding else {
                return ignore("response with no request outstanding");
            };
            if o.message_id != h.message_id {
                return ignore("response with an unexpected message ID");
            }
            let inner = self.open(i, data, msg)?;
            self.hear(i, now, local_port, remote);
            let Some(o) = self.sas[i].outstanding.take() else {
                return Ok(());
            };
            self.response(i, now, o.task, &inner, backend);
            self.pump(i, now);
            return Ok(());
        }
        let sa = &self.sas[i];
        if h.message_id.wrapping_add(1) == sa.peer_mid {
            // A retransmitted request: resend our cached response (§2.1).
            if let Some((mid, bytes)) = &sa.last_response
                && *mid == h.message_id
            {
                let t = Transmit {
                    local_port,
                    remote,
                    data: bytes.clone(),
                };
                self.out.transmits.push_back(t);
            }
            return Ok(());
        }
        if h.message_id != sa.peer_mid {
            return ignore(format!(
                "request with message ID {} (expected {})",
                h.message_id, sa.peer_mid
            ));
        }
        if sa.state == IkeState::InitDone && h.exchange != ExchangeType::IKE_AUTH {
            return ignore("request before IKE_AUTH");
        }
        let inner = self.open(i, data, msg)?;
        self.hear(i, now, local_port, remote);
        let response = match h.exchange {
            ExchangeType::IKE_AUTH if self.sas[i].state == IkeState::InitDone => {
                self.auth_request(i, now, &inner, backend)
            }
            ExchangeType::CREATE_CHILD_SA if self.sas[i].is_usable() => {
                self.create_child_request(i, now, &inner, backend)
            }
            // Being rekeyed or closed: try again later (§2.25).
            ExchangeType::CREATE_CHILD_SA => vec![notify(NotifyType::TEMPORARY_FAILURE)],
            ExchangeType::INFORMATIONAL => self.informational_request(i, now, &inner, backend),
            _ => vec![notify(NotifyType::INVALID_SYNTAX)],
        };
        // The request's handler may have removed this IKE_SA's keys (deleted).
        let sa = &mut self.sas[i];
        sa.peer_mid = sa.peer_mid.wrapping_add(1);
        let header = sa.header(h.exchange, true, h.message_id);
        if let Some(sk) = &sa.sk_out
            && let Ok(bytes) = sk.seal(header, &response, &*self.rng)
        {
            sa.last_response = Some((h.message_id, bytes.clone()));
            self.out.transmits.push_back(Transmit {
                local_port: sa.local_port(),
                remote: sa.remote,
                data: bytes,
            });
        }
        if self.sas[i].state == IkeState::Dead {
            self.sas[i].sk_out = None;
        }
        self.pump(i, now);
        Ok(())
    }

    fn open(&mut self, i: usize, data: &[u8], msg: &Message) -> Result<Vec<Payload>, Reject> {
        let Some(sk) = &self.sas[i].sk_in else {
            return ignore("no keys");
        };
        sk.open(data, msg)
            .map_err(|e| Reject::Ignore(format!("{}: {e}", msg.header.exchange)))
    }

    /// The peer spoke (authenticated): note it, follow its address and port.
    fn hear(&mut self, i: usize, now: Instant, local_port: u16, remote: SocketAddr) {
        let sa = &mut self.sas[i];
        sa.last_heard = now;
        if local_port == 4500 && !sa.natt {
            sa.natt = true;
        }
        if sa.remote != remote && sa.natt {
            // The peer's NAT mapping changed (§2.23): answer where it is now.
            sa.remote = remote;
        }
    }

    fn auth_request(
        &mut self,
        i: usize,
        now: Instant,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) -> Vec<Payload> {
        let cfg = self.cfg.clone();
        let idi = inner.iter().find_map(|p| match &p.body {
            Body::IdI(id) => Some(id.clone()),
            _ => None,
        });
        let auth = inner.iter().find_map(|p| match &p.body {
            Body::Auth { method, data, .. } => Some((*method, data.clone())),
            _ => None,
        });
        let sa = &self.sas[i];
        let (Some(idi), Some((method, auth)), Some(suite), Some(keys)) =
            (idi, auth, sa.suite, &sa.keys)
        else {
            self.sas[i].state = IkeState::Dead;
            return vec![notify(NotifyType::INVALID_SYNTAX)];
        };
        let expected_id = cfg.remote_id.clone().unwrap_or(match cfg.remote {
            IpAddr::V4(a) => Identity::Ipv4(a),
            IpAddr::V6(a) => Identity::Fqdn(a.to_string()),
        });
        let want = crypto::psk_auth(
            suite.prf,
            &cfg.psk,
            &sa.init_i,
            &sa.nr,
            &keys.sk_pi,
            &idi.body(),
        );
        if method != super::codec::AuthMethod::SHARED_KEY_MIC
            || !crypto::psk_auth_ok(&want, &auth)
            || identification(&expected_id) != idi
        {
            self.stats.auth_failures += 1;
            self.out.log(Level::Error, &cfg, format!("IKE_AUTH: authentication of peer {:?} failed (wrong pre-shared key or identity)", id_text(&idi)));
            self.sas[i].state = IkeState::Dead;
            return vec![notify(NotifyType::AUTHENTICATION_FAILED)];
        }
        let id = self.id_payload();
        let my_auth = crypto::psk_auth(
            suite.prf,
            &cfg.psk,
            &sa.init_r,
            &sa.ni,
            &keys.sk_pr,
            &id.body(),
        );
        let initial_contact = inner
            .iter()
            .any(|p| matches!(&p.body, Body::Notify(n) if n.kind == NotifyType::INITIAL_CONTACT));
        let mut resp = vec![
            Payload::new(Body::IdR(id)),
            Payload::new(Body::Auth {
                method: super::codec::AuthMethod::SHARED_KEY_MIC,
                reserved: [0; 3],
                data: my_auth,
            }),
        ];
        self.established(i, now, initial_contact, backend);
        let (ni, nr) = (self.sas[i].ni.clone(), self.sas[i].nr.clone());
        resp.extend(self.respond_child(i, now, inner, None, (ni, nr), None, true, backend));
        resp
    }

    fn established(
        &mut self,
        i: usize,
        now: Instant,
        initial_contact: bool,
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        if initial_contact {
            // The peer lost its state (§2.4): our other IKE_SAs with it are stale.
            let stale: Vec<usize> = (0..self.sas.len())
                .filter(|j| *j != i && self.sas[*j].state != IkeState::Dead)
                .collect();
            for j in stale {
                self.kill_quietly(j, now, backend);
            }
        }
        let delay = self.rekey_delay(cfg.lifetimes.ike);
        let sa = &mut self.sas[i];
        sa.state = IkeState::Established;
        sa.established_at = Some(now);
        sa.rekey_at = Some(now + delay);
        sa.next_dpd_check = Some(now + cfg.dpd.interval);
        sa.next_keepalive = sa.behind_nat.then_some(now + cfg.natt_keepalive);
        self.stats.ike_sas_established += 1;
        self.last_established = Some(now);
        self.initiate_backoff = Duration::from_secs(1);
        let suite = sa.suite.map(|s| s.to_string()).unwrap_or_default();
        let (spi_i, spi_r) = (sa.spi_i, sa.spi_r);
        self.out.log(
            Level::Info,
            &cfg,
            format!("IKE_SA {spi_i:016x}/{spi_r:016x} established ({suite})"),
        );
    }

    /// Responder side of a CHILD_SA (IKE_AUTH or CREATE_CHILD_SA): choose,
    /// install both directions (inbound first), answer.
    /// `nonces` are the exchange's (Ni, Nr); the response carries Nr unless
    /// this is IKE_AUTH, whose nonces were in IKE_SA_INIT (§1.2).
    #[allow(clippy::too_many_arguments)]
    fn respond_child(
        &mut self,
        i: usize,
        now: Instant,
        inner: &[Payload],
        rekey_of: Option<u32>,
        nonces: (Vec<u8>, Vec<u8>),
        ke: Option<(DhGroup, Vec<u8>, Vec<u8>)>,
        in_ike_auth: bool,
        backend: &mut dyn SaBackend,
    ) -> Vec<Payload> {
        let cfg = self.cfg.clone();
        let props = inner.iter().find_map(|p| match &p.body {
            Body::Sa(s) => Some(s.clone()),
            _ => None,
        });
        let (tsi, tsr) = selectors(inner);
        let Some(props) = props else {
            return vec![notify(NotifyType::INVALID_SYNTAX)];
        };
        let spi_in = match backend.allocate_spi() {
            Ok(s) => s,
            Err(e) => {
                self.out
                    .log(Level::Error, &cfg, format!("allocating an SPI: {e}"));
                return vec![notify(NotifyType::TEMPORARY_FAILURE)];
            }
        };
        let Some((suite, spi_out, answer)) = proposal::choose_esp(
            &cfg.esp_proposals,
            &props,
            cfg.allow_legacy,
            spi_in,
            ke.as_ref().map(|k| k.0),
        ) else {
            self.out
                .log(Level::Warn, &cfg, "CHILD_SA: no ESP proposal chosen");
            return vec![notify(NotifyType::NO_PROPOSAL_CHOSEN)];
        };
        // Their TSi is our remote, their TSr our local.
        let remote_ts = ts::narrow(&cfg.remote_ts, &tsi);
        let local_ts = ts::narrow(&cfg.local_ts, &tsr);
        if remote_ts.is_empty() || local_ts.is_empty() {
            self.out.log(
                Level::Warn,
                &cfg,
                "CHILD_SA: traffic selectors unacceptable",
            );
            return vec![notify(NotifyType::TS_UNACCEPTABLE)];
        }
        let shared = ke.as_ref().map(|(_, secret, _)| secret.clone());
        let (ni, nr) = nonces.clone();
        let keys = self.child_keys(i, suite, shared.as_deref(), (&ni, &nr), false);
        let child = ChildSa {
            spi_in,
            spi_out,
            suite,
            local_ts: local_ts.clone(),
            remote_ts: remote_ts.clone(),
            state: ChildState::Installed,
            created: now,
            rekey_at: now + self.rekey_delay(cfg.lifetimes.child),
            expire_at: now + cfg.lifetimes.child,
            routed: false,
            nonces,
        };
        // As responder to a rekey, keep sending on the old SA until the
        // initiator deletes it (it may not have its new inbound SA yet).
        let route_now = rekey_of.is_none();
        if let Err(e) = self.install_child(i, &child, &keys, route_now, backend) {
            self.out
                .log(Level::Error, &cfg, format!("installing CHILD_SA: {e}"));
            return vec![notify(NotifyType::TEMPORARY_FAILURE)];
        }
        let mut child = child;
        child.routed = route_now;
        self.note_child(i, &child, rekey_of);
        if let Some(old) = rekey_of {
            if let Some(c) = self.sas[i].children.iter_mut().find(|c| c.spi_in == old) {
                c.state = ChildState::Rekeyed;
                // Should the initiator never delete it, it goes with its lifetime.
                c.expire_at = c.expire_at.min(now + Duration::from_secs(60));
            }
            // A rekey of the same SA of ours is outstanding: a collision (§2.8.1).
            let ours_pending = matches!(&self.sas[i].outstanding, Some(Outstanding { task: Task::CreateChild(d), .. }) if d.rekey_of == Some(old));
            if ours_pending {
                self.sas[i].collisions.push(Collision {
                    rekey_of: old,
                    nonces: child.nonces.clone(),
                });
            }
        }
        self.sas[i].children.push(child);
        let mut resp = vec![Payload::new(Body::Sa(vec![answer]))];
        if !in_ike_auth {
            resp.push(Payload::new(Body::Nonce(nr)));
        }
        if let Some((g, _, public)) = ke {
            resp.push(Payload::new(Body::Ke {
                group: g.id(),
                reserved: [0; 2],
                data: public,
            }));
        }
        resp.push(ts_payload(true, &remote_ts));
        resp.push(ts_payload(false, &local_ts));
        resp
    }

    fn note_child(&mut self, i: usize, c: &ChildSa, rekey_of: Option<u32>) {
        self.stats.child_sas_installed += 1;
        if rekey_of.is_some() {
            self.stats.rekeys += 1;
        }
        let what = if rekey_of.is_some() {
            "rekeyed"
        } else {
            "established"
        };
        self.out.log(
            Level::Info,
            &self.cfg,
            format!(
                "CHILD_SA {what}: SPIs {:08x}_i {:08x}_o, {}, {} === {}",
                c.spi_in,
                c.spi_out,
                c.suite,
                join(&c.local_ts),
                join(&c.remote_ts)
            ),
        );
        let _ = i;
    }

    /// KEYMAT split into (inbound, outbound) (§2.17): the initiator-to-
    /// responder keys come first, "initiator" meaning whoever started the
    /// exchange that creates the CHILD_SA.
    fn child_keys(
        &self,
        i: usize,
        suite: ChildSuite,
        shared: Option<&[u8]>,
        (ni, nr): (&[u8], &[u8]),
        we_initiated: bool,
    ) -> (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>) {
        let sa = &self.sas[i];
        let len = suite.suite().keymat_len();
        let (Some(ike), Some(keys)) = (sa.suite, &sa.keys) else {
            return (Zeroizing::new(vec![]), Zeroizing::new(vec![]));
        };
        let km = crypto::child_keymat(ike.prf, &keys.sk_d, shared, ni, nr, 2 * len);
        let i_to_r = Zeroizing::new(km[..len].to_vec());
        let r_to_i = Zeroizing::new(km[len..].to_vec());
        if we_initiated {
            (r_to_i, i_to_r)
        } else {
            (i_to_r, r_to_i)
        }
    }

    fn install_child(
        &mut self,
        i: usize,
        c: &ChildSa,
        keys: &(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>),
        route: bool,
        backend: &mut dyn SaBackend,
    ) -> Result<(), crate::backend::BackendError> {
        let cfg = &self.cfg;
        let sa = &self.sas[i];
        let local = SocketAddr::new(cfg.local, sa.local_port());
        let spec = |spi, direction, keymat: &Zeroizing<Vec<u8>>| {
            let hard_bytes = cfg.lifetimes.child_bytes;
            ChildSaSpec {
                tunnel: cfg.tunnel,
                spi,
                direction,
                suite: c.suite.suite(),
                esn: c.suite.esn,
                keymat: keymat.clone(),
                local,
                remote: sa.remote,
                udp_encap: sa.natt,
                lifetime: Lifetime {
                    soft: Limits {
                        bytes: hard_bytes.map(|b| b / 10 * 9),
                        packets: None,
                        seconds: None,
                    },
                    hard: Limits {
                        bytes: hard_bytes,
                        packets: None,
                        seconds: None,
                    },
                },
                replay_window: cfg.replay_window,
                local_ts: c.local_ts.clone(),
                remote_ts: c.remote_ts.clone(),
            }
        };
        backend.install(&spec(c.spi_in, Direction::Inbound, &keys.0))?;
        backend.install(&spec(c.spi_out, Direction::Outbound, &keys.1))?;
        if route {
            backend.route(cfg.tunnel, Some(c.spi_out))?;
            self.tunnel_up();
        }
        Ok(())
    }

    fn tunnel_up(&mut self) {
        if !self.tunnel_up {
            self.tunnel_up = true;
            self.out.events.push_back(Event::TunnelUp {
                tunnel: self.cfg.tunnel,
            });
        }
    }

    fn create_child_request(
        &mut self,
        i: usize,
        now: Instant,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) -> Vec<Payload> {
        let cfg = self.cfg.clone();
        let Some(ni) = nonce_of(inner) else {
            return vec![notify(NotifyType::INVALID_SYNTAX)];
        };
        let props: Vec<_> = inner
            .iter()
            .filter_map(|p| match &p.body {
                Body::Sa(s) => Some(s.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        let nr = self.nonce();
        // IKE_SA rekey: an SA payload with IKE proposals (§1.3.2).
        if props.iter().any(|p| p.protocol == ProtocolId::IKE) {
            return self.ike_rekey_request(i, now, inner, &props, ni, nr, backend);
        }
        let rekey_of = inner.iter().find_map(|p| match &p.body {
            Body::Notify(n) if n.kind == NotifyType::REKEY_SA && n.protocol == ProtocolId::ESP => {
                <[u8; 4]>::try_from(n.spi.as_slice())
                    .ok()
                    .map(u32::from_be_bytes)
            }
            _ => None,
        });
        // The peer names the SA by its inbound SPI: our outbound one.
        let rekey_of = match rekey_of {
            Some(peer_in) => match self.sas[i].children.iter().find(|c| c.spi_out == peer_in) {
                Some(c) if c.state == ChildState::Installed => Some(c.spi_in),
                // Already rekeyed by us and about to be deleted (§2.25.1).
                Some(_) => return vec![notify(NotifyType::TEMPORARY_FAILURE)],
                None => {
                    let mut n = Notify::new(NotifyType::CHILD_SA_NOT_FOUND, vec![]);
                    n.protocol = ProtocolId::ESP;
                    n.spi = peer_in.to_be_bytes().to_vec();
                    return vec![Payload::new(Body::Notify(n))];
                }
            },
            None => None,
        };
        let ke = match ke_of(inner) {
            Some((g, kei)) => {
                let Some(group) = DhGroup::from_ike(g)
                    .filter(|g| cfg.esp_proposals.iter().any(|p| p.dh.contains(g)))
                else {
                    let want = cfg.esp_proposals.iter().flat_map(|p| p.dh.iter()).next();
                    return match want {
                        Some(w) => vec![Payload::new(Body::Notify(Notify::new(
                            NotifyType::INVALID_KE_PAYLOAD,
                            w.id().to_be_bytes().to_vec(),
                        )))],
                        None => vec![notify(NotifyType::NO_PROPOSAL_CHOSEN)],
                    };
                };
                let Ok(dh) = DhPrivate::generate(group, &*self.rng) else {
                    return vec![notify(NotifyType::TEMPORARY_FAILURE)];
                };
                let public = dh.public().to_vec();
                let Ok(shared) = dh.agree(&kei) else {
                    return vec![notify(NotifyType::INVALID_SYNTAX)];
                };
                Some((group, shared.to_vec(), public))
            }
            None => None,
        };
        self.respond_child(i, now, inner, rekey_of, (ni, nr), ke, false, backend)
    }

    #[allow(clippy::too_many_arguments)]
    fn ike_rekey_request(
        &mut self,
        i: usize,
        now: Instant,
        inner: &[Payload],
        props: &[super::codec::Proposal],
        ni: Vec<u8>,
        nr: Vec<u8>,
        backend: &mut dyn SaBackend,
    ) -> Vec<Payload> {
        let cfg = self.cfg.clone();
        let new_spi_r = self.random_spi();
        let Some((suite, answer)) =
            proposal::choose_ike(&cfg.ike_proposals, props, cfg.allow_legacy, Some(new_spi_r))
        else {
            return vec![notify(NotifyType::NO_PROPOSAL_CHOSEN)];
        };
        let Some(peer_spi) = props
            .iter()
            .find(|p| p.number == answer.number)
            .and_then(|p| <[u8; 8]>::try_from(p.spi.as_slice()).ok())
            .map(u64::from_be_bytes)
        else {
            return vec![notify(NotifyType::INVALID_SYNTAX)];
        };
        let Some((g, kei)) = ke_of(inner) else {
            return vec![notify(NotifyType::INVALID_SYNTAX)];
        };
        if g != suite.dh.id() {
            return vec![Payload::new(Body::Notify(Notify::new(
                NotifyType::INVALID_KE_PAYLOAD,
                suite.dh.id().to_be_bytes().to_vec(),
            )))];
        }
        let Ok(dh) = DhPrivate::generate(suite.dh, &*self.rng) else {
            return vec![notify(NotifyType::TEMPORARY_FAILURE)];
        };
        let public = dh.public().to_vec();
        let Ok(shared) = dh.agree(&kei) else {
            return vec![notify(NotifyType::INVALID_SYNTAX)];
        };
        let Some(old_d) = self.sas[i].keys.as_ref().map(|k| k.sk_d.clone()) else {
            return vec![notify(NotifyType::TEMPORARY_FAILURE)];
        };
        // The rekey's initiator is the new IKE_SA's initiator (§2.18).
        let old = &self.sas[i];
        let mut new = IkeSa::new(Role::Responder, peer_spi, new_spi_r, old.remote, now);
        new.natt = old.natt;
        new.behind_nat = old.behind_nat;
        new.ni = ni.clone();
        new.nr = nr.clone();
        new.rekey_nonces = Some((ni.clone(), nr.clone()));
        if self
            .set_ike_keys(&mut new, suite, &shared, Some(&old_d))
            .is_err()
        {
            return vec![notify(NotifyType::TEMPORARY_FAILURE)];
        }
        let ours_pending = matches!(
            &self.sas[i].outstanding,
            Some(Outstanding {
                task: Task::RekeyIke(_),
                ..
            })
        );
        if ours_pending {
            self.sas[i].ike_collision = Some(IkeCollision {
                spi_i: peer_spi,
                nonces: (ni, nr.clone()),
            });
        }
        // Children move to the new IKE_SA; the old one answers this and waits
        // for the initiator's DELETE.
        let children = std::mem::take(&mut self.sas[i].children);
        new.children = children;
        new.peer_mid = 0;
        new.my_mid = 0;
        self.sas[i].retire(now);
        self.sas.push(new);
        let j = self.sas.len() - 1;
        self.established(j, now, false, backend);
        self.stats.rekeys += 1;
        self.out
            .log(Level::Info, &cfg, "IKE_SA rekeyed by the peer");
        vec![
            Payload::new(Body::Sa(vec![answer])),
            Payload::new(Body::Nonce(nr)),
            Payload::new(Body::Ke {
                group: g,
                reserved: [0; 2],
                data: public,
            }),
        ]
    }

    fn informational_request(
        &mut self,
        i: usize,
        now: Instant,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) -> Vec<Payload> {
        let mut resp = Vec::new();
        for p in inner {
            let Body::Delete(d) = &p.body else { continue };
            match d.protocol {
                ProtocolId::IKE => {
                    self.out
                        .log(Level::Info, &self.cfg, "the peer deleted the IKE_SA");
                    let rekeyed = self.sas[i].state == IkeState::Rekeyed;
                    if rekeyed {
                        // The old SA of a rekey: its children already moved.
                        self.sas[i].state = IkeState::Dead;
                    } else {
                        self.kill_quietly(i, now, backend);
                        if self.cfg.initiator {
                            self.next_initiate = Some(now + self.initiate_backoff);
                        }
                    }
                    return vec![];
                }
                ProtocolId::ESP => {
                    let mut ours = Vec::new();
                    for spi in d.spis.iter().filter_map(|s| {
                        <[u8; 4]>::try_from(s.as_slice())
                            .ok()
                            .map(u32::from_be_bytes)
                    }) {
                        // The peer names its inbound SPI: our outbound.
                        if let Some(c) = self.sas[i].children.iter().find(|c| c.spi_out == spi) {
                            ours.push(c.spi_in);
                        }
                    }
                    for spi in &ours {
                        self.remove_child(i, *spi, now, backend);
                    }
                    if !ours.is_empty() {
                        resp.push(Payload::new(Body::Delete(Delete {
                            protocol: ProtocolId::ESP,
                            spi_size: 4,
                            spis: ours.iter().map(|s| s.to_be_bytes().to_vec()).collect(),
                        })));
                    }
                }
                _ => {}
            }
        }
        resp
    }

    /// Removes a CHILD_SA from the datapath; if it carried the tunnel, the
    /// newest other CHILD_SA takes over, or the tunnel goes down.
    fn remove_child(&mut self, i: usize, spi_in: u32, _now: Instant, backend: &mut dyn SaBackend) {
        let Some(pos) = self.sas[i].children.iter().position(|c| c.spi_in == spi_in) else {
            return;
        };
        let c = self.sas[i].children.remove(pos);
        if c.routed {
            let next = self.sas[i]
                .children
                .iter_mut()
                .rev()
                .find(|c| c.state == ChildState::Installed);
            match next {
                Some(n) => {
                    n.routed = true;
                    let spi = n.spi_out;
                    let _ = backend.route(self.cfg.tunnel, Some(spi));
                }
                None => {
                    let _ = backend.route(self.cfg.tunnel, None);
                    self.tunnel_down("its last CHILD_SA was deleted");
                }
            }
        }
        let _ = backend.delete(c.spi_out, Direction::Outbound);
        let _ = backend.delete(c.spi_in, Direction::Inbound);
        self.out.log(
            Level::Info,
            &self.cfg,
            format!("CHILD_SA {:08x}_i {:08x}_o deleted", c.spi_in, c.spi_out),
        );
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

    // -------------------------------------------------------------- responses

    fn response(
        &mut self,
        i: usize,
        now: Instant,
        task: Task,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        let error = inner.iter().find_map(|p| match &p.body {
            Body::Notify(n) if n.kind.is_error() => Some(n.clone()),
            _ => None,
        });
        match task {
            Task::IkeAuth(draft) => self.auth_response(i, now, draft, inner, error, backend),
            Task::CreateChild(draft) => {
                if let Some(e) = error {
                    if e.kind == NotifyType::INVALID_KE_PAYLOAD
                        && let Some(g) = e
                            .data
                            .get(..2)
                            .map(|b| u16::from_be_bytes([b[0], b[1]]))
                            .and_then(DhGroup::from_ike)
                        && let Ok(dh) = DhPrivate::generate(g, &*self.rng)
                    {
                        let retry = ChildDraft {
                            dh: Some(dh),
                            nonce: self.nonce(),
                            ..draft
                        };
                        self.sas[i].tasks.push_front(Task::CreateChild(retry));
                        return;
                    }
                    self.out.log(
                        Level::Warn,
                        &cfg,
                        format!("CREATE_CHILD_SA refused: {}", e.kind),
                    );
                    let _ = backend.delete(draft.spi_in, Direction::Inbound);
                    // TEMPORARY_FAILURE (a collision the peer saw): try again later (§2.25).
                    if e.kind == NotifyType::TEMPORARY_FAILURE
                        && let Some(old) = draft.rekey_of
                        && let Some(c) = self.sas[i].children.iter_mut().find(|c| c.spi_in == old)
                    {
                        c.rekey_at = now + Duration::from_secs(2);
                    }
                    return;
                }
                self.child_response(i, now, draft, inner, backend);
            }
            Task::RekeyIke(draft) => {
                if let Some(e) = error {
                    self.out.log(
                        Level::Warn,
                        &cfg,
                        format!("IKE_SA rekey refused: {}", e.kind),
                    );
                    self.sas[i].rekey_at = Some(now + Duration::from_secs(10));
                    return;
                }
                self.ike_rekey_response(i, now, draft, inner, backend);
            }
            Task::DeleteChildren(spis) => {
                for spi in spis {
                    self.remove_child(i, spi, now, backend);
                }
            }
            Task::DeleteIke => {
                if self.sas[i].state == IkeState::Rekeyed {
                    self.sas[i].state = IkeState::Dead;
                } else {
                    self.kill_quietly(i, now, backend);
                }
            }
            Task::Dpd | Task::IkeInit => {}
        }
    }

    fn auth_response(
        &mut self,
        i: usize,
        now: Instant,
        draft: ChildDraft,
        inner: &[Payload],
        error: Option<Notify>,
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        if let Some(e) = &error
            && e.kind == NotifyType::AUTHENTICATION_FAILED
        {
            self.stats.auth_failures += 1;
            let _ = backend.delete(draft.spi_in, Direction::Inbound);
            self.kill(i, now, backend, "the peer refused our authentication (AUTHENTICATION_FAILED: check the pre-shared key and identities)");
            return;
        }
        let idr = inner.iter().find_map(|p| match &p.body {
            Body::IdR(id) => Some(id.clone()),
            _ => None,
        });
        let auth = inner.iter().find_map(|p| match &p.body {
            Body::Auth { data, .. } => Some(data.clone()),
            _ => None,
        });
        let sa = &self.sas[i];
        let (Some(idr), Some(auth), Some(suite), Some(keys)) = (idr, auth, sa.suite, &sa.keys)
        else {
            self.kill(
                i,
                now,
                backend,
                "IKE_AUTH response without identity or AUTH",
            );
            return;
        };
        let want = crypto::psk_auth(
            suite.prf,
            &cfg.psk,
            &sa.init_r,
            &sa.ni,
            &keys.sk_pr,
            &idr.body(),
        );
        let expected_id = cfg.remote_id.clone().unwrap_or(match cfg.remote {
            IpAddr::V4(a) => Identity::Ipv4(a),
            IpAddr::V6(a) => Identity::Fqdn(a.to_string()),
        });
        if !crypto::psk_auth_ok(&want, &auth) || identification(&expected_id) != idr {
            self.stats.auth_failures += 1;
            self.kill(
                i,
                now,
                backend,
                &format!("authentication of the responder {:?} failed", id_text(&idr)),
            );
            return;
        }
        self.established(i, now, false, backend);
        if let Some(e) = error {
            self.out.log(
                Level::Warn,
                &cfg,
                format!("IKE_SA up, but the first CHILD_SA was refused: {}", e.kind),
            );
            let _ = backend.delete(draft.spi_in, Direction::Inbound);
            return;
        }
        self.child_response(i, now, draft, inner, backend);
    }

    fn child_response(
        &mut self,
        i: usize,
        now: Instant,
        draft: ChildDraft,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        let props = inner.iter().find_map(|p| match &p.body {
            Body::Sa(s) => Some(s.clone()),
            _ => None,
        });
        let first = self.sas[i].children.is_empty()
            && draft.rekey_of.is_none()
            && self.sas[i].state == IkeState::Established
            && inner.iter().any(|p| matches!(p.body, Body::IdR(_)));
        let (ni, nr) = if first {
            (self.sas[i].ni.clone(), self.sas[i].nr.clone())
        } else {
            match nonce_of(inner) {
                Some(nr) => (draft.nonce.clone(), nr),
                None => {
                    self.out
                        .log(Level::Warn, &cfg, "CREATE_CHILD_SA response without nonce");
                    let _ = backend.delete(draft.spi_in, Direction::Inbound);
                    return;
                }
            }
        };
        let ke_group = draft.dh.as_ref().map(DhPrivate::group);
        let Some((suite, spi_out)) = props.and_then(|p| {
            proposal::accepted_esp(&cfg.esp_proposals, &p, cfg.allow_legacy, ke_group)
        }) else {
            self.out.log(
                Level::Warn,
                &cfg,
                "CHILD_SA: the responder chose an ESP proposal we did not offer",
            );
            return;
        };
        let shared = match (draft.dh, ke_of(inner)) {
            (Some(dh), Some((_, ker))) => match dh.agree(&ker) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.out
                        .log(Level::Warn, &cfg, format!("CHILD_SA PFS: {e}"));
                    return;
                }
            },
            (Some(_), None) => {
                self.out.log(
                    Level::Warn,
                    &cfg,
                    "CHILD_SA: PFS requested but the responder sent no KE",
                );
                return;
            }
            _ => None,
        };
        let (tsi, tsr) = selectors(inner);
        let (local_ts, remote_ts) = match draft
            .rekey_of
            .and_then(|o| self.sas[i].children.iter().find(|c| c.spi_in == o))
        {
            Some(old) => (old.local_ts.clone(), old.remote_ts.clone()),
            None => (
                ts::narrow(&cfg.local_ts, &tsi),
                ts::narrow(&cfg.remote_ts, &tsr),
            ),
        };
        if local_ts.is_empty() || remote_ts.is_empty() {
            self.out.log(
                Level::Warn,
                &cfg,
                "CHILD_SA: the responder's traffic selectors are outside ours",
            );
            return;
        }
        let keymat = self.child_keys(
            i,
            suite,
            shared.as_deref().map(|v| &v[..]),
            (&ni, &nr),
            true,
        );
        // A collision (§2.8.1): the SA made with the lowest of the four
        // nonces is redundant and is deleted by whoever created it.
        let collision = match draft.rekey_of {
            Some(old) => self.sas[i]
                .collisions
                .iter()
                .position(|c| c.rekey_of == old)
                .map(|p| self.sas[i].collisions.remove(p)),
            None => None,
        };
        let ours_min = ni.clone().min(nr.clone());
        let ours_lose = collision
            .as_ref()
            .is_some_and(|c| c.nonces.0.clone().min(c.nonces.1.clone()) > ours_min);
        let mut child = ChildSa {
            spi_in: draft.spi_in,
            spi_out,
            suite,
            local_ts,
            remote_ts,
            state: ChildState::Installed,
            created: now,
            rekey_at: now + self.rekey_delay(cfg.lifetimes.child),
            expire_at: now + cfg.lifetimes.child,
            routed: !ours_lose,
            nonces: (ni, nr),
        };
        if let Err(e) = self.install_child(i, &child, &keymat, !ours_lose, backend) {
            self.out
                .log(Level::Error, &cfg, format!("installing CHILD_SA: {e}"));
            return;
        }
        self.note_child(i, &child, draft.rekey_of);
        if !ours_lose {
            for c in &mut self.sas[i].children {
                c.routed = false;
            }
        }
        let Some(old) = draft.rekey_of else {
            self.sas[i].children.push(child);
            return;
        };
        let new_spi = child.spi_in;
        if ours_lose {
            // Ours is redundant: delete it. The peer's survives; the peer
            // deletes the old SA, and its DELETE moves our traffic over (by
            // then it has the inbound half of its SA).
            self.out.log(
                Level::Info,
                &cfg,
                "CHILD_SA rekey collision: ours has the lowest nonce and goes",
            );
            child.state = ChildState::Deleting;
            self.sas[i].children.push(child);
            self.sas[i]
                .tasks
                .push_back(Task::DeleteChildren(vec![new_spi]));
            return;
        }
        if collision.is_some() {
            self.out.log(
                Level::Info,
                &cfg,
                "CHILD_SA rekey collision: ours survives; the peer deletes its own",
            );
        }
        self.sas[i].children.push(child);
        self.mark_rekeyed(i, old);
        self.sas[i].tasks.push_back(Task::DeleteChildren(vec![old]));
    }

    fn mark_rekeyed(&mut self, i: usize, old: u32) {
        if let Some(c) = self.sas[i].children.iter_mut().find(|c| c.spi_in == old) {
            c.state = ChildState::Rekeyed;
            c.routed = false;
        }
    }

    fn ike_rekey_response(
        &mut self,
        i: usize,
        now: Instant,
        draft: IkeDraft,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        let props = inner.iter().find_map(|p| match &p.body {
            Body::Sa(s) => Some(s.clone()),
            _ => None,
        });
        let Some(props) = props else { return };
        let Some(suite) = proposal::accepted_ike(&cfg.ike_proposals, &props, cfg.allow_legacy)
        else {
            self.out.log(
                Level::Warn,
                &cfg,
                "IKE_SA rekey: the peer chose a proposal we did not offer",
            );
            return;
        };
        let Some(peer_spi) = props
            .first()
            .and_then(|p| <[u8; 8]>::try_from(p.spi.as_slice()).ok())
            .map(u64::from_be_bytes)
        else {
            return;
        };
        let (Some(nr), Some((_, ker)), Some(dh)) = (nonce_of(inner), ke_of(inner), draft.dh) else {
            return;
        };
        let Ok(shared) = dh.agree(&ker) else { return };
        let Some(old_d) = self.sas[i].keys.as_ref().map(|k| k.sk_d.clone()) else {
            return;
        };
        let old = &self.sas[i];
        let mut new = IkeSa::new(Role::Initiator, draft.spi, peer_spi, old.remote, now);
        new.natt = old.natt;
        new.behind_nat = old.behind_nat;
        new.ni = draft.nonce.clone();
        new.nr = nr.clone();
        new.rekey_nonces = Some((draft.nonce.clone(), nr.clone()));
        if self
            .set_ike_keys(&mut new, suite, &shared, Some(&old_d))
            .is_err()
        {
            return;
        }
        let ours_min = draft.nonce.clone().min(nr);
        let collision = self.sas[i].ike_collision.take();
        match collision {
            Some(IkeCollision {
                spi_i: their_spi_i,
                nonces,
            }) if nonces.0.clone().min(nonces.1.clone()) > ours_min => {
                // Ours is redundant (§2.8.1): delete it at once, keep theirs.
                self.out
                    .log(Level::Info, &cfg, "IKE_SA rekey collision: ours loses");
                new.state = IkeState::Established;
                new.tasks.push_back(Task::DeleteIke);
                new.my_mid = 0;
                self.sas.push(new);
                let j = self.sas.len() - 1;
                self.pump(j, now);
                let _ = their_spi_i;
            }
            _ => {
                // Ours survives: children move to it, the old IKE_SA is deleted.
                let children = std::mem::take(&mut self.sas[i].children);
                new.children = children;
                self.sas[i].retire(now);
                self.sas[i].tasks.push_back(Task::DeleteIke);
                if let Some(IkeCollision {
                    spi_i: their_spi_i, ..
                }) = collision
                    && let Some(k) = self
                        .sas
                        .iter()
                        .position(|s| s.spi_i == their_spi_i && s.role == Role::Responder)
                {
                    // The peer's (losing) new IKE_SA took the children: take them back.
                    let moved = std::mem::take(&mut self.sas[k].children);
                    new.children.extend(moved);
                    self.sas[k].retire(now);
                }
                self.sas.push(new);
                let j = self.sas.len() - 1;
                self.established(j, now, false, backend);
                self.stats.rekeys += 1;
                self.out.log(Level::Info, &cfg, "IKE_SA rekeyed");
            }
        }
    }

    // ------------------------------------------------------------------ death

    /// The IKE_SA failed: its CHILD_SAs go, the tunnel goes down, and an
    /// initiator tries again later.
    fn kill(&mut self, i: usize, now: Instant, backend: &mut dyn SaBackend, reason: &str) {
        self.out
            .log(Level::Warn, &self.cfg, format!("IKE_SA down: {reason}"));
        self.kill_quietly(i, now, backend);
        let others_up = self.sas.iter().any(|s| s.is_usable());
        if self.cfg.initiator && !others_up {
            self.next_initiate = Some(now + self.initiate_backoff);
            self.initiate_backoff = (self.initiate_backoff * 2).min(Duration::from_secs(30));
        }
        if !others_up {
            self.tunnel_down(reason);
        }
    }

    fn kill_quietly(&mut self, i: usize, now: Instant, backend: &mut dyn SaBackend) {
        let spis: Vec<u32> = self.sas[i].children.iter().map(|c| c.spi_in).collect();
        for spi in spis {
            self.remove_child(i, spi, now, backend);
        }
        let sa = &mut self.sas[i];
        sa.state = IkeState::Dead;
        sa.outstanding = None;
        sa.tasks.clear();
    }

    fn reap(&mut self, _now: Instant, _backend: &mut dyn SaBackend) {
        self.sas.retain(|s| s.state != IkeState::Dead);
    }

    // ----------------------------------------------------------------- status

    /// A snapshot for `xesp status` (times relative to `now`).
    pub fn status(&self, now: Instant, backend: &mut dyn SaBackend) -> ConnStatus {
        let cfg = &self.cfg;
        let ike = self
            .sas
            .iter()
            .rev()
            .find(|s| s.is_usable())
            .or_else(|| self.sas.last())
            .map(|sa| {
                let suite = sa.suite;
                IkeStatus {
                    spi_i: format!("{:016x}", sa.spi_i),
                    spi_r: format!("{:016x}", sa.spi_r),
                    role: if sa.role == Role::Initiator {
                        "initiator"
                    } else {
                        "responder"
                    }
                    .into(),
                    state: format!("{:?}", sa.state).to_uppercase(),
                    local: SocketAddr::new(cfg.local, sa.local_port()).to_string(),
                    remote: sa.remote.to_string(),
                    nat_t: sa.natt,
                    encryption: suite.map(|s| s.encr.to_string()),
                    key_size: suite
                        .and_then(|s| s.encr.key_length_attr())
                        .or(suite.map(|s| (s.encr.key_len() * 8) as u16)),
                    prf: suite.map(|s| s.prf.to_string()),
                    integrity: suite.and_then(|s| s.integ).map(|i| i.to_string()),
                    dh_group: suite.map(|s| s.dh.to_string()),
                    auth: "pre-shared key".into(),
                    lifetime_secs: cfg.lifetimes.ike.as_secs(),
                    active_secs: sa
                        .established_at
                        .map(|t| now.saturating_duration_since(t).as_secs()),
                    rekey_in_secs: sa
                        .rekey_at
                        .map(|t| t.saturating_duration_since(now).as_secs()),
                }
            });
        let children = self
            .sas
            .iter()
            .flat_map(|s| s.children.iter())
            .map(|c| {
                let inb = backend
                    .counters(c.spi_in, Direction::Inbound)
                    .unwrap_or_default();
                let outb = backend
                    .counters(c.spi_out, Direction::Outbound)
                    .unwrap_or_default();
                ChildStatus {
                    spi_in: format!("{:08x}", c.spi_in),
                    spi_out: format!("{:08x}", c.spi_out),
                    state: if c.state == ChildState::Installed {
                        "INSTALLED"
                    } else {
                        "REKEYED"
                    }
                    .into(),
                    routed: c.routed,
                    suite: c.suite.to_string(),
                    local_ts: c.local_ts.iter().map(ToString::to_string).collect(),
                    remote_ts: c.remote_ts.iter().map(ToString::to_string).collect(),
                    packets_in: inb.packets,
                    bytes_in: inb.bytes,
                    packets_out: outb.packets,
                    bytes_out: outb.bytes,
                    drops_in: inb.drops.total(),
                    drops_out: outb.drops.total(),
                    age_secs: now.saturating_duration_since(c.created).as_secs(),
                    rekey_in_secs: c.rekey_at.saturating_duration_since(now).as_secs(),
                    lifetime_secs: cfg.lifetimes.child.as_secs(),
                }
            })
            .collect();
        ConnStatus {
            name: cfg.name.clone(),
            tunnel: cfg.tunnel,
            peer: cfg.remote.to_string(),
            up: self.tunnel_up,
            established_secs_ago: self
                .last_established
                .map(|t| now.saturating_duration_since(t).as_secs()),
            ike,
            children,
            stats: self.stats,
        }
    }
}

// -------------------------------------------------------------------- helpers

fn notify(kind: NotifyType) -> Payload {
    Payload::new(Body::Notify(Notify::new(kind, vec![])))
}

fn nonce_of(p: &[Payload]) -> Option<Vec<u8>> {
    p.iter().find_map(|p| match &p.body {
        Body::Nonce(n) => Some(n.clone()),
        _ => None,
    })
}

fn ke_of(p: &[Payload]) -> Option<(u16, Vec<u8>)> {
    p.iter().find_map(|p| match &p.body {
        Body::Ke { group, data, .. } => Some((*group, data.clone())),
        _ => None,
    })
}

fn selectors(p: &[Payload]) -> (Vec<TsRange>, Vec<TsRange>) {
    let mut tsi = Vec::new();
    let mut tsr = Vec::new();
    for p in p {
        match &p.body {
            Body::TsI { selectors, .. } => {
                tsi.extend(selectors.iter().filter_map(TsRange::from_wire))
            }
            Body::TsR { selectors, .. } => {
                tsr.extend(selectors.iter().filter_map(TsRange::from_wire))
            }
            _ => {}
        }
    }
    (tsi, tsr)
}

fn ts_payload(initiator_side: bool, ts: &[TsRange]) -> Payload {
    let selectors = ts.iter().map(TsRange::to_wire).collect();
    Payload::new(if initiator_side {
        Body::TsI {
            reserved: [0; 3],
            selectors,
        }
    } else {
        Body::TsR {
            reserved: [0; 3],
            selectors,
        }
    })
}

fn identification(id: &Identity) -> Identification {
    match id {
        Identity::Ipv4(a) => Identification {
            id_type: IdType::ID_IPV4_ADDR,
            reserved: [0; 3],
            data: a.octets().to_vec(),
        },
        Identity::Fqdn(n) => Identification {
            id_type: IdType::ID_FQDN,
            reserved: [0; 3],
            data: n.as_bytes().to_vec(),
        },
    }
}

fn id_text(id: &Identification) -> String {
    match (id.id_type, id.data.as_slice()) {
        (IdType::ID_IPV4_ADDR, [a, b, c, d]) => format!("{a}.{b}.{c}.{d}"),
        (_, d) => String::from_utf8_lossy(d).into_owned(),
    }
}

fn join(ts: &[TsRange]) -> String {
    ts.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// NAT_DETECTION_SOURCE_IP and _DESTINATION_IP for a message we send (§2.23).
/// With `force_encap` the source hash is of 0.0.0.0:0, which matches no
/// address: the peer believes we are behind a NAT and both sides float to
/// UDP encapsulation (strongSwan's `encap = yes` does the same).
fn nat_detection(
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
    force_encap: bool,
) -> Vec<Payload> {
    let source = if force_encap {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        local
    };
    vec![
        Payload::new(Body::Notify(Notify::new(
            NotifyType::NAT_DETECTION_SOURCE_IP,
            crypto::nat_detection_hash(spi_i, spi_r, source.ip(), source.port()).to_vec(),
        ))),
        Payload::new(Body::Notify(Notify::new(
            NotifyType::NAT_DETECTION_DESTINATION_IP,
            crypto::nat_detection_hash(spi_i, spi_r, remote.ip(), remote.port()).to_vec(),
        ))),
    ]
}

/// (the sender is behind a NAT, we are behind a NAT), from a received
/// message's NAT-D notifies; no notifies means no NAT-T support: no NAT.
fn check_nat(
    msg: &Message,
    spi_i: u64,
    spi_r: u64,
    from: SocketAddr,
    to: SocketAddr,
) -> (bool, bool) {
    let src: Vec<&Notify> = msg
        .notifies()
        .filter(|n| n.kind == NotifyType::NAT_DETECTION_SOURCE_IP)
        .collect();
    let dst = msg
        .notifies()
        .find(|n| n.kind == NotifyType::NAT_DETECTION_DESTINATION_IP);
    if src.is_empty() {
        return (false, false);
    }
    let want_src = crypto::nat_detection_hash(spi_i, spi_r, from.ip(), from.port());
    let want_dst = crypto::nat_detection_hash(spi_i, spi_r, to.ip(), to.port());
    let peer_nat = !src.iter().any(|n| n.data == want_src);
    let our_nat = dst.is_some_and(|n| n.data != want_dst);
    (peer_nat, our_nat)
}

/// A stateless cookie (§2.6): a hash of a local secret, Ni, the initiator's
/// address and its SPI.
fn cookie(secret: &[u8; 32], ni: &[u8], ip: IpAddr, spi_i: u64) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(secret);
    ctx.update(ni);
    match ip {
        IpAddr::V4(a) => ctx.update(&a.octets()),
        IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&spi_i.to_be_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
