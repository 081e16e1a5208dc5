//! observer: watches every WebSocket connection of a Linux host from the kernel and tells which
//! ones are open but dead.
//!
//! Exit codes: 0 stopped by SIGINT/SIGTERM (or `list` succeeded, or `audit` wrote its report),
//! 1 runtime error, 2 bad flags (for `audit`, also an `--output` file that cannot be created),
//! 3 kernel programs could not be loaded or attached (privileges, kernel features), 4 the metrics
//! address could not be bound.

mod adopt;
mod agent;
mod api;
mod audit;
mod batch;
mod cli;
mod clock;
mod conntrack;
mod evict;
mod handshake;
mod k8s;
mod kernel;
mod list;
mod metrics;
mod sockdiag;
mod state;
mod verdict;

use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

/// Writes one line to stderr, ignoring a closed stderr (a reader that went away).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A log reader that goes away must not take the agent with it: no complaint on stderr.
        .log_internal_errors(false)
        .init();

    let run_args = match cli.command {
        Some(Command::List(args)) => {
            return match list::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    say!("observer list: {error:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Audit(args)) => {
            let config = match args.validate() {
                Ok(config) => config,
                Err(message) => {
                    say!("observer audit: {message}");
                    return ExitCode::from(2);
                }
            };
            return block_on(agent::audit(config), "observer audit");
        }
        Some(Command::Run(args)) => args,
        None => cli.run,
    };
    let config = match run_args.validate() {
        Ok(config) => config,
        Err(message) => {
            say!("observer: {message}");
            return ExitCode::from(2);
        }
    };

    block_on(agent::run(config), "observer")
}

/// Runs a command to its end on a single-threaded runtime and maps its error to an exit code.
fn block_on(
    command: impl std::future::Future<Output = Result<(), agent::RunError>>,
    name: &str,
) -> ExitCode {
    // The command itself runs on this thread; the HTTP endpoints on a worker of their own, so
    // they keep answering while a refresh of many connections is under way.
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
            Ok(runtime) => runtime,
            Err(error) => {
                say!("{name}: cannot start the runtime: {error}");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            say!("{name}: {}", error_chain(&error));
            ExitCode::from(error.exit_code())
        }
    }
}

/// The error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
