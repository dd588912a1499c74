"""``backbone.runtime = "onnxruntime"``: the shared CLIP trunk run by ONNX Runtime (`streamguard.backends.ort_trunk`).

At fp32 it gives torch's hidden states and the detectors' logits within 1e-4; at int8-mixed it runs ORT's int8
graph, near fp32; its graph is exported once per weights and branch points, at start-up; detector versions
name the runtime; a GPU, the whole-model path and a missing onnxruntime are refused with the reason. The
heads run on ORT too, quantized as the trunk; one ORT cannot run falls back to torch.

On the tiny CLIP and detector weights of tests/test_trunk.py, graphs in a temporary cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pydantic
import pytest
import torch
from structlog.testing import capture_logs
from test_training_units import pixels
from test_trunk import _FakeTrunk, _batch, _jobs, _raw, tiny  # noqa: F401 - ``tiny`` is a fixture used below

from streamguard import extras
from streamguard.backbone import BackboneError, load_backbone
from streamguard.backends import ort_trunk
from streamguard.backends.ort_trunk import OrtHead, OrtTrunk
from streamguard.backends.torch_trunk import ClipTrunk, TorchHead
from streamguard.builtin.cliphead import CONTRACT
from streamguard.builtin.cliphead.model import build_branch
from streamguard.builtin.mpft.plugin import DETECTOR as MPFT
from streamguard.builtin.pinclip.plugin import DETECTOR as PINCLIP
from streamguard.config import BackboneSettings, Settings, load_settings
from streamguard.detectors.spec import CLASS_TOKENS
from streamguard.detectors.trunk import SharedTrunk
from streamguard.plugins import build_plugin_manager
from streamguard.scoring import Scorer

CLIP_DETECTORS = ("univfd", "pin-clip", "mpft")
BLOCKS = [2, 3, 4]  # pin-clip, mpft, and after the last of the tiny CLIP's 4 blocks


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backbone-cache")


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The outputs of every graph exported during the test."""
    seen: list[tuple[str, ...]] = []
    export = ort_trunk.export_graph

    def counted(module: torch.nn.Module, size: int, path: Path, outputs: Sequence[str], *rest: str) -> Path:
        seen.append(tuple(outputs))
        return export(module, size, path, outputs, *rest)

    monkeypatch.setattr(ort_trunk, "export_graph", counted)
    return seen


def _settings(tiny: dict[str, Path], cache: Path, runtime: str = "onnxruntime", precision: str = "fp32",
              **detectors: Any) -> Settings:
    options = {name: {"weights_dir": str(tiny[name])} for name in CLIP_DETECTORS}
    return load_settings(
        backbone={"checkpoint": str(tiny["clip"]), "cache_dir": str(cache), "runtime": runtime,
                  "precision": precision},
        plugins={"deny": ["provenance", "brightness"], "enable": ["builtin-pinclip", "builtin-mpft"]},
        detectors={"options": options, "timeout_s": None, **detectors})


def _encoder(tiny: dict[str, Path]) -> Any:
    return load_backbone(BackboneSettings(checkpoint=tiny["clip"]))


def _hidden(trunk: Any, x: torch.Tensor, blocks: Sequence[int | str]) -> dict[int | str, np.ndarray]:
    return {block: hidden.numpy() for block, hidden in trunk.run(list(x.numpy()), blocks).items()}


def test_fp32_gives_torchs_hidden_states_from_one_export_per_weights_and_branch_points(
        tiny: dict[str, Path], tmp_path: Path, exports: list[tuple[str, ...]]) -> None:
    encoder = _encoder(tiny)
    torch_trunk, ort = ClipTrunk(encoder, "cpu"), OrtTrunk(encoder, tmp_path)
    assert (ort.backbone, ort.precision, ort.resolve(None), ort.resolve(2)) == (encoder, "fp32", 4, 2)
    # Block 0: what enters the first block (tokens, pre-layernorm); the class token after every block (univfd).
    for blocks, n in ((BLOCKS, 3), ([0, 4], 1), ([1, CLASS_TOKENS], 2)):
        x = pixels(n, seed=n)
        expected, got = _hidden(torch_trunk, x, blocks), _hidden(ort, x, blocks)
        assert list(got) == blocks
        for block in blocks:
            np.testing.assert_allclose(got[block], expected[block], rtol=0, atol=1e-4, err_msg=str(block))
    assert got[CLASS_TOKENS].shape == (2, 4, encoder.hidden_size)
    assert exports == [("hidden2", "hidden3", "hidden4"), ("hidden0", "hidden4"), ("hidden1", "class_tokens")]
    graphs = sorted(tmp_path.glob("*.onnx"))
    assert [p.name.split("-torch")[-1] for p in graphs] == [f"{torch.__version__.split('+')[0]}-b{b}.fp32.onnx"
                                                          for b in ("0-4", "1-class-tokens", "2-3-4")]
    mtimes = [p.stat().st_mtime_ns for p in graphs]
    # Another trunk on the same weights (another process, a restart) loads the graphs: no export.
    again = OrtTrunk(_encoder(tiny), tmp_path)
    again.prepare(BLOCKS)
    x = pixels(2, seed=9)
    np.testing.assert_array_equal(_hidden(again, x, BLOCKS)[4], _hidden(ort, x, BLOCKS)[4])
    assert len(exports) == 3 and [p.stat().st_mtime_ns for p in graphs] == mtimes
    with pytest.raises(ValueError, match="shape"):
        ort.run(list(pixels(1, size=112).numpy()), BLOCKS)


def test_int8_mixed_runs_ort_int8_near_fp32(tiny: dict[str, Path], tmp_path: Path) -> None:
    encoder = _encoder(tiny)
    fp32, mixed = OrtTrunk(encoder, tmp_path), OrtTrunk(encoder, tmp_path, "int8-mixed")
    assert mixed.precision == "int8-mixed"
    x = pixels(6, seed=4)
    a, b = _hidden(fp32, x, BLOCKS), _hidden(mixed, x, BLOCKS)
    (graph,) = tmp_path.glob("*.int8-mixed-*.onnx")
    ops = [node.op_type for node in onnx.load(str(graph)).graph.node]
    # 4 blocks, their q, k, v, out and fc1 in int8; fc2 kept float at int8-mixed.
    assert ops.count("MatMulInteger") == 5 * 4
    for block in BLOCKS:
        flat_a, flat_b = a[block].reshape(len(x), -1), b[block].reshape(len(x), -1)
        cosine = (flat_a * flat_b).sum(-1) / np.linalg.norm(flat_a, axis=-1) / np.linalg.norm(flat_b, axis=-1)
        # 7-bit weights on a width-32 CLIP: cosine ~0.99996 here; 0.99 leaves room for other CPUs' kernels.
        assert cosine.min() > 0.99, (block, cosine)
        assert np.abs(flat_a - flat_b).max() > 1e-4  # it did run other arithmetic than fp32


def test_detectors_on_onnxruntime_score_as_on_torch(tiny: dict[str, Path], cache: Path) -> None:
    scores = {}
    for runtime, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8-mixed")):
        settings = _settings(tiny, cache, runtime, precision)
        with capture_logs() as logs, Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
            assert all(r.load_error is None for r in scorer.runners), [r.load_error for r in scorer.runners]
            if runtime == "onnxruntime":  # exported at start-up, before the first batch
                assert list(cache.glob(f"onnx-trunk/*-b2-3-{CLASS_TOKENS}.{precision}*.onnx"))
                # The heads too; univfd's has no blocks, which torch leaves float at int8-mixed: so does ORT.
                for name, block in (("pin-clip", 2), ("mpft", 3), ("univfd", CLASS_TOKENS)):
                    graph = "fp32" if name == "univfd" else precision
                    assert len(list(cache.glob(f"onnx-trunk/head-{name}-*-b{block}-*.{graph}*.onnx"))) == 1, name
            scores[runtime, precision] = _raw(scorer, _jobs(4))
        assert not [log for log in logs if log["event"] == "trunk.head_torch_fallback"]
    assert not list(cache.glob("onnx-trunk/head-univfd-*.int8*"))
    reference = scores["torch", "fp32"]
    assert set(reference) == set(CLIP_DETECTORS)
    for name in CLIP_DETECTORS:
        np.testing.assert_allclose(scores["onnxruntime", "fp32"][name], reference[name], rtol=0, atol=1e-4,
                                   err_msg=name)
        # The tiny heads have random weights of norm ~4, so 0.1 is a few % of their spread (as at torch int8).
        np.testing.assert_allclose(scores["onnxruntime", "int8-mixed"][name], reference[name], rtol=0, atol=0.1,
                                   err_msg=name)
    assert any(not np.allclose(scores["onnxruntime", "int8-mixed"][n], reference[n], rtol=0, atol=1e-4)
               for n in CLIP_DETECTORS)


def _head_inputs(tiny: dict[str, Path]) -> tuple[Any, dict[int, torch.Tensor]]:
    """The tiny encoder and torch's hidden states at the adapted heads' branch points, for six images."""
    encoder = _encoder(tiny)
    return encoder, ClipTrunk(encoder, "cpu").run(list(pixels(6, seed=5).numpy()), [2, 3])


def test_int8_mixed_heads_quantize_their_block_linears_but_fc2(tiny: dict[str, Path], tmp_path: Path) -> None:
    encoder, hidden = _head_inputs(tiny)
    trunk = OrtTrunk(encoder, tmp_path, "int8-mixed")
    for detector, block, blocks in ((PINCLIP, 2, 2), (MPFT, 3, 1)):
        def load(precision: str) -> torch.nn.Module:
            return build_branch(detector, encoder, tiny[detector.name], block, precision)

        head = trunk.make_head(load, block, detector.name, {})
        assert isinstance(head, OrtHead) and head.path.name.endswith(".int8-mixed-s8pc7.onnx")
        nodes = onnx.load(str(head.path)).graph.node
        ops = [n.op_type for n in nodes]
        floats = [n.name for n in nodes if n.op_type == "MatMul" and ("_proj/" in n.name or "/mlp/" in n.name)]
        # q, k, v, out and fc1 of each of its blocks in int8, every fc2 (and no other block linear) float.
        assert ops.count("MatMulInteger") == 5 * blocks and ops.count("DynamicQuantizeLinear") > 0, detector.name
        assert floats == [f"/head/blocks.{i}/mlp/fc2/MatMul" for i in range(blocks)], detector.name
        expected = np.array(TorchHead(load("fp32"), "cpu").predict(hidden[block]))
        got = np.array(head.predict(hidden[block]))
        # Logits spread ~0.4 on these tiny heads; int8-mixed moves them ~0.03 (as torch's int8-mixed does).
        np.testing.assert_allclose(got, expected, rtol=0, atol=0.1, err_msg=detector.name)
        assert np.abs(got - expected).max() > 1e-5, detector.name  # it did run int8


def test_a_head_onnx_runtime_cannot_run_falls_back_to_torch_at_the_trunks_precision(
        tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, hidden = _head_inputs(tiny)
    trunk = OrtTrunk(encoder, tmp_path, "int8-mixed")

    class Renamed(torch.nn.Module):
        """A third-party head whose block copy the int8 recipe cannot find by name."""

        def __init__(self, head: torch.nn.Module) -> None:
            super().__init__()
            self.tuned = head.blocks
            self.rest = head

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            for layer in self.tuned:
                hidden = layer(hidden, None)
            return self.rest.probe(self.rest.projection(self.rest.post_layernorm(hidden[:, 0])))

    def fails(*args: Any) -> Path:
        raise RuntimeError("an operator ONNX has no symbol for")

    for make, reason in ((lambda head: head, "RuntimeError: an operator"), (Renamed, "no block linear MatMul")):
        loads: list[str] = []

        def load(precision: str) -> torch.nn.Module:
            loads.append(precision)
            return make(build_branch(MPFT, encoder, tiny["mpft"], 3, precision))

        with monkeypatch.context() as patch, capture_logs() as logs:
            if make is not Renamed:
                patch.setattr(ort_trunk, "export_module", fails)
            head = trunk.make_head(load, 3, "mpft", {})
        assert isinstance(head, TorchHead) and loads == ["fp32", "int8-mixed"]
        (warning,) = [log for log in logs if log["event"] == "trunk.head_torch_fallback"]
        assert warning["detector"] == "mpft" and reason in warning["reason"], warning
        # What the torch trunk runs: the head built at int8-mixed.
        assert head.predict(hidden[3]) == TorchHead(load("int8-mixed"), "cpu").predict(hidden[3])


def test_versions_name_the_runtime(tiny: dict[str, Path], cache: Path) -> None:
    def versions(settings: Settings) -> dict[str, str]:
        return Scorer(settings, build_plugin_manager(settings.plugins)).model_versions  # not started: no loading

    torch_fp32 = versions(_settings(tiny, cache, "torch"))
    ort_fp32, ort_mixed = versions(_settings(tiny, cache)), versions(_settings(tiny, cache, precision="int8-mixed"))
    torch_mixed = versions(_settings(tiny, cache, "torch", "int8-mixed"))
    for name in CLIP_DETECTORS:
        model, at, view = torch_fp32[name].partition("@")  # the computation names the model, before the views
        assert ort_fp32[name] == f"{model}.ort-fp32{at}{view}"
        assert ort_mixed[name] == f"{model}.ort-int8-mixed{at}{view}"
        assert torch_mixed[name] == f"{model}.int8-mixed{at}{view}"
    # On Triton the models are the repository's, built at fp32 by torch, whatever the runtime says.
    assert versions(_settings(tiny, cache, "onnxruntime", "int8-mixed", backend="triton")) == torch_fp32


def test_a_gpu_the_whole_model_path_and_a_missing_onnxruntime_are_refused(
        tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pydantic.ValidationError, match="runs the shared trunk only"):
        _settings(tiny, tmp_path, shared_trunk=False)
    _settings(tiny, tmp_path, shared_trunk=False, backend="triton")  # nothing in-process: nothing to refuse

    def load_errors(settings: Settings) -> set[str | None]:
        with Scorer(settings, build_plugin_manager(settings.plugins)) as scorer:
            assert {r.spec.name for r in scorer.runners} == set(CLIP_DETECTORS)
            return {r.load_error for r in scorer.runners}

    # Refused before anything is loaded: the checkpoint does not exist.
    absent = {**tiny, "clip": tiny["clip"] / "absent"}
    (gpu,) = load_errors(_settings(absent, tmp_path, device="cuda"))
    assert gpu is not None and gpu.startswith("PrecisionUnsupported:") and "CPU only" in gpu
    monkeypatch.setattr(extras, "_installed", lambda module: module != "onnxruntime")
    (missing,) = load_errors(_settings(absent, tmp_path))
    assert missing == ("MissingExtra: backbone.runtime = \"onnxruntime\" needs onnxruntime, which is not installed: "
                       "pip install 'streamguard[inprocess]'")
    assert not any(tmp_path.iterdir())


def test_a_trunk_that_fails_to_prepare_fails_every_batch_without_running() -> None:
    class Unprepared(_FakeTrunk):
        def prepare(self, blocks: Sequence[int]) -> None:
            raise BackboneError(f"no graph for {list(blocks)}")

    trunk = Unprepared()
    shared = SharedTrunk("fake", trunk)  # type: ignore[arg-type]
    shared.add_branch(4, CONTRACT)
    shared.add_branch(2, CONTRACT)
    shared.prepare()
    for block in (2, 4, 2):
        with pytest.raises(BackboneError, match=r"no graph for \[2, 4\]"):
            shared.hidden(_batch(2), block, CONTRACT)
    assert trunk.runs == 0
