//! Shared library of the CloudML binaries: the task message, sweeps, datasets, the tch trainer,
//! the MLflow client, queues and the worker loop.

pub mod config;
pub mod data;
pub mod error;
pub mod execute;
pub mod original;
pub mod queue;
pub mod sweep;
pub mod task;
#[doc(hidden)]
pub mod testing;
pub mod tracking;
pub mod train;
pub mod worker;
