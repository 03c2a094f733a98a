//! How a client reaches a cluster: the servers, the cluster CA to verify them against, and the
//! token to present. Built in code, or read from a client file such as the one `holdfast
//! cluster` writes (`holdfast-data/client.toml`):
//!
//! ```toml
//! servers = ["127.0.0.1:7301", "127.0.0.1:7302", "127.0.0.1:7303"]   # node n is the n-th
//! ca_cert = "ca.pem"      # relative to this file; absent: plaintext (a `no_auth` cluster)
//! token = "hf_…"          # this principal's credential
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::{ClientError, DEFAULT_SERVERS, parse_servers};

/// The environment variable naming a client file (`holdfast cluster` prints the line).
pub const CLIENT_FILE_ENV: &str = "HOLDFAST_CLIENT";
/// Where client commands look for a client file when none is named: the local cluster's.
pub const DEFAULT_CLIENT_FILE: &str = "holdfast-data/client.toml";

#[derive(Clone)]
pub struct ClientConfig {
    /// Node n at `servers[n - 1]`.
    pub servers: Vec<SocketAddr>,
    /// Trust for the servers' certificates; `None`: plaintext.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The bearer token sent in the Hello.
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("servers", &self.servers)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

impl From<Vec<SocketAddr>> for ClientConfig {
    /// Plaintext, no credential: for a cluster run with `no_auth`.
    fn from(servers: Vec<SocketAddr>) -> ClientConfig {
        ClientConfig::plaintext(servers)
    }
}

impl From<&ClientConfig> for ClientConfig {
    fn from(config: &ClientConfig) -> ClientConfig {
        config.clone()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    servers: Vec<String>,
    #[serde(default)]
    ca_cert: Option<PathBuf>,
    #[serde(default)]
    token: Option<String>,
}

impl ClientConfig {
    pub fn plaintext(servers: Vec<SocketAddr>) -> ClientConfig {
        ClientConfig {
            servers,
            tls: None,
            token: None,
        }
    }

    /// TLS against the CA certificate(s) in `ca_pem`, presenting `token`.
    pub fn secure(
        servers: Vec<SocketAddr>,
        ca_pem: &str,
        token: &str,
    ) -> Result<ClientConfig, ClientError> {
        let ca = crate::tls::certificates_from_pem(ca_pem).map_err(ClientError::Config)?;
        Ok(ClientConfig {
            servers,
            tls: Some(crate::tls::client_config(&ca).map_err(ClientError::Config)?),
            token: Some(token.to_string()),
        })
    }

    /// Reads a client file; a relative `ca_cert` is taken from the file's directory.
    pub fn from_file(path: &Path) -> Result<ClientConfig, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::Config(format!("cannot read client file {}: {e}", path.display()))
        })?;
        let file: ClientFile = toml::from_str(&text).map_err(|e| {
            ClientError::Config(format!(
                "{}: {}",
                path.display(),
                e.message().replace('\n', " ")
            ))
        })?;
        let servers = parse_servers(&file.servers.join(","))?;
        let tls = match file.ca_cert {
            None => None,
            Some(ca) => {
                let ca = match (ca.is_relative(), path.parent()) {
                    (true, Some(dir)) => dir.join(ca),
                    _ => ca,
                };
                let certs = crate::tls::read_certificates(&ca).map_err(ClientError::Config)?;
                Some(crate::tls::client_config(&certs).map_err(ClientError::Config)?)
            }
        };
        Ok(ClientConfig {
            servers,
            tls,
            token: file.token,
        })
    }

    /// The client file a command uses: `explicit` (a flag or [`CLIENT_FILE_ENV`]), else
    /// [`DEFAULT_CLIENT_FILE`] if it exists; `None`: plaintext to the default servers.
    pub fn find(explicit: Option<&Path>) -> Result<Option<ClientConfig>, ClientError> {
        match explicit {
            Some(path) => ClientConfig::from_file(path).map(Some),
            None => {
                let default = Path::new(DEFAULT_CLIENT_FILE);
                if default.exists() {
                    ClientConfig::from_file(default).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

impl ClientConfig {
    /// What a client command uses: the client file's settings (`client_file`, or the one found
    /// under ./holdfast-data), with `servers` over its servers; without a client file,
    /// plaintext to `servers` or the local cluster's default addresses.
    pub fn resolve(
        servers: Option<&str>,
        client_file: Option<&Path>,
    ) -> Result<ClientConfig, ClientError> {
        let found = ClientConfig::find(client_file)?;
        let listed = servers.map(parse_servers).transpose()?;
        Ok(match (found, listed) {
            (Some(mut config), Some(servers)) => {
                config.servers = servers;
                config
            }
            (Some(config), None) => config,
            (None, Some(servers)) => ClientConfig::plaintext(servers),
            (None, None) => ClientConfig::plaintext(parse_servers(DEFAULT_SERVERS)?),
        })
    }
}

/// The client file's text (the CA certificate beside it as `ca_file_name`, if any).
pub fn client_file_text(
    servers: &[SocketAddr],
    ca_file_name: Option<&str>,
    token: Option<&str>,
) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("{:?}", s.to_string()))
        .collect();
    let mut text = format!(
        "# Written by `holdfast cluster`: how client commands reach this cluster.\n\
         servers = [{}]\n",
        list.join(", ")
    );
    if let Some(ca) = ca_file_name {
        text.push_str(&format!("ca_cert = {ca:?}\n"));
    }
    if let Some(token) = token {
        text.push_str(&format!("token = {token:?}\n"));
    }
    text
}
