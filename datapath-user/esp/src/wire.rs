//! Header layouts and checksums of what ESP tunnel mode wraps and unwraps:
//! the outer IPv4 header, the UDP header of NAT-T (RFC 3948), the ESP header
//! (RFC 4303 §2), and the inner packet's version.

use core::ops::Range;
use std::net::Ipv4Addr;

pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;
/// SPI and sequence number.
pub const ESP_HLEN: usize = 8;
/// Pad Length and Next Header.
pub const ESP_TRAILER: usize = 2;

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ESP: u8 = 50;
/// "No next header": a TFC dummy packet (RFC 4303 §2.6).
pub const IPPROTO_NONE: u8 = 59;

/// UDP port of NAT-T (RFC 3948).
pub const NATT_PORT: u16 = 4500;
/// TTL of the outer header we emit.
pub const OUTER_TTL: u8 = 64;

/// Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes a 20-octet IPv4 header (no options) with its checksum: one
/// [`Ipv4Header`] used once.
#[allow(clippy::too_many_arguments)]
pub fn write_ipv4(
    h: &mut [u8],
    tos: u8,
    total_len: u16,
    id: u16,
    dont_fragment: bool,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) {
    Ipv4Header::new(proto, src, dst).write(h, tos, total_len, id, dont_fragment);
}

/// An outer IPv4 header (no options, TTL [`OUTER_TTL`]) for packets of one
/// protocol between two addresses: the fields that stay the same are
/// written, and their 16-bit words summed (RFC 1071), once; each packet
/// adds only the words that change.
///
/// The checksum is summed from the fields themselves, never read back from
/// the packet: reading 16-bit words just written as single octets would
/// stall the store-to-load forwarding of every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    bytes: [u8; IPV4_HLEN],
    /// The sum of the words that stay the same, not folded.
    sum: u32,
}

impl Ipv4Header {
    pub fn new(proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        let mut bytes = [0u8; IPV4_HLEN];
        bytes[0] = 0x45;
        bytes[8] = OUTER_TTL;
        bytes[9] = proto;
        bytes[12..16].copy_from_slice(&src.octets());
        bytes[16..20].copy_from_slice(&dst.octets());
        let (s, d) = (u32::from(src), u32::from(dst));
        let sum = 0x4500
            + ((u32::from(OUTER_TTL) << 8) | u32::from(proto))
            + (s >> 16)
            + (s & 0xffff)
            + (d >> 16)
            + (d & 0xffff);
        Self { bytes, sum }
    }

    /// Writes the header into `h[..20]` for a packet of `total_len` octets.
    pub fn write(&self, h: &mut [u8], tos: u8, total_len: u16, id: u16, dont_fragment: bool) {
        let flags: u16 = if dont_fragment { 0x4000 } else { 0 };
        let h = &mut h[..IPV4_HLEN];
        h.copy_from_slice(&self.bytes);
        h[1] = tos;
        h[2..4].copy_from_slice(&total_len.to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        // Nine 16-bit words: the first fold leaves at most 0xffff + 8, the
        // second fits in 16 bits.
        let mut sum =
            self.sum + u32::from(tos) + u32::from(total_len) + u32::from(id) + u32::from(flags);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
}

/// What an outer IPv4 packet carries, as far as ESP is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outer {
    /// An ESP packet: the ESP header starts at `esp.start`, the payload runs
    /// to `esp.end`; `udp` has the (source, destination) ports when it came
    /// UDP-encapsulated.
    Esp {
        spi: u32,
        esp: Range<usize>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        udp: Option<(u16, u16)>,
    },
    /// IKE on UDP 4500 behind the non-ESP marker (RFC 3948 §2.2); the IKE
    /// message starts at `ike.start`.
    Ike { ike: Range<usize> },
    /// A NAT-keepalive (RFC 3948 §2.3).
    Keepalive,
}

/// Why an outer packet cannot be ESP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OuterError {
    /// Truncated, bad version/IHL/length/checksum, or a fragment.
    Malformed,
    /// Neither ESP, nor UDP to/from port 4500.
    NotEsp,
}

/// Parses the outer IPv4 header of `pkt` (which starts at the IP header).
pub fn parse_outer(pkt: &[u8]) -> Result<Outer, OuterError> {
    let Some(h) = pkt.get(..IPV4_HLEN) else {
        return Err(OuterError::Malformed);
    };
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 || ihl < IPV4_HLEN || total < ihl || total > pkt.len() {
        return Err(OuterError::Malformed);
    }
    if pkt.get(..ihl).map(checksum) != Some(0) {
        return Err(OuterError::Malformed);
    }
    // Fragments: reassembly is the stack's job, not ours.
    if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return Err(OuterError::Malformed);
    }
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    match h[9] {
        IPPROTO_ESP => esp_at(pkt, ihl..total, src, dst, None),
        IPPROTO_UDP => {
            let Some(u) = pkt.get(ihl..ihl + UDP_HLEN) else {
                return Err(OuterError::Malformed);
            };
            let (sport, dport) = (
                u16::from_be_bytes([u[0], u[1]]),
                u16::from_be_bytes([u[2], u[3]]),
            );
            let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
            if ulen < UDP_HLEN || ihl + ulen > total {
                return Err(OuterError::Malformed);
            }
            if sport != NATT_PORT && dport != NATT_PORT {
                return Err(OuterError::NotEsp);
            }
            let payload = ihl + UDP_HLEN..ihl + ulen;
            match &pkt[payload.clone()] {
                [0xff] => Ok(Outer::Keepalive),
                [0, 0, 0, 0, ..] => Ok(Outer::Ike {
                    ike: payload.start + 4..payload.end,
                }),
                _ => esp_at(pkt, payload, src, dst, Some((sport, dport))),
            }
        }
        _ => Err(OuterError::NotEsp),
    }
}

fn esp_at(
    pkt: &[u8],
    esp: Range<usize>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    udp: Option<(u16, u16)>,
) -> Result<Outer, OuterError> {
    let Some(h) = pkt.get(esp.start..esp.start + ESP_HLEN) else {
        return Err(OuterError::Malformed);
    };
    if esp.len() < ESP_HLEN {
        return Err(OuterError::Malformed);
    }
    let spi = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    // SPIs 1-255 are reserved, 0 is never sent (RFC 4303 §2.1).
    if spi < 256 {
        return Err(OuterError::Malformed);
    }
    Ok(Outer::Esp {
        spi,
        esp,
        src,
        dst,
        udp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_header() {
        // The classic example header (RFC 1071 style), checksum b861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        let mut w = [0u8; 20];
        write_ipv4(
            &mut w,
            0,
            0x73,
            0,
            true,
            17,
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 199),
        );
        w[8] = 0x40;
        w[10] = 0;
        w[11] = 0;
        assert_eq!(checksum(&w), 0xb861);
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn the_summed_checksum_equals_the_one_read_from_the_bytes() {
        // Fields from a seeded generator (xorshift), the extremes included:
        // the header always verifies, and its checksum is RFC 1071's over
        // the bytes written.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..2000 {
            let r = next();
            let (tos, len, id) = if i == 0 {
                (0xff, 0xffff, 0xffff)
            } else {
                (r as u8, (r >> 8) as u16, (r >> 24) as u16)
            };
            let (src, dst) = if i == 0 {
                (Ipv4Addr::BROADCAST, Ipv4Addr::BROADCAST)
            } else {
                let r2 = next();
                (Ipv4Addr::from(r2 as u32), Ipv4Addr::from((r2 >> 32) as u32))
            };
            let mut h = [0u8; IPV4_HLEN];
            write_ipv4(&mut h, tos, len, id, r & 1 == 1, (r >> 40) as u8, src, dst);
            assert_eq!(checksum(&h), 0, "header {h:02x?} does not verify");
            let written = u16::from_be_bytes([h[10], h[11]]);
            h[10..12].copy_from_slice(&[0, 0]);
            assert_eq!(written, checksum(&h), "header {h:02x?}");
        }
    }

    fn udp_packet(payload: &[u8], sport: u16, dport: u16) -> Vec<u8> {
        let total = IPV4_HLEN + UDP_HLEN + payload.len();
        let mut p = vec![0u8; total];
        write_ipv4(
            &mut p,
            0,
            total as u16,
            1,
            false,
            IPPROTO_UDP,
            Ipv4Addr::new(203, 0, 113, 11),
            Ipv4Addr::new(192, 0, 2, 1),
        );
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((UDP_HLEN + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    #[test]
    fn udp_4500_demultiplexing() {
        assert_eq!(
            parse_outer(&udp_packet(&[0xff], 4500, 4500)),
            Ok(Outer::Keepalive)
        );
        assert_eq!(
            parse_outer(&udp_packet(&[0, 0, 0, 0, 1, 2], 4500, 4500)),
            Ok(Outer::Ike { ike: 32..34 })
        );
        let esp = [0, 0, 0x10, 0, 0, 0, 0, 1, 9, 9];
        assert_eq!(
            parse_outer(&udp_packet(&esp, 4500, 4500)),
            Ok(Outer::Esp {
                spi: 0x1000,
                esp: 28..38,
                src: Ipv4Addr::new(203, 0, 113, 11),
                dst: Ipv4Addr::new(192, 0, 2, 1),
                udp: Some((4500, 4500))
            })
        );
        assert_eq!(
            parse_outer(&udp_packet(&esp, 500, 500)),
            Err(OuterError::NotEsp)
        );
        assert_eq!(
            parse_outer(&udp_packet(&[0, 0, 0, 5, 0, 0, 0, 1], 4500, 4500)),
            Err(OuterError::Malformed)
        );
    }

    #[test]
    fn malformed_outer_headers() {
        let good = udp_packet(&[0, 0, 0x10, 0, 0, 0, 0, 1], 4500, 4500);
        for len in 0..good.len() {
            assert!(parse_outer(&good[..len]).is_err(), "truncated to {len}");
        }
        let mut bad_sum = good.clone();
        bad_sum[10] ^= 1;
        assert_eq!(parse_outer(&bad_sum), Err(OuterError::Malformed));
        let mut frag = good.clone();
        frag[6] = 0x20; // more fragments
        let c = checksum(&{
            let mut h = frag[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse_outer(&frag), Err(OuterError::Malformed));
    }
}
