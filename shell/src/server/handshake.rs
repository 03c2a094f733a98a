//! What a connection's Hello may claim on each port: the decision alone, without sockets, so
//! the `frames` fuzz target can drive it with arbitrary Hellos, tokens and certificates.

use std::collections::BTreeSet;

use holdfast_core::raft::NodeId;
use holdfast_core::wire::{Frame, check_hello};
use rustls::pki_types::CertificateDer;

use crate::auth::{Principal, Principals};

/// Which listener a connection came from (or, for links this node dialed, `Peer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    Client,
    Peer,
}

/// What the node knows when a Hello arrives.
pub struct HelloContext<'a> {
    pub port: Port,
    /// This node.
    pub me: NodeId,
    /// Every node of the cluster.
    pub nodes: &'a BTreeSet<NodeId>,
    /// The node this connection was dialed to, for links this node opened.
    pub dialed: Option<NodeId>,
    /// `None`: the cluster runs with `no_auth`.
    pub principals: Option<&'a Principals>,
    /// The certificate the other side presented, already verified by rustls against the
    /// cluster CA (`None`: none, or no TLS).
    pub certificate: Option<&'a CertificateDer<'a>>,
}

/// Who a Hello that was accepted makes the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted {
    Node(NodeId),
    /// A client, as this principal (`None` without authentication).
    Client(Option<Principal>),
}

/// Accepts or refuses `frame` as the first frame of a connection; a refusal says why.
pub fn accept_hello(context: &HelloContext<'_>, frame: &Frame) -> Result<Accepted, String> {
    let hello = check_hello(frame).map_err(|e| e.to_string())?;
    match (context.port, hello.node) {
        (Port::Client, Some(node)) => Err(format!(
            "a node's Hello (node {node}) on the client port; nodes use the peer port"
        )),
        (Port::Peer, None) => {
            Err("a client's Hello on the peer port; clients use the client port".into())
        }
        (Port::Peer, Some(node)) => {
            if let Some(dialed) = context.dialed
                && dialed != node
            {
                return Err(format!("dialed node {dialed} but node {node} answered"));
            }
            if node == context.me || !context.nodes.contains(&node) {
                return Err(format!("node {node} is not a peer of node {}", context.me));
            }
            if context.principals.is_some() {
                // rustls verified the chain to the CA (and, dialing, the name); the
                // certificate must also name the node the Hello claims.
                crate::tls::verify_peer_identity(context.certificate, node)?;
            }
            Ok(Accepted::Node(node))
        }
        (Port::Client, None) => match context.principals {
            None => Ok(Accepted::Client(None)),
            Some(principals) => {
                let Some(presented) = hello.token.as_deref() else {
                    return Err("no credential: this cluster requires a token".into());
                };
                match principals.authenticate(presented) {
                    Some(principal) => Ok(Accepted::Client(Some(principal.clone()))),
                    None => Err("bad credential: no principal has this token".into()),
                }
            }
        },
    }
}
