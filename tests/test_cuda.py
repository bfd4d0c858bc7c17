"""The accelerator paths, where a GPU is present (skipped elsewhere, saying so): statistics measured on CUDA equal
the CPU's, and a merge computed on CUDA equals the CPU's merge, both up to float rounding."""

import pytest
import torch
from conftest import ALL_SITES, TARGETS, TEXTS, build_model, save_model
from safetensors.torch import load_file

from regmean.io.data import Example
from regmean.measure import measure
from regmean.merge import MergeConfig, merge
from regmean.stats import save

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
EXAMPLES = [Example(t, None, y) for t, y in zip(TEXTS, TARGETS, strict=True)]


def test_statistics_measured_on_cuda_equal_the_cpus(tmp_path):
    path = save_model(build_model("llama", "LlamaForCausalLM", 1), tmp_path / "m")
    kw = {"batch_size": 4, "stats_dtype": "float64", "model_dtype": "float64", "progress": False}
    cpu = measure(path, EXAMPLES, **kw, protection=ALL_SITES)
    gpu = measure(path, EXAMPLES, **kw, protection=ALL_SITES, device="cuda")
    assert cpu.sites.keys() == gpu.sites.keys()
    for name, site in cpu.sites.items():
        assert gpu.sites[name].count == site.count
        torch.testing.assert_close(gpu.sites[name].gram, site.gram, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["regmean", "average"])
def test_a_merge_computed_on_cuda_equals_the_cpus(tmp_path, method):
    models = []
    for k in range(3):
        path = save_model(build_model("bert", "BertForSequenceClassification", k + 1), tmp_path / f"m{k}")
        save(measure(path, EXAMPLES[k * 3 : k * 3 + 4], progress=False, protection=ALL_SITES), tmp_path / f"s{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    config = MergeConfig(method=method, models=models)
    merge(config, tmp_path / "cpu", progress=False)
    merge(config, tmp_path / "gpu", progress=False, device="cuda")
    cpu, gpu = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    assert cpu.keys() == gpu.keys()
    for key, tensor in cpu.items():
        torch.testing.assert_close(gpu[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
