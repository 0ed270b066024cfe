//! The command line, in clap's terms: each command has its own `--help`,
//! and a mistake is reported in clap's form with exit code 2.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// tidegate: resilient service-to-service communication.
///
/// Logs go to stderr; RUST_LOG-style filters (e.g. `info,tidegate::access=warn`)
/// are read from TIDEGATE_LOG.
#[derive(Debug, Parser)]
#[command(name = "tidegate", version, about, long_about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the gateway; its config file is reloaded when it changes or on SIGHUP.
    Serve(Serve),
    /// Validate a config: exit 0, or 2 with file:line:col: key: reason.
    Check(ConfigFile),
    /// The gateway in front of sample upstreams, with the dashboard, on
    /// loopback (ports 8080 and 9901 when free).
    Demo(Demo),
    /// Upstreams and breaker states, as a table.
    Status(Status),
    /// Topics and subscriptions: positions, lag, in flight, dead letters
    /// (or `events tail TOPIC`).
    Events(Events),
}

/// `--config FILE`.
#[derive(Debug, Args)]
pub(crate) struct ConfigFile {
    /// The gateway's config (TOML).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct Serve {
    #[command(flatten)]
    pub(crate) config: ConfigFile,
    /// How log lines are written to stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    /// Threads serving the proxy listener, each with its own event loop and
    /// upstream connection pool [default: one per CPU].
    #[arg(long, value_name = "N")]
    pub(crate) workers: Option<NonZeroUsize>,
}

#[derive(Debug, Args)]
pub(crate) struct Demo {
    /// Check that the demo works (a request per sample, the breaker
    /// tripping), then stop.
    #[arg(long)]
    pub(crate) quick: bool,
    /// The proxy listener [default: 127.0.0.1:8080, or a free port].
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,
    /// The admin listener [default: 127.0.0.1:9901, or a free port].
    #[arg(long, value_name = "ADDR")]
    pub(crate) admin: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct Status {
    /// The gateway's admin API.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9901")]
    pub(crate) admin: String,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct Events {
    #[command(subcommand)]
    pub(crate) command: Option<EventsCommand>,
    /// The gateway's admin API.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9901")]
    pub(crate) admin: String,
}

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// Follow a topic: each event on a line as it is stored, until ^C.
    Tail(Tail),
}

#[derive(Debug, Args)]
pub(crate) struct Tail {
    /// The topic.
    pub(crate) topic: String,
    /// The gateway's events API.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9902")]
    pub(crate) events: String,
    /// Start at this position [default: after the last event].
    #[arg(long, value_name = "N")]
    pub(crate) from: Option<u64>,
    /// Print each event as its whole JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// `--workers`, or one per CPU.
pub(crate) fn workers(workers: Option<NonZeroUsize>) -> usize {
    workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
