"""The torch side of a CLIP-head detector: its linear head, the served model, the head that branches off a
shared trunk, and loading them from files.

The served model is encoder (adapters merged, for the detectors that have them) -> projection ->
L2-normalise -> linear -> one logit: the cost of a linear probe. A head that reads every block's class
token (univfd since its 2026-12 weights) takes those instead of the projection. Adapters or a head made for
another backbone are refused with the command that makes fitting ones.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from streamguard.backbone import ClipImageEncoder, vit
from streamguard.backbone.lora import Adapters, LoraMismatch, merge_adapters, read_adapters
from streamguard.backbone.precision import REFERENCE, PrecisionUnsupported, apply_precision, quantize_encoder
from streamguard.builtin.cliphead.detector import HEAD_FILE, LORA_FILE, ClipHeadDetector
from streamguard.detectors.spec import CLASS_TOKENS, BranchPoint, check_branch_point


class HeadMismatch(ValueError):
    """A head made for embeddings of another width than the backbone gives."""


class LinearProbe(torch.nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(embed_dim, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # Normalising first makes the probe see direction only, as CLIP's own similarity does.
        return self.linear(torch.nn.functional.normalize(embeddings, dim=-1)).squeeze(-1)


def class_token_features(classes: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """(N, blocks, hidden) class tokens -> (N, blocks * hidden): each layer-normalised without weights and made
    unit length, so that no block outweighs another by its scale before the probe chooses (RINE's reading)."""
    unit = torch.nn.functional.normalize(torch.nn.functional.layer_norm(classes, (hidden_size,)), dim=-1)
    return unit.flatten(1)


class ClassTokenHead(torch.nn.Module):
    """A probe on the class token after every block, (N, blocks, hidden) -> one logit per image."""

    def __init__(self, probe: LinearProbe, hidden_size: int) -> None:
        super().__init__()
        self.probe = probe.eval()
        self.hidden_size = hidden_size

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        return self.probe(class_token_features(classes, self.hidden_size))


class ClassTokenModel(torch.nn.Module):
    """The whole served detector whose head reads every block: pixels -> CLIP blocks -> class-token head."""

    def __init__(self, encoder: ClipImageEncoder, head: ClassTokenHead) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.head = head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(vit.class_tokens(self.encoder, pixels))


class ClipHeadModel(torch.nn.Module):
    """The whole served detector: pixels -> CLIP encoder -> linear probe -> one logit per image."""

    def __init__(self, encoder: ClipImageEncoder, probe: LinearProbe) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.probe = probe.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.probe(self.encoder(pixels))


def load_probe(detector: ClipHeadDetector, directory: Path, embed_dim: int) -> LinearProbe:
    """The head of ``directory``; refuses one made for embeddings of another width."""
    path = directory / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(detector.missing_weights(directory))
    state = load_file(str(path))
    probe = LinearProbe(int(state["linear.weight"].shape[1]))
    if probe.linear.in_features != embed_dim:
        raise HeadMismatch(f"the {detector.name} head in {directory} expects {probe.linear.in_features}-d embeddings "
                           f"but the backbone gives {embed_dim}; {detector.retrain_hint()}")
    probe.load_state_dict(state, strict=True)
    return probe.eval()


def load_adapters(detector: ClipHeadDetector, directory: Path, encoder: ClipImageEncoder) -> Adapters:
    """The adapters of ``directory``, checked against the encoder they are to be merged into."""
    if not detector.has_weights(directory):
        raise FileNotFoundError(detector.missing_weights(directory))
    adapters = read_adapters(directory / LORA_FILE)
    layout = adapters.layout
    total = int(encoder.config.num_hidden_layers)
    made_for = (f"{layout.get('num_hidden_layers', '?')} blocks of width {layout.get('hidden_size', adapters.width)} "
                f"(backbone {layout.get('backbone', '?')})")
    this = f"{total} blocks of width {encoder.hidden_size} (backbone {encoder.version})"
    fits = adapters.width == encoder.hidden_size and max(adapters.layers) < total
    if not fits or layout.get("num_hidden_layers") != total:
        raise LoraMismatch(f"the {detector.name} adapters in {directory} were made for a CLIP with {made_for}, but "
                           f"the backbone has {this}: {detector.retrain_hint()}")
    if layout.get("backbone") != encoder.version:
        # Adapters are deltas on particular weights: on other weights of the same shape they mean nothing.
        raise LoraMismatch(f"the {detector.name} adapters in {directory} were trained on backbone "
                           f"{layout.get('backbone')}, this backbone is {encoder.version}: {detector.retrain_hint()}")
    return adapters


def class_token_width(encoder: ClipImageEncoder) -> int:
    """How many values a class-token probe reads off ``encoder``: every block's class token."""
    return vit.num_layers(encoder) * encoder.hidden_size


def load_class_token_head(detector: ClipHeadDetector, directory: Path, encoder: ClipImageEncoder) -> ClassTokenHead:
    return ClassTokenHead(load_probe(detector, directory, class_token_width(encoder)), encoder.hidden_size)


def build_served(detector: ClipHeadDetector, encoder: ClipImageEncoder, directory: Path,
                 precision: str | None = None) -> ClipHeadModel | ClassTokenModel:
    """The whole served model on ``encoder``, which it takes over: adapters are merged into it in place, then
    its blocks are converted to ``precision`` (None: left as they are)."""
    if detector.reads_class_tokens(directory):
        head = load_class_token_head(detector, directory, encoder).to(encoder.model.device)
        if precision is not None:
            quantize_encoder(encoder, precision)
        return ClassTokenModel(encoder, head)
    if detector.adapters:
        _require_float(detector, encoder)
        adapters = load_adapters(detector, directory, encoder)
        probe = load_probe(detector, directory, encoder.embed_dim)
        merge_adapters(dict(enumerate(encoder.model.vision_model.encoder.layers)), adapters)
    else:
        probe = load_probe(detector, directory, encoder.embed_dim)
    if precision is not None:
        quantize_encoder(encoder, precision)
    return ClipHeadModel(encoder, probe.to(encoder.model.device))


def _require_float(detector: ClipHeadDetector, encoder: ClipImageEncoder) -> None:
    # Merging into int8 blocks would round the base weights twice (and a quantized Linear has no weight to
    # add to): the adapters go into the float weights, then the merged block is quantized.
    if encoder.precision != REFERENCE:
        raise PrecisionUnsupported(f"the {detector.name} adapters must be merged into an fp32 encoder, this one "
                                   f"runs at {encoder.precision}: load it with precision=\"fp32\"")


class ClipBranchHead(torch.nn.Module):
    """A CLIP-head detector from its branch point on the shared trunk: its own copies of the blocks it tuned
    (adapters merged), then CLIP's pooling (the trunk's own modules, frozen, shared), then its probe."""

    def __init__(self, blocks: list[torch.nn.Module], encoder: ClipImageEncoder, probe: LinearProbe) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        vision = encoder.model.vision_model
        self.post_layernorm = vision.post_layernorm
        self.projection = encoder.model.visual_projection
        self.probe = probe.eval()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = vit.run_layers(self.blocks, hidden)
        # `vit.pool`, on the shared modules.
        return self.probe(self.projection(self.post_layernorm(hidden[:, 0])))


def build_branch(detector: ClipHeadDetector, encoder: ClipImageEncoder, directory: Path,
                 branch_block: BranchPoint | None, precision: str = REFERENCE) -> ClipBranchHead | ClassTokenHead:
    """The head of ``detector`` branching at ``branch_block`` (None: after the last block) off ``encoder``,
    which stays untouched: the blocks from the branch on are copied, the adapters merged into the copies, and
    the copies converted to ``precision`` (the trunk's, so that the head computes what its whole model would).
    At `CLASS_TOKENS` the head is its probe alone, on the class tokens the trunk gathers."""
    check_branch_point(branch_block)
    if branch_block == CLASS_TOKENS:
        return load_class_token_head(detector, directory, encoder).to(encoder.model.device)
    total = vit.num_layers(encoder)
    start = total if branch_block is None else branch_block
    probe = load_probe(detector, directory, encoder.embed_dim).to(encoder.model.device)
    layers = encoder.model.vision_model.encoder.layers
    blocks = {i: copy.deepcopy(layers[i]) for i in range(start, total)}
    if detector.adapters:
        _require_float(detector, encoder)
        merge_adapters(blocks, load_adapters(detector, directory, encoder))
    if encoder.precision == REFERENCE:
        apply_precision(blocks, precision)  # by index: precisions may keep some blocks' layers float
    return ClipBranchHead([blocks[i] for i in range(start, total)], encoder, probe)
