//! The IKE_SA's cryptography (RFC 7296 §2.13-§2.18, §2.23): pseudo-random
//! functions and prf+, SKEYSEED and the SK_* keys, CHILD_SA KEYMAT, PSK
//! authentication, NAT detection hashes, and Diffie-Hellman.
//!
//! Randomness comes from the caller ([`crate::random::Random`]): the core
//! has no global state.

use core::fmt;
use std::sync::OnceLock;

use crypto_bigint::{
    Encoding, U1024, U2048, Uint,
    modular::runtime_mod::{DynResidue, DynResidueParams},
};
use ring::{agreement, hmac};

use crate::random::Random;
use subtle::{ConstantTimeEq, ConstantTimeGreater, ConstantTimeLess};
use xesp_esp::alg::Suite;
use zeroize::Zeroizing;

/// Errors of the IKE cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("random number generator failed")]
    Random,
    #[error("peer's {group} public value is invalid")]
    BadPublicValue { group: DhGroup },
    #[error("key exchange failed")]
    Agreement,
}

/// Transform type 2: pseudo-random functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Prf {
    HmacSha1,
    HmacSha2_256,
    HmacSha2_384,
    HmacSha2_512,
}

impl Prf {
    pub const ALL: [Prf; 4] = [
        Prf::HmacSha2_256,
        Prf::HmacSha2_384,
        Prf::HmacSha2_512,
        Prf::HmacSha1,
    ];

    pub const fn transform_id(self) -> u16 {
        match self {
            Self::HmacSha1 => 2,
            Self::HmacSha2_256 => 5,
            Self::HmacSha2_384 => 6,
            Self::HmacSha2_512 => 7,
        }
    }

    pub fn from_ike(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.transform_id() == id)
    }

    /// Output (and preferred key) length.
    pub const fn output_len(self) -> usize {
        match self {
            Self::HmacSha1 => 20,
            Self::HmacSha2_256 => 32,
            Self::HmacSha2_384 => 48,
            Self::HmacSha2_512 => 64,
        }
    }

    fn alg(self) -> hmac::Algorithm {
        match self {
            Self::HmacSha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            Self::HmacSha2_256 => hmac::HMAC_SHA256,
            Self::HmacSha2_384 => hmac::HMAC_SHA384,
            Self::HmacSha2_512 => hmac::HMAC_SHA512,
        }
    }

    /// prf(key, parts...).
    pub fn prf(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let k = hmac::Key::new(self.alg(), key);
        let mut ctx = hmac::Context::with_key(&k);
        for p in parts {
            ctx.update(p);
        }
        ctx.sign().as_ref().to_vec()
    }

    /// prf+ (§2.13): T1 | T2 | ... with Tn = prf(K, Tn-1 | S | n), `len` octets.
    pub fn prf_plus(self, key: &[u8], seed: &[&[u8]], len: usize) -> Zeroizing<Vec<u8>> {
        let k = hmac::Key::new(self.alg(), key);
        let mut out = Zeroizing::new(Vec::with_capacity(len + self.output_len()));
        // Tn-1, wiped when dropped: it is key material.
        let mut t = Zeroizing::new([0u8; 64]);
        let mut t_len = 0;
        let mut n: u8 = 1;
        while out.len() < len {
            let mut ctx = hmac::Context::with_key(&k);
            ctx.update(&t[..t_len]);
            for s in seed {
                ctx.update(s);
            }
            ctx.update(&[n]);
            let tag = ctx.sign();
            let tn = tag.as_ref();
            t[..tn.len()].copy_from_slice(tn);
            t_len = tn.len();
            out.extend_from_slice(tn);
            // 255 blocks is the most prf+ can make (§2.13); nothing here asks for that much.
            n = n.wrapping_add(1);
        }
        out.truncate(len);
        out
    }
}

impl fmt::Display for Prf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HmacSha1 => "PRF-HMAC-SHA1",
            Self::HmacSha2_256 => "PRF-HMAC-SHA2-256",
            Self::HmacSha2_384 => "PRF-HMAC-SHA2-384",
            Self::HmacSha2_512 => "PRF-HMAC-SHA2-512",
        })
    }
}

/// Transform type 4: Diffie-Hellman groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DhGroup {
    /// Group 2, 1024-bit MODP (RFC 2409). Legacy.
    Modp1024,
    /// Group 14, 2048-bit MODP (RFC 3526). Azure's default.
    Modp2048,
    /// Group 24, 2048-bit MODP with a 256-bit prime-order subgroup (RFC 5114).
    Modp2048s256,
    /// Group 19, ECP P-256 (RFC 5903).
    Ecp256,
    /// Group 20, ECP P-384 (RFC 5903).
    Ecp384,
    /// Group 31, Curve25519 (RFC 8031).
    Curve25519,
}

impl DhGroup {
    pub const ALL: [DhGroup; 6] = [
        DhGroup::Modp2048,
        DhGroup::Ecp256,
        DhGroup::Ecp384,
        DhGroup::Curve25519,
        DhGroup::Modp2048s256,
        DhGroup::Modp1024,
    ];

    pub const fn id(self) -> u16 {
        match self {
            Self::Modp1024 => 2,
            Self::Modp2048 => 14,
            Self::Modp2048s256 => 24,
            Self::Ecp256 => 19,
            Self::Ecp384 => 20,
            Self::Curve25519 => 31,
        }
    }

    pub fn from_ike(id: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.id() == id)
    }

    /// Accepted only when the configuration allows legacy algorithms.
    pub const fn is_legacy(self) -> bool {
        matches!(self, Self::Modp1024)
    }

    /// Length of the KE payload's key exchange data.
    pub const fn public_len(self) -> usize {
        match self {
            Self::Modp1024 => 128,
            Self::Modp2048 | Self::Modp2048s256 => 256,
            Self::Ecp256 => 64,
            Self::Ecp384 => 96,
            Self::Curve25519 => 32,
        }
    }
}

impl fmt::Display for DhGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Modp1024 => "MODP_1024 (group 2)",
            Self::Modp2048 => "MODP_2048 (group 14)",
            Self::Modp2048s256 => "MODP_2048_256 (group 24)",
            Self::Ecp256 => "ECP_256 (group 19)",
            Self::Ecp384 => "ECP_384 (group 20)",
            Self::Curve25519 => "CURVE_25519 (group 31)",
        })
    }
}

// RFC 2409 §6.2 (group 2) and RFC 3526 §3 (group 14): the same construction,
// the first prime a prefix of the second's bits.
const MODP1024_P: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE65381FFFFFFFFFFFFFFFF";
const MODP2048_P: &str = "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF";
// RFC 5114 §2.3.
const MODP2048S256_P: &str = "87A8E61DB4B6663CFFBBD19C651959998CEEF608660DD0F25D2CEED4435E3B00E00DF8F1D61957D4FAF7DF4561B2AA3016C3D91134096FAA3BF4296D830E9A7C209E0C6497517ABD5A8A9D306BCF67ED91F9E6725B4758C022E0B1EF4275BF7B6C5BFC11D45F9088B941F54EB1E59BB8BC39A0BF12307F5C4FDB70C581B23F76B63ACAE1CAA6B7902D52526735488A0EF13C6D9A51BFA4AB3AD8347796524D8EF6A167B5A41825D967E144E5140564251CCACB83E6B486F6B3CA3F7971506026C0B857F689962856DED4010ABD0BE621C3A3960A54E710C375F26375D7014103A4B54330C198AF126116D2276E11715F693877FAD7EF09CADB094AE91E1A1597";
const MODP2048S256_G: &str = "3FB32C9B73134D0B2E77506660EDBD484CA7B18F21EF205407F4793A1A0BA12510DBC15077BE463FFF4FED4AAC0BB555BE3A6C1B0C6B47B1BC3773BF7E8C6F62901228F8C28CBB18A55AE31341000A650196F931C77A57F2DDF463E5E9EC144B777DE62AAAB8A8628AC376D282D6ED3864E67982428EBC831D14348F6F2F9193B5045AF2767164E1DFC967C1FB3F2E55A4BD1BFFE83B9C80D052B985D182EA0ADB2A3B7313D3FE14C8484B1E052588B9B7D2BBD2DF016199ECD06E1557CD0915B3353BBB64E0EC377FD028370DF92B52C7891428CDC67EB6184B523D1DB246C32F63078490F00EF8D647D148D47954515E2327CFEF98C582664B4C0F6CC41659";
const MODP2048S256_Q: &str = "8CF83642A709A097B447997640129DA299B1A47D1EB3750BA308B0FE64F5FBD3";

/// Bits of the private exponent for the safe-prime groups: more than twice
/// their strength (RFC 3526 §8), and much faster than a full-size exponent.
const MODP_EXPONENT_BITS: usize = 512;

/// Our half of one Diffie-Hellman exchange.
pub struct DhPrivate {
    group: DhGroup,
    public: Vec<u8>,
    secret: Secret,
}

enum Secret {
    /// Big-endian private exponent (zeroed on drop).
    Modp(Zeroizing<Vec<u8>>),
    Ecdh(agreement::EphemeralPrivateKey),
}

impl fmt::Debug for DhPrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DhPrivate({})", self.group)
    }
}

fn modp_pow<const L: usize>(p_hex: &str, base: &[u8], exp: &[u8]) -> Vec<u8>
where
    Uint<L>: Encoding,
{
    let p = Uint::<L>::from_be_hex(p_hex);
    let params = DynResidueParams::new(&p);
    let b = Uint::<L>::from_be_slice(&left_pad(base, L * 8));
    let e = Uint::<L>::from_be_slice(&left_pad(exp, L * 8));
    let r = DynResidue::new(&b, params)
        .pow_bounded_exp(&e, exp.len() * 8)
        .retrieve();
    r.to_be_bytes().as_ref().to_vec()
}

fn left_pad(b: &[u8], len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.saturating_sub(b.len())];
    v.extend_from_slice(&b[b.len().saturating_sub(len)..]);
    v
}

/// 1 < y < p - 1, as RFC 6989 §2.1 asks of every MODP public value.
fn modp_public_ok<const L: usize>(p_hex: &str, y: &[u8]) -> bool
where
    Uint<L>: Encoding,
{
    if y.len() != L * 8 {
        return false;
    }
    let p = Uint::<L>::from_be_hex(p_hex);
    let y = Uint::<L>::from_be_slice(y);
    let one = Uint::<L>::ONE;
    let p_minus_1 = p.wrapping_sub(&one);
    bool::from(y.ct_gt(&one)) && bool::from(y.ct_lt(&p_minus_1))
}

impl DhPrivate {
    /// Picks a private value and computes our public value.
    ///
    /// MODP private values come from `rng`. ring draws elliptic-curve
    /// private keys only from its own system generator, so with ECP groups
    /// and Curve25519 the key bytes differ between runs even with a seeded
    /// `rng`; no decision of the protocol depends on them.
    pub fn generate(group: DhGroup, rng: &dyn Random) -> Result<Self, CryptoError> {
        let ecdh = |alg: &'static agreement::Algorithm| -> Result<Self, CryptoError> {
            let k = agreement::EphemeralPrivateKey::generate(alg, &ring::rand::SystemRandom::new())
                .map_err(|_| CryptoError::Random)?;
            let pk = k.compute_public_key().map_err(|_| CryptoError::Random)?;
            // RFC 5903 §7: x || y, without the uncompressed-point 0x04 octet.
            let public = match group {
                DhGroup::Curve25519 => pk.as_ref().to_vec(),
                _ => pk.as_ref().get(1..).unwrap_or_default().to_vec(),
            };
            Ok(Self {
                group,
                public,
                secret: Secret::Ecdh(k),
            })
        };
        match group {
            DhGroup::Ecp256 => ecdh(&agreement::ECDH_P256),
            DhGroup::Ecp384 => ecdh(&agreement::ECDH_P384),
            DhGroup::Curve25519 => ecdh(&agreement::X25519),
            DhGroup::Modp1024 | DhGroup::Modp2048 => {
                let mut x = Zeroizing::new(vec![0u8; MODP_EXPONENT_BITS / 8]);
                rng.fill(&mut x[..]).map_err(|_| CryptoError::Random)?;
                x[0] |= 0x80;
                let public = if group == DhGroup::Modp1024 {
                    modp_pow::<{ U1024::LIMBS }>(MODP1024_P, &[2], &x)
                } else {
                    modp_pow::<{ U2048::LIMBS }>(MODP2048_P, &[2], &x)
                };
                Ok(Self {
                    group,
                    public,
                    secret: Secret::Modp(x),
                })
            }
            DhGroup::Modp2048s256 => {
                // A private value in [1, q-1] (RFC 5114 §2.3 / RFC 6989 §2.2).
                let q = crypto_bigint::U256::from_be_hex(MODP2048S256_Q);
                let x = loop {
                    let mut b = Zeroizing::new([0u8; 32]);
                    rng.fill(&mut b[..]).map_err(|_| CryptoError::Random)?;
                    let v = crypto_bigint::U256::from_be_slice(&*b);
                    if bool::from(v.ct_lt(&q)) && v != crypto_bigint::U256::ZERO {
                        break Zeroizing::new(b.to_vec());
                    }
                };
                let g = hex_bytes(MODP2048S256_G);
                let public = modp_pow::<{ U2048::LIMBS }>(MODP2048S256_P, &g, &x);
                Ok(Self {
                    group,
                    public,
                    secret: Secret::Modp(x),
                })
            }
        }
    }

    pub fn group(&self) -> DhGroup {
        self.group
    }

    /// Our public value, as the KE payload carries it.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The shared secret g^ir with the peer's public value (consumes the key:
    /// each private value serves one exchange).
    pub fn agree(self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let group = self.group;
        let bad = CryptoError::BadPublicValue { group };
        if peer.len() != group.public_len() {
            return Err(bad);
        }
        match self.secret {
            Secret::Ecdh(k) => {
                let (alg, point) = match group {
                    DhGroup::Ecp256 => (&agreement::ECDH_P256, [&[4u8][..], peer].concat()),
                    DhGroup::Ecp384 => (&agreement::ECDH_P384, [&[4u8][..], peer].concat()),
                    _ => (&agreement::X25519, peer.to_vec()),
                };
                // ring validates the point and refuses an all-zero X25519 result.
                agreement::agree_ephemeral(
                    k,
                    &agreement::UnparsedPublicKey::new(alg, &point),
                    |s| Zeroizing::new(s.to_vec()),
                )
                .map_err(|_| bad)
            }
            Secret::Modp(x) => match group {
                DhGroup::Modp1024 => {
                    if !modp_public_ok::<{ U1024::LIMBS }>(MODP1024_P, peer) {
                        return Err(bad);
                    }
                    Ok(Zeroizing::new(modp_pow::<{ U1024::LIMBS }>(
                        MODP1024_P, peer, &x,
                    )))
                }
                DhGroup::Modp2048 => {
                    if !modp_public_ok::<{ U2048::LIMBS }>(MODP2048_P, peer) {
                        return Err(bad);
                    }
                    Ok(Zeroizing::new(modp_pow::<{ U2048::LIMBS }>(
                        MODP2048_P, peer, &x,
                    )))
                }
                _ => {
                    // Small-subgroup check (RFC 6989 §2.2): y^q must be 1.
                    if !modp_public_ok::<{ U2048::LIMBS }>(MODP2048S256_P, peer) {
                        return Err(bad);
                    }
                    let yq = modp_pow::<{ U2048::LIMBS }>(
                        MODP2048S256_P,
                        peer,
                        &hex_bytes(MODP2048S256_Q),
                    );
                    if yq.iter().rev().skip(1).any(|b| *b != 0) || yq.last() != Some(&1) {
                        return Err(bad);
                    }
                    Ok(Zeroizing::new(modp_pow::<{ U2048::LIMBS }>(
                        MODP2048S256_P,
                        peer,
                        &x,
                    )))
                }
            },
        }
    }
}

fn hex_bytes(h: &str) -> Vec<u8> {
    h.as_bytes()
        .chunks(2)
        .map(|c| {
            let v = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            (v(c[0]) << 4) | c.get(1).map(|b| v(*b)).unwrap_or(0)
        })
        .collect()
}

/// The IKE_SA's keys (§2.14). Zeroed on drop; never printed.
#[derive(Clone)]
pub struct IkeKeys {
    pub sk_d: Zeroizing<Vec<u8>>,
    pub sk_ai: Zeroizing<Vec<u8>>,
    pub sk_ar: Zeroizing<Vec<u8>>,
    pub sk_ei: Zeroizing<Vec<u8>>,
    pub sk_er: Zeroizing<Vec<u8>>,
    pub sk_pi: Zeroizing<Vec<u8>>,
    pub sk_pr: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for IkeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IkeKeys(<redacted>)")
    }
}

/// SKEYSEED = prf(Ni | Nr, g^ir) (§2.14).
pub fn skeyseed(prf: Prf, ni: &[u8], nr: &[u8], shared: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(prf.prf(&[ni, nr].concat(), &[shared]))
}

/// SKEYSEED of a rekeyed IKE_SA = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18).
pub fn rekey_skeyseed(
    prf: Prf,
    old_sk_d: &[u8],
    shared: &[u8],
    ni: &[u8],
    nr: &[u8],
) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(prf.prf(old_sk_d, &[shared, ni, nr]))
}

/// {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED,
/// Ni | Nr | SPIi | SPIr) (§2.14), sized for `suite` (SK_e with any salt).
pub fn derive_ike_keys(
    prf: Prf,
    skeyseed: &[u8],
    ni: &[u8],
    nr: &[u8],
    spi_i: u64,
    spi_r: u64,
    suite: Suite,
) -> IkeKeys {
    let (integ_len, encr_len) = (suite.integ_key_len(), suite.encr.keymat_len());
    let p = prf.output_len();
    let total = p + 2 * integ_len + 2 * encr_len + 2 * p;
    let km = prf.prf_plus(
        skeyseed,
        &[ni, nr, &spi_i.to_be_bytes(), &spi_r.to_be_bytes()],
        total,
    );
    let mut at = 0;
    let mut take = |n: usize| {
        let v = Zeroizing::new(km[at..at + n].to_vec());
        at += n;
        v
    };
    IkeKeys {
        sk_d: take(p),
        sk_ai: take(integ_len),
        sk_ar: take(integ_len),
        sk_ei: take(encr_len),
        sk_er: take(encr_len),
        sk_pi: take(p),
        sk_pr: take(p),
    }
}

/// KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (§2.17): the initiator-to-
/// responder keys first, each direction's encryption key before its
/// integrity key.
pub fn child_keymat(
    prf: Prf,
    sk_d: &[u8],
    shared: Option<&[u8]>,
    ni: &[u8],
    nr: &[u8],
    len: usize,
) -> Zeroizing<Vec<u8>> {
    match shared {
        Some(g) => prf.prf_plus(sk_d, &[g, ni, nr], len),
        None => prf.prf_plus(sk_d, &[ni, nr], len),
    }
}

/// A pre-shared key. Its Debug and Display never show it.
///
/// It keeps prf(PSK, "Key Pad for IKEv2") (§2.15) for each PRF once it has
/// computed it: every AUTH of every IKE_SA of a tunnel starts from that
/// value, and the configuration holding the key outlives them all.
#[derive(Clone)]
pub struct Psk {
    key: Zeroizing<Vec<u8>>,
    /// Indexed by the PRF's position in [`Prf::ALL`].
    pads: [OnceLock<Zeroizing<Vec<u8>>>; Prf::ALL.len()],
}

impl Psk {
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            key: Zeroizing::new(bytes.to_vec()),
            pads: Default::default(),
        }
    }
    pub fn len(&self) -> usize {
        self.key.len()
    }
    pub fn is_empty(&self) -> bool {
        self.key.is_empty()
    }
    /// prf(PSK, "Key Pad for IKEv2"), computed once per PRF.
    fn pad(&self, prf: Prf) -> &[u8] {
        let at = Prf::ALL.iter().position(|p| *p == prf).unwrap_or(0);
        self.pads[at].get_or_init(|| Zeroizing::new(prf.prf(&self.key, &[b"Key Pad for IKEv2"])))
    }
}

/// Compared in constant time (a reload compares the old key with the new).
impl PartialEq for Psk {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.key.len() == other.key.len() && bool::from(self.key.ct_eq(&other.key))
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// AUTH with a shared key (§2.15): prf(prf(PSK, "Key Pad for IKEv2"),
/// `<SignedOctets>`), where SignedOctets = the sender's first message |
/// the peer's nonce | prf(SK_p, the sender's ID payload body).
pub fn psk_auth(
    prf: Prf,
    psk: &Psk,
    first_message: &[u8],
    peer_nonce: &[u8],
    sk_p: &[u8],
    id_body: &[u8],
) -> Vec<u8> {
    let maced_id = prf.prf(sk_p, &[id_body]);
    prf.prf(psk.pad(prf), &[first_message, peer_nonce, &maced_id])
}

/// Checks a received AUTH in constant time.
pub fn psk_auth_ok(expected: &[u8], received: &[u8]) -> bool {
    expected.len() == received.len() && bool::from(expected.ct_eq(received))
}

/// NAT detection hash (§2.23): SHA-1(SPIi | SPIr | IP | port).
pub fn nat_detection_hash(spi_i: u64, spi_r: u64, addr: std::net::IpAddr, port: u16) -> [u8; 20] {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(spi_i.to_be_bytes());
    h.update(spi_r.to_be_bytes());
    match addr {
        std::net::IpAddr::V4(a) => h.update(a.octets()),
        std::net::IpAddr::V6(a) => h.update(a.octets()),
    }
    h.update(port.to_be_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_auth_is_the_two_prfs_of_section_2_15_for_every_prf() {
        let psk = Psk::new(b"a shared secret");
        for prf in Prf::ALL {
            let pad = prf.prf(b"a shared secret", &[b"Key Pad for IKEv2"]);
            let want = prf.prf(&pad, &[b"first", b"nonce", &prf.prf(b"sk_p", &[b"id"])]);
            // Twice: the second from the kept pad.
            for _ in 0..2 {
                assert_eq!(
                    psk_auth(prf, &psk, b"first", b"nonce", b"sk_p", b"id"),
                    want,
                    "{prf}"
                );
            }
        }
    }

    #[test]
    fn nat_detection_hash_is_sha1_of_spis_address_and_port() {
        let hex = |h: [u8; 20]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let v4 = "192.0.2.1".parse().unwrap();
        assert_eq!(
            hex(nat_detection_hash(
                0x0102030405060708,
                0x1112131415161718,
                v4,
                500
            )),
            "d798d986143f878f70765e0e869c80bbc375f701"
        );
        // The responder's SPI is zero in the initiator's first request.
        let v6 = "::1".parse().unwrap();
        assert_eq!(
            hex(nat_detection_hash(0x0102030405060708, 0, v6, 4500)),
            "66d99eeaa11aee4b3d90371d177f1d979c2f15fb"
        );
    }

    #[test]
    fn every_group_agrees_with_itself() {
        let rng = crate::random::SeededRandom::new(1);
        for g in DhGroup::ALL {
            let a = DhPrivate::generate(g, &rng).unwrap();
            let b = DhPrivate::generate(g, &rng).unwrap();
            assert_eq!(a.public().len(), g.public_len(), "{g}");
            let (pa, pb) = (a.public().to_vec(), b.public().to_vec());
            let s1 = a.agree(&pb).unwrap();
            let s2 = b.agree(&pa).unwrap();
            assert_eq!(*s1, *s2, "{g}");
            assert!(s1.iter().any(|b| *b != 0));
        }
    }

    #[test]
    fn bad_public_values_are_refused() {
        let rng = crate::random::SeededRandom::new(1);
        for g in DhGroup::ALL {
            let len = g.public_len();
            // 1 as the group encodes it: big-endian, but little-endian for X25519,
            // where it is a low-order point that yields the all-zero secret.
            let mut one = vec![0u8; len];
            if g == DhGroup::Curve25519 {
                one[0] = 1
            } else {
                one[len - 1] = 1
            }
            for bad in [vec![0u8; len - 1], vec![0u8; len], one] {
                let k = DhPrivate::generate(g, &rng).unwrap();
                assert_eq!(
                    k.agree(&bad).unwrap_err(),
                    CryptoError::BadPublicValue { group: g },
                    "{g}"
                );
            }
        }
        // p - 1 for the safe-prime groups.
        let mut pm1 = hex_bytes(MODP2048_P);
        *pm1.last_mut().unwrap() -= 1;
        let k = DhPrivate::generate(DhGroup::Modp2048, &rng).unwrap();
        assert!(k.agree(&pm1).is_err());
        // For group 24, 2 is in range but not in the prime-order subgroup.
        let mut two = vec![0u8; 256];
        two[255] = 2;
        let k = DhPrivate::generate(DhGroup::Modp2048s256, &rng).unwrap();
        assert!(k.agree(&two).is_err());
    }

    #[test]
    fn group_24_generator_has_order_q() {
        let gq = modp_pow::<{ U2048::LIMBS }>(
            MODP2048S256_P,
            &hex_bytes(MODP2048S256_G),
            &hex_bytes(MODP2048S256_Q),
        );
        assert_eq!(gq[255], 1);
        assert!(gq[..255].iter().all(|b| *b == 0));
    }

    /// RFC 4231 test case 1 (HMAC-SHA-256) and prf+ built from it by hand.
    #[test]
    fn prf_and_prf_plus() {
        let key = [0x0b; 20];
        let out = Prf::HmacSha2_256.prf(&key, &[b"Hi ", b"There"]);
        assert_eq!(out[..4], [0xb0, 0x34, 0x4c, 0x61]);
        let p = Prf::HmacSha2_256;
        let t1 = p.prf(b"k", &[b"seed", &[1]]);
        let t2 = p.prf(b"k", &[&t1, b"seed", &[2]]);
        let plus = p.prf_plus(b"k", &[b"se", b"ed"], 40);
        assert_eq!(&plus[..32], &t1[..]);
        assert_eq!(&plus[32..], &t2[..8]);
    }

    #[test]
    fn psk_is_never_printed() {
        let p = Psk::new(b"secret*1234");
        assert!(!format!("{p:?}").contains("secret"));
    }
}
