//! A producer for async code, with no runtime of its own: [`AsyncProducer::send`] returns a
//! [`std::future::Future`] that any executor (tokio, async-std, smol, a hand-written
//! `block_on`) can await. The blocking [`Producer`] runs on a thread of its own and wakes the
//! future when the send ends; the same core state machine decides retries, routes and
//! idempotence.
//!
//! ```no_run
//! use holdfast_shell::client::{AsyncProducer, ClientConfig, ProducerSettings};
//! # async fn example() -> Result<(), holdfast_shell::client::ClientError> {
//! let config = ClientConfig::from_file(std::path::Path::new("holdfast-data/client.toml"))?;
//! let producer = AsyncProducer::spawn(config, ProducerSettings::default())?;
//! let sends: Vec<_> = (0..100)
//!     .map(|i| producer.send("orders", vec![holdfast_core::broker::Message::with_body(format!("m{i}"))]))
//!     .collect();
//! for send in sends {
//!     let receipt = send.await?;
//!     println!("{}@{}", receipt.queue, receipt.offset);
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use holdfast_core::broker::Message;

use super::{ClientConfig, ClientError, Producer, ProducerSettings, SendReceipt};

/// Sends waiting for the producer thread to take them; one more is refused at once (it
/// resolves to an error that says nothing was written) rather than queued without bound.
pub const ASYNC_SENDS_QUEUED_MAX: usize = 4_096;
/// Sends the producer thread keeps in flight at once.
pub const ASYNC_SENDS_IN_FLIGHT_MAX: usize = 256;

type Outcome = Result<SendReceipt, ClientError>;

#[derive(Default)]
struct Slot {
    state: Mutex<(Option<Outcome>, Option<Waker>)>,
}

impl Slot {
    fn complete(&self, outcome: Outcome) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 = Some(outcome);
        if let Some(waker) = state.1.take() {
            waker.wake();
        }
    }
}

/// The end of one [`AsyncProducer::send`]: the receipt, or why it failed (saying whether it
/// may have been written).
pub struct SendFuture {
    slot: Arc<Slot>,
}

impl Future for SendFuture {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut state = self
            .slot
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match state.0.take() {
            Some(outcome) => Poll::Ready(outcome),
            None => {
                state.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

struct Job {
    topic: String,
    messages: Vec<Message>,
    slot: Arc<Slot>,
}

/// A producer whose sends are futures; see the module documentation. [`AsyncProducer::close`]
/// resolves once the sends already made have ended and its thread has stopped. Dropping it
/// does the same, waiting, except on a tokio runtime's thread with the `tokio` feature: there
/// it returns at once (a blocked worker stalls every task on it) and the thread ends on its
/// own after those sends.
///
/// In a tokio application (`tokio` feature):
///
#[cfg_attr(feature = "tokio", doc = "```no_run")]
#[cfg_attr(not(feature = "tokio"), doc = "```ignore")]
/// use holdfast_core::broker::Message;
/// use holdfast_shell::client::{AsyncProducer, ClientConfig, ClientError, ProducerSettings};
///
/// #[tokio::main]
/// async fn main() -> Result<(), ClientError> {
///     let config = ClientConfig::from_file(std::path::Path::new("holdfast-data/client.toml"))?;
///     let settings = ProducerSettings::default().send_timeout(std::time::Duration::from_secs(5));
///     let producer = AsyncProducer::spawn(config, settings)?;
///     // Sends are futures that are `Send`: await them here or in tasks of their own.
///     let tasks: Vec<_> = (0..100)
///         .map(|i| tokio::spawn(producer.send("orders", vec![Message::with_body(format!("m{i}"))])))
///         .collect();
///     for task in tasks {
///         match task.await.expect("the task ran") {
///             Ok(receipt) => println!("{}@{}", receipt.queue, receipt.offset),
///             // `maybe_written` in the error says whether a retry may store it twice.
///             Err(e) => eprintln!("not sent: {e}"),
///         }
///     }
///     producer.close().await;
///     Ok(())
/// }
/// ```
pub struct AsyncProducer {
    jobs: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    ended: Arc<Ended>,
}

/// Whether the producer's thread has ended, and who waits for it.
#[derive(Default)]
struct Ended {
    state: Mutex<(bool, Vec<Waker>)>,
}

impl Ended {
    fn set(&self) {
        let wakers = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.0 = true;
            std::mem::take(&mut state.1)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// [`AsyncProducer::close`]: resolves once the producer's thread has ended.
pub struct ProducerClosed {
    ended: Arc<Ended>,
}

impl Future for ProducerClosed {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self
            .ended
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if state.0 {
            return Poll::Ready(());
        }
        if !state.1.iter().any(|w| w.will_wake(cx.waker())) {
            state.1.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl AsyncProducer {
    /// Connects (as [`Producer::with_settings`]) and starts the producer's thread.
    pub fn spawn(
        config: impl Into<ClientConfig>,
        settings: ProducerSettings,
    ) -> Result<AsyncProducer, ClientError> {
        let producer = Producer::with_settings(config, settings)?;
        let (jobs, receiver) = mpsc::sync_channel(ASYNC_SENDS_QUEUED_MAX);
        let ended = Arc::new(Ended::default());
        let thread = {
            let ended = ended.clone();
            std::thread::Builder::new()
                .name("holdfast-producer".into())
                .spawn(move || {
                    run(producer, &receiver);
                    ended.set();
                })
                .map_err(ClientError::Io)?
        };
        Ok(AsyncProducer {
            jobs: Some(jobs),
            thread: Some(thread),
            ended,
        })
    }

    /// Takes no more sends; resolves once those already made have ended (each resolving its
    /// own future) and the producer's thread has stopped. Never blocks.
    pub fn close(mut self) -> ProducerClosed {
        self.jobs = None;
        // Detached: it ends on its own, and `ended` says when.
        drop(self.thread.take());
        ProducerClosed {
            ended: self.ended.clone(),
        }
    }

    /// Starts sending `messages` to `topic` as one batch; the future resolves when the send
    /// ends. Never blocks.
    pub fn send(&self, topic: &str, messages: Vec<Message>) -> SendFuture {
        let slot = Arc::new(Slot::default());
        let job = Job {
            topic: topic.to_string(),
            messages,
            slot: slot.clone(),
        };
        let refused = match self.jobs.as_ref().map(|j| j.try_send(job)) {
            Some(Ok(())) => None,
            Some(Err(TrySendError::Full(_))) => Some(format!(
                "{ASYNC_SENDS_QUEUED_MAX} sends already wait to be sent"
            )),
            Some(Err(TrySendError::Disconnected(_))) | None => {
                Some("the producer's thread has stopped".to_string())
            }
        };
        if let Some(reason) = refused {
            slot.complete(Err(ClientError::Send {
                reason,
                maybe_written: false,
                refused: false,
            }));
        }
        SendFuture { slot }
    }
}

impl Drop for AsyncProducer {
    fn drop(&mut self) {
        // Closing the channel tells the thread to finish what it holds and stop.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            #[cfg(feature = "tokio")]
            if tokio::runtime::Handle::try_current().is_ok() {
                // On a runtime's thread: waiting here would stall its other tasks for as long
                // as the sends take. The thread finishes them on its own.
                return;
            }
            let _ = thread.join();
        }
    }
}

fn run(mut producer: Producer, jobs: &Receiver<Job>) {
    let mut waiting: BTreeMap<super::SendId, Arc<Slot>> = BTreeMap::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        // Idle: sleep on the channel rather than spin on the network.
        if waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => start(&mut producer, &mut waiting, job),
                Err(_) => break,
            }
        }
        while open && waiting.len() < ASYNC_SENDS_IN_FLIGHT_MAX {
            match jobs.try_recv() {
                Ok(job) => start(&mut producer, &mut waiting, job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        for (id, outcome) in producer.poll(Duration::from_millis(2)) {
            if let Some(slot) = waiting.remove(&id) {
                slot.complete(outcome);
            }
        }
    }
}

fn start(producer: &mut Producer, waiting: &mut BTreeMap<super::SendId, Arc<Slot>>, job: Job) {
    match producer.send_async(&job.topic, job.messages) {
        Ok(id) => {
            waiting.insert(id, job.slot);
        }
        Err(e) => job.slot.complete(Err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// The smallest executor: poll, park until woken.
    pub fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park_timeout(Duration::from_secs(1));
        }
    }

    #[test]
    fn a_future_completed_from_another_thread_wakes_its_task() {
        let slot = Arc::new(Slot::default());
        let future = SendFuture { slot: slot.clone() };
        let completer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            slot.complete(Err(ClientError::Timeout));
        });
        assert!(matches!(block_on(future), Err(ClientError::Timeout)));
        completer.join().expect("completer");
    }
}
