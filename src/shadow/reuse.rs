//! The reuse cache: which chunk each on-device slot holds. Chunks selected again keep
//! their slot; only misses are fetched and rebuilt, into the slots that were freed.

/// Slot → chunk map of one KV head.
#[derive(Debug, Clone)]
pub struct SlotTable {
    slot_chunk: Vec<Option<u32>>,
}

/// What one step must move: `(slot, chunk)` pairs to fill, and how many were hits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReusePlan {
    /// Selected chunks already resident.
    pub hits: usize,
    /// Selected chunks to fetch, with the slot each goes to.
    pub misses: Vec<(usize, u32)>,
}

impl SlotTable {
    /// `slots` empty slots.
    pub fn new(slots: usize) -> Self {
        SlotTable {
            slot_chunk: vec![None; slots],
        }
    }

    /// The chunk in each slot.
    pub fn slots(&self) -> &[Option<u32>] {
        &self.slot_chunk
    }

    /// Updates the table to hold exactly `selected` (ascending, at most `slots` chunks)
    /// and returns the misses to fill.
    pub fn plan(&mut self, selected: &[u32]) -> ReusePlan {
        assert!(
            selected.len() <= self.slot_chunk.len(),
            "more chunks selected than slots"
        );
        let wanted = |c: u32| selected.binary_search(&c).is_ok();
        let mut resident = Vec::with_capacity(selected.len());
        let mut free = Vec::new();
        for (s, slot) in self.slot_chunk.iter_mut().enumerate() {
            match *slot {
                Some(c) if wanted(c) => resident.push(c),
                _ => {
                    *slot = None;
                    free.push(s);
                }
            }
        }
        resident.sort_unstable();
        let mut plan = ReusePlan {
            hits: resident.len(),
            misses: Vec::new(),
        };
        let mut free = free.into_iter();
        for &c in selected {
            if resident.binary_search(&c).is_err() {
                let s = free.next().expect("a free slot per miss");
                self.slot_chunk[s] = Some(c);
                plan.misses.push((s, c));
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeSet;

    #[test]
    fn plan_matches_a_brute_force_model() {
        let seed = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..50 {
            let slots = rng.random_range(1..20);
            let mut t = SlotTable::new(slots);
            for _ in 0..30 {
                let before: Vec<Option<u32>> = t.slots().to_vec();
                let n = rng.random_range(0..=slots);
                let set: BTreeSet<u32> = (0..n).map(|_| rng.random_range(0..40)).collect();
                let sel: Vec<u32> = set.iter().copied().collect();
                let plan = t.plan(&sel);
                let held: BTreeSet<u32> = t.slots().iter().flatten().copied().collect();
                assert_eq!(held, set, "seed {seed}: table holds exactly the selection");
                let prev: BTreeSet<u32> = before.iter().flatten().copied().collect();
                assert_eq!(plan.hits, set.intersection(&prev).count(), "seed {seed}");
                let missed: BTreeSet<u32> = plan.misses.iter().map(|m| m.1).collect();
                assert_eq!(missed, set.difference(&prev).copied().collect(), "seed {seed}");
                for (s, c) in before.iter().enumerate() {
                    if let Some(c) = c {
                        if set.contains(c) {
                            assert_eq!(t.slots()[s], Some(*c), "seed {seed}: a hit keeps its slot");
                        }
                    }
                }
                for &(s, c) in &plan.misses {
                    assert_eq!(t.slots()[s], Some(c));
                }
            }
        }
    }
}
