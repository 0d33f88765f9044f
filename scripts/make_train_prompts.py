#!/usr/bin/env python3
"""Writes data/prompts-train.jsonl: 300 single-turn prompts built from question forms x topics,
written for this project (CC0). The demo trains on these and evaluates acceptance on the
hand-written, disjoint data/prompts.jsonl. Deterministic: rerunning gives the same file."""
import json
import pathlib
import random

FORMS = [
    "Explain {t} in simple terms.",
    "What are three interesting facts about {t}?",
    "Write a short paragraph about {t}.",
    "Why is {t} important?",
    "Give me a beginner's guide to {t}.",
    "What are common misconceptions about {t}?",
    "Describe the history of {t} briefly.",
    "How would you teach {t} to a ten-year-old?",
    "List some pros and cons of {t}.",
    "Write a short poem about {t}.",
]
TOPICS = [
    "volcanoes", "the water cycle", "black holes", "honey bees", "the printing press", "electric cars",
    "the human brain", "photosynthesis", "the Roman Empire", "climate change", "coral reefs", "the internet",
    "vaccines", "chess", "the moon", "rainbows", "recycling", "earthquakes", "the Olympic Games", "coffee",
    "bicycles", "solar panels", "the piano", "dinosaurs", "sleep", "friendship", "mountains", "bread baking",
    "the stock market", "penguins",
]


def main():
    rng = random.Random(0)
    pairs = [(f, t) for f in FORMS for t in TOPICS]
    rng.shuffle(pairs)
    out = pathlib.Path(__file__).resolve().parent.parent / "data" / "prompts-train.jsonl"
    with out.open("w") as f:
        for form, topic in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": form.format(t=topic)}]}) + "\n")


if __name__ == "__main__":
    main()
