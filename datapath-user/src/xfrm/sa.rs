//! ESP SAs in the kernel: what xesp installs ([`XfrmSa`]), what the kernel
//! reports back ([`SaState`], [`XfrmCounters`]), and the messages between
//! them (`struct xfrm_usersa_info` and its attributes,
//! include/uapi/linux/xfrm.h).

use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ike_proto::backend::{ChildSaSpec, Direction};
use netlink_packet_xfrm::{
    AF_INET, AF_INET6, Address, Alg, AlgAead, AlgAuth, EncapTmpl, IPPROTO_ESP, LifetimeConfig,
    ReplayEsn, UDP_ENCAP_ESPINUDP, UserSaId, UserSaInfo, XFRM_INF, XFRM_MODE_TUNNEL,
    XFRM_STATE_ESN, XfrmAttrs,
    state::{DelGetMessage, ModifyMessage},
};
use xesp_esp::{
    alg::{Encr, Integ, Suite},
    sa::{DropReason, Lifetime, Limits, SaCounters},
};
use zeroize::Zeroizing;

use super::XfrmError;

/// The largest anti-replay window the kernel takes (`XFRMA_REPLAY_ESN_MAX`,
/// 4096 octets of bitmap, net/xfrm/xfrm_user.c).
pub const MAX_REPLAY_WINDOW: u32 = 4096 * 8;

/// UDP ports of ESP in UDP (RFC 3948), as the kernel's `xfrm_encap_tmpl`
/// has them: `sport` is the sender's port, `dport` the receiver's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncapPorts {
    pub sport: u16,
    pub dport: u16,
}

/// One direction of a CHILD_SA, as xesp gives it to the kernel: tunnel-mode
/// ESP from `src` to `dst`, scoped to the xfrm interface `if_id`.
#[derive(Clone)]
pub struct XfrmSa {
    pub spi: u32,
    /// Outer source: the sender.
    pub src: IpAddr,
    /// Outer destination: the receiver.
    pub dst: IpAddr,
    /// xesp's marker (see [`super::reqid`]); ties the SA to its policies.
    pub reqid: u32,
    /// The xfrm interface (`IFLA_XFRM_IF_ID`) whose traffic this SA carries.
    pub if_id: u32,
    pub suite: Suite,
    /// KEYMAT for this direction (RFC 7296 §2.17): encryption key (+ salt for
    /// GCM, RFC 4106 §8.1), then integrity key.
    pub keymat: Zeroizing<Vec<u8>>,
    /// Extended sequence numbers (RFC 4304).
    pub esn: bool,
    /// Anti-replay window in packets (0: none; with ESN the kernel needs at
    /// least 1, which is what an outbound SA gets).
    pub replay_window: u32,
    /// `Some`: ESP in UDP (`UDP_ENCAP_ESPINUDP`) between these ports.
    pub encap: Option<EncapPorts>,
    pub lifetime: Lifetime,
}

impl fmt::Debug for XfrmSa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XfrmSa")
            .field("spi", &format_args!("{:08x}", self.spi))
            .field("src", &self.src)
            .field("dst", &self.dst)
            .field("reqid", &self.reqid)
            .field("if_id", &self.if_id)
            .field("suite", &self.suite)
            .field("keymat", &format_args!("<{} octets>", self.keymat.len()))
            .field("esn", &self.esn)
            .field("replay_window", &self.replay_window)
            .field("encap", &self.encap)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// The kernel's name of an encryption transform (crypto API names, as
/// strongSwan and iproute2 use them).
fn encr_name(e: Encr) -> &'static str {
    match e {
        Encr::AesGcm16(_) => "rfc4106(gcm(aes))",
        Encr::AesCbc(_) => "cbc(aes)",
        Encr::Des3Cbc => "cbc(des3_ede)",
    }
}

fn integ_name(i: Integ) -> &'static str {
    match i {
        Integ::HmacSha1_96 => "hmac(sha1)",
        Integ::HmacSha2_256_128 => "hmac(sha256)",
        Integ::HmacSha2_384_192 => "hmac(sha384)",
        Integ::HmacSha2_512_256 => "hmac(sha512)",
    }
}

/// A NUL-padded algorithm name field.
fn alg_name<const N: usize>(name: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (o, b) in out.iter_mut().zip(name.bytes().take(N - 1)) {
        *o = b;
    }
    out
}

fn name_of(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub(crate) fn address(ip: IpAddr) -> Address {
    Address::from_ip(&ip)
}

pub(crate) fn family(ip: IpAddr) -> u16 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// The address in an `xfrm_address_t` of `family`.
pub(crate) fn ip_of(a: &Address, family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => {
            let b = &a.addr;
            Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]).into())
        }
        AF_INET6 => Some(Ipv6Addr::from(a.addr).into()),
        _ => None,
    }
}

fn limit(v: Option<u64>) -> u64 {
    v.unwrap_or(XFRM_INF)
}

fn unlimited(v: u64) -> Option<u64> {
    (v != XFRM_INF).then_some(v)
}

fn seconds(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

impl XfrmSa {
    /// The SA for one direction of a negotiated CHILD_SA: inbound SAs run
    /// from the peer to us, outbound ones from us to the peer; with NAT-T the
    /// ports are the IKE ports (RFC 3948 §2.1). An outbound SA keeps no
    /// replay window (ESN still gets the 1 the kernel needs).
    pub fn from_spec(spec: &ChildSaSpec, if_id: u32, reqid: u32) -> Self {
        let (src, dst) = match spec.direction {
            Direction::Inbound => (spec.remote, spec.local),
            Direction::Outbound => (spec.local, spec.remote),
        };
        Self {
            spi: spec.spi,
            src: src.ip(),
            dst: dst.ip(),
            reqid,
            if_id,
            suite: spec.suite,
            keymat: spec.keymat.clone(),
            esn: spec.esn,
            replay_window: match spec.direction {
                Direction::Inbound => spec.replay_window,
                Direction::Outbound => 0,
            },
            encap: spec.udp_encap.then_some(EncapPorts {
                sport: src.port(),
                dport: dst.port(),
            }),
            lifetime: spec.lifetime,
        }
    }

    /// Checks what [`super::Xfrm::add_sa`] would refuse before asking the
    /// kernel: a reserved SPI, outer addresses of two families, KEYMAT of
    /// the wrong length for the suite, a replay window over the kernel's
    /// maximum, `if_id` 0.
    pub fn validate(&self) -> Result<(), XfrmError> {
        self.message()
            .map(|m| drop(super::msg::Out(netlink_packet_xfrm::XfrmMessage::AddSa(m))))
    }

    /// The body of an `XFRM_MSG_NEWSA` / `XFRM_MSG_UPDSA`: the SA header,
    /// then its transforms, NAT-T, the replay state and the interface. It
    /// holds the keys: wrap it in `msg::Out`, which zeroes them on drop.
    pub(crate) fn message(&self) -> Result<ModifyMessage, XfrmError> {
        let spi = self.spi;
        let invalid = |reason: String| XfrmError::InvalidSa { spi, reason };
        if spi < 256 {
            return Err(invalid("SPIs 0-255 are reserved (RFC 4303 §2.1)".into()));
        }
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(invalid(format!(
                "outer addresses of two families ({} -> {})",
                self.src, self.dst
            )));
        }
        if self.keymat.len() != self.suite.keymat_len() {
            return Err(invalid(format!(
                "{} needs {} octets of KEYMAT, not {}",
                self.suite,
                self.suite.keymat_len(),
                self.keymat.len()
            )));
        }
        if self.replay_window > MAX_REPLAY_WINDOW {
            return Err(invalid(format!(
                "replay window {} is larger than the kernel's {MAX_REPLAY_WINDOW}",
                self.replay_window
            )));
        }
        if self.if_id == 0 {
            return Err(invalid("if_id 0 means no xfrm interface".into()));
        }
        let mut info = UserSaInfo::default();
        // The selector matches everything (/0 both ways): in tunnel mode the
        // policies choose the traffic. Its family is the one of xesp's
        // IPv4 traffic selectors, which is what the kernel would write for
        // AF_UNSPEC anyway (copy_from_user_state, net/xfrm/xfrm_user.c).
        info.selector.family = family(self.dst);
        info.id.daddr = address(self.dst);
        info.id.spi = spi;
        info.id.proto = IPPROTO_ESP;
        info.saddr = address(self.src);
        info.family = family(self.dst);
        info.mode = XFRM_MODE_TUNNEL;
        info.reqid = self.reqid;
        let lt = &self.lifetime;
        info.lifetime_cfg = LifetimeConfig {
            soft_byte_limit: limit(lt.soft.bytes),
            hard_byte_limit: limit(lt.hard.bytes),
            soft_packet_limit: limit(lt.soft.packets),
            hard_packet_limit: limit(lt.hard.packets),
            soft_add_expires_seconds: lt.soft.seconds.unwrap_or(0),
            hard_add_expires_seconds: lt.hard.seconds.unwrap_or(0),
            soft_use_expires_seconds: 0,
            hard_use_expires_seconds: 0,
        };
        // Every window goes in XFRMA_REPLAY_ESN_VAL, which then requires the
        // legacy u8 field to be 0 (verify_replay, net/xfrm/xfrm_user.c); the
        // ESN flag is set with it, or the kernel would count 32-bit numbers.
        let window = if self.esn {
            self.replay_window.max(1)
        } else {
            self.replay_window
        };
        if self.esn {
            info.flags |= XFRM_STATE_ESN;
        }
        let mut nlas = Vec::new();
        let enc_len = self.suite.encr.keymat_len();
        let (enc, auth) = self.keymat.split_at(enc_len);
        let name = encr_name(self.suite.encr);
        if self.suite.encr.is_aead() {
            nlas.push(XfrmAttrs::EncryptionAlgAead(AlgAead {
                alg_name: alg_name(name),
                alg_key_len: bits(enc.len()),
                alg_icv_len: bits(self.suite.icv_len()),
                alg_key: enc.to_vec(),
            }));
        } else {
            let Some(integ) = self.suite.integ else {
                return Err(invalid(format!(
                    "{} has no integrity transform",
                    self.suite
                )));
            };
            nlas.push(XfrmAttrs::AuthenticationAlgTrunc(AlgAuth {
                alg_name: alg_name(integ_name(integ)),
                alg_key_len: bits(auth.len()),
                alg_trunc_len: bits(integ.icv_len()),
                alg_key: auth.to_vec(),
            }));
            nlas.push(XfrmAttrs::EncryptionAlg(Alg {
                alg_name: alg_name(name),
                alg_key_len: bits(enc.len()),
                alg_key: enc.to_vec(),
            }));
        }
        if let Some(p) = self.encap {
            nlas.push(XfrmAttrs::EncapsulationTemplate(EncapTmpl {
                encap_type: UDP_ENCAP_ESPINUDP,
                encap_sport: p.sport,
                encap_dport: p.dport,
                encap_oa: Address::default(),
            }));
        }
        if window > 0 || self.esn {
            nlas.push(XfrmAttrs::ReplayStateEsn(ReplayEsn {
                bmp_len: window.div_ceil(32),
                replay_window: window,
                ..ReplayEsn::default()
            }));
        }
        nlas.push(XfrmAttrs::IfId(self.if_id));
        Ok(ModifyMessage {
            user_sa_info: info,
            nlas,
        })
    }
}

fn bits(octets: usize) -> u32 {
    u32::try_from(octets * 8).unwrap_or(u32::MAX)
}

/// Names an SA: its destination, SPI and protocol (`struct xfrm_usersa_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SaId {
    pub dst: IpAddr,
    pub spi: u32,
    /// IP protocol: 50 (ESP) for xesp's SAs.
    pub proto: u8,
}

impl SaId {
    /// The ESP SA `spi` towards `dst`.
    pub fn esp(dst: IpAddr, spi: u32) -> Self {
        Self {
            dst,
            spi,
            proto: IPPROTO_ESP,
        }
    }

    /// The body of `XFRM_MSG_GETSA` / `XFRM_MSG_DELSA`.
    pub(crate) fn message(&self) -> DelGetMessage {
        DelGetMessage {
            user_sa_id: UserSaId {
                daddr: address(self.dst),
                spi: self.spi,
                family: family(self.dst),
                proto: self.proto,
            },
            nlas: Vec::new(),
        }
    }
}

impl fmt::Display for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SPI {:08x} proto {} dst {}",
            self.spi, self.proto, self.dst
        )
    }
}

/// What an SA has done, as the kernel counts it (`xfrm_lifetime_cur`,
/// `xfrm_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct XfrmCounters {
    /// Octets of the packets processed (inner packets).
    pub bytes: u64,
    pub packets: u64,
    /// When the SA was added and first used (seconds since the epoch; 0: never).
    pub add_time: u64,
    pub use_time: u64,
    /// Inbound packets dropped as older than the replay window.
    pub replay_window: u32,
    /// Inbound packets dropped as replays (already seen).
    pub replay: u32,
    /// Inbound packets whose ICV did not verify.
    pub integrity_failed: u32,
}

impl XfrmCounters {
    fn of(info: &UserSaInfo) -> Self {
        Self {
            bytes: info.lifetime_cur.bytes,
            packets: info.lifetime_cur.packets,
            add_time: info.lifetime_cur.add_time,
            use_time: info.lifetime_cur.use_time,
            replay_window: info.stats.replay_window,
            replay: info.stats.replay,
            integrity_failed: info.stats.integrity_failed,
        }
    }

    /// The same counts in the form xesp's status shows for every datapath.
    pub fn to_sa_counters(&self) -> SaCounters {
        let mut c = SaCounters {
            packets: self.packets,
            bytes: self.bytes,
            ..SaCounters::default()
        };
        c.drops.record_n(
            DropReason::Replay,
            u64::from(self.replay) + u64::from(self.replay_window),
        );
        c.drops
            .record_n(DropReason::Authentication, u64::from(self.integrity_failed));
        c
    }
}

/// A transform as the kernel reports it: its crypto API name and sizes in
/// bits, never its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlgState {
    pub name: String,
    pub key_bits: u32,
    /// The ICV (AEAD) or truncated MAC length; 0 for a cipher.
    pub icv_bits: u32,
}

/// An SA as the kernel reports it (a dump, GETSA, an event), without keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaState {
    pub id: SaId,
    pub src: IpAddr,
    pub reqid: u32,
    /// 0 when the SA has no `XFRMA_IF_ID`.
    pub if_id: u32,
    /// `XFRM_MODE_*`: 1 is tunnel mode.
    pub mode: u8,
    /// `XFRM_STATE_*` flags (ESN is 128).
    pub flags: u8,
    pub aead: Option<AlgState>,
    pub encryption: Option<AlgState>,
    pub integrity: Option<AlgState>,
    pub encap: Option<EncapPorts>,
    /// The replay window (from `XFRMA_REPLAY_ESN_VAL`, or the legacy field).
    pub replay_window: u32,
    /// `(mark, mask)` from `XFRMA_MARK`, if any.
    pub mark: Option<(u32, u32)>,
    pub lifetime: Lifetime,
    pub counters: XfrmCounters,
}

impl SaState {
    /// True if the SA uses extended sequence numbers.
    pub fn esn(&self) -> bool {
        self.flags & XFRM_STATE_ESN != 0
    }

    /// From an SA header and its attributes; `None` if the family is not
    /// IPv4 or IPv6.
    pub(crate) fn of(info: &UserSaInfo, nlas: &[XfrmAttrs]) -> Option<Self> {
        let dst = ip_of(&info.id.daddr, info.family)?;
        let src = ip_of(&info.saddr, info.family)?;
        let mut s = Self {
            id: SaId {
                dst,
                spi: info.id.spi,
                proto: info.id.proto,
            },
            src,
            reqid: info.reqid,
            if_id: 0,
            mode: info.mode,
            flags: info.flags,
            aead: None,
            encryption: None,
            integrity: None,
            encap: None,
            replay_window: u32::from(info.replay_window),
            mark: None,
            lifetime: lifetime_of(&info.lifetime_cfg),
            counters: XfrmCounters::of(info),
        };
        for a in nlas {
            match a {
                XfrmAttrs::EncryptionAlgAead(k) => {
                    s.aead = Some(AlgState {
                        name: name_of(&k.alg_name),
                        key_bits: k.alg_key_len,
                        icv_bits: k.alg_icv_len,
                    })
                }
                XfrmAttrs::EncryptionAlg(k) => {
                    s.encryption = Some(AlgState {
                        name: name_of(&k.alg_name),
                        key_bits: k.alg_key_len,
                        icv_bits: 0,
                    })
                }
                XfrmAttrs::AuthenticationAlgTrunc(k) => {
                    s.integrity = Some(AlgState {
                        name: name_of(&k.alg_name),
                        key_bits: k.alg_key_len,
                        icv_bits: k.alg_trunc_len,
                    })
                }
                XfrmAttrs::EncapsulationTemplate(e) if e.encap_type == UDP_ENCAP_ESPINUDP => {
                    s.encap = Some(EncapPorts {
                        sport: e.encap_sport,
                        dport: e.encap_dport,
                    })
                }
                XfrmAttrs::ReplayStateEsn(r) => s.replay_window = r.replay_window,
                XfrmAttrs::IfId(i) => s.if_id = *i,
                XfrmAttrs::Mark(m) => s.mark = Some((m.value, m.mask)),
                _ => {}
            }
        }
        Some(s)
    }
}

fn lifetime_of(c: &LifetimeConfig) -> Lifetime {
    Lifetime {
        soft: Limits {
            bytes: unlimited(c.soft_byte_limit),
            packets: unlimited(c.soft_packet_limit),
            seconds: seconds(c.soft_add_expires_seconds),
        },
        hard: Limits {
            bytes: unlimited(c.hard_byte_limit),
            packets: unlimited(c.hard_packet_limit),
            seconds: seconds(c.hard_add_expires_seconds),
        },
    }
}
