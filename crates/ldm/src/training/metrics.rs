//! Named scalar outputs of a training step and a generic numeric metric over one of them, so every
//! logged loss term (rec, nll, kl, g_loss, d_loss, d_weight, PSNR, ...) gets its own curve in Burn's
//! dashboard.

use std::sync::Arc;

use burn::tensor::{ExecutionError, TensorReadError};
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, ItemLazy, Metric, MetricAttributes, MetricMetadata, MetricName, Numeric,
    NumericAttributes, NumericEntry, SerializedEntry,
};

/// The scalars of one step (already on the host).
#[derive(Debug, Clone, Default)]
pub struct Scalars {
    /// (name, value) pairs.
    pub values: Vec<(&'static str, f64)>,
    /// Batch size (the metrics' weight).
    pub batch: usize,
}

impl Scalars {
    /// One value.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

impl ItemLazy for Scalars {
    fn sync(self) -> Result<Self, ExecutionError> {
        Ok(self)
    }
}

impl Adaptor<Scalars> for Scalars {
    fn adapt(&self) -> Scalars {
        self.clone()
    }
}

/// A numeric metric reading the scalar `key` of [`Scalars`].
#[derive(Clone)]
pub struct ScalarMetric {
    name: Arc<String>,
    key: &'static str,
    higher_is_better: bool,
    state: NumericMetricState,
}

impl ScalarMetric {
    /// A metric displayed as `key`.
    pub fn new(key: &'static str) -> Self {
        Self {
            name: Arc::new(key.to_string()),
            key,
            higher_is_better: key == "psnr",
            state: NumericMetricState::default(),
        }
    }
}

impl Metric for ScalarMetric {
    type Input = Scalars;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(
        &mut self,
        item: &Scalars,
        _metadata: &MetricMetadata,
    ) -> Result<SerializedEntry, TensorReadError> {
        if let Some(v) = item.get(self.key) {
            self.state.update(v, item.batch.max(1));
        }
        Ok(self
            .state
            .compute_update(FormatOptions::new(self.name.clone()).precision(4)))
    }

    fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
        Ok(self
            .state
            .compute_final(FormatOptions::new(self.name.clone()).precision(4)))
    }

    fn clear(&mut self) {
        self.state.reset()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: None,
            higher_is_better: self.higher_is_better,
        }
        .into()
    }
}

impl Numeric for ScalarMetric {
    fn value(&self) -> Option<NumericEntry> {
        Some(self.state.current_value())
    }

    fn running_value(&self) -> Option<NumericEntry> {
        Some(self.state.running_value())
    }

    fn final_value(&self) -> NumericEntry {
        self.state.final_value()
    }
}
