"""Pieces shared by `cli.py` and `cli_trt.py`: light on purpose (click and the standard library only).

Nothing here may import torch, onnx, numpy or any other heavy module at module level: every CLI
invocation, `--help` and argument errors included, imports this file.
"""
from __future__ import annotations

import json
from typing import Any

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
POSITIVE = click.IntRange(min=1)  # counts and sizes: 0 or a negative number is bad input, never "all"


def emit_json(obj: Any) -> None:
    """One JSON object (or list) on one stdout line, keys sorted: the `--json` output of every command."""
    click.echo(json.dumps(obj, sort_keys=True))
