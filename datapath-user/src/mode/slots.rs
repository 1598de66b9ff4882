//! What the datapaths that add and remove tunnels live (`xesp reload`)
//! share: the choice of a tunnel's index, a tunnel interface's settings,
//! and taking a removed tunnel's interface out of the routes before it is
//! deleted.

use std::time::{Duration, Instant};

use crate::{
    DatapathError,
    netlink::{Rtnl, ifindex},
};

/// The lowest free tunnel index in `tuns` (a freed slot or a new one).
pub(super) fn free_slot<T>(tuns: &[Option<T>]) -> Result<usize, DatapathError> {
    let i = tuns.iter().position(Option::is_none).unwrap_or(tuns.len());
    if i >= xesp_common::MAX_TUNNELS as usize {
        return Err(DatapathError::TunnelIndex(i as u32));
    }
    Ok(i)
}

/// Sets `net.<setting>` (e.g. `ipv6/conf/<name>/disable_ipv6`) to 1 for
/// tunnel interface `name`; `what` says what for an error. Nothing when the
/// kernel has no such setting (IPv6 compiled out).
pub(super) fn set_interface_flag(
    name: &str,
    setting: &str,
    what: &str,
) -> Result<(), DatapathError> {
    let path = format!("/proc/sys/net/{setting}");
    if std::path::Path::new(&path).exists() {
        std::fs::write(&path, "1").map_err(|source| DatapathError::Io {
            what: format!("{name}: {what}"),
            source,
        })?;
    }
    Ok(())
}

/// How long a removed tunnel's routes may take to move to the other
/// tunnels before its device is deleted anyway.
const ROUTE_DRAIN: Duration = Duration::from_secs(2);

/// Sets tunnel `name`'s device down and waits (up to [`ROUTE_DRAIN`]) until
/// no ECMP route has a next hop through it. Deleting a device deletes every
/// route with a next hop through it, an ECMP route over the other tunnels
/// too, until the routing daemon adds it back; setting it down only marks
/// its next hops dead (the other next hops carry on), and the routing daemon
/// (BIRD: its static route to the peer over it goes, so do the BGP routes
/// resolved through it) replaces the route without it.
pub(super) fn drain_routes(name: &str) -> Result<(), DatapathError> {
    let index = ifindex(name);
    if index == 0 {
        return Ok(());
    }
    let mut rtnl = Rtnl::open()?;
    rtnl.set_link_down(index)?;
    let start = Instant::now();
    loop {
        let left = rtnl.multipath_routes_via(index)?;
        if left == 0 {
            log::info!(
                "{name}: down; no ECMP route through it after {} ms",
                start.elapsed().as_millis()
            );
            return Ok(());
        }
        if start.elapsed() >= ROUTE_DRAIN {
            log::warn!(
                "{name}: {left} ECMP route(s) still through it after {} s; deleting \
                 it deletes them until the routing daemon adds them back",
                ROUTE_DRAIN.as_secs()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_is_taken_first_then_a_new_one_up_to_the_limit() {
        assert_eq!(free_slot::<()>(&[]).unwrap(), 0);
        assert_eq!(free_slot(&[Some(()), None, Some(())]).unwrap(), 1);
        assert_eq!(free_slot(&[Some(()), Some(())]).unwrap(), 2);
        let full = vec![Some(()); xesp_common::MAX_TUNNELS as usize];
        assert!(matches!(
            free_slot(&full),
            Err(DatapathError::TunnelIndex(i)) if i == xesp_common::MAX_TUNNELS
        ));
    }
}
