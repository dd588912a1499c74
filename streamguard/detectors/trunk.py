"""Shared trunks: detectors that branch off the same backbone share its frozen blocks, in this process.

The built-in detectors are all the same CLIP encoder under different last blocks and heads: univfd reads
the frozen encoder's class token after every block (`CLASS_TOKENS`, gathered on the trunk's own pass),
pin-clip and mpft tune only its last two blocks. Run separately, the encoder costs 3 x 12 block passes an
image; branching off one trunk costs 12 + 2 + 2.

Each detector keeps its own `DetectorRunner` (thread, timeout, breaker, errors): its backend here is a
`BranchBackend` that asks the shared trunk for the hidden states at its branch point, then runs its head.
On Triton (``triton.trunk_model``) the trunk is the shared-trunk ensemble and a branch point is the
detector's output: one request per batch answers every detector (`streamguard.backends.triton_trunk`).
The first branch to ask for a batch computes the trunk up to every branch point in use, under the trunk's
lock, while the others wait; the rest read what it left. Batches are recognised by identity: detectors with
equal input contracts get the very same prepared arrays from the `Scorer`, and an entry holds them, so an
id is never reused while its entry lives. Branches are grouped by contract: those with another contract
get their own trunk pass (their pixels differ, and so would the trunk's output), to their own blocks.
A trunk compiled per set of branch points (ONNX Runtime's, ``backbone.runtime``) is made once every branch
is added (`SharedTrunks.prepare`, from `Scorer.start`), not in the first batch; such a trunk also runs the
heads on its runtime, each compiled as its branch is added.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import structlog

from streamguard.config import Settings
from streamguard.detectors.spec import (
    CLIP_TRUNK,
    BranchContext,
    BranchPoint,
    DetectorInput,
    DetectorSpec,
    LoadContext,
)
from streamguard.extras import missing_extra, require
from streamguard.intake.contract import InputContract

log = structlog.get_logger(__name__)

FEATURE = "the in-process detector backend"
# Batches whose hidden states are kept for branches that have not read them yet (ViT-B/16, a batch of 16
# and two branch points: 19 MB each). A branch that never reads (its breaker open, its call refused) must
# not pin memory: the oldest entries go first, and a branch that comes late to one recomputes it.
MAX_PENDING_BATCHES = 8


class Trunk(Protocol):
    """What detectors branch off: run once per batch, it answers at every branch point asked for."""

    def run(self, pixels: Sequence[np.ndarray], blocks: Sequence[Any]) -> dict[Any, Any]:
        """For one batch of images, what each of ``blocks`` (branch points, in order) receives."""
        ...

    def close(self) -> None: ...


class LocalTrunk(Trunk, Protocol):
    """A trunk in this process: a loaded backbone that heads are built on."""

    @property
    def backbone(self) -> Any:
        """What heads are built on (`BranchContext.trunk`)."""
        ...

    def resolve(self, branch_block: BranchPoint | None) -> BranchPoint:
        """The branch point a `TrunkSpec.branch_block` means on this backbone (a block index, or
        `CLASS_TOKENS`); ValueError if it has none."""
        ...

    @property
    def precision(self) -> str:
        """What its blocks run at (`BranchContext.precision`)."""
        ...


def _load_clip(settings: Settings, device: str) -> LocalTrunk:
    from streamguard.backbone import load_backbone
    from streamguard.backbone.precision import check_device

    precision = settings.backbone.precision
    check_device(precision, device)
    if settings.backbone.runtime == "onnxruntime":
        from streamguard.backends.ort_trunk import OrtTrunk, cache_dir, check_cpu

        check_cpu(device)
        require('backbone.runtime = "onnxruntime"', "inprocess")
        return OrtTrunk(load_backbone(settings.backbone, device, precision="fp32"),
                        cache_dir(settings.backbone.cache_dir), precision)
    from streamguard.backends.torch_trunk import ClipTrunk

    # Loaded at fp32 and converted by the trunk: heads copy their blocks from the float encoder, to merge
    # adapters into them before they are quantized.
    return ClipTrunk(load_backbone(settings.backbone, device, precision="fp32"), device, precision)


# The trunks streamguard knows how to load, by `TrunkSpec.backbone`.
LOADERS: dict[str, Callable[[Settings, str], LocalTrunk]] = {CLIP_TRUNK: _load_clip}


@dataclass
class _Entry:
    batch: Sequence[DetectorInput]  # held so the ids in the key stay this batch's
    hidden: dict[Any, Any]
    unread: int
    error: Exception | None = None  # the trunk failed on this batch: every branch raises it, none retries


@dataclass
class _Group:
    """The branches of one trunk that take the same input: the blocks they need, how many they are."""

    blocks: set[Any] = field(default_factory=set)  # block indices in-process, output names on Triton
    branches: int = 0


@dataclass
class SharedTrunk:
    """One loaded trunk, the branch points its heads need, and the batches computed for them."""

    name: str
    trunk: Trunk
    _groups: dict[InputContract | None, _Group] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: OrderedDict[tuple[Any, ...], _Entry] = field(default_factory=OrderedDict)
    _failed: Exception | None = None  # `prepare` failed: no batch can run

    @property
    def branches(self) -> int:
        return sum(group.branches for group in self._groups.values())

    def add_branch(self, block: Any, contract: InputContract | None) -> None:
        with self._lock:
            group = self._groups.setdefault(contract, _Group())
            group.blocks.add(block)
            group.branches += 1

    def hidden(self, batch: Sequence[DetectorInput], block: Any, contract: InputContract | None) -> Any:
        """The hidden states entering ``block`` for ``batch``: computed once for every branch of this trunk
        that takes the same input."""
        key = (contract, *(id(item.pixels) for item in batch))
        with self._lock:
            if self._failed is not None:
                raise self._failed
            group = self._groups[contract]
            entry = self._pending.get(key)
            if entry is None or any(a.pixels is not b.pixels for a, b in zip(entry.batch, batch, strict=True)):
                if any(item.pixels is None for item in batch):
                    raise ValueError("a shared trunk needs pixels; declare an InputContract on the detector")
                entry = _Entry(batch, {}, group.branches)
                try:
                    entry.hidden = self.trunk.run([item.pixels for item in batch], in_order(group.blocks))
                except Exception as exc:  # noqa: BLE001 - handed to every branch below
                    entry.error = exc
                self._pending[key] = entry
                while len(self._pending) > MAX_PENDING_BATCHES:
                    self._pending.popitem(last=False)
            entry.unread -= 1
            if entry.unread <= 0:
                self._pending.pop(key, None)
            if entry.error is not None:
                raise entry.error
            return entry.hidden[block]

    def prepare(self) -> None:
        """Let a trunk that compiles per set of branch points (`OrtTrunk.prepare`) do it for each input now.
        A failure is every later batch's, as if the trunk had failed on it, not retried per batch."""
        prepare = getattr(self.trunk, "prepare", None)
        if prepare is None:
            return
        with self._lock:
            try:
                for group in self._groups.values():
                    prepare(in_order(group.blocks))
            except Exception as exc:  # noqa: BLE001 - raised to every branch by `hidden`
                log.error("trunk.prepare_failed", trunk=self.name, error=f"{type(exc).__name__}: {exc}")
                self._failed = exc

    def close(self) -> None:
        with self._lock:
            self._pending.clear()
        self.trunk.close()


def in_order(points: set[Any]) -> list[Any]:
    """Branch points in the order trunks take them: block indices ascending, then named points
    (`CLASS_TOKENS`, or a Triton ensemble's outputs) by name."""
    return sorted(points, key=lambda p: (0, p, "") if isinstance(p, int) else (1, 0, str(p)))


class BranchBackend:
    """`DetectorBackend` of a detector on a shared trunk: the trunk's hidden states, then its own head."""

    def __init__(self, trunk: SharedTrunk, block: Any, contract: InputContract | None, head: Any) -> None:
        self._trunk = trunk
        self._block = block
        self._contract = contract
        self._head = head

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        if not batch:
            return []
        return self._head.predict(self._trunk.hidden(batch, self._block, self._contract))

    def ready(self) -> bool:
        """The trunk's server is there (Triton); an in-process trunk always is."""
        probe = getattr(self._trunk.trunk, "ready", None)
        return probe is None or bool(probe())

    def close(self) -> None:
        self._head.close()


class SharedTrunks:
    """The shared trunks of one `Scorer`: each loaded on its first branch, closed with the scorer."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._trunks: dict[str, SharedTrunk] = {}
        self._failed: dict[str, Exception] = {}
        self._lock = threading.Lock()

    def serves(self, spec: DetectorSpec, backend_kind: str) -> bool:
        """Whether ``spec`` runs as a branch here: in-process with ``detectors.shared_trunk`` on a trunk this
        process can load, or on Triton when ``triton.trunk_model`` names the CLIP trunk's ensemble."""
        if spec.trunk is None:
            return False
        if backend_kind == "triton":
            return self._settings.triton.trunk_model is not None and spec.trunk.backbone == CLIP_TRUNK
        return self._settings.detectors.shared_trunk and spec.trunk.backbone in LOADERS

    def backend(self, spec: DetectorSpec, ctx: LoadContext, backend_kind: str = "inprocess") -> BranchBackend:
        """``spec``'s head on its trunk (loading the trunk if it is the first branch). Raises what loading
        raised, or `MissingExtra` naming the extra when torch is not installed."""
        trunk_spec = spec.trunk
        assert trunk_spec is not None
        if backend_kind == "triton":
            return self._on_triton(spec)
        try:
            shared = self._trunk(trunk_spec.backbone, lambda: LOADERS[trunk_spec.backbone](self._settings, ctx.device))
            local: LocalTrunk = shared.trunk  # type: ignore[assignment]
            block = local.resolve(trunk_spec.branch_block)

            def load(precision: str) -> Any:
                return trunk_spec.load_head(BranchContext(trunk=local.backbone, device=ctx.device,
                                                          options=ctx.options, precision=precision))

            # A trunk with its own runtime for heads (`OrtTrunk.make_head`) builds them itself, here at start-up.
            make_head = getattr(local, "make_head", None)
            if make_head is not None:
                head = make_head(load, block, spec.name, ctx.options)
            else:
                from streamguard.backends.torch_trunk import TorchHead

                head = TorchHead(load(local.precision), ctx.device)
        except ModuleNotFoundError as exc:
            extra = missing_extra(exc, FEATURE)
            if extra is None:
                raise
            raise extra from exc
        shared.add_branch(block, spec.contract)
        log.info("trunk.branch_added", detector=spec.name, trunk=shared.name, block=block,
                 branches=shared.branches)
        return BranchBackend(shared, block, spec.contract, head)

    def _on_triton(self, spec: DetectorSpec) -> BranchBackend:
        from streamguard.backends.triton_trunk import Logits, TritonTrunk

        model = self._settings.triton.trunk_model
        assert model is not None
        shared = self._trunk(f"triton:{model}", lambda: TritonTrunk(model, self._settings.triton))
        output = shared.trunk.branch(spec.name, spec.served_version)  # type: ignore[attr-defined]
        shared.add_branch(output, spec.contract)
        log.info("trunk.branch_added", detector=spec.name, trunk=shared.name, output=output, branches=shared.branches)
        return BranchBackend(shared, output, spec.contract, Logits())

    def _trunk(self, name: str, load: Callable[[], Trunk]) -> SharedTrunk:
        with self._lock:
            if name in self._failed:
                raise self._failed[name]  # one slow failure, not one per branch
            if name not in self._trunks:
                try:
                    self._trunks[name] = SharedTrunk(name, load())
                except Exception as exc:
                    self._failed[name] = exc
                    raise
                log.info("trunk.loaded", trunk=name)
            return self._trunks[name]

    def prepare(self) -> None:
        """Once every branch is added (`Scorer.start`): each trunk readies itself for the branch points in use."""
        with self._lock:
            trunks = list(self._trunks.values())
        for shared in trunks:
            shared.prepare()

    def close(self) -> None:
        with self._lock:
            trunks, self._trunks = list(self._trunks.values()), {}
        for shared in trunks:
            shared.close()
