//! `ClassEmbedder`: a class label becomes a cross-attention context of length 1.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::{Device, Int, Tensor};

/// `ClassEmbedder(embed_dim, n_classes)`; key `embedding.weight` `[n_classes, embed_dim]`.
///
/// For classifier-free guidance the CompVis ImageNet models reserve one extra class as
/// "unconditional" (`cin256-v2`: 1001 classes, label 1000): pass it as the unconditional label.
#[derive(Module, Debug)]
pub struct ClassEmbedder {
    /// The label table.
    pub embedding: Embedding,
    unconditional_label: Option<usize>,
}

impl ClassEmbedder {
    /// Builds the embedder.
    pub fn new(embed_dim: usize, n_classes: usize, device: &Device) -> Self {
        Self {
            embedding: EmbeddingConfig::new(n_classes, embed_dim).init(device),
            unconditional_label: None,
        }
    }

    /// Declares which label means "no class" (e.g. 1000 for `cin256-v2`'s 1001 classes).
    pub fn with_unconditional_label(mut self, label: Option<usize>) -> Self {
        self.unconditional_label = label;
        self
    }

    /// The label that means "no class", if the model has one.
    pub fn unconditional_label(&self) -> Option<usize> {
        self.unconditional_label
    }

    /// The unconditional context `[B, 1, embed_dim]` for classifier-free guidance.
    pub fn unconditional(&self, batch: usize) -> crate::Result<Tensor<3>> {
        let label = self.unconditional_label.ok_or_else(|| {
            crate::Error::Config("this class embedder has no unconditional label; set one with with_unconditional_label".into())
        })?;
        let device = self.embedding.weight.device();
        self.try_forward(Tensor::<1, Int>::full([batch], label as i64, &device))
    }

    /// Number of classes (including an unconditional one, if the model has it).
    pub fn n_classes(&self) -> usize {
        self.embedding.weight.shape()[0]
    }

    /// Labels `[B]` → context `[B, 1, embed_dim]`.
    pub fn forward(&self, labels: Tensor<1, Int>) -> Tensor<3> {
        let b = labels.dims()[0];
        self.embedding.forward(labels.reshape([b, 1]))
    }

    /// [`forward`](Self::forward) with a range check of the labels.
    pub fn try_forward(&self, labels: Tensor<1, Int>) -> crate::Result<Tensor<3>> {
        let n = self.n_classes() as i64;
        let (min, max) = (
            labels.clone().min().into_scalar::<i64>(),
            labels.clone().max().into_scalar::<i64>(),
        );
        if min < 0 || max >= n {
            return Err(crate::Error::Config(format!(
                "class label out of range [0, {n}): saw {min}..={max}"
            )));
        }
        Ok(self.forward(labels))
    }
}
