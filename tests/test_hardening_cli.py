"""Hardening of quantize/eval/export/verify: numeric options, verdicts that are verdicts, foreign graphs.

Every error case asserts exit code 2, a single `error:` line on stderr (no traceback), and that nothing
outside the command's own output was created or changed.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import clean_error

from mixq_onnx.models import load_model
from mixq_onnx.onnx import export_qdq
from mixq_onnx.quant import QuantConfig, quantize, save_quantized


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Two result folders of one random-weight ResNet-20 (W8A8 and W4A4), the W8A8 graph, a tiny
    labelled npz and a calibration cache."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("hard")
    model = load_model("cifar_resnet20", random_init=True)
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out: dict[str, Path] = {}
    for b in (8, 4):
        q = quantize(model, QuantConfig(wbits=b, abits=b, method="rtn"), calib, progress=False)
        out[f"q{b}"] = save_quantized(q, d / f"r20-w{b}a{b}")
        if b == 8:
            out["onnx8"] = export_qdq(q, d / "r20-w8a8.onnx")
    rng = np.random.default_rng(0)
    out["npz"] = d / "data.npz"
    np.savez(out["npz"], x=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y=np.arange(24) % 10)
    out["npz_bad_labels"] = d / "bad_labels.npz"
    np.savez(out["npz_bad_labels"], x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) + 990)
    return out


@pytest.mark.parametrize("opt,val", [("--num-samples", "0"), ("--num-samples", "-3"), ("--batch-size", "-4"),
                                     ("--batch-size", "0"), ("--iters", "0")])
def test_quantize_rejects_non_positive_counts(world, tmp_path, run_cli, opt, val):
    out = tmp_path / "q"
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "quantize", "--model", "cifar_resnet20", "--random-weights",
                     "--calib", tmp_path, "--method", "rtn", opt, val, "--out", out)
    assert opt in msg
    assert not out.exists()


def test_quant_config_rejects_non_positive_counts():
    from mixq_onnx.errors import MixqError

    for kw in ({"num_samples": 0}, {"batch_size": -4}, {"iters": 0}):
        with pytest.raises(MixqError, match="positive integer"):
            QuantConfig(**kw).validate()


@pytest.mark.parametrize("args", [("--limit", "0"), ("--limit", "-1"), ("--batch-size", "0")])
def test_eval_rejects_non_positive_counts(world, run_cli, args):
    msg = clean_error(run_cli, [world["q8"]], "eval", "--quantized", world["q8"], "--data", world["npz"], *args)
    assert args[0] in msg


def test_eval_labels_outside_the_models_classes(world, run_cli):
    msg = clean_error(run_cli, [world["q8"]], "eval", "--quantized", world["q8"], "--data", world["npz_bad_labels"])
    assert "outside the model's 10 classes" in msg and "990" in msg


def test_verify_passes_its_own_graph(world, run_cli):
    r = run_cli("verify", world["onnx8"], "--quantized", world["q8"], "--data", world["npz"], "--json")
    assert r.code == 0, r.err
    import json

    rep = json.loads(r.last_line)
    assert rep["ok"] and rep["top1_agreement"] == 100.0 and rep["nan_outputs"] == 0


def test_verify_refuses_a_graph_from_another_folder(world, run_cli):
    msg = clean_error(run_cli, [world["q4"], world["onnx8"].parent], "verify", world["onnx8"], "--quantized",
                     world["q4"], "--data", world["npz"])
    assert "does not match the quantized model" in msg and "quantizer" in msg


def _planted(src: Path, dst: Path, factor: np.ndarray) -> Path:
    """The graph with its logits multiplied by a per-class constant: same quantizers, other outputs."""
    m = onnx.load(str(src))
    out = m.graph.output[0].name
    for n in m.graph.node:
        for i, o in enumerate(n.output):
            if o == out:
                n.output[i] = out + "_pre"
    m.graph.initializer.append(onnx.numpy_helper.from_array(factor.astype(np.float32), "planted_factor"))
    m.graph.node.append(onnx.helper.make_node("Mul", [out + "_pre", "planted_factor"], [out], name="planted"))
    onnx.save(m, str(dst))
    return dst


def test_verify_exits_1_below_min_agreement(world, tmp_path, run_cli):
    g = _planted(world["onnx8"], tmp_path / "scrambled.onnx", -np.linspace(1, 3, 10))
    r = run_cli("verify", g, "--quantized", world["q8"], "--data", world["npz"])
    assert r.code == 1, (r.code, r.err)
    assert "FAILED" in r.out and "below 99.9 %" in r.out
    assert re.match(r"verify: [\d.]+ s wall", r.err.splitlines()[-1]), r.err  # a bad verdict is a finished run
    r = run_cli("verify", g, "--quantized", world["q8"], "--data", world["npz"], "--min-agreement", "0")
    # the agreement bar is lowered away; the logits after the last quantizer are still not PyTorch's
    assert r.code == 1 and "below" not in r.out and "after the last quantizer" in r.out, r.out


def test_verify_exits_1_on_nan_and_reports_it(world, tmp_path, run_cli):
    f = np.ones(10)
    f[3] = np.nan
    g = _planted(world["onnx8"], tmp_path / "nan.onnx", f)
    r = run_cli("verify", g, "--quantized", world["q8"], "--data", world["npz"], "--min-agreement", "0", "--json")
    assert r.code == 1
    import json

    rep = json.loads(r.last_line)
    assert rep["nan_outputs"] == 24 and not rep["ok"]
    assert rep["max_abs_diff"] != rep["max_abs_diff"]  # NaN is reported, not ignored


def test_quantize_out_keeps_the_users_files(world, tmp_path, run_cli):
    """An existing, non-empty --out is refused before any work; --overwrite replaces only the two result files."""
    cache = Path(run_cli("calib", "--generator", "noise", "--num", "8", "--size", "32", "--cache-root",
                         tmp_path / "c", "-q").last_line)
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "keep.bin").write_bytes(b"\x01\x02")
    args = ["quantize", "--model", "cifar_resnet20", "--random-weights", "--calib", cache, "--method", "rtn",
            "--num-samples", "8", "--out", out, "-q"]
    msg = clean_error(run_cli, [tmp_path], *args)
    assert "--overwrite" in msg and "not empty" in msg
    r = run_cli(*args, "--overwrite")
    assert r.code == 0, r.err
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.bin").read_bytes() == b"\x01\x02"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "quant.json", "sub", "weights.safetensors"]
    r = run_cli("eval", "--quantized", out, "--data", world["npz"])
    assert r.code == 0, r.err


def _mid_scaled(src: Path, dst: Path, factor: float) -> Path:
    """The graph with the input of one mid-network activation QuantizeLinear scaled by `factor`: top-1 may well
    survive, the Q/DQ no longer compute what PyTorch does."""
    m = onnx.load(str(src))
    nodes = list(m.graph.node)
    qs = [n for n in nodes if n.op_type == "QuantizeLinear" and not n.input[0].endswith("weight")]
    q = qs[len(qs) // 2]
    mul = onnx.helper.make_node("Mul", [q.input[0], "planted_factor"], ["planted_out"], name="planted")
    q.input[0] = "planted_out"
    at = nodes.index(q)
    del m.graph.node[:]
    m.graph.node.extend(nodes[:at] + [mul] + nodes[at:])
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), "planted_factor"))
    onnx.save(m, str(dst))
    return dst


def test_verify_fails_an_unfaithful_segment_and_exact_asks_for_bit_exactness(world, tmp_path, run_cli):
    """verify judged top-1 alone: a Q/DQ that no longer computed PyTorch's codes passed while top-1 held
    (review, 2026-11-30). The teacher-forced segment check fails it at any --min-agreement."""
    import json

    r = run_cli("verify", world["onnx8"], "--quantized", world["q8"], "--data", world["npz"], "--exact", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.last_line)["max_abs_diff"] == 0
    g = _planted(world["onnx8"], tmp_path / "scaled_logits.onnx", np.full(10, 1.5))  # same top-1, other logits
    r = run_cli("verify", g, "--quantized", world["q8"], "--data", world["npz"], "--json")
    rep = json.loads(r.last_line)  # top-1 holds; the teacher-forced outputs after the last quantizer do not
    assert r.code == 1 and rep["top1_agreement"] == 100.0, rep
    assert any("after the last quantizer" in f for f in rep["failures"]), rep["failures"]
    r = run_cli("verify", g, "--quantized", world["q8"], "--data", world["npz"], "--exact")
    assert r.code == 1 and "not bit-exact" in r.out
    mid = _mid_scaled(world["onnx8"], tmp_path / "mid.onnx", 1.5)
    r = run_cli("verify", mid, "--quantized", world["q8"], "--data", world["npz"], "--min-agreement", "50", "--json")
    rep = json.loads(r.last_line)
    assert r.code == 1 and any("teacher-forced run" in f for f in rep["failures"]), rep["failures"]
    assert rep["segment_step_diff"] > 0.5
    msg = clean_error(run_cli, [world["q8"]], "verify", world["onnx8"], "--quantized", world["q8"], "--data",
                      world["npz"], "--min-agreement", "0.999")
    assert "did you mean 99.9" in msg


def test_a_top1_flip_at_a_float_rounding_tie_is_not_a_failure():
    """efficientnet's float SiLU differs between runtimes by ~1e-6; an image whose two best logits were 1e-7
    apart failed verify at 96.9 % (review, 2026-11-30). A tie is counted only while the image's own
    difference is tiny, so a wrong graph's flips stay failures."""
    from mixq_onnx.onnx.verify import VerifyReport, _near_ties

    ref = np.array([[1.0, 1.0 + 1e-7, 0.0], [2.0, 0.0, 1.0], [0.5, 0.6, 0.0]], np.float32)
    out = ref.copy()
    out[0, 0] += 1e-6  # a tie, flipped by float rounding
    out[2, 0] += 0.2  # a real flip: far beyond rounding
    assert _near_ties(out, ref) == 1
    rep = VerifyReport(n=3, top1_agreement=100 / 3, max_abs_diff=0.2, mean_abs_diff=0.0, code_mismatch_fraction=0.0,
                       propagated_code_mismatch=0.0, near_ties=1)
    assert rep.failures(66.0) == [] and "near-tie" in rep.failures(99.0)[0]


def test_verify_counts_a_planted_tie_flip_as_agreeing(tmp_path):
    """The near-tie rule was tested only as a helper; setting verify's tie count to 0 passed (review, 2026-11-30).
    Classes 0 and 1 get the same classifier row and a large bias, so PyTorch's two best logits tie on every
    image (argmax: class 0); the graph scales class 1 by 1 + 1e-6, which flips every top-1 by float rounding.
    (The library's verify_onnx: a result folder rebuilds the float parameters from the checkpoint, and this
    model's edited bias is in none.)"""
    from mixq_onnx.onnx.verify import verify_onnx

    torch.set_num_threads(1)
    model = load_model("cifar_resnet20", random_init=True)
    with torch.no_grad():
        model.linear.weight[1] = model.linear.weight[0]
        model.linear.bias[:2] = 50.0
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), calib, progress=False)
    factor = np.ones(10)
    factor[1] += 1e-6
    g = _planted(export_qdq(q, tmp_path / "g.onnx"), tmp_path / "tied.onnx", factor)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    rep = verify_onnx(g, q, x)
    assert rep.top1_agreement == 0.0 and rep.near_ties == 12 and rep.max_abs_diff < 1e-3, rep
    assert rep.failures(99.9) == []


def _tampered(src: Path, dst: Path, name: str, factor: float) -> Path:
    """The graph with element 0 of initializer `name` multiplied by `factor`."""
    m = onnx.load(str(src))
    t = next(t for t in m.graph.initializer if t.name == name)
    a = onnx.numpy_helper.to_array(t).copy()
    a.reshape(-1)[0] *= factor
    t.CopyFrom(onnx.numpy_helper.from_array(a, name))
    onnx.save(m, str(dst))
    return dst


def test_verify_fails_a_wrong_last_layer_or_activation_grid(world, tmp_path, run_cli):
    """verify passed (exit 0) a graph whose classifier rescale was 1.15x on one channel (nothing after the last
    quantizer was compared) and one whose 4-bit Clip was 8x too wide (teacher forcing fed onnxruntime's wrong
    codes back, and the same-input code mismatch was measured but no verdict)."""
    from mixq_onnx.quant import load_quantized_dir

    a44 = export_qdq(load_quantized_dir(world["q4"]), tmp_path / "a44.onnx")
    r = run_cli("verify", a44, "--quantized", world["q4"], "--data", world["npz"])
    assert r.code == 0, r.out + r.err
    last = _tampered(a44, tmp_path / "rescale.onnx", "linear.rescale", 1.15)
    r = run_cli("verify", last, "--quantized", world["q4"], "--data", world["npz"])
    assert r.code == 1 and "after the last quantizer" in r.out, r.out
    clip = _tampered(a44, tmp_path / "clip.onnx", "layer1.0.conv1.input.clip_hi", 8.0)
    r = run_cli("verify", clip, "--quantized", world["q4"], "--data", world["npz"])
    assert r.code == 1 and "the Q/DQ of layer1.0.conv1.input is not PyTorch's" in r.out, r.out


def _io_changed(src: Path, dst: Path, how: str) -> Path:
    m = onnx.load(str(src))
    g = m.graph
    if how == "output":  # logits sliced to 5
        out = g.output[0].name
        for n in g.node:
            for i, o in enumerate(n.output):
                if o == out:
                    n.output[i] = out + "_full"
        g.initializer.extend([onnx.numpy_helper.from_array(np.array([v], np.int64), k)
                              for k, v in (("s0", 0), ("s1", 5), ("ax", 1))])
        g.node.append(onnx.helper.make_node("Slice", [out + "_full", "s0", "s1", "ax"], [out], name="cut"))
        g.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    elif how == "input":  # declared 64x64
        for d, v in zip(g.input[0].type.tensor_type.shape.dim[2:], (64, 64)):
            d.dim_value = v
        del g.value_info[:]
    else:  # a second input
        g.input.insert(0, onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    onnx.save(m, str(dst))
    return dst


@pytest.mark.parametrize("how,needle", [("output", "its output is"), ("input", "its input is"),
                                        ("inputs", "2 inputs")])
def test_verify_of_a_graph_with_other_inputs_or_outputs_is_bad_input(world, tmp_path, run_cli, how, needle):
    """A graph whose inputs or outputs are not the model's crashed verify with a traceback (exit 1, which reads
    as a verdict)."""
    g = _io_changed(world["onnx8"], tmp_path / f"{how}.onnx", how)
    msg = clean_error(run_cli, [world["q8"], tmp_path], "verify", g, "--quantized", world["q8"], "--data", world["npz"])
    assert needle in msg and "does not match the quantized model" in msg


def test_check_an_empty_file_is_bad_input_and_a_float_graph_fails(tmp_path, run_cli):
    """An empty file parsed as an empty ModelProto (a verdict, exit 1); a graph with no Q/DQ at all counted as
    weight-only, so every unquantized layer was only a warning and check said ok."""
    from mixq_onnx.onnx import export_fp

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "not ONNX" in clean_error(run_cli, [tmp_path], "check", empty)
    fp = export_fp(load_model("cifar_resnet20", random_init=True), tmp_path / "fp.onnx")
    r = run_cli("check", fp)
    assert r.code == 1 and "FAILED" in r.out + r.err, (r.code, r.out[-300:], r.err[-300:])


class _Attn(torch.nn.Module):
    """conv stem -> tokens (flatten, transpose) -> x + proj(norm(x)) -> mean -> head: the residual's identity is
    the stem's output behind data movement, which `quantize` counts as a layer output."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.norm = torch.nn.LayerNorm(16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.proj(self.norm(t))
        return self.head(t.mean(1))


def test_check_agrees_with_quantize_on_a_layer_output_behind_a_transpose(tmp_path, run_cli):
    """check's residual-identity rule did not look through reshapes and transposes, where quantize's placement
    does: it failed the graph quantize and export made by design."""
    from mixq_onnx.models.preprocessing import ATTR, Preprocessing

    torch.manual_seed(0)
    model = _Attn().eval()
    setattr(model, ATTR, Preprocessing(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quantize(model, QuantConfig(wbits=8, abits=8, method="rtn"), calib, progress=False)
    g = export_qdq(q, tmp_path / "attn.onnx")
    r = run_cli("check", g)
    assert r.code == 0, r.out + r.err
