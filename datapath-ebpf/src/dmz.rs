//! XDP on the DMZ (Microsoft-peering) interface: the article's "only accept
//! traffic from the allowed Microsoft-peering prefixes", at XDP speed.
//!
//! Every packet is counted in exactly one [`DmzCounter`]. Up to two VLAN
//! tags (an 802.1Q C-TAG, or an 802.1ad S-TAG and a C-TAG: QinQ) are skipped
//! and the rules below apply to what they carry; ARP passes, and any other
//! frame is dropped unless [`dmz_flags::PASS_UNCLASSIFIED`] is set. For IP the
//! source address is checked first: a packet from outside the allowlist is
//! dropped before it reaches the stack, whatever it carries. IPv6 link-local
//! (and unspecified) sources get only neighbour discovery through. Fragments
//! go to the stack, which reassembles them. Allowed packets are then split
//! into IKE (UDP 500), NAT-T IKE and keepalives (UDP 4500, RFC 3948
//! §2.2/2.3), ESP in UDP (RFC 3948 §2.1), ESP (IP protocol 50) and
//! everything else.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, XskMap, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use xesp_common::{
    ALLOW_MAX_ENTRIES, DmzCounter, EspSteer, STEER_MAX_ENTRIES, SteerCounter, TunnelCounter,
    XSK_SLOTS, dmz_flags,
    wire::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IKE_PORT,
        IPPROTO_DSTOPTS, IPPROTO_ESP, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ICMPV6,
        IPPROTO_ROUTING, IPPROTO_UDP, NATT_PORT, VLAN_HLEN,
    },
    xsk_slot,
};

use crate::{
    counters,
    parse::{be16, load},
};

#[map(name = "DMZ_COUNTERS")]
static DMZ_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DmzCounter::COUNT, 0);

#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], u32> =
    LpmTrie::with_max_entries(ALLOW_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u32> =
    LpmTrie::with_max_entries(ALLOW_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "DMZ_CONFIG")]
static DMZ_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "ESP_STEER")]
static ESP_STEER: HashMap<u32, EspSteer> = HashMap::with_max_entries(STEER_MAX_ENTRIES, 0);

#[map(name = "DMZ_XSKS")]
static DMZ_XSKS: XskMap = XskMap::with_max_entries(XSK_SLOTS, 0);

#[map(name = "STEER_COUNTERS")]
static STEER_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SteerCounter::COUNT, 0);

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;

#[xdp]
pub fn xdp_dmz(ctx: XdpContext) -> u32 {
    let (counter, action) = classify(&ctx);
    counters::add(&DMZ_COUNTERS, counter as u32, 1);
    action
}

/// ESP of a known inbound SA goes to its tunnel's AF_XDP socket on this
/// queue; anything else goes to the stack (the daemon's slow path counts it).
/// The workers parse untagged frames only, so VLAN-tagged ESP goes to the
/// stack too, where the VLAN device strips the tag.
#[inline(always)]
fn steer_esp(ctx: &XdpContext, spi: u32, tagged: bool) -> u32 {
    if tagged {
        counters::add(&STEER_COUNTERS, SteerCounter::Tagged as u32, 1);
        return PASS;
    }
    // SAFETY: the value is copied out before any other map operation.
    let Some(steer) = (unsafe { ESP_STEER.get(spi) }).copied() else {
        counters::add(&STEER_COUNTERS, SteerCounter::NoSa as u32, 1);
        return PASS;
    };
    let slot = xsk_slot(ctx.rx_queue_index(), steer.tunnel);
    match DMZ_XSKS.redirect(slot, u64::from(PASS)) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => {
            counters::add(&STEER_COUNTERS, SteerCounter::Redirected as u32, 1);
            let len = (ctx.data_end() - ctx.data()) as u64;
            counters::tunnel(
                steer.tunnel,
                TunnelCounter::EspPackets,
                TunnelCounter::EspBytes,
                len,
            );
            action
        }
        _ => {
            counters::add(&STEER_COUNTERS, SteerCounter::NoSocket as u32, 1);
            PASS
        }
    }
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> (DmzCounter, u32) {
    // IEEE 802.1Q §9.6: a tag is a TPID (0x8100 C-TAG, 0x88A8 S-TAG) and a
    // TCI, followed by the ethertype of what it carries. Two tags at most
    // (802.1ad QinQ: S-TAG then C-TAG); a third is not classified.
    let Ok(mut ethertype) = be16(ctx, 12) else {
        return (DmzCounter::DropMalformed, DROP);
    };
    let mut l3 = ETH_HLEN;
    if is_vlan(ethertype) {
        let Ok(t) = be16(ctx, ETH_HLEN + 2) else {
            return (DmzCounter::DropMalformed, DROP);
        };
        ethertype = t;
        l3 = ETH_HLEN + VLAN_HLEN;
        if is_vlan(ethertype) {
            let Ok(t) = be16(ctx, ETH_HLEN + VLAN_HLEN + 2) else {
                return (DmzCounter::DropMalformed, DROP);
            };
            ethertype = t;
            l3 = ETH_HLEN + 2 * VLAN_HLEN;
        }
    }
    match ethertype {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        ETH_P_ARP => (DmzCounter::Arp, PASS),
        _ => unclassified(),
    }
}

/// A frame the filter has no rule for: dropped unless the setting says pass.
#[inline(always)]
fn unclassified() -> (DmzCounter, u32) {
    let flags = DMZ_CONFIG.get(0).copied().unwrap_or(0);
    if flags & dmz_flags::PASS_UNCLASSIFIED != 0 {
        (DmzCounter::PassUnclassified, PASS)
    } else {
        (DmzCounter::DropUnclassified, DROP)
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> (DmzCounter, u32) {
    // The fixed 20-octet header in one read (see `transport` on why).
    let Ok(h) = load::<[u8; 20]>(ctx, l3) else {
        return (DmzCounter::DropMalformed, DROP);
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    // RFC 791 §3.1: IHL counts 32-bit words, at least 5; the total length
    // covers the header.
    if h[0] >> 4 != 4 || ihl < 20 || total < ihl {
        return (DmzCounter::DropMalformed, DROP);
    }
    let saddr = [h[12], h[13], h[14], h[15]];
    if ALLOW_V4.get(Key::new(32, saddr)).is_none() {
        debug!(
            ctx,
            "dmz: drop {}.{}.{}.{}: source not allowed", saddr[0], saddr[1], saddr[2], saddr[3]
        );
        return (DmzCounter::DropNotAllowed, DROP);
    }
    // RFC 791 §3.2: every fragment (more-fragments set or a non-zero offset),
    // first or not, goes to the stack to be reassembled; the workers only
    // take whole ESP packets (RFC 4303 §3.4.1: reassembly precedes ESP).
    if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return (DmzCounter::Fragment, PASS);
    }
    transport(ctx, h[9], l3 + ihl, l3 != ETH_HLEN)
}

/// ICMPv6 types of neighbour discovery (RFC 4861 §4): router solicitation
/// and advertisement, neighbour solicitation and advertisement, redirect.
const ND_TYPES: core::ops::RangeInclusive<u8> = 133..=137;

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> (DmzCounter, u32) {
    let Ok(h) = load::<[u8; 40]>(ctx, l3) else {
        return (DmzCounter::DropMalformed, DROP);
    };
    if h[0] >> 4 != 6 {
        return (DmzCounter::DropMalformed, DROP);
    }
    let mut saddr = [0u8; 16];
    saddr.copy_from_slice(&h[8..24]);
    let (next, hop_limit) = (h[6], h[7]);
    // Link-local sources (fe80::/10, RFC 4291 §2.5.6) and the unspecified
    // address (duplicate address detection, RFC 4862 §5.4) are not in any
    // allowlist; they get neighbour discovery through and nothing else. ND
    // must arrive with hop limit 255 (RFC 4861 §6.1.1, §7.1.1), which proves
    // it was not forwarded.
    let link_local = saddr[0] == 0xfe && saddr[1] & 0xc0 == 0x80;
    if link_local || saddr == [0u8; 16] {
        if next == IPPROTO_ICMPV6
            && hop_limit == 255
            && let Ok(icmp) = load::<[u8; 4]>(ctx, l3 + 40)
            && ND_TYPES.contains(&icmp[0])
        {
            return (DmzCounter::Ipv6Nd, PASS);
        }
        return (DmzCounter::DropLinkLocal, DROP);
    }
    if ALLOW_V6.get(Key::new(128, saddr)).is_none() {
        return (DmzCounter::DropNotAllowed, DROP);
    }
    // RFC 8200 §4: walk up to two hop-by-hop, routing or destination options
    // headers (length in 8-octet units, not counting the first 8); a Fragment
    // header (§4.5) sends the packet to the stack for reassembly. Past that,
    // what is left is "other" traffic from an allowed source.
    let mut next = next;
    let mut at = l3 + 40;
    for _ in 0..2 {
        match next {
            IPPROTO_FRAGMENT => return (DmzCounter::Fragment, PASS),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Ok(x) = load::<[u8; 2]>(ctx, at) else {
                    return (DmzCounter::DropMalformed, DROP);
                };
                next = x[0];
                at += (x[1] as usize + 1) * 8;
            }
            _ => break,
        }
    }
    if next == IPPROTO_FRAGMENT {
        return (DmzCounter::Fragment, PASS);
    }
    transport(ctx, next, at, l3 != ETH_HLEN)
}

/// Classifies an allowed packet by its transport header at `l4`.
///
/// Headers are read whole (never a single octet at a variable offset: LLVM
/// turns `p + 1 > end` into `p >= end`, which the verifier cannot use).
#[inline(always)]
fn transport(ctx: &XdpContext, proto: u8, l4: usize, tagged: bool) -> (DmzCounter, u32) {
    match proto {
        IPPROTO_UDP => udp(ctx, l4, tagged),
        // SPI then sequence number must be there; SPIs 1-255 are reserved and
        // 0 is never sent (RFC 4303 §2.1).
        IPPROTO_ESP => match load::<[u8; 8]>(ctx, l4) {
            Ok(h) if spi(&h, 0) > 255 => (DmzCounter::Esp, steer_esp(ctx, spi(&h, 0), tagged)),
            _ => (DmzCounter::DropMalformed, DROP),
        },
        _ => (DmzCounter::Allowed, PASS),
    }
}

#[inline(always)]
fn spi(h: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

#[inline(always)]
fn udp(ctx: &XdpContext, l4: usize, tagged: bool) -> (DmzCounter, u32) {
    let Ok(h) = load::<[u8; 8]>(ctx, l4) else {
        return (DmzCounter::DropMalformed, DROP);
    };
    let dport = u16::from_be_bytes([h[2], h[3]]);
    let ulen = u16::from_be_bytes([h[4], h[5]]) as usize;
    if ulen < 8 {
        return (DmzCounter::DropMalformed, DROP);
    }
    match dport {
        IKE_PORT => (DmzCounter::Ike, PASS),
        NATT_PORT => match ulen - 8 {
            1 => match load::<[u8; 9]>(ctx, l4) {
                Ok(k) if k[8] == 0xff => (DmzCounter::NattKeepalive, PASS),
                _ => (DmzCounter::DropMalformed, DROP),
            },
            // Room for neither a non-ESP marker + IKE header nor an ESP header.
            0 | 2..8 => (DmzCounter::DropMalformed, DROP),
            _ => match load::<[u8; 16]>(ctx, l4) {
                Ok(p) if spi(&p, 8) == 0 => (DmzCounter::NattIke, PASS),
                Ok(p) if spi(&p, 8) > 255 => {
                    (DmzCounter::NattEsp, steer_esp(ctx, spi(&p, 8), tagged))
                }
                _ => (DmzCounter::DropMalformed, DROP),
            },
        },
        _ => (DmzCounter::Allowed, PASS),
    }
}
