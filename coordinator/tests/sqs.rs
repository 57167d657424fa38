//! Worker fleets on SQS, emulated by moto on loopback (scripts/test.sh starts it and sets
//! AWS_ENDPOINT_URL and dummy credentials): `cloudml enqueue`, `status`, `dlq` and
//! `cloudml-worker run` processes against a real MLflow server.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use cloudml_shared::execute::TAG_ERROR;
use cloudml_shared::testing::{create_sqs_fifo_queue, create_sqs_queue, mlflow, unique_experiment};
use cloudml_shared::tracking::RunStatus;
use common::{
    cloudml, enqueue, start_worker, sweep_runs, task_ids_with_status, unique_suffix,
    wait_for_running, write_sweep, DIGITS,
};

fn queue_name(test: &str) -> String {
    format!("cloudml-{test}-{}", unique_suffix())
}

fn status_line(queue: &str, label: &str) -> u64 {
    let output = cloudml(&["status", "--queue", queue]);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} line in: {stdout}"))
}

#[tokio::test]
async fn sweep_through_two_workers() {
    let name = queue_name("sweep");
    create_sqs_queue(&name, 30, 3).await;
    let queue = format!("sqs://{name}");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("sqs-sweep");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 2, 12, DIGITS),
        &queue,
    );
    assert_eq!(status_line(&queue, "visible:"), 12);

    let workers: Vec<Child> = (0..2)
        .map(|_| start_worker(&queue, &["--concurrency", "2", "--exit-when-idle", "3"]))
        .collect();
    for worker in workers {
        let output = worker.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let finished = task_ids_with_status(&experiment, &sweep_id, RunStatus::Finished).await;
    let mut distinct = finished.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 12, "{finished:?}");
    assert_eq!(
        finished.len(),
        12,
        "a task has two FINISHED runs: {finished:?}"
    );
    assert_eq!(status_line(&queue, "visible:"), 0);
    assert_eq!(status_line(&queue, "in flight:"), 0);
}

#[tokio::test]
async fn fifo_queue_sweep() {
    let name = queue_name("fifo");
    // FIFO queues need a message group id and a deduplication id; enqueue derives both from the task id.
    let url = create_sqs_fifo_queue(&name).await;
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("sqs-fifo");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 2, 4, DIGITS),
        &url,
    );

    let worker = start_worker(&url, &["--concurrency", "2", "--exit-when-idle", "3"])
        .wait_with_output()
        .unwrap();
    assert!(
        worker.status.success(),
        "{}",
        String::from_utf8_lossy(&worker.stderr)
    );

    let finished = task_ids_with_status(&experiment, &sweep_id, RunStatus::Finished).await;
    let mut distinct = finished.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{finished:?}");
    assert_eq!(finished.len(), 4, "{finished:?}");
}

#[tokio::test]
async fn killed_worker_task_is_redelivered() {
    let name = queue_name("kill");
    // A short visibility timeout so the killed worker's message returns quickly.
    create_sqs_queue(&name, 2, 5).await;
    let queue = format!("sqs://{name}");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("sqs-kill");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 40, 1, DIGITS),
        &queue,
    );

    let mut first = start_worker(&queue, &[]);
    wait_for_running(&experiment, &sweep_id).await;
    first.kill().unwrap();
    let _ = first.wait();

    let second = start_worker(&queue, &["--exit-when-idle", "5"])
        .wait_with_output()
        .unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    let runs = sweep_runs(&experiment, &sweep_id).await;
    let count = |status| runs.iter().filter(|run| run.status == status).count();
    assert_eq!(count(RunStatus::Finished), 1, "{runs:?}");
    assert_eq!(count(RunStatus::Killed), 1, "{runs:?}");
    assert_eq!(count(RunStatus::Running), 0, "{runs:?}");
}

#[tokio::test]
async fn sigterm_releases_message_after_grace() {
    let name = queue_name("sigterm");
    create_sqs_queue(&name, 60, 5).await;
    let queue = format!("sqs://{name}");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("sqs-sigterm");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 2000, 1, DIGITS),
        &queue,
    );

    let worker = start_worker(&queue, &["--shutdown-grace", "1"]);
    wait_for_running(&experiment, &sweep_id).await;

    let signalled = std::time::Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = worker.wait_with_output().unwrap();
    let waited = signalled.elapsed();

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("releasing in-flight messages"), "{stderr}");
    // The task trains for far longer than this; the worker must not wait for it.
    assert!(
        waited < Duration::from_secs(15),
        "worker took {waited:?} to stop"
    );
    assert_eq!(
        status_line(&queue, "visible:"),
        1,
        "the message is back in the queue at once"
    );
}

#[tokio::test]
async fn heartbeat_keeps_long_task_invisible() {
    let name = queue_name("heartbeat");
    // A 2 s visibility timeout and a task that trains for several seconds: without the heartbeat
    // the second worker would receive the message mid-training and train it again.
    create_sqs_queue(&name, 2, 5).await;
    let queue = format!("sqs://{name}");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("sqs-heartbeat");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 200, 1, DIGITS),
        &queue,
    );

    let workers: Vec<Child> = (0..2)
        .map(|_| start_worker(&queue, &["--exit-when-idle", "4"]))
        .collect();
    for worker in workers {
        let output = worker.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let runs = sweep_runs(&experiment, &sweep_id).await;
    assert_eq!(
        runs.len(),
        1,
        "the task was trained more than once: {runs:?}"
    );
    assert_eq!(runs[0].status, RunStatus::Finished);
    let train_seconds = mlflow().get_run(&runs[0].run_id).await.unwrap()["data"]["metrics"]
        .as_array()
        .and_then(|metrics| {
            metrics
                .iter()
                .find(|metric| metric["key"] == "train_seconds")
                .cloned()
        })
        .and_then(|metric| metric["value"].as_f64())
        .unwrap_or(0.0);
    assert!(
        train_seconds > 2.0,
        "the task must outlast the visibility timeout, trained {train_seconds} s"
    );
}

#[tokio::test]
async fn failures_reach_dead_letter_queue() {
    let name = queue_name("dlq");
    let (url, _) = create_sqs_queue(&name, 30, 2).await;
    let queue = format!("sqs://{name}");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("sqs-dlq");
    let missing = directory.path().join("missing.csv").display().to_string();
    let failing = write_sweep(
        directory.path(),
        &experiment,
        1,
        1,
        &format!("{{ kind = \"csv\", source = {missing:?} }}"),
    );
    let sweep_id = enqueue(&failing, &queue);

    let client = cloudml_shared::queue::sqs::client(None).await;
    client
        .send_message()
        .queue_url(&url)
        .message_body("{not json")
        .send()
        .await
        .unwrap();

    let worker = start_worker(&queue, &["--exit-when-idle", "3"])
        .wait_with_output()
        .unwrap();
    assert!(
        !worker.status.success(),
        "failures make the worker exit non-zero"
    );
    let stderr = String::from_utf8_lossy(&worker.stderr);
    assert!(stderr.contains("message rejected"), "{stderr}");

    assert_eq!(status_line(&queue, "dead-lettered:"), 2);
    assert_eq!(status_line(&queue, "visible:"), 0);

    let shown = cloudml(&["dlq", "show", "--queue", &queue]);
    let listing = String::from_utf8_lossy(&shown.stdout);
    assert!(listing.contains("{not json"), "{listing}");
    assert!(
        listing.contains(&sweep_id),
        "the failed task is listed: {listing}"
    );

    // The failing task's runs are FAILED with the error recorded, one per receive.
    let client = mlflow();
    let runs = sweep_runs(&experiment, &sweep_id).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    for run in &runs {
        assert_eq!(run.status, RunStatus::Failed);
        let stored = client.get_run(&run.run_id).await.unwrap();
        let tags = stored["data"]["tags"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let error = tags
            .iter()
            .find(|tag| tag["key"] == TAG_ERROR)
            .and_then(|tag| tag["value"].as_str())
            .unwrap_or_default()
            .to_string();
        assert!(error.contains("cannot read dataset"), "{error}");
    }

    let redriven = cloudml(&["dlq", "redrive", "--queue", &queue]);
    assert!(
        redriven.status.success(),
        "{}",
        String::from_utf8_lossy(&redriven.stderr)
    );
    assert_eq!(status_line(&queue, "dead-lettered:"), 0);
    assert_eq!(status_line(&queue, "visible:"), 2);
}

#[test]
fn oversized_message_rejected_before_sending() {
    let directory = tempfile::tempdir().unwrap();
    let tags: Vec<String> = (0..60)
        .map(|index| format!("tag{index} = \"{}\"", "x".repeat(5000)))
        .collect();
    let text = format!(
        "experiment = \"e\"\nloss = \"mse\"\nepochs = 1\nbatch_size = 1\ndataset = {{ kind = \"synthetic\" }}\nmodel = {{ layers = [ {{ type = \"dense\", units = 1 }} ] }}\n[tags]\n{}\n",
        tags.join("\n")
    );
    let path = directory.path().join("big.toml");
    std::fs::write(&path, text).unwrap();
    // The queue does not exist: the size check must fail first, before any request.
    let output = cloudml(&[
        "enqueue",
        &path.display().to_string(),
        "--queue",
        "sqs://never-created",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("expected at most 262144 bytes"), "{stderr}");
}
