//! Past authentication: an established IKE_SA's peer that holds the keys
//! sends requests whose decrypted payloads are the fuzzer's octets, so the
//! mutations reach IKE_AUTH, CREATE_CHILD_SA (new, rekey, IKE_SA rekey),
//! INFORMATIONAL (DELETE, notifies), proposal and traffic selector handling.
//! The connection under test never panics, and its timers never stay due.
//!
//! Input: datagrams split at 0xfe 0xfe; each one's first octet picks the
//! exchange (low two bits) and the first payload's type (the rest), the
//! others are the payload octets.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ike_proto::{
    backend::RecordingBackend,
    codec::{ExchangeType, PayloadType},
    config::PeerConfig,
    connection::Connection,
    crypto::{DhGroup, Psk},
    random::SeededRandom,
};
use libfuzzer_sys::fuzz_target;

const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

const EXCHANGES: [ExchangeType; 4] = [
    ExchangeType::CREATE_CHILD_SA,
    ExchangeType::INFORMATIONAL,
    ExchangeType::IKE_AUTH,
    ExchangeType::CREATE_CHILD_SA,
];
const FIRST: [PayloadType; 10] = [
    PayloadType::SA,
    PayloadType::NOTIFY,
    PayloadType::DELETE,
    PayloadType::NONCE,
    PayloadType::KE,
    PayloadType::TSI,
    PayloadType::TSR,
    PayloadType::IDI,
    PayloadType::AUTH,
    PayloadType::VENDOR,
];

struct Side {
    conn: Connection,
    backend: RecordingBackend,
    ip: Ipv4Addr,
}

/// Delivers everything `from` has to send to `to`; false if nothing was sent.
fn deliver(from: &mut Side, to: &mut Side, now: Instant) -> bool {
    let mut any = false;
    while let Some(t) = from.conn.poll_transmit() {
        any = true;
        if t.data == [0xff] {
            continue;
        }
        let src = SocketAddr::new(IpAddr::V4(from.ip), t.local_port);
        to.conn
            .handle_datagram(now, t.remote.port(), src, &t.data, &mut to.backend);
    }
    while from.conn.poll_event().is_some() {}
    any
}

fn config(name: &str, tunnel: u32, local: Ipv4Addr, remote: Ipv4Addr) -> PeerConfig {
    let mut c = PeerConfig::new(
        name,
        tunnel,
        IpAddr::V4(local),
        IpAddr::V4(remote),
        Psk::new(b"secret*1234"),
    );
    // ECP-256 keeps each run fast; PFS on, so rekeys carry KE payloads.
    for p in &mut c.ike_proposals {
        p.dh = vec![DhGroup::Ecp256];
    }
    for p in &mut c.esp_proposals {
        p.dh = vec![DhGroup::Ecp256];
    }
    c
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    // The peer (A, initiator, holds the keys) and the connection under test (B).
    let mut a = Side {
        conn: Connection::new(
            Arc::new(config("peer", 0, A, B)),
            Arc::new(SeededRandom::new(1)),
            now,
        ),
        backend: RecordingBackend::new(0x1000),
        ip: A,
    };
    let mut b_cfg = config("under-test", 1, B, A);
    b_cfg.initiator = false;
    let mut b = Side {
        conn: Connection::new(Arc::new(b_cfg), Arc::new(SeededRandom::new(2)), now),
        backend: RecordingBackend::new(0xc000_0000),
        ip: B,
    };
    a.conn.handle_timeout(now, &mut a.backend);
    for _ in 0..8 {
        let sent = deliver(&mut a, &mut b, now) | deliver(&mut b, &mut a, now);
        if !sent {
            break;
        }
    }
    if !b.conn.is_up() {
        return;
    }
    let mut t = now;
    for d in data.split(|x| *x == 0xfe) {
        let Some((&sel, plain)) = d.split_first() else {
            continue;
        };
        let exchange = EXCHANGES[usize::from(sel & 3)];
        let first = FIRST
            .get(usize::from(sel >> 2))
            .copied()
            .unwrap_or(PayloadType::NOTIFY);
        if !a.conn.send_raw_request(exchange, first, plain.to_vec()) {
            break;
        }
        for _ in 0..4 {
            let sent = deliver(&mut a, &mut b, t) | deliver(&mut b, &mut a, t);
            if !sent {
                break;
            }
        }
        t += Duration::from_millis(10);
    }
    // Every timer the connection holds fires, and then is not due again.
    let later = t + Duration::from_secs(7200);
    b.conn.handle_timeout(later, &mut b.backend);
    assert!(
        b.conn.poll_timeout().is_none_or(|d| d > later),
        "a timer stays due after it fired"
    );
    while b.conn.poll_transmit().is_some() {}
    while b.conn.poll_event().is_some() {}
});
