//! `cloudml invoke`: N concurrent direct invocations of the worker's Lambda function, as the
//! original's fan-out experiment ran them.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_lambda::primitives::Blob;
use cloudml_shared::error::error_chain;
use cloudml_shared::sweep::Sweep;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde_json::Value;

/// One invocation's outcome.
struct Invocation {
    index: usize,
    duration: Duration,
    result: Result<Value, String>,
}

pub async fn invoke(
    file: &Path,
    function: &str,
    concurrency: usize,
    original_format: bool,
    endpoint_url: Option<&str>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=1000).contains(&concurrency),
        "concurrency = {concurrency}, expected 1 to 1000"
    );
    let payloads = payloads(file, concurrency, original_format)?;

    let shared = aws_config::load_from_env().await;
    let mut builder = aws_sdk_lambda::config::Builder::from(&shared);
    if let Some(endpoint) = endpoint_url {
        builder = builder.endpoint_url(endpoint);
    }
    let client = aws_sdk_lambda::Client::from_conf(builder.build());

    let started = Instant::now();
    let calls = payloads.into_iter().enumerate().map(|(index, payload)| {
        let client = client.clone();
        let function = function.to_string();
        tokio::spawn(async move {
            let call_started = Instant::now();
            let response = client
                .invoke()
                .function_name(function)
                .payload(Blob::new(payload))
                .send()
                .await;
            let result = match response {
                Ok(output) => {
                    let body = output
                        .payload()
                        .map(|blob| blob.as_ref().to_vec())
                        .unwrap_or_default();
                    let value: Value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&body).into_owned())
                    });
                    match output.function_error() {
                        Some(kind) => Err(format!(
                            "{kind}: {}",
                            value.get("errorMessage").unwrap_or(&value)
                        )),
                        None => Ok(value),
                    }
                }
                Err(err) => Err(error_chain(&err)),
            };
            Invocation {
                index,
                duration: call_started.elapsed(),
                result,
            }
        })
    });
    let mut invocations = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        invocations.push(call.await.context("invocation task stopped unexpectedly")?);
    }
    let total = started.elapsed();

    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "#",
        "seconds",
        "result",
        "run id",
        "test metrics or error",
    ]);
    let mut failed = 0;
    for invocation in &invocations {
        let seconds = format!("{:.3}", invocation.duration.as_secs_f64());
        match &invocation.result {
            Ok(summary) => table.add_row(vec![
                invocation.index.to_string(),
                seconds,
                summary["status"].as_str().unwrap_or("?").to_string(),
                summary["run_id"].as_str().unwrap_or("").to_string(),
                summary["metrics"].to_string(),
            ]),
            Err(error) => {
                failed += 1;
                table.add_row(vec![
                    invocation.index.to_string(),
                    seconds,
                    "ERROR".into(),
                    String::new(),
                    error.clone(),
                ])
            }
        };
    }
    println!("{table}");
    println!(
        "{} invocation{} of {function} in {:.3} s wall time, {failed} failed",
        invocations.len(),
        if invocations.len() == 1 { "" } else { "s" },
        total.as_secs_f64()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Builds the request bodies: the original payload sent unchanged, or one task message per
/// invocation, each with its own id so every invocation trains and records its own run.
fn payloads(
    file: &Path,
    concurrency: usize,
    original_format: bool,
) -> anyhow::Result<Vec<Vec<u8>>> {
    if original_format {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        anyhow::ensure!(
            cloudml_shared::original::is_original_payload(&value),
            "{} is not an original payload (a JSON object with a layers array)",
            file.display()
        );
        return Ok(vec![text.into_bytes(); concurrency]);
    }
    let sweep = Sweep::from_file(file)?;
    let [expanded] = sweep.tasks.as_slice() else {
        anyhow::bail!(
            "{} expands to {} tasks; invoke sends one task, use `cloudml enqueue` for sweeps",
            file.display(),
            sweep.tasks.len()
        );
    };
    (0..concurrency)
        .map(|_| {
            let mut task = expanded.task.clone();
            task.id = uuid::Uuid::now_v7().to_string();
            task.tags.remove("mlflow.runName");
            Ok(task.to_message()?)
        })
        .collect()
}
