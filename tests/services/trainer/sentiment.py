"""A synthetic sentiment set (short reviews labelled positive or negative), for the text-model tests."""

from __future__ import annotations

import random

import pandas as pd

POSITIVE = ["great", "wonderful", "excellent", "fantastic", "amazing", "delightful", "superb", "lovely"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "poor", "bad", "disgusting"]
SUBJECTS = ["the movie", "this book", "the food", "our trip", "the service", "the concert", "the hotel",
            "the game", "the new phone", "that restaurant"]
TEMPLATES = [
    "{s} was {w}.",
    "I thought {s} was {w}.",
    "Honestly, {s} felt {w} to me.",
    "All in all {s} is really {w}!",
    "My friends agreed that {s} was {w}.",
]


def sentiment_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        sentence = rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=word)
        rows.append({"review": sentence[0].upper() + sentence[1:], "sentiment": label})
    rng.shuffle(rows)
    return pd.DataFrame(rows)
