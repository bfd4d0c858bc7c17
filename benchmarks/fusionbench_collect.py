"""Run inside FusionBench's own environment (no regmean import): time its RegMean Gram collection and a plain
forward over the same batches. Prints one JSON line. Called by measure_speed.py.

    python fusionbench_collect.py MODEL_DIR TEXTS.jsonl BATCH MAX_LENGTH
"""

import json
import sys
import time

import torch
import transformers
from fusion_bench.method.regmean import regmean as fb


class Batches:
    """The three Trainer members FusionBench's `regmean_merging` uses, over fixed batches."""

    def __init__(self, batches, batch_size):
        self.batches, self._train_batch_size = batches, batch_size

    def get_train_dataloader(self):
        return self.batches

    def _prepare_inputs(self, inputs):
        return inputs


def main():
    model_dir, texts_path, batch, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(texts_path) as f:
        texts = [json.loads(line)["text"] for line in f]
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    tok.pad_token = tok.pad_token or tok.eos_token
    batches = [
        dict(tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(texts), batch)
    ]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, config.architectures[0])  # the class regmean measures with
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    fb.merging_with_regmean_weights = lambda *a, **k: {}  # time the collection only, not its merge
    out = {}
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(**b)
        out.setdefault("forward_s", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        fb.regmean_merging([model], [Batches(batches, batch)], [], [len(texts) + batch])
        out.setdefault("fusionbench_s", []).append(time.perf_counter() - t)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
