//! The connection's snapshot for `xesp status`.

use super::*;

impl Connection {
    /// A snapshot for `xesp status` (times relative to `now`).
    pub fn status(&self, now: Instant, backend: &mut dyn SaBackend) -> ConnStatus {
        let cfg = &self.cfg;
        let ike = self
            .sas
            .iter()
            .rev()
            .find(|s| s.is_usable())
            .or_else(|| self.sas.iter().next_back())
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
                        .timers
                        .get(Timer::IkeRekey)
                        .map(|t| t.saturating_duration_since(now).as_secs()),
                }
            });
        let children = self
            .sas
            .iter()
            .flat_map(|s| s.children.iter().map(move |c| (s, c)))
            .map(|(sa, c)| {
                let inb = backend
                    .counters(c.spi_in, Direction::Inbound)
                    .unwrap_or_default();
                let outb = backend
                    .counters(c.spi_out, Direction::Outbound)
                    .unwrap_or_default();
                ChildStatus {
                    spi_in: format!("{:08x}", c.spi_in),
                    spi_out: format!("{:08x}", c.spi_out),
                    state: match c.state {
                        ChildState::Installed => "INSTALLED",
                        ChildState::Rekeyed => "REKEYED",
                        ChildState::Deleting => "DELETING",
                        ChildState::Closing => "CLOSING",
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
                    rekey_in_secs: sa
                        .timers
                        .get(Timer::ChildRekey(c.spi_in))
                        .map_or(0, |t| t.saturating_duration_since(now).as_secs()),
                    lifetime_secs: cfg.lifetimes.child.as_secs(),
                }
            })
            .collect();
        ConnStatus {
            name: cfg.name.clone(),
            tunnel: cfg.tunnel,
            peer: cfg.remote.to_string(),
            up: self.tunnel_up,
            closed: self.closed,
            established_secs_ago: self
                .last_established
                .map(|t| now.saturating_duration_since(t).as_secs()),
            ike,
            children,
            stats: self.stats,
        }
    }
}
