//! xesp's eBPF programs. Built for `bpfel-unknown-none` (see datapath-user's
//! build script); on the host this compiles to an empty binary so that
//! workspace-wide checks still type-check the programs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod counters;
mod dmz;
mod lan;
mod parse;
mod sink;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this is never called.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

/// GPL-compatible license: required for the helpers aya-log and XSK redirect use.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
