//! `vmctl get [KIND [NAME]]`.

use std::process::ExitCode;

use vmctl_api::wire::ObjectList;
use vmctl_api::{Kind, Object, Resource};

use super::{Globals, age, kind_arg, name_arg, table};
use crate::cli::GetOutput;
use crate::output::print;

fn phase(o: &Object) -> String {
    o.status
        .as_ref()
        .and_then(|s| s.get("phase"))
        .and_then(|p| p.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if o.metadata.deletion_timestamp.is_some() {
                "Terminating"
            } else {
                "Pending"
            }
            .into()
        })
}

/// One table row for an object.
pub(crate) fn row(o: &Object, wide: bool) -> Vec<String> {
    let gen_cols = |o: &Object| {
        let observed = o
            .status
            .as_ref()
            .and_then(|s| s.get("observedGeneration"))
            .and_then(|g| g.as_u64())
            .unwrap_or(0);
        vec![o.metadata.generation.to_string(), observed.to_string()]
    };
    let mut r = vec![o.metadata.name.clone(), phase(o)];
    match Resource::from_object(o) {
        Ok(Resource::VirtualMachine(vm)) => {
            r.push(vm.spec.vcpus.to_string());
            r.push(format!("{}Mi", vm.spec.memory_mib));
            r.push(vm.spec.image.clone());
            if wide {
                r.push(format!("{:?}", vm.spec.power_state));
                let rt = vm.status.and_then(|s| s.runtime).unwrap_or_default();
                r.push(rt.pid.map_or("-".into(), |p| p.to_string()));
                r.push(rt.ssh_port.map_or("-".into(), |p| {
                    format!("{}:{p}", rt.ssh_host.unwrap_or_default())
                }));
            }
        }
        Ok(Resource::Image(img)) => {
            r.push(match &img.spec.source {
                vmctl_api::ImageSource::Url { url } => url.clone(),
                vmctl_api::ImageSource::Path { path } => path.clone(),
            });
            if wide {
                let st = img.status.unwrap_or_default();
                r.push(st.format.unwrap_or_else(|| "-".into()));
                r.push(
                    st.size_bytes
                        .map_or("-".into(), |b| format!("{}Mi", b / (1024 * 1024))),
                );
            }
        }
        Ok(Resource::Provision(p)) => {
            r.push(p.spec.vm.clone());
            r.push(p.spec.steps.len().to_string());
        }
        Err(_) => {}
    }
    if wide {
        r.extend(gen_cols(o));
    }
    r.push(age(o.metadata.creation_timestamp));
    r
}

/// The header of a kind's table.
pub(crate) fn header(kind: Kind, wide: bool) -> Vec<String> {
    let mut h: Vec<&str> = match kind {
        Kind::VirtualMachine => vec!["NAME", "PHASE", "VCPUS", "MEMORY", "IMAGE"],
        Kind::Image => vec!["NAME", "PHASE", "SOURCE"],
        Kind::Provision => vec!["NAME", "PHASE", "VM", "STEPS"],
    };
    if wide {
        match kind {
            Kind::VirtualMachine => h.extend(["POWER", "PID", "SSH"]),
            Kind::Image => h.extend(["FORMAT", "SIZE"]),
            Kind::Provision => {}
        }
        h.extend(["GEN", "OBSERVED"]);
    }
    h.push("AGE");
    h.into_iter().map(str::to_owned).collect()
}

/// Prints objects as a table or in a machine format.
pub(crate) fn render(objects: &[Object], output: GetOutput) -> String {
    match output {
        GetOutput::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(objects).expect("serialises")
        ),
        GetOutput::Yaml => {
            let mut s = String::new();
            for (i, o) in objects.iter().enumerate() {
                if i > 0 {
                    s.push_str("---\n");
                }
                s.push_str(&serde_yaml::to_string(o).expect("serialises"));
            }
            s
        }
        GetOutput::Name => objects
            .iter()
            .map(|o| format!("{}\n", o.object_ref()))
            .collect(),
        GetOutput::Table | GetOutput::Wide => {
            let wide = output == GetOutput::Wide;
            let mut out = String::new();
            for kind in Kind::ALL {
                let of_kind: Vec<&Object> = objects.iter().filter(|o| o.kind == kind).collect();
                if of_kind.is_empty() {
                    continue;
                }
                if !out.is_empty() {
                    out.push('\n');
                }
                let mut rows = vec![header(kind, wide)];
                rows.extend(of_kind.iter().map(|o| row(o, wide)));
                out.push_str(&table(&rows));
            }
            out
        }
    }
}

/// Lists objects.
pub fn run(
    g: &Globals,
    kind: Option<&str>,
    name: Option<&str>,
    output: GetOutput,
    selector: &[String],
    watch: bool,
) -> miette::Result<ExitCode> {
    let kind = kind.map(kind_arg).transpose()?;
    if let Some(n) = name {
        name_arg(n)?;
    }
    for s in selector {
        if !s.contains('=') {
            return Err(miette::miette!(
                code = "vmctl::cli::bad_selector",
                help = "write -l key=value",
                "selector `{s}` has no `=`"
            ));
        }
    }
    let client = g.client()?;
    let mut rv = 0;
    let objects = match (kind, name) {
        (Some(k), Some(n)) => vec![super::objects::get_object(&client, k, n)?],
        (k, _) => {
            let path = match k {
                Some(k) => format!("/v1/objects/{}", k.short()),
                None => "/v1/objects".into(),
            };
            let path = if selector.is_empty() {
                path
            } else {
                format!("{path}?labels={}", selector.join(","))
            };
            let list = client.call::<ObjectList>("GET", &path, None::<&()>)?;
            rv = list.resource_version;
            list.items
        }
    };
    if watch {
        if !objects.is_empty() {
            print(&render(&objects, output))?;
        }
        return watch_rows(&client, kind, name, rv, output);
    }
    if objects.is_empty() && matches!(output, GetOutput::Table | GetOutput::Wide) {
        eprintln!("No resources found.");
        return Ok(ExitCode::SUCCESS);
    }
    print(&render(&objects, output))?;
    Ok(ExitCode::SUCCESS)
}

/// Prints one row (or document) per change of a matching object until the
/// stream ends or the user interrupts.
fn watch_rows(
    client: &crate::client::Client,
    kind: Option<Kind>,
    name: Option<&str>,
    after: u64,
    output: GetOutput,
) -> miette::Result<ExitCode> {
    let resp = client.send("GET", &format!("/v1/watch?after={after}"), None)?;
    let mut failure = None;
    resp.lines(|line| {
        let Ok(ev) = serde_json::from_slice::<serde_json::Value>(line) else {
            return true;
        };
        if ev["type"] == "resync" {
            failure = Some(ev["message"].as_str().unwrap_or("resync").to_owned());
            return false;
        }
        let Ok(r) = serde_json::from_value::<vmctl_api::ObjectRef>(ev["object"].clone()) else {
            return true;
        };
        if kind.is_some_and(|k| k != r.kind)
            || name.is_some_and(|n| n != r.name)
            || ev["change"]["type"] == "noted"
        {
            return true;
        }
        let path = format!("/v1/objects/{}/{}", r.kind.short(), r.name);
        let text = match client.call::<Object>("GET", &path, None::<&()>) {
            Ok(o) => match output {
                GetOutput::Table | GetOutput::Wide => table(&[row(&o, output == GetOutput::Wide)]),
                _ => render(&[o], output),
            },
            Err(_) => format!("{r} deleted\n"),
        };
        print(&text).is_ok()
    })?;
    match failure {
        Some(m) => Err(miette::miette!(
            code = "vmctl::get::resync",
            help = "run the command again",
            "watch ended: {m}"
        )),
        None => Ok(ExitCode::SUCCESS),
    }
}
