//! The `tidegate` binary: parses the command line, sets up logging and the
//! runtime, and hands over to `tidegate-gateway`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tidegate_gateway::config;
use tidegate_gateway::http::server;

mod access;
mod alloc;
mod cli;
mod demo;
mod events;
mod status;

use cli::{Cli, Command, ConfigFile, LogFormat};

#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
        Command::Demo(args) => demo::run(args),
        Command::Status(args) => status::run(args),
        Command::Events(args) => events::run(args),
    };
    // Access lines still in their batches are written before the end.
    access::flush();
    result.unwrap_or_else(|err| {
        eprintln!("tidegate: {err:#}");
        ExitCode::FAILURE
    })
}

/// The config of `file`, or its error printed and exit code 2.
fn load(file: &ConfigFile) -> Result<config::Config, ExitCode> {
    config::load(&file.config).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn check(args: ConfigFile) -> anyhow::Result<ExitCode> {
    let config = match load(&args) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    println!(
        "{}: ok ({} upstreams, {} routes)",
        args.config.display(),
        config.upstreams.len(),
        config.routes.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn serve(args: cli::Serve) -> anyhow::Result<ExitCode> {
    let config = match load(&args.config) {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let workers = cli::workers(args.workers);
    logging(args.log_format)?;
    runtime()?.block_on(async move {
        // Handlers first: a signal that arrives once we serve is never lost.
        let stop = shutdown_signal()?;
        let running = server::start_with_workers(config, workers)
            .await
            .map_err(anyhow::Error::msg)?;
        let reload = running
            .reloader()
            .watch(args.config.config, std::time::Duration::from_secs(2));
        tokio::select! {
            () = stop => {}
            () = reload => {}
        }
        tracing::info!("shutting down: draining in-flight requests");
        running.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Log lines to stderr in `format`, filtered by `TIDEGATE_LOG`.
fn logging(format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("TIDEGATE_LOG")
        .unwrap_or_else(|_| "info".into())
        .parse()
        .context("TIDEGATE_LOG")?;
    // Access lines have a writer of their own (see `access`); `fmt`
    // writes the others.
    let not_access = tracing_subscriber::filter::filter_fn(|m| m.target() != access::ACCESS);
    let json = matches!(format, LogFormat::Json);
    // The gateway hands access lines to the layer's writer directly,
    // past `tracing`'s dispatch (which still filters them).
    tidegate_gateway::proxy::set_access_log(Box::new(access::AccessLayer::stderr(json)));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(access::AccessLayer::stderr(json));
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colours only for a terminal, not for a file or a pipe.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(not_access),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(not_access),
            )
            .init(),
    }
    Ok(())
}

/// The main runtime: admin API, health checks, signals. The proxy listener
/// has worker threads of its own.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Installs the Ctrl-C and SIGTERM handlers; the future resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    let ctrl_c = tokio::signal::ctrl_c();
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    })
}
