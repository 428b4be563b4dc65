//! The `storemesh` binary: parses the command line, starts the runtime and hands
//! over to `storemesh_node::cli`, which owns the behaviour.

use std::process::ExitCode;
use std::time::Duration;

use storemesh_node::cli;

/// How long blocking tasks get to finish once the command has returned.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    storemesh_node::memory::tune_allocator();
    cli::install_panic_hook();
    let args = match cli::parse() {
        Ok(args) => args,
        Err(code) => return code,
    };
    cli::init_logging(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return cli::report(&anyhow::Error::new(e).context("cannot start the runtime")),
    };
    let result = runtime.block_on(cli::execute(args));
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::report(&e),
    }
}
