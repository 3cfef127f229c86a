//! All-gather with a backward: the gathered tensor's gradient, summed over the ranks, returns to
//! each rank for its own rows.
//!
//! Why summed: with `local` the loss a rank computes from the gathered features, rank r's rows
//! influence every rank's loss; their gradient is `Σ_k ∂L_k/∂rows_r`. The loop then averages the
//! parameter gradients over the ranks, which yields `∂(mean_k L_k)/∂θ` — the gradient one process
//! computes when it holds the whole batch and its loss is the mean of the per-rank losses (or the
//! global loss itself, when every rank computes the same one).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{Communicator, ReduceOp, Result};

/// `forward(x, gathered)` returns `gathered` (a copy); `backward` gives `x` its rows of the
/// all-reduced gradient and `gathered` nothing (it was computed without a graph).
struct GatherBackward {
    comm: Communicator,
    rows: usize,
}

fn copy_of(layout: &Layout) -> candle_core::Result<Shape> {
    // `gathered` is a fresh, contiguous tensor made by the collective; its storage is its value.
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("all-gather-with-grad: the gathered tensor is not a fresh contiguous tensor");
    }
    Ok(layout.shape().clone())
}

impl CustomOp2 for GatherBackward {
    fn name(&self) -> &'static str {
        "all-gather-with-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        gathered: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = copy_of(layout)?;
        Ok((gathered.try_clone(layout)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        gathered: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let shape = copy_of(layout)?;
        Ok((gathered.try_clone(layout)?, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _gathered: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let summed = self.comm.all_reduce(grad, ReduceOp::Sum)?;
        let mine = summed.narrow(0, self.comm.rank() * self.rows, self.rows)?;
        Ok((Some(mine), None))
    }
}

pub(super) fn all_gather_with_grad(comm: &Communicator, x: &Tensor) -> Result<Tensor> {
    let gathered = comm.all_gather(&x.detach())?;
    let rows = x.dim(0)?;
    Ok(x.apply_op2(&gathered, GatherBackward { comm: comm.clone(), rows })?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use candle_core::{Device, Var};

    use super::super::run_in_process;
    use super::*;

    /// Two ranks each gather features with grad and compute the same global loss `Σ w ⊙ G²`; each
    /// rank's gradient is the world size times its rows of `2 w ⊙ G` (every rank's loss reaches
    /// it), so the mean over ranks is the single-process gradient.
    #[test]
    fn the_backward_sums_every_ranks_gradient_of_my_rows() {
        let world = 3;
        let grads = run_in_process(world, Duration::from_secs(20), |comm| -> Result<Vec<f32>> {
            let r = comm.rank() as f32;
            let x = Var::new(&[[1.0 + r, 2.0 + r]], &Device::Cpu)?;
            let g = comm.all_gather_with_grad(x.as_tensor())?;
            let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu)?;
            let loss = (g.sqr()? * w)?.sum_all()?;
            let grad = loss.backward()?.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
            Ok(grad)
        })
        .into_result()
        .unwrap();
        let w = [[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
        for (r, grad) in grads.iter().enumerate() {
            let x = [1.0 + r as f32, 2.0 + r as f32];
            let expected: Vec<f32> = (0..2).map(|j| world as f32 * 2.0 * w[r][j] * x[j]).collect();
            assert_eq!(grad, &expected, "rank {r}");
        }
    }

    /// A loss local to each rank (its rows against all gathered rows): the gradient of a rank's rows
    /// sums what every rank's loss contributes — the world size times what one process holding all
    /// rows gets for them from the mean of the local losses (the loop's mean over ranks divides it
    /// back).
    #[test]
    fn local_losses_average_to_the_single_process_gradient() {
        let world = 2;
        let data = [[0.5f32, -1.0], [2.0, 0.25], [-0.75, 1.5], [1.0, 1.0]]; // 2 rows per rank
        let local = |mine: &Tensor, all: &Tensor| -> candle_core::Result<Tensor> {
            // Σ over my rows of log Σ_j exp(mine · all_j): an InfoNCE-like term.
            let logits = mine.matmul(&all.t()?)?;
            logits.exp()?.sum(1)?.log()?.sum_all()
        };
        // One process, all rows, the mean of the two ranks' local losses: each rank's rows keep
        // their gradient, mean-divided.
        let x = Var::new(&data, &Device::Cpu).unwrap();
        let loss = (local(x.as_tensor(), x.as_tensor()).unwrap() / world as f64).unwrap();
        let single =
            loss.backward().unwrap().get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Gradients of each rank's own rows, before averaging, equal the single process's rows
        // scaled by the world size (the mean loss divides by it).
        let own = run_in_process(world, Duration::from_secs(20), |comm| -> Result<Vec<f32>> {
            let r = comm.rank();
            let x = Var::new(&[data[2 * r], data[2 * r + 1]], &Device::Cpu)?;
            let all = comm.all_gather_with_grad(x.as_tensor())?;
            let g = local(x.as_tensor(), &all)?.backward()?.get(x.as_tensor()).unwrap().flatten_all()?;
            Ok(g.to_vec1()?)
        })
        .into_result()
        .unwrap();
        for (r, got) in own.iter().enumerate() {
            for (a, b) in got.iter().zip(&single[4 * r..4 * r + 4]) {
                assert!((a / world as f32 - b).abs() < 1e-5, "rank {r}: {a} vs {b}");
            }
        }
    }
}
