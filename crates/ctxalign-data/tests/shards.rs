//! WebDataset shards: names, tar, writing and reading back, the scan, and the stream's split over
//! ranks and reader threads, determinism, resume, resampling and bad samples.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ctxalign_data::captions::CaptionedImage;
use ctxalign_data::imagecode::ImageCodeSplit;
use ctxalign_data::loader::{Augment, BadInputPolicy, CaptionDataset, Dataset, ImageCodeDataset, Shard, Skipped};
use ctxalign_data::rng::Rng;
use ctxalign_data::shards::{
    expand_shards, write_caption_shards, write_imagecode_shards, CaptionShards, ImageCodeShards, SampleReader,
    ScanPart, ShardIndex, ShardLoader, ShardLoaderConfig, ShardOptions, ShardWriter, TarReader, TarWriter, WdsSample,
};
use ctxalign_data::{DataError, DecodeOptions, ImageProcessor};

// ---------------------------------------------------------------------------------------------
// Fixtures

fn encode(w: u32, h: u32, seed: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(seed * 53 + x * 17) as u8, (seed * 29 + y * 23) as u8, (seed * 71 + x * y) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn png(seed: u32) -> Vec<u8> {
    encode(12 + seed % 5, 10 + seed % 3, seed, image::ImageFormat::Png)
}

fn jpeg(seed: u32) -> Vec<u8> {
    encode(16, 12 + seed % 4, seed, image::ImageFormat::Jpeg)
}

/// `n` captioned images in `root/images` (PNG and JPEG alternately), two captions each.
fn caption_items(root: &Path, n: usize) -> Vec<CaptionedImage> {
    let dir = root.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    (0..n)
        .map(|i| {
            let (name, bytes) = match i % 2 {
                0 => (format!("pic{i}.png"), png(i as u32)),
                _ => (format!("pic{i}.JPG"), jpeg(i as u32)),
            };
            std::fs::write(dir.join(&name), bytes).unwrap();
            CaptionedImage::new(dir.join(name), vec![format!("caption {i} a"), format!("caption {i} b")])
        })
        .collect()
}

fn options(max_count: usize) -> ShardOptions {
    ShardOptions { max_count, ..Default::default() }
}

fn caption_format(augment: Option<Augment>) -> CaptionShards {
    CaptionShards { processor: ImageProcessor::blip(8), augment, decode: DecodeOptions::default(), text: None }
}

fn config(batch_size: usize, rank: usize, world: usize, workers: usize) -> ShardLoaderConfig {
    ShardLoaderConfig {
        batch_size,
        seed: 11,
        shard: Shard::new(rank, world),
        workers,
        shuffle_buffer: 5,
        resampled: false,
        policy: BadInputPolicy::Fail,
        prefetch: 2,
    }
}

/// `n` captioned images written as shards of `per_shard` samples; returns the tempdir, the items
/// and the shard paths.
fn caption_shards(n: usize, per_shard: usize) -> (tempfile::TempDir, Vec<CaptionedImage>, Vec<PathBuf>) {
    let tmp = tempfile::tempdir().unwrap();
    let items = caption_items(tmp.path(), n);
    let report = write_caption_shards(&items, tmp.path(), &tmp.path().join("shards"), &options(per_shard)).unwrap();
    let paths = expand_shards(&report.written.pattern()).unwrap();
    (tmp, items, paths)
}

fn caption_loader(paths: &[PathBuf], config: ShardLoaderConfig) -> ShardLoader<CaptionShards> {
    let (index, skipped) = ShardIndex::scan(paths, &caption_format(None), BadInputPolicy::Fail).unwrap();
    assert!(skipped.is_empty());
    ShardLoader::new(index, caption_format(None), config).unwrap()
}

/// An epoch's batches as (numbers, captions).
fn run_epoch(loader: &ShardLoader<CaptionShards>, epoch: u64, start: usize) -> Vec<(Vec<usize>, Vec<String>)> {
    loader
        .epoch(epoch, start)
        .map(|b| {
            let b = b.unwrap();
            (b.indices, b.items.into_iter().map(|s| s.caption).collect())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shard names

#[test]
fn brace_expansion_ranges_widths_alternatives_and_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let touch = |name: &str| {
        std::fs::create_dir_all(d.join(name).parent().unwrap()).unwrap();
        std::fs::write(d.join(name), b"").unwrap();
    };
    for i in 0..12 {
        touch(&format!("a-{i:06}.tar"));
    }
    for name in ["b-8.tar", "b-9.tar", "b-10.tar", "x/p-0.tar", "x/p-1.tar", "y/p-0.tar", "y/p-1.tar"] {
        touch(name);
    }
    let ds = d.display();
    let names = |spec: String| -> Vec<String> {
        expand_shards(&spec).unwrap().iter().map(|p| p.strip_prefix(d).unwrap().display().to_string()).collect()
    };
    let a = names(format!("{ds}/a-{{000000..000011}}.tar"));
    assert_eq!(a.len(), 12);
    assert_eq!((a[0].as_str(), a[11].as_str()), ("a-000000.tar", "a-000011.tar"));
    // The width is the first bound's: 8, 9, 10 unpadded.
    assert_eq!(names(format!("{ds}/b-{{8..10}}.tar")), ["b-8.tar", "b-9.tar", "b-10.tar"]);
    // Descending ranges count down; `{10..8}` would name `b-09.tar` (the width of `10`).
    assert_eq!(names(format!("{ds}/b-{{9..8}}.tar")), ["b-9.tar", "b-8.tar"]);
    let err = expand_shards(&format!("{ds}/b-{{10..8}}.tar")).unwrap_err().to_string();
    assert!(err.contains("b-09.tar"), "{err}");
    // Alternatives and several groups multiply out, the leftmost slowest.
    assert_eq!(names(format!("{ds}/{{x,y}}/p-{{0..1}}.tar")), ["x/p-0.tar", "x/p-1.tar", "y/p-0.tar", "y/p-1.tar"]);
    // `::` joins lists, in order.
    assert_eq!(
        names(format!("{ds}/b-{{9..10}}.tar::{ds}/a-{{000003..000004}}.tar")),
        ["b-9.tar", "b-10.tar", "a-000003.tar", "a-000004.tar"]
    );

    // Missing files: the first named, the count given.
    let err = expand_shards(&format!("{ds}/a-{{000010..000014}}.tar")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("3 of the 5") && msg.contains("a-000012.tar"), "{msg}");
    let err = expand_shards(&format!("{ds}/b-{{8..11}}.tar")).unwrap_err().to_string();
    assert!(err.contains("b-11.tar") && err.contains("does not exist"), "{err}");
    // Remote shards are refused, saying so.
    for remote in ["http://host/a-{0..1}.tar", "https://host/a.tar", "s3://bucket/a.tar", "pipe:curl -s x.tar"] {
        let err = expand_shards(remote).unwrap_err().to_string();
        assert!(err.contains("local files only"), "{remote}: {err}");
    }
    // Malformed braces and empty lists name the spec.
    for bad in ["a-{1..}.tar", "a-{..3}.tar", "a-{x..3}.tar", "a-{0,1.tar", "a-0}.tar", "a-{}.tar", "", " :: "] {
        let err = expand_shards(bad).unwrap_err();
        assert!(matches!(&err, DataError::Spec { spec, .. } if spec == bad), "{bad:?}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// tar

/// A raw header block (for archives the writer does not produce: GNU long names, ustar prefixes,
/// folders, global pax headers).
fn raw_header(name: &str, size: usize, kind: u8, gnu: bool, prefix: &str) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = kind;
    if gnu {
        h[257..265].copy_from_slice(b"ustar  \0");
    } else {
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    }
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().div_ceil(512) * 512, 0);
    v
}

fn read_all(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>, u64)>, DataError> {
    TarReader::new(bytes, "test.tar").map(|e| e.map(|e| (e.name, e.data, e.offset))).collect()
}

#[test]
fn tar_round_trip_of_long_names_binary_empty_and_many_entries() {
    let long = format!("{}/{}.bin", "d".repeat(120), "n".repeat(90));
    let unicode = format!("{}é.txt", "ü".repeat(60));
    let mut entries: Vec<(String, Vec<u8>)> = vec![
        ("a.txt".into(), b"hello".to_vec()),
        ("bytes.bin".into(), (0..=255u8).cycle().take(1000).collect()),
        ("empty.txt".into(), vec![]),
        (long.clone(), vec![7; 512]),
        (unicode.clone(), b"u".to_vec()),
        ("x".repeat(100), b"exactly 100".to_vec()),
    ];
    for i in 0..300 {
        entries.push((format!("many/{i:04}.dat"), vec![i as u8; i % 700]));
    }
    let mut w = TarWriter::new(Vec::new());
    for (name, data) in &entries {
        w.append(name, data).unwrap();
    }
    let bytes = w.finish().unwrap();
    assert_eq!(bytes.len() % 512, 0);
    assert!(bytes[bytes.len() - 1024..].iter().all(|&b| b == 0), "two zero blocks end the archive");
    let read = read_all(&bytes).unwrap();
    assert_eq!(read.len(), entries.len());
    for ((name, data, _), (n, d)) in read.iter().zip(&entries) {
        assert_eq!((name, data), (n, d));
    }
    // Offsets point at headers: the first at 0, the second after a.txt's header and one block.
    assert_eq!((read[0].2, read[1].2), (0, 1024));

    // What other writers produce: GNU long names, ustar prefixes, folders, global pax headers.
    let gnu_name = "g".repeat(140) + ".jpg";
    let mut other = Vec::new();
    other.extend(raw_header("pax_global_header", 19, b'g', false, ""));
    other.extend(padded(b"19 comment=abcdefg\n"));
    other.extend(raw_header("dir/", 0, b'5', false, ""));
    other.extend(raw_header("././@LongLink", gnu_name.len() + 1, b'L', true, ""));
    other.extend(padded(format!("{gnu_name}\0").as_bytes()));
    other.extend(raw_header(&gnu_name[..100], 3, b'0', true, ""));
    other.extend(padded(b"abc"));
    other.extend(raw_header("file.txt", 2, b'0', false, "some/prefix"));
    other.extend(padded(b"hi"));
    other.extend([0u8; 1024]);
    let read = read_all(&other).unwrap();
    let names: Vec<&str> = read.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names, [gnu_name.as_str(), "some/prefix/file.txt"]);
    assert_eq!(read[0].1, b"abc");
    assert_eq!(read[0].2, 3 * 512, "the offset of a long-named entry is its long-name header's");
}

#[test]
fn damaged_archives_are_errors_naming_the_offset() {
    let mut w = TarWriter::new(Vec::new());
    w.append("one.txt", &[1; 700]).unwrap();
    w.append("two.txt", &[2; 10]).unwrap();
    let good = w.finish().unwrap();
    // one.txt: header 0, data 512..1212 (padded to 1536); two.txt: header 1536.
    let err = |bytes: &[u8]| read_all(bytes).unwrap_err().to_string();

    let e = err(&good[..1000]);
    assert!(e.contains("truncated") && e.contains("one.txt") && e.contains("byte 1000"), "{e}");
    let e = err(&good[..1536 + 100]);
    assert!(e.contains("truncated") && e.contains("header at byte 1536"), "{e}");
    let e = err(&good[..2048 + 512]);
    assert!(e.contains("without its end-of-archive blocks") && e.contains("byte 2560"), "{e}");

    let mut bad = good.clone();
    bad[1536 + 3] ^= 0x20; // a byte of two.txt's name
    let e = err(&bad);
    assert!(e.contains("checksum") && e.contains("byte 1536"), "{e}");
    // The entries before the damage are read.
    let first = TarReader::new(&bad[..], "t.tar").next().unwrap().unwrap();
    assert_eq!(first.name, "one.txt");

    let e = err(&png(1));
    assert!(e.contains("not a tar archive") && e.contains("test.tar"), "{e}");
    assert!(err(b"").contains("empty file"));
}

#[test]
fn every_truncation_is_an_error_and_no_damage_panics() {
    let mut w = TarWriter::new(Vec::new());
    let long = format!("{}.jpg", "k".repeat(130));
    for (name, data) in [("k1.png", png(1)), ("k1.txt", b"a cat".to_vec()), (long.as_str(), jpeg(2)), ("e.txt", vec![])]
    {
        w.append(name, &data).unwrap();
    }
    let good = w.finish().unwrap();
    let read = |bytes: &[u8]| -> Result<usize, DataError> {
        SampleReader::new(bytes, "cut.tar").map(|s| s.map(|s| s.files.len())).sum()
    };
    assert_eq!(read(&good).unwrap(), 4);
    // Cut anywhere before the first end-of-archive block is complete: an error, never fewer samples.
    for cut in 0..good.len() - 512 {
        assert!(read(&good[..cut]).is_err(), "cut at {cut} read as a whole archive");
    }
    // Random damage: errors or samples, never a panic.
    let mut rng = Rng::new(5);
    for _ in 0..3000 {
        let mut bad = good.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bad.len());
            bad[at] = rng.next_u64() as u8;
        }
        for sample in SampleReader::new(&bad[..], "bad.tar").flatten() {
            let _ = (sample.captioned(), sample.imagecode());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writing and reading back

#[test]
fn caption_shards_read_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let items = caption_items(tmp.path(), 7);
    let out = tmp.path().join("out");
    let report = write_caption_shards(&items, tmp.path(), &out, &options(3)).unwrap();
    assert!(report.left_out.is_empty());
    let w = &report.written;
    assert_eq!(w.shards.iter().map(|s| s.samples).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(w.pattern(), format!("{}/shards-{{000000..000002}}.tar", out.display()));
    for s in &w.shards {
        assert_eq!(std::fs::metadata(&s.path).unwrap().len(), s.bytes);
    }
    let paths = expand_shards(&w.pattern()).unwrap();
    assert_eq!(paths, w.shards.iter().map(|s| s.path.clone()).collect::<Vec<_>>());

    let samples: Vec<WdsSample> =
        paths.iter().flat_map(|p| SampleReader::open(p).unwrap().map(Result::unwrap)).collect();
    assert_eq!(samples.len(), 7);
    for (i, (s, item)) in samples.iter().zip(&items).enumerate() {
        assert_eq!(s.key, format!("{i:09}"));
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        let mut expected = vec![ext, "json", "txt"];
        expected.sort();
        assert_eq!(s.files.keys().collect::<Vec<_>>(), expected);
        assert_eq!(s.files[ext], std::fs::read(&item.image).unwrap(), "image bytes unchanged");
        assert_eq!(s.files["txt"], item.captions[0].as_bytes());
        let json: serde_json::Value = serde_json::from_slice(&s.files["json"]).unwrap();
        assert_eq!(json["captions"], serde_json::json!(item.captions));
        let name = item.image.file_name().unwrap().to_str().unwrap();
        assert_eq!(json["image"], format!("images/{name}"));
        let c = s.captioned().unwrap();
        assert_eq!((c.image_ext, c.captions.clone()), (ext, item.captions.clone()));
    }

    // Refused without overwrite, naming the folder; with it, old shards past the new last go.
    let err = write_caption_shards(&items, tmp.path(), &out, &options(3)).unwrap_err().to_string();
    assert!(err.contains(&out.display().to_string()) && err.contains("already holds 3 shard(s)"), "{err}");
    let again = ShardOptions { overwrite: true, ..options(10) };
    let report = write_caption_shards(&items, tmp.path(), &out, &again).unwrap();
    assert_eq!(report.written.shards.len(), 1);
    let mut left: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, ["shards-000000.tar"]);

    // A size limit starts new shards: here one sample each.
    let small = ShardOptions { max_bytes: 2048, prefix: "small".into(), ..options(100) };
    let report = write_caption_shards(&items, tmp.path(), &out, &small).unwrap();
    assert_eq!(report.written.shards.len(), 7);
    assert!(report.written.shards.iter().all(|s| s.samples == 1));

    // Bad inputs are found before anything is written: an error, or left out and reported.
    let mut bad = items.clone();
    bad[2].image = tmp.path().join("images/missing.png");
    bad[5].captions = vec![" ".into()];
    let fresh = tmp.path().join("fresh");
    let err = write_caption_shards(&bad, tmp.path(), &fresh, &options(3)).unwrap_err();
    assert!(matches!(err, DataError::Unusable { bad: 2, total: 7, .. }), "{err}");
    assert!(err.to_string().contains("missing.png"), "{err}");
    assert!(!fresh.exists(), "nothing written");
    let skip = ShardOptions { policy: BadInputPolicy::Skip, ..options(3) };
    let report = write_caption_shards(&bad, tmp.path(), &fresh, &skip).unwrap();
    assert_eq!(report.left_out.iter().map(|s| s.index).collect::<Vec<_>>(), [2, 5]);
    assert_eq!(report.written.samples(), 5);
    assert!(write_caption_shards(&[], tmp.path(), &tmp.path().join("none"), &options(3)).is_err());
}

#[test]
fn the_writer_checks_keys_and_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::create(tmp.path(), "p", 10, 1 << 20, false).unwrap();
    let mut files = BTreeMap::new();
    files.insert("txt".to_string(), b"x".to_vec());
    let err = w.write(&WdsSample { key: "a.b".into(), files: files.clone() }).unwrap_err().to_string();
    assert!(err.contains("would not read back"), "{err}");
    w.write(&WdsSample { key: "dir/k1".into(), files: files.clone() }).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "a dropped writer leaves nothing");
    let mut w = ShardWriter::create(tmp.path(), "p", 10, 1 << 20, false).unwrap();
    w.write(&WdsSample { key: "dir/k1".into(), files }).unwrap();
    let written = w.finish().unwrap();
    let back: Vec<WdsSample> = SampleReader::open(&written.shards[0].path).unwrap().map(Result::unwrap).collect();
    assert_eq!(back[0].key, "dir/k1");
    assert!(ShardWriter::create(tmp.path(), "p", 0, 1, true).is_err(), "max count 0");
}

/// An IMAGECODE root: `sets` sets whose frames are numbered 0..8 and 12 (numeric, not text, order
/// matters), labeled descriptions.
fn imagecode_root(root: &Path, sets: usize) -> ImageCodeSplit {
    let mut data = serde_json::Map::new();
    for s in 0..sets {
        let name = if s % 2 == 0 { format!("video-{s}") } else { format!("open-images-{s}") };
        let dir = root.join("image-sets").join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, frame) in [0, 1, 2, 3, 4, 5, 6, 7, 8, 12].iter().enumerate() {
            std::fs::write(dir.join(format!("img{frame}.png")), png((s * 10 + i) as u32)).unwrap();
        }
        let descriptions: serde_json::Map<String, serde_json::Value> = [(s % 10, "first"), ((s + 3) % 10, "second")]
            .iter()
            .map(|(t, w)| (t.to_string(), format!("the {w} one of set {s}").into()))
            .collect();
        data.insert(name, descriptions.into());
    }
    std::fs::write(root.join("train_data.json"), serde_json::to_string(&data).unwrap()).unwrap();
    ImageCodeSplit::open(root, "train").unwrap()
}

#[test]
fn imagecode_shards_read_back_and_load_as_the_split_does() {
    let tmp = tempfile::tempdir().unwrap();
    let split = imagecode_root(tmp.path(), 5);
    let out = tmp.path().join("shards");
    let report = write_imagecode_shards(&split, &out, &ShardOptions { max_count: 2, ..Default::default() }).unwrap();
    assert_eq!(report.written.shards.iter().map(|s| s.samples).collect::<Vec<_>>(), [2, 2, 1]);
    let paths = expand_shards(&report.written.pattern()).unwrap();
    let samples: Vec<WdsSample> =
        paths.iter().flat_map(|p| SampleReader::open(p).unwrap().map(Result::unwrap)).collect();
    for (sample, set) in samples.iter().zip(split.sets()) {
        let read = sample.imagecode().unwrap();
        assert_eq!(read.set, set);
        let files: Vec<Vec<u8>> = split.set_images(set).unwrap().iter().map(|p| std::fs::read(p).unwrap()).collect();
        let images: Vec<Vec<u8>> = read.images.iter().map(|(_, b)| b.to_vec()).collect();
        assert_eq!(images, files, "candidates in IMAGECODE's numeric order (img12 last)");
        let expected: Vec<(Option<usize>, String)> =
            split.examples.iter().filter(|e| e.set == set).map(|e| (e.target, e.description.clone())).collect();
        assert_eq!(read.descriptions, expected);
    }

    // Streamed: one item per description, each equal to the indexed dataset's.
    let processor = ImageProcessor::blip(8);
    let format = ImageCodeShards { processor: processor.clone(), decode: DecodeOptions::default(), text: None };
    let (index, _) = ShardIndex::scan(&paths, &format, BadInputPolicy::Fail).unwrap();
    assert_eq!(index.len(), 10, "two descriptions per set");
    let loader = ShardLoader::new(index, format, config(3, 0, 1, 2)).unwrap();
    assert_eq!(loader.batches_per_epoch(), 3);
    let dataset = ImageCodeDataset { split: split.clone(), processor, decode: DecodeOptions::default(), text: None };
    let mut seen = 0;
    for batch in loader.epoch(0, 0) {
        let batch = batch.unwrap();
        assert_eq!(batch.items.len(), 3);
        for (number, item) in batch.indices.iter().zip(&batch.items) {
            let e = split.examples.iter().position(|e| e.description == item.description).unwrap();
            let expected = dataset.load(e, &mut Rng::new(0)).unwrap();
            assert_eq!(item.pixels, expected.pixels);
            assert_eq!((item.target, item.video, item.candidates), (expected.target, expected.video, 10));
            assert_eq!(item.example, *number);
            seen += 1;
        }
    }
    assert_eq!(seen, 9);
}

// ---------------------------------------------------------------------------------------------
// The stream

#[test]
fn shards_split_over_ranks_and_workers_disjointly_and_completely() {
    let (_tmp, _, paths) = caption_shards(26, 2);
    assert_eq!(paths.len(), 13);
    let (index, _) = ShardIndex::scan(&paths, &caption_format(None), BadInputPolicy::Fail).unwrap();
    for world in [1, 2, 3, 4, 13] {
        for workers in [1, 2, 3, 5] {
            let loader = ShardLoader::new(index.clone(), caption_format(None), config(1, 0, world, workers)).unwrap();
            for epoch in 0..3 {
                let mut all = Vec::new();
                for rank in 0..world {
                    let mut rank_shards = Vec::new();
                    for w in 0..workers {
                        rank_shards.extend(loader.worker_shards(epoch, rank, w));
                    }
                    // Ranks get ⌊13/W⌋ or ⌈13/W⌉ shards.
                    assert!(rank_shards.len() == 13 / world || rank_shards.len() == 13_usize.div_ceil(world));
                    all.extend(rank_shards);
                }
                all.sort();
                assert_eq!(all, (0..13).collect::<Vec<_>>(), "W={world} workers={workers} epoch={epoch}");
            }
            assert_ne!(loader.shard_order(0), loader.shard_order(1), "epochs reshuffle the shards");
        }
    }
    // Fewer shards than ranks.
    let err = ShardLoader::new(index, caption_format(None), config(1, 0, 14, 1)).err().unwrap().to_string();
    assert!(err.contains("13 shards for 14 ranks") && err.contains("smaller shards"), "{err}");
}

#[test]
fn streams_are_deterministic_resumable_and_reshuffled() {
    let (_tmp, items, paths) = caption_shards(26, 3);
    let loader = caption_loader(&paths, config(3, 0, 1, 3));
    assert_eq!(loader.batches_per_epoch(), 8);
    let a = run_epoch(&loader, 0, 0);
    assert_eq!(a.len(), 8);
    for _ in 0..3 {
        assert_eq!(run_epoch(&loader, 0, 0), a, "same stream whatever the threads' timing");
    }
    // One rank holds every shard: the epoch's 24 items are distinct samples.
    let numbers: BTreeSet<usize> = a.iter().flat_map(|b| b.0.clone()).collect();
    assert_eq!(numbers.len(), 24);
    assert!(numbers.iter().all(|&n| n < 26));
    // Without augmentation the caption is the first of the sample's: number = item index here.
    for (ns, captions) in &a {
        for (n, c) in ns.iter().zip(captions) {
            assert_eq!(c, &items[*n].captions[0]);
        }
    }
    // Resuming at batch k gives the tail.
    for k in [1, 5, 8] {
        assert_eq!(run_epoch(&loader, 0, k), a[k..].to_vec(), "resume at {k}");
    }
    let b = run_epoch(&loader, 1, 0);
    assert_ne!(a, b, "epochs reshuffle");
    // The shuffle buffer mixes samples across the shards' order.
    let mut unshuffled = config(3, 0, 1, 1);
    unshuffled.shuffle_buffer = 0;
    let plain = run_epoch(&caption_loader(&paths, unshuffled.clone()), 0, 0);
    let mut buffered = unshuffled;
    buffered.shuffle_buffer = 10;
    assert_ne!(plain, run_epoch(&caption_loader(&paths, buffered), 0, 0));
    // Unshuffled, one worker: whole shards in the epoch's shard order.
    let order = caption_loader(&paths, config(3, 0, 1, 1)).shard_order(0);
    let first: Vec<usize> = plain.iter().flat_map(|b| b.0.clone()).take(7).collect();
    let expected: Vec<usize> = order.iter().flat_map(|&s| s * 3..(s * 3 + 3).min(26)).take(7).collect();
    assert_eq!(first, expected);
}

#[test]
fn items_match_the_indexed_loader_with_augmentation() {
    let (_tmp, items, paths) = caption_shards(10, 4);
    let augment = Some(Augment { crop_scale: Some((0.3, 1.0)), hflip: true });
    let (index, _) = ShardIndex::scan(&paths, &caption_format(augment), BadInputPolicy::Fail).unwrap();
    let loader = ShardLoader::new(index, caption_format(augment), config(2, 0, 1, 2)).unwrap();
    let dataset = CaptionDataset {
        items,
        processor: ImageProcessor::blip(8),
        augment,
        decode: DecodeOptions::default(),
        text: None,
    };
    let mut captions_seen = BTreeSet::new();
    for epoch in 0..4 {
        for batch in loader.epoch(epoch, 0) {
            let batch = batch.unwrap();
            for (n, item) in batch.indices.iter().zip(&batch.items) {
                let expected = dataset.load(*n, &mut Rng::derive(11, epoch, *n as u64)).unwrap();
                assert_eq!(item.pixels, expected.pixels, "same crop and flip from the sample's stream");
                assert_eq!(item.caption, expected.caption, "same caption drawn");
                assert_eq!(item.image_index, *n);
                captions_seen.insert(item.caption.clone());
            }
        }
    }
    assert!(captions_seen.iter().any(|c| c.ends_with(" b")), "the second captions are drawn too");
}

#[test]
fn every_rank_gets_the_same_number_of_full_batches_from_its_own_shards() {
    // 26 samples in shards of 4, 4, 4, 4, 4, 4, 2: uneven over 3 ranks.
    let (_tmp, _, paths) = caption_shards(26, 4);
    let (index, _) = ShardIndex::scan(&paths, &caption_format(None), BadInputPolicy::Fail).unwrap();
    for workers in [1, 2] {
        let mut counts = vec![];
        for rank in 0..3 {
            let loader = ShardLoader::new(index.clone(), caption_format(None), config(2, rank, 3, workers)).unwrap();
            assert_eq!(loader.batches_per_epoch(), 4, "26 / (3 × 2)");
            for epoch in 0..3 {
                let batches = run_epoch(&loader, epoch, 0);
                assert!(batches.iter().all(|b| b.0.len() == 2));
                counts.push(batches.len());
                // Every item comes from one of this rank's shards of the epoch.
                let mine: BTreeSet<usize> = (0..workers).flat_map(|w| loader.worker_shards(epoch, rank, w)).collect();
                for n in batches.iter().flat_map(|b| b.0.clone()) {
                    assert!(mine.contains(&(n / 4)), "rank {rank} epoch {epoch}: sample {n}");
                }
            }
        }
        assert!(counts.iter().all(|&c| c == 4), "{counts:?}");
    }
}

#[test]
fn resampled_streams_draw_with_replacement_deterministically() {
    let (_tmp, _, paths) = caption_shards(26, 2);
    let mut cfg = config(2, 0, 1, 2);
    cfg.resampled = true;
    let loader = caption_loader(&paths, cfg);
    assert_eq!(loader.batches_per_epoch(), 13);
    let a = run_epoch(&loader, 0, 0);
    assert_eq!(a, run_epoch(&loader, 0, 0), "deterministic");
    assert_eq!(run_epoch(&loader, 0, 4), a[4..].to_vec(), "resumable");
    assert_ne!(a, run_epoch(&loader, 1, 0));
    let numbers: Vec<usize> = a.iter().flat_map(|b| b.0.clone()).collect();
    let distinct: BTreeSet<usize> = numbers.iter().copied().collect();
    assert_eq!(numbers.len(), 26);
    assert!(distinct.len() < 26, "shards drawn with replacement repeat samples: {numbers:?}");
}

// ---------------------------------------------------------------------------------------------
// Bad samples

/// Shards (3 samples each) of 12 samples where sample 3 has no caption, 7 a damaged image header
/// and 9 malformed JSON, and 5 an image whose header is sound but whose pixels are cut off.
fn bad_shards(dir: &Path) -> Vec<PathBuf> {
    let mut w = ShardWriter::create(dir, "bad", 3, 1 << 30, false).unwrap();
    for i in 0..12 {
        let mut files = BTreeMap::new();
        let mut image = png(i as u32);
        match i {
            5 => image.truncate(image.len() - 20),
            7 => image[1] = b'X',
            _ => {}
        }
        files.insert("png".to_string(), image);
        if i != 3 {
            files.insert("txt".to_string(), format!("caption {i}").into_bytes());
        }
        if i == 9 {
            files.insert("json".to_string(), b"{\"captions\": [".to_vec());
        }
        w.write(&WdsSample { key: format!("{i:09}"), files }).unwrap();
    }
    let written = w.finish().unwrap();
    written.shards.iter().map(|s| s.path.clone()).collect()
}

#[test]
fn bad_samples_fail_the_scan_or_are_left_out_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = bad_shards(tmp.path());
    let shard = |i: usize| paths[i].display().to_string();

    let err = ShardIndex::scan(&paths, &caption_format(None), BadInputPolicy::Fail).unwrap_err();
    assert!(matches!(err, DataError::Unusable { bad: 3, total: 12, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("{}: sample 000000003: no caption", shard(1))), "{msg}");
    assert!(msg.contains(&format!("{}: sample 000000007:", shard(2))), "{msg}");
    assert!(msg.contains(&format!("{}: sample 000000009: json: malformed", shard(3))), "{msg}");

    let (index, skipped) = ShardIndex::scan(&paths, &caption_format(None), BadInputPolicy::Skip).unwrap();
    assert_eq!(skipped.iter().map(|s| s.index).collect::<Vec<_>>(), [3, 7, 9]);
    assert_eq!(index.len(), 9);
    assert_eq!(index.shards().iter().map(|s| s.items).collect::<Vec<_>>(), [3, 2, 2, 2]);

    // Sample 5 passes the scan (its header is sound) and fails to decode.
    // Batches of one: the epoch draws all 9 usable items of the pass, sample 5 among them.
    let mut cfg = config(1, 0, 1, 2);
    cfg.policy = BadInputPolicy::Fail;
    let loader = ShardLoader::new(index.clone(), caption_format(None), cfg.clone()).unwrap();
    let results: Vec<_> = loader.epoch(0, 0).collect();
    let failure = results.iter().find_map(|r| r.as_ref().err()).expect("sample 5 fails the epoch");
    let text = failure.to_string();
    assert!(text.contains(&shard(1)) && text.contains("sample 000000005"), "{text}");
    assert!(results.last().unwrap().is_err(), "the epoch stops at the failure");

    cfg.policy = BadInputPolicy::Skip;
    let loader = ShardLoader::new(index, caption_format(None), cfg).unwrap();
    assert_eq!(loader.batches_per_epoch(), 9);
    for epoch in 0..3 {
        let mut it = loader.epoch(epoch, 0);
        let batches: Vec<Vec<usize>> = it.by_ref().map(|b| b.unwrap().indices).collect();
        assert_eq!(batches.len(), 9);
        assert!(batches.iter().all(|b| b.len() == 1), "batches keep their size: {batches:?}");
        let seen: BTreeSet<usize> = batches.iter().flatten().copied().collect();
        assert!(seen.is_disjoint(&BTreeSet::from([3, 5, 7, 9])), "{seen:?}");
        let skipped: Vec<Skipped> = it.skipped();
        // Sample 5 is skipped when the stream reaches it, and the next item takes its place.
        assert!(!skipped.is_empty());
        assert!(skipped.iter().all(|s| s.index == 5 && s.error.contains("sample 000000005")), "{skipped:?}");
    }
}

#[test]
fn a_truncated_shard_keeps_the_samples_before_the_damage_under_skip() {
    let (tmp, _, paths) = caption_shards(9, 3);
    let bytes = std::fs::read(&paths[1]).unwrap();
    std::fs::write(&paths[1], &bytes[..bytes.len() / 2]).unwrap();
    let err = ShardIndex::scan(&paths, &caption_format(None), BadInputPolicy::Fail).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains(&paths[1].display().to_string()), "{err}");
    let (index, skipped) = ShardIndex::scan(&paths, &caption_format(None), BadInputPolicy::Skip).unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0].error.contains("truncated"));
    let kept = index.shards()[1].items;
    assert!(kept < 3, "{kept}");
    assert_eq!(index.len(), 6 + kept);
    // The stream reads the kept samples and stops before the damage.
    let loader = ShardLoader::new(index, caption_format(None), config(1, 0, 1, 1)).unwrap();
    let n = run_epoch(&loader, 0, 0).len();
    assert_eq!(n, 6 + kept);
    drop(tmp);
}

#[test]
fn the_scan_splits_over_ranks_and_the_parts_travel_as_json() {
    let (_tmp, _, paths) = caption_shards(14, 3);
    let format = caption_format(None);
    let (whole, _) = ShardIndex::scan(&paths, &format, BadInputPolicy::Fail).unwrap();
    let parts: Vec<ScanPart> = (0..3)
        .map(|r| {
            let part = ShardIndex::scan_share(&paths, Shard::new(r, 3), &format);
            assert_eq!(part.scans.iter().map(|(i, _)| *i).collect::<Vec<_>>(), (r..5).step_by(3).collect::<Vec<_>>());
            serde_json::from_slice(&serde_json::to_vec(&part).unwrap()).unwrap()
        })
        .collect();
    let (joined, _) = ShardIndex::from_parts(parts.clone(), BadInputPolicy::Fail).unwrap();
    assert_eq!(joined, whole);
    assert_eq!((0..5).map(|i| joined.first_number(i)).collect::<Vec<_>>(), [0, 3, 6, 9, 12]);
    let fp = joined.fingerprint();
    assert_eq!(fp.lines().count(), 5);
    assert!(fp.contains(&paths[4].display().to_string()) && fp.lines().last().unwrap().ends_with(" 2"), "{fp}");
    // A part missing, or one given twice, is an error.
    assert!(ShardIndex::from_parts(parts[..2].to_vec(), BadInputPolicy::Fail).is_err());
    assert!(ShardIndex::from_parts(vec![parts[0].clone(), parts[0].clone()], BadInputPolicy::Fail).is_err());

    // A shard rewritten after the scan is noticed by the stream.
    let loader = ShardLoader::new(whole, format, config(1, 0, 1, 1)).unwrap();
    let first = loader.shard_order(0)[0];
    let mut bytes = std::fs::read(&paths[first]).unwrap();
    bytes.extend([0u8; 512]);
    std::fs::write(&paths[first], bytes).unwrap();
    let err = loader.epoch(0, 0).find_map(Result::err).unwrap().to_string();
    assert!(err.contains("changed since it was scanned"), "{err}");
}

/// A tokenizer built from a few words, with BLIP's cleaning.
fn blip_tokenizer() -> ctxalign_data::TextTokenizer {
    let (json, _) = ctxalign_data::text::build_wordpiece_tokenizer_json(&["caption a b red circle"], 1);
    let cleaning = ctxalign_data::CaptionCleaning::blip(30);
    ctxalign_data::TextTokenizer::from_bytes(json.as_bytes(), Path::new("tokenizer.json"), cleaning, 35).unwrap()
}

/// Captions are part of the check before the first step: every caption of every sample is cleaned
/// and tokenized with the run's tokenizer, in files and in shards, and one that cleans to nothing
/// fails the check naming it (or is left out under Skip), like a damaged image.
#[test]
fn captions_that_clean_to_nothing_fail_the_check_before_the_first_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut items = caption_items(tmp.path(), 6);
    items[2].captions[1] = "...".into();
    items[4].captions[0] = "\"()*#".into();
    let text = Some(blip_tokenizer());
    let dataset = CaptionDataset {
        items: items.clone(),
        processor: ImageProcessor::blip(8),
        augment: None,
        decode: DecodeOptions::default(),
        text: text.clone(),
    };
    let mut strict = ctxalign_data::loader::DataLoader::new(dataset, Default::default());
    let err = strict.preflight().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Unusable { bad: 2, total: 6, .. }), "{msg}");
    assert!(msg.contains("pic2.png, caption 1: the text \"...\" has no words left"), "{msg}");
    assert!(msg.contains("pic4.png, caption 0"), "{msg}");
    let dataset = CaptionDataset {
        items: items.clone(),
        processor: ImageProcessor::blip(8),
        augment: None,
        decode: DecodeOptions::default(),
        text: text.clone(),
    };
    let config = ctxalign_data::loader::LoaderConfig { policy: BadInputPolicy::Skip, ..Default::default() };
    let mut lenient = ctxalign_data::loader::DataLoader::new(dataset, config);
    let left_out: Vec<usize> = lenient.preflight().unwrap().iter().map(|s| s.index).collect();
    assert_eq!(left_out, [2, 4]);

    // The same captions in shards: the scan finds them.
    let out = tmp.path().join("shards");
    let report = write_caption_shards(&items, tmp.path(), &out, &options(2)).unwrap();
    let paths = expand_shards(&report.written.pattern()).unwrap();
    let format = CaptionShards { text: text.clone(), ..caption_format(None) };
    let err = ShardIndex::scan(&paths, &format, BadInputPolicy::Fail).unwrap_err().to_string();
    assert!(err.contains("sample 000000002: caption 1: the text \"...\"") && err.contains("2 of 6"), "{err}");
    let (index, skipped) = ShardIndex::scan(&paths, &format, BadInputPolicy::Skip).unwrap();
    assert_eq!((index.len(), skipped.len()), (4, 2), "a bad caption is a bad sample, not a damaged shard");

    // An IMAGECODE description checked with the tokenizer: named by file and set.target.
    let split = imagecode_root(&tmp.path().join("ic"), 1);
    let mut split = split;
    split.examples[0].description = "~~ ; ~~".into();
    let dataset =
        ImageCodeDataset { split, processor: ImageProcessor::blip(8), decode: DecodeOptions::default(), text };
    let msg = dataset.check(0).unwrap_err().to_string();
    assert!(msg.contains("train_data.json: video-0.0") && msg.contains("has no words left"), "{msg}");
}

/// Two writers into one folder: the second is refused while the first holds the folder's lock.
#[test]
fn a_second_shard_writer_into_the_same_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = ShardWriter::create(tmp.path(), "p", 10, 1 << 20, false).unwrap();
    match ShardWriter::create(tmp.path(), "q", 10, 1 << 20, false) {
        Err(e @ DataError::Locked { .. }) => assert!(e.to_string().contains("shards (pid"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("two writers into one folder"),
    }
    first.finish().unwrap();
    ShardWriter::create(tmp.path(), "q", 10, 1 << 20, false).unwrap();
}
