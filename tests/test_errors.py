"""Acceptance (issue 2, point 5): bad input gets one clear line and a non-zero exit, no traceback.

Each case runs the real `minillm info` command in a subprocess, as a user would.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import make_tiny_model, save_tiny


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "minillm", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def assert_clean_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minillm: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save_tiny(make_tiny_model("llama"), tmp_path_factory.mktemp("good"))


def test_missing_path(tmp_path):
    assert_clean_error(run_cli("info", str(tmp_path / "nope")), "no model at")


def test_directory_without_config(tmp_path):
    assert_clean_error(run_cli("info", str(tmp_path)), "config.json")


def test_unsupported_model_type(good_dir, tmp_path):
    bad = shutil.copytree(good_dir, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("info", str(bad)), "gpt_neox", "llama")


def test_truncated_safetensors(good_dir, tmp_path):
    bad = shutil.copytree(good_dir, tmp_path / "m")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_error(run_cli("info", str(bad)), "truncated")


def test_corrupted_safetensors_header(good_dir, tmp_path):
    bad = shutil.copytree(good_dir, tmp_path / "m")
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#garbage####"
    f.write_bytes(bytes(data))
    assert_clean_error(run_cli("info", str(bad)), "corrupted")


def test_truncated_gguf(smollm2_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        bad.write_bytes(src.read(5_000_000))
    assert_clean_error(run_cli("info", str(bad)), "GGUF")


def test_tensor_shape_disagrees_with_config(good_dir, tmp_path):
    bad = shutil.copytree(good_dir, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("info", str(bad)), "shape", "mlp")


def test_hub_id_while_offline(tmp_path):
    env_home = {"HF_HOME": str(tmp_path)}  # an empty cache: nothing to fall back on
    os.environ.update(env_home)
    try:
        assert_clean_error(run_cli("info", "someorg/somemodel"), "someorg/somemodel", "local directory")
    finally:
        for k in env_home:
            os.environ.pop(k)


def test_good_model_info_succeeds(good_dir):
    r = run_cli("info", str(good_dir), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["architecture"] == "llama" and facts["layers"] == 2
    # The count from the config equals the number of values in the checkpoint file.
    from safetensors.numpy import load_file

    assert facts["parameters"] == sum(v.size for v in load_file(good_dir / "model.safetensors").values())
