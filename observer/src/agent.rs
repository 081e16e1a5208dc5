//! `observer run` and `observer audit`: the event loop that ties the kernel side, the table and
//! what is made of it together.
//!
//! One task owns the kernel maps and the table ([`Watch`]). It drains the ring buffer whenever it
//! is readable and, every refresh, reads every kernel entry and recomputes verdicts. `run` then
//! publishes a snapshot that the HTTP handlers serve; `audit` feeds the audit's aggregation.

use std::{
    collections::HashSet,
    io::{IsTerminal as _, Write},
    path::Path,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::maps::RingBuf;
use observer_common::{ChunkEvent, ConnEvent, Direction, EventHeader, EventKind, FrameEvent, stat};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpListener,
    sync::mpsc,
};
use tracing::{debug, info, warn};

use crate::{
    adopt,
    api::{self, Shared, Snapshot, ViewRequest},
    cli::{AuditConfig, Format, RunConfig, WatchConfig},
    conntrack::{ConnectionView, KernelAction, Tracker},
    evict::{self, Evictor},
    k8s,
    kernel::{Kernel, KernelConfig},
    metrics, sockdiag,
    state::StateFile,
};

/// Why `observer run` stopped, mapped to the documented exit codes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The kernel programs could not be loaded or attached.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    /// The metrics address could not be bound.
    #[error("cannot listen on --metrics-addr {addr}: {source}; {}", listen_fix(addr, source))]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    /// The audit report's file could not be created.
    #[error("cannot write --output {}: {source}", path.display())]
    Output { path: std::path::PathBuf, source: std::io::Error },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What to do about a metrics address that cannot be bound.
fn listen_fix(addr: &std::net::SocketAddr, error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "another process listens there (`ss -ltnp 'sport = :{}'` names it); pick a free \
             address with --metrics-addr or OBSERVER_METRICS_ADDR",
            addr.port()
        ),
        std::io::ErrorKind::PermissionDenied => {
            "ports below 1024 need CAP_NET_BIND_SERVICE; pick a higher port with --metrics-addr"
                .to_owned()
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "no interface of this host has that address; use 0.0.0.0 or one of `ip -br addr`"
                .to_owned()
        }
        _ => "pick another address with --metrics-addr or OBSERVER_METRICS_ADDR".to_owned(),
    }
}

impl RunError {
    pub const fn exit_code(&self) -> u8 {
        match self {
            Self::Kernel(_) => 3,
            Self::Listen { .. } => 4,
            Self::Output { .. } => 2,
            Self::Other(_) => 1,
        }
    }
}

/// What `observer run` and `observer audit` share: the kernel programs, the table, and the loop
/// that keeps the table in line with the kernel.
struct Watch {
    kernel: Kernel,
    events: AsyncFd<RingBuf<aya::maps::MapData>>,
    tracker: Tracker,
    evictor: Evictor,
    /// Where `run` keeps which connections are WebSocket by their handshake.
    state: Option<StateFile>,
    pods: k8s::Resolver,
    ports: Vec<u16>,
    refresh: std::time::Duration,
    lost_when_adopted: u64,
    /// When the current refresh began.
    refresh_started: Instant,
    /// When adopted connections' queues were last checked against the socket table.
    last_verified: Option<Instant>,
    /// The last refresh's `CONNS` and `FRAMES` reads, kept for their memory.
    entries: Vec<(u64, observer_common::ConnState)>,
    frames: Vec<(u64, observer_common::WsState)>,
    /// What the gauges need of each reported connection end, as of the last refresh.
    open: Vec<metrics::OpenEnd>,
    /// Requests for the connection ends, from the HTTP endpoint; `None` when nobody serves it.
    view_requests: Option<mpsc::Receiver<ViewRequest>>,
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// SIGINT or SIGTERM.
    Signal,
    /// The caller's own end came.
    Done,
}

impl Watch {
    /// Loads the kernel programs and adopts the connections already open.
    fn start(config: &WatchConfig, keep_notes: bool, port_labels: usize) -> Result<Self, RunError> {
        let mut kernel = Kernel::load(&KernelConfig {
            watched_ports: config.ports.clone(),
            max_connections: config.max_connections,
            max_websockets: config.max_websockets,
            event_buffer: config.event_buffer,
            cgroup: config.cgroup.clone(),
        })?;
        let events = kernel.events.take().context("ring buffer already taken")?;
        // SAFETY: the ring buffer owns its descriptor and lives inside the `AsyncFd` until the
        // loop ends, so the descriptor stays open and unshared for as long as it is registered.
        let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;
        let mut tracker = Tracker::new(config.thresholds, config.pong_timeout);
        if keep_notes {
            tracker.keep_notes();
        }
        tracker.limit_port_labels(port_labels);
        let mut watch = Self {
            kernel,
            events,
            tracker,
            evictor: Evictor::new(config.max_connections, config.max_websockets),
            state: config.state_file.clone().map(StateFile::new),
            pods: k8s::Resolver::new("/proc", &config.pod_log_dir),
            ports: config.ports.clone(),
            refresh: config.refresh,
            lost_when_adopted: 0,
            refresh_started: Instant::now(),
            last_verified: None,
            entries: Vec::new(),
            frames: Vec::new(),
            open: Vec::new(),
            view_requests: None,
        };
        let saved = watch.state.as_ref().map(StateFile::load).unwrap_or_default();
        adopt_existing(&mut watch.kernel, &mut watch.tracker, &mut watch.evictor, &watch.ports);
        for (cookie, upgrade) in saved {
            watch.tracker.restore_upgrade(cookie, upgrade);
        }
        watch.lost_when_adopted = watch.kernel.stat(stat::EVENTS_LOST);
        Ok(watch)
    }

    /// Drains events as they come and refreshes every `refresh`, handing each refresh's
    /// connection ends to `on_refresh`, until SIGINT, SIGTERM, `until`, or an error from
    /// `on_refresh`.
    async fn run(
        &mut self,
        until: impl std::future::Future<Output = ()>,
        mut on_refresh: impl FnMut(&mut Self) -> Result<(), RunError>,
    ) -> Result<Stopped, RunError> {
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        tokio::pin!(until);
        loop {
            tokio::select! {
                guard = self.events.readable_mut() => {
                    let mut guard = guard.context("waiting on the ring buffer")?;
                    drain(guard.get_inner_mut(), &mut self.tracker, &mut self.kernel);
                    guard.clear_ready();
                }
                _ = tick.tick() => {
                    self.refresh_started = Instant::now();
                    self.refresh();
                    on_refresh(self)?;
                }
                request = next_request(&mut self.view_requests) => match request {
                    // Answered from a refresh of its own, published before the answer, so that
                    // what `/metrics` says from then on agrees with it. Requests that queued
                    // meanwhile share it.
                    Some(reply) => {
                        let mut replies = vec![reply];
                        if let Some(requests) = &mut self.view_requests {
                            while let Ok(reply) = requests.try_recv() {
                                replies.push(reply);
                            }
                        }
                        self.drain_now();
                        self.refresh_started = Instant::now();
                        self.refresh();
                        on_refresh(self)?;
                        let views = self.views();
                        let last = replies.pop();
                        // An asker may have given up waiting: nothing to do then.
                        for reply in replies {
                            let _ = reply.send(views.clone());
                        }
                        if let Some(reply) = last {
                            let _ = reply.send(views);
                        }
                    }
                    None => self.view_requests = None,
                },
                _ = tokio::signal::ctrl_c() => return Ok(Stopped::Signal),
                _ = terminate.recv() => return Ok(Stopped::Signal),
                () = &mut until => return Ok(Stopped::Done),
            }
        }
    }

    /// Reads every kernel entry and recomputes verdicts; re-adopts after lost events.
    fn refresh(&mut self) {
        let lost = self.kernel.stat(stat::EVENTS_LOST);
        if lost > self.lost_when_adopted {
            // Opens or closes may be among the lost events: read the kernel's table again.
            warn!(
                lost = lost - self.lost_when_adopted,
                "kernel events lost; adopting from the socket table"
            );
            adopt_existing(&mut self.kernel, &mut self.tracker, &mut self.evictor, &self.ports);
            self.lost_when_adopted = lost;
        }
        let mut entries = std::mem::take(&mut self.entries);
        self.kernel.read_conns_into(&mut entries);
        let kernel = &self.kernel;
        let frames_held = self.evictor.usage(evict::Map::Frames).entries;
        let frames = &mut self.frames;
        self.tracker.sync(entries.iter().copied(), |wanted| {
            kernel.read_frames_into(wanted, frames_held, frames);
            let frames: &Vec<_> = frames;
            frames.iter().copied()
        });
        let tracker = &self.tracker;
        let plan = self.evictor.plan(&entries, |cookie| tracker.reported(cookie));
        self.entries = entries;
        evict(&mut self.kernel, &mut self.tracker, &plan);
        self.verify_adopted_queues();
        self.tracker.judge(crate::clock::monotonic_ns(), &mut self.open);
    }

    /// The connection ends as the last refresh judged them, with their pods.
    fn views(&mut self) -> Vec<ConnectionView> {
        let mut views = self.tracker.views();
        self.pods.annotate(&mut views, Instant::now());
        views
    }

    /// Checks the queues of adopted connections that have gone quiet against the kernel's socket
    /// table, at most once a second: what the application read or wrote while their entries
    /// were being made was never counted.
    fn verify_adopted_queues(&mut self) {
        const QUIET_NS: u64 = 500_000_000;
        if self.last_verified.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
            return;
        }
        let pending = self.tracker.unverified_quiet(crate::clock::monotonic_ns(), QUIET_NS);
        if pending.is_empty() {
            return;
        }
        self.last_verified = Some(Instant::now());
        let scan = match sockdiag::scan_all_namespaces() {
            Ok(scan) => scan,
            Err(error) => {
                debug!(%error, "adopted connections' queues not checked");
                return;
            }
        };
        let queues: std::collections::HashMap<u64, (u32, u32)> =
            scan.sockets.iter().map(|s| (s.cookie, (s.recv_queue, s.send_queue))).collect();
        for cookie in pending {
            if let Some(&(recv, send)) = queues.get(&cookie) {
                self.tracker.verify_queues(cookie, recv.into(), send.into());
            }
        }
    }

    /// Handles the events already waiting, without waiting for more.
    fn drain_now(&mut self) {
        let ring = self.events.get_mut();
        drain(ring, &mut self.tracker, &mut self.kernel);
    }
}

pub async fn run(config: RunConfig) -> Result<(), RunError> {
    // Bind first: a busy port is cheaper to report than programs loaded for nothing.
    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| RunError::Listen { addr: config.metrics_addr, source })?;
    let mut watch = Watch::start(&config.watch, false, config.max_port_labels)?;

    let (requests, view_requests) = mpsc::channel(16);
    watch.view_requests = Some(view_requests);
    let shared = Arc::new(Shared::new(config.watch.refresh, requests));
    let app = api::router(Arc::clone(&shared));
    info!(addr = %config.metrics_addr, ports = ?config.watch.ports, "serving /metrics, /connections, /healthz");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let pod_labels = config.pod_labels;
    let never = std::future::pending::<()>();
    watch
        .run(never, |watch| {
            publish(watch, &shared, pod_labels);
            if server.is_finished() {
                return Err(anyhow::anyhow!("the HTTP server stopped").into());
            }
            Ok(())
        })
        .await?;
    info!(tracked = watch.tracker.len(), "stopping; kernel programs detach with the process");
    Ok(())
}

/// `observer audit`: watches for the configured time (or until SIGINT or SIGTERM), then writes
/// the report.
pub async fn audit(config: AuditConfig) -> Result<(), RunError> {
    // Open the output first: a path that cannot be written is cheaper to report now than after
    // the whole audit.
    let mut output: Box<dyn Write> = match &config.output {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .map_err(|source| RunError::Output { path: path.clone(), source })?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let started = Instant::now();
    let mut watch = Watch::start(&config.watch, true, metrics::DEFAULT_PORT_LABELS)?;
    info!(
        duration = %humantime::format_duration(config.duration),
        ports = ?config.watch.ports,
        "auditing WebSocket connections"
    );

    let mut audit = crate::audit::Audit::new(config.settings.clone());
    let progress = std::io::stderr().is_terminal();
    let deadline = tokio::time::sleep(config.duration);
    let stopped = watch
        .run(deadline, |watch| {
            let connections = watch.views();
            audit.notes(watch.tracker.take_notes());
            audit.refresh(&connections, crate::clock::monotonic_ns());
            if progress {
                show_progress(&audit, started.elapsed(), config.duration);
            }
            Ok(())
        })
        .await?;
    // What happened since the last refresh belongs in the report too.
    watch.drain_now();
    watch.refresh();
    let connections = watch.views();
    audit.notes(watch.tracker.take_notes());
    audit.refresh(&connections, crate::clock::monotonic_ns());
    if progress {
        let _ = writeln!(std::io::stderr());
    }

    let report = audit.report(started_at, started.elapsed(), stopped == Stopped::Signal);
    let text = match config.format {
        Format::Text => crate::audit::text(&report),
        Format::Markdown => crate::audit::markdown(&report),
        Format::Json => {
            let mut json = serde_json::to_string_pretty(&report).context("encoding the report")?;
            json.push('\n');
            json
        }
    };
    output
        .write_all(text.as_bytes())
        .and_then(|()| output.flush())
        .context("writing the report")?;
    info!(
        findings = report.findings.len(),
        services = report.services.len(),
        "audit written; kernel programs detach with the process"
    );
    Ok(())
}

/// One line on a terminal's stderr, rewritten in place.
fn show_progress(
    audit: &crate::audit::Audit,
    elapsed: std::time::Duration,
    total: std::time::Duration,
) {
    let _ = write!(
        std::io::stderr(),
        "\r\x1b[Kaudit {} of {}: {} connection ends, {} findings so far",
        humantime::format_duration(std::time::Duration::from_secs(elapsed.as_secs())),
        humantime::format_duration(total),
        audit.connections_seen(),
        audit.findings_so_far()
    );
}

/// Handles every event waiting in the ring buffer.
fn drain(ring: &mut RingBuf<aya::maps::MapData>, tracker: &mut Tracker, kernel: &mut Kernel) {
    while let Some(item) = ring.next() {
        let bytes: &[u8] = &item;
        if bytes.len() < size_of::<EventHeader>() {
            warn!(len = bytes.len(), "short kernel event ignored");
            continue;
        }
        // SAFETY: the length was checked; `EventHeader` is plain data valid for any bits.
        let header: EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        match EventKind::from_u32(header.kind) {
            Some(EventKind::Open | EventKind::Close) if bytes.len() >= size_of::<ConnEvent>() => {
                // SAFETY: as above, for `ConnEvent`.
                let event: ConnEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                if header.kind == EventKind::Open as u32 {
                    tracker.open(header.cookie, event.state);
                } else {
                    tracker.close(header.cookie, event.state, event.frames);
                }
            }
            Some(EventKind::Chunk) if bytes.len() >= size_of::<ChunkEvent>() => {
                // SAFETY: as above, for `ChunkEvent`.
                let event: ChunkEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                let len = usize::from(event.len).min(event.data.len());
                let direction =
                    if event.direction == 0 { Direction::Ingress } else { Direction::Egress };
                let cookie = header.cookie;
                let conns = &kernel.conns;
                let data = &event.data[..len];
                let lookup = || conns.get(&cookie, 0).ok();
                let action =
                    tracker.chunk(cookie, direction, event.offset, data, header.ts_ns, lookup);
                if let Some(action) = action {
                    apply(kernel, action);
                }
            }
            Some(EventKind::Frame) if bytes.len() >= size_of::<FrameEvent>() => {
                // SAFETY: as above, for `FrameEvent`.
                let event: FrameEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                tracker.frame(header.cookie, &event);
            }
            _ => warn!(kind = header.kind, len = bytes.len(), "unknown kernel event ignored"),
        }
    }
}

fn apply(kernel: &mut Kernel, action: KernelAction) {
    let result = match action {
        KernelAction::StopForwarding(cookie) => kernel.stop_forwarding.insert(cookie, 1, 0),
        KernelAction::Untrack(cookie) => {
            // Frames first: an entry there without one in CONNS would never be removed.
            let _ = kernel.frames.remove(&cookie);
            kernel.conns.remove(&cookie)
        }
    };
    if let Err(error) = result {
        // The connection may have closed in between; nothing is lost.
        debug!(?action, %error, "kernel map update skipped");
    }
}

/// Writes the connections open in the kernel's socket table that the kernel programs do not
/// track yet into their maps, and into the table; then reads the table again and removes the
/// adopted entries of sockets that closed in between, which no kernel program would remove.
fn adopt_existing(
    kernel: &mut Kernel,
    tracker: &mut Tracker,
    evictor: &mut Evictor,
    ports: &[u16],
) {
    let scan = match sockdiag::scan_all_namespaces() {
        Ok(scan) => scan,
        Err(error) => {
            warn!(%error, "cannot read the kernel's socket table: connections already open are not adopted");
            return;
        }
    };
    let alive: HashSet<u64> = scan.sockets.iter().map(|s| s.cookie).collect();
    evictor.retain_alive(|cookie| alive.contains(&cookie));
    let new: Vec<_> = scan
        .sockets
        .into_iter()
        .filter(|s| !evictor.was_evicted(s.cookie) && kernel.conns.get(&s.cookie, 0).is_err())
        .collect();
    let inodes: Vec<u64> = new.iter().map(|s| s.inode).collect();
    let owners = adopt::owners(Path::new("/proc"), &inodes);
    let range = adopt::ephemeral_range();
    let now = crate::clock::monotonic_ns();
    let (mut adopted, mut full) = (0, 0);
    for socket in &new {
        let owner = owners.get(&socket.inode).copied();
        let a = adopt::adoption(socket, ports, range, owner, now);
        // Never over an entry the kernel programs made in the meantime.
        match kernel.conns.insert(a.cookie, a.state, BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                full += 1;
                continue;
            }
            Err(_) => continue,
        }
        let _ = kernel.frames.insert(a.cookie, a.frames, BPF_NOEXIST);
        tracker.adopt(a.cookie, a.state, a.frames);
        adopted += 1;
    }
    let stale = if adopted > 0 { remove_stale_adoptions(kernel, now) } else { 0 };
    let refused = scan.skipped.iter().find(|(_, e)| {
        matches!(e, sockdiag::SockDiagError::Setns { source, .. }
            if source.raw_os_error() == Some(libc::EPERM))
    });
    if let Some((inode, error)) = refused {
        warn!(
            netns = inode,
            %error,
            namespaces = scan.skipped.len(),
            "cannot enter other network namespaces (entering one needs CAP_SYS_ADMIN): their connections already open are not adopted"
        );
    }
    info!(
        adopted,
        stale,
        not_adopted_map_full = full,
        namespaces = scan.namespaces,
        skipped = scan.skipped.len(),
        "adopted connections already open"
    );
}

/// Removes the adopted entries, made before `adopted_ns`, of sockets no longer in the kernel's
/// socket table: they closed before their entry was written, so no state change will remove it.
/// Returns how many; none when a namespace could not be read.
fn remove_stale_adoptions(kernel: &mut Kernel, adopted_ns: u64) -> usize {
    let scan = match sockdiag::scan_all_namespaces() {
        Ok(scan) if scan.skipped.is_empty() => scan,
        _ => return 0,
    };
    let alive: HashSet<u64> = scan.sockets.iter().map(|s| s.cookie).collect();
    let stale: Vec<u64> = kernel
        .read_conns()
        .into_iter()
        .filter(|(cookie, state)| {
            state.flags & observer_common::flags::ADOPTED != 0
                && state.established_ns <= adopted_ns
                && !alive.contains(cookie)
        })
        .map(|(cookie, _)| cookie)
        .collect();
    for cookie in &stale {
        let _ = kernel.frames.remove(cookie);
        let _ = kernel.conns.remove(cookie);
    }
    stale.len()
}

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

/// Removes what `plan` evicts from the kernel maps and the table.
fn evict(kernel: &mut Kernel, tracker: &mut Tracker, plan: &evict::Plan) {
    for &cookie in &plan.conns {
        // Frames first: an entry there without one in CONNS would never be removed.
        let _ = kernel.frames.remove(&cookie);
        let _ = kernel.stop_forwarding.remove(&cookie);
        let _ = kernel.conns.remove(&cookie);
        tracker.forget(cookie);
    }
    for cookie in &plan.frames {
        let _ = kernel.frames.remove(cookie);
    }
    if !plan.conns.is_empty() || !plan.frames.is_empty() {
        warn!(
            conns = plan.conns.len(),
            frames = plan.frames.len(),
            "kernel maps nearly full: evicted the longest idle entries"
        );
    }
}

/// Awaits the next request for the connection ends; never, when nobody serves them.
async fn next_request(requests: &mut Option<mpsc::Receiver<ViewRequest>>) -> Option<ViewRequest> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// Renders the metrics of one refresh and publishes them.
fn publish(watch: &mut Watch, shared: &Shared, pod_labels: bool) {
    if let Some(state) = &mut watch.state {
        state.save(watch.tracker.upgrades());
    }
    let kernel = &watch.kernel;
    let stats = kernel.stats();
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let pods = if pod_labels {
        watch.pods.pods(watch.open.iter().filter_map(|end| end.pid), Instant::now())
    } else {
        metrics::PodsByPid::new()
    };
    let mut metrics = metrics::render(&metrics::Inputs {
        open: &watch.open,
        pods: &pods,
        aggregates: watch.tracker.aggregates(),
        events_lost: stats[stat::EVENTS_LOST as usize],
        maps: &[
            metrics::MapInputs {
                name: evict::Map::Conns.label(),
                usage: watch.evictor.usage(evict::Map::Conns),
                insert_failures: stats[stat::CONNS_FULL as usize],
            },
            metrics::MapInputs {
                name: evict::Map::Frames.label(),
                usage: watch.evictor.usage(evict::Map::Frames),
                insert_failures: stats[stat::FRAMES_FULL as usize],
            },
        ],
        last_refresh_unix_seconds: now_unix,
        hooks: &kernel.hooks,
        pod_labels,
    });
    // What this refresh cost: reading the kernel map, verdicts and rendering.
    metrics::append_refresh_duration(&mut metrics, watch.refresh_started.elapsed().as_secs_f64());
    shared.publish(Snapshot { metrics, taken: Instant::now() });
}
