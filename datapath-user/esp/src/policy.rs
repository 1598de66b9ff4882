//! Traffic selectors in the datapath (RFC 4301 §4.4.1, §5.1, §5.2): what a
//! CHILD_SA may carry, and the match of one inner packet against it. Sans-IO
//! and without allocation per packet: a packet's [`Flow`] is read from its
//! first octets, and an SA's [`Selectors`] are fixed when it is installed.
//!
//! * Outbound (§5.1): a packet leaves in an SA only if its source lies in
//!   one of the SA's local selectors and its destination in one of its
//!   remote selectors ([`Selectors::covers_outbound`]).
//! * Inbound (§5.2): after decryption, the inner packet's source must lie in
//!   the peer's (remote) selectors and its destination in ours (local)
//!   ([`Selectors::covers_inbound`]).
//!
//! TSi and TSr are lists, matched independently (RFC 7296 §2.9). Each
//! selector also names a protocol (0 for any) and a port range: the source
//! port is checked against the selector on the source's side, the
//! destination port against the other. For ICMP, the 16-bit value
//! `type * 256 + code` is checked against both ranges (RFC 4301 §4.4.1.1:
//! "Local" and "Remote" do not apply to ICMP type and code). A selector that
//! narrows the ports cannot match a packet whose ports are not there (a
//! non-initial fragment, a truncated header, a protocol without ports).
//!
//! Selectors are IPv4, as the IKE core negotiates them: an IPv6 inner packet
//! matches none.

use std::net::Ipv4Addr;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// One IPv4 traffic selector: an address range, a protocol (0 for any) and
/// a port range (0-65535 for any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    pub protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
}

impl Selector {
    /// 0.0.0.0/0, every protocol and port.
    pub const ANY: Self = Self {
        start: Ipv4Addr::UNSPECIFIED,
        end: Ipv4Addr::BROADCAST,
        protocol: 0,
        start_port: 0,
        end_port: u16::MAX,
    };

    /// A prefix such as 10.0.0.0/24, every protocol and port.
    pub fn prefix(addr: Ipv4Addr, len: u8) -> Self {
        let mask = match len {
            0 => 0,
            l => u32::MAX << (32 - u32::from(l.min(32))),
        };
        let a = u32::from(addr) & mask;
        Self {
            start: a.into(),
            end: (a | !mask).into(),
            ..Self::ANY
        }
    }

    fn any_port(&self) -> bool {
        self.start_port == 0 && self.end_port == u16::MAX
    }

    /// Whether the packet's address `addr`, with `port` on this selector's
    /// side, is selected.
    fn selects(&self, addr: u32, protocol: u8, port: Option<u16>) -> bool {
        u32::from(self.start) <= addr
            && addr <= u32::from(self.end)
            && (self.protocol == 0 || self.protocol == protocol)
            && (self.any_port() || port.is_some_and(|p| self.start_port <= p && p <= self.end_port))
    }
}

/// What the selectors look at in one inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Source and destination ports (TCP, UDP, SCTP), or both the ICMP
    /// type times 256 plus the code; `None` where the packet has none
    /// (other protocols, non-initial fragments, truncated headers).
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

impl Flow {
    /// Reads the flow of the IPv4 packet `pkt`; `None` if it is not IPv4 or
    /// its header is truncated (such a packet matches no selector).
    pub fn parse(pkt: &[u8]) -> Option<Self> {
        let h = pkt.get(..20)?;
        if h[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if ihl < 20 {
            return None;
        }
        let protocol = h[9];
        let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
        let l4 = if frag_offset == 0 {
            pkt.get(ihl..)
        } else {
            None
        };
        let (src_port, dst_port) = match (protocol, l4) {
            (IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP, Some([a, b, c, d, ..])) => (
                Some(u16::from_be_bytes([*a, *b])),
                Some(u16::from_be_bytes([*c, *d])),
            ),
            (IPPROTO_ICMP, Some([t, c, ..])) => {
                let v = u16::from_be_bytes([*t, *c]);
                (Some(v), Some(v))
            }
            _ => (None, None),
        };
        Some(Self {
            src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
            dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
            protocol,
            src_port,
            dst_port,
        })
    }
}

/// The selectors one CHILD_SA was negotiated with: ours (local, TSi for
/// the initiator) and the peer's (remote).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selectors {
    local: Box<[Selector]>,
    remote: Box<[Selector]>,
}

impl Selectors {
    pub fn new(local: &[Selector], remote: &[Selector]) -> Self {
        Self {
            local: local.into(),
            remote: remote.into(),
        }
    }

    /// 0.0.0.0/0 on both sides: every IPv4 packet.
    pub fn any_v4() -> Self {
        Self::new(&[Selector::ANY], &[Selector::ANY])
    }

    pub fn local(&self) -> &[Selector] {
        &self.local
    }

    pub fn remote(&self) -> &[Selector] {
        &self.remote
    }

    /// RFC 4301 §5.1: the packet `pkt` we are about to send may leave in
    /// this SA (source ours, destination the peer's).
    pub fn covers_outbound(&self, pkt: &[u8]) -> bool {
        Flow::parse(pkt).is_some_and(|f| self.covers_outbound_flow(&f))
    }

    /// [`Self::covers_outbound`] of a flow already read (one parse for
    /// several SAs).
    pub fn covers_outbound_flow(&self, f: &Flow) -> bool {
        self.covers(&self.local, &self.remote, f)
    }

    /// RFC 4301 §5.2: the packet `pkt` decrypted from this SA was allowed
    /// to come in it (source the peer's, destination ours).
    pub fn covers_inbound(&self, pkt: &[u8]) -> bool {
        Flow::parse(pkt).is_some_and(|f| self.covers(&self.remote, &self.local, &f))
    }

    fn covers(&self, src_side: &[Selector], dst_side: &[Selector], f: &Flow) -> bool {
        let (src, dst) = (u32::from(f.src), u32::from(f.dst));
        src_side
            .iter()
            .any(|s| s.selects(src, f.protocol, f.src_port))
            && dst_side
                .iter()
                .any(|s| s.selects(dst, f.protocol, f.dst_port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Selector {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        Selector::prefix(a.parse().unwrap(), l.parse().unwrap())
    }

    /// An IPv4 packet `src` -> `dst` with `l4` after a 20-octet header.
    fn v4(src: &str, dst: &str, protocol: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
        p[16..20].copy_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
        p.extend_from_slice(l4);
        p
    }

    fn ports(sport: u16, dport: u16) -> Vec<u8> {
        let mut l4 = sport.to_be_bytes().to_vec();
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&[0; 16]);
        l4
    }

    #[test]
    fn flows_are_read_from_ipv4_headers() {
        let f = Flow::parse(&v4("10.0.0.10", "10.2.0.4", 6, 0, &ports(40000, 443))).unwrap();
        assert_eq!(
            f,
            Flow {
                src: "10.0.0.10".parse().unwrap(),
                dst: "10.2.0.4".parse().unwrap(),
                protocol: 6,
                src_port: Some(40000),
                dst_port: Some(443),
            }
        );
        // ICMP echo request: type 8, code 0 on both sides.
        let f = Flow::parse(&v4("10.0.0.10", "10.2.0.4", 1, 0, &[8, 0, 0, 0])).unwrap();
        assert_eq!((f.src_port, f.dst_port), (Some(0x0800), Some(0x0800)));
        // A non-initial fragment has no ports; the first one has.
        let f = Flow::parse(&v4("10.0.0.10", "10.2.0.4", 17, 185, &ports(1, 2))).unwrap();
        assert_eq!((f.src_port, f.dst_port), (None, None));
        let f = Flow::parse(&v4("10.0.0.10", "10.2.0.4", 17, 0x2000, &ports(1, 2))).unwrap();
        assert_eq!((f.src_port, f.dst_port), (Some(1), Some(2)));
        // Truncated transport header, protocol without ports.
        let f = Flow::parse(&v4("10.0.0.10", "10.2.0.4", 6, 0, &[0, 1])).unwrap();
        assert_eq!(f.src_port, None);
        let f = Flow::parse(&v4("10.0.0.10", "10.2.0.4", 47, 0, &ports(1, 2))).unwrap();
        assert_eq!(f.src_port, None);
        // Not IPv4, truncated, IHL below 5.
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        assert_eq!(Flow::parse(&v6), None);
        assert_eq!(Flow::parse(&[0x45; 19]), None);
        let mut short_ihl = v4("10.0.0.10", "10.2.0.4", 6, 0, &[]);
        short_ihl[0] = 0x44;
        assert_eq!(Flow::parse(&short_ihl), None);
    }

    #[test]
    fn selector_match_table() {
        let any = Selectors::any_v4();
        let lan = net("10.0.0.0/24");
        let lan2 = net("10.1.10.0/25");
        let vnet = net("10.2.0.0/24");
        let narrowed = Selectors::new(&[lan, lan2], &[vnet]);
        let https = Selectors::new(
            &[lan],
            &[Selector {
                protocol: 6,
                start_port: 443,
                end_port: 443,
                ..vnet
            }],
        );
        let echo_only = Selectors::new(
            &[Selector {
                protocol: 1,
                start_port: 0x0800,
                end_port: 0x08ff,
                ..lan
            }],
            &[vnet],
        );
        let bgp = Selectors::new(&[net("172.16.0.3/32")], &[net("10.2.0.228/32")]);
        let icmp = |s, d, t| v4(s, d, 1, 0, &[t, 0, 0, 0]);
        let tcp = |s, d, sp, dp| v4(s, d, 6, 0, &ports(sp, dp));
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        // (selectors, packet, covered outbound, covered inbound)
        let table: Vec<(&Selectors, Vec<u8>, bool, bool)> = vec![
            (&any, icmp("10.1.10.10", "10.2.0.4", 8), true, true),
            (&any, v6.clone(), false, false),
            (&narrowed, icmp("10.0.0.10", "10.2.0.4", 8), true, false),
            (&narrowed, icmp("10.1.10.10", "10.2.0.4", 8), true, false),
            // 10.1.10.128 is outside 10.1.10.0/25.
            (&narrowed, icmp("10.1.10.200", "10.2.0.4", 8), false, false),
            (&narrowed, icmp("10.0.0.10", "10.2.1.4", 8), false, false),
            // Inbound: the peer's network to ours.
            (&narrowed, icmp("10.2.0.4", "10.0.0.10", 0), false, true),
            (&narrowed, icmp("10.2.0.4", "10.1.10.10", 0), false, true),
            (&narrowed, icmp("10.2.0.4", "10.1.10.200", 0), false, false),
            (&narrowed, icmp("192.0.2.7", "10.0.0.10", 0), false, false),
            (&narrowed, v6.clone(), false, false),
            // Edges of the ranges.
            (&narrowed, icmp("10.0.0.0", "10.2.0.255", 8), true, false),
            (&narrowed, icmp("10.0.0.255", "10.2.0.0", 8), true, false),
            (
                &narrowed,
                icmp("9.255.255.255", "10.2.0.0", 8),
                false,
                false,
            ),
            // Protocol and port narrowed on the peer's side.
            (
                &https,
                tcp("10.0.0.10", "10.2.0.4", 40000, 443),
                true,
                false,
            ),
            (
                &https,
                tcp("10.0.0.10", "10.2.0.4", 40000, 80),
                false,
                false,
            ),
            (&https, tcp("10.0.0.10", "10.2.0.4", 443, 80), false, false),
            (
                &https,
                tcp("10.2.0.4", "10.0.0.10", 443, 40000),
                false,
                true,
            ),
            (
                &https,
                tcp("10.2.0.4", "10.0.0.10", 80, 40000),
                false,
                false,
            ),
            (&https, icmp("10.0.0.10", "10.2.0.4", 8), false, false),
            (
                &https,
                v4("10.0.0.10", "10.2.0.4", 17, 0, &ports(40000, 443)),
                false,
                false,
            ),
            // A non-initial fragment cannot match narrowed ports (§4.4.1.1)...
            (
                &https,
                v4("10.0.0.10", "10.2.0.4", 6, 185, &ports(40000, 443)),
                false,
                false,
            ),
            // ...but matches selectors that do not narrow them.
            (
                &narrowed,
                v4("10.0.0.10", "10.2.0.4", 6, 185, &[]),
                true,
                false,
            ),
            // ICMP type and code: type*256+code within the range, both sides.
            (&echo_only, icmp("10.0.0.10", "10.2.0.4", 8), true, false),
            (&echo_only, icmp("10.0.0.10", "10.2.0.4", 13), false, false),
            (
                &echo_only,
                tcp("10.0.0.10", "10.2.0.4", 0x0800, 0x0800),
                false,
                false,
            ),
            // Host selectors (a BGP session).
            (
                &bgp,
                tcp("172.16.0.3", "10.2.0.228", 40000, 179),
                true,
                false,
            ),
            (
                &bgp,
                tcp("10.2.0.228", "172.16.0.3", 179, 40000),
                false,
                true,
            ),
            (
                &bgp,
                tcp("172.16.0.3", "10.2.0.229", 40000, 179),
                false,
                false,
            ),
        ];
        for (i, (sel, pkt, out, inb)) in table.iter().enumerate() {
            assert_eq!(sel.covers_outbound(pkt), *out, "row {i}: outbound {sel:?}");
            assert_eq!(sel.covers_inbound(pkt), *inb, "row {i}: inbound {sel:?}");
        }
    }
}
