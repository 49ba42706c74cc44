//! `vmctl image pull|list|inspect|rm|prune`, on top of Image objects.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use vmctl_api::{Image, ImageSource, ImageSpec, Kind, ObjectRef, Resource};

use super::{Globals, age, name_arg, table};
use crate::cli::{ImageCommand, Output};
use crate::client::Client;
use crate::output::print;

/// Names of VMs whose spec uses each image.
fn users(client: &Client) -> miette::Result<std::collections::BTreeMap<String, Vec<String>>> {
    let vms = client.list(Some(Kind::VirtualMachine), &[])?;
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for vm in vms.items {
        if let Some(img) = vm.spec.get("image").and_then(|i| i.as_str()) {
            out.entry(img.to_owned())
                .or_default()
                .push(vm.metadata.name.clone());
        }
    }
    Ok(out)
}

fn size(b: Option<u64>) -> String {
    match b {
        Some(b) if b >= 1 << 30 => format!("{:.1}Gi", b as f64 / (1u64 << 30) as f64),
        Some(b) => format!("{}Mi", b.div_ceil(1 << 20)),
        None => "-".into(),
    }
}

/// Runs an image subcommand.
pub fn run(g: &Globals, cmd: ImageCommand) -> miette::Result<ExitCode> {
    match cmd {
        ImageCommand::Pull {
            url,
            name,
            checksum,
            timeout,
        } => pull(g, &url, name, checksum, timeout),
        ImageCommand::List { output } => list(g, output),
        ImageCommand::Inspect { target } => inspect(g, &target),
        ImageCommand::Rm { name } => rm(g, &name),
        ImageCommand::Prune => prune(g),
    }
}

fn pull(
    g: &Globals,
    url: &str,
    name: Option<String>,
    checksum: Option<String>,
    timeout: u64,
) -> miette::Result<ExitCode> {
    vmctl_api::validate::check_url(url).map_err(|m| {
        miette::miette!(
            code = "vmctl::image::bad_url",
            help = "give an http://, https:// or file:// URL",
            "{m}"
        )
    })?;
    let name = match name {
        Some(n) => {
            name_arg(&n)?;
            n
        }
        // The same name a VMFile gives this URL, so both share the Image.
        None => vmctl_api::names::image_name(&ImageSource::Url {
            url: url.to_owned(),
        }),
    };
    let mut img = Image::new(
        name.clone(),
        ImageSpec {
            source: ImageSource::Url {
                url: url.to_owned(),
            },
            checksum,
        },
    );
    for e in vmctl_api::validate::validate(&Resource::Image(img.clone())) {
        if e.severity == vmctl_api::validate::Severity::Error {
            return Err(miette::miette!(
                code = "vmctl::image::invalid",
                help = e.help.unwrap_or_default(),
                "{}",
                e.message
            ));
        }
    }
    let client = g.client()?;
    // Pulling what a VMFile also names keeps the file's labels, annotations
    // and ownership of the Image.
    let existing = super::objects::get_object(&client, Kind::Image, &name).ok();
    let mut file = None;
    let mut retry_from_rv = None;
    if let Some(o) = &existing {
        img.metadata.labels = o.metadata.labels.clone();
        img.metadata.annotations = o.metadata.annotations.clone();
        file = o.metadata.source.as_ref().and_then(|s| s.file.clone());
        // A failure that retrying cannot fix is final for the Image as it
        // is; pulling again asks the agent for one more try.
        let failed = o
            .status
            .as_ref()
            .and_then(|s| s.get("phase"))
            .is_some_and(|p| p == "Failed");
        if failed {
            img.metadata.annotations.insert(
                vmctl_api::resources::PULL_REQUESTED_ANNOTATION.into(),
                chrono::Utc::now().to_rfc3339(),
            );
            eprintln!("image/{name} had failed; trying again");
        }
    }
    let req = super::objects::apply_request(
        vec![img.to_object()],
        file.as_deref().map(Path::new),
        "image pull",
        false,
        false,
    );
    let resp = super::objects::apply(&client, &req)?;
    let asked_again = existing.as_ref().is_some_and(|o| {
        let key = vmctl_api::resources::PULL_REQUESTED_ANNOTATION;
        o.metadata.annotations.get(key) != img.metadata.annotations.get(key)
    });
    if asked_again {
        retry_from_rv = resp.results.first().map(|r| r.resource_version);
    }
    // The old Failed status stays until the agent acts on the request:
    // wait for its first write before judging.
    if let Some(rv) = retry_from_rv {
        let r = ObjectRef::new(Kind::Image, name.clone());
        let acted = |s: &crate::client::States| match s.get(&r) {
            Some(Some(o)) if o.metadata.resource_version == rv => None,
            _ => Some(()),
        };
        // Timing out is not an error: the wait below judges the state.
        client.await_condition(
            std::slice::from_ref(&r),
            acted,
            Some(Duration::from_secs(30)),
        )?;
    }
    // Waits as `apply --wait` does: transient failures show as BackOff
    // and are waited through; only a final failure or the timeout ends it.
    eprintln!("pulling {url} as image/{name}");
    let r = ObjectRef::new(vmctl_api::Kind::Image, name);
    let code = super::wait::wait_ready(
        &client,
        std::slice::from_ref(&r),
        Duration::from_secs(timeout),
    )?;
    let o = super::objects::get_object(&client, Kind::Image, &r.name)?;
    let st = o.status.unwrap_or_default();
    // In a cluster each node has its own copy (status.nodes).
    let at = match (st["path"].as_str(), st["nodes"].as_object()) {
        (Some(p), _) => p.to_owned(),
        (None, Some(nodes)) => nodes
            .iter()
            .filter_map(|(n, s)| Some(format!("{} on {n}", s["path"].as_str()?)))
            .collect::<Vec<_>>()
            .join(", "),
        (None, None) => "?".to_owned(),
    };
    println!(
        "image/{} {} {} at {}",
        r.name,
        st["format"].as_str().unwrap_or("?"),
        size(st["sizeBytes"].as_u64()),
        at
    );
    Ok(code)
}

fn list(g: &Globals, output: Output) -> miette::Result<ExitCode> {
    let client = g.client()?;
    let images = client.list(Some(Kind::Image), &[])?;
    let used = users(&client)?;
    match output {
        Output::Json | Output::Yaml => {
            let v: Vec<serde_json::Value> = images
                .items
                .iter()
                .map(|o| serde_json::json!({"image": o, "usedBy": used.get(&o.metadata.name).cloned().unwrap_or_default()}))
                .collect();
            let text = if output == Output::Json {
                format!(
                    "{}\n",
                    serde_json::to_string_pretty(&v).expect("serialises")
                )
            } else {
                serde_yaml::to_string(&v).expect("serialises")
            };
            print(&text)?;
        }
        Output::Text => {
            if images.items.is_empty() {
                eprintln!("No images.");
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows = vec![
                [
                    "NAME", "PHASE", "FORMAT", "SIZE", "USED BY", "SOURCE", "AGE",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for o in &images.items {
                let st = o.status.clone().unwrap_or_default();
                let src = o.spec["source"]["url"]
                    .as_str()
                    .or(o.spec["source"]["path"].as_str())
                    .unwrap_or("-");
                rows.push(vec![
                    o.metadata.name.clone(),
                    st["phase"].as_str().unwrap_or("Pending").to_owned(),
                    st["format"].as_str().unwrap_or("-").to_owned(),
                    size(st["sizeBytes"].as_u64()),
                    used.get(&o.metadata.name)
                        .map(|v| v.join(","))
                        .unwrap_or_else(|| "-".into()),
                    src.to_owned(),
                    age(o.metadata.creation_timestamp),
                ]);
            }
            print(&table(&rows))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(g: &Globals, target: &str) -> miette::Result<ExitCode> {
    // A path (names have no `/`) or a file here; the agent may be able to
    // read what this user cannot.
    if target.contains('/') || Path::new(target).exists() {
        // The agent inspects it (qemu-img runs there, not here): the same
        // checks an Image with this path gets (not compressed, raw or a
        // self-contained qcow2); a refused image is never opened. The path
        // is the agent's, so it must be absolute.
        let abs = std::path::absolute(target)
            .map_err(|e| crate::diag::error("vmctl::image::not_found", format!("{target}: {e}")))?;
        let client = g.client()?;
        let img = client.inspect_image(&abs.display().to_string())?;
        println!("path:          {target}");
        println!("format:        {}", img.format);
        if let Some(v) = img.virtual_size_bytes {
            println!("virtual size:  {} ({v} bytes)", size(Some(v)));
        }
        println!("file size:     {}", size(Some(img.size_bytes)));
        return Ok(ExitCode::SUCCESS);
    }
    name_arg(target).map_err(|_| {
        miette::miette!(
            code = "vmctl::image::not_found",
            help = "give an existing file or an image name from `vmctl image list`",
            "{target} is neither a file nor an image name"
        )
    })?;
    let client = g.client()?;
    let o = super::objects::get_object(&client, Kind::Image, target)?;
    print(&serde_yaml::to_string(&o).expect("serialises"))?;
    Ok(ExitCode::SUCCESS)
}

fn rm(g: &Globals, name: &str) -> miette::Result<ExitCode> {
    name_arg(name)?;
    let client = g.client()?;
    if let Some(vms) = users(&client)?.get(name) {
        return Err(miette::miette!(
            code = "vmctl::image::in_use",
            help = format!("delete the VMs first: vmctl delete vm {}", vms.join(" ")),
            "image {name} is used by {}",
            vms.join(", ")
        ));
    }
    super::objects::get_object(&client, Kind::Image, name)?;
    client.delete(Kind::Image, name)?;
    wait_deleted(&client, name)?;
    println!("image/{name} deleted");
    Ok(ExitCode::SUCCESS)
}

/// Waits until the agent has removed the Image's downloaded file and the
/// object is gone (its finalizer).
fn wait_deleted(client: &Client, name: &str) -> miette::Result<()> {
    if super::objects::wait_gone(client, Kind::Image, name, Duration::from_secs(60))? {
        return Ok(());
    }
    Err(miette::miette!(
        code = "vmctl::image::in_use",
        help = format!("run `vmctl describe image {name}`"),
        "image {name} is still being deleted after 60s"
    ))
}

fn prune(g: &Globals) -> miette::Result<ExitCode> {
    let client = g.client()?;
    let used = users(&client)?;
    let images = client.list(Some(Kind::Image), &[])?;
    let mut n = 0;
    for o in images
        .items
        .iter()
        .filter(|o| !used.contains_key(&o.metadata.name) && o.metadata.deletion_timestamp.is_none())
    {
        client.delete(Kind::Image, &o.metadata.name)?;
        wait_deleted(&client, &o.metadata.name)?;
        println!("image/{} deleted", o.metadata.name);
        n += 1;
    }
    if n == 0 {
        eprintln!("no unused images");
    }
    Ok(ExitCode::SUCCESS)
}
