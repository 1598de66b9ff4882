//! The XFRM messages as netlink-packet-xfrm models them, wrapped so that
//! keys are zeroed when a message is dropped and so that truncated messages
//! from the kernel are refused before that crate slices them (its fixed
//! headers are sliced without a length check).

use netlink_packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkSerializable, ParseableParametrized,
};
use netlink_packet_xfrm::{
    UserExpire, UserSaInfo, XFRM_MSG_EXPIRE, XFRM_MSG_NEWPOLICY, XFRM_MSG_NEWSA,
    XFRM_MSG_UPDPOLICY, XFRM_MSG_UPDSA, XfrmAttrs, XfrmMessage,
};
use zeroize::Zeroize;

/// `sizeof(struct xfrm_userpolicy_info)` (include/uapi/linux/xfrm.h).
pub(crate) const USERPOLICY_INFO_LEN: usize = 168;
/// `sizeof(struct xfrm_usersa_info)`.
pub(crate) const USERSA_INFO_LEN: usize = 224;
/// `sizeof(struct xfrm_user_expire)`.
pub(crate) const USER_EXPIRE_LEN: usize = 232;

/// Zeroes every key an SA message carries.
pub(crate) fn scrub(msg: &mut XfrmMessage) {
    let nlas = match msg {
        XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) => &mut m.nlas,
        _ => return,
    };
    for a in nlas {
        match a {
            XfrmAttrs::EncryptionAlgAead(k) => k.alg_key.zeroize(),
            XfrmAttrs::AuthenticationAlgTrunc(k) => k.alg_key.zeroize(),
            XfrmAttrs::AuthenticationAlg(k)
            | XfrmAttrs::EncryptionAlg(k)
            | XfrmAttrs::CompressionAlg(k) => k.alg_key.zeroize(),
            _ => {}
        }
    }
}

/// A request to the kernel; its keys are zeroed on drop.
pub(crate) struct Out(pub(crate) XfrmMessage);

impl Drop for Out {
    fn drop(&mut self) {
        scrub(&mut self.0);
    }
}

impl NetlinkSerializable for Out {
    fn message_type(&self) -> u16 {
        self.0.message_type()
    }
    fn buffer_len(&self) -> usize {
        NetlinkSerializable::buffer_len(&self.0)
    }
    fn serialize(&self, buffer: &mut [u8]) {
        NetlinkSerializable::serialize(&self.0, buffer)
    }
}

/// A message from the kernel: the SA, policy and expire messages xesp reads
/// (`None` for other types). Keys are zeroed on drop.
pub(crate) struct In(pub(crate) Option<XfrmMessage>);

impl Drop for In {
    fn drop(&mut self) {
        if let Some(m) = &mut self.0 {
            scrub(m);
        }
    }
}

/// The fixed header an XFRM message of `kind` starts with, for the kinds
/// xesp parses.
fn fixed_len(kind: u16) -> Option<usize> {
    match kind {
        XFRM_MSG_NEWSA | XFRM_MSG_UPDSA => Some(USERSA_INFO_LEN),
        XFRM_MSG_NEWPOLICY | XFRM_MSG_UPDPOLICY => Some(USERPOLICY_INFO_LEN),
        XFRM_MSG_EXPIRE => Some(USER_EXPIRE_LEN),
        _ => None,
    }
}

/// Parses one XFRM message body of type `kind`; never panics.
pub(crate) fn parse(kind: u16, payload: &[u8]) -> Result<In, DecodeError> {
    let Some(min) = fixed_len(kind) else {
        return Ok(In(None));
    };
    if payload.len() < min {
        return Err(format!(
            "XFRM message type {kind}: {} octets, shorter than its {min}-octet header",
            payload.len()
        )
        .into());
    }
    XfrmMessage::parse_with_param(payload, kind).map(|m| In(Some(m)))
}

impl NetlinkDeserializable for In {
    type Error = DecodeError;
    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        parse(header.message_type, payload)
    }
}

/// The SA header of a NEWSA/UPDSA message, or of an EXPIRE's SA.
pub(crate) fn sa_info(m: &XfrmMessage) -> Option<(&UserSaInfo, &[XfrmAttrs])> {
    match m {
        XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) => Some((&m.user_sa_info, &m.nlas)),
        XfrmMessage::Expire(e) => Some((&e.expire.state, &[])),
        _ => None,
    }
}

/// The expire header of an EXPIRE message.
pub(crate) fn expire(m: &XfrmMessage) -> Option<&UserExpire> {
    match m {
        XfrmMessage::Expire(e) => Some(&e.expire),
        _ => None,
    }
}
