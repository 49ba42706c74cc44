//! The contexts file, in the manner of kubectl's kubeconfig: named
//! remote agents, each with the certificates to reach it, and the one in
//! use.
//!
//! ```yaml
//! apiVersion: vmctl/v1alpha1
//! kind: Config
//! current-context: admin@cluster
//! contexts:
//!   - name: admin@cluster
//!     server: https://127.0.0.2:7443
//!     certificate-authority: /home/me/.config/vmctl/cluster/users/admin/ca.crt
//!     client-certificate: /home/me/.config/vmctl/cluster/users/admin/user.crt
//!     client-key: /home/me/.config/vmctl/cluster/users/admin/user.key
//! ```
//!
//! The file is `--contexts FILE`, else `$VMCTL_CONFIG`, else
//! `$XDG_CONFIG_HOME/vmctl/config.yaml` (`~/.config/vmctl/config.yaml`).
//! Which agent a command talks to is decided once ([`Selection::resolve`]):
//!
//! 1. `--server URL` (`VMCTL_SERVER`): that agent over TLS, with the
//!    certificates of `--context` or the current context, each replaced by
//!    `--certificate-authority`, `--client-certificate`, `--client-key`;
//! 2. else `--context NAME` (`VMCTL_CONTEXT`): that context;
//! 3. else `--socket` or `--data-dir` (or their variables): the local agent;
//! 4. else the current context, when the file names one;
//! 5. else the local agent's Unix socket.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The name `vmctl config use-context` takes for "no context: the local
/// agent's socket"; no context may have it.
pub const LOCAL: &str = "local";

/// The contexts file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContextsFile {
    /// `vmctl/v1alpha1`.
    #[serde(default = "api_version", rename = "apiVersion")]
    pub api_version: String,
    /// `Config`.
    #[serde(default = "config_kind")]
    pub kind: String,
    /// The context commands use without `--context`; none: the local agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// The contexts, by name.
    #[serde(default)]
    pub contexts: Vec<Context>,
}

fn api_version() -> String {
    vmctl_api::API_VERSION.into()
}

fn config_kind() -> String {
    "Config".into()
}

/// One remote agent and the certificates to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    /// Its name.
    pub name: String,
    /// `https://HOST:PORT` of the agent's TLS listener.
    pub server: String,
    /// The cluster CA's certificate (PEM): the agent's must chain to it.
    pub certificate_authority: PathBuf,
    /// This user's certificate (PEM).
    pub client_certificate: PathBuf,
    /// This user's private key (PEM).
    pub client_key: PathBuf,
}

/// Why the contexts file or a context cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The file exists but cannot be read or written.
    #[error("cannot {what} the contexts file {}", path.display())]
    Io {
        /// `read` or `write`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a contexts file.
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// No context has this name.
    #[error("no context `{name}` in {}", path.display())]
    Unknown {
        /// The name asked for.
        name: String,
        /// The file.
        path: PathBuf,
        /// The names there are.
        known: Vec<String>,
    },
    /// `--server` is not `https://HOST:PORT`.
    #[error("--server {0}: {1}")]
    Server(String, String),
    /// `--server` without any certificate to present.
    #[error("--server {0} needs a client certificate, and no context gives one")]
    NoCredentials(String),
}

impl ContextError {
    /// What to do about it.
    pub fn help(&self) -> String {
        match self {
            ContextError::Io { .. } => "check the file's permissions, or point --contexts (VMCTL_CONFIG) at another file".into(),
            ContextError::Invalid { .. } => "fix the file (keys: current-context, contexts: name, server, certificate-authority, client-certificate, client-key), or remove it".into(),
            ContextError::Unknown { known, .. } if known.is_empty() => {
                "there are no contexts yet: `vmctl cluster issue user NAME --server https://HOST:PORT` writes one, or `vmctl config set-context`".into()
            }
            ContextError::Unknown { known, .. } => format!(
                "use one of: {} (`vmctl config get-contexts` lists them; `local` is the local agent)",
                known.join(", ")
            ),
            ContextError::Server(..) => "write it as https://HOST:PORT, e.g. --server https://127.0.0.2:7443".into(),
            ContextError::NoCredentials(_) => "add a context (`vmctl config set-context NAME --server URL --certificate-authority CA --client-certificate CRT --client-key KEY`, or `vmctl cluster issue user NAME --server URL`), or pass --certificate-authority, --client-certificate and --client-key".into(),
        }
    }
}

/// The contexts file's path when `--contexts` is not given:
/// `$VMCTL_CONFIG` is handled by clap; this is
/// `$XDG_CONFIG_HOME/vmctl/config.yaml`, else `~/.config/vmctl/config.yaml`.
pub fn default_path() -> PathBuf {
    config_dir().join("config.yaml")
}

/// `$XDG_CONFIG_HOME/vmctl`, else `~/.config/vmctl`.
pub fn config_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| Path::new(v).is_absolute()) {
        return PathBuf::from(x).join("vmctl");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
        .join(".config/vmctl")
}

impl ContextsFile {
    /// The file at `path`; an empty one when it does not exist.
    ///
    /// # Errors
    /// [`ContextError::Io`], [`ContextError::Invalid`].
    pub fn load(path: &Path) -> Result<Self, ContextError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ContextsFile {
                    api_version: api_version(),
                    kind: config_kind(),
                    ..Default::default()
                });
            }
            Err(source) => {
                return Err(ContextError::Io {
                    what: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let invalid = |why: String| ContextError::Invalid {
            path: path.to_owned(),
            why,
        };
        let file: ContextsFile = serde_yaml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if file.kind != "Config" {
            return Err(invalid(format!(
                "kind is `{}`, expected `Config`",
                file.kind
            )));
        }
        for (i, c) in file.contexts.iter().enumerate() {
            if c.name == LOCAL || c.name.is_empty() {
                return Err(invalid(format!("a context may not be named `{}`", c.name)));
            }
            if file.contexts[..i].iter().any(|o| o.name == c.name) {
                return Err(invalid(format!("context `{}` is defined twice", c.name)));
            }
        }
        Ok(file)
    }

    /// Writes the file to `path` (its directory made when missing),
    /// replacing it whole.
    ///
    /// # Errors
    /// [`ContextError::Io`].
    pub fn save(&self, path: &Path) -> Result<(), ContextError> {
        let io = |source| ContextError::Io {
            what: "write",
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_yaml::to_string(self).expect("contexts serialise");
        let tmp = path.with_extension(format!("yaml.{}.tmp", std::process::id()));
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io(e)
            })
    }

    /// The context named `name`.
    ///
    /// # Errors
    /// [`ContextError::Unknown`] (`path` names the file in the message).
    pub fn get(&self, name: &str, path: &Path) -> Result<&Context, ContextError> {
        self.contexts
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ContextError::Unknown {
                name: name.to_owned(),
                path: path.to_owned(),
                known: self.contexts.iter().map(|c| c.name.clone()).collect(),
            })
    }

    /// Adds `context`, or replaces the one of its name.
    pub fn upsert(&mut self, context: Context) {
        match self.contexts.iter_mut().find(|c| c.name == context.name) {
            Some(c) => *c = context,
            None => self.contexts.push(context),
        }
    }
}

/// A remote agent to talk to, resolved from flags and the contexts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// `https://HOST:PORT`, as given.
    pub server: String,
    /// `HOST` (an IP address without brackets, or a DNS name).
    pub host: String,
    /// `PORT`.
    pub port: u16,
    /// The context it came from, if any.
    pub context: Option<String>,
    /// The certificates: CA, client certificate and key.
    pub identity: vmctl_tls::Identity,
}

/// `https://HOST:PORT` split into host and port.
///
/// # Errors
/// [`ContextError::Server`] for another scheme, a path, or no port.
pub fn parse_server(server: &str) -> Result<(String, u16), ContextError> {
    let bad = |why: &str| ContextError::Server(server.to_owned(), why.to_owned());
    let url = url::Url::parse(server).map_err(|e| bad(&e.to_string()))?;
    if url.scheme() != "https" {
        return Err(bad(
            "the scheme must be https: agents speak TLS only (plain http is never accepted)",
        ));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || !url.username().is_empty() {
        return Err(bad(
            "it must be https://HOST:PORT, with nothing after the port",
        ));
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => return Err(bad("it has no host")),
    };
    let port = url
        .port()
        .ok_or_else(|| bad("it has no port (the agent's --listen port, e.g. :7443)"))?;
    Ok((host, port))
}

/// The flags that select an agent (global options of `vmctl`).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--contexts` / `VMCTL_CONFIG`.
    pub file: Option<PathBuf>,
    /// `--server` / `VMCTL_SERVER`.
    pub server: Option<String>,
    /// `--context` / `VMCTL_CONTEXT`.
    pub context: Option<String>,
    /// `--certificate-authority`.
    pub ca: Option<PathBuf>,
    /// `--client-certificate`.
    pub cert: Option<PathBuf>,
    /// `--client-key`.
    pub key: Option<PathBuf>,
    /// Whether `--socket` or `--data-dir` (or their variables) were given.
    pub local_paths: bool,
}

/// Which agent a command talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// The local agent on its Unix socket (started when none answers).
    Local,
    /// A remote agent over mutual TLS (never started).
    Remote(Box<Remote>),
}

impl Selection {
    /// Resolves the flags against the contexts file (see the module's
    /// documentation for the order).
    ///
    /// # Errors
    /// The file cannot be read, the context does not exist, `--server` is
    /// not `https://HOST:PORT`, or it has no certificates to go with it.
    pub fn resolve(flags: &Flags) -> Result<Selection, ContextError> {
        let path = flags.file.clone().unwrap_or_else(default_path);
        let wants_remote = flags.server.is_some() || flags.context.is_some();
        if !wants_remote && flags.local_paths {
            return Ok(Selection::Local);
        }
        let file = ContextsFile::load(&path)?;
        let name = match (&flags.context, &file.current_context) {
            (Some(n), _) if n == LOCAL => None,
            (Some(n), _) => Some(n.clone()),
            (None, Some(n)) if flags.server.is_some() || !flags.local_paths => Some(n.clone()),
            _ => None,
        };
        let context = match &name {
            Some(n) => Some(file.get(n, &path)?.clone()),
            None => None,
        };
        let server = match (&flags.server, &context) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => c.server.clone(),
            (None, None) => return Ok(Selection::Local),
        };
        let (host, port) = parse_server(&server)?;
        // A flag's path is relative to the working directory, a context's
        // to the file's directory (as kubeconfig's).
        let base = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let pick = |flag: &Option<PathBuf>, from: fn(&Context) -> &PathBuf| {
            flag.as_ref()
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                .or_else(|| context.as_ref().map(|c| base.join(from(c))))
        };
        let (Some(ca), Some(cert), Some(key)) = (
            pick(&flags.ca, |c| &c.certificate_authority),
            pick(&flags.cert, |c| &c.client_certificate),
            pick(&flags.key, |c| &c.client_key),
        ) else {
            return Err(ContextError::NoCredentials(server));
        };
        Ok(Selection::Remote(Box::new(Remote {
            server,
            host,
            port,
            context: name,
            identity: vmctl_tls::Identity { cert, key, ca },
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(name: &str, server: &str) -> Context {
        Context {
            name: name.into(),
            server: server.into(),
            certificate_authority: "/c/ca.crt".into(),
            client_certificate: "/c/user.crt".into(),
            client_key: "/c/user.key".into(),
        }
    }

    #[test]
    fn servers_are_https_with_a_port_and_nothing_else() {
        assert_eq!(
            parse_server("https://127.0.0.2:7443").unwrap(),
            ("127.0.0.2".into(), 7443)
        );
        assert_eq!(
            parse_server("https://[::1]:7443/").unwrap(),
            ("::1".into(), 7443)
        );
        assert!(parse_server("http://127.0.0.2:7443").is_err());
        assert!(parse_server("https://127.0.0.2").is_err());
        assert!(parse_server("https://h:1/v1").is_err());
    }

    #[test]
    fn the_current_context_applies_unless_a_local_path_or_another_context_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let mut f = ContextsFile::load(&path).unwrap();
        f.upsert(context("a", "https://127.0.0.2:7443"));
        f.upsert(context("b", "https://127.0.0.3:7443"));
        f.current_context = Some("a".into());
        f.save(&path).unwrap();
        let flags = |server: Option<&str>, context: Option<&str>, local_paths| Flags {
            file: Some(path.clone()),
            server: server.map(Into::into),
            context: context.map(Into::into),
            local_paths,
            ..Default::default()
        };
        let host = |s: Selection| match s {
            Selection::Remote(r) => r.host,
            Selection::Local => "local".into(),
        };
        assert_eq!(
            host(Selection::resolve(&flags(None, None, false)).unwrap()),
            "127.0.0.2"
        );
        assert_eq!(
            host(Selection::resolve(&flags(None, Some("b"), false)).unwrap()),
            "127.0.0.3"
        );
        assert_eq!(
            host(Selection::resolve(&flags(None, None, true)).unwrap()),
            "local"
        );
        assert_eq!(
            host(Selection::resolve(&flags(None, Some("local"), false)).unwrap()),
            "local"
        );
        assert_eq!(
            host(Selection::resolve(&flags(Some("https://10.1.1.1:1"), None, true)).unwrap()),
            "10.1.1.1"
        );
        assert!(matches!(
            Selection::resolve(&flags(None, Some("c"), false)),
            Err(ContextError::Unknown { .. })
        ));
        // --server with no context at all needs the three files.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            Selection::resolve(&flags(Some("https://h:1"), None, false)),
            Err(ContextError::NoCredentials(_))
        ));
    }
}
