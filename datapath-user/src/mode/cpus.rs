//! Where the AF_XDP workers run: `XESP_AF_XDP_CPUS` in the daemon's
//! environment pins each queue's worker to a CPU of its own. Unset, the
//! scheduler places them, and a worker woken by the receive softirq tends
//! to follow it onto the CPU that handles the NIC's interrupts (wake-up
//! affinity), where the two then share one CPU. Pin the workers to CPUs that
//! take none of the DMZ and LAN interfaces' interrupts.

use crate::DatapathError;

/// The CPU of each queue's worker, queue 0's first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerCpus(Vec<usize>);

impl WorkerCpus {
    /// The environment variable that sets it.
    pub const ENV: &'static str = "XESP_AF_XDP_CPUS";

    /// From [`Self::ENV`]: unset or empty, no pinning.
    pub fn from_env() -> Result<Self, DatapathError> {
        match std::env::var(Self::ENV) {
            Ok(v) => Self::parse(&v, &allowed_cpus()),
            Err(_) => Ok(Self::default()),
        }
    }

    /// `v` is a comma-separated list of CPU numbers, each one the process
    /// may run on (`allowed`); a queue past the list runs unpinned.
    pub fn parse(v: &str, allowed: &[usize]) -> Result<Self, DatapathError> {
        let bad = |why: String| {
            DatapathError::Config(format!(
                "{}={v:?}: {why} (a comma-separated list of CPU numbers, queue 0's worker first)",
                Self::ENV
            ))
        };
        let mut cpus = Vec::new();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let cpu: usize = part
                .parse()
                .map_err(|_| bad(format!("{part:?} is not a CPU number")))?;
            if !allowed.contains(&cpu) {
                return Err(bad(format!(
                    "CPU {cpu} is not one this process may run on ({})",
                    list(allowed)
                )));
            }
            cpus.push(cpu);
        }
        Ok(Self(cpus))
    }

    /// The CPU of queue `queue`'s worker, if pinned.
    pub fn of(&self, queue: u32) -> Option<usize> {
        self.0.get(queue as usize).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl core::fmt::Display for WorkerCpus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (q, cpu) in self.0.iter().enumerate() {
            write!(f, "{}queue {q} on CPU {cpu}", if q > 0 { ", " } else { "" })?;
        }
        Ok(())
    }
}

fn list(cpus: &[usize]) -> String {
    let v: Vec<String> = cpus.iter().map(ToString::to_string).collect();
    format!("allowed: {}", v.join(","))
}

/// The CPUs the calling process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes it.
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        if libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_cpus_setting() {
        let allowed = [0, 1, 2, 3];
        let c = WorkerCpus::parse(" 1, 0 ,3", &allowed).unwrap();
        assert_eq!(
            (c.of(0), c.of(1), c.of(2), c.of(3)),
            (Some(1), Some(0), Some(3), None)
        );
        assert_eq!(
            c.to_string(),
            "queue 0 on CPU 1, queue 1 on CPU 0, queue 2 on CPU 3"
        );
        assert!(WorkerCpus::parse("", &allowed).unwrap().is_empty());
        for (bad, says) in [
            ("1,x", "\"x\" is not a CPU number"),
            ("-1", "\"-1\" is not a CPU number"),
            (
                "4",
                "CPU 4 is not one this process may run on (allowed: 0,1,2,3)",
            ),
        ] {
            let e = WorkerCpus::parse(bad, &allowed).unwrap_err().to_string();
            assert!(
                e.starts_with(WorkerCpus::ENV) && e.contains(says),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn this_process_may_run_somewhere() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        // Pinning a thread to one of them works (on a thread of its own,
        // so that the test runner's threads keep their CPUs).
        let cpu = allowed[allowed.len() - 1];
        std::thread::spawn(move || {
            pin_current_thread(cpu).unwrap();
            assert_eq!(allowed_cpus(), [cpu]);
        })
        .join()
        .unwrap();
    }
}
