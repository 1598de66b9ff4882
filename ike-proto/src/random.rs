//! The core's randomness, injected: SPIs, nonces, IVs, Diffie-Hellman
//! private values, rekey jitter and cookie secrets all come from a
//! [`Random`] the caller gives. The daemon gives the system's
//! ([`SystemRandom`]); tests and fuzz targets give a [`SeededRandom`], so a
//! failure replays exactly.

use std::sync::Mutex;

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
pub struct SystemRandom(ring::rand::SystemRandom);

impl SystemRandom {
    pub fn new() -> Self {
        Self(ring::rand::SystemRandom::new())
    }
}

impl Default for SystemRandom {
    fn default() -> Self {
        Self::new()
    }
}

impl Random for SystemRandom {
    fn fill(&self, out: &mut [u8]) -> Result<(), RandomError> {
        ring::rand::SecureRandom::fill(&self.0, out).map_err(|_| RandomError)
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
