//! Clients' credentials and what each principal may do.
//!
//! A client presents a bearer token in its Hello, inside TLS. The server keeps only each
//! token's SHA-256 (a leaked `auth.toml` gives no token away; tokens are 256 random bits, so a
//! fast hash suffices, no password hashing), hashes what it is given and compares it with
//! every principal's hash in constant time. Tokens and not client certificates: a token is one
//! line to hand out, to export in a shell, or to revoke by deleting a principal, with no
//! certificate signing per client; TLS already authenticates the server to the client.
//!
//! `auth.toml`:
//!
//! ```toml
//! [principals.admin]
//! token_sha256 = "9f86d0…"      # `holdfast token hash TOKEN` prints it
//! admin = true                   # create topics (and, implied, produce and consume anything)
//!
//! [principals.billing]
//! token_sha256 = "…"
//! produce = ["orders", "audit-*"]        # topics: exact names, or prefixes ending in `*`
//! consume_groups = ["billing"]           # consumer groups it may consume (and ack) as
//! consume_topics = ["orders"]            # topics it may consume from
//! ```
//!
//! Every authenticated principal may ask `Status`, `Topics` and `Route`.

use std::collections::BTreeMap;
use std::path::Path;

use holdfast_core::broker::QueueId;
use holdfast_core::node::protocol::Request;
use ring::digest::{SHA256, digest};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    principals: BTreeMap<String, PrincipalConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalConfig {
    token_sha256: String,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    produce: Vec<String>,
    #[serde(default)]
    consume_groups: Vec<String>,
    #[serde(default)]
    consume_topics: Vec<String>,
}

/// A principal: who a connection authenticated as, and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    token_sha256: [u8; 32],
    admin: bool,
    produce: Vec<Pattern>,
    consume_groups: Vec<Pattern>,
    consume_topics: Vec<Pattern>,
}

/// A name, or a prefix followed by `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str) -> Pattern {
        match text.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_string()),
            None => Pattern::Exact(text.to_string()),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == name,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
        }
    }
}

fn any_matches(patterns: &[Pattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

/// Every principal of a node, from its `auth.toml`.
#[derive(Clone, Debug, Default)]
pub struct Principals {
    principals: Vec<Principal>,
}

/// The hex SHA-256 of a token, as `auth.toml` stores it.
pub fn token_sha256_hex(token: &str) -> String {
    hex(digest(&SHA256, token.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// A new random token: `hf_` and 64 hex digits (256 bits from the operating system).
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "no randomness from the operating system".to_string())?;
    Ok(format!("hf_{}", hex(&bytes)))
}

/// Equal in time independent of where they differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Principals {
    pub fn from_file(path: &Path) -> Result<Principals, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Principals::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Principals, String> {
        let file: AuthFile = toml::from_str(text).map_err(|e| e.message().replace('\n', " "))?;
        let mut principals = Vec::new();
        for (name, config) in file.principals {
            let token_sha256 = unhex(&config.token_sha256).ok_or_else(|| {
                format!("principal {name}: token_sha256 must be 64 hex digits (a SHA-256)")
            })?;
            let patterns = |list: &[String]| list.iter().map(|p| Pattern::parse(p)).collect();
            principals.push(Principal {
                token_sha256,
                admin: config.admin,
                produce: patterns(&config.produce),
                consume_groups: patterns(&config.consume_groups),
                consume_topics: patterns(&config.consume_topics),
                name,
            });
        }
        Ok(Principals { principals })
    }

    pub fn len(&self) -> usize {
        self.principals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
    }

    /// The principal whose token this is. Every principal's hash is compared, in constant
    /// time, so neither the time taken nor which one matched tells how close a guess was.
    pub fn authenticate(&self, token: &str) -> Option<&Principal> {
        let presented: [u8; 32] = digest(&SHA256, token.as_bytes()).as_ref().try_into().ok()?;
        let mut found = None;
        for principal in &self.principals {
            if constant_time_eq(&principal.token_sha256, &presented) && found.is_none() {
                found = Some(principal);
            }
        }
        found
    }
}

impl Principal {
    /// Whether this principal may make `request`; the refusal says what it lacks.
    pub fn authorise(&self, request: &Request) -> Result<(), String> {
        if self.admin {
            return Ok(());
        }
        let name = &self.name;
        match request {
            Request::Route { .. } | Request::Topics | Request::Status | Request::Nodes => Ok(()),
            Request::CreateTopic { topic, .. } => Err(format!(
                "not authorised: principal {name} may not create topic {topic} (not admin)"
            )),
            Request::DeleteTopic { topic } => Err(format!(
                "not authorised: principal {name} may not delete topic {topic} (not admin)"
            )),
            Request::SeekGroup { group, .. } | Request::DeleteGroup { group, .. } => Err(format!(
                "not authorised: principal {name} may not seek or delete consumer group {group} \
                 (not admin)"
            )),
            Request::PeekDeadLetters { group, .. } | Request::RedriveDeadLetters { group, .. } => {
                Err(format!(
                    "not authorised: principal {name} may not read or redrive consumer group \
                     {group}'s dead letters (not admin)"
                ))
            }
            Request::TransferLeader { group, .. } => Err(format!(
                "not authorised: principal {name} may not move group {group}'s leader (not admin)"
            )),
            Request::ChangeMembership { group, .. } => Err(format!(
                "not authorised: principal {name} may not change group {group}'s members (not \
                 admin)"
            )),
            Request::AddNode { id, .. } | Request::RemoveNode { id, .. } => Err(format!(
                "not authorised: principal {name} may not add or remove node {id} (not admin)"
            )),
            Request::AddBrokerGroup { .. } => Err(format!(
                "not authorised: principal {name} may not add a broker group (not admin)"
            )),
            Request::Heartbeat { group, topic, .. } => {
                self.may_consume_as(group)?;
                self.may_consume_from(group, &QueueId::new(topic.as_str(), 0))
            }
            Request::Leave { group, .. } => self.may_consume_as(group),
            Request::Send { queue, .. } => {
                if any_matches(&self.produce, &queue.topic) {
                    Ok(())
                } else {
                    Err(format!(
                        "not authorised: principal {name} may not produce to topic {}",
                        queue.topic
                    ))
                }
            }
            Request::Pull { group, queue, .. }
            | Request::Ack { group, queue, .. }
            | Request::ReconsumeLater { group, queue, .. }
            | Request::Release { group, queue, .. } => {
                self.may_consume_as(group)?;
                self.may_consume_from(group, queue)
            }
        }
    }

    fn may_consume_as(&self, group: &str) -> Result<(), String> {
        if any_matches(&self.consume_groups, group) {
            return Ok(());
        }
        Err(format!(
            "not authorised: principal {} may not consume as group {group}",
            self.name
        ))
    }

    fn may_consume_from(&self, group: &str, queue: &QueueId) -> Result<(), String> {
        // A group's own retry and dead-letter queues come with the group.
        if *queue == QueueId::dead_letter(group) || queue.topic == QueueId::retry(group, 0).topic {
            return Ok(());
        }
        if any_matches(&self.consume_topics, &queue.topic) {
            return Ok(());
        }
        Err(format!(
            "not authorised: principal {} may not consume from topic {}",
            self.name, queue.topic
        ))
    }
}

/// The `auth.toml` text of one admin principal with the token `token`.
pub fn admin_file(name: &str, token: &str) -> String {
    format!(
        "# Principals of this cluster: who may connect, and what each may do. Only each token's\n\
         # SHA-256 is kept here. See the README for the keys.\n\
         [principals.{name}]\ntoken_sha256 = \"{}\"\nadmin = true\n",
        token_sha256_hex(token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principals() -> Principals {
        let text = format!(
            "[principals.root]\ntoken_sha256 = \"{}\"\nadmin = true\n\
             [principals.billing]\ntoken_sha256 = \"{}\"\nproduce = [\"orders\", \"audit-*\"]\n\
             consume_groups = [\"billing\"]\nconsume_topics = [\"orders\"]\n",
            token_sha256_hex("root-token"),
            token_sha256_hex("billing-token"),
        );
        Principals::from_toml(&text).expect("parses")
    }

    fn send(topic: &str) -> Request {
        Request::Send {
            broker: 1,
            queue: QueueId::new(topic, 0),
            producer_id: 1,
            first_seq: 0,
            messages: Vec::new(),
        }
    }

    fn pull(group: &str, queue: QueueId) -> Request {
        Request::Pull {
            broker: 1,
            group: group.into(),
            member: "m".into(),
            generation: 0,
            tenure: 1,
            queue,
            from: 0,
            messages_max: 1,
            bytes_max: 1,
            wait_ms: 0,
        }
    }

    #[test]
    fn tokens_authenticate_their_principal_only() {
        let all = principals();
        assert_eq!(
            all.authenticate("root-token").map(|p| &*p.name),
            Some("root")
        );
        assert_eq!(
            all.authenticate("billing-token").map(|p| &*p.name),
            Some("billing")
        );
        assert!(all.authenticate("billing-token ").is_none());
        assert!(all.authenticate("").is_none());
        let token = new_token().expect("token");
        assert!(token.starts_with("hf_") && token.len() == 67, "{token}");
        assert_ne!(token, new_token().expect("another"));
    }

    #[test]
    fn acls_allow_what_they_name_and_refuse_the_rest_saying_why() {
        let all = principals();
        let root = all.authenticate("root-token").expect("root");
        let billing = all.authenticate("billing-token").expect("billing");
        let create = Request::CreateTopic {
            topic: "x".into(),
            queues: 1,
        };
        assert_eq!(root.authorise(&create), Ok(()));
        let why = billing.authorise(&create).expect_err("not admin");
        assert!(
            why.contains("not authorised") && why.contains("billing"),
            "{why}"
        );
        assert_eq!(billing.authorise(&Request::Topics), Ok(()));
        assert_eq!(billing.authorise(&send("orders")), Ok(()));
        assert_eq!(billing.authorise(&send("audit-7")), Ok(()));
        let why = billing.authorise(&send("payroll")).expect_err("not listed");
        assert!(why.contains("payroll"), "{why}");
        assert_eq!(
            billing.authorise(&pull("billing", QueueId::new("orders", 1))),
            Ok(())
        );
        assert_eq!(
            billing.authorise(&pull("billing", QueueId::retry("billing", 3))),
            Ok(())
        );
        assert!(
            billing
                .authorise(&pull("billing", QueueId::retry("other", 3)))
                .is_err()
        );
        let why = billing
            .authorise(&pull("shipping", QueueId::new("orders", 1)))
            .expect_err("another group");
        assert!(why.contains("group shipping"), "{why}");
        let why = billing
            .authorise(&pull("billing", QueueId::new("payroll", 1)))
            .expect_err("another topic");
        assert!(why.contains("topic payroll"), "{why}");
        let heartbeat = Request::Heartbeat {
            group: "shipping".into(),
            member: "m".into(),
            topic: "orders".into(),
        };
        assert!(billing.authorise(&heartbeat).is_err());
        // Seeking and deleting a group are the admin's, even for a group one consumes as.
        let seek = Request::SeekGroup {
            broker: 1,
            group: "billing".into(),
            queue: QueueId::new("orders", 0),
            to: holdfast_core::broker::SeekTo::Earliest,
            force: false,
        };
        let delete = Request::DeleteGroup {
            broker: 1,
            group: "billing".into(),
            force: true,
        };
        // So are the cluster's members; anyone may read the node table.
        let change = Request::ChangeMembership {
            group: 0,
            change: holdfast_core::raft::ConfChange::AddLearner(4),
            force: false,
        };
        let add = Request::AddNode {
            id: 4,
            client_addr: "h:1".into(),
            peer_addr: "h:2".into(),
        };
        let remove = Request::RemoveNode { id: 2, force: true };
        for request in [seek, delete, change, add, remove] {
            assert_eq!(root.authorise(&request), Ok(()));
            let why = billing.authorise(&request).expect_err("not admin");
            assert!(why.contains("not admin"), "{why}");
        }
        assert_eq!(billing.authorise(&Request::Nodes), Ok(()));
    }

    #[test]
    fn a_bad_hash_is_refused_naming_the_principal() {
        let error = Principals::from_toml("[principals.x]\ntoken_sha256 = \"abc\"\n")
            .expect_err("short hash");
        assert!(error.contains("principal x"), "{error}");
        assert!(Principals::from_toml("[principals.x]\ntoken = \"abc\"\n").is_err());
        let admin = Principals::from_toml(&admin_file("admin", "t")).expect("admin file");
        assert_eq!(admin.authenticate("t").map(|p| &*p.name), Some("admin"));
    }
}
