//! Every metric observer exports, rendered in the Prometheus text format.
//!
//! Names follow `prefix_name_unit[_total]`; labels are only the server `port`, the `role`, the
//! verdict `state` and the `result`, so the number of series is bounded by the ports watched, never
//! by connections, processes or addresses. With `--pod-labels`, the gauges of open connections
//! also carry the Kubernetes `namespace` and `pod`: one series per port, role and pod that has an
//! open connection now, so the count follows the pods running on the node.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use crate::{
    conntrack::{ConnectionView, Outcomes, SeriesKey},
    verdict::Verdict,
};

/// What one rendering needs.
pub struct Inputs<'a> {
    pub connections: &'a [ConnectionView],
    pub totals: &'a BTreeMap<(SeriesKey, Outcomes), u64>,
    pub known: &'a BTreeSet<SeriesKey>,
    pub events_lost: u64,
    pub untracked_map_full: u64,
    pub last_refresh_unix_seconds: f64,
    /// Break the gauges of open connections down by `namespace` and `pod`.
    pub pod_labels: bool,
}

/// `(namespace, pod)` of a gauge series; `None` without `--pod-labels` or outside any pod.
type PodKey<'a> = Option<(&'a str, &'a str)>;

#[derive(Default)]
struct PerSeries {
    open: u64,
    by_state: [u64; Verdict::ALL.len()],
    send_queue: u64,
    recv_queue: u64,
}

/// Renders the whole exposition.
pub fn render(inputs: &Inputs<'_>) -> String {
    let mut series: BTreeMap<(SeriesKey, PodKey<'_>), PerSeries> = BTreeMap::new();
    for c in inputs.connections {
        let role: &'static str = if c.role == "client" { "client" } else { "server" };
        let a = &c.attribution;
        let pod =
            if inputs.pod_labels { a.namespace.as_deref().zip(a.pod.as_deref()) } else { None };
        let s = series.entry(((c.port, role), pod)).or_default();
        s.open += 1;
        s.by_state[Verdict::ALL.iter().position(|v| *v == c.state).unwrap_or(0)] += 1;
        s.send_queue += c.send_queue_bytes;
        s.recv_queue += c.recv_queue_bytes;
    }
    // Known ports and roles with no open connection show zeros rather than vanishing.
    for &key in inputs.known {
        if !series.keys().any(|(k, _)| *k == key) {
            series.insert((key, None), PerSeries::default());
        }
    }

    let mut out = String::with_capacity(4096);
    header(&mut out, "websocket_connections_active", "gauge", "Open WebSocket connection ends.");
    for (((port, role), pod), s) in &series {
        let labels = with_pod(&[("port", port), ("role", role)], pod);
        sample(&mut out, "websocket_connections_active", &labels, s.open);
    }

    header(
        &mut out,
        "websocket_connections_total",
        "counter",
        "WebSocket connection ends seen opening (accept) and closing (close).",
    );
    for (((port, role), outcome), n) in inputs.totals {
        let labels = [("port", &port.to_string() as &dyn std::fmt::Display), ("role", role)];
        sample_dyn(&mut out, "websocket_connections_total", &labels, outcome.as_str(), *n);
    }

    header(
        &mut out,
        "websocket_connections_by_state",
        "gauge",
        "Open WebSocket connection ends by liveness verdict.",
    );
    for (((port, role), pod), s) in &series {
        for (i, verdict) in Verdict::ALL.iter().enumerate() {
            let labels = with_pod(&[("port", port), ("role", role), ("state", verdict)], pod);
            sample(&mut out, "websocket_connections_by_state", &labels, s.by_state[i]);
        }
    }

    header(
        &mut out,
        "websocket_buffered_amount_bytes",
        "gauge",
        "Bytes written by applications and not yet acknowledged by the peer, summed.",
    );
    for (((port, role), pod), s) in &series {
        let labels = with_pod(&[("port", port), ("role", role)], pod);
        sample(&mut out, "websocket_buffered_amount_bytes", &labels, s.send_queue);
    }

    header(
        &mut out,
        "websocket_receive_queue_bytes",
        "gauge",
        "Bytes received from the peer and not yet read by the application, summed.",
    );
    for (((port, role), pod), s) in &series {
        let labels = with_pod(&[("port", port), ("role", role)], pod);
        sample(&mut out, "websocket_receive_queue_bytes", &labels, s.recv_queue);
    }

    header(&mut out, "observer_build_info", "gauge", "Build of the running agent.");
    let version: &dyn std::fmt::Display = &env!("CARGO_PKG_VERSION");
    sample(&mut out, "observer_build_info", &[("version", version)], 1);

    header(
        &mut out,
        "observer_events_lost_total",
        "counter",
        "Kernel events dropped because the ring buffer was full.",
    );
    sample(&mut out, "observer_events_lost_total", &[], inputs.events_lost);

    header(
        &mut out,
        "observer_untracked_connections_total",
        "counter",
        "TCP connections not tracked because the connection map was full.",
    );
    sample(&mut out, "observer_untracked_connections_total", &[], inputs.untracked_map_full);

    header(
        &mut out,
        "observer_last_refresh_timestamp_seconds",
        "gauge",
        "Unix time of the last completed refresh of all verdicts.",
    );
    let _ = writeln!(
        out,
        "observer_last_refresh_timestamp_seconds {:.3}",
        inputs.last_refresh_unix_seconds
    );
    out
}

/// `labels`, then `namespace` and `pod` when the series has them.
fn with_pod<'a>(
    labels: &[(&'a str, &'a dyn std::fmt::Display)],
    pod: &'a PodKey<'a>,
) -> Vec<(&'a str, &'a dyn std::fmt::Display)> {
    let mut all = labels.to_vec();
    if let Some((namespace, name)) = pod {
        all.push(("namespace", namespace));
        all.push(("pod", name));
    }
    all
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &dyn std::fmt::Display)], value: u64) {
    out.push_str(name);
    write_labels(out, labels, None);
    let _ = writeln!(out, " {value}");
}

/// A sample with a trailing `result` label.
fn sample_dyn(
    out: &mut String,
    name: &str,
    labels: &[(&str, &dyn std::fmt::Display)],
    result: &str,
    value: u64,
) {
    out.push_str(name);
    write_labels(out, labels, Some(("result", result)));
    let _ = writeln!(out, " {value}");
}

fn write_labels(
    out: &mut String,
    labels: &[(&str, &dyn std::fmt::Display)],
    last: Option<(&str, &str)>,
) {
    if labels.is_empty() && last.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    let mut put = |out: &mut String, key: &str, value: String| {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{key}=\"{}\"", escape(&value));
    };
    for (key, value) in labels {
        put(out, key, value.to_string());
    }
    if let Some((key, value)) = last {
        put(out, key, value.to_owned());
    }
    out.push('}');
}

/// Escapes a label value as the text format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(port: u16, role: &str, state: Verdict, sendq: u64, recvq: u64) -> ConnectionView {
        ConnectionView {
            local_addr: "127.0.0.1:1".into(),
            remote_addr: "127.0.0.1:2".into(),
            role: role.into(),
            port,
            pid: Some(1),
            comm: Some("x".into()),
            websocket: true,
            state,
            tcp_state: "ESTABLISHED".into(),
            age_seconds: 1.0,
            last_send_age_seconds: None,
            last_recv_age_seconds: None,
            last_read_age_seconds: None,
            send_queue_bytes: sendq,
            recv_queue_bytes: recvq,
            bytes_sent: 0,
            bytes_received: 0,
            cookie: 1,
            attribution: Default::default(),
        }
    }

    #[test]
    fn renders_aggregates_per_port_and_role() {
        let connections = [
            conn(8080, "server", Verdict::Active, 10, 0),
            conn(8080, "server", Verdict::NotReading, 5, 700),
            conn(8080, "client", Verdict::Idle, 0, 0),
        ];
        let mut totals = BTreeMap::new();
        totals.insert(((8080, "server"), Outcomes::Accept), 3);
        totals.insert(((8080, "server"), Outcomes::Close), 1);
        let mut known = BTreeSet::new();
        known.insert((9090, "server"));
        let text = render(&Inputs {
            connections: &connections,
            totals: &totals,
            known: &known,
            events_lost: 4,
            untracked_map_full: 0,
            last_refresh_unix_seconds: 1_700_000_000.5,
            pod_labels: false,
        });
        for line in [
            "websocket_connections_active{port=\"8080\",role=\"server\"} 2",
            "websocket_connections_active{port=\"8080\",role=\"client\"} 1",
            "websocket_connections_active{port=\"9090\",role=\"server\"} 0",
            "websocket_connections_total{port=\"8080\",role=\"server\",result=\"accept\"} 3",
            "websocket_connections_total{port=\"8080\",role=\"server\",result=\"close\"} 1",
            "websocket_connections_by_state{port=\"8080\",role=\"server\",state=\"not_reading\"} 1",
            "websocket_connections_by_state{port=\"8080\",role=\"server\",state=\"idle\"} 0",
            "websocket_connections_by_state{port=\"8080\",role=\"client\",state=\"idle\"} 1",
            "websocket_buffered_amount_bytes{port=\"8080\",role=\"server\"} 15",
            "websocket_receive_queue_bytes{port=\"8080\",role=\"server\"} 700",
            "observer_events_lost_total 4",
            "observer_last_refresh_timestamp_seconds 1700000000.500",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every sample line belongs to a family declared with HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "undeclared {name}");
        }
    }

    #[test]
    fn pod_labels_split_gauges_by_pod_and_only_when_asked() {
        let in_pod = |pod: &str| {
            let mut c = conn(8080, "server", Verdict::Active, 3, 0);
            c.attribution.namespace = Some("shop".into());
            c.attribution.pod = Some(pod.into());
            c.attribution.container = Some("ab".repeat(32));
            c
        };
        let connections = [in_pod("cart-1"), in_pod("cart-1"), in_pod("cart-2")];
        let mut known = BTreeSet::new();
        known.insert((8080, "server"));
        known.insert((9090, "client"));
        let totals = BTreeMap::new();
        let inputs = |pod_labels| Inputs {
            connections: &connections,
            totals: &totals,
            known: &known,
            events_lost: 0,
            untracked_map_full: 0,
            last_refresh_unix_seconds: 0.0,
            pod_labels,
        };

        let text = render(&inputs(true));
        for line in [
            "websocket_connections_active{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-1\"} 2",
            "websocket_connections_active{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-2\"} 1",
            "websocket_connections_by_state{port=\"8080\",role=\"server\",state=\"active\",namespace=\"shop\",pod=\"cart-1\"} 2",
            "websocket_buffered_amount_bytes{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-1\"} 6",
            "websocket_receive_queue_bytes{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-2\"} 0",
            "websocket_connections_active{port=\"9090\",role=\"client\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // No unlabelled zero beside the pod series of the same port and role, and never a
        // container ID.
        assert!(!text.contains("websocket_connections_active{port=\"8080\",role=\"server\"}"));
        assert!(!text.contains("abab"));

        let text = render(&inputs(false));
        assert!(!text.contains("pod="), "{text}");
        assert!(text.contains("websocket_connections_active{port=\"8080\",role=\"server\"} 3\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
