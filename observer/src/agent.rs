//! `observer run`: the event loop that ties the kernel side, the table and the endpoint together.
//!
//! One task owns the kernel maps and the table. It drains the ring buffer whenever it is readable
//! and, every refresh, reads every kernel entry, recomputes verdicts and publishes a snapshot that
//! the HTTP handlers serve.

use std::{
    collections::HashSet,
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
};
use tracing::{debug, info, warn};

use crate::{
    adopt,
    api::{self, Shared, Snapshot},
    cli::RunConfig,
    conntrack::{KernelAction, Tracker},
    evict::{self, Evictor},
    k8s,
    kernel::{Kernel, KernelConfig},
    metrics, sockdiag,
};

/// Why `observer run` stopped, mapped to the documented exit codes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The kernel programs could not be loaded or attached.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    /// The metrics address could not be bound.
    #[error("cannot listen on --metrics-addr {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl RunError {
    pub const fn exit_code(&self) -> u8 {
        match self {
            Self::Kernel(_) => 3,
            Self::Listen { .. } => 4,
            Self::Other(_) => 1,
        }
    }
}

pub async fn run(config: RunConfig) -> Result<(), RunError> {
    // Bind first: a busy port is cheaper to report than programs loaded for nothing.
    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| RunError::Listen { addr: config.metrics_addr, source })?;

    let mut kernel = Kernel::load(&KernelConfig {
        watched_ports: config.ports.clone(),
        max_connections: config.max_connections,
        max_websockets: config.max_websockets,
        event_buffer: config.event_buffer,
        cgroup: config.cgroup.clone(),
    })?;
    let events = kernel.events.take().context("ring buffer already taken")?;
    // SAFETY: the ring buffer owns its descriptor and lives inside the `AsyncFd` until the loop
    // ends, so the descriptor stays open and unshared for as long as it is registered.
    let mut events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;

    let shared = Arc::new(Shared::new(config.refresh));
    let app = api::router(Arc::clone(&shared));
    info!(addr = %config.metrics_addr, ports = ?config.ports, "serving /metrics, /connections, /healthz");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut tracker = Tracker::new(config.thresholds, config.pong_timeout);
    let mut evictor = Evictor::new(config.max_connections, config.max_websockets);
    let mut pods = k8s::Resolver::new("/proc", &config.pod_log_dir);
    adopt_existing(&mut kernel, &mut tracker, &mut evictor, &config.ports);
    let mut lost_when_adopted = kernel.stat(stat::EVENTS_LOST);
    let mut tick = tokio::time::interval(config.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;

    loop {
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut tracker, &mut kernel);
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let lost = kernel.stat(stat::EVENTS_LOST);
                if lost > lost_when_adopted {
                    // Opens or closes may be among the lost events: read the kernel's table again.
                    warn!(lost = lost - lost_when_adopted, "kernel events lost; adopting from the socket table");
                    adopt_existing(&mut kernel, &mut tracker, &mut evictor, &config.ports);
                    lost_when_adopted = lost;
                }
                refresh(&mut tracker, &mut kernel, &mut evictor, &shared, &mut pods, config.pod_labels);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
        if server.is_finished() {
            return Err(anyhow::anyhow!("the HTTP server stopped").into());
        }
    }
    info!(tracked = tracker.len(), "stopping; kernel programs detach with the process");
    Ok(())
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
        .conns
        .iter()
        .filter_map(Result::ok)
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

/// Reads every kernel entry, recomputes verdicts and publishes a snapshot.
fn refresh(
    tracker: &mut Tracker,
    kernel: &mut Kernel,
    evictor: &mut Evictor,
    shared: &Shared,
    pods: &mut k8s::Resolver,
    pod_labels: bool,
) {
    let started = Instant::now();
    let entries: Vec<_> = kernel.conns.iter().filter_map(Result::ok).collect();
    let frames = &kernel.frames;
    tracker.sync(entries.iter().copied(), |cookie| frames.get(&cookie, 0).ok());
    let plan = evictor.plan(&entries, |cookie| tracker.reported(cookie));
    evict(kernel, tracker, &plan);
    let mut connections = tracker.refresh(crate::clock::monotonic_ns());
    pods.annotate(&mut connections, Instant::now());
    let stats = kernel.stats();
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let mut metrics = metrics::render(&metrics::Inputs {
        connections: &connections,
        aggregates: tracker.aggregates(),
        events_lost: stats[stat::EVENTS_LOST as usize],
        maps: &[
            metrics::MapInputs {
                name: evict::Map::Conns.label(),
                usage: evictor.usage(evict::Map::Conns),
                insert_failures: stats[stat::CONNS_FULL as usize],
            },
            metrics::MapInputs {
                name: evict::Map::Frames.label(),
                usage: evictor.usage(evict::Map::Frames),
                insert_failures: stats[stat::FRAMES_FULL as usize],
            },
        ],
        last_refresh_unix_seconds: now_unix,
        hooks: &kernel.hooks,
        pod_labels,
    });
    // What this refresh cost: reading the kernel map, verdicts and rendering.
    metrics::append_refresh_duration(&mut metrics, started.elapsed().as_secs_f64());
    shared.publish(Snapshot { connections, metrics, taken: Instant::now() });
}
