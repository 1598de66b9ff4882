//! TCP MSS clamping on the tunnels (the article's `ip tcp adjust-mss 1350`).
//!
//! A SYN whose MSS option is above the clamp gets it lowered in place, with
//! the TCP checksum updated incrementally (RFC 1624 eqn. 3), so the payload is
//! never re-summed. Works on the inner IPv4 or IPv6 packet, both directions.

/// What happened to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clamp {
    /// A SYN's MSS was lowered from the given value.
    Lowered(u16),
    /// Not a TCP SYN, no MSS option, or the MSS was already low enough.
    Unchanged,
    /// Too short or inconsistent to be parsed as TCP; left alone.
    Malformed,
}

const TCP_FLAG_SYN: u8 = 0x02;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;

/// Clamps the MSS option of a TCP SYN in the IP packet `pkt` to `max`.
pub fn clamp_mss(pkt: &mut [u8], max: u16) -> Clamp {
    let Some(&first) = pkt.first() else {
        return Clamp::Malformed;
    };
    let (proto, l4) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 || pkt.len() < ihl {
                return Clamp::Malformed;
            }
            // Fragments other than the first carry no TCP header.
            if u16::from_be_bytes([pkt[6], pkt[7]]) & 0x1fff != 0 {
                return Clamp::Unchanged;
            }
            (pkt[9], ihl)
        }
        6 => {
            if pkt.len() < 40 {
                return Clamp::Malformed;
            }
            (pkt[6], 40)
        }
        _ => return Clamp::Malformed,
    };
    if proto != 6 {
        return Clamp::Unchanged;
    }
    let Some(tcp) = pkt.get_mut(l4..) else {
        return Clamp::Malformed;
    };
    if tcp.len() < 20 {
        return Clamp::Malformed;
    }
    if tcp[13] & TCP_FLAG_SYN == 0 {
        return Clamp::Unchanged;
    }
    let data_off = usize::from(tcp[12] >> 4) * 4;
    if data_off < 20 || data_off > tcp.len() {
        return Clamp::Malformed;
    }
    let mut i = 20;
    while i < data_off {
        match tcp[i] {
            TCPOPT_EOL => break,
            TCPOPT_NOP => i += 1,
            kind => {
                let Some(&len) = tcp.get(i + 1) else {
                    return Clamp::Malformed;
                };
                let len = usize::from(len);
                if len < 2 || i + len > data_off {
                    return Clamp::Malformed;
                }
                if kind == TCPOPT_MSS && len == 4 {
                    let mss = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if mss <= max {
                        return Clamp::Unchanged;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&max.to_be_bytes());
                    let sum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    // The option sits at an even offset, so it is one aligned 16-bit word.
                    let sum = if (l4 + i + 2) % 2 == 0 {
                        checksum_replace(sum, mss, max)
                    } else {
                        checksum_replace(sum, mss.swap_bytes(), max.swap_bytes())
                    };
                    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
                    return Clamp::Lowered(mss);
                }
                i += len;
            }
        }
    }
    Clamp::Unchanged
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m').
pub fn checksum_replace(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Internet checksum over `parts`.
    fn csum(parts: &[&[u8]]) -> u16 {
        let mut s: u32 = 0;
        let bytes: Vec<u8> = parts.concat();
        for c in bytes.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// An IPv4 TCP SYN with the given options, with a valid TCP checksum.
    fn syn_v4(options: &[u8], flags: u8) -> Vec<u8> {
        let tcp_len = 20 + options.len();
        let mut p = vec![0u8; 20 + tcp_len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 10]);
        p[16..20].copy_from_slice(&[10, 2, 0, 4]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&443u16.to_be_bytes());
        t[12] = ((tcp_len / 4) as u8) << 4;
        t[13] = flags;
        t[20..].copy_from_slice(options);
        fix_tcp_csum(&mut p);
        p
    }

    fn fix_tcp_csum(p: &mut [u8]) {
        p[36] = 0;
        p[37] = 0;
        let c = tcp_csum(p);
        p[36..38].copy_from_slice(&c.to_be_bytes());
    }

    fn tcp_csum(p: &[u8]) -> u16 {
        let len = (p.len() - 20) as u16;
        csum(&[&p[12..20], &[0, 6], &len.to_be_bytes(), &p[20..]])
    }

    #[test]
    fn lowers_a_large_mss_and_keeps_the_checksum_valid() {
        // MSS 1460, then SACK-permitted, NOP, window scale.
        let opts = [2, 4, 0x05, 0xb4, 4, 2, 1, 3, 3, 7];
        let mut opts12 = opts.to_vec();
        opts12.extend_from_slice(&[0, 0]);
        let mut p = syn_v4(&opts12, 0x02);
        assert_eq!(clamp_mss(&mut p, 1350), Clamp::Lowered(1460));
        assert_eq!(u16::from_be_bytes([p[42], p[43]]), 1350);
        assert_eq!(tcp_csum(&p), 0, "checksum must still verify");
    }

    #[test]
    fn odd_offset_option_after_a_nop() {
        // NOP, MSS 9000 (starts at an odd offset), padding.
        let mut p = syn_v4(&[1, 2, 4, 0x23, 0x28, 0, 0, 0], 0x12);
        assert_eq!(clamp_mss(&mut p, 1350), Clamp::Lowered(9000));
        assert_eq!(u16::from_be_bytes([p[43], p[44]]), 1350);
        assert_eq!(tcp_csum(&p), 0);
    }

    #[test]
    fn leaves_small_mss_non_syn_and_non_tcp_alone() {
        let mut p = syn_v4(&[2, 4, 0x04, 0x00], 0x02);
        let before = p.clone();
        assert_eq!(clamp_mss(&mut p, 1350), Clamp::Unchanged);
        assert_eq!(p, before);
        let mut ack = syn_v4(&[2, 4, 0x05, 0xb4], 0x10);
        assert_eq!(clamp_mss(&mut ack, 1350), Clamp::Unchanged);
        let mut udp = syn_v4(&[2, 4, 0x05, 0xb4], 0x02);
        udp[9] = 17;
        assert_eq!(clamp_mss(&mut udp, 1350), Clamp::Unchanged);
    }

    #[test]
    fn ipv6_syn() {
        let mut p = vec![0u8; 40 + 24];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&24u16.to_be_bytes());
        p[6] = 6;
        p[7] = 64;
        p[40 + 12] = 6 << 4;
        p[40 + 13] = 0x02;
        p[60..64].copy_from_slice(&[2, 4, 0x05, 0xa0]);
        let sum_of = |p: &[u8]| csum(&[&p[8..40], &[0, 0, 0, 24, 0, 0, 0, 6], &p[40..]]);
        let c = sum_of(&p);
        p[56..58].copy_from_slice(&c.to_be_bytes());
        assert_eq!(clamp_mss(&mut p, 1350), Clamp::Lowered(1440));
        assert_eq!(sum_of(&p), 0);
    }

    #[test]
    fn malformed_input_never_panics() {
        let good = syn_v4(&[2, 4, 0x05, 0xb4], 0x02);
        for len in 0..good.len() {
            let mut p = good[..len].to_vec();
            let _ = clamp_mss(&mut p, 1350);
        }
        // Option length running past the header, zero-length option, bad IHL.
        for opts in [[2u8, 9, 0, 0], [3, 0, 0, 0], [2, 1, 0, 0]] {
            let mut p = syn_v4(&opts, 0x02);
            assert_eq!(clamp_mss(&mut p, 1350), Clamp::Malformed);
        }
        let mut p = good.clone();
        p[0] = 0x41;
        assert_eq!(clamp_mss(&mut p, 1350), Clamp::Malformed);
        let mut p = good;
        p[32] = 0xf0; // data offset 60 > segment
        assert_eq!(clamp_mss(&mut p, 1350), Clamp::Malformed);
    }
}
