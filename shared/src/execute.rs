//! Runs one task end to end: MLflow run, data, training, metrics, model artifact, final status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::data::{self, DataError};
use crate::task::{Layer, Task};
use crate::tracking::{now_millis, MetricPoint, MlflowClient, RunInfo, RunStatus, TrackingError};
use crate::train::{self, EpochMetrics, TrainError, TrainOptions, TrainOutcome};

/// Tag keys that tie a run to its task; queried to find an earlier run of a redelivered task.
pub const TAG_TASK_ID: &str = "cloudml.task_id";
pub const TAG_SWEEP_ID: &str = "cloudml.sweep_id";
pub const TAG_ERROR: &str = "cloudml.error";

/// Maximum time per-epoch metrics wait before they are sent to MLflow.
const EPOCH_FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// Transport details of one delivery of a task.
#[derive(Debug, Clone, Default)]
pub struct DeliveryContext {
    /// 1 for the first delivery, counting redeliveries.
    pub attempt: u32,
    pub message_id: Option<String>,
    /// Time from enqueue to the start of this attempt, when the queue reports it.
    pub queue_wait: Option<Duration>,
}

/// Result of a task that has a FINISHED run.
#[derive(Debug, Clone)]
pub struct TaskReport {
    pub task_id: String,
    pub run_id: String,
    pub experiment_id: String,
    /// True when an earlier delivery had already finished the run, so nothing was trained.
    pub already_finished: bool,
    pub test_metrics: Vec<(String, f64)>,
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("training thread stopped unexpectedly: {0}")]
    Crashed(String),
}

impl ExecuteError {
    /// Tells whether another attempt may succeed. Invalid data or models fail the same way every time.
    pub fn is_transient(&self) -> bool {
        match self {
            ExecuteError::Tracking(err) => err.is_transient(),
            ExecuteError::Data(err) => err.is_transient(),
            ExecuteError::Train(_) | ExecuteError::Crashed(_) => false,
        }
    }
}

/// Trains tasks and records them in MLflow; shared by every worker mode.
#[derive(Debug)]
pub struct Executor {
    mlflow: MlflowClient,
    train_options: TrainOptions,
    runtime: String,
    /// Experiment ids by name; an experiment id never changes once created.
    experiments: Mutex<HashMap<String, String>>,
}

impl Executor {
    /// `runtime` is recorded as the `cloudml.worker_runtime` tag: `local`, `once`, `lambda`, `sqs`, `amqp`.
    pub fn new(mlflow: MlflowClient, train_options: TrainOptions, runtime: &str) -> Self {
        Executor {
            mlflow,
            train_options,
            runtime: runtime.to_string(),
            experiments: Mutex::new(HashMap::new()),
        }
    }

    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    async fn experiment_id(&self, name: &str) -> Result<String, TrackingError> {
        let cached = self
            .experiments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned();
        if let Some(id) = cached {
            return Ok(id);
        }
        let id = self.mlflow.get_or_create_experiment(name).await?;
        self.experiments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_string(), id.clone());
        Ok(id)
    }

    /// Runs `task` unless a FINISHED run for its id already exists, and returns its report.
    /// Runs left RUNNING by an earlier, interrupted attempt are marked KILLED first.
    pub async fn execute(
        &self,
        task: &Task,
        context: &DeliveryContext,
    ) -> Result<TaskReport, ExecuteError> {
        let started = Instant::now();
        let experiment_id = self.experiment_id(&task.experiment).await?;

        // 1. Deduplicate: a finished run means a redelivery after success.
        let earlier = self
            .mlflow
            .search_runs_by_tag(&experiment_id, TAG_TASK_ID, &task.id)
            .await?;
        if let Some(finished) = earlier.iter().find(|run| run.status == RunStatus::Finished) {
            tracing::info!(task_id = %task.id, run_id = %finished.run_id, "task already has a FINISHED run, skipping");
            let test_metrics = self
                .final_metrics(&finished.run_id)
                .await
                .unwrap_or_default();
            return Ok(TaskReport {
                task_id: task.id.clone(),
                run_id: finished.run_id.clone(),
                experiment_id,
                already_finished: true,
                test_metrics,
                duration: started.elapsed(),
            });
        }
        for stale in earlier
            .iter()
            .filter(|run| run.status == RunStatus::Running)
        {
            // NOTE: a duplicate delivery still training elsewhere looks the same as a dead worker here;
            // its own end_run later overwrites this status.
            tracing::warn!(task_id = %task.id, run_id = %stale.run_id, "marking run of an interrupted attempt KILLED");
            self.mlflow
                .set_tag(
                    &stale.run_id,
                    TAG_ERROR,
                    &format!(
                        "worker stopped before finishing; retried as attempt {}",
                        context.attempt
                    ),
                )
                .await?;
            self.mlflow
                .end_run(&stale.run_id, RunStatus::Killed)
                .await?;
        }

        // 2. Create the run, then train; any failure after this point marks the run FAILED.
        let run = self
            .mlflow
            .create_run(
                &experiment_id,
                task.tags.get("mlflow.runName").map(String::as_str),
                &self.run_tags(task, context),
            )
            .await?;
        tracing::info!(task_id = %task.id, run_id = %run.run_id, attempt = context.attempt, "run started");
        match self.train_and_record(task, context, &run, started).await {
            Ok(test_metrics) => {
                self.mlflow
                    .end_run(&run.run_id, RunStatus::Finished)
                    .await?;
                tracing::info!(task_id = %task.id, run_id = %run.run_id, seconds = started.elapsed().as_secs_f64(), "run FINISHED");
                Ok(TaskReport {
                    task_id: task.id.clone(),
                    run_id: run.run_id,
                    experiment_id,
                    already_finished: false,
                    test_metrics,
                    duration: started.elapsed(),
                })
            }
            Err(err) => {
                tracing::warn!(task_id = %task.id, run_id = %run.run_id, error = %err, "run FAILED");
                if let Err(mark_err) = self.mark_failed(&run.run_id, &err).await {
                    tracing::error!(run_id = %run.run_id, error = %mark_err, "cannot mark run FAILED; it stays RUNNING until a retry marks it KILLED");
                }
                Err(err)
            }
        }
    }

    async fn mark_failed(&self, run_id: &str, err: &ExecuteError) -> Result<(), TrackingError> {
        self.mlflow
            .set_tag(run_id, TAG_ERROR, &err.to_string())
            .await?;
        self.mlflow.end_run(run_id, RunStatus::Failed).await
    }

    async fn train_and_record(
        &self,
        task: &Task,
        context: &DeliveryContext,
        run: &RunInfo,
        started: Instant,
    ) -> Result<Vec<(String, f64)>, ExecuteError> {
        self.mlflow
            .log_batch(&run.run_id, &[], &task_params(task), &[])
            .await?;

        let load_started = Instant::now();
        let dataset = data::load(&task.dataset, task.normalization, task.loss, task.seed).await?;
        let data_load = load_started.elapsed();
        let data_params = vec![
            ("data.name".to_string(), dataset.name.clone()),
            ("data.features".to_string(), dataset.features.to_string()),
            ("data.classes".to_string(), dataset.classes.to_string()),
            (
                "data.train_rows".to_string(),
                dataset.train_rows().to_string(),
            ),
            (
                "data.test_rows".to_string(),
                dataset.test_rows().to_string(),
            ),
        ];
        self.mlflow
            .log_batch(&run.run_id, &[], &data_params, &[])
            .await?;

        let outcome = self
            .train_streaming_epochs(task, dataset, &run.run_id)
            .await?;

        let mut final_metrics = outcome.test_metrics.clone();
        let durations = [
            ("data_load_seconds", Some(data_load)),
            ("train_seconds", Some(outcome.train_duration)),
            ("queue_wait_seconds", context.queue_wait),
            ("total_seconds", Some(started.elapsed())),
        ];
        for (name, duration) in durations {
            if let Some(duration) = duration {
                final_metrics.push((name.to_string(), duration.as_secs_f64()));
            }
        }
        final_metrics.push(("epochs_completed".to_string(), outcome.history.len() as f64));
        let timestamp = now_millis();
        let points: Vec<MetricPoint> = final_metrics
            .iter()
            .map(|(key, value)| MetricPoint {
                key: key.clone(),
                value: *value,
                timestamp,
                step: 0,
            })
            .collect();
        let mut result_params = vec![(
            "model.trainable_parameters".to_string(),
            outcome.trainable_parameters.to_string(),
        )];
        if let Some(best) = outcome.best_epoch {
            result_params.push(("early_stopping.best_epoch".to_string(), best.to_string()));
        }
        let result_tags = vec![(
            "cloudml.stopped_early".to_string(),
            outcome.stopped_early.to_string(),
        )];
        self.mlflow
            .log_batch(&run.run_id, &points, &result_params, &result_tags)
            .await?;

        self.upload_model(task, run, &outcome).await?;
        Ok(outcome.test_metrics)
    }

    /// Trains on a blocking thread and logs each epoch's metrics while the next epoch runs.
    async fn train_streaming_epochs(
        &self,
        task: &Task,
        dataset: data::Dataset,
        run_id: &str,
    ) -> Result<TrainOutcome, ExecuteError> {
        let (sender, mut receiver) = mpsc::unbounded_channel::<EpochMetrics>();
        let options = self.train_options;
        let training_task = task.clone();
        let training = tokio::task::spawn_blocking(move || {
            let mut on_epoch = |metrics: &EpochMetrics| {
                // A send fails only after the receiver is dropped (the task was abandoned or logging failed), and then no one reads the metrics.
                let _ = sender.send(metrics.clone());
            };
            train::train(&training_task, &dataset, &options, &mut on_epoch)
        });

        // Per-epoch metrics go out at most every EPOCH_FLUSH_INTERVAL, so short epochs do not turn
        // into one request each, while long tasks still show progress in the MLflow UI.
        let mut pending: Vec<MetricPoint> = Vec::new();
        let mut last_flush = Instant::now();
        while let Some(epoch) = receiver.recv().await {
            let timestamp = now_millis();
            pending.extend(epoch.values.iter().map(|(key, value)| MetricPoint {
                key: key.clone(),
                value: *value,
                timestamp,
                step: i64::from(epoch.epoch),
            }));
            if last_flush.elapsed() >= EPOCH_FLUSH_INTERVAL {
                self.mlflow.log_batch(run_id, &pending, &[], &[]).await?;
                pending.clear();
                last_flush = Instant::now();
            }
        }
        self.mlflow.log_batch(run_id, &pending, &[], &[]).await?;

        let outcome = training
            .await
            .map_err(|err| ExecuteError::Crashed(err.to_string()))??;
        Ok(outcome)
    }

    async fn upload_model(
        &self,
        task: &Task,
        run: &RunInfo,
        outcome: &TrainOutcome,
    ) -> Result<(), ExecuteError> {
        let description = json!({
            "format": "safetensors",
            "framework": format!("libtorch via tch {}", "0.26"),
            "model": task.model,
            "loss": task.loss,
            "normalization": task.normalization,
            "weights": "model.safetensors",
            "layout": "dense weight [out, in], applied as x @ weight^T + bias",
        });
        let description = serde_json::to_vec_pretty(&description)
            .map_err(|err| ExecuteError::Crashed(err.to_string()))?;
        let task_json = serde_json::to_vec_pretty(task)
            .map_err(|err| ExecuteError::Crashed(err.to_string()))?;
        self.mlflow
            .upload_artifact(
                run,
                "model/model.safetensors",
                outcome.model_safetensors.clone(),
            )
            .await?;
        self.mlflow
            .upload_artifact(run, "model/model.json", description)
            .await?;
        self.mlflow
            .upload_artifact(run, "task.json", task_json)
            .await?;
        Ok(())
    }

    fn run_tags(&self, task: &Task, context: &DeliveryContext) -> Vec<(String, String)> {
        let mut tags: Vec<(String, String)> = task
            .tags
            .iter()
            .filter(|(key, _)| key.as_str() != "mlflow.runName")
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        tags.push((TAG_TASK_ID.into(), task.id.clone()));
        if let Some(sweep_id) = &task.sweep_id {
            tags.push((TAG_SWEEP_ID.into(), sweep_id.clone()));
        }
        tags.push(("cloudml.worker_runtime".into(), self.runtime.clone()));
        tags.push((
            "cloudml.host".into(),
            gethostname::gethostname().to_string_lossy().into_owned(),
        ));
        tags.push(("cloudml.version".into(), env!("CARGO_PKG_VERSION").into()));
        tags.push(("cloudml.attempt".into(), context.attempt.max(1).to_string()));
        tags.push((
            "cloudml.device".into(),
            format!("{:?}", self.train_options.device).to_lowercase(),
        ));
        if let Some(message_id) = &context.message_id {
            tags.push(("cloudml.message_id".into(), message_id.clone()));
        }
        tags
    }

    async fn final_metrics(&self, run_id: &str) -> Result<Vec<(String, f64)>, TrackingError> {
        let run = self.mlflow.get_run(run_id).await?;
        let metrics = run["data"]["metrics"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(metrics
            .iter()
            .filter_map(|metric| {
                let key = metric["key"].as_str()?;
                key.starts_with("test_")
                    .then(|| Some((key.to_string(), metric["value"].as_f64()?)))
                    .flatten()
            })
            .collect())
    }
}

/// Flattens every task field into MLflow params (`optimizer.learning_rate`, `model.layers.0.units`),
/// plus one readable param per layer as the original recorded them (`layer_0 = Dense(64, relu)`).
pub fn task_params(task: &Task) -> Vec<(String, String)> {
    let mut value = serde_json::to_value(task).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        // Tags and ids are run tags, not params.
        for key in ["tags", "id", "sweep_id", "schema_version"] {
            object.remove(key);
        }
    }
    let mut params = BTreeMap::new();
    flatten("", &value, &mut params);
    for (index, layer) in task.model.layers.iter().enumerate() {
        let summary = match layer {
            Layer::Dense {
                units, activation, ..
            } => {
                format!(
                    "Dense({units}, {})",
                    serde_json::to_value(activation)
                        .unwrap_or(Value::Null)
                        .as_str()
                        .unwrap_or("?")
                )
            }
            Layer::Dropout { rate } => format!("Dropout({rate})"),
            Layer::BatchNorm { .. } => "BatchNorm".to_string(),
            Layer::Flatten => "Flatten".to_string(),
        };
        params.insert(format!("layer_{index}"), summary);
    }
    params.into_iter().collect()
}

fn flatten(prefix: &str, value: &Value, output: &mut BTreeMap<String, String>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Object(object) => {
            for (key, item) in object {
                flatten(&join(key), item, output);
            }
        }
        Value::Array(items) if items.iter().any(|item| item.is_object()) => {
            for (index, item) in items.iter().enumerate() {
                flatten(&join(&index.to_string()), item, output);
            }
        }
        Value::String(text) => {
            output.insert(prefix.to_string(), text.clone());
        }
        Value::Null => {}
        other => {
            output.insert(prefix.to_string(), other.to_string());
        }
    }
}
