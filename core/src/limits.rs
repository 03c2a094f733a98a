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
/// Consumer groups a node tracks members of.
pub const CONSUMER_GROUPS_MAX: usize = 10_000;
/// Live members of one consumer group.
pub const MEMBERS_PER_GROUP_MAX: usize = 1_024;
/// The longest consumer member id, in bytes.
pub const MEMBER_BYTES_MAX: usize = 249;
/// Queue leases (consumer group, queue) one broker group records; a claim beyond is refused.
pub const LEASES_PER_BROKER_GROUP_MAX: usize = 1 << 20;
/// How long a consumer may go unheard before the metadata leader drops it from its group
/// and a broker hands its queues to their next owner, unless configured otherwise.
pub const MEMBER_SESSION_MS_DEFAULT: u64 = 10_000;

// ----- messages, entries, records, frames -----

/// The most message bytes one `Send` may carry; larger batches are refused whole.
pub const SEND_BYTES_MAX: usize = 4 << 20;
/// Messages in one `Send`.
pub const SEND_MESSAGES_MAX: usize = 65_536;
/// Batched commands are split into entries of about this many bytes (one command always goes).
pub const ENTRY_BYTES_MAX: usize = 8 << 20;
/// The largest log record, header included.
pub const RECORD_BYTES_MAX: usize = 64 << 20;
/// The largest frame payload on the wire.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// AppendEntries carries at most this many bytes of commands (plus always one entry).
pub const APPEND_BYTES_MAX: usize = 1 << 20;
/// One InstallSnapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;
/// The most message bytes one pull response carries.
pub const PULL_BYTES_MAX: usize = 4 << 20;
/// Messages in one pull response.
pub const PULL_MESSAGES_MAX: u32 = 4_096;

// ----- producers -----

/// How many of a producer's most recent sequence numbers are remembered for dedup.
pub const DEDUP_WINDOW_SEQS: u64 = 65_536;

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

/// The `len` and `crc32c` fields in front of every frame (and every log record).
pub const FRAME_HEADER_BYTES: usize = 8;

// ----- how the limits relate -----

const _: () = assert!(
    SEND_BYTES_MAX < ENTRY_BYTES_MAX,
    "the largest send fits an entry"
);
const _: () = assert!(
    ENTRY_BYTES_MAX * 2 <= RECORD_BYTES_MAX,
    "an entry, with its framing and one oversized command, fits a record"
);
const _: () = assert!(
    SEND_BYTES_MAX * 2 < FRAME_BYTES_MAX,
    "a send request, with its framing, fits a frame"
);
const _: () = assert!(
    APPEND_BYTES_MAX + ENTRY_BYTES_MAX < FRAME_BYTES_MAX,
    "the largest AppendEntries (the byte budget plus one whole entry) fits a frame"
);
const _: () = assert!(
    SNAPSHOT_CHUNK_BYTES_MAX * 2 < FRAME_BYTES_MAX,
    "a snapshot chunk fits a frame"
);
const _: () = assert!(
    PULL_BYTES_MAX * 2 < FRAME_BYTES_MAX,
    "a pull response fits a frame"
);
const _: () = assert!(NAME_BYTES_MAX < UNAUTHENTICATED_FRAME_BYTES_MAX);
const _: () = assert!(
    (QUEUES_PER_TOPIC_MAX as usize) <= QUEUES_MAX,
    "one topic can be created"
);
