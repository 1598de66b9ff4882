//! Traffic selectors (RFC 7296 §2.9, §3.13): IPv4 address ranges with a
//! protocol and a port range, and the narrowing a responder does.

use core::fmt;
use std::net::Ipv4Addr;

use super::codec::{TrafficSelector, TsType};

/// The most traffic selectors one TS payload may carry, received or sent
/// (the wire's count is one octet; a route-based tunnel needs a few).
pub const MAX_SELECTORS: usize = 16;

/// One IPv4 traffic selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct TsRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    /// IP protocol, 0 for any.
    pub protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
}

impl TsRange {
    /// 0.0.0.0/0, every protocol and port: a route-based tunnel (Azure, VTIs).
    pub fn any_v4() -> Self {
        Self {
            start: Ipv4Addr::UNSPECIFIED,
            end: Ipv4Addr::BROADCAST,
            protocol: 0,
            start_port: 0,
            end_port: 65535,
        }
    }

    /// A prefix such as `10.0.0.0/24`, every protocol and port.
    pub fn prefix(addr: Ipv4Addr, len: u8) -> Self {
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len.min(32)))
        };
        let a = u32::from(addr) & mask;
        Self {
            start: a.into(),
            end: (a | !mask).into(),
            protocol: 0,
            start_port: 0,
            end_port: 65535,
        }
    }

    /// Parses `a.b.c.d/len` or `a.b.c.d`.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        let len: u8 = l.parse().ok().filter(|l| *l <= 32)?;
        Some(Self::prefix(a.parse().ok()?, len))
    }

    pub fn to_wire(&self) -> TrafficSelector {
        TrafficSelector {
            ts_type: TsType::TS_IPV4_ADDR_RANGE,
            ip_protocol: self.protocol,
            start_port: self.start_port,
            end_port: self.end_port,
            start: self.start.octets().to_vec(),
            end: self.end.octets().to_vec(),
        }
    }

    /// IPv4 selectors only; others (IPv6) are not ours to narrow here.
    pub fn from_wire(ts: &TrafficSelector) -> Option<Self> {
        if ts.ts_type != TsType::TS_IPV4_ADDR_RANGE {
            return None;
        }
        let a = |v: &[u8]| <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from);
        let r = Self {
            start: a(&ts.start)?,
            end: a(&ts.end)?,
            protocol: ts.ip_protocol,
            start_port: ts.start_port,
            end_port: ts.end_port,
        };
        (r.start <= r.end && r.start_port <= r.end_port).then_some(r)
    }

    /// The selector both allow, if any.
    pub fn intersect(&self, other: &Self) -> Option<Self> {
        let protocol = match (self.protocol, other.protocol) {
            (0, p) | (p, 0) => p,
            (a, b) if a == b => a,
            _ => return None,
        };
        let r = Self {
            start: self.start.max(other.start),
            end: self.end.min(other.end),
            protocol,
            start_port: self.start_port.max(other.start_port),
            end_port: self.end_port.min(other.end_port),
        };
        (r.start <= r.end && r.start_port <= r.end_port).then_some(r)
    }

    /// True if every packet `other` selects is selected by `self`.
    pub fn contains(&self, other: &Self) -> bool {
        self.intersect(other).as_ref() == Some(other)
    }
}

/// Narrows the peer's proposed selectors to what `ours` allows (§2.9):
/// every non-empty intersection, in the peer's order, without duplicates.
pub fn narrow(ours: &[TsRange], proposed: &[TsRange]) -> Vec<TsRange> {
    let mut out: Vec<TsRange> = Vec::new();
    for p in proposed {
        for o in ours {
            if let Some(i) = p.intersect(o)
                && !out.contains(&i)
            {
                out.push(i);
            }
        }
    }
    out
}

impl fmt::Display for TsRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, e) = (u32::from(self.start), u32::from(self.end));
        let size = e.wrapping_sub(s).wrapping_add(1);
        if size.is_power_of_two() && s & (size - 1) == 0 {
            write!(f, "{}/{}", self.start, 32 - size.trailing_zeros())?;
        } else if s == 0 && e == u32::MAX {
            f.write_str("0.0.0.0/0")?;
        } else {
            write!(f, "{}-{}", self.start, self.end)?;
        }
        if self.protocol != 0 {
            write!(f, "[{}", self.protocol)?;
            if (self.start_port, self.end_port) != (0, 65535) {
                write!(f, "/{}-{}", self.start_port, self.end_port)?;
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_and_display() {
        let any = TsRange::any_v4();
        let lan = TsRange::parse("10.0.0.0/24").unwrap();
        let vnet = TsRange::parse("10.2.0.0/24").unwrap();
        assert_eq!(narrow(&[any], &[lan, vnet]), vec![lan, vnet]);
        assert_eq!(narrow(&[lan], &[any]), vec![lan]);
        assert!(narrow(&[lan], &[vnet]).is_empty());
        assert_eq!(any.to_string(), "0.0.0.0/0");
        assert_eq!(lan.to_string(), "10.0.0.0/24");
        assert_eq!(
            TsRange::parse("172.16.0.3").unwrap().to_string(),
            "172.16.0.3/32"
        );
        let tcp443 = TsRange {
            protocol: 6,
            start_port: 443,
            end_port: 443,
            ..lan
        };
        assert_eq!(lan.intersect(&tcp443), Some(tcp443));
        assert!(lan.contains(&tcp443) && !tcp443.contains(&lan));
        assert_eq!(TsRange::from_wire(&tcp443.to_wire()), Some(tcp443));
        assert_eq!(TsRange::parse("10.0.0.0/33"), None);
    }
}
