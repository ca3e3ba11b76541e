//! What one sequence has generated so far: its token ids, its text, and the end
//! conditions shared by every loop that generates (end-of-sequence token, stop
//! strings, token limit, context), plus the part of the text that is safe to stream.

use crate::model::tokenizer::TextTokenizer;
use anyhow::Result;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_tokens` or the model's context was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI-style name (`stop` or `length`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The end conditions of one sequence.
#[derive(Debug, Clone, Copy)]
pub struct StopRules<'a> {
    /// End-of-sequence token ids.
    pub eos: &'a [u32],
    /// Stop strings; the text is cut before the first one found. Empty strings are ignored.
    pub stop: &'a [String],
    /// Most tokens to generate.
    pub max_tokens: usize,
}

/// Generated ids and text of one sequence.
///
/// The text is decoded incrementally: `text[..committed]` is the decode of
/// `ids[..read]`, and each new token re-decodes only the few ids from `prefix` on
/// (`ids[prefix..read]` and `ids[prefix..]`), taking the difference as new text, so a
/// token costs the same at the thousandth token as at the first. Decoders that strip a
/// window's leading space or drop special tokens strip both decodes alike.
#[derive(Debug, Clone, Default)]
pub struct SeqText {
    ids: Vec<u32>,
    text: String,
    streamed: usize,
    finish: Option<FinishReason>,
    prefix: usize,
    read: usize,
    committed: usize,
}

impl SeqText {
    /// Nothing generated yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a sampled token and decides whether the sequence is finished.
    /// `context_full` says the cache has no room for another token.
    pub fn push(
        &mut self,
        id: u32,
        tok: &TextTokenizer,
        rules: &StopRules,
        context_full: bool,
    ) -> Result<Option<FinishReason>> {
        debug_assert!(self.finish.is_none(), "token pushed after the sequence finished");
        self.ids.push(id);
        if rules.eos.contains(&id) {
            self.finish = Some(FinishReason::Eos);
            self.drop_incomplete_tail();
            return Ok(self.finish);
        }
        let searched = self.committed;
        self.decode_tail(tok)?;
        // A stop string can only have appeared where the new text is, or overlapping it.
        let longest = rules.stop.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut from = searched.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(cut) = rules
            .stop
            .iter()
            .filter(|p| !p.is_empty())
            .filter_map(|p| self.text[from..].find(p.as_str()).map(|i| from + i))
            .min()
        {
            self.text.truncate(cut);
            self.finish = Some(FinishReason::Stop);
        } else if self.ids.len() >= rules.max_tokens || context_full {
            self.finish = Some(FinishReason::Length);
            self.drop_incomplete_tail();
        }
        Ok(self.finish)
    }

    /// Drops a character the sequence ended in the middle of (the bytes of its last
    /// tokens, which the tokenizer shows as U+FFFD, past the last complete character), so
    /// a finished text never ends in a broken character. (A U+FFFD the model wrote
    /// whole at the very end looks the same to the decoder and goes too.)
    fn drop_incomplete_tail(&mut self) {
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        self.text.truncate(complete.max(self.committed));
    }

    /// Brings `text` up to the decode of every id, re-decoding only the tail.
    fn decode_tail(&mut self, tok: &TextTokenizer) -> Result<()> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode(&self.ids[self.prefix..], true)?;
        self.text.truncate(self.committed);
        match after.strip_prefix(before.as_str()) {
            Some(new) => {
                self.text.push_str(new);
                // A complete character at the end: commit, and move the window on.
                if !new.is_empty() && !new.ends_with('\u{FFFD}') {
                    self.committed = self.text.len();
                    self.prefix = self.read;
                    self.read = self.ids.len();
                }
            }
            None => {
                // The decoder rewrote text behind the window: decode everything.
                self.text = tok.decode(&self.ids, true)?;
                self.committed = self.text.len();
                self.prefix = self.ids.len();
                self.read = self.ids.len();
            }
        }
        Ok(())
    }

    /// Why the sequence ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Every sampled id, an end-of-sequence token included.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The generated ids without a final end-of-sequence token.
    pub fn completion_ids(&self) -> Vec<u32> {
        let mut ids = self.ids.clone();
        if self.finish == Some(FinishReason::Eos) {
            ids.pop();
        }
        ids
    }

    /// Number of generated tokens, a final end-of-sequence token excluded.
    pub fn completion_len(&self) -> usize {
        self.ids.len() - usize::from(self.finish == Some(FinishReason::Eos))
    }

    /// The text so far (special tokens skipped, cut before a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Consumes the tracker, giving the text.
    pub fn into_text(self) -> String {
        self.text
    }

    /// The text that has become final since the last call. While the sequence runs it
    /// holds back a trailing incomplete character (shown by the tokenizer as U+FFFD) and
    /// any tail that could still grow into one of `stop`; once finished it gives the rest.
    pub fn take_stream_delta(&mut self, stop: &[String]) -> String {
        if self.streamed > self.text.len() || !self.text.is_char_boundary(self.streamed) {
            // The text was rewritten behind what was already streamed (cannot happen with
            // byte-level tokenizers); send nothing rather than something wrong.
            return String::new();
        }
        let end = if self.finish.is_some() {
            self.text.len()
        } else {
            let mut end = self.text.trim_end_matches('\u{FFFD}').len().max(self.streamed);
            let pending = &self.text[self.streamed..end];
            let hold = stop
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| held_back(pending, p))
                .max()
                .unwrap_or(0);
            end -= hold;
            end
        };
        let delta = self.text[self.streamed..end].to_string();
        self.streamed = end;
        delta
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop` (and so
/// might become `stop` with more text), on a character boundary.
fn held_back(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.as_bytes().starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_finds_stop_prefixes() {
        assert_eq!(held_back("hello wor", "world"), 3);
        assert_eq!(held_back("hello", "world"), 0);
        assert_eq!(
            held_back("ab", "b"),
            0,
            "a complete one-char stop is not a prefix to hold"
        );
        assert_eq!(held_back("xé", "éa"), 2);
        assert_eq!(held_back("", "abc"), 0);
    }

    fn tiny_tokenizer() -> TextTokenizer {
        let m = crate::model::load::open_model("synthetic:tiny").unwrap();
        m.tokenizer
    }

    #[test]
    fn stop_strings_cut_and_stream_never_shows_them() {
        let tok = tiny_tokenizer();
        let ids = tok.encode("one two three four", false).unwrap();
        let stop = vec!["three".to_string()];
        let rules = StopRules {
            eos: &[],
            stop: &stop,
            max_tokens: 100,
        };
        let mut s = SeqText::new();
        let mut streamed = String::new();
        for &id in &ids {
            if s.push(id, &tok, &rules, false).unwrap().is_some() {
                streamed += &s.take_stream_delta(&stop);
                break;
            }
            streamed += &s.take_stream_delta(&stop);
        }
        assert_eq!(s.finish(), Some(FinishReason::Stop));
        assert_eq!(s.text(), "one two ");
        assert_eq!(streamed, "one two ");
    }

    #[test]
    fn incremental_text_equals_decoding_every_id() {
        use rand::{Rng, SeedableRng};
        let tok = tiny_tokenizer();
        let seed = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Words, digits and multi-byte characters, so that tokens split characters.
        let sample = "héllo wörld 42 ∑ 日本語 emoji 🙂 ok";
        let base = tok.encode(sample, false).unwrap();
        let rules = StopRules {
            eos: &[],
            stop: &[],
            max_tokens: usize::MAX,
        };
        for _ in 0..20 {
            let mut s = SeqText::new();
            let mut ids = Vec::new();
            for _ in 0..60 {
                let id = if rng.random_bool(0.7) {
                    base[rng.random_range(0..base.len())]
                } else {
                    rng.random_range(0..tok.vocab_size() as u32)
                };
                ids.push(id);
                s.push(id, &tok, &rules, false).unwrap();
                assert_eq!(s.text(), tok.decode(&ids, true).unwrap(), "seed {seed}, ids {ids:?}");
            }
        }
    }

    #[test]
    fn a_text_ending_inside_a_character_drops_its_bytes() {
        let tok = tiny_tokenizer();
        // A character of several bytes split over several tokens.
        let ids = tok.encode("ok 🙂", false).unwrap();
        let whole = tok.decode(&ids, true).unwrap();
        assert_eq!(whole, "ok 🙂");
        let cut = (1..ids.len())
            .rev()
            .find(|&n| tok.decode(&ids[..n], true).unwrap().ends_with('\u{FFFD}'))
            .expect("the tokenizer splits the emoji");
        for eos in [false, true] {
            let rules = StopRules {
                eos: &[7],
                stop: &[],
                max_tokens: cut + usize::from(eos),
            };
            let mut s = SeqText::new();
            let mut streamed = String::new();
            for &id in ids[..cut].iter().chain(eos.then_some(&7)) {
                s.push(id, &tok, &rules, false).unwrap();
                streamed += &s.take_stream_delta(&[]);
            }
            assert!(s.finish().is_some());
            assert!(!s.text().contains('\u{FFFD}'), "{:?}", s.text());
            assert!(
                whole.starts_with(s.text()) && s.text().starts_with("ok"),
                "{:?}",
                s.text()
            );
            assert_eq!(streamed, s.text());
        }
    }

    #[test]
    fn eos_and_length_end_sequences() {
        let tok = tiny_tokenizer();
        let rules = StopRules {
            eos: &[7],
            stop: &[],
            max_tokens: 3,
        };
        let mut s = SeqText::new();
        assert_eq!(s.push(65, &tok, &rules, false).unwrap(), None);
        assert_eq!(s.push(7, &tok, &rules, false).unwrap(), Some(FinishReason::Eos));
        assert_eq!(s.completion_ids(), vec![65]);
        assert_eq!(s.completion_len(), 1);
        let mut s = SeqText::new();
        for _ in 0..2 {
            assert_eq!(s.push(65, &tok, &rules, false).unwrap(), None);
        }
        assert_eq!(s.push(66, &tok, &rules, false).unwrap(), Some(FinishReason::Length));
        assert_eq!(s.take_stream_delta(&[]), "AAB");
        let mut s = SeqText::new();
        assert_eq!(s.push(65, &tok, &rules, true).unwrap(), Some(FinishReason::Length));
    }
}
