//! The Encrypted and Authenticated payload, SK{...} (RFC 7296 §3.14; with
//! AES-GCM, RFC 5282), on the transforms of `xesp_esp`.

use crate::random::Random;
use xesp_esp::{
    alg::Suite,
    crypto::{Cipher, CryptoError, Mac},
};

use super::codec::{
    Body, DecodeError, EMIT_CAPACITY, HEADER_LEN, Header, Message, Payload, PayloadType,
    emit_payloads, parse_payloads,
};

/// Errors protecting or unprotecting SK{}.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SkError {
    #[error("the message has no SK payload")]
    Missing,
    #[error("SK payload too short for IV and ICV")]
    Short,
    #[error("SK payload: integrity check failed")]
    Integrity,
    #[error("SK payload: bad padding")]
    Padding,
    #[error("SK payload contents: {0}")]
    Inner(#[from] DecodeError),
    #[error("SK keys: {0}")]
    Key(CryptoError),
    #[error("the message would exceed 64 KiB")]
    TooLong,
    #[error("random number generator failed")]
    Random,
}

/// One direction's SK_e / SK_a, keyed.
pub struct SkCipher {
    suite: Suite,
    cipher: Cipher,
    mac: Option<Mac>,
}

impl core::fmt::Debug for SkCipher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SkCipher({})", self.suite)
    }
}

impl SkCipher {
    /// `sk_e` includes the salt for AES-GCM (RFC 5282 §7.1).
    pub fn new(suite: Suite, sk_e: &[u8], sk_a: &[u8]) -> Result<Self, SkError> {
        let cipher = Cipher::new(suite.encr, sk_e).map_err(SkError::Key)?;
        let mac = match suite.integ {
            Some(i) => Some(Mac::new(i, sk_a).map_err(SkError::Key)?),
            None => None,
        };
        Ok(Self { suite, cipher, mac })
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// Builds a whole message: `header` and SK{`inner`}.
    pub fn seal(
        &self,
        header: Header,
        inner: &[Payload],
        rng: &dyn Random,
    ) -> Result<Vec<u8>, SkError> {
        let mut plain = Vec::with_capacity(EMIT_CAPACITY);
        let first = emit_payloads(inner, &mut plain);
        self.seal_plain(header, first, plain, rng)
    }

    /// Builds a whole message around payload octets as they are, `first`
    /// naming the first one's type (for peers in tests and fuzzing that
    /// send what a real peer would not).
    pub fn seal_plain(
        &self,
        mut header: Header,
        first: PayloadType,
        mut plain: Vec<u8>,
        rng: &dyn Random,
    ) -> Result<Vec<u8>, SkError> {
        let encr = self.suite.encr;
        let (iv_len, icv_len) = (encr.iv_len(), self.suite.icv_len());
        // Pad Length last; CBC needs whole blocks, GCM none (RFC 5282 §3).
        let block = if encr.is_aead() { 1 } else { encr.block_len() };
        let pad = (block - (plain.len() + 1) % block) % block;
        plain.extend(std::iter::repeat_n(0u8, pad));
        plain.push(pad as u8);

        let sk_len = 4 + iv_len + plain.len() + icv_len;
        let total = HEADER_LEN + sk_len;
        let sk_len = u16::try_from(sk_len).map_err(|_| SkError::TooLong)?;
        header.next_payload = PayloadType::SK;
        let mut out = Vec::with_capacity(total);
        header.emit(&mut out, total);
        out.push(first.0);
        out.push(0);
        out.extend_from_slice(&sk_len.to_be_bytes());
        let iv_at = out.len();
        out.resize(iv_at + iv_len, 0);
        rng.fill(&mut out[iv_at..]).map_err(|_| SkError::Random)?;
        let ct_at = out.len();
        out.extend_from_slice(&plain);
        out.resize(total, 0);
        let (head, rest) = out.split_at_mut(ct_at);
        if encr.is_aead() {
            // AAD: the IKE header and the SK payload's generic header (RFC 5282 §5.1).
            let (aad, iv) = head.split_at(iv_at);
            self.cipher.aead_seal(iv, aad, rest).map_err(SkError::Key)?;
        } else {
            self.cipher
                .cbc_encrypt(&head[iv_at..], &mut rest[..plain.len()])
                .map_err(SkError::Key)?;
            let Some(mac) = &self.mac else {
                return Err(SkError::Key(CryptoError::Authentication));
            };
            let (covered, icv) = out.split_at_mut(total - icv_len);
            mac.sign(&[covered], icv).map_err(SkError::Key)?;
        }
        Ok(out)
    }

    /// Verifies and decrypts the SK payload of `bytes` (parsed as `msg`);
    /// returns the payloads inside.
    pub fn open(&self, bytes: &[u8], msg: &Message) -> Result<Vec<Payload>, SkError> {
        let Some(Payload {
            body: Body::Sk { inner, data },
            ..
        }) = msg.payloads.last()
        else {
            return Err(SkError::Missing);
        };
        let encr = self.suite.encr;
        let (iv_len, icv_len) = (encr.iv_len(), self.suite.icv_len());
        let sk_start = bytes
            .len()
            .checked_sub(data.len() + 4)
            .ok_or(SkError::Short)?;
        if data.len() < iv_len + icv_len + 1 || sk_start < HEADER_LEN {
            return Err(SkError::Short);
        }
        let iv_at = sk_start + 4;
        let ct_at = iv_at + iv_len;
        let ct_len = bytes.len() - ct_at - icv_len;
        let mut buf = bytes.to_vec();
        let plain_len = if encr.is_aead() {
            let (head, rest) = buf.split_at_mut(ct_at);
            let (aad, iv) = head.split_at(iv_at);
            self.cipher
                .aead_open(iv, aad, rest)
                .map_err(|_| SkError::Integrity)?;
            ct_len
        } else {
            let Some(mac) = &self.mac else {
                return Err(SkError::Integrity);
            };
            mac.verify(
                &[&bytes[..bytes.len() - icv_len]],
                &bytes[bytes.len() - icv_len..],
            )
            .map_err(|_| SkError::Integrity)?;
            if !ct_len.is_multiple_of(encr.block_len()) {
                return Err(SkError::Padding);
            }
            let (head, rest) = buf.split_at_mut(ct_at);
            self.cipher
                .cbc_decrypt(&head[iv_at..], &mut rest[..ct_len])
                .map_err(|_| SkError::Padding)?;
            ct_len
        };
        let plain = &buf[ct_at..ct_at + plain_len];
        let (&pad, body) = plain.split_last().ok_or(SkError::Padding)?;
        let body_len = body
            .len()
            .checked_sub(usize::from(pad))
            .ok_or(SkError::Padding)?;
        Ok(parse_payloads(*inner, &body[..body_len])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{
        ExchangeType, FLAG_INITIATOR, IKE_VERSION, IdType, Identification, Notify, NotifyType,
    };
    use xesp_esp::alg::{AesKeyBits, Encr, Integ};

    fn header() -> Header {
        Header {
            spi_i: 1,
            spi_r: 2,
            next_payload: PayloadType::SK,
            version: IKE_VERSION,
            exchange: ExchangeType::IKE_AUTH,
            flags: FLAG_INITIATOR,
            message_id: 1,
        }
    }

    fn inner() -> Vec<Payload> {
        vec![
            Payload::new(Body::IdI(Identification {
                id_type: IdType::ID_IPV4_ADDR,
                reserved: [0; 3],
                data: vec![192, 0, 2, 1],
            })),
            Payload::new(Body::Notify(Notify::new(
                NotifyType::INITIAL_CONTACT,
                vec![],
            ))),
        ]
    }

    #[test]
    fn seal_open_for_each_suite_and_tamper_anywhere() {
        let rng = crate::random::SeededRandom::new(1);
        for suite in [
            Suite::new(
                Encr::AesCbc(AesKeyBits::B256),
                Some(Integ::HmacSha2_256_128),
            )
            .unwrap(),
            Suite::new(Encr::AesCbc(AesKeyBits::B128), Some(Integ::HmacSha1_96)).unwrap(),
            Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap(),
            Suite::new(Encr::Des3Cbc, Some(Integ::HmacSha1_96)).unwrap(),
        ] {
            let ek = vec![1u8; suite.encr.keymat_len()];
            let ak = vec![2u8; suite.integ_key_len()];
            let c = SkCipher::new(suite, &ek, &ak).unwrap();
            let bytes = c.seal(header(), &inner(), &rng).unwrap();
            let msg = Message::parse(&bytes).unwrap();
            assert_eq!(msg.header.message_id, 1);
            assert_eq!(c.open(&bytes, &msg).unwrap(), inner(), "{suite}");
            for at in 0..bytes.len() {
                let mut b = bytes.clone();
                b[at] ^= 0x40;
                if let Ok(m) = Message::parse(&b) {
                    assert!(
                        c.open(&b, &m).is_err(),
                        "{suite}: octet {at} changed unnoticed"
                    );
                }
            }
            // The other direction's key does not open it.
            let other = SkCipher::new(
                suite,
                &vec![9u8; suite.encr.keymat_len()],
                &vec![9u8; suite.integ_key_len()],
            )
            .unwrap();
            assert_eq!(other.open(&bytes, &msg), Err(SkError::Integrity));
        }
    }
}
