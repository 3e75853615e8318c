"""Acceptance (issue 5, points 1, 3 and 5): GPTQ and AWQ properties on small random problems, the
calibrated pipeline's checkpoints reloading, and bad input."""

import json

import numpy as np
import pytest
from conftest import assert_logits_close, make_tiny_model, save_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from test_errors import assert_clean_error, run_cli

import minillm
from minillm.calibrate import _fold_norm, _scale_columns, _scale_rows, calibration_windows, quantize_calibrated
from minillm.errors import MinillmError
from minillm.quant import QuantSpec, quantize_rtn
from minillm.quant.awq import search_scales
from minillm.quant.gptq import GPTQ, gptq_quantize
from minillm.quantize import save_quantized

specs = st.builds(QuantSpec, bits=st.sampled_from([2, 3, 4, 8]), granularity=st.sampled_from(["channel", "group"]),
                  group_size=st.sampled_from([8, 16, 32]), sym=st.booleans())


@settings(max_examples=40, deadline=None)
@given(spec=specs, n=st.integers(1, 24), k=st.integers(4, 90), seed=st.integers(0, 2**31), act_order=st.booleans())
def test_gptq_with_identity_hessian_is_rtn(spec, n, k, seed, act_order):
    """H = I: no input correlation, so no error is worth propagating: the RTN codes exactly."""
    w = np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32)
    q, r = gptq_quantize(w, np.eye(k), spec, act_order=act_order), quantize_rtn(w, spec)
    assert np.array_equal(q.codes, r.codes) and np.array_equal(q.scales, r.scales)


def correlated_inputs(rng, t, k):
    return (rng.normal(size=(t, k)) @ rng.normal(size=(k, k)) * 0.5 + rng.normal(size=(t, k))).astype(np.float32)


def objective(x, w, qt):
    return float(((x @ w.T - x @ qt.dequantize().T) ** 2).sum())


@settings(max_examples=40, deadline=None)
@given(spec=specs, n=st.integers(2, 24), k=st.integers(8, 80), seed=st.integers(0, 2**31), act_order=st.booleans())
def test_gptq_objective_never_above_rtn(spec, n, k, seed, act_order):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k)).astype(np.float32)
    x = correlated_inputs(rng, 4 * k, k)
    g = GPTQ(k)
    g.add_batch(x)
    gptq, rtn = objective(x, w, g.quantize(w, spec, act_order=act_order)), objective(x, w, quantize_rtn(w, spec))
    # Per row, minillm keeps GPTQ's result only where it is not worse than plain rounding, so the
    # layer objective can exceed RTN's by float32 rounding noise at most.
    assert gptq <= rtn * (1 + 1e-5) + 1e-6


def test_gptq_beats_rtn_on_average():
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(30):
        w = rng.normal(size=(32, 64)).astype(np.float32)
        x = correlated_inputs(rng, 256, 64)
        g = GPTQ(64)
        g.add_batch(x)
        spec = QuantSpec(4, "group", 32)
        ratios.append(objective(x, w, g.quantize(w, spec)) / objective(x, w, quantize_rtn(w, spec)))
    assert np.mean(ratios) < 0.8  # measured around 0.5 here: a clear, not marginal, win


@settings(max_examples=30, deadline=None)
@given(k=st.integers(16, 100), group=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**31))
def test_act_order_groups(k, group, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(8, k)).astype(np.float32)
    g = GPTQ(k)
    g.add_batch(correlated_inputs(rng, 3 * k, k) * rng.uniform(0.1, 3, size=k).astype(np.float32))
    spec = QuantSpec(4, "group", group)
    static = g.quantize(w, spec, act_order=True, static_groups=True)
    # Static groups: group j is columns jG..jG+G-1 as the spec says, its scale from those columns.
    assert static.g_idx is None
    np.testing.assert_array_equal(static.scales, quantize_rtn(w, spec).scales)
    dynamic = g.quantize(w, spec, act_order=True, static_groups=False)
    gi = dynamic.group_index()
    counts = np.bincount(gi, minlength=spec.num_groups(k))
    assert np.all(counts[:-1] == group) and 0 < counts[-1] <= group  # every group has G columns (the last <= G)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 32), k=st.integers(16, 64), seed=st.integers(0, 2**31))
def test_awq_search_never_worse_than_identity(n, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(128, k)).astype(np.float32) * rng.lognormal(0, 1, size=k).astype(np.float32)
    w = rng.normal(size=(n, k)).astype(np.float32)
    s, alpha, losses = search_scales(x, [w], QuantSpec(4, "group", 16))
    assert losses[0] == min(losses[0], *losses) or min(losses) <= losses[0]
    assert min(losses) <= losses[0]  # alpha = 0 (the identity) is in the grid
    if alpha == 0:
        np.testing.assert_allclose(s, 1.0, rtol=1e-6)


def test_awq_folding_leaves_the_float_model_unchanged(tmp_path):
    """RMSNorm -> q/k/v, RMSNorm -> gate/up and up -> down, with random positive scales."""
    m = minillm.load(save_tiny(make_tiny_model("llama", intermediate_size=128), tmp_path / "m"), progress=False)
    tokens = np.random.default_rng(1).integers(0, 128, size=20)
    before = m(tokens)
    rng = np.random.default_rng(2)
    weights = {}
    for i, blk in enumerate(m.model.blocks):
        p = f"model.layers.{i}."
        s1 = rng.uniform(0.2, 5, size=64).astype(np.float32)
        _fold_norm(blk, "attn_norm", weights, p + "input_layernorm.weight", s1)
        for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            _scale_columns(blk, short, weights, p, s1)
        s2 = rng.uniform(0.2, 5, size=64).astype(np.float32)
        _fold_norm(blk, "mlp_norm", weights, p + "post_attention_layernorm.weight", s2)
        for short in ("mlp.gate_proj", "mlp.up_proj"):
            _scale_columns(blk, short, weights, p, s2)
        s3 = rng.uniform(0.2, 5, size=128).astype(np.float32)
        _scale_rows(blk, "mlp.up_proj", weights, p, 1 / s3)
        _scale_columns(blk, "mlp.down_proj", weights, p, s3)
    assert_logits_close(m(tokens), before, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# The pipeline on a tiny model: reload identity and bad input
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_gguf):
    """A tiny llama with SmolLM2's tokenizer (for calibration text) and vocabulary-sized embeddings."""
    from minillm.loading.gguf_import import open_gguf
    from minillm.tokenizer import load_tokenizer

    d = save_tiny(make_tiny_model("llama", vocab_size=49152, intermediate_size=128, hidden_size=64),
                  tmp_path_factory.mktemp("cal") / "m")
    load_tokenizer(smollm2_gguf, open_gguf(smollm2_gguf)).save_files(d)
    return d


@pytest.mark.parametrize("method, fmt", [("gptq", "gptq"), ("awq", "awq"), ("gptq", "compressed-tensors")])
def test_calibrated_checkpoints_reload_with_identical_logits(tiny, tmp_path, method, fmt):
    m = minillm.load(tiny, progress=False)
    spec = QuantSpec(4, "group", 32)
    weights, report = quantize_calibrated(m, spec, method, calibration_windows(m.tokenizer, 4, 64), progress=False)
    assert all(r[f"{method}_error"] <= r["rtn_error"] * 1.05 + 1e-9 for r in report["layers"])
    for w in weights.values():
        if hasattr(w, "zeros"):
            w.zeros[w.zeros == 0] = 1  # keep GPTQ v1 storable
    out = save_quantized(tmp_path / "q", m, weights, spec, fmt=fmt)
    tokens = np.random.default_rng(3).integers(0, 49152, size=16)
    in_memory = minillm.Model(m.config, weights)
    assert_logits_close(minillm.load(out, progress=False)(tokens), in_memory(tokens), rel=1e-6)
    if fmt == "compressed-tensors":  # and the library itself decompresses it (via transformers)
        from test_quant_formats import _hf_compressed

        hf = _hf_compressed(out)
        for i, blk in enumerate(in_memory.blocks):
            ours = blk.down.weight
            theirs = hf.model.layers[i].mlp.down_proj.weight.detach().numpy()
            assert np.all(np.abs(theirs - ours) <= 2.0**-11 * np.abs(ours))  # float16 scales: one rounding


def test_cli_gptq_writes_report(tiny, tmp_path):
    report = tmp_path / "report.json"
    r = run_cli("quantize", str(tiny), str(tmp_path / "q"), "--method", "gptq", "--group-size", "32", "--samples", "2",
                "--seq-len", "64", "--act-order", "--report", str(report), "--quiet", "--format", "gptq_v2")
    assert r.returncode == 0, r.stderr
    layers = json.loads(report.read_text())["layers"]
    assert len(layers) == 14 and all("gptq_error" in x and "rtn_error" in x for x in layers)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["desc_act"] is True


def test_calibration_text_too_short(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    r = run_cli("quantize", str(tiny), str(tmp_path / "q"), "--method", "gptq", "--calib", str(short), "--quiet")
    assert_clean_error(r, "calibration text")
    assert not (tmp_path / "q").exists()


def test_group_size_the_layer_cannot_use(tiny, tmp_path):
    # AWQ's layout needs K % group == 0; this model's K is 64 and 128 for down_proj: group 48 fits neither.
    r = run_cli("quantize", str(tiny), str(tmp_path / "q"), "--method", "awq", "--group-size", "48",
                "--samples", "2", "--seq-len", "64", "--format", "awq", "--quiet")
    assert_clean_error(r, "AWQ")
    assert not (tmp_path / "q").exists() and not any(p.name.startswith(".q") for p in tmp_path.iterdir())


def test_nan_weights_are_refused_by_gptq(tiny, tmp_path):
    m = minillm.load(tiny, progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    m.checkpoint.weights[name] = np.array(m.checkpoint.weights[name])  # the file's arrays are read-only maps
    m.checkpoint.weights[name][3, 3] = np.nan
    with pytest.raises(MinillmError, match="NaN"):
        quantize_calibrated(m, QuantSpec(4, "group", 32), "gptq", calibration_windows(m.tokenizer, 2, 64), progress=False)


def test_cli_eval_against_a_reference(tiny, tmp_path):
    def ev(*args):
        r = run_cli("eval", *args, "--windows", "2", "--window-size", "64", "--json", "--quiet")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    same = ev(str(tiny), "--reference", str(tiny))
    assert same["kl_divergence"] == pytest.approx(0, abs=1e-9) and same["top1_agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(same["reference_perplexity"])
    q = tmp_path / "q"
    assert run_cli("quantize", str(tiny), str(q), "--bits", "3", "--group-size", "32", "--quiet").returncode == 0
    quant = ev(str(q), "--reference", str(tiny))
    assert quant["kl_divergence"] > 0 and quant["reference_perplexity"] == pytest.approx(same["perplexity"])


def test_report_baseline_is_plain_rtn_for_awq_too(tiny):
    """The report's RTN column is plain rounding of the layer as it came, with AWQ's folded scales
    undone: on the first layer's q/k/v (whose inputs do not depend on earlier quantized layers) the
    AWQ and GPTQ reports give the same RTN error."""
    m = minillm.load(tiny, progress=False)
    spec = QuantSpec(4, "group", 32)
    windows = calibration_windows(m.tokenizer, 2, 64)
    rtn = {}
    for method in ("gptq", "awq"):
        _, report = quantize_calibrated(m, spec, method, windows, progress=False)
        rtn[method] = {r["layer"]: r["rtn_error"] for r in report["layers"]}
    for short in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{short}.weight"
        assert rtn["awq"][name] == pytest.approx(rtn["gptq"][name], rel=1e-4)
