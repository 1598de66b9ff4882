//! The few rtnetlink questions the datapath asks the kernel: where does the
//! FIB send this destination (`ip route get`), what is that neighbour's MAC
//! (`ip neigh get`), what is this interface's MAC; and the tunnel interfaces'
//! setup (`ip link set up mtu`, `ip addr replace`). Synchronous, on its own
//! socket, in the network namespace of the thread that opens it.

use std::{io, net::Ipv4Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage, Stats64},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Errors talking rtnetlink.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("rtnetlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("rtnetlink {request}: the kernel answered {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { request: &'static str, errno: i32 },
    #[error("rtnetlink {request}: undecodable answer: {detail}")]
    Decode {
        request: &'static str,
        detail: String,
    },
    #[error("rtnetlink {0}: no answer")]
    NoAnswer(&'static str),
}

/// The index of interface `name` in the calling thread's namespace (0 if
/// there is none, as `if_nametoindex` says).
pub fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// Where the FIB sends a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteHop {
    /// Output interface.
    pub oif: u32,
    /// The next-hop router, or `None` when the destination is on-link.
    pub gateway: Option<Ipv4Addr>,
    /// True for addresses of this host (delivered locally).
    pub local: bool,
}

impl RouteHop {
    /// The address whose MAC frames to this destination carry.
    pub fn neighbour(&self, dst: Ipv4Addr) -> Ipv4Addr {
        self.gateway.unwrap_or(dst)
    }
}

/// An rtnetlink socket.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            sock,
            seq: 0,
            buf: vec![0; 16384],
        })
    }

    /// `ip route get <dst>`.
    pub fn route_get(&mut self, dst: Ipv4Addr) -> Result<RouteHop, NetlinkError> {
        const REQ: &str = "route get";
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = 32;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        match self.ask(REQ, RouteNetlinkMessage::GetRoute(msg))? {
            RouteNetlinkMessage::NewRoute(r) => {
                let mut hop = RouteHop {
                    oif: 0,
                    gateway: None,
                    local: r.header.kind == RouteType::Local,
                };
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => hop.oif = *i,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => hop.gateway = Some(*g),
                        _ => {}
                    }
                }
                Ok(hop)
            }
            other => Err(NetlinkError::Decode {
                request: REQ,
                detail: format!("unexpected {other:?}"),
            }),
        }
    }

    /// `ip neigh get <ip> dev <ifindex>`: the MAC, if the entry is usable.
    pub fn neighbour(
        &mut self,
        ifindex: u32,
        ip: Ipv4Addr,
    ) -> Result<Option<[u8; 6]>, NetlinkError> {
        const REQ: &str = "neigh get";
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.ask(REQ, RouteNetlinkMessage::GetNeighbour(msg)) {
            Ok(RouteNetlinkMessage::NewNeighbour(n)) => {
                let usable = !matches!(
                    n.header.state,
                    NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
                );
                let mac = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(m) => {
                        <[u8; 6]>::try_from(m.as_slice()).ok()
                    }
                    _ => None,
                });
                Ok(mac.filter(|_| usable))
            }
            Ok(other) => Err(NetlinkError::Decode {
                request: REQ,
                detail: format!("unexpected {other:?}"),
            }),
            Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The statistics of interface `ifindex`: its `IFLA_STATS64`
    /// (`rtnl_link_stats64`, include/uapi/linux/if_link.h).
    pub fn link_stats64(&mut self, ifindex: u32) -> Result<Stats64, NetlinkError> {
        self.link_attribute("link statistics", ifindex, "IFLA_STATS64", |a| match a {
            LinkAttribute::Stats64(s) => Some(s),
            _ => None,
        })
    }

    /// The hardware address of interface `ifindex`.
    pub fn link_mac(&mut self, ifindex: u32) -> Result<[u8; 6], NetlinkError> {
        self.link_attribute("link get", ifindex, "MAC", |a| match a {
            LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        })
    }

    /// `ip link show <ifindex>`: the first of its attributes that `pick`
    /// takes (`what` names it in the error when there is none).
    fn link_attribute<T>(
        &mut self,
        request: &'static str,
        ifindex: u32,
        what: &str,
        pick: impl FnMut(LinkAttribute) -> Option<T>,
    ) -> Result<T, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        match self.ask(request, RouteNetlinkMessage::GetLink(msg))? {
            RouteNetlinkMessage::NewLink(l) => {
                l.attributes
                    .into_iter()
                    .find_map(pick)
                    .ok_or(NetlinkError::Decode {
                        request,
                        detail: format!("interface {ifindex} has no {what}"),
                    })
            }
            other => Err(NetlinkError::Decode {
                request,
                detail: format!("unexpected {other:?}"),
            }),
        }
    }

    /// `ip link set <ifindex> mtu <mtu> up`.
    pub fn set_link_up(&mut self, ifindex: u32, mtu: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.act("link set", RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// `ip link set <ifindex> down`.
    pub fn set_link_down(&mut self, ifindex: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = ifindex;
        msg.header.change_mask = LinkFlags::Up;
        self.act("link set", RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// `ip addr replace <addr>/<prefix_len> dev <ifindex>`.
    pub fn replace_address(
        &mut self,
        ifindex: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = ifindex;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        self.act(
            "addr replace",
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// How many IPv4 multipath routes, in any table, have a next hop
    /// through interface `ifindex` (`ip route show table all` with `nexthop
    /// dev` it): the routes the kernel deletes whole when that interface is
    /// deleted, their other next hops with it.
    pub fn multipath_routes_via(&mut self, ifindex: u32) -> Result<usize, NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let routes = self.dump("route dump", RouteNetlinkMessage::GetRoute(msg))?;
        Ok(routes
            .iter()
            .filter(|m| {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    return false;
                };
                r.attributes.iter().any(|a| {
                    matches!(a, RouteAttribute::MultiPath(hops)
                        if hops.iter().any(|h| h.interface_index == ifindex))
                })
            })
            .count())
    }

    /// Sends a change and waits for the kernel's acknowledgement.
    fn act(
        &mut self,
        request: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetlinkError> {
        match self.exchange(request, msg, flags | NLM_F_ACK) {
            Err(NetlinkError::Kernel { errno: 0, .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(other) => Err(NetlinkError::Decode {
                request,
                detail: format!("unexpected {other:?}"),
            }),
        }
    }

    /// Sends one request and returns the one message that answers it.
    fn ask(
        &mut self,
        request: &'static str,
        msg: RouteNetlinkMessage,
    ) -> Result<RouteNetlinkMessage, NetlinkError> {
        self.exchange(request, msg, 0)
    }

    /// Sends one request; the answer, or its error (errno 0: an ACK).
    fn exchange(
        &mut self,
        request: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<RouteNetlinkMessage, NetlinkError> {
        let mut first = None;
        self.converse(request, msg, flags, |m| {
            first = Some(m);
            false
        })?;
        first.ok_or(NetlinkError::NoAnswer(request))
    }

    /// Sends a dump request; every message of the answer, up to its end.
    fn dump(
        &mut self,
        request: &'static str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let mut all = Vec::new();
        self.converse(request, msg, NLM_F_DUMP, |m| {
            all.push(m);
            true
        })?;
        Ok(all)
    }

    /// Sends one request and passes the messages that answer it to `each`
    /// until it returns false or a dump ends (`Ok`), or the kernel reports
    /// an error (errno 0: an ACK).
    fn converse(
        &mut self,
        request: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
        mut each: impl FnMut(RouteNetlinkMessage) -> bool,
    ) -> Result<(), NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut out = vec![0; req.header.length as usize];
        req.serialize(&mut out);
        self.sock.send(&out, 0)?;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let bytes = &self.buf[off..n];
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                        NetlinkError::Decode {
                            request,
                            detail: e.to_string(),
                        }
                    })?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == self.seq {
                    match msg.payload {
                        NetlinkPayload::InnerMessage(m) => {
                            let more = each(m);
                            if !more {
                                return Ok(());
                            }
                        }
                        NetlinkPayload::Error(e) => {
                            let errno = e.code.map(|c| -c.get()).unwrap_or(0);
                            return Err(NetlinkError::Kernel { request, errno });
                        }
                        NetlinkPayload::Done(_) => return Ok(()),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback (ifindex 1 in every namespace) counts datagrams sent to
    /// itself both ways: the numbers come from the kernel, not from zero.
    #[test]
    fn loopback_statistics_count_what_is_sent_to_it() {
        let mut rtnl = Rtnl::open().unwrap();
        let before = rtnl.link_stats64(1).unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..3 {
            tx.send_to(&[0u8; 100], rx.local_addr().unwrap()).unwrap();
        }
        let after = rtnl.link_stats64(1).unwrap();
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

    /// Loopback's routes (`local 127.0.0.0/8 dev lo` in table local) have
    /// one next hop each: none counts.
    #[test]
    fn single_next_hop_routes_are_not_counted() {
        let mut rtnl = Rtnl::open().unwrap();
        assert_eq!(rtnl.multipath_routes_via(1).unwrap(), 0);
    }

    #[test]
    fn a_missing_interface_is_an_error() {
        let e = Rtnl::open().unwrap().link_stats64(0x7fff_fff0).unwrap_err();
        assert!(
            matches!(e, NetlinkError::Kernel { errno, .. } if errno == libc::ENODEV),
            "{e}"
        );
    }
}
