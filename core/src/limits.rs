//! Every limit of holdfast in one place (TigerBeetle's `constants.zig` is the model): what a
//! peer or a client can make a node hold or do is bounded here, and the compile-time checks at
//! the bottom state how the limits relate, so changing one cannot silently break another.
//!
//! Units come last in every name. A limit that is reached answers with a refusal that says
//! which limit, never with a hang or unbounded growth.

// ----- names -----

/// The longest topic or consumer-group name, in bytes (Kafka's rule: 249 bytes of
/// `[A-Za-z0-9._-]`).
pub const NAME_BYTES_MAX: usize = 249;

// ----- the topic table and consumer groups -----

/// More queues than this in one topic is a mistake, not a plan.
pub const QUEUES_PER_TOPIC_MAX: u32 = 1_024;
/// Topics in the cluster's topic table.
pub const TOPICS_MAX: usize = 10_000;
/// Queues over all topics: bounds the per-group queue lists and every pass over them.
pub const QUEUES_MAX: usize = 65_536;
/// Tombstones of deleted topics the topic table (and each broker group) keeps; past it the
/// one deleted longest ago is forgotten. A tombstone matters only until every broker group has
/// dropped the topic's queues, one round through each group's log.
pub const TOMBSTONES_MAX: usize = TOPICS_MAX;
/// Consumer groups a node tracks members of.
pub const CONSUMER_GROUPS_MAX: usize = 10_000;
/// Members (voters and learners) of one Raft group's configuration: bounds the configuration
/// entries and snapshot headers a peer can make a replica decode.
pub const GROUP_MEMBERS_MAX: usize = 64;
/// Records of the metadata group's node table (nodes added at runtime, and ids removed, which
/// are never reused).
pub const NODES_RECORDED_MAX: usize = 1_024;
/// Broker groups of a cluster, those of its first configuration and those added at runtime
/// (`holdfast group add`) together: every one is a Raft replica with its own files on each of
/// its voters, and every topic creation places over all of them.
pub const BROKER_GROUPS_MAX: usize = 64;
/// Live members of one consumer group.
pub const MEMBERS_PER_GROUP_MAX: usize = 1_024;
/// The longest consumer member id, in bytes.
pub const MEMBER_BYTES_MAX: usize = 249;
/// Producers whose dedup window one broker group remembers. A new producer beyond it evicts
/// the one whose last append is oldest (see `BrokerState`): the cost of a bounded table is that
/// a producer silent for longer than the other producers' whole churn loses its dedup memory.
pub const PRODUCERS_PER_GROUP_MAX: usize = 100_000;
/// Queue leases (consumer group, queue) one broker group records; a claim beyond is refused.
pub const LEASES_PER_BROKER_GROUP_MAX: usize = 1 << 20;
/// How long a broker group's leader keeps a consumer group's offsets and leases after it last
/// heard from any of its members, unless configured otherwise (Kafka's
/// `offsets.retention.minutes`, 7 days): then they expire through the log.
pub const GROUP_RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;
/// Consumer groups whose last activity a broker leader remembers per broker group; a group
/// beyond it counts as silent since the leader took office, so invented names expire first.
pub const GROUP_ACTIVITY_ENTRIES_MAX: usize = 1 << 16;
/// Consumer groups named in one `ExpireGroups` command (more go in several): 1,024 names of
/// at most 249 bytes stay far below a command's maximum.
pub const EXPIRE_GROUPS_PER_COMMAND_MAX: usize = 1_024;
/// Distinct consumer groups one client connection may speak for (pulls, acks, heartbeats):
/// a consumer speaks for one, so a connection inventing names is refused long before the
/// lease and offset tables notice.
pub const CONSUMER_GROUPS_PER_CONNECTION_MAX: usize = 64;
/// How long a consumer may go unheard before the metadata leader drops it from its group
/// and a broker hands its queues to their next owner, unless configured otherwise.
pub const MEMBER_SESSION_MS_DEFAULT: u64 = 10_000;

// ----- messages, entries, records, frames -----

/// The most message bytes one `Send` may carry; larger batches are refused whole.
pub const SEND_BYTES_MAX: usize = 4 << 20;
/// Messages in one `Send`.
pub const SEND_MESSAGES_MAX: usize = 65_536;
/// Tags on one message.
pub const MESSAGE_TAGS_MAX: usize = 64;
/// Properties on one message.
pub const MESSAGE_PROPERTIES_MAX: usize = 64;
/// The most bytes a message costs on the wire beyond its [`Message::size_bytes`]: the
/// length prefixes of its body, key, tags and properties, and the fields a stored message
/// adds (producer, sequence, stamps, origin with its queue name). Tags and properties are
/// counted so that a message of empty strings cannot weigh megabytes while counting zero.
///
/// [`Message::size_bytes`]: crate::broker::Message::size_bytes
pub const MESSAGE_OVERHEAD_BYTES_MAX: usize =
    128 + NAME_BYTES_MAX + MESSAGE_TAGS_MAX * 5 + MESSAGE_PROPERTIES_MAX * 10;
/// The largest command in a broker group's log, encoded: the largest send with the overhead
/// of its messages, or any other command (acks, queue creations) cut to fit. A send whose
/// encoded command is larger is refused whole, whatever its `size_bytes`.
pub const COMMAND_BYTES_MAX: usize = SEND_BYTES_MAX + (1 << 20);
/// Offsets in one `Ack`.
pub const ACK_OFFSETS_MAX: usize = 65_536;
/// Queues named in one `CreateQueues` command the node proposes itself (more go in several).
pub const CREATE_QUEUES_PER_COMMAND_MAX: usize = 1_024;
/// The bytes an entry adds around each of its commands, at most: a length prefix (5 bytes as
/// a varint of a length under 4 GiB).
pub const COMMAND_FRAMING_BYTES: usize = 5;
/// The bytes an entry adds once, at most: index, term, kind and the count of its commands
/// (10 + 10 + 1 + 5 as varints).
pub const ENTRY_HEADER_BYTES: usize = 32;
/// Batched commands are split into entries of about this many bytes (one command always goes).
pub const ENTRY_BYTES_MAX: usize = 8 << 20;
/// The largest log record, header included.
pub const RECORD_BYTES_MAX: usize = 64 << 20;
/// The largest frame payload on the wire.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// AppendEntries carries at most this many bytes of entries, framing counted (plus always
/// one entry).
pub const APPEND_BYTES_MAX: usize = 1 << 20;
/// Entries in one AppendEntries.
pub const APPEND_ENTRIES_MAX: usize = 64;
/// A Raft message's fields around its entries or chunk: term, indexes, envelope.
pub const RAFT_MESSAGE_HEADER_BYTES: usize = 128;
/// One InstallSnapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;
/// The most `NodeConfig::snapshot_log_bytes` may be: a group's log since its last snapshot
/// holds about this many command bytes at most, then a snapshot is due whatever
/// `NodeConfig::snapshot_entries_min` says (unless it is `None`). The log's entries carry
/// message bytes until compaction, so this bounds that memory (and what a restart reads back)
/// for entries of large batches.
pub const SNAPSHOT_LOG_BYTES_MAX: u64 = 1 << 30;
/// `NodeConfig::snapshot_log_bytes` unless configured: with 10 GB retained over two broker
/// groups, 256 MiB left a node at 1.39 GB resident while producing (BENCHMARKS.md).
pub const SNAPSHOT_LOG_BYTES_DEFAULT: u64 = 64 << 20;
/// `NodeConfig::replay_store_bytes_max` unless configured: a restarting node applies the log it
/// recovered in steps, each ending once this many bytes of queue store writes wait for the
/// driver (applied in one go, a 256 MiB log queued 539 MB of writes at once: BENCHMARKS.md).
pub const REPLAY_STORE_BYTES_DEFAULT: u64 = 16 << 20;
/// The most message bytes one pull response carries.
pub const PULL_BYTES_MAX: usize = 4 << 20;
/// Messages in one pull response.
pub const PULL_MESSAGES_MAX: u32 = 4_096;
/// The longest a pull may wait for messages; a longer wait asked for is cut to it.
pub const PULL_WAIT_MS_MAX: u64 = 60_000;
/// Consumer progress entries (a group on a queue) in one `status` answer, over all groups, and
/// likewise queue holders; the rest are left out.
pub const STATUS_CONSUMERS_MAX: usize = 4_096;

// ----- producers -----

/// How many of a producer's most recent sequence numbers are remembered for dedup.
pub const DEDUP_WINDOW_SEQS: u64 = 65_536;

// ----- the operator's log -----

/// Events a node holds for its driver to log; past it the oldest are dropped, so a driver
/// that never polls (a test, the simulator) holds no more than this.
pub const EVENTS_BUFFERED_MAX: usize = 1_024;

// ----- terms -----

/// Raft messages whose term is above this and more than one past the receiver's own term are
/// refused unread: no honest election jumps that far (each adds one; at a term of
/// `u64::MAX / 2` the replica's arithmetic stops, and a replica pushed near it by one forged
/// message could never elect again, even after a restart). Below it, terms are taken as Raft
/// takes them; above it, only one at a time, so a forged message costs the group at most
/// reaching this limit plus one term per message: 2^32 terms remain, some 136 years of an
/// election every second.
pub const TERM_ACCEPTED_MAX: u64 = u64::MAX / 2 - (1 << 32);

/// Client requests a node remembers, to drop a duplicated copy of one unanswered.
pub const REQUESTS_REMEMBERED_MAX: usize = 65_536;

// ----- connections (the shell) -----

/// Connections one node accepts at once (peers and clients together); more are refused.
pub const CONNECTIONS_MAX: usize = 4_096;
/// Requests of one client connection read and not yet answered; beyond it the connection is
/// not read until answers go out.
pub const REQUESTS_PENDING_PER_CONNECTION_MAX: usize = 1_024;
/// Bytes received and not yet decoded into frames, per connection.
pub const CONNECTION_INPUT_BYTES_MAX: usize = FRAME_BYTES_MAX + FRAME_HEADER_BYTES;
/// Bytes queued to send and not yet taken by the socket, per connection.
pub const CONNECTION_OUTPUT_BYTES_MAX: usize = 64 << 20;
/// The largest frame before a connection has authenticated: a stranger cannot make a node
/// buffer megabytes.
pub const UNAUTHENTICATED_FRAME_BYTES_MAX: usize = 16 << 10;

/// The Raft commands of an append frame at least this long are kept as slices of the frame
/// rather than copied: entries stay in the log until it is compacted, and a slice keeps its
/// whole read buffer (up to a read's 64 KiB beside the frame) alive, so only frames large
/// against that are sliced.
pub const SHARED_FRAME_BYTES_MIN: usize = 16 << 10;

/// The `len` and `crc32c` fields in front of every frame (and every log record).
pub const FRAME_HEADER_BYTES: usize = 8;

// ----- how the limits relate -----

/// The most bytes an entry of commands encodes to: batching cuts entries at
/// [`ENTRY_BYTES_MAX`] counting [`COMMAND_FRAMING_BYTES`] per command, and one command alone
/// is at most [`COMMAND_BYTES_MAX`].
pub const ENTRY_ENCODED_BYTES_MAX: usize =
    max(ENTRY_BYTES_MAX, COMMAND_BYTES_MAX + COMMAND_FRAMING_BYTES) + ENTRY_HEADER_BYTES;
/// The most bytes an AppendEntries encodes to: the byte budget, overrun by at most one whole
/// entry, the headers of every entry, and the message around them.
pub const APPEND_ENCODED_BYTES_MAX: usize = APPEND_BYTES_MAX
    + ENTRY_ENCODED_BYTES_MAX
    + APPEND_ENTRIES_MAX * ENTRY_HEADER_BYTES
    + RAFT_MESSAGE_HEADER_BYTES;
/// The most bytes a pull response encodes to: at most one message past the byte budget (and
/// one message is at most a whole send), and the overhead of every message in it.
pub const PULL_ENCODED_BYTES_MAX: usize = PULL_BYTES_MAX
    + SEND_BYTES_MAX
    + PULL_MESSAGES_MAX as usize * MESSAGE_OVERHEAD_BYTES_MAX
    + RAFT_MESSAGE_HEADER_BYTES
    + NAME_BYTES_MAX;

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

const _: () = assert!(
    SEND_BYTES_MAX + SEND_MESSAGES_MAX * 8 <= COMMAND_BYTES_MAX,
    "a send of the largest size in the most messages, with no tags, fits a command"
);
const _: () = assert!(
    COMMAND_BYTES_MAX + COMMAND_FRAMING_BYTES <= ENTRY_BYTES_MAX,
    "the largest command fits an entry"
);
const _: () = assert!(
    ENTRY_ENCODED_BYTES_MAX + FRAME_HEADER_BYTES <= RECORD_BYTES_MAX,
    "the largest entry, with its record header, fits a record"
);
const _: () = assert!(
    COMMAND_BYTES_MAX + RAFT_MESSAGE_HEADER_BYTES <= FRAME_BYTES_MAX,
    "a send request whose command fits, with its framing, fits a frame"
);
const _: () = assert!(
    APPEND_ENCODED_BYTES_MAX <= FRAME_BYTES_MAX,
    "the largest AppendEntries fits a frame"
);
const _: () = assert!(
    SNAPSHOT_CHUNK_BYTES_MAX + RAFT_MESSAGE_HEADER_BYTES <= FRAME_BYTES_MAX,
    "a snapshot chunk fits a frame"
);
const _: () = assert!(
    PULL_ENCODED_BYTES_MAX <= FRAME_BYTES_MAX,
    "a pull response fits a frame"
);
const _: () = assert!(
    STATUS_CONSUMERS_MAX * (2 * NAME_BYTES_MAX + 64)
        + STATUS_CONSUMERS_MAX * (2 * NAME_BYTES_MAX + MEMBER_BYTES_MAX + 64)
        + 64 * 1_024
        <= FRAME_BYTES_MAX,
    "a status answer (progress and queue holders, each list bounded) fits a frame (with up to a thousand groups)"
);
const _: () = assert!(
    CREATE_QUEUES_PER_COMMAND_MAX * (NAME_BYTES_MAX + 16) <= COMMAND_BYTES_MAX,
    "a CreateQueues of internal queue names fits a command"
);
const _: () = assert!(
    ACK_OFFSETS_MAX * 10 + NAME_BYTES_MAX * 2 + 64 <= COMMAND_BYTES_MAX,
    "the largest Ack fits a command"
);
const _: () = assert!(NAME_BYTES_MAX < UNAUTHENTICATED_FRAME_BYTES_MAX);
const _: () = assert!(
    (QUEUES_PER_TOPIC_MAX as usize) <= QUEUES_MAX,
    "one topic can be created"
);
const _: () = assert!(TERM_ACCEPTED_MAX < u64::MAX / 2);

/// Whether `name` may name a topic or a consumer group: 1 to [`NAME_BYTES_MAX`] bytes of
/// `[A-Za-z0-9._-]` (Kafka's rule), so names are safe in logs, paths and the internal retry
/// and dead-letter names, which start with `%`. `what` names the thing in the refusal.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name is empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "{what} name of {} bytes exceeds the maximum of {NAME_BYTES_MAX}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} name {name:?} holds {c:?}: only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Whether `member` may name a consumer group member: 1 to [`MEMBER_BYTES_MAX`] bytes with no
/// control character (member ids are free-form, often a host and process id).
pub fn check_member(member: &str) -> Result<(), String> {
    if member.is_empty() {
        return Err("member id is empty".into());
    }
    if member.len() > MEMBER_BYTES_MAX {
        return Err(format!(
            "member id of {} bytes exceeds the maximum of {MEMBER_BYTES_MAX}",
            member.len()
        ));
    }
    if member.chars().any(char::is_control) {
        return Err(format!("member id {member:?} holds a control character"));
    }
    Ok(())
}

/// Dead-lettered messages one `RedriveDeadLetters` moves (one command, applied at once on every
/// replica): an operator's redrive of more goes in several commands.
pub const REDRIVE_MESSAGES_MAX: u32 = 1_024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kafkas_rule() {
        assert!(check_name("topic", "orders.v2_EU-1").is_ok());
        assert!(check_name("topic", &"a".repeat(NAME_BYTES_MAX)).is_ok());
        for bad in ["", "a b", "a\nb", "a\0", "%RETRY%g", "é", "a/b"] {
            assert!(check_name("topic", bad).is_err(), "{bad:?}");
        }
        let err = check_name("topic", &"a".repeat(NAME_BYTES_MAX + 1)).unwrap_err();
        assert!(err.contains("250 bytes"), "{err}");
        assert!(check_member("host-1:4242").is_ok());
        assert!(check_member("").is_err());
        assert!(check_member("a\nb").is_err());
        assert!(check_member(&"m".repeat(MEMBER_BYTES_MAX + 1)).is_err());
    }
}
