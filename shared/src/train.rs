//! The trainer: builds the task's network on libtorch (`tch`), fits it and evaluates it on the test split.
//!
//! Weight initialisation, dropout masks and shuffling draw from a ChaCha generator seeded by the task,
//! not from libtorch's process-wide generator, so several tasks training at once in one process stay
//! reproducible on CPU for a given seed and thread count.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use crate::data::Dataset;
use crate::task::{Activation, Layer, Loss, Metric, OptimizerSpec, Task};

/// Rows per forward pass when evaluating, to bound memory on large splits.
const EVAL_CHUNK_ROWS: i64 = 8192;

/// Keras' `leaky_relu` activation slope for negative inputs.
const LEAKY_RELU_SLOPE: f64 = 0.2;

/// Training settings of a worker: thread count and device.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    /// libtorch intra-op threads for this task.
    pub threads: usize,
    pub device: Device,
}

/// Metrics of one finished epoch, in logging order.
#[derive(Debug, Clone)]
pub struct EpochMetrics {
    /// Zero-based epoch number, used as the MLflow `step`.
    pub epoch: u32,
    pub values: Vec<(String, f64)>,
}

/// Everything a finished training produces.
#[derive(Debug)]
pub struct TrainOutcome {
    pub history: Vec<EpochMetrics>,
    /// Test-split metrics named `test_loss`, `test_accuracy`, ...
    pub test_metrics: Vec<(String, f64)>,
    /// Epoch whose weights the model holds when early stopping restored the best ones.
    pub best_epoch: Option<u32>,
    pub stopped_early: bool,
    pub trainable_parameters: i64,
    pub train_duration: Duration,
    /// The trained weights in the safetensors format.
    pub model_safetensors: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("model does not fit the data: {0}")]
    Shape(String),
    #[error(
        "training diverged: {metric} is {value} after epoch {epoch}; try a lower learning rate or \
         normalization = \"standard\""
    )]
    Diverged {
        metric: String,
        value: f64,
        epoch: u32,
    },
    #[error("libtorch error: {0}")]
    Torch(tch::TchError),
    #[error("cannot write the model file: {0}")]
    Io(std::io::Error),
}

// Written by hand rather than with `#[from]`, which would also report the cause as the error's
// source, so that error chains print it twice.
impl From<tch::TchError> for TrainError {
    fn from(error: tch::TchError) -> Self {
        TrainError::Torch(error)
    }
}

impl From<std::io::Error> for TrainError {
    fn from(error: std::io::Error) -> Self {
        TrainError::Io(error)
    }
}

/// Trains `task` on `data`, calling `on_epoch` after each epoch.
pub fn train(
    task: &Task,
    data: &Dataset,
    options: &TrainOptions,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<TrainOutcome, TrainError> {
    let started = Instant::now();
    tch::set_num_threads(options.threads.max(1) as i32);
    let device = options.device;
    let input_shape = input_shape(task, data)?;
    check_outputs(task, data)?;

    // Separate streams so that changing the model does not change the shuffling order.
    let mut init_rng = ChaCha8Rng::seed_from_u64(task.seed);
    init_rng.set_stream(1);
    let mut step_rng = ChaCha8Rng::seed_from_u64(task.seed);
    step_rng.set_stream(2);

    let vs = nn::VarStore::new(device);
    let network = Network::build(&vs.root(), task, &input_shape, &mut init_rng)?;
    let mut optimizer = build_optimizer(&task.optimizer, &vs)?;

    let features = Tensor::f_from_slice(&data.x_train)?;
    let mut shape = vec![data.train_rows() as i64];
    shape.extend(input_shape.iter().copied());
    let all_x = features.f_view(shape.as_slice())?.f_to_device(device)?;
    let all_y = labels_tensor(&data.y_train, task.loss)?.f_to_device(device)?;

    // Hold out the last rows of the (already shuffled) training split, as Keras' validation_split does.
    let train_rows = data.train_rows() as i64;
    let validation_rows = (train_rows as f64 * task.validation_split).round() as i64;
    let validation_rows = validation_rows.min(train_rows - 1);
    let fit_rows = train_rows - validation_rows;
    let (fit_x, fit_y) = (
        all_x.f_narrow(0, 0, fit_rows)?,
        all_y.f_narrow(0, 0, fit_rows)?,
    );
    let validation = (validation_rows > 0)
        .then(|| -> Result<(Tensor, Tensor), TrainError> {
            Ok((
                all_x.f_narrow(0, fit_rows, validation_rows)?,
                all_y.f_narrow(0, fit_rows, validation_rows)?,
            ))
        })
        .transpose()?;

    let metrics = requested_metrics(task);
    let mut history = Vec::new();
    let mut early = task.early_stopping.as_ref().map(|config| EarlyStop {
        patience: config.patience,
        min_delta: config.min_delta,
        restore: config.restore_best_weights,
        best_loss: f64::INFINITY,
        best_epoch: 0,
        waited: 0,
        best_weights: None,
    });
    let mut stopped_early = false;

    for epoch in 0..task.epochs {
        // 1. One pass over the fit rows in a fresh order.
        let mut order: Vec<i64> = (0..fit_rows).collect();
        order.shuffle(&mut step_rng);
        let order = Tensor::f_from_slice(&order)?.f_to_device(device)?;
        let epoch_x = fit_x.f_index_select(0, &order)?;
        let epoch_y = fit_y.f_index_select(0, &order)?;

        let mut totals = MetricTotals::default();
        let mut start = 0;
        while start < fit_rows {
            let rows = (task.batch_size as i64).min(fit_rows - start);
            // Batch norm cannot estimate a variance from one row, so such a last batch is skipped.
            if rows == 1 && network.has_batch_norm && start > 0 {
                break;
            }
            let batch_x = epoch_x.f_narrow(0, start, rows)?;
            let batch_y = epoch_y.f_narrow(0, start, rows)?;
            let logits = network.forward(&batch_x, true, &mut step_rng)?;
            let loss = compute_loss(&logits, &batch_y, task.loss)?;
            optimizer.zero_grad();
            loss.f_backward()?;
            optimizer.step();
            tch::no_grad(|| totals.add(&logits, &batch_y, &loss, task.loss))?;
            start += rows;
        }

        // 2. Epoch metrics on the fit rows, then on the validation rows.
        let mut values = totals.values("", &metrics);
        if let Some((validation_x, validation_y)) = &validation {
            let validation_totals = evaluate(&network, validation_x, validation_y, task.loss)?;
            values.extend(validation_totals.values("val_", &metrics));
        }
        if let Some((name, value)) = values.iter().find(|(_, value)| !value.is_finite()) {
            return Err(TrainError::Diverged {
                metric: name.clone(),
                value: *value,
                epoch,
            });
        }
        let epoch_metrics = EpochMetrics { epoch, values };
        on_epoch(&epoch_metrics);

        // 3. Early stopping on val_loss, keeping a copy of the best weights.
        let validation_loss = epoch_metrics
            .values
            .iter()
            .find(|(name, _)| name == "val_loss")
            .map(|(_, value)| *value);
        history.push(epoch_metrics);
        if let (Some(state), Some(validation_loss)) = (early.as_mut(), validation_loss) {
            if validation_loss < state.best_loss - state.min_delta {
                state.best_loss = validation_loss;
                state.best_epoch = epoch;
                state.waited = 0;
                if state.restore {
                    state.best_weights = Some(snapshot(&vs));
                }
            } else {
                state.waited += 1;
                if state.waited >= state.patience {
                    stopped_early = true;
                    break;
                }
            }
        }
    }

    let mut best_epoch = None;
    if let Some(EarlyStop {
        best_weights: Some(weights),
        best_epoch: epoch,
        ..
    }) = early
    {
        restore(&vs, &weights)?;
        best_epoch = Some(epoch);
    }

    // 4. Final evaluation on the test split.
    let mut test_shape = vec![data.test_rows() as i64];
    test_shape.extend(input_shape.iter().copied());
    let test_x = Tensor::f_from_slice(&data.x_test)?
        .f_view(test_shape.as_slice())?
        .f_to_device(device)?;
    let test_y = labels_tensor(&data.y_test, task.loss)?.f_to_device(device)?;
    let test_metrics = evaluate(&network, &test_x, &test_y, task.loss)?.values("test_", &metrics);

    let trainable_parameters = vs
        .trainable_variables()
        .iter()
        .map(|tensor| tensor.numel() as i64)
        .sum();
    let model_safetensors = save_safetensors(&vs)?;
    Ok(TrainOutcome {
        history,
        test_metrics,
        best_epoch,
        stopped_early,
        trainable_parameters,
        train_duration: started.elapsed(),
        model_safetensors,
    })
}

/// Early-stopping state between epochs.
struct EarlyStop {
    patience: u32,
    min_delta: f64,
    restore: bool,
    best_loss: f64,
    best_epoch: u32,
    waited: u32,
    best_weights: Option<Vec<(String, Tensor)>>,
}

fn input_shape(task: &Task, data: &Dataset) -> Result<Vec<i64>, TrainError> {
    let shape = match &task.model.input_shape {
        Some(shape) => shape
            .iter()
            .map(|size| i64::from(*size))
            .collect::<Vec<_>>(),
        None => vec![data.features as i64],
    };
    let elements: i64 = shape.iter().product();
    if elements != data.features as i64 {
        return Err(TrainError::Shape(format!(
            "model.input_shape = {shape:?} contains {elements} values, but dataset {} has {} features",
            data.name, data.features
        )));
    }
    if let Some(Layer::Dense {
        input_size: Some(size),
        ..
    }) = task.model.layers.first()
    {
        let last_axis = *shape.last().unwrap_or(&0);
        if i64::from(*size) != last_axis {
            return Err(TrainError::Shape(format!(
                "model.layers[0].input_size = {size}, but each example has {last_axis} values on its last axis"
            )));
        }
    }
    Ok(shape)
}

fn check_outputs(task: &Task, data: &Dataset) -> Result<(), TrainError> {
    let units = task.output_units().unwrap_or(0) as usize;
    let categorical = matches!(
        task.loss,
        Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy
    );
    if categorical && units != data.classes {
        let index = task
            .model
            .layers
            .iter()
            .rposition(|layer| matches!(layer, Layer::Dense { .. }))
            .unwrap_or(0);
        return Err(TrainError::Shape(format!(
            "model.layers[{index}].units = {units}, but dataset {} has {} classes; set units to {}",
            data.name, data.classes, data.classes
        )));
    }
    Ok(())
}

fn requested_metrics(task: &Task) -> Vec<Metric> {
    let mut metrics = task.metrics.clone();
    metrics.dedup();
    metrics
}

/// Labels as the loss wants them: class indices (int64) for categorical losses, a float column otherwise.
fn labels_tensor(labels: &[f32], loss: Loss) -> Result<Tensor, TrainError> {
    let tensor = Tensor::f_from_slice(labels)?;
    Ok(match loss {
        Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => {
            tensor.f_to_kind(Kind::Int64)?
        }
        Loss::BinaryCrossentropy | Loss::Mse | Loss::Mae => tensor.f_view([-1, 1])?,
    })
}

/// The built network. For classification the output layer's sigmoid or softmax is left out of
/// `forward`, so the loss works on logits, which is numerically stable.
struct Network {
    ops: Vec<Op>,
    has_batch_norm: bool,
}

enum Op {
    Dense {
        weight: Tensor,
        bias: Tensor,
        activation: Activation,
    },
    Dropout(f64),
    BatchNorm(nn::BatchNorm),
    Flatten,
}

impl Network {
    fn build(
        root: &nn::Path,
        task: &Task,
        input_shape: &[i64],
        rng: &mut ChaCha8Rng,
    ) -> Result<Network, TrainError> {
        let mut shape = input_shape.to_vec();
        let last_dense = task
            .model
            .layers
            .iter()
            .rposition(|layer| matches!(layer, Layer::Dense { .. }));
        let mut ops = Vec::with_capacity(task.model.layers.len());
        let mut has_batch_norm = false;

        for (index, layer) in task.model.layers.iter().enumerate() {
            let path = root.sub(format!("layer_{index}"));
            let width = *shape.last().unwrap_or(&1);
            match layer {
                Layer::Dense {
                    units, activation, ..
                } => {
                    let units = i64::from(*units);
                    let weight = path.f_var_copy("weight", &glorot_uniform(units, width, rng)?)?;
                    let bias = path.f_zeros("bias", &[units])?;
                    // The output activation becomes part of the loss for classification.
                    let activation = if Some(index) == last_dense && task.loss.is_classification() {
                        Activation::Linear
                    } else {
                        *activation
                    };
                    ops.push(Op::Dense {
                        weight,
                        bias,
                        activation,
                    });
                    if let Some(last) = shape.last_mut() {
                        *last = units;
                    }
                }
                Layer::Dropout { rate } => ops.push(Op::Dropout(*rate)),
                Layer::BatchNorm { momentum, epsilon } => {
                    let config = nn::BatchNormConfig {
                        // Keras keeps `momentum` of the old running statistics; libtorch takes the share of the new.
                        momentum: 1.0 - momentum,
                        eps: *epsilon,
                        ws_init: nn::Init::Const(1.0),
                        ..Default::default()
                    };
                    ops.push(Op::BatchNorm(nn::batch_norm1d(&path, width, config)));
                    has_batch_norm = true;
                }
                Layer::Flatten => {
                    let size = shape.iter().product();
                    shape = vec![size];
                    ops.push(Op::Flatten);
                }
            }
        }
        Ok(Network {
            ops,
            has_batch_norm,
        })
    }

    /// Runs the layers; dropout and batch-norm statistics are active only when `train` is set.
    fn forward(
        &self,
        input: &Tensor,
        train: bool,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor, TrainError> {
        let mut x = input.shallow_clone();
        for op in &self.ops {
            x = match op {
                Op::Dense {
                    weight,
                    bias,
                    activation,
                } => activate(&x.f_linear(weight, Some(bias))?, *activation)?,
                Op::Dropout(rate) if train && *rate > 0.0 => {
                    let mask = dropout_mask(&x.size(), *rate, rng)?.f_to_device(x.device())?;
                    x.f_mul(&mask)?
                }
                Op::Dropout(_) => x,
                Op::BatchNorm(norm) => {
                    // Normalise the last axis, as Keras does, whatever the rank.
                    let size = x.size();
                    let width = *size.last().unwrap_or(&1);
                    norm.forward_t(&x.f_reshape([-1, width])?, train)
                        .f_reshape(size.as_slice())?
                }
                Op::Flatten => x.f_flatten(1, -1)?,
            };
        }
        Ok(x)
    }
}

fn activate(x: &Tensor, activation: Activation) -> Result<Tensor, TrainError> {
    Ok(match activation {
        Activation::Relu => x.f_relu()?,
        Activation::Sigmoid => x.f_sigmoid()?,
        Activation::Tanh => x.f_tanh()?,
        Activation::Softmax => x.f_softmax(-1, Kind::Float)?,
        Activation::Linear => x.shallow_clone(),
        Activation::Elu => x.f_elu()?,
        Activation::Selu => x.f_selu()?,
        Activation::LeakyRelu => x.f_maximum(&x.f_mul_scalar(LEAKY_RELU_SLOPE)?)?,
        Activation::Gelu => x.f_gelu("none")?,
    })
}

/// Keras' default Dense initialiser: uniform in ±sqrt(6 / (fan_in + fan_out)), laid out `[out, in]`.
fn glorot_uniform(units: i64, inputs: i64, rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError> {
    let limit = (6.0 / (units + inputs) as f64).sqrt() as f32;
    let values: Vec<f32> = (0..units * inputs)
        .map(|_| rng.random_range(-limit..limit))
        .collect();
    Ok(Tensor::f_from_slice(&values)?.f_view([units, inputs])?)
}

/// Inverted dropout: keeps each value with probability `1 - rate` and scales kept values by `1 / (1 - rate)`.
fn dropout_mask(size: &[i64], rate: f64, rng: &mut ChaCha8Rng) -> Result<Tensor, TrainError> {
    let count: i64 = size.iter().product();
    let scale = (1.0 / (1.0 - rate)) as f32;
    let values: Vec<f32> = (0..count)
        .map(|_| {
            if rng.random::<f64>() >= rate {
                scale
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::f_from_slice(&values)?.f_view(size)?)
}

fn compute_loss(logits: &Tensor, labels: &Tensor, loss: Loss) -> Result<Tensor, TrainError> {
    Ok(match loss {
        Loss::BinaryCrossentropy => logits.f_binary_cross_entropy_with_logits::<Tensor>(
            labels,
            None,
            None,
            Reduction::Mean,
        )?,
        Loss::SparseCategoricalCrossentropy => logits
            .f_log_softmax(-1, Kind::Float)?
            .f_nll_loss::<Tensor>(labels, None, Reduction::Mean, -100)?,
        Loss::CategoricalCrossentropy => {
            let classes = *logits.size().last().unwrap_or(&1);
            let one_hot = labels.f_one_hot(classes)?.f_to_kind(Kind::Float)?;
            let log_probabilities = logits.f_log_softmax(-1, Kind::Float)?;
            one_hot
                .f_mul(&log_probabilities)?
                .f_sum_dim_intlist(-1, false, Kind::Float)?
                .f_mean(Kind::Float)?
                .f_neg()?
        }
        Loss::Mse => logits.f_mse_loss(labels, Reduction::Mean)?,
        Loss::Mae => logits.f_l1_loss(labels, Reduction::Mean)?,
    })
}

/// Sums from which loss and metrics are computed over several batches.
#[derive(Debug, Default)]
struct MetricTotals {
    rows: f64,
    loss_sum: f64,
    correct: f64,
    absolute_error: f64,
    squared_error: f64,
    label_sum: f64,
    label_square_sum: f64,
}

impl MetricTotals {
    fn add(
        &mut self,
        logits: &Tensor,
        labels: &Tensor,
        loss: &Tensor,
        kind: Loss,
    ) -> Result<(), TrainError> {
        let rows = logits.size().first().copied().unwrap_or(0) as f64;
        self.rows += rows;
        self.loss_sum += loss.f_double_value(&[])? * rows;
        match kind {
            Loss::BinaryCrossentropy => {
                let predicted = logits.f_gt(0.0)?.f_to_kind(Kind::Float)?;
                self.correct += predicted
                    .f_eq_tensor(labels)?
                    .f_sum(Kind::Float)?
                    .f_double_value(&[])?;
            }
            Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy => {
                let predicted = logits.f_argmax(-1, false)?;
                self.correct += predicted
                    .f_eq_tensor(labels)?
                    .f_sum(Kind::Float)?
                    .f_double_value(&[])?;
            }
            Loss::Mse | Loss::Mae => {
                let error = logits.f_sub(labels)?;
                self.absolute_error += error.f_abs()?.f_sum(Kind::Double)?.f_double_value(&[])?;
                self.squared_error += error.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
                self.label_sum += labels.f_sum(Kind::Double)?.f_double_value(&[])?;
                self.label_square_sum += labels
                    .f_square()?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?;
            }
        }
        Ok(())
    }

    fn values(&self, prefix: &str, metrics: &[Metric]) -> Vec<(String, f64)> {
        let rows = self.rows.max(1.0);
        let mut values = vec![(format!("{prefix}loss"), self.loss_sum / rows)];
        for metric in metrics {
            let value = match metric {
                Metric::Accuracy => self.correct / rows,
                Metric::Mae => self.absolute_error / rows,
                Metric::Rmse => (self.squared_error / rows).sqrt(),
                Metric::R2 => {
                    let mean = self.label_sum / rows;
                    let total = self.label_square_sum - rows * mean * mean;
                    if total > 0.0 {
                        1.0 - self.squared_error / total
                    } else {
                        0.0
                    }
                }
            };
            values.push((format!("{prefix}{}", metric.name()), value));
        }
        values
    }
}

/// Loss and metric totals in inference mode, in chunks of [`EVAL_CHUNK_ROWS`].
fn evaluate(
    network: &Network,
    x: &Tensor,
    y: &Tensor,
    loss: Loss,
) -> Result<MetricTotals, TrainError> {
    tch::no_grad(|| {
        let rows = x.size().first().copied().unwrap_or(0);
        // Inference draws no dropout masks; this generator is never read.
        let mut unused_rng = ChaCha8Rng::seed_from_u64(0);
        let mut totals = MetricTotals::default();
        let mut start = 0;
        while start < rows {
            let count = EVAL_CHUNK_ROWS.min(rows - start);
            let chunk_x = x.f_narrow(0, start, count)?;
            let chunk_y = y.f_narrow(0, start, count)?;
            let logits = network.forward(&chunk_x, false, &mut unused_rng)?;
            let chunk_loss = compute_loss(&logits, &chunk_y, loss)?;
            totals.add(&logits, &chunk_y, &chunk_loss, loss)?;
            start += count;
        }
        Ok(totals)
    })
}

fn snapshot(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    tch::no_grad(|| {
        vs.variables()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.copy()))
            .collect()
    })
}

fn restore(vs: &nn::VarStore, weights: &[(String, Tensor)]) -> Result<(), TrainError> {
    let mut variables = vs.variables();
    tch::no_grad(|| {
        for (name, saved) in weights {
            if let Some(variable) = variables.get_mut(name) {
                variable.f_copy_(saved)?;
            }
        }
        Ok(())
    })
}

fn save_safetensors(vs: &nn::VarStore) -> Result<Vec<u8>, TrainError> {
    let directory = tempfile::tempdir()?;
    let path = directory.path().join("model.safetensors");
    vs.save(&path)?;
    Ok(std::fs::read(&path)?)
}

fn build_optimizer(spec: &OptimizerSpec, vs: &nn::VarStore) -> Result<nn::Optimizer, TrainError> {
    let optimizer = match *spec {
        OptimizerSpec::Sgd {
            learning_rate,
            momentum,
            nesterov,
        } => nn::Sgd {
            momentum,
            dampening: 0.0,
            wd: 0.0,
            nesterov,
        }
        .build(vs, learning_rate)?,
        OptimizerSpec::Adam {
            learning_rate,
            beta_1,
            beta_2,
            epsilon,
        } => nn::Adam {
            beta1: beta_1,
            beta2: beta_2,
            wd: 0.0,
            eps: epsilon,
            amsgrad: false,
        }
        .build(vs, learning_rate)?,
        OptimizerSpec::Adamw {
            learning_rate,
            weight_decay,
            beta_1,
            beta_2,
            epsilon,
        } => nn::AdamW {
            beta1: beta_1,
            beta2: beta_2,
            wd: weight_decay,
            eps: epsilon,
            amsgrad: false,
        }
        .build(vs, learning_rate)?,
        OptimizerSpec::Rmsprop {
            learning_rate,
            rho,
            momentum,
            epsilon,
        } => nn::RmsProp {
            alpha: rho,
            eps: epsilon,
            wd: 0.0,
            momentum,
            centered: false,
        }
        .build(vs, learning_rate)?,
    };
    Ok(optimizer)
}

/// Picks the libtorch device from a setting: `cpu`, `cuda`, `cuda:N` or `auto`.
pub fn parse_device(setting: &str) -> Result<Device, String> {
    match setting.trim().to_ascii_lowercase().as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|index| index.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("device = {setting:?}, expected cpu, cuda, cuda:N or auto")),
    }
}
