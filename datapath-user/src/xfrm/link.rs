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
