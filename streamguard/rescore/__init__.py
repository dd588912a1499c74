"""Re-scoring: content already judged goes through the current models and policy again, and the verdicts
whose label changed are published, so a model or policy upgrade reaches what was judged before it.

Sources (`sources`): a verdicts topic range joined with its events (`events`), or image files and datasets
(`files`) compared with the dedupe cache (`previous`). Each chunk is judged (`judge`), its changes published
and the cache refreshed (`run`), then its position checkpointed (`state`): bounded by explicit ranges and
limits, and resumable. A bank audit (`banked`, `audit`) runs the same loop over a bank's images and sends
what the models now label otherwise to review instead of publishing verdicts.
"""
