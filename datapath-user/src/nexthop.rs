//! Where a worker sends a packet it forwards: the FIB's output interface and
//! the Ethernet addresses to put in front (the interface's MAC and the next
//! hop's). Answers are cached per destination for a few seconds, misses for
//! less, so the kernel is asked only when things may have changed.
//!
//! The cache is bounded ([`Limits::entries`]: expired and unresolved entries
//! go first when it is full) and the kernel is asked at most
//! [`Limits::lookups_per_sec`] times a second (a token bucket): a sweep of
//! destinations costs bounded memory and netlink calls, and what the budget
//! cannot look up goes through the stack, counted.

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

/// How big the cache may grow and how often the kernel may be asked.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub entries: usize,
    pub lookups_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            entries: 4096,
            lookups_per_sec: 2000,
        }
    }
}

/// What the cache did, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NextHopStats {
    /// Questions to the kernel.
    pub lookups: u64,
    /// Of those, answered "no route or no neighbour".
    pub misses: u64,
    /// Destinations not looked up: the budget was spent (sent to the stack).
    pub rate_limited: u64,
    /// Entries pushed out of a full cache.
    pub evicted: u64,
}

/// A per-worker cache of [`NextHop`]s.
pub struct NextHops {
    rtnl: Rtnl,
    cache: HashMap<Ipv4Addr, (NextHop, Instant)>,
    macs: HashMap<u32, [u8; 6]>,
    ttl: Duration,
    miss_ttl: Duration,
    limits: Limits,
    /// Lookups the budget still allows, and when it was last refilled.
    tokens: f64,
    refilled: Option<Instant>,
    stats: NextHopStats,
}

impl NextHops {
    /// Opens an rtnetlink socket in the calling thread's namespace.
    pub fn new() -> Result<Self, NetlinkError> {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Result<Self, NetlinkError> {
        Ok(Self {
            rtnl: Rtnl::open()?,
            cache: HashMap::new(),
            macs: HashMap::new(),
            ttl: Duration::from_secs(5),
            miss_ttl: Duration::from_millis(200),
            limits,
            tokens: f64::from(limits.lookups_per_sec),
            refilled: None,
            stats: NextHopStats::default(),
        })
    }

    pub fn stats(&self) -> NextHopStats {
        self.stats
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The next hop toward `dst` as of `now`.
    pub fn resolve(&mut self, dst: Ipv4Addr, now: Instant) -> NextHop {
        if let Some((hop, expires)) = self.cache.get(&dst)
            && *expires > now
        {
            return *hop;
        }
        if !self.spend(now) {
            self.stats.rate_limited += 1;
            return NextHop::Unresolved;
        }
        self.stats.lookups += 1;
        let hop = self.lookup(dst).unwrap_or_else(|e| {
            log::debug!("next hop for {dst}: {e}");
            NextHop::Unresolved
        });
        let ttl = if matches!(hop, NextHop::Unresolved) {
            self.stats.misses += 1;
            self.miss_ttl
        } else {
            self.ttl
        };
        if self.cache.len() >= self.limits.entries && !self.cache.contains_key(&dst) {
            self.make_room(now);
        }
        self.cache.insert(dst, (hop, now + ttl));
        hop
    }

    /// One lookup from the budget, refilled at `lookups_per_sec`.
    fn spend(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.limits.lookups_per_sec);
        if let Some(t) = self.refilled {
            let add = now.saturating_duration_since(t).as_secs_f64() * rate;
            self.tokens = (self.tokens + add).min(rate);
        }
        self.refilled = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A full cache drops its expired and unresolved entries; if that frees
    /// nothing, one entry, whichever comes first.
    fn make_room(&mut self, now: Instant) {
        let before = self.cache.len();
        self.cache
            .retain(|_, (hop, exp)| *exp > now && !matches!(hop, NextHop::Unresolved));
        if self.cache.len() >= self.limits.entries
            && let Some(k) = self.cache.keys().next().copied()
        {
            self.cache.remove(&k);
        }
        self.stats.evicted += (before - self.cache.len()) as u64;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_of_destinations_keeps_the_cache_bounded_and_the_budget() {
        let limits = Limits {
            entries: 1024,
            lookups_per_sec: 1000,
        };
        let mut hops = NextHops::with_limits(limits).unwrap();
        let t0 = Instant::now();
        // 100,000 distinct destinations at once (none of them is sent to).
        for i in 0..100_000u32 {
            let _ = hops.resolve(Ipv4Addr::from(0x0a00_0000 + i), t0);
        }
        let s = hops.stats();
        assert!(hops.len() <= 1024, "{}", hops.len());
        assert_eq!(s.lookups, 1000, "the budget: {s:?}");
        assert_eq!(s.rate_limited, 100_000 - 1000, "{s:?}");
        // Half a second later, half the budget is back.
        let t1 = t0 + Duration::from_millis(500);
        for i in 0..100_000u32 {
            let _ = hops.resolve(Ipv4Addr::from(0x0b00_0000 + i), t1);
        }
        assert_eq!(hops.stats().lookups, 1500);
        assert!(hops.len() <= 1024);
        assert!(hops.stats().evicted > 0);
    }
}
