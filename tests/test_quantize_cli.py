"""Acceptance (issue 4, points 5 and 6): a W4 g64 SmolLM2 written by `minillm quantize` reloads and
chats, at about a quarter of the float16 size; bad quantization input gets one clear line."""

import json
import shutil

import numpy as np
import pytest
from conftest import make_tiny_model, save_tiny
from test_errors import assert_clean_error, run_cli

import minillm
from minillm.quantize import directory_bytes


@pytest.mark.parametrize("embeddings", [False, True])
def test_quantized_smollm2_reloads_and_chats(smollm2_gguf, tmp_path, embeddings):
    out = tmp_path / "smollm2-w4"
    flags = ["--quantize-embeddings"] if embeddings else []
    r = run_cli("quantize", str(smollm2_gguf), str(out), "--bits", "4", "--group-size", "64", "--quiet", *flags)
    assert r.returncode == 0, r.stderr
    m = minillm.load(out, progress=False)
    reply = "".join(m.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                           max_new_tokens=20))
    assert "Paris" in reply
    float16_bytes = 2 * m.model.num_parameters
    ratio = directory_bytes(out) / float16_bytes
    print(f"\nW4 g64 (embeddings {'quantized' if embeddings else 'float16'}): {directory_bytes(out) / 2**20:.1f} MiB, "
          f"float16 weights {float16_bytes / 2**20:.1f} MiB, ratio {ratio:.3f}")
    # Embeddings (28M of the 135M parameters) dominate what stays float16.
    assert ratio < (0.30 if embeddings else 0.45)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(make_tiny_model("llama", intermediate_size=128), tmp_path_factory.mktemp("q") / "m")


@pytest.mark.parametrize("flags, needle", [
    (["--bits", "4", "--group-size", "20"], "group size"),  # not a multiple of 8
    (["--bits", "3", "--format", "awq"], "AWQ"),
    (["--bits", "4", "--sym", "--format", "awq"], "AWQ"),
])
def test_unsupported_bits_group_or_format(tiny_dir, tmp_path, flags, needle):
    r = run_cli("quantize", str(tiny_dir), str(tmp_path / "out"), "--quiet", *flags)
    assert_clean_error(r, needle)
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unsupported_bits_value(tiny_dir, tmp_path):
    r = run_cli("quantize", str(tiny_dir), str(tmp_path / "out"), "--bits", "5")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_existing_output_is_not_overwritten(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    assert_clean_error(run_cli("quantize", str(tiny_dir), str(tmp_path / "out"), "--quiet"), "already exists")


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qq") / "w4"
    assert run_cli("quantize", str(tiny_dir), str(out), "--group-size", "32", "--quiet").returncode == 0
    return out


@pytest.mark.parametrize("edit", [
    lambda q: q.update(bits="four"),
    lambda q: q.update(quant_method="bitsandbytes"),
    lambda q: q.pop("granularity"),
])
def test_corrupted_quantization_config(quantized_dir, tmp_path, edit):
    bad = shutil.copytree(quantized_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg["quantization_config"])
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("info", str(bad), "--quiet"), "quantization")


def test_packed_tensor_shape_disagrees_with_config(quantized_dir, tmp_path):
    bad = shutil.copytree(quantized_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 8  # the packed words now hold half the codes the config implies
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("info", str(bad), "--quiet"), "shape")


def test_nan_weights_are_refused(tiny_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = shutil.copytree(tiny_dir, tmp_path / "nan")
    t = load_file(bad / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = run_cli("quantize", str(bad), str(tmp_path / "out"), "--quiet")
    assert_clean_error(r, "NaN")
    assert not (tmp_path / "out").exists()
