//! Keyed transforms: the cipher and the integrity check of one SA direction.
//!
//! Shared by ESP (RFC 4303) and the IKE SK payload (RFC 7296 §3.14), which
//! frame them alike: explicit IV, ciphertext, ICV. AES-GCM runs on ring;
//! AES-CBC and 3DES-CBC run on the RustCrypto block ciphers (AES-NI when the
//! CPU has it); HMACs run on ring. Nothing here allocates.

use aes::cipher::{
    BlockDecrypt, BlockEncrypt, BlockSizeUser, KeyInit, generic_array::GenericArray,
};
use ring::aead;
use subtle::ConstantTimeEq;

use crate::alg::{AesKeyBits, Encr, Integ};

/// Errors from keying or running a transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("{alg}: key material is {got} octets, expected {want}")]
    KeyLength {
        alg: &'static str,
        got: usize,
        want: usize,
    },
    #[error("IV is {got} octets, expected {want}")]
    IvLength { got: usize, want: usize },
    #[error("ciphertext length {len} is not a multiple of the {block}-octet block")]
    NotBlockAligned { len: usize, block: usize },
    #[error("buffer of {len} octets is shorter than the {icv}-octet ICV")]
    ShortForIcv { len: usize, icv: usize },
    #[error("integrity check failed")]
    Authentication,
}

/// One direction's cipher, keyed.
pub struct Cipher {
    encr: Encr,
    inner: CipherKey,
}

enum CipherKey {
    Aes128Cbc(aes::Aes128),
    Aes192Cbc(aes::Aes192),
    Aes256Cbc(aes::Aes256),
    Des3Cbc(des::TdesEde3),
    Gcm {
        key: aead::LessSafeKey,
        salt: [u8; 4],
    },
}

impl core::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print key material.
        write!(f, "Cipher({})", self.encr)
    }
}

impl Cipher {
    /// Keys `encr` from `keymat` (key, then salt for GCM: RFC 4106 §8.1, RFC 5282 §7.1).
    pub fn new(encr: Encr, keymat: &[u8]) -> Result<Self, CryptoError> {
        if keymat.len() != encr.keymat_len() {
            return Err(CryptoError::KeyLength {
                alg: "encryption",
                got: keymat.len(),
                want: encr.keymat_len(),
            });
        }
        let inner = match encr {
            Encr::Des3Cbc => {
                CipherKey::Des3Cbc(des::TdesEde3::new(GenericArray::from_slice(keymat)))
            }
            Encr::AesCbc(AesKeyBits::B128) => {
                CipherKey::Aes128Cbc(aes::Aes128::new(GenericArray::from_slice(keymat)))
            }
            Encr::AesCbc(AesKeyBits::B192) => {
                CipherKey::Aes192Cbc(aes::Aes192::new(GenericArray::from_slice(keymat)))
            }
            Encr::AesCbc(AesKeyBits::B256) => {
                CipherKey::Aes256Cbc(aes::Aes256::new(GenericArray::from_slice(keymat)))
            }
            Encr::AesGcm16(bits) => {
                let alg = match bits {
                    AesKeyBits::B128 => &aead::AES_128_GCM,
                    AesKeyBits::B256 => &aead::AES_256_GCM,
                    AesKeyBits::B192 => {
                        return Err(CryptoError::KeyLength {
                            alg: "AES-GCM-192 (unsupported)",
                            got: 24,
                            want: 0,
                        });
                    }
                };
                let (key, salt) = keymat.split_at(bits.bytes());
                let unbound =
                    aead::UnboundKey::new(alg, key).map_err(|_| CryptoError::KeyLength {
                        alg: "AES-GCM",
                        got: key.len(),
                        want: bits.bytes(),
                    })?;
                let mut s = [0u8; 4];
                s.copy_from_slice(salt);
                CipherKey::Gcm {
                    key: aead::LessSafeKey::new(unbound),
                    salt: s,
                }
            }
        };
        Ok(Self { encr, inner })
    }

    pub fn encr(&self) -> Encr {
        self.encr
    }

    /// CBC-encrypts `buf` in place. `buf` must be a whole number of blocks.
    pub fn cbc_encrypt(&self, iv: &[u8], buf: &mut [u8]) -> Result<(), CryptoError> {
        match &self.inner {
            CipherKey::Aes128Cbc(c) => cbc_encrypt(c, iv, buf),
            CipherKey::Aes192Cbc(c) => cbc_encrypt(c, iv, buf),
            CipherKey::Aes256Cbc(c) => cbc_encrypt(c, iv, buf),
            CipherKey::Des3Cbc(c) => cbc_encrypt(c, iv, buf),
            CipherKey::Gcm { .. } => unreachable_mode(),
        }
    }

    /// CBC-decrypts `buf` in place. `buf` must be a whole number of blocks.
    pub fn cbc_decrypt(&self, iv: &[u8], buf: &mut [u8]) -> Result<(), CryptoError> {
        match &self.inner {
            CipherKey::Aes128Cbc(c) => cbc_decrypt(c, iv, buf),
            CipherKey::Aes192Cbc(c) => cbc_decrypt(c, iv, buf),
            CipherKey::Aes256Cbc(c) => cbc_decrypt(c, iv, buf),
            CipherKey::Des3Cbc(c) => cbc_decrypt(c, iv, buf),
            CipherKey::Gcm { .. } => unreachable_mode(),
        }
    }

    /// AEAD-seals `in_out` = plaintext followed by room for the 16-octet ICV,
    /// with nonce = salt || `iv` (RFC 4106 §4) and the given AAD.
    pub fn aead_seal(&self, iv: &[u8], aad: &[u8], in_out: &mut [u8]) -> Result<(), CryptoError> {
        let CipherKey::Gcm { key, salt } = &self.inner else {
            return unreachable_mode();
        };
        let nonce = gcm_nonce(salt, iv)?;
        let Some((text, tag_out)) = in_out.split_last_chunk_mut::<GCM_ICV>() else {
            return Err(CryptoError::ShortForIcv {
                len: in_out.len(),
                icv: GCM_ICV,
            });
        };
        // Matched, not mapped: the tag goes from ring's return value
        // straight to the packet, not through one more copy on the stack
        // that the store of the ICV would wait for.
        match key.seal_in_place_separate_tag(nonce, aead::Aad::from(aad), text) {
            Ok(tag) => {
                tag_out.copy_from_slice(tag.as_ref());
                Ok(())
            }
            Err(_) => Err(CryptoError::Authentication),
        }
    }

    /// AEAD-opens `in_out` = ciphertext followed by the ICV; on success the
    /// plaintext is in `in_out[..len - 16]`. Nothing is changed on failure
    /// that the caller may use.
    pub fn aead_open(&self, iv: &[u8], aad: &[u8], in_out: &mut [u8]) -> Result<(), CryptoError> {
        let CipherKey::Gcm { key, salt } = &self.inner else {
            return unreachable_mode();
        };
        let nonce = gcm_nonce(salt, iv)?;
        let icv = self.encr.aead_icv_len();
        if in_out.len() < icv {
            return Err(CryptoError::ShortForIcv {
                len: in_out.len(),
                icv,
            });
        }
        key.open_in_place(nonce, aead::Aad::from(aad), in_out)
            .map(|_| ())
            .map_err(|_| CryptoError::Authentication)
    }
}

/// A mode mismatch is a programming error inside this crate's callers, which
/// dispatch on `Encr::is_aead`; report it as an authentication failure rather
/// than panicking on a packet path.
fn unreachable_mode() -> Result<(), CryptoError> {
    debug_assert!(false, "cipher mode mismatch");
    Err(CryptoError::Authentication)
}

fn gcm_nonce(salt: &[u8; 4], iv: &[u8]) -> Result<aead::Nonce, CryptoError> {
    if iv.len() != 8 {
        return Err(CryptoError::IvLength {
            got: iv.len(),
            want: 8,
        });
    }
    // salt || iv (RFC 4106 §4), put together in registers: written as one
    // 8-octet and one 4-octet store, the same widths the nonce is then read
    // with, so the read never waits on stores it straddles.
    let head = u64::from_le_bytes([
        salt[0], salt[1], salt[2], salt[3], iv[0], iv[1], iv[2], iv[3],
    ]);
    let tail = u32::from_le_bytes([iv[4], iv[5], iv[6], iv[7]]);
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&head.to_le_bytes());
    n[8..].copy_from_slice(&tail.to_le_bytes());
    Ok(aead::Nonce::assume_unique_for_key(n))
}

fn check_cbc<C: BlockSizeUser>(iv: &[u8], buf: &[u8]) -> Result<usize, CryptoError> {
    let bs = C::block_size();
    if iv.len() != bs {
        return Err(CryptoError::IvLength {
            got: iv.len(),
            want: bs,
        });
    }
    if !buf.len().is_multiple_of(bs) {
        return Err(CryptoError::NotBlockAligned {
            len: buf.len(),
            block: bs,
        });
    }
    Ok(bs)
}

// Largest block size handled (AES).
const MAX_BLOCK: usize = 16;

/// The ICV of AES-GCM in ESP: the 16-octet tag (RFC 4106 §6), the only
/// length ring produces.
const GCM_ICV: usize = 16;

fn cbc_encrypt<C: BlockEncrypt>(c: &C, iv: &[u8], buf: &mut [u8]) -> Result<(), CryptoError> {
    let bs = check_cbc::<C>(iv, buf)?;
    let mut prev = [0u8; MAX_BLOCK];
    prev[..bs].copy_from_slice(iv);
    for block in buf.chunks_exact_mut(bs) {
        for (b, p) in block.iter_mut().zip(&prev[..bs]) {
            *b ^= p;
        }
        c.encrypt_block(GenericArray::from_mut_slice(block));
        prev[..bs].copy_from_slice(block);
    }
    Ok(())
}

/// CBC decryption is parallel across blocks: decrypt a chunk of blocks at
/// once (the block cipher pipelines them), then XOR each with the previous
/// ciphertext block, walking the chunk backwards so that block still holds
/// ciphertext when it is read.
fn cbc_decrypt<C: BlockDecrypt>(c: &C, iv: &[u8], buf: &mut [u8]) -> Result<(), CryptoError> {
    const CHUNK_BLOCKS: usize = 8;
    let bs = check_cbc::<C>(iv, buf)?;
    let mut prev = [0u8; MAX_BLOCK];
    prev[..bs].copy_from_slice(iv);
    let mut blocks: [GenericArray<u8, C::BlockSize>; CHUNK_BLOCKS] = Default::default();
    for chunk in buf.chunks_mut(bs * CHUNK_BLOCKS) {
        let nb = chunk.len() / bs;
        for (dst, src) in blocks.iter_mut().zip(chunk.chunks_exact(bs)) {
            dst.copy_from_slice(src);
        }
        c.decrypt_blocks(&mut blocks[..nb]);
        let mut next_prev = [0u8; MAX_BLOCK];
        next_prev[..bs].copy_from_slice(&chunk[(nb - 1) * bs..]);
        for i in (0..nb).rev() {
            let (before, this) = chunk.split_at_mut(i * bs);
            let x = if i == 0 {
                &prev[..bs]
            } else {
                &before[(i - 1) * bs..]
            };
            for ((out, d), p) in this[..bs].iter_mut().zip(blocks[i].iter()).zip(x) {
                *out = d ^ p;
            }
        }
        prev = next_prev;
    }
    Ok(())
}

/// One direction's integrity key (HMAC, truncated per the transform).
pub struct Mac {
    integ: Integ,
    key: MacKey,
}

/// ring's SHA-2 HMACs are the fastest here; its SHA-1 has no assembly, so
/// HMAC-SHA1 (the article's `esp-sha-hmac`) uses the RustCrypto SHA-1, which
/// runs on the CPU's SHA extensions when it has them.
enum MacKey {
    Sha1(hmac::Hmac<sha1::Sha1>),
    Ring(ring::hmac::Key),
}

impl core::fmt::Debug for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Mac({})", self.integ)
    }
}

impl Mac {
    pub fn new(integ: Integ, key: &[u8]) -> Result<Self, CryptoError> {
        if key.len() != integ.key_len() {
            return Err(CryptoError::KeyLength {
                alg: "integrity",
                got: key.len(),
                want: integ.key_len(),
            });
        }
        let key = match integ {
            Integ::HmacSha1_96 => MacKey::Sha1(
                <hmac::Hmac<sha1::Sha1> as hmac::Mac>::new_from_slice(key).map_err(|_| {
                    CryptoError::KeyLength {
                        alg: "integrity",
                        got: key.len(),
                        want: integ.key_len(),
                    }
                })?,
            ),
            _ => MacKey::Ring(ring::hmac::Key::new(integ.ring_alg(), key)),
        };
        Ok(Self { integ, key })
    }

    pub fn integ(&self) -> Integ {
        self.integ
    }

    /// Writes the truncated ICV over the concatenation of `parts` into `icv`
    /// (which must be `icv_len` long).
    pub fn sign(&self, parts: &[&[u8]], icv: &mut [u8]) -> Result<(), CryptoError> {
        let want = self.integ.icv_len();
        if icv.len() != want {
            return Err(CryptoError::ShortForIcv {
                len: icv.len(),
                icv: want,
            });
        }
        self.tag(parts, |t| icv.copy_from_slice(&t[..want]));
        Ok(())
    }

    /// Checks `icv` against the concatenation of `parts`, in constant time.
    pub fn verify(&self, parts: &[&[u8]], icv: &[u8]) -> Result<(), CryptoError> {
        let want = self.integ.icv_len();
        let mut ok = false;
        self.tag(parts, |t| {
            ok = icv.len() == want && bool::from(t[..want].ct_eq(icv))
        });
        if ok {
            Ok(())
        } else {
            Err(CryptoError::Authentication)
        }
    }

    /// Computes the full HMAC and hands it to `f` (no allocation).
    fn tag(&self, parts: &[&[u8]], f: impl FnOnce(&[u8])) {
        match &self.key {
            MacKey::Sha1(k) => {
                use hmac::Mac as _;
                let mut m = k.clone();
                for p in parts {
                    m.update(p);
                }
                f(&m.finalize().into_bytes());
            }
            MacKey::Ring(k) => {
                let mut ctx = ring::hmac::Context::with_key(k);
                for p in parts {
                    ctx.update(p);
                }
                f(ctx.sign().as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3602 §4, case #4: AES-128-CBC, 64 octets.
    #[test]
    fn aes_cbc_rfc3602_case4() {
        let c = Cipher::new(
            Encr::AesCbc(AesKeyBits::B128),
            &hex("56e47a38c5598974bc46903dba290349"),
        )
        .unwrap();
        let iv = hex("8ce82eefbea0da3c44699ed7db51b7d9");
        let pt = hex(
            "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf",
        );
        let ct = hex(
            "c30e32ffedc0774e6aff6af0869f71aa0f3af07a9a31a9c684db207eb0ef8e4e35907aa632c3ffdf868bb7b29d3d46ad83ce9f9a102ee99d49a53e87f4c3da55",
        );
        let mut buf = pt.clone();
        c.cbc_encrypt(&iv, &mut buf).unwrap();
        assert_eq!(buf, ct);
        c.cbc_decrypt(&iv, &mut buf).unwrap();
        assert_eq!(buf, pt);
    }

    #[test]
    fn cbc_decrypt_matches_encrypt_across_chunk_boundaries() {
        for encr in [
            Encr::AesCbc(AesKeyBits::B256),
            Encr::AesCbc(AesKeyBits::B192),
            Encr::Des3Cbc,
        ] {
            let key: Vec<u8> = (0..encr.keymat_len() as u8).collect();
            let c = Cipher::new(encr, &key).unwrap();
            let iv = vec![7u8; encr.iv_len()];
            for blocks in [1usize, 7, 8, 9, 17, 88] {
                let pt: Vec<u8> = (0..blocks * encr.block_len()).map(|i| i as u8).collect();
                let mut buf = pt.clone();
                c.cbc_encrypt(&iv, &mut buf).unwrap();
                assert_ne!(buf, pt);
                c.cbc_decrypt(&iv, &mut buf).unwrap();
                assert_eq!(buf, pt, "{encr} {blocks} blocks");
            }
            let mut odd = vec![0u8; encr.block_len() + 1];
            assert!(matches!(
                c.cbc_encrypt(&iv, &mut odd),
                Err(CryptoError::NotBlockAligned { .. })
            ));
        }
    }

    #[test]
    fn gcm_seal_open_and_tamper() {
        let encr = Encr::AesGcm16(AesKeyBits::B256);
        let c = Cipher::new(encr, &[9u8; 36]).unwrap();
        let mut buf = vec![0u8; 100 + 16];
        buf[..100].fill(0x42);
        c.aead_seal(&[1; 8], b"aad", &mut buf).unwrap();
        let sealed = buf.clone();
        c.aead_open(&[1; 8], b"aad", &mut buf).unwrap();
        assert_eq!(&buf[..100], &[0x42; 100][..]);
        let mut bad = sealed.clone();
        bad[3] ^= 1;
        assert_eq!(
            c.aead_open(&[1; 8], b"aad", &mut bad),
            Err(CryptoError::Authentication)
        );
        let mut bad = sealed;
        assert_eq!(
            c.aead_open(&[1; 8], b"aae", &mut bad),
            Err(CryptoError::Authentication)
        );
        assert!(matches!(
            c.aead_open(&[1; 8], b"", &mut [0u8; 5]),
            Err(CryptoError::ShortForIcv { .. })
        ));
    }

    /// RFC 4231 test case 2 ("Jefe"), truncated to 128 bits as RFC 4868 does.
    #[test]
    fn hmac_sha256_128_rfc4231() {
        let m = Mac::new(Integ::HmacSha2_256_128, &{
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(b"Jefe");
            k
        })
        .unwrap();
        // A 32-octet key zero-padded is the same HMAC key as "Jefe" (RFC 2104 §2).
        // (RFC 2202 case 2 for SHA-1 is in `hmac_sha1_96_rfc2202`.)
        let mut icv = [0u8; 16];
        m.sign(&[b"what do ya want ", b"for nothing?"], &mut icv)
            .unwrap();
        assert_eq!(icv.to_vec(), hex("5bdcc146bf60754e6a042426089575c7"));
        m.verify(&[b"what do ya want for nothing?"], &icv).unwrap();
        icv[0] ^= 1;
        assert_eq!(
            m.verify(&[b"what do ya want for nothing?"], &icv),
            Err(CryptoError::Authentication)
        );
        assert!(Mac::new(Integ::HmacSha1_96, &[0; 19]).is_err());
    }

    /// RFC 2202 test case 2 for HMAC-SHA1, truncated to 96 bits (RFC 2404).
    #[test]
    fn hmac_sha1_96_rfc2202() {
        let mut k = [0u8; 20];
        k[..4].copy_from_slice(b"Jefe");
        let m = Mac::new(Integ::HmacSha1_96, &k).unwrap();
        let mut icv = [0u8; 12];
        m.sign(&[b"what do ya want for nothing?"], &mut icv)
            .unwrap();
        assert_eq!(icv.to_vec(), hex("effcdf6ae5eb2fa2d27416d5"));
        m.verify(&[b"what do ya ", b"want for nothing?"], &icv)
            .unwrap();
        icv[11] ^= 0x80;
        assert!(m.verify(&[b"what do ya want for nothing?"], &icv).is_err());
    }
}
