"""Editing Triton config templates (protobuf text format) line by line: each edit must find exactly what it
expects, so a template that drifted fails the build instead of writing a config Triton reads otherwise."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Literal

Device = Literal["cpu", "gpu"]


def _one(config: str, pattern: str, replacement: str, what: str, flags: int = 0) -> str:
    config, count = re.subn(pattern, lambda _: replacement, config, flags=flags)
    if count != 1:
        raise ValueError(f"template has {count} {what}, expected 1")
    return config


def set_parameter(config: str, key: str, value: str) -> str:
    pattern = re.compile(r'(parameters\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value\s*\{\s*string_value:\s*)"[^"]*"')
    # json.dumps gives a quoted string whose escapes protobuf's text format reads the same way.
    config, count = pattern.subn(lambda m: m.group(1) + json.dumps(value), config)
    if count != 1:
        raise ValueError(f"template has {count} entries for parameter {key!r}, expected 1")
    return config


def add_parameter(config: str, key: str, value: str) -> str:
    return config.rstrip("\n") + f"\nparameters {{ key: {json.dumps(key)} value {{ string_value: {json.dumps(value)} }} }}\n"


def set_kind(config: str, device: Device) -> str:
    return _one(config, r"\bKIND_(CPU|GPU)\b", "KIND_GPU" if device == "gpu" else "KIND_CPU", "instance kinds")


def set_name(config: str, name: str) -> str:
    return _one(config, r'(?m)^name:\s*"[^"]*"', f"name: {json.dumps(name)}", "name lines")


def tensors(kind: str, specs: Sequence[tuple[str, Sequence[int]]]) -> str:
    """An ``input`` or ``output`` line: FP32 tensors by name and dims (the batch axis left out)."""
    body = ", ".join(f"{{ name: {json.dumps(name)}, data_type: TYPE_FP32, dims: {list(dims)} }}" for name, dims in specs)
    return f"{kind} [{body}]"


def set_tensors(config: str, kind: Literal["input", "output"], specs: Sequence[tuple[str, Sequence[int]]]) -> str:
    return _one(config, rf"(?m)^{kind} \[.*\]$", tensors(kind, specs), f"{kind} lines")


def set_warmup_input(config: str, name: str, dims: Sequence[int]) -> str:
    line = f'  inputs {{ key: {json.dumps(name)} value {{ data_type: TYPE_FP32 dims: {list(dims)} zero_data: true }} }}'
    return _one(config, r"(?m)^  inputs \{ key: .*\}$", line, "warm-up inputs")


def strip_accelerator(config: str) -> str:
    """CPU instances get no GPU execution accelerator (Triton refuses one on KIND_CPU)."""
    return _one(config, r"# accelerator-begin\n.*?# accelerator-end\n", "", "accelerator blocks", flags=re.S)
