//! Which container and which Kubernetes pod a connection end belongs to, found without any
//! network access.
//!
//! The process that owns a socket is known by its pid. Its `/proc/<pid>/cgroup` names the cgroup
//! the container runtime put it in, and that path carries the container ID and, under the kubelet,
//! the pod UID, in a shape that depends on the runtime and the cgroup driver:
//!
//! | runtime, driver | cgroup path (v2 line `0::`, or a v1 controller line) |
//! |---|---|
//! | containerd, systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | CRI-O, systemd | `/kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope` |
//! | Docker, systemd | `/system.slice/docker-<id>.scope` |
//! | any, cgroupfs | `/kubepods/burstable/pod<uid>/<id>`, `/docker/<id>` |
//!
//! A reader in its own cgroup namespace (the agent in a pod) sees other pods' paths relative to
//! its own root, prefixed with `/..` components; they are skipped.
//!
//! The kubelet keeps one log directory per pod, `/var/log/pods/<namespace>_<name>_<uid>/`, which
//! maps a pod UID to its namespace and name; namespaces and pod names cannot contain `_`.
//!
//! [`Resolver`] caches both lookups: a pid's cgroup is read again only after [`PID_TTL`], and the
//! pod directory is listed again only when an unknown pod UID shows up, at most once per
//! [`RESCAN_EVERY`].

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{conntrack::ConnectionView, metrics::PodsByPid};

/// How long a pid's attribution is trusted before its cgroup is read again (a pid may be reused,
/// or the process moved).
pub const PID_TTL: Duration = Duration::from_secs(10);

/// Least time between two listings of the pod log directory.
pub const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// Where a connection end's process runs, as far as the host can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// Kubernetes namespace of the pod.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Kubernetes pod name.
    #[serde(default)]
    pub pod: Option<String>,
    /// Container ID (64 hex digits) as the runtime names it.
    #[serde(default)]
    pub container: Option<String>,
    /// The process's cgroup v2 path.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Inode of the process's network namespace (`/proc/<pid>/ns/net`).
    #[serde(default)]
    pub netns: Option<u64>,
}

/// What a cgroup path tells about its process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupIds {
    /// Pod UID with dashes (`0f5c…-…`), or the 32 hex digits of a static pod.
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
}

impl CgroupIds {
    fn is_empty(&self) -> bool {
        self.pod_uid.is_none() && self.container_id.is_none()
    }
}

/// Reads the contents of `/proc/<pid>/cgroup`. The cgroup v2 line (`0::/path`) is preferred; on
/// hybrid hosts, where the kubelet may use the v1 controllers, the first v1 line that names a
/// pod or a container is taken instead.
pub fn parse_proc_cgroup(text: &str) -> CgroupIds {
    let mut unified = None;
    let mut legacy = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(_controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" {
            unified = Some(path);
        } else {
            legacy.push(path);
        }
    }
    if let Some(ids) = unified.map(parse_cgroup_path).filter(|ids| !ids.is_empty()) {
        return ids;
    }
    legacy.into_iter().map(parse_cgroup_path).find(|ids| !ids.is_empty()).unwrap_or_default()
}

/// The cgroup v2 path (`0::/path`) in the contents of `/proc/<pid>/cgroup`.
pub fn unified_cgroup(text: &str) -> Option<String> {
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_owned)
}

/// The inode in a namespace link such as `net:[4026531840]`.
pub fn parse_ns_link(link: &str) -> Option<u64> {
    link.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// Finds the pod UID and the container ID in one cgroup path. The container is the deepest
/// component that names one, so a process in a sub-cgroup of its container still counts.
pub fn parse_cgroup_path(path: &str) -> CgroupIds {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != "..").collect();
    CgroupIds {
        pod_uid: parts.iter().find_map(|p| pod_uid(p)),
        container_id: parts.iter().rev().find_map(|p| container_id(p)).map(str::to_owned),
    }
}

/// `kubepods-burstable-pod<uid_with_underscores>.slice` (systemd driver) or `pod<uid>`
/// (cgroupfs driver).
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(slice) => slice.rsplit('-').next()?.strip_prefix("pod")?.replace('_', "-"),
        None => part.strip_prefix("pod")?.to_owned(),
    };
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID (36 characters with dashes), or the 32 hex digits the kubelet gives static pods.
fn is_pod_uid(uid: &str) -> bool {
    let hex = uid.bytes().filter(u8::is_ascii_hexdigit).count();
    let dashes = uid.bytes().filter(|&b| b == b'-').count();
    hex + dashes == uid.len()
        && ((uid.len() == 36 && dashes == 4) || (uid.len() == 32 && dashes == 0))
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`,
/// or a bare `<id>` (cgroupfs driver).
fn container_id(part: &str) -> Option<&str> {
    let name = part.strip_suffix(".scope").unwrap_or(part);
    let id = ["cri-containerd-", "crio-", "docker-", "libpod-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// `(uid, namespace, name)` of a kubelet pod log directory named `<namespace>_<name>_<uid>`.
pub fn parse_pod_log_dir(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.split('_');
    let (namespace, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    let valid =
        parts.next().is_none() && !namespace.is_empty() && !pod.is_empty() && is_pod_uid(uid);
    valid.then_some((uid, namespace, pod))
}

struct PidEntry {
    ids: CgroupIds,
    cgroup: Option<String>,
    netns: Option<u64>,
    read_at: Instant,
}

/// Attributes connection ends to containers and pods, with the caches described above.
pub struct Resolver {
    proc_root: PathBuf,
    pod_log_dir: PathBuf,
    by_pid: HashMap<u32, PidEntry>,
    /// Pod UID to `(namespace, name)`.
    pods: HashMap<String, (String, String)>,
    listed_at: Option<Instant>,
}

impl Resolver {
    pub fn new(proc_root: impl Into<PathBuf>, pod_log_dir: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            pod_log_dir: pod_log_dir.into(),
            by_pid: HashMap::new(),
            pods: HashMap::new(),
            listed_at: None,
        }
    }

    /// Fills in the attribution of every connection end whose pid is known.
    pub fn annotate(&mut self, connections: &mut [ConnectionView], now: Instant) {
        let mut live = HashSet::new();
        for c in connections.iter_mut() {
            let Some(pid) = c.pid else { continue };
            live.insert(pid);
            c.attribution = self.attribution(pid, now);
        }
        self.by_pid.retain(|pid, _| live.contains(pid));
    }

    /// The `(namespace, pod)` of each of `pids` that runs in a pod, for the metrics' pod labels.
    pub fn pods(&mut self, pids: impl Iterator<Item = u32>, now: Instant) -> PodsByPid {
        let live: HashSet<u32> = pids.collect();
        let mut pods = PodsByPid::new();
        for &pid in &live {
            let a = self.attribution(pid, now);
            if let (Some(namespace), Some(pod)) = (a.namespace, a.pod) {
                pods.insert(pid, (namespace, pod));
            }
        }
        self.by_pid.retain(|pid, _| live.contains(pid));
        pods
    }

    fn attribution(&mut self, pid: u32, now: Instant) -> Attribution {
        let fresh = self.by_pid.get(&pid).is_some_and(|e| now.duration_since(e.read_at) < PID_TTL);
        if !fresh {
            // A process that is already gone keeps no attribution.
            let dir = self.proc_root.join(pid.to_string());
            let text = fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
            let ids = parse_proc_cgroup(&text);
            let cgroup = unified_cgroup(&text);
            let netns = fs::read_link(dir.join("ns/net"))
                .ok()
                .and_then(|link| parse_ns_link(&link.to_string_lossy()));
            self.by_pid.insert(pid, PidEntry { ids, cgroup, netns, read_at: now });
        }
        let entry = &self.by_pid[&pid];
        let (cgroup, netns) = (entry.cgroup.clone(), entry.netns);
        let ids = entry.ids.clone();
        let pod = ids.pod_uid.as_deref().and_then(|uid| self.pod(uid, now));
        Attribution {
            namespace: pod.as_ref().map(|(ns, _)| ns.clone()),
            pod: pod.map(|(_, name)| name),
            container: ids.container_id,
            cgroup,
            netns,
        }
    }

    fn pod(&mut self, uid: &str, now: Instant) -> Option<(String, String)> {
        if !self.pods.contains_key(uid)
            && self.listed_at.is_none_or(|at| now.duration_since(at) >= RESCAN_EVERY)
        {
            self.list_pods(now);
        }
        self.pods.get(uid).cloned()
    }

    fn list_pods(&mut self, now: Instant) {
        self.listed_at = Some(now);
        self.pods.clear();
        let Ok(entries) = fs::read_dir(&self.pod_log_dir) else {
            tracing::debug!(dir = %self.pod_log_dir.display(), "no pod log directory");
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some((uid, namespace, pod)) = name.to_str().and_then(parse_pod_log_dir) {
                self.pods.insert(uid.to_owned(), (namespace.to_owned(), pod.to_owned()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c9c0d8e0b2f7a6d5c4b3a29181716151413121110f0e0d0c0b0a090807060";
    const UID: &str = "0f5c2e4a-9b1d-4c3e-8f7a-6b5d4c3e2f1a";
    const UID_: &str = "0f5c2e4a_9b1d_4c3e_8f7a_6b5d4c3e2f1a";

    fn ids(pod: Option<&str>, container: Option<&str>) -> CgroupIds {
        CgroupIds { pod_uid: pod.map(Into::into), container_id: container.map(Into::into) }
    }

    #[test]
    fn containerd_with_systemd_driver() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/\
             cri-containerd-{ID}.scope"
        );
        assert_eq!(parse_cgroup_path(&path), ids(Some(UID), Some(ID)));
    }

    #[test]
    fn guaranteed_and_besteffort_pods() {
        let guaranteed =
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(parse_cgroup_path(&guaranteed), ids(Some(UID), Some(ID)));
        let besteffort = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/\
             cri-containerd-{ID}.scope"
        );
        assert_eq!(parse_cgroup_path(&besteffort), ids(Some(UID), Some(ID)));
    }

    #[test]
    fn kind_nodes_nest_kubepods_under_kubelet_slice() {
        let path = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse_cgroup_path(&path), ids(Some(UID), Some(ID)));
    }

    #[test]
    fn crio_with_systemd_driver_ignores_conmon() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"
        );
        assert_eq!(parse_cgroup_path(&path), ids(Some(UID), Some(ID)));
        let conmon = format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope");
        assert_eq!(parse_cgroup_path(&conmon), ids(Some(UID), None));
    }

    #[test]
    fn docker_outside_kubernetes() {
        let systemd = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(parse_cgroup_path(&systemd), ids(None, Some(ID)));
        assert_eq!(parse_cgroup_path(&format!("/docker/{ID}")), ids(None, Some(ID)));
    }

    #[test]
    fn cgroupfs_driver() {
        let burstable = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(parse_cgroup_path(&burstable), ids(Some(UID), Some(ID)));
        let guaranteed = format!("/kubepods/pod{UID}/{ID}");
        assert_eq!(parse_cgroup_path(&guaranteed), ids(Some(UID), Some(ID)));
    }

    #[test]
    fn static_pod_uid_is_a_hash() {
        let hash = "5c7b3d8e1f2a4b6c9d0e7f8a1b2c3d4e";
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse_cgroup_path(&path), ids(Some(hash), Some(ID)));
    }

    #[test]
    fn paths_seen_from_another_cgroup_namespace() {
        let path = format!("/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(parse_cgroup_path(&path), ids(Some(UID), Some(ID)));
        let cgroupfs = format!("/../../../burstable/pod{UID}/{ID}");
        assert_eq!(parse_cgroup_path(&cgroupfs), ids(Some(UID), Some(ID)));
    }

    #[test]
    fn sub_cgroup_of_a_container_keeps_its_container() {
        let path = format!("/system.slice/docker-{ID}.scope/init.scope");
        assert_eq!(parse_cgroup_path(&path), ids(None, Some(ID)));
    }

    #[test]
    fn host_processes_belong_to_nothing() {
        for path in [
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/kubelet.service",
            "/kubepods.slice/kubepods-burstable.slice",
            "/system.slice/docker-notanid.scope",
            "/kubepods/burstable/podnot-a-uid",
        ] {
            assert_eq!(parse_cgroup_path(path), CgroupIds::default(), "{path}");
        }
    }

    #[test]
    fn unified_line_is_preferred() {
        let text = format!(
            "12:pids:/system.slice/docker-{ID}.scope\n0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse_proc_cgroup(&text), ids(Some(UID), Some(ID)));
    }

    #[test]
    fn hybrid_host_falls_back_to_v1_lines() {
        // cgroup v2 mounted beside v1 controllers, the kubelet on the v1 ones.
        let text = format!(
            "12:cpuset:/kubepods/burstable/pod{UID}/{ID}\n\
             11:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n\
             0::/\n"
        );
        assert_eq!(parse_proc_cgroup(&text), ids(Some(UID), Some(ID)));
        let host = "9:name=systemd:/\n4:memory:/process_api/23a6e97e\n0::/\n";
        assert_eq!(parse_proc_cgroup(host), CgroupIds::default());
        assert_eq!(parse_proc_cgroup(""), CgroupIds::default());
    }

    #[test]
    fn pod_log_directories() {
        let dir = format!("kube-system_coredns-5d78c9869d-x2x8q_{UID}");
        assert_eq!(parse_pod_log_dir(&dir), Some((UID, "kube-system", "coredns-5d78c9869d-x2x8q")));
        let static_pod = "kube-system_kube-apiserver-node-1_5c7b3d8e1f2a4b6c9d0e7f8a1b2c3d4e";
        assert_eq!(
            parse_pod_log_dir(static_pod),
            Some(("5c7b3d8e1f2a4b6c9d0e7f8a1b2c3d4e", "kube-system", "kube-apiserver-node-1"))
        );
        for bad in ["", "a_b", &format!("a_b_c_{UID}"), "ns_pod_not-a-uid", &format!("_pod_{UID}")]
        {
            assert_eq!(parse_pod_log_dir(bad), None, "{bad}");
        }
    }

    fn view(pid: u32) -> ConnectionView {
        ConnectionView {
            pid: Some(pid),
            port: 1,
            role: "server".into(),
            ..ConnectionView::default()
        }
    }

    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolver_reads_proc_and_pod_dirs_and_caches() {
        let root = std::env::temp_dir().join(format!("observer-k8s-{}", std::process::id()));
        let _cleanup = Scratch(root.clone());
        let (proc_root, pods) = (root.join("proc"), root.join("pods"));
        fs::create_dir_all(proc_root.join("42")).unwrap();
        fs::create_dir_all(&pods).unwrap();
        let cgroup =
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope\n");
        fs::write(proc_root.join("42/cgroup"), cgroup).unwrap();

        let mut resolver = Resolver::new(&proc_root, &pods);
        let t0 = Instant::now();
        let mut conns = [view(42), view(7)];
        resolver.annotate(&mut conns, t0);
        let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope");
        let unnamed = Attribution {
            container: Some(ID.into()),
            cgroup: Some(path.clone()),
            ..Attribution::default()
        };
        assert_eq!(conns[0].attribution, unnamed, "pod dir not there yet");
        assert_eq!(conns[1].attribution, Attribution::default(), "no such process");

        // The pod's log directory appears; it is found at the next listing, not before.
        fs::create_dir(pods.join(format!("shop_cart-7d4b9_{UID}"))).unwrap();
        resolver.annotate(&mut conns, t0 + Duration::from_secs(1));
        assert_eq!(conns[0].attribution, unnamed);
        resolver.annotate(&mut conns, t0 + RESCAN_EVERY);
        let named = Attribution {
            namespace: Some("shop".into()),
            pod: Some("cart-7d4b9".into()),
            container: Some(ID.into()),
            cgroup: Some(path),
            netns: None,
        };
        assert_eq!(conns[0].attribution, named);

        // The cgroup is cached for PID_TTL, then read again.
        fs::write(proc_root.join("42/cgroup"), "0::/user.slice\n").unwrap();
        resolver.annotate(&mut conns, t0 + RESCAN_EVERY + Duration::from_secs(1));
        assert_eq!(conns[0].attribution, named);
        resolver.annotate(&mut conns, t0 + RESCAN_EVERY + PID_TTL);
        let outside = Attribution { cgroup: Some("/user.slice".into()), ..Attribution::default() };
        assert_eq!(conns[0].attribution, outside);

        // Pids without connections leave the cache.
        resolver.annotate(&mut [], t0);
        assert!(resolver.by_pid.is_empty());
    }

    #[test]
    fn attribution_is_flat_json_fields() {
        let mut v = view(1);
        v.attribution.pod = Some("p".into());
        v.attribution.netns = Some(4026531840);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["pod"], "p");
        assert_eq!(json["netns"], 4026531840u64);
        assert!(json["namespace"].is_null() && json["container"].is_null());
        assert!(json["cgroup"].is_null());
        let back: ConnectionView = serde_json::from_value(json).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn namespace_links_and_unified_paths() {
        assert_eq!(parse_ns_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_ns_link("net:4026531840"), None);
        let text = "12:memory:/kubepods\n0::/system.slice/nginx.service\n";
        assert_eq!(unified_cgroup(text).as_deref(), Some("/system.slice/nginx.service"));
        assert_eq!(unified_cgroup("1:name=systemd:/\n"), None);
    }
}
