//! `cloudml` as a user runs it: the real binary against a real MLflow server.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

use std::path::Path;
use std::process::{Command, Output};

use cloudml_shared::testing::{closed_loopback_uri, mlflow, tracking_uri, unique_experiment};
use serde_json::Value;

fn cloudml(args: &[&str], directory: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloudml"));
    command
        .args(args)
        .current_dir(directory)
        .env_remove("MLFLOW_TRACKING_URI")
        .env_remove("CLOUDML_TRACKING_URI")
        .env_remove("CLOUDML_WORKERS")
        .env("CLOUDML_TRACKING_RETRIES", "0");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run cloudml")
}

fn sweep_file(directory: &Path, experiment: &str) -> String {
    let text = format!(
        r#"
name = "cli"
repeat = 2

[base]
experiment = "{experiment}"
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
epochs = 5
batch_size = 16
validation_split = 0.2
optimizer = {{ name = "adam", learning_rate = 0.01 }}
dataset = {{ kind = "example", name = "iris" }}
model = {{ layers = [ {{ type = "dense", units = 16, activation = "relu" }}, {{ type = "dense", units = 3, activation = "softmax" }} ] }}

[grid]
"model.layers[0].units" = [8, 16]
"#
    );
    let path = directory.join("sweep.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn run_sweep_prints_table_and_finishes_runs() {
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("cli-run");
    let file = sweep_file(directory.path(), &experiment);
    let uri = tracking_uri();

    let output = cloudml(
        &["run", &file, "--workers", "2"],
        directory.path(),
        &[("MLFLOW_TRACKING_URI", &uri)],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );

    assert_eq!(stdout.matches("┆ FINISHED ┆").count(), 4, "{stdout}");
    assert!(stdout.contains("model.layers[0].units=8"), "{stdout}");
    assert!(stdout.contains("test_accuracy"), "{stdout}");
    assert!(stdout.contains("4 finished, 0 failed"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "MLflow UI for experiment \"{experiment}\": {uri}/#/experiments/"
        )),
        "{stdout}"
    );

    let client = mlflow();
    let experiment_id = client.get_or_create_experiment(&experiment).await.unwrap();
    let sweep_id = stderr
        .split_whitespace()
        .find_map(|word| {
            word.strip_prefix('(')
                .and_then(|word| word.strip_suffix("):"))
        })
        .expect("sweep id on stderr")
        .to_string();
    let runs = client
        .search_runs_by_tag(&experiment_id, "cloudml.sweep_id", &sweep_id)
        .await
        .unwrap();
    assert_eq!(runs.len(), 4);
    assert!(runs
        .iter()
        .all(|run| run.status == cloudml_shared::tracking::RunStatus::Finished));
}

#[test]
fn run_json_output_lists_tasks() {
    let directory = tempfile::tempdir().unwrap();
    let file = sweep_file(directory.path(), &unique_experiment("cli-json"));
    let uri = tracking_uri();
    let output = cloudml(
        &["run", &file, "--workers", "1", "--output", "json"],
        directory.path(),
        &[("MLFLOW_TRACKING_URI", &uri)],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let tasks = results["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 4);
    assert!(tasks.iter().all(|task| task["status"] == "FINISHED"));
    // Not a terminal: one JSON line per settled task on stderr instead of a progress bar.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("\"event\":\"finished\"").count(),
        4,
        "{stderr}"
    );
}

#[test]
fn run_with_unreachable_mlflow_fails_fast() {
    let directory = tempfile::tempdir().unwrap();
    let file = sweep_file(directory.path(), "never-created");
    let uri = closed_loopback_uri();
    let output = cloudml(
        &["run", &file, "--tracking-uri", &uri],
        directory.path(),
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("is unreachable"), "{stderr}");
    assert!(stderr.contains(&uri), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn validate_counts_tasks() {
    let directory = tempfile::tempdir().unwrap();
    let file = sweep_file(directory.path(), "validate");
    let output = cloudml(&["validate", &file], directory.path(), &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("valid, 4 tasks"), "{stdout}");
}

#[test]
fn validate_rejects_bad_files() {
    let directory = tempfile::tempdir().unwrap();
    let cases = [
        ("bad.json", "{\"experiment\": ", "invalid JSON"),
        ("bad.toml", "experiment = ", "invalid TOML"),
        (
            "layer.toml",
            "experiment = \"e\"\nloss = \"mse\"\nepochs = 1\nbatch_size = 1\ndataset = { kind = \"synthetic\" }\nmodel = { layers = [ { type = \"transformer\" } ] }\n",
            "unknown variant `transformer`",
        ),
        (
            "grid.toml",
            "[base]\nexperiment = \"e\"\nloss = \"mse\"\nepochs = 1\nbatch_size = 1\ndataset = { kind = \"synthetic\" }\nmodel = { layers = [ { type = \"dense\", units = 1 } ] }\n[grid]\nepochs = [1, 0]\n",
            "task 1 (epochs=0): invalid task: epochs = 0, expected 1 <= epochs <= 100000",
        ),
    ];
    for (name, text, expected) in cases {
        std::fs::write(directory.path().join(name), text).unwrap();
        let output = cloudml(&["validate", name], directory.path(), &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{name}: stderr lacks {expected:?}: {stderr}"
        );
    }
}

#[test]
fn settings_layer_in_order() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(
        directory.path().join("cloudml.toml"),
        "workers = 3\nthreads_per_task = 2\ndevice = \"cpu\"\n",
    )
    .unwrap();

    let from_file = cloudml(&["config"], directory.path(), &[]);
    let text = String::from_utf8_lossy(&from_file.stdout);
    assert!(text.contains("workers = 3"), "{text}");
    assert!(text.contains("threads_per_task = 2"), "{text}");
    assert!(
        text.contains("tracking_uri = \"http://127.0.0.1:5000\""),
        "{text}"
    );

    let from_env = cloudml(
        &["config"],
        directory.path(),
        &[
            ("CLOUDML_WORKERS", "5"),
            ("MLFLOW_TRACKING_URI", "http://127.0.0.1:7000"),
        ],
    );
    let text = String::from_utf8_lossy(&from_env.stdout);
    assert!(text.contains("workers = 5"), "{text}");
    assert!(
        text.contains("tracking_uri = \"http://127.0.0.1:7000\""),
        "{text}"
    );

    let from_flag = cloudml(
        &["config", "--tracking-uri", "http://127.0.0.1:7001"],
        directory.path(),
        &[("MLFLOW_TRACKING_URI", "http://127.0.0.1:7000")],
    );
    let text = String::from_utf8_lossy(&from_flag.stdout);
    assert!(
        text.contains("tracking_uri = \"http://127.0.0.1:7001\""),
        "{text}"
    );

    std::fs::write(directory.path().join("typo.toml"), "wrokers = 2\n").unwrap();
    let typo = cloudml(&["config", "--config", "typo.toml"], directory.path(), &[]);
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert_eq!(typo.status.code(), Some(2));
    assert!(stderr.contains("unknown setting \"wrokers\""), "{stderr}");

    let invalid = cloudml(&["config"], directory.path(), &[("CLOUDML_WORKERS", "0")]);
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert_eq!(invalid.status.code(), Some(2));
    assert!(
        stderr.contains("workers = 0, expected 1 to 1024"),
        "{stderr}"
    );
}
