//! IKEv2 messages on the wire (RFC 7296 §3): parsing and emitting.
//!
//! Parsing never panics and rejects inconsistent lengths and trailing bytes;
//! emitting what was parsed gives back the same octets (reserved fields and
//! unknown payloads are kept, as §3.2 and §2.5 want them ignored, not lost).

use core::fmt;

/// Errors parsing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}: truncated")]
    Truncated(&'static str),
    #[error("{0}: length field inconsistent")]
    BadLength(&'static str),
    #[error("IKE header: major version {0}, not 2")]
    Version(u8),
    #[error("{0}: trailing octets")]
    Trailing(&'static str),
    #[error("{0}: invalid value")]
    Invalid(&'static str),
}

/// A cursor over received octets that never reads past the end.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    /// Fails unless everything was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.what))
        }
    }
}

macro_rules! newtype_enum {
    ($(#[$m:meta])* $name:ident($t:ty) { $($(#[$vm:meta])* $c:ident = $v:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $t);
        impl $name {
            $($(#[$vm])* pub const $c: $name = $name($v);)*
            /// The RFC's name, if this value has one here.
            pub fn name(self) -> Option<&'static str> {
                match self { $(Self::$c => Some(stringify!($c)),)* _ => None }
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() { Some(n) => f.write_str(n), None => write!(f, "{}({})", stringify!($name), self.0) }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { fmt::Debug::fmt(self, f) }
        }
    };
}

newtype_enum!(
    /// Exchange types (RFC 7296 §3.1).
    ExchangeType(u8) { IKE_SA_INIT = 34, IKE_AUTH = 35, CREATE_CHILD_SA = 36, INFORMATIONAL = 37 }
);

newtype_enum!(
    /// Payload types (RFC 7296 §3.2).
    PayloadType(u8) {
        NONE = 0, SA = 33, KE = 34, IDI = 35, IDR = 36, CERT = 37, CERTREQ = 38, AUTH = 39, NONCE = 40,
        NOTIFY = 41, DELETE = 42, VENDOR = 43, TSI = 44, TSR = 45, SK = 46, CP = 47, EAP = 48, SKF = 53,
    }
);

newtype_enum!(
    /// Notify message types (RFC 7296 §3.10.1 and later RFCs).
    NotifyType(u16) {
        UNSUPPORTED_CRITICAL_PAYLOAD = 1, INVALID_IKE_SPI = 4, INVALID_MAJOR_VERSION = 5, INVALID_SYNTAX = 7,
        INVALID_MESSAGE_ID = 9, INVALID_SPI = 11, NO_PROPOSAL_CHOSEN = 14, INVALID_KE_PAYLOAD = 17,
        AUTHENTICATION_FAILED = 24, SINGLE_PAIR_REQUIRED = 34, NO_ADDITIONAL_SAS = 35,
        INTERNAL_ADDRESS_FAILURE = 36, FAILED_CP_REQUIRED = 37, TS_UNACCEPTABLE = 38, INVALID_SELECTORS = 39,
        TEMPORARY_FAILURE = 43, CHILD_SA_NOT_FOUND = 44,
        INITIAL_CONTACT = 16384, SET_WINDOW_SIZE = 16385, ADDITIONAL_TS_POSSIBLE = 16386,
        IPCOMP_SUPPORTED = 16387, NAT_DETECTION_SOURCE_IP = 16388, NAT_DETECTION_DESTINATION_IP = 16389,
        COOKIE = 16390, USE_TRANSPORT_MODE = 16391, HTTP_CERT_LOOKUP_SUPPORTED = 16392, REKEY_SA = 16393,
        ESP_TFC_PADDING_NOT_SUPPORTED = 16394, NON_FIRST_FRAGMENTS_ALSO = 16395, MOBIKE_SUPPORTED = 16396,
        MULTIPLE_AUTH_SUPPORTED = 16404, REDIRECT_SUPPORTED = 16406, IKEV2_FRAGMENTATION_SUPPORTED = 16430,
        SIGNATURE_HASH_ALGORITHMS = 16431,
    }
);

impl NotifyType {
    /// Types below 16384 report errors (§3.10.1).
    pub fn is_error(self) -> bool {
        self.0 < 16384
    }
}

newtype_enum!(
    /// Security protocol identifiers (§3.3.1).
    ProtocolId(u8) { NONE = 0, IKE = 1, AH = 2, ESP = 3 }
);

newtype_enum!(
    /// Transform types (§3.3.2).
    TransformType(u8) { ENCR = 1, PRF = 2, INTEG = 3, DH = 4, ESN = 5 }
);

newtype_enum!(
    /// Identification types (§3.5).
    IdType(u8) { ID_IPV4_ADDR = 1, ID_FQDN = 2, ID_RFC822_ADDR = 3, ID_IPV6_ADDR = 5, ID_DER_ASN1_DN = 9, ID_KEY_ID = 11 }
);

newtype_enum!(
    /// Authentication methods (§3.8).
    AuthMethod(u8) { RSA_SIG = 1, SHARED_KEY_MIC = 2, DSS_SIG = 3, DIGITAL_SIGNATURE = 14 }
);

newtype_enum!(
    /// Traffic selector types (§3.13.1).
    TsType(u8) { TS_IPV4_ADDR_RANGE = 7, TS_IPV6_ADDR_RANGE = 8 }
);

/// Header flags (§3.1).
pub const FLAG_INITIATOR: u8 = 0x08;
pub const FLAG_VERSION: u8 = 0x10;
pub const FLAG_RESPONSE: u8 = 0x20;

/// The IKE header (§3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub spi_i: u64,
    pub spi_r: u64,
    /// Type of the first payload (kept for SK, whose inner type it names).
    pub next_payload: PayloadType,
    /// Major (high nibble) and minor version.
    pub version: u8,
    pub exchange: ExchangeType,
    pub flags: u8,
    pub message_id: u32,
}

pub const HEADER_LEN: usize = 28;
pub const IKE_VERSION: u8 = 0x20;

impl Header {
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }
    pub fn is_initiator(&self) -> bool {
        self.flags & FLAG_INITIATOR != 0
    }

    /// Parses the header and checks the length field against `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, "IKE header");
        let h = Self {
            spi_i: r.u64()?,
            spi_r: r.u64()?,
            next_payload: PayloadType(r.u8()?),
            version: r.u8()?,
            exchange: ExchangeType(r.u8()?),
            flags: r.u8()?,
            message_id: r.u32()?,
        };
        if h.version >> 4 != 2 {
            return Err(DecodeError::Version(h.version >> 4));
        }
        let len = r.u32()? as usize;
        if len != buf.len() {
            return Err(DecodeError::BadLength("IKE header"));
        }
        Ok(h)
    }

    pub fn emit(&self, out: &mut Vec<u8>, total_len: usize) {
        out.extend_from_slice(&self.spi_i.to_be_bytes());
        out.extend_from_slice(&self.spi_r.to_be_bytes());
        out.push(self.next_payload.0);
        out.push(self.version);
        out.push(self.exchange.0);
        out.push(self.flags);
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&(total_len as u32).to_be_bytes());
    }
}

/// A transform attribute (§3.3.5): TV when `tv`, TLV otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub kind: u16,
    pub tv: bool,
    pub value: Vec<u8>,
}

/// Attribute type of the key length (§3.3.5).
pub const ATTR_KEY_LENGTH: u16 = 14;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub kind: TransformType,
    pub id: u16,
    pub attributes: Vec<Attribute>,
    pub reserved: [u8; 2],
}

impl Transform {
    pub fn new(kind: TransformType, id: u16, key_length: Option<u16>) -> Self {
        let attributes = key_length
            .map(|k| {
                vec![Attribute {
                    kind: ATTR_KEY_LENGTH,
                    tv: true,
                    value: k.to_be_bytes().to_vec(),
                }]
            })
            .unwrap_or_default();
        Self {
            kind,
            id,
            attributes,
            reserved: [0; 2],
        }
    }

    /// The Key Length attribute, if present and well-formed.
    pub fn key_length(&self) -> Option<u16> {
        self.attributes
            .iter()
            .find(|a| a.kind == ATTR_KEY_LENGTH && a.tv)
            .and_then(|a| match a.value[..] {
                [x, y] => Some(u16::from_be_bytes([x, y])),
                _ => None,
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub number: u8,
    pub protocol: ProtocolId,
    pub spi: Vec<u8>,
    pub transforms: Vec<Transform>,
    pub reserved: u8,
}

/// An identification payload's body (§3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identification {
    pub id_type: IdType,
    pub reserved: [u8; 3],
    pub data: Vec<u8>,
}

impl Identification {
    /// The octets AUTH is computed over (§2.15: the body after the generic header).
    pub fn body(&self) -> Vec<u8> {
        let mut v = vec![self.id_type.0];
        v.extend_from_slice(&self.reserved);
        v.extend_from_slice(&self.data);
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub protocol: ProtocolId,
    pub spi: Vec<u8>,
    pub kind: NotifyType,
    pub data: Vec<u8>,
}

impl Notify {
    pub fn new(kind: NotifyType, data: Vec<u8>) -> Self {
        Self {
            protocol: ProtocolId::NONE,
            spi: Vec::new(),
            kind,
            data,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub protocol: ProtocolId,
    pub spi_size: u8,
    pub spis: Vec<Vec<u8>>,
}

/// One traffic selector (§3.13.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrafficSelector {
    pub ts_type: TsType,
    pub ip_protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

/// One payload. Everything not understood here is kept as `Unknown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Sa(Vec<Proposal>),
    Ke {
        group: u16,
        reserved: [u8; 2],
        data: Vec<u8>,
    },
    IdI(Identification),
    IdR(Identification),
    Auth {
        method: AuthMethod,
        reserved: [u8; 3],
        data: Vec<u8>,
    },
    Nonce(Vec<u8>),
    Notify(Notify),
    Delete(Delete),
    Vendor(Vec<u8>),
    TsI {
        reserved: [u8; 3],
        selectors: Vec<TrafficSelector>,
    },
    TsR {
        reserved: [u8; 3],
        selectors: Vec<TrafficSelector>,
    },
    /// Encrypted and authenticated (§3.14): IV, ciphertext and ICV as
    /// received; `inner` is the type of the first payload inside.
    Sk {
        inner: PayloadType,
        data: Vec<u8>,
    },
    Unknown {
        kind: PayloadType,
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// Critical bit and reserved bits of the generic header (§3.2).
    pub flags: u8,
    pub body: Body,
}

pub const CRITICAL: u8 = 0x80;

impl Payload {
    pub fn new(body: Body) -> Self {
        Self { flags: 0, body }
    }

    pub fn kind(&self) -> PayloadType {
        match &self.body {
            Body::Sa(_) => PayloadType::SA,
            Body::Ke { .. } => PayloadType::KE,
            Body::IdI(_) => PayloadType::IDI,
            Body::IdR(_) => PayloadType::IDR,
            Body::Auth { .. } => PayloadType::AUTH,
            Body::Nonce(_) => PayloadType::NONCE,
            Body::Notify(_) => PayloadType::NOTIFY,
            Body::Delete(_) => PayloadType::DELETE,
            Body::Vendor(_) => PayloadType::VENDOR,
            Body::TsI { .. } => PayloadType::TSI,
            Body::TsR { .. } => PayloadType::TSR,
            Body::Sk { .. } => PayloadType::SK,
            Body::Unknown { kind, .. } => *kind,
        }
    }
}

/// Parses a chain of payloads starting with type `first`. For an SK payload,
/// the chain ends with it (it must be last, §3.14) and its inner type is
/// the next-payload field it carries.
pub fn parse_payloads(first: PayloadType, buf: &[u8]) -> Result<Vec<Payload>, DecodeError> {
    let mut out = Vec::new();
    let mut next = first;
    let mut r = Reader::new(buf, "payload chain");
    while next != PayloadType::NONE {
        let this = next;
        let mut h = Reader::new(r.take(4)?, "generic payload header");
        next = PayloadType(h.u8()?);
        let flags = h.u8()?;
        let len = usize::from(h.u16()?);
        let body_len = len
            .checked_sub(4)
            .ok_or(DecodeError::BadLength("generic payload header"))?;
        let body = r
            .take(body_len)
            .map_err(|_| DecodeError::BadLength("generic payload header"))?;
        let parsed = parse_body(this, next, body)?;
        let is_sk = matches!(parsed, Body::Sk { .. });
        out.push(Payload {
            flags,
            body: parsed,
        });
        if is_sk {
            if !r.is_empty() {
                return Err(DecodeError::Trailing("SK payload is not last"));
            }
            return Ok(out);
        }
    }
    r.finish()?;
    Ok(out)
}

fn parse_body(kind: PayloadType, next: PayloadType, body: &[u8]) -> Result<Body, DecodeError> {
    let mut r = Reader::new(body, "payload");
    let b = match kind {
        PayloadType::SA => Body::Sa(parse_proposals(body)?),
        PayloadType::KE => {
            let group = r.u16()?;
            let reserved = r.array()?;
            Body::Ke {
                group,
                reserved,
                data: r.rest().to_vec(),
            }
        }
        PayloadType::IDI | PayloadType::IDR => {
            let id = Identification {
                id_type: IdType(r.u8()?),
                reserved: r.array()?,
                data: r.rest().to_vec(),
            };
            if kind == PayloadType::IDI {
                Body::IdI(id)
            } else {
                Body::IdR(id)
            }
        }
        PayloadType::AUTH => {
            let method = AuthMethod(r.u8()?);
            Body::Auth {
                method,
                reserved: r.array()?,
                data: r.rest().to_vec(),
            }
        }
        PayloadType::NONCE => Body::Nonce(r.rest().to_vec()),
        PayloadType::NOTIFY => {
            let protocol = ProtocolId(r.u8()?);
            let spi_size = usize::from(r.u8()?);
            let kind = NotifyType(r.u16()?);
            let spi = r.take(spi_size)?.to_vec();
            Body::Notify(Notify {
                protocol,
                spi,
                kind,
                data: r.rest().to_vec(),
            })
        }
        PayloadType::DELETE => {
            let protocol = ProtocolId(r.u8()?);
            let spi_size = r.u8()?;
            let n = usize::from(r.u16()?);
            let mut spis = Vec::with_capacity(n.min(256));
            for _ in 0..n {
                spis.push(r.take(usize::from(spi_size))?.to_vec());
            }
            r.finish()?;
            return Ok(Body::Delete(Delete {
                protocol,
                spi_size,
                spis,
            }));
        }
        PayloadType::VENDOR => Body::Vendor(r.rest().to_vec()),
        PayloadType::TSI | PayloadType::TSR => {
            let n = usize::from(r.u8()?);
            let reserved = r.array()?;
            let mut selectors = Vec::with_capacity(n);
            for _ in 0..n {
                selectors.push(parse_ts(&mut r)?);
            }
            r.finish()?;
            if kind == PayloadType::TSI {
                Body::TsI {
                    reserved,
                    selectors,
                }
            } else {
                Body::TsR {
                    reserved,
                    selectors,
                }
            }
        }
        PayloadType::SK => {
            return Ok(Body::Sk {
                inner: next,
                data: body.to_vec(),
            });
        }
        _ => Body::Unknown {
            kind,
            data: body.to_vec(),
        },
    };
    Ok(b)
}

fn parse_proposals(body: &[u8]) -> Result<Vec<Proposal>, DecodeError> {
    let mut r = Reader::new(body, "SA payload");
    let mut out = Vec::new();
    loop {
        let mut h = Reader::new(r.take(8)?, "proposal");
        let last = h.u8()?;
        let reserved = h.u8()?;
        let len = usize::from(h.u16()?);
        let number = h.u8()?;
        let protocol = ProtocolId(h.u8()?);
        let spi_size = usize::from(h.u8()?);
        let n_transforms = usize::from(h.u8()?);
        let rest = r.take(
            len.checked_sub(8)
                .ok_or(DecodeError::BadLength("proposal"))?,
        )?;
        let mut p = Reader::new(rest, "proposal");
        let spi = p.take(spi_size)?.to_vec();
        let mut transforms = Vec::with_capacity(n_transforms);
        for i in 0..n_transforms {
            let mut th = Reader::new(p.take(8)?, "transform");
            let t_last = th.u8()?;
            let r1 = th.u8()?;
            let t_len = usize::from(th.u16()?);
            let kind = TransformType(th.u8()?);
            let r2 = th.u8()?;
            let id = th.u16()?;
            if t_last != if i + 1 == n_transforms { 0 } else { 3 } {
                return Err(DecodeError::Invalid("transform: last-substructure flag"));
            }
            let mut a = Reader::new(
                p.take(
                    t_len
                        .checked_sub(8)
                        .ok_or(DecodeError::BadLength("transform"))?,
                )?,
                "attribute",
            );
            let mut attributes = Vec::new();
            while !a.is_empty() {
                let t = a.u16()?;
                let tv = t & 0x8000 != 0;
                let value = if tv {
                    a.take(2)?.to_vec()
                } else {
                    let l = usize::from(a.u16()?);
                    a.take(l)?.to_vec()
                };
                attributes.push(Attribute {
                    kind: t & 0x7fff,
                    tv,
                    value,
                });
            }
            transforms.push(Transform {
                kind,
                id,
                attributes,
                reserved: [r1, r2],
            });
        }
        p.finish()?;
        out.push(Proposal {
            number,
            protocol,
            spi,
            transforms,
            reserved,
        });
        match last {
            0 if r.is_empty() => return Ok(out),
            2 if !r.is_empty() => continue,
            _ => return Err(DecodeError::Invalid("proposal: last-substructure flag")),
        }
    }
}

fn parse_ts(r: &mut Reader<'_>) -> Result<TrafficSelector, DecodeError> {
    let ts_type = TsType(r.u8()?);
    let ip_protocol = r.u8()?;
    let len = usize::from(r.u16()?);
    let addr_len = match ts_type {
        TsType::TS_IPV4_ADDR_RANGE => 4,
        TsType::TS_IPV6_ADDR_RANGE => 16,
        _ => return Err(DecodeError::Invalid("traffic selector type")),
    };
    if len != 8 + 2 * addr_len {
        return Err(DecodeError::BadLength("traffic selector"));
    }
    Ok(TrafficSelector {
        ts_type,
        ip_protocol,
        start_port: r.u16()?,
        end_port: r.u16()?,
        start: r.take(addr_len)?.to_vec(),
        end: r.take(addr_len)?.to_vec(),
    })
}

/// Appends one payload's body; returns nothing (lengths are patched by the caller).
fn emit_body(b: &Body, out: &mut Vec<u8>) {
    match b {
        Body::Sa(props) => {
            for (i, p) in props.iter().enumerate() {
                let start = out.len();
                out.push(if i + 1 == props.len() { 0 } else { 2 });
                out.push(p.reserved);
                out.extend_from_slice(&[0, 0]);
                out.push(p.number);
                out.push(p.protocol.0);
                out.push(p.spi.len() as u8);
                out.push(p.transforms.len() as u8);
                out.extend_from_slice(&p.spi);
                for (j, t) in p.transforms.iter().enumerate() {
                    let ts = out.len();
                    out.push(if j + 1 == p.transforms.len() { 0 } else { 3 });
                    out.push(t.reserved[0]);
                    out.extend_from_slice(&[0, 0]);
                    out.push(t.kind.0);
                    out.push(t.reserved[1]);
                    out.extend_from_slice(&t.id.to_be_bytes());
                    for a in &t.attributes {
                        if a.tv {
                            out.extend_from_slice(&(a.kind | 0x8000).to_be_bytes());
                            out.extend_from_slice(&a.value);
                        } else {
                            out.extend_from_slice(&a.kind.to_be_bytes());
                            out.extend_from_slice(&(a.value.len() as u16).to_be_bytes());
                            out.extend_from_slice(&a.value);
                        }
                    }
                    let tl = (out.len() - ts) as u16;
                    out[ts + 2..ts + 4].copy_from_slice(&tl.to_be_bytes());
                }
                let pl = (out.len() - start) as u16;
                out[start + 2..start + 4].copy_from_slice(&pl.to_be_bytes());
            }
        }
        Body::Ke {
            group,
            reserved,
            data,
        } => {
            out.extend_from_slice(&group.to_be_bytes());
            out.extend_from_slice(reserved);
            out.extend_from_slice(data);
        }
        Body::IdI(id) | Body::IdR(id) => out.extend_from_slice(&id.body()),
        Body::Auth {
            method,
            reserved,
            data,
        } => {
            out.push(method.0);
            out.extend_from_slice(reserved);
            out.extend_from_slice(data);
        }
        Body::Nonce(n) | Body::Vendor(n) => out.extend_from_slice(n),
        Body::Notify(n) => {
            out.push(n.protocol.0);
            out.push(n.spi.len() as u8);
            out.extend_from_slice(&n.kind.0.to_be_bytes());
            out.extend_from_slice(&n.spi);
            out.extend_from_slice(&n.data);
        }
        Body::Delete(d) => {
            out.push(d.protocol.0);
            out.push(d.spi_size);
            out.extend_from_slice(&(d.spis.len() as u16).to_be_bytes());
            for s in &d.spis {
                out.extend_from_slice(s);
            }
        }
        Body::TsI {
            reserved,
            selectors,
        }
        | Body::TsR {
            reserved,
            selectors,
        } => {
            out.push(selectors.len() as u8);
            out.extend_from_slice(reserved);
            for ts in selectors {
                out.push(ts.ts_type.0);
                out.push(ts.ip_protocol);
                out.extend_from_slice(&((8 + ts.start.len() + ts.end.len()) as u16).to_be_bytes());
                out.extend_from_slice(&ts.start_port.to_be_bytes());
                out.extend_from_slice(&ts.end_port.to_be_bytes());
                out.extend_from_slice(&ts.start);
                out.extend_from_slice(&ts.end);
            }
        }
        Body::Sk { data, .. } | Body::Unknown { data, .. } => out.extend_from_slice(data),
    }
}

/// What [`Message::emit`] and the SK payload reserve for a message: an
/// IKE_SA_INIT with a 2048-bit KE or an IKE_AUTH fits.
pub(crate) const EMIT_CAPACITY: usize = 640;

/// Emits a chain of payloads; returns the type of the first (for the header).
pub fn emit_payloads(payloads: &[Payload], out: &mut Vec<u8>) -> PayloadType {
    for (i, p) in payloads.iter().enumerate() {
        let next = match (&p.body, payloads.get(i + 1)) {
            (Body::Sk { inner, .. }, _) => *inner,
            (_, Some(n)) => n.kind(),
            (_, None) => PayloadType::NONE,
        };
        let start = out.len();
        out.push(next.0);
        out.push(p.flags);
        out.extend_from_slice(&[0, 0]);
        emit_body(&p.body, out);
        let len = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }
    payloads
        .first()
        .map(Payload::kind)
        .unwrap_or(PayloadType::NONE)
}

/// A whole message: header and payloads (an SK payload, if any, still encrypted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payloads: Vec<Payload>,
}

impl Message {
    pub fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        let header = Header::parse(buf)?;
        let payloads = parse_payloads(header.next_payload, &buf[HEADER_LEN..])?;
        Ok(Self { header, payloads })
    }

    /// The message on the wire: the header, then the payloads, written in
    /// one buffer sized for a typical message; the header's Next Payload
    /// (octet 16) and Length (octets 24-27) are filled in last (§3.1).
    pub fn emit(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(EMIT_CAPACITY);
        self.header.emit(&mut out, 0);
        let first = emit_payloads(&self.payloads, &mut out);
        out[16] = first.0;
        let len = out.len() as u32;
        out[24..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        out
    }

    pub fn notifies(&self) -> impl Iterator<Item = &Notify> {
        self.payloads.iter().filter_map(|p| match &p.body {
            Body::Notify(n) => Some(n),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            header: Header {
                spi_i: 0x0102030405060708,
                spi_r: 0,
                next_payload: PayloadType::SA,
                version: IKE_VERSION,
                exchange: ExchangeType::IKE_SA_INIT,
                flags: FLAG_INITIATOR,
                message_id: 0,
            },
            payloads: vec![
                Payload::new(Body::Sa(vec![Proposal {
                    number: 1,
                    protocol: ProtocolId::IKE,
                    spi: vec![],
                    transforms: vec![
                        Transform::new(TransformType::ENCR, 12, Some(256)),
                        Transform::new(TransformType::PRF, 5, None),
                        Transform::new(TransformType::INTEG, 12, None),
                        Transform::new(TransformType::DH, 14, None),
                    ],
                    reserved: 0,
                }])),
                Payload::new(Body::Ke {
                    group: 14,
                    reserved: [0; 2],
                    data: vec![7; 256],
                }),
                Payload::new(Body::Nonce(vec![1; 32])),
                Payload::new(Body::Notify(Notify::new(
                    NotifyType::NAT_DETECTION_SOURCE_IP,
                    vec![2; 20],
                ))),
                Payload::new(Body::TsI {
                    reserved: [0; 3],
                    selectors: vec![TrafficSelector {
                        ts_type: TsType::TS_IPV4_ADDR_RANGE,
                        ip_protocol: 0,
                        start_port: 0,
                        end_port: 65535,
                        start: vec![0; 4],
                        end: vec![255; 4],
                    }],
                }),
                Payload::new(Body::Delete(Delete {
                    protocol: ProtocolId::ESP,
                    spi_size: 4,
                    spis: vec![vec![1, 2, 3, 4]],
                })),
                Payload {
                    flags: CRITICAL,
                    body: Body::Unknown {
                        kind: PayloadType(200),
                        data: vec![9, 9],
                    },
                },
            ],
        }
    }

    #[test]
    fn emit_parse_round_trip() {
        let m = sample();
        let bytes = m.emit();
        let back = Message::parse(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.emit(), bytes);
        assert_eq!(m.payloads[0].body, back.payloads[0].body);
        let Body::Sa(p) = &back.payloads[0].body else {
            panic!()
        };
        assert_eq!(p[0].transforms[0].key_length(), Some(256));
    }

    #[test]
    fn every_truncation_and_length_corruption_is_an_error() {
        let bytes = sample().emit();
        for len in 0..bytes.len() {
            assert!(Message::parse(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for at in HEADER_LEN..bytes.len() {
            let mut b = bytes.clone();
            b[at] = b[at].wrapping_add(1);
            // Anything may happen, except a panic; and if it parses, it emits back.
            if let Ok(m) = Message::parse(&b) {
                assert_eq!(m.emit(), b, "octet {at}");
            }
        }
        let mut v1 = bytes.clone();
        v1[17] = 0x10;
        assert_eq!(Message::parse(&v1), Err(DecodeError::Version(1)));
    }

    #[test]
    fn sk_must_be_last_and_keeps_its_inner_type() {
        let m = Message {
            header: Header {
                next_payload: PayloadType::SK,
                ..sample().header
            },
            payloads: vec![Payload::new(Body::Sk {
                inner: PayloadType::IDI,
                data: vec![5; 48],
            })],
        };
        let bytes = m.emit();
        assert_eq!(Message::parse(&bytes).unwrap(), m);
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(&[0, 0, 0, 4]);
        let l = trailing.len() as u32;
        trailing[24..28].copy_from_slice(&l.to_be_bytes());
        assert!(Message::parse(&trailing).is_err());
    }
}
