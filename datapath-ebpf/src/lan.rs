//! XDP on the LAN interfaces: traffic the kernel FIB routes into a tunnel
//! goes straight to that tunnel's AF_XDP encryption socket.
//!
//! The FIB decides, through `bpf_fib_lookup`: static routes or BIRD's ECMP
//! route over the tunnels' TUN devices (the article's `maximum-paths 2`) pick
//! the tunnel, with the kernel's multipath hash keeping each flow on one
//! tunnel. A tunnel whose SAs are down is skipped: its flows move to a live
//! tunnel chosen by a flow hash, and come back when the FIB and the tunnel
//! agree again. Whatever is not for a live tunnel with a socket goes to the
//! stack unchanged.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, bpf_fib_lookup as FibLookup,
        xdp_action,
    },
    helpers::bpf_fib_lookup,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray, XskMap},
    programs::XdpContext,
};
use xesp_common::{
    LanCounter, MAX_TUNNELS, TunnelCounter, XSK_SLOTS,
    wire::{AF_INET, ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP},
    xsk_slot,
};

use crate::{
    counters,
    parse::{be16, load},
};

#[map(name = "TUNNEL_IFINDEX")]
static TUNNEL_IFINDEX: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TUNNELS, 0);

#[map(name = "TUNNEL_LIVE")]
static TUNNEL_LIVE: Array<u32> = Array::with_max_entries(MAX_TUNNELS, 0);

#[map(name = "LAN_XSKS")]
static LAN_XSKS: XskMap = XskMap::with_max_entries(XSK_SLOTS, 0);

#[map(name = "LAN_COUNTERS")]
static LAN_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LanCounter::COUNT, 0);

const PASS: u32 = xdp_action::XDP_PASS;

#[xdp]
pub fn xdp_lan(ctx: XdpContext) -> u32 {
    let (counter, action) = steer(&ctx);
    counters::add(&LAN_COUNTERS, counter as u32, 1);
    action
}

#[inline(always)]
fn live(tunnel: u32) -> bool {
    TUNNEL_LIVE.get(tunnel).is_some_and(|v| *v != 0)
}

#[inline(always)]
fn steer(ctx: &XdpContext) -> (LanCounter, u32) {
    if be16(ctx, 12) != Ok(ETH_P_IP) {
        return (LanCounter::NotIpv4, PASS);
    }
    let Ok(h) = load::<[u8; 20]>(ctx, ETH_HLEN) else {
        return (LanCounter::DropMalformed, xdp_action::XDP_DROP);
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return (LanCounter::DropMalformed, xdp_action::XDP_DROP);
    }
    let proto = h[9];
    // Ports for the multipath hash (first fragments and unfragmented only).
    let (mut sport, mut dport) = (0u16, 0u16);
    let first_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
    if (proto == IPPROTO_TCP || proto == IPPROTO_UDP)
        && first_fragment
        && let Ok(p) = load::<[u8; 4]>(ctx, ETH_HLEN + ihl)
    {
        sport = u16::from_be_bytes([p[0], p[1]]);
        dport = u16::from_be_bytes([p[2], p[3]]);
    }

    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.sport = sport.to_be();
    fib.dport = dport.to_be();
    fib.__bindgen_anon_1.tot_len = u16::from_be_bytes([h[2], h[3]]);
    fib.__bindgen_anon_2.tos = h[1];
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
    // SAFETY: reading the ingress ifindex from the context the kernel gave us.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // SAFETY: the helper reads and writes `fib`, a valid struct of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        // Local, unreachable, too big for the tunnel MTU, forwarding off: the stack decides.
        return (LanCounter::NotTunneled, PASS);
    }
    // SAFETY: the value is copied out at once.
    let Some(mut tunnel) = (unsafe { TUNNEL_IFINDEX.get(fib.ifindex) }).copied() else {
        return (LanCounter::NotTunneled, PASS);
    };
    if h[8] <= 1 {
        return (LanCounter::TtlExpired, PASS);
    }
    let mut moved = false;
    if !live(tunnel) {
        // A flow hash over the addresses and ports picks the first live tunnel after it.
        let mut x = u32::from_ne_bytes([h[12], h[13], h[14], h[15]])
            ^ u32::from_ne_bytes([h[16], h[17], h[18], h[19]]).rotate_left(16)
            ^ ((u32::from(sport) << 16) | u32::from(dport));
        x = x.wrapping_mul(0x9e37_79b9);
        let start = (x >> 16) % MAX_TUNNELS;
        let mut found = None;
        for i in 0..MAX_TUNNELS {
            let t = (start + i) % MAX_TUNNELS;
            if live(t) {
                found = Some(t);
                break;
            }
        }
        match found {
            Some(t) => {
                tunnel = t;
                moved = true;
            }
            None => return (LanCounter::NoLiveTunnel, PASS),
        }
    }
    match LAN_XSKS.redirect(xsk_slot(ctx.rx_queue_index(), tunnel), u64::from(PASS)) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => {
            if moved {
                counters::add(&LAN_COUNTERS, LanCounter::Failover as u32, 1);
            }
            let len = (ctx.data_end() - ctx.data()) as u64;
            counters::tunnel(
                tunnel,
                TunnelCounter::LanPackets,
                TunnelCounter::LanBytes,
                len,
            );
            (LanCounter::ToTunnel, action)
        }
        _ => (LanCounter::NoSocket, PASS),
    }
}
