"""Bad input: one-line error, exit code 2, and no cache directory left behind."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixq_onnx.models import load_model


def _assert_clean_failure(res, root: Path, needle: str) -> None:
    assert res.code == 2, (res.code, res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1, res.err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not root.exists() or not any(root.iterdir()), list(root.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--generator", "gan"], "'--generator'"),
    (["--generator", "noise", "--prompts", "triple"], "'--prompts'"),
    (["--generator", "diffusion", "--classes", "cifar10", "--k", "1"], "--k must be at least 2"),
    (["--generator", "diffusion", "--classes", "cifar10", "--k", "11"], "exceeds the number of classes (10)"),
    (["--generator", "inversion"], "needs --model"),
    (["--generator", "noise", "--num", "0"], "--num must be at least 1"),
    (["--generator", "real"], "needs --source"),
    (["--generator", "noise", "--filter", "energy", "--keep", "3", "--num", "2"], "--keep"),
    # --alpha only sets mixup-embed's Dirichlet weights: elsewhere it would change the cache's hash alone
    (["--generator", "inversion", "--model", "cifar_resnet20", "--random-weights", "--alpha", "0.2"],
     "--prompts mixup does not draw any"),
    (["--generator", "diffusion", "--classes", "cifar10", "--prompts", "single", "--alpha", "0.2"],
     "--prompts single does not draw any"),
    # review, 2026-11-30: a traceback after the cache folder existed, or an option only the hash read
    (["--generator", "diffusion", "--classes", "cifar10", "--template", "a photo of a {} and a {} {x}"],
     "does not format with 2 class names"),
    (["--generator", "diffusion", "--classes", "cifar10", "--prompts", "single", "--template", "a {} photo"],
     "needs a '{cls}' slot"),
    (["--generator", "diffusion", "--classes", "cifar10", "--prompts", "single", "--template", "a {adj} {cls}"],
     "does not format with '{adjective}' and '{cls}'"),
    (["--generator", "diffusion", "--classes", "cifar10", "--prompts", "mixup-embed", "--template", "zzz"],
     "writes no templated prompt"),
    (["--generator", "diffusion", "--classes", "cifar10", "--prompts", "single", "--k", "5"], "does not mix"),
    (["--generator", "diffusion", "--classes", "cifar10", "--gloss"], "the cifar10 classes have none"),
    (["--generator", "inversion", "--model", "cifar_resnet20", "--random-weights", "--template", "a {} and a {}"],
     "reads only its classes"),
])
def test_bad_options(tmp_path, run_cli, args, needle):
    root = tmp_path / "cache"
    _assert_clean_failure(run_cli("calib", *args, "--cache-root", root, "-q"), root, needle)


def test_a_filter_the_model_cannot_serve_is_refused_before_any_candidate(tmp_path, run_cli):
    """`--filter bn` on a model without BatchNorm failed after every candidate was generated, and left the
    candidates behind (review, 2026-11-30)."""
    net = tmp_path / "nobn.py"
    net.write_text("import torch.nn as nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), "
                   "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n")
    root = tmp_path / "cache"
    res = run_cli("calib", "--generator", "noise", "--num", "4", "--size", "16", "--filter", "bn", "--keep", "2",
                  "--model", f"{net}:make", "--random-weights", "--input-size", "16",
                  "--cache-root", root, "-q")
    _assert_clean_failure(res, root, "filter 'bn' needs a model with BatchNorm2d layers")


def test_noise_with_one_mean_and_std_value_and_a_grey_model(tmp_path, run_cli):
    """One --mean/--std value was a RuntimeError in the noise generator; a 1-channel model met RGB images with
    a RuntimeError in quantize (review, 2026-11-30): grey models now read the luma of RGB images."""
    root = tmp_path / "cache"
    r = run_cli("calib", "--generator", "noise", "--num", "4", "--size", "16", "--model", "cifar_resnet20",
                "--random-weights", "--mean", "0.5", "--std", "0.25", "--cache-root", root, "-q")
    assert r.code == 0, r.err
    from mixq_onnx.calib import load_images

    assert load_images(Path(r.last_line))[0].shape == (4, 16, 16, 3)
    import torch.nn as nn

    from mixq_onnx.models.preprocessing import ATTR, Preprocessing
    from mixq_onnx.quant import QuantConfig, quantize

    grey = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 10)).eval()
    setattr(grey, ATTR, Preprocessing(input_size=(1, 16, 16), mean=(0.5,), std=(0.25,)))
    q = quantize(grey, QuantConfig(wbits=8, abits=8, method="rtn"), r.last_line, progress=False)
    assert q.mixq_calibration["images"] == 4 and q(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_imagenet_class_names_are_unique():
    """'crane' (bird and machine), 'Cardigan'/'cardigan' and 'maillot' twice made prompts name no one class."""
    from mixq_onnx.calib.classes import load_classes

    v = load_classes("imagenet")
    assert len({n.lower() for n in v.names}) == len(v) == 1000
    assert v.names[264] == "Cardigan Welsh corgi" and v.names[639] == "tank suit" and v.names[134].startswith("crane, ")
    # --gloss names a class once with its gloss, also where the repeated name already took it (review, 2026-11-30)
    for i in (134, 517, 264, 1):
        shown = v.display(i, with_gloss=True)
        assert shown.count(v.glosses[i]) == 1 and shown.startswith(v.names[i].split(",")[0]), shown


def test_the_recipe_records_the_template_the_prompts_use():
    """mixup-embed recorded the mixup template, which it never uses: its sub-prompts are 'a photo of a {}'."""
    from mixq_onnx.calib.classes import load_classes
    from mixq_onnx.calib.prompts import PromptConfig, plan_images

    vocab = load_classes("cifar10")
    for strategy in ("mixup", "mixup-embed", "single"):
        cfg = PromptConfig(strategy)
        tpl = cfg.to_dict()["template"]
        plan = plan_images(cfg, vocab, 0, 0, 1)[0]
        names = [vocab.display(c) for c in plan.classes]
        texts = plan.sub_prompts if strategy == "mixup-embed" else (plan.prompt,)
        if strategy == "single":
            assert plan.prompt.startswith("a photo of a ") and names[0] in plan.prompt
        else:
            want = tuple(tpl.format(n) for n in names) if strategy == "mixup-embed" else (tpl.format(*names),)
            assert texts == want, (strategy, tpl, texts)


def test_k_exceeds_file_vocabulary(tmp_path, run_cli):
    f = tmp_path / "classes.txt"
    f.write_text("cat\ndog\n# comment\nemu\n")
    root = tmp_path / "cache"
    res = run_cli("calib", "--generator", "diffusion", "--classes", f, "--k", "4", "--cache-root", root)
    _assert_clean_failure(res, root, "exceeds the number of classes (3)")


def test_checkpoint_errors(tmp_path, run_cli):
    root = tmp_path / "cache"
    base = ["calib", "--generator", "noise", "--model", "cifar_resnet20", "--cache-root", root, "-q"]
    _assert_clean_failure(run_cli(*base, "--checkpoint", tmp_path / "missing.th"), root, "checkpoint not found")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    _assert_clean_failure(run_cli(*base, "--checkpoint", junk), root, "cannot read checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save(load_model("mlperf_tiny_resnet8", random_init=True).state_dict(), wrong)
    _assert_clean_failure(run_cli(*base, "--checkpoint", wrong), root, "does not match the model")


def test_unwritable_cache_dir(tmp_path, run_cli):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    root = blocker / "cache"
    res = run_cli("calib", "--generator", "noise", "--num", "2", "--cache-root", root, "-q")
    assert res.code == 2 and "is not writable" in res.err and len(res.err.strip().splitlines()) == 1
    assert blocker.read_text() == "a file, not a directory"


def test_unwritable_cache_dir_not_created(tmp_path, run_cli):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        # root ignores the folder's mode (CI runs as root): /proc refuses new folders to root as well
        parent = ro if not os.access(ro, os.W_OK) else Path("/proc") / f"mixq-no-such-{os.getpid()}"
        res = run_cli("calib", "--generator", "noise", "--num", "2", "--cache-root", parent / "deep" / "cache", "-q")
        assert res.code == 2 and "is not writable" in res.err and len(res.err.strip().splitlines()) == 1
        assert not (parent / "deep").exists()
    finally:
        os.chmod(ro, 0o700)


def test_alpha_shapes_mixup_embed_weights():
    """The one strategy that takes --alpha draws its weights from Dirichlet(alpha): a small alpha gives
    lopsided mixes, a large one near-equal ones."""
    from mixq_onnx.calib.classes import load_classes
    from mixq_onnx.calib.prompts import PromptConfig, plan_images

    vocab = load_classes("cifar10")
    spread = {}
    for alpha in (0.2, 50.0):
        cfg = PromptConfig("mixup-embed", alpha=alpha)
        cfg.validate(len(vocab))
        w = torch.tensor([p.weights for p in plan_images(cfg, vocab, 0, 0, 200)])
        spread[alpha] = float((w.max(1).values - w.min(1).values).mean())
    assert spread[0.2] > 0.6 and spread[50.0] < 0.15, spread


def test_an_option_the_generator_does_not_read_is_refused(tmp_path, run_cli):
    """`calib --generator noise --source data.npz` made a noise cache without a word (review, 2026-11-30):
    every option given on the command line must be one the generator reads."""
    root = tmp_path / "root"
    for args, words in ((["--generator", "noise", "--source", "x.npz"], "--source do(es) not apply to --generator noise"),
                        (["--generator", "real", "--source", "x.npz", "--k", "3"], "--prompts/--k"),
                        (["--generator", "noise", "--steps", "5"], "--steps do(es) not apply"),
                        (["--generator", "real", "--source", "x.npz", "--iters", "5"], "--iters do(es) not apply")):
        r = run_cli("calib", *args, "--num", "4", "--size", "8", "--cache-root", root)
        assert r.code == 2 and words in r.err and "Traceback" not in r.err, r.err
    assert not root.exists()
    # defaults shown in --help are not "given": the plain command still works
    r = run_cli("calib", "--generator", "noise", "--num", "4", "--size", "8", "--cache-root", root, "-q")
    assert r.code == 0, r.err
