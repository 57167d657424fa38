//! Worker fleets on the local RabbitMQ (127.0.0.1:5672, guest/guest): `cloudml enqueue` and
//! `cloudml-worker run` processes, a real MLflow server, a unique queue per test.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose.

mod common;

use std::process::{Child, Command, Output};
use std::time::Duration;

use cloudml_shared::queue::amqp::{self, AmqpAddress, Outgoing, Topology};
use cloudml_shared::testing::unique_experiment;
use cloudml_shared::tracking::RunStatus;
use common::{
    enqueue, start_worker, sweep_runs, task_ids_with_status, unique_suffix, wait_for_running,
    write_sweep, DIGITS,
};

/// Deletes the test's queue, DLQ and exchange when the test ends, pass or fail.
struct TestQueue {
    url: String,
    address: AmqpAddress,
}

impl TestQueue {
    fn new(test: &str) -> Self {
        let url = format!(
            "amqp://guest:guest@127.0.0.1:5672/%2f/cloudml-test-{test}-{}",
            unique_suffix()
        );
        let address = AmqpAddress::parse(&url).unwrap();
        TestQueue { url, address }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let address = self.address.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(amqp::delete_topology(&address))
        });
        if let Ok(Err(err)) = cleanup.join() {
            eprintln!("cleanup of {} failed: {err}", self.url);
        }
    }
}

fn finish(child: Child) -> Output {
    child.wait_with_output().expect("wait for worker")
}

#[tokio::test]
async fn sweep_through_two_workers() {
    let queue = TestQueue::new("sweep");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("amqp-sweep");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 2, 8, DIGITS),
        &queue.url,
    );

    let workers: Vec<Child> = (0..2)
        .map(|_| start_worker(&queue.url, &["--concurrency", "2", "--exit-when-idle", "3"]))
        .collect();
    for worker in workers {
        let output = finish(worker);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let finished = task_ids_with_status(&experiment, &sweep_id, RunStatus::Finished).await;
    assert_eq!(finished.len(), 8, "{finished:?}");
    let mut distinct = finished.clone();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        8,
        "a task has two FINISHED runs: {finished:?}"
    );
    let depth = amqp::depth(&queue.address).await.unwrap();
    assert_eq!(depth.ready, 0);
    assert_eq!(depth.dead_lettered, 0);
}

#[tokio::test]
async fn killed_worker_task_is_redelivered() {
    let queue = TestQueue::new("kill");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("amqp-kill");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 40, 1, DIGITS),
        &queue.url,
    );

    let mut first = start_worker(&queue.url, &[]);
    wait_for_running(&experiment, &sweep_id).await;
    first.kill().unwrap();
    let _ = first.wait();

    let second = finish(start_worker(&queue.url, &["--exit-when-idle", "3"]));
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

/// Connection names RabbitMQ lists for the worker process `pid`.
fn connections_of(pid: u32) -> Vec<String> {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "--no-table-headers",
            "--quiet",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains(&format!("pid {pid}\"")))
        .filter_map(|line| line.split_whitespace().next().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn worker_reconnects_after_broker_closes_connection() {
    let queue = TestQueue::new("reconnect");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("amqp-reconnect");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 10, 6, DIGITS),
        &queue.url,
    );

    let worker = start_worker(&queue.url, &["--exit-when-idle", "4"]);
    wait_for_running(&experiment, &sweep_id).await;
    let connections = connections_of(worker.id());
    assert_eq!(
        connections.len(),
        1,
        "connections of the worker: {connections:?}"
    );
    let closed = Command::new("rabbitmqctl")
        .args([
            "close_connection",
            &connections[0],
            "closed by the reconnect test",
        ])
        .output()
        .expect("run rabbitmqctl close_connection");
    assert!(
        closed.status.success(),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );

    let output = finish(worker);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("reconnected"), "{stderr}");
    let finished = task_ids_with_status(&experiment, &sweep_id, RunStatus::Finished).await;
    let mut distinct = finished.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 6, "{finished:?}");
    assert_eq!(
        finished.len(),
        6,
        "a task has two FINISHED runs: {finished:?}"
    );
}

#[tokio::test]
async fn status_reports_unacknowledged() {
    let queue = TestQueue::new("status");
    let directory = tempfile::tempdir().unwrap();
    let experiment = unique_experiment("amqp-status");
    let sweep_id = enqueue(
        &write_sweep(directory.path(), &experiment, 800, 2, DIGITS),
        &queue.url,
    );

    let mut worker = start_worker(&queue.url, &[]);
    wait_for_running(&experiment, &sweep_id).await;
    // The management API refreshes its statistics every 5 s (RabbitMQ's default), so poll.
    let mut stdout = String::new();
    for _ in 0..20 {
        let output = Command::new(env!("CARGO_BIN_EXE_cloudml"))
            .args(["status", "--queue", &queue.url])
            .output()
            .expect("run cloudml status");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout = String::from_utf8_lossy(&output.stdout).to_string();
        if stdout.contains("unacknowledged: 1") {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    worker.kill().unwrap();
    let _ = worker.wait();

    assert!(stdout.contains("ready:          1"), "{stdout}");
    assert!(stdout.contains("unacknowledged: 1"), "{stdout}");
    assert!(stdout.contains("consumers:      1"), "{stdout}");
    assert!(stdout.contains("dead-lettered:  0"), "{stdout}");
}

#[tokio::test]
async fn poison_message_dead_lettered_with_error() {
    let queue = TestQueue::new("poison");
    let messages = vec![Outgoing {
        task_id: "poison-1".to_string(),
        sweep_id: None,
        body: b"{not json".to_vec(),
    }];
    let failures = amqp::publish(
        &queue.address,
        &Topology::default(),
        messages,
        8,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert!(failures.is_empty(), "{failures:?}");

    let output = finish(start_worker(&queue.url, &["--exit-when-idle", "2"]));
    assert!(
        !output.status.success(),
        "a rejected message makes the worker exit non-zero"
    );

    let letters = amqp::peek_dead_letters(&queue.address, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message_id, "poison-1");
    assert_eq!(letters[0].body, b"{not json");
    let error = letters[0].error.clone().unwrap_or_default();
    assert!(error.contains("invalid task message"), "{error}");
    let depth = amqp::depth(&queue.address).await.unwrap();
    assert_eq!(depth.ready, 0);
    assert_eq!(depth.dead_lettered, 1);
}

#[tokio::test]
async fn unreachable_broker_rejected_clearly() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f/nowhere");
    let output = finish(start_worker(&url, &[]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("connect"), "{stderr}");
    assert!(!stderr.contains("guest:guest"), "password leaked: {stderr}");
}
