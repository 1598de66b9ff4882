//! xfrm interfaces (`ip link add Tunnel0 type xfrm dev eth0 if_id 1`):
//! link kind `xfrm` with `IFLA_XFRM_IF_ID` and `IFLA_XFRM_LINK`
//! (include/uapi/linux/if_link.h), over rtnetlink.

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoData, InfoKind, InfoXfrm, LinkAttribute, LinkInfo, LinkMessage},
};
use netlink_sys::protocols::NETLINK_ROUTE;

use super::{XfrmError, nl::NlSocket};
use crate::mode::InterfaceCounters;

/// Creates the xfrm interface `name` for `if_id`, on top of the device
/// `link` (an ifindex; 0 for none), down. Returns its ifindex.
pub fn create_interface(name: &str, if_id: u32, link: u32) -> Result<u32, XfrmError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(XfrmError::InterfaceName(name.to_owned()));
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    let mut data = vec![InfoXfrm::IfId(if_id)];
    if link != 0 {
        data.push(InfoXfrm::Link(link));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Xfrm),
        LinkInfo::Data(InfoData::Xfrm(data)),
    ]));
    let mut sock = NlSocket::open(NETLINK_ROUTE, "rtnetlink socket")?;
    let req = format!("NEWLINK {name} type xfrm if_id {if_id}");
    sock.transact::<_, RouteNetlinkMessage>(
        &req,
        RouteNetlinkMessage::NewLink(msg),
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    )?;
    match crate::netlink::ifindex(name) {
        0 => Err(XfrmError::NoAnswer(req)),
        i => Ok(i),
    }
}

/// Deletes the interface `ifindex`. Ok(false) if there was none.
pub fn delete_interface(ifindex: u32) -> Result<bool, XfrmError> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    let mut sock = NlSocket::open(NETLINK_ROUTE, "rtnetlink socket")?;
    match sock.transact::<_, RouteNetlinkMessage>(
        &format!("DELLINK {ifindex}"),
        RouteNetlinkMessage::DelLink(msg),
        NLM_F_ACK,
    ) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The statistics of the interface `ifindex` (`RTM_GETLINK`, its
/// `IFLA_STATS64`; include/uapi/linux/if_link.h `rtnl_link_stats64`), in
/// the calling thread's network namespace.
pub fn interface_counters(ifindex: u32) -> Result<InterfaceCounters, XfrmError> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    let mut sock = NlSocket::open(NETLINK_ROUTE, "rtnetlink socket")?;
    let req = format!("GETLINK {ifindex}");
    let answers =
        sock.transact::<_, RouteNetlinkMessage>(&req, RouteNetlinkMessage::GetLink(msg), 0)?;
    answers
        .iter()
        .find_map(|a| match a {
            RouteNetlinkMessage::NewLink(l) if l.header.index == ifindex => stats64(l),
            _ => None,
        })
        .ok_or(XfrmError::NoAnswer(req))
}

/// A link message's `IFLA_STATS64` as [`InterfaceCounters`].
fn stats64(l: &LinkMessage) -> Option<InterfaceCounters> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Stats64(s) => Some(InterfaceCounters {
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            rx_errors: s.rx_errors,
            rx_dropped: s.rx_dropped,
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            tx_errors: s.tx_errors,
            tx_dropped: s.tx_dropped,
        }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback (ifindex 1 in every namespace) counts a datagram sent to
    /// itself both ways: the numbers come from the kernel, not from zero.
    #[test]
    fn loopback_counts_what_is_sent_to_it() {
        let before = interface_counters(1).unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..3 {
            tx.send_to(&[0u8; 100], rx.local_addr().unwrap()).unwrap();
        }
        let after = interface_counters(1).unwrap();
        assert!(
            after.tx_packets >= before.tx_packets + 3,
            "{before:?} {after:?}"
        );
        assert!(
            after.rx_packets >= before.rx_packets + 3,
            "{before:?} {after:?}"
        );
        assert!(
            after.tx_bytes >= before.tx_bytes + 3 * 128,
            "{before:?} {after:?}"
        );
    }

    #[test]
    fn a_missing_interface_is_an_error() {
        let e = interface_counters(0x7fff_fff0).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
    }
}
