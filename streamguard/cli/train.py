"""``streamguard train``: train a built-in detector's weights from labelled data (univfd, pin-clip, mpft, nirnet)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from statistics import fmean
from typing import Any

import click

from streamguard.cli.context import AppContext
from streamguard.extras import require
from streamguard.training.nirnet.recipe import ABLATIONS as NIRNET_ABLATIONS

pass_app = click.make_pass_decorator(AppContext)

_choose_on_option = click.option(
    "--choose-on", type=click.Choice(["average", "groups", "val"]), default="average", show_default=True,
    help="What the probe's C (and which blocks' class tokens it reads) is chosen on: 'average', none chosen, every "
         "candidate's probe averaged into one (the rule since 2026-12-07); training's groups left out in turn "
         "(from 2026-12-04); or the val split (before).")
_without_source_directions_option = click.option(
    "--without-source-directions", is_flag=True,
    help="The averaged probe is fitted blind to the directions along which training's real photo sources' mean "
         "embeddings differ (projected out; served as the same one head; measured, not shipped).")
_augment_seed_option = click.option(
    "--augment-seed", type=int, default=None,
    help="The probe's augmentation draw (each image's one random augmentation) apart from the split, which --seed "
         "also decides (default: --seed): to measure how much a result owes to the draw.")
_augment_draws_option = click.option(
    "--augment-draws", type=click.IntRange(min=1), default=3, show_default=True,
    help="The probe's training rows per image: its augmentation under this many draws (--augment-seed's, then the "
         "next seeds'), so the probe owes less to one draw (1: the rule before 2026-12-04).")

_matched_fakes_option = click.option(
    "--matched-fakes", is_flag=True,
    help="The probe also learns every real training photo reconstructed through an autoencoder (trained here on "
         "real photos no fold holds out) as a generated image: content- and format-matched fakes (measured, not "
         "shipped).")

_native_jpeg_option = click.option(
    "--native-jpeg", is_flag=True,
    help="The probe's augmentation also re-encodes half the images (both classes) as JPEG q60-95 at their own "
         "size, before the rescale (measured, not shipped).")

_mirror_option = click.option(
    "--mirror", is_flag=True,
    help="The probe's augmentation also mirrors half the images (both classes) left to right.")

_rendered_screens_option = click.option(
    "--rendered-screens", type=click.IntRange(min=0), default=0, show_default=True,
    help="The real class (univfd's probe's; pin-clip's and mpft's when they train, in `train loso` too) also holds "
         "this many procedural app and desktop screenshots, drawn from the seed (never held out: they are no data's "
         "group; the shipped univfd weights hold 150).")

_night_twins_option = click.option(
    "--night-twins", type=click.IntRange(min=0), default=0, show_default=True,
    help="The probe's real class also holds this many real training photos (seeded) as a phone's night mode "
         "returns them: darkened, noisy, tone-lifted, denoised, sharpened (each leaves with its photo's source; "
         "measured, not shipped).")

_feed_twins_option = click.option(
    "--feed-twins", type=click.IntRange(min=0), default=0, show_default=True,
    help="The real class (univfd's probe's; pin-clip's and mpft's when they train, in `train loso` too) also holds "
         "this many real training photos (seeded) shown as a post in a rendered screenshot of a social feed (each "
         "leaves with its photo's source; the shipped univfd weights hold 150).")

_feed_fake_twins_option = click.option(
    "--feed-fake-twins", type=click.IntRange(min=0), default=0, show_default=True,
    help="The probe's generated class also holds this many generated training images (seeded) shown as such "
         "posts, so that a feed's chrome is no cue to the real class (each leaves with its generator).")

_meme_twins_option = click.option(
    "--meme-twins", type=click.IntRange(min=0), default=0, show_default=True,
    help="The probe also learns from this many training images of each class (seeded) made into memes, each "
         "in its own class, so that a caption is a cue to neither (each leaves with its group).")

_portrait_twins_option = click.option(
    "--portrait-twins", type=click.IntRange(min=0), default=0, show_default=True,
    help="The probe's real class also holds up to this many real training photos with a face (seeded), each "
         "cropped as a portrait of it at its own pixels (each leaves with its photo's source; needs OpenCV, "
         "in the eval extra).")


@click.group("train")
def train_group() -> None:
    """Train detector weights."""


@train_group.command("univfd")
@click.option("--data", "data", multiple=True, required=True, help="Dataset (any layout `eval` reads); repeatable.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Weights directory (default: the shipped one).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit-per-group", type=int, default=None, help="Seeded subsample per (label, generator/source).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-augment", is_flag=True, help="Embed images as they are (shortcut-prone; for ablations).")
@click.option("--holdout-generator", "holdout_generators", multiple=True,
              help="Keep this generator out of train/val; scored on original bytes into held_out.json; repeatable.")
@click.option("--holdout-source", "holdout_sources", multiple=True,
              help="Keep this source out of train/val; scored on original bytes into held_out.json; repeatable.")
@click.option("--reads", type=click.Choice(["class-tokens", "embedding"]), default="class-tokens", show_default=True,
              help="What the probe reads: the class token of every CLIP block (the shipped univfd, RINE's reading), "
                   "or the encoder's output embedding (UnivFD's own, shipped before 2026-12).")
@_choose_on_option
@_without_source_directions_option
@_augment_seed_option
@_augment_draws_option
@_matched_fakes_option
@_native_jpeg_option
@_mirror_option
@_rendered_screens_option
@_night_twins_option
@_feed_twins_option
@_feed_fake_twins_option
@_portrait_twins_option
@_meme_twins_option
@pass_app
def train_univfd_command(app: AppContext, data: tuple[str, ...], out: Path | None, seed: int,
                         limit_per_group: int | None, device: str, no_augment: bool,
                         holdout_generators: tuple[str, ...], holdout_sources: tuple[str, ...], reads: str,
                         choose_on: str, without_source_directions: bool, augment_seed: int | None,
                         augment_draws: int, matched_fakes: bool,
                         native_jpeg: bool, mirror: bool, rendered_screens: int, night_twins: int,
                         feed_twins: int, feed_fake_twins: int, portrait_twins: int, meme_twins: int) -> None:
    """Fit the UnivFD linear probe on frozen CLIP features; writes head, calibration and a report."""
    require("`streamguard train univfd`", "inprocess", "eval")
    from streamguard.builtin.univfd.plugin import WEIGHTS_DIR
    from streamguard.training.univfd import TrainConfig, train_univfd

    cfg = TrainConfig(data=data, out=out or WEIGHTS_DIR, seed=seed, limit_per_group=limit_per_group,
                      device=device, augment=not no_augment, holdout_generators=holdout_generators,
                      holdout_sources=holdout_sources, backbone="clip-blocks" if reads == "class-tokens" else "clip",
                      choose_on=choose_on, without_source_directions=without_source_directions,
                      augment_seed=augment_seed,
                      augment_draws=augment_draws, matched_fakes=matched_fakes,  # type: ignore[arg-type]
                      native_jpeg=native_jpeg, mirror=mirror, rendered_screens=rendered_screens,
                      night_twins=night_twins, feed_twins=feed_twins, feed_fake_twins=feed_fake_twins,
                      portrait_twins=portrait_twins, meme_twins=meme_twins)
    try:
        report = train_univfd(app.settings, cfg)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    summary = {k: report[k] for k in ("version", "C", "blocks", "chosen_on", "counts")}
    for split in ("val", "test"):
        if split in report:
            summary[split] = report[split]["overall"]  # type: ignore[index]
    click.echo(json.dumps(summary, indent=2))


def _tune_blocks(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number of blocks nor 'all'") from None


def _finetune_options(modes: tuple[str, ...], default_mode: str):  # type: ignore[no-untyped-def]
    """The options `train pin-clip` and `train mpft` share; ``--mode`` lists the method's ablations."""
    options = [
        click.option("--data", "data", multiple=True, required=True,
                     help="Dataset (any layout `eval` reads); repeatable."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Weights directory (default: the shipped one)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--epochs", type=int, default=10, show_default=True),
        click.option("--batch-size", type=int, default=16, show_default=True),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate of the adapters."),
        click.option("--head-lr", type=float, default=None, help="Learning rate of the head (default: 10 x --lr)."),
        click.option("--patience", type=int, default=3, show_default=True,
                     help="Epochs without a better val AUC before stopping."),
        click.option("--tune-blocks", default="2", show_default=True,
                     help="LoRA on the last N encoder blocks, or 'all' (GPU)."),
        click.option("--lora-rank", type=int, default=8, show_default=True),
        click.option("--lora-targets", default="q_proj,v_proj", show_default=True,
                     help="Attention projections to adapt, among q_proj,k_proj,v_proj,out_proj."),
        click.option("--mode", type=click.Choice(modes), default=default_mode, show_default=True,
                     help="The method or one of its ablations."),
        click.option("--device", default="cpu", show_default=True),
        click.option("--limit-per-group", type=int, default=None,
                     help="Seeded subsample per (label, generator/source)."),
        click.option("--holdout-generator", "holdout_generators", multiple=True,
                     help="Keep this generator out of train/val and report it as test; repeatable."),
        click.option("--holdout-source", "holdout_sources", multiple=True,
                     help="Keep this source out of train/val and report it as test; repeatable."),
        click.option("--no-augment", is_flag=True, help="Train on images as they are (shortcut-prone; ablations)."),
        click.option("--augment-variants", type=int, default=2, show_default=True,
                     help="Augmented copies per image; epoch e trains on copy e mod N."),
        _rendered_screens_option,
        _feed_twins_option,
        click.option("--no-prefix-cache", is_flag=True,
                     help="Run the frozen blocks at every step instead of caching their output."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/train"),
                     show_default=True, help="Prefix cache and checkpoints."),
        click.option("--resume", is_flag=True, help="Continue from the last epoch's checkpoint."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bars on stderr (default: on a terminal)."),
    ]

    def decorate(fn):  # type: ignore[no-untyped-def]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _run_finetune(app: AppContext, method: str, default_out: Path, options: dict[str, Any],
                  method_config: dict[str, Any]) -> None:
    require(f"`streamguard train {method}`", "inprocess", "eval")
    from streamguard.backbone.lora import LoraConfig
    from streamguard.training.mpft import MpftConfig
    from streamguard.training.pinclip import PinClipConfig
    from streamguard.training.recipe import Recipe, train_detector

    progress = options["progress"] if options["progress"] is not None else sys.stderr.isatty()
    try:
        lora = LoraConfig(rank=options["lora_rank"], alpha=2.0 * options["lora_rank"],
                          targets=tuple(t.strip() for t in options["lora_targets"].split(",") if t.strip()))
        recipe = Recipe(
            method=method,  # type: ignore[arg-type]
            data=options["data"], out=options["out"] or default_out, seed=options["seed"],
            epochs=options["epochs"], batch_size=options["batch_size"], lr=options["lr"], head_lr=options["head_lr"],
            patience=options["patience"], tune_blocks=_tune_blocks(options["tune_blocks"]), lora=lora,
            limit_per_group=options["limit_per_group"], holdout_generators=options["holdout_generators"],
            holdout_sources=options["holdout_sources"], augment=not options["no_augment"],
            augment_variants=options["augment_variants"], prefix_cache=not options["no_prefix_cache"],
            device=options["device"], cache_dir=options["cache_dir"], resume=options["resume"], progress=progress,
            pinclip=PinClipConfig(mode=options["mode"], **method_config) if method == "pin-clip" else PinClipConfig(),
            mpft=MpftConfig(mode=options["mode"], **method_config) if method == "mpft" else MpftConfig(),
            rendered_screens=options["rendered_screens"], feed_twins=options["feed_twins"],
        )
        report = train_detector(app.settings, recipe)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    keys = ("version", "method", "mode", "best_epoch", "stopped_early", "counts")
    summary: dict[str, Any] = {k: report[k] for k in keys}
    for split in ("val", "test"):
        if split in report:
            summary[split] = report[split]["overall"]
    click.echo(json.dumps(summary, indent=2))


@train_group.command("pin-clip")
@_finetune_options(("learned", "gaussian", "none"), "learned")
@click.option("--beta", type=float, default=1e-3, show_default=True, help="Weight of the noise's KL term.")
@click.option("--class-embeddings", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="(2, embed_dim) real/fake text embeddings (.safetensors or .npy), frozen; default: learned.")
@pass_app
def train_pinclip_command(app: AppContext, beta: float, class_embeddings: Path | None, **options: Any) -> None:
    """Fine-tune CLIP with LoRA and positive-incentive noise (PiN-CLIP); writes the detector's files."""
    from streamguard.builtin.pinclip.plugin import WEIGHTS_DIR

    _run_finetune(app, "pin-clip", WEIGHTS_DIR, options, {"beta": beta, "class_embeddings": class_embeddings})


@train_group.command("mpft")
@_finetune_options(("texture", "random", "none"), "texture")
@click.option("--rho-min", type=float, default=0.3, show_default=True, help="Smallest share of patches masked.")
@click.option("--rho-max", type=float, default=0.7, show_default=True, help="Largest share of patches masked.")
@pass_app
def train_mpft_command(app: AppContext, rho_min: float, rho_max: float, **options: Any) -> None:
    """Fine-tune CLIP with LoRA under Texture-Aware Masking (MPFT); writes the detector's files."""
    from streamguard.builtin.mpft.plugin import WEIGHTS_DIR

    _run_finetune(app, "mpft", WEIGHTS_DIR, options, {"rho_min": rho_min, "rho_max": rho_max})


def _branches(value: str) -> tuple[str, ...]:
    from streamguard.builtin.nirnet.files import BRANCHES

    names = tuple(b.strip() for b in value.split(",") if b.strip())
    if not names or any(b not in BRANCHES for b in names):
        raise click.BadParameter(f"{value!r}: a comma-separated subset of {','.join(BRANCHES)}")
    return names


@train_group.command("nirnet")
@click.option("--data", "data", multiple=True, required=True, help="Dataset (any layout `eval` reads); repeatable.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/nirnet"),
              show_default=True, help="Weights directory; shipping is a deliberate copy into the plugin's weights/.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images per step (each brings its crops).")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--patience", type=int, default=2, show_default=True,
              help="Epochs without a better val AUC before stopping.")
@click.option("--crop-size", type=int, default=128, show_default=True, help="Native crop side (never resized).")
@click.option("--crops", type=int, default=2, show_default=True, help="Random training crops per image and epoch.")
@click.option("--serve-crops", type=int, default=4, show_default=True,
              help="Crops the served detector (and validation) averages per image.")
@click.option("--branches", default="noise,frequency,semantic", show_default=True,
              help="Enabled branches, a subset of noise,frequency,semantic (ablations).")
@click.option("--extractor-depth", type=int, default=8, show_default=True)
@click.option("--width", type=int, default=32, show_default=True, help="Extractor and branch width.")
@click.option("--feature-dim", type=int, default=64, show_default=True)
@click.option("--hidden-dim", type=int, default=64, show_default=True)
@click.option("--no-simulator", is_flag=True, help="Train without simulated imprints (ablation).")
@click.option("--simulated-share", type=float, default=0.5, show_default=True,
              help="Chance that a real training crop also comes back imprinted, as an extra generated sample.")
@click.option("--residual-source", default="denoiser", show_default=True,
              help="Where imprints are measured: denoiser, autoencoder (trained here) or vae:PATH (diffusers VAE).")
@click.option("--autoencoder-steps", type=int, default=200, show_default=True)
@click.option("--difference-vae", default=None, metavar="PATH",
              help="A diffusers AutoencoderKL whose encoder the Difference-Aware Loss trains the extractor "
                   "against (off without one: no VAE ships or downloads here).")
@click.option("--difference-weight", type=float, default=0.1, show_default=True,
              help="Weight of the Difference-Aware Loss beside the classification loss.")
@click.option("--jpeg-share", type=float, default=0.2, show_default=True,
              help="Chance that any training crop, real or generated, is JPEG re-encoded.")
@click.option("--limit-per-group", type=int, default=None, help="Seeded subsample per (label, generator/source).")
@click.option("--holdout-generator", "holdout_generators", multiple=True,
              help="Keep this generator out of training and imprint fitting; scored into held_out.json; repeatable.")
@click.option("--holdout-source", "holdout_sources", multiple=True,
              help="Keep this source out of training and imprint fitting; scored into held_out.json; repeatable.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/train"),
              show_default=True, help="Checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the last epoch's checkpoint.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: on a terminal).")
@pass_app
def train_nirnet_command(app: AppContext, branches: str, no_simulator: bool, progress: bool | None,
                         data: tuple[str, ...], out: Path, **options: Any) -> None:
    """Train NIRNet (noise imprints, native crops, simulated fakes); writes the detector's files."""
    require("`streamguard train nirnet`", "inprocess", "eval")
    from streamguard.training.nirnet.recipe import NirnetRecipe
    from streamguard.training.nirnet.train import train_nirnet

    try:
        recipe = NirnetRecipe(data=data, out=out, branches=_branches(branches), simulator=not no_simulator,
                              progress=progress if progress is not None else sys.stderr.isatty(), **options)
        run = train_nirnet(app.settings, recipe)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    report = run.report
    summary: dict[str, Any] = {k: report[k] for k in ("version", "method", "branches", "best_epoch",
                                                        "stopped_early", "counts")}
    summary["residual_source"] = report["simulator"]["residual_source"]
    summary["out"] = str(run.out)
    for split in ("val", "test"):
        if split in report:
            summary[split] = report[split]["overall"]
    click.echo(json.dumps(summary, indent=2))


@train_group.command("loso")
@click.option("--data", "data", multiple=True, required=True,
              help="Training data (any layout `eval` reads); repeatable.")
@click.option("--loso-data", "loso_data", multiple=True, required=True,
              help="The --data roots whose generators and real sources are held out in turn; repeatable.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/loso"),
              show_default=True, help="Fold runs and loso.json.")
@click.option("--method", "methods", multiple=True,
              type=click.Choice(("univfd", "pin-clip", "mpft", "nirnet", "univfd-blocks", "univfd-tokens", "dinov2-probe",
                                 "dinov2-blocks", "rigid", *NIRNET_ABLATIONS)),
              help="Detectors to validate (default: the three CLIP ones; two or more also choose fusion weights). "
                   "nirnet: trained per fold with `train nirnet`'s defaults and --epochs; nirnet-NAME: an ablation "
                   "of it (no-simulator, autoencoder residuals, or one branch alone). "
                   "univfd-blocks: univfd's probe on the class token of every CLIP block (RINE's reading); "
                   "univfd-tokens: on every CLIP block's class token and mean patch token (measured); "
                   "dinov2-probe: a probe on frozen DINOv2 ViT-S/14 features (block 6); dinov2-blocks: on every "
                   "DINOv2 block's CLS and mean patch token, blocks chosen as univfd-blocks' are; rigid: RIGID's "
                   "noise-stability score on them; the DINOv2 ones measured, not shipped.")
@click.option("--folds", type=int, default=None,
              help="Pack the groups into this many folds (default: one fold per group).")
@click.option("--fold", "fold_names", multiple=True, help="Train only this fold (see the plan in the log).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit-per-group", type=int, default=None, help="Seeded subsample per (label, generator/source).")
@click.option("--epochs", type=int, default=5, show_default=True, help="Epochs of pin-clip, mpft and nirnet per fold.")
@click.option("--max-false-flag", type=float, default=0.02, show_default=True,
              help="Most real photos of any one source the ai threshold may flag.")
@click.option("--max-false-clear", type=float, default=0.10, show_default=True,
              help="Most images of a generator (mean over generators) the real threshold may clear.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/train"),
              show_default=True, help="Embedding and prefix caches, shared with `train`.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr (default: on a terminal).")
@click.option("--unseen-scores", "unseen_scores", multiple=True, metavar="NAME=SCORES.CSV|LOSO_OUT/METHOD",
              help="A detector not retrained on these folds: its `eval` scores.csv on loso data it never trained on "
                   "(the shipped mpft on a newer data root), or another `train loso` run's method folder (one "
                   "packed into fewer folds with --folds); pooled with the fold scores, the report then covers "
                   "the images every detector scored.")
@click.option("--report", "report_name", default="loso.json", show_default=True, help="Report file name in --out.")
@click.option("--against", "against", multiple=True, metavar="REPORT",
              help="Another report in --out (e.g. loso.json) whose fused verdict this one's is compared with on the "
                   "images both scored: balanced AUCs and their difference with a paired 95% interval, and what "
                   "each one's policy decides (generators flagged, uncertain, real photos cleared), the thresholds "
                   "chosen again on each paired resample.")
@click.option("--train-view", default="resize", show_default=True,
              help="The view the probe methods learn from (cropsN, cropsN+whole): each view of an augmented image "
                   "is a training row, and validation scores an image by the mean logit of its views.")
@click.option("--view", default="resize", show_default=True,
              help="Pool the fold models' scores under this view (cropsN, cropsN+whole; `train loso-variants "
                   "--variant VIEW` scores them) to choose the fusion and policy of detectors served with "
                   "detectors.options.<name>.views; --unseen-scores should then be scored under it too.")
@click.option("--pin-clip", "pin_clip", multiple=True, metavar="NAME=VALUE",
              help="pin-clip's recipe for its folds, over `train pin-clip`'s defaults: mode (learned, gaussian, "
                   "none), beta, noise_scale or attn_dim; repeatable. Tuned here, on groups left out.")
@click.option("--tune-blocks", "tune_blocks", type=click.IntRange(min=1), default=None,
              help="pin-clip's and mpft's folds put LoRA on their last N encoder blocks (default: `train pin-clip`'s "
                   "2); the frozen prefix's cache is built once per N.")
@click.option("--policy-copies", "policy_copies", default="none", show_default=True, metavar="PERTURBATIONS",
              help="Copies of the held-out images (a comma list as `eval --perturb` takes, e.g. jpeg75,downscale0.5) "
                   "that the thresholds must meet both targets on too, each as if the whole stream were that copy: "
                   "`train loso-variants --variant VIEW@NAME` scores them. The fusion is still chosen on the "
                   "original bytes.")
@_choose_on_option
@_without_source_directions_option
@_augment_seed_option
@_augment_draws_option
@_matched_fakes_option
@_native_jpeg_option
@_mirror_option
@_rendered_screens_option
@_night_twins_option
@_feed_twins_option
@_feed_fake_twins_option
@_portrait_twins_option
@_meme_twins_option
@pass_app
def train_loso_command(app: AppContext, data: tuple[str, ...], loso_data: tuple[str, ...], out: Path,
                       methods: tuple[str, ...], folds: int | None, fold_names: tuple[str, ...], seed: int,
                       limit_per_group: int | None, epochs: int, max_false_flag: float, max_false_clear: float,
                       device: str, cache_dir: Path, progress: bool | None, unseen_scores: tuple[str, ...],
                       report_name: str, against: tuple[str, ...], view: str, train_view: str, choose_on: str,
                       without_source_directions: bool, augment_seed: int | None, augment_draws: int,
                       pin_clip: tuple[str, ...], policy_copies: str,
                       matched_fakes: bool, native_jpeg: bool, mirror: bool, rendered_screens: int,
                       night_twins: int, feed_twins: int, feed_fake_twins: int, portrait_twins: int,
                       meme_twins: int, tune_blocks: int | None) -> None:
    """Leave-one-source-out validation: per-source results on unseen sources, fusion weights and thresholds."""
    require("`streamguard train loso`", "inprocess", "eval")
    from streamguard.evaluation.perturb import parse_perturbations
    from streamguard.training.loso import DEFAULT_METHODS, LosoConfig, run_loso

    try:
        cfg = LosoConfig(data=data, loso_data=loso_data, out=out, methods=methods or DEFAULT_METHODS, folds=folds,
                         seed=seed, augment_seed=augment_seed, augment_draws=augment_draws,
                         limit_per_group=limit_per_group, epochs=epochs, device=device, cache_dir=cache_dir,
                         progress=progress if progress is not None else sys.stderr.isatty(),
                         max_false_flag=max_false_flag, max_false_clear=max_false_clear, fold_names=fold_names,
                         unseen_scores=tuple(_named_path(v) for v in unseen_scores), report_name=report_name,
                         view=view, train_view=train_view, against=against, choose_on=choose_on,  # type: ignore[arg-type]
                         without_source_directions=without_source_directions,
                         pin_clip=tuple(_name_value(v, "--pin-clip") for v in pin_clip), matched_fakes=matched_fakes,
                         native_jpeg=native_jpeg, mirror=mirror, rendered_screens=rendered_screens,
                         night_twins=night_twins, feed_twins=feed_twins, feed_fake_twins=feed_fake_twins,
                         portrait_twins=portrait_twins, meme_twins=meme_twins, tune_blocks=tune_blocks,
                         policy_copies=tuple(parse_perturbations(policy_copies)))
        report = run_loso(app.settings, cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if "detectors" not in report:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_loso(report))


@train_group.command("loso-variants")
@click.option("--data", "data", multiple=True, required=True, help="As given to `train loso`.")
@click.option("--loso-data", "loso_data", multiple=True, required=True, help="As given to `train loso`.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache/loso"),
              show_default=True, help="The finished `train loso` run.")
@click.option("--method", "methods",
              type=click.Choice(("univfd", "univfd-blocks", "pin-clip", "mpft", "nirnet", *NIRNET_ABLATIONS)),
              multiple=True,
              required=True, help="Fold-trained method to score (repeatable: several are also fused).")
@click.option("--variant", "variants", multiple=True, required=True,
              help="VIEW[@PERTURBATION][:SERVING]: VIEW is resize, cropsN or cropsN+whole (add -trimmed for a "
                   "trimmed mean of crops, then -flip for each view's mirror image too, then -inset to cut the "
                   "views from the photo a screenshot shows, then -jpeg to judge what is shown as a q75 JPEG); "
                   "SERVING is fp32 (the default), int8, int8-mixed or those with ort- (ONNX Runtime), on the "
                   "shared trunk; e.g. crops4+whole, resize@jpeg75, resize-inset@feedpost, resize-inset@meme, "
                   "resize:ort-int8-mixed.")
@click.option("--folds", type=int, default=None, help="Unused: the folds, pools and sample are those loso.json recorded.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit-per-group", type=int, default=None,
              help="Score at most N held-out images per group (seeded) under each variant.")
@click.option("--unseen-scores", "unseen_scores", multiple=True, metavar="NAME=SCORES.CSV|LOSO_OUT/METHOD",
              help="As for `train loso`, an `eval` scores.csv run with the same perturbations, or a loso method "
                   "folder whose own loso-variants run scored them: the default fused verdict (loso.json's "
                   "weights and calibration) is then compared under each variant.")
@click.option("--report", "reports", multiple=True, metavar="NAME",
              help="Another `train loso --report NAME` of the same folds (e.g. one without a detector) whose "
                   "fusion is compared under each variant too, beside --base-report's (repeatable).")
@click.option("--base-report", "base", default="loso.json", show_default=True, metavar="NAME",
              help="The run's `train loso` report in --out: its folds, sample and thresholds are scored, and its "
                   "fusion is the default fused verdict compared.")
@pass_app
def train_loso_variants_command(app: AppContext, data: tuple[str, ...], loso_data: tuple[str, ...], out: Path,
                                methods: tuple[str, ...], variants: tuple[str, ...], folds: int | None, seed: int,
                                limit_per_group: int | None, unseen_scores: tuple[str, ...],
                                reports: tuple[str, ...], base: str) -> None:
    """Score the LOSO fold models' held-out images under other views, perturbations or encoder servings,
    per group."""
    require("`streamguard train loso-variants`", "inprocess", "eval")
    from streamguard.training.loso import LosoConfig
    from streamguard.training.loso_views import parse_variant, run_variants

    try:
        cfg = LosoConfig(data=data, loso_data=loso_data, out=out, methods=methods, folds=folds, seed=seed)
        result = run_variants(app.settings, cfg, methods, [parse_variant(v) for v in variants], limit_per_group,
                              dict(_named_path(v) for v in unseen_scores), reports, base)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None

    def change(row: dict[str, Any]) -> str:
        if "auc_change" not in row:
            return ""
        low, high = row.get("auc_change_interval", (None, None))
        return f"{row['auc_change']:+.4f}" + ("" if low is None else f" [{low:+.4f}, {high:+.4f}]")

    def table(title: str, compared: dict[str, Any]) -> list[str]:
        return [title, "", "| variant | balanced AUC | change [paired 95%] |", "|---|---|---|",
                *(f"| {name} | {row['balanced_auc']} | {change(row)} |" for name, row in compared["variants"].items()),
                ""]

    lines: list[str] = []
    for method, compared in result["methods"].items():
        lines += table(f"{compared['images']} held-out images, {method}:", compared)
    for name, compared in result["fused"].items():
        which = "Default fused verdict" if name == base else f"Fused verdict of {name}"
        weights = ", ".join(f"{k} {v}" for k, v in compared["weights"].items())
        lines += table(f"{which} ({weights}; {compared['images']} images):", compared)
    click.echo("\n".join(lines).rstrip())


def _named_path(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not Path(path).exists():
        raise ValueError(f"--unseen-scores wants NAME=SCORES.CSV or NAME=LOSO_OUT/METHOD, an existing file or "
                         f"folder, not {value!r}")
    return name, Path(path)


def _name_value(value: str, option: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not name or not text:
        raise ValueError(f"{option} wants NAME=VALUE, not {value!r}")
    return name, text


def carry_over_line(report: dict[str, Any]) -> str:
    """How the policy rule fares on each group when chosen without it (`policy_carry_over`)."""
    carried, most = report["policy_carry_over"], report["targets"]["max_false_flag"]
    names = list(report.get("policy_copies") or ["none"])
    over = [f"{c['group']} {share:.1%}{'' if copy == 'none' else f' on {copy}'} (ai >= {c['ai_threshold']})"
            for c in carried if c["kind"] == "real"
            for copy, share in zip(names, [c["ai_generated"], *c.get("copies_ai_generated", ())], strict=True)
            if share > most]
    fakes = [c for c in carried if c["kind"] == "ai"]
    generators = (f"generators flagged {fmean(c['ai_generated'] for c in fakes):.1%}, cleared "
                  f"{fmean(c['real'] for c in fakes):.1%} on average" if fakes else "one generator group: none judged")
    return (f"Chosen without each group in turn: real sources over {most:.0%} flagged: {', '.join(over) or 'none'}; "
            f"{generators}.")


def policy_copies_table(report: dict[str, Any]) -> list[str]:
    """The chosen policy on each copy it was chosen to hold on (`--policy-copies`); nothing without copies."""
    copies = report.get("policy_copies")
    if not copies:
        return []
    most = report["targets"]["max_false_flag"]
    lines = ["The policy on each copy of the held-out images it was chosen on (none: the original bytes):", "",
             f"| copy | balanced AUC | worst real source flagged | real sources over {most:.0%} | real cleared | "
             "generators flagged | generators cleared | uncertain |", "|---" * 8 + "|"]
    for name, p in copies.items():
        lines.append(f"| {name} | {p['balanced_auc']} | {p['worst_false_flag']:.1%} | {p['real_sources_over']} | "
                     f"{p['real_cleared']:.1%} | {p['generators_flagged']:.1%} | {p['generators_cleared']:.1%} | "
                     f"{p['uncertain']:.1%} |")
    return [*lines, ""]


def operating_points_table(report: dict[str, Any]) -> list[str]:
    """The chosen policy and what each missed aim would cost if the thresholds alone met it
    (`operating_points`: at the bound, 0.5, where none within it does); nothing for a report written before
    they were recorded."""
    points = report.get("operating_points")
    if not points:
        return []
    from streamguard.evaluation.selection import FLAGGED_AIM, UNCERTAIN_AIM

    most = report["targets"]["max_false_flag"]
    titles = {"chosen": "chosen", "flagged_aim": f"generators {FLAGGED_AIM:.0%} flagged",
              "uncertain_aim": f"at most {UNCERTAIN_AIM:.0%} uncertain"}
    lines = ["What the thresholds alone would have to give up for each aim:", "",
             f"| policy | ai / real | worst real source flagged | real sources over {most:.0%} | real flagged | "
             "real cleared | generators flagged | generators cleared | uncertain |", "|---" * 9 + "|"]
    for name, p in points.items():
        missed = {"flagged_aim": p["generators_flagged"] < FLAGGED_AIM, "uncertain_aim": p["uncertain"] > UNCERTAIN_AIM}
        title = titles[name] + (" (not met within 0.5)" if missed.get(name) else "")
        lines.append(f"| {title} | {p['ai_threshold']} / {p['real_threshold']} | {p['worst_false_flag']:.1%} | "
                     f"{p['real_sources_over']} | {p['real_flagged']:.1%} | {p['real_cleared']:.1%} | "
                     f"{p['generators_flagged']:.1%} | {p['generators_cleared']:.1%} | {p['uncertain']:.1%} |")
    return lines


def render_loso(report: dict[str, Any]) -> str:
    """The report as Markdown: per-detector summary, then per-group verdict shares under the chosen policy."""
    t = report["thresholds"]
    lines = [f"Folds: {', '.join(f['name'] for f in report['folds'])}; {report['images']} held-out images.",
             f"Policy chosen: ai >= {t['ai_threshold']}, real <= {t['real_threshold']} "
             f"(worst real source flagged {t['worst_false_flag']:.1%}, generators cleared {t['mean_false_clear']:.1%} "
             f"on average{', on the copy that bounds each' if report.get('policy_copies') else ''}).",
             carry_over_line(report), ""]
    lines += [*policy_copies_table(report), *operating_points_table(report), ""]
    if report["weights"]:
        w = report["weights"]
        lines += [f"Fusion weights: {w['weights']} (balanced AUC {w['auc']:.4f}; equal weights {w['equal_auc']:.4f}).",
                  ""]
    if (carried := report.get("carried_over_auc")) is not None:  # reports written before it was recorded lack it
        lines += [f"Balanced AUC of the fused verdict with each (real source, generator) pair ranked under the fusion "
                  f"chosen without both: {carried:.4f} (chosen with them: "
                  f"{report['detectors']['fused']['balanced_auc']}).", ""]
    names = list(report["detectors"])
    lines += ["| detector | balanced AUC | worst real acc @0.5 | mean fake acc @0.5 |", "|---|---|---|---|"]
    for name in names:
        d = report["detectors"][name]
        lines.append(f"| {name} | {d['balanced_auc']} | {d['worst_real_accuracy_at_0.5']} | "
                     f"{d['mean_fake_accuracy_at_0.5']} |")
    groups = report["detectors"][names[0]]["groups"]
    lines += ["", "Accuracy at 0.5 per held-out group:", "",
              "| group | kind | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for group, row in groups.items():
        accs = " | ".join(str(report["detectors"][n]["groups"][group]["accuracy_at_0.5"]) for n in names)
        lines.append(f"| {group} | {row['kind']} | {row['n']} | {accs} |")
    final = "fused" if "fused" in report["detectors"] else names[0]
    rows = report["detectors"][final]["groups"]
    per_class = Counter(row["kind"] for row in rows.values())
    lines += ["", f"Verdicts of {final} under the chosen policy, and each group's balanced AUC against the other "
              "class; its cost, (1 - AUC) / groups of its kind, is what it takes from the balanced AUC (a kind's "
              "costs add up to the whole shortfall):", "",
              "| group | ai_generated | uncertain | real | AUC against the other class | cost |", "|---" * 6 + "|"]
    for group, row in rows.items():
        auc = row.get("auc")  # reports written before it was recorded have none
        cost = "" if auc is None else f"{(1 - auc) / per_class[row['kind']]:.4f}"
        lines.append(f"| {group} | {row['ai_generated']} | {row['uncertain']} | {row['real']} | "
                     f"{'' if auc is None else auc} | {cost} |")
    for name, compared in report.get("against", {}).items():
        d = compared["difference"]
        lines += ["", (f"Against {name} ({compared['images']} images): balanced AUC {compared['balanced_auc']} against "
                       f"{compared['other_balanced_auc']}, {d['value']:+.4f} [paired 95%: {d['low']:+.4f}, "
                       f"{d['high']:+.4f}].")]
        lines += policy_against_lines(compared.get("policy"))
    return "\n".join(lines)


def policy_against_lines(policy: dict[str, Any] | None) -> list[str]:
    """What each verdict's policy decides, paired (`bootstrap_policy`); none for reports written before
    2026-12-07, which compared the ranking alone."""
    from streamguard.evaluation.selection import DECISION_MEASURES

    if not policy:
        return []

    def said(m: str) -> str:
        this, other, d = (policy[f"{who} {m}"] for who in ("this", "other", "this - other"))
        return (f"{m.replace('_', ' ')} {this['value']:.1%} against {other['value']:.1%}, "
                f"{d['value']:+.1%} [paired 95%: {d['low']:+.1%}, {d['high']:+.1%}]")

    return ["Each policy chosen again on the original bytes, and on each resample: "
            + "; ".join(said(m) for m in DECISION_MEASURES) + "."]
