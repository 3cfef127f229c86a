//! Backbones for ctxalign with HF-layout weight loading.
//!
//! - [`blip`]: BLIP image-text matching (`BlipForImageTextRetrieval`): ViT, the "MED" BERT text
//!   encoder with cross-attention, ITM and ITC heads.
//! - [`contextblip`]: ContextBLIP's adapter model, TMIM decoder, masking, and IMAGECODE heads.
//! - [`clip`]: CLIP (`CLIPModel`): ViT and causal text towers with projections and logit scale.
//! - [`bert`]: BERT (`BertModel`), built from BLIP's text layers without cross-attention.
//! - [`resnet`]: ResNet (timm/torchvision layout), eval-mode batch norm.
//! - [`contextclip`]: ContextCLIP's dual encoder: any image tower + any text tower + projection heads.
//! - [`artifact`]: what a folder is (BLIP, ContextBLIP of a stage, ContextCLIP) and the base model
//!   a ContextBLIP folder records.
//! - [`loading`]: safetensors checkpoints (single file or sharded, f32/f16/bf16) behind a checking
//!   `VarBuilder` backend that turns a missing or mis-shaped tensor into a typed [`LoadError`] naming
//!   the file and the key; model folders from disk or from the hub (`HF_HOME`, offline mode).

pub mod activation;
pub mod artifact;
pub mod bert;
pub mod blip;
pub mod clip;
pub mod contextblip;
pub mod contextclip;
pub mod loading;
pub mod resnet;

pub use activation::HiddenAct;
pub use loading::{LoadError, ModelFiles, ModelSource};
