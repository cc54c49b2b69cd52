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
