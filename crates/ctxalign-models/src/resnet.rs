//! ResNet in the timm / torchvision layout (`conv1`, `bn1`, `layer1.0.conv1`, …, `downsample.0/1`):
//! basic (ResNet-18/34) and bottleneck (ResNet-50/101/152) blocks, the 7×7/2 stem and 3×3/2 max-pool,
//! stride on the 3×3 conv (torchvision "v1.5"), global average pooling.
//!
//! Batch norm runs in eval mode: running statistics are constants (as in torchvision's
//! `FrozenBatchNorm2d`, the usual choice when fine-tuning with small batches); its affine weight and
//! bias train. The running statistics are detached in the forward pass, so an optimiser never
//! receives a gradient for them even when they are stored as variables (checkpoints then carry them).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d_no_bias, Conv2d, Conv2dConfig, VarBuilder};
use ctxalign_nn::max_pool2d;
use ctxalign_nn::ops::conv2d;
use serde::{Deserialize, Serialize};

use crate::loading::{
    build_from_safetensors, read_json, AllowedUnused, CheckedSafetensors, LoadError, ModelFiles, RenameTable,
};

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3×3 convs (ResNet-18/34), expansion 1.
    Basic,
    /// 1×1 → 3×3 → 1×1 (ResNet-50 and deeper), expansion 4.
    Bottleneck,
}

/// A ResNet's shape (the timm constructor's arguments; timm writes no `config.json`, so this is the
/// description a model folder carries next to its weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub block: BlockKind,
    /// Blocks per stage ([3, 4, 6, 3] for ResNet-50).
    pub layers: Vec<usize>,
    /// Inner width of each stage ([64, 128, 256, 512]); a stage outputs `channels · expansion`.
    #[serde(default = "d_channels")]
    pub channels: Vec<usize>,
    /// Output width multiplier of a block (4 for bottleneck, 1 for basic); defaults by block type.
    #[serde(default)]
    pub expansion: Option<usize>,
    /// Width of the stem conv (64). When absent it is read from `conv1.weight` at load time.
    #[serde(default)]
    pub stem_width: Option<usize>,
    /// Only the standard stem is implemented; a description is accepted and checked.
    #[serde(default)]
    pub stem: Option<String>,
    /// Only global average pooling is implemented; a description is accepted and checked.
    #[serde(default)]
    pub pool: Option<String>,
    /// Input side the model was trained at (224); informational (any size ≥ 32 runs).
    #[serde(default = "d_image")]
    pub image_size: usize,
    /// Batch-norm eps (1e-5).
    #[serde(default = "d_eps")]
    pub batch_norm_eps: f64,
}

fn d_channels() -> Vec<usize> {
    vec![64, 128, 256, 512]
}
fn d_image() -> usize {
    224
}
fn d_eps() -> f64 {
    1e-5
}

impl ResNetConfig {
    fn preset(block: BlockKind, layers: [usize; 4]) -> Self {
        Self {
            block,
            layers: layers.to_vec(),
            channels: d_channels(),
            expansion: None,
            stem_width: Some(64),
            stem: None,
            pool: None,
            image_size: 224,
            batch_norm_eps: 1e-5,
        }
    }
    pub fn resnet18() -> Self {
        Self::preset(BlockKind::Basic, [2, 2, 2, 2])
    }
    pub fn resnet34() -> Self {
        Self::preset(BlockKind::Basic, [3, 4, 6, 3])
    }
    pub fn resnet50() -> Self {
        Self::preset(BlockKind::Bottleneck, [3, 4, 6, 3])
    }
    pub fn resnet101() -> Self {
        Self::preset(BlockKind::Bottleneck, [3, 4, 23, 3])
    }
    /// A narrow ResNet for CPU training: bottleneck stages of `width·[1, 2, 4, 8]`, one block each.
    pub fn small(width: usize, image_size: usize) -> Self {
        Self {
            layers: vec![1, 1, 1, 1],
            channels: vec![width, 2 * width, 4 * width, 8 * width],
            stem_width: Some(2 * width),
            image_size,
            ..Self::resnet50()
        }
    }

    pub fn expansion(&self) -> usize {
        self.expansion.unwrap_or(match self.block {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        })
    }

    pub fn stem_width(&self) -> usize {
        self.stem_width.unwrap_or(64)
    }

    /// Width of the pooled features.
    pub fn num_features(&self) -> usize {
        self.channels.last().copied().unwrap_or(0) * self.expansion()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.layers.is_empty() || self.layers.len() != self.channels.len() {
            return Err(format!("layers {:?} and channels {:?} must name the same stages", self.layers, self.channels));
        }
        if self.layers.contains(&0) || self.channels.contains(&0) || self.expansion() == 0 {
            return Err("stages, widths and the expansion must be positive".into());
        }
        if let Some(stem) = &self.stem {
            if !(stem.contains("7x7") && stem.contains("maxpool")) {
                return Err(format!("stem {stem:?}: only the 7x7/2 conv + 3x3/2 max-pool stem is implemented"));
            }
        }
        if let Some(pool) = &self.pool {
            if !(pool.contains("avg") || pool.contains("average")) {
                return Err(format!("pool {pool:?}: only global average pooling is implemented"));
            }
        }
        Ok(())
    }

    /// Reads a model folder's description; a missing `stem_width` is taken from `conv1.weight`.
    pub fn read(path: &std::path::Path, weights: &[std::path::PathBuf]) -> std::result::Result<Self, LoadError> {
        let mut cfg: Self = read_json(path)?;
        cfg.validate().map_err(|message| LoadError::Config { path: path.to_owned(), message })?;
        if cfg.stem_width.is_none() {
            let st = CheckedSafetensors::open(weights, RenameTable::identity())?;
            cfg.stem_width = st.shape_of("conv1.weight").map(|s| s[0]);
        }
        Ok(cfg)
    }
}

/// Eval-mode batch norm: `(x − running_mean) / √(running_var + eps) · weight + bias` per channel.
#[derive(Debug, Clone)]
pub struct FrozenBatchNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f64,
}

impl FrozenBatchNorm2d {
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        use candle_nn::Init::Const;
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Const(0.0))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Const(0.0))?.detach(),
            running_var: vb.get_with_hints(channels, "running_var", Const(1.0))?.detach(),
            eps,
        })
    }
}

impl Module for FrozenBatchNorm2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        let scale = self.weight.broadcast_div(&(&self.running_var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (&self.running_mean * &scale)?)?;
        xs.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?.broadcast_add(&shift.reshape((1, c, 1, 1))?)
    }
}

/// `conv → bn`, the unit every block is made of.
#[derive(Debug, Clone)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: FrozenBatchNorm2d,
}

fn conv(in_c: usize, out_c: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d_no_bias(in_c, out_c, k, Conv2dConfig { padding: k / 2, stride, ..Default::default() }, vb)
}

/// One residual block; `convs` are `conv1/bn1, conv2/bn2[, conv3/bn3]`.
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    pub convs: Vec<ConvBn>,
    /// `downsample.0` (1×1 conv, the block's stride) and `downsample.1` (bn), when the shape changes.
    pub downsample: Option<ConvBn>,
}

impl ResidualBlock {
    pub fn new(cfg: &ResNetConfig, in_c: usize, width: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out_c = width * cfg.expansion();
        let eps = cfg.batch_norm_eps;
        // (in, out, kernel, stride) of conv1.., as timm lays them out.
        let shapes: Vec<(usize, usize, usize, usize)> = match cfg.block {
            BlockKind::Basic => vec![(in_c, width, 3, stride), (width, out_c, 3, 1)],
            BlockKind::Bottleneck => vec![(in_c, width, 1, 1), (width, width, 3, stride), (width, out_c, 1, 1)],
        };
        let convs = shapes
            .iter()
            .enumerate()
            .map(|(i, &(ci, co, k, s))| {
                Ok(ConvBn {
                    conv: conv(ci, co, k, s, vb.pp(format!("conv{}", i + 1)))?,
                    bn: FrozenBatchNorm2d::new(co, eps, vb.pp(format!("bn{}", i + 1)))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = (stride != 1 || in_c != out_c)
            .then(|| -> Result<ConvBn> {
                let ds = vb.pp("downsample");
                Ok(ConvBn {
                    conv: conv(in_c, out_c, 1, stride, ds.pp("0"))?,
                    bn: FrozenBatchNorm2d::new(out_c, eps, ds.pp("1"))?,
                })
            })
            .transpose()?;
        Ok(Self { convs, downsample })
    }
}

impl Module for ResidualBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        let last = self.convs.len() - 1;
        for (i, cb) in self.convs.iter().enumerate() {
            h = cb.bn.forward(&conv2d(&cb.conv, &h)?)?;
            if i < last {
                h = h.relu()?;
            }
        }
        let shortcut = match &self.downsample {
            Some(ds) => ds.bn.forward(&conv2d(&ds.conv, xs)?)?,
            None => xs.clone(),
        };
        (h + shortcut)?.relu()
    }
}

/// Output of [`ResNet::forward_features`].
#[derive(Debug, Clone)]
pub struct ResNetOutput {
    /// Last stage map `[batch, num_features, H/32, W/32]`.
    pub features: Tensor,
    /// Its global average `[batch, num_features]`.
    pub pooled: Tensor,
}

/// The ResNet trunk without a classifier (timm `num_classes=0`, `global_pool="avg"`).
#[derive(Debug, Clone)]
pub struct ResNet {
    pub conv1: Conv2d,
    pub bn1: FrozenBatchNorm2d,
    /// `layer1..layerN`.
    pub stages: Vec<Vec<ResidualBlock>>,
    pub config: ResNetConfig,
}

impl ResNet {
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let stem = cfg.stem_width();
        let conv1 =
            conv2d_no_bias(3, stem, 7, Conv2dConfig { padding: 3, stride: 2, ..Default::default() }, vb.pp("conv1"))?;
        let bn1 = FrozenBatchNorm2d::new(stem, cfg.batch_norm_eps, vb.pp("bn1"))?;
        let mut in_c = stem;
        let mut stages = vec![];
        for (s, (&blocks, &width)) in cfg.layers.iter().zip(&cfg.channels).enumerate() {
            let vs = vb.pp(format!("layer{}", s + 1));
            let mut stage = vec![];
            for b in 0..blocks {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                stage.push(ResidualBlock::new(cfg, in_c, width, stride, vs.pp(b))?);
                in_c = width * cfg.expansion();
            }
            stages.push(stage);
        }
        Ok(Self { conv1, bn1, stages, config: cfg.clone() })
    }

    /// Loads a folder with the description (`config.json`) and timm/torchvision-layout weights
    /// (`num_batches_tracked` and a classifier `fc.*`, if present, are ignored).
    pub fn load(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        let cfg = ResNetConfig::read(&files.config, &files.weights)?;
        build_from_safetensors(&files.weights, RenameTable::identity(), &Self::allowed_unused(), dtype, device, |vb| {
            Self::new(&cfg, vb)
        })
    }

    /// The keys of a timm/torchvision ResNet checkpoint that the trunk does not read; every other
    /// tensor must be read ([`LoadError::UnusedTensors`]), so a config with fewer blocks than the
    /// weights hold is refused.
    pub fn allowed_unused() -> AllowedUnused {
        AllowedUnused::none()
            .suffix(".num_batches_tracked", "batch norm's step counter (training state; eval-mode batch norm)")
            .part("fc.", "the ImageNet classifier: the trunk is used without it (timm's num_classes=0)")
    }

    pub fn forward_features(&self, pixel_values: &Tensor) -> Result<ResNetOutput> {
        let xs = pixel_values.to_dtype(self.bn1.weight.dtype())?;
        let xs = self.bn1.forward(&conv2d(&self.conv1, &xs)?)?.relu()?;
        let mut xs = max_pool2d(&xs, 3, 2, 1)?;
        for stage in &self.stages {
            for block in stage {
                xs = block.forward(&xs)?;
            }
        }
        let pooled = xs.mean((2, 3))?;
        Ok(ResNetOutput { features: xs, pooled })
    }
}

impl Module for ResNet {
    /// `[batch, 3, H, W]` → pooled features `[batch, num_features]`.
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self.forward_features(pixel_values)?.pooled)
    }
}
