//! SA expiry from the kernel (`XFRM_MSG_EXPIRE` on the `XFRMNLGRP_EXPIRE`
//! multicast group, include/uapi/linux/xfrm.h): soft when an SA reaches its
//! soft lifetime (time to rekey), hard when the kernel removed it.
//!
//! The socket is non-blocking: the daemon polls its descriptor and calls
//! [`ExpireEvents::drain`] when it is readable.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
};

use netlink_packet_core::{
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer, NlasIterator,
};
use netlink_packet_xfrm::{XFRM_MSG_EXPIRE, XFRMA_IF_ID, XFRMNLGRP_EXPIRE};
use netlink_sys::{Socket, protocols::NETLINK_XFRM};
use zeroize::Zeroize;

use super::{
    XfrmError, msg,
    sa::{SaId, ip_of},
};

/// One expiry: which SA, and whether it is gone (hard) or due for rekey.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaExpire {
    pub spi: u32,
    pub dst: IpAddr,
    /// IP protocol (50: ESP).
    pub proto: u8,
    pub hard: bool,
    /// The SA's reqid: [`super::is_ours`] tells xesp's apart.
    pub reqid: u32,
    /// The SA's xfrm interface (`XFRMA_IF_ID` after the header; 0 if none).
    pub if_id: u32,
}

impl SaExpire {
    pub fn id(&self) -> SaId {
        SaId {
            dst: self.dst,
            spi: self.spi,
            proto: self.proto,
        }
    }

    /// From one XFRM message (type and body); `Ok(None)` for other types.
    pub fn parse(kind: u16, payload: &[u8]) -> Result<Option<Self>, XfrmError> {
        if kind != XFRM_MSG_EXPIRE {
            return Ok(None);
        }
        let decode = |detail: String| XfrmError::Decode {
            request: "XFRM_MSG_EXPIRE".into(),
            detail,
        };
        let m = msg::parse(kind, payload).map_err(|e| decode(e.to_string()))?;
        let Some(e) = m.0.as_ref().and_then(msg::expire) else {
            return Ok(None);
        };
        let s = &e.state;
        let dst = ip_of(&s.id.daddr, s.family)
            .ok_or_else(|| decode(format!("address family {}", s.family)))?;
        // netlink-packet-xfrm's EXPIRE keeps only the header; the
        // attributes the kernel appends are read here.
        let mut if_id = 0;
        for nla in NlasIterator::new(payload.get(msg::USER_EXPIRE_LEN..).unwrap_or_default()) {
            let Ok(nla) = nla else { break };
            if nla.kind() == XFRMA_IF_ID
                && let Ok(v) = <[u8; 4]>::try_from(nla.value())
            {
                if_id = u32::from_ne_bytes(v);
            }
        }
        Ok(Some(Self {
            spi: s.id.spi,
            dst,
            proto: s.id.proto,
            hard: e.hard != 0,
            reqid: s.reqid,
            if_id,
        }))
    }
}

/// A non-blocking socket subscribed to the kernel's SA expire events.
pub struct ExpireEvents {
    sock: Socket,
    buf: Vec<u8>,
}

impl ExpireEvents {
    /// Subscribes, in the calling thread's network namespace.
    pub fn open() -> Result<Self, XfrmError> {
        let io = |what| move |source| XfrmError::Socket { what, source };
        let mut sock = Socket::new(NETLINK_XFRM).map_err(io("NETLINK_XFRM events socket"))?;
        sock.bind_auto()
            .map_err(io("binding the XFRM events socket"))?;
        sock.add_membership(XFRMNLGRP_EXPIRE)
            .map_err(io("joining XFRMNLGRP_EXPIRE"))?;
        sock.set_non_blocking(true)
            .map_err(io("making the XFRM events socket non-blocking"))?;
        Ok(Self {
            sock,
            buf: vec![0; 65536],
        })
    }

    /// Every event waiting, without blocking (empty if none). A datagram
    /// that does not parse is skipped; `EventsLost` says the kernel dropped
    /// some (the daemon should then check its SAs).
    pub fn drain(&mut self) -> Result<Vec<SaExpire>, XfrmError> {
        let mut out = Vec::new();
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n.min(self.buf.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(XfrmError::EventsLost);
                }
                Err(source) => {
                    return Err(XfrmError::Socket {
                        what: "receiving XFRM events",
                        source,
                    });
                }
            };
            parse_events(&self.buf[..n], &mut out);
            self.buf[..n].zeroize();
        }
    }
}

/// The expire events of one datagram; other or malformed messages are
/// skipped.
pub(crate) fn parse_events(mut bytes: &[u8], out: &mut Vec<SaExpire>) {
    while let Ok(nb) = NetlinkBuffer::new_checked(bytes) {
        let len = nb.length() as usize;
        if len < 16 || len > bytes.len() {
            return;
        }
        let kind = nb.message_type();
        if !matches!(kind, NLMSG_ERROR | NLMSG_NOOP | NLMSG_DONE | NLMSG_OVERRUN)
            && let Ok(Some(e)) = SaExpire::parse(kind, nb.payload())
        {
            out.push(e);
        }
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
}

impl AsRawFd for ExpireEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for ExpireEvents {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is open for as long as `self` lives.
        unsafe { BorrowedFd::borrow_raw(self.sock.as_raw_fd()) }
    }
}
