"""Programmatic dependent launch (minillm/gpu/launch.py): a kernel may start before the one before it
has finished, so every kernel must wait (cuda_kernels/common.cuh pdl_begin) before it reads or
writes anything an earlier kernel writes. The source check runs everywhere; the GPU tests compare the
decode step launched with and without PDL, bit for bit (the arithmetic is the same, only the launch
differs, so any race shows up as a difference)."""

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

KERNELS = Path(__file__).resolve().parents[1] / "cuda_kernels"


def _sources() -> str:
    # Macro bodies are one logical line each: drop the continuations.
    return "\n".join(p.read_text().replace("\\\n", "\n") for p in sorted(KERNELS.glob("*.c*")))


def _body(text: str, start: int) -> str:
    """The brace-matched block that opens at or after `start`."""
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    raise AssertionError("unbalanced braces")


def _waits_first(body: str, functions: dict, seen=()) -> bool:
    """pdl_begin() (or pdl_begin_after_loads) runs before any return, directly or as the first thing a
    called body does."""
    wait = re.search(r"\bpdl_begin(?:_after_loads)?\s*\(", body)
    ret = re.search(r"\breturn\b", body)
    if wait:
        return ret is None or ret.start() > wait.start()
    for name in re.findall(r"\b(\w+)\s*(?:<[^;(){}]*>)?\s*\(", body):
        if name in functions and name not in seen:
            return _waits_first(functions[name], functions, seen + (name,))
    return False


def _functions(src: str) -> dict:
    """name -> body of every __device__ __forceinline__ function."""
    return {m.group(1): _body(src, m.end())
            for m in re.finditer(r"__device__\s+__forceinline__\s+\w+\s+(\w+)\s*\([^;{]*\)\s*(?=\{)", src)}


def _kernels(src: str) -> list:
    """(name, body) of every entry point and entry-point macro (a macro's name is its parameter's)."""
    return [(m.group(1), _body(src, m.end()))
            for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(', src)]


def test_every_kernel_waits_before_it_touches_the_step():
    src = _sources()
    functions, kernels = _functions(src), _kernels(src)
    assert len(kernels) >= 15  # the entry points and entry-point macros of cuda_kernels/
    missing = [name for name, body in kernels if not _waits_first(body, functions)]
    assert not missing, f"kernels that never call pdl_begin, or return before it: {missing}"


def test_every_trigger_follows_the_kernels_own_wait():
    """pdl_trigger lets the next kernel launch, and that kernel reads what the kernels two launches
    back wrote before it waits: so a kernel may trigger only after its own wait (common.cuh)."""
    src = _sources()
    bodies = list(_functions(src).values()) + [body for _, body in _kernels(src)]
    triggering = [b for b in bodies if "pdl_trigger()" in b]
    assert len(triggering) >= 2  # the batch-1 W4 kernel, decode attention
    for body in triggering:
        wait = re.search(r"\bpdl_begin(?:_after_loads)?\s*\(", body)
        assert wait and wait.start() < body.index("pdl_trigger()"), body[:200]


def test_launch_arguments_are_passed_as_cupy_passes_them():
    from minillm.gpu import kernels as K
    from minillm.gpu.launch import _arg_bytes

    assert _arg_bytes(np.int32(-3)) == np.int32(-3).tobytes()
    assert _arg_bytes(np.float32(0.5)) == np.float32(0.5).tobytes()
    assert _arg_bytes(0) == bytes(8)  # a null pointer
    assert _arg_bytes(K.NO_EPILOGUE) == bytes(128)  # common.cuh EpilogueIO, by value
    with pytest.raises(TypeError):
        _arg_bytes(0.5)


def test_next_token_refuses_a_mailbox_of_another_batch():
    """next_token writes row b's token at mailbox slot * rows + b (its grid is the row stride): a
    mailbox with fewer rows would be written past its end, so the launch is refused before it."""
    from types import SimpleNamespace

    from minillm.gpu import kernels as K

    box = SimpleNamespace(batch=1, slots=4, ptr=0)
    with pytest.raises(ValueError, match="mailbox of 1 rows for 2 rows"):
        K.next_token(None, 2, 10, None, None, mailbox=box)


@settings(max_examples=300, deadline=None)
@given(blocks=st.integers(1, 3000), sms=st.sampled_from([78, 114, 132, 148]),
       per_sm=st.sampled_from([(100 << 10, 1024), (228 << 10, 1024), (164 << 10, 0)]),
       static=st.integers(0, 48 << 10), dynamic=st.integers(0, 80 << 10))
def test_spread_shared_memory_holds_each_sm_to_its_share(blocks, sms, per_sm, static, dynamic):
    """The tensor-core attention kernels let the next kernel launch while they merge; their launch
    asks for enough shared memory that no SM can take more than ceil(blocks / SMs) of their blocks,
    never less than the kernel needs, and never so much that the share itself no longer fits."""
    from types import SimpleNamespace

    from minillm.gpu import kernels as K

    smem, reserved = per_sm
    assume(static + dynamic + reserved <= smem // 2)  # a kernel that fits twice on a SM
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "sm_count", lambda: sms)
        mp.setattr(K, "_shared_memory_per_sm", lambda: per_sm)
        got = K.spread_shared_memory(SimpleNamespace(static_shared_bytes=static), blocks, dynamic)
    share, block = -(-blocks // sms), static + got + reserved
    assert got >= dynamic
    assert got == dynamic or smem // block == share  # padded: exactly the share fits
    if share <= 4:  # the kernels' own limit (launch bounds) is 3-4 blocks a SM: below it, always held
        assert smem // block <= share


@pytest.mark.gpu
@pytest.mark.parametrize("weights, kv_cache, kv_heads, env", [
    ("w4", "float", 16, {}), ("fp16", "int8", 4, {}), ("w4", "int4", 16, {}), ("fp16", "int4", 4, {}),
    # the 8-bit tensor-core kernel with bulk copies (chosen at long contexts with few blocks)
    ("fp16", "int8", 4, {"MINILLM_ATTN_MMA": "1", "MINILLM_ATTN_BULK": "1"})])
def test_decode_step_with_pdl_equals_without(weights, kv_cache, kv_heads, env, monkeypatch):
    """Several layers of a mid-sized random model (products of hundreds of blocks, attention split
    over many blocks), decoded through the captured graph: logits identical with and without PDL.
    The tensor-core attention kernels read the positions earlier steps cached before their PDL wait
    and let the next kernel in after their loop, so the decoding crosses the end of an INT4 key block
    (128 positions: the append flushes it in the step that writes position 383, and the next step
    reads it early)."""
    import cupy as cp

    from minillm.gpu.synthetic import llama_config, random_model

    from minillm.gpu import launch

    cfg = llama_config(layers=4, hidden=2048, mlp=5504, heads=16, kv_heads=kv_heads, vocab=4096)
    model = random_model(cfg, weights=weights, seed=3, kv_cache=kv_cache)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=370)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    launch_ex, launched = launch._launch_kernel_ex(), []

    def counting(*args):
        launched.append(1)
        return launch_ex(*args)

    monkeypatch.setattr(launch, "_launch_kernel_ex", lambda: counting)
    runs = []
    for pdl in ("1", "0", "1"):
        monkeypatch.setenv("MINILLM_PDL", pdl)
        launched.clear()
        cache = model.new_cache(max_len=512)
        model(prompt, cache, last_only=True)
        tok, seq, logits = 7, [], []
        for _ in range(24):
            tok = model.decode_next([tok], cache)[0]
            seq.append(tok)
            logits.append(cp.asnumpy(model.buffers(1).logits[0]))
        assert cache.graph is not None
        # PDL launches happen only while the step is captured, and only with PDL on.
        assert len(launched) >= 4 * cfg.num_layers if pdl == "1" else not launched, len(launched)
        runs.append((seq, np.stack(logits)))
    for seq, logits in runs[1:]:
        assert seq == runs[0][0]
        assert np.array_equal(logits, runs[0][1])
