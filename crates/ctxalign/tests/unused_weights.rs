//! Every tensor of a checkpoint is used, or the load is refused naming the unused keys: a config
//! that describes fewer layers than the weights hold must not load, ignore the rest and score.
//! Each owner type (BLIP, CLIP, BERT, ResNet, ContextCLIP, ContextBLIP's parts, tower
//! initialisation) is checked with a model whose config lost layers, and with the keys its own
//! allow-list names, which must still load.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ctxalign::models::bert::BertModel;
use ctxalign::models::blip::BlipItm;
use ctxalign::models::clip::ClipModel;
use ctxalign::models::contextblip::{ContextBlip, ContextBlipConfig, ContextBlipRecord, Stage};
use ctxalign::models::contextclip::{ContextClip, ContextClipConfig, ContextClipRecord};
use ctxalign::models::resnet::{ResNet, ResNetConfig};
use ctxalign::models::{LoadError, ModelFiles};
use ctxalign::train::contextclip::{build_contextclip, ContextClipInit};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// A copy of fixture `name` (its config and weights) with `config` and the tensors edited.
fn copy_with(
    name: &str,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture(name);
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let mut weights = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors(&mut weights);
    candle_core::safetensors::save(&weights, tmp.path().join("model.safetensors")).unwrap();
    tmp
}

fn files(dir: &Path) -> ModelFiles {
    ModelFiles::from_dir(dir).unwrap()
}

/// The error must be UnusedTensors holding exactly the keys of `expected`, its message naming the
/// file and the keys (the first twelve, then how many more).
fn assert_unused<T: std::fmt::Debug>(result: Result<T, LoadError>, file: &str, expected: &[&str]) {
    match result {
        Err(e @ LoadError::UnusedTensors { .. }) => {
            let msg = e.to_string();
            let LoadError::UnusedTensors { file: f, keys } = &e else { unreachable!() };
            assert!(f.ends_with(file) && msg.contains(file), "{msg}");
            let mut want: Vec<&str> = expected.to_vec();
            want.sort();
            assert_eq!(keys.iter().map(String::as_str).collect::<Vec<_>>(), want, "{msg}");
            for key in want.iter().take(12) {
                assert!(msg.contains(&format!("`{key}`")), "{key} not named: {msg}");
            }
            if want.len() > 12 {
                assert!(msg.contains(&format!("and {} more", want.len() - 12)), "{msg}");
            }
        }
        other => panic!("expected UnusedTensors, got {other:?}"),
    }
}

fn no_change<T>(_: &mut T) {}

fn set_layers<'a>(path: &'a [&'a str], layers: u64) -> impl FnOnce(&mut serde_json::Value) + 'a {
    move |cfg| {
        let mut v = cfg;
        for p in path {
            v = &mut v[*p];
        }
        *v = layers.into();
    }
}

/// Keys of `name`'s weights under `prefix`.
fn keys_under(name: &str, prefix: &str) -> Vec<String> {
    let tensors = candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu).unwrap();
    let mut keys: Vec<String> = tensors.into_keys().filter(|k| k.starts_with(prefix)).collect();
    keys.sort();
    keys
}

fn as_strs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

#[test]
fn blip_with_fewer_layers_configured_than_stored_is_refused() {
    // The fixture's ViT has 12 layers, its text encoder 3.
    let dir = copy_with("blip_itm_tiny", set_layers(&["vision_config", "num_hidden_layers"], 10), no_change);
    let unused = [
        keys_under("blip_itm_tiny", "vision_model.encoder.layers.10."),
        keys_under("blip_itm_tiny", "vision_model.encoder.layers.11."),
    ]
    .concat();
    assert!(!unused.is_empty());
    assert_unused(BlipItm::load(&files(dir.path()), DType::F32, &Device::Cpu), "model.safetensors", &as_strs(&unused));
    let dir = copy_with("blip_itm_tiny", set_layers(&["text_config", "num_hidden_layers"], 2), no_change);
    let unused = keys_under("blip_itm_tiny", "text_encoder.encoder.layer.2.");
    assert_unused(BlipItm::load(&files(dir.path()), DType::F32, &Device::Cpu), "model.safetensors", &as_strs(&unused));
    // A stray tensor that belongs to nothing.
    let dir = copy_with("blip_itm_tiny", no_change, |t| {
        t.insert("text_encoder.extra.weight".into(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap());
    });
    assert_unused(
        BlipItm::load(&files(dir.path()), DType::F32, &Device::Cpu),
        "model.safetensors",
        &["text_encoder.extra.weight"],
    );
}

#[test]
fn blip_loads_with_the_keys_its_list_allows() {
    BlipItm::load(&files(&fixture("blip_itm_tiny")), DType::F32, &Device::Cpu).expect("the fixture loads");
    // HF's position-id buffer (int64) and a BLIP pre-training checkpoint's decoder and queue.
    let dir = copy_with("blip_itm_tiny", no_change, |t| {
        let dev = &Device::Cpu;
        t.insert("text_encoder.embeddings.position_ids".into(), Tensor::arange(0i64, 8, dev).unwrap());
        t.insert("text_decoder.cls.predictions.bias".into(), Tensor::zeros(5, DType::F32, dev).unwrap());
        t.insert("image_queue".into(), Tensor::zeros((4, 3), DType::F32, dev).unwrap());
    });
    BlipItm::load(&files(dir.path()), DType::F32, &Device::Cpu).expect("allowed keys load");
}

#[test]
fn clip_bert_and_resnet_with_fewer_layers_configured_are_refused() {
    let dev = &Device::Cpu;
    // CLIP: 2 text layers stored, 1 configured.
    let dir = copy_with("clip_tiny", set_layers(&["text_config", "num_hidden_layers"], 1), no_change);
    let unused = keys_under("clip_tiny", "text_model.encoder.layers.1.");
    assert_unused(ClipModel::load(&files(dir.path()), DType::F32, dev), "model.safetensors", &as_strs(&unused));
    let dir = copy_with("clip_tiny", no_change, |t| {
        t.insert("text_model.embeddings.position_ids".into(), Tensor::arange(0i64, 8, dev).unwrap());
    });
    ClipModel::load(&files(dir.path()), DType::F32, dev).expect("CLIP's position-id buffer is allowed");

    // BERT: 2 layers stored, 1 configured; a task checkpoint's heads are allowed.
    let copy_bert = |config: &dyn Fn(&mut serde_json::Value), extra: Option<&str>| {
        let dir = copy_with(
            "bert_tiny",
            |c| config(c),
            |t| {
                if let Some(k) = extra {
                    t.insert(k.into(), Tensor::zeros(3, DType::F32, dev).unwrap());
                }
            },
        );
        std::fs::copy(fixture("bert_tiny/tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
        dir
    };
    let dir = copy_bert(&|c| c["num_hidden_layers"] = 1.into(), None);
    let unused = keys_under("bert_tiny", "encoder.layer.1.");
    assert_unused(BertModel::load(&files(dir.path()), DType::F32, dev), "model.safetensors", &as_strs(&unused));
    let dir = copy_bert(&|_| {}, Some("cls.predictions.bias"));
    BertModel::load(&files(dir.path()), DType::F32, dev).expect("pre-training heads are allowed");

    // ResNet: stage 2 stores 2 blocks; configured with 1.
    let dir = copy_with("resnet_tiny", |c| c["layers"][1] = 1.into(), no_change);
    let unused = keys_under("resnet_tiny", "layer2.1.");
    assert_unused(ResNet::load(&files(dir.path()), DType::F32, dev), "model.safetensors", &as_strs(&unused));
    let dir = copy_with("resnet_tiny", no_change, |t| {
        t.insert("fc.weight".into(), Tensor::zeros((3, 256), DType::F32, dev).unwrap());
        t.insert("bn1.num_batches_tracked".into(), Tensor::zeros((), DType::I64, dev).unwrap());
    });
    ResNet::load(&files(dir.path()), DType::F32, dev).expect("the classifier and step counters are allowed");
}

/// A trained ContextCLIP folder whose `contextclip.json` lost a layer is refused.
#[test]
fn contextclip_folder_with_fewer_layers_configured_is_refused() {
    let dev = Device::Cpu;
    let cfg = ContextClipConfig::small(32);
    let varmap = candle_nn::VarMap::new();
    ContextClip::new(&cfg, candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let mut tensors: BTreeMap<String, Tensor> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    tensors.insert("temperature".into(), Tensor::new(0.07f32, &dev).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let record = ContextClipRecord { config: cfg.clone(), initialized_from: None };
    ContextClip::save(tmp.path(), &record, &tensors, b"{}").unwrap();
    ContextClip::load(tmp.path(), DType::F32, &dev).expect("the saved folder loads, its learned temperature allowed");

    let mut fewer = cfg.clone();
    let ctxalign::models::contextclip::TextEncoderConfig::Bert(bert) = &mut fewer.text_encoder else { panic!() };
    bert.num_hidden_layers -= 1;
    let last = bert.num_hidden_layers;
    std::fs::write(tmp.path().join("contextclip.json"), ContextClipRecord { config: fewer, ..record }.to_json())
        .unwrap();
    let unused: Vec<String> =
        tensors.keys().filter(|k| k.starts_with(&format!("text_encoder.encoder.layer.{last}."))).cloned().collect();
    assert!(!unused.is_empty());
    assert_unused(ContextClip::load(tmp.path(), DType::F32, &dev), "model.safetensors", &as_strs(&unused));
}

/// Tower checkpoints: the tower the config takes must be read whole; the source model's other
/// parts (CLIP's text tower and projections for an image tower) may stay unread.
#[test]
fn tower_checkpoints_with_more_blocks_than_configured_are_refused() {
    let dev = Device::Cpu;
    let resnet_files = files(&fixture("resnet_tiny"));
    let clip_files = files(&fixture("clip_tiny"));
    let clip = ClipModel::read_config(&clip_files.config).unwrap();
    let mut resnet = ResNetConfig::read(&resnet_files.config, &resnet_files.weights).unwrap();
    let tower_cfg = |resnet: ResNetConfig| ContextClipConfig {
        image_encoder: ctxalign::models::contextclip::ImageEncoderConfig::Resnet(resnet),
        text_encoder: ctxalign::models::contextclip::TextEncoderConfig::ClipText(clip.text_config.clone()),
        text_pooling: ctxalign::models::contextclip::TextPooling::Pooled,
        image_size: 64,
        ..ContextClipConfig::small(64)
    };
    // The CLIP file gives the text tower; its vision tower and projections stay unread.
    let init = ContextClipInit {
        towers: vec![resnet_files.weights[0].clone(), clip_files.weights[0].clone()],
        ..Default::default()
    };
    build_contextclip(&tower_cfg(resnet.clone()), &init, &Default::default(), DType::F32, &dev, 0)
        .expect("whole towers from their checkpoints");
    resnet.layers[1] = 1;
    let unused = keys_under("resnet_tiny", "layer2.1.");
    let unused: Vec<&str> = unused.iter().map(String::as_str).filter(|k| !k.ends_with("num_batches_tracked")).collect();
    let result = build_contextclip(&tower_cfg(resnet), &init, &Default::default(), DType::F32, &dev, 0).map(|_| ());
    match result {
        Err(ctxalign::train::TrainError::Load(e)) => assert_unused::<()>(Err(e), "model.safetensors", &unused),
        other => panic!("expected a load error, got {other:?}"),
    }
}

/// ContextBLIP folders: the adapter must be read whole (a record with fewer taps than the weights
/// hold is refused), and a part the stage does not have is refused.
#[test]
fn contextblip_adapter_with_more_taps_than_recorded_is_refused() {
    let dev = Device::Cpu;
    let blip_files = files(&fixture("blip_itm_tiny"));
    let blip = BlipItm::load(&blip_files, DType::F32, &dev).unwrap();
    let cfg = ContextBlipConfig::for_blip(&blip.config);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    ctxalign::nn::MultiScaleAdapter::new(&cfg.adapter, vb.pp("adapter")).unwrap();
    ctxalign::models::contextblip::TmimHead::new(&cfg, vb).unwrap();
    let tensors: BTreeMap<String, Tensor> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let tmp = tempfile::tempdir().unwrap();
    ContextBlip::save(tmp.path(), &ContextBlipRecord::new(Stage::S0, cfg.clone()), &tensors).unwrap();
    ContextBlip::load(blip.clone(), tmp.path(), DType::F32, &dev).expect("S0 folder loads; decoder stays unread");

    // The record keeps the first two taps; the weights hold four down-projections.
    let mut fewer = cfg.clone();
    fewer.adapter.taps.truncate(2);
    let taps = cfg.adapter.taps.len();
    let mut tensors2 = tensors.clone();
    let width = cfg.adapter.reduced_size();
    tensors2.insert(
        "adapter.up.weight".into(),
        Tensor::zeros((cfg.adapter.hidden_size, 2 * width), DType::F32, &dev).unwrap(),
    );
    ContextBlip::save(tmp.path(), &ContextBlipRecord::new(Stage::S0, fewer), &tensors2).unwrap();
    let unused: Vec<String> = (2..taps).map(|i| format!("adapter.down.{i}.weight")).collect();
    assert_unused(
        ContextBlip::load(blip.clone(), tmp.path(), DType::F32, &dev),
        "contextblip.safetensors",
        &as_strs(&unused),
    );

    // An S1 record whose file holds S0's decoder: not a part of S1's file.
    ContextBlip::save(tmp.path(), &ContextBlipRecord::new(Stage::S1, cfg.clone()), &tensors).unwrap();
    std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
    let decoder: Vec<String> =
        tensors.keys().filter(|k| k.starts_with("decoder.") || k.starts_with("text_adapter.")).cloned().collect();
    assert_unused(ContextBlip::load(blip, tmp.path(), DType::F32, &dev), "contextblip.safetensors", &as_strs(&decoder));
}
