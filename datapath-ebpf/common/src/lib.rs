//! xesp-common
