//! Caption cleaning as BLIP's `pre_caption`, and `tokenizer.json` tokenization with truncation
//! counted so evaluations can report how many descriptions were cut.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// A tokenizer failure, naming the file where there is one.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: tokenizer file not found")]
    NotFound { path: PathBuf },
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// A text with no word left after cleaning (empty, blank or punctuation only): scoring it would
    /// rank images against `[CLS] [SEP]` alone.
    #[error("the text {text:?} has no words left after cleaning: nothing to score")]
    Empty { text: String },
    #[error("tokenizer has no `{token}` token and none can be derived: {reason}")]
    MissingToken { token: String, reason: String },
    /// The tokenizer produces ids the model's embedding table has no row for: the first text with
    /// such a token would fail at scoring ("index-select invalid index"), or read another row.
    #[error("{0}")]
    IdsExceedEmbeddings(Box<EmbeddingMismatch>),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A tokenizer whose ids a model's embedding table has no rows for ([`TextError::IdsExceedEmbeddings`];
/// boxed, so that every error carrying a `TextError` stays small).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{tokenizer}: token `{token}` has id {id}, but the model's embedding table ({config}) has only {vocab_size} \
     rows (ids 0..{vocab_size}): this tokenizer belongs to another model"
)]
pub struct EmbeddingMismatch {
    pub tokenizer: PathBuf,
    pub config: PathBuf,
    pub token: String,
    pub id: u32,
    pub vocab_size: usize,
}

/// Settings of BLIP's caption cleaning (`pre_caption`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionCleaning {
    pub lowercase: bool,
    /// Characters replaced by a space (BLIP: `.!"()*#:;~`).
    pub remove_chars: String,
    /// Keep at most this many space-separated words (BLIP retrieval and ContextBLIP: 30).
    pub max_words: Option<usize>,
}

impl CaptionCleaning {
    /// BLIP's retrieval evaluation and ContextBLIP: lower-case, BLIP's punctuation, 30 words.
    pub fn blip(max_words: usize) -> Self {
        Self { lowercase: true, remove_chars: ".!\"()*#:;~".into(), max_words: Some(max_words) }
    }

    /// Text passed through unchanged.
    pub fn none() -> Self {
        Self { lowercase: false, remove_chars: String::new(), max_words: None }
    }
}

/// Applies BLIP's `pre_caption`; returns the cleaned text and whether words were cut.
///
/// Same steps as the Python: lower-case; each character of `remove_chars` → space; runs of two or
/// more whitespace characters → one space; strip trailing newlines and surrounding spaces; keep the
/// first `max_words` words of a split on single spaces.
pub fn clean_caption(text: &str, cleaning: &CaptionCleaning) -> (String, bool) {
    let lowered = if cleaning.lowercase { text.to_lowercase() } else { text.to_string() };
    let replaced: String = lowered.chars().map(|c| if cleaning.remove_chars.contains(c) { ' ' } else { c }).collect();
    let mut collapsed = String::with_capacity(replaced.len());
    let chars: Vec<char> = replaced.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            let start = i;
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            if i - start >= 2 {
                collapsed.push(' ');
            } else {
                collapsed.push(chars[start]);
            }
        } else {
            collapsed.push(chars[i]);
            i += 1;
        }
    }
    let cleaned = collapsed.trim_end_matches('\n').trim_matches(' ');
    match cleaning.max_words {
        Some(max) => {
            let words: Vec<&str> = cleaned.split(' ').collect();
            if words.len() > max {
                (words[..max].join(" "), true)
            } else {
                (cleaned.to_string(), false)
            }
        }
        None => (cleaned.to_string(), false),
    }
}

/// A padded batch of token ids with truncation accounting.
#[derive(Debug, Clone)]
pub struct TokenizedBatch {
    /// `[batch][len]`, `[CLS] … [SEP]` then `[PAD]`s.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
    /// Per text: words were dropped by `max_words`.
    pub words_truncated: Vec<bool>,
    /// Per text: tokens were dropped by `max_tokens`.
    pub tokens_truncated: Vec<bool>,
}

impl TokenizedBatch {
    /// Number of texts cut by either limit.
    pub fn truncated_count(&self) -> usize {
        self.words_truncated.iter().zip(&self.tokens_truncated).filter(|(w, t)| **w || **t).count()
    }

    /// `(input_ids, attention_mask)` as `[batch, len]` u32 tensors.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((Tensor::new(self.input_ids.clone(), device)?, Tensor::new(self.attention_mask.clone(), device)?))
    }

    /// Pads every text with `pad` ids (attention 0) to `len` tokens; texts already as long are left
    /// alone.
    pub fn pad_to(&mut self, len: usize, pad: u32) {
        for (ids, mask) in self.input_ids.iter_mut().zip(&mut self.attention_mask) {
            if ids.len() < len {
                ids.resize(len, pad);
                mask.resize(len, 0);
            }
        }
    }

    /// The ids with the first token of each text replaced by `first` (BLIP's `[ENC]` for ITM).
    pub fn with_first_token(&self, first: u32) -> Vec<Vec<u32>> {
        self.input_ids
            .iter()
            .map(|ids| {
                let mut ids = ids.clone();
                if let Some(f) = ids.first_mut() {
                    *f = first;
                }
                ids
            })
            .collect()
    }
}

/// `tokenizer.json` plus cleaning and length limits.
#[derive(Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    /// The file it was read from (or the name given for it), for errors.
    source: PathBuf,
    pub cleaning: CaptionCleaning,
    /// Tokens kept per text including `[CLS]` and `[SEP]` (BLIP retrieval: 35). Private: the
    /// tokenizer's truncation is set from it once, at construction.
    max_tokens: usize,
}

/// The settings, not the vocabulary (tens of thousands of entries).
impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocabulary", &self.tokenizer.get_vocab_size(true))
            .field("cleaning", &self.cleaning)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl TextTokenizer {
    pub fn from_file(path: &Path, cleaning: CaptionCleaning, max_tokens: usize) -> Result<Self, TextError> {
        if !path.is_file() {
            return Err(TextError::NotFound { path: path.to_owned() });
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| TextError::Load { path: path.to_owned(), message: e.to_string() })?;
        Self::configured(tokenizer, path, cleaning, max_tokens)
    }

    /// A tokenizer from the contents of a `tokenizer.json` (one built in memory, or received from
    /// another rank); `name` stands for its file in errors.
    pub fn from_bytes(
        json: &[u8],
        name: &Path,
        cleaning: CaptionCleaning,
        max_tokens: usize,
    ) -> Result<Self, TextError> {
        let tokenizer = Tokenizer::from_bytes(json)
            .map_err(|e| TextError::Load { path: name.to_owned(), message: e.to_string() })?;
        Self::configured(tokenizer, name, cleaning, max_tokens)
    }

    /// Sets truncation to `max_tokens` once, here, so that encoding needs no copy of the tokenizer
    /// (its vocabulary is tens of thousands of entries): padding, which depends on each call's pad
    /// id, is done by [`TextTokenizer::encode_batch`] itself. A padding setting the file carries is
    /// dropped for the same reason.
    fn configured(
        mut tokenizer: Tokenizer,
        source: &Path,
        cleaning: CaptionCleaning,
        max_tokens: usize,
    ) -> Result<Self, TextError> {
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| TextError::Load { path: source.to_owned(), message: e.to_string() })?;
        tokenizer.with_padding(None);
        Ok(Self { tokenizer, source: source.to_owned(), cleaning, max_tokens })
    }

    /// Tokens kept per text, `[CLS]` and `[SEP]` included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Checks that every id this tokenizer can produce (its vocabulary and added tokens) has a row
    /// in a model's embedding table of `vocab_size` rows, declared by `config`: a mismatched pair is
    /// refused when the model is loaded, naming both files, not at the first text that needs a
    /// missing row.
    pub fn check_fits_embeddings(&self, vocab_size: usize, config: &Path) -> Result<(), TextError> {
        let vocab = self.tokenizer.get_vocab(true);
        match vocab.into_iter().max_by_key(|(_, id)| *id) {
            Some((token, id)) if id as usize >= vocab_size => {
                Err(TextError::IdsExceedEmbeddings(Box::new(EmbeddingMismatch {
                    tokenizer: self.source.clone(),
                    config: config.to_owned(),
                    token,
                    id,
                    vocab_size,
                })))
            }
            _ => Ok(()),
        }
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// BLIP's `[ENC]` id (it replaces `[CLS]` for ITM): the tokenizer's `[ENC]`, else BLIP's
    /// convention — the id after `[DEC]` (`bos_token_id`), which must be the last of the vocabulary.
    pub fn blip_enc_token_id(&self, bos_token_id: u32, vocab_size: usize) -> Result<u32, TextError> {
        if let Some(id) = self.token_id("[ENC]") {
            return Ok(id);
        }
        let derived = bos_token_id + 1;
        if derived as usize + 1 == vocab_size {
            Ok(derived)
        } else {
            Err(TextError::MissingToken {
                token: "[ENC]".into(),
                reason: format!("bos_token_id {bos_token_id} + 1 is not the last id of a vocabulary of {vocab_size}"),
            })
        }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// What [`TextTokenizer::encode_batch`] would refuse in `text`, found without encoding a batch:
    /// cleaned, it must keep a word (letter or digit), and tokenized, a token besides the special
    /// ones (a text of characters the vocabulary drops would otherwise train as `[CLS] [SEP]`).
    /// Training runs check every caption and description with it before the first step, so a text
    /// that cleans to nothing is found then, not at the step that draws it.
    pub fn check_text(&self, text: &str) -> Result<(), TextError> {
        let (cleaned, _) = clean_caption(text, &self.cleaning);
        if !cleaned.chars().any(char::is_alphanumeric) {
            return Err(TextError::Empty { text: text.to_string() });
        }
        let encoding = self.tokenizer.encode(cleaned, true).map_err(|e| TextError::Encode(e.to_string()))?;
        if encoding.get_special_tokens_mask().iter().all(|&special| special == 1) {
            return Err(TextError::Empty { text: text.to_string() });
        }
        Ok(())
    }

    /// Cleans, tokenizes (special tokens added by the tokenizer's post-processor), truncates to
    /// `max_tokens` and pads to the longest text with `pad_id`.
    pub fn encode_batch(&self, texts: &[&str], pad_id: u32) -> Result<TokenizedBatch, TextError> {
        let (cleaned, words_truncated): (Vec<String>, Vec<bool>) =
            texts.iter().map(|t| clean_caption(t, &self.cleaning)).unzip();
        if let Some(i) = cleaned.iter().position(|c| !c.chars().any(char::is_alphanumeric)) {
            return Err(TextError::Empty { text: texts[i].to_string() });
        }
        let encodings = self.tokenizer.encode_batch(cleaned, true).map_err(|e| TextError::Encode(e.to_string()))?;
        // Padded on the right to the longest text, as HF's `padding="longest"`.
        let longest = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let padded = |values: &[u32], fill: u32| {
            let mut row = Vec::with_capacity(longest);
            row.extend_from_slice(values);
            row.resize(longest, fill);
            row
        };
        Ok(TokenizedBatch {
            input_ids: encodings.iter().map(|e| padded(e.get_ids(), pad_id)).collect(),
            attention_mask: encodings.iter().map(|e| padded(e.get_attention_mask(), 0)).collect(),
            tokens_truncated: encodings.iter().map(|e| !e.get_overflowing().is_empty()).collect(),
            words_truncated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_caption_matches_blip() {
        let c = CaptionCleaning::blip(30);
        // Expected strings computed with BLIP's Python `pre_caption`.
        assert_eq!(clean_caption("A man (left) is riding: a horse!!", &c).0, "a man left is riding a horse");
        assert_eq!(clean_caption("  Two\tdogs.  \n", &c).0, "two\tdogs");
        assert_eq!(clean_caption("it's ~ #1; \"ok\"", &c).0, "it's 1 ok");
        let long = (0..40).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        let (out, cut) = clean_caption(&long, &c);
        assert!(cut);
        assert_eq!(out.split(' ').count(), 30);
        assert!(!clean_caption("short one", &c).1);
    }
}

/// Builds a BERT-style uncased WordPiece `tokenizer.json` (the layout of bert-base-uncased's, with
/// BLIP's `[DEC]`/`[ENC]` as the last two ids) whose vocabulary is every whole word of `corpus`
/// (lower-cased, BERT pre-tokenisation) seen at least `min_count` times, plus single characters
/// and `##` continuations of ASCII letters and digits, so any ASCII text still tokenises.
///
/// Ids: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, characters, words by frequency,
/// `[DEC]`, `[ENC]`. Returns the JSON text and the vocabulary size.
pub fn build_wordpiece_tokenizer_json(corpus: &[&str], min_count: usize) -> (String, usize) {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for text in corpus {
        let lowered = text.to_lowercase();
        for word in lowered.split(|c: char| c.is_whitespace() || c.is_ascii_punctuation()).filter(|w| !w.is_empty()) {
            *counts.entry(word.to_owned()).or_default() += 1;
        }
    }
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].iter().map(|s| s.to_string()).collect();
    let singles: Vec<char> = (b'!'..=b'~').map(|b| b as char).filter(|c| !c.is_ascii_uppercase()).collect();
    vocab.extend(singles.iter().map(|c| c.to_string()));
    vocab.extend(singles.iter().filter(|c| c.is_ascii_alphanumeric()).map(|c| format!("##{c}")));
    let mut words: Vec<(String, usize)> =
        counts.into_iter().filter(|(w, n)| *n >= min_count && w.chars().count() > 1).collect();
    words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    vocab.extend(words.into_iter().map(|(w, _)| w));
    vocab.push("[DEC]".into());
    vocab.push("[ENC]".into());
    let id = |t: &str| vocab.iter().position(|v| v == t).expect("special token present");
    let special = |t: &str| {
        serde_json::json!({"id": id(t), "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                           "normalized": false, "special": true})
    };
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
    let added: Vec<serde_json::Value> =
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"].into_iter().map(special).collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [id("[CLS]")], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [id("[SEP]")], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab_map}
    });
    (serde_json::to_string_pretty(&json).expect("JSON serialises"), vocab.len())
}

#[cfg(test)]
mod wordpiece_tests {
    use super::*;

    #[test]
    fn built_tokenizer_loads_and_covers_unseen_words() {
        let (json, size) = build_wordpiece_tokenizer_json(&["A red Circle, left of the square.", "a red square"], 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let tok = TextTokenizer::from_file(&path, CaptionCleaning::blip(30), 35).unwrap();
        assert_eq!(tok.token_id("[ENC]"), Some(size as u32 - 1));
        assert_eq!(tok.token_id("[DEC]"), Some(size as u32 - 2));
        assert_eq!(tok.blip_enc_token_id(size as u32 - 2, size).unwrap(), size as u32 - 1);
        let batch = tok.encode_batch(&["a red circle", "purple zebra"], 0).unwrap();
        let ids = &batch.input_ids[0];
        assert_eq!(ids[0], tok.token_id("[CLS]").unwrap());
        assert_eq!(
            ids[1..4],
            [tok.token_id("a").unwrap(), tok.token_id("red").unwrap(), tok.token_id("circle").unwrap()]
        );
        assert_eq!(ids[4], tok.token_id("[SEP]").unwrap());
        // Unseen words fall back to characters, never to [UNK].
        assert!(!batch.input_ids[1].contains(&tok.token_id("[UNK]").unwrap()));
    }

    /// Padding (done by hand since the tokenizer is no longer copied per call) and truncation (set
    /// once at construction), against ids written out from the vocabulary: every row as long as the
    /// longest, `[PAD]` ids and zero mask after the text, and a text over `max_tokens` cut to
    /// `[CLS]` + words + `[SEP]` with its flag raised. Repeated calls give the same batch.
    #[test]
    fn batches_are_padded_to_the_longest_and_cut_at_max_tokens() {
        let (json, _) = build_wordpiece_tokenizer_json(&["a red circle left of the square"], 1);
        let tok =
            TextTokenizer::from_bytes(json.as_bytes(), Path::new("t.json"), CaptionCleaning::blip(30), 5).unwrap();
        assert_eq!(tok.max_tokens(), 5);
        let id = |t: &str| tok.token_id(t).unwrap();
        let (cls, sep, pad) = (id("[CLS]"), id("[SEP]"), 7);
        let texts = ["red", "a red circle", "a red circle left of the square"];
        let batch = tok.encode_batch(&texts, pad).unwrap();
        assert_eq!(
            batch.input_ids,
            vec![
                vec![cls, id("red"), sep, pad, pad],
                vec![cls, id("a"), id("red"), id("circle"), sep],
                vec![cls, id("a"), id("red"), id("circle"), sep],
            ]
        );
        assert_eq!(batch.attention_mask, vec![vec![1, 1, 1, 0, 0], vec![1; 5], vec![1; 5]]);
        assert_eq!(batch.tokens_truncated, vec![false, false, true]);
        assert_eq!(batch.truncated_count(), 1);
        let again = tok.encode_batch(&texts[..1], 0).unwrap();
        assert_eq!(again.input_ids, vec![vec![cls, id("red"), sep]], "one text: no padding");
        assert_eq!(tok.encode_batch(&texts, pad).unwrap().input_ids, batch.input_ids);
    }

    /// Nothing left after BLIP's cleaning is refused, naming the text, whatever else the batch holds.
    #[test]
    fn texts_without_words_are_refused() {
        let (json, _) = build_wordpiece_tokenizer_json(&["a red circle"], 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let tok = TextTokenizer::from_file(&path, CaptionCleaning::blip(30), 35).unwrap();
        for bad in ["", "   ", "!!! ...", "()*#:;~"] {
            match tok.encode_batch(&["a red circle", bad], 0) {
                Err(TextError::Empty { text }) => assert_eq!(text, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
