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

    /// Runs, requires success, and returns standard error (where notes and warnings go).
    fn ok_stderr(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ctxalign {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
        stderr.into_owned()
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
    // A sweep with other settings does not report the old runs: each is trained again, saying why;
    // the same settings reuse them; the table's JSON records the settings it was made with.
    let out = env.ok(&["sweep", "reduction", "--steps", "1", "--batch-size", "4"]);
    assert_eq!(out.matches("was made with other settings").count(), 4, "{out}");
    assert!(out.contains("global_batch_size: 2 → 4"), "{out}");
    let out = env.ok(&["sweep", "reduction", "--steps", "1", "--batch-size", "4"]);
    assert!(!out.contains("pre-training"), "finished runs of these settings are reused: {out}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.home("runs/contextblip-sweeps/reduction.json")).unwrap())
            .unwrap();
    assert_eq!((record["settings"]["steps"].as_u64(), record["settings"]["batch_size"].as_u64()), (Some(1), Some(4)));
    assert_eq!(record["runs"].as_array().unwrap().len(), 4);
    assert!(record["runs"].as_array().unwrap().iter().all(|r| r["reused"] == true), "{record}");

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

    // Through a link loop and a second link to one image, each real image is indexed once.
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("..", photos.join("loop")).unwrap();
        std::os::unix::fs::symlink(photos.join("scene-1.jpg"), photos.join("again.jpg")).unwrap();
        let out = env.run(&["retrieve", "--images", "photos", "--query", "a red circle", "--k", "10"]);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("2 entries of photos not indexed") && stderr.contains("a loop"), "{stderr}");
        let ranked = stdout.lines().filter(|l| l.contains("photos/")).count();
        assert_eq!(ranked, 3, "3 images, once each:\n{stdout}");
        std::fs::remove_file(photos.join("loop")).unwrap();
        std::fs::remove_file(photos.join("again.jpg")).unwrap();
    }
    // A damaged image: refused naming it, or left out and reported under --skip-bad.
    std::fs::write(photos.join("broken.jpg"), b"\xFF\xD8\xFF\xE0 cut").unwrap();
    env.fails(&["retrieve", "--images", "photos", "--query", "x"], "broken.jpg");
    let stderr = env.ok_stderr(&["retrieve", "--images", "photos", "--query", "x", "--skip-bad"]);
    assert!(stderr.contains("1 of 4 images left out") && stderr.contains("broken.jpg"), "{stderr}");

    // A test split with no image (one image per class: the 70/30 split leaves none) is an error
    // for every task, not an accuracy of 0.
    let one_each = env.home("one-each");
    for (c, image) in ["red", "blue", "green"].iter().zip(images()) {
        std::fs::create_dir_all(one_each.join(c)).unwrap();
        std::fs::copy(&image, one_each.join(c).join("0.jpg")).unwrap();
    }
    let spec = format!("folder:{}", one_each.display());
    for task in ["zeroshot", "linear-probe", "finetune"] {
        env.fails(&["classify", "--dataset", &spec, "--task", task], "holds no images");
    }
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

/// How a training run treats its folder and its start: a folder another running job holds is
/// refused naming it and its pid, a lock left by a dead process is taken over with a note; a
/// resume into a missing folder is an error and into an empty one a note; fewer steps than done
/// and another precision are refused on resume; a caption that cleans to nothing is found before
/// the first step (and left out under --skip-bad).
#[test]
fn training_runs_guard_their_folder_and_say_how_they_start() {
    use ctxalign::data::lock::{host_name, LOCK_FILE};
    let env = Env::new();
    let lock = |dir: &str, pid: u32| {
        std::fs::create_dir_all(env.home(dir)).unwrap();
        let holder = serde_json::json!({
            "pid": pid, "host": host_name(), "job": "pretrain (ContextBLIP S0)", "started": 1_700_000_000u64, "token": "t"
        });
        std::fs::write(env.home(dir).join(LOCK_FILE), holder.to_string()).unwrap();
    };
    let pretrain = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["pretrain", "--steps", "2", "--batch-size", "4", "--out", &env.str(out)]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let run = |args: Vec<String>| env.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Held by a running process (this test's own): refused, naming the folder, the job and pid.
    lock("runs/held", std::process::id());
    let out = run(pretrain("runs/held", &[]));
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is in use by another job") && err.contains(&format!("pid {}", std::process::id())), "{err}");
    assert!(!env.home("runs/held/checkpoints").exists(), "nothing written");
    // Left by a process that is gone: taken over, with a note, and released at the end.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    lock("runs/stale", dead);
    let out = run(pretrain("runs/stale", &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("took over the lock left by pretrain (ContextBLIP S0) (pid {dead}")),
        "{}",
        stderr(&out)
    );
    assert!(!env.home("runs/stale").join(LOCK_FILE).exists(), "released at the end");

    // --resume: a typo'd folder is an error, an empty one starts fresh with a note.
    let out = run(pretrain("runs/stael", &["--resume"]));
    assert!(stderr(&out).contains("no such folder, so there is no run to resume"), "{}", stderr(&out));
    assert!(!env.home("runs/stael").exists());
    std::fs::create_dir_all(env.home("runs/empty")).unwrap();
    let out = run(pretrain("runs/empty", &["--resume"]));
    assert!(out.status.success() && stderr(&out).contains("holds no checkpoint"), "{}", stderr(&out));
    // Fewer steps than done; another precision.
    let mut fewer = pretrain("runs/stale", &["--resume"]);
    fewer[2] = "1".into();
    let out = run(fewer);
    assert!(stderr(&out).contains("the run is at step 2, this run asks for 1 steps"), "{}", stderr(&out));
    let mut bf16 = pretrain("runs/stale", &["--resume", "--precision", "bf16"]);
    bf16[2] = "3".into();
    let out = run(bf16);
    assert!(stderr(&out).contains("precision: \"f32\" → \"bf16\""), "{}", stderr(&out));

    // A caption that cleans to nothing: found before the first step, naming image and caption.
    let dir = env.home("vignettes-default/captions");
    let mut captions: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
    captions[3]["caption"] = serde_json::json!("...");
    std::fs::write(dir.join("dots.json"), captions.to_string()).unwrap();
    let data = ["--captions", &dir.join("dots.json").display().to_string(), "--image-root", &dir.display().to_string()]
        .map(String::from);
    let mut args = pretrain("runs/dots", &[]);
    args.extend(data.iter().cloned());
    let out = run(args.clone());
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains(".jpg, caption ") && err.contains(": the text \"...\" has no words left"),
        "{err}"
    );
    assert!(!env.home("runs/dots/checkpoints").exists(), "found before the first step");
    args.push("--skip-bad".into());
    let out = run(args);
    assert!(out.status.success() && stderr(&out).contains("1 captioned images left out"), "{}", stderr(&out));

    // ContextCLIP's cosine spans its steps: resumed to more steps, the schedule would change, so it
    // is refused unless accepted (then the rate follows the new total, recorded as a change).
    let clip = ["train-contextclip", "--batch-size", "8", "--no-eval", "--out", &env.str("runs/cc")];
    env.ok(&[&clip[..], &["--steps", "2"]].concat());
    env.fails(&[&clip[..], &["--steps", "4", "--resume"]].concat(), "schedule.decay.total_steps: 2 → 4");
    env.ok(&[&clip[..], &["--steps", "4", "--resume", "--accept-changed-settings"]].concat());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.home("runs/cc/training.json")).unwrap()).unwrap();
    let changed = record["report"]["settings_changed_on_resume"].as_array().unwrap();
    assert!(changed.iter().any(|c| c.as_str().unwrap().contains("total_steps: 2 → 4")), "{record}");
}

/// The backbone recipe's third stage on the built-in contrast corpus (generated into the
/// benchmark's captions folder): the record shows three stages over the single scenes plus the
/// described images of the groups; a run continues from a trained folder (`--init`); and the
/// mistakes are refused before any step: contrast steps without groups, groups asked for beside
/// --captions or --shards, every stage at 0 steps, a negative sharpness outside [0, 1].
#[test]
fn backbone_trains_a_contrast_stage_on_grouped_images() {
    let env = Env::new();
    let small = ["--batch-size", "8", "--all-captions", "--max-tokens", "64"];
    let stages = [
        "--contrast-groups",
        "3",
        "--itc-steps",
        "1",
        "--steps",
        "1",
        "--contrast-steps",
        "2",
        "--negative-sharpness",
        "0.5",
        "--out",
    ];
    env.ok(&[&["train-backbone"][..], &stages, &[&env.str("runs/grouped")], &small].concat());
    let contrast = ctxalign::data::captions::read_caption_json(
        &env.home("vignettes-default/captions/contrast.json"),
        &env.home("vignettes-default/captions"),
    )
    .unwrap();
    let mut groups: Vec<_> = contrast.iter().map(|i| i.group.clone().unwrap()).collect();
    groups.dedup();
    assert_eq!(groups.len(), 3);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.home("runs/grouped/training.json")).unwrap()).unwrap();
    let names: Vec<&str> =
        record["report"]["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(names, ["stage1-itc", "stage2-itc-itm", "stage3-contrast"]);
    assert_eq!(record["report"]["stages"][2]["steps"], 2);
    assert_eq!(record["report"]["train_images"].as_u64().unwrap() as usize, 36 + contrast.len(), "{record}");
    assert_eq!(record["options"]["negative_sharpness"], 0.5);
    // Continued from the trained folder: its vocabulary and weights, stage 3 alone.
    let init = env.str("runs/grouped");
    env.ok(&[
        &["train-backbone", "--contrast-groups", "3", "--init", &init, "--itc-steps", "0", "--steps", "0"][..],
        &["--contrast-steps", "1", "--out", &env.str("runs/continued")],
        &small,
    ]
    .concat());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.home("runs/continued/training.json")).unwrap()).unwrap();
    assert_eq!(record["report"]["stages"].as_array().unwrap().len(), 1, "{record}");
    let vocab = |dir: &str| -> serde_json::Value {
        let config = std::fs::read_to_string(env.home(dir).join("config.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&config).unwrap()["text_config"]["vocab_size"].clone()
    };
    assert_eq!(vocab("runs/continued"), vocab("runs/grouped"));

    let out = |name: &str| env.str(&format!("runs/{name}"));
    env.fails(
        &[&["train-backbone", "--contrast-steps", "2", "--out", &out("no-groups")][..], &small].concat(),
        "no image of the data is in a group",
    );
    assert!(!env.home("runs/no-groups/training").exists(), "refused before the first step");
    let dir = env.str("vignettes-default/captions");
    let train = format!("{dir}/train.json");
    env.fails(
        &["train-backbone", "--captions", &train, "--image-root", &dir, "--contrast-groups", "2", "--out", &out("x")],
        "`group` fields",
    );
    env.fails(&["train-backbone", "--itc-steps", "0", "--steps", "0", "--out", &out("zero")], "nothing to train");
    env.fails(&["train-backbone", "--negative-sharpness", "2", "--out", &out("sharp")], "outside [0, 1]");
}

/// An installed `ctxalign` (a copy outside the checkout, not started by cargo) reads the models it
/// carries, written once into its home folder, not the checkout's `models/` it was built from; the
/// checkout's own build (the tests run it) reads the checkout's.
#[test]
fn an_installed_binary_reads_its_own_models() {
    let env = Env::new();
    let imgs = images();
    env.ok(&["score", "--image", &imgs[0], "--text", "a red circle"]);
    assert!(!env.home("models").exists(), "the checkout's build reads the checkout's models");
    let installed = env.home("bin/ctxalign");
    std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_ctxalign"), &installed).unwrap();
    let out = Command::new(&installed)
        .args(["score", "--image", &imgs[0], "--text", "a red circle"])
        .current_dir(&env.cwd)
        .env("CTXALIGN_HOME", &env.home)
        .env_remove("CARGO_MANIFEST_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let installed_models: Vec<String> = std::fs::read_dir(env.home("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(installed_models.iter().any(|n| n.starts_with("blip-vignettes-small-")), "{installed_models:?}");
}
