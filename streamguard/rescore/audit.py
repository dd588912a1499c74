"""What a bank audit does with its judgements: banked content the models now label otherwise goes to people
on the review topic, never a verdict on the output topic; the bank stays authoritative until a person
decides (and `streamguard review apply` banks that decision as any other).

"Otherwise" means the opposite label by default: banked content is often what the models were uncertain
about in the first place (that is what reviewers are sent), so a model that is still uncertain says
nothing new and is only counted; ``include_uncertain`` routes those too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from kafka import KafkaProducer

from streamguard.config import Settings
from streamguard.rescore.judge import Judged
from streamguard.rescore.run import send_acknowledged
from streamguard.review.route import bank_disagreement_request
from streamguard.schemas import ReviewRequest
from streamguard.streamio import Message
from streamguard.worker.publish import producer_config, review_message


def disagreement(judged: Judged, include_uncertain: bool) -> str:
    """``agree``, ``uncertain`` (the models decide neither way) or ``disagree``."""
    if judged.current.label == judged.previous.label:
        return "agree"
    if judged.current.label == "uncertain" and not include_uncertain:
        return "uncertain"
    return "disagree"


def review_request(judged: Judged) -> ReviewRequest:
    bank = judged.previous.matched_bank
    banked = judged.banked
    if bank is None or banked is None or judged.previous.label == "uncertain":
        raise ValueError("not a bank's judgement")
    detail: dict[str, str | int] = {"match": bank.kind, "distance": bank.distance}
    if banked.path is not None:
        detail["path"] = banked.path
    return bank_disagreement_request(judged.current, bank.bank, judged.previous.label, banked.uri,
                                     banked.pdq or judged.phash, detail)


class ReviewPublisher:
    def __init__(self, settings: Settings, topic: str) -> None:
        self._topic = topic
        self._producer = KafkaProducer(**producer_config(settings))

    def publish(self, requests: Sequence[ReviewRequest]) -> None:
        """Returns once every request is acknowledged; raises `PublishFailed` otherwise."""
        messages: list[Message] = []
        for request in requests:
            message = review_message(self._topic, request)
            messages.append((request.content_sha256, message.value, message.headers))
        send_acknowledged(self._producer, self._topic, messages)

    def close(self) -> None:
        self._producer.close()


class ReviewOutlet:
    """``publisher`` None: a dry run."""

    def __init__(self, publisher: ReviewPublisher | None, include_uncertain: bool = False) -> None:
        self._publisher = publisher
        self._include_uncertain = include_uncertain

    def deliver(self, judged: Sequence[Judged]) -> tuple[list[Judged], Counter[str]]:
        counts: Counter[str] = Counter({"agree": 0, "disagree": 0, "uncertain": 0})
        routed = []
        for j in judged:
            verdict = disagreement(j, self._include_uncertain)
            counts[verdict] += 1
            if verdict == "disagree":
                routed.append(j)
        if self._publisher is not None:
            self._publisher.publish([review_request(j) for j in routed])
        return routed, counts
