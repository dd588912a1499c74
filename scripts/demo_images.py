"""Write the demo set that `make run` scans: a few good images and the bad inputs a stream really sees.

The images are synthetic (gradients and noise, some carrying generator or camera metadata); they show the
pipeline's behaviour, not detection quality. Point `make run SAMPLES=...` at real data for that.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def _picture(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x / size[0], y / size[1], 0.5 + 0.5 * np.sin(x / 37.0 + seed)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    camera = Image.Exif()
    camera[0x010F], camera[0x0110] = "Canon", "Canon EOS 5D Mark IV"
    camera.get_ifd(0x8769)[0x9003] = "2024:05:01 10:00:00"
    _picture(1).save(out / "camera.jpg", quality=90, exif=camera.tobytes())

    sd_text = PngImagePlugin.PngInfo()
    sd_text.add_text("parameters", "a lighthouse at dusk\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1")
    _picture(2, (512, 512)).save(out / "stable-diffusion-webui.png", pnginfo=sd_text)

    _picture(3).save(out / "plain.webp", quality=85)
    frames = [_picture(4 + i, (160, 120)) for i in range(3)]
    frames[0].save(out / "animated.gif", save_all=True, append_images=frames[1:], duration=100)

    jpeg = io.BytesIO()
    _picture(7).save(jpeg, format="JPEG", quality=90)
    (out / "truncated.jpg").write_bytes(jpeg.getvalue()[: jpeg.tell() // 2])
    (out / "empty.png").write_bytes(b"")
    (out / "notes.jpg").write_text("not an image, despite the name\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo"))
