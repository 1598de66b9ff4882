//! IKE_AUTH (RFC 7296 §1.2, §2.15): authentication with a pre-shared key
//! and the first CHILD_SA, both roles.

use super::*;

impl Connection {
    fn id_payload(&self) -> Identification {
        identification(&self.cfg.local_id)
    }

    pub(super) fn send_auth(&mut self, i: SaId, now: Instant, backend: &mut dyn SaBackend) {
        let cfg = self.cfg.clone();
        let draft = match self.new_child_draft(backend, None, false) {
            Ok(d) => d,
            Err(e) => {
                self.kill(i, backend, &format!("allocating an SPI: {e}"));
                return;
            }
        };
        let id = self.id_payload();
        let initial_contact = self.sas.find(|s| s.is_usable()).is_none();
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
                method: crate::codec::AuthMethod::SHARED_KEY_MIC,
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
        self.send_request(i, now, 1, Task::IkeAuth(draft), bytes);
    }

    pub(super) fn auth_request(
        &mut self,
        i: SaId,
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
            self.sas[i].die();
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
        if method != crate::codec::AuthMethod::SHARED_KEY_MIC
            || !crypto::psk_auth_ok(&want, &auth)
            || identification(&expected_id) != idi
        {
            self.stats.auth_failures += 1;
            self.out.log_in("IKE_AUTH", Level::Error, &cfg, format!("IKE_AUTH: authentication of peer {:?} failed (wrong pre-shared key or identity)", id_text(&idi)));
            self.sas[i].die();
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
                method: crate::codec::AuthMethod::SHARED_KEY_MIC,
                reserved: [0; 3],
                data: my_auth,
            }),
        ];
        self.established(i, now, initial_contact, backend);
        let (ni, nr) = (self.sas[i].ni.clone(), self.sas[i].nr.clone());
        let mode = create_child_sa::Mode {
            in_ike_auth: true,
            decline_pfs: false,
        };
        resp.extend(self.respond_child(i, now, inner, None, (ni, nr), None, mode, backend));
        resp
    }

    pub(super) fn established(
        &mut self,
        i: SaId,
        now: Instant,
        initial_contact: bool,
        backend: &mut dyn SaBackend,
    ) {
        let cfg = self.cfg.clone();
        if initial_contact {
            // The peer lost its state (§2.4): our other IKE_SAs with it are stale.
            let stale: Vec<SaId> = self
                .sas
                .ids()
                .into_iter()
                .filter(|j| *j != i && self.sas[*j].state != IkeState::Dead)
                .collect();
            for j in stale {
                self.kill_quietly(j, backend);
            }
        }
        let delay = self.rekey_delay(cfg.lifetimes.ike);
        let sa = &mut self.sas[i];
        sa.state = IkeState::Established;
        sa.established_at = Some(now);
        sa.timers.stop(Timer::Negotiation);
        sa.timers.set(Timer::IkeRekey, now + delay);
        sa.timers.set(Timer::Dpd, now + cfg.dpd.interval);
        if sa.behind_nat {
            sa.timers.set(Timer::Keepalive, now + cfg.natt_keepalive);
        }
        self.stats.ike_sas_established += 1;
        self.last_established = Some(now);
        self.initiate_backoff = Duration::from_secs(1);
        let suite = sa.suite.map(|s| s.to_string()).unwrap_or_default();
        let (spi_i, spi_r) = (sa.spi_i, sa.spi_r);
        self.out.log_in(
            "IKE_AUTH",
            Level::Info,
            &cfg,
            format!("IKE_SA {spi_i:016x}/{spi_r:016x} established ({suite})"),
        );
    }

    pub(super) fn auth_response(
        &mut self,
        i: SaId,
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
            self.kill(i, backend, "the peer refused our authentication (AUTHENTICATION_FAILED: check the pre-shared key and identities)");
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
            self.kill(i, backend, "IKE_AUTH response without identity or AUTH");
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
                backend,
                &format!("authentication of the responder {:?} failed", id_text(&idr)),
            );
            return;
        }
        self.established(i, now, false, backend);
        if let Some(e) = error {
            self.out.log_in(
                "IKE_AUTH",
                Level::Warn,
                &cfg,
                format!("IKE_SA up, but the first CHILD_SA was refused: {}", e.kind),
            );
            let _ = backend.delete(draft.spi_in, Direction::Inbound);
            return;
        }
        self.child_response(i, now, draft, inner, backend);
    }
}
