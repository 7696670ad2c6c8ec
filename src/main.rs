use clap::Parser;

fn main() {
    std::process::exit(push_manager::cli::run(push_manager::cli::Cli::parse()));
}
