//! Per-CPU counters shared by the programs.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use xesp_common::{MAX_TUNNELS, TunnelCounter, tunnel_counter};

#[map(name = "TUNNEL_COUNTERS")]
static TUNNEL_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_TUNNELS * TunnelCounter::COUNT, 0);

/// Adds `n` to slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn add(counters: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(c) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *c += n };
    }
}

/// Counts one packet of `bytes` steered to `tunnel`.
#[inline(always)]
pub fn tunnel(tunnel: u32, packets: TunnelCounter, bytes: TunnelCounter, len: u64) {
    add(&TUNNEL_COUNTERS, tunnel_counter(tunnel, packets), 1);
    add(&TUNNEL_COUNTERS, tunnel_counter(tunnel, bytes), len);
}
