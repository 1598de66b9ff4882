//! xesp's ESP core (RFC 4303), sans-IO: buffers in, buffers out.

pub mod alg;
pub mod crypto;
