"""Judging earlier verdicts' content again with the current models and policy, never the cached verdict.

Content is scored once per run whatever the number of events that carried it (a bounded memo by SHA-256),
and each event is decided for its own tenant, as the worker decides it (`streamguard.decide`). What the
dedupe cache gets afterwards is the verdict the worker itself would have cached: no ``rescored_from``,
because the next copy reusing it is a new event, not a re-score.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from streamguard.config import Settings
from streamguard.decide import Decider
from streamguard.dedupe.phash import PerceptualHash, perceptual_hash
from streamguard.dedupe.store import versions_key
from streamguard.rescore.sources import Banked, Candidate
from streamguard.schemas import RescoredFrom, Verdict
from streamguard.scoring import DetectorsUnavailable, ImageJob, Outcome, Scorer
from streamguard.tenants import Tenants

log = structlog.get_logger(__name__)

_MEMO_SIZE = 4096


@dataclass(frozen=True)
class Judged:
    previous: Verdict
    current: Verdict  # for the same event and tenant, as the worker would publish it now
    dedupe_key: str  # the tenant's pool in the dedupe store
    phash: PerceptualHash | None
    banked: Banked | None = None  # previous is a bank's label

    @property
    def changed(self) -> bool:
        return self.current.label != self.previous.label

    def rescored(self) -> Verdict:
        """The verdict to publish: the current one, saying what it replaces."""
        before = self.previous
        return self.current.model_copy(update={"rescored_from": RescoredFrom(
            label=before.label, policy_version=before.policy_version, model_versions=before.model_versions,
            judged_at=before.judged_at)})


@dataclass(frozen=True)
class _Scored:
    verdict: Verdict
    phash: PerceptualHash | None


class Rescorer:
    def __init__(self, settings: Settings, scorer: Scorer) -> None:
        self._scorer = scorer
        self._tenants = Tenants(settings)
        self._decider = Decider(scorer.plugin_manager)
        self._phash = settings.dedupe.enabled and settings.dedupe.near
        self.versions_key = versions_key(scorer.model_versions, scorer.policy_version)
        self._memo: OrderedDict[str, _Scored | str] = OrderedDict()  # sha -> scored, or why it could not be

    def judge(self, candidates: Sequence[Candidate]) -> tuple[list[Judged], Counter[str]]:
        """Each candidate re-judged, and the count of those that could not be, by reason. Raises
        `DetectorsUnavailable` when a detector's server is down: nothing of the chunk is judged then."""
        self._score_new({c.previous.content_sha256: c.data for c in candidates})
        judged: list[Judged] = []
        problems: Counter[str] = Counter()
        for candidate in candidates:
            scored = self._memo[candidate.previous.content_sha256]
            if isinstance(scored, str):
                problems[scored] += 1
                continue
            judged.append(self._for_event(candidate, scored))
        return judged, problems

    def _for_event(self, candidate: Candidate, scored: _Scored) -> Judged:
        previous = candidate.previous
        tenant = self._tenants.resolve(previous.tenant)
        own = scored.verdict.model_copy(update={"event_id": previous.event_id})
        current = self._decider.decide(own, tenant)
        return Judged(previous, current, tenant.dedupe_key(self.versions_key), scored.phash, candidate.banked)

    def _score_new(self, data: dict[str, bytes]) -> None:
        todo = [sha for sha in data if sha not in self._memo]
        for sha in data:
            if sha in self._memo:
                self._memo.move_to_end(sha)
        if not todo:
            return
        for sha, result in self._score_isolating(todo, data).items():
            self._memo[sha] = result
        while len(self._memo) > _MEMO_SIZE:
            self._memo.popitem(last=False)

    def _score_isolating(self, shas: list[str], data: dict[str, bytes]) -> dict[str, _Scored | str]:
        """A failure of the whole batch is retried one image at a time, so only the image that fails is
        left out (as the worker does)."""
        try:
            outcomes = self._scorer.score([ImageJob(key=sha, data=data[sha], sha256=sha) for sha in shas])
        except DetectorsUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - one image's bug must not end the run
            if len(shas) == 1:
                log.exception("rescore.judge_failed", sha256=shas[0])
                return {shas[0]: "judge_failed"}
            log.warning("rescore.judge_batch_failed", images=len(shas), error=f"{type(exc).__name__}: {exc}")
            out: dict[str, _Scored | str] = {}
            for sha in shas:
                out.update(self._score_isolating([sha], data))
            return out
        return {outcome.key: self._result(outcome) for outcome in outcomes}

    def _result(self, outcome: Outcome) -> _Scored | str:
        if outcome.error is not None or outcome.verdict is None:
            return "undecodable"
        if outcome.verdict.degraded:
            # A detector failed: a label from the others is no ground to overturn a full judgement.
            return "degraded"
        phash = perceptual_hash(outcome.image.rgb) if self._phash and outcome.image is not None else None
        outcome.image = None  # the pixels are not needed any more; the memo keeps the verdict only
        return _Scored(outcome.verdict, phash)
