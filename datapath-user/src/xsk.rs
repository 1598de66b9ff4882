//! AF_XDP plumbing on xdpilone: one [`Port`] = one UMEM owned by one worker
//! thread, with the device queues (fill/completion rings) and sockets
//! (RX/TX rings) bound to it. Frames move between interfaces without copies:
//! a frame received on one socket can be rewritten in place and queued for
//! transmission on another socket of the same port.
//!
//! Frame ownership is simple and checked: a frame is either in the port's
//! free list, or lent to the kernel (fill ring, TX ring), or being handled
//! inside a [`Port::recv`] callback. Nothing is allocated per packet.

use std::{ffi::CString, io, num::NonZeroU32, os::fd::RawFd, ptr::NonNull};

use xdpilone::{
    DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, xdp::XdpDesc,
};

/// Errors setting up AF_XDP.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("mapping {bytes} bytes of UMEM: {source}")]
    Mmap { bytes: usize, source: io::Error },
    #[error("AF_XDP {step} on {iface} queue {queue}: errno {errno}")]
    Setup {
        step: &'static str,
        iface: String,
        queue: u32,
        errno: i32,
    },
    #[error("AF_XDP UMEM registration: errno {0}")]
    Umem(i32),
    #[error("interface name {0:?} is not valid")]
    BadName(String),
}

/// Sizes of a port.
#[derive(Debug, Clone, Copy)]
pub struct PortConfig {
    /// Frames in the UMEM.
    pub frames: u32,
    /// Bytes per frame (a power of two, 2048 or 4096).
    pub frame_size: u32,
    /// Entries of each fill, completion, RX and TX ring (a power of two).
    pub ring_size: u32,
}

impl Default for PortConfig {
    fn default() -> Self {
        Self {
            frames: 8192,
            frame_size: 4096,
            ring_size: 2048,
        }
    }
}

/// Index of a socket within its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SockId(pub usize);

/// What to do with a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Give the frame back to the free list.
    Drop,
    /// Transmit `len` bytes at `offset` within the frame on socket `on`.
    Transmit { on: SockId, offset: u32, len: u32 },
}

/// A received packet inside its frame. The whole frame is writable, so the
/// packet can grow into its headroom (the kernel leaves at least 256 bytes)
/// and tailroom.
pub struct Frame<'a> {
    /// The whole frame.
    pub buf: &'a mut [u8],
    /// Where the packet starts in `buf`.
    pub offset: usize,
    /// Packet length.
    pub len: usize,
}

impl Frame<'_> {
    pub fn packet(&self) -> &[u8] {
        &self.buf[self.offset..self.offset + self.len]
    }
}

struct Area {
    ptr: NonNull<u8>,
    len: usize,
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from a successful mmap; the UMEM using it is dropped first.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the area is plain memory; access is governed by Port's ownership rules.
unsafe impl Send for Area {}

struct Queue {
    ifindex: u32,
    queue_id: u32,
    dq: DeviceQueue,
    /// Frames currently in this queue's fill ring.
    in_fill: u32,
}

struct Sock {
    queue: usize,
    fd: RawFd,
    rx: Option<RingRx>,
    tx: Option<RingTx>,
    /// TX descriptors queued but not yet committed.
    tx_batch: Vec<XdpDesc>,
}

/// Counters of one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx: u64,
    pub tx: u64,
    /// Frames dropped because a TX ring was full.
    pub tx_ring_full: u64,
    /// Frames the kernel reported done with.
    pub completed: u64,
    /// `sendto()` kicks of the TX rings, and wakeups of the fill rings
    /// (system calls).
    pub tx_kicks: u64,
    pub fill_wakeups: u64,
}

/// What the kernel dropped on a port's sockets (`XDP_STATISTICS`), summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelDrops {
    /// Packets for an RX ring that was full (the worker fell behind).
    pub rx_ring_full: u64,
    /// Packets the kernel dropped for other reasons, mostly for want of a
    /// free frame.
    pub rx_dropped: u64,
    /// Times the kernel found a device queue's fill ring empty.
    pub fill_ring_empty: u64,
    /// TX descriptors the kernel refused (outside the UMEM, too long).
    pub tx_invalid: u64,
}

/// `struct xdp_statistics` (linux/if_xdp.h, Linux 5.9 and later).
#[repr(C)]
#[derive(Default)]
struct XdpStatistics {
    rx_dropped: u64,
    rx_invalid_descs: u64,
    tx_invalid_descs: u64,
    rx_ring_full: u64,
    rx_fill_ring_empty_descs: u64,
    tx_ring_empty_descs: u64,
}

const SOL_XDP: libc::c_int = 283;
const XDP_STATISTICS: libc::c_int = 7;

/// One UMEM with its device queues and sockets; owned by one thread.
pub struct Port {
    // Field order matters: sockets and queues unmap their rings before the
    // UMEM goes, and the area is unmapped last.
    socks: Vec<Sock>,
    queues: Vec<Queue>,
    umem: Umem,
    area: Area,
    config: PortConfig,
    free: Vec<u64>,
    stats: PortStats,
}

// SAFETY: a Port is used by one thread at a time; its raw pointers refer to
// memory only it manages.
unsafe impl Send for Port {}

impl Port {
    pub fn new(config: PortConfig) -> Result<Self, XskError> {
        let bytes = config.frames as usize * config.frame_size as usize;
        // SAFETY: anonymous private mapping, checked for failure.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(XskError::Mmap {
                bytes,
                source: io::Error::last_os_error(),
            });
        }
        let area = Area {
            ptr: NonNull::new(ptr.cast()).ok_or(XskError::Mmap {
                bytes,
                source: io::Error::other("null"),
            })?,
            len: bytes,
        };
        let ucfg = UmemConfig {
            fill_size: config.ring_size,
            complete_size: config.ring_size,
            frame_size: config.frame_size,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page aligned (mmap), `bytes` long, and outlives the UMEM
        // (field order of Port).
        let umem = unsafe { Umem::new(ucfg, NonNull::slice_from_raw_parts(area.ptr, bytes)) }
            .map_err(|e| XskError::Umem(e.get_raw()))?;
        let free = (0..config.frames)
            .rev()
            .map(|i| u64::from(i) * u64::from(config.frame_size))
            .collect();
        Ok(Self {
            socks: Vec::new(),
            queues: Vec::new(),
            umem,
            area,
            config,
            free,
            stats: PortStats::default(),
        })
    }

    /// Binds a new socket to `iface` queue `queue_id`, with an RX ring, a TX
    /// ring or both. The first socket on a device queue also sets up its
    /// fill and completion rings; later ones share them.
    pub fn add_socket(
        &mut self,
        iface: &str,
        queue_id: u32,
        rx: bool,
        tx: bool,
    ) -> Result<SockId, XskError> {
        let setup = |step: &'static str| {
            let iface = iface.to_string();
            move |e: xdpilone::Errno| XskError::Setup {
                step,
                iface,
                queue: queue_id,
                errno: e.get_raw(),
            }
        };
        let cname = CString::new(iface).map_err(|_| XskError::BadName(iface.to_string()))?;
        let mut info = IfInfo::invalid();
        info.from_name(&cname).map_err(setup("interface lookup"))?;
        info.set_queue(queue_id);
        let ring = NonZeroU32::new(self.config.ring_size);
        let cfg = SocketConfig {
            rx_size: if rx { ring } else { None },
            tx_size: if tx { ring } else { None },
            bind_flags: 0,
        };

        let existing = self
            .queues
            .iter()
            .position(|q| q.ifindex == info.ifindex() && q.queue_id == queue_id);
        let (queue, user) = match existing {
            Some(qi) => {
                let sock = Socket::new(&info).map_err(setup("socket"))?;
                let user = self.umem.rx_tx(&sock, &cfg).map_err(setup("rx/tx rings"))?;
                // The queue's owner socket is either the UMEM socket or one bound through it.
                if qi == 0 {
                    self.umem.bind(&user).map_err(setup("bind (shared)"))?;
                } else {
                    self.queues[qi]
                        .dq
                        .bind(&user)
                        .map_err(setup("bind (shared)"))?;
                }
                (qi, user)
            }
            None => {
                // The first device queue uses the UMEM's own socket; others get their own.
                let sock = if self.queues.is_empty() {
                    Socket::with_shared(&info, &self.umem).map_err(setup("socket"))?
                } else {
                    Socket::new(&info).map_err(setup("socket"))?
                };
                let dq = self
                    .umem
                    .fq_cq(&sock)
                    .map_err(setup("fill/completion rings"))?;
                let user = self.umem.rx_tx(&sock, &cfg).map_err(setup("rx/tx rings"))?;
                self.umem.bind(&user).map_err(setup("bind"))?;
                self.queues.push(Queue {
                    ifindex: info.ifindex(),
                    queue_id,
                    dq,
                    in_fill: 0,
                });
                (self.queues.len() - 1, user)
            }
        };
        let rx = if rx {
            Some(user.map_rx().map_err(setup("map rx ring"))?)
        } else {
            None
        };
        let tx = if tx {
            Some(user.map_tx().map_err(setup("map tx ring"))?)
        } else {
            None
        };
        let fd = rx
            .as_ref()
            .map(|r| r.as_raw_fd())
            .or_else(|| tx.as_ref().map(|t| t.as_raw_fd()))
            .unwrap_or(-1);
        self.socks.push(Sock {
            queue,
            fd,
            rx,
            tx,
            tx_batch: Vec::with_capacity(self.config.ring_size as usize),
        });
        self.refill();
        Ok(SockId(self.socks.len() - 1))
    }

    /// The socket's file descriptor, for an XSK map and for poll().
    pub fn fd(&self, id: SockId) -> Option<RawFd> {
        self.socks.get(id.0).map(|s| s.fd)
    }

    pub fn stats(&self) -> PortStats {
        self.stats
    }

    /// How many sockets the port has.
    pub fn sockets(&self) -> usize {
        self.socks.len()
    }

    /// The kernel's drop counters of every socket of the port, summed
    /// (sockets whose counters cannot be read add nothing).
    pub fn kernel_drops(&self) -> KernelDrops {
        let mut d = KernelDrops::default();
        for (i, s) in self.socks.iter().enumerate() {
            let mut st = XdpStatistics::default();
            let mut len = core::mem::size_of::<XdpStatistics>() as libc::socklen_t;
            // SAFETY: st is a writable xdp_statistics of `len` bytes; the kernel writes at most len.
            let r = unsafe {
                libc::getsockopt(
                    s.fd,
                    SOL_XDP,
                    XDP_STATISTICS,
                    (&raw mut st).cast(),
                    &mut len,
                )
            };
            if r == 0 {
                d.rx_ring_full += st.rx_ring_full;
                d.rx_dropped += st.rx_dropped;
                d.tx_invalid += st.tx_invalid_descs;
                // The fill ring's count is the device queue's: take it once.
                if self.socks.iter().position(|o| o.queue == s.queue) == Some(i) {
                    d.fill_ring_empty += st.rx_fill_ring_empty_descs;
                }
            }
        }
        d
    }

    /// Frames in the free list.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Hands free frames to every device queue that has a receiving socket,
    /// keeping a sixteenth of the UMEM back for packets built from scratch
    /// ([`Port::transmit_new`]; forwarded packets reuse their frames).
    pub fn refill(&mut self) {
        let reserve = (self.config.frames / 16) as usize;
        let rx_queues: Vec<bool> = (0..self.queues.len())
            .map(|qi| self.socks.iter().any(|s| s.queue == qi && s.rx.is_some()))
            .collect();
        for (qi, q) in self.queues.iter_mut().enumerate() {
            if !rx_queues[qi] {
                continue;
            }
            let want = self.config.ring_size.saturating_sub(q.in_fill);
            let can = self.free.len().saturating_sub(reserve).min(want as usize) as u32;
            if can == 0 {
                continue;
            }
            let mut w = q.dq.fill(can);
            let n = w.insert(std::iter::from_fn(|| self.free.pop()).take(can as usize));
            w.commit();
            drop(w);
            q.in_fill += n;
            if q.dq.needs_wakeup() {
                q.dq.wake();
                self.stats.fill_wakeups += 1;
            }
        }
    }

    /// Takes back frames whose transmission completed.
    pub fn reap(&mut self) {
        let fs = u64::from(self.config.frame_size);
        for q in &mut self.queues {
            let mut c = q.dq.complete(self.config.ring_size);
            while let Some(addr) = c.read() {
                self.free.push(addr - addr % fs);
                self.stats.completed += 1;
            }
            c.release();
        }
    }

    /// Receives up to `max` packets on `id`, handing each to `f` in place,
    /// then queues what `f` transmits and frees what it drops. Call
    /// [`Port::flush`] to push queued transmissions to the kernel.
    pub fn recv(
        &mut self,
        id: SockId,
        max: u32,
        mut f: impl FnMut(&mut Frame<'_>) -> Verdict,
    ) -> u32 {
        let fs = u64::from(self.config.frame_size);
        let Some(sock) = self.socks.get_mut(id.0) else {
            return 0;
        };
        let queue = sock.queue;
        // Taken out for the loop (transmissions may be queued on this socket too).
        let Some(mut rx) = sock.rx.take() else {
            return 0;
        };
        let mut got = 0;
        let mut r = rx.receive(max);
        while let Some(desc) = r.read() {
            got += 1;
            let base = desc.addr - desc.addr % fs;
            let offset = (desc.addr - base) as usize;
            let len = desc.len as usize;
            let verdict =
                if base as usize + fs as usize <= self.area.len && offset + len <= fs as usize {
                    // SAFETY: the frame [base, base + frame_size) lies in the area (checked)
                    // and was handed to us by the kernel through the RX ring: nobody else
                    // touches it until we give it back.
                    let buf = unsafe {
                        core::slice::from_raw_parts_mut(
                            self.area.ptr.as_ptr().add(base as usize),
                            fs as usize,
                        )
                    };
                    f(&mut Frame { buf, offset, len })
                } else {
                    Verdict::Drop
                };
            match verdict {
                Verdict::Transmit { on, offset, len } if offset as u64 + u64::from(len) <= fs => {
                    match self.socks.get_mut(on.0) {
                        Some(s) if s.tx.is_some() && s.tx_batch.len() < s.tx_batch.capacity() => {
                            s.tx_batch.push(XdpDesc {
                                addr: base + u64::from(offset),
                                len,
                                options: 0,
                            });
                        }
                        _ => {
                            self.stats.tx_ring_full += 1;
                            self.free.push(base);
                        }
                    }
                }
                _ => self.free.push(base),
            }
        }
        r.release();
        drop(r);
        self.socks[id.0].rx = Some(rx);
        self.queues[queue].in_fill = self.queues[queue].in_fill.saturating_sub(got);
        self.stats.rx += u64::from(got);
        got
    }

    /// Takes a free frame for a packet built from scratch (e.g. from the slow
    /// path), with `f` writing it and returning `(offset, len)`, and queues it
    /// on `on`. Returns false (frame kept) if there is no free frame.
    pub fn transmit_new(
        &mut self,
        on: SockId,
        f: impl FnOnce(&mut [u8]) -> Option<(u32, u32)>,
    ) -> bool {
        let fs = self.config.frame_size;
        let Some(base) = self.free.pop() else {
            return false;
        };
        // SAFETY: a free frame belongs to nobody else; it lies in the area by construction.
        let buf = unsafe {
            core::slice::from_raw_parts_mut(self.area.ptr.as_ptr().add(base as usize), fs as usize)
        };
        match (f(buf), self.socks.get_mut(on.0)) {
            (Some((offset, len)), Some(s))
                if offset.checked_add(len).is_some_and(|end| end <= fs)
                    && s.tx.is_some()
                    && s.tx_batch.len() < s.tx_batch.capacity() =>
            {
                s.tx_batch.push(XdpDesc {
                    addr: base + u64::from(offset),
                    len,
                    options: 0,
                });
                true
            }
            _ => {
                self.free.push(base);
                false
            }
        }
    }

    /// How many more frames socket `id` can queue for transmission now: its
    /// TX ring's free entries less what is batched. Receive no more than this
    /// for it, so that no frame is processed only to be dropped at a full
    /// TX ring (work on overload is shed by the kernel at the RX ring instead).
    pub fn tx_room(&self, id: SockId) -> u32 {
        self.socks.get(id.0).map_or(0, |s| match &s.tx {
            Some(tx) => self
                .config
                .ring_size
                .saturating_sub(tx.pending())
                .saturating_sub(s.tx_batch.len() as u32),
            None => 0,
        })
    }

    /// Pushes queued transmissions to the kernel and kicks TX; also reaps
    /// completions and refills the fill rings. Returns whether frames are
    /// still waiting in a TX ring: the caller must come back without sleeping.
    pub fn flush(&mut self) -> bool {
        let fs = u64::from(self.config.frame_size);
        let mut pending = false;
        for s in &mut self.socks {
            let Some(tx) = s.tx.as_mut() else { continue };
            if !s.tx_batch.is_empty() {
                let mut w = tx.transmit(s.tx_batch.len() as u32);
                let n = w.insert(s.tx_batch.iter().copied()) as usize;
                w.commit();
                drop(w);
                self.stats.tx += n as u64;
                for d in s.tx_batch.drain(..).skip(n) {
                    self.stats.tx_ring_full += 1;
                    self.free.push(d.addr - d.addr % fs);
                }
            }
            if tx.pending() > 0 || tx.needs_wakeup() {
                self.stats.tx_kicks += kick(tx, self.config.ring_size / COPY_MODE_BATCH + 1);
            }
            pending |= tx.pending() > 0;
        }
        self.reap();
        self.refill();
        pending
    }

    /// Waits until a receiving socket has packets or `timeout_ms` passes.
    pub fn poll(&self, timeout_ms: i32) -> io::Result<()> {
        let mut fds: Vec<libc::pollfd> = self
            .socks
            .iter()
            .filter(|s| s.rx.is_some())
            .map(|s| libc::pollfd {
                fd: s.fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd for its length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Frames the kernel sends per `sendto()` in copy mode.
const COPY_MODE_BATCH: u32 = 32;

/// Wakes the kernel to transmit from `tx`, at most `max_kicks` times (a
/// flush passes enough for a full ring). In copy mode (veth, drivers
/// without zero-copy) each `sendto()` sends at most [`COPY_MODE_BATCH`]
/// frames, synchronously: kick again while that makes progress, or the ring
/// fills faster than it drains. In zero-copy mode the driver sends later, so
/// the first kick shows no progress and is the only one. Returns the kicks
/// made (system calls).
fn kick(tx: &mut RingTx, max_kicks: u32) -> u64 {
    let mut before = tx.pending();
    for k in 1..=max_kicks {
        tx.wake();
        let now = tx.pending();
        if now == 0 || now >= before {
            return u64::from(k);
        }
        before = now;
    }
    u64::from(max_kicks)
}
