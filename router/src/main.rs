//! The `switchyard` command: run a router, administer topics, publish and
//! subscribe. See `switchyard --help`.

fn main() -> std::process::ExitCode {
    switchyard::cli::main()
}
