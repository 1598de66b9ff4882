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
    #[error(
        "{env}={value:?}: expected off, <microseconds> or <microseconds>/<budget>, each 1 to 65535"
    )]
    BadBusyPoll { env: &'static str, value: String },
    #[error("AF_XDP busy polling ({option}): {source}")]
    BusyPoll {
        option: &'static str,
        source: io::Error,
    },
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
    /// Frames read from the RX ring with this one that are still to be
    /// handled, this one included (for work taken once per burst).
    pub ahead: u32,
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
    /// Frames lent to the kernel on this queue: in its fill ring, or
    /// received into an RX ring and not yet read. At most a ring's worth
    /// (see [`Port::refill`]).
    lent: u32,
    /// Whether a socket receives on it (only those get frames to fill).
    rx: bool,
}

struct Sock {
    queue: usize,
    fd: RawFd,
    rx: Option<RingRx>,
    tx: Option<RingTx>,
    /// TX descriptors queued but not yet committed.
    tx_batch: Vec<XdpDesc>,
    /// Frames the kernel sends per `sendto()` in copy mode.
    tx_budget: u32,
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
    /// `recvfrom()` calls that let the kernel busy-poll the RX queues
    /// (system calls; busy polling only, see [`Port::set_busy_poll`]).
    pub busy_polls: u64,
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
/// asm-generic/mman-common.h, Linux 5.14 and later.
const MADV_POPULATE_WRITE: libc::c_int = 23;
const XDP_STATISTICS: libc::c_int = 7;
// asm-generic/socket.h (x86, arm, and most others).
const SO_BUSY_POLL: libc::c_int = 46;
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;

/// Socket busy polling of a port's receive queues: the worker's own
/// `recvfrom()` runs the queues' NAPI poll (XDP and the copy into the UMEM)
/// instead of a softirq, and with `SO_PREFER_BUSY_POLL` the softirq leaves
/// the queue to it while it keeps polling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPoll {
    /// `SO_BUSY_POLL`: how long one busy poll may spin, in microseconds.
    pub usecs: u32,
    /// `SO_BUSY_POLL_BUDGET`: packets per NAPI poll.
    pub budget: u16,
}

impl BusyPoll {
    /// The environment variable that turns it on for the daemon's workers
    /// (see `mode::workers`).
    pub const ENV: &'static str = "XESP_AF_XDP_BUSY_POLL";

    /// `off`, `<microseconds>` (budget 64) or `<microseconds>/<budget>`.
    pub fn parse(v: &str) -> Result<Option<Self>, XskError> {
        let bad = || XskError::BadBusyPoll {
            env: Self::ENV,
            value: v.to_string(),
        };
        let v = v.trim();
        if v == "off" {
            return Ok(None);
        }
        let (us, budget) = v.split_once('/').unwrap_or((v, "64"));
        let usecs: u16 = us.trim().parse().map_err(|_| bad())?;
        let budget: u16 = budget.trim().parse().map_err(|_| bad())?;
        if usecs == 0 || budget == 0 {
            return Err(bad());
        }
        Ok(Some(Self {
            usecs: u32::from(usecs),
            budget,
        }))
    }
}

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
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
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
        // Huge pages where the kernel has them (transparent huge pages,
        // "madvise" or "always"): each packet lands in a frame of its own,
        // thousands in flight, and with 4 KiB pages each would cost the
        // worker a TLB miss. Then the pages are allocated now rather than
        // on the first packets. Both are hints: registering the UMEM
        // allocates whatever is still missing.
        // SAFETY: advice on the mapping just made, of its length.
        unsafe {
            libc::madvise(ptr, bytes, libc::MADV_HUGEPAGE);
            libc::madvise(ptr, bytes, MADV_POPULATE_WRITE);
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
                    lent: 0,
                    rx: false,
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
        self.queues[queue].rx |= rx.is_some();
        let tx_budget = if tx.is_some() {
            ask_tx_budget(fd, self.config.ring_size)
        } else {
            COPY_MODE_BATCH
        };
        self.socks.push(Sock {
            queue,
            fd,
            rx,
            tx,
            tx_batch: Vec::with_capacity(self.config.ring_size as usize),
            tx_budget,
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

    /// Frames accounted for by the port: in its free list, lent to the
    /// kernel for receiving, queued or in flight for transmission. Equals
    /// [`PortConfig::frames`] whenever the kernel holds no frame of a
    /// dropped packet (it never does when no RX ring overflows, which
    /// [`Port::refill`] prevents).
    pub fn frames_accounted(&self) -> u64 {
        let lent: u64 = self.queues.iter().map(|q| u64::from(q.lent)).sum();
        let batched: u64 = self.socks.iter().map(|s| s.tx_batch.len() as u64).sum();
        self.free.len() as u64 + lent + batched + self.in_flight()
    }

    /// Frames handed to a TX ring whose completion has not been reaped yet.
    pub fn in_flight(&self) -> u64 {
        self.stats.tx - self.stats.completed
    }

    /// Gives every device queue that has a receiving socket a ring's worth
    /// of frames, less those it holds already (in its fill ring, or in an RX
    /// ring not read yet), keeping a sixteenth of the UMEM back for packets
    /// built from scratch ([`Port::transmit_new`]; forwarded packets reuse
    /// their frames). [`Port::recv`] calls it for its queue after every
    /// batch, so what the worker reads is handed back at once.
    ///
    /// The cap is what sheds overload cheaply: when the worker falls behind,
    /// received frames wait in the RX ring, the fill ring runs short, and
    /// the kernel drops the next packets for want of a frame (`XDP_STATISTICS`
    /// rx_dropped and fill_ring_empty) before it copies them. An RX ring
    /// therefore never overflows, which would cost the copy of each packet
    /// dropped.
    pub fn refill(&mut self) {
        for qi in 0..self.queues.len() {
            self.refill_queue(qi);
        }
    }

    fn refill_queue(&mut self, qi: usize) {
        let reserve = (self.config.frames / 16) as usize;
        let ring = self.config.ring_size;
        let Some(q) = self.queues.get_mut(qi).filter(|q| q.rx) else {
            return;
        };
        let before = q.lent;
        // xdpilone reserves no more than its cached view of the ring shows
        // free: ask again until all is in, or the ring seen afresh is full.
        loop {
            let want = ring.saturating_sub(q.lent);
            let can = self.free.len().saturating_sub(reserve).min(want as usize) as u32;
            if can == 0 {
                break;
            }
            let mut w = q.dq.fill(can);
            // Exactly as many frames as slots reserved: the writer takes one
            // item more from an iterator than it has room for.
            let start = self.free.len() - w.capacity() as usize;
            let n = w.insert(self.free[start..].iter().copied());
            w.commit();
            drop(w);
            self.free.drain(start..start + n as usize);
            if n == 0 {
                break;
            }
            q.lent += n;
        }
        if q.lent != before && q.dq.needs_wakeup() {
            q.dq.wake();
            self.stats.fill_wakeups += 1;
        }
    }

    /// Takes back frames whose transmission completed.
    pub fn reap(&mut self) {
        let fs = u64::from(self.config.frame_size);
        for q in &mut self.queues {
            // Until the completion ring, seen afresh, is empty (see refill).
            loop {
                let mut c = q.dq.complete(self.config.ring_size);
                let mut n = 0;
                while let Some(addr) = c.read() {
                    self.free.push(addr - addr % fs);
                    n += 1;
                }
                c.release();
                drop(c);
                if n == 0 {
                    break;
                }
                self.stats.completed += n;
            }
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
        let mut descs = [XdpDesc::default(); RECV_BATCH];
        // Until `max`, or the RX ring seen afresh is empty (see refill).
        while got < max {
            let mut r = rx.receive((max - got).min(RECV_BATCH as u32));
            let mut n = 0;
            while let Some(desc) = r.read() {
                descs[n] = desc;
                n += 1;
            }
            r.release();
            drop(r);
            if n == 0 {
                break;
            }
            // The frames were written by the kernel on another CPU, one
            // of thousands in flight: the first touch of each misses the
            // caches. Ask for the next ones while this one is handled.
            for d in &descs[..n.min(PREFETCH_AHEAD)] {
                self.prefetch(d);
            }
            for i in 0..n {
                if i + PREFETCH_AHEAD < n {
                    self.prefetch(&descs[i + PREFETCH_AHEAD]);
                }
                let desc = descs[i];
                let verdict = self.handle(desc, (n - i) as u32, &mut f);
                self.settle(desc.addr - desc.addr % fs, verdict);
            }
            got += n as u32;
        }
        self.socks[id.0].rx = Some(rx);
        let q = &mut self.queues[queue];
        q.lent = q.lent.saturating_sub(got);
        self.stats.rx += u64::from(got);
        self.refill_queue(queue);
        got
    }

    /// Starts loading the first octets of a received packet (its headers)
    /// into the cache; a hint only, harmless for a bad descriptor.
    #[inline]
    fn prefetch(&self, d: &XdpDesc) {
        let end = d.addr.saturating_add(u64::from(d.len.min(PREFETCH_OCTETS)));
        if end > self.area.len as u64 {
            return;
        }
        let mut at = d.addr;
        while at < end {
            // SAFETY: `at` lies within the area (checked above); a prefetch
            // reads nothing the program sees.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    self.area.ptr.as_ptr().add(at as usize).cast::<i8>(),
                );
            }
            at += 64;
        }
    }

    /// Hands the frame of a received descriptor to `f`.
    fn handle(
        &mut self,
        desc: XdpDesc,
        ahead: u32,
        f: &mut impl FnMut(&mut Frame<'_>) -> Verdict,
    ) -> Verdict {
        let fs = u64::from(self.config.frame_size);
        let base = desc.addr - desc.addr % fs;
        let offset = (desc.addr - base) as usize;
        let len = desc.len as usize;
        if base as usize + fs as usize > self.area.len || offset + len > fs as usize {
            return Verdict::Drop;
        }
        // SAFETY: the frame [base, base + frame_size) lies in the area (checked)
        // and was handed to us by the kernel through the RX ring: nobody else
        // touches it until we give it back.
        let buf = unsafe {
            core::slice::from_raw_parts_mut(self.area.ptr.as_ptr().add(base as usize), fs as usize)
        };
        f(&mut Frame {
            buf,
            offset,
            len,
            ahead,
        })
    }

    /// Queues the frame at `base` for transmission, or frees it.
    fn settle(&mut self, base: u64, verdict: Verdict) {
        let fs = u64::from(self.config.frame_size);
        match verdict {
            Verdict::Transmit { on, offset, len } if u64::from(offset) + u64::from(len) <= fs => {
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
                // Until all is in, or the ring seen afresh is full (see refill).
                let mut n = 0;
                while n < s.tx_batch.len() {
                    let mut w = tx.transmit((s.tx_batch.len() - n) as u32);
                    let put = w.insert(s.tx_batch[n..].iter().copied()) as usize;
                    w.commit();
                    drop(w);
                    if put == 0 {
                        break;
                    }
                    n += put;
                }
                self.stats.tx += n as u64;
                for d in s.tx_batch.drain(..).skip(n) {
                    self.stats.tx_ring_full += 1;
                    self.free.push(d.addr - d.addr % fs);
                }
            }
            // Nothing queued, nothing to send: copy mode always asks for a
            // wakeup, and an empty kick is a wasted system call.
            if tx.pending() > 0 {
                self.stats.tx_kicks += kick(tx, self.config.ring_size / s.tx_budget + 1);
            }
            pending |= tx.pending() > 0;
        }
        self.reap();
        self.refill();
        pending
    }

    /// Turns on busy polling on every socket of the port (sockets added
    /// later are not covered). Needs CAP_NET_ADMIN for a time above
    /// `net.core.busy_read`, and a kernel built with busy polling.
    pub fn set_busy_poll(&mut self, bp: BusyPoll) -> Result<(), XskError> {
        let opts = [
            ("SO_PREFER_BUSY_POLL", SO_PREFER_BUSY_POLL, 1),
            ("SO_BUSY_POLL", SO_BUSY_POLL, bp.usecs as libc::c_int),
            (
                "SO_BUSY_POLL_BUDGET",
                SO_BUSY_POLL_BUDGET,
                libc::c_int::from(bp.budget),
            ),
        ];
        for s in &self.socks {
            for (option, name, value) in opts {
                // SAFETY: value is a c_int of the length passed.
                let r = unsafe {
                    libc::setsockopt(
                        s.fd,
                        libc::SOL_SOCKET,
                        name,
                        (&raw const value).cast(),
                        core::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    return Err(XskError::BusyPoll {
                        option,
                        source: io::Error::last_os_error(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Lets the kernel busy-poll each receiving socket's queue once
    /// (`recvfrom()` without waiting; with busy polling on, see
    /// [`Port::set_busy_poll`]).
    pub fn busy_poll(&mut self) {
        for s in self.socks.iter().filter(|s| s.rx.is_some()) {
            // SAFETY: a zero-length receive with no buffer and no address.
            unsafe {
                libc::recvfrom(
                    s.fd,
                    core::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    core::ptr::null_mut(),
                    core::ptr::null_mut(),
                )
            };
            self.stats.busy_polls += 1;
        }
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

/// Descriptors taken from an RX ring at a time.
const RECV_BATCH: usize = 64;
/// How many packets ahead of the one being handled are prefetched.
const PREFETCH_AHEAD: usize = 4;
/// Octets prefetched of each received packet: its Ethernet, IP, UDP and
/// ESP headers, and all of a small packet.
const PREFETCH_OCTETS: u32 = 192;

/// Frames the kernel sends per `sendto()` in copy mode, unless told more.
const COPY_MODE_BATCH: u32 = 32;
/// `XDP_MAX_TX_SKB_BUDGET` (linux/if_xdp.h, Linux 6.17 and later).
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// Asks the kernel to send up to `want` frames per `sendto()` in copy mode
/// instead of [`COPY_MODE_BATCH`], so that a batch leaves with one kick;
/// returns what it will send (older kernels refuse the option).
fn ask_tx_budget(fd: RawFd, want: u32) -> u32 {
    // SAFETY: a u32 socket option of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            SOL_XDP,
            XDP_MAX_TX_SKB_BUDGET,
            (&raw const want).cast(),
            core::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 { want } else { COPY_MODE_BATCH }
}

/// Wakes the kernel to transmit from `tx`, at most `max_kicks` times (a
/// flush passes enough for a full ring). In copy mode (veth, drivers
/// without zero-copy) each `sendto()` sends at most the socket's budget
/// of frames, synchronously: kick again while that makes progress, or the ring
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_setting() {
        assert_eq!(BusyPoll::parse("off").unwrap(), None);
        let bp = |usecs, budget| Some(BusyPoll { usecs, budget });
        assert_eq!(BusyPoll::parse("50").unwrap(), bp(50, 64));
        assert_eq!(BusyPoll::parse(" 20/16 ").unwrap(), bp(20, 16));
        for bad in ["", "0", "20/0", "fast", "-1", "20/", "70000", "20/70000"] {
            let e = BusyPoll::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(BusyPoll::ENV), "{bad:?}: {e}");
        }
    }
}
