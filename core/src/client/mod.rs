//! The client side as pure state machines: a producer that retries and fails over, and a
//! consumer that joins a group, owns a share of the queues, pulls, and acknowledges. The
//! shell's client library and the simulator's workload drive exactly these.

mod allocation;
mod consumer;
mod producer;

pub use allocation::{AllocationStrategy, allocate};
pub use consumer::{AckStatus, Consumer, ConsumerConfig, ConsumerEvent, Delivery};
pub use producer::{Producer, ProducerConfig, SendId, SendResult};

#[cfg(test)]
mod tests;
