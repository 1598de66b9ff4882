//! A connection fed arbitrary datagrams from its peer's address, as
//! responder and as initiator (after sending its IKE_SA_INIT), never panics.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ike_proto::{
    backend::RecordingBackend, config::PeerConfig, connection::Connection, crypto::Psk,
    random::SeededRandom,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let local = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let remote = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 11));
    let mut cfg = PeerConfig::new("fuzz", 0, local, remote, Psk::new(b"secret*1234"));
    cfg.initiator = mode & 1 == 1;
    let now = Instant::now();
    let mut backend = RecordingBackend::new(0x1000);
    let mut c = Connection::new(Arc::new(cfg), Arc::new(SeededRandom::new(1)), now);
    c.handle_timeout(now, &mut backend);
    while c.poll_transmit().is_some() {}
    let port = if mode & 2 == 0 { 500 } else { 4500 };
    // The input may hold several datagrams, split at 0xfe 0xfe.
    for d in rest.split(|b| *b == 0xfe) {
        c.handle_datagram(now, port, SocketAddr::new(remote, port), d, &mut backend);
        while c.poll_transmit().is_some() {}
    }
    c.handle_timeout(now + Duration::from_secs(61), &mut backend);
    while c.poll_event().is_some() {}
});
