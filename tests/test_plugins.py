from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from images import encode, solid
from streamguard import DetectorSpec, InputContract, hookimpl
from streamguard.config import PluginSettings, load_settings
from streamguard.fusion import FusedScore
from streamguard.plugins import ENTRY_POINT_GROUP, build_plugin_manager, plugin_infos
from streamguard.policy import Decision
from streamguard.registry import collect_detectors
from streamguard.scoring import ConfigurationError, ImageJob, Scorer

BRIGHT, DARK = encode(solid(250), "PNG"), encode(solid(5), "PNG")


def _score(settings, pm, *data: bytes):  # type: ignore[no-untyped-def]
    with Scorer(settings, pm) as scorer:
        return [o.verdict for o in scorer.score([ImageJob(f"e{i}", d) for i, d in enumerate(data)])]


@pytest.fixture
def broken_plugin(tmp_path: Path) -> Iterator[Path]:
    """An installed distribution (dist-info on sys.path) whose plugin module raises on import."""
    dist = tmp_path / "sg_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sg-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = sg_broken_plugin\n")
    (tmp_path / "sg_broken_plugin.py").write_text("raise RuntimeError('this plugin is broken')\n")
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    sys.modules.pop("sg_broken_plugin", None)


def test_entry_point_plugins_are_loaded(pm) -> None:  # type: ignore[no-untyped-def]
    infos = {info.name: info for info in plugin_infos(pm)}
    assert infos["builtin-fusion"].origin == "builtin"
    assert infos["testdetector"].origin == "entrypoint"
    assert infos["testdetector"].distribution == "streamguard-testdetector"
    assert infos["provenance"].distribution == "streamguard-provenance"
    assert "register_detectors" in infos["provenance"].hooks


def test_deny_list_removes_the_example_plugin() -> None:
    settings = load_settings(plugins={"deny": ["provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft"]})
    pm = build_plugin_manager(settings.plugins)
    assert not pm.has_plugin("provenance")
    assert "provenance" not in {spec.name for spec in collect_detectors(pm, settings)}


def test_deny_list_from_config_file_via_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from streamguard.cli import cli

    config = tmp_path / "streamguard.toml"
    config.write_text('[plugins]\ndeny = ["provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft"]\n')
    monkeypatch.delenv("STREAMGUARD_PLUGINS__DENY")  # the environment would override the file
    listed = json.loads(CliRunner().invoke(cli, ["plugins"]).stdout)
    assert "provenance" in {p["name"] for p in listed["plugins"]}
    denied = json.loads(CliRunner().invoke(cli, ["--config", str(config), "plugins"]).stdout)
    assert "provenance" not in {p["name"] for p in denied["plugins"]}
    assert "provenance" not in {d["name"] for d in denied["detectors"]}


def test_allow_list_keeps_only_named_plugins() -> None:
    pm = build_plugin_manager(PluginSettings(allow=["builtin-fusion", "builtin-policy", "testdetector"]))
    assert {name for name, _ in pm.list_name_plugin()} == {"builtin-fusion", "builtin-policy", "testdetector"}


def test_broken_plugin_is_logged_by_name_and_skipped(broken_plugin: Path) -> None:
    with capture_logs() as logs:
        pm = build_plugin_manager(PluginSettings())
    failures = [e for e in logs if e["event"] == "plugin.load_failed"]
    assert [f["plugin"] for f in failures] == ["broken"]
    assert "this plugin is broken" in failures[0]["error"]
    assert pm.has_plugin("testdetector")


def test_hook_tracing_logs_calls(settings) -> None:  # type: ignore[no-untyped-def]
    pm = build_plugin_manager(PluginSettings(trace_hooks=True))

    class Observer:
        @hookimpl
        def verdict_ready(self, verdict):  # type: ignore[no-untyped-def]
            pass

    pm.register(Observer())
    with capture_logs() as logs:
        _score(settings, pm, BRIGHT)
    calls = {e["hook"] for e in logs if e["event"] == "hook.call"}
    assert {"register_detectors", "fuse_scores", "decide_verdict", "verdict_ready"} <= calls


def test_hook_register_detectors(settings, pm) -> None:  # type: ignore[no-untyped-def]
    class Extra:
        @hookimpl
        def register_detectors(self, register, settings):  # type: ignore[no-untyped-def]
            assert settings.detectors.batch_size > 0
            register(DetectorSpec(name="extra", version="7", load=lambda ctx: None, contract=None))  # type: ignore[arg-type,return-value]
            register(DetectorSpec(name="brightness", version="dup", load=lambda ctx: None))  # type: ignore[arg-type,return-value]

    class Raises:
        @hookimpl
        def register_detectors(self, register):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    pm.register(Extra(), name="extra-plugin")
    pm.register(Raises(), name="raising-plugin")
    with capture_logs() as logs:
        specs = {spec.name: spec for spec in collect_detectors(pm, settings)}
    assert specs["extra"].version == "7"
    assert specs["brightness"].version == "test-1"  # the first registration of a name wins
    assert "provenance" in specs  # the raising plugin cost only its own detectors
    assert any(e["event"] == "detector.duplicate_name" for e in logs)
    assert any(e["event"] == "plugin.hook_failed" and e["plugin"] == "raising-plugin" for e in logs)


def test_hook_fuse_scores_replaced_by_plugin(settings, pm) -> None:  # type: ignore[no-untyped-def]
    seen = []

    class MaxFusion:
        @hookimpl
        def fuse_scores(self, scores):  # type: ignore[no-untyped-def]
            seen.append([s.detector for s in scores])
            return FusedScore(probability=0.7, logit=None, method="test")  # between the default thresholds

    pm.register(MaxFusion(), name="max-fusion")
    (verdict,) = _score(settings, pm, BRIGHT)
    assert verdict.probability == 0.7 and verdict.label == "uncertain"
    assert seen == [["brightness", "provenance"]]


def test_hook_fuse_scores_none_falls_through_to_default(settings, pm) -> None:  # type: ignore[no-untyped-def]
    class Declines:
        @hookimpl
        def fuse_scores(self):  # type: ignore[no-untyped-def]
            return None

    pm.register(Declines(), name="declines")
    (verdict,) = _score(settings, pm, BRIGHT)
    assert verdict.probability is not None and verdict.probability > 0.98


def test_hook_decide_verdict_replaced_by_plugin(settings, pm) -> None:  # type: ignore[no-untyped-def]
    class Strict:
        @hookimpl
        def decide_verdict(self, fused, scores):  # type: ignore[no-untyped-def]
            if fused.probability is None:  # the start-up probe for the policy version
                return Decision("uncertain", "strict-1")
            assert scores
            return Decision("ai_generated" if fused.probability > 0.001 else "real", "strict-1")

    pm.register(Strict(), name="strict")
    verdicts = _score(settings, pm, BRIGHT, DARK)
    assert [v.label for v in verdicts] == ["ai_generated", "ai_generated"]
    assert {v.policy_version for v in verdicts} == {"strict-1"}


def test_hook_verdict_ready_observes_every_verdict(settings, pm) -> None:  # type: ignore[no-untyped-def]
    observed = []

    class Observer:
        @hookimpl
        def verdict_ready(self, verdict):  # type: ignore[no-untyped-def]
            observed.append((verdict.event_id, verdict.label))

    class Faulty:
        @hookimpl
        def verdict_ready(self, verdict):  # type: ignore[no-untyped-def]
            raise ValueError("observer bug")

    pm.register(Observer(), name="observer")
    pm.register(Faulty(), name="faulty")
    with capture_logs() as logs:
        verdicts = _score(settings, pm, BRIGHT, DARK)
    assert observed == [("e0", "ai_generated"), ("e1", "real")]
    assert [v.label for v in verdicts] == ["ai_generated", "real"]
    assert any(e["event"] == "plugin.hook_failed" and e["plugin"] == "faulty" for e in logs)


def test_denying_builtin_fusion_without_replacement_is_a_config_error(settings) -> None:  # type: ignore[no-untyped-def]
    # testfaults implements fuse_scores too (inert unless asked): it would count as a replacement.
    pm = build_plugin_manager(PluginSettings(deny=["builtin-fusion", "testfaults", "builtin-univfd", "builtin-pinclip",
                                                   "builtin-mpft"]))
    with pytest.raises(ConfigurationError, match="fuse_scores"):
        Scorer(settings, pm)


def test_plugin_registered_from_another_file(tmp_path: Path, settings, pm) -> None:  # type: ignore[no-untyped-def]
    """The public API is enough to write a plugin: no private imports."""
    module = tmp_path / "third_party_plugin.py"
    module.write_text(textwrap.dedent('''
        from streamguard import DetectorSpec, InputContract, hookimpl

        class Backend:
            def predict(self, batch):
                return [6.0 for _ in batch]
            def close(self):
                pass

        @hookimpl
        def register_detectors(register):
            register(DetectorSpec(name="always-ai", version="1", load=lambda ctx: Backend(),
                                  contract=InputContract(size=16)))
    '''))
    sys.path.insert(0, str(tmp_path))
    try:
        import third_party_plugin  # type: ignore[import-not-found]

        pm.register(third_party_plugin, name="third-party")
        settings = load_settings(plugins={"deny": ["brightness", "provenance", "builtin-univfd", "builtin-pinclip", "builtin-mpft"]})
        (verdict,) = _score(settings, pm, DARK)
    finally:
        sys.path.remove(str(tmp_path))
    assert [s.detector for s in verdict.scores] == ["always-ai"]
    assert verdict.label == "ai_generated" and verdict.model_versions == {"always-ai": "1"}
    assert InputContract(size=16).fit == "resize"


def test_opt_in_builtins_load_only_when_enabled() -> None:
    from streamguard.config import PluginSettings
    from streamguard.plugins import build_plugin_manager

    def names(**kw: object) -> set[str]:
        return {name for name, _ in build_plugin_manager(PluginSettings(**kw)).list_name_plugin()}  # type: ignore[arg-type]

    assert "builtin-mpft" not in names()
    assert "builtin-mpft" in names(enable=["builtin-mpft"])
    assert "builtin-mpft" in names(allow=["builtin-fusion", "builtin-policy", "builtin-mpft"])
    assert "builtin-mpft" not in names(enable=["builtin-mpft"], deny=["builtin-mpft"])
    # pin-clip back in the default since 2026-12-04 (weight 0.2 beside univfd, retrained with wild-more);
    # mpft stays out (weight 0) and nirnet too.
    assert {"builtin-univfd", "builtin-pinclip"} <= names() and "builtin-nirnet" not in names()
    assert "builtin-pinclip" not in names(deny=["builtin-pinclip"])


def test_a_command_measuring_an_opt_in_detector_by_name_enables_its_plugin_only() -> None:
    from streamguard.config import PluginSettings
    from streamguard.plugins import OPT_IN_PLUGINS, build_plugin_manager, enabling

    default = PluginSettings()
    for plugin, detector in OPT_IN_PLUGINS.items():
        settings = enabling(default, detector)
        assert settings.enable == [plugin] and default.enable == []
        assert build_plugin_manager(settings).has_plugin(plugin)
    assert enabling(default, "univfd") is default and enabling(default, "fused") is default
    already = PluginSettings(enable=["builtin-mpft"])
    assert enabling(already, "mpft") is already
    # A denial still wins: the operator said never.
    assert not build_plugin_manager(enabling(PluginSettings(deny=["builtin-mpft"]), "mpft")).has_plugin("builtin-mpft")
