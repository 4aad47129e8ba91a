"""`build`, `inspect`, `run`, `bench`: the TensorRT / TensorRT-RTX commands, registered onto the main group."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_common import CONTEXT, FiniteFloat, emit_json
from .errors import MixqError

_backend_opt = click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None,
                            help="Engine flavour [build default: tensorrt-rtx; run/bench: the plan's].")


#: the key `run --out` adds to its .npz: the plan's sha256, and the mark of a file run wrote
RUN_MARKER = "mixq_onnx_run"


def _run_npz(path: Path) -> bool:
    """An .npz `run --out` wrote (it holds RUN_MARKER)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return RUN_MARKER in z.files


def register(cli: click.Group) -> None:
    """Add the TensorRT commands to `cli` (kept apart so the core CLI never imports TensorRT)."""

    @cli.command(context_settings=CONTEXT)
    @click.argument("onnx_path", type=click.Path())
    @click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
                  help="Plan file [default: ONNX path with .plan]; PLAN.json is written beside it.")
    @_backend_opt
    @click.option("--batch", default=None, metavar="MIN:OPT:MAX",
                  help="Optimisation profile of the dynamic batch dimension (one number: static) [default: "
                       "1:8:32]. A graph whose batch is static keeps it: --batch must then be that number.")
    @click.option("--workspace", "workspace_mib", type=int, default=1024, show_default=True, metavar="MiB",
                  help="Builder workspace limit.")
    @click.option("--compute-capability", "ccs", multiple=True, metavar="CC",
                  help="TensorRT-RTX ahead-of-time target (7.5, 8.0, 8.6, 8.9, 12.0, 12.1, current); repeat for "
                       "several [default: portable, sm80 and newer].")
    @click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimisation level.")
    @click.option("--no-timing-cache", is_flag=True, help="Do not read or write PLAN.timing-cache (tensorrt).")
    @click.option("--require-int8", type=FiniteFloat(0, 1), default=None, metavar="FRACTION",
                  help="Exit 1 when less than this share of Conv/Gemm/MatMul MACs runs int8 x int8 (the plan is "
                       "still written, to inspect).")
    @click.option("--max-handoffs", type=click.IntRange(min=0), default=None, metavar="N",
                  help="Exit 1, writing no plan, when the engine has more than N hand-offs (reformat/requantize "
                       "layers plus tensors passed in float between non-compute kernels, as `inspect` lists them).")
    @click.option("--json", "as_json", is_flag=True, help="Last stdout line: one JSON object (plan + report; on a --max-handoffs refusal "
                                                  "ok false, plan null and the hand-off count).")
    @click.option("-v", "--verbose", is_flag=True, help="Echo the builder's warnings and errors.")
    @click.option("--overwrite", is_flag=True,
                  help="Replace an existing --out that is not a plan build wrote (one it wrote is always replaced).")
    def build(onnx_path: str, out: str | None, backend: str | None, batch: str | None, workspace_mib: int,
              ccs: tuple[str, ...], opt_level: int | None, no_timing_cache: bool, require_int8: float | None,
              max_handoffs: int | None, as_json: bool, verbose: bool, overwrite: bool) -> None:
        """Build a strongly typed engine from a QDQ graph (precision comes only from its Q/DQ nodes).

        \b
        Writes PLAN atomically, PLAN.json (ONNX sha256, backend, version, targets, shapes, options,
        layer information) and prints the per-layer precision summary of `inspect`.

        \b
        Exit codes: 0 built; 1 --require-int8 not met (plan written) or --max-handoffs exceeded (nothing
        written); 2 bad input (not an ONNX graph, an output path it must not write, a graph the parser refuses).
        """
        from .trt.builder import BuildConfig, EngineRefused, build_checked, parse_batch

        cfg = BuildConfig(backend=backend or "tensorrt-rtx", batch=None if batch is None else parse_batch(batch),
                          workspace_mib=workspace_mib,
                          compute_capabilities=tuple(ccs), optimization_level=opt_level,
                          timing_cache=not no_timing_cache)
        if out is not None and not out.strip():  # not the default: the user asked for a path and gave none
            raise MixqError("--out is empty: give a file path")
        plan = Path(out) if out is not None else Path(onnx_path).with_suffix(".plan")
        try:
            checked = build_checked(onnx_path, plan, cfg, require_int8=require_int8, max_handoffs_limit=max_handoffs,
                                    verbose=verbose, overwrite=overwrite)
        except EngineRefused as e:  # a verdict: --json still ends with its object, then the error line
            if as_json:
                emit_json({"plan": None, "ok": False, "refused": str(e), "handoffs": e.handoffs})
            raise
        res, rep, ok = checked.result, checked.report, checked.int8_ok
        for w in rep.warnings:
            click.echo(f"warning: {w}", err=True)
        if as_json:
            emit_json({"plan": str(plan), "plan_key": res.meta["plan_key"], "build_seconds": res.meta["build_seconds"],
                       "int8_mac_fraction": round(rep.int8_mac_fraction, 6),
                       "fallbacks": [str(f) for f in rep.fallbacks],
                       "standalone_clips": rep.standalone_clips, "int4_weight_layers": rep.int4_weight_layers,
                       "handoffs": rep.handoffs, "handoff_bytes": rep.handoff_bytes, "engine_layers": len(rep.layers),
                       "ok": ok})
        else:
            click.echo(f"built {plan} ({res.meta['plan_key']}) in {res.seconds:.1f} s", err=True)
            click.echo(rep.summary())
            click.echo(str(plan))
        if not ok:
            click.echo(f"error: int8 MAC fraction {rep.int8_mac_fraction:.4f} is below --require-int8 "
                       f"{require_int8}", err=True)
            sys.exit(1)

    @cli.command("inspect", context_settings=CONTEXT)
    @click.argument("plan", type=click.Path())
    @click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None,
                  help="The ONNX graph the plan was built from, if it moved [default: the path in PLAN.json]; "
                       "its sha256 must be the one PLAN.json records.")
    @click.option("--layers", "show_layers", is_flag=True, help="Also print every engine layer with its datatypes.")
    @click.option("--json", "as_json", is_flag=True,
                  help="Last stdout line: one JSON object (int8_mac_fraction, fallbacks, layers, …).")
    def inspect_cmd(plan: str, onnx_path: str | None, show_layers: bool, as_json: bool) -> None:
        """Per-layer precision of a built plan, mapped back to the ONNX nodes, and its hand-offs (no GPU needed)."""
        from .trt.inspect import inspect_plan

        rep = inspect_plan(plan, onnx_path)
        for w in rep.warnings:
            click.echo(f"warning: {w}", err=True)
        if show_layers and not as_json:
            for li in rep.layers:
                click.echo(f"{li['precision']:12s} {li['type']:12s} {li['name'][:60]:60s} "
                           f"{','.join(li['onnx_nodes'])[:120]}")
        if as_json:
            emit_json(rep.to_dict())
        else:
            click.echo(rep.summary())

    @cli.command(context_settings=CONTEXT)
    @click.argument("plan", type=click.Path())
    @click.option("--input", "input_paths", multiple=True, type=click.Path(dir_okay=False),
                  help=".npy per engine input (float NCHW); default: one random batch of the profile's OPT shape.")
    @click.option("--out", type=click.Path(dir_okay=False), default=None,
                  help=f"Write the outputs to this .npz (one array per output name, plus {RUN_MARKER}: the plan's "
                       "sha256). An existing file is replaced only if run wrote it, or with --overwrite.")
    @click.option("--overwrite", is_flag=True, help="Replace an existing --out that run did not write.")
    @_backend_opt
    def run(plan: str, input_paths: tuple[str, ...], out: str | None, overwrite: bool, backend: str | None) -> None:
        """Run a plan once on an NVIDIA GPU (refuses plans built for another backend version or GPU)."""
        import numpy as np

        from .trt.builder import read_plan_meta
        from .trt.runtime import run_plan
        from .utils import atomic_path, check_output_file, make_parent

        meta = read_plan_meta(plan)  # a plan, not some other file, before anything else is judged
        if out is not None:  # "" included: check_output_file refuses it
            check_output_file(out, inputs=(plan, *input_paths), refuse_suffixes=(".plan", ".onnx", ".json"),
                              ours=("a run's outputs", _run_npz), overwrite=overwrite)
        outs = run_plan(plan, list(input_paths) or None, backend)
        for k, v in outs.items():
            click.echo(f"{k}: shape {list(v.shape)} dtype {v.dtype} mean {float(v.mean()):.5g} "
                       f"argmax[:8] {v.reshape(len(v), -1).argmax(1)[:8].tolist() if v.ndim else v}")
        if out is not None:
            make_parent(out)
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.savez(f, **outs, **{RUN_MARKER: np.array(meta["plan_sha256"])})
            click.echo(out)

    @cli.command(context_settings=CONTEXT)
    @click.argument("plan", type=click.Path())
    @click.option("--fp-onnx", type=click.Path(dir_okay=False), default=None,
                  help="Float ONNX (export --fp): built as an FP16 engine and timed beside the QDQ plan (writes "
                       "PLAN-stem.fp16.onnx, .fp16.plan and its .json beside the plan).")
    @click.option("--ort-onnx", type=click.Path(dir_okay=False), default=None,
                  help="Graph for the onnxruntime row [default: --fp-onnx, else the plan's ONNX].")
    @click.option("--batch", type=click.IntRange(min=1), default=None, help="Batch size [default: the profile's OPT].")
    @click.option("--iters", type=int, default=200, show_default=True,
                  help="Timed runs per row (at least 1): p50/p99 and throughput come from these.")
    @click.option("--warmup", type=int, default=20, show_default=True,
                  help="Untimed runs before the timed ones (at least 0): kernel selection, clocks and caches settle.")
    @click.option("--overwrite", is_flag=True,
                  help="Let the FP16 graph, plan, PLAN.json and timing cache that --fp-onnx writes beside the plan "
                       "replace files there that bench did not write.")
    @_backend_opt
    @click.option("--json", "as_json", is_flag=True, help="Last stdout line: one JSON object.")
    def bench(plan: str, fp_onnx: str | None, ort_onnx: str | None, batch: int | None, iters: int, warmup: int,
              overwrite: bool, backend: str | None, as_json: bool) -> None:
        """Latency p50/p99 and throughput: QDQ engine vs FP16 engine vs onnxruntime (NVIDIA GPU only)."""
        from .trt.runtime import bench as run_bench

        rep = run_bench(plan, fp_onnx, batch, iters, warmup, ort_onnx, backend, overwrite=overwrite)
        if as_json:
            emit_json(rep.to_dict())
        else:
            click.echo(rep.table())
