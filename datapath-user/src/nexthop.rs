//! Where a worker sends a packet it forwards: the FIB's output interface and
//! the Ethernet addresses to put in front (the interface's MAC and the next
//! hop's). Answers are cached per destination for a few seconds, misses for
//! less, so the kernel is asked only when things may have changed.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use crate::netlink::{NetlinkError, Rtnl};

/// How to reach a destination at layer 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// Out of `ifindex`, from MAC `src` to MAC `dst`.
    Ether {
        ifindex: u32,
        src: [u8; 6],
        dst: [u8; 6],
    },
    /// An address of this host: deliver through the stack.
    Local,
    /// No route, or the neighbour is not resolved (yet): let the stack deal
    /// with it, which also resolves the neighbour for next time.
    Unresolved,
}

/// A per-worker cache of [`NextHop`]s.
pub struct NextHops {
    rtnl: Rtnl,
    cache: HashMap<Ipv4Addr, (NextHop, Instant)>,
    macs: HashMap<u32, [u8; 6]>,
    ttl: Duration,
    miss_ttl: Duration,
}

impl NextHops {
    /// Opens an rtnetlink socket in the calling thread's namespace.
    pub fn new() -> Result<Self, NetlinkError> {
        Ok(Self {
            rtnl: Rtnl::open()?,
            cache: HashMap::new(),
            macs: HashMap::new(),
            ttl: Duration::from_secs(5),
            miss_ttl: Duration::from_millis(200),
        })
    }

    /// The next hop toward `dst` as of `now`.
    pub fn resolve(&mut self, dst: Ipv4Addr, now: Instant) -> NextHop {
        if let Some((hop, expires)) = self.cache.get(&dst)
            && *expires > now
        {
            return *hop;
        }
        let hop = self.lookup(dst).unwrap_or_else(|e| {
            log::debug!("next hop for {dst}: {e}");
            NextHop::Unresolved
        });
        let ttl = if matches!(hop, NextHop::Unresolved) {
            self.miss_ttl
        } else {
            self.ttl
        };
        self.cache.insert(dst, (hop, now + ttl));
        hop
    }

    /// Forgets everything (e.g. after a route change).
    pub fn flush(&mut self) {
        self.cache.clear();
        self.macs.clear();
    }

    fn lookup(&mut self, dst: Ipv4Addr) -> Result<NextHop, NetlinkError> {
        let route = self.rtnl.route_get(dst)?;
        if route.local {
            return Ok(NextHop::Local);
        }
        let Some(dst_mac) = self.rtnl.neighbour(route.oif, route.neighbour(dst))? else {
            return Ok(NextHop::Unresolved);
        };
        let src = match self.macs.get(&route.oif) {
            Some(m) => *m,
            None => {
                let m = self.rtnl.link_mac(route.oif)?;
                self.macs.insert(route.oif, m);
                m
            }
        };
        Ok(NextHop::Ether {
            ifindex: route.oif,
            src,
            dst: dst_mac,
        })
    }
}
