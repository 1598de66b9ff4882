//! The AF_XDP workers, one thread per receive queue, watched. A worker that
//! ends while the daemon runs (it panicked, or could not start, e.g. its
//! netlink socket) is logged, counted in `xesp status`, and started again
//! with fresh sockets; one that keeps dying ([`MAX_RESTARTS`] within
//! [`RESTART_WINDOW`]) ends the daemon with an error, so that its supervisor
//! (systemd) restarts it whole. Nothing falls back to the slow path unseen.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::cpus::{WorkerCpus, pin_current_thread};
use crate::{
    DatapathError,
    slowpath::SlowPath,
    worker::{Worker, WorkerCounters},
    xdp::XdpPrograms,
    xsk::{BusyPoll, XskError},
};

/// Restarts of one queue's worker within [`RESTART_WINDOW`] before the
/// daemon gives up.
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// How long a worker's start waits for the kernel to release its queue
/// from the sockets of the worker before it.
const QUEUE_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Busy polling when [`BusyPoll::ENV`] is not set: none, what the
/// benchmark found better on veth in copy mode (see the README).
pub const DEFAULT_BUSY_POLL: Option<BusyPoll> = None;

/// For tests of this supervision (debug builds only): with
/// `XESP_FAULT_INJECT=worker-panic` each queue's first worker panics as it
/// starts; with `worker-panic-always` every one does.
const FAULT_ENV: &str = "XESP_FAULT_INJECT";

struct Slot {
    queue: u32,
    /// The tunnels whose sockets of this queue the XDP programs have.
    bound: Vec<u32>,
    handle: Option<JoinHandle<()>>,
    starts: u32,
    recent: VecDeque<Instant>,
}

/// The workers of the current generation.
pub struct Workers {
    pub counters: Arc<WorkerCounters>,
    slots: Vec<Slot>,
    dmz_if: String,
    lan_if: String,
    path: Arc<SlowPath>,
    /// Stops this generation of workers (a new one is made when the
    /// interfaces change under them).
    stop: Arc<AtomicBool>,
    /// Workers that ended and were started again.
    restarts: AtomicU64,
    busy_poll: Option<BusyPoll>,
    cpus: WorkerCpus,
}

impl Workers {
    /// Starts one worker per queue and registers its sockets.
    pub fn start(
        queues: u32,
        dmz_if: &str,
        lan_if: &str,
        path: Arc<SlowPath>,
        xdp: &mut XdpPrograms,
    ) -> Result<Self, DatapathError> {
        let busy_poll = match std::env::var(BusyPoll::ENV) {
            Ok(v) => BusyPoll::parse(&v)?,
            Err(_) => DEFAULT_BUSY_POLL,
        };
        if let Some(bp) = busy_poll {
            log::info!(
                "AF_XDP workers: busy polling, {} µs, budget {}",
                bp.usecs,
                bp.budget
            );
        }
        let cpus = WorkerCpus::from_env()?;
        if !cpus.is_empty() {
            log::info!("AF_XDP workers: {cpus}");
        }
        let mut w = Self {
            counters: Arc::new(WorkerCounters::default()),
            slots: Vec::new(),
            dmz_if: dmz_if.to_string(),
            lan_if: lan_if.to_string(),
            path,
            stop: Arc::new(AtomicBool::new(false)),
            restarts: AtomicU64::new(0),
            busy_poll,
            cpus,
        };
        w.restart(queues, xdp)?;
        Ok(w)
    }

    /// Stops the workers there are and starts one per queue, with fresh
    /// sockets; the counters go on.
    pub fn restart(&mut self, queues: u32, xdp: &mut XdpPrograms) -> Result<(), DatapathError> {
        self.stop(Some(xdp));
        self.stop = Arc::new(AtomicBool::new(false));
        self.slots = (0..queues)
            .map(|queue| Slot {
                queue,
                bound: Vec::new(),
                handle: None,
                starts: 0,
                recent: VecDeque::new(),
            })
            .collect();
        for i in 0..self.slots.len() {
            self.spawn(i, xdp)?;
        }
        Ok(())
    }

    /// The socket datapath's next generation (a tunnel was added or
    /// removed): the next [`Workers::restart`] opens one socket per tunnel
    /// of it.
    pub fn set_path(&mut self, path: Arc<SlowPath>) {
        self.path = path;
    }

    /// Stops every worker and waits for it. With `xdp`, its sockets leave
    /// the XDP programs' maps first, so that what arrives from then on goes
    /// to the kernel (and the socket path), and each worker's last round
    /// takes what its RX rings still hold: a restart drops nothing that was
    /// steered to a worker. (Without, as when the interfaces are gone, a
    /// worker's RX rings go with it.)
    pub fn stop(&mut self, xdp: Option<&mut XdpPrograms>) {
        if let Some(xdp) = xdp {
            for s in &mut self.slots {
                for t in s.bound.drain(..) {
                    if let Err(e) = xdp.unbind_xsks(s.queue, t) {
                        log::warn!("AF_XDP worker of queue {}: tunnel {t}: {e}", s.queue);
                    }
                }
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        for s in self.slots.drain(..) {
            if let Some(h) = s.handle {
                let _ = h.join();
            }
        }
    }

    fn spawn(&mut self, i: usize, xdp: &mut XdpPrograms) -> Result<(), DatapathError> {
        let q = self.slots[i].queue;
        // The kernel lets go of a closed socket's queue from a work queue,
        // after close() returns: a worker started again at once may find
        // the queue still taken (EBUSY) for a moment. Meanwhile the XDP
        // programs pass its traffic to the kernel.
        let started = Instant::now();
        let (worker, socks) = loop {
            match Worker::new(
                q,
                &self.dmz_if,
                &self.lan_if,
                self.path.clone(),
                self.counters.clone(),
                self.busy_poll,
            ) {
                Err(XskError::Setup {
                    errno: libc::EBUSY, ..
                }) if started.elapsed() < QUEUE_RELEASE_WAIT => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                r => break r?,
            }
        };
        self.slots[i].bound.clear();
        for (t, fd) in socks.dmz.iter().enumerate() {
            if let Some(fd) = fd {
                xdp.bind_dmz_xsk(q, t as u32, *fd)?;
                self.slots[i].bound.push(t as u32);
            }
        }
        for (t, fd) in socks.lan.iter().enumerate() {
            if let Some(fd) = fd {
                xdp.bind_lan_xsk(q, t as u32, *fd)?;
            }
        }
        let fault = injected_fault(self.slots[i].starts);
        self.slots[i].starts += 1;
        let stop = self.stop.clone();
        let cpu = self.cpus.of(q);
        let handle = std::thread::Builder::new()
            .name(format!("xsk-q{q}"))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = pin_current_thread(cpu)
                {
                    log::warn!("AF_XDP worker of queue {q}: runs unpinned, CPU {cpu}: {e}");
                }
                if fault {
                    panic!("injected fault ({FAULT_ENV})");
                }
                worker.run(stop)
            })
            .map_err(|source| DatapathError::Io {
                what: format!("starting the AF_XDP worker of queue {q}"),
                source,
            })?;
        self.slots[i].handle = Some(handle);
        Ok(())
    }

    /// Looks for workers that ended and starts them again; an error when
    /// one keeps dying or cannot be started.
    pub fn watch(&mut self, xdp: &mut XdpPrograms, now: Instant) -> Result<(), DatapathError> {
        if self.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        for i in 0..self.slots.len() {
            if !self.slots[i]
                .handle
                .as_ref()
                .is_some_and(JoinHandle::is_finished)
            {
                continue;
            }
            let q = self.slots[i].queue;
            let why = match self.slots[i].handle.take().map(JoinHandle::join) {
                Some(Err(panic)) => format!(
                    "panicked: {}",
                    panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("?")
                ),
                _ => "it stopped (see the log above)".to_string(),
            };
            let recent = &mut self.slots[i].recent;
            recent.retain(|t| now.saturating_duration_since(*t) < RESTART_WINDOW);
            if recent.len() >= MAX_RESTARTS {
                return Err(DatapathError::Workers(format!(
                    "the AF_XDP worker of queue {q} ended {} times within {} s ({why}); giving up",
                    MAX_RESTARTS + 1,
                    RESTART_WINDOW.as_secs()
                )));
            }
            recent.push_back(now);
            log::error!("AF_XDP worker of queue {q} ended ({why}): starting it again");
            self.spawn(i, xdp)?;
            self.restarts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// For `xesp status`: the workers' counters, how many run, restarts.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let running = self
            .slots
            .iter()
            .filter(|s| s.handle.as_ref().is_some_and(|h| !h.is_finished()))
            .count();
        let mut v: Vec<(String, u64)> = self
            .counters
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        v.push(("workers".into(), self.slots.len() as u64));
        v.push(("workers_running".into(), running as u64));
        v.push((
            "worker_restarts".into(),
            self.restarts.load(Ordering::Relaxed),
        ));
        v
    }
}

/// Whether the worker's start number `start` (0 first) is to panic.
fn injected_fault(start: u32) -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    match std::env::var(FAULT_ENV).as_deref() {
        Ok("worker-panic") => start == 0,
        Ok("worker-panic-always") => true,
        _ => false,
    }
}
