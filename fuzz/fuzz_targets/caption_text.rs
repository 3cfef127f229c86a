#![no_main]
//! Caption text through BLIP's cleaning and the shipped tokenizers (the small BLIP's WordPiece with
//! BLIP's cleaning, ContextCLIP's bert-base-uncased with none): no panics; the cleaned text keeps
//! none of the removed characters, no surrounding spaces and at most `max_words` words; and what
//! the check before training accepts (`check_text`) the encoder accepts too, within `max_tokens`
//! and the vocabulary — a caption that passes the preflight never fails at the step that draws it.
use std::path::Path;
use std::sync::OnceLock;

use ctxalign_data::{clean_caption, CaptionCleaning, TextTokenizer};
use libfuzzer_sys::fuzz_target;

fn tokenizers() -> &'static [TextTokenizer] {
    static TOKENIZERS: OnceLock<Vec<TextTokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let blip = include_bytes!("../../models/blip-vignettes-small/tokenizer.json");
        let bert = include_bytes!("../../models/bert-base-uncased-tokenizer/tokenizer.json");
        vec![
            TextTokenizer::from_bytes(blip, Path::new("blip/tokenizer.json"), CaptionCleaning::blip(30), 35).unwrap(),
            TextTokenizer::from_bytes(bert, Path::new("bert/tokenizer.json"), CaptionCleaning::none(), 8).unwrap(),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for tok in tokenizers() {
        let (cleaned, _) = clean_caption(text, &tok.cleaning);
        assert!(!cleaned.chars().any(|c| tok.cleaning.remove_chars.contains(c)), "{cleaned:?}");
        assert!(!cleaned.starts_with(' ') && !cleaned.ends_with(' '), "{cleaned:?}");
        if let Some(max) = tok.cleaning.max_words {
            assert!(cleaned.split(' ').count() <= max, "{cleaned:?}");
        }
        let checked = tok.check_text(text);
        let encoded = tok.encode_batch(&[text], 0);
        match (checked, encoded) {
            (Ok(()), Ok(batch)) => {
                let vocab = tok.inner().get_vocab_size(true) as u32;
                let ids = &batch.input_ids[0];
                assert!(ids.len() <= tok.max_tokens, "{} tokens", ids.len());
                assert!(ids.iter().all(|&id| id < vocab), "{ids:?}");
            }
            (Ok(()), Err(e)) => panic!("{text:?} passed the check but the encoder refused it: {e}"),
            (Err(_), _) => {}
        }
    }
});
