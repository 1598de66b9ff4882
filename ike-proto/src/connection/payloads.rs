//! Payload helpers the exchanges share.

use std::net::SocketAddr;

use crate::{
    codec::{Body, IdType, Identification, Message, Notify, NotifyType, Payload, Proposal},
    config::Identity,
    crypto,
    ts::{self, TsRange},
};

pub(super) fn notify(kind: NotifyType) -> Payload {
    Payload::new(Body::Notify(Notify::new(kind, vec![])))
}

pub(super) fn nonce_of(p: &[Payload]) -> Option<Vec<u8>> {
    p.iter().find_map(|p| match &p.body {
        Body::Nonce(n) => Some(n.clone()),
        _ => None,
    })
}

/// The first SA payload's proposals.
pub(super) fn sa_of(p: &[Payload]) -> Option<&[Proposal]> {
    p.iter().find_map(|p| match &p.body {
        Body::Sa(s) => Some(s.as_slice()),
        _ => None,
    })
}

pub(super) fn ke_of(p: &[Payload]) -> Option<(u16, Vec<u8>)> {
    p.iter().find_map(|p| match &p.body {
        Body::Ke { group, data, .. } => Some((*group, data.clone())),
        _ => None,
    })
}

/// TSi and TSr of a message, as ranges; `Err(count)` when either holds more
/// than [`ts::MAX_SELECTORS`].
pub(super) fn selectors(p: &[Payload]) -> Result<(Vec<TsRange>, Vec<TsRange>), usize> {
    let mut tsi = Vec::new();
    let mut tsr = Vec::new();
    for p in p {
        match &p.body {
            Body::TsI { selectors, .. } => {
                tsi.extend(selectors.iter().filter_map(TsRange::from_wire))
            }
            Body::TsR { selectors, .. } => {
                tsr.extend(selectors.iter().filter_map(TsRange::from_wire))
            }
            _ => {}
        }
    }
    match tsi.len().max(tsr.len()) {
        n if n > ts::MAX_SELECTORS => Err(n),
        _ => Ok((tsi, tsr)),
    }
}

pub(super) fn ts_payload(initiator_side: bool, ts: &[TsRange]) -> Payload {
    let selectors = ts.iter().map(TsRange::to_wire).collect();
    Payload::new(if initiator_side {
        Body::TsI {
            reserved: [0; 3],
            selectors,
        }
    } else {
        Body::TsR {
            reserved: [0; 3],
            selectors,
        }
    })
}

pub(super) fn identification(id: &Identity) -> Identification {
    match id {
        Identity::Ipv4(a) => Identification {
            id_type: IdType::ID_IPV4_ADDR,
            reserved: [0; 3],
            data: a.octets().to_vec(),
        },
        Identity::Fqdn(n) => Identification {
            id_type: IdType::ID_FQDN,
            reserved: [0; 3],
            data: n.as_bytes().to_vec(),
        },
    }
}

pub(super) fn id_text(id: &Identification) -> String {
    match (id.id_type, id.data.as_slice()) {
        (IdType::ID_IPV4_ADDR, [a, b, c, d]) => format!("{a}.{b}.{c}.{d}"),
        (_, d) => String::from_utf8_lossy(d).into_owned(),
    }
}

pub(super) fn join(ts: &[TsRange]) -> String {
    ts.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// NAT_DETECTION_SOURCE_IP and _DESTINATION_IP for a message we send (§2.23).
/// With `force_encap` the source hash is of 0.0.0.0:0, which matches no
/// address: the peer believes we are behind a NAT and both sides float to
/// UDP encapsulation (strongSwan's `encap = yes` does the same).
pub(super) fn nat_detection(
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
    force_encap: bool,
) -> Vec<Payload> {
    let source = if force_encap {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        local
    };
    vec![
        Payload::new(Body::Notify(Notify::new(
            NotifyType::NAT_DETECTION_SOURCE_IP,
            crypto::nat_detection_hash(spi_i, spi_r, source.ip(), source.port()).to_vec(),
        ))),
        Payload::new(Body::Notify(Notify::new(
            NotifyType::NAT_DETECTION_DESTINATION_IP,
            crypto::nat_detection_hash(spi_i, spi_r, remote.ip(), remote.port()).to_vec(),
        ))),
    ]
}

/// (the sender is behind a NAT, we are behind a NAT), from a received
/// message's NAT-D notifies; no notifies means no NAT-T support: no NAT.
pub(super) fn check_nat(
    msg: &Message,
    spi_i: u64,
    spi_r: u64,
    from: SocketAddr,
    to: SocketAddr,
) -> (bool, bool) {
    let src: Vec<&Notify> = msg
        .notifies()
        .filter(|n| n.kind == NotifyType::NAT_DETECTION_SOURCE_IP)
        .collect();
    let dst = msg
        .notifies()
        .find(|n| n.kind == NotifyType::NAT_DETECTION_DESTINATION_IP);
    if src.is_empty() {
        return (false, false);
    }
    let want_src = crypto::nat_detection_hash(spi_i, spi_r, from.ip(), from.port());
    let want_dst = crypto::nat_detection_hash(spi_i, spi_r, to.ip(), to.port());
    let peer_nat = !src.iter().any(|n| n.data == want_src);
    let our_nat = dst.is_some_and(|n| n.data != want_dst);
    (peer_nat, our_nat)
}
