//! The IKEv2 protocol core, sans-IO.

pub mod codec;
pub mod config;
pub mod crypto;
pub mod proposal;
pub mod sk;
pub mod ts;
