"""MPFT: CLIP fine-tuned with LoRA under Texture-Aware Masking (arXiv 2601.03586).

Served as encoder + merged LoRA + linear head (the cost of a linear probe); the weights (adapters and head,
a few hundred KB) ship in ``weights/`` once trained by ``streamguard train mpft``. The method and its
choices are described in `streamguard.training.mpft`.
"""
