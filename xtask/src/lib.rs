//! xesp's project automation, also used as a library by the integration tests
//! (the reference lab, namespaces and process guards live here).

pub mod bench;
pub mod host;
pub mod lab;
pub mod netns;
pub mod package;
pub mod setup;
pub mod test;
pub mod vm;
