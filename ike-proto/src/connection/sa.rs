//! The state one IKE_SA keeps, and its CHILD_SAs'.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, Instant},
};

use super::timers::{Timer, TimerTable};
use crate::{
    codec::{ExchangeType, FLAG_INITIATOR, FLAG_RESPONSE, Header, IKE_VERSION, PayloadType},
    crypto::{self, DhPrivate, IkeKeys},
    proposal::{ChildSuite, IkeSuite},
    sk::{SkCipher, SkError},
    ts::TsRange,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Initiator,
    Responder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IkeState {
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
pub(super) enum ChildState {
    Installed,
    /// Replaced by a rekeyed CHILD_SA; deleted when the rekey completes.
    Rekeyed,
    /// We asked the peer to delete it.
    Deleting,
    /// The peer deleted it while it carried the tunnel and no other
    /// CHILD_SA could: its inbound half is gone, its outbound half keeps the
    /// tunnel's route (and carrier) for a moment, in case the peer creates
    /// the next CHILD_SA right after (strongSwan does, at a hard expiry).
    Closing,
}

pub(super) struct ChildSa {
    pub(super) spi_in: u32,
    pub(super) spi_out: u32,
    pub(super) suite: ChildSuite,
    pub(super) local_ts: Vec<TsRange>,
    pub(super) remote_ts: Vec<TsRange>,
    pub(super) state: ChildState,
    pub(super) created: Instant,
    /// Whether the tunnel's outbound traffic uses this SA.
    pub(super) routed: bool,
    /// Nonces of the exchange that created it (§2.8.1 collisions).
    pub(super) nonces: (Vec<u8>, Vec<u8>),
}

/// A CHILD_SA being negotiated by us.
pub(super) struct ChildDraft {
    pub(super) spi_in: u32,
    pub(super) nonce: Vec<u8>,
    pub(super) dh: Option<DhPrivate>,
    pub(super) rekey_of: Option<u32>,
}

/// An IKE_SA rekey being negotiated by us.
pub(super) struct IkeDraft {
    pub(super) spi: u64,
    pub(super) nonce: Vec<u8>,
    pub(super) dh: Option<DhPrivate>,
}

/// A request of ours, queued or in flight.
pub(super) enum Task {
    IkeInit,
    IkeAuth(ChildDraft),
    CreateChild(ChildDraft),
    RekeyIke(IkeDraft),
    DeleteChildren(Vec<u32>),
    DeleteIke,
    Dpd,
}

impl Task {
    pub(super) fn exchange(&self) -> ExchangeType {
        match self {
            Task::IkeInit => ExchangeType::IKE_SA_INIT,
            Task::IkeAuth(_) => ExchangeType::IKE_AUTH,
            Task::CreateChild(_) | Task::RekeyIke(_) => ExchangeType::CREATE_CHILD_SA,
            Task::DeleteChildren(_) | Task::DeleteIke | Task::Dpd => ExchangeType::INFORMATIONAL,
        }
    }
}

/// Our request in flight (its retransmission is [`Timer::Retransmit`]).
pub(super) struct Outstanding {
    pub(super) message_id: u32,
    pub(super) task: Task,
    pub(super) bytes: Vec<u8>,
    pub(super) sent: u32,
    /// DPD probes retransmit at a fixed interval.
    pub(super) interval: Option<Duration>,
}

/// A CHILD_SA created by the peer's request while ours for the same one
/// was outstanding (§2.8.1).
pub(super) struct Collision {
    pub(super) rekey_of: u32,
    pub(super) nonces: (Vec<u8>, Vec<u8>),
}

/// The new IKE_SA a peer's crossing rekey created: its initiator SPI and
/// the exchange's nonces.
pub(super) struct IkeCollision {
    pub(super) spi_i: u64,
    pub(super) nonces: (Vec<u8>, Vec<u8>),
}

pub(super) struct IkeSa {
    pub(super) role: Role,
    pub(super) spi_i: u64,
    pub(super) spi_r: u64,
    pub(super) state: IkeState,
    pub(super) suite: Option<IkeSuite>,
    pub(super) keys: Option<IkeKeys>,
    pub(super) sk_out: Option<Box<SkCipher>>,
    pub(super) sk_in: Option<Box<SkCipher>>,
    pub(super) ni: Vec<u8>,
    pub(super) nr: Vec<u8>,
    pub(super) dh: Option<DhPrivate>,
    /// IKE_SA_INIT messages as sent, signed over by AUTH (§2.15).
    pub(super) init_i: Vec<u8>,
    pub(super) init_r: Vec<u8>,
    pub(super) cookie: Option<Vec<u8>>,
    pub(super) remote: SocketAddr,
    /// NAT-T: floated to 4500, and who is behind a NAT (§2.23).
    pub(super) natt: bool,
    pub(super) behind_nat: bool,
    pub(super) my_mid: u32,
    pub(super) outstanding: Option<Outstanding>,
    pub(super) tasks: VecDeque<Task>,
    pub(super) peer_mid: u32,
    /// The last request answered: its message ID, the request as it came
    /// (a retransmission is byte-identical, §2.1) and our response.
    pub(super) last_response: Option<(u32, Vec<u8>, Vec<u8>)>,
    pub(super) children: Vec<ChildSa>,
    pub(super) collisions: Vec<Collision>,
    pub(super) timers: TimerTable,
    pub(super) established_at: Option<Instant>,
    /// When the peer was last heard from (IKE or ESP).
    pub(super) last_heard: Instant,
    /// ESP counters at the last DPD check: (inbound packets, outbound packets).
    pub(super) seen_traffic: (u64, u64),
    /// Nonces of the IKE rekey that created this SA (for collisions).
    pub(super) rekey_nonces: Option<(Vec<u8>, Vec<u8>)>,
    /// A peer's IKE rekey that crossed ours (§2.8.2).
    pub(super) ike_collision: Option<IkeCollision>,
}

/// How long IKE_SA_INIT and IKE_AUTH may take before the attempt is dropped.
pub(super) const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a rekeyed IKE_SA waits for the DELETE that should end it (the
/// rekey's initiator sends it, §2.8) before it is dropped without one.
pub(super) const REKEYED_LINGER: Duration = Duration::from_secs(120);

impl IkeSa {
    pub(super) fn new(
        role: Role,
        spi_i: u64,
        spi_r: u64,
        remote: SocketAddr,
        now: Instant,
    ) -> Self {
        let mut timers = TimerTable::default();
        timers.set(Timer::Negotiation, now + NEGOTIATION_TIMEOUT);
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
            timers,
            established_at: None,
            last_heard: now,
            seen_traffic: (0, 0),
            rekey_nonces: None,
            ike_collision: None,
        }
    }

    pub(super) fn local_port(&self) -> u16 {
        if self.natt { 4500 } else { 500 }
    }

    pub(super) fn header(&self, exchange: ExchangeType, response: bool, message_id: u32) -> Header {
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

    pub(super) fn is_usable(&self) -> bool {
        self.state == IkeState::Established
    }

    pub(super) fn child(&self, spi_in: u32) -> Option<&ChildSa> {
        self.children.iter().find(|c| c.spi_in == spi_in)
    }

    pub(super) fn child_mut(&mut self, spi_in: u32) -> Option<&mut ChildSa> {
        self.children.iter_mut().find(|c| c.spi_in == spi_in)
    }

    /// Adds a CHILD_SA with its rekey and hard-expiry timers.
    pub(super) fn add_child(&mut self, child: ChildSa, rekey_at: Instant, expire_at: Instant) {
        self.timers.set(Timer::ChildRekey(child.spi_in), rekey_at);
        self.timers.set(Timer::ChildExpire(child.spi_in), expire_at);
        self.children.push(child);
    }

    /// Removes a CHILD_SA and its timers.
    pub(super) fn take_child(&mut self, spi_in: u32) -> Option<ChildSa> {
        let pos = self.children.iter().position(|c| c.spi_in == spi_in)?;
        self.timers.stop(Timer::ChildRekey(spi_in));
        self.timers.stop(Timer::ChildExpire(spi_in));
        Some(self.children.remove(pos))
    }

    /// Moves every CHILD_SA, with its timers, to `to` (an IKE_SA rekey, §2.8).
    pub(super) fn move_children(&mut self, to: &mut IkeSa) {
        for c in std::mem::take(&mut self.children) {
            self.timers.move_child(c.spi_in, &mut to.timers);
            to.children.push(c);
        }
    }

    /// Replaced by a rekeyed IKE_SA (§2.8): from now on it only finishes
    /// its exchange in flight and waits for the DELETE that ends it, ours or
    /// the peer's. Its rekey, DPD and keepalive timers go with its role.
    pub(super) fn retire(&mut self, now: Instant) {
        self.state = IkeState::Rekeyed;
        for t in [Timer::IkeRekey, Timer::Dpd, Timer::Keepalive] {
            self.timers.stop(t);
        }
        self.timers.set(Timer::Linger, now + REKEYED_LINGER);
    }

    /// Derives the IKE_SA's keys (§2.14, or §2.18 with the old SK_d).
    pub(super) fn set_keys(
        &mut self,
        suite: IkeSuite,
        shared: &[u8],
        old_sk_d: Option<&[u8]>,
    ) -> Result<(), SkError> {
        let seed = match old_sk_d {
            Some(d) => crypto::rekey_skeyseed(suite.prf, d, shared, &self.ni, &self.nr),
            None => crypto::skeyseed(suite.prf, &self.ni, &self.nr, shared),
        };
        let keys = crypto::derive_ike_keys(
            suite.prf,
            &seed,
            &self.ni,
            &self.nr,
            self.spi_i,
            self.spi_r,
            suite.suite(),
        );
        let (e_out, a_out, e_in, a_in) = match self.role {
            Role::Initiator => (&keys.sk_ei, &keys.sk_ai, &keys.sk_er, &keys.sk_ar),
            Role::Responder => (&keys.sk_er, &keys.sk_ar, &keys.sk_ei, &keys.sk_ai),
        };
        self.sk_out = Some(Box::new(SkCipher::new(suite.suite(), e_out, a_out)?));
        self.sk_in = Some(Box::new(SkCipher::new(suite.suite(), e_in, a_in)?));
        self.suite = Some(suite);
        self.keys = Some(keys);
        Ok(())
    }

    /// IKE_SA_INIT or IKE_AUTH under way.
    pub(super) fn is_negotiating(&self) -> bool {
        matches!(
            self.state,
            IkeState::InitSent | IkeState::InitDone | IkeState::AuthSent
        )
    }

    /// It negotiates, or it is established and carries the tunnel or is
    /// getting a CHILD_SA for it: the tunnel needs no other attempt.
    pub(super) fn keeps_the_tunnel_going(&self) -> bool {
        self.is_negotiating()
            || (self.is_usable() && (self.carries_tunnel() || self.child_pending()))
    }

    /// One of its CHILD_SAs carries the tunnel's outbound traffic.
    pub(super) fn carries_tunnel(&self) -> bool {
        self.children.iter().any(|c| c.routed)
    }

    /// A new CHILD_SA (not a rekey) is queued or in flight.
    pub(super) fn child_pending(&self) -> bool {
        let new_child = |t: &Task| {
            matches!(t, Task::IkeAuth(_))
                || matches!(t, Task::CreateChild(d) if d.rekey_of.is_none())
        };
        self.tasks.iter().any(new_child)
            || self
                .outstanding
                .as_ref()
                .is_some_and(|o| new_child(&o.task))
    }

    /// A rekey of the CHILD_SA `spi_in` is queued or in flight.
    pub(super) fn rekey_pending(&self, spi_in: u32) -> bool {
        let rekeys = |t: &Task| matches!(t, Task::CreateChild(d) if d.rekey_of == Some(spi_in));
        self.tasks.iter().any(rekeys) || self.outstanding.as_ref().is_some_and(|o| rekeys(&o.task))
    }

    /// Dead: no timer, no request, no state to act on.
    pub(super) fn die(&mut self) {
        self.state = IkeState::Dead;
        self.outstanding = None;
        self.tasks.clear();
        self.timers.clear();
    }

    /// The next time this SA has something to do.
    pub(super) fn next_timer(&self) -> Option<Instant> {
        if self.state == IkeState::Dead {
            return None;
        }
        self.timers.next()
    }
}

/// An IKE_SA's handle, stable for its life (never reused by a connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SaId(u64);

/// A connection's IKE_SAs by handle, oldest first. Handles stay valid
/// through one input: dead SAs leave only in [`SaTable::reap`], which the
/// connection calls when an input is done. Each IKE_SA is boxed: it holds
/// two keyed ciphers (kilobytes), and a map node holds eleven values.
#[derive(Default)]
pub(super) struct SaTable {
    sas: BTreeMap<SaId, Box<IkeSa>>,
    /// Responder IKE_SAs waiting for IKE_AUTH (half-open), by the
    /// initiator's SPI: a flood's state, counted and found without a scan.
    half_open: HashMap<u64, SaId>,
    next: u64,
}

impl SaTable {
    pub(super) fn insert(&mut self, sa: IkeSa) -> SaId {
        let id = SaId(self.next);
        self.next += 1;
        if sa.role == Role::Responder && sa.state == IkeState::InitDone {
            self.half_open.insert(sa.spi_i, id);
        }
        self.sas.insert(id, Box::new(sa));
        id
    }

    /// The half-open IKE_SA that `spi_i` started.
    pub(super) fn half_open(&self, spi_i: u64) -> Option<&IkeSa> {
        self.half_open
            .get(&spi_i)
            .and_then(|id| self.sas.get(id))
            .map(|sa| &**sa)
    }

    /// How many IKE_SAs are half-open.
    pub(super) fn half_open_count(&self) -> usize {
        self.half_open.len()
    }

    pub(super) fn ids(&self) -> Vec<SaId> {
        self.sas.keys().copied().collect()
    }

    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &IkeSa> {
        self.sas.values().map(|sa| &**sa)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.sas.len()
    }

    /// The oldest SA that `f` accepts.
    pub(super) fn find(&self, f: impl Fn(&IkeSa) -> bool) -> Option<SaId> {
        self.sas.iter().find(|(_, s)| f(s)).map(|(id, _)| *id)
    }

    /// The newest SA that `f` accepts.
    pub(super) fn newest(&self, f: impl Fn(&IkeSa) -> bool) -> Option<SaId> {
        self.sas.iter().rev().find(|(_, s)| f(s)).map(|(id, _)| *id)
    }

    pub(super) fn reap(&mut self) {
        self.sas.retain(|_, s| s.state != IkeState::Dead);
        let sas = &self.sas;
        self.half_open
            .retain(|_, id| sas.get(id).is_some_and(|s| s.state == IkeState::InitDone));
    }
}

impl std::ops::Index<SaId> for SaTable {
    type Output = IkeSa;
    fn index(&self, id: SaId) -> &IkeSa {
        &self.sas[&id]
    }
}

impl std::ops::IndexMut<SaId> for SaTable {
    fn index_mut(&mut self, id: SaId) -> &mut IkeSa {
        // Handles come from this table and outlive no reap (see above).
        self.sas
            .get_mut(&id)
            .expect("an IKE_SA handle outlived its SA")
    }
}
