//! The IKEv2 protocol core, sans-IO.

pub mod codec;
pub mod crypto;
pub mod sk;
