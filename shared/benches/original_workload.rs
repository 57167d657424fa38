//! Benchmark of the original workload (1000x20 synthetic data, Dense 64-64-1 with dropout, RMSprop,
//! 3 epochs, batch 128) in a warm worker: data generation, training and model serialisation, then,
//! when `CLOUDML_BENCH_TRACKING_URI` is set, the whole task including its MLflow run.
//!
//! Run it through `scripts/bench.sh`, which starts MLflow and also measures cold starts.

use std::time::{Duration, Instant};

use cloudml_shared::data;
use cloudml_shared::execute::{DeliveryContext, Executor};
use cloudml_shared::original::OriginalPayload;
use cloudml_shared::task::Task;
use cloudml_shared::tracking::{Auth, MlflowClient, TrackingConfig};
use cloudml_shared::train::{self, TrainOptions};

const WARMUP: usize = 5;
const TRAIN_ITERATIONS: usize = 100;
const TASK_ITERATIONS: usize = 30;

fn original_task(id: &str) -> Task {
    let payload = serde_json::json!({
        "layers": [["Dense", 64, "relu", 20], ["Dropout", 0.5], ["Dense", 64, "relu"], ["Dropout", 0.5], ["Dense", 1, "sigmoid"]],
        "epochs": 3, "batch_size": 128, "experiment_name": "cloudml-bench",
    });
    OriginalPayload::from_value(payload)
        .and_then(|payload| payload.into_task(id))
        .expect("the original payload is valid")
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let millis = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let mean = samples.iter().map(|sample| millis(*sample)).sum::<f64>() / samples.len() as f64;
    let percentile =
        |fraction: f64| millis(samples[((samples.len() - 1) as f64 * fraction).round() as usize]);
    println!(
        "{label}: n={} mean={mean:.1} ms p50={:.1} ms p95={:.1} ms max={:.1} ms",
        samples.len(),
        percentile(0.5),
        percentile(0.95),
        percentile(1.0)
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let options = TrainOptions {
        threads: 1,
        device: tch::Device::Cpu,
    };

    let mut samples = Vec::new();
    for iteration in 0..WARMUP + TRAIN_ITERATIONS {
        let task = original_task(&format!("bench-{iteration}"));
        let started = Instant::now();
        let dataset = runtime
            .block_on(data::load(
                &task.dataset,
                task.normalization,
                task.loss,
                task.seed,
            ))
            .expect("synthetic data");
        train::train(&task, &dataset, &options, &mut |_| {}).expect("training");
        if iteration >= WARMUP {
            samples.push(started.elapsed());
        }
    }
    report(
        "warm worker, data + train + model file (no MLflow)",
        samples,
    );

    let Ok(uri) = std::env::var("CLOUDML_BENCH_TRACKING_URI") else {
        println!("CLOUDML_BENCH_TRACKING_URI not set: skipping the measurement with MLflow");
        return;
    };
    let client = MlflowClient::new(&TrackingConfig {
        uri,
        auth: Auth::None,
        retries: 3,
    })
    .expect("tracking URI");
    let executor = Executor::new(client, options, "bench");
    let mut samples = Vec::new();
    for iteration in 0..WARMUP + TASK_ITERATIONS {
        let task = original_task(&uuid::Uuid::now_v7().to_string());
        let started = Instant::now();
        runtime
            .block_on(executor.execute(&task, &DeliveryContext::default()))
            .expect("task");
        if iteration >= WARMUP {
            samples.push(started.elapsed());
        }
    }
    report("warm worker, whole task to a FINISHED MLflow run", samples);
}
