"""The shared CLIP trunk run by ONNX Runtime on the CPU (``backbone.runtime = "onnxruntime"``).

`OrtTrunk` is a `streamguard.detectors.trunk.LocalTrunk` like `ClipTrunk`, and gives what it gives: the
hidden states entering each requested block (embeddings, pre-layernorm, blocks), computed by one ONNX
graph per set of branch points instead of torch. The graph is exported into ``<backbone.cache_dir>/
onnx-trunk`` (`streamguard.backbone.onnx_runtime`: keyed by the weights, the image size, the branch points,
opset and torch release, and the int8 recipe), checked against torch's trunk at fp32, and
quantized by ONNX Runtime at int8 / int8-mixed with the layers that precision keeps float left out.
A ViT-B/16 graph is ~350 MB at fp32 (~175 MB at int8-mixed): a cache, never the repository.

The heads run on ONNX Runtime too (`OrtHead`, from `OrtTrunk.make_head`): pin-clip's and mpft's two tuned
blocks are a quarter of the block passes per image. A head is built on the fp32 encoder it holds, exported
(keyed by its weights, class, options and branch block), checked against torch, and quantized as the trunk,
its blocks counted from the branch point. A head ONNX Runtime cannot run that way (its export fails, or it
has blocks the int8 recipe cannot find) runs in torch at the trunk's precision, as on the torch trunk; one
without blocks (univfd's pooling and probe) runs its fp32 graph at every precision, as torch leaves it float.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from streamguard.backbone import ClipImageEncoder, vit
from streamguard.backbone.digest import weights_digest
from streamguard.backbone.onnx_runtime import (
    HEAD_BLOCK_MATMUL,
    INPUT,
    OPSET,
    cached_graph,
    check_graph,
    eager_copy,
    eager_module,
    export_graph,
    export_module,
    graph_key,
    open_session,
    parity_pixels,
)
from streamguard.backbone.precision import REFERENCE, PrecisionUnsupported, check_device
from streamguard.backends.torch_trunk import EncoderTrunk, TorchHead, hidden_states
from streamguard.detectors.spec import CLASS_TOKENS, BranchPoint

log = structlog.get_logger(__name__)

CACHE_NAME = "onnx-trunk"
HEAD_INPUT = "hidden"
HEAD_OUTPUT = "logits"


def cache_dir(backbone_cache: Path) -> Path:
    """Where the trunk graphs of a backbone cached in ``backbone_cache`` (``backbone.cache_dir``) go."""
    return Path(backbone_cache).expanduser() / CACHE_NAME


def check_cpu(device: str | torch.device) -> None:
    """Refuse ONNX Runtime on another device than the CPU, before anything is loaded."""
    if torch.device(device).type != "cpu":
        raise PrecisionUnsupported(
            "backbone.runtime = \"onnxruntime\" runs on the CPU only (the trunk graph runs on ONNX Runtime's CPU "
            f"execution provider), not on {torch.device(device).type}; set detectors.device = \"cpu\" or "
            "backbone.runtime = \"torch\"")


def _output(block: BranchPoint) -> str:
    return "class_tokens" if block == CLASS_TOKENS else f"hidden{block}"


def export_trunk(encoder: ClipImageEncoder, blocks: Sequence[BranchPoint], path: Path, outputs: Sequence[str],
                 input_name: str = INPUT, image_size: int | None = None) -> Path:
    """Write the trunk of fp32 ``encoder`` to ``blocks`` as ONNX (``outputs``: one name per block, in order) for
    pixels of ``image_size`` (default: the encoder's own), and refuse it unless ONNX Runtime computes torch's
    hidden states on it. The Triton build writes its trunk model with it, under Triton's tensor names."""
    size = image_size or encoder.image_size
    export_graph(_TrunkGraph(eager_copy(encoder), blocks), size, path, outputs, input_name)
    pixels = parity_pixels(size)
    with torch.inference_mode():
        expected = hidden_states(encoder, encoder.model.vision_model.encoder.layers, pixels, blocks)
    check_graph(path, pixels, {name: hidden.numpy() for name, hidden in zip(outputs, expected.values(), strict=True)},
                input_name)
    return path


class _TrunkGraph(torch.nn.Module):
    """What the graph computes: `hidden_states` at ``blocks``, in their order."""

    def __init__(self, encoder: ClipImageEncoder, blocks: Sequence[BranchPoint]) -> None:
        super().__init__()
        self.encoder = encoder
        self.blocks = tuple(blocks)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.encoder.model.vision_model.encoder.layers
        return tuple(hidden_states(self.encoder, layers, pixels, self.blocks).values())


def export_head(head: torch.nn.Module, hidden: torch.Tensor, path: Path) -> Path:
    """Write fp32 ``head`` (hidden states (N, T, H) -> one logit per image, read as `TorchHead` reads its
    output) as ONNX, batch axis dynamic, and refuse it unless ONNX Runtime computes torch's logits on
    ``hidden`` (a batch of two)."""
    export_module(_HeadGraph(eager_module(head)), hidden[:1], path, [HEAD_OUTPUT], HEAD_INPUT)
    with torch.inference_mode():
        expected = _HeadGraph(head)(hidden).numpy()
    check_graph(path, hidden, {HEAD_OUTPUT: expected}, HEAD_INPUT)
    return path


def head_key(head: torch.nn.Module, detector: str, options: Mapping[str, Any], block: BranchPoint,
             image_size: int) -> str:
    """What a head's exported graph depends on, as `graph_key` for the trunk's. A head's code is not fixed
    like CLIP's: its class, and the options its loader may have baked in as constants, count too."""
    digest = hashlib.sha256()
    for part in (weights_digest(head.state_dict()), f"{type(head).__module__}.{type(head).__qualname__}",
                 json.dumps(dict(options), sort_keys=True, default=str)):
        digest.update(part.encode() + b"\0")
    return (f"head-{detector}-{digest.hexdigest()[:16]}-b{block}-s{image_size}-op{OPSET}"
            f"-torch{torch.__version__.split('+')[0]}")


class _HeadGraph(torch.nn.Module):
    """What a head's graph computes: the logit per image `TorchHead.predict` takes from the head's output."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).reshape(hidden.shape[0], -1)[:, 0].float()


class OrtHead:
    """A head's graph in ONNX Runtime, as a backend runs it: what `TorchHead` gives (non-finite logits
    included, which the runner turns into errors)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Heads run at once, one per runner thread, right after the trunk: spinning pools would fight for the
        # cores the others compute on.
        self._session: Any = open_session(path, spinning=False)

    def predict(self, hidden: torch.Tensor) -> list[float | None]:
        array = np.ascontiguousarray(hidden.detach().to("cpu", torch.float32).numpy())
        (logits,) = self._session.run([HEAD_OUTPUT], {HEAD_INPUT: array})
        return list(logits.reshape(len(array), -1)[:, 0].tolist())

    def close(self) -> None:
        self._session = None


class OrtTrunk(EncoderTrunk):
    """``encoder``'s trunk in ONNX Runtime, its graph for a set of branch points made at the first `prepare` or
    `run` for them. ``encoder`` stays fp32 and untouched: heads copy their blocks from it."""

    def __init__(self, encoder: ClipImageEncoder, cache_dir: Path, precision: str = REFERENCE) -> None:
        check_device(precision, "cpu")  # an unknown precision is refused before any export
        if encoder.precision != REFERENCE:
            raise PrecisionUnsupported(f"ONNX Runtime exports the fp32 encoder, this one runs at {encoder.precision}")
        self._encoder = encoder.eval().requires_grad_(False).to("cpu")
        self._cache_dir = Path(cache_dir)
        self._precision = precision
        self._key = graph_key(encoder, "trunk")  # hashes the weights: once, not per set of branch points
        self._sessions: dict[tuple[BranchPoint, ...], Any] = {}

    def prepare(self, blocks: Sequence[BranchPoint]) -> None:
        """Export (first time) and load the graph for ``blocks``: at start-up, not in a first batch's timeout."""
        self._session(tuple(blocks))

    def run(self, pixels: Sequence[np.ndarray], blocks: Sequence[BranchPoint]) -> dict[BranchPoint, torch.Tensor]:
        """What each of ``blocks`` receives (`hidden_states`) for one batch, on the CPU."""
        size = self._encoder.image_size
        array = np.ascontiguousarray(np.stack(pixels), dtype=np.float32)
        if array.shape[1:] != (3, size, size):
            raise ValueError(f"the ONNX Runtime trunk takes pixels of shape (3, {size}, {size}), "
                             f"got {array.shape[1:]}")
        key = tuple(blocks)
        outputs = self._session(key).run([_output(block) for block in key], {INPUT: array})
        return {block: torch.from_numpy(out) for block, out in zip(key, outputs, strict=True)}

    def make_head(self, load: Callable[[str], torch.nn.Module], block: BranchPoint, detector: str,
                  options: Mapping[str, Any]) -> OrtHead | TorchHead:
        """``detector``'s head, which ``load`` builds at the precision it is given, branching at ``block``: on
        ONNX Runtime, or in torch at this trunk's precision when it cannot run there (a warning says why)."""
        module = load(REFERENCE).eval().requires_grad_(False)
        try:
            return OrtHead(self._head_graph(module, block, detector, options))
        except Exception as exc:  # noqa: BLE001 - any head that runs on the torch trunk must run here
            log.warning("trunk.head_torch_fallback", detector=detector, precision=self._precision,
                        reason=f"{type(exc).__name__}: {exc}")
        return TorchHead(module if self._precision == REFERENCE else load(self._precision), "cpu")

    def close(self) -> None:
        self._sessions.clear()

    def _session(self, blocks: tuple[BranchPoint, ...]) -> Any:
        session = self._sessions.get(blocks)
        if session is None:
            key = f"{self._key}-b{'-'.join(map(str, blocks))}"
            path = cached_graph(self._cache_dir, key, self._precision, vit.num_layers(self._encoder),
                                lambda fp32: self._export(blocks, fp32))
            session = self._sessions[blocks] = open_session(path)
        return session

    def _export(self, blocks: tuple[BranchPoint, ...], path: Path) -> None:
        export_trunk(self._encoder, blocks, path, [_output(block) for block in blocks])

    def _head_graph(self, head: torch.nn.Module, block: BranchPoint, detector: str,
                    options: Mapping[str, Any]) -> Path:
        # The torch trunk converts the blocks a head copied and nothing else: a head without any runs float at
        # every precision, so its fp32 graph computes what it would. One with blocks the recipe cannot find
        # by name is refused by `quantize_graph` (and falls back), rather than run float under an int8 version.
        layer = type(self._encoder.model.vision_model.encoder.layers[0])
        has_blocks = any(isinstance(module, layer) for module in head.modules())
        key = head_key(head, detector, options, block, self._encoder.image_size)
        return cached_graph(self._cache_dir, key, self._precision if has_blocks else REFERENCE,
                            vit.num_layers(self._encoder), lambda fp32: self._export_head(head, block, fp32),
                            pattern=HEAD_BLOCK_MATMUL, first_block=block if isinstance(block, int) else 0)

    def _export_head(self, head: torch.nn.Module, block: BranchPoint, path: Path) -> None:
        # Real hidden states rather than noise: CLIP's outlier channels (~100) are what parity must hold on.
        pixels = parity_pixels(self._encoder.image_size)
        with torch.inference_mode():
            hidden = hidden_states(self._encoder, self._encoder.model.vision_model.encoder.layers, pixels, [block])
        export_head(head, hidden[block], path)
