//! End-to-end: every `ctxalign` subcommand, run as a user runs it — the built binary, started in
//! an empty folder outside the checkout, with `CTXALIGN_HOME` pointing at a fresh folder — on the
//! built-in data (a small Vignettes benchmark generated into the home folder first, where the
//! commands find it by default). Each job's outputs must land under the home folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ctxalign::data::vignettes::{write_benchmark, VignettesConfig};

struct Env {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    cwd: PathBuf,
}

impl Env {
    /// A home folder holding a small built-in benchmark, and an empty working folder.
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let (home, cwd) = (tmp.path().join("home"), tmp.path().join("work"));
        std::fs::create_dir_all(&cwd).unwrap();
        let small = VignettesConfig {
            train_sets: 8,
            valid_sets: 4,
            test_sets: 2,
            caption_images: 40,
            class_images: 10,
            ..VignettesConfig::default()
        };
        write_benchmark(&small, &home.join("vignettes-default"), &|_| {}).unwrap();
        Self { _tmp: tmp, home, cwd }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ctxalign"))
            .args(args)
            .current_dir(&self.cwd)
            .env("CTXALIGN_HOME", &self.home)
            .output()
            .unwrap()
    }

    /// Runs and requires success; returns standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ctxalign {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
        stdout.into_owned()
    }

    /// Runs and requires failure with `needle` in standard error.
    fn fails(&self, args: &[&str], needle: &str) {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ctxalign {args:?} should fail");
        assert!(stderr.contains(needle), "ctxalign {args:?}: expected {needle:?} in:\n{stderr}");
    }

    fn home(&self, rel: &str) -> PathBuf {
        self.home.join(rel)
    }

    fn str(&self, rel: &str) -> String {
        self.home(rel).display().to_string()
    }
}

fn images() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/images");
    ["scene-1.jpg", "scene-2.jpg", "scene-4.jpg"].iter().map(|f| dir.join(f).display().to_string()).collect()
}

/// The ContextBLIP chain (S0 → zero-shot → S1 → S2), the sweep, MMVP, scoring and the mask
/// picture, all with default data and output places.
#[test]
fn contextblip_jobs_run_from_any_folder_with_home_defaults() {
    let env = Env::new();
    let out = env.ok(&["pretrain", "--steps", "2", "--batch-size", "4"]);
    assert!(out.contains("steps") && out.contains("saved to"), "{out}");
    let s0 = env.str("runs/contextblip-s0");
    assert!(env.home("runs/contextblip-s0/contextblip.safetensors").is_file());

    let out = env.ok(&["zero-shot", "--contextblip", &s0]);
    assert!(out.contains("ContextBLIP") && out.contains("All"), "{out}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.home("results/zero-shot.json")).unwrap()).unwrap();
    assert!(record["descriptions"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(record["models"].as_object().unwrap().len(), 2, "BLIP and the ContextBLIP");

    // A folder of the wrong stage or kind is refused before any work, saying what it is.
    env.fails(&["finetune-s2", "--s1", &s0, "--epochs", "1"], "this is an S0 folder");
    env.fails(&["zero-shot", "--contextblip", &env.str("vignettes-default")], "holds no ctxalign or HF model files");

    // The adapter records its BLIP; another BLIP (here: the same weights, a different config file)
    // is refused instead of scoring noise.
    let other = env.home("other-blip");
    std::fs::create_dir_all(&other).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/blip-vignettes-small");
    for f in ["model.safetensors", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(shipped.join(f), other.join(f)).unwrap();
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shipped.join("config.json")).unwrap()).unwrap();
    std::fs::write(other.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    let other = other.display().to_string();
    env.fails(&["zero-shot", "--model", &other, "--contextblip", &s0], "pre-trained on the BLIP in");
    env.fails(&["finetune-s1", "--model", &other, "--contextblip", &s0, "--steps", "1"], "pre-trained on the BLIP in");

    env.ok(&["finetune-s1", "--contextblip", &s0, "--steps", "1", "--batch-size", "2"]);
    assert!(env.home("runs/contextblip-s1/eval.json").is_file());
    let out = env.ok(&["finetune-s2", "--s1", &env.str("runs/contextblip-s1"), "--epochs", "1", "--batch-size", "8"]);
    assert!(out.contains("S2 (+ inter-context encoder)"), "{out}");

    env.ok(&["sweep", "reduction", "--steps", "1", "--batch-size", "2"]);
    // Another benchmark is not pre-trained on the built-in one's captions.
    env.fails(&["sweep", "reduction", "--data", &env.str("vignettes-default")], "give the captions to pre-train on");
    assert!(env.home("runs/contextblip-sweeps/reduction.json").is_file());

    let mmvp = env.home("mmvp");
    std::fs::create_dir_all(mmvp.join("MMVP_VLM_Images/Color")).unwrap();
    for (q, image) in images().iter().take(2).enumerate() {
        std::fs::copy(image, mmvp.join(format!("MMVP_VLM_Images/Color/{}.jpg", q + 1))).unwrap();
    }
    std::fs::write(
        mmvp.join("Questions.csv"),
        "Question ID,Type,Statement\n1,Color,a red circle\n2,Color,a blue square\n",
    )
    .unwrap();
    let out = env.ok(&["mmvp", "--data", &mmvp.display().to_string(), "--contextblip", &s0]);
    assert!(out.contains("MMVP-VLM"), "{out}");

    let imgs = images();
    let out = env.ok(&["score", "--image", &imgs[0], "--image", &imgs[1], "--text", "a red circle"]);
    assert!(out.contains("best image"), "{out}");
    let out =
        env.ok(&["show-mask", "--image", &imgs[0], "--text", "a red circle", "--word", "circle", "--contextblip", &s0]);
    assert!(out.contains("mask.png"), "{out}");
    assert!(env.home("results/mask.png").is_file());

    // Nothing was written where the commands were started.
    assert_eq!(std::fs::read_dir(&env.cwd).unwrap().count(), 0);
}

/// ContextCLIP: training, then classification and retrieval with the trained folder found at its
/// default place.
#[test]
fn contextclip_jobs_run_from_any_folder_with_home_defaults() {
    let env = Env::new();
    let out = env.ok(&["train-contextclip", "--steps", "2", "--batch-size", "8"]);
    assert!(out.contains("zero-shot") && out.contains("R@1"), "{out}");
    assert!(env.home("runs/contextclip/model.safetensors").is_file());

    let out = env.ok(&["classify"]);
    assert!(out.contains("top-1"), "{out}");
    assert!(env.home("results/classify.json").is_file());
    let out = env.ok(&["classify", "--dataset", "uci-digits", "--task", "linear-probe"]);
    assert!(out.contains("λ chosen"), "{out}");
    env.fails(&["classify", "--dataset", "imagenet:/x"], "data set `imagenet:/x`");

    let photos = env.cwd.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    for image in images() {
        std::fs::copy(&image, photos.join(Path::new(&image).file_name().unwrap())).unwrap();
    }
    let out = env.ok(&["retrieve", "--images", "photos", "--query", "a red circle", "--k", "2"]);
    assert!(out.contains("rank") && out.contains("photos/"), "{out}");
    assert!(photos.join(".contextclip-index").is_dir());
}

/// Help for every subcommand, and clear errors for a missing model folder and a bad option.
#[test]
fn help_and_argument_errors() {
    let env = Env::new();
    let help = env.ok(&["--help"]);
    for sub in [
        "score",
        "show-mask",
        "pretrain",
        "zero-shot",
        "finetune-s1",
        "finetune-s2",
        "sweep",
        "mmvp",
        "train-contextclip",
        "classify",
        "retrieve",
        "shards",
    ] {
        assert!(help.contains(sub), "{sub} missing from --help");
        env.ok(&[sub, "--help"]);
    }
    env.fails(&["pretrain", "--steps", "0"], "must be a whole number ≥ 1");
    // Before any ContextCLIP was trained, its default place holds nothing.
    env.fails(&["retrieve", "--images", "photos", "--query", "x"], "no such folder; a ContextCLIP folder is needed");
}

/// `shards`: the built-in captions by default and an IMAGECODE split, read back with the library
/// (sample by sample, and streamed by the shard loader); a second run into the same folder is
/// refused unless told to overwrite.
#[test]
fn shards_job_writes_shards_the_library_reads_back() {
    use ctxalign::data::captions::read_caption_json;
    use ctxalign::data::imagecode::ImageCodeSplit;
    use ctxalign::data::loader::BadInputPolicy;
    use ctxalign::data::shards::{expand_shards, ImageCodeShards, SampleReader, ShardIndex};
    use ctxalign::data::{DecodeOptions, ImageProcessor};

    let env = Env::new();
    let out = env.ok(&["shards", "--out", &env.str("shards/captions"), "--max-count", "16"]);
    let captions = env.home("vignettes-default/captions");
    let items = read_caption_json(&captions.join("train.json"), &captions).unwrap();
    let shards = items.len().div_ceil(16);
    let pattern = format!("{}/shards-{{000000..{:06}}}.tar", env.str("shards/captions"), shards - 1);
    assert!(out.contains(&format!("train on: --shards '{pattern}'")), "{out}");
    assert!(out.contains("left out"), "{out}");
    let paths = expand_shards(&pattern).unwrap();
    assert_eq!(paths.len(), shards);
    let samples: Vec<_> = paths.iter().flat_map(|p| SampleReader::open(p).unwrap().map(Result::unwrap)).collect();
    assert_eq!(samples.len(), items.len());
    for (sample, item) in samples.iter().zip(&items) {
        let read = sample.captioned().unwrap();
        assert_eq!(read.captions, item.captions);
        assert_eq!(read.image, std::fs::read(&item.image).unwrap());
    }
    env.fails(&["shards", "--out", &env.str("shards/captions")], "already holds");
    env.ok(&["shards", "--out", &env.str("shards/captions"), "--overwrite"]);
    assert_eq!(std::fs::read_dir(env.home("shards/captions")).unwrap().count(), 1, "one shard of 1000 now");

    let root = env.home("vignettes-default/imagecode");
    let out = env.ok(&[
        "shards",
        "--imagecode",
        &root.display().to_string(),
        "--split",
        "valid",
        "--out",
        &env.str("shards/valid"),
        "--max-count",
        "3",
        "--prefix",
        "valid",
    ]);
    let split = ImageCodeSplit::open(&root, "valid").unwrap();
    let pattern = format!("{}/valid-{{000000..000001}}.tar", env.str("shards/valid"));
    assert!(out.contains(&pattern), "4 sets in shards of 3: {out}");
    let format = ImageCodeShards { processor: ImageProcessor::blip(16), decode: DecodeOptions::default(), text: None };
    let (index, left_out) = ShardIndex::scan(&expand_shards(&pattern).unwrap(), &format, BadInputPolicy::Fail).unwrap();
    assert!(left_out.is_empty());
    assert_eq!(index.len(), split.examples.len(), "one item per description");
    env.fails(&["shards", "--split", "valid", "--out", &env.str("x")], "--imagecode");
}

/// Shards end to end with data parallelism: `shards`, then S0, ContextCLIP and the backbone on the
/// shards with `--nproc-per-node 2` (threads on the CPU), and S1 on set shards; each run records its
/// ranks. And the launch errors: torchrun's variables with `--nproc-per-node`, a CPU rank of a
/// multi-process run.
#[test]
fn training_jobs_run_data_parallel_on_shards() {
    let env = Env::new();
    let out = env.ok(&["shards", "--out", &env.str("sh"), "--max-count", "8"]);
    let spec = out.lines().find_map(|l| l.strip_prefix("train on: --shards '")).unwrap().trim_end_matches('\'');
    let spec = spec.to_string();
    let out = env.ok(&["pretrain", "--shards", &spec, "--steps", "2", "--batch-size", "2", "--nproc-per-node", "2"]);
    assert!(out.contains("ranks") && out.contains("gradient averaging"), "{out}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.home("runs/contextblip-s0/training.json")).unwrap()).unwrap();
    assert_eq!(record["runtime"]["world_size"], 2);
    let settings = record["report"]["steps"].as_u64();
    assert_eq!(settings, Some(2));
    env.ok(&["train-contextclip", "--shards", &spec, "--steps", "2", "--batch-size", "4", "--nproc-per-node", "2"]);
    assert!(env.home("runs/contextclip/model.safetensors").is_file());
    env.ok(&["train-backbone", "--shards", &spec, "--itc-steps", "1", "--steps", "1", "--batch-size", "4"]);
    assert!(env.home("runs/blip-backbone/model.safetensors").is_file());
    // A used run folder is refused, not deleted.
    env.fails(&["train-backbone", "--itc-steps", "1", "--steps", "1", "--batch-size", "4"], "holds the checkpoints");

    // S1 on the train split's set shards, 2 ranks.
    let sets = env.ok(&[
        "shards",
        "--imagecode",
        &env.str("vignettes-default/imagecode"),
        "--split",
        "train",
        "--out",
        &env.str("sets"),
        "--max-count",
        "4",
    ]);
    let set_spec = sets.lines().find_map(|l| l.strip_prefix("train on: --shards '")).unwrap().trim_end_matches('\'');
    let s0 = env.str("runs/contextblip-s0");
    env.ok(&[
        "finetune-s1",
        "--contextblip",
        &s0,
        "--shards",
        set_spec,
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--nproc-per-node",
        "2",
        "--out",
        &env.str("runs/s1-shards"),
    ]);
    assert!(env.home("runs/s1-shards/eval.json").is_file());

    // torchrun's variables and --nproc-per-node at once; several processes on the CPU.
    let torchrun = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ctxalign"))
            .args(args)
            .current_dir(&env.cwd)
            .env("CTXALIGN_HOME", &env.home)
            .env("WORLD_SIZE", "2")
            .env("RANK", "1")
            .env("MASTER_ADDR", "127.0.0.1")
            .output()
            .unwrap()
    };
    let out = torchrun(&["pretrain", "--steps", "1", "--nproc-per-node", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("leave --nproc-per-node out under torchrun"));
    let out = torchrun(&["pretrain", "--steps", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("which needs CUDA devices"), "{out:?}");
}
