use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    push_manager::cli::run(push_manager::cli::Cli::parse())
}
