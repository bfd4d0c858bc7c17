"""Seeded random mutations of a valid model header, statistics header and statistics metadata, each run through our
readers in-process: nothing but `RegmeanError` may escape, nothing may hang, and whatever is accepted must be what
the file really holds (the safetensors library itself is the oracle for tensors)."""

import json
import os
import random
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ALL_SITES, TEXTS, build_model, save_model
from safetensors import safe_open

from regmean.errors import RegmeanError
from regmean.io.checkpoint import Checkpoint
from regmean.io.data import Example
from regmean.io.tensorfile import TensorFile
from regmean.measure import measure
from regmean.stats import StatisticsFile, save

CASES = int(os.environ.get("REGMEAN_FUZZ_CASES", "150"))  # per target: a few hundred in all, seconds; more by hand


@contextmanager
def deadline(seconds: int, what: str):
    def hang(*_):
        raise TimeoutError(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header, data: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice([-1, 0, 1, 2**31, 2**63, -(2**64), 10**30])
    if kind == 1:
        return rng.choice([0.5, -0.0, 1e308, 4.0])
    if kind == 2:
        return rng.choice(["", "F32", "I64", "BOOL", "x" * 1000, "{}", "[1]", "\u0000", "-1"])
    if kind == 3:
        return rng.choice([None, True, False])
    if kind in (4, 5) and depth < 3:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 6 and depth < 3:
        return {rng.choice(["dtype", "shape", "data_offsets", "a"]): random_value(rng, depth + 1)}
    return rng.randrange(-5, 2**20)


def mutate_value(rng: random.Random, node):
    """Replace one randomly chosen value somewhere inside a JSON document."""
    if isinstance(node, dict) and node and rng.random() < 0.8:
        key = rng.choice(list(node))
        node[key] = mutate_value(rng, node[key])
        return node
    if isinstance(node, list) and node and rng.random() < 0.8:
        i = rng.randrange(len(node))
        node[i] = mutate_value(rng, node[i])
        return node
    return random_value(rng)


def mutate(rng: random.Random, blob: bytes) -> bytes:
    header, data = split(blob)
    op = rng.randrange(7)
    if op == 0:  # one value replaced, structure kept
        return join(mutate_value(rng, header), data)
    if op == 1:  # bytes of the header text flipped
        text = bytearray(json.dumps(header).encode())
        for _ in range(rng.randrange(1, 4)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        return join(bytes(text), data)
    if op == 2:  # a number in the header text changed
        text = json.dumps(header)
        digits = [i for i, c in enumerate(text) if c.isdigit()]
        i = rng.choice(digits)
        return join(f"{text[:i]}{rng.choice(['-', '9', '0', '99999999999'])}{text[i + 1 :]}".encode(), data)
    if op == 3:  # the length prefix lies
        return join(header, data, rng.choice([0, 1, len(json.dumps(header)) + rng.randrange(-9, 9), 2**40]))
    if op == 4:  # the data truncated or extended
        return join(header, data[: rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + b"\0" * 8)
    if op == 5:  # an entry removed or duplicated under a new name
        key = rng.choice(list(header))
        if rng.random() < 0.5:
            header.pop(key)
        else:
            header[key + "x"] = header[key]
        return join(header, data)
    text = json.dumps(header).encode()  # a range of the header deleted
    i = rng.randrange(len(text))
    return join(text[:i] + text[i + rng.randrange(1, 20) :], data)


def reference(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library reads from the file, or None if it refuses it."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path_factory.mktemp("fuzz") / "m")


def test_safetensors_header_mutations(model, tmp_path):
    rng = random.Random(0)
    valid = (model / "model.safetensors").read_bytes()
    accepted = 0
    for case in range(CASES):
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(mutate(rng, valid))
        with deadline(5, f"case {case}"):
            try:
                f = TensorFile(path)
            except RegmeanError:
                path.unlink()
                continue
            truth = reference(path)
            assert truth is not None, f"case {case}: accepted a file the safetensors library refuses"
            assert set(f.keys()) == set(truth), case
            for key, tensor in truth.items():
                got = f.get(key)
                assert got.dtype == tensor.dtype and got.shape == tensor.shape, (case, key)
                assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), (case, key)
            f.close()
            accepted += 1
        path.unlink()
    assert 0 < accepted < CASES  # the mutations both break and keep files


def test_model_folder_mutations(model, tmp_path):
    """Mutated weights headers, config.json and index of a whole model folder through Checkpoint and its hash."""
    rng = random.Random(1)
    weights = (model / "model.safetensors").read_bytes()
    config = json.loads((model / "config.json").read_text())
    folder = tmp_path / "m"
    folder.mkdir()
    for case in range(CASES):
        for old in folder.iterdir():
            old.unlink()
        target = rng.randrange(3)
        (folder / "config.json").write_text(json.dumps(mutate_value(rng, dict(config)) if target == 0 else config))
        blob = mutate(rng, weights) if target != 0 else weights
        if target == 2:  # sharded: a mutated index next to the (mutated) shard
            header, _ = split(weights)
            index = {"weight_map": dict.fromkeys((k for k in header if k != "__metadata__"), "shard.safetensors")}
            (folder / "model.safetensors.index.json").write_text(json.dumps(mutate_value(rng, index)))
            (folder / "shard.safetensors").write_bytes(blob)
        else:
            (folder / "model.safetensors").write_bytes(blob)
        with deadline(5, f"case {case}"):
            try:
                ckpt = Checkpoint(folder)
                assert all(ckpt.get(k).shape == ckpt.shape(k) for k in ckpt.keys())
                assert len(ckpt.fingerprint["weights"]) == 32
            except RegmeanError:
                pass


def test_statistics_mutations(model, tmp_path):
    """Mutated statistics headers and metadata values through StatisticsFile, its sites and its hash."""
    rng = random.Random(2)
    stats = measure(model, [Example(t) for t in TEXTS[:4]], progress=False, protection=ALL_SITES)
    valid = save(stats, tmp_path / "valid").read_bytes()
    header, data = split(valid)
    accepted = 0
    for case in range(CASES):
        if rng.random() < 0.5:  # one metadata field replaced by a random (often JSON) string
            mutated = json.loads(json.dumps(header))
            key = rng.choice(list(mutated["__metadata__"]))
            try:
                value = mutate_value(rng, json.loads(mutated["__metadata__"][key]))
            except json.JSONDecodeError:  # a plain string field (format, dtype, masking, ...)
                value = random_value(rng)
            mutated["__metadata__"][key] = json.dumps(value) if rng.random() < 0.8 else str(value)
            blob = join(mutated, data)
        else:
            blob = mutate(rng, valid)
        folder = tmp_path / str(case)
        folder.mkdir()
        (folder / "statistics.safetensors").write_bytes(blob)
        with deadline(5, f"case {case}"):
            try:
                st = StatisticsFile(folder)
                for name in st.site_names:
                    site = st.site(name)
                    d = site.gram.shape[0]
                    assert site.gram.shape == (d, d) and site.sum.shape == (d,) and site.count >= 0
                assert st.examples >= 0 and st.tokens >= 0 and isinstance(st.modules, dict)
                st.content_digest()
                accepted += 1
            except RegmeanError:
                pass
    assert 0 < accepted < CASES


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT base and a peft LoRA adapter over it (rank and alpha patterns, a saved module)."""
    from test_hostile_adapters import CLS, OPTIONS, make_adapter

    root = tmp_path_factory.mktemp("fuzz-adapter")
    return save_model(build_model("bert", CLS), root / "base"), make_adapter(OPTIONS, 3, root / "adapter")


def peft_weights(base: Path, folder: Path) -> dict[str, torch.Tensor] | None:
    """The adapted weights as peft computes them (merge_and_unload), or None if peft cannot load the adapter."""
    import peft

    from regmean.loading import load_model

    try:
        merged = peft.PeftModel.from_pretrained(load_model(base), str(folder)).merge_and_unload()
    except Exception:
        return None
    return dict(merged.state_dict())


def test_adapter_mutations(adapter, tmp_path):
    """Mutated adapter_config.json values and adapter weights headers through AdaptedCheckpoint: a refusal is a
    RegmeanError; an accepted adapter gives every weight finite, of the base's shape, and where peft loads the same
    adapter, what peft's merge_and_unload computes (peft is the oracle)."""
    from regmean.io.adapter import AdaptedCheckpoint

    base, valid = adapter
    rng = random.Random(3)
    config = json.loads((valid / "adapter_config.json").read_text())
    weights = (valid / "adapter_model.safetensors").read_bytes()
    accepted = compared = 0
    for case in range(CASES // 3):
        folder = tmp_path / str(case)
        folder.mkdir()
        mutated = mutate_value(rng, json.loads(json.dumps(config))) if case % 2 == 0 else config
        (folder / "adapter_config.json").write_text(json.dumps(mutated))
        (folder / "adapter_model.safetensors").write_bytes(mutate(rng, weights) if case % 2 else weights)
        with deadline(10, f"case {case}"):
            try:
                ckpt = AdaptedCheckpoint(folder, base)
                got = {k: ckpt.get(k) for k in ckpt.keys()}
            except RegmeanError:
                continue
        accepted += 1
        assert all(bool(torch.isfinite(t).all()) for t in got.values() if t.is_floating_point()), case
        truth = peft_weights(base, folder)
        if truth is not None:
            for key in ckpt.pairs:
                torch.testing.assert_close(got[key], truth[key], rtol=1e-5, atol=1e-6, msg=f"case {case}: {key}")
            compared += 1
    assert 0 < compared <= accepted < CASES // 3


def test_tokenizer_mutations(model, tmp_path):
    """Mutated tokenizer.json and tokenizer_config.json values: load_tokenizer gives a RegmeanError or a tokenizer
    whose ids for a sentence lie in its vocabulary; nothing else escapes (a Rust panic included), nothing hangs."""
    from regmean.loading import load_tokenizer

    rng = random.Random(4)
    files = {name: json.loads((model / name).read_text()) for name in ("tokenizer.json", "tokenizer_config.json")}
    accepted = 0
    for case in range(CASES // 3):
        folder = tmp_path / str(case)
        folder.mkdir()
        target = rng.choice(list(files))
        for name, content in files.items():
            changed = mutate_value(rng, json.loads(json.dumps(content))) if name == target else content
            (folder / name).write_text(json.dumps(changed))
        with deadline(10, f"case {case}"):
            try:
                tok = load_tokenizer(folder)
                ids = tok(TEXTS[0])["input_ids"]
            except RegmeanError:
                continue
        accepted += 1
        assert all(0 <= i <= max(tok.get_vocab().values()) for i in ids), case
    assert 0 < accepted < CASES // 3
