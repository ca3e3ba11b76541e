"""Deterministic generator of plain English prose for test prompts.

Used by tools/golden/make_golden.py (long golden prompt) and
tools/bench/cpu-vs-llama-cpp (benchmark prompts).  It relies only on its own
small PRNG (splitmix64), so the output for a given seed is identical on every
Python version and platform.

    from prose import generate_prose
    text = generate_prose(seed=1234, n_words=1500)
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


class SplitMix64:
    """Tiny deterministic PRNG (splitmix64)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next_u64() % n

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, num: int, den: int) -> bool:
        return self.below(den) < num


NAMES = [
    "Mara", "Tobias", "Elena", "Jonah", "Priya", "Samuel", "Ingrid", "Felix",
    "Amara", "Leon", "Yusuf", "Clara", "Oskar", "Nadia", "Hugo", "Lucia",
]
PLACES = [
    "the harbour town", "the old mill", "the northern valley", "the city library",
    "the market square", "the river bend", "the mountain pass", "the quiet village",
    "the railway station", "the lighthouse", "the orchard", "the workshop",
]
THINGS = [
    "lantern", "letter", "map", "clock", "garden", "boat", "bridge", "notebook",
    "violin", "bicycle", "kettle", "window", "ladder", "telescope", "basket", "fence",
]
ADJECTIVES = [
    "old", "quiet", "bright", "narrow", "heavy", "curious", "gentle", "broken",
    "distant", "careful", "patient", "wooden", "silver", "crowded", "simple", "small",
]
ADVERBS = [
    "slowly", "carefully", "quietly", "eagerly", "patiently", "suddenly", "often",
    "rarely", "gladly", "calmly",
]
VERBS_PAST = [
    "repaired", "painted", "found", "carried", "studied", "cleaned", "measured",
    "borrowed", "described", "opened", "watched", "remembered",
]
WEATHER = [
    "the rain had stopped", "a cold wind came down from the hills",
    "the sun was low over the water", "fog covered the fields",
    "the evening was warm and still", "snow began to fall",
]
FEELINGS = [
    "happy", "tired", "hopeful", "uncertain", "proud", "restless", "content",
]
CONNECTORS = ["Later", "Meanwhile", "After a while", "The next morning", "That evening", "Soon"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]


def _sentence(rng: SplitMix64) -> str:
    name = rng.pick(NAMES)
    other = rng.pick(NAMES)
    thing = rng.pick(THINGS)
    adj = rng.pick(ADJECTIVES)
    place = rng.pick(PLACES)
    kind = rng.below(9)
    if kind == 0:
        return f"{name} {rng.pick(ADVERBS)} {rng.pick(VERBS_PAST)} the {adj} {thing} near {place}."
    if kind == 1:
        return f"When {rng.pick(WEATHER)}, {name} walked to {place} with {other}."
    if kind == 2:
        n = 2 + rng.below(40)
        return f"There were {n} {thing}s in {place}, and each one was {adj}."
    if kind == 3:
        year = 1850 + rng.below(170)
        return f"In {rng.pick(MONTHS)} {year}, {name} wrote a letter about the {adj} {thing}."
    if kind == 4:
        i = rng.below(len(FEELINGS))
        j = (i + 1 + rng.below(len(FEELINGS) - 1)) % len(FEELINGS)
        return f"{rng.pick(CONNECTORS)}, {name} felt {FEELINGS[i]} and {FEELINGS[j]}."
    if kind == 5:
        return f"\"Have you seen my {thing}?\" asked {name}, but {other} only shrugged."
    if kind == 6:
        km = 1 + rng.below(30)
        return f"The road to {place} was {km} kilometres long and rather {adj}."
    if kind == 7:
        return f"{name} and {other} {rng.pick(VERBS_PAST)} a {adj} {thing}; it took most of the afternoon."
    return f"Nobody in {place} could explain why the {thing} was so {adj}."


def generate_prose(seed: int, n_words: int) -> str:
    """Return paragraphs of prose with at least ``n_words`` whitespace-separated words."""
    rng = SplitMix64(seed)
    paragraphs: list[str] = []
    words = 0
    while words < n_words:
        sentences = []
        for _ in range(3 + rng.below(4)):
            s = _sentence(rng)
            sentences.append(s)
            words += len(s.split())
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


if __name__ == "__main__":
    import sys

    print(generate_prose(int(sys.argv[1]) if len(sys.argv) > 1 else 1, 200))
