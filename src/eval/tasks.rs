//! RULER-style synthetic tasks, generated in-process from a seed: needle retrieval
//! (single, multi-key, multi-value, multi-query), variable tracking, common- and
//! frequent-word extraction.

use super::haystack::{sentences, Haystack};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;

/// A task family. `--tasks` takes its RULER name (`niah_single`, as the table and the
/// JSON give it) or the same with hyphens (`niah-single`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
pub enum Task {
    /// One needle; retrieve its value.
    #[value(alias = "niah_single")]
    NiahSingle,
    /// Several needles with different keys; retrieve one.
    #[value(alias = "niah_multikey")]
    NiahMultikey,
    /// One key with several values; retrieve them all.
    #[value(alias = "niah_multivalue")]
    NiahMultivalue,
    /// Several needles; retrieve the values of several keys.
    #[value(alias = "niah_multiquery")]
    NiahMultiquery,
    /// A chain of variable assignments; name every variable holding a value.
    #[value(alias = "variable_tracking")]
    VariableTracking,
    /// Words repeated often among rare ones; list the common words.
    #[value(alias = "common_words")]
    CommonWords,
    /// Words drawn from a Zipf law; list the three most frequent.
    #[value(alias = "frequent_words")]
    FrequentWords,
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 7] = [
        Task::NiahSingle,
        Task::NiahMultikey,
        Task::NiahMultivalue,
        Task::NiahMultiquery,
        Task::VariableTracking,
        Task::CommonWords,
        Task::FrequentWords,
    ];

    /// Short name used in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Task::NiahSingle => "niah_single",
            Task::NiahMultikey => "niah_multikey",
            Task::NiahMultivalue => "niah_multivalue",
            Task::NiahMultiquery => "niah_multiquery",
            Task::VariableTracking => "variable_tracking",
            Task::CommonWords => "common_words",
            Task::FrequentWords => "frequent_words",
        }
    }
}

/// One generated sample, before it is fitted to a length.
pub struct Sample {
    /// Filler sentences; needles are inserted among them.
    pub filler: Vec<String>,
    /// Needle sentences with their relative depth in `[0, 1]`.
    pub needles: Vec<(f64, String)>,
    /// The instruction after the context.
    pub question: String,
    /// Text that starts the answer.
    pub answer_prefix: String,
    /// Strings the answer must contain.
    pub answers: Vec<String>,
    /// Tokens to generate.
    pub max_new: usize,
}

const WORDS: [&str; 40] = [
    "apple", "river", "candle", "marble", "falcon", "harbor", "violet", "copper", "meadow", "lantern", "pepper",
    "willow", "thunder", "saddle", "orchid", "glacier", "compass", "velvet", "cobalt", "ember", "tundra", "quartz",
    "juniper", "basalt", "canyon", "sparrow", "mosaic", "nectar", "pylon", "saffron", "timber", "walnut", "zephyr",
    "beacon", "cricket", "dahlia", "fossil", "gravel", "hazel", "igloo",
];

fn key(rng: &mut StdRng) -> String {
    let a = WORDS.choose(rng).expect("words");
    let b = WORDS.choose(rng).expect("words");
    format!("{a}-{b}")
}

fn number(rng: &mut StdRng) -> String {
    rng.random_range(1_000_000..10_000_000u32).to_string()
}

fn needle(k: &str, v: &str) -> String {
    format!("One of the special magic numbers for {k} is: {v}.")
}

/// Builds a sample of `task` whose needle sits at `depth` (0 = start, 1 = end), with
/// `filler` sentences of `haystack`.
pub fn build(task: Task, haystack: Haystack, filler: usize, depth: f64, rng: &mut StdRng) -> Sample {
    let fill = sentences(haystack, filler, rng);
    let spread = |n: usize, rng: &mut StdRng| -> Vec<f64> {
        let mut d: Vec<f64> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
        d[0] = depth;
        d
    };
    // Four needles with distinct keys, the first at `depth`: (keys, values, needles).
    let keyed_needles = |rng: &mut StdRng| {
        let keys: Vec<String> = (0..4).map(|_| key(rng)).collect();
        let vals: Vec<String> = (0..4).map(|_| number(rng)).collect();
        let depths = spread(4, rng);
        let needles = (0..4).map(|i| (depths[i], needle(&keys[i], &vals[i]))).collect();
        (keys, vals, needles)
    };
    let number_prefix = |k: &str| format!("The special magic number for {k} mentioned in the provided text is");
    match task {
        Task::NiahSingle => {
            let (k, v) = (key(rng), number(rng));
            Sample {
                filler: fill,
                needles: vec![(depth, needle(&k, &v))],
                question: format!("What is the special magic number for {k} mentioned in the provided text?"),
                answer_prefix: number_prefix(&k),
                answers: vec![v],
                max_new: 24,
            }
        }
        Task::NiahMultikey => {
            let (keys, vals, needles) = keyed_needles(rng);
            Sample {
                filler: fill,
                needles,
                question: format!(
                    "What is the special magic number for {} mentioned in the provided text?",
                    keys[0]
                ),
                answer_prefix: number_prefix(&keys[0]),
                answers: vec![vals[0].clone()],
                max_new: 24,
            }
        }
        Task::NiahMultivalue => {
            let k = key(rng);
            let vals: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let depths = spread(4, rng);
            Sample {
                filler: fill,
                needles: (0..4).map(|i| (depths[i], needle(&k, &vals[i]))).collect(),
                question: format!("What are all the special magic numbers for {k} mentioned in the provided text?"),
                answer_prefix: format!("The special magic numbers for {k} mentioned in the provided text are"),
                answers: vals,
                max_new: 64,
            }
        }
        Task::NiahMultiquery => {
            let (keys, vals, needles) = keyed_needles(rng);
            let all = format!("{} and {}", keys[..3].join(", "), keys[3]);
            Sample {
                filler: fill,
                needles,
                question: format!("What are all the special magic numbers for {all} mentioned in the provided text?"),
                answer_prefix: format!("The special magic numbers for {all} mentioned in the provided text are"),
                answers: vals,
                max_new: 64,
            }
        }
        Task::VariableTracking => {
            let value = rng.random_range(10_000..100_000u32).to_string();
            let mut names: Vec<String> = Vec::new();
            while names.len() < 4 {
                let n: String = (0..5).map(|_| rng.random_range(b'A'..=b'Z') as char).collect();
                if !names.contains(&n) {
                    names.push(n);
                }
            }
            let mut needles = vec![(depth, format!("VAR {} = {value}.", names[0]))];
            for i in 1..names.len() {
                let d = depth + (1.0 - depth) * i as f64 / names.len() as f64;
                needles.push((d, format!("VAR {} = VAR {}.", names[i], names[i - 1])));
            }
            Sample {
                filler: fill,
                needles,
                question: format!("Find all variables that are assigned the value {value} in the text above."),
                answer_prefix: format!("Answer: According to the chain(s) of variable assignment in the text above, {} variables are assigned the value {value}, they are:", names.len()),
                answers: names,
                max_new: 32,
            }
        }
        Task::CommonWords => {
            let mut pool: Vec<&str> = WORDS.to_vec();
            pool.shuffle(rng);
            let (common, rare) = pool.split_at(5);
            let mut list: Vec<&str> = Vec::new();
            for w in common {
                list.extend(std::iter::repeat_n(*w, 12));
            }
            for w in rare {
                list.extend(std::iter::repeat_n(*w, 2));
            }
            list.shuffle(rng);
            let text = list
                .iter()
                .enumerate()
                .map(|(i, w)| format!("{}. {w}", i + 1))
                .collect::<Vec<_>>()
                .join(" ");
            Sample {
                filler: fill,
                needles: vec![(
                    depth,
                    format!("Below is a numbered list of words. {text}. End of the list."),
                )],
                question: "What are the 5 most common words in the numbered list above?".into(),
                answer_prefix: "Answer: The top 5 words that appear most often in the list are:".into(),
                answers: common.iter().map(|w| w.to_string()).collect(),
                max_new: 40,
            }
        }
        Task::FrequentWords => {
            let mut pool: Vec<&str> = WORDS.to_vec();
            pool.shuffle(rng);
            let mut list: Vec<&str> = Vec::new();
            for (rank, w) in pool.iter().take(20).enumerate() {
                list.extend(std::iter::repeat_n(
                    *w,
                    (40.0 / (rank as f64 + 1.0).powf(1.2)).round() as usize + 1,
                ));
            }
            list.shuffle(rng);
            Sample {
                filler: fill,
                needles: vec![(depth, format!("Coded text: {}. End of the coded text.", list.join(" ")))],
                question: "What are the three most frequently appearing words in the coded text above?".into(),
                answer_prefix:
                    "Answer: According to the coded text above, the three most frequently appearing words are:".into(),
                answers: pool.iter().take(3).map(|w| w.to_string()).collect(),
                max_new: 32,
            }
        }
    }
}

/// The context text: filler with the needles inserted at their depths.
pub fn context(s: &Sample, filler: usize) -> String {
    let filler = &s.filler[..filler.min(s.filler.len())];
    let mut slots: Vec<Vec<&str>> = vec![Vec::new(); filler.len() + 1];
    for (d, n) in &s.needles {
        let at = ((d.clamp(0.0, 1.0) * filler.len() as f64).round() as usize).min(filler.len());
        slots[at].push(n);
    }
    let mut out = Vec::with_capacity(filler.len() + s.needles.len());
    for (i, slot) in slots.iter().enumerate() {
        out.extend(slot.iter().copied());
        if i < filler.len() {
            out.push(filler[i].as_str());
        }
    }
    out.join(" ")
}

/// RULER's score: the share of expected strings found in the output (case-insensitive).
pub fn score(output: &str, answers: &[String]) -> f64 {
    let out = output.to_lowercase();
    let found = answers.iter().filter(|a| out.contains(&a.to_lowercase())).count();
    found as f64 / answers.len().max(1) as f64
}

#[cfg(test)]
mod tests {

    #[test]
    fn tasks_flag_takes_the_names_the_results_give() {
        use clap::ValueEnum;
        for t in Task::ALL {
            assert_eq!(Task::from_str(t.name(), false), Ok(t));
            assert_eq!(Task::from_str(&t.name().replace('_', "-"), false), Ok(t));
        }
    }
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_task_places_its_answers_in_the_context() {
        for task in Task::ALL {
            for hay in [Haystack::Noise, Haystack::Essay] {
                let mut rng = StdRng::seed_from_u64(9);
                let s = build(task, hay, 50, 0.5, &mut rng);
                let ctx = context(&s, 50);
                for a in &s.answers {
                    assert!(ctx.contains(a.as_str()), "{task:?}: {a} missing");
                }
                assert_eq!(score(&s.answers.join(", "), &s.answers), 1.0);
                assert!(score("nothing here", &s.answers) < 1.0);
            }
        }
    }

    #[test]
    fn depth_moves_the_needle() {
        let mut rng = StdRng::seed_from_u64(1);
        let s = build(Task::NiahSingle, Haystack::Noise, 100, 0.0, &mut rng);
        assert!(context(&s, 100).starts_with("One of the special magic numbers"));
        let mut rng = StdRng::seed_from_u64(1);
        let s = build(Task::NiahSingle, Haystack::Noise, 100, 1.0, &mut rng);
        assert!(context(&s, 100).ends_with(&s.needles[0].1));
    }
}
