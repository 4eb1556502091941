//! mxscopectl: the command-line client of the mxscope collector's Query API.
//! Parses flags, runs the command, maps failures to exit codes (1 runtime, 2 usage/unreachable).

mod args;
mod cli;
mod client;
mod cmd;
#[cfg(test)]
mod fake;
mod output;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = cli::run(cli, &mut out).await;
    let flushed = out.flush();
    match result.and(flushed.map_err(anyhow::Error::from)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A closed pipe (`mxscopectl results | head`) is not an error worth a message.
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(client::exit_code(&err))
        }
    }
}
