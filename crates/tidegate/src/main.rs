//! The `tidegate` binary: parses the command line, sets up the runtime and
//! hands over to the library. Until the gateway lands, `demo` shows the
//! policy library at work on a simulated upstream.

mod demo;

use std::process::ExitCode;

const USAGE: &str = "\
tidegate — resilient service-to-service communication

usage:
  tidegate demo [--quick]   the policies at work on a simulated flaky upstream
  tidegate --version
  tidegate --help

Built so far: the tidegate-resilience policy library (circuit breaker,
retry with backoff, jitter and budget, timeouts and deadlines, bulkhead,
rate limiters, adaptive throttling, fallback, pipeline). The gateway
commands (serve, check, status) arrive with the gateway.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["demo", rest @ ..] => {
            let quick = match rest {
                [] => false,
                ["--quick"] => true,
                _ => return usage_error(&format!("unexpected arguments: {}", rest.join(" "))),
            };
            match run_demo(quick) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("tidegate: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        ["--version" | "-V"] => {
            println!("tidegate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        [] | ["--help" | "-h" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        [other, ..] => usage_error(&format!("unknown command {other:?}")),
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("tidegate: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

fn run_demo(quick: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_time()
        .build()?;
    runtime.block_on(demo::run(quick))
}
