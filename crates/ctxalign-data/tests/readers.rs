//! Each reader on small files in the real formats, written here, with the traps real data has.

use std::path::Path;

use ctxalign_data::captions::{filter_split, read_caption_json, read_flickr8k, read_karpathy_splits};
use ctxalign_data::classification::{
    embedded_uci_digits, read_cifar, read_image_folder, read_mnist, read_uci_digits, Cifar,
};
use ctxalign_data::imagecode::{set_images, write_submission, ImageCodeSplit, SetKind};
use ctxalign_data::mmvp::read_mmvp;
use ctxalign_data::DataError;

fn write(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn tiny_jpeg(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9])).save(path).unwrap();
}

#[test]
fn imagecode_orders_frames_numerically_and_reads_all_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Video frames: lexicographic order would put img12 before img3.
    let frames = [3, 12, 27, 5, 100, 40, 8, 61, 19, 33];
    for f in frames {
        tiny_jpeg(&root.join(format!("image-sets/MSR-VTT-video7/img{f}.jpg")));
    }
    for f in 0..10 {
        tiny_jpeg(&root.join(format!("image-sets/open-images-123/img{f}.jpg")));
    }
    write(
        &root.join("valid_data.json"),
        r#"{"MSR-VTT-video7": {"4": "the man turns", "0": "first frame"}, "open-images-123": {"9": "a dog"}}"#,
    );
    write(&root.join("valid_categories.json"), r#"{"MSR-VTT-video7": {"4": ["spatial", "negation"]}}"#);
    write(
        &root.join("test_data_unlabeled.json"),
        r#"{"open-images-123": ["one", "two"], "MSR-VTT-video7": ["three"]}"#,
    );
    let valid = ImageCodeSplit::open(root, "valid").unwrap();
    assert_eq!(valid.examples.len(), 3);
    assert_eq!((valid.examples[0].target, valid.examples[1].target), (Some(4), Some(0)), "file order kept");
    assert_eq!(valid.examples[0].kind, SetKind::Video);
    assert_eq!(valid.examples[2].kind, SetKind::Static);
    let imgs = valid.set_images("MSR-VTT-video7").unwrap();
    let names: Vec<String> = imgs.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "img3.jpg",
            "img5.jpg",
            "img8.jpg",
            "img12.jpg",
            "img19.jpg",
            "img27.jpg",
            "img33.jpg",
            "img40.jpg",
            "img61.jpg",
            "img100.jpg"
        ]
    );
    let test = ImageCodeSplit::open(root, "test").unwrap();
    assert_eq!(test.examples.len(), 3);
    assert!(test.examples.iter().all(|e| e.target.is_none()));
    assert_eq!(test.sets(), vec!["open-images-123", "MSR-VTT-video7"]);
    // Submission: per set, predictions in description order.
    let sub = root.join("submission.json");
    write_submission(&sub, &test, &[1, 2, 3]).unwrap();
    assert_eq!(std::fs::read_to_string(&sub).unwrap(), r#"{"open-images-123":[1,2],"MSR-VTT-video7":[3]}"#);
    assert!(write_submission(&sub, &test, &[1]).is_err());
    // The groups a description is reported in: its kind, then its categories (from
    // `valid_categories.json`, for the one description it names).
    let groups: Vec<Vec<&str>> = valid.examples.iter().map(|e| e.groups().collect()).collect();
    assert_eq!(groups, [vec!["video", "spatial", "negation"], vec!["video"], vec!["static"]]);
}

#[test]
fn imagecode_traps_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for f in 0..9 {
        tiny_jpeg(&root.join(format!("image-sets/open-images-9/img{f}.jpg")));
    }
    let src = root.join("x.json");
    match set_images(&root.join("image-sets"), "open-images-9", &src) {
        Err(DataError::SetSize { found: 9, expected: 10, set, .. }) => assert_eq!(set, "open-images-9"),
        other => panic!("{other:?}"),
    }
    let cases = [
        (r#"{"s": {"12": "x"}}"#, "s.12"),
        (r#"{"s": {"two": "x"}}"#, "s.two"),
        (r#"{"s": {"1": 5}}"#, "s.1"),
        (r#"{"s": 5}"#, "a set's descriptions"),
        (r#"{"s": "one description"}"#, "(labeled) or [\"description\", ...] (unlabeled)"),
        (r#"["not", "an", "object"]"#, ""),
        (r#"{"s": {"1": "x"}"#, ""),
        // Descriptions with no word: empty, blank, punctuation only.
        (r#"{"s": {"3": ""}}"#, "s.3"),
        (r#"{"s": {"4": "   "}}"#, "s.4"),
        (r#"{"s": ["fine", "?!..."]}"#, "s[1]"),
        // A split that mixes the labeled and the unlabeled shape, either way round, names the set
        // whose shape differs from the first's (it would be listed but not counted).
        (r#"{"a": {"1": "x"}, "b": {"2": "y"}, "c": ["z"]}"#, "set `c` is unlabeled"),
        (r#"{"a": ["x"], "b": {"2": "y"}}"#, "set `b` is labeled"),
        (r#"{"a": {"1": "x"}, "b": []}"#, "set `b` is unlabeled"),
    ];
    for (json, at) in cases {
        write(&root.join("valid_data.json"), json);
        match ImageCodeSplit::open(root, "valid") {
            Err(e @ DataError::Json { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("valid_data.json") && msg.contains(at), "{json}: {msg}");
                assert!(!msg.contains("did not match any variant"), "{json}: {msg}");
            }
            other => panic!("{json}: {other:?}"),
        }
    }
    for bad in [r#"{"../../etc": {"1": "x"}}"#, r#"{".": ["a"]}"#, r#"{"a/b": ["a"]}"#, r#"{"": ["a"]}"#] {
        write(&root.join("valid_data.json"), bad);
        assert!(matches!(ImageCodeSplit::open(root, "valid"), Err(DataError::PathEscape { .. })), "{bad}");
    }
    // ".." inside a name is just a name.
    write(&root.join("valid_data.json"), r#"{"MS..VTT-0": {"1": "x"}}"#);
    assert!(ImageCodeSplit::open(root, "valid").is_ok());
    assert!(matches!(ImageCodeSplit::open(root, "train"), Err(DataError::NotFound { .. })));
    // An empty split writes no submission.
    write(&root.join("test_data_unlabeled.json"), "{}");
    let empty = ImageCodeSplit::open(root, "test").unwrap();
    let out = root.join("submission.json");
    let msg = ctxalign_data::imagecode::write_submission(&out, &empty, &[]).unwrap_err().to_string();
    assert!(msg.contains("nothing to submit") && !out.exists(), "{msg}");
}

/// Every set is checked before anything is scored: incomplete sets and undecodable images are found
/// up front, all at once; `Skip` leaves those sets out and says which.
#[test]
fn imagecode_sets_are_checked_before_use() {
    use ctxalign_data::loader::BadInputPolicy;
    use ctxalign_data::DecodeOptions;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    for set in ["good-0", "short-1", "broken-2"] {
        let frames = if set == "short-1" { 9 } else { 10 };
        for f in 0..frames {
            tiny_jpeg(&root.join(format!("image-sets/{set}/img{f}.jpg")));
        }
    }
    // A JPEG cut short in its scan.
    let cut = root.join("image-sets/broken-2/img7.jpg");
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 20]).unwrap();
    write(
        &root.join("valid_data.json"),
        r#"{"good-0": {"1": "a cat", "2": "a dog"}, "short-1": {"3": "x y"}, "broken-2": {"4": "a b"}}"#,
    );
    let split = ImageCodeSplit::open(root, "valid").unwrap();
    let err = split.clone().checked(DecodeOptions::default(), BadInputPolicy::Fail).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Unusable { what: "sets", bad: 2, total: 3, .. }), "{msg}");
    assert!(msg.contains("set short-1") && msg.contains("has 9 images"), "{msg}");
    assert!(msg.contains("set broken-2") && msg.contains("img7.jpg") && msg.contains("truncated"), "{msg}");
    let (kept, left_out) = split.checked(DecodeOptions::default(), BadInputPolicy::Skip).unwrap();
    assert_eq!(kept.sets(), ["good-0"]);
    assert_eq!(kept.examples.len(), 2);
    let mut names: Vec<(&str, usize)> = left_out.iter().map(|l| (l.set.as_str(), l.descriptions)).collect();
    names.sort();
    assert_eq!(names, [("broken-2", 1), ("short-1", 1)]);
}

#[test]
fn caption_json_in_blip_format() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("coco_train.json");
    write(
        &f,
        r#"[{"image": "train2014/a.jpg", "caption": "A dog.", "image_id": "coco_1"},
                  {"image": "train2014/b.jpg", "caption": ["one", "two"]},
                  {"image": "train2014/a.jpg", "caption": "Another dog."}]"#,
    );
    let items = read_caption_json(&f, Path::new("/data/coco")).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].image, Path::new("/data/coco/train2014/a.jpg"));
    assert_eq!(items[0].captions, vec!["A dog.", "Another dog."]);
    assert_eq!(items[1].captions.len(), 2);
    for (bad, needle) in [
        (r#"[{"image": "a.jpg", "caption": ""}]"#, "[0].caption"),
        (r#"[{"image": "a.jpg"}]"#, "[0]"),
        (r#"{"image": "a.jpg", "caption": "x"}"#, "coco_train.json"),
        (r#"[{"image": "a.jpg", "caption": 3}]"#, "a string or a list of strings"),
        (r#"[{"image": "a.jpg", "caption": ["x", 3]}]"#, "[0].caption"),
    ] {
        write(&f, bad);
        let err = read_caption_json(&f, tmp.path()).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("coco_train.json"), "{bad}: {err}");
        assert!(!err.contains("did not match any variant"), "{bad}: {err}");
    }
    write(&f, r#"[{"image": "/etc/passwd", "caption": "x"}]"#);
    assert!(matches!(read_caption_json(&f, tmp.path()), Err(DataError::PathEscape { .. })));
}

#[test]
fn caption_groups_are_read_merged_written_and_checked() {
    use ctxalign_data::captions::write_caption_json;
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("groups.json");
    write(
        &f,
        r#"[{"image": "s1/img0.jpg", "caption": "a", "group": "s1"},
            {"image": "s1/img1.jpg", "caption": ["b", "c"], "group": "s1"},
            {"image": "loose.jpg", "caption": "d"},
            {"image": "s1/img0.jpg", "caption": "e"}]"#,
    );
    let items = read_caption_json(&f, tmp.path()).unwrap();
    let groups: Vec<Option<&str>> = items.iter().map(|i| i.group.as_deref()).collect();
    assert_eq!(groups, [Some("s1"), Some("s1"), None]);
    assert_eq!(items[0].captions, ["a", "e"], "a record without a group keeps the image's");
    assert_eq!(items[0].first_caption_only().group.as_deref(), Some("s1"));
    let out = tmp.path().join("out.json");
    write_caption_json(&out, tmp.path(), &items).unwrap();
    assert_eq!(read_caption_json(&out, tmp.path()).unwrap(), items);
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.matches("\"group\"").count(), 2, "no group key for an image in none: {text}");
    for (bad, needle) in [
        (r#"[{"image": "a.jpg", "caption": "x", "group": " "}]"#, "empty group"),
        (
            r#"[{"image": "a.jpg", "caption": "x", "group": "p"}, {"image": "a.jpg", "caption": "y", "group": "q"}]"#,
            "[1].group",
        ),
        (r#"[{"image": "a.jpg", "caption": "x", "group": 3}]"#, "groups.json"),
    ] {
        write(&f, bad);
        let err = read_caption_json(&f, tmp.path()).unwrap_err().to_string();
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

#[test]
fn flickr8k_both_layouts_and_karpathy_split() {
    let tmp = tempfile::tempdir().unwrap();
    let kaggle = tmp.path().join("captions.txt");
    write(&kaggle, "image,caption\r\n1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set of stairs in an entry way .\r\n1000268201_693b08cb0e.jpg,\"A girl, in pink, going into a \"\"wooden\"\" building .\"\r\n1001773457_577c3a7d70.jpg,A black dog and a spotted dog are fighting\r\n");
    let items = read_flickr8k(&kaggle, Path::new("Images")).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].captions[1], "A girl, in pink, going into a \"wooden\" building .");
    let token = tmp.path().join("Flickr8k.token.txt");
    write(&token, "1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .\n");
    let items2 = read_flickr8k(&token, Path::new("Images")).unwrap();
    assert_eq!(items2.len(), 1);
    assert_eq!(items2[0].captions.len(), 2);
    let k = tmp.path().join("dataset_flickr8k.json");
    write(
        &k,
        r#"{"images": [{"filename": "1000268201_693b08cb0e.jpg", "split": "train", "sentences": []}, {"filename": "1001773457_577c3a7d70.jpg", "split": "test", "sentences": []}], "dataset": "flickr8k"}"#,
    );
    let splits = read_karpathy_splits(&k).unwrap();
    let test = filter_split(items, &splits, &["test"]);
    assert_eq!(test.len(), 1);
    assert!(test[0].image.ends_with("1001773457_577c3a7d70.jpg"));
    write(&kaggle, "image,caption\nno-comma-here\n");
    let err = read_flickr8k(&kaggle, tmp.path()).unwrap_err().to_string();
    assert!(err.contains("captions.txt:2"), "{err}");
}

#[test]
fn mmvp_pairs_from_questions_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    write(&root.join("Questions.csv"), "\u{feff}Question ID,Type,Statement\n1,Orientation and Direction,\"The dog's head is turned left, slightly\"\n2,Orientation and Direction,The dog's head is turned right\n3,Color and Appearance,The car is red\n4,Color and Appearance,The car is blue\n");
    for (dir, q) in [("Orientation", 1), ("Orientation", 2), ("Color", 3), ("Color", 4)] {
        tiny_jpeg(&root.join(format!("MMVP_VLM_Images/{dir}/{q}.jpg")));
    }
    let pairs = read_mmvp(root).unwrap();
    assert_eq!(pairs.len(), 2);
    assert_eq!(pairs[0].qids, [1, 2]);
    assert_eq!(pairs[0].prompts()[0], "a photo of The dog's head is turned left, slightly");
    assert!(pairs[1].images[1].ends_with("Color/4.jpg"));
    std::fs::remove_file(root.join("MMVP_VLM_Images/Color/4.jpg")).unwrap();
    let err = read_mmvp(root).unwrap_err().to_string();
    assert!(err.contains("4.jpg"), "{err}");
    // An empty or blank statement (or punctuation only) is refused at load, naming line and id.
    for bad in ["", "\"  \"", "..."] {
        write(
            &root.join("Questions.csv"),
            format!("Question ID,Type,Statement\n1,Color,The car is red\n2,Color,{bad}\n"),
        );
        let err = read_mmvp(root).unwrap_err().to_string();
        assert!(
            err.contains("Questions.csv:3") && err.contains("question 2") && err.contains("no word"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn classification_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Image folder: classes sorted, non-images ignored.
    for (c, n) in [("cat", 2), ("ant", 1)] {
        for i in 0..n {
            tiny_jpeg(&root.join(format!("folder/{c}/{i}.png")));
        }
    }
    write(&root.join("folder/cat/notes.txt"), "x");
    let set = read_image_folder(&root.join("folder")).unwrap();
    assert_eq!(set.classes, vec!["ant", "cat"]);
    assert_eq!(set.class_counts(), vec![1, 2]);

    // CIFAR-10: label byte + 3072 channel-planar bytes.
    let mut rec = vec![7u8];
    rec.extend((0..3072).map(|i| (i / 1024 * 100) as u8));
    let mut bytes = rec.clone();
    bytes.extend(&rec);
    write(&root.join("cifar/data_batch_1.bin"), &bytes);
    write(
        &root.join("cifar/batches.meta.txt"),
        "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
    );
    let c = read_cifar(&root.join("cifar"), Cifar::Ten, &["data_batch_1.bin"]).unwrap();
    assert_eq!(c.items.len(), 2);
    assert_eq!(c.classes[c.items[0].label], "horse");
    match &c.items[0].source {
        ctxalign_data::classification::ImageSource::Pixels(img) => assert_eq!(img.get_pixel(5, 5).0, [0, 100, 200]),
        _ => panic!("pixels expected"),
    }
    write(&root.join("cifar/data_batch_1.bin"), &bytes[..5000]);
    let err = read_cifar(&root.join("cifar"), Cifar::Ten, &["data_batch_1.bin"]).unwrap_err().to_string();
    assert!(err.contains("data_batch_1.bin") && err.contains("3073-byte records"), "{err}");

    // MNIST IDX, gzipped.
    let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
    idx.extend([0, 255, 0, 10, 20, 30, 1, 2, 3, 4, 5, 6]);
    let gz = |data: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    write(&root.join("mnist/t10k-images-idx3-ubyte.gz"), gz(&idx));
    write(&root.join("mnist/t10k-labels-idx1-ubyte"), [0, 0, 8, 1, 0, 0, 0, 2, 4, 9]);
    let m =
        read_mnist(&root.join("mnist/t10k-images-idx3-ubyte.gz"), &root.join("mnist/t10k-labels-idx1-ubyte")).unwrap();
    assert_eq!(m.items.len(), 2);
    assert_eq!((m.items[0].label, m.items[1].label), (4, 9));
    write(&root.join("mnist/bad"), [0, 0, 8, 1, 0, 0, 0, 3, 4, 9]);
    let err =
        read_mnist(&root.join("mnist/t10k-images-idx3-ubyte.gz"), &root.join("mnist/bad")).unwrap_err().to_string();
    assert!(err.contains("bad"), "{err}");

    // UCI digits: the real file shipped in the data crate, and malformed rows.
    let digits = embedded_uci_digits();
    assert_eq!(digits.items.len(), 1797);
    assert_eq!(digits.class_counts().iter().sum::<usize>(), 1797);
    assert!(digits.class_counts().iter().all(|&n| n > 170));
    write(&root.join("digits.csv"), format!("{}\n{}1\n", ["0"; 65].join(","), ["0,"; 63].concat() + "17,"));
    let err = read_uci_digits(&root.join("digits.csv")).unwrap_err().to_string();
    assert!(err.contains("digits.csv:2") && err.contains("17"), "{err}");
}

/// The generated benchmark goes through the same readers and loader as real data.
#[test]
fn vignettes_written_in_real_formats_and_loaded() {
    use ctxalign_data::loader::{BadInputPolicy, CaptionDataset, ClassificationDataset, DataLoader, LoaderConfig};
    use ctxalign_data::vignettes::{write_benchmark, VignettesConfig};
    use ctxalign_data::{DecodeOptions, ImageProcessor};

    let tmp = tempfile::tempdir().unwrap();
    let cfg = VignettesConfig {
        seed: 5,
        image_size: 64,
        train_sets: 6,
        valid_sets: 4,
        test_sets: 3,
        caption_images: 20,
        class_images: 5,
        ..Default::default()
    };
    let report = write_benchmark(&cfg, tmp.path(), &|_| {}).unwrap();
    assert_eq!(report.images_written, (6 + 4 + 3) * 10 + 20 + 24 * 5);
    let ic = tmp.path().join("imagecode");
    let valid = ImageCodeSplit::open(&ic, "valid").unwrap();
    assert_eq!(valid.sets().len(), 4);
    assert!(valid.examples.iter().all(|e| e.target.is_some() && !e.categories.is_empty()));
    for set in valid.sets() {
        let images = valid.set_images(set).unwrap();
        assert_eq!(image::open(&images[0]).unwrap().width(), 64);
    }
    let test = ImageCodeSplit::open(&ic, "test").unwrap();
    assert!(test.examples.iter().all(|e| e.target.is_none()));
    let captions = read_caption_json(&tmp.path().join("captions/train.json"), &tmp.path().join("captions")).unwrap();
    assert_eq!(captions.len(), 18);
    assert!(captions.iter().all(|c| c.captions.len() >= 2 && c.image.is_file()));
    let classes = read_image_folder(&tmp.path().join("classes/train")).unwrap();
    assert_eq!(classes.classes.len(), 24);
    assert_eq!(classes.classes[0], "blue circle");

    // A corrupt image among the captions: skipped and reported under Skip, an error under Fail.
    let mut items = captions.clone();
    let bad = tmp.path().join("captions/images/broken.jpg");
    std::fs::write(&bad, b"\xFF\xD8\xFF\xE0 truncated").unwrap();
    items[3].image = bad;
    let dataset = |items| CaptionDataset {
        text: None,
        items,
        processor: ImageProcessor::blip(32),
        augment: None,
        decode: DecodeOptions::default(),
    };
    let loader = DataLoader::new(
        dataset(items.clone()),
        LoaderConfig { batch_size: 5, policy: BadInputPolicy::Skip, ..Default::default() },
    );
    let mut it = loader.epoch(0, 0);
    let n: usize = it.by_ref().map(|b| b.unwrap().items.len()).sum();
    assert_eq!(n, 17);
    let skipped = it.skipped();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].error.contains("broken.jpg"), "{}", skipped[0].error);
    let strict = DataLoader::new(dataset(items), LoaderConfig { batch_size: 5, ..Default::default() });
    assert!(strict.epoch(0, 0).any(|b| b.is_err()));

    let cls = DataLoader::new(
        ClassificationDataset {
            set: classes,
            processor: ImageProcessor::blip(32),
            augment: Some(Default::default()),
            decode: DecodeOptions::default(),
        },
        LoaderConfig { batch_size: 8, seed: 3, ..Default::default() },
    );
    let batch = cls.epoch(0, 0).next().unwrap().unwrap();
    let pixels = ctxalign_data::loader::stack_pixels(
        batch.items.iter().map(|i| i.pixels.as_slice()),
        32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(pixels.dims(), &[8, 3, 32, 32]);
}

/// The readers walk folders through the shared walker: a class folder or image reached twice
/// through links is refused naming both paths (it would count twice, or under two labels), a link
/// loop is not followed, and an IMAGECODE set whose two candidates are one file is refused.
#[cfg(unix)]
#[test]
fn folder_readers_list_each_real_file_once() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("folder");
    for (c, n) in [("cat", 2), ("dog", 1)] {
        for i in 0..n {
            tiny_jpeg(&root.join(format!("{c}/{i}.png")));
        }
    }
    symlink("..", root.join("cat/loop")).unwrap();
    let set = read_image_folder(&root).unwrap();
    assert_eq!((set.classes.len(), set.items.len()), (2, 3), "the loop is not followed");
    symlink(root.join("cat"), root.join("kitten")).unwrap();
    let msg = read_image_folder(&root).unwrap_err().to_string();
    assert!(msg.contains("kitten") && msg.contains("cat") && msg.contains("through a link"), "{msg}");
    std::fs::remove_file(root.join("kitten")).unwrap();
    symlink(root.join("cat/0.png"), root.join("dog/cat-0.png")).unwrap();
    let msg = read_image_folder(&root).unwrap_err().to_string();
    assert!(msg.contains("dog/cat-0.png") && msg.contains("cat/0.png"), "{msg}");

    let ic = tmp.path().join("ic");
    for f in 0..9 {
        tiny_jpeg(&ic.join(format!("image-sets/s/img{f}.jpg")));
    }
    symlink(ic.join("image-sets/s/img8.jpg"), ic.join("image-sets/s/img9.jpg")).unwrap();
    let msg = set_images(&ic.join("image-sets"), "s", &ic.join("x.json")).unwrap_err().to_string();
    assert!(msg.contains("img9.jpg") && msg.contains("the same image as") && msg.contains("img8.jpg"), "{msg}");
}

/// A classification split with no image (one image per class split 70/30 by class) is an error
/// naming it, not an accuracy of 0 over nothing.
#[test]
fn an_empty_classification_split_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("one-each");
    for c in ["a", "b", "c"] {
        tiny_jpeg(&root.join(format!("{c}/0.png")));
    }
    let set = read_image_folder(&root).unwrap();
    let (train, test) = ctxalign_data::classification::stratified_split(&set, 0.3, 0);
    assert_eq!((train.items.len(), test.items.len()), (3, 0));
    train.require_items("the training split").unwrap();
    match test.require_items("the test split of folder:one-each") {
        Err(e @ DataError::EmptySplit { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("the test split of folder:one-each holds no images") && msg.contains("3 classes"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
}
