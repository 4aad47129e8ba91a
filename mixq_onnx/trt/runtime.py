"""Running built plans on an NVIDIA GPU: inference, accuracy, and a latency benchmark.

Device memory comes from torch CUDA tensors (torch is already a dependency), the engine runs with
the TensorRT 10 I/O API (`set_input_shape`, `set_tensor_address`, `execute_async_v3`). Every
entry point checks the plan key first, so a plan built elsewhere is refused with a 'rebuild'
message instead of failing inside the runtime.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MixqError
from ..utils import check_output_file, read_regular, sha256_bytes
from .backend import GpuInfo, gpu_info, import_backend, make_logger
from .builder import (
    BuildConfig,
    build_engine,
    check_plan_key,
    check_plan_output,
    read_plan_meta,
    read_timing_cache,
    require_onnx,
)

_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                 "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def __getattr__(name: str) -> Any:
    """`convert_to_fp16` (the FP16 baseline graph of `bench`) lives in onnx.passes; importing it from here
    still works, without importing the onnx package (and torch) with this module."""
    if name == "convert_to_fp16":
        from ..onnx.passes import convert_to_fp16

        return convert_to_fp16
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_gpu() -> GpuInfo:
    gpu = gpu_info()
    if gpu is None:
        raise MixqError("running a TensorRT engine needs an NVIDIA GPU with a CUDA driver, and none was found "
                        "(building works on a CPU with --backend tensorrt-rtx)")
    return gpu


def check_runnable(plan_path: str | Path, backend: str | None = None) -> tuple[dict[str, Any], Any, GpuInfo]:
    """(PLAN.json, backend module, GPU) of a plan this host can run; one-line errors otherwise, a backend or
    version mismatch before the GPU check (it says to rebuild, which no GPU would change)."""
    meta = read_plan_meta(plan_path)
    trt = import_backend(backend or meta["backend"])
    check_plan_key(meta, trt, None, backend)
    gpu = require_gpu()
    check_plan_key(meta, trt, gpu, backend)
    return meta, trt, gpu


class Engine:
    """A deserialized plan with one execution context; `__call__` maps a CUDA/CPU tensor batch to outputs."""

    def __init__(self, plan_path: str | Path, backend: str | None = None):
        meta, trt, gpu = check_runnable(plan_path, backend)
        import torch

        self.torch = torch
        self.meta, self.trt, self.gpu = meta, trt, gpu
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        plan_bytes = read_regular(plan_path)  # the bytes loaded are the bytes checked (a rebuild may replace the file)
        if sha256_bytes(plan_bytes) != meta["plan_sha256"]:
            raise MixqError(f"{plan_path} changed since it was checked against its PLAN.json: rebuild it with "
                            "`mixq-onnx build`")
        self.engine = self.runtime.deserialize_cuda_engine(plan_bytes)
        if self.engine is None:
            errs = self.logger.errors()
            raise MixqError(f"{plan_path} does not deserialize on this host ({(errs[-1] if errs else '')[:200]}): "
                            f"rebuild it with `mixq-onnx build`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream()
        self.max_batch = max((i["max"][0] for i in meta.get("inputs", []) if i.get("max")), default=1)
        self.min_batch = max((i["min"][0] for i in meta.get("inputs", []) if i.get("min")), default=1)

    def _dtype(self, name: str) -> Any:
        key = str(self.engine.get_tensor_dtype(name)).split(".")[-1]
        return getattr(self.torch, _TORCH_DTYPES.get(key, "float32"))

    def __call__(self, *xs: Any) -> dict[str, Any]:
        """Run one batch (at most the profile's MAX) and return CUDA output tensors by name."""
        torch = self.torch
        if len(xs) != len(self.inputs):
            raise MixqError(f"the engine takes {len(self.inputs)} input(s) ({', '.join(self.inputs)}), got {len(xs)}")
        keep = []
        for name, x in zip(self.inputs, xs):
            x = torch.as_tensor(x).to(device="cuda", dtype=self._dtype(name)).contiguous()
            keep.append(x)
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise MixqError(f"input {name} shape {tuple(x.shape)} is outside the plan's profile "
                                f"{self.meta.get('inputs')}")
            self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        self._bound = (keep, outs)  # the addresses stay valid until the next call (bench re-enqueues them)
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            errs = self.logger.errors()
            raise MixqError(f"engine execution failed: {(errs[-1] if errs else 'no log')[:200]}")
        torch.cuda.current_stream().wait_stream(self.stream)
        return outs

    def predict(self, x: Any, batch_size: int | None = None) -> Any:
        """Logits of the first output for a float NCHW tensor, batched to the profile's MAX."""
        torch = self.torch
        bs = min(batch_size or self.max_batch, self.max_batch)
        res = []
        for s in range(0, len(x), bs):
            res.append(self.first_output(x[s:s + bs]))
        torch.cuda.synchronize()
        return torch.cat(res)

    def first_output(self, x: Any) -> Any:
        """The first output (float, on the CPU) for one batch; a batch smaller than the profile's MIN (the last
        of a static --batch 8 over 50 images) is padded with copies of its last image, and those rows dropped."""
        n = len(x)
        if n < self.min_batch:
            x = self.torch.cat([x, x[-1:].expand(self.min_batch - n, *x.shape[1:])])
        return self(x)[self.outputs[0]][:n].float().cpu()


def run_plan(plan_path: str | Path, inputs: Any = None, backend: str | None = None) -> dict[str, Any]:
    """One inference, what `mixq-onnx run` does: numpy arrays (or .npy paths, float NCHW, one per engine input)
    in, numpy arrays out. `inputs` None: one seeded N(0, 1) batch at the profile's OPT shape, made only once
    the plan is known to run here."""
    import numpy as np

    if inputs is None:
        meta, _, _ = check_runnable(plan_path, backend)  # before a batch is made: there may be nothing to run it on
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(i["opt"]).astype(np.float32) for i in meta["inputs"]]
    else:
        inputs = [_numeric(_load_npy(x) if isinstance(x, (str, os.PathLike)) else x, x) for x in inputs]
    eng = Engine(plan_path, backend)

    outs = eng(*[eng.torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    eng.torch.cuda.synchronize()
    return {k: v.cpu().numpy() for k, v in outs.items()}


def _load_npy(path: str | os.PathLike) -> Any:
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MixqError(f"--input {path}: not a readable .npy array ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive: np.load opens it as a mapping of arrays
        arr.close()
        raise MixqError(f"--input {path}: an .npz archive, not one .npy array (give one .npy per engine input)")
    return arr


def _numeric(arr: Any, src: Any) -> Any:
    """An engine input: a numeric numpy array (strings, objects and datetimes have no tensor form)."""
    import numpy as np

    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        what = f"dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        where = f"--input {src}" if isinstance(src, (str, os.PathLike)) else "an input"
        raise MixqError(f"{where}: not a numeric array ({what}); an engine input is float NCHW")
    return arr


def evaluate_engine_data(plan_path: str | Path, data: str | Path, *, model: Any = None, quantized: Any = None,
                         trust_model_code: bool = False, limit: int | None = None, batch_size: int | None = None,
                         backend: str | None = None, log: Any = None) -> Any:
    """What `mixq-onnx eval --engine` computes: top-1/top-5 through the plan on an npz or image folder. The
    input preprocessing is the model's (`model`: nn.Module or `ModelOptions`), else the recorded model's of
    a result folder (`quantized`), else the one the plan recorded at build time. `limit`: `pick_subset`'s
    seeded sample; `log` (a callable taking one line) gets the `data:` / `preprocessing:` lines."""
    from ..data import read_for_model
    from ..errors import MixqError
    from ..models import ModelOptions, Preprocessing, get_preprocessing, load_model
    from ..quant.io import load_source_model
    from .builder import read_plan_meta

    meta = read_plan_meta(plan_path)
    if model is not None:
        pre = get_preprocessing(load_model(model) if isinstance(model, ModelOptions) else model)
    elif quantized is not None:
        pre = get_preprocessing(load_source_model(quantized, trust_model_code))
    elif meta.get("preprocessing"):
        pre = Preprocessing.from_dict(meta["preprocessing"])
    else:
        raise MixqError(f"{plan_path} records no input preprocessing: pass --model or --quantized")
    d = read_for_model(data, pre, limit, log=log)
    res = evaluate_engine(plan_path, d.images, d.labels, preprocessing=pre, batch_size=batch_size, backend=backend)
    res.subset = d.subset
    return res


def evaluate_engine(plan_path: str | Path, images: Any, labels: Any, preprocessing: Any = None,
                    batch_size: int | None = None, backend: str | None = None) -> Any:
    """Top-1/top-5 of a plan on labelled images (uint8 NHWC with `preprocessing`, else float NCHW)."""
    import torch

    from ..quant.evaluate import EvalResult, topk_accuracy

    eng = Engine(plan_path, backend)
    bs = min(batch_size or eng.max_batch, eng.max_batch)
    logits = []
    for s in range(0, len(images), bs):
        x = images[s:s + bs]
        if preprocessing is not None:
            x = preprocessing(x)
        logits.append(eng.first_output(x.float()))
    torch.cuda.synchronize()
    lg = torch.cat(logits)
    labels = torch.as_tensor(labels)
    return EvalResult(top1=topk_accuracy(lg, labels, 1), top5=topk_accuracy(lg, labels, 5), n=len(labels))


# --------------------------------------------------------------------------- benchmark
@dataclass
class Timing:
    name: str
    batch: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # images per second at this batch
    note: str = ""


@dataclass
class BenchReport:
    gpu: dict[str, Any]
    batch: int
    iters: int
    rows: list[Timing] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "batch": self.batch, "iters": self.iters, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        head = f"{'':28s} {'p50 ms':>9s} {'p99 ms':>9s} {'img/s':>10s}"
        title = (f"{self.gpu.get('name')} (sm {self.gpu.get('compute_capability')}), batch {self.batch}, "
                 f"{self.iters} iterations")
        lines = [title, head]
        for r in self.rows:
            lines.append(f"{r.name:28s} {r.p50_ms:9.3f} {r.p99_ms:9.3f} {r.throughput:10.0f}  {r.note}")
        return "\n".join(lines)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _time_cuda(fn: Any, warmup: int, iters: int) -> list[float]:
    """Per-iteration latency in ms from CUDA events (device time, excludes host jitter between calls)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _row(name: str, batch: int, ms: list[float], note: str = "") -> Timing:
    mean = statistics.fmean(ms)
    return Timing(name, batch, _percentile(ms, 50), _percentile(ms, 99), mean, batch * 1000.0 / mean, note)


def _bench_engine(plan: Path, x: Any, warmup: int, iters: int, backend: str | None) -> list[float]:
    eng = Engine(plan, backend)
    eng(x)  # shapes and addresses set once (buffers held by the engine); the timed loop only enqueues
    return _time_cuda(lambda: eng.context.execute_async_v3(eng.torch.cuda.current_stream().cuda_stream), warmup, iters)


def _bench_ort(onnx_path: Path, x: Any, warmup: int, iters: int) -> tuple[list[float], str]:
    """onnxruntime with IO binding on the GPU (onnxruntime-gpu); falls back to the CPU provider, labelled."""
    import numpy as np
    import onnxruntime as ort
    import torch

    provs = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    provs = [p for p in provs if p == "CUDAExecutionProvider"] or ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(onnx_path), providers=provs)
    name = sess.get_inputs()[0].name
    if provs[0] == "CUDAExecutionProvider":
        binding = sess.io_binding()
        xg = x.to("cuda").float().contiguous()
        binding.bind_input(name, "cuda", 0, np.float32, tuple(xg.shape), xg.data_ptr())
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cuda")

        def step() -> None:
            sess.run_with_iobinding(binding)
        return _time_cuda(step, warmup, iters), "onnxruntime CUDA EP"
    xc = x.float().cpu().numpy()
    for _ in range(warmup):
        sess.run(None, {name: xc})
    ms = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {name: xc})
        ms.append((time.perf_counter() - t) * 1000)
    torch.cuda.synchronize()
    return ms, "onnxruntime CPU EP (install onnxruntime-gpu for CUDA)"


def bench(plan_path: str | Path, fp_onnx: str | Path | None = None, batch: int | None = None, iters: int = 200,
          warmup: int = 20, ort_onnx: str | Path | None = None, backend: str | None = None,
          overwrite: bool = False) -> BenchReport:
    """QDQ engine vs an FP16 engine of the float model vs onnxruntime, same batch, same GPU. `overwrite` lets the
    FP16 files bench writes beside the plan replace files there that bench did not write."""
    import torch

    if iters < 1 or warmup < 0 or (batch is not None and batch < 1):
        raise MixqError(f"bench needs --iters >= 1, --warmup >= 0 and --batch >= 1, got {iters}, {warmup}, {batch}")

    from ..onnx.passes import convert_to_fp16

    plan_path = Path(plan_path)
    meta = read_plan_meta(plan_path)
    fp16, fp_plan, ort_src = _bench_files(plan_path, meta, fp_onnx, ort_onnx, overwrite)  # judged before any work
    trt = import_backend(backend or meta["backend"])
    check_plan_key(meta, trt, None, backend)
    gpu = require_gpu()
    check_plan_key(meta, trt, gpu, backend)
    inp = meta["inputs"][0]
    batch = batch or inp["opt"][0]
    x = torch.randn([batch, *inp["opt"][1:]], generator=torch.Generator().manual_seed(0)).cuda()
    rep = BenchReport(gpu=gpu.to_dict(), batch=batch, iters=iters)
    rep.rows.append(_row("QDQ engine", batch, _bench_engine(plan_path, x, warmup, iters, backend),
                         meta["plan_key"]))
    if fp_onnx is not None and fp16 is not None and fp_plan is not None:
        convert_to_fp16(fp_onnx, fp16)
        opts = meta["options"]
        static = inp.get("min", inp["opt"]) == inp.get("max", inp["opt"])  # a static QDQ graph: so is its twin
        cfg = BuildConfig(backend=meta["backend"], batch=None if static else (
                              min(batch, opts["batch"][0]), batch, max(batch, opts["batch"][2])),
                          workspace_mib=opts["workspace_mib"], compute_capabilities=tuple(opts["compute_capabilities"]),
                          optimization_level=opts.get("optimization_level"))
        build_engine(fp16, fp_plan, cfg, overwrite=overwrite)  # judged by _bench_files: ours, absent or --overwrite
        rep.rows.append(_row("FP16 engine (float model)", batch, _bench_engine(fp_plan, x, warmup, iters, backend)))
    if ort_src is not None:
        ms, note = _bench_ort(ort_src, x, warmup, iters)
        rep.rows.append(_row(f"onnxruntime ({ort_src.name})", batch, ms, note))
    return rep


def _bench_files(plan: Path, meta: dict[str, Any], fp_onnx: str | Path | None, ort_onnx: str | Path | None,
                 overwrite: bool = False) -> tuple[Path | None, Path | None, Path | None]:
    """(the FP16 graph and plan bench writes, the graph onnxruntime times), refused up front: a given graph
    that is not ONNX, an FP16 file beside the plan (its timing cache too) that bench did not write, unless
    `overwrite`, or that is an input, and the graph PLAN.json names when it is no longer the one the plan was
    built from (then no onnxruntime row)."""
    from ..onnx.export import GRAPH_OURS

    for opt, g in (("--fp-onnx", fp_onnx), ("--ort-onnx", ort_onnx)):
        if g is not None:
            if not Path(g).is_file():
                raise MixqError(f"{opt} {g}: no such file")
            require_onnx(Path(g))
    fp16 = fp_plan = None
    if fp_onnx is not None:
        fp16 = plan.with_name(plan.stem + ".fp16.onnx")
        fp_plan = plan.with_name(plan.stem + ".fp16.plan")
        ins = (fp_onnx, ort_onnx, plan)
        check_output_file(fp16, what="bench's FP16 graph", inputs=ins, ours=GRAPH_OURS, overwrite=overwrite)
        check_plan_output(fp_plan, inputs=(*ins, fp16), overwrite=overwrite)
        if meta["backend"] == "tensorrt":  # the FP16 build reads and replaces its timing cache
            read_timing_cache(fp_plan, overwrite)
    if ort_onnx is not None:
        return fp16, fp_plan, Path(ort_onnx)
    if fp_onnx is not None:
        return fp16, fp_plan, Path(fp_onnx)
    rec = Path(meta["onnx"]["path"])
    from ..onnx.graph import graph_sha256

    try:
        same = rec.is_file() and graph_sha256(rec) == meta["onnx"].get("sha256")
    except (MixqError, OSError):  # unreadable now: no reference graph, as when it is gone
        same = False
    return fp16, fp_plan, rec if same else None
