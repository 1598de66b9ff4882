//! The benchmark's packets and how they are sent: pre-built, in batches of
//! [`BATCH`] with `sendmmsg(2)`, one thread per tunnel pinned to its own CPU
//! (`--sender sendmmsg`; the default sender, [`crate::afxdp`], puts the same
//! packets as whole frames on AF_XDP TX rings, with the same pacing).
//!
//! Every plaintext packet is IPv4 + UDP to [`bench::PORT`] whose payload
//! starts with [`bench::MAGIC`], so the sink can tell intact packets from
//! anything else. Tunnel `t`'s flows go to (or come from) its half of the
//! VNet: 10.2.0.0/25 for tunnel 0, 10.2.0.128/25 for tunnel 1.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    ops::Range,
    os::fd::AsRawFd,
    time::Instant,
};

use xesp_common::bench;

/// Datagrams per `sendmmsg` call.
pub const BATCH: usize = 64;
/// Flows per tunnel (distinct VNet addresses).
pub const FLOWS: u8 = 8;
/// IPv4 + UDP header octets.
pub const IP_UDP_HLEN: usize = 28;
/// The smallest inner packet the benchmark builds: headers and the magic.
pub const MIN_SIZE: usize = IP_UDP_HLEN + bench::MAGIC.len();

/// The VNet address of `flow` of `tunnel` (0 or 1).
pub fn vnet_host(tunnel: usize, flow: u8) -> Ipv4Addr {
    let base = if tunnel == 0 { 16 } else { 144 };
    Ipv4Addr::new(10, 2, 0, base + flow % FLOWS)
}

/// The route of `tunnel`'s half of the VNet, as `ip route` writes it.
pub fn vnet_half(tunnel: usize) -> &'static str {
    if tunnel == 0 {
        "10.2.0.0/25"
    } else {
        "10.2.0.128/25"
    }
}

/// The UDP payload of an inner packet of `size` octets (IPv4 total length):
/// the magic, then the packet number, then zeros.
pub fn payload(size: usize, n: u64) -> Vec<u8> {
    let mut p = vec![0u8; size.max(MIN_SIZE) - IP_UDP_HLEN];
    p[..8].copy_from_slice(&bench::MAGIC);
    if p.len() >= 16 {
        p[8..16].copy_from_slice(&n.to_be_bytes());
    }
    p
}

/// Whether a UDP payload is one of ours.
pub fn is_bench_payload(p: &[u8]) -> bool {
    p.starts_with(&bench::MAGIC)
}

/// A whole inner IPv4/UDP packet of `size` octets at `buf[at..]`; returns
/// its range. The UDP checksum is 0 (allowed over IPv4, RFC 768).
pub fn write_inner(
    buf: &mut [u8],
    at: usize,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    size: usize,
    n: u64,
) -> Range<usize> {
    let p = payload(size, n);
    let len = IP_UDP_HLEN + p.len();
    write_ipv4_udp(&mut buf[at..at + len], src, dst, &p);
    at..at + len
}

/// Writes into `h` (exactly [`IP_UDP_HLEN`] octets longer than `payload`,
/// at most 65,535 in all) an IPv4 header (DF, TTL 64, its checksum), a UDP
/// header from `src` to `dst` with a zero checksum, and `payload`.
pub fn write_ipv4_udp(h: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let len = h.len();
    h.fill(0);
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = 17;
    h[12..16].copy_from_slice(&src.ip().octets());
    h[16..20].copy_from_slice(&dst.ip().octets());
    let sum = ipv4_checksum(&h[..20]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h[20..22].copy_from_slice(&src.port().to_be_bytes());
    h[22..24].copy_from_slice(&dst.port().to_be_bytes());
    h[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    h[28..].copy_from_slice(payload);
}

/// The IPv4 header checksum (RFC 791) of a header whose checksum field is 0.
pub fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Datagrams ready to go: payloads and where each goes, for one thread.
#[derive(Debug, Default)]
pub struct Prepared {
    pub datagrams: Vec<(Vec<u8>, SocketAddrV4)>,
}

/// When the `n`th datagram is due at `rate` datagrams per second (none:
/// at once).
pub fn due(start: Instant, n: u64, rate: Option<f64>) -> Instant {
    match rate {
        Some(r) if r > 0.0 => start + std::time::Duration::from_secs_f64(n as f64 / r),
        _ => start,
    }
}

/// Waits until `t`: sleeps while it is far, spins the last stretch (a
/// sleep's timer slack would make the pace uneven).
pub fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > std::time::Duration::from_micros(300) {
            std::thread::sleep(left - std::time::Duration::from_micros(200));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sends every datagram once from `sock`, [`BATCH`] per system call, at
/// `rate` datagrams per second if given (paced per batch), else as fast as
/// the kernel takes them. Returns how many the kernel took.
pub fn send_all(sock: &UdpSocket, p: &Prepared, rate: Option<f64>) -> io::Result<u64> {
    let mut sent = 0u64;
    let start = Instant::now();
    for (i, chunk) in p.datagrams.chunks(BATCH).enumerate() {
        wait_until(due(start, (i * BATCH) as u64, rate));
        let mut addrs: Vec<libc::sockaddr_in> = chunk.iter().map(|(_, a)| sockaddr(*a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(d, _)| libc::iovec {
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|i| {
                // SAFETY: an all-zero msghdr is valid; the pointers set below
                // stay alive (addrs, iovs) until sendmmsg returns.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut off = 0;
        while off < msgs.len() {
            // SAFETY: msgs[off..] are initialised headers pointing at live buffers.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    msgs[off..].as_mut_ptr(),
                    (msgs.len() - off) as u32,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // A full queue on the way: these datagrams are lost, as on a wire.
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                        off += 1;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            off += n as usize;
            sent += n as u64;
        }
    }
    Ok(sent)
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Pins the calling thread to `cpu` (modulo the CPUs there are), so that
/// the interface's transmit queue chosen by XPS is that CPU's. Best effort:
/// an unpinned generator still sends.
pub fn pin_to_cpu(cpu: usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = datapath_user::mode::cpus::pin_current_thread(cpu % n);
}

/// Sends each thread's datagrams on its own CPU at the same time, each at
/// its share of `rate` (datagrams per second, all threads together) if
/// given; returns (datagrams sent, seconds from the first to the last send).
pub fn send_parallel(
    jobs: &[(&UdpSocket, &Prepared)],
    rate: Option<f64>,
) -> io::Result<(u64, f64)> {
    let share = rate.map(|r| r / jobs.len().max(1) as f64);
    let start = Instant::now();
    let results: Vec<io::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(cpu, (sock, p))| {
                s.spawn(move || {
                    pin_to_cpu(cpu);
                    send_all(sock, p, share)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("sender thread panicked")))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok((total, secs))
}

/// Nanoseconds per raw ring AES-256-GCM seal and open of the octets ESP
/// encrypts for an inner packet of `size` (packet, trailer, padding to 4),
/// with the 8-octet SPI and sequence number as AAD: the crypto limit a
/// device's CPU per packet is compared with.
pub fn raw_aead_ns(size: usize, iterations: u32) -> (f64, f64) {
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let len = size + 2 + (4 - (size + 2) % 4) % 4;
    let Ok(key) = UnboundKey::new(&AES_256_GCM, &[7u8; 32]) else {
        return (f64::NAN, f64::NAN);
    };
    let key = LessSafeKey::new(key);
    let mut buf = vec![0u8; len];
    let nonce = |n: u64| {
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_be_bytes());
        Nonce::assume_unique_for_key(b)
    };
    let iterations = iterations.max(1);
    let t = Instant::now();
    for n in 0..u64::from(iterations) {
        let _ = key.seal_in_place_separate_tag(nonce(n), Aad::from([0u8; 8]), &mut buf);
    }
    let seal = t.elapsed().as_nanos() as f64 / f64::from(iterations);
    let mut sealed = vec![0u8; len];
    if let Ok(tag) = key.seal_in_place_separate_tag(nonce(0), Aad::from([0u8; 8]), &mut sealed) {
        sealed.extend_from_slice(tag.as_ref());
    }
    let mut work = sealed.clone();
    let t = Instant::now();
    for _ in 0..iterations {
        work.copy_from_slice(&sealed);
        let _ = key.open_in_place(nonce(0), Aad::from([0u8; 8]), &mut work);
    }
    let open = t.elapsed().as_nanos() as f64 / f64::from(iterations);
    (seal, open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inner_packets_have_the_size_asked_and_a_valid_header() {
        for size in [64, 512, 1400] {
            let mut buf = vec![0u8; 2048];
            let r = write_inner(
                &mut buf,
                10,
                SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 16), 1000),
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), bench::PORT),
                size,
                7,
            );
            assert_eq!(r.len(), size);
            let h = &buf[r.clone()];
            assert_eq!(ipv4_checksum(&h[..20]), 0, "checksum verifies to 0");
            assert_eq!(u16::from_be_bytes([h[2], h[3]]) as usize, size);
            assert_eq!(u16::from_be_bytes([h[24], h[25]]) as usize, size - 20);
            assert!(is_bench_payload(&h[28..]));
            assert_eq!(payload(size, 7), h[28..].to_vec());
        }
        assert_eq!(
            payload(10, 0).len(),
            MIN_SIZE - IP_UDP_HLEN,
            "never smaller"
        );
        assert!(!is_bench_payload(b"xespBNC"));
    }

    #[test]
    fn tunnels_have_disjoint_halves_of_the_vnet() {
        for f in 0..FLOWS {
            assert!(vnet_host(0, f).octets()[3] < 128);
            assert!(vnet_host(1, f).octets()[3] >= 128);
        }
        assert_ne!(vnet_half(0), vnet_half(1));
    }

    #[test]
    fn pacing_spaces_batches_by_the_rate() {
        let t0 = Instant::now();
        assert_eq!(due(t0, 500, None), t0, "unpaced: at once");
        assert_eq!(due(t0, 0, Some(1000.0)), t0);
        assert_eq!(
            due(t0, 500, Some(1000.0)) - t0,
            std::time::Duration::from_millis(500)
        );
        // 5 batches at 6400/s: the last is due after 4 * 64 / 6400 s = 40 ms.
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = Prepared {
            datagrams: (0..5 * BATCH as u64)
                .map(|n| (payload(64, n), to))
                .collect(),
        };
        let t = Instant::now();
        assert_eq!(send_all(&tx, &p, Some(6400.0)).unwrap(), 5 * BATCH as u64);
        assert!(t.elapsed() >= std::time::Duration::from_millis(40));
    }

    #[test]
    fn sendmmsg_delivers_every_datagram_on_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = match rx.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = Prepared {
            datagrams: (0..150).map(|n| (payload(64, n), to)).collect(),
        };
        assert_eq!(send_all(&tx, &p, None).unwrap(), 150);
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 128];
        for n in 0..150u64 {
            let len = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], payload(64, n).as_slice());
        }
    }
}
