//! Prompt tokenisation through the `tokenizers` crate, as the reference calls Hugging Face:
//! `truncation=True, max_length=77, padding="max_length"`.
//!
//! - CLIP (SD v1): `<|startoftext|>` (49406) … `<|endoftext|>` (49407), padded with 49407.
//! - BERT (LDM `BERTEmbedder`, bert-base-uncased WordPiece): `[CLS] … [SEP]`, padded with `[PAD]` (0).
//!
//! Prompts longer than 77 tokens keep the first 75 content tokens plus the closing special token,
//! with a logged warning that says how many were dropped — never an error.

use std::io::Read;
use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The context length of SD v1 and LDM text encoders.
pub const MAX_LENGTH: usize = 77;

/// Which text encoder the ids are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// CLIP byte-level BPE.
    Clip,
    /// BERT WordPiece (uncased).
    Bert,
}

/// A prompt's ids and what truncation removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Exactly `max_length` ids.
    pub ids: Vec<u32>,
    /// Tokens dropped by truncation (0 when the prompt fits).
    pub dropped: usize,
}

/// A tokenizer padding/truncating to a fixed length as the reference does.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    kind: TokenizerKind,
    max_length: usize,
    pad_id: u32,
}

/// The CLIP BPE vocabulary and merges (the files every SD v1 checkpoint was trained with) and the
/// bert-base-uncased WordPiece vocabulary, gzipped into the library so a checkpoint alone suffices.
const CLIP_VOCAB_GZ: &[u8] = include_bytes!("../../assets/tokenizers/clip/vocab.json.gz");
const CLIP_MERGES_GZ: &[u8] = include_bytes!("../../assets/tokenizers/clip/merges.txt.gz");
const BERT_VOCAB_GZ: &[u8] = include_bytes!("../../assets/tokenizers/bert/vocab.txt.gz");

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("embedded tokenizer data is valid gzip");
    out
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let err = |m: String| Error::Read {
        path: path.to_path_buf(),
        message: m,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| err(format!("gzip: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

impl TextTokenizer {
    fn new(mut inner: Tokenizer, kind: TokenizerKind, source: &Path) -> Result<Self> {
        let pad_token = match kind {
            TokenizerKind::Clip => "<|endoftext|>",
            TokenizerKind::Bert => "[PAD]",
        };
        let pad_id = inner.token_to_id(pad_token).ok_or_else(|| Error::Read {
            path: source.to_path_buf(),
            message: format!("not a {kind:?} tokenizer: no `{pad_token}` token"),
        })?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::Config(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            kind,
            max_length: MAX_LENGTH,
            pad_id,
        })
    }

    fn from_json(path: &Path, kind: TokenizerKind) -> Result<Self> {
        let bytes = read_maybe_gz(path)?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| Error::Read {
            path: path.to_path_buf(),
            message: format!("tokenizer.json: {e}"),
        })?;
        Self::new(inner, kind, path)
    }

    /// CLIP tokenizer from a Hugging Face `tokenizer.json` (optionally `.gz`).
    pub fn clip_from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(path.as_ref(), TokenizerKind::Clip)
    }

    /// BERT tokenizer from a Hugging Face `tokenizer.json` (optionally `.gz`).
    pub fn bert_from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_json(path.as_ref(), TokenizerKind::Bert)
    }

    /// CLIP tokenizer from the `vocab.json` + `merges.txt` pair (optionally `.gz`), assembled with
    /// the same pipeline Hugging Face's converter writes into `tokenizer.json`.
    pub fn clip_from_vocab_merges(
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
    ) -> Result<Self> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        Self::clip_from_bytes(&read_maybe_gz(vocab)?, &read_maybe_gz(merges)?, vocab)
    }

    /// The CLIP tokenizer of SD v1 (`openai/clip-vit-large-patch14`), built into the library.
    pub fn clip_builtin() -> Self {
        Self::clip_from_bytes(
            &gunzip(CLIP_VOCAB_GZ),
            &gunzip(CLIP_MERGES_GZ),
            Path::new("<built-in CLIP vocabulary>"),
        )
        .expect("embedded CLIP tokenizer")
    }

    /// The bert-base-uncased tokenizer of LDM's `BERTEmbedder`, built into the library.
    pub fn bert_builtin() -> Self {
        Self::bert_from_bytes(
            &gunzip(BERT_VOCAB_GZ),
            Path::new("<built-in BERT vocabulary>"),
        )
        .expect("embedded BERT tokenizer")
    }

    fn clip_from_bytes(vocab_bytes: &[u8], merges_bytes: &[u8], vocab: &Path) -> Result<Self> {
        let vocab_json: serde_json::Value =
            serde_json::from_slice(vocab_bytes).map_err(|e| Error::Read {
                path: vocab.to_path_buf(),
                message: format!("vocab.json: {e}"),
            })?;
        let merges_text = String::from_utf8(merges_bytes.to_vec()).map_err(|e| Error::Read {
            path: vocab.to_path_buf(),
            message: format!("merges.txt: {e}"),
        })?;
        let merges_list: Vec<serde_json::Value> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| serde_json::Value::String(l.to_string()))
            .collect();
        let mut json: serde_json::Value =
            serde_json::from_str(CLIP_PIPELINE).expect("valid template");
        json["model"]["vocab"] = vocab_json;
        json["model"]["merges"] = serde_json::Value::Array(merges_list);
        let inner =
            Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| Error::Read {
                path: vocab.to_path_buf(),
                message: format!("building the CLIP tokenizer: {e}"),
            })?;
        Self::new(inner, TokenizerKind::Clip, vocab)
    }

    /// BERT tokenizer from a WordPiece `vocab.txt` (optionally `.gz`), lower-casing as bert-base-uncased.
    pub fn bert_from_vocab(vocab: impl AsRef<Path>) -> Result<Self> {
        let path = vocab.as_ref();
        Self::bert_from_bytes(&read_maybe_gz(path)?, path)
    }

    fn bert_from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let text = String::from_utf8(bytes.to_vec()).map_err(|e| Error::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let vocab: serde_json::Map<String, serde_json::Value> = text
            .lines()
            .enumerate()
            .map(|(i, t)| (t.to_string(), serde_json::Value::from(i)))
            .collect();
        let mut json: serde_json::Value =
            serde_json::from_str(BERT_PIPELINE).expect("valid template");
        let id = |t: &str| vocab.get(t).cloned().unwrap_or(serde_json::Value::from(0));
        json["post_processor"]["sep"] = serde_json::json!(["[SEP]", id("[SEP]")]);
        json["post_processor"]["cls"] = serde_json::json!(["[CLS]", id("[CLS]")]);
        json["model"]["vocab"] = serde_json::Value::Object(vocab);
        let inner =
            Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| Error::Read {
                path: path.to_path_buf(),
                message: format!("building the BERT tokenizer: {e}"),
            })?;
        Self::new(inner, TokenizerKind::Bert, path)
    }

    /// Which encoder this is for.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// The same tokenizer padding/truncating to `max_length` ids instead of 77 (LDM's
    /// `BERTEmbedder(max_seq_len=N)` tokenizes with `BERTTokenizer(max_length=N)`). Lengths under 2
    /// (no room for the start and end tokens) are raised to 2.
    pub fn with_max_length(mut self, max_length: usize) -> Self {
        self.max_length = max_length.max(2);
        self
    }

    /// The number of ids [`encode`](Self::encode) returns.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenises one prompt to exactly [`max_length`](Self::max_length) ids (77 unless set; CLIP
    /// prompts first get [`fix_text`], as the reference's `CLIPTokenizer` runs `ftfy.fix_text`).
    pub fn encode(&self, prompt: &str) -> Result<Tokenized> {
        let cleaned;
        let prompt = match self.kind {
            TokenizerKind::Clip => {
                cleaned = fix_text(prompt);
                cleaned.as_str()
            }
            TokenizerKind::Bert => prompt,
        };
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| Error::Config(format!("tokenizing {prompt:?}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let mut dropped = 0;
        if ids.len() > self.max_length {
            dropped = ids.len() - self.max_length;
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_length - 1);
            ids.push(last);
            tracing::warn!(
                dropped,
                "prompt is longer than {} tokens; the last {dropped} token(s) were dropped: {prompt:?}",
                self.max_length
            );
        }
        ids.resize(self.max_length, self.pad_id);
        Ok(Tokenized { ids, dropped })
    }

    /// Tokenises a batch into `[B, max_length]` ids on `device`.
    pub fn encode_batch(
        &self,
        prompts: &[impl AsRef<str>],
        device: &Device,
    ) -> Result<Tensor<2, Int>> {
        let mut all = Vec::with_capacity(prompts.len() * self.max_length);
        for p in prompts {
            all.extend(self.encode(p.as_ref())?.ids.into_iter().map(|i| i as i64));
        }
        Ok(Tensor::from_data(
            TensorData::new(all, [prompts.len(), self.max_length]),
            device,
        ))
    }
}

/// The parts of `ftfy.fix_text` (ftfy 6 defaults) that change CLIP tokens: mojibake of UTF-8 read
/// as Latin-1/cp1252 (whole-string repair), HTML entities (unless the text contains `<`), full-width
/// ASCII, curly quotes, Latin ligatures. NFC, whitespace and lower-casing follow in the tokenizer.
pub fn fix_text(text: &str) -> String {
    let text = fix_mojibake(text).unwrap_or_else(|| text.to_string());
    let text = if text.contains('<') {
        text
    } else {
        unescape_html(&text)
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{FF01}'..='\u{FF5E}' => out.push(char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)),
            '\u{3000}' => out.push(' '),
            '\u{02BC}' | '\u{2018}'..='\u{201B}' => out.push('\''),
            '\u{201C}'..='\u{201F}' => out.push('"'),
            _ => match ligature(c) {
                Some(s) => out.push_str(s),
                None => out.push(c),
            },
        }
    }
    out
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// UTF-8 bytes that were decoded as Latin-1 / Windows-1252: re-encode and decode again when that
/// yields valid UTF-8 that differs from the input.
fn fix_mojibake(text: &str) -> Option<String> {
    const CP1252: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8D}', 'Ž',
        '\u{8F}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9D}',
        'ž', 'Ÿ',
    ];
    if text.is_ascii() {
        return None;
    }
    let mut bytes = Vec::with_capacity(text.len());
    for c in text.chars() {
        let b = match c as u32 {
            0..=0x7F | 0xA0..=0xFF => c as u32 as u8,
            _ => 0x80 + CP1252.iter().position(|&x| x == c)? as u8,
        };
        bytes.push(b);
    }
    let fixed = String::from_utf8(bytes).ok()?;
    (fixed != text).then_some(fixed)
}

/// HTML entities as `html.unescape` resolves the common ones: numeric (`&#39;`, `&#x27;`) and named.
fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let entity_end = tail.find(';').filter(|&e| e > 1 && e <= 12);
        let decoded = entity_end.and_then(|e| {
            let name = &tail[1..e];
            let c = if let Some(num) = name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
                u32::from_str_radix(num, 16).ok().and_then(char::from_u32)
            } else if let Some(num) = name.strip_prefix('#') {
                num.parse::<u32>().ok().and_then(char::from_u32)
            } else {
                named_entity(name)
            };
            c.map(|c| (c, e))
        });
        match decoded {
            Some((c, e)) => {
                out.push(c);
                rest = &tail[e + 1..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn named_entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => '\u{A0}',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "hellip" => '…',
        "mdash" => '—',
        "ndash" => '–',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "laquo" => '«',
        "raquo" => '»',
        "deg" => '°',
        "times" => '×',
        "divide" => '÷',
        "eacute" => 'é',
        "egrave" => 'è',
        "agrave" => 'à',
        "aacute" => 'á',
        "uuml" => 'ü',
        "ouml" => 'ö',
        "auml" => 'ä',
        "szlig" => 'ß',
        "ccedil" => 'ç',
        "ntilde" => 'ñ',
        "euro" => '€',
        "pound" => '£',
        "yen" => '¥',
        "cent" => '¢',
        "sect" => '§',
        "para" => '¶',
        "middot" => '·',
        "bull" => '•',
        _ => return None,
    })
}

/// What Hugging Face's slow→fast converter writes for CLIP, without vocabulary and merges.
const CLIP_PIPELINE: &str = r##"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":49406,"content":"<|startoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":true,"special":true},{"id":49407,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":true,"special":true}],"normalizer":{"type":"Sequence","normalizers":[{"type":"NFC"},{"type":"Replace","pattern":{"Regex":"\\s+"},"content":" "},{"type":"Lowercase"}]},"pre_tokenizer":{"type":"Sequence","pretokenizers":[{"type":"Split","pattern":{"Regex":"'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},"behavior":"Removed","invert":true},{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}]},"post_processor":{"type":"RobertaProcessing","sep":["<|endoftext|>",49407],"cls":["<|startoftext|>",49406],"trim_offsets":false,"add_prefix_space":false},"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},"model":{"type":"BPE","dropout":null,"unk_token":"<|endoftext|>","continuing_subword_prefix":"","end_of_word_suffix":"</w>","fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{},"merges":[]}}"##;

/// bert-base-uncased's pipeline, without the vocabulary.
const BERT_PIPELINE: &str = r###"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":0,"special":true,"content":"[PAD]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false},{"id":100,"special":true,"content":"[UNK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false},{"id":101,"special":true,"content":"[CLS]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false},{"id":102,"special":true,"content":"[SEP]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false},{"id":103,"special":true,"content":"[MASK]","single_word":false,"lstrip":false,"rstrip":false,"normalized":false}],"normalizer":{"type":"BertNormalizer","clean_text":true,"handle_chinese_chars":true,"strip_accents":null,"lowercase":true},"pre_tokenizer":{"type":"BertPreTokenizer"},"post_processor":{"type":"BertProcessing","sep":["[SEP]",102],"cls":["[CLS]",101]},"decoder":{"type":"WordPiece","prefix":"##","cleanup":true},"model":{"type":"WordPiece","unk_token":"[UNK]","continuing_subword_prefix":"##","max_input_chars_per_word":100,"vocab":{}}}"###;

#[cfg(test)]
mod tests {
    use super::fix_text;

    #[test]
    fn ftfy_style_cleaning() {
        assert_eq!(
            fix_text("salt &amp; pepper &#39;y&#39;"),
            "salt & pepper 'y'"
        );
        assert_eq!(
            fix_text("<b>&amp;</b>"),
            "<b>&amp;</b>",
            "looks like HTML: left alone, as ftfy"
        );
        assert_eq!(fix_text("ＡＢＣ１２３"), "ABC123");
        assert_eq!(fix_text("“curly” don’t"), "\"curly\" don't");
        assert_eq!(fix_text("ﬁne ﬂower"), "fine flower");
        assert_eq!(fix_text("cafÃ© crÃ¨me"), "café crème");
        assert_eq!(
            fix_text("café naïve Zürich"),
            "café naïve Zürich",
            "valid text is untouched"
        );
    }
}
