//! `UNetModel`.

use crate::nn::{conv2d_forward, group_norm_silu};
use burn::module::Module;
use burn::nn::activation::SiLU;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor};

use super::attention_block::AttentionBlock;
use super::blocks::{Downsample, ResBlock, ResBlockConfig, Upsample, normalization};
use super::config::UNetConfig;
use super::embedding::timestep_embedding;
use crate::error::{Error, Result};
use crate::models::attention::{SpatialTransformer, SpatialTransformerConfig};
use crate::nn::attention::AttentionMode;
use crate::nn::conv2d;

/// One layer of a `TimestepEmbedSequential`.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum UNetLayer {
    /// The input conv (`input_blocks.0.0`).
    Conv(Conv2d),
    /// Residual block (takes the time embedding).
    Res(ResBlock),
    /// Spatial transformer (takes the context).
    Transformer(SpatialTransformer),
    /// Legacy self-attention block.
    Attention(AttentionBlock),
    /// Downsampling layer.
    Down(Downsample),
    /// Upsampling layer.
    Up(Upsample),
}

impl UNetLayer {
    fn forward(&self, x: Tensor<4>, emb: &Tensor<2>, context: &Option<Tensor<3>>) -> Tensor<4> {
        match self {
            Self::Conv(c) => conv2d_forward(c, x),
            Self::Res(r) => r.forward(x, emb.clone()),
            Self::Transformer(t) => t.forward(x, context.clone()),
            Self::Attention(a) => a.forward(x),
            Self::Down(d) => d.forward(x),
            Self::Up(u) => u.forward(x),
        }
    }

    fn set_attention_mode(&mut self, mode: AttentionMode) {
        match self {
            Self::Transformer(t) => t.set_attention_mode(mode),
            Self::Attention(a) => a.attention_mode = mode,
            _ => {}
        }
    }
}

fn run(
    block: &[UNetLayer],
    x: Tensor<4>,
    emb: &Tensor<2>,
    context: &Option<Tensor<3>>,
) -> Tensor<4> {
    block
        .iter()
        .fold(x, |h, layer| layer.forward(h, emb, context))
}

/// The denoiser ε_θ(x_t, t, c) of LDM: `forward(x, timesteps, context, y)`.
#[derive(Module, Debug)]
pub struct UNetModel {
    /// Linear, SiLU, Linear on the sinusoidal embedding (`time_embed.0`, `time_embed.2`).
    pub time_embed: (Linear, SiLU, Linear),
    /// Class embedding added to the time embedding (`num_classes`).
    pub label_emb: Option<Embedding>,
    /// Encoder half; each entry's output is kept for the skip connections.
    pub input_blocks: Vec<Vec<UNetLayer>>,
    /// ResBlock, attention, ResBlock.
    pub middle_block: Vec<UNetLayer>,
    /// Decoder half; each entry first concatenates a skip.
    pub output_blocks: Vec<Vec<UNetLayer>>,
    /// GroupNorm32, SiLU, 3x3 conv.
    pub out: (GroupNorm, SiLU, Conv2d),
    model_channels: usize,
    in_channels: usize,
    levels: usize,
    num_classes: Option<usize>,
    context_dim: Option<usize>,
    image_size: usize,
    out_channels: usize,
}

impl UNetConfig {
    /// Builds the UNet (parameters are lazy: nothing is allocated until used or loaded).
    pub fn init(&self, device: &Device) -> Result<UNetModel> {
        self.validate()?;
        let mc = self.model_channels;
        let ted = 4 * mc;
        let res = |ch: usize, out: usize, up: bool, down: bool| -> UNetLayer {
            UNetLayer::Res(
                ResBlockConfig::new(ch, ted)
                    .with_out_channels(Some(out))
                    .with_dropout(self.dropout)
                    .with_use_scale_shift_norm(self.use_scale_shift_norm)
                    .with_up(up)
                    .with_down(down)
                    .init(device),
            )
        };
        let num_heads_upsample = if self.num_heads_upsample == -1 {
            self.num_heads
        } else {
            self.num_heads_upsample
        };
        // The reference's head arithmetic, `legacy` quirks included.
        let attention = |ch: usize, upsample: bool| -> Result<UNetLayer> {
            let c = ch as isize;
            let (mut num_heads, mut dim_head) = (self.num_heads, self.num_head_channels);
            if self.num_head_channels == -1 {
                dim_head = c / num_heads;
            } else {
                num_heads = c / self.num_head_channels;
            }
            if self.legacy {
                dim_head = if self.use_spatial_transformer {
                    c / num_heads
                } else {
                    self.num_head_channels
                };
            }
            if self.use_spatial_transformer {
                if num_heads <= 0 || dim_head <= 0 {
                    return Err(Error::Config(format!(
                        "cannot split {ch} channels into heads"
                    )));
                }
                let st = SpatialTransformerConfig::new(ch, num_heads as usize, dim_head as usize)
                    .with_depth(self.transformer_depth)
                    .with_dropout(self.dropout)
                    .with_context_dim(self.context_dim)
                    .with_use_linear(self.use_linear_in_transformer)
                    .init(device);
                Ok(UNetLayer::Transformer(st))
            } else {
                let heads = if upsample {
                    num_heads_upsample
                } else {
                    num_heads
                };
                Ok(UNetLayer::Attention(AttentionBlock::new(
                    ch,
                    heads,
                    dim_head,
                    self.use_new_attention_order,
                    device,
                )?))
            }
        };

        let mut input_blocks = vec![vec![UNetLayer::Conv(conv2d(
            self.in_channels,
            mc,
            3,
            1,
            device,
        ))]];
        let mut chans = vec![mc];
        let mut ch = mc;
        let mut ds = 1;
        let levels = self.channel_mult.len();
        for (level, mult) in self.channel_mult.iter().enumerate() {
            for _ in 0..self.num_res_blocks {
                let mut layers = vec![res(ch, mult * mc, false, false)];
                ch = mult * mc;
                if self.attention_resolutions.contains(&ds) {
                    layers.push(attention(ch, false)?);
                }
                input_blocks.push(layers);
                chans.push(ch);
            }
            if level != levels - 1 {
                let down = if self.resblock_updown {
                    res(ch, ch, false, true)
                } else {
                    UNetLayer::Down(Downsample::new(ch, self.conv_resample, ch, device))
                };
                input_blocks.push(vec![down]);
                chans.push(ch);
                ds *= 2;
            }
        }
        let middle_block = vec![
            res(ch, ch, false, false),
            attention(ch, false)?,
            res(ch, ch, false, false),
        ];
        let mut output_blocks = Vec::new();
        for (level, mult) in self.channel_mult.iter().enumerate().rev() {
            for i in 0..=self.num_res_blocks {
                let ich = chans.pop().expect("one skip per input block");
                let mut layers = vec![res(ch + ich, mc * mult, false, false)];
                ch = mc * mult;
                if self.attention_resolutions.contains(&ds) {
                    layers.push(attention(ch, true)?);
                }
                if level > 0 && i == self.num_res_blocks {
                    layers.push(if self.resblock_updown {
                        res(ch, ch, true, false)
                    } else {
                        UNetLayer::Up(Upsample::new(ch, self.conv_resample, ch, device))
                    });
                    ds /= 2;
                }
                output_blocks.push(layers);
            }
        }
        Ok(UNetModel {
            time_embed: (
                LinearConfig::new(mc, ted).init(device),
                SiLU::new(),
                LinearConfig::new(ted, ted).init(device),
            ),
            label_emb: self
                .num_classes
                .map(|n| EmbeddingConfig::new(n, ted).init(device)),
            input_blocks,
            middle_block,
            output_blocks,
            out: (
                normalization(ch, device),
                SiLU::new(),
                conv2d(mc, self.out_channels, 3, 1, device),
            ),
            model_channels: mc,
            in_channels: self.in_channels,
            levels,
            num_classes: self.num_classes,
            context_dim: self.context_dim,
            image_size: self.image_size,
            out_channels: self.out_channels,
        })
    }
}

impl UNetModel {
    /// Predicts the model output (ε, x₀ or v by training) for `x` `[B, in_channels, H, W]` at
    /// `timesteps` `[B]` (float; fractional allowed), with cross-attention `context` `[B, L, context_dim]`
    /// and class labels `y` `[B]` where the model uses them. H and W must be multiples of
    /// `2^(levels-1)`. Panics on inconsistent inputs; use [`try_forward`](Self::try_forward) for errors.
    pub fn forward(
        &self,
        x: Tensor<4>,
        timesteps: Tensor<1>,
        context: Option<Tensor<3>>,
        y: Option<Tensor<1, Int>>,
    ) -> Tensor<4> {
        // Reduced precision: the embedding and context follow the weights' dtype.
        let dtype: burn::tensor::FloatDType = x.dtype().into();
        let t_emb = timestep_embedding(timesteps, self.model_channels, 10000.0).cast(dtype);
        let context = context.map(|c| c.cast(dtype));
        let mut emb = self
            .time_embed
            .2
            .forward(self.time_embed.1.forward(self.time_embed.0.forward(t_emb)));
        if let (Some(label_emb), Some(y)) = (&self.label_emb, y) {
            let b = y.dims()[0];
            let e = label_emb.forward(y.reshape([b, 1]));
            let d = e.dims()[2];
            emb = emb + e.reshape([b, d]);
        }
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = x;
        for block in &self.input_blocks {
            h = run(block, h, &emb, &context);
            hs.push(h.clone());
        }
        h = run(&self.middle_block, h, &emb, &context);
        for block in &self.output_blocks {
            let skip = hs.pop().expect("one skip per output block");
            h = run(block, Tensor::cat(vec![h, skip], 1), &emb, &context);
        }
        conv2d_forward(&self.out.2, group_norm_silu(&self.out.0, h, true))
    }

    /// [`forward`](Self::forward) after checking shapes and the presence of context / labels.
    pub fn try_forward(
        &self,
        x: Tensor<4>,
        timesteps: Tensor<1>,
        context: Option<Tensor<3>>,
        y: Option<Tensor<1, Int>>,
    ) -> Result<Tensor<4>> {
        self.check_inputs(&x, &timesteps, context.as_ref(), y.as_ref())?;
        Ok(self.forward(x, timesteps, context, y))
    }

    /// The checks of [`try_forward`](Self::try_forward).
    pub fn check_inputs(
        &self,
        x: &Tensor<4>,
        t: &Tensor<1>,
        context: Option<&Tensor<3>>,
        y: Option<&Tensor<1, Int>>,
    ) -> Result<()> {
        let [b, c, h, w] = x.dims();
        let f = 1 << (self.levels - 1);
        if c != self.in_channels || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(Error::Shape {
                what: "UNet input x".into(),
                expected: format!("[B, {}, H, W] with H, W multiples of {f}", self.in_channels),
                got: x.dims().to_vec(),
            });
        }
        if t.dims()[0] != b {
            return Err(Error::Shape {
                what: "timesteps".into(),
                expected: format!("[{b}]"),
                got: t.dims().to_vec(),
            });
        }
        match (self.context_dim, context) {
            (Some(d), Some(ctx)) if ctx.dims()[0] != b || ctx.dims()[2] != d => {
                return Err(Error::Shape {
                    what: "context".into(),
                    expected: format!("[{b}, L, {d}]"),
                    got: ctx.dims().to_vec(),
                });
            }
            (Some(d), None) => {
                return Err(Error::Config(format!(
                    "this UNet needs a cross-attention context [B, L, {d}]"
                )));
            }
            (None, Some(_)) => {
                return Err(Error::Config(
                    "this UNet takes no cross-attention context".into(),
                ));
            }
            _ => {}
        }
        match (self.num_classes, y) {
            (Some(_), Some(y)) if y.dims()[0] != b => {
                return Err(Error::Shape {
                    what: "class labels y".into(),
                    expected: format!("[{b}]"),
                    got: y.dims().to_vec(),
                });
            }
            (Some(n), None) => {
                return Err(Error::Config(format!(
                    "this UNet is class-conditional ({n} classes) and needs y"
                )));
            }
            (None, Some(_)) => {
                return Err(Error::Config(
                    "this UNet is not class-conditional; y must be None".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// The dtype of the weights (f32 unless cast for reduced precision).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.time_embed.0.weight.val().dtype()
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// The nominal latent size of the config (`image_size`).
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Latent height and width must be multiples of this (`2^(levels − 1)`).
    pub fn spatial_multiple(&self) -> usize {
        1 << (self.levels - 1)
    }

    /// Cross-attention context width, if the UNet has cross-attention.
    pub fn context_dim(&self) -> Option<usize> {
        self.context_dim
    }

    /// Sets how every attention layer runs (fused, sliced, or automatic by memory).
    pub fn set_attention_mode(&mut self, mode: AttentionMode) {
        let blocks = self
            .input_blocks
            .iter_mut()
            .chain(std::iter::once(&mut self.middle_block))
            .chain(self.output_blocks.iter_mut());
        for block in blocks {
            for layer in block.iter_mut() {
                layer.set_attention_mode(mode);
            }
        }
    }
}
