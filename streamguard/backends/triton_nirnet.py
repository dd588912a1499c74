"""NIRNet with its semantic branch on Triton: the ensemble (`streamguard.triton.build_nirnet`) takes each crop
(``PIXELS``) and, beside it, the whole image it came from as CLIP reads it (``WHOLE``), and runs CLIP itself.

Torch-free, as the worker's Triton path is: the whole image is prepared with the in-process backend's own
contract and grouping (`streamguard.builtin.nirnet.detector.whole_contract`, `distinct_images`: once per
image, then one row per crop), at the size the ensemble's config declares for ``WHOLE``. A model without the
semantic branch needs none of this: its ensemble takes ``PIXELS`` alone and the generic `TritonBackend` calls it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from streamguard.backends.triton_grpc import TritonBackend
from streamguard.builtin.nirnet.detector import distinct_images, whole_contract
from streamguard.config import TritonSettings
from streamguard.detectors.spec import BackendUnavailable, DetectorInput
from streamguard.intake.contract import prepare
from streamguard.triton.nirnet_parts import ENSEMBLE_MODEL, LOGITS, PIXELS, WHOLE


class NirnetTritonBackend(TritonBackend):
    """`DetectorBackend` of NIRNet's ensemble: one logit per input crop, ``expected_version`` checked as for
    any model."""

    def __init__(self, settings: TritonSettings, expected_version: str | None = None,
                 model: str = ENSEMBLE_MODEL, detector: str = "nirnet") -> None:
        super().__init__(model, settings, expected_version=expected_version, detector=detector, outputs=(LOGITS,))
        self._whole_size: int | None = None  # from the ensemble's config; None: no WHOLE input (no semantic branch)
        self._inputs_known = False

    def predict(self, batch: Sequence[DetectorInput]) -> list[float | None]:
        if not batch:
            return []
        if any(item.pixels is None for item in batch):
            raise ValueError("NIRNet needs its crops; declare its InputContract on the detector")
        if not self._breaker.allow():
            raise BackendUnavailable(f"triton model {self.model!r}: circuit open after repeated unavailability")
        budget = self._settings.retry_budget_s
        wait = budget + self._settings.request_timeout_s + 5
        try:
            if not self._checked:
                self._run(self._check_version(time.monotonic() + budget), timeout=wait)
            if not self._inputs_known:
                self._run(self._read_inputs(time.monotonic() + budget), timeout=wait)
            arrays = {PIXELS: np.ascontiguousarray(np.stack([item.pixels for item in batch]), dtype=np.float32)}  # type: ignore[misc]
            if self._whole_size is not None:
                images, slots = distinct_images(batch)
                contract = whole_contract(self._whole_size)
                whole = np.stack([prepare(image, contract) for image in images])
                arrays[WHOLE] = np.ascontiguousarray(whole[slots], dtype=np.float32)
            values = self._run(self._infer_arrays(arrays, time.monotonic() + budget), timeout=wait)
        except BackendUnavailable:
            self._breaker.record(False)
            self._mark_unready()
            raise
        self._breaker.record(True)
        return [float(v) for v in values]

    async def _read_inputs(self, deadline: float) -> None:
        config = await self._retrying(lambda: self._client.get_model_config(
            self.model, as_json=True, client_timeout=min(5.0, self._settings.request_timeout_s)), deadline)
        inputs = {str(t["name"]): [int(d) for d in t.get("dims", [])] for t in config.get("config", {}).get("input", [])}
        if PIXELS not in inputs:
            raise ValueError(f"triton model {self.model!r} takes {sorted(inputs)}, not {PIXELS}: not a NIRNet ensemble")
        self._whole_size = inputs[WHOLE][-1] if WHOLE in inputs else None
        self._inputs_known = True

    async def _infer_arrays(self, arrays: dict[str, np.ndarray], deadline: float) -> np.ndarray:
        size = self._settings.request_batch_size
        n = len(arrays[PIXELS])
        parts = [{name: a[lo:lo + size] for name, a in arrays.items()} for lo in range(0, n, size)]
        results = await asyncio.gather(*(self._infer_part(part, deadline) for part in parts))
        return np.concatenate(results)

    async def _infer_part(self, arrays: dict[str, np.ndarray], deadline: float) -> np.ndarray:
        from tritonclient.grpc import InferInput, InferRequestedOutput

        tensors = []
        for name, array in arrays.items():
            tensor = InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            tensors.append(tensor)
        rows = len(arrays[PIXELS])

        async def call() -> np.ndarray:
            timeout = self._settings.request_timeout_s
            async with self._slots:
                result = await self._client.infer(self.model, tensors, outputs=[InferRequestedOutput(LOGITS)],
                                                  client_timeout=timeout, timeout=int(timeout * 1_000_000))
            logits = result.as_numpy(LOGITS)
            if logits is None or logits.shape[0] != rows:
                raise ValueError(f"triton model {self.model!r} returned {None if logits is None else logits.shape} "
                                 f"of {LOGITS} for {rows} crops")
            return logits.reshape(rows, -1)[:, 0]

        return await self._retrying(call, deadline)
