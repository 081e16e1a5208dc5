//! Loading and attaching the kernel programs, and the maps the agent reads.
//!
//! Everything is attached through links owned by this process: when the agent exits, however it
//! exits, the kernel detaches the programs and frees the maps. Nothing is pinned.

use std::{
    fs,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SockOps},
};
use observer_common::{ConnState, WsState, stat};
use tracing::{debug, info, warn};

/// The compiled kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// Why the kernel programs could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No cgroup v2 hierarchy to attach the socket programs to.
    #[error(
        "no cgroup v2 hierarchy is mounted; mount one (e.g. `mount -t cgroup2 none /sys/fs/cgroup`) \
         or name it with --cgroup"
    )]
    NoCgroup2,
    /// The cgroup directory could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    OpenCgroup { path: PathBuf, source: std::io::Error },
    /// The kernel's BTF could not be read (needed by the `tp_btf` programs).
    #[error(
        "cannot read the kernel's BTF at /sys/kernel/btf/vmlinux ({0}); observer needs a kernel \
         built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    Btf(#[source] aya::BtfError),
    /// The BPF object was refused as a whole (usually missing privileges).
    #[error(
        "cannot load the kernel programs ({0}); run as root or grant CAP_BPF, CAP_PERFMON, \
         CAP_NET_ADMIN and CAP_SYS_ADMIN"
    )]
    Load(#[source] Box<aya::EbpfError>),
    /// One program failed to load or attach.
    #[error("cannot {action} program {program} ({attach_point}): {source}; {fix}")]
    Program {
        action: &'static str,
        program: &'static str,
        attach_point: String,
        source: Box<aya::programs::ProgramError>,
        /// What to change on the host.
        fix: &'static str,
    },
    /// A map the agent needs is missing from the object or has an unexpected type.
    #[error("kernel object has no usable map {name}: {source}")]
    Map { name: &'static str, source: Box<aya::maps::MapError> },
}

const TRACEPOINT_FIX: &str = "the kernel lacks this tracepoint or its BTF: observer needs Linux \
     6.3 or later built with CONFIG_DEBUG_INFO_BTF=y";
const CGROUP_FIX: &str = "attaching to a cgroup needs CAP_NET_ADMIN and CAP_BPF, and a cgroup v2 \
     directory (name one with --cgroup)";

/// What the agent asks of the kernel side.
pub struct KernelConfig {
    /// Server ports whose connections are tracked whatever they carry.
    pub watched_ports: Vec<u16>,
    /// Most connection ends tracked at once.
    pub max_connections: u32,
    /// Most connections with frame tracking at once.
    pub max_websockets: u32,
    /// Size of the event ring buffer in bytes, a power of two.
    pub event_buffer: u32,
    /// The cgroup v2 directory to attach to; the hierarchy's root when `None`.
    pub cgroup: Option<PathBuf>,
}

/// Up to this many frame entries are looked up one by one rather than read with the whole map.
const FEW_LOOKUPS: usize = 64;

/// The loaded programs and the maps the agent reads.
pub struct Kernel {
    /// Keeps the programs and their links alive.
    _ebpf: Ebpf,
    pub conns: HashMap<MapData, u64, ConnState>,
    pub frames: HashMap<MapData, u64, WsState>,
    pub stop_forwarding: HashMap<MapData, u64, u8>,
    pub stats: PerCpuArray<MapData, u64>,
    /// Second descriptors of `conns` and `frames`, for whole-map batch reads.
    conns_fd: OwnedFd,
    frames_fd: OwnedFd,
    /// Batch reads failed once: walk the maps key by key from then on.
    no_batch: AtomicBool,
    /// Taken by the event loop.
    pub events: Option<RingBuf<MapData>>,
    /// Optional programs, and whether each is attached.
    pub hooks: Vec<(&'static str, bool)>,
}

impl Kernel {
    /// Loads every program and attaches it for all sockets of the host.
    pub fn load(config: &KernelConfig) -> Result<Self, KernelError> {
        ensure_mounts();
        raise_memlock();
        let cgroup_path = match &config.cgroup {
            Some(path) => path.clone(),
            None => find_cgroup2_root().ok_or(KernelError::NoCgroup2)?,
        };
        let cgroup = fs::File::open(&cgroup_path)
            .map_err(|source| KernelError::OpenCgroup { path: cgroup_path.clone(), source })?;

        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CONNS", config.max_connections)
            .map_max_entries("STOP_FWD", config.max_connections)
            .map_max_entries("FRAMES", config.max_websockets)
            .map_max_entries("EVENTS", config.event_buffer)
            .load(OBJECT)
            .map_err(|e| KernelError::Load(Box::new(e)))?;

        let mut watched: HashMap<_, u16, u8> = take_map(&mut ebpf, "WATCHED_PORTS")?;
        for &port in &config.watched_ports {
            watched.insert(port, 1, 0).map_err(|source| KernelError::Map {
                name: "WATCHED_PORTS",
                source: Box::new(source),
            })?;
        }

        let btf = Btf::from_sys_fs().map_err(KernelError::Btf)?;
        for (program, tracepoint) in [
            ("observer_send", "sock_send_length"),
            ("observer_recv", "sock_recv_length"),
            ("observer_adopted_state", "inet_sock_set_state"),
        ] {
            let failed = |action, source| KernelError::Program {
                action,
                program,
                attach_point: format!("tp_btf/{tracepoint}"),
                fix: TRACEPOINT_FIX,
                source: Box::new(source),
            };
            let prog: &mut BtfTracePoint = program_mut(&mut ebpf, program)?;
            prog.load(tracepoint, &btf).map_err(|e| failed("load", e))?;
            prog.attach().map_err(|e| failed("attach", e))?;
        }

        // Optional: without them, how connections ended is less precise, nothing else changes.
        let mut hooks = Vec::new();
        for (program, tracepoint, lost) in [
            ("observer_rst_in", "tcp_receive_reset", "resets received"),
            ("observer_rst_out", "tcp_send_reset", "resets sent"),
        ] {
            let prog: &mut BtfTracePoint = program_mut(&mut ebpf, program)?;
            let attached = prog.load(tracepoint, &btf).and_then(|()| prog.attach().map(drop));
            if let Err(error) = &attached {
                warn!(
                    program,
                    attach_point = %format!("tp_btf/{tracepoint}"),
                    %error,
                    "optional hook not attached: {lost} are not told apart from clean closes"
                );
            }
            hooks.push((program, attached.is_ok()));
        }

        let cgroup_point = |kind: &str| format!("{kind} on cgroup {}", cgroup_path.display());
        for (program, attach_type, kind) in [
            ("observer_ingress", CgroupSkbAttachType::Ingress, "cgroup_skb/ingress"),
            ("observer_egress", CgroupSkbAttachType::Egress, "cgroup_skb/egress"),
        ] {
            let failed = |action, source| KernelError::Program {
                action,
                program,
                attach_point: cgroup_point(kind),
                fix: CGROUP_FIX,
                source: Box::new(source),
            };
            let prog: &mut CgroupSkb = program_mut(&mut ebpf, program)?;
            prog.load().map_err(|e| failed("load", e))?;
            prog.attach(cgroup.as_fd(), attach_type, CgroupAttachMode::Single)
                .map_err(|e| failed("attach", e))?;
        }

        // Last, so that every other hook is in place when the first entry appears.
        let program = "observer_sock_ops";
        let failed = |action, source| KernelError::Program {
            action,
            program,
            attach_point: cgroup_point("sock_ops"),
            fix: CGROUP_FIX,
            source: Box::new(source),
        };
        let prog: &mut SockOps = program_mut(&mut ebpf, program)?;
        prog.load().map_err(|e| failed("load", e))?;
        prog.attach(cgroup.as_fd(), CgroupAttachMode::Single).map_err(|e| failed("attach", e))?;
        info!(cgroup = %cgroup_path.display(), "kernel programs attached");

        Ok(Self {
            conns_fd: map_fd(&ebpf, "CONNS")?,
            frames_fd: map_fd(&ebpf, "FRAMES")?,
            no_batch: AtomicBool::new(false),
            conns: take_map(&mut ebpf, "CONNS")?,
            frames: take_map(&mut ebpf, "FRAMES")?,
            stop_forwarding: take_map(&mut ebpf, "STOP_FWD")?,
            stats: take_map(&mut ebpf, "STATS")?,
            events: Some(take_map(&mut ebpf, "EVENTS")?),
            hooks,
            _ebpf: ebpf,
        })
    }

    /// Every connection end in `CONNS`.
    pub fn read_conns(&self) -> Vec<(u64, ConnState)> {
        let mut entries = Vec::new();
        self.read_conns_into(&mut entries);
        entries
    }

    /// Every connection end in `CONNS`, into `out` (replacing what it held, keeping its memory).
    pub fn read_conns_into(&self, out: &mut Vec<(u64, ConnState)>) {
        self.read_all(&self.conns_fd, &self.conns, out);
    }

    /// The frame tracking of the connections in `cookies` that have any, into `out`. `entries`
    /// is about how many entries `FRAMES` holds: for a few cookies among many, one lookup each
    /// costs less than reading the whole map, and the other way round.
    pub fn read_frames_into(&self, cookies: &[u64], entries: u64, out: &mut Vec<(u64, WsState)>) {
        out.clear();
        if cookies.is_empty() {
            return;
        }
        let few = cookies.len() <= FEW_LOOKUPS || (cookies.len() as u64) * 16 <= entries;
        if few {
            out.extend(
                cookies
                    .iter()
                    .filter_map(|&cookie| Some((cookie, self.frames.get(&cookie, 0).ok()?))),
            );
        } else {
            self.read_all(&self.frames_fd, &self.frames, out);
        }
    }

    /// A whole map into `out`, in batches when the kernel can, else key by key.
    fn read_all<V: aya::Pod + Default>(
        &self,
        fd: &OwnedFd,
        map: &HashMap<MapData, u64, V>,
        out: &mut Vec<(u64, V)>,
    ) {
        if !self.no_batch.load(Ordering::Relaxed) {
            match crate::batch::read_hash(fd.as_fd(), out) {
                Ok(()) => return,
                Err(error) => {
                    warn!(%error, "batch map reads refused: reading the maps key by key, which costs more");
                    self.no_batch.store(true, Ordering::Relaxed);
                }
            }
        }
        out.clear();
        out.extend(map.iter().filter_map(Result::ok));
    }

    /// Sum over CPUs of one kernel-side counter.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats.get(&index, 0).map(|values| values.iter().sum()).unwrap_or(0)
    }

    /// Every kernel-side counter, indexed by [`stat`].
    pub fn stats(&self) -> [u64; stat::COUNT as usize] {
        std::array::from_fn(|i| self.stat(i as u32))
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(KernelError::Map {
        name,
        source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }),
    })?;
    T::try_from(map).map_err(|source| KernelError::Map { name, source: Box::new(source) })
}

/// A descriptor of its own for the map `name`, still in `ebpf`.
fn map_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, KernelError> {
    let missing = |source| KernelError::Map { name, source: Box::new(source) };
    let data = match ebpf.map(name) {
        Some(aya::maps::Map::HashMap(data)) => data,
        _ => return Err(missing(aya::maps::MapError::InvalidName { name: name.into() })),
    };
    data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        missing(aya::maps::MapError::SyscallError(aya::sys::SyscallError { call: "dup", io_error }))
    })
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let missing = |source| KernelError::Program {
        action: "find",
        program: name,
        attach_point: "kernel object".into(),
        fix: "the agent binary is damaged: rebuild it with `cargo xtask build`",
        source: Box::new(source),
    };
    let program =
        ebpf.program_mut(name).ok_or_else(|| missing(aya::programs::ProgramError::NotLoaded))?;
    program.try_into().map_err(missing)
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn find_cgroup2_root() -> Option<PathBuf> {
    mounts().into_iter().find(|(_, fstype)| fstype == "cgroup2").map(|(point, _)| point.into())
}

/// `(mount point, filesystem type)` of every mount of this process's mount namespace.
fn mounts() -> Vec<(String, String)> {
    let text = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let point = fields.next()?;
            let fstype = fields.next()?;
            Some((point.to_owned(), fstype.to_owned()))
        })
        .collect()
}

/// Mounts bpffs and tracefs at their usual places when they are missing. Neither is needed by
/// the programs themselves, but tools an operator uses beside observer (`bpftool`) expect them.
fn ensure_mounts() {
    let mounted = mounts();
    for (fstype, point) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        if mounted.iter().any(|(p, t)| t == fstype && p == point) || !Path::new(point).is_dir() {
            continue;
        }
        let c_point = std::ffi::CString::new(point).expect("no NUL in a constant path");
        let c_type = std::ffi::CString::new(fstype).expect("no NUL in a constant name");
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(c_type.as_ptr(), c_point.as_ptr(), c_type.as_ptr(), 0, std::ptr::null())
        };
        if rc == 0 {
            info!(fstype, point, "mounted missing filesystem");
        } else {
            warn!(fstype, point, error = %std::io::Error::last_os_error(), "could not mount");
        }
    }
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`; later ones to the memory cgroup,
/// where raising the limit is unnecessary (and may be refused without CAP_SYS_RESOURCE).
fn raise_memlock() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!(error = %std::io::Error::last_os_error(), "RLIMIT_MEMLOCK not raised");
    }
}
