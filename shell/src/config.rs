//! A node's configuration: a TOML file, with command-line flags on top.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use holdfast_core::raft::NodeId;
use serde::Deserialize;

/// What `node.toml` holds. Unknown keys are refused, so a typo is an error, not a default.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// This node's id: a key of `nodes`.
    pub id: NodeId,
    /// Every node of the cluster, this one included: id to the address it listens on.
    pub nodes: BTreeMap<NodeId, SocketAddr>,
    /// Where this node keeps its data (a directory per group).
    pub data_dir: PathBuf,
    /// Broker groups (the metadata group comes on top).
    #[serde(default = "default_broker_groups")]
    pub broker_groups: u64,
}

/// The 1-based number and the trimmed text of the line holding byte `at`.
fn line_of(text: &str, at: usize) -> Option<(usize, &str)> {
    let before = text.get(..at)?;
    let number = before.matches('\n').count() + 1;
    let line = text.lines().nth(number - 1)?.trim();
    Some((number, line))
}

fn default_broker_groups() -> u64 {
    2
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl ServerConfig {
    pub fn from_file(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    pub fn from_toml(text: &str) -> Result<ServerConfig, ConfigError> {
        let config: ServerConfig = toml::from_str(text)
            .map_err(|e| {
                let message = e.message().replace('\n', " ");
                // Name the offending line: serde's messages about values omit the key.
                match e.span().and_then(|span| line_of(text, span.start)) {
                    Some((number, line)) => {
                        ConfigError(format!("line {number} `{line}`: {message}"))
                    }
                    None => ConfigError(message),
                }
            })
            .map_err(|e| match e.0.as_str() {
                m if m.contains("unknown field") => ConfigError(format!("bad config key: {m}")),
                _ => e,
            })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.nodes.contains_key(&self.id) {
            return Err(ConfigError(format!(
                "key `id`: node {} is not among `nodes` ({:?})",
                self.id,
                self.nodes.keys().collect::<Vec<_>>()
            )));
        }
        if self.nodes.contains_key(&0) {
            return Err(ConfigError("key `nodes`: node ids start at 1".into()));
        }
        if !(1..=64).contains(&self.broker_groups) {
            return Err(ConfigError(format!(
                "key `broker_groups`: {} is not in 1..=64",
                self.broker_groups
            )));
        }
        Ok(())
    }

    pub fn listen(&self) -> SocketAddr {
        self.nodes[&self.id]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_config_parses_and_a_bad_one_names_the_key() {
        let good = r#"
            id = 2
            data_dir = "/tmp/x"
            [nodes]
            1 = "127.0.0.1:7301"
            2 = "127.0.0.1:7302"
        "#;
        let config = ServerConfig::from_toml(good).expect("parses");
        assert_eq!(config.listen().port(), 7302);
        assert_eq!(config.broker_groups, 2);

        let typo = good.replace("data_dir", "datadir");
        let error = ServerConfig::from_toml(&typo)
            .expect_err("typo refused")
            .to_string();
        assert!(error.contains("datadir"), "{error}");
        let stranger = good.replace("id = 2", "id = 9");
        let error = ServerConfig::from_toml(&stranger)
            .expect_err("unknown id")
            .to_string();
        assert!(error.contains("key `id`"), "{error}");
        let wrong_type = good.replace("id = 2", "id = \"two\"");
        assert!(ServerConfig::from_toml(&wrong_type).is_err());
    }
}
