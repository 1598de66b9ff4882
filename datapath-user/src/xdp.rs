//! The XDP programs and their maps, loaded once per device:
//!
//! * `xdp_dmz` on the Microsoft-peering interface: the allowlist of source
//!   prefixes, per-class counters, and ESP steered by SPI to tunnel sockets;
//! * `xdp_lan` on the LAN interfaces: traffic the FIB routes into a live
//!   tunnel, steered to that tunnel's sockets.

use std::net::IpAddr;

use std::os::fd::RawFd;

use aya::{
    Ebpf, TestRun, TestRunOptions,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, XskMap, lpm_trie::Key},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use ipnet::IpNet;
use xesp_common::{
    DmzCounter, EspSteer, LanCounter, MAX_QUEUES, MAX_TUNNELS, SinkCounter, SteerCounter,
    TunnelCounter, map, prog, tunnel_counter, xsk_slot,
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

/// One program attached to one interface.
struct Attachment {
    iface: String,
    program: &'static str,
    mode: XdpMode,
    link: XdpLinkId,
}

/// The loaded programs and their maps. Programs are detached when dropped.
pub struct XdpPrograms {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
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
        DmzCounter::ALL
            .iter()
            .filter(|c| c.is_drop())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Packets counted in any class.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl XdpPrograms {
    /// Loads the eBPF object (no program attached yet).
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = load_object()?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| log::debug!("eBPF logger not started: {e}"))
            .ok();
        Ok(Self {
            ebpf,
            attached: Vec::new(),
            logger,
        })
    }

    /// Attaches the DMZ classifier to `iface`, in the calling thread's network
    /// namespace. The allowlist starts empty: every IP packet but IPv6
    /// link-local is dropped until prefixes are allowed.
    pub fn attach_dmz(&mut self, iface: &str, how: XdpAttach) -> Result<XdpMode, DatapathError> {
        self.attach(prog::XDP_DMZ, iface, how)
    }

    /// Attaches the LAN steering program to `iface` (calling thread's namespace).
    pub fn attach_lan(&mut self, iface: &str, how: XdpAttach) -> Result<XdpMode, DatapathError> {
        self.attach(prog::XDP_LAN, iface, how)
    }

    /// Attaches the benchmark sink to `iface` (calling thread's namespace):
    /// it counts and drops what `cargo xtask bench` sends through a device.
    pub fn attach_sink(&mut self, iface: &str, how: XdpAttach) -> Result<XdpMode, DatapathError> {
        self.attach(prog::XDP_SINK, iface, how)
    }

    /// The sink counts ESP with `spi` as `tunnel`'s (0 or 1).
    pub fn sink_expect_spi(&mut self, spi: u32, tunnel: u32) -> Result<(), DatapathError> {
        let name = map::SINK_SPI;
        let mut m: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        m.insert(spi, tunnel.min(1), 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// The sink's counters, indexed by [`SinkCounter`].
    pub fn sink_counters(&self) -> Result<[u64; SinkCounter::COUNT as usize], DatapathError> {
        let mut out = [0; SinkCounter::COUNT as usize];
        self.sum_per_cpu(map::SINK_COUNTERS, &mut out)?;
        Ok(out)
    }

    fn attach(
        &mut self,
        name: &'static str,
        iface: &str,
        how: XdpAttach,
    ) -> Result<XdpMode, DatapathError> {
        let program = self.loaded(name)?;
        let modes: &[XdpMode] = match how {
            XdpAttach::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpAttach::Driver => &[XdpMode::Driver],
            XdpAttach::Skb => &[XdpMode::Skb],
        };
        let mut last = None;
        for &mode in modes {
            match program.attach(iface, mode) {
                Ok(link) => {
                    log::info!("XDP {name} attached to {iface} in {mode:?} mode");
                    self.attached.push(Attachment {
                        iface: iface.to_string(),
                        program: name,
                        mode,
                        link,
                    });
                    return Ok(mode);
                }
                Err(e) => {
                    log::debug!("XDP {name} {mode:?}-mode attach to {iface} failed: {e}");
                    last = Some(e);
                }
            }
        }
        Err(DatapathError::Attach {
            iface: iface.to_string(),
            source: last.map(Box::new),
        })
    }

    /// XDP program `name`, loaded into the kernel on first use.
    fn loaded(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|e| DatapathError::program(name, e))?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|e| DatapathError::program(name, e))?;
        }
        Ok(program)
    }

    /// `(interface, program, mode)` of every attachment.
    pub fn attached(&self) -> impl Iterator<Item = (&str, &'static str, XdpMode)> {
        self.attached
            .iter()
            .map(|a| (a.iface.as_str(), a.program, a.mode))
    }

    /// Detaches every program from `iface`, before attaching them again to
    /// an interface of that name that was re-created or changed. A link the
    /// kernel already dropped with its interface is only forgotten.
    pub fn detach(&mut self, iface: &str) {
        let (gone, kept) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(|a| a.iface == iface);
        self.attached = kept;
        for a in gone {
            let Attachment { program, link, .. } = a;
            let detached = self.loaded(program).and_then(|p| {
                p.detach(link)
                    .map_err(|e| DatapathError::program(program, e))
            });
            if let Err(e) = detached {
                log::debug!("XDP {program} on {iface}: {e}");
            }
        }
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))
    }

    /// Sets the DMZ filter's [`xesp_common::dmz_flags`] (all off at load).
    pub fn set_dmz_flags(&mut self, flags: u32) -> Result<(), DatapathError> {
        let name = map::DMZ_CONFIG;
        let mut a: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        a.set(0, flags, 0).map_err(|e| DatapathError::map(name, e))
    }

    /// Runs program `name` (loading it if needed, attached or not) once on
    /// `frame` with `BPF_PROG_TEST_RUN`, in the calling thread's network
    /// namespace, and returns its XDP action. The maps and counters are the
    /// live ones: a dry run counts like a received frame.
    pub fn test_run(&mut self, name: &'static str, frame: &[u8]) -> Result<u32, DatapathError> {
        let program = self.loaded(name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        program
            .test_run(opts)
            .map(|r| r.return_value)
            .map_err(|e| DatapathError::program(name, e))
    }

    /// Lets traffic from `prefix` through the DMZ classifier.
    pub fn allow(&mut self, prefix: IpNet) -> Result<(), DatapathError> {
        let prefix = prefix.trunc();
        let len = u32::from(prefix.prefix_len());
        let res = match prefix.addr() {
            IpAddr::V4(a) => {
                self.trie::<4>(map::ALLOW_V4)?
                    .insert(&Key::new(len, a.octets()), 1, 0)
            }
            IpAddr::V6(a) => {
                self.trie::<16>(map::ALLOW_V6)?
                    .insert(&Key::new(len, a.octets()), 1, 0)
            }
        };
        res.map_err(|e| DatapathError::Allowlist { prefix, source: e })
    }

    /// Stops letting traffic from exactly `prefix` through.
    pub fn disallow(&mut self, prefix: IpNet) -> Result<(), DatapathError> {
        let prefix = prefix.trunc();
        let len = u32::from(prefix.prefix_len());
        let res = match prefix.addr() {
            IpAddr::V4(a) => self
                .trie::<4>(map::ALLOW_V4)?
                .remove(&Key::new(len, a.octets())),
            IpAddr::V6(a) => self
                .trie::<16>(map::ALLOW_V6)?
                .remove(&Key::new(len, a.octets())),
        };
        res.map_err(|e| DatapathError::Allowlist { prefix, source: e })
    }

    fn trie<const N: usize>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, [u8; N], u32>, DatapathError> {
        LpmTrie::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))
    }

    /// The DMZ classifier's counters now, summed over CPUs.
    pub fn dmz_counters(&self) -> Result<DmzCounters, DatapathError> {
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

    /// The LAN program's counters, indexed by [`LanCounter`].
    pub fn lan_counters(&self) -> Result<[u64; LanCounter::COUNT as usize], DatapathError> {
        let mut out = [0; LanCounter::COUNT as usize];
        self.sum_per_cpu(map::LAN_COUNTERS, &mut out)?;
        Ok(out)
    }

    /// The traffic steered to `tunnel`'s sockets.
    pub fn tunnel_counters(&self, tunnel: u32) -> Result<TunnelTraffic, DatapathError> {
        check_tunnel(tunnel)?;
        let mut all = [0; (MAX_TUNNELS * TunnelCounter::COUNT) as usize];
        self.sum_per_cpu(map::TUNNEL_COUNTERS, &mut all)?;
        let at = |c| all[tunnel_counter(tunnel, c) as usize];
        Ok(TunnelTraffic {
            lan_packets: at(TunnelCounter::LanPackets),
            lan_bytes: at(TunnelCounter::LanBytes),
            esp_packets: at(TunnelCounter::EspPackets),
            esp_bytes: at(TunnelCounter::EspBytes),
        })
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

    fn steer_map(&mut self) -> Result<HashMap<&mut MapData, u32, EspSteer>, DatapathError> {
        let name = map::ESP_STEER;
        HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))
    }

    /// Sends ESP for inbound SPI `spi` to `tunnel`'s AF_XDP sockets.
    pub fn steer(&mut self, spi: u32, tunnel: u32) -> Result<(), DatapathError> {
        check_tunnel(tunnel)?;
        self.steer_map()?
            .insert(spi, EspSteer { tunnel }, 0)
            .map_err(|e| DatapathError::map(map::ESP_STEER, e))
    }

    /// Stops steering `spi` (its ESP then goes to the stack). Not an error if absent.
    pub fn unsteer(&mut self, spi: u32) -> Result<(), DatapathError> {
        match self.steer_map()?.remove(&spi) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(DatapathError::map(map::ESP_STEER, e)),
        }
    }

    /// Registers the AF_XDP socket `fd`, bound to receive queue `queue` of the
    /// DMZ interface, as `tunnel`'s decryption socket.
    pub fn bind_dmz_xsk(
        &mut self,
        queue: u32,
        tunnel: u32,
        fd: RawFd,
    ) -> Result<(), DatapathError> {
        self.bind_xsk(map::DMZ_XSKS, queue, tunnel, fd)
    }

    /// Registers the AF_XDP socket `fd`, bound to receive queue `queue` of a
    /// LAN interface, as `tunnel`'s encryption socket.
    pub fn bind_lan_xsk(
        &mut self,
        queue: u32,
        tunnel: u32,
        fd: RawFd,
    ) -> Result<(), DatapathError> {
        self.bind_xsk(map::LAN_XSKS, queue, tunnel, fd)
    }

    /// Takes queue `queue`'s AF_XDP sockets of `tunnel` (DMZ and LAN) out
    /// of the maps: from then on the programs pass that traffic to the
    /// kernel (counted as `no_socket`), as they do before a worker binds.
    pub fn unbind_xsks(&mut self, queue: u32, tunnel: u32) -> Result<(), DatapathError> {
        check_tunnel(tunnel)?;
        if queue >= MAX_QUEUES {
            return Err(DatapathError::QueueIndex(queue));
        }
        for name in [map::DMZ_XSKS, map::LAN_XSKS] {
            let mut xsks =
                XskMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
            xsks.unset(xsk_slot(queue, tunnel))
                .map_err(|e| DatapathError::map(name, e))?;
        }
        Ok(())
    }

    fn bind_xsk(
        &mut self,
        name: &'static str,
        queue: u32,
        tunnel: u32,
        fd: RawFd,
    ) -> Result<(), DatapathError> {
        check_tunnel(tunnel)?;
        if queue >= MAX_QUEUES {
            return Err(DatapathError::QueueIndex(queue));
        }
        let mut xsks =
            XskMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        xsks.set(xsk_slot(queue, tunnel), fd, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Declares the TUN device `ifindex` as `tunnel`'s: what the FIB routes
    /// through it is steered to that tunnel.
    pub fn set_tunnel_ifindex(&mut self, ifindex: u32, tunnel: u32) -> Result<(), DatapathError> {
        check_tunnel(tunnel)?;
        let name = map::TUNNEL_IFINDEX;
        let mut h: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        h.insert(ifindex, tunnel, 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Marks `tunnel` up (its SAs are installed) or down.
    pub fn set_tunnel_live(&mut self, tunnel: u32, live: bool) -> Result<(), DatapathError> {
        check_tunnel(tunnel)?;
        let name = map::TUNNEL_LIVE;
        let mut a: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(name)?).map_err(|e| DatapathError::map(name, e))?;
        a.set(tunnel, u32::from(live), 0)
            .map_err(|e| DatapathError::map(name, e))
    }

    /// Writes what the programs logged (aya-log) through the `log` crate.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }
}

/// Traffic the XDP programs steered to one tunnel's sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelTraffic {
    pub lan_packets: u64,
    pub lan_bytes: u64,
    pub esp_packets: u64,
    pub esp_bytes: u64,
}

fn check_tunnel(tunnel: u32) -> Result<(), DatapathError> {
    if tunnel < MAX_TUNNELS {
        Ok(())
    } else {
        Err(DatapathError::TunnelIndex(tunnel))
    }
}
