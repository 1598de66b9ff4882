//! TUN devices: the article's Tunnel0/Tunnel1 VTIs. Each tunnel gets one
//! (IFF_TUN, no packet-information header): the host's own traffic through
//! the tunnel (BGP, pings to the peers) and the slow path go through it, and
//! its carrier follows the tunnel's state, so routes over a down tunnel are
//! skipped by the kernel FIB.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::OpenOptionsExt,
    },
};

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETCARRIER: libc::c_ulong = 0x4004_54e2;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// An open TUN device. The device disappears when this is dropped.
#[derive(Debug)]
pub struct Tun {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates (or attaches to) TUN device `name` in the calling thread's
    /// network namespace, non-blocking.
    pub fn create(name: &str) -> io::Result<Self> {
        let cname = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
        let bytes = cname.as_bytes_with_nul();
        if bytes.len() > libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "interface name {name:?} is longer than {} characters",
                    libc::IFNAMSIZ - 1
                ),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the carrier: off makes the kernel treat routes through it as down.
    pub fn set_carrier(&self, up: bool) -> io::Result<()> {
        let on: libc::c_int = up.into();
        // SAFETY: TUNSETCARRIER reads one int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETCARRIER, &on) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one packet (non-blocking: `WouldBlock` when there is none).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet into the kernel, as if it arrived on the tunnel.
    pub fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        // SAFETY: reads pkt.len() bytes from pkt.
        let n = unsafe { libc::write(self.file.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> libc::c_int {
        self.file.as_raw_fd()
    }
}
