"""Acceptance (issue 6 point 1 end to end; issue 7 on the GPU): the GPU engine against the NumPy
reference. Logits of every tiny architecture (prefill through cuBLAS attention, decoding through the
split kernel), quantized weights (W4 and W8 packed), quantized KV caches, graph replay equal to eager
launches, and SmolLM2's greedy text equal to the CPU's. Run with `python3 -m pytest -m gpu`."""

import numpy as np
import pytest
from conftest import ARCH_CASES, make_tiny_model, save_tiny
from test_generate_parity import PROMPTS

import minillm
from minillm.errors import MinillmError

pytestmark = pytest.mark.gpu

# fp16 activations (10 mantissa bits) through a few layers: logits agree to ~1e-3 of their range.
REL = 1e-2


def cp_asnumpy(a):
    import cupy as cp

    return cp.asnumpy(a)


def close(gpu, cpu, rel=REL):
    gpu, cpu = np.asarray(gpu, np.float64), np.asarray(cpu, np.float64)
    err = np.abs(gpu - cpu).max() / np.abs(cpu).max()
    assert err <= rel, f"max |gpu - cpu| / max |logit| = {err:.3g} > {rel}"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {case: save_tiny(make_tiny_model(mt, **ov), root / case) for case, (mt, ov) in ARCH_CASES.items()}


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_tiny_architectures(case, tiny_dirs):
    cpu = minillm.load(tiny_dirs[case], progress=False)
    gpu = minillm.load(tiny_dirs[case], device="cuda", progress=False)
    # Dynamic NTK changes the base with the sequence length: keep to the trained context there.
    t = 12 if "dynamic" in case else 24
    tokens = np.random.default_rng(0).integers(3, cpu.config.vocab_size, size=t)
    close(gpu(tokens), cpu(tokens))  # the prompt path (cuBLAS attention when t > 16)
    # Token by token (the split decode kernel), then the last logits.
    cache_g, cache_c = gpu.new_cache(max_len=t), cpu.new_cache(max_len=t)
    for i in range(t):
        lg, lc = gpu(tokens[i : i + 1], cache_g), cpu(tokens[i : i + 1], cache_c)
    close(lg, lc)


@pytest.mark.parametrize("method, bits", [("rtn", 4), ("rtn", 8)])
def test_quantized_weights_stay_packed(method, bits, tiny_dirs, tmp_path):
    from minillm.cli import main

    out = tmp_path / f"q{bits}"
    assert main(["quantize", str(tiny_dirs["llama"]), str(out), "--method", method, "--bits", str(bits),
                 "--group-size", "32", "--quiet"]) == 0
    cpu = minillm.load(out, progress=False)
    gpu = minillm.load(out, device="cuda", progress=False)
    assert {layer.qkv.kind for layer in gpu.model.layers} == {"w4" if bits == 4 else "w8"}
    tokens = np.random.default_rng(1).integers(3, 128, size=20)
    close(gpu(tokens), cpu(tokens))
    close(gpu(tokens[:5]), cpu(tokens[:5]))


@pytest.mark.parametrize("kind, options", [("int8", {}), ("fp8", {}), ("int4", {}), ("int4", {"block": 32, "group": 32})])
def test_quantized_kv_cache_matches_reference(kind, options, tiny_dirs):
    """The GPU int8 / fp8 / int4 (KIVI) caches against kvcache.py's reference caches: a prompt of a
    block and 8 tokens (int4: split at its block boundary; r = 32 positions for the 8-bit caches),
    decoding across the next boundary (the block flushed from the window), then a truncation into a
    quantized block (reopened into the window) and more decoding. The tolerance is the format's own
    effect: the GPU quantizes fp16 keys and values, the reference fp32 ones, and a code that flips
    moves by a whole step, so the two may differ by up to about what the quantization itself changes
    (reference-quantized vs float). options: the INT4 layout (the default's key block, and KIVI's 32 x 32)."""
    cpu = minillm.load(tiny_dirs["llama"], progress=False, kv_cache=kind)
    ref = minillm.load(tiny_dirs["llama"], progress=False)
    gpu = minillm.load(tiny_dirs["llama"], device="cuda", progress=False, kv_cache=kind)
    cpu.model.kv_cache_options = gpu.model.kv_cache_options = options
    r = gpu.new_cache(max_len=8).block or 32
    tokens = np.random.default_rng(2).integers(3, 128, size=2 * r + 16)
    if kind == "fp8":  # centred on calibration tokens (the tiny model has no tokenizer to give them)
        calibration = np.random.default_rng(5).integers(3, 128, size=48)
        cpu.model.kv_calibration = gpu.model.kv_calibration = lambda: calibration
    caches = [gpu.new_cache(max_len=3 * r), cpu.new_cache(max_len=3 * r), ref.new_cache(max_len=3 * r)]

    def check(lg, lc, lf):
        budget = np.abs(lc - lf).max() / np.abs(lf).max()
        close(lg, lc, rel=2 * budget + REL)

    check(*(m(tokens[: r + 8], c) for m, c in zip((gpu, cpu, ref), caches)))
    for i in range(r + 8, 2 * r + 6):
        check(*(m(tokens[i : i + 1], c) for m, c in zip((gpu, cpu, ref), caches)))
    for c in caches:
        c.truncate(r + 13)
    for i in range(r + 13, r + 23):
        check(*(m(tokens[i : i + 1], c) for m, c in zip((gpu, cpu, ref), caches)))
    assert caches[0].nbytes < gpu.new_cache(max_len=3 * r, kind="float").nbytes
    if kind == "fp8":  # both engines measured the same means (GPU: from its fp16 float cache)
        want = caches[1].offsets["v"][1]  # layer 1: after a layer of fp16 arithmetic, REL of its range
        np.testing.assert_allclose(cp_asnumpy(caches[0].v_off[1]), want, atol=REL * np.abs(want).max(), rtol=0)


def test_graph_replay_equals_eager(tiny_dirs):
    gpu = minillm.load(tiny_dirs["qwen3"], device="cuda", progress=False)
    runs = []
    for graph in (True, False):
        gpu.model.cuda_graph = graph
        cache = gpu.new_cache(max_len=64)
        gpu(np.array([5, 6, 7]), cache)
        tok, seq = 9, []
        for _ in range(40):
            tok = gpu.model.decode_next([tok], cache)[0]
            seq.append(tok)
        runs.append(seq)
        assert cache.graph is not None if graph else cache.graph is None
    assert runs[0] == runs[1]
    # And greedy on the device equals the argmax of the logits the host path returns.
    cache = gpu.new_cache(max_len=64)
    gpu(np.array([5, 6, 7]), cache)
    logits = gpu(np.array([9]), cache)
    assert int(np.argmax(logits[-1])) == runs[0][0]


@pytest.mark.parametrize("kind", ["float", "int4"])
def test_decode_stream_equals_decode_next(kind, tiny_dirs):
    """decode_stream (a step queued ahead of the one the host reads) yields the tokens decode_next
    gives one step at a time; closed early, the cache goes on as if only the consumed steps had run
    (int4: the step run ahead completed a block and flushed it; the next step redoes both), and at
    the end of the context it stops with the context error."""
    gpu = minillm.load(tiny_dirs["llama"], device="cuda", progress=False, kv_cache=kind)
    model = gpu.model
    if kind == "int4":
        model.kv_cache_options = {"block": 32}  # a block's end within the steps below

    def prefixed(max_len=80):
        cache = gpu.new_cache(max_len=max_len)
        gpu(np.array([5, 6, 7]), cache)
        return cache

    cache, tok, want = prefixed(), 9, []
    for _ in range(60):
        tok = model.decode_next([tok], cache)[0]
        want.append(tok)
    cache, got = prefixed(), []
    steps = model.decode_stream([9], cache)
    got += [next(steps)[0] for _ in range(28)]  # positions 3..30; the step ahead writes 31, a block's end
    steps.close()
    assert cache.length == 31
    steps = model.decode_stream([got[-1]], cache)
    got += [next(steps)[0] for _ in range(32)]
    steps.close()
    assert got == want
    cache = prefixed(max_len=12)
    steps = model.decode_stream([9], cache)
    assert [next(steps)[0] for _ in range(9)] == want[:9]  # positions 3..11: the cache is full
    with pytest.raises(MinillmError, match="context"):
        next(steps)


def test_model_too_large_fails_before_allocating(tiny_dirs, monkeypatch):
    import cupy as cp

    class EmptyPool:  # CuPy's pool holds no reusable bytes either
        @staticmethod
        def free_bytes():
            return 0

    monkeypatch.setattr(cp.cuda.runtime, "memGetInfo", lambda: (1000, 80 * 2**30))
    monkeypatch.setattr(cp, "get_default_memory_pool", lambda: EmptyPool)
    with pytest.raises(MinillmError, match="needs .* GiB of GPU memory, but only"):
        minillm.load(tiny_dirs["llama"], device="cuda", progress=False)


def test_int4_cache_needs_a_head_dim_it_can_read(tiny_dirs):
    gpu = minillm.load(tiny_dirs["gemma"], device="cuda", progress=False)  # head_dim 32: fine
    assert gpu.new_cache(max_len=64, kind="int4").nbytes > 0
    with pytest.raises(MinillmError, match="head_dim that is a multiple of 16"):
        minillm.load(tiny_dirs["qwen3"], device="cuda", progress=False).new_cache(max_len=64, kind="int4")




@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    return minillm.load(smollm2_gguf, progress=False), minillm.load(smollm2_gguf, device="cuda", progress=False)


def test_smollm2_logits(smollm2_pair):
    cpu, gpu = smollm2_pair
    ids = cpu.encode("The quick brown fox jumps over the lazy dog. " * 8)
    close(gpu(ids), cpu(ids))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_greedy_text_equals_cpu(smollm2_pair, prompt):
    cpu, gpu = smollm2_pair
    msgs = [{"role": "user", "content": prompt}]
    a = "".join(cpu.chat(msgs, max_new_tokens=64))
    b = "".join(gpu.chat(msgs, max_new_tokens=64))
    assert a == b


def test_cli_info_on_gpu(tiny_dirs):
    """`minillm info --device cuda` reports the GPU model's facts (the chat and generate commands on
    the GPU are exercised with SmolLM2 above and in bench/gpu_decode.py)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "minillm.cli", "info", str(tiny_dirs["llama"]), "--device", "cuda",
                        "--kv-cache", "int8", "--json", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    cpu = minillm.load(tiny_dirs["llama"], progress=False)
    assert facts["parameters"] == cpu.model.num_parameters and facts["compute_dtype"] == "float16"
    assert facts["kv_cache"] == "int8" and facts["kv_cache_bytes"] > 0


def test_decoding_is_deterministic(tiny_dirs):
    """The same steps give bit-identical logits run after run: the attention merges its partial sums in
    a fixed order (no float atomics), so greedy text cannot drift with warp scheduling."""
    gpu = minillm.load(tiny_dirs["llama"], device="cuda", progress=False)
    tokens = np.random.default_rng(5).integers(3, 128, size=30)
    runs = []
    for _ in range(3):
        cache = gpu.new_cache(max_len=3000)  # many splits per step
        out = [gpu(tokens[:20], cache)]
        out += [gpu(tokens[i : i + 1], cache) for i in range(20, 30)]
        runs.append(np.concatenate(out))
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])
