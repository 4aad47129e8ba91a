"""Hardening found by a review of every command with hostile input (2026-11-30): output paths that could not be
written or would overwrite an input, preprocessing values that crashed later or gave garbage, received files
(quant.json, PLAN.json, cache manifests) with damaged fields, graphs onnxruntime refuses, and NaN options.

Every case asserts exit code 2, one `error:` line and no traceback, and that the command created or changed
nothing (`snapshot`)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import clean_error, one_line_error, random_r20_rtn

from mixq_onnx.calib import cache as C
from mixq_onnx.errors import MixqError
from mixq_onnx.models import load_model
from mixq_onnx.models.preprocessing import Preprocessing
from mixq_onnx.onnx import export_qdq
from mixq_onnx.quant import save_quantized
from mixq_onnx.trt.builder import PLAN_FORMAT, meta_path_for


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A W8A8 result folder of a random-weight ResNet-20, its graph, and a tiny labelled npz."""
    d = tmp_path_factory.mktemp("outs")
    _, q = random_r20_rtn(8, bits=8)
    out = {"q8": save_quantized(q, d / "r20-w8a8"), "onnx8": export_qdq(q, d / "r20-w8a8.onnx")}
    rng = np.random.default_rng(0)
    out["npz"] = d / "data.npz"
    np.savez(out["npz"], x=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), y=np.arange(12) % 10)
    return out


# ----------------------------------------------------------------------------- output paths
def test_build_refuses_to_write_the_plan_over_its_graph_or_as_an_onnx_file(world, tmp_path, run_cli):
    graph = tmp_path / "same.onnx"
    shutil.copy(world["onnx8"], graph)
    msg = clean_error(run_cli, [tmp_path], "build", graph, "--out", graph)
    assert "would overwrite the input" in msg
    assert onnx.load(str(graph)).graph.node  # still the graph
    msg = clean_error(run_cli, [tmp_path], "build", graph, "--out", tmp_path / "other.onnx")
    assert "ends in .onnx" in msg


def test_build_and_export_refuse_an_output_under_a_file_or_an_empty_one(world, tmp_path, run_cli):
    afile = tmp_path / "afile"
    afile.write_text("user data")
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "export", "--quantized", world["q8"], "--out", afile / "x.onnx")
    assert "is a file, not a folder" in msg
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "export", "--quantized", world["q8"], "--out", "")
    assert "empty" in msg
    msg = clean_error(run_cli, [tmp_path], "build", world["onnx8"], "--out", afile / "x.plan")
    assert "is a file, not a folder" in msg
    assert afile.read_text() == "user data"


def test_export_refuses_to_write_inside_its_result_folder(world, tmp_path, run_cli):
    q = tmp_path / "q8"
    shutil.copytree(world["q8"], q)
    msg = clean_error(run_cli, [tmp_path], "export", "--quantized", q, "--out", q / "graph.onnx")
    assert "would overwrite the input" in msg
    msg = clean_error(run_cli, [tmp_path], "export", "--quantized", q, "--out", q / "weights.safetensors")
    assert "weights.safetensors" in msg


def test_a_failed_build_leaves_no_folders_behind(world, tmp_path, run_cli):
    pytest.importorskip("tensorrt_rtx")
    m = onnx.load(str(world["onnx8"]))
    del m.graph.node[3]  # a dangling input: TensorRT-RTX's parser refuses the graph
    broken = tmp_path / "broken.onnx"
    onnx.save(m, str(broken))
    clean_error(run_cli, [tmp_path], "build", broken, "--out", tmp_path / "new" / "sub" / "x.plan")
    assert not (tmp_path / "new").exists()


def test_write_errors_at_write_time_are_one_line(tmp_path):
    from mixq_onnx.utils import atomic_write_bytes, make_parent

    ro = tmp_path / "afile"
    ro.write_text("x")
    with pytest.raises(MixqError, match="cannot write"):
        atomic_write_bytes(ro / "y.bin", b"data")
    with pytest.raises(MixqError, match="cannot write"):
        make_parent(ro / "sub" / "y.bin")


# ----------------------------------------------------------------------------- preprocessing values
@pytest.mark.parametrize("flag,value,words", [("--input-size", "0", "input size"),
                                              ("--input-size", "-5", "input size"),
                                              ("--input-size", "1,2,3,4", "input size"),
                                              ("--input-size", "100000", "input size"),
                                              ("--std", "0,0,0", "must be positive"),
                                              ("--mean", "nan,nan,nan", "finite"),
                                              ("--mean", "0.5,0.5,0.5,0.5,0.5", "one per input channel")])
def test_bad_preprocessing_flags_are_refused(world, tmp_path, run_cli, flag, value, words):
    msg = clean_error(run_cli, [tmp_path], "eval", "--model", "cifar_resnet20", "--random-weights", "--data",
                 world["npz"], flag, value)
    assert words in msg


@pytest.mark.parametrize("field,value", [("input_size", [3, -4, 32]), ("mean", [0.5] * 5),
                                         ("input_size", [3, 100000, 100000]), ("std", [0, 0, 0])])
def test_a_received_folder_with_damaged_preprocessing_is_refused(world, tmp_path, run_cli, field, value):
    q = tmp_path / "q8"
    shutil.copytree(world["q8"], q)
    meta = json.loads((q / "quant.json").read_text())
    meta["model"]["preprocessing"][field] = value
    (q / "quant.json").write_text(json.dumps(meta))
    for cmd in (("eval", "--quantized", q, "--data", world["npz"]),
                ("export", "--quantized", q, "--out", tmp_path / "g.onnx")):
        msg = clean_error(run_cli, [tmp_path], *cmd)
        assert "preprocessing" in msg


def test_preprocessing_itself_checks_its_values():
    Preprocessing(input_size=(3, 32, 32))  # the defaults hold
    for kw in ({"input_size": (3, 0, 32)}, {"input_size": (3, 32, 32), "std": (1.0, 0.0, 1.0)},
               {"input_size": (3, 32, 32), "mean": (float("inf"), 0.0, 0.0)}):
        with pytest.raises(MixqError):
            Preprocessing(**kw)


# ----------------------------------------------------------------------------- received plan metadata
def _fake_plan(tmp_path: Path, graph: Path, **change) -> Path:
    plan = tmp_path / "p.plan"
    plan.write_bytes(b"not an engine")
    meta = {"format": PLAN_FORMAT, "plan_key": "tensorrt-rtx-1.0-portable", "backend": "tensorrt-rtx",
            "backend_version": "1.0", "target": "portable", "onnx": {"path": str(graph), "sha256": None},
            "inputs": [{"name": "input", "min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}],
            "options": {"batch": [1, 8, 32], "workspace_mib": 1024, "compute_capabilities": []},
            "layers": [{"name": "conv", "layer_type": "conv"}],
            "plan_sha256": hashlib.sha256(b"not an engine").hexdigest()}
    meta.update(change)
    meta_path_for(plan).write_text(json.dumps(meta))
    return plan


@pytest.mark.parametrize("change", [{"onnx": None}, {"inputs": [{"name": "input"}]}, {"layers": [{"x": 1}]},
                                    {"layers": [{"name": "c", "layer_type": "conv", "inputs": [{"bogus": 1}]}]},
                                    {"backend": 7}, {"plan_sha256": None},
                                    {"targets": "sm80,sm89"}])  # a string made `run`'s target test a substring one
def test_a_damaged_plan_json_is_a_rebuild_error(world, tmp_path, run_cli, change):
    plan = _fake_plan(tmp_path, world["onnx8"], **change)
    msg = clean_error(run_cli, [tmp_path], "inspect", plan)
    assert "is damaged" in msg and "rebuild" in msg
    field = list(change)[0]
    assert ("layer record" if field == "layers" else field) in msg  # the field that is wrong, not another one


def test_a_plan_json_that_is_not_an_object_is_a_rebuild_error(world, tmp_path, run_cli):
    plan = _fake_plan(tmp_path, world["onnx8"])
    meta_path_for(plan).write_text("[1, 2]")
    for cmd in (("inspect", plan), ("run", plan), ("bench", plan)):
        assert "rebuild" in clean_error(run_cli, [tmp_path], *cmd)


def test_run_refuses_an_input_that_is_not_an_array(world, tmp_path, run_cli):
    plan = _fake_plan(tmp_path, world["onnx8"])
    (tmp_path / "afile").write_text("text")
    for bad in (tmp_path / "missing.npy", tmp_path / "afile"):
        msg = clean_error(run_cli, [tmp_path], "run", plan, "--input", bad)
        assert "--input" in msg and "not a readable .npy array" in msg


# ----------------------------------------------------------------------------- graphs onnxruntime refuses
def test_verify_of_a_graph_onnxruntime_cannot_load_is_bad_input_not_a_verdict(world, tmp_path, run_cli):
    m = onnx.load(str(world["onnx8"]))
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 99
    g = tmp_path / "opset99.onnx"
    onnx.save(m, str(g))
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "verify", g, "--quantized", world["q8"], "--data", world["npz"])
    assert "onnxruntime cannot load" in msg
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "verify", world["onnx8"], "--quantized", world["q8"], "--data",
                 world["npz"], "--min-agreement", "nan")
    assert "finite" in msg


# ----------------------------------------------------------------------------- caches and NaN options
def test_cache_ls_answers_at_once_on_a_recipe_asking_for_too_many_images(tmp_path, run_cli):
    root = tmp_path / "root"
    (root / "abcd").mkdir(parents=True)
    (root / "abcd" / "recipe.json").write_text(json.dumps({"num": 10**18, "shard_size": 1}))
    r = run_cli("cache", "ls", "--cache-root", root)
    assert r.code == 0 and "abcd" in r.out
    msg = one_line_error(run_cli("cache", "info", "abcd", "--cache-root", root))
    assert f"at most {C.MAX_NUM}" in msg


def test_a_cache_whose_recipe_was_edited_is_refused_by_its_readers(tmp_path, run_cli):
    r = run_cli("calib", "--generator", "noise", "--num", "4", "--size", "8", "--cache-root", tmp_path, "-q")
    assert r.code == 0, r.err
    cache = Path(r.last_line)
    man = json.loads((cache / C.MANIFEST).read_text())
    man["recipe"]["seed"] = 12345
    (cache / C.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(MixqError, match="does not hash to the recorded hash"):
        C.load_images(cache)
    r = run_cli("cache", "verify", cache)
    assert r.code == 1 and "does not hash to the recorded hash" in (r.out + r.err)


def test_a_shard_rewritten_as_float_is_refused_even_with_a_matching_sha256(tmp_path, run_cli):
    """Someone re-hashed the manifest after rewriting a shard as float32: the bytes match, the content is not
    what calib writes."""
    from mixq_onnx.utils import sha256_bytes

    r = run_cli("calib", "--generator", "noise", "--num", "4", "--size", "8", "--cache-root", tmp_path, "-q")
    cache = Path(r.last_line)
    man = json.loads((cache / C.MANIFEST).read_text())
    shard = cache / man["shards"][0]["file"]
    images, records = C.decode_shard(shard.read_bytes())
    from safetensors.torch import save

    data = save({"images": images.float()}, metadata={"records": json.dumps(records)})
    shard.write_bytes(data)
    man["shards"][0]["sha256"] = sha256_bytes(data)
    (cache / C.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(MixqError, match="uint8"):
        C.load_images(cache)
    r = run_cli("cache", "verify", cache)
    assert r.code == 1 and "uint8" in (r.out + r.err)


@pytest.mark.parametrize("args", [("--generator", "inversion", "--lr", "nan"),
                                  ("--generator", "noise", "--alpha", "inf"),
                                  ("--generator", "noise", "--guidance", "nan")])
def test_nan_and_inf_options_are_refused(tmp_path, run_cli, args):
    msg = clean_error(run_cli, [tmp_path], "calib", *args, "--model", "cifar_resnet20", "--random-weights", "--num", "4",
                 "--size", "32", "--cache-root", tmp_path / "c")
    assert "not a finite number" in msg


def test_training_configs_refuse_nan_weights():
    from mixq_onnx.training import TrainConfig

    for kw in ({"kd_weight": float("nan")}, {"lr": float("inf")}, {"rho": float("nan")}):
        with pytest.raises(MixqError):
            TrainConfig(**kw).validate()


def test_float_options_show_no_empty_range_in_help(run_cli):
    for cmd in ("calib", "robustify", "qat"):
        r = run_cli(cmd, "--help")
        assert r.code == 0 and "None" not in r.out.replace("[default: None]", ""), cmd


def test_qat_wbits_zero_is_refused_not_read_as_the_default(tmp_path, run_cli):
    msg = clean_error(run_cli, [tmp_path], "qat", "--model", "cifar_resnet20", "--random-weights", "--data", tmp_path,
                      "--method", "lsq", "--wbits", "0", "--out", tmp_path / "o")
    assert "--wbits must be between 2 and 8, got 0" in msg


def test_robustify_refuses_to_overwrite_its_checkpoint_and_makes_a_new_folder(world, tmp_path, run_cli):
    from safetensors.torch import save_file

    ck = tmp_path / "ck.safetensors"
    save_file({k: v.contiguous() for k, v in load_model("cifar_resnet20", random_init=True).state_dict().items()},
              str(ck))
    msg = clean_error(run_cli, [tmp_path], "robustify", "--model", "cifar_resnet20", "--checkpoint", ck, "--data",
                      world["npz"], "--epochs", "1", "--out", ck)
    assert "would overwrite the input" in msg
    out = tmp_path / "new" / "r.safetensors"
    r = run_cli("robustify", "--model", "cifar_resnet20", "--checkpoint", ck, "--data", world["npz"], "--epochs", "1",
                "--batch-size", "8", "--out", out, "-q", "--threads", "1")
    assert r.code == 0, r.err
    assert out.is_file() and (tmp_path / "new" / "r.safetensors.json").is_file()


def test_quantize_refuses_an_unwritable_out_before_the_work(tmp_path, run_cli):
    (tmp_path / "notes.txt").write_text("user")
    (tmp_path / "dl").symlink_to(tmp_path / "gone")
    for out, words in ((tmp_path / "notes.txt" / "x", "is a file, not a folder"), (tmp_path / "dl", "dangling")):
        msg = clean_error(run_cli, [tmp_path], "quantize", "--model", "cifar_resnet20", "--random-weights", "--calib",
                          tmp_path / "no-cache", "--method", "rtn", "--out", out)
        assert words in msg


def test_calib_folders_made_by_another_process_are_not_ours(tmp_path, monkeypatch):
    """Two calib runs creating the same missing cache root: the one that loses the mkdir race must wait for the
    lock, not fail; and a failing one removes only folders it made that are still empty."""
    from mixq_onnx.calib import run as R

    root = tmp_path / "a" / "b"
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *a, **k):  # the other process made this folder between the exists() and the mkdir()
        if self == root.resolve() and not self.exists():
            real_mkdir(self)
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    created = R._check_writable(root)
    assert root.is_dir() and root.resolve() not in created
    (root / "other-cache").mkdir()
    R._remove_empty([tmp_path / "a", root.resolve()])
    assert (root / "other-cache").is_dir()


def test_export_build_and_robustify_replace_only_what_they_wrote(world, tmp_path, run_cli):
    """`export --out notes.txt` replaced the user's file with a graph, and so did build and robustify (review,
    2026-11-30): a command replaces a file it wrote, and anything else only with --overwrite."""
    from safetensors.torch import save_file

    mine = tmp_path / "notes.onnx"
    mine.write_text("the user's notes")
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "export", "--quantized", world["q8"], "--out", mine)
    assert "exists and is not an ONNX graph mixq-onnx wrote: pass --overwrite" in msg
    assert mine.read_text() == "the user's notes"
    graph = tmp_path / "g.onnx"
    for _ in range(2):  # its own graph: replaced without a flag
        r = run_cli("export", "--quantized", world["q8"], "--out", graph)
        assert r.code == 0, r.err
    r = run_cli("export", "--quantized", world["q8"], "--out", mine, "--overwrite")
    assert r.code == 0 and onnx.load(str(mine)).producer_name == "mixq-onnx"
    plan = tmp_path / "user.plan"
    plan.write_bytes(b"someone else's engine")
    msg = clean_error(run_cli, [tmp_path], "build", graph, "--out", plan)
    assert "exists and is not an engine plan mixq-onnx wrote" in msg and plan.read_bytes() == b"someone else's engine"
    own = tmp_path / "own.plan"
    for _ in range(2):
        r = run_cli("build", graph, "--out", own, "--batch", "1:2:4")
        assert r.code == 0, r.err
    out = tmp_path / "r.safetensors"
    save_file({"x": torch.zeros(2)}, str(out))  # a checkpoint robustify did not write
    msg = clean_error(run_cli, [tmp_path], "robustify", "--model", "cifar_resnet20", "--random-weights", "--data",
                      world["npz"], "--epochs", "1", "--out", out)
    assert "exists and is not a checkpoint mixq-onnx wrote" in msg
    for extra in (["--overwrite"], []):  # then it is robustify's own: replaced without the flag
        r = run_cli("robustify", "--model", "cifar_resnet20", "--random-weights", "--data", world["npz"], "--epochs",
                    "1", "--batch-size", "8", "--out", out, "-q", "--threads", "1", *extra)
        assert r.code == 0, r.err


def test_export_refuses_options_that_do_not_apply(world, tmp_path, run_cli):
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "export", "--quantized", world["q8"], "--block-size", "64",
                      "--out", tmp_path / "x.onnx")
    assert "--block-size applies to --int4-weight-only --model" in msg
    msg = clean_error(run_cli, [tmp_path, world["q8"]], "export", "--quantized", world["q8"], "--fp", "--layout",
                      "dq-scales", "--out", tmp_path / "x.onnx")
    assert "--layout applies to the QDQ graph" in msg


def test_a_file_of_the_wrong_kind_is_named_as_such(world, tmp_path, run_cli):
    """Each used to get another stage's message (review, 2026-11-30): "PLAN.json is missing … rebuild" for a
    graph, a protobuf DecodeError for a plan, "not found" for a folder, "no images" for a cache."""
    plan = tmp_path / "m.plan"
    assert run_cli("build", world["onnx8"], "--out", plan, "--batch", "1:2:4").code == 0
    for args, words in (
            (["eval", "--engine", world["onnx8"], "--data", world["npz"]], "is an ONNX graph, not a plan"),
            (["inspect", f"{plan}.json"], "is a plan's PLAN.json: give the plan itself"),
            (["check", plan], "is an engine plan, not an ONNX graph"),
            (["check", world["q8"]], "is a folder, not an ONNX graph"),
            (["export", "--quantized", tmp_path / "nowhere", "--out", tmp_path / "x.onnx"], "does not exist"),
            (["eval", "--model", "cifar_resnet20", "--checkpoint", world["q8"] / "weights.safetensors", "--data",
              world["npz"]], f"pass --quantized {world['q8']}"),
            (["robustify", "--model", "cifar_resnet20", "--random-weights", "--data", world["npz"], "--rho", "-1",
              "--out", tmp_path / "r.safetensors"], "--rho must be positive, got -1")):
        msg = clean_error(run_cli, [tmp_path, world["q8"]], *args)
        assert words in msg, (args, msg)
    r = run_cli("calib", "--generator", "noise", "--num", "4", "--size", "32", "--cache-root", tmp_path / "c", "-q")
    msg = clean_error(run_cli, [tmp_path / "c"], "eval", "--model", "cifar_resnet20", "--random-weights", "--data",
                      r.last_line)
    assert "is a calibration cache: its images have no labels" in msg
