//! Azure in and out: `xesp azure import` (the gateway's and connection's
//! JSON to an `xesp.toml`), `xesp azure export` (this device as Azure's
//! local network gateway and connection: `az` commands and ARM JSON) and
//! `xesp azure allowlist` (Microsoft's published prefixes to `[dmz] allow`).
//! Field names follow `AZURE.md`; they are matched case-insensitively.

pub mod allowlist;
pub mod cmd;
pub mod export;
pub mod import;
pub mod json;
pub mod policy;

use std::net::Ipv4Addr;

/// Azure's range for custom (APIPA) BGP addresses.
pub const APIPA_FIRST: Ipv4Addr = Ipv4Addr::new(169, 254, 21, 0);
pub const APIPA_LAST: Ipv4Addr = Ipv4Addr::new(169, 254, 22, 255);

/// Whether `a` is an APIPA (link-local) address outside Azure's range.
pub fn apipa_outside_azure(a: Ipv4Addr) -> bool {
    a.is_link_local() && !(APIPA_FIRST..=APIPA_LAST).contains(&a)
}

/// Azure's IKE_SA lifetime, which its policies cannot change.
pub const AZURE_IKE_LIFETIME_SECS: u64 = 28_800;
/// Azure's DPD timeout when the connection does not say.
pub const AZURE_DPD_TIMEOUT_SECS: u64 = 45;

/// What went wrong reading or writing Azure's side.
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    #[error("{file}: line {line}, column {column}: {reason}")]
    Json {
        file: String,
        line: usize,
        column: usize,
        reason: &'static str,
    },
    #[error("{file}: {path} is missing ({what})")]
    Missing {
        file: String,
        path: String,
        what: String,
    },
    #[error("{file}: {path} is not a field xesp knows here (known: {known})")]
    Unknown {
        file: String,
        path: String,
        known: String,
    },
    #[error("{file}: {path} = {value}: {reason}")]
    Invalid {
        file: String,
        path: String,
        value: String,
        reason: String,
    },
    /// The inputs are readable but describe something xesp will not build.
    #[error("{what}: {reason}")]
    Refused { what: String, reason: String },
    /// A proposal Azure's policies cannot express.
    #[error("{field} = {proposal:?}: Azure cannot express it: {reason}")]
    Inexpressible {
        field: String,
        proposal: String,
        reason: String,
    },
}

pub(crate) fn refused(what: impl Into<String>, reason: impl Into<String>) -> AzureError {
    AzureError::Refused {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Seconds as a duration xesp's configuration reads back to the same value.
pub(crate) fn secs(s: u64) -> String {
    crate::config::limits::fmt_duration(std::time::Duration::from_secs(s))
}

/// DPD that declares the peer dead `timeout` seconds (4 or more) after it
/// fell silent, like Azure's `dpdTimeoutSeconds`: three probes a quarter of
/// it apart (at most 10 minutes), the first after the rest.
/// (interval, retry, tries)
pub fn dpd_from_timeout(timeout: u64) -> (u64, u64, u32) {
    let retry = (timeout / 4).clamp(1, 600);
    let interval = timeout.saturating_sub(3 * retry).max(1);
    (interval, retry, 3)
}

/// The inverse: how long DPD takes to declare a silent peer dead.
pub fn timeout_from_dpd(interval: u64, retry: u64, tries: u32) -> u64 {
    interval.saturating_add(retry.saturating_mul(u64::from(tries)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apipa_range() {
        assert!(!apipa_outside_azure(Ipv4Addr::new(169, 254, 21, 1)));
        assert!(!apipa_outside_azure(Ipv4Addr::new(169, 254, 22, 255)));
        assert!(apipa_outside_azure(Ipv4Addr::new(169, 254, 23, 0)));
        assert!(apipa_outside_azure(Ipv4Addr::new(169, 254, 20, 255)));
        assert!(!apipa_outside_azure(Ipv4Addr::new(10, 2, 0, 228)));
    }

    #[test]
    fn dpd_timeouts_round_trip() {
        assert_eq!(dpd_from_timeout(45), (12, 11, 3));
        for t in 4..=3600 {
            let (i, r, n) = dpd_from_timeout(t);
            assert_eq!(timeout_from_dpd(i, r, n), t, "{t}");
        }
    }
}
