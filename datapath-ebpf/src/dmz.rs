//! XDP on the DMZ (Microsoft-peering) interface: the article's "only accept
//! traffic from the allowed Microsoft-peering prefixes", at XDP speed.
//!
//! Every packet is counted in exactly one [`DmzCounter`]. The source address
//! is checked first: a packet from outside the allowlist is dropped before it
//! reaches the stack, whatever it carries. Allowed packets are then split into
//! IKE (UDP 500), NAT-T IKE and keepalives (UDP 4500, RFC 3948 §2.2/2.3),
//! ESP in UDP (RFC 3948 §2.1), ESP (IP protocol 50) and everything else.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    macros::{map, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, XskMap, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use xesp_common::{
    ALLOW_MAX_ENTRIES, DmzCounter, EspSteer, STEER_MAX_ENTRIES, SteerCounter, TunnelCounter,
    XSK_SLOTS,
    wire::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IKE_PORT, IPPROTO_ESP, IPPROTO_UDP, NATT_PORT},
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
#[inline(always)]
fn steer_esp(ctx: &XdpContext, spi: u32) -> u32 {
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
fn classify(ctx: &XdpContext) -> (DmzCounter, u32) {
    match be16(ctx, 12) {
        Ok(ETH_P_IP) => ipv4(ctx),
        Ok(ETH_P_IPV6) => ipv6(ctx),
        Ok(_) => (DmzCounter::NonIp, PASS),
        Err(()) => (DmzCounter::DropMalformed, DROP),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext) -> (DmzCounter, u32) {
    // The fixed 20-octet header in one read (see `transport` on why).
    let Ok(h) = load::<[u8; 20]>(ctx, ETH_HLEN) else {
        return (DmzCounter::DropMalformed, DROP);
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
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
    // Non-first fragments carry no transport header: the stack reassembles them.
    if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
        return (DmzCounter::Allowed, PASS);
    }
    transport(ctx, h[9], ETH_HLEN + ihl)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext) -> (DmzCounter, u32) {
    let Ok(h) = load::<[u8; 40]>(ctx, ETH_HLEN) else {
        return (DmzCounter::DropMalformed, DROP);
    };
    let mut saddr = [0u8; 16];
    saddr.copy_from_slice(&h[8..24]);
    // Link-local sources (fe80::/10: neighbour discovery) never leave the link.
    let link_local = saddr[0] == 0xfe && saddr[1] & 0xc0 == 0x80;
    if !link_local && ALLOW_V6.get(Key::new(128, saddr)).is_none() {
        return (DmzCounter::DropNotAllowed, DROP);
    }
    // Extension headers are not walked: such packets are "other" traffic.
    transport(ctx, h[6], ETH_HLEN + 40)
}

/// Classifies an allowed packet by its transport header at `l4`.
///
/// Headers are read whole (never a single octet at a variable offset: LLVM
/// turns `p + 1 > end` into `p >= end`, which the verifier cannot use).
#[inline(always)]
fn transport(ctx: &XdpContext, proto: u8, l4: usize) -> (DmzCounter, u32) {
    match proto {
        IPPROTO_UDP => udp(ctx, l4),
        // SPI then sequence number must be there; SPIs 1-255 are reserved and
        // 0 is never sent (RFC 4303 §2.1).
        IPPROTO_ESP => match load::<[u8; 8]>(ctx, l4) {
            Ok(h) if spi(&h, 0) > 255 => (DmzCounter::Esp, steer_esp(ctx, spi(&h, 0))),
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
fn udp(ctx: &XdpContext, l4: usize) -> (DmzCounter, u32) {
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
                Ok(p) if spi(&p, 8) > 255 => (DmzCounter::NattEsp, steer_esp(ctx, spi(&p, 8))),
                _ => (DmzCounter::DropMalformed, DROP),
            },
        },
        _ => (DmzCounter::Allowed, PASS),
    }
}
