//! The IKEv2 protocol core, sans-IO.

pub mod codec;
pub mod config;
pub mod connection;
pub mod crypto;
pub mod proposal;
pub mod sk;
pub mod status;
pub mod ts;

#[cfg(test)]
mod tests;
