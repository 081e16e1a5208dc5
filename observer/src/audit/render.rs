//! The report as people read it: plain text for a terminal, Markdown for a ticket or a wiki.
//! Both show the same figures as the JSON form; neither adds anything to it.

use std::fmt::Write as _;

use super::{Report, Service, Settings, secs, timeout, trim};

/// The report as plain text.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", headline(report));
    let _ = writeln!(out);
    let _ = writeln!(out, "FINDINGS");
    if report.findings.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for (i, f) in report.findings.iter().enumerate() {
        let _ = writeln!(out, "  {}. [{}] {}: {}", i + 1, f.severity, f.service.name(), f.summary);
        let _ = writeln!(out, "     evidence: {}", f.evidence);
        let _ = writeln!(out, "     fix:      {}", f.recommendation);
    }
    for service in &report.services {
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", service.key.name().to_uppercase());
        for (label, value) in service_lines(service) {
            let _ = writeln!(out, "  {label:<17} {value}");
        }
        for dead in &service.dead {
            let who = match (&dead.comm, dead.pid) {
                (Some(comm), Some(pid)) => format!("{comm} pid {pid}"),
                (None, Some(pid)) => format!("pid {pid}"),
                (Some(comm), None) => comm.clone(),
                (None, None) => "?".to_owned(),
            };
            let _ = writeln!(
                out,
                "    {} {} -> {} ({who}) for {}: {}",
                dead.verdict,
                dead.local_addr,
                dead.remote_addr,
                secs(dead.for_seconds),
                dead.detail
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "THRESHOLDS");
    for (label, value, flag) in thresholds(&report.thresholds) {
        let _ = writeln!(out, "  {label:<22} {value:<28} {flag}");
    }
    out
}

/// The report as Markdown.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# WebSocket audit\n\n{}\n", headline(report));
    let _ = writeln!(out, "## Findings\n");
    if report.findings.is_empty() {
        let _ = writeln!(out, "None.");
    }
    for (i, f) in report.findings.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}. **{}**, {}: {}  \n   Evidence: {}  \n   Fix: {}",
            i + 1,
            f.severity,
            f.service.name(),
            f.summary,
            f.evidence,
            f.recommendation
        );
    }
    for service in &report.services {
        let _ = writeln!(out, "\n## {}\n", service.key.name());
        let _ = writeln!(out, "| | |\n|---|---|");
        for (label, value) in service_lines(service) {
            let _ = writeln!(out, "| {label} | {} |", value.replace('|', "\\|"));
        }
        if !service.dead.is_empty() {
            let _ = writeln!(out, "\n| verdict | local | remote | pid | comm | for | detail |");
            let _ = writeln!(out, "|---|---|---|---|---|---|---|");
            for d in &service.dead {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    d.verdict,
                    d.local_addr,
                    d.remote_addr,
                    d.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    d.comm.as_deref().unwrap_or("-"),
                    secs(d.for_seconds),
                    d.detail.replace('|', "\\|")
                );
            }
        }
    }
    let _ = writeln!(out, "\n## Thresholds\n\n| threshold | value | flag |\n|---|---|---|");
    for (label, value, flag) in thresholds(&report.thresholds) {
        let _ = writeln!(out, "| {label} | {value} | `{flag}` |");
    }
    out
}

fn headline(report: &Report) -> String {
    let connections: u64 = report.services.iter().map(|s| s.connections).sum();
    format!(
        "observer {} audit: {} from {}{}; {} service{}, {} connection end{}, {} finding{}",
        report.version,
        secs(report.duration_seconds),
        report.started_at,
        if report.ended_early { " (ended early)" } else { "" },
        report.services.len(),
        plural(report.services.len() as u64),
        connections,
        plural(connections),
        report.findings.len(),
        plural(report.findings.len() as u64),
    )
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn opt_secs(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), secs)
}

fn pings(stats: &super::PingStats) -> String {
    if stats.pings == 0 {
        return "none".to_owned();
    }
    match stats.interval_median_seconds {
        Some(median) => format!(
            "{} pings, every {} (p10 {}, p90 {})",
            stats.pings,
            secs(median),
            opt_secs(stats.interval_p10_seconds),
            opt_secs(stats.interval_p90_seconds)
        ),
        None => format!("{} pings, too few for an interval", stats.pings),
    }
}

/// One label and value per figure of a service.
fn service_lines(s: &Service) -> Vec<(&'static str, String)> {
    let h = &s.handshakes;
    let p = &s.pongs;
    let mut lines = vec![
        ("connections", format!("{} ({} open at the end)", s.connections, s.open_at_end)),
        (
            "handshakes",
            format!(
                "{}, p50 {}, p99 {}, {} rejected",
                h.count,
                opt_secs(h.p50_seconds),
                opt_secs(h.p99_seconds),
                h.rejects
            ),
        ),
        ("who pings", s.heartbeat.who_pings.clone()),
        ("server pings", pings(&s.heartbeat.from_server)),
        ("client pings", pings(&s.heartbeat.from_client)),
        (
            "pongs",
            format!(
                "{} answered, {} missed ({} %), latency p50 {}, p99 {}",
                p.answered,
                p.missed,
                trim(p.miss_ratio * 100.0),
                opt_secs(p.latency_p50_seconds),
                opt_secs(p.latency_p99_seconds)
            ),
        ),
        ("longest silence", secs(s.longest_silence_seconds)),
        (
            "silent past",
            s.idle_past
                .iter()
                .map(|i| format!("{}: {}", timeout(i.timeout_seconds), i.connections))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ];
    let codes: Vec<String> = s.closes.codes.iter().map(|(c, n)| format!("{c} x{n}")).collect();
    let reasons: Vec<String> = s.closes.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    lines.push((
        "closes",
        format!(
            "codes {}; {} without a closing handshake; TCP ended: {}",
            if codes.is_empty() { "none".to_owned() } else { codes.join(", ") },
            s.closes.abnormal,
            if reasons.is_empty() { "none".to_owned() } else { reasons.join(", ") }
        ),
    ));
    if let Some(paths) = &s.paths {
        lines.push(("paths", if paths.is_empty() { "-".to_owned() } else { paths.join(", ") }));
    }
    lines.push(("dead", s.dead.len().to_string()));
    lines
}

/// Every threshold with its value and the flag that sets it.
fn thresholds(t: &Settings) -> Vec<(&'static str, String, &'static str)> {
    let nat: Vec<String> = t.nat_timeouts_seconds.iter().map(|&s| timeout(s)).collect();
    vec![
        ("proxy read timeout", timeout(t.proxy_timeout_seconds), "--proxy-timeout"),
        ("NAT idle timeouts", nat.join(", "), "--nat-timeout"),
        ("pong miss ratio", format!("{} %", trim(t.pong_miss_ratio * 100.0)), "--pong-miss-ratio"),
        ("dead after", secs(t.dead_after_seconds), "--dead-after"),
        ("idle after", secs(t.idle_after_seconds), "--idle-after"),
        ("stall after", secs(t.stall_after_seconds), "--stall-after"),
        ("pong timeout", secs(t.pong_timeout_seconds), "--pong-timeout"),
        ("refresh", secs(t.refresh_seconds), "--refresh"),
    ]
}
