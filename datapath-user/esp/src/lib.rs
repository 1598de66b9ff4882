//! xesp's ESP core (RFC 4303), sans-IO: buffers in, buffers out.
//!
//! * [`alg`]: the one table of transforms, shared with the IKE side;
//! * [`crypto`]: keyed ciphers and MACs;
//! * [`sa`]: one direction of a CHILD_SA, encapsulating or decapsulating in place;
//! * [`policy`]: traffic selectors and the match of an inner packet (RFC 4301 §5.1, §5.2);
//! * [`replay`]: the anti-replay window, with extended sequence numbers;
//! * [`wire`]: outer headers, checksums and the UDP-4500 demultiplexing of NAT-T.

pub mod alg;
pub mod crypto;
pub mod policy;
pub mod replay;
pub mod sa;
pub mod wire;

// The tests of whole SAs were written when an SA was used through `&mut`;
// they pass unchanged now that it is shared (`&self`), some `mut`s idle.
#[cfg(test)]
#[allow(unused_mut)]
mod tests;

#[cfg(test)]
mod concurrency;
