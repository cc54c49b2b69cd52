//! Sinusoidal timestep embedding of the UNet.

use burn::tensor::{Tensor, TensorData};

/// `timestep_embedding(t, dim, max_period)` of CompVis `util.py`: `half = dim / 2`,
/// `freqs_i = exp(-ln(max_period) · i / half)` (divisor `half`), output `[cos(t·f) | sin(t·f)]`
/// (**cos first**), a zero column appended when `dim` is odd. `t` `[B]` (may be fractional) → `[B, dim]`.
pub fn timestep_embedding(t: Tensor<1>, dim: usize, max_period: f64) -> Tensor<2> {
    let device = t.device();
    let half = dim / 2;
    // f32 arithmetic in the reference's order: (-ln(P) * i) / half, then exp.
    let neg_log = -(max_period.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (neg_log * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::<2>::from_data(TensorData::new(freqs, [1, half]), &device);
    let args = t.unsqueeze_dim::<2>(1) * freqs; // [B, half]
    let emb = Tensor::cat(vec![args.clone().cos(), args.sin()], 1);
    if dim % 2 == 1 {
        let b = emb.dims()[0];
        Tensor::cat(vec![emb, Tensor::zeros([b, 1], &device)], 1)
    } else {
        emb
    }
}
