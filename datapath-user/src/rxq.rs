//! Datagrams the kernel dropped at a socket's full receive buffer. With
//! `SO_RXQ_OVFL` (socket(7)) a datagram received carries the socket's count
//! of such drops up to when it was queued (once there was one), so a burst
//! that overflowed the buffer is counted, at the next datagram that comes
//! through, instead of vanishing. Drops after the last datagram of a burst
//! are read directly ([`drops_now`], `SO_MEMINFO`) when counters are shown.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::RawFd,
    sync::atomic::{AtomicU64, Ordering},
};

/// Asks the kernel to report the socket's receive-buffer drops.
pub fn enable(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid option value of the size given, on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One datagram received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    /// The sender (IPv4; the port is 0 on a raw socket).
    pub from: Option<SocketAddr>,
    /// The socket's receive-buffer drops so far, if the kernel reported them
    /// (it does once there was at least one).
    pub drops: Option<u32>,
}

/// `recvmsg` of one datagram into `buf`, with its sender and drop count.
/// Honours the socket's timeout and blocking mode like `recv`.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    // SAFETY: zeroed sockaddr_storage and msghdr are valid values.
    let mut name: libc::sockaddr_storage = unsafe { zeroed() };
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>();
    // SAFETY: every pointer in msg refers to a live buffer of the length given.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut drops = None;
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros walk it within that length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                drops = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = (i32::from(name.ss_family) == libc::AF_INET).then(|| {
        // SAFETY: an AF_INET address is a sockaddr_in.
        let a = unsafe { *(&name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        ))
    });
    Ok(Received {
        len: n as usize,
        from,
        drops,
    })
}

/// The socket's receive-buffer drops so far (`SO_MEMINFO`'s
/// `SK_MEMINFO_DROPS`, the count `SO_RXQ_OVFL` reports), read now.
pub fn drops_now(fd: RawFd) -> io::Result<u32> {
    /// `SO_MEMINFO` (asm-generic/socket.h) and `SK_MEMINFO_DROPS`
    /// (linux/sock_diag.h).
    const SO_MEMINFO: libc::c_int = 55;
    const SK_MEMINFO_DROPS: usize = 8;
    let mut info = [0u32; 16];
    let mut len = size_of::<[u32; 16]>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` octets into `info`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < (SK_MEMINFO_DROPS + 1) * size_of::<u32>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_MEMINFO without the drop count",
        ));
    }
    Ok(info[SK_MEMINFO_DROPS])
}

/// Brings `counter` up to the socket's drops now (see [`drops_now`]).
pub fn sync(counter: &AtomicU64, fd: RawFd) {
    if let Ok(d) = drops_now(fd) {
        counter.fetch_max(u64::from(d), Ordering::Relaxed);
    }
}

/// Keeps the highest drop count a socket reported (the count only grows).
pub fn note(counter: &AtomicU64, r: &Received) {
    if let Some(d) = r.drops {
        counter.fetch_max(u64::from(d), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsRawFd, time::Duration};

    use super::*;

    #[test]
    fn a_burst_past_the_receive_buffer_is_counted_exactly() {
        let rx = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        rx.set_recv_buffer_size(4096).unwrap();
        rx.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let rx: UdpSocket = rx.into();
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        enable(rx.as_raw_fd()).unwrap();
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        const SENT: u32 = 500;
        for i in 0..SENT {
            tx.send_to(&i.to_be_bytes(), to).unwrap();
        }
        let mut buf = [0u8; 64];
        let (mut got, mut drops) = (0u32, 0u32);
        while let Ok(r) = recv(rx.as_raw_fd(), &mut buf) {
            assert_eq!(r.len, 4);
            assert_eq!(r.from, Some(tx.local_addr().unwrap()));
            got += 1;
            drops = drops.max(r.drops.unwrap_or(0));
        }
        // The drops are there to read before any other datagram comes.
        let now = drops_now(rx.as_raw_fd()).unwrap();
        assert_eq!(got + now, SENT, "every datagram received or counted");
        // A datagram carries the drops counted before it was queued: the
        // next one after the burst reports them.
        tx.send_to(&SENT.to_be_bytes(), to).unwrap();
        let r = recv(rx.as_raw_fd(), &mut buf).unwrap();
        got += 1;
        drops = drops.max(r.drops.unwrap_or(0));
        assert!(
            drops > 0,
            "a 4 KiB buffer holds far fewer than {SENT}: got {got}"
        );
        assert_eq!(got + drops, SENT + 1, "every datagram received or counted");
        let c = AtomicU64::new(0);
        note(
            &c,
            &Received {
                len: 0,
                from: None,
                drops: Some(drops),
            },
        );
        note(
            &c,
            &Received {
                len: 0,
                from: None,
                drops: None,
            },
        );
        assert_eq!(c.load(Ordering::Relaxed), u64::from(drops));
    }
}
