//! The one table of transforms xesp knows, with their IKEv2 transform IDs
//! (RFC 7296 §3.3.2, IANA "IKEv2 Transform Type" registries) and the lengths
//! ESP (RFC 4303) and the IKE SK payload (RFC 7296 §3.14) need.
//!
//! Both the ESP datapath and the IKEv2 controller read from here; nothing else
//! in the project spells a transform ID or a key length.

use core::fmt;

/// Transform type 1: encryption algorithm (ENCR), with its key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encr {
    /// ENCR_3DES (3), RFC 2451. Legacy: only when the configuration allows it.
    Des3Cbc,
    /// ENCR_AES_CBC (12), RFC 3602, with a 128-, 192- or 256-bit key.
    AesCbc(AesKeyBits),
    /// ENCR_AES_GCM_16 (20), RFC 4106 (ESP) / RFC 5282 (IKE), 16-octet ICV.
    /// 128- and 256-bit keys only (the AEADs ring provides).
    AesGcm16(AesKeyBits),
}

/// AES key sizes (the Key Length transform attribute, RFC 7296 §3.3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AesKeyBits {
    B128,
    B192,
    B256,
}

impl AesKeyBits {
    pub const fn bits(self) -> u16 {
        match self {
            Self::B128 => 128,
            Self::B192 => 192,
            Self::B256 => 256,
        }
    }
    pub const fn from_bits(bits: u16) -> Option<Self> {
        match bits {
            128 => Some(Self::B128),
            192 => Some(Self::B192),
            256 => Some(Self::B256),
            _ => None,
        }
    }
    pub const fn bytes(self) -> usize {
        self.bits() as usize / 8
    }
}

impl Encr {
    pub const ID_3DES: u16 = 3;
    pub const ID_AES_CBC: u16 = 12;
    pub const ID_AES_GCM_16: u16 = 20;

    /// Every encryption transform, strongest first.
    pub const ALL: [Encr; 6] = [
        Encr::AesGcm16(AesKeyBits::B256),
        Encr::AesGcm16(AesKeyBits::B128),
        Encr::AesCbc(AesKeyBits::B256),
        Encr::AesCbc(AesKeyBits::B192),
        Encr::AesCbc(AesKeyBits::B128),
        Encr::Des3Cbc,
    ];

    /// IKEv2 transform ID.
    pub const fn transform_id(self) -> u16 {
        match self {
            Self::Des3Cbc => Self::ID_3DES,
            Self::AesCbc(_) => Self::ID_AES_CBC,
            Self::AesGcm16(_) => Self::ID_AES_GCM_16,
        }
    }

    /// The Key Length attribute to send, if the transform takes one.
    pub const fn key_length_attr(self) -> Option<u16> {
        match self {
            Self::Des3Cbc => None,
            Self::AesCbc(k) | Self::AesGcm16(k) => Some(k.bits()),
        }
    }

    /// From a received transform ID and Key Length attribute.
    pub const fn from_ike(id: u16, key_bits: Option<u16>) -> Option<Self> {
        match (id, key_bits) {
            (Self::ID_3DES, None) => Some(Self::Des3Cbc),
            (Self::ID_AES_CBC, Some(b)) => match AesKeyBits::from_bits(b) {
                Some(k) => Some(Self::AesCbc(k)),
                None => None,
            },
            (Self::ID_AES_GCM_16, Some(128)) => Some(Self::AesGcm16(AesKeyBits::B128)),
            (Self::ID_AES_GCM_16, Some(256)) => Some(Self::AesGcm16(AesKeyBits::B256)),
            _ => None,
        }
    }

    /// True for combined-mode (AEAD) transforms, which take no INTEG transform.
    pub const fn is_aead(self) -> bool {
        matches!(self, Self::AesGcm16(_))
    }

    /// True for algorithms only accepted when legacy algorithms are allowed.
    pub const fn is_legacy(self) -> bool {
        matches!(self, Self::Des3Cbc)
    }

    /// Octets of keying material taken from KEYMAT / SK_e (RFC 7296 §2.17,
    /// §3.3.5): the key, plus the 4-octet salt for GCM (RFC 4106 §8.1).
    pub const fn keymat_len(self) -> usize {
        self.key_len() + self.salt_len()
    }

    /// The cipher key proper.
    pub const fn key_len(self) -> usize {
        match self {
            Self::Des3Cbc => 24,
            Self::AesCbc(k) | Self::AesGcm16(k) => k.bytes(),
        }
    }

    /// Implicit salt that prefixes the explicit IV in the nonce.
    pub const fn salt_len(self) -> usize {
        match self {
            Self::AesGcm16(_) => 4,
            _ => 0,
        }
    }

    /// Explicit IV carried in every packet.
    pub const fn iv_len(self) -> usize {
        match self {
            Self::Des3Cbc => 8,
            Self::AesCbc(_) => 16,
            Self::AesGcm16(_) => 8,
        }
    }

    /// The length the plaintext (with padding and trailer) must be a multiple of.
    /// Always a power of two (the ESP core masks with it).
    pub const fn block_len(self) -> usize {
        match self {
            Self::Des3Cbc => 8,
            Self::AesCbc(_) => 16,
            // RFC 4106 §3.2: ESP's 4-octet alignment; GCM itself is a stream mode.
            Self::AesGcm16(_) => 4,
        }
    }

    /// ICV produced by the cipher itself (AEAD only).
    pub const fn aead_icv_len(self) -> usize {
        match self {
            Self::AesGcm16(_) => 16,
            _ => 0,
        }
    }
}

impl fmt::Display for Encr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Des3Cbc => f.write_str("3DES-CBC"),
            Self::AesCbc(k) => write!(f, "AES-CBC-{}", k.bits()),
            Self::AesGcm16(k) => write!(f, "AES-GCM-16-{}", k.bits()),
        }
    }
}

/// Transform type 3: integrity algorithm (INTEG).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Integ {
    /// AUTH_HMAC_SHA1_96 (2), RFC 2404.
    HmacSha1_96,
    /// AUTH_HMAC_SHA2_256_128 (12), RFC 4868.
    HmacSha2_256_128,
    /// AUTH_HMAC_SHA2_384_192 (13), RFC 4868.
    HmacSha2_384_192,
    /// AUTH_HMAC_SHA2_512_256 (14), RFC 4868.
    HmacSha2_512_256,
}

impl Integ {
    pub const ALL: [Integ; 4] = [
        Integ::HmacSha2_256_128,
        Integ::HmacSha2_384_192,
        Integ::HmacSha2_512_256,
        Integ::HmacSha1_96,
    ];

    pub const fn transform_id(self) -> u16 {
        match self {
            Self::HmacSha1_96 => 2,
            Self::HmacSha2_256_128 => 12,
            Self::HmacSha2_384_192 => 13,
            Self::HmacSha2_512_256 => 14,
        }
    }

    pub const fn from_ike(id: u16) -> Option<Self> {
        match id {
            2 => Some(Self::HmacSha1_96),
            12 => Some(Self::HmacSha2_256_128),
            13 => Some(Self::HmacSha2_384_192),
            14 => Some(Self::HmacSha2_512_256),
            _ => None,
        }
    }

    /// Key length (RFC 2404 §3, RFC 4868 §2.1.1): the hash's output size.
    pub const fn key_len(self) -> usize {
        match self {
            Self::HmacSha1_96 => 20,
            Self::HmacSha2_256_128 => 32,
            Self::HmacSha2_384_192 => 48,
            Self::HmacSha2_512_256 => 64,
        }
    }

    /// Truncated ICV length.
    pub const fn icv_len(self) -> usize {
        match self {
            Self::HmacSha1_96 => 12,
            Self::HmacSha2_256_128 => 16,
            Self::HmacSha2_384_192 => 24,
            Self::HmacSha2_512_256 => 32,
        }
    }

    pub(crate) fn ring_alg(self) -> ring::hmac::Algorithm {
        match self {
            Self::HmacSha1_96 => ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            Self::HmacSha2_256_128 => ring::hmac::HMAC_SHA256,
            Self::HmacSha2_384_192 => ring::hmac::HMAC_SHA384,
            Self::HmacSha2_512_256 => ring::hmac::HMAC_SHA512,
        }
    }
}

impl fmt::Display for Integ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HmacSha1_96 => "HMAC-SHA1-96",
            Self::HmacSha2_256_128 => "HMAC-SHA2-256-128",
            Self::HmacSha2_384_192 => "HMAC-SHA2-384-192",
            Self::HmacSha2_512_256 => "HMAC-SHA2-512-256",
        })
    }
}

/// A complete protection suite for one direction: ENCR plus INTEG (none for AEAD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Suite {
    pub encr: Encr,
    pub integ: Option<Integ>,
}

impl Suite {
    /// Rejects ENCR/INTEG combinations that are not valid (RFC 7296 §3.3:
    /// combined-mode ciphers take no integrity transform; others need one).
    pub const fn new(encr: Encr, integ: Option<Integ>) -> Option<Self> {
        match (encr.is_aead(), integ) {
            (true, None) | (false, Some(_)) => Some(Self { encr, integ }),
            _ => None,
        }
    }

    /// ICV length appended to each packet / SK payload.
    pub const fn icv_len(&self) -> usize {
        match self.integ {
            Some(i) => i.icv_len(),
            None => self.encr.aead_icv_len(),
        }
    }

    /// Octets of keying material per direction: encryption key (+salt), then integrity key.
    pub const fn keymat_len(&self) -> usize {
        self.encr.keymat_len() + self.integ_key_len()
    }

    pub const fn integ_key_len(&self) -> usize {
        match self.integ {
            Some(i) => i.key_len(),
            None => 0,
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.integ {
            Some(i) => write!(f, "{}/{}", self.encr, i),
            None => write!(f, "{}", self.encr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transform_ids_round_trip() {
        for e in Encr::ALL {
            assert_eq!(
                Encr::from_ike(e.transform_id(), e.key_length_attr()),
                Some(e)
            );
        }
        for i in Integ::ALL {
            assert_eq!(Integ::from_ike(i.transform_id()), Some(i));
        }
        assert_eq!(Encr::from_ike(Encr::ID_AES_CBC, Some(100)), None);
        assert_eq!(Encr::from_ike(Encr::ID_AES_CBC, None), None);
        assert_eq!(Encr::from_ike(99, None), None);
        assert_eq!(Encr::from_ike(Encr::ID_AES_GCM_16, Some(192)), None);
    }

    #[test]
    fn keymat_lengths_match_the_rfcs() {
        // RFC 4106 §8.1: 32-octet key + 4-octet salt.
        assert_eq!(Encr::AesGcm16(AesKeyBits::B256).keymat_len(), 36);
        let cisco = Suite::new(Encr::AesCbc(AesKeyBits::B256), Some(Integ::HmacSha1_96)).unwrap();
        assert_eq!(cisco.keymat_len(), 32 + 20);
        assert_eq!(cisco.icv_len(), 12);
        assert!(Suite::new(Encr::AesGcm16(AesKeyBits::B128), Some(Integ::HmacSha1_96)).is_none());
        assert!(Suite::new(Encr::AesCbc(AesKeyBits::B128), None).is_none());
    }
}
