//! Why an incoming message was dropped before it changed any state. Each
//! drop is counted and reported as [`super::Event::Rejected`].

use std::net::IpAddr;

use crate::{
    codec::{DecodeError, ExchangeType},
    crypto::CryptoError,
    sk::SkError,
};

/// A message dropped, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("unparsable: {0}")]
    Unparsable(#[from] DecodeError),
    #[error("{exchange} for an unknown IKE_SA {spi_i:016x}/{spi_r:016x}")]
    UnknownSa {
        exchange: ExchangeType,
        spi_i: u64,
        spi_r: u64,
    },
    #[error("IKE_SA_INIT from {0}, which is not this connection's peer")]
    NotThePeer(IpAddr),
    #[error("malformed {0} header")]
    MalformedHeader(&'static str),
    #[error("{exchange} without {payload}")]
    MissingPayload {
        exchange: ExchangeType,
        payload: &'static str,
    },
    #[error("nonce of {0} octets (16 to 256, §2.10)")]
    NonceLength(usize),
    #[error("{what}: {count} traffic selectors (at most {max})")]
    TooManySelectors {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("message with our own role's Initiator flag")]
    OwnRole,
    #[error("response with no request outstanding")]
    Unsolicited,
    #[error("response with message ID {got} (ours is {want})")]
    UnexpectedResponse { got: u32, want: u32 },
    #[error("request with message ID {got} (expected {want})")]
    OutOfWindow { got: u32, want: u32 },
    #[error("a request with the last answered message ID that is not the request answered")]
    NotARetransmission,
    #[error("{0} request before IKE_AUTH")]
    BeforeAuth(ExchangeType),
    #[error("{exchange}: {error}")]
    Sk {
        exchange: ExchangeType,
        error: SkError,
    },
    #[error("deriving the IKE_SA's keys: {0}")]
    Keys(#[from] SkError),
    #[error("key exchange: {0}")]
    Crypto(#[from] CryptoError),
    #[error("IKE_SA_INIT response for no IKE_SA_INIT of ours")]
    NoInitOutstanding,
    #[error("the responder asked for the same COOKIE again")]
    SameCookie,
    #[error("INVALID_KE_PAYLOAD asking for the group we used")]
    SameKeGroup,
    #[error("the KE payload's group is not the chosen proposal's")]
    KeGroupMismatch,
    #[error("the IKE_SA has no keys")]
    NoKeys,
    #[error("IKE_SA_INIT while the connection is closed (taken down by the operator)")]
    Closed,
    #[error("half-open IKE_SAs at their limit ({0})")]
    HalfOpenLimit(usize),
}

pub(super) type Verdict = Result<(), Reject>;
