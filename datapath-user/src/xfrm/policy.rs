//! XFRM policies of a route-based tunnel: in, out and fwd, scoped to the
//! tunnel's xfrm interface by `if_id`, each with one ESP tunnel-mode
//! template (`struct xfrm_userpolicy_info`, `struct xfrm_user_tmpl`,
//! include/uapi/linux/xfrm.h).
//!
//! IKEv2 traffic selectors are address and port *ranges* (RFC 7296 §3.13.1);
//! an XFRM selector is one prefix and one port/mask per side, so a range
//! becomes the fewest prefixes (and port blocks) that cover exactly it, and
//! a pair of selectors becomes one policy per combination.

use std::net::{IpAddr, Ipv4Addr};

use ike_proto::ts::TsRange;
use ipnet::{IpNet, Ipv4Net};
use netlink_packet_xfrm::{
    IPPROTO_ESP, Selector, UserPolicyId, UserPolicyInfo, UserTemplate, XFRM_MODE_TUNNEL,
    XFRM_POLICY_ALLOW, XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_SHARE_ANY, XfrmAttrs,
    policy::{DelGetMessage, ModifyMessage},
};

use super::{
    XfrmError,
    sa::{address, family, ip_of},
};

/// The most policies one direction of a tunnel may need after splitting
/// its selectors; more is refused rather than flooding the SPD.
pub const MAX_POLICIES: usize = 256;

/// Priorities start here; more specific selectors get smaller numbers,
/// which the kernel prefers.
pub const PRIORITY_BASE: u32 = 0x4000;

/// Which traffic a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyDir {
    /// Decapsulated packets for this host.
    In,
    /// Packets leaving through the xfrm interface.
    Out,
    /// Decapsulated packets this host forwards (to the LAN).
    Fwd,
}

impl PolicyDir {
    pub const ALL: [PolicyDir; 3] = [PolicyDir::In, PolicyDir::Out, PolicyDir::Fwd];

    /// `XFRM_POLICY_IN`, `_OUT`, `_FWD`.
    pub fn to_kernel(self) -> u8 {
        match self {
            Self::In => XFRM_POLICY_IN,
            Self::Out => XFRM_POLICY_OUT,
            Self::Fwd => XFRM_POLICY_FWD,
        }
    }

    pub fn from_kernel(d: u8) -> Option<Self> {
        match d {
            XFRM_POLICY_IN => Some(Self::In),
            XFRM_POLICY_OUT => Some(Self::Out),
            XFRM_POLICY_FWD => Some(Self::Fwd),
            _ => None,
        }
    }
}

/// A port and the mask of its significant bits, as a selector matches
/// ports: mask 0 matches every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMask {
    pub port: u16,
    pub mask: u16,
}

impl PortMask {
    pub const ANY: PortMask = PortMask { port: 0, mask: 0 };
}

/// What a policy matches: inner source and destination prefixes, the
/// protocol (0: any) and the ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicySelector {
    pub src: IpNet,
    pub dst: IpNet,
    pub proto: u8,
    pub sport: PortMask,
    pub dport: PortMask,
}

/// The template of an ESP tunnel-mode SA the policy requires: the tunnel's
/// outer addresses and xesp's reqid. Any SPI, any algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyTemplate {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub reqid: u32,
}

/// One XFRM policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XfrmPolicy {
    pub dir: PolicyDir,
    pub selector: PolicySelector,
    /// The xfrm interface the policy belongs to (0: a global policy).
    pub if_id: u32,
    /// Smaller wins (see [`PRIORITY_BASE`]).
    pub priority: u32,
    pub templates: Vec<PolicyTemplate>,
}

/// A policy as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyState {
    /// The kernel's index of the policy (names it for deletion).
    pub index: u32,
    pub policy: XfrmPolicy,
    /// `(mark, mask)` from `XFRMA_MARK`, if any.
    pub mark: Option<(u32, u32)>,
}

/// The fewest prefixes that together cover exactly `start..=end`.
pub fn range_prefixes(start: Ipv4Addr, end: Ipv4Addr) -> Vec<Ipv4Net> {
    let (mut a, b) = (u64::from(u32::from(start)), u64::from(u32::from(end)));
    let mut out = Vec::new();
    while a <= b {
        // The largest aligned block at `a` that does not pass `b`.
        let mut size: u64 = if a == 0 {
            1 << 32
        } else {
            1 << a.trailing_zeros().min(32)
        };
        while a + size - 1 > b {
            size >>= 1;
        }
        let len = 32 - size.trailing_zeros() as u8;
        if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(a as u32), len) {
            out.push(net);
        }
        a += size;
    }
    out
}

/// The fewest port/mask blocks that together cover exactly `start..=end`.
pub fn port_masks(start: u16, end: u16) -> Vec<PortMask> {
    let (mut a, b) = (u32::from(start), u32::from(end));
    let mut out = Vec::new();
    while a <= b {
        let mut size: u32 = if a == 0 {
            1 << 16
        } else {
            1 << a.trailing_zeros().min(16)
        };
        while a + size - 1 > b {
            size >>= 1;
        }
        out.push(PortMask {
            port: a as u16,
            mask: !((size - 1) as u16),
        });
        a += size;
    }
    out
}

/// The protocol two selectors both allow, if any (0: any).
fn common_proto(a: u8, b: u8) -> Option<u8> {
    match (a, b) {
        (0, p) | (p, 0) => Some(p),
        (p, q) if p == q => Some(p),
        _ => None,
    }
}

/// Smaller for more specific selectors.
fn priority(s: &PolicySelector) -> u32 {
    let prefixes = u32::from(s.src.prefix_len()) + u32::from(s.dst.prefix_len());
    let ports = s.sport.mask.count_ones() + s.dport.mask.count_ones();
    // At most 256 * 40 + 33 + 32 (IPv6 /128 both ways): never below 0.
    PRIORITY_BASE.saturating_sub(prefixes * 40 + u32::from(s.proto != 0) * 33 + ports)
}

/// Every selector for traffic from `src` to `dst` selectors.
fn selectors(src: &[TsRange], dst: &[TsRange]) -> Result<Vec<PolicySelector>, XfrmError> {
    let mut out = Vec::new();
    for s in src {
        for d in dst {
            let Some(proto) = common_proto(s.protocol, d.protocol) else {
                continue;
            };
            for sn in range_prefixes(s.start, s.end) {
                for dn in range_prefixes(d.start, d.end) {
                    for sp in port_masks(s.start_port, s.end_port) {
                        for dp in port_masks(d.start_port, d.end_port) {
                            if out.len() == MAX_POLICIES {
                                return Err(XfrmError::TooManyPolicies(MAX_POLICIES));
                            }
                            out.push(PolicySelector {
                                src: sn.into(),
                                dst: dn.into(),
                                proto,
                                sport: sp,
                                dport: dp,
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The policies of a route-based tunnel for one CHILD_SA's selectors:
/// `out` from `local_ts` to `remote_ts` requiring an SA from `local` to
/// `remote`, `in` and `fwd` the other way, all scoped by `if_id` and
/// naming `reqid`.
pub fn tunnel_policies(
    local_ts: &[TsRange],
    remote_ts: &[TsRange],
    local: IpAddr,
    remote: IpAddr,
    if_id: u32,
    reqid: u32,
) -> Result<Vec<XfrmPolicy>, XfrmError> {
    let out_sel = selectors(local_ts, remote_ts)?;
    let in_sel = selectors(remote_ts, local_ts)?;
    let mut policies = Vec::with_capacity(out_sel.len() + 2 * in_sel.len());
    let tmpl = |src, dst| PolicyTemplate { src, dst, reqid };
    for s in out_sel {
        policies.push(XfrmPolicy {
            dir: PolicyDir::Out,
            selector: s,
            if_id,
            priority: priority(&s),
            templates: vec![tmpl(local, remote)],
        });
    }
    for dir in [PolicyDir::In, PolicyDir::Fwd] {
        for s in &in_sel {
            policies.push(XfrmPolicy {
                dir,
                selector: *s,
                if_id,
                priority: priority(s),
                templates: vec![tmpl(remote, local)],
            });
        }
    }
    Ok(policies)
}

fn kernel_selector(s: &PolicySelector) -> Selector {
    Selector {
        daddr: address(s.dst.addr()),
        saddr: address(s.src.addr()),
        dport: s.dport.port,
        dport_mask: s.dport.mask,
        sport: s.sport.port,
        sport_mask: s.sport.mask,
        family: family(s.dst.addr()),
        prefixlen_d: s.dst.prefix_len(),
        prefixlen_s: s.src.prefix_len(),
        proto: s.proto,
        ifindex: 0,
        user: 0,
    }
}

fn selector_of(s: &Selector) -> Option<PolicySelector> {
    let src = ip_of(&s.saddr, s.family)?;
    let dst = ip_of(&s.daddr, s.family)?;
    Some(PolicySelector {
        src: IpNet::new(src, s.prefixlen_s).ok()?,
        dst: IpNet::new(dst, s.prefixlen_d).ok()?,
        proto: s.proto,
        sport: PortMask {
            port: s.sport,
            mask: s.sport_mask,
        },
        dport: PortMask {
            port: s.dport,
            mask: s.dport_mask,
        },
    })
}

impl XfrmPolicy {
    fn check(&self) -> Result<(), XfrmError> {
        let s = &self.selector;
        let fam = s.src.addr().is_ipv4();
        let mixed = s.dst.addr().is_ipv4() != fam
            || self
                .templates
                .iter()
                .any(|t| t.src.is_ipv4() != t.dst.is_ipv4());
        if mixed {
            return Err(XfrmError::InvalidPolicy(format!(
                "{:?} {} -> {}: addresses of two families",
                self.dir, s.src, s.dst
            )));
        }
        Ok(())
    }

    /// The body of `XFRM_MSG_NEWPOLICY` / `XFRM_MSG_UPDPOLICY`.
    pub(crate) fn message(&self) -> Result<ModifyMessage, XfrmError> {
        self.check()?;
        let info = UserPolicyInfo {
            selector: kernel_selector(&self.selector),
            priority: self.priority,
            direction: self.dir.to_kernel(),
            action: XFRM_POLICY_ALLOW,
            share: XFRM_SHARE_ANY,
            ..UserPolicyInfo::default()
        };
        let templates = self
            .templates
            .iter()
            .map(|t| {
                let mut u = UserTemplate::default();
                u.id.daddr = address(t.dst);
                u.id.proto = IPPROTO_ESP;
                u.family = family(t.dst);
                u.saddr = address(t.src);
                u.reqid = t.reqid;
                u.mode = XFRM_MODE_TUNNEL;
                // Any algorithm, as strongSwan and iproute2 ask: with 0 an
                // inbound SA would never satisfy the template.
                u.aalgos = u32::MAX;
                u.ealgos = u32::MAX;
                u.calgos = u32::MAX;
                u
            })
            .collect();
        let mut nlas = vec![XfrmAttrs::Template(templates)];
        if self.if_id != 0 {
            nlas.push(XfrmAttrs::IfId(self.if_id));
        }
        Ok(ModifyMessage {
            user_policy_info: info,
            nlas,
        })
    }

    /// The body of `XFRM_MSG_DELPOLICY` naming this policy by selector,
    /// direction and `if_id`.
    pub(crate) fn delete_message(&self) -> DelGetMessage {
        DelGetMessage {
            user_policy_id: UserPolicyId {
                selector: kernel_selector(&self.selector),
                index: 0,
                direction: self.dir.to_kernel(),
            },
            nlas: if self.if_id != 0 {
                vec![XfrmAttrs::IfId(self.if_id)]
            } else {
                Vec::new()
            },
        }
    }
}

impl PolicyState {
    /// From a NEWPOLICY body; `None` for a family or direction xesp does
    /// not know (e.g. per-socket policies).
    pub(crate) fn of(info: &UserPolicyInfo, nlas: &[XfrmAttrs]) -> Option<Self> {
        let mut p = Self {
            index: info.index,
            policy: XfrmPolicy {
                dir: PolicyDir::from_kernel(info.direction)?,
                selector: selector_of(&info.selector)?,
                if_id: 0,
                priority: info.priority,
                templates: Vec::new(),
            },
            mark: None,
        };
        for a in nlas {
            match a {
                XfrmAttrs::Template(ts) => {
                    p.policy.templates = ts
                        .iter()
                        .filter_map(|t| {
                            Some(PolicyTemplate {
                                src: ip_of(&t.saddr, t.family)?,
                                dst: ip_of(&t.id.daddr, t.family)?,
                                reqid: t.reqid,
                            })
                        })
                        .collect();
                }
                XfrmAttrs::IfId(i) => p.policy.if_id = *i,
                XfrmAttrs::Mark(m) => p.mark = Some((m.value, m.mask)),
                _ => {}
            }
        }
        Some(p)
    }

    /// The body of `XFRM_MSG_DELPOLICY` naming this policy by its index.
    pub(crate) fn delete_message(&self) -> DelGetMessage {
        let mut nlas = Vec::new();
        if self.policy.if_id != 0 {
            nlas.push(XfrmAttrs::IfId(self.policy.if_id));
        }
        if let Some((value, mask)) = self.mark {
            nlas.push(XfrmAttrs::Mark(netlink_packet_xfrm::Mark { value, mask }));
        }
        DelGetMessage {
            user_policy_id: UserPolicyId {
                selector: kernel_selector(&self.policy.selector),
                index: self.index,
                direction: self.policy.dir.to_kernel(),
            },
            nlas,
        }
    }
}
