//! Bounds-checked packet access for XDP: every read is checked against
//! `data_end`, which is also what the verifier demands.

use aya_ebpf::programs::XdpContext;

/// Reads a `T` at `offset` from the start of the packet, or `Err` past the end.
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    // SAFETY: the range [start + offset, start + offset + size_of::<T>()) was just
    // checked to lie inside the packet; read_unaligned makes no alignment claim.
    Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// A big-endian u16 at `offset`.
#[inline(always)]
pub fn be16(ctx: &XdpContext, offset: usize) -> Result<u16, ()> {
    load::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}
