//! XDP sink of `cargo xtask bench`: counts what the device under test
//! delivers and drops it before the stack, so that counting costs next to
//! nothing next to the device.
//!
//! * ESP in UDP 4500 (RFC 3948 §2.1) is counted per tunnel by SPI; one packet
//!   in [`bench::SAMPLE_EVERY`] passes to the stack, where the benchmark's
//!   IKE peer decrypts it and checks the payload.
//! * UDP to [`bench::PORT`] is counted as valid when its payload begins with
//!   [`bench::MAGIC`].
//! * Everything else (ARP, IKE) passes.

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use xesp_common::{
    SinkCounter, bench,
    wire::{ETH_HLEN, ETH_P_IP, IPPROTO_UDP, NATT_PORT},
};

use crate::{
    counters,
    parse::{be16, load},
};

#[map(name = "SINK_COUNTERS")]
static SINK_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SinkCounter::COUNT, 0);

#[map(name = "SINK_SPI")]
static SINK_SPI: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;

#[xdp]
pub fn xdp_sink(ctx: XdpContext) -> u32 {
    let (counter, bytes, action) = sink(&ctx).unwrap_or((SinkCounter::Other, 0, PASS));
    counters::add(&SINK_COUNTERS, counter as u32, 1);
    match counter {
        SinkCounter::EspTunnel0 | SinkCounter::EspTunnel1 => {
            counters::add(&SINK_COUNTERS, SinkCounter::EspBytes as u32, bytes);
            if action == PASS {
                counters::add(&SINK_COUNTERS, SinkCounter::EspSampled as u32, 1);
            }
        }
        SinkCounter::PlainValid => {
            counters::add(&SINK_COUNTERS, SinkCounter::PlainBytes as u32, bytes)
        }
        _ => {}
    }
    action
}

#[inline(always)]
fn sink(ctx: &XdpContext) -> Result<(SinkCounter, u64, u32), ()> {
    if be16(ctx, 12)? != ETH_P_IP {
        return Ok((SinkCounter::Other, 0, PASS));
    }
    let vihl: u8 = load(ctx, ETH_HLEN)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    let proto: u8 = load(ctx, ETH_HLEN + 9)?;
    if vihl >> 4 != 4 || ihl < 20 || proto != IPPROTO_UDP {
        return Ok((SinkCounter::Other, 0, PASS));
    }
    let ip_len = u64::from(be16(ctx, ETH_HLEN + 2)?);
    // The verifier wants a constant offset: options are not expected here.
    if ihl != 20 {
        return Ok((SinkCounter::Other, 0, PASS));
    }
    let udp = ETH_HLEN + 20;
    let dport = be16(ctx, udp + 2)?;
    if dport == NATT_PORT {
        let spi = u32::from_be_bytes(load::<[u8; 4]>(ctx, udp + 8)?);
        if spi == 0 {
            return Ok((SinkCounter::Other, 0, PASS));
        }
        let seq = u32::from_be_bytes(load::<[u8; 4]>(ctx, udp + 12)?);
        // SAFETY: the value is copied out at once.
        let counter = match unsafe { SINK_SPI.get(spi) }.copied() {
            Some(0) => SinkCounter::EspTunnel0,
            Some(_) => SinkCounter::EspTunnel1,
            None => return Ok((SinkCounter::EspUnknownSpi, 0, DROP)),
        };
        let action = if seq % bench::SAMPLE_EVERY == 0 {
            PASS
        } else {
            DROP
        };
        return Ok((counter, ip_len, action));
    }
    if dport == bench::PORT {
        let magic: [u8; 8] = load(ctx, udp + 8)?;
        if magic == bench::MAGIC {
            return Ok((SinkCounter::PlainValid, ip_len, DROP));
        }
        return Ok((SinkCounter::PlainInvalid, 0, DROP));
    }
    Ok((SinkCounter::Other, 0, PASS))
}
