//! IKE_SA_INIT (RFC 7296 §1.2), both roles: proposals, Diffie-Hellman,
//! nonces, NAT detection (§2.23), the initiator's COOKIE and
//! INVALID_KE_PAYLOAD retries (§2.6, §1.3), and the responder's defence
//! against floods of half-open IKE_SAs: above a threshold it answers only
//! with a stateless COOKIE, computing no key exchange and keeping nothing;
//! at a hard limit it drops.

use subtle::ConstantTimeEq;

use super::*;

/// A cookie secret is replaced this often; the one before still verifies.
const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);

/// Stateless cookies (§2.6): `version | SHA-256(secret | Ni | IPi | SPIi)`.
/// The first secret is drawn when the first cookie is needed: a tunnel
/// that never meets a flood (and an initiator never) draws none.
pub(super) struct Cookies {
    secret: Option<[u8; 32]>,
    previous: Option<[u8; 32]>,
    version: u8,
    born: Instant,
}

impl Cookies {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            secret: None,
            previous: None,
            version: 0,
            born: now,
        }
    }

    /// Draws the first secret, or rotates the secret once it is old.
    fn refresh(&mut self, rng: &dyn Random, now: Instant) {
        let old = now.saturating_duration_since(self.born) >= COOKIE_SECRET_LIFETIME;
        if self.secret.is_some() && !old {
            return;
        }
        let mut next = [0u8; 32];
        let _ = rng.fill(&mut next);
        if let Some(current) = self.secret.replace(next) {
            self.previous = Some(current);
            self.version = self.version.wrapping_add(1);
        }
        self.born = now;
    }

    /// A cookie of the current secret ([`Cookies::refresh`] draws it first).
    fn make(&self, ni: &[u8], ip: IpAddr, spi_i: u64) -> Vec<u8> {
        cookie(
            self.version,
            &self.secret.unwrap_or_default(),
            ni,
            ip,
            spi_i,
        )
    }

    /// Whether `got` is a cookie of the current or the previous secret,
    /// compared in constant time.
    fn verify(&self, got: &[u8], ni: &[u8], ip: IpAddr, spi_i: u64) -> bool {
        let (Some(&version), Some(current)) = (got.first(), &self.secret) else {
            return false;
        };
        let secret = if version == self.version {
            current
        } else if version == self.version.wrapping_sub(1)
            && let Some(p) = &self.previous
        {
            p
        } else {
            return false;
        };
        bool::from(cookie(version, secret, ni, ip, spi_i).ct_eq(got))
    }
}

impl Connection {
    // -------------------------------------------------------------- initiating

    /// Starts IKE_SA_INIT as initiator.
    pub(super) fn initiate(&mut self, now: Instant) {
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
            self.out.log_in(
                "IKE_SA_INIT",
                Level::Error,
                &self.cfg,
                "no usable IKE proposal (legacy algorithms are not allowed)",
            );
            return;
        };
        match DhPrivate::generate(group, &*self.rng) {
            Ok(k) => sa.dh = Some(k),
            Err(e) => {
                self.out.log_in(
                    "IKE_SA_INIT",
                    Level::Error,
                    &self.cfg,
                    format!("key exchange: {e}"),
                );
                return;
            }
        }
        sa.ni = self.nonce();
        self.out.log_in(
            "IKE_SA_INIT",
            Level::Info,
            &self.cfg,
            format!("initiating IKE_SA with {}", self.cfg.remote),
        );
        let i = self.sas.insert(sa);
        self.send_init(i, now);
    }

    fn send_init(&mut self, i: SaId, now: Instant) {
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
        self.send_request(i, now, 0, Task::IkeInit, bytes);
    }

    /// The peer's IKE_SA_INIT: answered with a COOKIE, a refusal, or our
    /// half of the key exchange and a new half-open IKE_SA.
    pub(super) fn init_request(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        data: &[u8],
        msg: &Message,
    ) -> Verdict {
        let cfg = self.cfg.clone();
        if remote.ip() != cfg.remote {
            return Err(Reject::NotThePeer(remote.ip()));
        }
        let h = msg.header;
        if h.spi_r != 0 || h.message_id != 0 || !h.is_initiator() {
            return Err(Reject::MalformedHeader("IKE_SA_INIT request"));
        }
        // A retransmission of a request we answered.
        if let Some(sa) = self.sas.half_open(h.spi_i)
            && sa.state == IkeState::InitDone
        {
            if sa.init_i != data {
                return Err(Reject::NotARetransmission);
            }
            let t = Transmit {
                local_port,
                remote,
                data: sa.init_r.clone(),
            };
            self.out.transmits.push_back(t);
            return Ok(());
        }
        let ni = nonce_of(&msg.payloads).ok_or(Reject::MissingPayload {
            exchange: ExchangeType::IKE_SA_INIT,
            payload: "Ni",
        })?;
        if !(16..=256).contains(&ni.len()) {
            return Err(Reject::NonceLength(ni.len()));
        }
        let half_open = self.sas.half_open_count();
        if half_open >= cfg.half_open_limit {
            self.stats.half_open_drops += 1;
            return Err(Reject::HalfOpenLimit(cfg.half_open_limit));
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
        // Stateless cookie (§2.6): above the threshold, the initiator proves
        // its address before any key exchange or state.
        if cfg.require_cookie || half_open >= cfg.cookie_threshold {
            self.cookies.refresh(&*self.rng, now);
            let echoed = msg
                .notifies()
                .find(|n| n.kind == NotifyType::COOKIE)
                .is_some_and(|n| self.cookies.verify(&n.data, &ni, remote.ip(), h.spi_i));
            if !echoed {
                let c = self.cookies.make(&ni, remote.ip(), h.spi_i);
                self.stats.cookies_sent += 1;
                self.out.transmits.push_back(notify(NotifyType::COOKIE, c));
                return Ok(());
            }
        }
        let Some(props) = sa_of(&msg.payloads) else {
            return Err(Reject::MissingPayload {
                exchange: ExchangeType::IKE_SA_INIT,
                payload: "SA",
            });
        };
        let Some((suite, answer)) =
            proposal::choose_ike(&cfg.ike_proposals, props, cfg.allow_legacy, None)
        else {
            self.out.log_in(
                "IKE_SA_INIT",
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
            return Err(Reject::MissingPayload {
                exchange: ExchangeType::IKE_SA_INIT,
                payload: "KE",
            });
        };
        if group != suite.dh.id() {
            self.out.transmits.push_back(notify(
                NotifyType::INVALID_KE_PAYLOAD,
                suite.dh.id().to_be_bytes().to_vec(),
            ));
            return Ok(());
        }
        let dh = DhPrivate::generate(suite.dh, &*self.rng)?;
        self.stats.responder_key_exchanges += 1;
        let public = dh.public().to_vec();
        let shared = match dh.agree(&kei) {
            Ok(s) => s,
            Err(e) => {
                self.out
                    .transmits
                    .push_back(notify(NotifyType::INVALID_SYNTAX, vec![]));
                return Err(e.into());
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
            self.out.log_in(
                "IKE_SA_INIT",
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
        sa.set_keys(suite, &shared, None)?;
        sa.peer_mid = 1;
        self.out.transmits.push_back(Transmit {
            local_port,
            remote,
            data: bytes,
        });
        self.sas.insert(sa);
        Ok(())
    }

    /// Our IKE_SA_INIT answered: a retry (COOKIE, INVALID_KE_PAYLOAD), a
    /// refusal, or the keys, and IKE_AUTH goes out.
    pub(super) fn init_response(
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
        let Some(i) = self.sas.find(|s| {
            s.role == Role::Initiator && s.spi_i == h.spi_i && s.state == IkeState::InitSent
        }) else {
            return Err(Reject::NoInitOutstanding);
        };
        if h.message_id != 0 || h.is_initiator() {
            return Err(Reject::MalformedHeader("IKE_SA_INIT response"));
        }
        // Error answers first: COOKIE and INVALID_KE_PAYLOAD ask for a retry (§2.6, §1.2).
        for n in msg.notifies() {
            match n.kind {
                NotifyType::COOKIE if h.spi_r == 0 => {
                    if self.sas[i].cookie.is_some()
                        && self.sas[i].cookie.as_deref() == Some(&n.data[..])
                    {
                        return Err(Reject::SameCookie);
                    }
                    self.out.log_in(
                        "IKE_SA_INIT",
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
                        self.kill(i, backend, "the responder wants a DH group we do not offer");
                        return Ok(());
                    };
                    if self.sas[i].dh.as_ref().is_some_and(|d| d.group() == g) {
                        return Err(Reject::SameKeGroup);
                    }
                    self.out.log_in(
                        "IKE_SA_INIT",
                        Level::Info,
                        &cfg,
                        format!("the responder wants {g}; retrying IKE_SA_INIT"),
                    );
                    self.sas[i].dh = Some(DhPrivate::generate(g, &*self.rng)?);
                    self.send_init(i, now);
                    return Ok(());
                }
                NotifyType::NO_PROPOSAL_CHOSEN => {
                    self.kill(
                        i,
                        backend,
                        "the responder chose none of our IKE proposals (NO_PROPOSAL_CHOSEN)",
                    );
                    return Ok(());
                }
                k if k.is_error() && h.spi_r == 0 => {
                    self.kill(i, backend, &format!("IKE_SA_INIT refused: {k}"));
                    return Ok(());
                }
                _ => {}
            }
        }
        if h.spi_r == 0 {
            return Err(Reject::MalformedHeader("IKE_SA_INIT response (no SPIr)"));
        }
        let Some(props) = sa_of(&msg.payloads) else {
            return Err(Reject::MissingPayload {
                exchange: ExchangeType::IKE_SA_INIT,
                payload: "SA",
            });
        };
        let Some(suite) = proposal::accepted_ike(&cfg.ike_proposals, props, cfg.allow_legacy)
        else {
            self.kill(
                i,
                backend,
                "the responder chose a proposal we did not offer",
            );
            return Ok(());
        };
        let Some((group, ker)) = ke_of(&msg.payloads) else {
            return Err(Reject::MissingPayload {
                exchange: ExchangeType::IKE_SA_INIT,
                payload: "KE",
            });
        };
        let nr = nonce_of(&msg.payloads).ok_or(Reject::MissingPayload {
            exchange: ExchangeType::IKE_SA_INIT,
            payload: "Nr",
        })?;
        if !(16..=256).contains(&nr.len()) {
            return Err(Reject::NonceLength(nr.len()));
        }
        let sa = &mut self.sas[i];
        if sa
            .dh
            .as_ref()
            .is_none_or(|dh| dh.group().id() != group || suite.dh != dh.group())
        {
            return Err(Reject::KeGroupMismatch);
        }
        let Some(dh) = sa.dh.take() else {
            return Err(Reject::KeGroupMismatch);
        };
        let shared = dh.agree(&ker)?;
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
            self.out.log_in(
                "IKE_SA_INIT",
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
        sa.set_keys(suite, &shared, None)?;
        if suite.is_legacy() {
            self.out.log_in(
                "IKE_SA_INIT",
                Level::Warn,
                &cfg,
                format!("IKE_SA uses legacy algorithms ({suite}) because allow_legacy is set"),
            );
        }
        let sa = &mut self.sas[i];
        sa.outstanding = None;
        sa.timers.stop(Timer::Retransmit);
        sa.state = IkeState::AuthSent;
        self.send_auth(i, now, backend);
        Ok(())
    }
}

/// A stateless cookie (§2.6): the secret's version, then a hash of the
/// secret, Ni, the initiator's address and its SPI.
fn cookie(version: u8, secret: &[u8; 32], ni: &[u8], ip: IpAddr, spi_i: u64) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(secret);
    ctx.update(ni);
    match ip {
        IpAddr::V4(a) => ctx.update(&a.octets()),
        IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&spi_i.to_be_bytes());
    let mut out = vec![version];
    out.extend_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::random::SeededRandom;

    #[test]
    fn a_cookie_verifies_only_for_its_initiator_and_two_secrets() {
        let rng = SeededRandom::new(5);
        let t0 = Instant::now();
        let mut c = Cookies::new(t0);
        let (ni, ip, spi) = ([7u8; 32], IpAddr::V4(Ipv4Addr::new(203, 0, 113, 11)), 42);
        // No secret drawn yet: nothing verifies.
        let blind = cookie(0, &[0; 32], &ni, ip, spi);
        assert!(!c.verify(&blind, &ni, ip, spi), "no secret yet");
        c.refresh(&rng, t0);
        let cookie = c.make(&ni, ip, spi);
        assert_ne!(cookie, blind, "a drawn secret");
        assert!(c.verify(&cookie, &ni, ip, spi));
        let other = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 12));
        assert!(!c.verify(&cookie, &ni, other, spi), "another address");
        assert!(!c.verify(&cookie, &ni, ip, spi + 1), "another SPI");
        assert!(!c.verify(&cookie, &[8u8; 32], ip, spi), "another nonce");
        let mut tampered = cookie.clone();
        tampered[9] ^= 1;
        assert!(!c.verify(&tampered, &ni, ip, spi));
        assert!(!c.verify(&cookie[..20], &ni, ip, spi), "truncated");
        assert!(!c.verify(&[], &ni, ip, spi));
        // Not old enough to rotate: the same secret.
        c.refresh(&rng, t0 + COOKIE_SECRET_LIFETIME / 2);
        assert_eq!(c.make(&ni, ip, spi), cookie);
        // One rotation: still accepted, new cookies differ.
        c.refresh(&rng, t0 + COOKIE_SECRET_LIFETIME);
        assert!(c.verify(&cookie, &ni, ip, spi));
        assert_ne!(c.make(&ni, ip, spi), cookie);
        // Two: refused.
        c.refresh(&rng, t0 + 2 * COOKIE_SECRET_LIFETIME);
        assert!(!c.verify(&cookie, &ni, ip, spi));
    }
}
