//! The null forwarder: a baseline of `cargo xtask bench`, never a mode of
//! the gateway.
//!
//! It exists only in builds with the `null-forwarder` feature of this crate,
//! which the benchmark turns on for a second copy of the binary it builds
//! for itself (`target/release/xesp-null-forwarder`); no configuration
//! setting, option or environment variable reaches it, and the daemon built
//! without the feature has none of this code. In such a build every packet
//! the AF_XDP workers take goes through the same XDP programs, sockets,
//! rings and worker loop as in xesp, and through the worker's own code for
//! the rest (`worker::Ctx`: parsing, next-hop cache, TTL, MSS clamping,
//! Ethernet rewrite, counters); only the ESP work is replaced by removing (inbound) or adding
//! (outbound) the same number of header and trailer octets as ESP does: no
//! cipher, no integrity check, no SA lookup per packet. What it delivers per
//! second is the ceiling of this machine's AF_XDP path; xesp's distance to
//! it is what the ESP work costs.
//!
//! The benchmark's peer sends it "ESP" whose payload is the inner packet in
//! the clear (same layout and length as real ESP). The SPI, the outer
//! addresses and the transform's IV and ICV lengths of each tunnel come from
//! its SAs, read at most once a second per tunnel and worker (a thread-local
//! cache), not per packet.

use std::{
    cell::RefCell,
    ops::Range,
    time::{Duration, Instant},
};

use xesp_esp::{
    alg::Suite,
    sa::{OuterHeaders, Tunnel},
    wire::{ESP_HLEN, ESP_TRAILER, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN},
};

use crate::{
    slowpath::SlowPath,
    worker::{Counter, Ctx, ip_of},
    xsk::{Frame, SockId, Verdict},
};

const MAX_TUNNELS: usize = xesp_common::MAX_TUNNELS as usize;
/// How long a tunnel's shape is used before its SAs are read again.
const REFRESH: Duration = Duration::from_secs(1);

/// What the null forwarder needs to know of a tunnel's SAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub spi: u32,
    /// The outer headers, written as xesp's leases write them.
    pub outer: OuterHeaders,
    pub iv: usize,
    pub icv: usize,
    pub block: usize,
}

impl Shape {
    pub fn new(spi: u32, tunnel: Tunnel, suite: Suite) -> Self {
        Self {
            spi,
            outer: OuterHeaders::new(&tunnel),
            iv: suite.encr.iv_len(),
            icv: suite.icv_len(),
            block: suite.encr.block_len().max(4),
        }
    }

    fn outer_head(&self) -> usize {
        self.outer.header_len() + ESP_HLEN + self.iv
    }

    fn pad(&self, inner_len: usize) -> usize {
        (self.block - (inner_len + ESP_TRAILER) % self.block) % self.block
    }
}

/// Removes ESP's header and trailer from the ESP packet at `buf[esp]`,
/// whose payload is in the clear: returns the inner packet's range and the
/// Next Header. `None` when the lengths do not add up.
pub fn strip(buf: &[u8], esp: Range<usize>, shape: &Shape) -> Option<(Range<usize>, u8)> {
    let start = esp.start + ESP_HLEN + shape.iv;
    let end = esp.end.checked_sub(shape.icv)?;
    if end < start + ESP_TRAILER || end > buf.len() {
        return None;
    }
    let pad = usize::from(buf[end - 2]);
    let next_header = buf[end - 1];
    let inner_end = (end - ESP_TRAILER).checked_sub(pad)?;
    (inner_end >= start).then_some((start..inner_end, next_header))
}

/// Adds ESP's header, padding, trailer and an ICV's room (zeros) around the
/// inner packet at `buf[inner]`, and the outer IPv4 (and UDP) header:
/// returns where the outer packet lies. `None` without room or with an
/// inner packet that is not IP.
pub fn wrap(
    buf: &mut [u8],
    inner: Range<usize>,
    shape: &Shape,
    seq: u32,
    ip_id: u16,
) -> Option<Range<usize>> {
    let head = shape.outer_head();
    let pad = shape.pad(inner.len());
    let ct_end = inner.end + pad + ESP_TRAILER;
    let end = ct_end + shape.icv;
    let start = inner.start.checked_sub(head)?;
    if end > buf.len() {
        return None;
    }
    let p = &buf[inner.clone()];
    let (next_header, tos, df) = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= IPV4_HLEN => (IPPROTO_IPIP, p[1], p[6] & 0x40 != 0),
        Some(6) if p.len() >= 40 => (IPPROTO_IPV6, (p[0] << 4) | (p[1] >> 4), false),
        _ => return None,
    };
    for (i, b) in buf[inner.end..inner.end + pad].iter_mut().enumerate() {
        *b = (i + 1) as u8;
    }
    buf[ct_end - 2] = pad as u8;
    buf[ct_end - 1] = next_header;
    buf[ct_end..end].fill(0);
    let esp = inner.start - ESP_HLEN - shape.iv;
    buf[esp..esp + 4].copy_from_slice(&shape.spi.to_be_bytes());
    buf[esp + 4..esp + 8].copy_from_slice(&seq.to_be_bytes());
    buf[esp + 8..inner.start].fill(0);
    shape
        .outer
        .write(&mut buf[start..esp], tos, (end - start) as u16, ip_id, df);
    Some(start..end)
}

/// Per worker thread: each tunnel's shapes (inbound, outbound) and when read.
struct State {
    inbound: [Option<(Shape, Instant)>; MAX_TUNNELS],
    outbound: [Option<(Shape, Instant)>; MAX_TUNNELS],
    seq: u32,
    ip_id: u16,
}

thread_local! {
    static STATE: RefCell<State> = {
        log::warn!("AF_XDP worker: NULL FORWARDER (benchmark build): no ESP is done");
        RefCell::new(State {
            inbound: [None; MAX_TUNNELS],
            outbound: [None; MAX_TUNNELS],
            seq: 0,
            ip_id: 0,
        })
    };
}

fn fresh(s: &Option<(Shape, Instant)>, now: Instant) -> Option<Shape> {
    s.filter(|(_, at)| now.saturating_duration_since(*at) < REFRESH)
        .map(|(s, _)| s)
}

fn inbound_shape(path: &SlowPath, tunnel: usize, spi: u32, now: Instant) -> Option<Shape> {
    STATE.with_borrow_mut(|st| {
        let slot = st.inbound.get_mut(tunnel)?;
        if let Some(s) = fresh(slot, now).filter(|s| s.spi == spi) {
            return Some(s);
        }
        let e = path.sadb.inbound(spi)?;
        let s = Shape::new(spi, e.endpoints, e.sa.suite());
        *slot = Some((s, now));
        Some(s)
    })
}

fn outbound_shape(path: &SlowPath, tunnel: usize, pkt: &[u8], now: Instant) -> Option<Shape> {
    STATE.with_borrow_mut(|st| {
        let slot = st.outbound.get_mut(tunnel)?;
        if let Some(s) = fresh(slot, now) {
            return Some(s);
        }
        let e = path.sadb.outbound_for(tunnel as u32, pkt).ok()?;
        let s = Shape::new(e.sa.spi(), e.endpoints, e.sa.suite());
        *slot = Some((s, now));
        Some(s)
    })
}

/// The worker's `decrypt_to_lan` without ESP: "ESP" from the DMZ → the
/// LAN (the worker counted it as received), through the worker's own
/// parsing and forwarding tail.
pub(crate) fn decrypt_to_lan(ctx: &mut Ctx<'_>, f: &mut Frame<'_>, lan_tx: SockId) -> Verdict {
    let Some((spi, esp)) = ctx.esp_of(f) else {
        return Verdict::Drop;
    };
    let Some(shape) = inbound_shape(ctx.path, ctx.tunnel, spi, ctx.now) else {
        return Verdict::Drop;
    };
    let Some((inner, next_header)) = strip(f.buf, esp, &shape) else {
        ctx.c.add(Counter::Malformed, 1);
        return Verdict::Drop;
    };
    let tunnel = ctx.tunnel;
    ctx.forward_inner(f, inner, next_header, tunnel, lan_tx)
}

/// The worker's `encrypt_to_dmz` without ESP: a LAN packet → "ESP" on the
/// DMZ (the worker counted it as received), through the worker's own
/// forwarding tail.
pub(crate) fn encrypt_to_dmz(ctx: &mut Ctx<'_>, f: &mut Frame<'_>, dmz_tx: SockId) -> Verdict {
    let Some((_, inner)) = ip_of(f) else {
        ctx.c.add(Counter::Malformed, 1);
        return Verdict::Drop;
    };
    let Some(shape) = outbound_shape(ctx.path, ctx.tunnel, &f.buf[inner.clone()], ctx.now) else {
        return Verdict::Drop;
    };
    if !ctx.prepare_inner(f, inner.clone()) {
        return Verdict::Drop;
    }
    let (seq, ip_id) = STATE.with_borrow_mut(|st| {
        st.seq = st.seq.wrapping_add(1);
        st.ip_id = st.ip_id.wrapping_add(1);
        (st.seq, st.ip_id)
    });
    let Some(outer) = wrap(f.buf, inner, &shape, seq, ip_id) else {
        ctx.c.add(Counter::Malformed, 1);
        return Verdict::Drop;
    };
    ctx.send_outer(f, outer, shape.outer.tunnel(), dmz_tx)
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Instant};

    use xesp_esp::{
        alg::{AesKeyBits, Encr, Integ},
        sa::{InboundSa, Lifetime, NattPorts, OutboundSa, SaParams},
        wire::{Outer, UDP_HLEN, parse_outer},
    };

    use super::*;

    fn inner_packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 10]);
        p[16..20].copy_from_slice(&[10, 2, 0, 16]);
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    /// The null forwarder's packets have exactly ESP's lengths, and what it
    /// wraps it strips back to the same inner packet.
    #[test]
    fn same_lengths_as_esp_and_strip_undoes_wrap() {
        let tunnel = Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(203, 0, 113, 11),
            natt: Some(NattPorts {
                local: 4500,
                remote: 4500,
            }),
        };
        let suites = [
            Suite::new(Encr::AesGcm16(AesKeyBits::B256), None),
            Suite::new(Encr::AesCbc(AesKeyBits::B256), Some(Integ::HmacSha1_96)),
        ];
        for suite in suites.into_iter().map(|s| s.expect("valid suite")) {
            let keymat = vec![7u8; suite.keymat_len()];
            let params = SaParams {
                spi: 0x1234_5678,
                suite,
                keymat: &keymat,
                esn: false,
                tunnel,
                replay_window: 0,
                lifetime: Lifetime::default(),
            };
            let real = OutboundSa::new(&params, Instant::now()).expect("SA");
            let shape = Shape::new(0x1234_5678, tunnel, suite);
            for (n, len) in [28, 64, 511, 512, 1400].into_iter().enumerate() {
                let p = inner_packet(len);
                let mut a = vec![0u8; 2048];
                a[256..256 + len].copy_from_slice(&p);
                let mut b = a.clone();
                let esp = real.encapsulate(&mut a, 256..256 + len).expect("ESP");
                let null = wrap(&mut b, 256..256 + len, &shape, 1, n as u16 + 1).expect("wrapped");
                assert_eq!(null, esp, "{suite:?} {len}: the same octets as ESP");
                let h = IPV4_HLEN + UDP_HLEN + 4;
                assert_eq!(
                    b[null.start..null.start + h],
                    a[esp.start..esp.start + h],
                    "{len}: the same outer IPv4, UDP headers and SPI"
                );
                let outer = parse_outer(&b[null.clone()]).expect("valid outer header");
                let Outer::Esp { spi, esp, .. } = outer else {
                    panic!("not ESP")
                };
                assert_eq!(spi, 0x1234_5678);
                let esp = null.start + esp.start..null.start + esp.end;
                let (inner, nh) = strip(&b, esp.clone(), &shape).expect("stripped");
                assert_eq!((inner.clone(), nh), (256..256 + len, IPPROTO_IPIP));
                assert_eq!(b[inner], p[..]);
                // The real SA cannot open it: nothing was encrypted.
                let inb = InboundSa::new(&params, Instant::now()).expect("SA");
                assert!(inb.decapsulate(&mut b, esp).is_err());
            }
        }
    }

    #[test]
    fn bad_lengths_are_refused() {
        let tunnel = Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(203, 0, 113, 11),
            natt: None,
        };
        let suite = Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).expect("valid suite");
        let shape = Shape::new(0x1000, tunnel, suite);
        let mut buf = vec![0u8; 100];
        // A pad length longer than the packet.
        buf[60 - 16 - 2] = 200;
        assert_eq!(strip(&buf, 0..60, &shape), None);
        assert_eq!(
            strip(&buf, 0..20, &shape),
            None,
            "shorter than header + ICV"
        );
        let mut small = inner_packet(64);
        small.resize(80, 0);
        assert_eq!(wrap(&mut small, 0..64, &shape, 1, 1), None, "no headroom");
        let mut junk = vec![0u8; 400];
        assert_eq!(wrap(&mut junk, 100..164, &shape, 1, 1), None, "not IP");
    }
}
