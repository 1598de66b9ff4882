//! The core's randomness, injected: SPIs, nonces, IVs, Diffie-Hellman
//! private values, rekey jitter and cookie secrets all come from a
//! [`Random`] the caller gives. The daemon gives the system's
//! ([`SystemRandom`]); tests and fuzz targets give a [`SeededRandom`], so a
//! failure replays exactly.

use std::sync::Mutex;

use zeroize::{Zeroize, Zeroizing};

/// The random source failed; nothing random was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the random number generator failed")]
pub struct RandomError;

/// A source of random octets.
pub trait Random: Send + Sync {
    /// Fills `out` entirely, or fails.
    fn fill(&self, out: &mut [u8]) -> Result<(), RandomError>;
}

/// The operating system's generator (getrandom), through ring.
///
/// Each read is a system call, and an IKE_SA setup draws a dozen times,
/// most of a few octets. Requests of at most 32 octets (SPIs, IVs, nonces,
/// rekey jitter) are served from a pool that one read of 256 octets fills
/// (the kernel serves that at about the cost of 32), so a setup makes about
/// one read; every octet is handed out once and wiped from the pool as it
/// goes. Larger requests (private values, secrets) are read directly.
pub struct SystemRandom {
    os: ring::rand::SystemRandom,
    pool: Mutex<Pool>,
}

/// Requests up to this many octets come from the pool.
const POOLED: usize = 32;
/// The pool's size.
const POOL: usize = 256;

/// Octets read from the system and not handed out yet: `octets[used..]`.
struct Pool {
    octets: Zeroizing<[u8; POOL]>,
    used: usize,
}

impl SystemRandom {
    pub fn new() -> Self {
        Self {
            os: ring::rand::SystemRandom::new(),
            pool: Mutex::new(Pool {
                octets: Zeroizing::new([0; POOL]),
                used: POOL,
            }),
        }
    }

    fn read(&self, out: &mut [u8]) -> Result<(), RandomError> {
        ring::rand::SecureRandom::fill(&self.os, out).map_err(|_| RandomError)
    }
}

impl Default for SystemRandom {
    fn default() -> Self {
        Self::new()
    }
}

impl Random for SystemRandom {
    fn fill(&self, out: &mut [u8]) -> Result<(), RandomError> {
        if out.len() > POOLED {
            return self.read(out);
        }
        let mut pool = self.pool.lock().map_err(|_| RandomError)?;
        if POOL - pool.used < out.len() {
            self.read(&mut pool.octets[..])?;
            pool.used = 0;
        }
        let at = pool.used;
        let taken = &mut pool.octets[at..at + out.len()];
        out.copy_from_slice(taken);
        taken.zeroize();
        pool.used += out.len();
        Ok(())
    }
}

/// A deterministic stream: SHA-256 of the seed and a block counter. For
/// tests and fuzzing only: its output is predictable from the seed.
pub struct SeededRandom {
    seed: [u8; 8],
    counter: Mutex<u64>,
}

impl SeededRandom {
    pub fn new(seed: u64) -> Self {
        Self {
            seed: seed.to_be_bytes(),
            counter: Mutex::new(0),
        }
    }
}

impl Random for SeededRandom {
    fn fill(&self, out: &mut [u8]) -> Result<(), RandomError> {
        let mut counter = self.counter.lock().map_err(|_| RandomError)?;
        for chunk in out.chunks_mut(32) {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(&self.seed);
            ctx.update(&counter.to_be_bytes());
            *counter += 1;
            let block = ctx.finish();
            chunk.copy_from_slice(&block.as_ref()[..chunk.len()]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_pool_hands_each_octet_out_once() {
        let rng = SystemRandom::new();
        let mut small = [[0u8; 8]; 8];
        for s in &mut small {
            rng.fill(s).unwrap();
        }
        for (i, a) in small.iter().enumerate() {
            assert!(small[i + 1..].iter().all(|b| a != b));
        }
        let mut big = [0u8; 64];
        rng.fill(&mut big).unwrap();
        assert!(big.iter().any(|b| *b != 0));
    }

    #[test]
    fn a_seed_replays_and_seeds_differ() {
        let (a, b, c) = (
            SeededRandom::new(7),
            SeededRandom::new(7),
            SeededRandom::new(8),
        );
        let mut x = [0u8; 70];
        let mut y = [0u8; 70];
        let mut z = [0u8; 70];
        a.fill(&mut x).unwrap();
        b.fill(&mut y).unwrap();
        c.fill(&mut z).unwrap();
        assert_eq!(x, y);
        assert_ne!(x, z);
        // The stream goes on: the next fill differs from the first.
        a.fill(&mut y).unwrap();
        assert_ne!(x, y);
    }
}
