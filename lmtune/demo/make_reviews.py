"""Generate the bundled demo data: product reviews labeled positive / negative / neutral.

Written by the project (no third-party data). Sentences combine a product, an aspect and an
opinion phrase in varied templates, with hedges and contrasts, so the task is learnable but not
a keyword lookup. Re-run to regenerate reviews.csv deterministically:
    python -m lmtune.demo.make_reviews
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

PRODUCTS = ["headphones", "blender", "laptop", "phone case", "coffee maker", "backpack", "desk lamp",
            "keyboard", "running shoes", "vacuum cleaner", "water bottle", "monitor", "tent", "kettle",
            "smartwatch", "office chair", "toaster", "camera", "mattress", "e-reader"]
ASPECTS = ["battery life", "build quality", "price", "design", "delivery", "sound", "screen",
           "customer service", "instructions", "packaging", "comfort", "size", "noise level", "setup"]
POSITIVE = ["is excellent", "exceeded my expectations", "works perfectly", "is really impressive",
            "is worth every penny", "feels premium", "made my day", "is fantastic", "is better than I hoped",
            "could not be better", "is a joy to use", "is superb", "is very reliable"]
NEGATIVE = ["is terrible", "broke after a week", "is a complete waste of money", "stopped working",
            "is very disappointing", "feels cheap and flimsy", "is awful", "is far worse than advertised",
            "keeps failing", "is frustrating", "is unacceptable", "fell apart quickly", "is a nightmare"]
NEUTRAL = ["is okay", "is average", "is as described", "is fine, nothing special", "does the job",
           "is acceptable for the price", "is neither good nor bad", "is standard", "is what you would expect",
           "is about the same as my old one", "is adequate", "is mediocre but usable"]
OPENERS = ["", "Honestly, ", "Overall, ", "After a month, ", "I have to say ", "To be fair, ", "In short, ",
           "My wife thinks ", "For what it's worth, ", "So far, "]
ENDINGS = {
    "positive": [" Would buy again.", " Highly recommended!", " Five stars.", " Very happy.", "", ""],
    "negative": [" Returning it.", " Avoid.", " One star.", " Never again.", "", ""],
    "neutral": [" Three stars.", " It will do.", " No strong feelings.", "", "", ""],
}
PHRASES = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}


def sentence(rng: random.Random, label: str) -> str:
    product, aspect = rng.choice(PRODUCTS), rng.choice(ASPECTS)
    phrase = rng.choice(PHRASES[label])
    opener = rng.choice(OPENERS)
    kind = rng.random()
    if kind < 0.45:
        body = f"the {aspect} of this {product} {phrase}."
    elif kind < 0.7:
        body = f"this {product} {phrase}."
    elif label != "neutral":
        # a contrast: the first clause has the other polarity, the verdict comes after "but"
        other = "negative" if label == "positive" else "positive"
        aspect2 = rng.choice([a for a in ASPECTS if a != aspect])
        body = f"the {aspect2} {rng.choice(PHRASES[other])}, but the {aspect} {phrase}, and that is what matters."
    else:
        # mixed points that even out: the verdict is the neutral phrase at the end
        body = f"the {aspect} {rng.choice(POSITIVE)} but the {rng.choice(ASPECTS)} {rng.choice(NEGATIVE)}, so overall this {product} {phrase}."
    text = opener + body
    return text[0].upper() + text[1:] + rng.choice(ENDINGS[label])


def generate(n_per_class: int = 150, seed: int = 7) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows, seen = [], set()
    for label in ("positive", "negative", "neutral"):
        while sum(1 for _, y in rows if y == label) < n_per_class:
            text = sentence(rng, label)
            if text not in seen:
                seen.add(text)
                rows.append((text, label))
    rng.shuffle(rows)
    return rows


def main() -> None:
    path = Path(__file__).with_name("reviews.csv")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(generate())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
