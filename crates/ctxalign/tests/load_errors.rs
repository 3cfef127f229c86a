//! Bad inputs give errors that name the file/key and what was expected.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ctxalign::data::{decode_image, DecodeOptions, ImageError};
use ctxalign::models::blip::BlipItm;
use ctxalign::models::{LoadError, ModelFiles};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/blip_itm_tiny")
}

/// A copy of the tiny model whose weights went through `edit`.
fn edited_copy(edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(tiny().join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    tmp
}

fn load(dir: &Path) -> Result<BlipItm, LoadError> {
    BlipItm::load(&ModelFiles::from_dir(dir)?, DType::F32, &Device::Cpu)
}

#[test]
fn loads_f16_checkpoint_and_reports_unused_nothing() {
    load(&tiny()).expect("the fixture loads");
}

#[test]
fn missing_tensor_names_key_file_and_shape() {
    let key = "text_encoder.encoder.layer.1.crossattention.self.key.weight";
    let tmp = edited_copy(|t| {
        t.remove(key);
    });
    match load(tmp.path()) {
        Err(e @ LoadError::MissingTensor { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(key) && msg.contains("model.safetensors") && msg.contains("[32, 32]"), "{msg}");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let key = "vision_model.encoder.layers.4.mlp.fc1.weight";
    let tmp = edited_copy(|t| {
        t.insert(key.into(), Tensor::zeros((67, 32), DType::F16, &Device::Cpu).unwrap());
    });
    match load(tmp.path()) {
        Err(LoadError::ShapeMismatch { key: k, expected, found, .. }) => {
            assert_eq!(k, key);
            assert_eq!(expected, vec![68, 32]);
            assert_eq!(found, vec![67, 32]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn integer_tensor_is_a_dtype_error() {
    let key = "itm_head.weight";
    let tmp = edited_copy(|t| {
        t.insert(key.into(), Tensor::zeros((2, 32), DType::I64, &Device::Cpu).unwrap());
    });
    match load(tmp.path()) {
        Err(e @ LoadError::UnsupportedDtype { .. }) => assert!(e.to_string().contains(key), "{e}"),
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
}

#[test]
fn bf16_and_f32_checkpoints_load() {
    for dtype in [DType::BF16, DType::F32] {
        let tmp = edited_copy(|t| {
            for v in t.values_mut() {
                *v = v.to_dtype(dtype).unwrap();
            }
        });
        load(tmp.path()).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
    }
}

#[test]
fn sharded_checkpoint_loads_and_a_missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("config.json"), tmp.path().join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(tiny().join("model.safetensors"), &Device::Cpu).unwrap();
    let (mut a, mut b) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, v) in tensors {
        let shard = if k.starts_with("vision_model") {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(k.clone(), shard.into());
        if shard.starts_with("model-00001") {
            a.insert(k, v)
        } else {
            b.insert(k, v)
        };
    }
    candle_core::safetensors::save(&a, tmp.path().join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = load(tmp.path()).expect("sharded checkpoint loads");
    let single = load(&tiny()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let d = (sharded.encode_images(&x).unwrap().itc_features - single.encode_images(&x).unwrap().itc_features).unwrap();
    assert_eq!(d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);

    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = ModelFiles::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn bad_configs_are_rejected_with_the_reason() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: [(&str, Edit); 4] = [
        (
            "num_attention_heads",
            Box::new(|v| {
                v["text_config"].as_object_mut().unwrap().remove("num_attention_heads");
            }),
        ),
        (
            "layer_norm_eps",
            Box::new(|v| {
                v["vision_config"].as_object_mut().unwrap().remove("layer_norm_eps");
            }),
        ),
        ("divisible", Box::new(|v| v["vision_config"]["num_attention_heads"] = 5.into())),
        ("hidden_size", Box::new(|v| v["text_config"]["hidden_size"] = "big".into())),
    ];
    for (needle, edit) in cases {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(tiny().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tiny().join("config.json")).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        let err = load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("config.json"), "{needle}: {err}");
    }
    // Not JSON at all.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("model.safetensors"), tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(tmp.path().join("config.json"), "{\"vision_config\": ").unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert!(matches!(err, LoadError::Json { .. }), "{err}");
}

#[test]
fn missing_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ModelFiles::from_dir(&tmp.path().join("nope")).unwrap_err().to_string();
    assert!(err.contains("nope") && err.contains("model folder"), "{err}");
    std::fs::copy(tiny().join("config.json"), tmp.path().join("config.json")).unwrap();
    let err = ModelFiles::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::write(tmp.path().join("model.safetensors"), b"not a safetensors file").unwrap();
    let err = load(tmp.path()).unwrap_err();
    assert!(matches!(err, LoadError::Safetensors { .. }) && err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn corrupt_truncated_and_non_images_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/preprocess/portrait.jpg");
    let bytes = std::fs::read(&good).unwrap();
    let truncated = tmp.path().join("truncated.jpg");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let text = tmp.path().join("notes.jpg");
    std::fs::write(&text, "this is not an image").unwrap();
    let opts = DecodeOptions::default();
    assert!(decode_image(&good, opts).is_ok());
    match decode_image(&truncated, opts) {
        Err(e @ (ImageError::Corrupt { .. } | ImageError::Io { .. })) => {
            assert!(e.to_string().contains("truncated.jpg"), "{e}")
        }
        other => panic!("truncated: {:?}", other.map(|i| i.dimensions())),
    }
    match decode_image(&text, opts) {
        Err(e @ ImageError::UnknownFormat { .. }) => assert!(e.to_string().contains("notes.jpg")),
        other => panic!("text file: {:?}", other.map(|i| i.dimensions())),
    }
    match decode_image(&tmp.path().join("missing.png"), opts) {
        Err(e @ ImageError::NotFound { .. }) => assert!(e.to_string().contains("missing.png")),
        other => panic!("missing: {:?}", other.map(|i| i.dimensions())),
    }
    match decode_image(&good, DecodeOptions { max_pixels: 1000 }) {
        Err(e @ ImageError::TooLarge { .. }) => assert!(e.to_string().contains("portrait.jpg")),
        other => panic!("limit: {:?}", other.map(|i| i.dimensions())),
    }
}

/// A NaN or an infinity anywhere in the weights is refused at load, naming the tensor, in every
/// dtype the model may be loaded in.
#[test]
fn non_finite_weights_are_refused_naming_the_key() {
    let key = "text_encoder.encoder.layer.0.attention.self.query.weight";
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let tmp = edited_copy(|t| {
            let mut values: Vec<f32> = t[key].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            values[5] = bad;
            t.insert(key.into(), Tensor::from_vec(values, t[key].shape(), &Device::Cpu).unwrap());
        });
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            match BlipItm::load(&ModelFiles::from_dir(tmp.path()).unwrap(), dtype, &Device::Cpu) {
                Err(e @ LoadError::NonFinite { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(key) && msg.contains("model.safetensors"), "{msg}");
                }
                other => panic!("{bad} in {dtype:?}: expected NonFinite, got {:?}", other.map(|_| ())),
            }
        }
    }
}

/// Finite f32 weights that f16 cannot hold (> 65504) load in f32 and bf16 but are refused in f16,
/// instead of turning into infinities and NaN scores.
#[test]
fn weights_beyond_f16_range_are_refused_in_f16_only() {
    let key = "vision_model.encoder.layers.0.mlp.fc1.weight";
    let tmp = edited_copy(|t| {
        let mut values: Vec<f32> = t[key].to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        values[0] = 1.0e6;
        t.insert(key.into(), Tensor::from_vec(values, t[key].shape(), &Device::Cpu).unwrap());
    });
    let files = ModelFiles::from_dir(tmp.path()).unwrap();
    BlipItm::load(&files, DType::F32, &Device::Cpu).expect("f32 holds 1e6");
    BlipItm::load(&files, DType::BF16, &Device::Cpu).expect("bf16 holds 1e6");
    match BlipItm::load(&files, DType::F16, &Device::Cpu) {
        Err(e @ LoadError::Overflow { .. }) => assert!(e.to_string().contains(key), "{e}"),
        other => panic!("expected Overflow, got {:?}", other.map(|_| ())),
    }
}

/// A model that produces NaN (here: an ITM head poisoned after loading) gets an error, never a
/// "best" image.
#[test]
fn non_finite_scores_are_an_error() {
    use ctxalign::{BlipScorer, Error, ScorerOptions};
    let files = ModelFiles::from_dir(&ctxalign::default_model_dir().unwrap()).unwrap();
    let mut scorer = BlipScorer::from_files(&files, ScorerOptions::default(), &Device::Cpu).unwrap();
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/images");
    let encoded = scorer.encode_image_files(&[images.join("scene-1.jpg"), images.join("scene-2.jpg")]).unwrap();
    scorer.score("a red circle", &encoded).expect("a healthy model scores");
    let w = scorer.model.itm_head.weight();
    let poisoned = (w.ones_like().unwrap() * f64::NAN).unwrap();
    scorer.model.itm_head = ctxalign::nn::Linear::new(poisoned, scorer.model.itm_head.bias().cloned());
    match scorer.score("a red circle", &encoded) {
        Err(e @ Error::NonFinite { .. }) => assert!(e.to_string().contains("ITM"), "{e}"),
        other => panic!("expected NonFinite, got {:?}", other.map(|r| r.best)),
    }
}

/// A weights file given where its folder is expected says so, instead of "file not found".
#[test]
fn a_file_given_for_a_model_folder_is_named_as_such() {
    let file = tiny().join("config.json");
    match ctxalign::models::ModelFiles::from_dir(&file) {
        Err(e @ LoadError::NotAFolder { .. }) => assert!(e.to_string().contains("is a file"), "{e}"),
        other => panic!("expected NotAFolder, got {:?}", other.map(|_| ())),
    }
}

/// A failed write says "cannot write" (not "cannot read") and leaves no temporary file.
#[test]
fn failed_writes_say_write_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("out");
    std::fs::write(&blocker, "a file where a folder must go").unwrap();
    let err = ctxalign::data::write_atomic(&blocker.join("result.json"), b"{}").unwrap_err().to_string();
    assert!(err.contains("cannot write") && !err.contains("cannot read"), "{err}");
    // A folder in the way of the final name: the rename fails after the data was written.
    let target = tmp.path().join("taken");
    std::fs::create_dir_all(target.join("inside")).unwrap();
    let err = ctxalign::data::write_atomic(&target, b"{}").unwrap_err().to_string();
    assert!(err.contains("cannot write"), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only `out` and `taken`, no temporary file: {left:?}");
}

/// A safetensors file's header rewritten by `edit` (data untouched), padded as the format wants.
fn rewrite_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// A tensor stored as int8 is named as int8 (`I8`), not as another dtype.
#[test]
fn an_int8_tensor_is_named_int8() {
    let key = "itm_head.weight";
    let tmp = edited_copy(|_| {});
    rewrite_header(&tmp.path().join("model.safetensors"), |h| {
        // The same 128 bytes of f16 data, declared as 128 int8 values.
        assert_eq!(h[key]["dtype"], "F16");
        h[key]["dtype"] = "I8".into();
        h[key]["shape"] = serde_json::json!([2, 64]);
    });
    match load(tmp.path()) {
        Err(e @ LoadError::UnsupportedDtype { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(key) && msg.contains("stored as I8") && !msg.contains("U8"), "{msg}");
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
}

/// A tokenizer that produces ids past the model's embedding table is refused when the scorer
/// loads, naming both files, not when the first text with such a token is scored.
#[test]
fn a_tokenizer_with_ids_past_the_embedding_table_is_refused_at_load() {
    // The fixture's tokenizer has bert-base-uncased's 30522 ids; keep 1000 embedding rows.
    let tmp = edited_copy(|t| {
        let key = "text_encoder.embeddings.word_embeddings.weight";
        t.insert(key.into(), t[key].narrow(0, 0, 1000).unwrap());
    });
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["vocab_size"] = 1000.into();
    cfg["text_config"]["bos_token_id"] = 998.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(tiny().join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let files = ModelFiles::from_dir(tmp.path()).unwrap();
    BlipItm::load(&files, DType::F32, &Device::Cpu).expect("the model itself is consistent");
    match ctxalign::BlipScorer::from_files(&files, ctxalign::ScorerOptions::default(), &Device::Cpu) {
        Err(ctxalign::Error::Text(e @ ctxalign::data::TextError::IdsExceedEmbeddings(_))) => {
            let msg = e.to_string();
            assert!(
                msg.contains("tokenizer.json") && msg.contains("config.json") && msg.contains("1000 rows"),
                "{msg}"
            );
        }
        other => panic!("expected IdsExceedEmbeddings, got {:?}", other.err()),
    }
}

/// Every processor setting is checked when the scorer loads, naming the file and the key: a
/// size of 0 (which panicked at the first image), a size the ViT's patches do not tile.
#[test]
fn bad_processor_settings_are_refused_at_load_naming_file_and_key() {
    let tmp = edited_copy(|_| {});
    std::fs::copy(tiny().join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("config.json")).unwrap()).unwrap();
    let patch = cfg["vision_config"]["patch_size"].as_u64().unwrap();
    let image = cfg["vision_config"]["image_size"].as_u64().unwrap();
    let cases = [
        (serde_json::json!({"size": {"height": 0, "width": 0}}), "size.height"),
        (serde_json::json!({"size": {"height": image + 1, "width": image + 1}}), "patches"),
        (serde_json::json!({"size": {"shortest_edge": image}}), "depends on each image"),
        (
            serde_json::json!({"size": {"height": image, "width": image}, "do_center_crop": true,
                "crop_size": {"height": image + patch, "width": image}}),
            "crop_size",
        ),
        (serde_json::json!({"size": {"height": image, "width": image}, "image_std": [0.5, 0.0, 0.5]}), "image_std"),
        (serde_json::json!({"size": {"height": image, "width": image}, "resize_mode": "nearest"}), "resize_mode"),
    ];
    for (settings, key) in cases {
        std::fs::write(tmp.path().join("preprocessor_config.json"), settings.to_string()).unwrap();
        let files = ModelFiles::from_dir(tmp.path()).unwrap();
        match ctxalign::BlipScorer::from_files(&files, ctxalign::ScorerOptions::default(), &Device::Cpu) {
            Err(ctxalign::Error::Image(e @ ImageError::Config { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains("preprocessor_config.json") && msg.contains(key), "{settings}: {msg}");
            }
            other => panic!("{settings}: expected a config error, got {:?}", other.err()),
        }
    }
    let ok = serde_json::json!({"size": {"height": image, "width": image}});
    std::fs::write(tmp.path().join("preprocessor_config.json"), ok.to_string()).unwrap();
    ctxalign::BlipScorer::from_files(&ModelFiles::from_dir(tmp.path()).unwrap(), Default::default(), &Device::Cpu)
        .expect("sound settings load");
}
