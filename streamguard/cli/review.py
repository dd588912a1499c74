"""``streamguard review apply``: apply reviewers' decisions to the verdicts, the cache and the banks."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import click

from streamguard.cli.context import AppContext

pass_app = click.make_pass_decorator(AppContext)


@click.group("review")
def review_group() -> None:
    """Human review of verdicts (review.topic, review.decisions_topic)."""


@review_group.command("apply")
@pass_app
def apply_command(app: AppContext) -> None:
    """Consume review.decisions_topic until SIGTERM: publish each decision as a verdict (decided_by review),
    answer later copies from the cache and add the content to review.bank_ai / review.bank_real."""
    from streamguard.banks import BankStore
    from streamguard.dedupe import open_store
    from streamguard.review.apply import DecisionApplier
    from streamguard.review.consumer import DecisionConsumer
    from streamguard.scoring import Scorer

    settings = app.settings
    # Never started: only the detectors' versions are needed, for the worker's cache key.
    scorer = Scorer(settings, app.plugin_manager)
    dedupe = open_store(settings.dedupe, settings.redis)
    banks = BankStore(settings)
    try:
        consumer = DecisionConsumer(settings, DecisionApplier(settings, dedupe, banks, scorer.model_versions,
                                                              scorer.policy_version))

        def _stop(signum: int, frame: FrameType | None) -> None:
            consumer.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        code = consumer.run()
    finally:
        banks.close()
        dedupe.close()
        scorer.close()
    sys.exit(code)
