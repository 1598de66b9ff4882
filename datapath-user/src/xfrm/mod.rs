//! The kernel's IPsec (XFRM) for route-based tunnels: ESP SAs and policies
//! over `NETLINK_XFRM`, xfrm interfaces over rtnetlink, expire events, and
//! the UDP socket option that lets the kernel take ESP in UDP (NAT-T).
//!
//! Synchronous, over netlink-sys, with the messages modelled by
//! netlink-packet-xfrm (the same netlink-packet-core as the rest of the
//! datapath): every call is one request and its acknowledgement, which fits
//! the IKE controller's calls (one `SaBackend` call, one change) without an
//! async runtime per netlink family. Each socket lives in the network
//! namespace of the thread that opened it.
//!
//! # Telling xesp's state apart: the reqid
//!
//! Every SA and every policy template xesp installs carries a reqid in
//! [`REQID_BASE`]`..=`[`REQID_LAST`] (`0x7865_xxxx`, "xe"): tunnel `n` has
//! [`reqid(n)`](reqid). The kernel returns the reqid on every dump (in
//! `xfrm_usersa_info` and in each `xfrm_user_tmpl`), so
//! [`Xfrm::flush_ours`] dumps SAs and policies and deletes exactly those
//! with a reqid in the range: never the host's other SAs (strongSwan and
//! iproute2 number reqids from 1), whatever their interface or mark.
//!
//! # A tunnel's life
//!
//! 1. [`Xfrm::flush_ours`] (leftovers of a crash), [`create_interface`]
//!    (`Tunnel0`, its `if_id`, the underlay's ifindex), [`set_espinudp`] on
//!    the IKE socket of port 4500, [`ExpireEvents::open`] (poll its fd).
//! 2. Per CHILD_SA direction: [`XfrmSa::from_spec`] with the tunnel's
//!    `if_id` and [`reqid`], then [`Xfrm::add_sa`]; once per tunnel (or per
//!    set of selectors): [`tunnel_policies`] then [`Xfrm::add_policy`] or
//!    [`Xfrm::update_policy`] for each.
//! 3. [`Xfrm::counters`] for status (the interfaces' statistics come from [`crate::netlink::Rtnl::link_stats64`]);
//!    [`ExpireEvents::drain`] when readable (soft: rekey; hard: the kernel
//!    removed the SA); [`Xfrm::delete_sa`] for the old SAs after a rekey;
//!    [`Xfrm::update_sa`] for new NAT-T ports.
//! 4. On stop: [`Xfrm::flush_ours`], [`delete_interface`].
//!
//! `tests/xfrm_kernel.rs` does all of this against a kernel with ESP.

mod msg;
mod nl;

pub mod events;
pub mod link;
pub mod natt;
pub mod policy;
pub mod sa;

use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_xfrm::{
    XfrmMessage, policy::DelGetMessage as PolicyDelGet, state::GetDumpMessage,
};
use netlink_sys::protocols::NETLINK_XFRM;

pub use events::{ExpireEvents, SaExpire};
pub use link::{create_interface, delete_interface};
pub use natt::set_espinudp;
pub use policy::{
    PolicyDir, PolicySelector, PolicyState, PolicyTemplate, PortMask, XfrmPolicy, range_prefixes,
    tunnel_policies,
};
pub use sa::{AlgState, EncapPorts, SaId, SaState, XfrmCounters, XfrmSa};

use msg::{In, Out};

/// The first reqid of xesp's range.
pub const REQID_BASE: u32 = 0x7865_0000;
/// The last reqid of xesp's range.
pub const REQID_LAST: u32 = REQID_BASE + 0xffff;

/// The reqid of tunnel `tunnel` (its SAs and policies).
pub fn reqid(tunnel: u32) -> Result<u32, XfrmError> {
    if tunnel > REQID_LAST - REQID_BASE {
        return Err(XfrmError::TunnelIndex(tunnel));
    }
    Ok(REQID_BASE + tunnel)
}

/// True if `reqid` is xesp's (in [`REQID_BASE`]`..=`[`REQID_LAST`]).
pub fn is_ours(reqid: u32) -> bool {
    (REQID_BASE..=REQID_LAST).contains(&reqid)
}

/// What went wrong talking to the kernel's XFRM, or with what was asked.
#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    #[error("{what}: {source}")]
    Socket {
        what: &'static str,
        source: io::Error,
    },
    #[error("{request}: the kernel answered {}{}", io::Error::from_raw_os_error(*.errno), .message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        request: String,
        errno: i32,
        /// The kernel's extended-ACK message, when it gave one.
        message: Option<String>,
    },
    #[error("{request}: undecodable answer: {detail}")]
    Decode { request: String, detail: String },
    #[error("{0}: the dump was interrupted by a change; try again")]
    DumpInterrupted(String),
    #[error("{0}: no answer")]
    NoAnswer(String),
    #[error("SA SPI {spi:08x}: {reason}")]
    InvalidSa { spi: u32, reason: String },
    #[error("policy {0}")]
    InvalidPolicy(String),
    #[error("traffic selectors need more than {0} policies per direction")]
    TooManyPolicies(usize),
    #[error("tunnel index {0} has no reqid in xesp's range")]
    TunnelIndex(u32),
    #[error("xfrm interface name {0:?} is not valid")]
    InterfaceName(String),
    #[error("expire events were lost (the socket's buffer overflowed); resynchronise")]
    EventsLost,
}

impl XfrmError {
    /// The kernel's errno, if the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// For the `SaBackend` glue: a refused SA is `Invalid`, anything else is
/// the datapath failing.
impl From<XfrmError> for ike_proto::backend::BackendError {
    fn from(e: XfrmError) -> Self {
        match e {
            XfrmError::InvalidSa { spi, reason } => Self::Invalid { spi, reason },
            e => Self::System(e.to_string()),
        }
    }
}

/// How many SAs and policies [`Xfrm::flush_ours`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    pub sas: usize,
    pub policies: usize,
}

/// A `NETLINK_XFRM` socket for SAs and policies.
pub struct Xfrm {
    sock: nl::NlSocket,
}

impl Xfrm {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, XfrmError> {
        Ok(Self {
            sock: nl::NlSocket::open(NETLINK_XFRM, "NETLINK_XFRM socket")?,
        })
    }

    fn act(&mut self, request: &str, msg: XfrmMessage, flags: u16) -> Result<(), XfrmError> {
        self.sock
            .transact::<Out, In>(request, Out(msg), flags | NLM_F_ACK)
            .map(drop)
    }

    /// `XFRM_MSG_NEWSA`: installs an SA (fails with EEXIST if its
    /// destination and SPI are taken).
    pub fn add_sa(&mut self, sa: &XfrmSa) -> Result<(), XfrmError> {
        let m = sa.message()?;
        let req = format!("NEWSA SPI {:08x} dst {}", sa.spi, sa.dst);
        self.act(&req, XfrmMessage::AddSa(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// `XFRM_MSG_UPDSA`: changes the SA with the same destination and SPI
    /// (its NAT-T ports and lifetimes; the kernel keeps its keys and
    /// counters). A new destination address needs delete + add.
    pub fn update_sa(&mut self, sa: &XfrmSa) -> Result<(), XfrmError> {
        let m = sa.message()?;
        let req = format!("UPDSA SPI {:08x} dst {}", sa.spi, sa.dst);
        self.act(&req, XfrmMessage::UpdateSa(m), 0)
    }

    /// `XFRM_MSG_DELSA`. Ok(false) if there was no such SA.
    pub fn delete_sa(&mut self, id: SaId) -> Result<bool, XfrmError> {
        let req = format!("DELSA {id}");
        match self.act(&req, XfrmMessage::DeleteSa(id.message()), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `XFRM_MSG_GETSA` for one SA: its state and counters; `None` if
    /// there is no such SA.
    pub fn get_sa(&mut self, id: SaId) -> Result<Option<SaState>, XfrmError> {
        let req = format!("GETSA {id}");
        let answers =
            match self
                .sock
                .transact::<Out, In>(&req, Out(XfrmMessage::GetSa(id.message())), 0)
            {
                Ok(a) => a,
                Err(e) if e.errno() == Some(libc::ESRCH) => return Ok(None),
                Err(e) => return Err(e),
            };
        let state = answers
            .iter()
            .filter_map(|a| a.0.as_ref())
            .filter_map(msg::sa_info)
            .find_map(|(info, nlas)| SaState::of(info, nlas));
        match state {
            Some(s) => Ok(Some(s)),
            None => Err(XfrmError::NoAnswer(req)),
        }
    }

    /// The counters of one SA (`GETSA`); `None` if there is no such SA.
    pub fn counters(&mut self, id: SaId) -> Result<Option<XfrmCounters>, XfrmError> {
        Ok(self.get_sa(id)?.map(|s| s.counters))
    }

    /// Every SA in the namespace (a `GETSA` dump), without keys.
    pub fn dump_sas(&mut self) -> Result<Vec<SaState>, XfrmError> {
        let answers = self.sock.transact::<Out, In>(
            "GETSA dump",
            Out(XfrmMessage::GetDumpSa(GetDumpMessage::default())),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .iter()
            .filter_map(|a| a.0.as_ref())
            .filter_map(msg::sa_info)
            .filter_map(|(info, nlas)| SaState::of(info, nlas))
            .collect())
    }

    /// `XFRM_MSG_NEWPOLICY` (EEXIST if the same selector, direction and
    /// `if_id` has one).
    pub fn add_policy(&mut self, p: &XfrmPolicy) -> Result<(), XfrmError> {
        let m = p.message()?;
        let req = format!(
            "NEWPOLICY {:?} {} -> {}",
            p.dir, p.selector.src, p.selector.dst
        );
        self.act(&req, XfrmMessage::AddPolicy(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// `XFRM_MSG_UPDPOLICY`: adds the policy or replaces the one with the
    /// same selector, direction and `if_id`.
    pub fn update_policy(&mut self, p: &XfrmPolicy) -> Result<(), XfrmError> {
        let m = p.message()?;
        let req = format!(
            "UPDPOLICY {:?} {} -> {}",
            p.dir, p.selector.src, p.selector.dst
        );
        self.act(&req, XfrmMessage::UpdatePolicy(m), NLM_F_CREATE)
    }

    /// `XFRM_MSG_DELPOLICY` by selector, direction and `if_id`. Ok(false)
    /// if there was none.
    pub fn delete_policy(&mut self, p: &XfrmPolicy) -> Result<bool, XfrmError> {
        let req = format!(
            "DELPOLICY {:?} {} -> {}",
            p.dir, p.selector.src, p.selector.dst
        );
        self.delete_policy_msg(&req, p.delete_message())
    }

    fn delete_policy_msg(&mut self, req: &str, m: PolicyDelGet) -> Result<bool, XfrmError> {
        match self.act(req, XfrmMessage::DeletePolicy(m), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every policy in the namespace (a `GETPOLICY` dump).
    pub fn dump_policies(&mut self) -> Result<Vec<PolicyState>, XfrmError> {
        let answers = self.sock.transact::<Out, In>(
            "GETPOLICY dump",
            Out(XfrmMessage::GetPolicy(PolicyDelGet::default())),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .iter()
            .filter_map(|a| match a.0.as_ref() {
                Some(XfrmMessage::AddPolicy(m)) | Some(XfrmMessage::UpdatePolicy(m)) => {
                    PolicyState::of(&m.user_policy_info, &m.nlas)
                }
                _ => None,
            })
            .collect())
    }

    /// Removes xesp's SAs and policies (reqid in xesp's range, see the
    /// module's documentation) and nothing else: on stop, and on start
    /// after a crash.
    pub fn flush_ours(&mut self) -> Result<Flushed, XfrmError> {
        self.flush_where(is_ours)
    }

    /// Removes the SAs and policies of reqid `reqid` (one tunnel's).
    pub fn flush_reqid(&mut self, reqid: u32) -> Result<Flushed, XfrmError> {
        self.flush_where(|r| r == reqid)
    }

    fn flush_where(&mut self, ours: impl Fn(u32) -> bool) -> Result<Flushed, XfrmError> {
        let mut flushed = Flushed::default();
        for p in self.dump_policies()? {
            if p.policy.templates.iter().any(|t| ours(t.reqid)) {
                let req = format!("DELPOLICY index {} ({:?})", p.index, p.policy.dir);
                if self.delete_policy_msg(&req, p.delete_message())? {
                    flushed.policies += 1;
                }
            }
        }
        for s in self.dump_sas()? {
            if ours(s.reqid) && self.delete_sa(s.id)? {
                flushed.sas += 1;
            }
        }
        Ok(flushed)
    }
}

#[cfg(test)]
mod tests;
