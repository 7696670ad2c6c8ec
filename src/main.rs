use std::process::ExitCode;

fn main() -> ExitCode {
    push_manager::cli::main()
}
