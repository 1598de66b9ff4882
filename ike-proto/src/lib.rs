//! xesp's IKEv2 core (RFC 7296), sans-IO: no sockets, no clock, no global
//! randomness. Datagrams, time and random bytes go in; datagrams, timer
//! deadlines, events and calls on an [`backend::SaBackend`] come out.
//!
//! * [`codec`]: IKE messages and payloads on the wire (§3);
//! * [`sk`]: the Encrypted payload (§3.14);
//! * [`crypto`]: PRFs, key derivation (§2.13–2.18), Diffie-Hellman, PSK AUTH;
//! * [`proposal`]: offering and choosing IKE and ESP proposals (§3.3);
//! * [`ts`]: traffic selectors and their narrowing (§2.9);
//! * [`config`]: what one connection is configured with;
//! * [`connection`]: one tunnel's IKE_SAs and CHILD_SAs, one module per
//!   exchange;
//! * [`backend`]: the trait a datapath implements, and a recording mock;
//! * [`random`]: the injected randomness (the system's, or seeded for tests);
//! * [`status`]: snapshots for `xesp status`.
#![forbid(unsafe_code)]

pub mod backend;
pub mod codec;
pub mod config;
pub mod connection;
pub mod crypto;
pub mod proposal;
pub mod random;
pub mod sk;
pub mod status;
pub mod ts;
