//! From a datagram to its exchange: the IKE_SA by its SPIs, the
//! message-ID window (one request each way, RFC 7296 §2.3), the cache that
//! answers a retransmitted request (§2.1), decryption, and the peer's
//! address followed when its NAT mapping changes (§2.23).

use super::{timers::Timer, *};

impl Connection {
    /// An IKE message arrived on `local_port` from `remote`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        data: &[u8],
        backend: &mut dyn SaBackend,
    ) {
        let verdict = self.dispatch(now, local_port, remote, data, backend);
        self.out.ike_spi = None;
        if let Err(reason) = verdict {
            self.stats.invalid_messages += 1;
            self.out.events.push_back(Event::Rejected {
                from: remote,
                reason,
            });
        }
        self.settle(now);
    }

    pub(super) fn dispatch(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        data: &[u8],
        backend: &mut dyn SaBackend,
    ) -> Verdict {
        let msg = Message::parse(data)?;
        let h = msg.header;
        self.out.ike_spi = Some(IkeSpis {
            initiator: h.spi_i,
            responder: h.spi_r,
        });
        if h.exchange == ExchangeType::IKE_SA_INIT {
            return if h.is_response() {
                self.init_response(now, local_port, remote, data, &msg, backend)
            } else if self.closed {
                Err(Reject::Closed)
            } else {
                self.init_request(now, local_port, remote, data, &msg)
            };
        }
        let i = self
            .sas
            .find(|s| s.spi_i == h.spi_i && s.spi_r == h.spi_r && s.state != IkeState::Dead)
            .ok_or(Reject::UnknownSa {
                exchange: h.exchange,
                spi_i: h.spi_i,
                spi_r: h.spi_r,
            })?;
        // Our own messages have our role's I flag; the peer's the other.
        if h.is_initiator() == (self.sas[i].role == Role::Initiator) {
            return Err(Reject::OwnRole);
        }
        let from = (local_port, remote);
        if h.is_response() {
            self.response(i, now, from, data, &msg, backend)
        } else {
            self.request(i, now, from, data, &msg, backend)
        }
    }

    /// The peer's request on an IKE_SA: the message-ID window (§2.3), the
    /// retransmission cache (§2.1), then the exchange's handler.
    fn request(
        &mut self,
        i: SaId,
        now: Instant,
        (local_port, remote): (u16, SocketAddr),
        data: &[u8],
        msg: &Message,
        backend: &mut dyn SaBackend,
    ) -> Verdict {
        let h = msg.header;
        let sa = &self.sas[i];
        if h.message_id.wrapping_add(1) == sa.peer_mid {
            // A retransmission is the same octets as the request answered;
            // anything else (a forgery, say) gets nothing back.
            return match &sa.last_response {
                Some((mid, request, response)) if *mid == h.message_id && request == data => {
                    let t = Transmit {
                        local_port,
                        remote,
                        data: response.clone(),
                    };
                    self.out.transmits.push_back(t);
                    Ok(())
                }
                _ => Err(Reject::NotARetransmission),
            };
        }
        if h.message_id != sa.peer_mid {
            return Err(Reject::OutOfWindow {
                got: h.message_id,
                want: sa.peer_mid,
            });
        }
        if sa.state == IkeState::InitDone && h.exchange != ExchangeType::IKE_AUTH {
            return Err(Reject::BeforeAuth(h.exchange));
        }
        let inner = self.decrypt(i, data, msg)?;
        self.hear(i, now, local_port, remote, backend);
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
            sa.last_response = Some((h.message_id, data.to_vec(), bytes.clone()));
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

    /// The peer's response to our request in flight.
    fn response(
        &mut self,
        i: SaId,
        now: Instant,
        (local_port, remote): (u16, SocketAddr),
        data: &[u8],
        msg: &Message,
        backend: &mut dyn SaBackend,
    ) -> Verdict {
        let h = msg.header;
        let Some(o) = &self.sas[i].outstanding else {
            return Err(Reject::Unsolicited);
        };
        if o.message_id != h.message_id {
            return Err(Reject::UnexpectedResponse {
                got: h.message_id,
                want: o.message_id,
            });
        }
        let inner = self.decrypt(i, data, msg)?;
        self.hear(i, now, local_port, remote, backend);
        let Some(o) = self.sas[i].outstanding.take() else {
            return Ok(());
        };
        self.sas[i].timers.stop(Timer::Retransmit);
        let error = inner.iter().find_map(|p| match &p.body {
            Body::Notify(n) if n.kind.is_error() => Some(n.clone()),
            _ => None,
        });
        match o.task {
            Task::IkeAuth(draft) => self.auth_response(i, now, draft, &inner, error, backend),
            Task::CreateChild(draft) => match error {
                Some(e) => self.create_child_refused(i, now, draft, &e, backend),
                None => self.child_response(i, now, draft, &inner, backend),
            },
            Task::RekeyIke(draft) => match error {
                Some(e) => self.ike_rekey_refused(i, now, &e),
                None => self.ike_rekey_response(i, now, draft, &inner, backend),
            },
            Task::DeleteChildren(spis) => {
                for spi in spis {
                    self.remove_child(i, spi, backend);
                }
            }
            Task::DeleteIke => {
                if self.sas[i].state == IkeState::Rekeyed {
                    self.sas[i].die();
                } else {
                    self.kill_quietly(i, backend);
                }
            }
            Task::Dpd | Task::IkeInit => {}
        }
        self.pump(i, now);
        Ok(())
    }

    fn decrypt(&mut self, i: SaId, data: &[u8], msg: &Message) -> Result<Vec<Payload>, Reject> {
        let Some(sk) = &self.sas[i].sk_in else {
            return Err(Reject::NoKeys);
        };
        sk.open(data, msg).map_err(|error| Reject::Sk {
            exchange: msg.header.exchange,
            error,
        })
    }

    /// The peer spoke (authenticated): note it, and follow its address and
    /// port when its NAT mapping changed (§2.23), its CHILD_SAs' ESP too.
    fn hear(
        &mut self,
        i: SaId,
        now: Instant,
        local_port: u16,
        remote: SocketAddr,
        backend: &mut dyn SaBackend,
    ) {
        let sa = &mut self.sas[i];
        sa.last_heard = now;
        if local_port == 4500 && !sa.natt {
            sa.natt = true;
        }
        if sa.remote == remote || !sa.natt {
            return;
        }
        let old = sa.remote;
        sa.remote = remote;
        let local = SocketAddr::new(self.cfg.local, sa.local_port());
        for c in &sa.children {
            for (spi, direction) in [
                (c.spi_in, Direction::Inbound),
                (c.spi_out, Direction::Outbound),
            ] {
                if let Err(e) = backend.update(spi, direction, local, remote) {
                    self.out.log_child(
                        Level::Error,
                        &self.cfg,
                        (c.spi_in, Some(c.spi_out)),
                        format!("moving SA {spi:08x} to {remote}: {e}"),
                    );
                }
            }
        }
        self.out.log(
            Level::Info,
            &self.cfg,
            format!("the peer moved from {old} to {remote} (NAT mapping changed)"),
        );
    }
}
