//! `cloudml-worker once` as a user runs it: the real binary, a real MLflow server, real libtorch.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use cloudml_shared::testing::{closed_loopback_uri, mlflow, tracking_uri, unique_experiment};
use cloudml_shared::tracking::RunInfo;
use serde_json::{json, Value};

const ORIGINAL_PAYLOAD: &str = r#"{"layers": [["Dense", 64, "relu", 20], ["Dropout", 0.5], ["Dense", 64, "relu"], ["Dropout", 0.5], ["Dense", 1, "sigmoid"]], "epochs": 3, "batch_size": 128, "experiment_name": "EXPERIMENT", "master_ip": "http://10.1.2.3:5000/"}"#;

/// Runs `cloudml-worker once -` with `input` on stdin against `uri`.
fn run_once(input: &str, uri: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudml-worker"))
        .args(["--log-format", "json", "once", "-"])
        .env("MLFLOW_TRACKING_URI", uri)
        .env("CLOUDML_TRACKING_RETRIES", "0")
        .env_remove("CLOUDML_TRACKING_URI")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cloudml-worker");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for cloudml-worker")
}

fn tag(run: &Value, key: &str) -> Option<String> {
    run["data"]["tags"]
        .as_array()?
        .iter()
        .find(|item| item["key"] == key)
        .and_then(|item| item["value"].as_str().map(str::to_string))
}

fn param(run: &Value, key: &str) -> Option<String> {
    run["data"]["params"]
        .as_array()?
        .iter()
        .find(|item| item["key"] == key)
        .and_then(|item| item["value"].as_str().map(str::to_string))
}

fn summary(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("stdout is one JSON summary")
}

#[tokio::test]
async fn original_payload_trains_unchanged() {
    let experiment = unique_experiment("original");
    let output = run_once(
        &ORIGINAL_PAYLOAD.replace("EXPERIMENT", &experiment),
        &tracking_uri(),
    );
    let summary = summary(&output);

    let client = mlflow();
    let run_id = summary["run_id"].as_str().expect("run id");
    let run = client.get_run(run_id).await.unwrap();
    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(summary["status"], "FINISHED");
    assert_eq!(param(&run, "layer_0").as_deref(), Some("Dense(64, relu)"));
    assert_eq!(param(&run, "layer_1").as_deref(), Some("Dropout(0.5)"));
    assert_eq!(param(&run, "layer_4").as_deref(), Some("Dense(1, sigmoid)"));
    assert_eq!(param(&run, "epochs").as_deref(), Some("3"));
    assert_eq!(param(&run, "batch_size").as_deref(), Some("128"));
    assert_eq!(param(&run, "data.train_rows").as_deref(), Some("1000"));
    assert_eq!(param(&run, "data.test_rows").as_deref(), Some("100"));
    assert_eq!(tag(&run, "payload_format").as_deref(), Some("original"));
    assert_eq!(tag(&run, "cloudml.worker_runtime").as_deref(), Some("once"));

    let history = client.metric_history(run_id, "accuracy").await.unwrap();
    let steps: Vec<i64> = history.iter().map(|point| point.step).collect();
    assert_eq!(steps, vec![0, 1, 2]);
    let accuracy = summary["metrics"]["test_accuracy"]
        .as_f64()
        .expect("test accuracy");
    assert!((0.0..=1.0).contains(&accuracy), "{accuracy}");

    let info: RunInfo = serde_json::from_value(run["info"].clone()).unwrap();
    let files = client.list_artifacts(&info, "model").await.unwrap();
    let names: Vec<&str> = files
        .iter()
        .filter_map(|file| file["path"].as_str())
        .collect();
    assert!(names.contains(&"model.safetensors"), "{names:?}");
    assert!(names.contains(&"model.json"), "{names:?}");
}

#[tokio::test]
async fn original_payload_numeric_strings() {
    let experiment = unique_experiment("strings");
    let payload = json!({
        "layers": [["Dense", "32", "relu", "20"], ["Dropout", "0.25"], ["Dense", "1", "sigmoid"]],
        "epochs": "2", "batch_size": "64", "experiment_name": experiment,
    });
    let summary = summary(&run_once(&payload.to_string(), &tracking_uri()));
    let run = mlflow()
        .get_run(summary["run_id"].as_str().expect("run id"))
        .await
        .unwrap();
    assert_eq!(param(&run, "batch_size").as_deref(), Some("64"));
    assert_eq!(param(&run, "layer_1").as_deref(), Some("Dropout(0.25)"));
}

fn task_json(experiment: &str, layers: Value, dataset: Value) -> String {
    json!({
        "schema_version": 1,
        "id": unique_experiment("task"),
        "experiment": experiment,
        "model": {"layers": layers},
        "loss": "sparse_categorical_crossentropy",
        "epochs": 1,
        "batch_size": 8,
        "dataset": dataset,
    })
    .to_string()
}

fn iris_layers() -> Value {
    json!([{"type": "dense", "units": 8, "activation": "relu"}, {"type": "dense", "units": 3, "activation": "softmax"}])
}

/// Asserts a clean failure: non-zero exit, the expected text on stderr, no panic.
fn assert_rejected(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "succeeded; stderr: {stderr}");
    assert!(
        stderr.contains(expected),
        "stderr lacks {expected:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

#[test]
fn bad_input_rejected_clearly() {
    let uri = tracking_uri();
    let iris = json!({"kind": "example", "name": "iris"});
    let cases = [
        (
            "malformed JSON",
            r#"{"layers": [["Dense", 1"#.to_string(),
            "invalid JSON",
        ),
        (
            "unknown layer",
            task_json("e", json!([{"type": "conv9", "units": 3}]), iris.clone()),
            "model.layers[0]",
        ),
        (
            "zero units",
            task_json(
                "e",
                json!([{"type": "dense", "units": 0}, {"type": "dense", "units": 3, "activation": "softmax"}]),
                iris.clone(),
            ),
            "model.layers[0].units = 0, expected 1 <= units <= 65536",
        ),
        (
            "dropout 1.5",
            task_json(
                "e",
                json!([{"type": "dropout", "rate": 1.5}, {"type": "dense", "units": 3, "activation": "softmax"}]),
                iris.clone(),
            ),
            "model.layers[0].rate = 1.5, expected 0 <= rate < 1",
        ),
        (
            "wrong type",
            task_json(
                "e",
                json!([{"type": "dense", "units": "many"}]),
                iris.clone(),
            ),
            "model.layers[0]: units: invalid type: string \"many\", expected u32",
        ),
        (
            "original unknown layer",
            r#"{"layers": [["LSTM", 4]], "epochs": 1, "batch_size": 1, "experiment_name": "e"}"#
                .to_string(),
            "layers[0][0] = \"LSTM\"",
        ),
    ];
    for (name, input, expected) in cases {
        let output = run_once(&input, &uri);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{name}: succeeded; stderr: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{name}: stderr lacks {expected:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: panic: {stderr}");
    }
}

#[test]
fn bad_csv_fails_run_clearly() {
    let uri = tracking_uri();
    let directory = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = directory.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let cases = [
        (
            "missing label column",
            json!({"kind": "csv", "source": write("a.csv", "a,b\n1,0\n2,1\n3,2\n"), "label": "target"}),
            "label column \"target\" not found; columns are: a, b",
        ),
        (
            "non-numeric cell",
            json!({"kind": "csv", "source": write("b.csv", "a,target\n1,0\nhigh,1\n"), "label": "target"}),
            "line 3, column \"a\": \"high\" is not a number",
        ),
        (
            "empty CSV",
            json!({"kind": "csv", "source": write("c.csv", "")}),
            "empty file",
        ),
        (
            "missing file",
            json!({"kind": "csv", "source": directory.path().join("absent.csv").display().to_string()}),
            "cannot read dataset",
        ),
    ];
    for (name, dataset, expected) in cases {
        let output = run_once(
            &task_json(&unique_experiment("csv"), iris_layers(), dataset),
            &uri,
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: succeeded");
        assert!(
            stderr.contains(expected),
            "{name}: stderr lacks {expected:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: panic: {stderr}");
    }
}

#[test]
fn unreachable_mlflow_rejected_clearly() {
    let input = task_json(
        "e",
        iris_layers(),
        json!({"kind": "example", "name": "iris"}),
    );
    let output = run_once(&input, &closed_loopback_uri());
    assert_rejected(&output, "is unreachable");
}

#[tokio::test]
async fn csv_from_file_url_trains() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("iris.csv");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/data/iris.csv"),
        &path,
    )
    .unwrap();
    let dataset =
        json!({"kind": "csv", "source": format!("file://{}", path.display()), "label": "target"});
    let summary = summary(&run_once(
        &task_json(&unique_experiment("file-url"), iris_layers(), dataset),
        &tracking_uri(),
    ));
    assert_eq!(summary["status"], "FINISHED");
}

#[tokio::test]
async fn csv_from_http_url_trains() {
    // A loopback HTTP server of Python's standard library serves the file.
    let directory = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/data/wine.csv"),
        directory.path().join("wine.csv"),
    )
    .unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(directory.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python3 http.server");
    let url = format!("http://127.0.0.1:{port}/wine.csv");
    let mut ready = false;
    for _ in 0..50 {
        if reqwest::get(&url)
            .await
            .is_ok_and(|response| response.status().is_success())
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "http.server did not start");

    let dataset = json!({"kind": "csv", "source": url});
    let output = run_once(
        &task_json(&unique_experiment("http-url"), iris_layers(), dataset),
        &tracking_uri(),
    );
    let _ = server.kill();
    let _ = server.wait();
    let summary = summary(&output);
    let run = mlflow()
        .get_run(summary["run_id"].as_str().expect("run id"))
        .await
        .unwrap();
    assert_eq!(param(&run, "data.features").as_deref(), Some("13"));
}
