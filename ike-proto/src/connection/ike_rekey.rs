//! Rekeying the IKE_SA with CREATE_CHILD_SA (RFC 7296 §1.3.2, §2.8, keys
//! §2.18), both roles, with crossing rekeys (§2.8.2): the new IKE_SA takes
//! the CHILD_SAs, the old one is deleted by the rekey's initiator.

use super::*;

/// How long after a refused IKE_SA rekey it is tried again.
const IKE_REKEY_RETRY: Duration = Duration::from_secs(10);

impl Connection {
    pub(super) fn queue_ike_rekey(&mut self, i: SaId) {
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
            Err(e) => self.out.log_in(
                "CREATE_CHILD_SA",
                Level::Error,
                &self.cfg,
                format!("IKE_SA rekey: {e}"),
            ),
        }
    }

    /// Asks for an IKE_SA rekey now.
    pub fn rekey_ike(&mut self, now: Instant) {
        if let Some(i) = self.active() {
            self.queue_ike_rekey(i);
            self.pump(i, now);
        }
    }

    /// Our request's payloads: SA (IKE proposals with the new SPI), Ni, KEi.
    pub(super) fn ike_rekey_payloads(&self, d: &IkeDraft) -> Option<Vec<Payload>> {
        let dh = d.dh.as_ref()?;
        let cfg = &self.cfg;
        Some(vec![
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
        ])
    }

    /// The peer refused our IKE_SA rekey: the IKE_SA goes on, and the
    /// rekey is tried again later.
    pub(super) fn ike_rekey_refused(&mut self, i: SaId, now: Instant, e: &Notify) {
        self.out.log_in(
            "CREATE_CHILD_SA",
            Level::Warn,
            &self.cfg,
            format!("IKE_SA rekey refused: {}", e.kind),
        );
        if self.sas[i].is_usable() {
            self.sas[i]
                .timers
                .set(Timer::IkeRekey, now + IKE_REKEY_RETRY);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn ike_rekey_request(
        &mut self,
        i: SaId,
        now: Instant,
        inner: &[Payload],
        props: &[crate::codec::Proposal],
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
        if new.set_keys(suite, &shared, Some(&old_d)).is_err() {
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
        self.sas[i].move_children(&mut new);
        new.peer_mid = 0;
        new.my_mid = 0;
        self.sas[i].retire(now);
        let j = self.sas.insert(new);
        self.established(j, now, false, backend);
        self.stats.rekeys += 1;
        self.out.log_in(
            "CREATE_CHILD_SA",
            Level::Info,
            &cfg,
            "IKE_SA rekeyed by the peer",
        );
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

    pub(super) fn ike_rekey_response(
        &mut self,
        i: SaId,
        now: Instant,
        draft: IkeDraft,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        let Some(props) = sa_of(inner) else { return };
        let Some(suite) = proposal::accepted_ike(&cfg.ike_proposals, props, cfg.allow_legacy)
        else {
            self.out.log_in(
                "CREATE_CHILD_SA",
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
        if new.set_keys(suite, &shared, Some(&old_d)).is_err() {
            return;
        }
        let ours_min = draft.nonce.clone().min(nr);
        let collision = self.sas[i].ike_collision.take();
        match collision {
            Some(IkeCollision { nonces, .. })
                if nonces.0.clone().min(nonces.1.clone()) > ours_min =>
            {
                // Ours is redundant (§2.8.1): delete it at once, keep theirs.
                self.out.log_in(
                    "CREATE_CHILD_SA",
                    Level::Info,
                    &cfg,
                    "IKE_SA rekey collision: ours loses",
                );
                self.stats.rekey_collisions_lost += 1;
                new.state = IkeState::Established;
                new.timers.stop(Timer::Negotiation);
                new.tasks.push_back(Task::DeleteIke);
                new.my_mid = 0;
                let j = self.sas.insert(new);
                self.pump(j, now);
            }
            _ => {
                // Ours survives: children move to it, the old IKE_SA is deleted.
                self.sas[i].move_children(&mut new);
                self.sas[i].retire(now);
                self.sas[i].tasks.push_back(Task::DeleteIke);
                if let Some(IkeCollision {
                    spi_i: their_spi_i, ..
                }) = collision
                    && let Some(k) = self
                        .sas
                        .find(|s| s.spi_i == their_spi_i && s.role == Role::Responder)
                {
                    // The peer's (losing) new IKE_SA took the children: take them back.
                    self.stats.rekey_collisions_won += 1;
                    self.sas[k].move_children(&mut new);
                    self.sas[k].retire(now);
                }
                let j = self.sas.insert(new);
                self.established(j, now, false, backend);
                self.stats.rekeys += 1;
                self.out
                    .log_in("CREATE_CHILD_SA", Level::Info, &cfg, "IKE_SA rekeyed");
            }
        }
    }
}
