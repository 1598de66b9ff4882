//! The kernel's ESP SAs of a namespace, as `ip -s xfrm state` prints them:
//! what the lab's kernel-backend gateways (and xesp's `xfrm` datapath)
//! installed, with the kernel's own counters. The keys iproute2 prints
//! never leave this module: each is replaced by `[key]` and its length.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// One SA of `ip -s xfrm state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSa {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// As printed, `0x` and eight hex digits.
    pub spi: String,
    /// Packets and bytes the kernel counted (`lifetime current:`).
    pub packets: u64,
    pub bytes: u64,
    /// The SA's whole text, keys redacted, for algorithm, mode,
    /// encapsulation and if_id.
    pub text: String,
}

/// The algorithm lines of `ip xfrm state`, whose third word is a key.
const KEYED: [&str; 4] = ["aead", "enc", "auth", "auth-trunc"];

/// One algorithm of an SA: its line `KIND NAME 0xKEY [BITS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Algorithm {
    /// The kernel's name, e.g. `rfc4106(gcm(aes))`.
    pub name: String,
    /// Key length in bits (for AEAD, with the salt: 288 for AES-256-GCM).
    pub key_bits: usize,
    /// The ICV length (`aead`) or the truncation (`auth-trunc`), in bits.
    pub bits: Option<u32>,
}

impl KernelSa {
    /// Whether ESP of this SA is UDP-encapsulated (RFC 3948).
    pub fn encapsulated(&self) -> bool {
        self.text.contains("encap type espinudp")
    }

    /// The algorithm of `kind` (`aead`, `enc`, `auth-trunc`, `auth`), from
    /// its redacted line `KIND NAME [key] (N bits) [BITS]`.
    pub fn algorithm(&self, kind: &str) -> Option<Algorithm> {
        self.text.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            if w.next()? != kind {
                return None;
            }
            let name = w.next()?.to_string();
            if w.next()? != "[key]" {
                return None;
            }
            let key_bits = w.next()?.strip_prefix('(')?.parse().ok()?;
            if w.next()? != "bits)" {
                return None;
            }
            let bits = match w.next() {
                Some(b) => Some(b.parse().ok()?),
                None => None,
            };
            Some(Algorithm {
                name,
                key_bits,
                bits,
            })
        })
    }
}

/// `line` with its key (if it is an algorithm line) replaced by `[key]`
/// and its length: `ip -s` states it as `(N bits)`, plain `ip` does not.
fn redact(line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(hex) = words
        .get(2)
        .filter(|_| KEYED.contains(&words[0]))
        .and_then(|w| w.strip_prefix("0x"))
    else {
        return line.to_string();
    };
    let indent = &line[..line.len() - line.trim_start().len()];
    let mut out = format!("{indent}{} {} [key]", words[0], words[1]);
    let rest = &words[3..];
    if !rest.first().is_some_and(|w| w.starts_with('(')) {
        out.push_str(&format!(" ({} bits)", hex.len() * 4));
    }
    for w in rest {
        out.push(' ');
        out.push_str(w);
    }
    out
}

/// The ESP SAs in `ns`, with their counters.
pub fn list(ns: &Netns) -> Result<Vec<KernelSa>> {
    let text = ns
        .exec("ip", &["-s", "xfrm", "state"])
        .with_context(|| format!("ip -s xfrm state in {}", ns.name()))?;
    parse(&text)
}

/// Splits `ip -s xfrm state` into SAs (each starts with `src A dst B` at the
/// start of a line) and reads each one's addresses, SPI and counters (the
/// line `  336(bytes), 5(packets)` after `lifetime current:`).
pub fn parse(text: &str) -> Result<Vec<KernelSa>> {
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("src ") {
            blocks.push(String::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push_str(&redact(line));
            b.push('\n');
        }
    }
    blocks.into_iter().map(parse_one).collect()
}

fn parse_one(text: String) -> Result<KernelSa> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |key: &str| {
        words
            .iter()
            .position(|w| *w == key)
            .and_then(|i| words.get(i + 1).copied())
            .with_context(|| format!("no {key} in\n{text}"))
    };
    let addr = |key: &str| -> Result<Ipv4Addr> {
        let w = after(key)?;
        w.parse()
            .with_context(|| format!("{key} {w:?} is not an IPv4 address in\n{text}"))
    };
    let (src, dst) = (addr("src")?, addr("dst")?);
    let spi = after("spi")?
        .split('(')
        .next()
        .unwrap_or_default()
        .to_string();
    let current = text
        .lines()
        .skip_while(|l| !l.contains("lifetime current:"))
        .nth(1)
        .with_context(|| format!("no current counters in\n{text}"))?;
    let count = |unit: &str| -> Result<u64> {
        current
            .split(',')
            .find_map(|p| p.trim().strip_suffix(unit))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no {unit} count in {current:?}"))
    };
    let (bytes, packets) = (count("(bytes)")?, count("(packets)")?);
    Ok(KernelSa {
        src,
        dst,
        spi,
        packets,
        bytes,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As iproute2 6.1 prints a kernel-netlink CHILD_SA's two SAs (the
    /// first as `ip -s` printed it in the test VM, the second without `-s`).
    const STATE: &str = "src 203.0.113.11 dst 192.0.2.1
\tproto esp spi 0xc1a2b3c4(3248665540) reqid 1(0x00000001) mode tunnel
\treplay-window 0 seq 0x00000000 flag af-unspec (0x00100000)
\taead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324 (288 bits) 128
\tanti-replay context: seq 0x0, oseq 0x13, bitmap 0x00000000
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\tlifetime current:
\t  1344(bytes), 16(packets)
\t  add 2026-12-01 17:00:00 use 2026-12-01 17:00:02
\tstats:
\t  replay-window 0 replay 0 failed 0
\tif_id 0xb
src 192.0.2.1 dst 203.0.113.11
\tproto esp spi 0x00c0ffee(12648430) reqid 1(0x00000001) mode tunnel
\treplay-window 32 seq 0x00000000 flag af-unspec (0x00100000)
\tauth-trunc hmac(sha1) 0x0102030405060708090a0b0c0d0e0f1011121314 96
\tenc cbc(aes) 0x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20
\tencap type espinudp sport 4500 dport 4500 addr 0.0.0.0
\tlifetime current:
\t  0(bytes), 0(packets)
";

    #[test]
    fn ip_xfrm_state_is_split_into_sas_with_their_counters() {
        let sas = parse(STATE).unwrap();
        assert_eq!(sas.len(), 2);
        assert_eq!(sas[0].src, Ipv4Addr::new(203, 0, 113, 11));
        assert_eq!(sas[0].dst, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(sas[0].spi, "0xc1a2b3c4");
        assert_eq!((sas[0].packets, sas[0].bytes), (16, 1344));
        assert!(sas[0].text.contains("if_id 0xb") && !sas[0].encapsulated());
        assert_eq!(sas[1].spi, "0x00c0ffee");
        assert_eq!((sas[1].packets, sas[1].bytes), (0, 0));
        assert!(sas[1].encapsulated() && sas[1].text.contains("hmac(sha1)"));
        let gcm = sas[0].algorithm("aead").unwrap();
        assert_eq!(
            (gcm.name.as_str(), gcm.key_bits, gcm.bits),
            ("rfc4106(gcm(aes))", 288, Some(128))
        );
        assert!(sas[0].algorithm("enc").is_none());
        let enc = sas[1].algorithm("enc").unwrap();
        assert_eq!(
            (enc.name.as_str(), enc.key_bits, enc.bits),
            ("cbc(aes)", 256, None)
        );
        let auth = sas[1].algorithm("auth-trunc").unwrap();
        assert_eq!(
            (auth.name.as_str(), auth.key_bits, auth.bits),
            ("hmac(sha1)", 160, Some(96))
        );
        assert!(parse("").unwrap().is_empty());
        // No key survives, in either form.
        for sa in &sas {
            assert!(!sa.text.contains("0x0102030405"), "{}", sa.text);
        }
        assert!(
            sas[0]
                .text
                .contains("\taead rfc4106(gcm(aes)) [key] (288 bits) 128\n\tanti-replay")
        );
        assert!(sas[1].text.contains("\tenc cbc(aes) [key] (256 bits)\n"));
    }

    #[test]
    fn a_state_without_counters_or_addresses_is_an_error() {
        let e = parse("src 192.0.2.1 dst 192.0.2.2\n\tproto esp spi 0x1(1)\n").unwrap_err();
        assert!(e.to_string().contains("no current counters"), "{e:#}");
        let e = parse("src nowhere dst 192.0.2.2\n").unwrap_err();
        assert!(e.to_string().contains("src \"nowhere\""), "{e:#}");
    }
}
