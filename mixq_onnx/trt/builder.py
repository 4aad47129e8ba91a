"""Build a TensorRT / TensorRT-RTX engine from a QDQ ONNX graph, with a provenance file beside it.

Precision comes only from the graph's Q/DQ nodes (strongly typed network); no FP16/INT8 builder
flag is ever set, so the engine computes exactly what the exported graph says. `model.plan.json`
records what the plan was built from and for (the plan key), and the engine's layer list, which
`inspect` turns into a per-layer precision report without needing a GPU.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MixqError
from ..utils import (
    atomic_path,
    atomic_write_json,
    check_output_file,
    make_parent,
    read_regular,
    sha256_bytes,
    sha256_file,
)
from .backend import BACKENDS, cuda_version, gpu_info, import_backend, make_logger
from .layers import LayerInfo, parse_builder_log, parse_inspector_json

PLAN_FORMAT = "mixq-onnx.plan/1"
MAX_WORKSPACE_MIB = 1 << 23  # 8 TiB: far above any GPU, and within the builder's 64-bit byte count
DEFAULT_BATCH = (1, 8, 32)  # MIN:OPT:MAX a dynamic batch dimension gets unless --batch says otherwise
RTX_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}
RTX_PORTABLE = "portable"  # TensorRT-RTX default: every supported GPU from sm80 on (Turing needs 7.5 explicitly)


class EngineRefused(MixqError):
    """The built engine fails a requirement of the build (`build --max-handoffs`): a verdict, exit code 1; no
    plan is written. `handoffs`: the count that refused it (None where another requirement did)."""

    exit_code = 1

    def __init__(self, message: str, handoffs: int | None = None) -> None:
        super().__init__(message)
        self.handoffs = handoffs


#: `build_engine(accept=...)`: called with the engine's layers and the input shapes at the profile's OPT before
#: anything is written; raising (EngineRefused) leaves no plan behind.
Accept = Callable[[list[LayerInfo], dict[str, list[int]]], None]


def max_handoffs(onnx_path: str | Path, limit: int) -> Accept:
    """An `accept` that refuses an engine with more than `limit` hand-offs (reformat/requantize layers plus
    tensors passed in float between non-compute kernels, as `inspect` counts them): `build --max-handoffs`."""
    def accept(layers: list[LayerInfo], shapes: dict[str, list[int]]) -> None:
        from .inspect import analyze

        n = analyze(onnx_path, layers, shapes).handoffs
        if n > limit:
            raise EngineRefused(f"the engine has {n} hand-offs, more than --max-handoffs {limit} "
                                f"(no plan written; build without the limit and run inspect to list them)", handoffs=n)
    return accept


@dataclass
class BuildConfig:
    """Everything that changes the engine; recorded verbatim in model.plan.json."""

    backend: str = "tensorrt-rtx"
    # MIN:OPT:MAX of the dynamic batch dimension; None: DEFAULT_BATCH. Given, a graph whose batch is static
    # must have that one size (MIN = OPT = MAX), never a profile it would silently ignore
    batch: tuple[int, int, int] | None = None
    workspace_mib: int = 1024
    compute_capabilities: tuple[str, ...] = ()  # tensorrt-rtx AOT targets ("8.9", "sm120", "current"); () = portable
    optimization_level: int | None = None  # builder_optimization_level (0-5); None = backend default
    timing_cache: bool = True  # persisted beside the plan where the backend has one

    @property
    def profile_batch(self) -> tuple[int, int, int]:
        """The batch profile a dynamic batch dimension gets (and PLAN.json records)."""
        return DEFAULT_BATCH if self.batch is None else self.batch

    def validate(self) -> BuildConfig:
        if self.backend not in BACKENDS:
            raise MixqError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        lo, opt, hi = self.profile_batch
        if not (1 <= lo <= opt <= hi):
            raise MixqError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
        if hi > MAX_DIM:  # TensorRT's dimensions are int32; `run` allocates a batch of MAX
            raise MixqError(f"--batch MAX must be at most {MAX_DIM}, got {hi}")
        if not 1 <= self.workspace_mib <= MAX_WORKSPACE_MIB:
            raise MixqError(f"--workspace must be between 1 and {MAX_WORKSPACE_MIB} MiB, got {self.workspace_mib}")
        if self.compute_capabilities and self.backend != "tensorrt-rtx":
            raise MixqError("--compute-capability selects TensorRT-RTX ahead-of-time targets; the tensorrt backend "
                            "always builds for the GPU it runs on")
        for cc in self.compute_capabilities:
            _rtx_capability_name(cc)
        return self


def parse_batch(text: str) -> tuple[int, int, int]:
    """'8' -> (8, 8, 8); '1:8:32' -> (1, 8, 32)."""
    try:
        parts = [int(v) for v in text.split(":")]
    except ValueError:
        raise MixqError(f"--batch expects MIN:OPT:MAX integers, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise MixqError(f"--batch expects MIN:OPT:MAX (or one number), got {text!r}")
    return parts[0], parts[1], parts[2]


def _rtx_capability_name(cc: str) -> str:
    c = cc.strip().lower().replace("sm_", "").replace("sm", "")
    if c == "current":
        return "CURRENT"
    if c.isdigit() and len(c) >= 2:
        c = f"{c[:-1]}.{c[-1]}"
    if c not in RTX_CAPABILITIES:
        raise MixqError(f"unknown compute capability {cc!r}; TensorRT-RTX targets {', '.join(RTX_CAPABILITIES)} "
                        f"or 'current'")
    return RTX_CAPABILITIES[c]


def meta_path_for(plan: str | Path) -> Path:
    return Path(str(plan) + ".json")


def timing_cache_path_for(plan: str | Path) -> Path:
    return Path(str(plan) + ".timing-cache")


def read_timing_cache(plan: str | Path, overwrite: bool = False) -> bytes:
    """The timing cache a previous build of `plan` wrote, checked against the sha256 its PLAN.json records; b""
    where there is none. A file there that no build of this plan wrote (no record, another hash, not a regular
    file) is bad input: TensorRT would take its tactics from it, and the build would replace it. `overwrite`
    ignores it (the build then replaces it)."""
    path = timing_cache_path_for(plan)
    if not os.path.lexists(path):
        return b""
    meta = meta_path_for(plan)
    try:
        rec = _plan_record(meta) if os.path.lexists(meta) else None
    except (OSError, ValueError):
        rec = None
    recorded = rec.get("timing_cache_sha256") if rec is not None else None
    try:
        data = read_regular(path)
    except OSError as e:
        if overwrite:
            return b""
        raise MixqError(f"cannot read the timing cache {path}: {e.strerror or e}") from None
    if isinstance(recorded, str) and sha256_bytes(data) == recorded:
        return data
    if overwrite:
        return b""
    why = "its PLAN.json records no timing cache" if recorded is None else "its sha256 is not the one PLAN.json records"
    raise MixqError(f"{path} is not a timing cache a build of {plan} wrote ({why}): remove it, build with "
                    "--no-timing-cache, or pass --overwrite to replace it")


def plan_key(backend: str, version: str, target: str) -> str:
    """What a plan is only valid for: the exact backend build and the GPU target(s)."""
    return f"{backend}/{version}/{target}"


@dataclass
class BuildResult:
    plan: Path
    meta_path: Path
    meta: dict[str, Any]
    layers: list[LayerInfo] = field(default_factory=list)
    seconds: float = 0.0


def _targets(trt: Any, cfg: BuildConfig, gpu: Any) -> tuple[str, list[str]]:
    """(target string of the plan key, target list for the metadata)."""
    if cfg.backend == "tensorrt":
        return gpu.sm, [gpu.sm]
    names = []
    for cc in cfg.compute_capabilities:
        n = _rtx_capability_name(cc)
        if n == "CURRENT":
            if gpu is None:
                raise MixqError("--compute-capability current needs an NVIDIA GPU on this host; name the target "
                                "instead, e.g. --compute-capability 8.9")
            n = gpu.sm.upper()
            if not hasattr(trt.ComputeCapability, n):
                have = sorted(c for c in dir(trt.ComputeCapability) if c.startswith("SM"))
                raise MixqError(f"--compute-capability current: this GPU is {gpu.sm}, which TensorRT-RTX "
                                f"{trt.__version__} has no target for (it builds {', '.join(have)}); name one of "
                                "those, or build with --backend tensorrt")
        names.append(n.lower())
    names = sorted(set(names))
    return ("aot:" + ",".join(names) if names else f"aot:{RTX_PORTABLE}"), (names or [RTX_PORTABLE])


def require_onnx(onnx_path: Path) -> None:
    """Refuse a file that is not an ONNX model before TensorRT's parser turns it into a confusing message, and
    a graph whose external data lies outside its folder (absolute, `..`, a symbolic link) or is shorter than it
    says: the TensorRT parsers do not check that and would read whatever the received graph names. The data is
    checked, not read: the parser reads it once (and `graph_sha256` once, for the plan's record)."""
    from ..onnx.graph import checked_external_data, load_model

    try:
        proto = load_model(onnx_path, external_data=False)
    except MixqError:
        raise MixqError(f"{onnx_path} is not an ONNX model; build takes the .onnx from `mixq-onnx export`") from None
    checked_external_data(onnx_path, proto)
    if not proto.graph.output or not proto.graph.node:
        raise MixqError(f"{onnx_path} is not an ONNX model with a graph (no nodes or outputs); build takes the .onnx "
                        "from `mixq-onnx export`")


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    errs = []
    for i in range(min(parser.num_errors, 3)):
        e = parser.get_error(i)
        node = getattr(e, "node_name", lambda: "")() if hasattr(e, "node_name") else ""
        desc = e.desc() if hasattr(e, "desc") else str(e)
        errs.append(f"{node}: {desc}" if node else desc)
    raise MixqError(f"the {_label(trt)} ONNX parser rejected {onnx_path}: " + "; ".join(errs)[:400])


def _label(trt: Any) -> str:
    return "TensorRT-RTX" if trt.__name__.startswith("tensorrt_rtx") else "TensorRT"


def _profile(trt: Any, builder: Any, network: Any, config: Any, cfg: BuildConfig) -> list[dict[str, Any]]:
    """One optimisation profile: the batch dimension takes MIN/OPT/MAX, every other dimension must be static."""
    shapes = []
    profile = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if any(d < 0 for d in dims[1:]):
            raise MixqError(f"input {t.name!r} has dynamic dimensions {dims} beyond the batch; export with a fixed "
                            f"--input-size")
        if dims and dims[0] < 0:
            dynamic = True
            mn, opt, mx = ([b, *dims[1:]] for b in cfg.profile_batch)
            profile.set_shape(t.name, mn, opt, mx)
        else:
            if cfg.batch is not None and dims and cfg.batch != (dims[0],) * 3:
                raise MixqError(f"--batch {':'.join(map(str, cfg.batch))}: input {t.name!r} has a static batch of "
                                f"{dims[0]} ({dims}), which the engine keeps; drop --batch (or give {dims[0]}), or "
                                "export the graph with a dynamic batch")
            mn = opt = mx = dims
        shapes.append({"name": t.name, "dtype": str(t.dtype).split(".")[-1], "min": mn, "opt": opt, "max": mx})
    if dynamic:
        config.add_optimization_profile(profile)
    return shapes


def _inspector_layers(trt: Any, logger: Any, plan_bytes: bytes) -> list[LayerInfo]:
    """Engine-inspector layers; only possible where the engine deserializes (a GPU host)."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        return []
    insp = engine.create_engine_inspector()
    return parse_inspector_json(insp.get_engine_information(trt.LayerInformationFormat.JSON))


@contextlib.contextmanager
def _sigint_flag() -> Iterator[threading.Event]:
    """Ctrl-C sets a flag instead of raising. Raised inside TensorRT's callbacks (the logger's, which runs while the
    parser and the builder work), a KeyboardInterrupt is caught and dropped by TensorRT, and the build ran on to
    write its plan; the caller checks the flag between steps and raises itself."""
    hit = threading.Event()
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, lambda *_: hit.set())
    try:
        yield hit
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def _cancel_on(trt: Any, config: Any, hit: threading.Event) -> Iterator[None]:
    """A progress monitor (where the backend has one) that cancels the build once `hit` is set."""
    monitor = None
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        class _Cancel(trt.IProgressMonitor):  # type: ignore[name-defined, misc]
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name: str, parent_phase: Any, num_steps: int) -> None:
                pass

            def step_complete(self, phase_name: str, step: int) -> bool:
                return not hit.is_set()  # False cancels the build

            def phase_finish(self, phase_name: str) -> None:
                pass

        monitor = _Cancel()
        config.progress_monitor = monitor
    try:
        yield
    finally:
        if monitor is not None:
            config.progress_monitor = None


def _stop_if(hit: threading.Event) -> None:
    """Ctrl-C came (`_sigint_flag`): nothing is written, the CLI says "aborted" (exit 130)."""
    if hit.is_set():
        raise KeyboardInterrupt


def build_engine(onnx_path: str | Path, plan_path: str | Path, cfg: BuildConfig | None = None,
                 verbose: bool = False, accept: Accept | None = None, overwrite: bool = False) -> BuildResult:
    """Build `plan_path` (atomically) and `plan_path`.json from a QDQ ONNX graph. `accept(layers, shapes)`
    judges the engine before anything is written: when it raises, no plan (nor plan.json) is left behind.
    An existing `plan_path` is replaced only if `build` wrote it, or with `overwrite`."""
    from ..onnx.graph import graph_sha256

    cfg = (cfg or BuildConfig()).validate()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise MixqError(f"ONNX model not found: {onnx_path}")
    require_onnx(onnx_path)
    check_plan_output(plan_path, inputs=(onnx_path,), overwrite=overwrite)
    use_cache = cfg.timing_cache and cfg.backend == "tensorrt"  # TensorRT-RTX: timing cache calls are no-ops
    blob = read_timing_cache(plan_path, overwrite) if use_cache else b""  # judged before any work
    trt = import_backend(cfg.backend)
    gpu = gpu_info()
    if cfg.backend == "tensorrt" and gpu is None:
        raise MixqError("the tensorrt backend builds on an NVIDIA GPU and none was found; on a CPU host use "
                        "--backend tensorrt-rtx (ahead-of-time build for RTX GPUs)")
    target, targets = _targets(trt, cfg, gpu)

    with _sigint_flag() as hit:
        logger = make_logger(trt, echo=verbose)
        builder = trt.Builder(logger)
        strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT 11: the only mode
        network = builder.create_network(1 << int(strongly) if strongly is not None else 0)
        onnx_sha256 = graph_sha256(onnx_path)  # before the parser reads it: the graph (and weights) this plan is built from
        _parse_onnx(trt, network, logger, onnx_path)
        _stop_if(hit)

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if cfg.optimization_level is not None:
            config.builder_optimization_level = cfg.optimization_level
        if cfg.backend == "tensorrt-rtx" and targets != [RTX_PORTABLE]:
            config.num_compute_capabilities = len(targets)
            for i, t in enumerate(targets):
                config.set_compute_capability(getattr(trt.ComputeCapability, t.upper()), i)
        shapes = _profile(trt, builder, network, config, cfg)

        cache_file: Path | None = None
        cache = None
        if use_cache:
            cache_file = timing_cache_path_for(plan_path)
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)

        t0 = time.perf_counter()
        with warnings.catch_warnings(), _cancel_on(trt, config, hit):
            warnings.simplefilter("ignore", DeprecationWarning)
            serialized = builder.build_serialized_network(network, config)
        _stop_if(hit)
        seconds = time.perf_counter() - t0
        if serialized is None:
            errs = logger.errors()
            raise MixqError(f"{_label(trt)} could not build {onnx_path}: " + (errs[-1] if errs else "no log")[:400])
        plan_bytes = bytes(memoryview(serialized))
        plan_sha256 = sha256_bytes(plan_bytes)  # of what this build writes: a concurrent build's plan then mismatches
        layers: list[LayerInfo] = []
        source = "builder-log"
        if gpu is not None and cfg.backend == "tensorrt":
            try:
                layers, source = _inspector_layers(trt, logger, plan_bytes), "engine-inspector"
            except Exception:  # noqa: BLE001 - fall back to the log
                layers = []
        if not layers:
            layers, source = parse_builder_log(m for _, m in logger.messages), "builder-log"
        if accept is not None:  # before the plan is written: a refused engine leaves nothing behind
            accept(layers, {i["name"]: list(i["opt"]) for i in shapes})

        _stop_if(hit)  # the last point before anything is written
        make_parent(plan_path)
        cache_bytes = bytes(memoryview(cache.serialize())) if cache is not None else None

        outputs = []
        for i in range(network.num_outputs):
            t = network.get_output(i)
            outputs.append({"name": t.name, "dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape)})
        meta = {
            "format": PLAN_FORMAT,
            "plan_key": plan_key(cfg.backend, trt.__version__, target),
            "backend": cfg.backend,
            "backend_version": trt.__version__,
            "target": target,
            "targets": targets,
            "cuda_version": cuda_version(),
            "gpu": gpu.to_dict() if gpu is not None else None,
            "onnx": {"path": str(onnx_path.resolve()), "sha256": onnx_sha256},
            "preprocessing": _onnx_preprocessing(onnx_path),
            "plan_sha256": plan_sha256,
            "plan_bytes": len(plan_bytes),
            "inputs": shapes,
            "outputs": outputs,
            "options": {**asdict(cfg), "batch": list(cfg.profile_batch), "compute_capabilities": list(cfg.compute_capabilities),
                        "strongly_typed": True, "profiling_verbosity": "DETAILED"},
            "timing_cache": str(cache_file) if cache_file is not None else None,
            "timing_cache_sha256": sha256_bytes(cache_bytes) if cache_bytes is not None else None,
            "build_seconds": round(seconds, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "layer_source": source,
            "layers": [li.to_dict() for li in layers],
        }
        meta_file = meta_path_for(plan_path)
        # PLAN.json first, then the plan: a kill between the two leaves a mixq-onnx PLAN.json beside an old plan (or
        # none), which readers refuse as stale and a re-run replaces (`plan_is_ours`), never a plan no sidecar owns
        atomic_write_json(meta_file, meta)
        with atomic_path(plan_path) as tmp:
            tmp.write_bytes(plan_bytes)
        if cache_bytes is not None and cache_file is not None:
            with atomic_path(cache_file) as tmp:
                tmp.write_bytes(cache_bytes)
        return BuildResult(plan_path, meta_file, meta, layers, seconds)


def _plan_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The object of a PLAN.json mixq-onnx wrote (its format key); None for any other JSON."""
    rec = json.loads(read_regular(path))
    return rec if isinstance(rec, dict) and rec.get("format") == PLAN_FORMAT else None


def _is_plan_record(path: str | os.PathLike) -> bool:
    """A PLAN.json mixq-onnx wrote (its format key)."""
    return _plan_record(path) is not None


def plan_is_ours(plan: str | os.PathLike) -> bool:
    """A plan `build` wrote: its PLAN.json is a mixq-onnx plan record (the sha256 may be stale after a kill
    between the two writes; readers check it, a re-build replaces the pair)."""
    return _is_plan_record(meta_path_for(plan))


def check_plan_output(plan: str | os.PathLike, inputs: tuple[Any, ...] = (), overwrite: bool = False) -> Path:
    """Refuse, before any work, a plan path or a PLAN.json path the build must not write: a folder, one of the
    inputs, or an existing file mixq-onnx did not write (unless `overwrite`)."""
    plan = check_output_file(plan, what="the plan", inputs=inputs, refuse_suffixes=(".onnx", ".json"),
                             ours=("an engine plan", plan_is_ours), overwrite=overwrite)
    meta = meta_path_for(plan)
    check_output_file(meta, what="the plan's PLAN.json", inputs=inputs, overwrite=overwrite,
                      ours=("a PLAN.json", _is_plan_record))
    return plan


@dataclass
class CheckedBuild:
    """What `mixq-onnx build` reports: the build, `inspect`'s precision report of the plan, and the verdict of
    `require_int8` (True when none was asked for)."""

    result: BuildResult
    report: Any  # trt.inspect.PrecisionReport
    int8_ok: bool


def build_checked(onnx_path: str | Path, plan_path: str | Path, cfg: BuildConfig | None = None, *,
                  require_int8: float | None = None, max_handoffs_limit: int | None = None,
                  verbose: bool = False, overwrite: bool = False) -> CheckedBuild:
    """`build_engine` plus the command's checks: more than `max_handoffs_limit` hand-offs refuses the engine
    before anything is written (EngineRefused); an int8 MAC fraction under `require_int8` keeps the plan (it
    is inspectable) and returns `int8_ok` False, which the CLI turns into exit code 1."""
    from .inspect import inspect_plan

    if require_int8 is not None and not 0 <= require_int8 <= 1:
        raise MixqError(f"--require-int8 must be a fraction between 0 and 1, got {require_int8}")
    accept = max_handoffs(onnx_path, max_handoffs_limit) if max_handoffs_limit is not None else None
    res = build_engine(onnx_path, plan_path, cfg, verbose=verbose, accept=accept, overwrite=overwrite)
    rep = inspect_plan(plan_path, onnx_path)
    return CheckedBuild(res, rep, require_int8 is None or rep.int8_mac_fraction >= require_int8)


def _onnx_preprocessing(onnx_path: Path) -> dict[str, Any] | None:
    """The model's input preprocessing, recorded by `export` in the graph's metadata (for `eval --engine`)."""
    import onnx

    try:
        props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        return json.loads(props["mixq.preprocessing"]) if "mixq.preprocessing" in props else None
    except Exception:  # noqa: BLE001 - a graph from elsewhere: eval --engine then needs --model
        return None


def read_plan_meta(plan_path: str | Path) -> dict[str, Any]:
    """model.plan.json of a plan; a 'rebuild' error when it is missing, unreadable or not this plan's."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise MixqError(f"plan not found: {plan_path}")
    if plan_path.name.endswith(".plan.json") and Path(str(plan_path)[: -len(".json")]).is_file():
        raise MixqError(f"{plan_path} is a plan's PLAN.json: give the plan itself, {str(plan_path)[: -len('.json')]}")
    mp = meta_path_for(plan_path)
    hint = "rebuild it with `mixq-onnx build MODEL.onnx --out PLAN`"
    if not mp.is_file():
        from .inspect import refuse_onnx_as_plan

        refuse_onnx_as_plan(plan_path)  # an ONNX graph where the plan belongs: say so, not "PLAN.json is missing"
        raise MixqError(f"{mp} is missing, so the plan's backend and target are unknown: {hint}")
    try:
        meta = json.loads(mp.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise MixqError(f"cannot read {mp} ({type(e).__name__}): {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != PLAN_FORMAT or "plan_key" not in meta:
        raise MixqError(f"{mp} is not a {PLAN_FORMAT} file: {hint}")
    problem = _plan_meta_problem(meta)
    if problem:
        raise MixqError(f"{mp} is damaged ({problem}): {hint}")
    if sha256_file(plan_path) != meta["plan_sha256"]:
        raise MixqError(f"{plan_path} does not match the sha256 recorded in {mp.name}: {hint}")
    return meta


MAX_DIM = 1 << 16  # PLAN.json shapes: a received file's shape is allocated by `run` and mapped by `inspect`
MAX_ELEMENTS = 1 << 28  # 1 GiB of float32


def _plan_meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields `inspect`, `run`, `bench` and `eval --engine` read, or None."""
    for key in ("plan_key", "backend", "backend_version", "plan_sha256"):  # no sha256: nothing to check the plan by
        if not isinstance(meta.get(key), str):
            return f"{key} is not a string"
    onnx_rec = meta.get("onnx")
    if not isinstance(onnx_rec, dict) or not isinstance(onnx_rec.get("path"), str):
        return "onnx.path is missing"
    inputs = meta.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("opt"), list)
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIM for v in i["opt"])
            for i in inputs):
        return f"inputs are not a non-empty list of {{name, opt shape}} with dimensions 1..{MAX_DIM}"
    for i in inputs:  # `run` reads the profile's batch range from min/max where they are recorded
        for k in ("min", "max"):
            v = i.get(k)
            if v is not None and not (isinstance(v, list) and v and all(
                    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM for d in v)):
                return f"input {i['name']!r}: {k} is not a shape with dimensions 1..{MAX_DIM}"
    if any(math.prod(i["opt"]) > MAX_ELEMENTS for i in inputs):  # `run` makes a random batch of that shape
        return f"an input's opt shape holds more than {MAX_ELEMENTS} elements"
    targets = meta.get("targets", [])  # `run` tests the GPU's target against this list, never a string
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        return "targets is not a list of compute-capability names"
    opts = meta.get("options")
    if not isinstance(opts, dict) or not isinstance(meta.get("layers", []), list):
        return "options or layers are malformed"
    batch = opts.get("batch")  # `bench --fp-onnx` rebuilds the float engine with the recorded options
    if not (isinstance(batch, list) and len(batch) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DIM for v in batch)):
        return f"options.batch is not MIN, OPT, MAX in 1..{MAX_DIM}"
    if not (isinstance(opts.get("workspace_mib"), int) and isinstance(opts.get("compute_capabilities"), list)
            and all(isinstance(c, str) for c in opts["compute_capabilities"])):
        return "options.workspace_mib or options.compute_capabilities is malformed"
    try:
        plan_layers(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"a layer record is malformed: {type(e).__name__} {e}"
    return None


def check_plan_key(meta: dict[str, Any], trt: Any, gpu: Any | None = None, backend: str | None = None) -> None:
    """Refuse a plan built by another backend/version or for another GPU target (plans are not portable)."""
    want_backend = backend or meta["backend"]
    here_target = None
    if gpu is not None:
        here_target = gpu.sm if want_backend == "tensorrt" else f"aot:{gpu.sm}"
    here = plan_key(want_backend, trt.__version__, here_target or "?")
    hint = "rebuild the plan on this host with `mixq-onnx build`"
    if meta["backend"] != want_backend or meta["backend_version"] != trt.__version__:
        raise MixqError(f"plan key {meta['plan_key']} does not match this host ({here}): {hint}")
    if gpu is None:
        return
    if meta["backend"] == "tensorrt":
        if meta["target"] != gpu.sm:
            raise MixqError(f"plan key {meta['plan_key']} was built for {meta['target']}, this GPU ({gpu.name}) is "
                            f"{gpu.sm}: {hint}")
        return
    targets = meta.get("targets") or []
    if targets == [RTX_PORTABLE]:
        if gpu.compute_capability < (8, 0):
            raise MixqError(f"plan key {meta['plan_key']} is portable to sm80 and newer, this GPU ({gpu.name}) is "
                            f"{gpu.sm}: {hint} --compute-capability {gpu.compute_capability[0]}."
                            f"{gpu.compute_capability[1]}")
    elif gpu.sm not in targets:
        raise MixqError(f"plan key {meta['plan_key']} targets {', '.join(targets)}, this GPU ({gpu.name}) is "
                        f"{gpu.sm}: {hint}")


def plan_layers(meta: dict[str, Any]) -> list[LayerInfo]:
    return [LayerInfo.from_dict(d) for d in meta.get("layers", [])]
