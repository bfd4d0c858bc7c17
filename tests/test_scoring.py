"""Entity F1 against seqeval (the reference implementation of CoNLL's chunking, as an oracle only: the library does
not depend on it), on hand cases and on random tag sequences with every malformed transition."""

import random
import warnings

import pytest
from seqeval.metrics import f1_score as seqeval_f1

from regmean.scoring import entity_f1, entity_spans


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
        (["I-PER", "I-PER"], {("PER", 0, 1)}),  # an I- after O starts an entity
        (["B-PER", "I-LOC"], {("PER", 0, 0), ("LOC", 1, 1)}),  # a change of type ends one
        (["B-PER", "B-PER"], {("PER", 0, 0), ("PER", 1, 1)}),
        (["S-geo-loc", "E-geo-loc"], {("geo-loc", 0, 0), ("geo-loc", 1, 1)}),
        (["O", "O"], set()),
    ],
)
def test_entity_spans_by_hand(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_f1_equals_seqeval_on_random_tags():
    rng = random.Random(0)
    alphabet = ["O", "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-geo-loc", "I-geo-loc"]
    for _ in range(2000):
        gold = [[rng.choice(alphabet) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(1, 4))]
        pred = [[rng.choice(alphabet) for _ in sentence] for sentence in gold]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns when a side has no entity
            expected = seqeval_f1(gold, pred)
        assert entity_f1(gold, pred) == pytest.approx(expected, abs=1e-12), (gold, pred)
