"""UnivFD: a linear probe on the frozen CLIP image embedding (Ojha et al., CVPR 2023).

The baseline every detector in this field is compared against. The served model is the CLIP encoder plus
one linear layer on the L2-normalised embedding; its weights are a few KB and ship in the package
(``weights/``), trained by ``streamguard train univfd`` (see ``weights/MODEL_CARD.md``).
"""
