"""Training the built-in detectors' weights: UnivFD's probe, and LoRA fine-tuning with one trainer and the
methods as small pieces.

- `univfd`: the linear probe on frozen CLIP embeddings (logistic regression, calibrated on validation).
- `lora`: trainable adapters on the attention projections of the tuned blocks (the file format and
  merging for serving live in `streamguard.backbone.lora`).
- `model`: the model under training (frozen prefix, LoRA'd tuned blocks, linear head).
- `prefix_cache`: the frozen prefix's hidden states, computed once per augmented image, on disk.
- `data`: splits and hold-outs, augmentation, batches (from the cache or from pixels).
- `objective`: what a method contributes (token masking, loss); `pinclip` and `mpft` are the two methods.
- `trainer`: the loop (validation, early stopping, checkpoints, resume); `checkpoint` its state on disk.
- `recipe`: the configuration and the whole run; `artifacts`: writing the files a trained detector ships as.
- `held_out`, `loso`: leave-one-source-out validation.

Training imports serving (`streamguard.builtin.cliphead` says what the files are and how they load), never
the other way round: ``streamguard train`` is thin over `recipe.train_detector` and `univfd.train_univfd`,
and the built-in plugins load what they write.
"""
