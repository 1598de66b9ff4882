//! The ranges the configuration's numbers and durations must lie in, and
//! why. Every refusal names the field, the value given and the allowed range.

use std::time::Duration;

use super::{ConfigError, parse_duration};

/// The kernel leaves this much room before a packet in an AF_XDP frame
/// (XDP_PACKET_HEADROOM).
pub const XDP_HEADROOM: u32 = 256;

/// The most a packet grows in its frame between the LAN and the DMZ:
/// Ethernet (14), outer IPv4 (20), UDP encapsulation (8), ESP header (8),
/// IV (16), padding and trailer (up to 15 + 2) and ICV (up to 32, SHA-512).
pub const ESP_WORST_OVERHEAD: u32 = 14 + 20 + 8 + 8 + 16 + 17 + 32;

/// The largest `tunnel_mtu` whose packets, once encrypted, still fit one
/// AF_XDP frame of the workers (`datapath = "xdp"`).
pub fn max_xdp_tunnel_mtu() -> u32 {
    datapath_user::xsk::PortConfig::default().frame_size - XDP_HEADROOM - ESP_WORST_OVERHEAD
}

/// An integer setting's range.
#[derive(Debug, Clone, Copy)]
pub struct IntLimit {
    pub min: i64,
    pub max: i64,
    /// What the number counts, for messages ("octets", "packets").
    pub unit: &'static str,
}

impl IntLimit {
    pub fn allowed(&self) -> String {
        format!("{} to {} {}", self.min, self.max, self.unit)
            .trim_end()
            .to_string()
    }

    /// `value` if it lies in the range, else an error naming `field`.
    pub fn check(&self, field: &str, value: i64, why: &str) -> Result<i64, ConfigError> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(ConfigError::Range {
                field: field.into(),
                value: value.to_string(),
                reason: why.into(),
                allowed: self.allowed(),
            })
        }
    }
}

pub const MSS_CLAMP: IntLimit = IntLimit {
    min: 536,
    max: 9000,
    unit: "octets",
};
pub const TUNNEL_MTU: IntLimit = IntLimit {
    min: 576,
    max: 9000,
    unit: "octets",
};
/// Azure's `saDataSizeKilobytes` starts at 1024; fewer and a CHILD_SA dies
/// after a handful of packets.
pub const CHILD_LIFETIME_KB: IntLimit = IntLimit {
    min: 1024,
    max: 1 << 40,
    unit: "KB",
};
pub const REPLAY_WINDOW: IntLimit = IntLimit {
    min: 0,
    max: xesp_esp::replay::MAX_WINDOW as i64,
    unit: "packets",
};
pub const DPD_TRIES: IntLimit = IntLimit {
    min: 1,
    max: 100,
    unit: "probes",
};

/// A duration setting's range; `warn_below` is legal but unwise.
#[derive(Debug, Clone, Copy)]
pub struct DurationLimit {
    pub min: Duration,
    pub max: Duration,
    /// Below this, a warning with this reason.
    pub warn_below: Option<(Duration, &'static str)>,
    /// Why `min` is the minimum.
    pub too_short: &'static str,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// IKE_SA and CHILD_SA lifetimes: a rekey starts at about 85 % of the
/// lifetime, and an exchange may take a few retransmissions (2 s, 4 s, ...).
pub const LIFETIME: DurationLimit = DurationLimit {
    min: secs(10),
    max: secs(30 * 86400),
    warn_below: Some((
        secs(300),
        "rekeys every few minutes or faster; Azure's lifetimes start at 300s (fine for tests)",
    )),
    too_short: "the SA would be rekeyed before an exchange can complete (a rekey storm)",
};
pub const DPD_INTERVAL: DurationLimit = DurationLimit {
    min: secs(1),
    max: secs(86400),
    warn_below: None,
    too_short: "too short",
};
pub const DPD_RETRY: DurationLimit = DurationLimit {
    min: secs(1),
    max: secs(600),
    warn_below: None,
    too_short: "too short",
};
/// BGP hold time (0: no keepalives, RFC 4271 allows 0 or 3 s and more).
pub const BGP_HOLD: DurationLimit = DurationLimit {
    min: secs(3),
    max: secs(65535),
    warn_below: None,
    too_short: "RFC 4271: at least 3 seconds",
};
pub const BGP_TIMER: DurationLimit = DurationLimit {
    min: secs(1),
    max: secs(65535),
    warn_below: None,
    too_short: "too short",
};

/// `30s`, `10m`, `8h`, `1d` or plain seconds, for messages.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    for (unit, n) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if s >= n && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

impl DurationLimit {
    pub fn allowed(&self) -> String {
        format!("{} to {}", fmt_duration(self.min), fmt_duration(self.max))
    }

    /// Parses `raw` and checks it; never panics however large the number
    /// (a clock plus 2^63 seconds would).
    pub fn check(
        &self,
        field: &str,
        raw: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Duration, ConfigError> {
        let err = |reason: &str| ConfigError::Range {
            field: field.into(),
            value: format!("{raw:?}"),
            reason: reason.into(),
            allowed: self.allowed(),
        };
        let Some(d) = parse_duration(raw) else {
            let digits = raw.trim().trim_end_matches(['s', 'm', 'h', 'd']);
            return Err(
                if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
                    err("too large")
                } else {
                    err("not a duration like 30s, 10m, 8h, 7h30m or 1d")
                },
            );
        };
        if d < self.min {
            return Err(err(self.too_short));
        }
        if d > self.max {
            return Err(err("too large"));
        }
        if let Some((w, why)) = self.warn_below
            && d < w
        {
            warnings.push(format!(
                "{field} = {raw:?}: {why} (allowed: {}, advised: {} or more)",
                self.allowed(),
                fmt_duration(w)
            ));
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_xdp_mtu_fits_a_frame() {
        // 4096-octet frames: 4096 - 256 - 115.
        assert_eq!(max_xdp_tunnel_mtu(), 3725);
        assert!(max_xdp_tunnel_mtu() > 1500);
    }

    #[test]
    fn durations_are_shown_in_their_largest_unit() {
        assert_eq!(fmt_duration(secs(30 * 86400)), "30d");
        assert_eq!(fmt_duration(secs(300)), "5m");
        assert_eq!(fmt_duration(secs(27000)), "450m");
        assert_eq!(fmt_duration(secs(61)), "61s");
    }

    #[test]
    fn huge_durations_are_errors_not_panics() {
        let mut w = vec![];
        for raw in [
            "9223372036854775807",
            "18446744073709551615",
            "99999999999999999999999s",
            "106751991167300d",
        ] {
            let e = LIFETIME.check("x.lifetime", raw, &mut w).unwrap_err();
            let s = e.to_string();
            assert!(s.contains("too large") && s.contains("10s to 30d"), "{s}");
        }
        assert!(w.is_empty());
    }
}
