//! The `stepwise` binary.

fn main() -> std::process::ExitCode {
    stepwise_host::cli::main()
}
