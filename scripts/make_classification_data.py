#!/usr/bin/env python3
"""Writes the small labelled topic dataset the encoder tests train on:

  tests/data/topics-train.jsonl     90 examples, 30 per class
  tests/data/topics-valid.jsonl     30 examples
  tests/data/topics-heldout.jsonl   15 examples (never trained or validated on)

Three classes (sports, cooking, weather); sentences are drawn from templates with a
seeded RNG, so the files are reproducible with any Python 3.
"""
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOPICS = {
    "sports": {
        "subj": ["the striker", "our team", "the goalkeeper", "the coach", "the runner", "the home side",
                 "the tennis player", "the captain", "the referee", "the visiting team"],
        "verb": ["scored twice in", "won", "lost", "trained hard before", "was injured during", "celebrated after",
                 "was sent off in", "dominated"],
        "obj": ["the final", "the derby", "the second half", "the league match", "the marathon", "the penalty shootout",
                "the championship", "extra time"],
    },
    "cooking": {
        "subj": ["the chef", "my grandmother", "the baker", "the recipe", "the soup", "the new restaurant",
                 "the pastry cook", "my roommate"],
        "verb": ["simmered", "needs more salt in", "roasted", "burned", "seasoned", "served", "chopped the onions for",
                 "baked"],
        "obj": ["the garlic bread", "the tomato sauce", "the chocolate cake", "the risotto", "the vegetables",
                "the sourdough", "the stew", "the dumplings"],
    },
    "weather": {
        "subj": ["the forecast", "a cold front", "the storm", "heavy rain", "the heatwave", "thick fog", "the wind",
                 "light snow"],
        "verb": ["is expected over", "moved across", "flooded", "covered", "will hit", "cleared from", "battered",
                 "lingered over"],
        "obj": ["the coast", "the valley", "the northern hills", "the city this weekend", "the airport",
                "the mountains tonight", "the region", "the harbour by morning"],
    },
}


def sentence(rng, topic):
    t = TOPICS[topic]
    s = f"{rng.choice(t['subj'])} {rng.choice(t['verb'])} {rng.choice(t['obj'])}"
    return s[0].upper() + s[1:] + rng.choice([".", "!", ".", " again."])


def write(name, rows):
    with open(os.path.join(ROOT, "tests", "data", name), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(1234)
    seen = set()

    def draw(n_per_class):
        rows = []
        for _ in range(n_per_class):
            for topic in TOPICS:
                while True:
                    s = sentence(rng, topic)
                    if s not in seen:
                        seen.add(s)
                        break
                rows.append({"text": s, "label": topic})
        rng.shuffle(rows)
        return rows

    write("topics-train.jsonl", draw(30))
    write("topics-valid.jsonl", draw(10))
    write("topics-heldout.jsonl", draw(5))


if __name__ == "__main__":
    main()
