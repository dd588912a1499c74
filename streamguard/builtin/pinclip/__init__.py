"""PiN-CLIP: CLIP fine-tuned with LoRA under positive-incentive feature noise (arXiv 2511.16136).

Served as encoder + merged LoRA + linear head (the cost of a linear probe); the weights (adapters and head,
a few hundred KB) ship in ``weights/`` once trained by ``streamguard train pin-clip``. The method and its
choices are described in `streamguard.training.pinclip`.
"""
