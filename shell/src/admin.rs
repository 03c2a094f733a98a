//! Consumer-group administration for the CLI: list, describe, seek and delete; reading and
//! re-driving dead letters.
//!
//! Reads come from each broker group's leader (its `Status`: committed offsets, queue ends and
//! queue holders as it has applied them); seek and delete are commands through each broker
//! group's Raft log, admin-only, refused while a member holds a queue unless forced.

use std::collections::BTreeMap;
use std::time::Duration;

use holdfast_core::broker::{QueueId, SeekTo};
use holdfast_core::node::protocol::{ConsumerProgress, QueueHolder, Request, Response};
use holdfast_core::raft::{ConfChange, GroupId, NodeId};
use serde_json::json;

use crate::client::{Admin, ClientConfig, ClientError};
use crate::output::{Failed, Failure, json_line};

/// How long an admin command keeps looking for a leader.
const ADMIN_WAIT: Duration = Duration::from_secs(10);

/// One queue of one consumer group, as its broker group's leader has applied it.
#[derive(Clone, Debug, Default)]
pub struct GroupQueue {
    pub broker: GroupId,
    pub queue: Option<QueueId>,
    pub consume_offset: u64,
    pub end_offset: u64,
    pub holder: Option<String>,
    pub generation: u64,
}

impl GroupQueue {
    pub fn lag(&self) -> u64 {
        self.end_offset.saturating_sub(self.consume_offset)
    }
}

/// Every consumer group's queues, from the leader of each broker group: what `group list`
/// and `group describe` show.
pub fn collect(admin: &mut Admin) -> Result<BTreeMap<String, Vec<GroupQueue>>, Failed> {
    let mut by_group: BTreeMap<String, BTreeMap<(GroupId, QueueId), GroupQueue>> = BTreeMap::new();
    let mut led = std::collections::BTreeSet::new();
    let mut answered = false;
    for node in admin.node_ids() {
        let Some(Response::Status { groups, .. }) = admin.ask(node, Request::Status) else {
            if let Some(why) = admin.refusal() {
                return Err(Failed::refused(format!("refused: {why}")));
            }
            continue;
        };
        answered = true;
        for g in groups {
            if g.group == 0 || g.role != "Leader" || !led.insert(g.group) {
                continue;
            }
            for ConsumerProgress {
                group,
                queue,
                consume_offset,
                queue_len,
            } in g.consumers
            {
                let entry = by_group
                    .entry(group)
                    .or_default()
                    .entry((g.group, queue.clone()))
                    .or_default();
                entry.broker = g.group;
                entry.queue = Some(queue);
                entry.consume_offset = consume_offset;
                entry.end_offset = queue_len;
            }
            for QueueHolder {
                group,
                queue,
                member,
                generation,
            } in g.holders
            {
                let entry = by_group
                    .entry(group)
                    .or_default()
                    .entry((g.group, queue.clone()))
                    .or_default();
                entry.broker = g.group;
                entry.queue = Some(queue);
                entry.holder = member;
                entry.generation = generation;
            }
        }
    }
    if !answered {
        return Err(Failed::new(Failure::Timeout, "no server answered"));
    }
    Ok(by_group
        .into_iter()
        .map(|(group, queues)| (group, queues.into_values().collect()))
        .collect())
}

pub fn list(config: ClientConfig, json: bool) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    let groups = collect(&mut admin)?;
    let rows: Vec<_> = groups
        .iter()
        .map(|(name, queues)| {
            let lag: u64 = queues.iter().map(GroupQueue::lag).sum();
            let mut members: Vec<&str> =
                queues.iter().filter_map(|q| q.holder.as_deref()).collect();
            members.sort_unstable();
            members.dedup();
            (name, queues.len(), lag, members)
        })
        .collect();
    if json {
        let groups: Vec<_> = rows
            .iter()
            .map(|(name, queues, lag, members)| {
                json!({"group": name, "queues": queues, "lag": lag, "members": members})
            })
            .collect();
        json_line(&json!({ "groups": groups }));
        return Ok(());
    }
    if rows.is_empty() {
        out!("no consumer groups");
    }
    for (name, queues, lag, members) in rows {
        out!(
            "{name}\t{queues} queues\tlag {lag}\tmembers holding queues: {}",
            if members.is_empty() {
                "none".to_string()
            } else {
                members.join(", ")
            }
        );
    }
    Ok(())
}

pub fn describe(config: ClientConfig, group: &str, json: bool) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    let mut groups = collect(&mut admin)?;
    let Some(queues) = groups.remove(group) else {
        return Err(Failed::refused(format!(
            "unknown consumer group {group:?}: no broker group leader knows it"
        )));
    };
    if json {
        let rows: Vec<_> = queues
            .iter()
            .map(|q| {
                let queue = q.queue.clone().unwrap_or_else(|| QueueId::new("", 0));
                json!({
                    "broker_group": q.broker,
                    "topic": queue.topic,
                    "queue": queue.queue,
                    "committed_offset": q.consume_offset,
                    "end_offset": q.end_offset,
                    "lag": q.lag(),
                    "holder": q.holder,
                    "generation": q.generation,
                })
            })
            .collect();
        json_line(&json!({"group": group, "queues": rows}));
        return Ok(());
    }
    out!("consumer group {group}");
    for q in &queues {
        let queue = q
            .queue
            .as_ref()
            .map_or_else(|| "?".to_string(), ToString::to_string);
        out!(
            "  {queue:<24} broker group {:<3} committed {:<8} end {:<8} lag {:<8} {}",
            q.broker,
            q.consume_offset,
            q.end_offset,
            q.lag(),
            match &q.holder {
                Some(m) => format!("held by {m} (generation {})", q.generation),
                None => "not held".to_string(),
            }
        );
    }
    Ok(())
}

/// Moves `group`'s position on `topic`'s queues (all, or `queue`).
pub fn seek(
    config: ClientConfig,
    group: &str,
    topic: &str,
    queue: Option<u32>,
    to: SeekTo,
    force: bool,
    json: bool,
) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    let routes = match admin.ask_leader(
        Request::Route {
            topic: topic.to_string(),
        },
        ADMIN_WAIT,
    ) {
        Ok(Response::Routes { routes, .. }) => routes,
        Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
        Err(ClientError::Refused(why)) => return Err(Failed::refused(why)),
        Err(e) => return Err(e.into()),
    };
    let chosen: Vec<_> = routes
        .into_iter()
        .filter(|r| queue.is_none_or(|q| r.queue.queue == q))
        .collect();
    if chosen.is_empty() {
        return Err(Failed::refused(format!(
            "topic {topic} has no queue {}",
            queue.unwrap_or(0)
        )));
    }
    for route in chosen {
        let request = Request::SeekGroup {
            broker: route.group,
            group: group.to_string(),
            queue: route.queue.clone(),
            to,
            force,
        };
        match admin.ask_leader_of(route.group, request, ADMIN_WAIT) {
            Ok(Response::Acked { consume_offset, .. }) if json => {
                json_line(&json!({
                    "group": group,
                    "topic": route.queue.topic,
                    "queue": route.queue.queue,
                    "committed_offset": consume_offset,
                }));
            }
            Ok(Response::Acked { consume_offset, .. }) => {
                out!(
                    "{group} {}: committed offset now {consume_offset}",
                    route.queue
                );
            }
            Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
            Err(ClientError::Refused(why)) => {
                return Err(Failed::refused(format!("{group} {}: {why}", route.queue)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Forgets `group` in every broker group.
pub fn delete(config: ClientConfig, group: &str, force: bool, json: bool) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    let brokers = broker_groups(&mut admin)?;
    let (mut offsets, mut leases) = (0, 0);
    for broker in brokers {
        let request = Request::DeleteGroup {
            broker,
            group: group.to_string(),
            force,
        };
        match admin.ask_leader_of(broker, request, ADMIN_WAIT) {
            Ok(Response::GroupDeleted {
                offsets: o,
                leases: l,
                ..
            }) => {
                offsets += o;
                leases += l;
            }
            Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
            Err(ClientError::Refused(why)) => {
                return Err(Failed::refused(format!("group {group}: {why}")));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if json {
        json_line(&json!({"group": group, "offsets": offsets, "leases": leases}));
    } else if offsets + leases == 0 {
        out!("consumer group {group} had no offsets or leases: nothing to delete");
    } else {
        out!("deleted consumer group {group}: {offsets} queue positions, {leases} leases");
    }
    Ok(())
}

/// The broker groups, from every node that answers `Status` (a broker group added at
/// runtime lives on its voters only).
fn broker_groups(admin: &mut Admin) -> Result<Vec<GroupId>, Failed> {
    let mut all = std::collections::BTreeSet::new();
    let mut answered = false;
    for node in admin.node_ids() {
        if let Some(Response::Status { groups, .. }) = admin.ask(node, Request::Status) {
            answered = true;
            all.extend(groups.iter().map(|g| g.group).filter(|g| *g != 0));
        }
        if let Some(why) = admin.refusal() {
            return Err(Failed::refused(format!("refused: {why}")));
        }
    }
    if answered {
        Ok(all.into_iter().collect())
    } else {
        Err(Failed::new(Failure::Timeout, "no server answered"))
    }
}

/// Adds a broker group whose first voters are `voters` (id `group`, or the leader's choice),
/// then waits (up to [`ADMIN_WAIT`]) until it has a leader.
pub fn group_add(
    config: ClientConfig,
    group: Option<GroupId>,
    voters: &[NodeId],
    force: bool,
    json: bool,
) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    let group = match admin.add_broker_group(group, voters, force, ADMIN_WAIT) {
        Ok(group) => group,
        Err(ClientError::Refused(why)) => return Err(Failed::refused(why)),
        Err(e) => return Err(e.into()),
    };
    let deadline = std::time::Instant::now() + ADMIN_WAIT;
    let mut leader = None;
    while leader.is_none() && std::time::Instant::now() < deadline {
        for node in voters {
            if let Some(Response::Status { groups, .. }) = admin.ask(*node, Request::Status) {
                leader = groups
                    .iter()
                    .find(|g| g.group == group)
                    .and_then(|g| g.leader);
            }
            if leader.is_some() {
                break;
            }
        }
        if leader.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if json {
        json_line(&json!({"group": group, "voters": voters, "leader": leader}));
    } else {
        out!(
            "broker group {group} added with voters {voters:?}; topics created from now on place queues in it"
        );
        match leader {
            Some(leader) => out!("group {group} is led by node {leader}"),
            None => out!(
                "group {group} has no leader yet after {} s (are its voters running?)",
                ADMIN_WAIT.as_secs()
            ),
        }
    }
    if leader.is_none() {
        return Err(Failed::new(
            Failure::Timeout,
            format!("group {group}: no leader within {} s", ADMIN_WAIT.as_secs()),
        ));
    }
    Ok(())
}

/// Asks the leader of Raft group `group` to hand leadership to node `to`, then waits (up to
/// [`ADMIN_WAIT`]) until `to` says it leads.
pub fn transfer(config: ClientConfig, group: GroupId, to: NodeId) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    if !admin.node_ids().contains(&to) {
        return Err(Failed::refused(format!("no node {to} in this cluster")));
    }
    let request = Request::TransferLeader { group, to };
    match admin.ask_leader_of(group, request, ADMIN_WAIT) {
        Ok(Response::TransferStarted { .. }) => {}
        Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
        Err(ClientError::Refused(why)) => {
            return Err(Failed::refused(format!("group {group}: {why}")));
        }
        Err(e) => return Err(e.into()),
    }
    let deadline = std::time::Instant::now() + ADMIN_WAIT;
    while std::time::Instant::now() < deadline {
        if let Some(Response::Status { groups, .. }) = admin.ask(to, Request::Status)
            && groups
                .iter()
                .any(|g| g.group == group && g.leader == Some(to) && g.role == "Leader")
        {
            out!("group {group} is led by node {to}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Failed::new(
        Failure::Timeout,
        format!(
            "group {group}: node {to} did not take over in {} s (a transfer not done within an \
             election timeout is given up)",
            ADMIN_WAIT.as_secs()
        ),
    ))
}

/// Dead letters asked for at once by `dlq list`.
const DLQ_PAGE_MESSAGES: u32 = 256;

/// Prints `group`'s dead-lettered messages (those not redriven), broker group by broker group,
/// oldest first, at most `count`; with `topic`, only those that came from it.
pub fn dlq_list(
    config: ClientConfig,
    group: &str,
    topic: Option<&str>,
    count: usize,
    json: bool,
) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    let brokers = broker_groups(&mut admin)?;
    let mut shown = 0usize;
    let mut more = false;
    for broker in brokers {
        let mut from = 0;
        loop {
            let request = Request::PeekDeadLetters {
                broker,
                group: group.to_string(),
                from,
                messages_max: DLQ_PAGE_MESSAGES,
            };
            let (messages, next_offset) = match admin.ask_leader_of(broker, request, ADMIN_WAIT) {
                Ok(Response::Pulled {
                    messages,
                    next_offset,
                    ..
                }) => (messages, next_offset),
                Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
                Err(ClientError::Refused(why)) => {
                    return Err(Failed::refused(format!("group {group}: {why}")));
                }
                Err(e) => return Err(e.into()),
            };
            for (offset, stored) in messages {
                let origin = stored.origin.clone();
                if topic.is_some_and(|t| origin.as_ref().is_none_or(|o| &*o.queue.topic != t)) {
                    continue;
                }
                if shown == count {
                    more = true;
                    break;
                }
                shown += 1;
                let body = String::from_utf8_lossy(&stored.message.body);
                if json {
                    json_line(&json!({
                        "broker_group": broker,
                        "offset": offset,
                        "origin_topic": origin.as_ref().map(|o| o.queue.topic.clone()),
                        "origin_queue": origin.as_ref().map(|o| o.queue.queue),
                        "origin_offset": origin.as_ref().map(|o| o.offset),
                        "reconsume_times": stored.reconsume_times,
                        "stored_ms": stored.stored_ms,
                        "body": body,
                    }));
                } else {
                    let from = origin
                        .map_or_else(|| "?".to_string(), |o| format!("{}@{}", o.queue, o.offset));
                    out!(
                        "group {broker} offset {offset} from {from} redeliveries={} {}",
                        stored.reconsume_times,
                        crate::output::escape_line(&body)
                    );
                }
            }
            if more || next_offset <= from {
                break;
            }
            from = next_offset;
        }
        if more {
            break;
        }
    }
    let filter = topic.map_or_else(String::new, |t| format!(" from topic {t}"));
    if more {
        eprintln!("showed the first {count} dead-lettered message(s){filter} of {group} (--count)");
    } else {
        eprintln!("{shown} dead-lettered message(s){filter} of consumer group {group}");
    }
    Ok(())
}

/// Moves every dead-lettered message of `group` back to its first retry queue, broker group
/// by broker group, `REDRIVE_MESSAGES_MAX` per command. A retry after an unknown outcome is
/// safe: a command moves what is still in the dead-letter queue, never a message twice.
pub fn dlq_redrive(config: ClientConfig, group: &str, json: bool) -> Result<(), Failed> {
    let mut admin = Admin::connect(config)?;
    let brokers = broker_groups(&mut admin)?;
    let mut total = 0u64;
    for broker in brokers {
        loop {
            let request = Request::RedriveDeadLetters {
                broker,
                group: group.to_string(),
                messages_max: holdfast_core::limits::REDRIVE_MESSAGES_MAX,
            };
            match admin.ask_leader_of(broker, request, ADMIN_WAIT) {
                Ok(Response::Redriven {
                    moved, remaining, ..
                }) => {
                    total += moved;
                    if remaining == 0 || moved == 0 {
                        break;
                    }
                }
                Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
                Err(ClientError::Refused(why)) => {
                    return Err(Failed::refused(format!("group {group}: {why}")));
                }
                Err(e) => {
                    let failed = Failed::from(e);
                    return Err(Failed::new(
                        failed.kind,
                        format!(
                            "{} ({total} message(s) moved before; run it again for the rest)",
                            failed.message
                        ),
                    ));
                }
            }
        }
    }
    if json {
        json_line(&json!({"group": group, "redriven": total}));
    } else {
        out!(
            "moved {total} dead-lettered message(s) of {group} back to its retry queue: its \
             members get them again after the first retry delay"
        );
    }
    Ok(())
}

// ----- nodes: add, remove, replace -----

/// A group as its leader reports it: its configuration and each member's progress.
#[derive(Clone, Debug)]
pub struct GroupMembers {
    pub group: GroupId,
    pub leader: NodeId,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub commit_index: u64,
    pub matches: Vec<(NodeId, u64)>,
    pub replication_factor: u32,
}

/// Every group's configuration, from its leader (every group must have one that answers).
fn members_of_groups(admin: &mut Admin, wait: Duration) -> Result<Vec<GroupMembers>, Failed> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let mut found: BTreeMap<GroupId, GroupMembers> = BTreeMap::new();
        let mut groups_seen = std::collections::BTreeSet::new();
        for node in admin.node_ids() {
            let Some(Response::Status { node, groups }) = admin.ask(node, Request::Status) else {
                if let Some(why) = admin.refusal() {
                    return Err(Failed::refused(format!("refused: {why}")));
                }
                continue;
            };
            for g in groups {
                groups_seen.insert(g.group);
                if g.role == "Leader" {
                    found.insert(
                        g.group,
                        GroupMembers {
                            group: g.group,
                            leader: node,
                            voters: g.voters,
                            learners: g.learners,
                            commit_index: g.commit_index,
                            matches: g.matches,
                            replication_factor: g.replication_factor,
                        },
                    );
                }
            }
        }
        if !groups_seen.is_empty() && groups_seen.iter().all(|g| found.contains_key(g)) {
            return Ok(found.into_values().collect());
        }
        if std::time::Instant::now() >= deadline {
            let missing: Vec<_> = groups_seen
                .difference(&found.keys().copied().collect())
                .copied()
                .collect();
            return Err(Failed::new(
                Failure::Timeout,
                if groups_seen.is_empty() {
                    "no server answered".to_string()
                } else {
                    format!("no leader answered for groups {missing:?}")
                },
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Proposes one configuration change to `group`'s leader and waits until it commits,
/// retrying while the leader asks for it (a change pending, a leader new in its term) until
/// `deadline`. A change found already made (after an answer lost) counts as made.
fn change_membership(
    admin: &mut Admin,
    group: GroupId,
    change: ConfChange,
    force: bool,
    deadline: std::time::Instant,
) -> Result<(), Failed> {
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(Failed::new(
                Failure::Timeout,
                format!("group {group}: could not {change} in time"),
            ));
        }
        let request = Request::ChangeMembership {
            group,
            change,
            force,
        };
        match admin.ask_leader_of(group, request, left.min(ADMIN_WAIT)) {
            Ok(Response::MembershipChanged { .. }) => return Ok(()),
            Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
            Err(ClientError::Refused(why)) => {
                let done = match change {
                    ConfChange::AddLearner(_) => why.contains("already a member"),
                    ConfChange::Remove(_) => why.contains("is not a member"),
                    ConfChange::Promote(id) => {
                        why.contains("is not a learner")
                            && members_of_groups(admin, ADMIN_WAIT)?
                                .iter()
                                .any(|g| g.group == group && g.voters.contains(&id))
                    }
                };
                if done {
                    return Ok(());
                }
                if why.contains("retry") || why.contains("one change at a time") {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                return Err(Failed::refused(why));
            }
            Err(ClientError::Timeout) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn print_groups(admin: &mut Admin, json: bool, node: NodeId, what: &str) -> Result<(), Failed> {
    let groups = members_of_groups(admin, ADMIN_WAIT)?;
    if json {
        let rows: Vec<_> = groups
            .iter()
            .map(|g| json!({"group": g.group, "leader": g.leader, "voters": g.voters, "learners": g.learners}))
            .collect();
        json_line(&json!({"node": node, "done": what, "groups": rows}));
    } else {
        for g in &groups {
            out!(
                "  group {:<3} leader {:<3} voters {:?} learners {:?}",
                g.group,
                g.leader,
                g.voters,
                g.learners
            );
        }
    }
    Ok(())
}

/// `host:port` with the port moved by `offset` (a node's default peer address).
pub fn default_peer_addr(client_addr: &str) -> Result<String, Failed> {
    let addr = crate::config::resolve_addr(client_addr).map_err(Failed::refused)?;
    let (host, _) = client_addr
        .rsplit_once(':')
        .ok_or_else(|| Failed::refused(format!("{client_addr:?} is not host:port")))?;
    let port = addr
        .port()
        .checked_add(crate::config::PEER_PORT_OFFSET)
        .ok_or_else(|| Failed::refused(format!("{client_addr}: give --peer-addr")))?;
    Ok(format!("{host}:{port}"))
}

/// Adds node `id` to the cluster: records its addresses in the node table (so every node can
/// reach it), then, group by group, adds it as a learner, waits until it holds the log up to
/// the commit index and promotes it to voter. Run again after an interruption, it goes on
/// where it stopped.
pub fn node_add(
    config: ClientConfig,
    id: NodeId,
    client_addr: &str,
    peer_addr: Option<&str>,
    wait: Duration,
    json: bool,
) -> Result<(), Failed> {
    let deadline = std::time::Instant::now() + wait;
    let peer_addr = match peer_addr {
        Some(addr) => {
            crate::config::resolve_addr(addr).map_err(Failed::refused)?;
            addr.to_string()
        }
        None => default_peer_addr(client_addr)?,
    };
    crate::config::resolve_addr(client_addr).map_err(Failed::refused)?;
    let mut admin = Admin::connect(config)?;
    let request = Request::AddNode {
        id,
        client_addr: client_addr.to_string(),
        peer_addr: peer_addr.clone(),
    };
    match admin.ask_leader(request, ADMIN_WAIT) {
        Ok(Response::Nodes { .. }) => {}
        Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
        Err(ClientError::Refused(why)) => return Err(Failed::refused(format!("node {id}: {why}"))),
        Err(e) => return Err(e.into()),
    }
    if !json {
        out!("node {id} recorded at {client_addr} (peers {peer_addr}); adding it to every group");
    }
    for g in members_of_groups(&mut admin, ADMIN_WAIT)? {
        if g.voters.contains(&id) {
            continue;
        }
        if !g.learners.contains(&id) {
            change_membership(
                &mut admin,
                g.group,
                ConfChange::AddLearner(id),
                false,
                deadline,
            )?;
            if !json {
                out!("  group {}: node {id} added as a learner", g.group);
            }
        }
        // Promotion is refused until the learner holds the log up to the commit index.
        let mut reported = std::time::Instant::now();
        loop {
            let request = Request::ChangeMembership {
                group: g.group,
                change: ConfChange::Promote(id),
                force: false,
            };
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Failed::new(
                    Failure::Timeout,
                    format!(
                        "group {}: node {id} did not catch up in {} s (is it running, with \
                         `initial_cluster_state = \"join\"`?); run the command again to go on",
                        g.group,
                        wait.as_secs()
                    ),
                ));
            }
            match admin.ask_leader_of(g.group, request, left.min(ADMIN_WAIT)) {
                Ok(Response::MembershipChanged { .. }) => break,
                Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
                Err(ClientError::Refused(why)) if why.contains("is not a learner") => break,
                Err(ClientError::Refused(why))
                    if why.contains("retry") || why.contains("one change") =>
                {
                    if !json && reported.elapsed() >= Duration::from_secs(5) {
                        out!("  group {}: waiting: {why}", g.group);
                        reported = std::time::Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(ClientError::Refused(why)) => {
                    return Err(Failed::refused(format!("group {}: {why}", g.group)));
                }
                Err(ClientError::Timeout) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !json {
            out!(
                "  group {}: node {id} caught up and promoted to voter",
                g.group
            );
        }
    }
    if !json {
        out!("node {id} is a voter of every group");
    }
    print_groups(&mut admin, json, id, "added")
}

/// Removes node `id` from every group (handing over the groups it leads first), then records
/// it as removed in the node table: the other nodes forget it, and its id is never used
/// again. Refused before any change if a group would be left with fewer voters than the
/// replication factor, unless `force`.
pub fn node_remove(
    config: ClientConfig,
    id: NodeId,
    force: bool,
    wait: Duration,
    json: bool,
) -> Result<(), Failed> {
    let deadline = std::time::Instant::now() + wait;
    let mut admin = Admin::connect(config)?;
    let groups = members_of_groups(&mut admin, ADMIN_WAIT)?;
    let short: Vec<String> = groups
        .iter()
        .filter(|g| g.voters.contains(&id))
        .filter(|g| g.voters.len() - 1 < g.replication_factor as usize)
        .map(|g| {
            format!(
                "group {} would keep {} voter(s) of a replication factor of {}",
                g.group,
                g.voters.len() - 1,
                g.replication_factor
            )
        })
        .collect();
    if !short.is_empty() && !force {
        return Err(Failed::refused(format!(
            "removing node {id}: {}; add a node first (`holdfast node add`, or `node replace`), \
             or --force",
            short.join("; ")
        )));
    }
    for line in &short {
        eprintln!("warning: --force: {line}");
    }
    for g in &groups {
        if !g.voters.contains(&id) && !g.learners.contains(&id) {
            continue;
        }
        if g.leader == id
            && let Some(to) = g.voters.iter().copied().find(|v| *v != id)
        {
            // A leader may remove itself, but the group then waits for an election.
            let request = Request::TransferLeader { group: g.group, to };
            if let Ok(Response::TransferStarted { .. }) =
                admin.ask_leader_of(g.group, request, ADMIN_WAIT)
            {
                let until = std::time::Instant::now() + Duration::from_secs(3);
                while std::time::Instant::now() < until {
                    if let Some(Response::Status { groups, .. }) = admin.ask(to, Request::Status)
                        && groups
                            .iter()
                            .any(|s| s.group == g.group && s.role == "Leader")
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        change_membership(&mut admin, g.group, ConfChange::Remove(id), force, deadline)?;
        if !json {
            out!("  group {}: node {id} removed", g.group);
        }
    }
    match admin.ask_leader(Request::RemoveNode { id, force }, ADMIN_WAIT) {
        Ok(Response::Nodes { .. }) => {}
        Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
        Err(ClientError::Refused(why)) => return Err(Failed::refused(format!("node {id}: {why}"))),
        Err(e) => return Err(e.into()),
    }
    if !json {
        out!(
            "node {id} removed from the cluster: the other nodes closed its links and refuse it; \
             stop it and wipe its data directory (its id is never used again)"
        );
    }
    print_groups(&mut admin, json, id, "removed")
}

/// Replaces node `old` (its disk lost, or its machine retired) by node `new` at `client_addr`:
/// adds `new` to every group and promotes it, then removes `old`, so no group is ever below its
/// size. `new` is a fresh id (a node whose disk was lost must not vote again under its old id).
pub fn node_replace(
    config: ClientConfig,
    old: NodeId,
    new: NodeId,
    client_addr: &str,
    peer_addr: Option<&str>,
    wait: Duration,
    json: bool,
) -> Result<(), Failed> {
    if old == new {
        return Err(Failed::refused(format!(
            "node {old} cannot replace itself: a node that lost its disk lost its vote promises, \
             so it rejoins under a new id (start it with a new id and `initial_cluster_state = \
             \"join\"`)"
        )));
    }
    node_add(config.clone(), new, client_addr, peer_addr, wait, json)?;
    node_remove(config, old, false, wait, json)
}
