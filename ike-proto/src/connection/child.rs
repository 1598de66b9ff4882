//! A CHILD_SA's life in the datapath, whichever exchange made it: its
//! keys (RFC 7296 §2.17), its installation in make-before-break order, its
//! lifetimes (a soft limit rekeys it, a hard one ends it) and its removal,
//! which moves the tunnel to another CHILD_SA or takes it down.

use super::{timers::Timer, *};
use crate::backend::BackendError;

/// How long the tunnel keeps its route and carrier after the peer deleted
/// its only CHILD_SA, waiting for the peer's next one.
pub(super) const CARRIER_GRACE: Duration = Duration::from_secs(3);

impl Connection {
    pub(super) fn note_child(&mut self, c: &ChildSa, rekey_of: Option<u32>) {
        self.stats.child_sas_installed += 1;
        if rekey_of.is_some() {
            self.stats.rekeys += 1;
        }
        let what = if rekey_of.is_some() {
            "rekeyed"
        } else {
            "established"
        };
        self.out.log_child(
            Level::Info,
            &self.cfg,
            (c.spi_in, Some(c.spi_out)),
            format!(
                "CHILD_SA {what}: SPIs {:08x}_i {:08x}_o, {}, {} === {}",
                c.spi_in,
                c.spi_out,
                c.suite,
                join(&c.local_ts),
                join(&c.remote_ts)
            ),
        );
    }

    /// KEYMAT split into (inbound, outbound) (§2.17): the initiator-to-
    /// responder keys come first, "initiator" meaning whoever started the
    /// exchange that creates the CHILD_SA.
    pub(super) fn child_keys(
        &self,
        i: SaId,
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

    pub(super) fn install_child(
        &mut self,
        i: SaId,
        c: &ChildSa,
        keys: &(Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>),
        route: bool,
        backend: &mut dyn SaBackend,
    ) -> Result<(), BackendError> {
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
            // The new CHILD_SA carries the tunnel alone; one the peer deleted
            // goes now (make-before-break at the interface).
            let sa = &mut self.sas[i];
            for other in &mut sa.children {
                other.routed = false;
            }
            let closing: Vec<u32> = sa
                .children
                .iter()
                .filter(|c| c.state == ChildState::Closing)
                .map(|c| c.spi_in)
                .collect();
            for spi in closing {
                self.remove_child(i, spi, backend);
            }
        }
        Ok(())
    }

    /// The peer deleted CHILD_SA `spi_in` (§1.4.1). If it carried the tunnel
    /// and no other CHILD_SA can, its outbound half keeps the route for
    /// [`CARRIER_GRACE`] (state `Closing`): a CHILD_SA the peer creates
    /// meanwhile takes over without the carrier dropping. Otherwise it goes.
    pub(super) fn peer_deleted_child(
        &mut self,
        i: SaId,
        spi_in: u32,
        now: Instant,
        backend: &mut dyn SaBackend,
    ) {
        let sa = &self.sas[i];
        let Some(c) = sa.child(spi_in) else {
            return;
        };
        let alone = c.routed
            && sa.is_usable()
            && !sa
                .children
                .iter()
                .any(|o| o.spi_in != spi_in && o.state == ChildState::Installed);
        if !alone {
            self.remove_child(i, spi_in, backend);
            return;
        }
        let _ = backend.delete(spi_in, Direction::Inbound);
        let sa = &mut self.sas[i];
        if let Some(c) = sa.child_mut(spi_in) {
            c.state = ChildState::Closing;
        }
        sa.timers.stop(Timer::ChildRekey(spi_in));
        sa.timers
            .set(Timer::ChildExpire(spi_in), now + CARRIER_GRACE);
        self.out.log_child(
            Level::Info,
            &self.cfg,
            (spi_in, None),
            format!("the peer deleted CHILD_SA {spi_in:08x}_i; its route stays for a new one"),
        );
    }

    pub(super) fn mark_rekeyed(&mut self, i: SaId, old: u32) {
        if let Some(c) = self.sas[i].children.iter_mut().find(|c| c.spi_in == old) {
            c.state = ChildState::Rekeyed;
            c.routed = false;
        }
    }

    /// Adds a CHILD_SA with its jittered rekey and its hard expiry (§2.8).
    pub(super) fn add_child(&mut self, i: SaId, now: Instant, child: ChildSa) {
        let lifetime = self.cfg.lifetimes.child;
        let rekey_at = now + self.rekey_delay(lifetime);
        self.sas[i].add_child(child, rekey_at, now + lifetime);
    }

    /// A CHILD_SA reached its hard lifetime: it is removed at once (the
    /// tunnel goes down if it carried it and no other CHILD_SA can), and
    /// the peer is told.
    pub(super) fn child_expired(
        &mut self,
        i: SaId,
        spi_in: u32,
        why: &str,
        backend: &mut dyn SaBackend,
    ) {
        let Some(c) = self.sas[i].child(spi_in) else {
            return;
        };
        if c.state == ChildState::Closing {
            self.out.log_child(
                Level::Info,
                &self.cfg,
                (spi_in, None),
                format!(
                    "no new CHILD_SA within {} s of the peer's DELETE of {spi_in:08x}_i",
                    CARRIER_GRACE.as_secs()
                ),
            );
            self.remove_child(i, spi_in, backend);
            return;
        }
        self.stats.child_sa_hard_expiries += 1;
        self.out.log_child(
            Level::Warn,
            &self.cfg,
            (spi_in, Some(c.spi_out)),
            format!("CHILD_SA {spi_in:08x}_i reached its hard {why} lifetime"),
        );
        self.remove_child(i, spi_in, backend);
        self.sas[i]
            .tasks
            .push_back(Task::DeleteChildren(vec![spi_in]));
    }

    /// The datapath reports that an SA reached a byte, packet or sequence
    /// number limit: a soft limit rekeys the CHILD_SA it belongs to, a hard
    /// one removes it.
    pub fn expired(
        &mut self,
        now: Instant,
        spi: u32,
        direction: Direction,
        hard: bool,
        backend: &mut dyn SaBackend,
    ) {
        let owner = self.sas.ids().into_iter().find_map(|i| {
            self.sas[i]
                .children
                .iter()
                .find(|c| match direction {
                    Direction::Inbound => c.spi_in == spi,
                    Direction::Outbound => c.spi_out == spi,
                })
                .map(|c| (i, c.spi_in, c.state))
        });
        let Some((i, spi_in, state)) = owner else {
            return;
        };
        if hard {
            self.child_expired(i, spi_in, "datapath", backend);
        } else if state == ChildState::Installed
            && self.sas[i].is_usable()
            && !self.sas[i].rekey_pending(spi_in)
        {
            self.sas[i].timers.stop(Timer::ChildRekey(spi_in));
            self.queue_child_rekey(i, spi_in, backend);
        }
        self.pump_all(now);
        self.settle(now);
    }

    /// Removes a CHILD_SA from the datapath; if it carried the tunnel, the
    /// newest other CHILD_SA takes over, or the tunnel goes down.
    pub(super) fn remove_child(&mut self, i: SaId, spi_in: u32, backend: &mut dyn SaBackend) {
        let Some(c) = self.sas[i].take_child(spi_in) else {
            return;
        };
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
        self.out.log_child(
            Level::Info,
            &self.cfg,
            (c.spi_in, Some(c.spi_out)),
            format!("CHILD_SA {:08x}_i {:08x}_o deleted", c.spi_in, c.spi_out),
        );
    }
}
