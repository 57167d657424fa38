//! The embedded in-process queue for local runs, with the same at-least-once rules as SQS:
//! a failed message comes back after a delay until `max_attempts`, then goes to a dead-letter list.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Delivery, FailureKind, QueueError, TaskQueue};

/// A message that reached the dead-letter list, with the last error.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message_id: String,
    pub attempts: u32,
    pub error: String,
}

#[derive(Debug)]
struct Message {
    id: String,
    body: Vec<u8>,
    attempts: u32,
    enqueued_at: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<Message>,
    delayed: Vec<(Instant, Message)>,
    in_flight: HashMap<String, Message>,
    dead: Vec<DeadLetter>,
}

impl State {
    /// Moves delayed messages whose time has come to the ready list.
    fn promote_due(&mut self, now: Instant) {
        let mut index = 0;
        while index < self.delayed.len() {
            if self.delayed[index].0 <= now {
                let (_, message) = self.delayed.swap_remove(index);
                self.ready.push_back(message);
            } else {
                index += 1;
            }
        }
    }
}

/// In-process queue shared by the coordinator and its worker tasks.
#[derive(Debug)]
pub struct LocalQueue {
    state: Mutex<State>,
    changed: Notify,
    max_attempts: u32,
}

impl LocalQueue {
    pub fn new(max_attempts: u32) -> Self {
        LocalQueue {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            max_attempts: max_attempts.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves only plain collections behind, still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a message body under `id`.
    pub fn push(&self, id: String, body: Vec<u8>) {
        self.lock().ready.push_back(Message {
            id,
            body,
            attempts: 0,
            enqueued_at: SystemTime::now(),
        });
        self.changed.notify_waiters();
    }

    /// True when no message is ready, delayed or in flight: every task has been settled.
    pub fn is_drained(&self) -> bool {
        let state = self.lock();
        state.ready.is_empty() && state.delayed.is_empty() && state.in_flight.is_empty()
    }

    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.lock().dead.clone()
    }

    fn take_ready(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let mut state = self.lock();
        state.promote_due(Instant::now());
        let mut deliveries = Vec::new();
        while deliveries.len() < max {
            let Some(mut message) = state.ready.pop_front() else {
                break;
            };
            message.attempts += 1;
            deliveries.push(Delivery {
                message_id: message.id.clone(),
                body: message.body.clone(),
                attempt: message.attempts,
                enqueued_at: Some(message.enqueued_at),
                receipt: message.id.clone(),
            });
            state.in_flight.insert(message.id.clone(), message);
        }
        let next_due = state.delayed.iter().map(|(due, _)| *due).min();
        (deliveries, next_due)
    }

    fn settle(&self, delivery: &Delivery, operation: &'static str) -> Result<Message, QueueError> {
        self.lock()
            .in_flight
            .remove(&delivery.receipt)
            .ok_or_else(|| {
                QueueError::new(
                    operation,
                    format!("message {} is not in flight", delivery.message_id),
                )
            })
    }
}

#[async_trait]
impl TaskQueue for LocalQueue {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before looking, so a push between the look and the wait is not missed.
            let changed = self.changed.notified();
            let (deliveries, next_due) = self.take_ready(max);
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake_at = next_due.map_or(deadline, |due| due.min(deadline));
            let _ = tokio::time::timeout(wake_at.saturating_duration_since(now), changed).await;
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        self.settle(delivery, "ack")?;
        self.changed.notify_waiters();
        Ok(())
    }

    async fn fail(
        &self,
        delivery: &Delivery,
        kind: FailureKind,
        error: &str,
        retry_delay: Duration,
    ) -> Result<(), QueueError> {
        let message = self.settle(delivery, "fail")?;
        let retry = kind == FailureKind::Transient && message.attempts < self.max_attempts;
        {
            let mut state = self.lock();
            if retry {
                state.delayed.push((Instant::now() + retry_delay, message));
            } else {
                state.dead.push(DeadLetter {
                    message_id: message.id,
                    attempts: message.attempts,
                    error: error.to_string(),
                });
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), QueueError> {
        let mut message = self.settle(delivery, "release")?;
        // A released message was not tried, so it keeps its attempt budget.
        message.attempts = message.attempts.saturating_sub(1);
        self.lock().ready.push_front(message);
        self.changed.notify_waiters();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn transient_failure_retries_then_dead_letters() {
        let queue = LocalQueue::new(2);
        queue.push("a".into(), b"{}".to_vec());

        let first = queue.receive(1, Duration::from_millis(10)).await.unwrap();
        assert_eq!(first[0].attempt, 1);
        queue
            .fail(
                &first[0],
                FailureKind::Transient,
                "down",
                Duration::from_millis(1),
            )
            .await
            .unwrap();

        let second = queue.receive(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(second[0].attempt, 2);
        queue
            .fail(
                &second[0],
                FailureKind::Transient,
                "down",
                Duration::from_millis(1),
            )
            .await
            .unwrap();

        assert!(queue.is_drained());
        assert_eq!(queue.dead_letters().len(), 1);
    }

    #[tokio::test]
    async fn permanent_failure_dead_letters_at_once() {
        let queue = LocalQueue::new(5);
        queue.push("a".into(), b"x".to_vec());
        let delivery = queue.receive(1, Duration::from_millis(10)).await.unwrap();
        queue
            .fail(
                &delivery[0],
                FailureKind::Unparseable,
                "not JSON",
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert_eq!(queue.dead_letters()[0].error, "not JSON");
    }

    #[tokio::test]
    async fn release_keeps_attempt_budget() {
        let queue = LocalQueue::new(1);
        queue.push("a".into(), b"x".to_vec());
        let delivery = queue.receive(1, Duration::from_millis(10)).await.unwrap();
        queue.release(&delivery[0]).await.unwrap();
        let again = queue.receive(1, Duration::from_millis(10)).await.unwrap();
        assert_eq!(again[0].attempt, 1);
    }

    #[tokio::test]
    async fn receive_times_out_empty() {
        let queue = LocalQueue::new(1);
        let deliveries = queue.receive(4, Duration::from_millis(20)).await.unwrap();
        assert!(deliveries.is_empty());
    }
}
