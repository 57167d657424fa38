//! Lambda mode under cargo-lambda's emulator (scripts/test.sh starts it, with release
//! `cloudml-worker` processes serving the function `_`): direct invocations through `cloudml
//! invoke`, and SQS event batches with partial batch failures.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::process::{Command, Output};

use cloudml_shared::testing::{mlflow, tracking_uri, unique_experiment};
use serde_json::{json, Value};

/// Name cargo-lambda gives the function whose processes it does not start itself.
const FUNCTION: &str = "_";

fn endpoint() -> String {
    std::env::var("CLOUDML_TEST_LAMBDA_ENDPOINT").unwrap_or_else(|_| {
        panic!("CLOUDML_TEST_LAMBDA_ENDPOINT is not set: run scripts/test.sh, which starts the Lambda emulator")
    })
}

fn invoke(args: &[&str]) -> Output {
    let endpoint = endpoint();
    Command::new(env!("CARGO_BIN_EXE_cloudml"))
        .arg("invoke")
        .args(args)
        .args(["--function", FUNCTION, "--endpoint-url", &endpoint])
        .env("MLFLOW_TRACKING_URI", tracking_uri())
        .output()
        .expect("run cloudml invoke")
}

fn run_ids(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|line| line.contains("FINISHED"))
        .filter_map(|line| line.split('┆').nth(3).map(|cell| cell.trim().to_string()))
        .collect()
}

#[tokio::test]
async fn direct_invoke_original_payload() {
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("lambda-original");
    let payload = json!({
        "layers": [["Dense", 64, "relu", 20], ["Dropout", 0.5], ["Dense", 64, "relu"], ["Dropout", 0.5], ["Dense", 1, "sigmoid"]],
        "epochs": 3, "batch_size": 128, "experiment_name": experiment, "master_ip": "http://127.0.0.1:1/"
    });
    let file = directory.path().join("original.json");
    std::fs::write(&file, payload.to_string()).unwrap();

    let output = invoke(&[&file.display().to_string(), "--payload-format", "original"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ids = run_ids(&stdout);
    assert_eq!(ids.len(), 1, "{stdout}");
    assert!(stdout.contains("test_accuracy"), "{stdout}");

    let run = mlflow().get_run(&ids[0]).await.unwrap();
    assert_eq!(run["info"]["status"], "FINISHED");
    let tags = run["data"]["tags"].as_array().cloned().unwrap_or_default();
    let runtime = tags
        .iter()
        .find(|tag| tag["key"] == "cloudml.worker_runtime");
    assert_eq!(
        runtime.and_then(|tag| tag["value"].as_str()),
        Some("lambda")
    );
}

#[tokio::test]
async fn invoke_concurrency_eight() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("task.toml");
    std::fs::write(
        &file,
        format!(
            "experiment = \"{}\"\nloss = \"sparse_categorical_crossentropy\"\nmetrics = [\"accuracy\"]\nepochs = 3\nbatch_size = 16\ndataset = {{ kind = \"example\", name = \"iris\" }}\nmodel = {{ layers = [ {{ type = \"dense\", units = 8, activation = \"relu\" }}, {{ type = \"dense\", units = 3, activation = \"softmax\" }} ] }}\n",
            unique_experiment("lambda-fanout")
        ),
    )
    .unwrap();

    let output = invoke(&[&file.display().to_string(), "--concurrency", "8"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut ids = run_ids(&stdout);
    assert_eq!(ids.len(), 8, "{stdout}");
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        8,
        "each invocation records its own run: {stdout}"
    );
    assert!(stdout.contains("8 invocations of _ in"), "{stdout}");
    assert!(stdout.contains("0 failed"), "{stdout}");
}

#[test]
fn invalid_task_reported_as_error() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("bad.json");
    std::fs::write(&file, r#"{"layers": [["Dense", 0, "relu", 20]], "epochs": 1, "batch_size": 1, "experiment_name": "e"}"#).unwrap();
    let output = invoke(&[&file.display().to_string(), "--payload-format", "original"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("ERROR"), "{stdout}");
    assert!(stdout.contains("layers[0][1]"), "{stdout}");
}

fn sqs_record(message_id: &str, body: &str) -> Value {
    json!({
        "messageId": message_id,
        "receiptHandle": format!("receipt-{message_id}"),
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1700000000000"},
        "messageAttributes": {},
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:tasks",
        "awsRegion": "us-east-1"
    })
}

#[tokio::test]
async fn sqs_batch_names_failed_record() {
    let experiment = unique_experiment("lambda-batch");
    let task = |seed: u32| {
        json!({
            "schema_version": 1,
            "id": unique_experiment("task"),
            "experiment": experiment,
            "loss": "sparse_categorical_crossentropy",
            "epochs": 2,
            "batch_size": 16,
            "seed": seed,
            "dataset": {"kind": "example", "name": "iris"},
            "model": {"layers": [{"type": "dense", "units": 8, "activation": "relu"}, {"type": "dense", "units": 3, "activation": "softmax"}]}
        })
        .to_string()
    };
    let event = json!({"Records": [
        sqs_record("good-1", &task(1)),
        sqs_record("bad-1", "{\"schema_version\": 1, \"id\": \"x\""),
        sqs_record("good-2", &task(2)),
    ]});

    let url = format!("{}/2015-03-31/functions/{FUNCTION}/invocations", endpoint());
    let response: Value = reqwest::Client::new()
        .post(url)
        .json(&event)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    assert_eq!(
        response,
        json!({"batchItemFailures": [{"itemIdentifier": "bad-1"}]})
    );
    let client = mlflow();
    let experiment_id = client.get_or_create_experiment(&experiment).await.unwrap();
    let finished = client
        .search_runs_by_tag(&experiment_id, "cloudml.message_id", "good-2")
        .await
        .unwrap();
    assert_eq!(finished.len(), 1);
}
