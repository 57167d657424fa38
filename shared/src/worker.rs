//! The worker loop, written once over any [`TaskQueue`]: receive, parse, train, settle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::execute::{DeliveryContext, Executor, TaskReport};
use crate::queue::{Delivery, FailureKind, TaskQueue};
use crate::task::Task;

/// Settings of one worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Tasks trained at once by this process.
    pub concurrency: usize,
    /// Stop after this many settled messages (a KEDA ScaledJob pod runs one batch and exits).
    pub max_tasks: Option<usize>,
    /// Stop after the queue has been empty this long.
    pub exit_when_idle: Option<Duration>,
    /// Maximum wait of one receive call (SQS long polling allows up to 20 s).
    pub poll_wait: Duration,
    /// First retry delay of a transient failure; doubled per attempt, at most 15 minutes.
    pub retry_base_delay: Duration,
    /// After a shutdown request, how long in-flight tasks may finish before they are released.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 1,
            max_tasks: None,
            exit_when_idle: None,
            poll_wait: Duration::from_secs(20),
            retry_base_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Outcome of one delivery, for progress displays and result tables.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    Started {
        message_id: String,
        task_id: String,
        attempt: u32,
    },
    Finished(TaskReport),
    /// Failed and given back to the queue for another attempt.
    Retrying {
        task_id: String,
        attempt: u32,
        error: String,
    },
    /// Failed for good; the queue dead-letters the message.
    Failed {
        message_id: String,
        task_id: Option<String>,
        attempt: u32,
        error: String,
    },
}

/// Counts for the worker's closing log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerSummary {
    pub finished: usize,
    pub failed: usize,
    pub released: usize,
}

/// Consumes `queue` until `shutdown` is cancelled, `max_tasks` are settled or the queue stays idle.
pub async fn run_worker(
    queue: Arc<dyn TaskQueue>,
    executor: Arc<Executor>,
    config: WorkerConfig,
    shutdown: CancellationToken,
    events: Option<mpsc::UnboundedSender<TaskEvent>>,
) -> WorkerSummary {
    let permits = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut in_flight: JoinSet<Outcome> = JoinSet::new();
    let mut summary = WorkerSummary::default();
    let mut received = 0usize;
    let mut idle_since = Instant::now();
    // Cancelled on shutdown after the grace period; in-flight tasks then release their messages.
    let abandon = CancellationToken::new();

    tracing::info!(
        concurrency = config.concurrency,
        runtime = executor.runtime(),
        "worker started"
    );
    loop {
        // Settle finished tasks first, so counts and limits are up to date.
        while let Some(joined) = in_flight.try_join_next() {
            record(&mut summary, joined);
        }
        if shutdown.is_cancelled() || config.max_tasks.is_some_and(|max| received >= max) {
            break;
        }

        // Wait for a free slot, so messages are only received when they can start at once.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let free = permits.available_permits() + 1;
        let requested = config
            .max_tasks
            .map_or(free, |max| free.min(max.saturating_sub(received)));

        let deliveries = tokio::select! {
            result = queue.receive(requested, config.poll_wait) => match result {
                Ok(deliveries) => deliveries,
                Err(err) => {
                    tracing::error!(error = %err, "receive failed, retrying in 5 s");
                    drop(permit);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                        () = shutdown.cancelled() => {}
                    }
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        drop(permit);

        if deliveries.is_empty() {
            if in_flight.is_empty()
                && config
                    .exit_when_idle
                    .is_some_and(|idle| idle_since.elapsed() >= idle)
            {
                tracing::info!("queue idle, stopping");
                break;
            }
            if !in_flight.is_empty() {
                // Busy workers are not idle; only count from the moment the last task settles.
                idle_since = Instant::now();
            }
            continue;
        }
        idle_since = Instant::now();

        for delivery in deliveries {
            received += 1;
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let job = Job {
                queue: queue.clone(),
                executor: executor.clone(),
                config: config.clone(),
                events: events.clone(),
                abandon: abandon.clone(),
            };
            in_flight.spawn(async move {
                let outcome = job.handle(delivery).await;
                drop(permit);
                outcome
            });
        }
    }

    // Shutdown: no new work; give in-flight tasks the grace period, then release what is left.
    if !in_flight.is_empty() {
        tracing::info!(
            in_flight = in_flight.len(),
            grace_seconds = config.shutdown_grace.as_secs(),
            "waiting for in-flight tasks"
        );
        let deadline = tokio::time::sleep(config.shutdown_grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                joined = in_flight.join_next() => match joined {
                    Some(joined) => record(&mut summary, joined),
                    None => break,
                },
                () = &mut deadline, if !abandon.is_cancelled() => {
                    tracing::warn!(in_flight = in_flight.len(), "grace period over, releasing in-flight messages");
                    abandon.cancel();
                }
            }
        }
    }
    tracing::info!(
        finished = summary.finished,
        failed = summary.failed,
        released = summary.released,
        "worker stopped"
    );
    summary
}

fn record(summary: &mut WorkerSummary, joined: Result<Outcome, tokio::task::JoinError>) {
    match joined {
        Ok(Outcome::Finished) => summary.finished += 1,
        Ok(Outcome::Failed) => summary.failed += 1,
        Ok(Outcome::Released) => summary.released += 1,
        Err(err) => {
            // The message was neither acknowledged nor failed, so the queue redelivers it.
            tracing::error!(error = %err, "task handler panicked");
            summary.failed += 1;
        }
    }
}

enum Outcome {
    Finished,
    Failed,
    Released,
}

/// Everything one delivery's handler needs, cloned per task.
struct Job {
    queue: Arc<dyn TaskQueue>,
    executor: Arc<Executor>,
    config: WorkerConfig,
    events: Option<mpsc::UnboundedSender<TaskEvent>>,
    abandon: CancellationToken,
}

impl Job {
    fn emit(&self, event: TaskEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }

    /// Parses, trains and settles one delivery; the queue gets exactly one of ack, fail or release.
    async fn handle(self, delivery: Delivery) -> Outcome {
        let message_id = delivery.message_id.clone();
        let attempt = delivery.attempt;

        // 1. Parse: a body that is not a valid task can never succeed.
        let task = match Task::from_message(&delivery.body, &message_id) {
            Ok(task) => task,
            Err(err) => {
                tracing::error!(message_id, attempt, error = %err, "message rejected");
                self.emit(TaskEvent::Failed {
                    message_id: message_id.clone(),
                    task_id: None,
                    attempt,
                    error: err.to_string(),
                });
                self.settle_failure(&delivery, FailureKind::Unparseable, &err.to_string())
                    .await;
                return Outcome::Failed;
            }
        };
        self.emit(TaskEvent::Started {
            message_id: message_id.clone(),
            task_id: task.id.clone(),
            attempt,
        });

        // 2. Train, with a heartbeat keeping the message invisible on queues that need one.
        let context = DeliveryContext {
            attempt,
            message_id: Some(message_id.clone()),
            queue_wait: delivery.queue_wait(),
        };
        let execution = self.executor.execute(&task, &context);
        let heartbeat = self.heartbeat(&delivery);
        let result = tokio::select! {
            result = execution => result,
            () = heartbeat => unreachable!("the heartbeat loop never ends"),
            () = self.abandon.cancelled() => {
                tracing::warn!(task_id = %task.id, message_id, "shutdown grace period over, releasing message");
                if let Err(err) = self.queue.release(&delivery).await {
                    tracing::error!(task_id = %task.id, error = %err, "release failed; the message returns after its visibility timeout");
                }
                return Outcome::Released;
            }
        };

        // 3. Settle: ack only after the run is FINISHED.
        match result {
            Ok(report) => {
                if let Err(err) = self.queue.ack(&delivery).await {
                    // The run is FINISHED, so a redelivery is recognised and acknowledged without training.
                    tracing::error!(task_id = %task.id, error = %err, "ack failed; the message will be redelivered");
                }
                self.emit(TaskEvent::Finished(report));
                Outcome::Finished
            }
            Err(err) => {
                let kind = if err.is_transient() {
                    FailureKind::Transient
                } else {
                    FailureKind::Permanent
                };
                tracing::warn!(task_id = %task.id, message_id, attempt, transient = err.is_transient(), error = %err, "task failed");
                let event = if kind == FailureKind::Transient {
                    TaskEvent::Retrying {
                        task_id: task.id.clone(),
                        attempt,
                        error: err.to_string(),
                    }
                } else {
                    TaskEvent::Failed {
                        message_id: message_id.clone(),
                        task_id: Some(task.id.clone()),
                        attempt,
                        error: err.to_string(),
                    }
                };
                self.emit(event);
                self.settle_failure(&delivery, kind, &err.to_string()).await;
                Outcome::Failed
            }
        }
    }

    async fn settle_failure(&self, delivery: &Delivery, kind: FailureKind, error: &str) {
        let delay = retry_delay(self.config.retry_base_delay, delivery.attempt);
        if let Err(err) = self.queue.fail(delivery, kind, error, delay).await {
            tracing::error!(message_id = %delivery.message_id, error = %err, "cannot settle failed message; the queue redelivers it");
        }
    }

    /// Calls the queue's heartbeat forever at its interval (or never, for queues without one).
    async fn heartbeat(&self, delivery: &Delivery) {
        let Some(interval) = self.queue.heartbeat_interval() else {
            return std::future::pending().await;
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if let Err(err) = self.queue.heartbeat(delivery).await {
                tracing::warn!(message_id = %delivery.message_id, error = %err, "heartbeat failed");
            }
        }
    }
}

/// Exponential backoff for retries: `base * 2^(attempt - 1)`, at most 15 minutes.
pub fn retry_delay(base: Duration, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(Duration::from_secs(900))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let base = Duration::from_secs(5);
        assert_eq!(retry_delay(base, 1), Duration::from_secs(5));
        assert_eq!(retry_delay(base, 3), Duration::from_secs(20));
        assert_eq!(retry_delay(base, 30), Duration::from_secs(900));
    }
}
