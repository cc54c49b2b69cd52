//! Conditioning encoders: what turns a prompt or a label into the UNet's cross-attention context.
//!
//! | reference | here |
//! |---|---|
//! | `FrozenCLIPEmbedder` (HF `CLIPTokenizer` + `CLIPTextModel`) | [`TextTokenizer`] + [`ClipTextModel`] |
//! | `BERTEmbedder` (`BERTTokenizer` + x-transformers `TransformerWrapper`) | [`TextTokenizer`] + [`TransformerWrapper`] |
//! | `ClassEmbedder` | [`ClassEmbedder`] |

mod bert;
mod class_embedder;
mod clip;
mod tokenizer;

pub use bert::{AttentionLayers, BertEmbedderConfig, TransformerWrapper, XAttention, XBlock};
pub use class_embedder::ClassEmbedder;
pub use clip::{ClipActivation, ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use tokenizer::{MAX_LENGTH, TextTokenizer, Tokenized, TokenizerKind};

/// Checks a `[B, L]` batch of token ids: `1 ≤ L ≤ max_len` and every id in `[0, vocab_size)`.
pub(crate) fn check_token_ids(
    ids: &burn::tensor::Tensor<2, burn::tensor::Int>,
    what: &str,
    max_len: usize,
    vocab_size: usize,
) -> crate::Result<()> {
    let [_, l] = ids.dims();
    if l == 0 || l > max_len {
        return Err(crate::Error::Shape {
            what: what.into(),
            expected: format!("[B, 1..={max_len}]"),
            got: ids.dims().to_vec(),
        });
    }
    let max = ids.clone().max().into_scalar::<i64>();
    let min = ids.clone().min().into_scalar::<i64>();
    if min < 0 || max as usize >= vocab_size {
        return Err(crate::Error::Config(format!(
            "token id out of range [0, {vocab_size}): saw {min}..={max}"
        )));
    }
    Ok(())
}
