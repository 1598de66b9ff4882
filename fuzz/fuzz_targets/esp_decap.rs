//! ESP decapsulation must never panic, whatever arrives.
//!
//! The first octet picks a mode: raw bytes as an outer IPv4 packet (what the
//! network can send), or a packet that was validly encapsulated from
//! fuzzer-chosen inner bytes and then mutated at fuzzer-chosen places (so that
//! the code past the ICV check is reached too).
#![no_main]

use std::{net::Ipv4Addr, time::Instant};

use libfuzzer_sys::fuzz_target;
use xesp_esp::{
    alg::{AesKeyBits, Encr, Integ, Suite},
    sa::{InboundSa, Lifetime, NattPorts, OutboundSa, SaParams, Tunnel},
    wire::{Outer, parse_outer},
};

const SUITES: [Suite; 3] = [
    Suite { encr: Encr::AesGcm16(AesKeyBits::B256), integ: None },
    Suite { encr: Encr::AesCbc(AesKeyBits::B256), integ: Some(Integ::HmacSha1_96) },
    Suite { encr: Encr::Des3Cbc, integ: Some(Integ::HmacSha2_256_128) },
];

fn params(suite: Suite, keymat: &[u8], esn: bool) -> SaParams<'_> {
    SaParams {
        spi: 0x1000,
        suite,
        keymat,
        esn,
        replay_window: 64,
        tunnel: Tunnel {
            local: Ipv4Addr::new(192, 0, 2, 1),
            remote: Ipv4Addr::new(203, 0, 113, 11),
            natt: Some(NattPorts { local: 4500, remote: 4500 }),
        },
        lifetime: Lifetime::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let suite = SUITES[usize::from(mode >> 2) % SUITES.len()];
    let esn = mode & 2 != 0;
    let keymat = vec![0x5a; suite.keymat_len()];
    let now = Instant::now();
    let Ok(inb) = InboundSa::new(&params(suite, &keymat, esn), now) else { return };
    let mut buf;
    if mode & 1 == 0 {
        buf = rest.to_vec();
    } else {
        // rest = [n mutations (1 octet), n x (position u16, xor u8), inner packet]
        let Some((&n, rest)) = rest.split_first() else { return };
        let n = usize::from(n % 8);
        if rest.len() < n * 3 {
            return;
        }
        let (muts, inner) = rest.split_at(n * 3);
        let Ok(out) = OutboundSa::new(&params(suite, &keymat, esn), now) else { return };
        buf = vec![0u8; 64 + inner.len() + 64];
        buf[64..64 + inner.len()].copy_from_slice(inner);
        let Ok(outer) = out.encapsulate(&mut buf, 64..64 + inner.len()) else { return };
        buf.truncate(outer.end);
        buf.drain(..outer.start);
        for m in muts.chunks_exact(3) {
            let at = usize::from(u16::from_be_bytes([m[0], m[1]]));
            if let Some(b) = buf.get_mut(at) {
                *b ^= m[2];
            }
        }
    }
    if let Ok(Outer::Esp { esp, .. }) = parse_outer(&buf) {
        if let Ok(d) = inb.decapsulate(&mut buf, esp) {
            assert!(d.inner.end <= buf.len());
        }
    }
    // Also the ESP payload taken as-is, without an outer header.
    let len = buf.len();
    let _ = inb.decapsulate(&mut buf, 0..len);
});
