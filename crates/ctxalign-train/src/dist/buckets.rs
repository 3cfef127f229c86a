//! Gradient averaging in buckets, as DDP does it: the parameters' gradients are packed into flat
//! f32 buffers of about `bucket_bytes` each, one all-reduce per buffer instead of one per tensor.
//!
//! The layout is fixed by the optimizer's parameter order, identical on every rank. A parameter
//! that got no gradient on a rank contributes zeros; one flag per parameter, reduced with the
//! buffers, says whether any rank had a gradient for it — if none did, it stays without one (Adam
//! then skips it, as it would on one process), else it gets the mean with the zeros counted.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{Communicator, ReduceOp, Result};

/// One flat buffer: a run of consecutive parameters.
#[derive(Debug, Clone)]
struct Bucket {
    /// Indices into the parameter list.
    members: std::ops::Range<usize>,
    len: usize,
}

/// The bucket layout of a list of parameters.
#[derive(Debug, Clone)]
pub struct GradientBuckets {
    buckets: Vec<Bucket>,
    /// Per parameter: offset in its bucket, element count.
    spans: Vec<(usize, usize)>,
}

/// What one averaging took.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReduceStats {
    pub buckets: usize,
    pub bytes: usize,
    pub seconds: f64,
}

impl GradientBuckets {
    /// Buckets of about `bucket_bytes` (in f32) over `vars`, in order; a parameter larger than a
    /// bucket has one of its own.
    pub fn new(vars: &[Var], bucket_bytes: usize) -> Self {
        let cap = (bucket_bytes / 4).max(1);
        let mut buckets = vec![];
        let mut spans = Vec::with_capacity(vars.len());
        let (mut start, mut len) = (0, 0);
        for (i, var) in vars.iter().enumerate() {
            let n = var.elem_count();
            if len > 0 && len + n > cap {
                buckets.push(Bucket { members: start..i, len });
                (start, len) = (i, 0);
            }
            spans.push((len, n));
            len += n;
        }
        if start < vars.len() {
            buckets.push(Bucket { members: start..vars.len(), len });
        }
        Self { buckets, spans }
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Replaces every gradient of `vars` (the list the layout was made for) in `grads` by its mean
    /// over the ranks, computed in f32.
    pub fn all_reduce_mean(&self, comm: &Communicator, grads: &mut GradStore, vars: &[Var]) -> Result<ReduceStats> {
        let started = Instant::now();
        let mut stats = ReduceStats::default();
        if !comm.is_distributed() || vars.is_empty() {
            return Ok(stats);
        }
        assert_eq!(vars.len(), self.spans.len(), "the buckets were made for another parameter list");
        // Which parameters have a gradient on any rank.
        let present: Vec<f64> = vars.iter().map(|v| grads.get(v.as_tensor()).is_some() as u8 as f64).collect();
        let present = comm.all_reduce_f64(&present, ReduceOp::Max)?;
        let device = vars[0].device();
        for bucket in &self.buckets {
            let mut parts = Vec::with_capacity(bucket.members.len());
            for i in bucket.members.clone() {
                let var = &vars[i];
                parts.push(match grads.get(var.as_tensor()) {
                    Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                    None => Tensor::zeros(var.elem_count(), DType::F32, device)?,
                });
            }
            let flat = Tensor::cat(&parts, 0)?;
            drop(parts);
            let mean = comm.all_reduce(&flat, ReduceOp::Mean)?;
            for i in bucket.members.clone() {
                let var = &vars[i];
                grads.remove(var.as_tensor());
                if present[i] > 0.0 {
                    let (offset, n) = self.spans[i];
                    grads.insert(var.as_tensor(), mean.narrow(0, offset, n)?.reshape(var.shape())?);
                }
            }
            stats.buckets += 1;
            stats.bytes += bucket.len * 4;
        }
        stats.seconds = started.elapsed().as_secs_f64();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use candle_core::Device;

    use super::super::run_in_process;
    use super::*;

    #[test]
    fn layout_respects_the_cap() {
        let dev = Device::Cpu;
        let vars: Vec<Var> = [3usize, 5, 20, 1, 1].iter().map(|&n| Var::zeros(n, DType::F32, &dev).unwrap()).collect();
        let b = GradientBuckets::new(&vars, 8 * 4);
        let groups: Vec<_> = b.buckets.iter().map(|b| b.members.clone()).collect();
        assert_eq!(groups, vec![0..2, 2..3, 3..5]);
        assert_eq!(b.spans, vec![(0, 3), (3, 5), (0, 20), (0, 1), (1, 1)]);
    }

    #[test]
    fn averages_every_gradient_and_keeps_absent_ones_absent() {
        let world = 3;
        let out = run_in_process(world, Duration::from_secs(20), |comm| -> Result<Vec<Option<Vec<f32>>>> {
            let r = comm.rank() as f32;
            let dev = Device::Cpu;
            let vars: Vec<Var> = [2usize, 3, 4, 2].iter().map(|&n| Var::zeros(n, DType::F32, &dev).unwrap()).collect();
            let mut grads = GradStore::default();
            // var 0: every rank; var 1: rank 0 only; var 2: nobody; var 3: bf16 on every rank.
            grads.insert(vars[0].as_tensor(), Tensor::new(&[r, 2.0 * r], &dev)?);
            if comm.rank() == 0 {
                grads.insert(vars[1].as_tensor(), Tensor::new(&[3f32, 6.0, 9.0], &dev)?);
            }
            grads.insert(vars[3].as_tensor(), Tensor::new(&[1f32, r], &dev)?.to_dtype(DType::BF16)?);
            let stats = GradientBuckets::new(&vars, 3 * 4).all_reduce_mean(&comm, &mut grads, &vars)?;
            assert_eq!(stats.buckets, 4);
            Ok(vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).map(|g| g.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()))
                .collect())
        })
        .into_result()
        .unwrap();
        for grads in out {
            assert_eq!(grads[0], Some(vec![1.0, 2.0]));
            assert_eq!(grads[1], Some(vec![1.0, 2.0, 3.0]), "zeros from the ranks without one");
            assert_eq!(grads[2], None);
            assert_eq!(grads[3], Some(vec![1.0, 1.0]));
        }
    }
}
