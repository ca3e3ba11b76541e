//! Haystacks for the long-context tasks: RULER's repeated noise sentences, and
//! procedurally generated essay-like prose (seeded, so every run sees the same text).

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;

/// Which filler text surrounds the needles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Haystack {
    /// "The grass is green. The sky is blue. ..." repeated.
    Noise,
    /// Generated paragraphs of essay-like prose.
    Essay,
}

impl Haystack {
    /// Its name as `--haystacks` takes it (and the JSON gives it).
    pub fn name(self) -> &'static str {
        match self {
            Haystack::Noise => "noise",
            Haystack::Essay => "essay",
        }
    }
}

const NOISE: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

const SUBJECTS: [&str; 16] = [
    "The committee",
    "A young engineer",
    "The old library",
    "Every good teacher",
    "The harbor town",
    "Our neighbor",
    "The river",
    "A careful reader",
    "The small company",
    "The museum guide",
    "The orchestra",
    "A patient gardener",
    "The village council",
    "The research team",
    "The night train",
    "A quiet student",
];
const VERBS: [&str; 16] = [
    "considered",
    "remembered",
    "described",
    "questioned",
    "built",
    "admired",
    "studied",
    "ignored",
    "celebrated",
    "measured",
    "explained",
    "postponed",
    "discovered",
    "painted",
    "shared",
    "repaired",
];
const OBJECTS: [&str; 16] = [
    "the long winter",
    "a forgotten map",
    "the value of patience",
    "the new bridge",
    "an unusual letter",
    "the price of bread",
    "the shape of the coastline",
    "a simple idea",
    "the morning market",
    "the history of the valley",
    "a broken clock",
    "the rules of the game",
    "the first snowfall",
    "an old photograph",
    "the crowded station",
    "the evening lecture",
];
const TAILS: [&str; 12] = [
    "with great care",
    "before anyone noticed",
    "for many years",
    "in the spring",
    "without a word",
    "after the storm",
    "as the town grew",
    "during the festival",
    "against all advice",
    "by the window",
    "in a single afternoon",
    "long after midnight",
];

/// One sentence of filler.
pub fn sentence(kind: Haystack, rng: &mut StdRng) -> String {
    match kind {
        Haystack::Noise => NOISE.to_string(),
        Haystack::Essay => {
            let pick = |xs: &[&'static str], rng: &mut StdRng| *xs.choose(rng).expect("non-empty");
            format!(
                "{} {} {} {}.",
                pick(&SUBJECTS, rng),
                pick(&VERBS, rng),
                pick(&OBJECTS, rng),
                pick(&TAILS, rng)
            )
        }
    }
}

/// `n` filler sentences, with a paragraph break every few essay sentences.
pub fn sentences(kind: Haystack, n: usize, rng: &mut StdRng) -> Vec<String> {
    (0..n).map(|_| sentence(kind, rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::Haystack;
    use clap::ValueEnum;

    #[test]
    fn names_are_the_flag_s_and_the_json_s() {
        for h in Haystack::value_variants() {
            assert_eq!(h.to_possible_value().unwrap().get_name(), h.name());
            assert_eq!(serde_json::to_value(h).unwrap(), serde_json::json!(h.name()));
        }
    }
}
