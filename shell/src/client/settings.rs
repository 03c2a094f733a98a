//! Client settings as builders: every timeout, retry count and batch size of a producer or a
//! consumer, with the defaults `Producer::connect` and `Consumer::connect` use.
//!
//! ```no_run
//! use std::time::Duration;
//! use holdfast_shell::client::{ClientConfig, Producer, ProducerSettings};
//!
//! let servers = vec!["127.0.0.1:7301".parse().unwrap()];
//! let settings = ProducerSettings::default()
//!     .send_timeout(Duration::from_secs(10))
//!     .retries(5);
//! let mut producer = Producer::with_settings(ClientConfig::plaintext(servers), settings)?;
//! let receipt = producer.send("orders", vec![holdfast_core::broker::Message::with_body("hi")])?;
//! println!("stored at {}@{}", receipt.queue, receipt.offset);
//! # Ok::<(), holdfast_shell::client::ClientError>(())
//! ```

use std::time::Duration;

use holdfast_core::client::{ConsumerConfig, ProducerConfig};
use holdfast_core::limits::PULL_MESSAGES_MAX;

/// The longest any client timeout may be set to: past this a caller more likely meant
/// milliseconds than seconds, and a request would hold its place for too long.
pub const CLIENT_TIMEOUT_MAX: Duration = Duration::from_secs(3_600);

fn ms(d: Duration) -> u64 {
    d.min(CLIENT_TIMEOUT_MAX).as_millis().max(1) as u64
}

/// A producer's settings. Each setter takes the value as given, clamped to at least 1 ms and
/// at most [`CLIENT_TIMEOUT_MAX`] for durations.
#[derive(Clone, Debug)]
pub struct ProducerSettings {
    pub(super) send_timeout: Duration,
    pub(super) request_timeout: Duration,
    pub(super) retries: u32,
    pub(super) avoid: Duration,
    pub(super) route_ttl: Duration,
}

impl Default for ProducerSettings {
    fn default() -> ProducerSettings {
        let core = ProducerConfig::new(0, Vec::new());
        ProducerSettings {
            send_timeout: Duration::from_millis(core.send_timeout_ms),
            request_timeout: Duration::from_millis(core.request_timeout_ms),
            retries: core.retries,
            avoid: Duration::from_millis(core.avoid_ms),
            route_ttl: Duration::from_millis(core.route_ttl_ms),
        }
    }
}

impl ProducerSettings {
    /// The whole send, retries included (default 3 s): after it the send fails, saying
    /// whether it may have been written.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// One request to one broker (default 1 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Attempts after the first that failed (default 2; redirects do not count).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// How long a broker group that timed out is avoided (default 10 s).
    pub fn avoid_failed_for(mut self, period: Duration) -> Self {
        self.avoid = period;
        self
    }

    /// Routes older than this are fetched again (default 30 s).
    pub fn route_ttl(mut self, ttl: Duration) -> Self {
        self.route_ttl = ttl;
        self
    }

    pub(super) fn apply(&self, config: &mut ProducerConfig) {
        config.send_timeout_ms = ms(self.send_timeout);
        config.request_timeout_ms = ms(self.request_timeout);
        config.retries = self.retries;
        config.avoid_ms = ms(self.avoid);
        config.route_ttl_ms = ms(self.route_ttl);
    }
}

/// A consumer's settings, like [`ProducerSettings`].
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub(super) heartbeat: Duration,
    pub(super) request_timeout: Duration,
    pub(super) long_poll: Duration,
    pub(super) pull_batch: u32,
    pub(super) unanswered_max: u32,
}

impl Default for ConsumerSettings {
    fn default() -> ConsumerSettings {
        let core = ConsumerConfig::new("", "", "", Vec::new());
        ConsumerSettings {
            heartbeat: Duration::from_millis(core.heartbeat_ms),
            request_timeout: Duration::from_millis(core.request_timeout_ms),
            long_poll: Duration::from_millis(core.long_poll_ms),
            pull_batch: core.pull_batch,
            unanswered_max: core.unanswered_max,
        }
    }
}

impl ConsumerSettings {
    /// How often the member tells the metadata leader it is alive (default 1 s; the session
    /// times out after `MEMBER_SESSION_MS_DEFAULT` without one).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// One request (default 3 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a pull waits at the broker for messages (default 1 s).
    pub fn long_poll(mut self, wait: Duration) -> Self {
        self.long_poll = wait;
        self
    }

    /// Messages per pull (default 32; 1 to `PULL_MESSAGES_MAX`).
    pub fn pull_batch(mut self, messages: u32) -> Self {
        self.pull_batch = messages.clamp(1, PULL_MESSAGES_MAX);
        self
    }

    /// No pull of a queue while this many of its messages wait for an answer (default 1,000).
    pub fn unanswered_max(mut self, messages: u32) -> Self {
        self.unanswered_max = messages.max(1);
        self
    }

    pub(super) fn apply(&self, config: &mut ConsumerConfig) {
        config.heartbeat_ms = ms(self.heartbeat);
        config.request_timeout_ms = ms(self.request_timeout);
        config.long_poll_ms = ms(self.long_poll);
        config.pull_batch = self.pull_batch;
        config.unanswered_max = self.unanswered_max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_cores_and_setters_reach_the_machines_clamped() {
        let mut config = ProducerConfig::new(1, vec![1]);
        let before = config.clone();
        ProducerSettings::default().apply(&mut config);
        assert_eq!(config.send_timeout_ms, before.send_timeout_ms);
        assert_eq!(config.retries, before.retries);
        ProducerSettings::default()
            .send_timeout(Duration::from_secs(10))
            .retries(7)
            .request_timeout(Duration::ZERO)
            .route_ttl(Duration::from_secs(1 << 40))
            .apply(&mut config);
        assert_eq!(config.send_timeout_ms, 10_000);
        assert_eq!(config.retries, 7);
        assert_eq!(config.request_timeout_ms, 1, "at least 1 ms");
        assert_eq!(config.route_ttl_ms, 3_600_000, "at most CLIENT_TIMEOUT_MAX");

        let mut config = ConsumerConfig::new("g", "m", "t", vec![1]);
        ConsumerSettings::default()
            .pull_batch(1 << 30)
            .long_poll(Duration::from_millis(250))
            .apply(&mut config);
        assert_eq!(config.pull_batch, PULL_MESSAGES_MAX);
        assert_eq!(config.long_poll_ms, 250);
        assert_eq!(config.heartbeat_ms, 1_000);
    }
}
