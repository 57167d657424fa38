//! Datasets: synthetic data, CSV files and the bundled examples, split and normalised per task.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::task::{DatasetSpec, ExampleDataset, Loss, Normalization};

/// Largest CSV accepted over HTTP, in bytes.
const MAX_DOWNLOAD_BYTES: u64 = 512 * 1024 * 1024;

/// Examples compiled into the library, so workers need no files to run them (about 650 KB).
fn example_csv(name: ExampleDataset) -> &'static str {
    match name {
        ExampleDataset::BreastCancer => include_str!("../../examples/data/breast_cancer.csv"),
        ExampleDataset::Iris => include_str!("../../examples/data/iris.csv"),
        ExampleDataset::Wine => include_str!("../../examples/data/wine.csv"),
        ExampleDataset::Digits => include_str!("../../examples/data/digits.csv"),
        ExampleDataset::Diabetes => include_str!("../../examples/data/diabetes.csv"),
    }
}

/// Features and labels split into train and test, ready for the trainer.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Human-readable origin, recorded as a run param.
    pub name: String,
    pub features: usize,
    /// Number of classes for classification losses, 0 for regression.
    pub classes: usize,
    /// Row-major, `train_rows x features`.
    pub x_train: Vec<f32>,
    /// Class index (as a float) or regression target, one per row.
    pub y_train: Vec<f32>,
    pub x_test: Vec<f32>,
    pub y_test: Vec<f32>,
}

impl Dataset {
    pub fn train_rows(&self) -> usize {
        self.y_train.len()
    }

    pub fn test_rows(&self) -> usize {
        self.y_test.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read dataset {source_name}: {message}")]
    Read {
        source_name: String,
        message: String,
    },
    #[error("cannot download dataset {url}: {message}")]
    Download {
        url: String,
        message: String,
        /// Whether trying again later may succeed (connection errors, 5xx, 429).
        transient: bool,
    },
    #[error("dataset {source_name}: {message}")]
    Content {
        source_name: String,
        message: String,
    },
}

impl DataError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DataError::Download {
                transient: true,
                ..
            }
        )
    }

    fn content(source_name: &str, message: impl Into<String>) -> Self {
        DataError::Content {
            source_name: source_name.to_string(),
            message: message.into(),
        }
    }
}

/// Loads, splits and normalises the dataset of a task. `seed` drives synthetic values and the split.
pub async fn load(
    spec: &DatasetSpec,
    normalization: Normalization,
    loss: Loss,
    seed: u64,
) -> Result<Dataset, DataError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut dataset = match spec {
        DatasetSpec::Synthetic {
            train_rows,
            test_rows,
            features,
            classes,
        } => synthetic(
            *train_rows as usize,
            *test_rows as usize,
            *features as usize,
            *classes as usize,
            loss,
            &mut rng,
        ),
        DatasetSpec::Example {
            name,
            test_fraction,
        } => {
            let table = parse_csv(example_csv(*name).as_bytes(), name.name(), None)?;
            split(table, loss, *test_fraction, &mut rng)?
        }
        DatasetSpec::Csv {
            source,
            label,
            test_fraction,
        } => {
            let bytes = read_source(source).await?;
            let table = parse_csv(&bytes, source, label.as_deref())?;
            split(table, loss, *test_fraction, &mut rng)?
        }
    };
    normalize(&mut dataset, normalization);
    Ok(dataset)
}

fn synthetic(
    train_rows: usize,
    test_rows: usize,
    features: usize,
    classes: usize,
    loss: Loss,
    rng: &mut ChaCha8Rng,
) -> Dataset {
    let mut values = |count: usize| (0..count).map(|_| rng.random::<f32>()).collect::<Vec<_>>();
    let x_train = values(train_rows * features);
    let x_test = values(test_rows * features);
    let mut labels = |count: usize| -> Vec<f32> {
        (0..count)
            .map(|_| {
                if loss.is_classification() {
                    rng.random_range(0..classes) as f32
                } else {
                    rng.random::<f32>()
                }
            })
            .collect()
    };
    let y_train = labels(train_rows);
    let y_test = labels(test_rows);
    Dataset {
        name: format!("synthetic {train_rows}+{test_rows}x{features}"),
        features,
        classes: if loss.is_classification() { classes } else { 0 },
        x_train,
        y_train,
        x_test,
        y_test,
    }
}

/// Reads a local path, a `file://` URL or an `http(s)://` URL.
async fn read_source(source: &str) -> Result<Vec<u8>, DataError> {
    let read_error = |message: String| DataError::Read {
        source_name: source.to_string(),
        message,
    };
    if source.starts_with("http://") || source.starts_with("https://") {
        return download(source).await;
    }
    let path = if source.starts_with("file://") {
        url::Url::parse(source)
            .ok()
            .and_then(|url| url.to_file_path().ok())
            .ok_or_else(|| {
                read_error("invalid file:// URL, expected file:///absolute/path".into())
            })?
    } else if source.contains("://") {
        return Err(read_error(
            "unsupported scheme, expected a path, file://, http:// or https:// URL".into(),
        ));
    } else {
        std::path::PathBuf::from(source)
    };
    tokio::fs::read(&path)
        .await
        .map_err(|err| read_error(err.to_string()))
}

async fn download(url: &str) -> Result<Vec<u8>, DataError> {
    let failure = |message: String, transient: bool| DataError::Download {
        url: url.to_string(),
        message,
        transient,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(300))
        .build()
        .map_err(|err| failure(err.to_string(), false))?;
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|err| failure(err.to_string(), true))?;
    let status = response.status();
    if !status.is_success() {
        let transient = status.is_server_error() || status.as_u16() == 429;
        return Err(failure(format!("HTTP {status}"), transient));
    }
    if response
        .content_length()
        .is_some_and(|length| length > MAX_DOWNLOAD_BYTES)
    {
        return Err(failure(
            format!("larger than {MAX_DOWNLOAD_BYTES} bytes"),
            false,
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| failure(err.to_string(), true))?
    {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > MAX_DOWNLOAD_BYTES {
            return Err(failure(
                format!("larger than {MAX_DOWNLOAD_BYTES} bytes"),
                false,
            ));
        }
    }
    Ok(body)
}

/// A parsed CSV: features row-major, plus the label column.
struct Table {
    name: String,
    features: usize,
    values: Vec<f32>,
    labels: Vec<f32>,
}

fn parse_csv(bytes: &[u8], source_name: &str, label: Option<&str>) -> Result<Table, DataError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|err| DataError::content(source_name, format!("invalid header row: {err}")))?
        .clone();
    if headers.is_empty() || (headers.len() == 1 && headers[0].trim().is_empty()) {
        return Err(DataError::content(
            source_name,
            "empty file, expected a header row and data rows",
        ));
    }
    if headers.len() < 2 {
        return Err(DataError::content(
            source_name,
            "one column, expected at least one feature column and a label column",
        ));
    }
    let label_index = match label {
        None => headers.len() - 1,
        Some(label) => headers
            .iter()
            .position(|name| name.trim() == label)
            .ok_or_else(|| {
                let columns = headers.iter().take(20).collect::<Vec<_>>().join(", ");
                DataError::content(
                    source_name,
                    format!("label column {label:?} not found; columns are: {columns}"),
                )
            })?,
    };

    let mut values = Vec::new();
    let mut labels = Vec::new();
    for (row_index, record) in reader.records().enumerate() {
        // Line numbers count the header as line 1.
        let line = row_index + 2;
        let record =
            record.map_err(|err| DataError::content(source_name, format!("line {line}: {err}")))?;
        for (column, cell) in record.iter().enumerate() {
            let number: f32 = cell.trim().parse().map_err(|_| {
                DataError::content(
                    source_name,
                    format!(
                        "line {line}, column {:?}: {cell:?} is not a number; every cell must be numeric",
                        &headers[column]
                    ),
                )
            })?;
            if !number.is_finite() {
                return Err(DataError::content(
                    source_name,
                    format!(
                        "line {line}, column {:?}: {cell:?} is not finite",
                        &headers[column]
                    ),
                ));
            }
            if column == label_index {
                labels.push(number);
            } else {
                values.push(number);
            }
        }
    }
    if labels.is_empty() {
        return Err(DataError::content(
            source_name,
            "no data rows after the header",
        ));
    }
    Ok(Table {
        name: source_name.to_string(),
        features: headers.len() - 1,
        values,
        labels,
    })
}

/// Splits a table into train and test with the task's seed, stratified by class for classification.
fn split(
    table: Table,
    loss: Loss,
    test_fraction: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Dataset, DataError> {
    let rows = table.labels.len();
    let classes = if loss.is_classification() {
        count_classes(&table, loss)?
    } else {
        0
    };

    let (mut train_rows, mut test_rows) = (Vec::new(), Vec::new());
    if loss.is_classification() {
        let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (row, label) in table.labels.iter().enumerate() {
            by_class.entry(*label as u32).or_default().push(row);
        }
        for mut members in by_class.into_values() {
            members.shuffle(rng);
            let test_count = test_count(members.len(), test_fraction);
            test_rows.extend_from_slice(&members[..test_count]);
            train_rows.extend_from_slice(&members[test_count..]);
        }
    } else {
        let mut order: Vec<usize> = (0..rows).collect();
        order.shuffle(rng);
        let test_count = test_count(rows, test_fraction);
        test_rows.extend_from_slice(&order[..test_count]);
        train_rows.extend_from_slice(&order[test_count..]);
    }
    if train_rows.len() < 2 || test_rows.is_empty() {
        return Err(DataError::content(
            &table.name,
            format!(
                "{rows} rows split into {} train and {} test rows with test_fraction {test_fraction}; \
                 expected at least 2 train rows and 1 test row",
                train_rows.len(),
                test_rows.len()
            ),
        ));
    }
    train_rows.shuffle(rng);
    test_rows.shuffle(rng);

    let gather = |rows: &[usize]| {
        let mut x = Vec::with_capacity(rows.len() * table.features);
        let mut y = Vec::with_capacity(rows.len());
        for &row in rows {
            x.extend_from_slice(&table.values[row * table.features..(row + 1) * table.features]);
            y.push(table.labels[row]);
        }
        (x, y)
    };
    let (x_train, y_train) = gather(&train_rows);
    let (x_test, y_test) = gather(&test_rows);
    Ok(Dataset {
        name: table.name.clone(),
        features: table.features,
        classes,
        x_train,
        y_train,
        x_test,
        y_test,
    })
}

/// Rows of one group that go to the test split; at least one when the group has two or more.
fn test_count(rows: usize, test_fraction: f64) -> usize {
    let count = (rows as f64 * test_fraction).round() as usize;
    if rows >= 2 {
        count.clamp(1, rows - 1)
    } else {
        0
    }
}

fn count_classes(table: &Table, loss: Loss) -> Result<usize, DataError> {
    let mut max_label = 0u32;
    for (row, label) in table.labels.iter().enumerate() {
        if *label < 0.0 || label.fract() != 0.0 || *label > 100_000.0 {
            return Err(DataError::content(
                &table.name,
                format!(
                    "label {label} on line {}: a classification loss needs whole-number labels 0..K-1",
                    row + 2
                ),
            ));
        }
        max_label = max_label.max(*label as u32);
    }
    if loss == Loss::BinaryCrossentropy && max_label > 1 {
        return Err(DataError::content(
            &table.name,
            format!("label {max_label} found, but binary_crossentropy needs labels 0 and 1"),
        ));
    }
    Ok((max_label as usize + 1).max(2))
}

/// Scales features in place with statistics of the training split only.
fn normalize(dataset: &mut Dataset, normalization: Normalization) {
    let features = dataset.features;
    let rows = dataset.train_rows();
    if normalization == Normalization::None || rows == 0 {
        return;
    }
    let column = |feature: usize| {
        dataset
            .x_train
            .iter()
            .skip(feature)
            .step_by(features)
            .copied()
    };

    let (offset, scale): (Vec<f32>, Vec<f32>) = (0..features)
        .map(|feature| match normalization {
            Normalization::Standard => {
                let mean = column(feature).map(f64::from).sum::<f64>() / rows as f64;
                let variance = column(feature)
                    .map(|value| (f64::from(value) - mean).powi(2))
                    .sum::<f64>()
                    / rows as f64;
                let std = variance.sqrt();
                // A constant column would divide by zero; leave it centred but unscaled.
                (mean as f32, if std > 1e-12 { std as f32 } else { 1.0 })
            }
            Normalization::Minmax => {
                let min = column(feature).fold(f32::INFINITY, f32::min);
                let max = column(feature).fold(f32::NEG_INFINITY, f32::max);
                let range = max - min;
                (min, if range > 1e-12 { range } else { 1.0 })
            }
            Normalization::None => (0.0, 1.0),
        })
        .unzip();

    for values in [&mut dataset.x_train, &mut dataset.x_test] {
        for (index, value) in values.iter_mut().enumerate() {
            let feature = index % features;
            *value = (*value - offset[feature]) / scale[feature];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(text: &str, label: Option<&str>) -> Result<Table, DataError> {
        parse_csv(text.as_bytes(), "test.csv", label)
    }

    #[test]
    fn csv_missing_label_column() {
        let message = classify("a,b\n1,2\n", Some("target"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("label column \"target\" not found"),
            "{message}"
        );
    }

    #[test]
    fn csv_non_numeric_cell() {
        let message = classify("a,b\n1,2\n3,x\n", None).err().unwrap().to_string();
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("\"x\" is not a number"), "{message}");
    }

    #[test]
    fn csv_empty_file() {
        let message = classify("", None).err().unwrap().to_string();
        assert!(message.contains("empty file"), "{message}");
    }

    #[test]
    fn csv_header_only() {
        let message = classify("a,b\n", None).err().unwrap().to_string();
        assert!(message.contains("no data rows"), "{message}");
    }

    #[test]
    fn split_is_stratified() {
        let table = parse_csv(example_csv(ExampleDataset::Iris).as_bytes(), "iris", None).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let dataset = split(table, Loss::SparseCategoricalCrossentropy, 0.2, &mut rng).unwrap();
        assert_eq!(dataset.test_rows(), 30);
        for class in 0..3 {
            let in_test = dataset
                .y_test
                .iter()
                .filter(|label| **label as usize == class)
                .count();
            assert_eq!(in_test, 10, "class {class}");
        }
    }

    #[test]
    fn standard_normalization_uses_train_split() {
        let mut dataset = Dataset {
            name: "t".into(),
            features: 1,
            classes: 0,
            x_train: vec![1.0, 3.0],
            y_train: vec![0.0, 0.0],
            x_test: vec![5.0],
            y_test: vec![0.0],
        };
        normalize(&mut dataset, Normalization::Standard);
        assert_eq!(dataset.x_train, vec![-1.0, 1.0]);
        assert_eq!(dataset.x_test, vec![3.0]);
    }

    #[test]
    fn classification_label_must_be_whole() {
        let table = classify("a,y\n1,0.5\n2,1\n3,0\n", None).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let message = split(table, Loss::BinaryCrossentropy, 0.2, &mut rng)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("whole-number labels"), "{message}");
    }

    #[test]
    fn synthetic_matches_original_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let dataset = synthetic(1000, 100, 20, 2, Loss::BinaryCrossentropy, &mut rng);
        assert_eq!(dataset.x_train.len(), 20_000);
        assert_eq!(dataset.y_test.len(), 100);
        assert!(dataset
            .y_train
            .iter()
            .all(|label| *label == 0.0 || *label == 1.0));
    }
}
