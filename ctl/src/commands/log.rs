//! `vmctl log NAME [--console|--provision] [--tail N] [-f]`.

use std::io::Write;
use std::process::ExitCode;

use super::{Globals, name_arg};
use crate::client::ClientError;

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
    let sources: Vec<&str> = match (console, provision) {
        (true, false) => vec!["console"],
        (false, true) => vec!["provision"],
        _ if follow => {
            return Err(miette::miette!(
                code = "vmctl::cli::usage",
                help = "add --console or --provision",
                "--follow needs one log"
            ));
        }
        _ => vec!["console", "provision"],
    };
    let client = g.client()?;
    super::objects::get_object(&client, vmctl_api::Kind::VirtualMachine, name)?;
    for (i, source) in sources.iter().enumerate() {
        if sources.len() > 1 {
            if i > 0 {
                println!();
            }
            println!("==> {source}.log <==");
        }
        let path = format!("/v1/logs/{name}?source={source}&tail={tail}&follow={follow}");
        let resp = client.send("GET", &path, None)?;
        if resp.status >= 400 {
            let status = resp.status;
            let body = resp.body()?;
            let err: vmctl_api::wire::ErrorBody = serde_json::from_slice(&body)
                .map_err(|_| ClientError::Protocol(String::from_utf8_lossy(&body).into_owned()))?;
            return Err(ClientError::Api {
                status,
                help: err.help.clone(),
                body: err,
            }
            .into());
        }
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
