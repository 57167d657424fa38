//! Helpers for the queue tests: the `cloudml` and `cloudml-worker` binaries, sweep files, and runs
//! read back from MLflow.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use cloudml_shared::execute::{TAG_SWEEP_ID, TAG_TASK_ID};
use cloudml_shared::testing::{mlflow, tracking_uri, unique_experiment};
use cloudml_shared::tracking::{RunInfo, RunStatus};

/// The bundled digits dataset, as a TOML inline table for `write_sweep`.
pub const DIGITS: &str = r#"{ kind = "example", name = "digits" }"#;

/// Returns a short random suffix for queue names.
pub fn unique_suffix() -> String {
    let name = unique_experiment("q");
    name.rsplit('-').next().unwrap_or_default().to_string()
}

/// Locates `cloudml-worker`, built beside `cloudml` when the workspace's tests are built.
pub fn worker_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_cloudml")).with_file_name("cloudml-worker");
    assert!(
        path.exists(),
        "{} not built; run the whole workspace's tests",
        path.display()
    );
    path
}

/// Starts `cloudml-worker run` on `queue` with stderr captured; retries after transient failures
/// start without delay.
pub fn start_worker(queue: &str, extra: &[&str]) -> Child {
    Command::new(worker_binary())
        .args(["--log-format", "json", "run", "--queue", queue])
        .args(extra)
        .env("MLFLOW_TRACKING_URI", tracking_uri())
        .env("CLOUDML_RETRY_BASE_DELAY_SECONDS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cloudml-worker")
}

/// Runs `cloudml` with the test MLflow server.
pub fn cloudml(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudml"))
        .args(args)
        .env("MLFLOW_TRACKING_URI", tracking_uri())
        .output()
        .expect("run cloudml")
}

/// Enqueues a sweep file and returns the sweep id that `cloudml enqueue` prints.
pub fn enqueue(file: &Path, queue: &str) -> String {
    let output = cloudml(&["enqueue", &file.display().to_string(), "--queue", queue]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Writes a sweep of `count` seeds of a 64-unit network with 10 outputs on `dataset`.
pub fn write_sweep(
    directory: &Path,
    experiment: &str,
    epochs: u32,
    count: usize,
    dataset: &str,
) -> PathBuf {
    let seeds = (0..count)
        .map(|seed| seed.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"
[base]
experiment = "{experiment}"
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
epochs = {epochs}
batch_size = 8
optimizer = {{ name = "adam" }}
dataset = {dataset}
model = {{ layers = [ {{ type = "dense", units = 64, activation = "relu" }}, {{ type = "dense", units = 10, activation = "softmax" }} ] }}

[grid]
seed = [{seeds}]
"#
    );
    let path = directory.join("sweep.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub async fn sweep_runs(experiment: &str, sweep_id: &str) -> Vec<RunInfo> {
    let client = mlflow();
    let experiment_id = client.get_or_create_experiment(experiment).await.unwrap();
    client
        .search_runs_by_tag(&experiment_id, TAG_SWEEP_ID, sweep_id)
        .await
        .unwrap()
}

/// Task ids of the sweep's runs with `status`, sorted.
pub async fn task_ids_with_status(
    experiment: &str,
    sweep_id: &str,
    status: RunStatus,
) -> Vec<String> {
    let client = mlflow();
    let mut ids = Vec::new();
    for run in sweep_runs(experiment, sweep_id).await {
        if run.status != status {
            continue;
        }
        let stored = client.get_run(&run.run_id).await.unwrap();
        let tags = stored["data"]["tags"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(tag) = tags.iter().find(|tag| tag["key"] == TAG_TASK_ID) {
            ids.push(tag["value"].as_str().unwrap_or_default().to_string());
        }
    }
    ids.sort();
    ids
}

/// Polls MLflow until a run of the sweep is RUNNING, so a worker can be stopped mid-task.
pub async fn wait_for_running(experiment: &str, sweep_id: &str) {
    for _ in 0..300 {
        let runs = sweep_runs(experiment, sweep_id).await;
        if runs.iter().any(|run| run.status == RunStatus::Running) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no run of sweep {sweep_id} started within 30 s");
}
