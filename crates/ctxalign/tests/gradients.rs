//! Every BLIP tensor must receive a non-zero, finite gradient through ITM and ITC: Candle's fused
//! LayerNorm and softmax would silently leave most of them without one (docs/reference-notes.md
//! §6).

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ctxalign::models::blip::{BlipConfig, BlipItm};

#[test]
fn every_blip_tensor_gets_a_gradient() {
    let dev = Device::Cpu;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip_itm_tiny");
    let cfg: BlipConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let varmap = VarMap::new();
    let model = BlipItm::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    // Start from the fixture's weights (zero-initialised biases would hide missing gradients).
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let w = weights[name].to_dtype(DType::F32).unwrap().reshape(var.shape()).unwrap();
        var.set(&w).unwrap();
    }
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev).unwrap();
    let pixels = &expected["pixel_values"];
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let itm_ids = expected["itm_input_ids"].to_dtype(DType::U32).unwrap();
    let mask = expected["attention_mask"].to_dtype(DType::U32).unwrap();

    let images = model.encode_images(pixels).unwrap();
    // ITC: contrastive cross-entropy over the similarity matrix.
    let sim = (BlipItm::itc_similarity(&images.itc_features, &model.text_features(&ids, &mask).unwrap()).unwrap()
        / 0.07)
        .unwrap();
    let targets = Tensor::new(&[0u32, 1], &dev).unwrap();
    let itc = candle_nn::loss::cross_entropy(&sim, &targets).unwrap();
    // ITM: positives on the diagonal, one negative pair.
    let pos = model.itm(&images.memory, &itm_ids, &mask, false).unwrap().logits;
    let neg = model
        .itm(&images.memory.select(0).unwrap(), &itm_ids.i(1..2).unwrap(), &mask.i(1..2).unwrap(), false)
        .unwrap()
        .logits;
    let logits = Tensor::cat(&[pos, neg], 0).unwrap();
    let itm = candle_nn::loss::cross_entropy(&logits, &Tensor::new(&[1u32, 1, 0], &dev).unwrap()).unwrap();
    let loss = (itc + itm).unwrap();
    assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    let grads = loss.backward().unwrap();

    let mut missing = vec![];
    let data = varmap.data().lock().unwrap();
    for (name, var) in data.iter().filter(|(k, _)| !ctxalign::nn::gradcheck::gradient_free_by_construction(k)) {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name}: no gradient")),
            Some(g) => {
                let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                if !(norm > 0.0 && norm.is_finite()) {
                    missing.push(format!("{name}: gradient norm {norm}"));
                }
            }
        }
    }
    assert_eq!(data.len(), weights.len(), "every checkpoint tensor is a trainable variable");
    assert!(
        missing.is_empty(),
        "{} of {} tensors without gradient:\n{}",
        missing.len(),
        data.len(),
        missing.join("\n")
    );
}
