"""The built-in CLIP-head detectors (univfd, pin-clip, mpft) as one kind of thing.

Each is the shared CLIP image encoder, optionally with LoRA adapters merged into its last blocks, under a
linear head on the L2-normalised embedding (or, for univfd, on the class token of every block). `detector`
says what one is without torch (its files, digest, version, input contract and `DetectorSpec`), so the
plugins register on a worker that judges on Triton; `model` builds the torch modules that serve it (the whole
model, or the head that branches off a shared trunk). Training writes these files (`streamguard.training`);
serving never imports training.
"""

from streamguard.builtin.cliphead.detector import (
    CONTRACT,
    HEAD_FILE,
    HEAD_READS_KEY,
    LORA_FILE,
    META_FILE,
    TRAINING_FILE,
    VERSION_PREFIX,
    ClipHeadDetector,
    builtin_detectors,
)

__all__ = ["CONTRACT", "HEAD_FILE", "HEAD_READS_KEY", "LORA_FILE", "META_FILE", "TRAINING_FILE", "VERSION_PREFIX",
           "ClipHeadDetector", "builtin_detectors"]
