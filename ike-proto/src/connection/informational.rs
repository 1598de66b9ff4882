//! INFORMATIONAL exchanges (RFC 7296 §1.4): DELETE of CHILD_SAs and of the
//! IKE_SA, both roles, and dead peer detection (§2.4), an empty request.

use super::*;

/// Our INFORMATIONAL request's payloads.
pub(super) fn request_payloads(task: &Task) -> Vec<Payload> {
    match task {
        Task::DeleteChildren(spis) => vec![Payload::new(Body::Delete(Delete {
            protocol: ProtocolId::ESP,
            spi_size: 4,
            spis: spis.iter().map(|s| s.to_be_bytes().to_vec()).collect(),
        }))],
        Task::DeleteIke => vec![Payload::new(Body::Delete(Delete {
            protocol: ProtocolId::IKE,
            spi_size: 0,
            spis: vec![],
        }))],
        _ => vec![],
    }
}

impl Connection {
    /// Dead peer detection (§2.4): probe when the peer has been silent for
    /// the DPD interval (on demand: only if we sent traffic meanwhile).
    pub(super) fn dpd_check(&mut self, i: SaId, now: Instant, backend: &mut dyn SaBackend) {
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
            sa.timers.set(Timer::Dpd, now + dpd.interval);
            self.pump(i, now);
        } else {
            // Next look: when the peer will have been silent for an interval,
            // or one interval from now to sample the traffic counters.
            let quiet_at = sa.last_heard + dpd.interval;
            let at = if quiet_at > now {
                quiet_at
            } else {
                now + dpd.interval
            };
            sa.timers.set(Timer::Dpd, at);
        }
    }

    /// Closes the connection (the daemon stops, or the operator takes the
    /// tunnel down): every IKE_SA with keys sends its DELETE now, even with
    /// an exchange of ours in flight (that exchange is abandoned and the
    /// DELETE takes the next message ID); no further attempt is made and
    /// the peer's IKE_SA_INIT is refused until [`Connection::open`].
    pub fn close(&mut self, now: Instant) {
        if !self.closed {
            self.out.log_in(
                "INFORMATIONAL",
                Level::Info,
                &self.cfg,
                "closed: deleting the IKE_SAs",
            );
        }
        self.closed = true;
        self.next_attempt = None;
        for i in self.sas.ids() {
            let sa = &mut self.sas[i];
            if !matches!(sa.state, IkeState::Established | IkeState::Rekeyed) {
                continue;
            }
            sa.timers.stop(Timer::Retransmit);
            sa.tasks.clear();
            // The peer may not have our request in flight (then it takes a
            // DELETE with that message ID) or may have answered it (then the
            // next one): both go, once; the other is refused harmlessly.
            if let Some(o) = sa.outstanding.take() {
                let header = sa.header(ExchangeType::INFORMATIONAL, false, o.message_id);
                let delete = request_payloads(&Task::DeleteIke);
                if let Some(sk) = &sa.sk_out
                    && let Ok(bytes) = sk.seal(header, &delete, &*self.rng)
                {
                    self.out.transmits.push_back(Transmit {
                        local_port: sa.local_port(),
                        remote: sa.remote,
                        data: bytes,
                    });
                }
            }
            self.sas[i].tasks.push_back(Task::DeleteIke);
            self.pump(i, now);
        }
    }

    /// Opens a closed connection again: a configured initiator starts an
    /// IKE_SA now, a responder accepts the peer's again.
    pub fn open(&mut self, now: Instant) {
        if !self.closed {
            return;
        }
        self.closed = false;
        self.initiate_backoff = Duration::from_secs(1);
        self.next_attempt = self.cfg.initiator.then_some(now);
        self.out.log(Level::Info, &self.cfg, "opened");
    }

    /// Takes new settings (a reload): the IKE_SAs are deleted and, unless
    /// the connection was closed, it is opened again with them. The
    /// tunnel index must be the same.
    pub fn reconfigure(&mut self, cfg: Arc<PeerConfig>, now: Instant) {
        let was_closed = self.closed;
        self.close(now);
        self.cfg = cfg;
        if !was_closed {
            self.open(now);
        }
    }

    /// Closed by [`Connection::close`] and not opened since.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub(super) fn informational_request(
        &mut self,
        i: SaId,
        now: Instant,
        inner: &[Payload],
        backend: &mut dyn SaBackend,
    ) -> Vec<Payload> {
        let mut resp = Vec::new();
        for p in inner {
            let Body::Delete(d) = &p.body else { continue };
            match d.protocol {
                ProtocolId::IKE => {
                    if self.sas[i].state == IkeState::Rekeyed {
                        // The old SA of a rekey: its children already moved.
                        self.sas[i].die();
                    } else {
                        self.kill(i, backend, "the peer deleted the IKE_SA");
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
                        self.peer_deleted_child(i, *spi, now, backend);
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
}
