//! `xesp run`: the thin tokio driver around the sans-IO connections.
//!
//! One task owns every [`Connection`] and the chosen [`Datapath`] (whose
//! [`SaBackend`](ike_proto::backend::SaBackend) the connections install
//! their CHILD_SAs through); it reads IKE from UDP 500 and (through the
//! datapath, which demultiplexes UDP 4500) from UDP 4500, fires timers,
//! polls SA lifetimes, sends what the connections ask for and answers the
//! control socket. The packets themselves never reach this task.

mod reload;
mod sa_log;

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use datapath_user::{
    DatapathError,
    mode::{self, Datapath, DatapathConfig, SaExpiry, TunnelConfig},
    rxq,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use xesp_esp::sa::{DropReason, Expiry};

use crate::{
    config::{Config, DatapathMode},
    control::{self, Answer, DeviceStatus, MAX_REQUEST, RekeyWhat, Request, TunnelStatus},
    service,
};
use ike_proto::{
    connection::{Connection, Event},
    random::SystemRandom,
};

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// Tunnel `t` as the datapath sees it.
fn tunnel_config(t: &crate::config::Tunnel) -> TunnelConfig {
    TunnelConfig {
        name: t.name.clone(),
        address: t.address,
        peer: t.peer.remote,
    }
}

/// The datapath's part of the configuration.
fn datapath_config(cfg: &Config) -> DatapathConfig {
    DatapathConfig {
        mode: match cfg.device.datapath {
            DatapathMode::Xdp => mode::Mode::Xdp,
            DatapathMode::Tun => mode::Mode::Tun,
            DatapathMode::Xfrm => mode::Mode::Xfrm,
        },
        public_address: cfg.device.public_address,
        tunnels: cfg.tunnels.iter().map(tunnel_config).collect(),
        tunnel_mtu: cfg.device.tunnel_mtu,
        mss_clamp: cfg.device.mss_clamp,
        dmz_interface: cfg.device.dmz_interface.clone(),
        lan_interfaces: cfg.device.lan_interfaces.clone(),
        dmz_allow: cfg.dmz_allow.clone(),
        dmz_pass_unclassified: cfg.dmz_pass_unclassified,
    }
}

/// What the IKE sockets count before a datagram reaches a connection.
#[derive(Debug, Default)]
struct IkeCounters {
    /// Datagrams read on UDP 500.
    udp500_rx: AtomicU64,
    /// IKE from an address that is no configured peer (UDP 500 or 4500),
    /// dropped before it was queued.
    not_peer: AtomicU64,
    /// IKE on UDP 4500 dropped because the queue to this task was full.
    queue_full: AtomicU64,
    /// Datagrams the kernel dropped at UDP 500's full receive buffer.
    udp500_buffer_drops: AtomicU64,
}

impl IkeCounters {
    fn snapshot(&self) -> [(&'static str, u64); 4] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("udp500_rx", g(&self.udp500_rx)),
            ("ike_not_peer", g(&self.not_peer)),
            ("ike_queue_full", g(&self.queue_full)),
            ("udp500_buffer_drops", g(&self.udp500_buffer_drops)),
        ]
    }
}

/// A request from a control-socket client and where its answer (a JSON
/// document) goes, answered by the main loop.
type ControlRequest = (Request, oneshot::Sender<String>);

/// Control-socket clients served at once; more wait to be accepted.
const MAX_CLIENTS: usize = 16;

/// The configured peers' addresses: IKE on UDP 4500 from elsewhere is
/// dropped before it is queued (read on a datapath thread, changed by a
/// reload).
type Peers = Arc<RwLock<Vec<IpAddr>>>;

struct Driver {
    /// Tunnel N of `cfg.tunnels` has connection `conns[N]` and datapath
    /// index `slots[N]` (its `peer.tunnel`): a reload adds and removes
    /// tunnels, the others keep their datapath index.
    cfg: Config,
    /// Where `cfg` came from, read again by `reload`.
    config_path: PathBuf,
    conns: Vec<Connection>,
    slots: Vec<u32>,
    /// Connections of removed tunnels, until their DELETE is sent.
    leaving: Vec<Connection>,
    peers: Peers,
    rng: Arc<SystemRandom>,
    datapath: Box<dyn Datapath>,
    udp500: tokio::net::UdpSocket,
    udp4500: Arc<UdpSocket>,
    ike: Arc<IkeCounters>,
    started_utc: String,
}

impl Driver {
    fn connection_for(&self, from: SocketAddr) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.config().remote == from.ip())
    }

    /// Sends one IKE datagram (or NAT-T keepalive) from its port.
    async fn send(&self, t: &ike_proto::connection::Transmit) -> io::Result<usize> {
        if t.local_port != 4500 {
            return self.udp500.send_to(&t.data, t.remote).await;
        }
        // The non-ESP marker (RFC 3948 §2.2), except on keepalives.
        if t.data == [0xff] {
            self.udp4500.send_to(&t.data, t.remote)
        } else {
            let mut d = Vec::with_capacity(t.data.len() + 4);
            d.extend_from_slice(&[0; 4]);
            d.extend_from_slice(&t.data);
            self.udp4500.send_to(&d, t.remote)
        }
    }

    /// Sends what the connections have queued and logs their events.
    async fn flush(&mut self) {
        // A removed tunnel's last words: its DELETE (RFC 7296 §1.4.1).
        for mut c in std::mem::take(&mut self.leaving) {
            while let Some(t) = c.poll_transmit() {
                if let Err(e) = self.send(&t).await {
                    log::warn!("{}: sending to {}: {e}", c.config().name, t.remote);
                }
            }
        }
        for i in 0..self.conns.len() {
            while let Some(t) = self.conns[i].poll_transmit() {
                let r = self.send(&t).await;
                if let Err(e) = r {
                    log::warn!("{}: sending to {}: {e}", self.cfg.tunnels[i].name, t.remote);
                }
            }
            let (name, peer) = (
                self.cfg.tunnels[i].name.as_str(),
                self.cfg.tunnels[i].peer.remote,
            );
            while let Some(e) = self.conns[i].poll_event() {
                match e {
                    Event::Log {
                        level,
                        message,
                        exchange,
                        ike_spi,
                        spi,
                    } => sa_log::core_message(
                        name,
                        peer,
                        level,
                        sa_log::About {
                            exchange,
                            ike_spi,
                            spi,
                        },
                        &message,
                    ),
                    Event::TunnelUp { .. } => {
                        let st = self.conns[i]
                            .status(Instant::now(), &mut *self.datapath.tunnel(self.slots[i]));
                        sa_log::tunnel_up(name, peer, &st);
                    }
                    Event::TunnelDown { reason, .. } => {
                        tracing::warn!(tunnel = name, %peer, %reason, "{name}: tunnel down: {reason}")
                    }
                    Event::Rejected { from, reason } => {
                        tracing::debug!(tunnel = name, %from, %reason, "{name}: dropped a message from {from}: {reason}")
                    }
                }
            }
        }
    }

    fn datagram(&mut self, port: u16, from: SocketAddr, data: &[u8]) {
        match self.connection_for(from) {
            Some(i) => self.conns[i].handle_datagram(
                Instant::now(),
                port,
                from,
                data,
                &mut *self.datapath.tunnel(self.slots[i]),
            ),
            None => {
                self.ike.not_peer.fetch_add(1, Ordering::Relaxed);
                log::debug!("IKE from {from}, which is no configured peer: dropped");
            }
        }
    }

    fn timeouts(&mut self) {
        let now = Instant::now();
        for (c, slot) in self.conns.iter_mut().zip(&self.slots) {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now, &mut *self.datapath.tunnel(*slot));
            }
        }
    }

    /// SA lifetimes in bytes and sequence numbers end in the datapath: a soft
    /// expiry rekeys the CHILD_SA the SA belongs to, a hard one removes it.
    fn expiries(&mut self) {
        let now = Instant::now();
        for x in self.datapath.expiries(now) {
            let SaExpiry {
                tunnel,
                spi,
                direction,
                expiry,
            } = x;
            let Some(c) = self
                .slots
                .iter()
                .position(|s| *s == tunnel)
                .and_then(|i| self.conns.get_mut(i))
            else {
                continue;
            };
            let dir = format!("{direction:?}").to_lowercase();
            let (hard, limit) = match expiry {
                Expiry::Soft(l) => (false, l),
                Expiry::Hard(l) => (true, l),
            };
            let cfg = c.config();
            sa_log::expiry(
                &cfg.name,
                cfg.remote,
                spi,
                &dir,
                hard,
                &format!("{limit:?}"),
            );
            c.expired(
                now,
                spi,
                direction,
                hard,
                &mut *self.datapath.tunnel(tunnel),
            );
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().filter_map(Connection::poll_timeout).min()
    }

    /// Answers one control request. BIRD is asked off this task: a hung
    /// BIRD must not stall retransmissions, DPD and rekeys.
    fn answer(&mut self, request: Request, reply: oneshot::Sender<String>) {
        let now = Instant::now();
        let a = match request {
            Request::Status => {
                let mut st = self.status();
                let bird = self.cfg.device.bird_socket.clone();
                tokio::spawn(async move {
                    if let Some(s) = bird {
                        st.bgp = Some(bgp_protocols(&s).await);
                    }
                    let _ = reply.send(serde_json::to_string_pretty(&st).unwrap_or_default());
                });
                return;
            }
            Request::Reload => self.reload(),
            Request::Up(name) | Request::Down(name) | Request::Rekey(name, _)
                if self.tunnel_index(&name).is_none() =>
            {
                Answer::error(format!(
                    "no tunnel {name:?}; the tunnels are {}",
                    self.cfg
                        .tunnels
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
            Request::Up(name) => {
                let i = self.tunnel_index(&name).unwrap_or_default();
                self.conns[i].open(now);
                Answer::ok(format!("{name}: up (initiating, or accepting the peer)"))
            }
            Request::Down(name) => {
                let i = self.tunnel_index(&name).unwrap_or_default();
                self.conns[i].close(now);
                Answer::ok(format!(
                    "{name}: down (IKE_SAs deleted; the peer is refused until `xesp tunnel up {name}`)"
                ))
            }
            Request::Rekey(name, what) => {
                let i = self.tunnel_index(&name).unwrap_or_default();
                if !self.conns[i].is_up() {
                    Answer::error(format!("{name} is not up: nothing to rekey"))
                } else {
                    match what {
                        RekeyWhat::Child => {
                            self.conns[i]
                                .rekey_child(now, &mut *self.datapath.tunnel(self.slots[i]));
                            Answer::ok(format!("{name}: CHILD_SA rekey started"))
                        }
                        RekeyWhat::Ike => {
                            self.conns[i].rekey_ike(now);
                            Answer::ok(format!("{name}: IKE_SA rekey started"))
                        }
                    }
                }
            }
        };
        let _ = reply.send(answer_json(&a));
    }

    fn tunnel_index(&self, name: &str) -> Option<usize> {
        self.cfg.tunnels.iter().position(|t| t.name == name)
    }

    /// Reads the configuration file again and applies what changed: the
    /// DMZ allowlist at once, removed tunnels closed and taken out of the
    /// datapath, added ones put in and started, a tunnel whose IKE
    /// settings changed re-established with them. Unchanged tunnels keep
    /// their SAs. What cannot change while running is named in the answer.
    fn reload(&mut self) -> Answer {
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                return Answer::error(format!(
                    "{}: {e}; nothing changed",
                    self.config_path.display()
                ));
            }
        };
        let mut plan = reload::plan(&self.cfg, &new);
        let mut done = Vec::new();
        if plan.dmz_changed {
            match self
                .datapath
                .set_dmz(&new.dmz_allow, new.dmz_pass_unclassified)
            {
                Ok(()) => {
                    done.push(format!("dmz: {} allowed prefixes", new.dmz_allow.len()));
                    self.cfg.dmz_allow = new.dmz_allow.clone();
                    self.cfg.dmz_pass_unclassified = new.dmz_pass_unclassified;
                }
                Err(e) => return Answer::error(format!("applying [dmz]: {e}")),
            }
        }
        let now = Instant::now();
        for &(i, j) in &plan.reconfigured {
            let mut t = new.tunnels[j].clone();
            t.peer.tunnel = self.slots[i];
            self.conns[i].reconfigure(Arc::new(t.peer.clone()), now);
            done.push(format!("{}: re-established with its new settings", t.name));
            self.cfg.tunnels[i] = t;
        }
        // Removed first (highest index first, as they shift): a renamed
        // tunnel's peer then belongs to the added one alone.
        let removed: Vec<String> = plan
            .removed
            .iter()
            .map(|&i| self.cfg.tunnels[i].name.clone())
            .collect();
        for name in removed {
            match self.remove_tunnel(&name, now) {
                Ok(()) => done.push(format!("{name}: removed (its IKE_SA deleted)")),
                Err(e) => plan
                    .not_applied
                    .push(format!("removing tunnel {name}: {e}")),
            }
        }
        for &j in &plan.added {
            let t = &new.tunnels[j];
            match self.add_tunnel(t, now) {
                Ok(slot) => done.push(format!("{}: added (tunnel {slot})", t.name)),
                Err(e) => plan
                    .not_applied
                    .push(format!("adding tunnel {}: {e}", t.name)),
            }
        }
        self.follow_file_order(&new);
        if plan.bird_socket_changed {
            self.cfg.device.bird_socket = new.device.bird_socket.clone();
            done.push("device.bird_socket".into());
        }
        self.cfg.warnings = new.warnings;
        let message = if done.is_empty() {
            "reloaded: nothing to apply".to_string()
        } else {
            format!("reloaded: {}", done.join("; "))
        };
        log::info!("{message}");
        for n in &plan.not_applied {
            log::warn!("reload: {n}");
        }
        Answer {
            ok: true,
            message,
            not_applied: plan.not_applied,
        }
    }

    /// Takes tunnel `name` away: its connection closed (the DELETE of its
    /// IKE_SAs goes out with the next flush, RFC 7296 §1.4.1), then its SAs
    /// and interface removed from the datapath.
    fn remove_tunnel(&mut self, name: &str, now: Instant) -> Result<(), DatapathError> {
        let Some(i) = self.tunnel_index(name) else {
            return Ok(());
        };
        self.datapath.remove_tunnel(self.slots[i])?;
        let mut c = self.conns.remove(i);
        c.close(now);
        self.leaving.push(c);
        self.cfg.tunnels.remove(i);
        self.slots.remove(i);
        self.update_peers();
        Ok(())
    }

    /// Puts tunnel `t` in: its interface in a free datapath slot, then its
    /// connection (which initiates if configured to). Its index.
    fn add_tunnel(
        &mut self,
        t: &crate::config::Tunnel,
        now: Instant,
    ) -> Result<u32, DatapathError> {
        let slot = self.datapath.add_tunnel(&tunnel_config(t))?;
        let mut t = t.clone();
        t.peer.tunnel = slot;
        self.conns.push(Connection::new(
            Arc::new(t.peer.clone()),
            self.rng.clone(),
            now,
        ));
        self.cfg.tunnels.push(t);
        self.slots.push(slot);
        self.update_peers();
        Ok(slot)
    }

    /// Lists the tunnels (status, metrics) in the order of `new`'s file.
    fn follow_file_order(&mut self, new: &Config) {
        let rank = |name: &str| {
            new.tunnels
                .iter()
                .position(|t| t.name == name)
                .unwrap_or(usize::MAX)
        };
        let mut all: Vec<_> = std::mem::take(&mut self.cfg.tunnels)
            .into_iter()
            .zip(std::mem::take(&mut self.conns))
            .zip(std::mem::take(&mut self.slots))
            .collect();
        all.sort_by_key(|((t, _), _)| rank(&t.name));
        for ((t, c), slot) in all {
            self.cfg.tunnels.push(t);
            self.conns.push(c);
            self.slots.push(slot);
        }
    }

    fn update_peers(&self) {
        let peers = self.cfg.tunnels.iter().map(|t| t.peer.remote).collect();
        *self
            .peers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = peers;
    }

    fn status(&mut self) -> DeviceStatus {
        let now = Instant::now();
        let dp = self.datapath.status();
        let mut tunnels = Vec::new();
        for (i, c) in self.conns.iter().enumerate() {
            let t = &self.cfg.tunnels[i];
            let slot = self.slots[i];
            let connection = c.status(now, &mut *self.datapath.tunnel(slot));
            let counters = dp.tunnels.get(slot as usize).cloned().unwrap_or_default();
            let totals = counters.totals;
            tunnels.push(TunnelStatus {
                name: t.name.clone(),
                address: t.address.to_string(),
                remote: t.peer.remote.to_string(),
                bgp_peer: t.bgp_peer.map(|b| b.to_string()),
                up: connection.up,
                last_established_utc: connection.established_secs_ago.map(control::utc_ago),
                totals,
                drops: DropReason::ALL
                    .iter()
                    .map(|r| (r.name().to_string(), totals.drops.get(*r)))
                    .collect(),
                no_selector: totals.drops.get(DropReason::NoSelector),
                selector_mismatch: totals.drops.get(DropReason::SelectorMismatch),
                xdp: counters.xdp.map(|c| control::XdpTraffic {
                    lan_packets: c.lan_packets,
                    lan_bytes: c.lan_bytes,
                    esp_packets: c.esp_packets,
                    esp_bytes: c.esp_bytes,
                }),
                interface: counters.interface,
                connection,
            });
        }
        rxq::sync(
            &self.ike.udp500_buffer_drops,
            std::os::fd::AsRawFd::as_raw_fd(&self.udp500),
        );
        let mut socket_path = dp.socket_path;
        socket_path.extend(
            self.ike
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v)),
        );
        DeviceStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            public_address: self.cfg.device.public_address.to_string(),
            datapath: dp.description.into(),
            started_utc: self.started_utc.clone(),
            tunnels,
            dmz: dp.dmz,
            lan: dp.lan,
            workers: dp.workers,
            socket_path,
            unknown_spi: dp.unknown_spi,
            no_outbound_sa: dp.no_outbound_sa,
            // Filled off the IKE task (see `bgp_protocols`).
            bgp: None,
            warnings: self.cfg.warnings.clone(),
        }
    }
}

/// Serves the control socket: each client's request line (at most
/// [`MAX_REQUEST`] octets, within 5 s) goes to the main loop, at most
/// [`MAX_CLIENTS`] clients at once.
async fn serve_control(listener: UnixListener, requests: mpsc::Sender<ControlRequest>) {
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = clients.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                BufReader::new(rd.take(MAX_REQUEST as u64 + 1)).read_line(&mut line),
            )
            .await;
            let answer = match read {
                Ok(Ok(_)) if line.len() > MAX_REQUEST => answer_json(&Answer::error(format!(
                    "request longer than {MAX_REQUEST} octets"
                ))),
                Ok(Ok(_)) => match Request::parse(&line) {
                    Ok(r) => {
                        let (tx, rx) = oneshot::channel();
                        if requests.send((r, tx)).await.is_err() {
                            return;
                        }
                        match rx.await {
                            Ok(a) => a,
                            Err(_) => return,
                        }
                    }
                    Err(e) => answer_json(&Answer::error(e)),
                },
                _ => return,
            };
            let _ = wr.write_all(answer.as_bytes()).await;
            let _ = wr.shutdown().await;
        });
    }
}

fn answer_json(a: &Answer) -> String {
    serde_json::to_string_pretty(a).unwrap_or_default()
}

/// The control socket, mode 0660, in `group` when one is configured.
fn bind_control(path: &std::path::Path, group: Option<&str>) -> Result<UnixListener, DaemonError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
    if let Some(g) = group {
        let gid = group_id(g).ok_or_else(|| DaemonError::Io {
            what: format!("control_group {g:?}"),
            source: io::Error::new(io::ErrorKind::NotFound, "no such group"),
        })?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io_err(format!("giving {} to group {g}", path.display())))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err(format!("chmod 0660 {}", path.display())))?;
    Ok(listener)
}

/// The id of group `name`, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Longest HTTP request head the metrics endpoint reads.
const MAX_HTTP_REQUEST: usize = 4096;

/// Serves `GET /metrics` (OpenMetrics text) from the main loop's status,
/// one small request per connection, at most [`MAX_CLIENTS`] at once.
async fn serve_metrics(listener: tokio::net::TcpListener, requests: mpsc::Sender<ControlRequest>) {
    let clients = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = clients.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (rd, mut wr) = stream.into_split();
            let mut head = String::new();
            let mut rd = BufReader::new(rd.take(MAX_HTTP_REQUEST as u64));
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                // The request line, then headers up to the empty line.
                loop {
                    let mut line = String::new();
                    match rd.read_line(&mut line).await {
                        Ok(0) | Err(_) => return false,
                        Ok(_) if line.trim().is_empty() => return true,
                        Ok(_) => head.push_str(&line),
                    }
                }
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let target = head.split_whitespace().take(2).collect::<Vec<_>>();
            let (code, kind, body) = if target == ["GET", "/metrics"] {
                let (tx, rx) = oneshot::channel();
                if requests.send((Request::Status, tx)).await.is_err() {
                    return;
                }
                let Ok(json) = rx.await else { return };
                match serde_json::from_str::<DeviceStatus>(&json) {
                    Ok(st) => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        crate::metrics::render(&st, control::unix_now()),
                    ),
                    Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
                }
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "only GET /metrics is served\n".into(),
                )
            };
            let answer = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = wr.write_all(answer.as_bytes()).await;
            let _ = wr.shutdown().await;
        });
    }
}

/// How long `birdc` may take to answer for `xesp status`.
const BIRDC_TIMEOUT: Duration = Duration::from_millis(1500);

/// `birdc show protocols` through BIRD's control socket, or why not.
async fn bgp_protocols(socket: &std::path::Path) -> String {
    let run = tokio::process::Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(["show", "protocols"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(BIRDC_TIMEOUT, run).await {
        Ok(Ok(o)) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(Err(e)) => format!("birdc: {e}"),
        Err(_) => format!(
            "birdc: no answer from {} within {:?} (is BIRD hung?)",
            socket.display(),
            BIRDC_TIMEOUT
        ),
    }
}

/// How many IKE datagrams from UDP 4500 may wait for the IKE task.
const IKE_QUEUE: usize = 256;

/// One datagram from UDP 500, with the socket's receive-buffer drops.
async fn recv_udp500(
    sock: &tokio::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<rxq::Received> {
    use std::os::fd::AsRawFd;
    loop {
        sock.readable().await?;
        match sock.try_io(tokio::io::Interest::READABLE, || {
            rxq::recv(sock.as_raw_fd(), buf)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT; then deletes the IKE_SAs.
pub fn run(cfg: Config, config_path: PathBuf) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the runtime"))?;
    rt.block_on(run_async(cfg, config_path))
}

async fn run_async(cfg: Config, config_path: PathBuf) -> Result<(), DaemonError> {
    for w in &cfg.warnings {
        log::warn!("{w}");
    }
    let public = cfg.device.public_address;
    let udp500 = tokio::net::UdpSocket::bind((public, 500))
        .await
        .map_err(io_err(format!("binding UDP {public}:500")))?;
    rxq::enable(std::os::fd::AsRawFd::as_raw_fd(&udp500))
        .map_err(io_err("SO_RXQ_OVFL on UDP 500"))?;
    let udp4500 = Arc::new(
        UdpSocket::bind((public, 4500)).map_err(io_err(format!("binding UDP {public}:4500")))?,
    );
    // IKE on UDP 4500 reaches this task through a bounded queue, and only
    // from a configured peer: a flood from elsewhere costs a counter.
    let ike = Arc::new(IkeCounters::default());
    let (ike_tx, mut ike_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(IKE_QUEUE);
    let peers: Peers = Arc::new(RwLock::new(
        cfg.tunnels.iter().map(|t| t.peer.remote).collect(),
    ));
    let gate = ike.clone();
    let known = peers.clone();
    let datapath = mode::start(
        &datapath_config(&cfg),
        udp4500.clone(),
        Box::new(move |from, data| {
            let known = known.read().is_ok_and(|p| p.contains(&from.ip()));
            if !known {
                gate.not_peer.fetch_add(1, Ordering::Relaxed);
            } else if ike_tx.try_send((from, data.to_vec())).is_err() {
                gate.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }),
    )?;

    let sock_path: PathBuf = cfg.device.control_socket.clone();
    let listener = bind_control(&sock_path, cfg.device.control_group.as_deref())?;
    let (req_tx, mut req_rx) = mpsc::channel::<ControlRequest>(MAX_CLIENTS);
    let metrics_task = match cfg.device.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io_err(format!("binding metrics_listen {addr}")))?;
            log::info!("Prometheus metrics on http://{addr}/metrics");
            Some(tokio::spawn(serve_metrics(l, req_tx.clone())))
        }
        None => None,
    };
    let control_task = tokio::spawn(serve_control(listener, req_tx));

    let now = Instant::now();
    let rng = Arc::new(SystemRandom::new());
    let conns = cfg
        .tunnels
        .iter()
        .map(|t| Connection::new(Arc::new(t.peer.clone()), rng.clone(), now))
        .collect();
    let mut d = Driver {
        conns,
        slots: (0..cfg.tunnels.len() as u32).collect(),
        leaving: Vec::new(),
        peers,
        rng,
        datapath,
        udp500,
        udp4500,
        ike,
        started_utc: control::utc_ago(0),
        cfg,
        config_path,
    };
    log::info!(
        "xesp {} on {public}: {} tunnels, control socket {}",
        env!("CARGO_PKG_VERSION"),
        d.conns.len(),
        sock_path.display()
    );
    let mut term = signal(SignalKind::terminate()).map_err(io_err("SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("SIGINT handler"))?;
    // SIGHUP reloads, as `xesp reload` does.
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("SIGHUP handler"))?;
    // systemd (Type=notify): ready now that the datapath is attached and
    // the control socket listens; the tunnels' states as STATUS=; WATCHDOG=1
    // from this loop, every tick (at most half of any WatchdogSec= worth
    // having). Nothing is sent without NOTIFY_SOCKET.
    let notify = |r: io::Result<()>| {
        if let Err(e) = r {
            log::warn!("systemd notification: {e}");
        }
    };
    notify(service::notify_ready());
    let watchdog = service::watchdog_interval().is_some();
    let mut shown_status = String::new();
    let mut failed = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut buf = vec![0u8; 65536];
    loop {
        d.timeouts();
        d.flush().await;
        let deadline = d
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = recv_udp500(&d.udp500, &mut buf) => match r {
                Ok(r) => {
                    rxq::note(&d.ike.udp500_buffer_drops, &r);
                    d.ike.udp500_rx.fetch_add(1, Ordering::Relaxed);
                    if let Some(from) = r.from {
                        let data = buf[..r.len].to_vec();
                        d.datagram(500, from, &data);
                    }
                }
                Err(e) => log::warn!("UDP 500: {e}"),
            },
            Some((from, data)) = ike_rx.recv() => d.datagram(4500, from, &data),
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = tick.tick() => {
                if watchdog {
                    notify(service::notify_watchdog());
                }
                let line = service::status_line(
                    d.cfg.tunnels.iter().zip(&d.conns).map(|(t, c)| (t.name.as_str(), c.is_up())),
                );
                if line != shown_status {
                    notify(service::notify_status(&line));
                    shown_status = line;
                }
                d.expiries();
                if let Err(e) = d.datapath.tick(Instant::now()) {
                    log::error!("{e}");
                    failed = Some(e.into());
                    break;
                }
            }
            Some((request, reply)) = req_rx.recv() => d.answer(request, reply),
            _ = hup.recv() => {
                let a = d.reload();
                log::info!("SIGHUP: {}", a.message);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notify(service::notify_stopping());
    log::info!("stopping: deleting the IKE_SAs");
    let now = Instant::now();
    for c in &mut d.conns {
        c.close(now);
    }
    d.flush().await;
    // Give the peers' DELETE answers a moment; they need no reply from us.
    tokio::time::sleep(Duration::from_millis(300)).await;
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&sock_path);
    d.datapath.stop();
    failed.map_or(Ok(()), Err)
}
