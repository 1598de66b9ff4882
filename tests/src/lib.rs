//! xesp-tests
