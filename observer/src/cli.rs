//! Command-line flags. Parsed here, validated into [`RunConfig`] by [`RunArgs::validate`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::verdict::Thresholds;

/// Watches every WebSocket connection of this host from the kernel and tells which ones are
/// open but dead.
#[derive(Debug, Parser)]
#[command(name = "observer", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `observer run`, the default command.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs, watch connections and serve metrics (the default).
    Run(RunArgs),
    /// Show the live connections of a running agent, worst verdicts first.
    List(ListArgs),
    /// Watch for a while, then report each WebSocket service's heartbeat, silences and dead
    /// connections, with findings and fixes.
    Audit(AuditArgs),
}

/// Flags of every command that loads the kernel programs: what to watch and how verdicts are
/// judged.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Server port whose TCP connections are WebSocket connections (repeatable; comma-separated
    /// in the environment). Without it, connections are found by their HTTP upgrade.
    #[arg(long = "port", value_name = "PORT", env = "OBSERVER_PORTS", value_delimiter = ',')]
    pub ports: Vec<u16>,

    /// A connection with no application data either way for this long is idle (two missed 30 s
    /// heartbeats by default). Durations read like 500ms, 10s, 2m.
    #[arg(long, env = "OBSERVER_IDLE_AFTER", default_value = "60s", value_parser = duration)]
    pub idle_after: Duration,

    /// How long bytes may wait before a verdict: unread in the receive queue (not_reading), or
    /// unacknowledged in the send queue (backpressured, peer_unresponsive).
    #[arg(long, env = "OBSERVER_STALL_AFTER", default_value = "10s", value_parser = duration)]
    pub stall_after: Duration,

    /// A ping with no pong for this long counts as a missed pong.
    #[arg(long, env = "OBSERVER_PONG_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub pong_timeout: Duration,

    /// How often verdicts and metrics are recomputed.
    #[arg(long, env = "OBSERVER_REFRESH", default_value = "1s", value_parser = duration)]
    pub refresh: Duration,

    /// Most TCP connection ends tracked in the kernel at once, WebSocket or not: 376 bytes
    /// each, allocated at start (23.5 MiB by default). Past nine tenths full, the longest idle
    /// non-WebSocket ends are evicted first (counted in observer_map_evictions_total).
    #[arg(long, env = "OBSERVER_MAX_CONNECTIONS", default_value_t = observer_common::DEFAULT_MAX_CONNS)]
    pub max_connections: u32,

    /// Most connections whose WebSocket frames are tracked at once (those whose request opens
    /// with `GET`, and those found already open): 392 bytes each, allocated at start.
    #[arg(long, env = "OBSERVER_MAX_WEBSOCKETS", default_value_t = observer_common::DEFAULT_MAX_CONNS)]
    pub max_websockets: u32,

    /// Size of the ring that carries events from the kernel to the agent, like 256KiB or 4MiB: a
    /// power of two, at least 4KiB. Events that find it full are counted in
    /// observer_events_lost_total and the agent reads the kernel's socket table again.
    #[arg(long, env = "OBSERVER_EVENT_BUFFER", default_value = "1MiB", value_parser = byte_size)]
    pub event_buffer: u32,

    /// cgroup v2 directory to attach to [default: the root of the cgroup v2 hierarchy, which
    /// covers every process of the host].
    #[arg(long, env = "OBSERVER_CGROUP", value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// The kubelet's pod log directory, whose `<namespace>_<pod>_<uid>` entries name the pods.
    #[arg(long, env = "OBSERVER_POD_LOG_DIR", value_name = "DIR", default_value = "/var/log/pods")]
    pub pod_log_dir: PathBuf,

    /// File where `observer run` keeps which open connections proved WebSocket by their
    /// handshake, so that a restarted agent still recognises the silent ones; read at start.
    /// Empty to keep nothing.
    #[arg(
        long,
        env = "OBSERVER_STATE_FILE",
        value_name = "FILE",
        default_value = "/run/observer/state.json"
    )]
    pub state_file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub watch: WatchArgs,

    /// Address for /metrics, /connections and /healthz.
    #[arg(long, env = "OBSERVER_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: SocketAddr,

    /// Label the gauges of open connections with the Kubernetes `namespace` and `pod` of their
    /// process: at most one series per port, role and pod [default: off].
    #[arg(long, env = "OBSERVER_POD_LABELS", value_parser = clap::builder::BoolishValueParser::new())]
    pub pod_labels: bool,

    /// Server ports with a `port` label of their own, besides the watched ones: the first ones
    /// seen. Connections to later ports are counted under `port="other"`.
    #[arg(long, env = "OBSERVER_MAX_PORT_LABELS", default_value_t = crate::metrics::DEFAULT_PORT_LABELS)]
    pub max_port_labels: usize,
}

/// How the audit report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Markdown,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub watch: WatchArgs,

    /// How long to watch before writing the report; SIGINT or SIGTERM writes it early.
    #[arg(long, env = "OBSERVER_AUDIT_DURATION", default_value = "5m", value_parser = duration)]
    pub duration: Duration,

    /// Report format.
    #[arg(long, env = "OBSERVER_AUDIT_FORMAT", value_enum, default_value = "text")]
    pub format: Format,

    /// Write the report to this file instead of stdout.
    #[arg(long, env = "OBSERVER_AUDIT_OUTPUT", value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Read timeout of a proxy in front of the services (nginx's `proxy_read_timeout` is 60 s):
    /// connections silent this long are cut.
    #[arg(long, env = "OBSERVER_AUDIT_PROXY_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub proxy_timeout: Duration,

    /// Idle timeouts of NATs and load balancers on the way (repeatable; comma-separated)
    /// [default: 30s,60s,90s,350s].
    #[arg(
        long = "nat-timeout",
        value_name = "DURATION",
        env = "OBSERVER_AUDIT_NAT_TIMEOUTS",
        value_delimiter = ',',
        value_parser = duration,
        default_values = ["30s", "60s", "90s", "350s"],
        hide_default_value = true
    )]
    pub nat_timeouts: Vec<Duration>,

    /// Pongs missing on this share of pings or more is a finding (0 to 1).
    #[arg(long, env = "OBSERVER_AUDIT_PONG_MISS_RATIO", default_value_t = 0.01)]
    pub pong_miss_ratio: f64,

    /// A connection held this long in a verdict other than `active` or `idle` is reported dead.
    #[arg(long, env = "OBSERVER_AUDIT_DEAD_AFTER", default_value = "30s", value_parser = duration)]
    pub dead_after: Duration,

    /// Show the request paths of the upgrades (without query strings) [default: off].
    #[arg(long, env = "OBSERVER_AUDIT_SHOW_PATHS", value_parser = clap::builder::BoolishValueParser::new())]
    pub show_paths: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print the agent's JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Base URL of the agent.
    #[arg(long, env = "OBSERVER_ADDR", default_value = "http://127.0.0.1:9464")]
    pub addr: String,
}

/// Validated settings shared by `observer run` and `observer audit`.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub ports: Vec<u16>,
    pub thresholds: Thresholds,
    pub pong_timeout: Duration,
    pub refresh: Duration,
    pub max_connections: u32,
    pub max_websockets: u32,
    pub event_buffer: u32,
    pub cgroup: Option<PathBuf>,
    pub pod_log_dir: PathBuf,
    pub state_file: Option<PathBuf>,
}

/// Validated settings of `observer run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub watch: WatchConfig,
    pub metrics_addr: SocketAddr,
    pub pod_labels: bool,
    pub max_port_labels: usize,
}

/// Validated settings of `observer audit`.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub watch: WatchConfig,
    pub duration: Duration,
    pub format: Format,
    pub output: Option<PathBuf>,
    pub settings: crate::audit::Settings,
}

impl WatchArgs {
    pub fn validate(self) -> Result<WatchConfig, String> {
        let mut ports = self.ports;
        ports.sort_unstable();
        ports.dedup();
        if ports.contains(&0) {
            return Err("--port 0 is not a port".into());
        }
        if ports.len() > observer_common::MAX_WATCHED_PORTS as usize {
            return Err(format!(
                "at most {} ports can be given with --port",
                observer_common::MAX_WATCHED_PORTS
            ));
        }
        for (flag, value) in [
            ("--refresh", self.refresh),
            ("--idle-after", self.idle_after),
            ("--stall-after", self.stall_after),
            ("--pong-timeout", self.pong_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{flag} must be longer than zero"));
            }
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if self.max_websockets == 0 {
            return Err("--max-websockets must be at least 1".into());
        }
        if !self.event_buffer.is_power_of_two() || self.event_buffer < 4096 {
            return Err(format!(
                "--event-buffer {} bytes: the size must be a power of two of at least 4KiB",
                self.event_buffer
            ));
        }
        Ok(WatchConfig {
            ports,
            thresholds: Thresholds { idle_after: self.idle_after, stall_after: self.stall_after },
            pong_timeout: self.pong_timeout,
            refresh: self.refresh,
            max_connections: self.max_connections,
            max_websockets: self.max_websockets,
            event_buffer: self.event_buffer,
            cgroup: self.cgroup,
            pod_log_dir: self.pod_log_dir,
            state_file: (!self.state_file.as_os_str().is_empty()).then_some(self.state_file),
        })
    }
}

impl RunArgs {
    pub fn validate(self) -> Result<RunConfig, String> {
        let watch = self.watch.validate()?;
        if watch.ports.contains(&self.metrics_addr.port()) {
            return Err(format!(
                "--metrics-addr {} uses a watched port; serve metrics on another port",
                self.metrics_addr
            ));
        }
        Ok(RunConfig {
            watch,
            metrics_addr: self.metrics_addr,
            pod_labels: self.pod_labels,
            max_port_labels: self.max_port_labels,
        })
    }
}

impl AuditArgs {
    pub fn validate(self) -> Result<AuditConfig, String> {
        let watch = self.watch.validate()?;
        if self.duration.is_zero() {
            return Err("--duration must be longer than zero".into());
        }
        if self.proxy_timeout.is_zero() {
            return Err("--proxy-timeout must be longer than zero".into());
        }
        if self.nat_timeouts.iter().any(Duration::is_zero) {
            return Err("--nat-timeout must be longer than zero".into());
        }
        if !(0.0..=1.0).contains(&self.pong_miss_ratio) {
            return Err(format!(
                "--pong-miss-ratio {} is not between 0 and 1 (0.01 is 1 %)",
                self.pong_miss_ratio
            ));
        }
        let mut nat: Vec<f64> = self.nat_timeouts.iter().map(Duration::as_secs_f64).collect();
        nat.sort_by(f64::total_cmp);
        nat.dedup();
        let settings = crate::audit::Settings {
            proxy_timeout_seconds: self.proxy_timeout.as_secs_f64(),
            nat_timeouts_seconds: nat,
            pong_miss_ratio: self.pong_miss_ratio,
            dead_after_seconds: self.dead_after.as_secs_f64(),
            idle_after_seconds: watch.thresholds.idle_after.as_secs_f64(),
            stall_after_seconds: watch.thresholds.stall_after.as_secs_f64(),
            pong_timeout_seconds: watch.pong_timeout.as_secs_f64(),
            refresh_seconds: watch.refresh.as_secs_f64(),
            show_paths: self.show_paths,
        };
        Ok(AuditConfig {
            watch,
            duration: self.duration,
            format: self.format,
            output: self.output,
            settings,
        })
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h30m`.
pub fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e} (expected a duration such as 500ms, 10s or 2m)"))
}

/// Parses `65536`, `64KiB`, `4MiB`.
pub fn byte_size(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => {
            return Err(format!("unknown unit {other:?} (expected a size such as 64KiB or 4MiB)"));
        }
    };
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size such as 64KiB"))?;
    value
        .checked_mul(scale)
        .and_then(|bytes| u32::try_from(bytes).ok())
        .ok_or_else(|| format!("{text} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("10").is_err());
        assert!(duration("fast").is_err());
    }

    #[test]
    fn sizes_parse_and_the_event_buffer_is_checked() {
        assert_eq!(byte_size("4096"), Ok(4096));
        assert_eq!(byte_size("64KiB"), Ok(65536));
        assert_eq!(byte_size("4MiB"), Ok(4 << 20));
        assert!(byte_size("4 parsecs").is_err());
        assert!(byte_size("KiB").is_err());
        assert!(byte_size("8GiB").is_err());
        let config = |flag: &str| {
            Cli::try_parse_from(["observer", "--event-buffer", flag]).unwrap().run.validate()
        };
        assert_eq!(config("64KiB").unwrap().watch.event_buffer, 65536);
        assert!(config("100000").unwrap_err().contains("power of two"));
        assert!(config("2KiB").unwrap_err().contains("at least 4KiB"));
        let defaults = Cli::try_parse_from(["observer"]).unwrap().run.validate().unwrap();
        assert_eq!(defaults.watch.event_buffer, 1 << 20);
        assert_eq!(defaults.watch.max_websockets, observer_common::DEFAULT_MAX_CONNS);
    }

    #[test]
    fn defaults_and_subcommands() {
        let cli = Cli::try_parse_from(["observer"]).unwrap();
        assert!(cli.command.is_none());
        let config = cli.run.validate().unwrap();
        assert_eq!(config.metrics_addr.to_string(), "0.0.0.0:9464");
        assert_eq!(config.watch.thresholds.idle_after, Duration::from_secs(60));
        assert_eq!(config.watch.thresholds.stall_after, Duration::from_secs(10));
        assert_eq!(config.watch.refresh, Duration::from_secs(1));
        assert_eq!(config.watch.pong_timeout, Duration::from_secs(10));

        let cli = Cli::try_parse_from(["observer", "run", "--port", "80", "--port", "81"]).unwrap();
        let Some(Command::Run(args)) = cli.command else { panic!("run expected") };
        assert_eq!(args.watch.ports, vec![80, 81]);

        let cli =
            Cli::try_parse_from(["observer", "--port", "8080", "--idle-after", "2m"]).unwrap();
        assert_eq!(cli.run.watch.idle_after, Duration::from_secs(120));
        assert!(Cli::try_parse_from(["observer", "--refresh", "soon"]).is_err());
        assert!(Cli::try_parse_from(["observer", "--frobnicate"]).is_err());
    }

    #[test]
    fn pod_labels_are_off_by_default_and_read_from_the_environment() {
        let config = Cli::try_parse_from(["observer"]).unwrap().run.validate().unwrap();
        assert!(!config.pod_labels);
        assert_eq!(config.watch.pod_log_dir, PathBuf::from("/var/log/pods"));
        let cli = Cli::try_parse_from(["observer", "--pod-labels", "--pod-log-dir", "/x"]).unwrap();
        assert!(cli.run.pod_labels);
        assert_eq!(cli.run.watch.pod_log_dir, PathBuf::from("/x"));
        // The environment form, as the DaemonSet sets it: the flag's own definition, read from a
        // variable that no other test touches.
        let arg = <Cli as clap::CommandFactory>::command()
            .get_arguments()
            .find(|a| a.get_id() == "pod_labels")
            .cloned()
            .unwrap();
        assert_eq!(arg.get_env().unwrap(), "OBSERVER_POD_LABELS");
        for (value, expected) in [("true", true), ("1", true), ("false", false), ("0", false)] {
            // SAFETY: no other test reads or writes this variable.
            unsafe { std::env::set_var("OBSERVER_POD_LABELS_TEST_PARSE", value) };
            // clap reads the variable when the argument is defined.
            let cmd =
                clap::Command::new("t").arg(arg.clone().env("OBSERVER_POD_LABELS_TEST_PARSE"));
            let matches = cmd.try_get_matches_from(["t"]).unwrap();
            assert_eq!(matches.get_flag("pod_labels"), expected, "{value}");
        }
    }

    #[test]
    fn metrics_port_may_not_be_watched() {
        let cli = Cli::try_parse_from(["observer", "--port", "9464"]).unwrap();
        assert!(cli.run.validate().unwrap_err().contains("watched port"));
    }

    fn audit(args: &[&str]) -> Result<AuditConfig, String> {
        let mut argv = vec!["observer", "audit"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Some(Command::Audit(args)) = cli.command else { panic!("audit expected") };
        args.validate()
    }

    #[test]
    fn audit_defaults_and_flags() {
        let config = audit(&[]).unwrap();
        assert_eq!(config.duration, Duration::from_secs(300));
        assert_eq!(config.format, Format::Text);
        assert_eq!(config.settings.nat_timeouts_seconds, [30.0, 60.0, 90.0, 350.0]);
        assert_eq!(config.settings.proxy_timeout_seconds, 60.0);
        assert_eq!(config.settings.pong_miss_ratio, 0.01);
        assert_eq!(config.settings.dead_after_seconds, 30.0);
        assert!(!config.settings.show_paths);

        let config = audit(&[
            "--duration",
            "3s",
            "--format",
            "json",
            "--nat-timeout",
            "90s,5s",
            "--nat-timeout",
            "5s",
            "--proxy-timeout",
            "2s",
            "--stall-after",
            "1s",
            "--refresh",
            "250ms",
            "--port",
            "7400",
            "--show-paths",
        ])
        .unwrap();
        assert_eq!(config.duration, Duration::from_secs(3));
        assert_eq!(config.format, Format::Json);
        assert_eq!(config.settings.nat_timeouts_seconds, [5.0, 90.0]);
        assert_eq!(config.settings.proxy_timeout_seconds, 2.0);
        assert_eq!(config.settings.stall_after_seconds, 1.0);
        assert_eq!(config.watch.refresh, Duration::from_millis(250));
        assert_eq!(config.watch.ports, [7400]);
        assert!(config.settings.show_paths);
    }

    #[test]
    fn audit_refuses_bad_thresholds_clearly() {
        assert!(audit(&["--pong-miss-ratio", "3"]).unwrap_err().contains("between 0 and 1"));
        assert!(audit(&["--duration", "0s"]).unwrap_err().contains("--duration"));
        assert!(audit(&["--nat-timeout", "0s"]).unwrap_err().contains("--nat-timeout"));
        assert!(audit(&["--format", "yaml"]).unwrap_err().contains("yaml"));
        assert!(audit(&["--duration", "soon"]).unwrap_err().contains("expected a duration"));
    }
}
