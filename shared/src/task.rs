//! The versioned task message: one training job that a worker can run with nothing else.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::original::{is_original_payload, OriginalPayload};

/// Version written by this build and the only one it accepts.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest encoded task message, in bytes; SQS rejects bodies over 256 KiB.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// Tag keys with this prefix are written by CloudML itself and rejected in user tags.
pub const RESERVED_TAG_PREFIX: &str = "cloudml.";

/// One training job: model, data, optimisation settings and where to record the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub schema_version: u32,
    /// Stable across redeliveries, so a redelivered task maps to the same MLflow run.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_id: Option<String>,
    /// MLflow experiment name; created on first use.
    pub experiment: String,
    pub model: ModelSpec,
    pub loss: Loss,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub metrics: Vec<Metric>,
    pub epochs: u32,
    pub batch_size: u32,
    /// Seeds weight initialisation, dropout, shuffling, the data split and synthetic data.
    #[serde(default)]
    pub seed: u64,
    pub dataset: DatasetSpec,
    #[serde(default)]
    pub normalization: Normalization,
    /// Fraction of the training split held out for per-epoch validation.
    #[serde(default)]
    pub validation_split: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStopping>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Network definition: the input shape and the layers applied in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Shape of one example; when absent it is taken from the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_shape: Option<Vec<u32>>,
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layer {
    /// Fully connected layer on the last axis, as in Keras.
    Dense {
        units: u32,
        #[serde(default)]
        activation: Activation,
        /// Keras' `input_dim`: when set on the first layer it must match the data.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_size: Option<u32>,
    },
    Dropout {
        rate: f64,
    },
    BatchNorm {
        #[serde(default = "default_batch_norm_momentum")]
        momentum: f64,
        #[serde(default = "default_batch_norm_epsilon")]
        epsilon: f64,
    },
    Flatten,
}

/// Layer fields without the `type` tag, deserialized separately so errors name the field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenseFields {
    units: u32,
    #[serde(default)]
    activation: Activation,
    #[serde(default)]
    input_size: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DropoutFields {
    rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchNormFields {
    #[serde(default = "default_batch_norm_momentum")]
    momentum: f64,
    #[serde(default = "default_batch_norm_epsilon")]
    epsilon: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlattenFields {}

impl<'de> Deserialize<'de> for Layer {
    /// Reads `type`, then the variant's fields. serde's internally tagged enums buffer the input and
    /// lose the field path in errors (`units: invalid type` becomes just `invalid type`).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;

        let mut fields = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let kind = match fields.remove("type") {
            Some(serde_json::Value::String(kind)) => kind,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "type = {other}, expected a layer name"
                )))
            }
            None => return Err(D::Error::missing_field("type")),
        };
        let fields = serde_json::Value::Object(fields);
        match kind.as_str() {
            "dense" => {
                let DenseFields {
                    units,
                    activation,
                    input_size,
                } = layer_fields(fields)?;
                Ok(Layer::Dense {
                    units,
                    activation,
                    input_size,
                })
            }
            "dropout" => {
                let DropoutFields { rate } = layer_fields(fields)?;
                Ok(Layer::Dropout { rate })
            }
            "batch_norm" => {
                let BatchNormFields { momentum, epsilon } = layer_fields(fields)?;
                Ok(Layer::BatchNorm { momentum, epsilon })
            }
            "flatten" => {
                let FlattenFields {} = layer_fields(fields)?;
                Ok(Layer::Flatten)
            }
            other => Err(D::Error::unknown_variant(
                other,
                &["dense", "dropout", "batch_norm", "flatten"],
            )),
        }
    }
}

fn layer_fields<T: serde::de::DeserializeOwned, E: serde::de::Error>(
    fields: serde_json::Value,
) -> Result<T, E> {
    serde_path_to_error::deserialize(fields).map_err(|err| {
        let path = err.path().to_string();
        if path == "." {
            E::custom(err.inner())
        } else {
            E::custom(format!("{path}: {}", err.inner()))
        }
    })
}

fn default_batch_norm_momentum() -> f64 {
    0.99
}

fn default_batch_norm_epsilon() -> f64 {
    1e-3
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Relu,
    Sigmoid,
    Tanh,
    Softmax,
    #[default]
    Linear,
    Elu,
    Selu,
    LeakyRelu,
    Gelu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    BinaryCrossentropy,
    CategoricalCrossentropy,
    SparseCategoricalCrossentropy,
    Mse,
    Mae,
}

impl Loss {
    pub fn is_classification(self) -> bool {
        !matches!(self, Loss::Mse | Loss::Mae)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Accuracy,
    Mae,
    Rmse,
    R2,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Mae => "mae",
            Metric::Rmse => "rmse",
            Metric::R2 => "r2",
        }
    }

    fn is_classification(self) -> bool {
        matches!(self, Metric::Accuracy)
    }
}

/// Optimizer and its hyperparameters; omitted values take the Keras defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerSpec {
    Sgd {
        #[serde(default = "default_sgd_learning_rate")]
        learning_rate: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        nesterov: bool,
    },
    Adam {
        #[serde(default = "default_learning_rate")]
        learning_rate: f64,
        #[serde(default = "default_beta_1")]
        beta_1: f64,
        #[serde(default = "default_beta_2")]
        beta_2: f64,
        #[serde(default = "default_epsilon")]
        epsilon: f64,
    },
    Adamw {
        #[serde(default = "default_learning_rate")]
        learning_rate: f64,
        #[serde(default = "default_adamw_weight_decay")]
        weight_decay: f64,
        #[serde(default = "default_beta_1")]
        beta_1: f64,
        #[serde(default = "default_beta_2")]
        beta_2: f64,
        #[serde(default = "default_epsilon")]
        epsilon: f64,
    },
    Rmsprop {
        #[serde(default = "default_learning_rate")]
        learning_rate: f64,
        #[serde(default = "default_rho")]
        rho: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default = "default_epsilon")]
        epsilon: f64,
    },
}

impl Default for OptimizerSpec {
    /// RMSprop with Keras defaults, the original workload's optimizer.
    fn default() -> Self {
        OptimizerSpec::Rmsprop {
            learning_rate: default_learning_rate(),
            rho: default_rho(),
            momentum: 0.0,
            epsilon: default_epsilon(),
        }
    }
}

impl OptimizerSpec {
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerSpec::Sgd { .. } => "sgd",
            OptimizerSpec::Adam { .. } => "adam",
            OptimizerSpec::Adamw { .. } => "adamw",
            OptimizerSpec::Rmsprop { .. } => "rmsprop",
        }
    }

    pub fn learning_rate(&self) -> f64 {
        match self {
            OptimizerSpec::Sgd { learning_rate, .. }
            | OptimizerSpec::Adam { learning_rate, .. }
            | OptimizerSpec::Adamw { learning_rate, .. }
            | OptimizerSpec::Rmsprop { learning_rate, .. } => *learning_rate,
        }
    }
}

fn default_sgd_learning_rate() -> f64 {
    0.01
}
fn default_learning_rate() -> f64 {
    0.001
}
fn default_beta_1() -> f64 {
    0.9
}
fn default_beta_2() -> f64 {
    0.999
}
fn default_epsilon() -> f64 {
    1e-7
}
fn default_rho() -> f64 {
    0.9
}
fn default_adamw_weight_decay() -> f64 {
    0.004
}

/// Source of a task's examples. Every variant is split into train and test with the task's seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatasetSpec {
    /// Uniform [0, 1) features and uniform labels, as the original workload generated them.
    Synthetic {
        #[serde(default = "default_synthetic_train_rows")]
        train_rows: u32,
        #[serde(default = "default_synthetic_test_rows")]
        test_rows: u32,
        #[serde(default = "default_synthetic_features")]
        features: u32,
        /// Number of label values for classification; ignored by regression losses.
        #[serde(default = "default_synthetic_classes")]
        classes: u32,
    },
    /// A CSV file with a header row, from a path, `file://` or `http(s)://` URL.
    Csv {
        source: String,
        /// Label column name; the last column when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        label: Option<String>,
        #[serde(default = "default_test_fraction")]
        test_fraction: f64,
    },
    /// One of the datasets compiled into the binaries.
    Example {
        name: ExampleDataset,
        #[serde(default = "default_test_fraction")]
        test_fraction: f64,
    },
}

fn default_synthetic_train_rows() -> u32 {
    1000
}
fn default_synthetic_test_rows() -> u32 {
    100
}
fn default_synthetic_features() -> u32 {
    20
}
fn default_synthetic_classes() -> u32 {
    2
}
fn default_test_fraction() -> f64 {
    0.2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExampleDataset {
    BreastCancer,
    Iris,
    Wine,
    Digits,
    Diabetes,
}

impl ExampleDataset {
    pub fn name(self) -> &'static str {
        match self {
            ExampleDataset::BreastCancer => "breast_cancer",
            ExampleDataset::Iris => "iris",
            ExampleDataset::Wine => "wine",
            ExampleDataset::Digits => "digits",
            ExampleDataset::Diabetes => "diabetes",
        }
    }
}

/// Feature scaling, fitted on the training split only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    #[default]
    Standard,
    Minmax,
    None,
}

/// Stop when `val_loss` has not improved by `min_delta` for `patience` epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    pub patience: u32,
    #[serde(default)]
    pub min_delta: f64,
    #[serde(default = "default_true")]
    pub restore_best_weights: bool,
}

fn default_true() -> bool {
    true
}

// The optimizer and dataset tables name their variant in a field (`name`, `kind`). serde's
// internally tagged enums buffer their input and lose the field path in errors, so the derived
// code is externally tagged (`remote = "Self"`) and these impls move the tag in and out.
macro_rules! tagged_by_field {
    ($type:ty, $tag:literal) => {
        impl Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                use serde::ser::Error;

                let external = <$type>::serialize(self, serde_json::value::Serializer)
                    .map_err(S::Error::custom)?;
                let tagged = move_tag_in(external, $tag).map_err(S::Error::custom)?;
                tagged.serialize(serializer)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                use serde::de::Error;

                let tagged = serde_json::Value::deserialize(deserializer)?;
                let external = move_tag_out(tagged, $tag).map_err(D::Error::custom)?;
                // The inherent, derived function: the trait method would call this impl again.
                let mut track = serde_path_to_error::Track::new();
                <$type>::deserialize(serde_path_to_error::Deserializer::new(external, &mut track))
                    .map_err(|err| D::Error::custom(describe_variant_error(&track.path(), &err)))
            }
        }
    };
}

tagged_by_field!(OptimizerSpec, "name");
tagged_by_field!(DatasetSpec, "kind");

/// `{"csv": {"source": ...}}` becomes `{"kind": "csv", "source": ...}`.
fn move_tag_in(external: serde_json::Value, tag: &str) -> Result<serde_json::Value, String> {
    let serde_json::Value::Object(outer) = external else {
        return Err("expected a variant table".to_string());
    };
    let Some((variant, fields)) = outer.into_iter().next() else {
        return Err("expected a variant table".to_string());
    };
    let mut fields = match fields {
        serde_json::Value::Object(fields) => fields,
        _ => serde_json::Map::new(),
    };
    fields.insert(tag.to_string(), serde_json::Value::String(variant));
    Ok(serde_json::Value::Object(fields))
}

/// `{"kind": "csv", "source": ...}` becomes `{"csv": {"source": ...}}`.
fn move_tag_out(tagged: serde_json::Value, tag: &str) -> Result<serde_json::Value, String> {
    let serde_json::Value::Object(mut fields) = tagged else {
        return Err(format!("expected a table with {tag:?}"));
    };
    let variant = match fields.remove(tag) {
        Some(serde_json::Value::String(variant)) => variant,
        Some(other) => return Err(format!("{tag} = {other}, expected a string")),
        None => return Err(format!("missing field `{tag}`")),
    };
    let mut outer = serde_json::Map::new();
    outer.insert(variant, serde_json::Value::Object(fields));
    Ok(serde_json::Value::Object(outer))
}

/// Formats an error of the externally tagged form with the path inside the variant, the way the
/// user wrote it: `csv.test_fraction: invalid type` becomes `test_fraction: invalid type`.
fn describe_variant_error(path: &serde_path_to_error::Path, err: &serde_json::Error) -> String {
    let path = path.to_string();
    match path.split_once('.') {
        Some((_, inner)) if !inner.is_empty() => format!("{inner}: {err}"),
        _ => err.to_string(),
    }
}

/// One invalid field: its path in the task, the value found and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {}, expected {}",
            self.field, self.value, self.expected
        )
    }
}

/// Reason a task message is rejected.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("invalid task message: {0}")]
    Parse(String),
    #[error("invalid task: {}", join_field_errors(.0))]
    Invalid(Vec<FieldError>),
    #[error(
        "task message is {size} bytes, expected at most {MAX_MESSAGE_BYTES} bytes; \
         move large inline data to a csv dataset source"
    )]
    TooLarge { size: usize },
}

fn join_field_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl TaskError {
    /// Builds the error for one field outside its range.
    pub fn invalid_field(
        field: impl Into<String>,
        value: impl fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        TaskError::Invalid(vec![FieldError {
            field: field.into(),
            value: value.to_string(),
            expected: expected.into(),
        }])
    }
}

impl Task {
    /// Parses and validates a queue message body: a task message, or the original payload.
    ///
    /// `fallback_id` names the task when the body is an original payload, which carries no id.
    /// Transports pass something stable across redeliveries, such as a message id or request id.
    pub fn from_message(body: &[u8], fallback_id: &str) -> Result<Task, TaskError> {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(TaskError::TooLarge { size: body.len() });
        }
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|err| TaskError::Parse(err.to_string()))?;
        let task = if value.get("schema_version").is_some() {
            Task::from_value(value)?
        } else if is_original_payload(&value) {
            OriginalPayload::from_value(value)?.into_task(fallback_id)?
        } else {
            return Err(TaskError::Parse(
                "expected a task message (with schema_version) or an original payload (with a layers array)"
                    .to_string(),
            ));
        };
        task.validate()?;
        Ok(task)
    }

    /// Deserializes a task from JSON, naming the path of the first field that does not fit.
    pub fn from_value(value: serde_json::Value) -> Result<Task, TaskError> {
        serde_path_to_error::deserialize(value).map_err(|err| {
            let path = err.path().to_string();
            TaskError::Parse(format!("{path}: {}", err.inner()))
        })
    }

    /// Encodes the task as a message body and checks the size limit.
    pub fn to_message(&self) -> Result<Vec<u8>, TaskError> {
        let body = serde_json::to_vec(self).map_err(|err| TaskError::Parse(err.to_string()))?;
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(TaskError::TooLarge { size: body.len() });
        }
        Ok(body)
    }

    /// Checks every field against its allowed range and reports all violations at once.
    pub fn validate(&self) -> Result<(), TaskError> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, field: &str, value: &dyn fmt::Display, expected: &str| {
            if !ok {
                errors.push(FieldError {
                    field: field.to_string(),
                    value: value.to_string(),
                    expected: expected.to_string(),
                });
            }
        };

        check(
            self.schema_version == SCHEMA_VERSION,
            "schema_version",
            &self.schema_version,
            "1",
        );
        check(
            !self.id.trim().is_empty() && self.id.len() <= 128,
            "id",
            &quoted(&self.id),
            "a non-empty string of at most 128 bytes",
        );
        check(
            !self.experiment.trim().is_empty() && self.experiment.len() <= 500,
            "experiment",
            &quoted(&self.experiment),
            "a non-empty name of at most 500 bytes",
        );
        check(
            (1..=100_000).contains(&self.epochs),
            "epochs",
            &self.epochs,
            "1 <= epochs <= 100000",
        );
        check(
            (1..=1_000_000).contains(&self.batch_size),
            "batch_size",
            &self.batch_size,
            "1 <= batch_size <= 1000000",
        );
        check(
            (0.0..1.0).contains(&self.validation_split),
            "validation_split",
            &self.validation_split,
            "0 <= validation_split < 1",
        );
        if let Some(early) = &self.early_stopping {
            check(
                early.patience >= 1,
                "early_stopping.patience",
                &early.patience,
                "patience >= 1",
            );
            check(
                early.min_delta >= 0.0 && early.min_delta.is_finite(),
                "early_stopping.min_delta",
                &early.min_delta,
                "a finite min_delta >= 0",
            );
            check(
                self.validation_split > 0.0,
                "validation_split",
                &self.validation_split,
                "validation_split > 0 when early_stopping is set, because it watches val_loss",
            );
        }
        for (index, metric) in self.metrics.iter().enumerate() {
            check(
                metric.is_classification() == self.loss.is_classification(),
                &format!("metrics[{index}]"),
                &quoted(metric.name()),
                if self.loss.is_classification() {
                    "accuracy with a classification loss"
                } else {
                    "mae, rmse or r2 with a regression loss"
                },
            );
        }
        for (key, value) in &self.tags {
            check(
                !key.is_empty() && key.len() <= 250 && !key.starts_with(RESERVED_TAG_PREFIX),
                &format!("tags.{key}"),
                &quoted(key),
                "a key of 1 to 250 bytes that does not start with \"cloudml.\"",
            );
            check(
                value.len() <= 5000,
                &format!("tags.{key}"),
                &format!("{} bytes", value.len()),
                "a value of at most 5000 bytes",
            );
        }

        validate_model(&self.model, self.loss, &mut errors);
        validate_optimizer(&self.optimizer, &mut errors);
        validate_dataset(&self.dataset, &mut errors);

        if errors.is_empty() {
            Ok(())
        } else {
            Err(TaskError::Invalid(errors))
        }
    }

    /// Number of units in the output layer.
    pub fn output_units(&self) -> Option<u32> {
        self.model
            .layers
            .iter()
            .rev()
            .find_map(|layer| match layer {
                Layer::Dense { units, .. } => Some(*units),
                _ => None,
            })
    }
}

fn quoted(text: &str) -> String {
    format!("{text:?}")
}

fn validate_model(model: &ModelSpec, loss: Loss, errors: &mut Vec<FieldError>) {
    let mut push = |field: String, value: String, expected: &str| {
        errors.push(FieldError {
            field,
            value,
            expected: expected.to_string(),
        })
    };

    if let Some(shape) = &model.input_shape {
        if shape.is_empty() || shape.len() > 4 {
            push(
                "model.input_shape".into(),
                format!("{shape:?}"),
                "1 to 4 dimensions",
            );
        }
        for (axis, size) in shape.iter().enumerate() {
            if *size == 0 {
                push(
                    format!("model.input_shape[{axis}]"),
                    size.to_string(),
                    "a size >= 1",
                );
            }
        }
        let elements: u64 = shape.iter().map(|size| u64::from(*size)).product();
        if elements > 1_000_000 {
            push(
                "model.input_shape".into(),
                format!("{shape:?}"),
                "at most 1000000 elements per example",
            );
        }
    }
    if model.layers.is_empty() || model.layers.len() > 64 {
        push(
            "model.layers".into(),
            format!("{} layers", model.layers.len()),
            "1 to 64 layers",
        );
    }
    for (index, layer) in model.layers.iter().enumerate() {
        match layer {
            Layer::Dense {
                units, input_size, ..
            } => {
                if !(1..=65_536).contains(units) {
                    push(
                        format!("model.layers[{index}].units"),
                        units.to_string(),
                        "1 <= units <= 65536",
                    );
                }
                if let Some(size) = input_size {
                    if index != 0 {
                        push(
                            format!("model.layers[{index}].input_size"),
                            size.to_string(),
                            "input_size only on the first layer",
                        );
                    } else if *size == 0 {
                        push(
                            format!("model.layers[{index}].input_size"),
                            size.to_string(),
                            "input_size >= 1",
                        );
                    }
                }
            }
            Layer::Dropout { rate } => {
                if !(0.0..1.0).contains(rate) {
                    push(
                        format!("model.layers[{index}].rate"),
                        rate.to_string(),
                        "0 <= rate < 1",
                    );
                }
            }
            Layer::BatchNorm { momentum, epsilon } => {
                if !(*momentum > 0.0 && *momentum < 1.0) {
                    push(
                        format!("model.layers[{index}].momentum"),
                        momentum.to_string(),
                        "0 < momentum < 1",
                    );
                }
                if !(*epsilon > 0.0 && epsilon.is_finite()) {
                    push(
                        format!("model.layers[{index}].epsilon"),
                        epsilon.to_string(),
                        "a finite epsilon > 0",
                    );
                }
            }
            Layer::Flatten => {}
        }
    }

    let last_dense = model
        .layers
        .iter()
        .enumerate()
        .rev()
        .find(|(_, layer)| matches!(layer, Layer::Dense { .. }));
    match last_dense {
        None if !model.layers.is_empty() => push(
            "model.layers".into(),
            "no dense layer".into(),
            "at least one dense layer to produce the output",
        ),
        Some((
            index,
            Layer::Dense {
                units, activation, ..
            },
        )) => {
            let single_output = matches!(loss, Loss::BinaryCrossentropy | Loss::Mse | Loss::Mae);
            if single_output && *units != 1 {
                push(
                    format!("model.layers[{index}].units"),
                    units.to_string(),
                    "1 output unit for binary_crossentropy, mse and mae",
                );
            }
            if !single_output && *units < 2 {
                push(
                    format!("model.layers[{index}].units"),
                    units.to_string(),
                    "one output unit per class (at least 2) for categorical losses",
                );
            }
            if loss == Loss::BinaryCrossentropy
                && !matches!(activation, Activation::Sigmoid | Activation::Linear)
            {
                push(
                    format!("model.layers[{index}].activation"),
                    quoted(&format!("{activation:?}").to_lowercase()),
                    "sigmoid (or linear for logits) before binary_crossentropy",
                );
            }
            let categorical = matches!(
                loss,
                Loss::CategoricalCrossentropy | Loss::SparseCategoricalCrossentropy
            );
            if categorical && !matches!(activation, Activation::Softmax | Activation::Linear) {
                push(
                    format!("model.layers[{index}].activation"),
                    quoted(&format!("{activation:?}").to_lowercase()),
                    "softmax (or linear for logits) before a categorical loss",
                );
            }
        }
        _ => {}
    }
}

fn validate_optimizer(optimizer: &OptimizerSpec, errors: &mut Vec<FieldError>) {
    let mut check = |ok: bool, field: &str, value: f64, expected: &str| {
        if !ok {
            errors.push(FieldError {
                field: format!("optimizer.{field}"),
                value: value.to_string(),
                expected: expected.to_string(),
            });
        }
    };
    let learning_rate = optimizer.learning_rate();
    check(
        learning_rate > 0.0 && learning_rate <= 10.0,
        "learning_rate",
        learning_rate,
        "0 < learning_rate <= 10",
    );
    match optimizer {
        OptimizerSpec::Sgd { momentum, .. } => {
            check(
                (0.0..1.0).contains(momentum),
                "momentum",
                *momentum,
                "0 <= momentum < 1",
            );
        }
        OptimizerSpec::Adam {
            beta_1,
            beta_2,
            epsilon,
            ..
        } => {
            check(
                (0.0..1.0).contains(beta_1),
                "beta_1",
                *beta_1,
                "0 <= beta_1 < 1",
            );
            check(
                (0.0..1.0).contains(beta_2),
                "beta_2",
                *beta_2,
                "0 <= beta_2 < 1",
            );
            check(*epsilon > 0.0, "epsilon", *epsilon, "epsilon > 0");
        }
        OptimizerSpec::Adamw {
            weight_decay,
            beta_1,
            beta_2,
            epsilon,
            ..
        } => {
            check(
                (0.0..1.0).contains(weight_decay),
                "weight_decay",
                *weight_decay,
                "0 <= weight_decay < 1",
            );
            check(
                (0.0..1.0).contains(beta_1),
                "beta_1",
                *beta_1,
                "0 <= beta_1 < 1",
            );
            check(
                (0.0..1.0).contains(beta_2),
                "beta_2",
                *beta_2,
                "0 <= beta_2 < 1",
            );
            check(*epsilon > 0.0, "epsilon", *epsilon, "epsilon > 0");
        }
        OptimizerSpec::Rmsprop {
            rho,
            momentum,
            epsilon,
            ..
        } => {
            check((0.0..1.0).contains(rho), "rho", *rho, "0 <= rho < 1");
            check(
                (0.0..1.0).contains(momentum),
                "momentum",
                *momentum,
                "0 <= momentum < 1",
            );
            check(*epsilon > 0.0, "epsilon", *epsilon, "epsilon > 0");
        }
    }
}

/// Largest synthetic dataset, in feature values (400 MB of f32), so one task cannot exhaust a worker.
const MAX_SYNTHETIC_VALUES: u64 = 100_000_000;

fn validate_dataset(dataset: &DatasetSpec, errors: &mut Vec<FieldError>) {
    let mut push = |field: &str, value: String, expected: &str| {
        errors.push(FieldError {
            field: format!("dataset.{field}"),
            value,
            expected: expected.to_string(),
        })
    };
    match dataset {
        DatasetSpec::Synthetic {
            train_rows,
            test_rows,
            features,
            classes,
        } => {
            if *train_rows < 2 {
                push("train_rows", train_rows.to_string(), "train_rows >= 2");
            }
            if *test_rows < 1 {
                push("test_rows", test_rows.to_string(), "test_rows >= 1");
            }
            if *features < 1 {
                push("features", features.to_string(), "features >= 1");
            }
            if !(2..=10_000).contains(classes) {
                push("classes", classes.to_string(), "2 <= classes <= 10000");
            }
            let values = (u64::from(*train_rows) + u64::from(*test_rows)) * u64::from(*features);
            if values > MAX_SYNTHETIC_VALUES {
                push(
                    "train_rows",
                    format!("{values} feature values in all"),
                    "(train_rows + test_rows) * features <= 100000000",
                );
            }
        }
        DatasetSpec::Csv {
            source,
            test_fraction,
            ..
        } => {
            if source.trim().is_empty() {
                push(
                    "source",
                    quoted(source),
                    "a path, file://, http:// or https:// URL",
                );
            }
            if !(*test_fraction > 0.0 && *test_fraction < 1.0) {
                push(
                    "test_fraction",
                    test_fraction.to_string(),
                    "0 < test_fraction < 1",
                );
            }
        }
        DatasetSpec::Example { test_fraction, .. } => {
            if !(*test_fraction > 0.0 && *test_fraction < 1.0) {
                push(
                    "test_fraction",
                    test_fraction.to_string(),
                    "0 < test_fraction < 1",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task_json() -> serde_json::Value {
        serde_json::json!({
            "schema_version": 1, "id": "t", "experiment": "e", "loss": "mse", "epochs": 1, "batch_size": 1,
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "dataset": {"kind": "csv", "source": "data.csv"},
            "model": {"layers": [{"type": "dense", "units": 1}]}
        })
    }

    #[test]
    fn tagged_tables_round_trip() {
        let task = Task::from_value(task_json()).unwrap();
        let value = serde_json::to_value(&task).unwrap();
        assert_eq!(value["dataset"]["kind"], "csv");
        assert_eq!(value["optimizer"]["name"], "adam");
        assert_eq!(Task::from_value(value).unwrap(), task);
    }

    #[test]
    fn dataset_type_error_names_field() {
        let mut value = task_json();
        value["dataset"]["test_fraction"] = "lots".into();
        let message = Task::from_value(value).unwrap_err().to_string();
        assert!(
            message.contains("dataset: test_fraction: invalid type"),
            "{message}"
        );
    }

    #[test]
    fn unknown_dataset_kind_named() {
        let mut value = task_json();
        value["dataset"]["kind"] = "parquet".into();
        let message = Task::from_value(value).unwrap_err().to_string();
        assert!(message.contains("unknown variant `parquet`"), "{message}");
        assert!(message.contains("synthetic"), "{message}");
    }

    #[test]
    fn missing_optimizer_name_named() {
        let mut value = task_json();
        value["optimizer"] = serde_json::json!({"learning_rate": 0.1});
        let message = Task::from_value(value).unwrap_err().to_string();
        assert!(
            message.contains("optimizer: missing field `name`"),
            "{message}"
        );
    }
}
