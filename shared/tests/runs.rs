//! Executor and MLflow client against a real MLflow server (started by scripts/test.sh).

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cloudml_shared::execute::{DeliveryContext, ExecuteError, Executor, TAG_ERROR, TAG_TASK_ID};
use cloudml_shared::queue::local::LocalQueue;
use cloudml_shared::queue::TaskQueue;
use cloudml_shared::sweep::Sweep;
use cloudml_shared::task::Task;
use cloudml_shared::testing::{closed_loopback_uri, mlflow, unique_experiment};
use cloudml_shared::tracking::{Auth, MetricPoint, MlflowClient, RunStatus, TrackingConfig};
use cloudml_shared::train::TrainOptions;
use cloudml_shared::worker::{run_worker, TaskEvent, WorkerConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn executor(client: MlflowClient) -> Executor {
    let options = TrainOptions {
        threads: 1,
        device: tch::Device::Cpu,
    };
    Executor::new(client, options, "test")
}

fn iris_task(experiment: &str, extra: &str) -> Task {
    let base = format!(
        r#"
        experiment = "{experiment}"
        loss = "sparse_categorical_crossentropy"
        metrics = ["accuracy"]
        epochs = 5
        batch_size = 16
        validation_split = 0.2
        dataset = {{ kind = "example", name = "iris" }}
        model = {{ layers = [ {{ type = "dense", units = 16, activation = "relu" }}, {{ type = "dense", units = 3, activation = "softmax" }} ] }}
        "#
    );
    // Keys in `extra` replace the defaults above, as a user's task file would.
    let mut table: toml::Table = toml::from_str(&base).expect("valid defaults");
    table.extend(toml::from_str::<toml::Table>(extra).expect("valid TOML"));
    Sweep::from_str(&table.to_string(), "test.toml", "test")
        .expect("valid task")
        .tasks
        .remove(0)
        .task
}

fn tag(run: &Value, key: &str) -> Option<String> {
    run["data"]["tags"]
        .as_array()?
        .iter()
        .find(|item| item["key"] == key)
        .and_then(|item| item["value"].as_str().map(str::to_string))
}

fn params(run: &Value) -> BTreeMap<String, String> {
    run["data"]["params"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| {
                    Some((
                        item["key"].as_str()?.to_string(),
                        item["value"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn metrics(run: &Value) -> BTreeMap<String, f64> {
    run["data"]["metrics"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| {
                    Some((item["key"].as_str()?.to_string(), item["value"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn run_records_everything() {
    let client = mlflow();
    let experiment = unique_experiment("records");
    let task = iris_task(&experiment, "[tags]\nowner = \"tests\"");
    let context = DeliveryContext {
        attempt: 2,
        message_id: Some("message-1".into()),
        queue_wait: Some(Duration::from_millis(1500)),
    };

    let report = executor(client.clone())
        .execute(&task, &context)
        .await
        .unwrap();
    let run = client.get_run(&report.run_id).await.unwrap();

    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(tag(&run, TAG_TASK_ID).as_deref(), Some(task.id.as_str()));
    assert_eq!(tag(&run, "cloudml.sweep_id"), task.sweep_id);
    assert_eq!(tag(&run, "cloudml.worker_runtime").as_deref(), Some("test"));
    assert_eq!(tag(&run, "cloudml.attempt").as_deref(), Some("2"));
    assert_eq!(
        tag(&run, "cloudml.message_id").as_deref(),
        Some("message-1")
    );
    assert!(tag(&run, "cloudml.host").is_some());
    assert_eq!(
        tag(&run, "cloudml.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(tag(&run, "owner").as_deref(), Some("tests"));

    let params = params(&run);
    assert_eq!(
        params.get("optimizer.name").map(String::as_str),
        Some("rmsprop")
    );
    assert_eq!(
        params.get("model.layers.0.units").map(String::as_str),
        Some("16")
    );
    assert_eq!(
        params.get("layer_1").map(String::as_str),
        Some("Dense(3, softmax)")
    );
    assert_eq!(params.get("dataset.name").map(String::as_str), Some("iris"));
    assert_eq!(
        params.get("data.train_rows").map(String::as_str),
        Some("120")
    );

    let metrics = metrics(&run);
    for key in [
        "test_loss",
        "test_accuracy",
        "train_seconds",
        "data_load_seconds",
        "total_seconds",
    ] {
        assert!(
            metrics.contains_key(key),
            "missing final metric {key}: {metrics:?}"
        );
    }
    assert_eq!(metrics.get("queue_wait_seconds"), Some(&1.5));

    for key in ["loss", "accuracy", "val_loss", "val_accuracy"] {
        let history = client.metric_history(&report.run_id, key).await.unwrap();
        let steps: Vec<i64> = history.iter().map(|point| point.step).collect();
        assert_eq!(steps, vec![0, 1, 2, 3, 4], "steps of {key}");
    }

    let info = serde_json::from_value(run["info"].clone()).unwrap();
    let files = client.list_artifacts(&info, "model").await.unwrap();
    let names: Vec<&str> = files
        .iter()
        .filter_map(|file| file["path"].as_str())
        .collect();
    assert!(names.contains(&"model.safetensors"), "{names:?}");
    let weights = client
        .download_artifact(&info, "model/model.safetensors")
        .await
        .unwrap();
    assert!(
        weights.len() > 16 * 4 * 4,
        "model file has {} bytes",
        weights.len()
    );
    let task_file = client.download_artifact(&info, "task.json").await.unwrap();
    let recorded: Task = serde_json::from_slice(&task_file).unwrap();
    assert_eq!(recorded, task);
}

#[tokio::test]
async fn redelivered_finished_task_is_not_retrained() {
    let client = mlflow();
    let task = iris_task(&unique_experiment("dedupe"), "");
    let worker = executor(client.clone());

    let first = worker
        .execute(&task, &DeliveryContext::default())
        .await
        .unwrap();
    let second = worker
        .execute(&task, &DeliveryContext::default())
        .await
        .unwrap();

    assert!(!first.already_finished);
    assert!(second.already_finished);
    assert_eq!(first.run_id, second.run_id);
    let runs = client
        .search_runs_by_tag(&first.experiment_id, TAG_TASK_ID, &task.id)
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
}

#[tokio::test]
async fn interrupted_run_is_marked_killed() {
    let client = mlflow();
    let task = iris_task(&unique_experiment("killed"), "");
    let experiment_id = client
        .get_or_create_experiment(&task.experiment)
        .await
        .unwrap();
    let stale = client
        .create_run(
            &experiment_id,
            None,
            &[(TAG_TASK_ID.to_string(), task.id.clone())],
        )
        .await
        .unwrap();

    let report = executor(client.clone())
        .execute(
            &task,
            &DeliveryContext {
                attempt: 2,
                ..DeliveryContext::default()
            },
        )
        .await
        .unwrap();

    let stale_run = client.get_run(&stale.run_id).await.unwrap();
    assert_eq!(stale_run["info"]["status"], "KILLED");
    assert!(tag(&stale_run, TAG_ERROR).is_some());
    let new_run = client.get_run(&report.run_id).await.unwrap();
    assert_eq!(new_run["info"]["status"], "FINISHED");
}

#[tokio::test]
async fn data_error_fails_run_with_tag() {
    let client = mlflow();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("bad.csv");
    std::fs::write(&path, "a,b,target\n1,2,0\n3,oops,1\n").unwrap();
    let task = iris_task(
        &unique_experiment("data-error"),
        &format!(
            "dataset = {{ kind = \"csv\", source = {:?} }}",
            path.display().to_string()
        ),
    );

    let err = executor(client.clone())
        .execute(&task, &DeliveryContext::default())
        .await
        .unwrap_err();

    assert!(matches!(err, ExecuteError::Data(_)), "{err}");
    assert!(!err.is_transient());
    let experiment_id = client
        .get_or_create_experiment(&task.experiment)
        .await
        .unwrap();
    let runs = client
        .search_runs_by_tag(&experiment_id, TAG_TASK_ID, &task.id)
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Failed);
    let run = client.get_run(&runs[0].run_id).await.unwrap();
    let error = tag(&run, TAG_ERROR).unwrap_or_default();
    assert!(error.contains("\"oops\" is not a number"), "{error}");
}

#[tokio::test]
async fn concurrent_experiment_creation_agrees() {
    let client = mlflow();
    let name = unique_experiment("race");
    let attempts = (0..8).map(|_| {
        let client = client.clone();
        let name = name.clone();
        tokio::spawn(async move { client.get_or_create_experiment(&name).await })
    });
    let ids: Vec<String> = futures_results(attempts).await;
    assert_eq!(ids.len(), 8);
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
}

async fn futures_results(
    handles: impl Iterator<
        Item = tokio::task::JoinHandle<Result<String, cloudml_shared::tracking::TrackingError>>,
    >,
) -> Vec<String> {
    let mut ids = Vec::new();
    for handle in handles {
        ids.push(handle.await.unwrap().unwrap());
    }
    ids
}

#[tokio::test]
async fn log_batch_chunks_large_payloads() {
    let client = mlflow();
    let experiment_id = client
        .get_or_create_experiment(&unique_experiment("chunks"))
        .await
        .unwrap();
    let run = client.create_run(&experiment_id, None, &[]).await.unwrap();
    let points: Vec<MetricPoint> = (0..2500)
        .map(|step| MetricPoint {
            key: "loss".into(),
            value: step as f64,
            timestamp: 0,
            step,
        })
        .collect();
    let params: Vec<(String, String)> = (0..250)
        .map(|index| (format!("p{index}"), index.to_string()))
        .collect();

    client
        .log_batch(&run.run_id, &points, &params, &[])
        .await
        .unwrap();

    let history = client.metric_history(&run.run_id, "loss").await.unwrap();
    assert_eq!(history.len(), 2500);
    let stored = client.get_run(&run.run_id).await.unwrap();
    assert_eq!(stored["data"]["params"].as_array().map(Vec::len), Some(250));
}

#[tokio::test]
async fn unreachable_server_error_is_transient() {
    let client = MlflowClient::new(&TrackingConfig {
        uri: closed_loopback_uri(),
        auth: Auth::None,
        retries: 1,
    })
    .unwrap();
    let err = client.get_or_create_experiment("any").await.unwrap_err();
    assert!(err.is_transient());
    assert!(err.to_string().contains("unreachable"), "{err}");
}

#[tokio::test]
async fn worker_loop_settles_every_message() {
    let client = mlflow();
    let experiment = unique_experiment("loop");
    let queue = Arc::new(LocalQueue::new(2));
    let good = iris_task(&experiment, "");
    queue.push(good.id.clone(), good.to_message().unwrap());
    queue.push("poison".into(), b"{not json".to_vec());
    let mut invalid = serde_json::to_value(iris_task(&experiment, "")).unwrap();
    invalid["model"]["layers"][0]["units"] = 0.into();
    queue.push("invalid".into(), serde_json::to_vec(&invalid).unwrap());

    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let config = WorkerConfig {
        concurrency: 2,
        poll_wait: Duration::from_millis(100),
        exit_when_idle: Some(Duration::from_millis(500)),
        ..WorkerConfig::default()
    };
    let summary = run_worker(
        queue.clone() as Arc<dyn TaskQueue>,
        Arc::new(executor(client)),
        config,
        shutdown,
        Some(sender),
    )
    .await;

    assert_eq!(summary.finished, 1);
    assert_eq!(summary.failed, 2);
    assert!(queue.is_drained());
    let dead: BTreeMap<String, String> = queue
        .dead_letters()
        .into_iter()
        .map(|letter| (letter.message_id, letter.error))
        .collect();
    assert!(
        dead["poison"].contains("invalid task message"),
        "{}",
        dead["poison"]
    );
    assert!(
        dead["invalid"].contains("model.layers[0].units = 0"),
        "{}",
        dead["invalid"]
    );
    let mut finished = 0;
    while let Ok(event) = receiver.try_recv() {
        if matches!(event, TaskEvent::Finished(_)) {
            finished += 1;
        }
    }
    assert_eq!(finished, 1);
}

#[tokio::test]
async fn worker_loop_retries_transient_failures() {
    let unreachable = MlflowClient::new(&TrackingConfig {
        uri: closed_loopback_uri(),
        auth: Auth::None,
        retries: 0,
    })
    .unwrap();
    let queue = Arc::new(LocalQueue::new(3));
    let task = iris_task("unreachable", "");
    queue.push(task.id.clone(), task.to_message().unwrap());

    let config = WorkerConfig {
        concurrency: 1,
        poll_wait: Duration::from_millis(100),
        exit_when_idle: Some(Duration::from_millis(300)),
        retry_base_delay: Duration::from_millis(10),
        ..WorkerConfig::default()
    };
    let summary = run_worker(
        queue.clone() as Arc<dyn TaskQueue>,
        Arc::new(executor(unreachable)),
        config,
        CancellationToken::new(),
        None,
    )
    .await;

    assert_eq!(summary.failed, 3);
    let dead = queue.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].error.contains("unreachable"), "{}", dead[0].error);
}
