//! CREATE_CHILD_SA for new and rekeyed CHILD_SAs (RFC 7296 §1.3.1, §2.8),
//! both roles, with the optional PFS key exchange and rekey collisions
//! (§2.8.1); the first CHILD_SA of IKE_AUTH reuses the responder side and the
//! response processing. Also the CHILD_SA's life: its lifetimes (soft: rekey;
//! hard: gone), installing it into the datapath and removing it.

use super::*;
use crate::{backend::BackendError, crypto::CryptoError};

/// Why a CHILD_SA of ours could not be started.
#[derive(Debug, thiserror::Error)]
pub(super) enum DraftError {
    #[error("allocating an SPI: {0}")]
    Spi(#[from] BackendError),
    #[error("PFS key exchange: {0}")]
    Dh(#[from] CryptoError),
}

/// How the responder side of a CHILD_SA is run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mode {
    /// In IKE_AUTH: the nonces were IKE_SA_INIT's, none is sent (§1.2).
    pub(super) in_ike_auth: bool,
    /// The request's KE is ignored and a proposal without D-H chosen.
    pub(super) decline_pfs: bool,
}

/// How long a CHILD_SA replaced by the peer's rekey waits for the peer's
/// DELETE before it goes on its own.
const REKEYED_CHILD_LINGER: Duration = Duration::from_secs(60);

impl Connection {
    pub(super) fn new_child_draft(
        &self,
        backend: &mut dyn SaBackend,
        rekey_of: Option<u32>,
        pfs: bool,
    ) -> Result<ChildDraft, DraftError> {
        let spi_in = backend.allocate_spi()?;
        let dh = if pfs {
            match self
                .cfg
                .esp_proposals
                .iter()
                .flat_map(|p| p.dh.iter())
                .find(|g| self.cfg.allow_legacy || !g.is_legacy())
            {
                Some(g) => Some(DhPrivate::generate(*g, &*self.rng)?),
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

    pub(super) fn queue_child_rekey(&mut self, i: SaId, spi_in: u32, backend: &mut dyn SaBackend) {
        match self.new_child_draft(backend, Some(spi_in), true) {
            Ok(d) => self.sas[i].tasks.push_back(Task::CreateChild(d)),
            Err(e) => self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Error,
                &self.cfg,
                format!("CHILD_SA rekey: {e}"),
            ),
        }
    }

    /// Asks for a CHILD_SA rekey now (for tests and operators).
    pub fn rekey_child(&mut self, now: Instant, backend: &mut dyn SaBackend) {
        if let Some(i) = self.active()
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

    /// Responder side of a CHILD_SA (IKE_AUTH or CREATE_CHILD_SA): choose,
    /// install both directions (inbound first), answer.
    /// `nonces` are the exchange's (Ni, Nr); the response carries Nr unless
    /// this is IKE_AUTH, whose nonces were in IKE_SA_INIT (§1.2).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn respond_child(
        &mut self,
        i: SaId,
        now: Instant,
        inner: &[Payload],
        rekey_of: Option<u32>,
        nonces: (Vec<u8>, Vec<u8>),
        ke: Option<(DhGroup, Vec<u8>, Vec<u8>)>,
        mode: Mode,
        backend: &mut dyn SaBackend,
    ) -> Vec<Payload> {
        let cfg = self.cfg.clone();
        let Some(mut props) = sa_of(inner).map(<[_]>::to_vec) else {
            return vec![notify(NotifyType::INVALID_SYNTAX)];
        };
        if mode.decline_pfs {
            props = proposal::without_pfs(&props);
        }
        let Ok((tsi, tsr)) = selectors(inner) else {
            self.stats.selector_overflows += 1;
            return vec![notify(NotifyType::TS_UNACCEPTABLE)];
        };
        let spi_in = match backend.allocate_spi() {
            Ok(s) => s,
            Err(e) => {
                self.out.log_in(
                    "CREATE_CHILD_SA",
                    Level::Error,
                    &cfg,
                    format!("allocating an SPI: {e}"),
                );
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
            self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Warn,
                &cfg,
                "CHILD_SA: no ESP proposal chosen",
            );
            return vec![notify(NotifyType::NO_PROPOSAL_CHOSEN)];
        };
        // Their TSi is our remote, their TSr our local.
        let remote_ts = ts::narrow(&cfg.remote_ts, &tsi);
        let local_ts = ts::narrow(&cfg.local_ts, &tsr);
        if remote_ts.is_empty()
            || local_ts.is_empty()
            || remote_ts.len().max(local_ts.len()) > ts::MAX_SELECTORS
        {
            self.out.log_in(
                "CREATE_CHILD_SA",
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
            routed: false,
            nonces,
        };
        // As responder to a rekey, keep sending on the old SA until the
        // initiator deletes it (it may not have its new inbound SA yet).
        let route_now = rekey_of.is_none();
        if let Err(e) = self.install_child(i, &child, &keys, route_now, backend) {
            self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Error,
                &cfg,
                format!("installing CHILD_SA: {e}"),
            );
            return vec![notify(NotifyType::TEMPORARY_FAILURE)];
        }
        let mut child = child;
        child.routed = route_now;
        self.note_child(&child, rekey_of);
        if let Some(old) = rekey_of {
            let sa = &mut self.sas[i];
            if let Some(c) = sa.child_mut(old) {
                c.state = ChildState::Rekeyed;
                // Should the initiator never delete it, it goes on its own.
                let linger = now + REKEYED_CHILD_LINGER;
                let at = sa
                    .timers
                    .get(Timer::ChildExpire(old))
                    .map_or(linger, |t| t.min(linger));
                sa.timers.set(Timer::ChildExpire(old), at);
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
        self.add_child(i, now, child);
        let mut resp = vec![Payload::new(Body::Sa(vec![answer]))];
        if !mode.in_ike_auth {
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

    pub(super) fn create_child_request(
        &mut self,
        i: SaId,
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
        let mut decline_pfs = false;
        let ke = match ke_of(inner) {
            Some((g, kei)) => {
                match DhGroup::from_ike(g)
                    .filter(|g| cfg.esp_proposals.iter().any(|p| p.dh.contains(g)))
                {
                    Some(group) => {
                        let Ok(dh) = DhPrivate::generate(group, &*self.rng) else {
                            return vec![notify(NotifyType::TEMPORARY_FAILURE)];
                        };
                        let public = dh.public().to_vec();
                        let Ok(shared) = dh.agree(&kei) else {
                            return vec![notify(NotifyType::INVALID_SYNTAX)];
                        };
                        Some((group, shared.to_vec(), public))
                    }
                    None => match cfg.esp_proposals.iter().flat_map(|p| p.dh.iter()).next() {
                        // We do PFS, in another group: ask for ours (§1.3).
                        Some(w) => {
                            return vec![Payload::new(Body::Notify(Notify::new(
                                NotifyType::INVALID_KE_PAYLOAD,
                                w.id().to_be_bytes().to_vec(),
                            )))];
                        }
                        // We do no PFS: choose among the peer's proposals
                        // without a group and ignore its KE (§1.3.1), as
                        // strongSwan's re-creation of an expired CHILD_SA needs.
                        None => {
                            decline_pfs = true;
                            None
                        }
                    },
                }
            }
            None => None,
        };
        let mode = Mode {
            in_ike_auth: false,
            decline_pfs,
        };
        self.respond_child(i, now, inner, rekey_of, (ni, nr), ke, mode, backend)
    }

    pub(super) fn child_response(
        &mut self,
        i: SaId,
        now: Instant,
        draft: ChildDraft,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        let props = sa_of(inner);
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
                    self.out.log_in(
                        "CREATE_CHILD_SA",
                        Level::Warn,
                        &cfg,
                        "CREATE_CHILD_SA response without nonce",
                    );
                    let _ = backend.delete(draft.spi_in, Direction::Inbound);
                    return;
                }
            }
        };
        let ke_group = draft.dh.as_ref().map(DhPrivate::group);
        // With PFS offered, the responder may still choose one of our
        // proposals without a group, and send no KE (§1.3.1).
        let without_pfs: Vec<_> = cfg
            .esp_proposals
            .iter()
            .filter(|p| p.dh.is_empty())
            .cloned()
            .collect();
        let accepted = props.and_then(|p| {
            proposal::accepted_esp(&cfg.esp_proposals, p, cfg.allow_legacy, ke_group).or_else(
                || {
                    ke_group?;
                    let p = proposal::without_pfs(p);
                    proposal::accepted_esp(&without_pfs, &p, cfg.allow_legacy, None)
                },
            )
        });
        let Some((suite, spi_out)) = accepted else {
            self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Warn,
                &cfg,
                "CHILD_SA: the responder chose an ESP proposal we did not offer",
            );
            let _ = backend.delete(draft.spi_in, Direction::Inbound);
            return;
        };
        let shared = match (draft.dh, suite.dh, ke_of(inner)) {
            (Some(dh), Some(_), Some((_, ker))) => match dh.agree(&ker) {
                Ok(s) => Some(s),
                Err(e) => {
                    self.out.log_in(
                        "CREATE_CHILD_SA",
                        Level::Warn,
                        &cfg,
                        format!("CHILD_SA PFS: {e}"),
                    );
                    let _ = backend.delete(draft.spi_in, Direction::Inbound);
                    return;
                }
            },
            (_, Some(_), _) => {
                self.out.log_in(
                    "CREATE_CHILD_SA",
                    Level::Warn,
                    &cfg,
                    "CHILD_SA: a PFS proposal chosen but no KE sent",
                );
                let _ = backend.delete(draft.spi_in, Direction::Inbound);
                return;
            }
            _ => None,
        };
        let Ok((tsi, tsr)) = selectors(inner) else {
            self.stats.selector_overflows += 1;
            let _ = backend.delete(draft.spi_in, Direction::Inbound);
            return;
        };
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
        if local_ts.is_empty()
            || remote_ts.is_empty()
            || local_ts.len().max(remote_ts.len()) > ts::MAX_SELECTORS
        {
            let _ = backend.delete(draft.spi_in, Direction::Inbound);
            self.out.log_in(
                "CREATE_CHILD_SA",
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
            routed: !ours_lose,
            nonces: (ni, nr),
        };
        if let Err(e) = self.install_child(i, &child, &keymat, !ours_lose, backend) {
            self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Error,
                &cfg,
                format!("installing CHILD_SA: {e}"),
            );
            return;
        }
        self.note_child(&child, draft.rekey_of);
        let Some(old) = draft.rekey_of else {
            self.add_child(i, now, child);
            return;
        };
        let new_spi = child.spi_in;
        if ours_lose {
            // Ours is redundant: delete it. The peer's survives; the peer
            // deletes the old SA, and its DELETE moves our traffic over (by
            // then it has the inbound half of its SA).
            self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Info,
                &cfg,
                "CHILD_SA rekey collision: ours has the lowest nonce and goes",
            );
            self.stats.rekey_collisions_lost += 1;
            child.state = ChildState::Deleting;
            self.add_child(i, now, child);
            self.sas[i]
                .tasks
                .push_back(Task::DeleteChildren(vec![new_spi]));
            return;
        }
        if collision.is_some() {
            self.stats.rekey_collisions_won += 1;
            self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Info,
                &cfg,
                "CHILD_SA rekey collision: ours survives; the peer deletes its own",
            );
        }
        self.add_child(i, now, child);
        self.mark_rekeyed(i, old);
        self.sas[i].tasks.push_back(Task::DeleteChildren(vec![old]));
    }

    /// Our CREATE_CHILD_SA request's payloads; `None` if the CHILD_SA it
    /// rekeys is gone meanwhile.
    pub(super) fn create_child_payloads(&self, i: SaId, d: &ChildDraft) -> Option<Vec<Payload>> {
        let cfg = &self.cfg;
        let mut p = Vec::new();
        let (local_ts, remote_ts) = match d.rekey_of {
            Some(old) => {
                let c = self.sas[i].child(old)?;
                let mut n = Notify::new(NotifyType::REKEY_SA, vec![]);
                n.protocol = ProtocolId::ESP;
                n.spi = old.to_be_bytes().to_vec();
                p.push(Payload::new(Body::Notify(n)));
                (&c.local_ts, &c.remote_ts)
            }
            None => (&cfg.local_ts, &cfg.remote_ts),
        };
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
        p.push(ts_payload(true, local_ts));
        p.push(ts_payload(false, remote_ts));
        Some(p)
    }

    /// The peer refused our CREATE_CHILD_SA with an error notify.
    pub(super) fn create_child_refused(
        &mut self,
        i: SaId,
        now: Instant,
        draft: ChildDraft,
        e: &Notify,
        backend: &mut dyn SaBackend,
    ) {
        // INVALID_KE_PAYLOAD names the group the peer wants (§1.3).
        if e.kind == NotifyType::INVALID_KE_PAYLOAD
            && let Some(g) = e
                .data
                .get(..2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .and_then(DhGroup::from_ike)
            && draft.dh.as_ref().is_some_and(|d| d.group() != g)
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
        self.stats.child_sa_refusals += 1;
        self.out.log_in(
            "CREATE_CHILD_SA",
            Level::Warn,
            &self.cfg,
            format!("CREATE_CHILD_SA refused: {}", e.kind),
        );
        let _ = backend.delete(draft.spi_in, Direction::Inbound);
        // A refused rekey is tried again while the CHILD_SA lives (§2.25:
        // TEMPORARY_FAILURE soon, anything else later); its hard lifetime
        // still ends it. A refused new CHILD_SA is the next attempt's.
        if let Some(old) = draft.rekey_of
            && self.sas[i]
                .child(old)
                .is_some_and(|c| c.state == ChildState::Installed)
        {
            let wait = if e.kind == NotifyType::TEMPORARY_FAILURE {
                REKEY_RETRY_SOON
            } else {
                REKEY_RETRY_LATER
            };
            self.sas[i].timers.set(Timer::ChildRekey(old), now + wait);
        }
    }
}
