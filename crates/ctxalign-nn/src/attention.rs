//! Scaled dot-product attention that returns its probabilities and keeps gradients.

use candle_core::{Result, Tensor};

use crate::ops::scaled_masked_softmax;

/// Context vectors and the attention probabilities that produced them.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `[batch, heads, queries, head_dim]`
    pub context: Tensor,
    /// `[batch, heads, queries, keys]`
    pub probs: Tensor,
}

/// `softmax(q kᵀ · scale + mask) v` over `[batch, heads, len, head_dim]` tensors.
///
/// `additive_mask` is broadcast onto the scores (`[batch, 1, 1, keys]` for padding masks; 0 keeps,
/// a large negative value removes). The batch dimensions of `q` and `k`/`v` may differ when one of
/// them is 1: one text against N images (or one image against N texts) then shares the single side
/// instead of copying it N times.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    additive_mask: Option<&Tensor>,
    scale: f64,
) -> Result<AttentionOutput> {
    // The scale and the mask are applied inside the softmax's single pass over the scores, so the
    // graph keeps one scores-sized tensor (the raw scores) besides the probabilities.
    let scores = q.broadcast_matmul(&k.t()?)?;
    let probs = scaled_masked_softmax(&scores, additive_mask, scale)?;
    let context = probs.broadcast_matmul(v)?;
    Ok(AttentionOutput { context, probs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn matches_explicit_formula_and_masks_keys() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev)?;
        let mask = Tensor::new(&[0f32, 0., 0., -10000., -10000.], &dev)?.reshape((1, 1, 1, 5))?;
        let out = scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.5)?;
        // Independent computation, element by element.
        let qf = q.flatten_to(1)?.to_vec3::<f32>()?;
        let kf = k.flatten_to(1)?.to_vec3::<f32>()?;
        let vf = v.flatten_to(1)?.to_vec3::<f32>()?;
        let ctx = out.context.flatten_to(1)?.to_vec3::<f32>()?;
        for h in 0..2 {
            for i in 0..3 {
                let s: Vec<f32> = (0..5)
                    .map(|j| {
                        let dot: f32 = (0..4).map(|d| qf[h][i][d] * kf[h][j][d]).sum();
                        dot * 0.5 + if j >= 3 { -10000.0 } else { 0.0 }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..4 {
                    let want: f32 = (0..5).map(|j| e[j] / z * vf[h][j][d]).sum();
                    assert!((want - ctx[h][i][d]).abs() < 1e-5);
                }
            }
        }
        let masked = out.probs.narrow(D::Minus1, 3, 2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(masked < 1e-6);
        Ok(())
    }
}
