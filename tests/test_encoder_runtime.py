"""The CLIP encoder run by ONNX Runtime (`streamguard.backbone.onnx_runtime`): exported once into a cache keyed
by the weights it holds, equal to torch to 1e-4 at fp32, its int8 graphs quantizing the block linears a
precision says and no others.

On tiny random CLIP weights (tests/test_training_units.py); bench/bench_encoder.py measures the real one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_training_units import pixels, tiny_encoder

from streamguard.backbone import onnx_runtime
from streamguard.backbone.onnx_runtime import OrtEncoder, OrtMismatch, graph_key
from streamguard.backbone.precision import BLOCK_LINEARS



@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def _torch(encoder: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return encoder(x).numpy()


def test_fp32_graph_matches_torch_on_any_batch_and_is_exported_once(cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = tiny_encoder(0).eval()
    ort = OrtEncoder(encoder, cache)
    assert ort.path == cache / f"{graph_key(encoder)}.fp32.onnx" and ort.path.is_file()
    for n, seed in ((1, 5), (3, 6), (7, 7)):  # the batch axis is dynamic
        x = pixels(n, seed)
        got = ort(x).numpy()
        assert got.shape == (n, encoder.embed_dim)
        np.testing.assert_allclose(got, _torch(encoder, x), rtol=0, atol=1e-4)
    # The second encoder on the same weights reuses the file: exporting again would fail here.
    monkeypatch.setattr(onnx_runtime, "export_encoder", lambda *a: pytest.fail("exported again"))
    again = OrtEncoder(tiny_encoder(0).eval(), cache)
    np.testing.assert_array_equal(again(pixels(2, 9)).numpy(), ort(pixels(2, 9)).numpy())


def test_other_weights_get_another_graph(cache: Path) -> None:
    a, b = tiny_encoder(0).eval(), tiny_encoder(0).eval()
    with torch.no_grad():  # as merging adapters does: same base, one projection changed
        b.model.vision_model.encoder.layers[1].self_attn.v_proj.weight.add_(0.01)
    assert graph_key(a) != graph_key(b)
    ort_a, ort_b = OrtEncoder(a, cache), OrtEncoder(b, cache)
    assert ort_a.path != ort_b.path
    x = pixels(2, 3)
    np.testing.assert_allclose(ort_b(x).numpy(), _torch(b, x), rtol=0, atol=1e-4)
    assert float(np.abs(ort_a(x).numpy() - ort_b(x).numpy()).max()) > 1e-4


def test_a_graph_that_differs_from_torch_is_refused_and_removed(tmp_path: Path) -> None:
    encoder, other = tiny_encoder(0).eval(), tiny_encoder(1).eval()
    path = onnx_runtime.export_encoder(encoder, tmp_path / "g.onnx")
    with pytest.raises(OrtMismatch, match="differs from torch"):
        onnx_runtime.check_encoder(other, path)
    assert not path.exists()
    # The encoder's own graph passes the same check.
    onnx_runtime.check_encoder(encoder, onnx_runtime.export_encoder(encoder, path))
    assert path.is_file()


def _float_and_int8_matmuls(path: Path) -> tuple[set[str], int]:
    graph = onnx.load(str(path)).graph
    floats = {n.name for n in graph.node if n.op_type == "MatMul" and onnx_runtime._BLOCK_MATMUL.search(n.name)}
    return floats, sum(n.op_type == "MatMulInteger" for n in graph.node)


@pytest.mark.parametrize("precision", ["int8", "int8-mixed"])
def test_int8_graphs_quantize_the_block_linears_the_precision_says(cache: Path, precision: str) -> None:
    encoder = tiny_encoder(0).eval()
    layers = int(encoder.config.num_hidden_layers)
    fp32 = OrtEncoder(encoder, cache)
    floats, integer = _float_and_int8_matmuls(fp32.path)
    assert len(floats) == len(BLOCK_LINEARS) * layers and integer == 0  # the pattern sees every block linear
    quantized = OrtEncoder(encoder, cache, quantize=precision)
    assert quantized.path.name == f"{graph_key(encoder)}.{precision}-{onnx_runtime.QUANT_RECIPE}.onnx"
    floats, integer = _float_and_int8_matmuls(quantized.path)
    kept = {name for name in floats if "/mlp/fc2/" in name}
    if precision == "int8":
        assert floats == set() and integer == len(BLOCK_LINEARS) * layers
    else:  # int8-mixed keeps every block's fc2 float, as torch does at that precision
        assert floats == kept and len(kept) == layers and integer == (len(BLOCK_LINEARS) - 1) * layers
    x = pixels(6, 4)
    a, b = _torch(encoder, x), quantized(x).numpy()
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.99 and np.abs(a - b).max() > 1e-5


def test_other_sizes_and_quantizations_are_refused(cache: Path) -> None:
    encoder = tiny_encoder(0).eval()
    with pytest.raises(OrtMismatch, match="unknown"):
        OrtEncoder(encoder, cache, quantize="int4")
    with pytest.raises(ValueError, match="expected pixels"):
        OrtEncoder(encoder, cache)(pixels(1, size=112))
