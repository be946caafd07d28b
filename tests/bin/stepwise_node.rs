//! The `stepwise` program under another name, built with the test suite so that the cluster
//! test can start nodes as processes and kill them.

fn main() -> std::process::ExitCode {
    stepwise_host::cli::main()
}
