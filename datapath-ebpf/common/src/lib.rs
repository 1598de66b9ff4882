//! What xesp's eBPF programs and user space agree on: map names, counter
//! indices, and the `#[repr(C)]` layout of map keys and values. Explicit
//! padding everywhere: the verifier and `aya::Pod` both need every byte defined.
#![no_std]

/// Map names, as the eBPF object declares them.
pub mod map {
    /// `PerCpuArray<u64>` of DMZ packet counters, indexed by [`crate::DmzCounter`].
    pub const DMZ_COUNTERS: &str = "DMZ_COUNTERS";
    /// `LpmTrie<[u8; 4], u32>`: IPv4 source prefixes allowed on the DMZ side.
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// `LpmTrie<[u8; 16], u32>`: IPv6 source prefixes allowed on the DMZ side.
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// `Array<u32>` of one entry: the DMZ filter's [`crate::dmz_flags`].
    pub const DMZ_CONFIG: &str = "DMZ_CONFIG";
    /// `HashMap<u32, EspSteer>`: inbound SPI (host order) to its tunnel; the IKE
    /// controller fills it as it installs inbound CHILD_SAs.
    pub const ESP_STEER: &str = "ESP_STEER";
    /// `XskMap`: AF_XDP sockets receiving ESP, at [`crate::xsk_slot`]`(queue, tunnel)`.
    pub const DMZ_XSKS: &str = "DMZ_XSKS";
    /// `PerCpuArray<u64>` indexed by [`crate::SteerCounter`].
    pub const STEER_COUNTERS: &str = "STEER_COUNTERS";
    /// `HashMap<u32, u32>`: ifindex of a tunnel's TUN device to the tunnel index.
    pub const TUNNEL_IFINDEX: &str = "TUNNEL_IFINDEX";
    /// `Array<u32>` of [`crate::MAX_TUNNELS`]: 1 while the tunnel's SAs are up.
    pub const TUNNEL_LIVE: &str = "TUNNEL_LIVE";
    /// `XskMap`: AF_XDP sockets receiving LAN traffic for a tunnel, at [`crate::xsk_slot`].
    pub const LAN_XSKS: &str = "LAN_XSKS";
    /// `PerCpuArray<u64>` indexed by [`crate::LanCounter`].
    pub const LAN_COUNTERS: &str = "LAN_COUNTERS";
    /// `PerCpuArray<u64>` indexed by [`crate::tunnel_counter`].
    pub const TUNNEL_COUNTERS: &str = "TUNNEL_COUNTERS";
    /// `PerCpuArray<u64>` of the benchmark sink, indexed by [`crate::SinkCounter`].
    pub const SINK_COUNTERS: &str = "SINK_COUNTERS";
    /// `HashMap<u32, u32>`: SPI (host order) the sink expects to its tunnel index.
    pub const SINK_SPI: &str = "SINK_SPI";
}

/// Most tunnels one device runs (two for an active-active Azure gateway).
pub const MAX_TUNNELS: u32 = 8;
/// Most receive queues per interface with AF_XDP sockets.
pub const MAX_QUEUES: u32 = 64;
/// Entries of an XSK map: one per (receive queue, tunnel).
pub const XSK_SLOTS: u32 = MAX_QUEUES * MAX_TUNNELS;
/// Inbound SAs the steering map holds (two per tunnel, more while rekeying).
pub const STEER_MAX_ENTRIES: u32 = 1024;

/// The XSK map slot of the socket for `tunnel` on receive queue `queue`: ESP
/// of one tunnel lands in its own AF_XDP ring on every queue.
pub const fn xsk_slot(queue: u32, tunnel: u32) -> u32 {
    queue * MAX_TUNNELS + tunnel
}

/// Value of [`map::ESP_STEER`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EspSteer {
    /// Tunnel index, below [`MAX_TUNNELS`].
    pub tunnel: u32,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), one u32, no padding: every bit pattern is valid.
unsafe impl aya::Pod for EspSteer {}

/// What happened to ESP the DMZ program classified; index into `STEER_COUNTERS`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerCounter {
    /// Sent to the tunnel's AF_XDP socket.
    Redirected = 0,
    /// No inbound SA with this SPI in the steering map: passed to the stack.
    NoSa = 1,
    /// The SA is known but no socket is bound at its slot: passed to the stack.
    NoSocket = 2,
    /// VLAN-tagged (802.1Q/802.1ad): passed to the stack, whose VLAN device
    /// hands it to the socket path; the workers take untagged frames only.
    Tagged = 3,
}

impl SteerCounter {
    pub const COUNT: u32 = 4;
    pub const ALL: [SteerCounter; Self::COUNT as usize] =
        [Self::Redirected, Self::NoSa, Self::NoSocket, Self::Tagged];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Redirected => "redirected",
            Self::NoSa => "no_sa",
            Self::NoSocket => "no_socket",
            Self::Tagged => "tagged",
        }
    }
}

/// Program names in the eBPF object.
pub mod prog {
    /// XDP on the DMZ (Microsoft-peering) interface.
    pub const XDP_DMZ: &str = "xdp_dmz";
    /// XDP on the LAN interfaces.
    pub const XDP_LAN: &str = "xdp_lan";
    /// XDP counting and dropping what `cargo xtask bench` sends through a device.
    pub const XDP_SINK: &str = "xdp_sink";
}

/// Capacity of each allowlist trie (Azure regional prefix lists are a few hundred).
pub const ALLOW_MAX_ENTRIES: u32 = 16384;

/// Bits of entry 0 of [`map::DMZ_CONFIG`]; all off by default.
pub mod dmz_flags {
    /// Pass frames the DMZ filter cannot classify (ethertypes other than
    /// IPv4, IPv6 and ARP; more than two VLAN tags), counted as
    /// [`crate::DmzCounter::PassUnclassified`], instead of dropping them.
    pub const PASS_UNCLASSIFIED: u32 = 1;
}

/// How the DMZ XDP program classified a packet; index into `DMZ_COUNTERS`.
/// Every frame lands in exactly one of them, whatever its VLAN tags.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmzCounter {
    /// IKE on UDP 500: passed to the stack (the IKE daemon).
    Ike = 0,
    /// IKE on UDP 4500 behind the 4-octet non-ESP marker (RFC 3948 §2.2): passed.
    NattIke = 1,
    /// NAT-keepalive (one 0xFF octet on UDP 4500, RFC 3948 §2.3): passed.
    NattKeepalive = 2,
    /// ESP in UDP 4500 (RFC 3948 §2.1, SPI != 0).
    NattEsp = 3,
    /// ESP as IP protocol 50 (RFC 4303).
    Esp = 4,
    /// Other traffic from an allowed Microsoft-peering prefix: passed.
    Allowed = 5,
    /// Dropped: the source address is in no allowed prefix.
    DropNotAllowed = 6,
    /// Dropped: truncated or inconsistent Ethernet/VLAN/IP/UDP/ESP header.
    DropMalformed = 7,
    /// ARP (RFC 826): passed, the stack resolves its neighbours with it.
    Arp = 8,
    /// An IPv4 fragment (MF set or offset != 0, RFC 791) or an IPv6 packet
    /// with a Fragment header (RFC 8200 §4.5) from an allowed source: passed
    /// to the stack, which reassembles it, never steered to a worker.
    Fragment = 9,
    /// IPv6 neighbour discovery (ICMPv6 133-137 with hop limit 255, RFC 4861)
    /// from a link-local or unspecified source: passed.
    Ipv6Nd = 10,
    /// Dropped: anything else from an IPv6 link-local or unspecified source.
    DropLinkLocal = 11,
    /// Dropped: a frame the filter cannot classify (an ethertype other than
    /// IPv4, IPv6 and ARP, or more than two VLAN tags).
    DropUnclassified = 12,
    /// Such a frame, passed because [`dmz_flags::PASS_UNCLASSIFIED`] is set.
    PassUnclassified = 13,
}

impl DmzCounter {
    pub const COUNT: u32 = 14;
    pub const ALL: [DmzCounter; Self::COUNT as usize] = [
        Self::Ike,
        Self::NattIke,
        Self::NattKeepalive,
        Self::NattEsp,
        Self::Esp,
        Self::Allowed,
        Self::DropNotAllowed,
        Self::DropMalformed,
        Self::Arp,
        Self::Fragment,
        Self::Ipv6Nd,
        Self::DropLinkLocal,
        Self::DropUnclassified,
        Self::PassUnclassified,
    ];

    /// Stable snake_case name for status output and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ike => "ike",
            Self::NattIke => "natt_ike",
            Self::NattKeepalive => "natt_keepalive",
            Self::NattEsp => "natt_esp",
            Self::Esp => "esp",
            Self::Allowed => "allowed",
            Self::DropNotAllowed => "drop_not_allowed",
            Self::DropMalformed => "drop_malformed",
            Self::Arp => "arp",
            Self::Fragment => "fragment",
            Self::Ipv6Nd => "ipv6_nd",
            Self::DropLinkLocal => "drop_link_local",
            Self::DropUnclassified => "drop_unclassified",
            Self::PassUnclassified => "pass_unclassified",
        }
    }

    /// Whether the filter drops what this counter counts.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::DropNotAllowed
                | Self::DropMalformed
                | Self::DropLinkLocal
                | Self::DropUnclassified
        )
    }
}

/// What the LAN XDP program did with a packet; index into `LAN_COUNTERS`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LanCounter {
    /// Routed (by the kernel FIB) into a live tunnel: sent to its AF_XDP socket.
    ToTunnel = 0,
    /// The FIB chose a tunnel that is down; moved to a live one (counted in ToTunnel too).
    Failover = 1,
    /// Routed into a tunnel, but none is up: passed to the stack.
    NoLiveTunnel = 2,
    /// The tunnel has no AF_XDP socket on this queue: passed to the stack (slow path).
    NoSocket = 3,
    /// Not routed into a tunnel (local, other interfaces, no route): passed.
    NotTunneled = 4,
    /// Time to live would expire here: passed, so the stack answers with ICMP.
    TtlExpired = 5,
    /// Not IPv4: passed.
    NotIpv4 = 6,
    /// Truncated IPv4 header: dropped.
    DropMalformed = 7,
}

impl LanCounter {
    pub const COUNT: u32 = 8;
    pub const ALL: [LanCounter; Self::COUNT as usize] = [
        Self::ToTunnel,
        Self::Failover,
        Self::NoLiveTunnel,
        Self::NoSocket,
        Self::NotTunneled,
        Self::TtlExpired,
        Self::NotIpv4,
        Self::DropMalformed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::ToTunnel => "to_tunnel",
            Self::Failover => "failover",
            Self::NoLiveTunnel => "no_live_tunnel",
            Self::NoSocket => "no_socket",
            Self::NotTunneled => "not_tunneled",
            Self::TtlExpired => "ttl_expired",
            Self::NotIpv4 => "not_ipv4",
            Self::DropMalformed => "drop_malformed",
        }
    }
}

/// Per-tunnel traffic the XDP programs steered; see [`tunnel_counter`].
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelCounter {
    /// LAN packets sent to the tunnel's encryption socket.
    LanPackets = 0,
    LanBytes = 1,
    /// ESP packets sent to the tunnel's decryption socket.
    EspPackets = 2,
    EspBytes = 3,
}

impl TunnelCounter {
    pub const COUNT: u32 = 4;
}

/// Index in `TUNNEL_COUNTERS` of `counter` for `tunnel`.
pub const fn tunnel_counter(tunnel: u32, counter: TunnelCounter) -> u32 {
    tunnel * TunnelCounter::COUNT + counter as u32
}

/// Protocol numbers and ports the classifier matches.
pub mod wire {
    pub const ETH_HLEN: usize = 14;
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86DD;
    pub const ETH_P_ARP: u16 = 0x0806;
    /// IEEE 802.1Q: customer VLAN tag (C-TAG) TPID.
    pub const ETH_P_8021Q: u16 = 0x8100;
    /// IEEE 802.1ad (802.1Q §9.5): service VLAN tag (S-TAG) TPID, the outer tag of QinQ.
    pub const ETH_P_8021AD: u16 = 0x88A8;
    /// Octets of one VLAN tag (TPID + TCI).
    pub const VLAN_HLEN: usize = 4;
    /// RFC 8200 §4: IPv6 extension headers the DMZ filter walks.
    pub const IPPROTO_HOPOPTS: u8 = 0;
    pub const IPPROTO_ROUTING: u8 = 43;
    pub const IPPROTO_FRAGMENT: u8 = 44;
    pub const IPPROTO_DSTOPTS: u8 = 60;
    pub const IPPROTO_ICMPV6: u8 = 58;
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
    pub const AF_INET: u8 = 2;
    pub const IPPROTO_ESP: u8 = 50;
    /// RFC 7296 §2: IKE's port.
    pub const IKE_PORT: u16 = 500;
    /// RFC 3948: IKE and ESP after NAT-T floats.
    pub const NATT_PORT: u16 = 4500;
}

/// The benchmark's traffic (`cargo xtask bench`): UDP to the discard port
/// whose payload starts with [`bench::MAGIC`], carried in ESP through the
/// device under test.
pub mod bench {
    /// Destination port of the plaintext packets (discard, RFC 863).
    pub const PORT: u16 = 9;
    /// The first octets of every plaintext payload.
    pub const MAGIC: [u8; 8] = *b"xespBNCH";
    /// The sink passes ESP whose sequence number is a multiple of this to the
    /// stack, where the benchmark's peer decrypts and checks it.
    pub const SAMPLE_EVERY: u32 = 1024;
}

/// What the benchmark sink saw; index into `SINK_COUNTERS`. Counted packets
/// are dropped, except the ESP samples and everything else, which pass.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkCounter {
    /// ESP in UDP 4500 with an expected SPI, per tunnel (tunnels 0 and 1).
    EspTunnel0 = 0,
    EspTunnel1 = 1,
    /// Outer IPv4 octets of that ESP.
    EspBytes = 2,
    /// ESP in UDP 4500 whose SPI is not expected.
    EspUnknownSpi = 3,
    /// Expected ESP passed to the stack to be decrypted and checked.
    EspSampled = 4,
    /// Plaintext benchmark packets (UDP to [`bench::PORT`]) with the magic.
    PlainValid = 5,
    /// Their IPv4 octets.
    PlainBytes = 6,
    /// UDP to [`bench::PORT`] without the magic (corrupted on the way).
    PlainInvalid = 7,
    /// Anything else: passed.
    Other = 8,
}

impl SinkCounter {
    pub const COUNT: u32 = 9;
    pub const ALL: [SinkCounter; Self::COUNT as usize] = [
        Self::EspTunnel0,
        Self::EspTunnel1,
        Self::EspBytes,
        Self::EspUnknownSpi,
        Self::EspSampled,
        Self::PlainValid,
        Self::PlainBytes,
        Self::PlainInvalid,
        Self::Other,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::EspTunnel0 => "esp_tunnel0",
            Self::EspTunnel1 => "esp_tunnel1",
            Self::EspBytes => "esp_bytes",
            Self::EspUnknownSpi => "esp_unknown_spi",
            Self::EspSampled => "esp_sampled",
            Self::PlainValid => "plain_valid",
            Self::PlainBytes => "plain_bytes",
            Self::PlainInvalid => "plain_invalid",
            Self::Other => "other",
        }
    }
}
