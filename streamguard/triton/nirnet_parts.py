"""The names of NIRNet's models on Triton, for the build that writes them, the models that load them and the
worker that calls the ensemble (torch-free).

``streamguard triton build`` writes NIRNet as an ensemble (`ENSEMBLE_MODEL`, named like the detector) of
per-part models, each a slice of the one ``nirnet.safetensors``, each with its own dynamic batcher:

    PIXELS (crops) -> nirnet_extractor -> NOISE -> nirnet_noise     -> F_NOISE --+
                                               \\-> nirnet_frequency -> F_FREQ ---+-> nirnet_head -> LOGITS
    WHOLE (CLIP pixels of the crop's image) -> nirnet_clip -> EMBEDDING -> nirnet_semantic -> F_SEM --+

The CLIP part and ``WHOLE`` exist only when the model has the semantic branch; without it the ensemble takes
``PIXELS`` alone and the worker's generic Triton backend calls it like any detector's model.
"""

from __future__ import annotations

ENSEMBLE_MODEL = "nirnet"
EXTRACTOR_MODEL = "nirnet_extractor"
NOISE_MODEL = "nirnet_noise"
FREQUENCY_MODEL = "nirnet_frequency"
SEMANTIC_MODEL = "nirnet_semantic"
CLIP_MODEL = "nirnet_clip"
HEAD_MODEL = "nirnet_head"

# The ensemble's tensors: what the worker sends and reads.
PIXELS = "PIXELS"  # (N, 3, crop, crop) raw [0, 1] native crops, one row per crop (the runner's flattened views)
WHOLE = "WHOLE"  # (N, 3, clip, clip) each row's whole image, resized and CLIP-normalised (semantic only)
LOGITS = "LOGITS"

# Each part's own tensors.
CROPS = "CROPS"
NOISE = "NOISE"
EMBEDDING = "EMBEDDING"
F_NOISE = "F_NOISE"
F_FREQ = "F_FREQ"
F_SEM = "F_SEM"

# Roles of the shared Python-backend implementation (`streamguard.triton.nirnet_model`), by part.
ROLES = {EXTRACTOR_MODEL: "extractor", NOISE_MODEL: "noise", FREQUENCY_MODEL: "frequency",
         SEMANTIC_MODEL: "semantic", CLIP_MODEL: "clip", HEAD_MODEL: "head"}
# The head's inputs in the order `NIRNet.features` concatenates the branches, whatever ``config.branches``' order.
FEATURE_ORDER = (("noise", F_NOISE), ("frequency", F_FREQ), ("semantic", F_SEM))
