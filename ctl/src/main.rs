//! The `vmctl` command.

fn main() -> std::process::ExitCode {
    vmctl::run()
}
