//! The DMZ filter: the XDP classifier on the Microsoft-peering interface, its
//! allowlist of source prefixes and its per-class counters.

use std::net::IpAddr;

use std::os::fd::RawFd;

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, XskMap, lpm_trie::Key},
    programs::{Xdp, XdpMode},
};
use ipnet::IpNet;
use xesp_common::{
    DmzCounter, EspSteer, MAX_QUEUES, MAX_TUNNELS, SteerCounter, map, prog, xsk_slot,
};

use crate::{DatapathError, load_object};

/// How to attach XDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpAttach {
    /// Driver (native) mode, falling back to generic (SKB) mode.
    #[default]
    Auto,
    Driver,
    Skb,
}

/// The XDP classifier attached to one DMZ interface. Detached when dropped.
pub struct DmzFilter {
    ebpf: Ebpf,
    iface: String,
    mode: XdpMode,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// One snapshot of the DMZ counters, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DmzCounters([u64; DmzCounter::COUNT as usize]);

impl DmzCounters {
    pub fn get(&self, c: DmzCounter) -> u64 {
        self.0[c as usize]
    }

    /// `(name, packets)` for every counter, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DmzCounter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }

    /// Packets dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.get(DmzCounter::DropNotAllowed) + self.get(DmzCounter::DropMalformed)
    }
}

impl DmzFilter {
    /// Loads the eBPF object and attaches the classifier to `iface`, in the
    /// calling thread's network namespace. The allowlist starts empty: every IP
    /// packet but IPv6 link-local is dropped until prefixes are allowed.
    pub fn attach(iface: &str, how: XdpAttach) -> Result<Self, DatapathError> {
        let mut ebpf = load_object()?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| log::debug!("eBPF logger not started: {e}"))
            .ok();
        let program: &mut Xdp = ebpf
            .program_mut(prog::XDP_DMZ)
            .ok_or(DatapathError::MissingProgram(prog::XDP_DMZ))?
            .try_into()
            .map_err(|e| DatapathError::program(prog::XDP_DMZ, e))?;
        program
            .load()
            .map_err(|e| DatapathError::program(prog::XDP_DMZ, e))?;
        let modes: &[XdpMode] = match how {
            XdpAttach::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttach::Driver => &[XdpMode::Driver],
            XdpAttach::Skb => &[XdpMode::Skb],
        };
        let mut last = None;
        for &mode in modes {
            match program.attach(iface, mode) {
                Ok(_) => {
                    log::info!("XDP {} attached to {iface} in {mode:?} mode", prog::XDP_DMZ);
                    return Ok(Self {
                        ebpf,
                        iface: iface.to_string(),
                        mode,
                        logger,
                    });
                }
                Err(e) => {
                    log::debug!("XDP {mode:?}-mode attach to {iface} failed: {e}");
                    last = Some(e);
                }
            }
        }
        Err(DatapathError::Attach {
            iface: iface.to_string(),
            source: last.map(Box::new),
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// `Driver` or `Skb`.
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// Lets traffic from `prefix` through.
    pub fn allow(&mut self, prefix: IpNet) -> Result<(), DatapathError> {
        let prefix = prefix.trunc();
        let res = match prefix.addr() {
            IpAddr::V4(a) => self.trie::<4>(map::ALLOW_V4)?.insert(
                &Key::new(u32::from(prefix.prefix_len()), a.octets()),
                1,
                0,
            ),
            IpAddr::V6(a) => self.trie::<16>(map::ALLOW_V6)?.insert(
                &Key::new(u32::from(prefix.prefix_len()), a.octets()),
                1,
                0,
            ),
        };
        res.map_err(|e| DatapathError::Allowlist { prefix, source: e })
    }

    /// Stops letting traffic from exactly `prefix` through.
    pub fn disallow(&mut self, prefix: IpNet) -> Result<(), DatapathError> {
        let prefix = prefix.trunc();
        let res = match prefix.addr() {
            IpAddr::V4(a) => self
                .trie::<4>(map::ALLOW_V4)?
                .remove(&Key::new(u32::from(prefix.prefix_len()), a.octets())),
            IpAddr::V6(a) => self
                .trie::<16>(map::ALLOW_V6)?
                .remove(&Key::new(u32::from(prefix.prefix_len()), a.octets())),
        };
        res.map_err(|e| DatapathError::Allowlist { prefix, source: e })
    }

    fn trie<const N: usize>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, [u8; N], u32>, DatapathError> {
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        LpmTrie::try_from(m).map_err(|e| DatapathError::map(name, e))
    }

    /// The counters now, summed over CPUs.
    pub fn counters(&self) -> Result<DmzCounters, DatapathError> {
        let mut out = DmzCounters::default();
        self.sum_per_cpu(map::DMZ_COUNTERS, &mut out.0)?;
        Ok(out)
    }

    /// What happened to the ESP the classifier saw, indexed by [`SteerCounter`].
    pub fn steer_counters(&self) -> Result<[u64; SteerCounter::COUNT as usize], DatapathError> {
        let mut out = [0; SteerCounter::COUNT as usize];
        self.sum_per_cpu(map::STEER_COUNTERS, &mut out)?;
        Ok(out)
    }

    fn sum_per_cpu(&self, name: &'static str, out: &mut [u64]) -> Result<(), DatapathError> {
        let m = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(m).map_err(|e| DatapathError::map(name, e))?;
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = arr
                .get(&(i as u32), 0)
                .map_err(|e| DatapathError::map(name, e))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(())
    }

    /// Sends ESP for inbound SPI `spi` to `tunnel`'s AF_XDP sockets.
    pub fn steer(&mut self, spi: u32, tunnel: u32) -> Result<(), DatapathError> {
        if tunnel >= MAX_TUNNELS {
            return Err(DatapathError::TunnelIndex(tunnel));
        }
        let name = map::ESP_STEER;
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut steer: HashMap<&mut MapData, u32, EspSteer> =
            HashMap::try_from(m).map_err(|e| DatapathError::map(name, e))?;
        steer
            .insert(spi, EspSteer { tunnel }, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Stops steering `spi` (its ESP then goes to the stack). Not an error if absent.
    pub fn unsteer(&mut self, spi: u32) -> Result<(), DatapathError> {
        let name = map::ESP_STEER;
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut steer: HashMap<&mut MapData, u32, EspSteer> =
            HashMap::try_from(m).map_err(|e| DatapathError::map(name, e))?;
        match steer.remove(&spi) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(DatapathError::map(name, e)),
        }
    }

    /// Registers the AF_XDP socket `fd` (bound to this interface's receive
    /// queue `queue`) as `tunnel`'s.
    pub fn bind_xsk(&mut self, queue: u32, tunnel: u32, fd: RawFd) -> Result<(), DatapathError> {
        if tunnel >= MAX_TUNNELS {
            return Err(DatapathError::TunnelIndex(tunnel));
        }
        if queue >= MAX_QUEUES {
            return Err(DatapathError::QueueIndex(queue));
        }
        let name = map::DMZ_XSKS;
        let m = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let mut xsks = XskMap::try_from(m).map_err(|e| DatapathError::map(name, e))?;
        xsks.set(xsk_slot(queue, tunnel), fd, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Writes what the programs logged (aya-log) through the `log` crate.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}
