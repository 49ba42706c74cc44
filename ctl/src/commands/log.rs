//! `vmctl log NAME [--console|--provision] [--tail N] [-f]`.

use std::io::Write;
use std::process::ExitCode;

use super::{Globals, name_arg};
use crate::client::{LogSource, LogStart};

/// Prints a VM's console and/or provision log.
pub fn run(
    g: &Globals,
    name: &str,
    console: bool,
    provision: bool,
    tail: usize,
    follow: bool,
) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let sources = match (console, provision) {
        (true, false) => vec![LogSource::Console],
        (false, true) => vec![LogSource::Provision],
        _ if follow => {
            return Err(miette::miette!(
                code = "vmctl::cli::usage",
                help = "add --console or --provision",
                "--follow needs one log"
            ));
        }
        _ => vec![LogSource::Console, LogSource::Provision],
    };
    let client = g.client()?;
    super::objects::get_object(&client, vmctl_api::Kind::VirtualMachine, name)?;
    for (i, source) in sources.iter().enumerate() {
        if sources.len() > 1 {
            if i > 0 {
                println!();
            }
            println!("==> {}.log <==", source.as_str());
        }
        let resp = client.logs(name, *source, LogStart::Tail(tail), follow)?;
        let mut out = std::io::stdout().lock();
        let mut broken = false;
        resp.lines(|line| {
            broken = out
                .write_all(line)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush())
                .is_err();
            !broken
        })?;
        if broken {
            return Ok(ExitCode::SUCCESS);
        }
    }
    Ok(ExitCode::SUCCESS)
}
