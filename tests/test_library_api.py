"""The library used without the CLI, as a review found users tripping on it (2026-11-30): inputs of the wrong
kind are one-line MixqErrors (never chance-level results or a raw AttributeError), and the library's defaults
are the CLI's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixq_onnx.calib import CalibConfig, load_calibration, make_calibration_cache
from mixq_onnx.errors import MixqError
from mixq_onnx.models import ModelOptions, get_preprocessing, load_model
from mixq_onnx.onnx import export_qdq
from mixq_onnx.quant import QuantConfig, evaluate, quantize, save_quantized
from mixq_onnx.sweep import SweepConfig, sweep_models


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("lib")
    model = load_model("cifar_resnet20", random_init=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    y = np.arange(16) % 10
    cache = make_calibration_cache(CalibConfig(generator="noise", num=8, size=32), d / "cache", model=model,
                                   progress=False, log=lambda _m: None)
    return {"dir": d, "model": model, "x": x, "y": y, "cache": cache}


def test_evaluate_takes_pixels_and_refuses_preprocessed_floats(world):
    model, x, y = world["model"], world["x"], world["y"]
    as_tensor = evaluate(model, torch.from_numpy(x), torch.from_numpy(y))
    as_numpy = evaluate(model, x, y)  # np.load's arrays work as they are
    assert as_numpy.top1 == as_tensor.top1
    floats = get_preprocessing(model)(torch.from_numpy(x))
    with pytest.raises(MixqError, match="must be uint8 pixels"):
        evaluate(model, floats, torch.from_numpy(y))


def test_quantize_takes_a_cache_path_and_refuses_pixels(world):
    model, cache = world["model"], world["cache"]
    cfg = QuantConfig(wbits=8, abits=8, method="rtn", num_samples=8)
    by_path = quantize(model, cfg, str(cache), progress=False)
    by_set = quantize(model, cfg, load_calibration(cache, model), progress=False)
    assert by_path.mixq_report.get("calibration") == by_set.mixq_report.get("calibration")
    for a, b in zip(by_path.state_dict().values(), by_set.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(MixqError, match="preprocessed float inputs"):
        quantize(model, cfg, torch.from_numpy(world["x"]), progress=False)
    with pytest.raises(MixqError, match="got ndarray"):
        quantize(model, cfg, world["x"], progress=False)


def test_a_float_model_is_refused_by_the_quantized_model_writers(world):
    d = world["dir"]
    with pytest.raises(MixqError, match="no quantizers"):
        export_qdq(world["model"], d / "float.onnx")
    with pytest.raises(MixqError, match="no quantizers"):
        save_quantized(world["model"], d / "float-folder")
    assert not (d / "float.onnx").exists() and not (d / "float-folder").exists()


def test_export_refuses_output_names_of_other_kinds(world):
    q = quantize(world["model"], QuantConfig(wbits=8, abits=8, method="rtn", num_samples=8), str(world["cache"]),
                 progress=False)
    folder = save_quantized(q, world["dir"] / "q")
    before = (folder / "quant.json").read_bytes()
    with pytest.raises(MixqError, match="ends in .json"):
        export_qdq(q, folder / "quant.json")
    assert (folder / "quant.json").read_bytes() == before


def test_library_defaults_are_the_clis():
    from mixq_onnx.cli import cli

    calib_classes = next(p for p in cli.commands["calib"].params if p.name == "classes").default
    assert CalibConfig().classes == calib_classes == "auto"
    assert SweepConfig(methods=("RTN", "QDrop")).validate().methods == ("rtn", "qdrop")


#: library field -> (CLI option name, how the option's default maps onto the field)
_RENAMED = {("robustify", "symreg"): ("beta", None), ("robustify", "pairing"): ("symreg_pairing", None),
            ("robustify", "learn_alpha"): ("fixed_alpha", lambda d: not d)}


def test_every_cli_default_is_the_librarys():
    """Each config field a command sets from an option has the option's default: a library caller and a CLI
    user get the same run (review, 2026-11-30: only calib's --classes was compared; `qat --help` could say
    [default: 10] epochs while QATConfig trained 3)."""
    from dataclasses import fields

    from mixq_onnx.cli import cli
    from mixq_onnx.qat import QATConfig
    from mixq_onnx.robust import RobustConfig

    def norm(v, like=None):
        if type(v).__name__ == "Sentinel":  # click's UNSET default of a flag: off
            return False
        if isinstance(v, str) and isinstance(like, tuple):  # a comma list option (sweep --bits/--method/--seeds)
            v = tuple(x.strip() for x in v.split(","))
        if isinstance(v, (list, tuple)):
            return tuple(int(x) if isinstance(x, str) and x.isdigit() else x for x in v)
        return v

    checked = 0
    for cmd, cfg in (("quantize", QuantConfig()), ("qat", QATConfig()), ("robustify", RobustConfig()),
                     ("calib", CalibConfig()), ("sweep", SweepConfig())):
        params = {p.name: p for p in cli.commands[cmd].params}
        for f in fields(cfg):
            name, conv = _RENAMED.get((cmd, f.name), (f.name, None))
            p = params.get(name)
            if p is None or p.default is None or callable(p.default):
                continue  # no option, or the option's None means "the library's default"
            v = norm(getattr(cfg, f.name))
            d = norm(p.default, v)
            d = conv(d) if conv else d
            assert v == d or (v is None and d is False), (cmd, f.name, v, d)
            checked += 1
    assert checked >= 40, checked


def test_sweep_models_names_what_it_takes(world):
    with pytest.raises(MixqError, match="SweepModel.of"):
        sweep_models(world["model"])
    (m,) = sweep_models(ModelOptions("cifar_resnet20", random_init=True))
    assert m.label == "cifar_resnet20"


def test_a_result_folder_keeps_its_preprocessing_in_the_library(world, tmp_path):
    """A review (2026-11-30) found `evaluate_data(quantized=..., model=ModelOptions(...))` evaluating a folder
    made with mean 0.5 / std 0.25 under the zoo's ImageNet statistics (other top-1, other agreement, and an
    export recording the wrong normalisation), where the CLI used the recorded ones."""
    from mixq_onnx.quant.evaluate import evaluate_data
    from mixq_onnx.quant.io import load_result

    ck = tmp_path / "ck.pt"
    torch.save(world["model"].state_dict(), ck)
    made_with = load_model(ModelOptions("cifar_resnet20", str(ck), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    q = quantize(made_with, QuantConfig(wbits=8, abits=8, method="rtn", num_samples=8), str(world["cache"]),
                 progress=False)
    save_quantized(q, tmp_path / "q")
    fp, _ = load_result(tmp_path / "q", ModelOptions("cifar_resnet20", str(ck)))  # unset: the recorded ones
    assert get_preprocessing(fp) == get_preprocessing(made_with) != get_preprocessing(world["model"])
    np.savez(tmp_path / "d.npz", x=world["x"], y=world["y"])
    recorded = evaluate_data(tmp_path / "d.npz", quantized=tmp_path / "q")
    given = evaluate_data(tmp_path / "d.npz", quantized=tmp_path / "q", model=ModelOptions("cifar_resnet20", str(ck)))
    assert (given.top1, given.fp_top1, given.agreement) == (recorded.top1, recorded.fp_top1, recorded.agreement)
    # another preprocessing, asked for or carried by a loaded model, is refused, not silently used
    for other in (ModelOptions("cifar_resnet20", str(ck), mean=(0.4, 0.4, 0.4)),
                  load_model(ModelOptions("cifar_resnet20", str(ck)))):
        with pytest.raises(MixqError, match="does not match the model's preprocessing: it was made with mean"):
            load_result(tmp_path / "q", other)


def test_calib_library_checks_what_the_cli_checks_before_touching_the_disk(tmp_path):
    """`seed=-1` used to fail after the cache folder existed (an 'incomplete' cache left behind), and a
    misspelt option ('iter') ran silently with the default (review, 2026-11-30)."""
    root = tmp_path / "root"
    with pytest.raises(MixqError, match="--seed must be at least 0, got -1"):
        make_calibration_cache(CalibConfig(generator="noise", num=2, size=8, seed=-1), root, progress=False)
    with pytest.raises(MixqError, match=r"--iter do\(es\) not apply to --generator inversion \(its own options: --iters, --lr"):
        make_calibration_cache(CalibConfig(generator="inversion", num=2, model="cifar_resnet20", random_weights=True,
                                           options={"iter": 1}), root, progress=False)
    assert not root.exists()


def test_cache_functions_take_paths_strings_and_hash_prefixes(world, tmp_path):
    from mixq_onnx.calib import info, list_caches, remove, verify

    cache = world["cache"]
    root, prefix = str(cache.parent), cache.name[:6]
    assert info(prefix, root).path == info(str(cache)).path == cache
    assert verify(prefix, root).ok and verify(str(cache)).ok
    assert [c.path for c in list_caches(root)] == [cache]
    with pytest.raises(MixqError, match="no calibration cache"):
        verify("0" * 16, root)
    # one bad reference among several removes nothing
    other = make_calibration_cache(CalibConfig(generator="noise", num=2, size=8, seed=5), tmp_path / "r",
                                   progress=False, log=lambda _m: None)
    with pytest.raises(MixqError, match="no calibration cache"):
        remove([other.name[:6], "f" * 16], tmp_path / "r")
    assert other.is_dir()
    assert remove([other.name[:6]], tmp_path / "r") == [other] and not other.exists()


def test_quantize_checks_a_calibration_set_as_it_checks_a_cache_path(world, tmp_path):
    """An 8x8 cache for a 64-pixel model was refused through a path and taken through a CalibrationSet; a set
    made for another model's preprocessing was taken too (review, 2026-11-30)."""
    from mixq_onnx.calib import CalibrationSet

    small = make_calibration_cache(CalibConfig(generator="noise", num=4, size=8), tmp_path / "c", progress=False,
                                   log=lambda _m: None)
    big = load_model("cifar_resnet20", random_init=True, input_size=64)
    cfg = QuantConfig(wbits=8, abits=8, method="rtn")
    for calib in (str(small), CalibrationSet(small, big)):
        with pytest.raises(MixqError, match="more than 4x upscaling"):
            quantize(big, cfg, calib, progress=False)
    with pytest.raises(MixqError, match="preprocesses for another model"):
        quantize(world["model"], cfg, CalibrationSet(world["cache"], big), progress=False)
    assert quantize(world["model"], cfg, CalibrationSet(world["cache"], world["model"]), progress=False) is not None


def test_library_configs_refuse_what_the_cli_refuses(world):
    from mixq_onnx.qat import QATConfig
    from mixq_onnx.robust import RobustConfig
    from mixq_onnx.training import load_training_data

    with pytest.raises(MixqError, match="nipq learns them"):
        QATConfig(method="nipq", target_bits=4, wbits=2).validate()
    assert (QATConfig(method="lsq").validate().wbits, QATConfig(method="lsq", abits=3).validate().abits) == (4, 3)
    for cfg in (QATConfig(method="lsq", loss="kl"), RobustConfig(loss="kl")):
        with pytest.raises(MixqError, match="--loss must be one of auto, ce, kd"):
            cfg.validate()
    # 0 means "as the rest" in every config, as --first-last-bits 0 does
    assert QuantConfig(first_last_bits=0).validate().first_last_bits is None
    assert QATConfig(method="lsq", first_last_bits=0).validate().first_last_bits is None
    assert SweepConfig(first_last_bits=0).validate().first_last_bits is None
    with pytest.raises(MixqError, match="seeds must be integers"):
        SweepConfig(seeds=("0", "x")).validate()
    # the loss is the library's: ce on a cache is refused by qat.train itself, before any training
    from mixq_onnx.qat import train

    data = load_training_data(str(world["cache"]), world["model"])
    with pytest.raises(MixqError, match="--loss ce needs labels"):
        train(world["model"], QATConfig(method="lsq", loss="ce", epochs=1), data, progress=False)


def test_save_checkpoint_never_overwrites_the_checkpoint_the_model_came_from(world, tmp_path):
    from safetensors.torch import save_file

    from mixq_onnx.robust import save_checkpoint

    ck = tmp_path / "ck.safetensors"
    save_file({k: v.contiguous() for k, v in world["model"].state_dict().items()}, ck)
    before = ck.read_bytes()
    model = load_model(ModelOptions("cifar_resnet20", str(ck)))
    with pytest.raises(MixqError, match="would overwrite the input"):
        save_checkpoint(model, ck, {})
    assert ck.read_bytes() == before
    assert save_checkpoint(model, tmp_path / "new.safetensors", {}).is_file()


def test_an_inversion_cache_says_which_network_it_came_from(tmp_path):
    """quantizing ResNet-56 on ResNet-20's inversion cache ran without a word (review, 2026-11-30)."""
    from mixq_onnx.calib import CalibrationSet

    torch.manual_seed(0)
    r20 = load_model("cifar_resnet20", random_init=True)
    cache = make_calibration_cache(CalibConfig(generator="inversion", num=4, classes="cifar10",
                                               options={"iters": 1}), tmp_path, model=r20, progress=False,
                                   log=lambda _m: None)
    assert CalibrationSet(cache, r20).made_from(r20) is None
    other = load_model("cifar_resnet32", random_init=True)
    note = CalibrationSet(cache, other).made_from(other)
    assert note is not None and "BN inversion of cifar_resnet20" in note
