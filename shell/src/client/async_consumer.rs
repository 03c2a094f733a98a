//! A consumer for async code: deliveries as a stream, each answered with
//! [`AsyncDelivery::ack`] or [`AsyncDelivery::reconsume_later`]. Like [`super::AsyncProducer`]
//! it needs no runtime: the blocking consumer (the same core state machine: leases,
//! generations, retries) runs on a thread of its own and wakes the task waiting on it, so
//! tokio, async-std, smol or a hand-written `block_on` can await it. With the `stream`
//! feature it implements `futures_core::Stream` (for `tokio_stream::StreamExt` and
//! `futures::StreamExt`); [`AsyncConsumer::recv`] works without it.
//!
//! ```no_run
//! use holdfast_shell::client::{AsyncConsumer, ClientConfig, ConsumerSettings};
//! # async fn example() -> Result<(), holdfast_shell::client::ClientError> {
//! let config = ClientConfig::from_file(std::path::Path::new("holdfast-data/client.toml"))?;
//! let mut consumer =
//!     AsyncConsumer::spawn(config, "billing", "orders", ConsumerSettings::default())?;
//! let mut handled = 0;
//! while let Some(delivery) = consumer.recv().await {
//!     if delivery.message().body.is_empty() {
//!         delivery.reconsume_later(); // comes back from the group's retry queue later
//!     } else {
//!         println!("{}@{}", delivery.delivery().queue, delivery.delivery().offset);
//!         delivery.ack();
//!     }
//!     handled += 1;
//!     if handled == 100 {
//!         break;
//!     }
//! }
//! // Every answer given so far is now committed by the brokers: it will not come back.
//! consumer.acks_confirmed().await?;
//! // Leave the group now (the queues go to the other members at once).
//! consumer.close().await;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use holdfast_core::broker::Message;
use holdfast_core::client::{AckStatus, Delivery};

use super::{ClientConfig, ClientError, Consumer, ConsumerSettings};

/// Deliveries the consumer's thread holds for the application at most; the rest wait in the
/// state machine (which stops pulling once its own limit of unanswered messages is reached).
pub const ASYNC_DELIVERIES_BUFFERED_MAX: usize = 256;

/// How long the thread waits for the network before it looks for new answers.
const DRIVE_SLICE: Duration = Duration::from_millis(5);

/// How long a stopping consumer waits for its answers to be confirmed, and then to leave.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    deliveries: VecDeque<Delivery>,
    next_waker: Option<Waker>,
    /// Answers handed to the thread, and how many of them the brokers confirmed (every
    /// answer up to this count is committed).
    answers_given: u64,
    answers_confirmed: u64,
    confirm_wakers: Vec<Waker>,
    /// Set when the thread has stopped: why, if it was not asked to.
    ended: Option<Option<String>>,
    close_wakers: Vec<Waker>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A consumer whose deliveries are awaited; see the module documentation. Dropping it stops
/// it as [`AsyncConsumer::close`] does, without waiting.
///
/// In a tokio application (`tokio` feature), as a `Stream`:
///
#[cfg_attr(feature = "tokio", doc = "```no_run")]
#[cfg_attr(not(feature = "tokio"), doc = "```ignore")]
/// use std::time::Duration;
///
/// use holdfast_shell::client::{AsyncConsumer, ClientConfig, ClientError, ConsumerSettings};
/// use tokio_stream::StreamExt as _;
///
/// #[tokio::main]
/// async fn main() -> Result<(), ClientError> {
///     let config = ClientConfig::from_file(std::path::Path::new("holdfast-data/client.toml"))?;
///     let settings = ConsumerSettings::default();
///     let mut consumer = AsyncConsumer::spawn(config, "billing", "orders", settings)?;
///     // Until nothing came for 10 s.
///     while let Ok(Some(delivery)) =
///         tokio::time::timeout(Duration::from_secs(10), consumer.next()).await
///     {
///         if delivery.message().body.is_empty() {
///             delivery.reconsume_later(); // back later from the group's retry queue
///         } else {
///             delivery.ack();
///         }
///     }
///     // Every answer given is committed by the brokers: none of those comes back.
///     consumer.acks_confirmed().await?;
///     // Leaves the group: its queues go to the other members now.
///     consumer.close().await;
///     Ok(())
/// }
/// ```
pub struct AsyncConsumer {
    shared: Arc<Shared>,
    answers: Sender<(Delivery, AckStatus)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// One message handed to the application. Answer it with [`AsyncDelivery::ack`] or
/// [`AsyncDelivery::reconsume_later`]; one dropped unanswered is answered ReconsumeLater, so
/// it comes back rather than hold its queue.
pub struct AsyncDelivery {
    delivery: Option<Delivery>,
    answers: Sender<(Delivery, AckStatus)>,
    shared: Arc<Shared>,
}

impl AsyncDelivery {
    /// Where it came from: broker group, queue, offset, redelivery.
    pub fn delivery(&self) -> &Delivery {
        self.delivery.as_ref().unwrap_or_else(|| unreachable!())
    }

    pub fn message(&self) -> &Message {
        &self.delivery().message.message
    }

    /// Success: the group is done with it. Confirmed when [`AsyncConsumer::acks_confirmed`]
    /// says so.
    pub fn ack(mut self) {
        self.answer(AckStatus::Success);
    }

    /// Deliver it again later, from the group's retry queue (to its dead-letter queue after
    /// the broker's `max_reconsume` attempts).
    pub fn reconsume_later(mut self) {
        self.answer(AckStatus::ReconsumeLater);
    }

    fn answer(&mut self, status: AckStatus) {
        if let Some(delivery) = self.delivery.take() {
            self.shared.lock().answers_given += 1;
            // A stopped consumer's thread is gone: the answer is lost, and the message comes
            // back to the group, as for any answer never confirmed.
            let _ = self.answers.send((delivery, status));
        }
    }
}

impl Drop for AsyncDelivery {
    fn drop(&mut self) {
        self.answer(AckStatus::ReconsumeLater);
    }
}

impl AsyncConsumer {
    /// Joins `group` consuming `topic` (as [`Consumer::with_settings`]) and starts the
    /// consumer's thread.
    pub fn spawn(
        config: impl Into<ClientConfig>,
        group: &str,
        topic: &str,
        settings: ConsumerSettings,
    ) -> Result<AsyncConsumer, ClientError> {
        let consumer = Consumer::with_settings(config, group, topic, settings)?;
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (answers, receiver) = mpsc::channel();
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("holdfast-consumer".into())
                .spawn(move || run(consumer, &shared, &receiver, &stop))
                .map_err(ClientError::Io)?
        };
        Ok(AsyncConsumer {
            shared,
            answers,
            stop,
            thread: Some(thread),
        })
    }

    /// The next delivery; `None` once the consumer stopped (closed, or refused: see
    /// [`AsyncConsumer::refusal`]).
    pub fn recv(&mut self) -> Next<'_> {
        Next { consumer: self }
    }

    fn poll_delivery(&self, cx: &mut Context<'_>) -> Poll<Option<AsyncDelivery>> {
        let mut state = self.shared.lock();
        if let Some(delivery) = state.deliveries.pop_front() {
            return Poll::Ready(Some(AsyncDelivery {
                delivery: Some(delivery),
                answers: self.answers.clone(),
                shared: self.shared.clone(),
            }));
        }
        if state.ended.is_some() || self.stop.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        state.next_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Resolves once every answer given before the call is committed by the brokers (so
    /// none of those messages will be delivered to the group again); an error if the
    /// consumer stopped first.
    pub fn acks_confirmed(&self) -> AcksConfirmed {
        let target = self.shared.lock().answers_given;
        AcksConfirmed {
            shared: self.shared.clone(),
            target,
        }
    }

    /// Why a server refused this consumer, if one did (the stream has ended then).
    pub fn refusal(&self) -> Option<String> {
        self.shared.lock().ended.clone().flatten()
    }

    /// Stops taking messages: the stream ends, answers already given are confirmed (up to
    /// 5 s) and the consumer leaves its group, so the other members take its queues now.
    /// Returns at once; [`AsyncConsumer::close`] waits for it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(waker) = self.shared.lock().next_waker.take() {
            waker.wake();
        }
    }

    /// [`AsyncConsumer::stop`], then waits until the consumer has left its group.
    pub fn close(self) -> Closed {
        self.stop();
        Closed {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for AsyncConsumer {
    fn drop(&mut self) {
        self.stop();
        // Detached: the thread confirms, leaves and ends on its own, within 2 * CLOSE_WAIT.
        drop(self.thread.take());
    }
}

#[cfg(feature = "stream")]
impl futures_core::Stream for AsyncConsumer {
    type Item = AsyncDelivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<AsyncDelivery>> {
        self.poll_delivery(cx)
    }
}

/// [`AsyncConsumer::recv`].
pub struct Next<'a> {
    consumer: &'a mut AsyncConsumer,
}

impl Future for Next<'_> {
    type Output = Option<AsyncDelivery>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<AsyncDelivery>> {
        self.consumer.poll_delivery(cx)
    }
}

/// [`AsyncConsumer::acks_confirmed`].
pub struct AcksConfirmed {
    shared: Arc<Shared>,
    target: u64,
}

impl Future for AcksConfirmed {
    type Output = Result<(), ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.shared.lock();
        if state.answers_confirmed >= self.target {
            return Poll::Ready(Ok(()));
        }
        if let Some(ended) = &state.ended {
            let why = ended
                .clone()
                .unwrap_or_else(|| "the consumer stopped".to_string());
            return Poll::Ready(Err(ClientError::Send {
                reason: format!(
                    "{why} before {} of its answers were confirmed",
                    self.target - state.answers_confirmed
                ),
                maybe_written: true,
                refused: false,
            }));
        }
        if !state.confirm_wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.confirm_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// [`AsyncConsumer::close`]: resolves once the consumer's thread has ended.
pub struct Closed {
    shared: Arc<Shared>,
}

impl Future for Closed {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.lock();
        if state.ended.is_some() {
            return Poll::Ready(());
        }
        if !state.close_wakers.iter().any(|w| w.will_wake(cx.waker())) {
            state.close_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The consumer's thread: answers in, deliveries out, until stopped or refused.
fn run(
    mut consumer: Consumer,
    shared: &Shared,
    answers: &Receiver<(Delivery, AckStatus)>,
    stop: &AtomicBool,
) {
    let mut applied = 0u64;
    let mut taken: Vec<Delivery> = Vec::new();
    while !stop.load(Ordering::Relaxed) && consumer.refusal().is_none() {
        applied += apply_answers(&mut consumer, answers);
        let room = ASYNC_DELIVERIES_BUFFERED_MAX.saturating_sub(shared.lock().deliveries.len());
        let deadline = std::time::Instant::now() + DRIVE_SLICE;
        consumer.io.drive(&mut consumer.machine, deadline, |m| {
            while taken.len() < room
                && let Some(d) = m.poll_delivery()
            {
                taken.push(d);
            }
            !taken.is_empty()
        });
        publish(shared, &mut taken, applied, consumer.machine.unconfirmed());
    }
    // Answers given up to now still count: confirm them, then leave.
    let refusal = consumer.refusal().map(str::to_string);
    if refusal.is_none() {
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        while std::time::Instant::now() < deadline {
            applied += apply_answers(&mut consumer, answers);
            let slice = std::time::Instant::now() + DRIVE_SLICE;
            consumer
                .io
                .drive(&mut consumer.machine, slice, |m| m.unconfirmed() == 0);
            let unconfirmed = consumer.machine.unconfirmed();
            publish(shared, &mut Vec::new(), applied, unconfirmed);
            if unconfirmed == 0 && answers_pending(shared, applied) == 0 {
                break;
            }
        }
        consumer.close();
    }
    let wakers = {
        let mut guard = shared.lock();
        let state = &mut *guard;
        state.deliveries.clear();
        state.ended = Some(refusal);
        let mut wakers: Vec<Waker> = state.next_waker.take().into_iter().collect();
        wakers.append(&mut state.confirm_wakers);
        wakers.append(&mut state.close_wakers);
        wakers
    };
    for waker in wakers {
        waker.wake();
    }
}

/// Answers given but not yet taken by the thread.
fn answers_pending(shared: &Shared, applied: u64) -> u64 {
    shared.lock().answers_given.saturating_sub(applied)
}

fn apply_answers(consumer: &mut Consumer, answers: &Receiver<(Delivery, AckStatus)>) -> u64 {
    let now = consumer.io.now();
    let mut applied = 0;
    loop {
        match answers.try_recv() {
            Ok((delivery, status)) => {
                consumer.machine.answer(now, &delivery, status);
                applied += 1;
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return applied,
        }
    }
}

/// Hands new deliveries to the application and, once nothing applied is unconfirmed, records
/// every applied answer as confirmed; wakes whoever waits.
fn publish(shared: &Shared, taken: &mut Vec<Delivery>, applied: u64, unconfirmed: usize) {
    let mut state = shared.lock();
    let mut wakers = Vec::new();
    if !taken.is_empty() {
        state.deliveries.extend(taken.drain(..));
        wakers.extend(state.next_waker.take());
    }
    if unconfirmed == 0 && applied > state.answers_confirmed {
        state.answers_confirmed = applied;
        wakers.append(&mut state.confirm_wakers);
    }
    drop(state);
    wakers.into_iter().for_each(Waker::wake);
}
