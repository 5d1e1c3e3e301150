"""Training recipes: ``paper`` (Amthor et al. as published) and ``impatient`` (the default).

``paper``: the EP heads start at random, every exit trains jointly with the
budget weights, the epoch best on validation is kept. Nothing else.

``impatient`` adds, each lever chosen on the validation split only:

1. LP-FT start (pretrained backbones only): every EP head starts as the
   val-tuned regularised probe on the pretrained features
   (``training.probes.linear_probe_start``), so the network at "epoch 0"
   predicts exactly like the ORIG baseline; that epoch is validated and
   saved like any other, so the epoch chosen on validation may be the start.
   The backbone's batch-norm statistics are frozen while fine-tuning
   (its layers stay in eval mode; their affine parameters still train):
   with ~1,000 images the pretrained statistics are better estimates than
   batch statistics, training and evaluation see the same normalisation,
   and the start's probes stay matched to the features they were fitted on.
2. Joint budget-weighted fine-tuning (as in ``paper``).
3. Post-hoc refit of the chosen checkpoint: exit k's head becomes the
   val-tuned probe on the final features where that is strictly better on
   validation (``training.probes.refit_heads``); the probes see at most
   ``refit_train_per_class`` training images per class (all by default).
   With ``choose_pooling`` (the default) the LP-FT start and the refit also
   choose each average-pooling head's grid on validation, with the probe's C:
   the paper's 4x4 grid suits 224x224 images, and on small inputs an early
   exit's map keeps detail a finer grid reads (the head then becomes an
   ``avg7x7`` one, say; ``NetConfig.exit_heads`` records it).
4. Exit ensembles: per exit, weighted geometric mean of exits 1..k, weights
   fitted on validation and kept per exit only where validation accuracy
   does not drop (``training.ensemble``); stored as ``checkpoint["ensemble"]``.

Steps 3-4 rewrite ``best.pt`` (ordinary heads, same format) and add a
``finalize`` line to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from torch import nn

from .baselines import DEFAULT_CS

__all__ = ["RECIPES", "uses_lp_start", "frozen_norms", "lp_start", "per_class_subset", "finalize", "finalize_run_dir"]

RECIPES: tuple[str, ...] = ("impatient", "paper")

log = logging.getLogger("training")


def uses_lp_start(cfg: Any) -> bool:
    """The LP-FT start (and frozen backbone batch norm) applies: impatient recipe, pretrained backbone."""
    return cfg.recipe == "impatient" and bool(cfg.model.pretrained)


def frozen_norms(net: Any, cfg: Any) -> list[nn.Module]:
    """The backbone's batch-norm layers that stay in eval mode while training (empty unless LP-FT)."""
    if not uses_lp_start(cfg):
        return []
    return [m for m in net.blocks.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _plain_train_set(run: Any, preprocessing: dict[str, Any] | None = None) -> Any:
    """The run's training images without augmentation (the probes' training features)."""
    from .trainer import _load_bundle

    if run.cfg.data.augmentation == "none" and preprocessing is None:
        return run.bundle.train
    pre = preprocessing or run.bundle.preprocessing
    return _load_bundle(run.cfg, mean=pre["mean"], std=pre["std"], augmentation="none").train


def per_class_subset(dataset: Any, limit: int | None, seed: int = 0) -> Any:
    """At most ``limit`` images per class of ``dataset`` (seeded random choice, in dataset order); all when None."""
    if limit is None:
        return dataset
    from torch.utils.data import Subset

    labels = np.asarray(dataset.targets)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[: int(limit)] for c in np.unique(labels)]
    idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)
    if idx.size == labels.size:
        return dataset
    return Subset(dataset, idx.tolist())


def lp_start(run: Any) -> dict[str, Any] | None:
    """Install the LP-FT start into ``run.net`` (rank 0 computes; DDP broadcasts at wrap time). None if it does not apply."""
    from .probes import linear_probe_start

    if not uses_lp_start(run.cfg) or run.bundle.val is None:
        return None
    t0 = time.perf_counter()
    info = linear_probe_start(run.net, _plain_train_set(run), run.bundle.val, Cs=DEFAULT_CS,
                              choose_pooling=bool(getattr(run.cfg, "choose_pooling", False)), device=run.device)
    info["seconds"] = time.perf_counter() - t0
    log.info("LP-FT start: EP heads = val-tuned probes on the pretrained features (pooling %s, C %s, val acc %s) "
             "in %.1f s", info["pooling"], info["chosen_C"], "/".join(f"{100 * a:.1f}" for a in info["val_accuracy"]),
             info["seconds"])
    return info


def finalize(run: Any) -> dict[str, Any] | None:
    """Refit and ensemble the chosen checkpoint (rank 0); None for the paper recipe or without a validation split."""
    from impatient_ros.runtime.checkpoint import load_checkpoint, save_checkpoint
    from .ensemble import fit_geometric_ensemble
    from .features import collect_outputs
    from .probes import refit_heads
    from torch.utils.data import DataLoader

    if run.cfg.recipe != "impatient" or run.bundle.val is None:
        return None
    path = run.out / ("best.pt" if (run.out / "best.pt").is_file() else "last.pt")
    t0 = time.perf_counter()
    # The chosen epoch as trained, before refit and ensemble (diagnostics: what each lever adds).
    shutil.copyfile(path, run.out / "best_trained.pt")
    loaded = load_checkpoint(path, map_location=run.device)
    net = loaded.net
    val = run.bundle.val
    refit_train = per_class_subset(_plain_train_set(run, loaded.preprocessing),
                                   getattr(run.cfg, "refit_train_per_class", None), run.cfg.seed)
    kinds_before = net.head_kinds()
    refit = refit_heads(net, refit_train, val, Cs=DEFAULT_CS,
                        choose_pooling=bool(getattr(run.cfg, "choose_pooling", False)), device=run.device)
    refit["train_images"] = len(refit_train)
    exit_cost = loaded.exit_cost
    if exit_cost is not None and net.head_kinds() != kinds_before:  # measured with the old heads
        from .trainer import measure_exit_cost

        exit_cost = measure_exit_cost(net, run.device, preprocessing=loaded.preprocessing)
    out = collect_outputs(net, DataLoader(val, batch_size=256, shuffle=False), device=run.device)
    spec, ens = fit_geometric_ensemble(out.logits, out.labels)
    val_acc = (out.logits.argmax(axis=2) == out.labels[None, :]).mean(axis=1)
    weights = np.asarray((loaded.budget or {}).get("weights") or np.full(net.num_stages, 1.0 / net.num_stages))
    w = weights / weights.sum()
    record = {"event": "finalize", "checkpoint": path.name, "refit": refit, "ensemble": ens,
              "ensemble_weights": spec["weights"] if any(ens["kept"]) else None,
              "val_exit_accuracy": val_acc.tolist(), "val_expected_accuracy": float(np.dot(w, val_acc)),
              "val_ensemble_expected_accuracy": float(np.dot(w, ens["val_accuracy"])),
              "seconds": time.perf_counter() - t0}
    extra = dict(loaded.meta.get("extra") or {})
    extra["recipe"] = {"name": "impatient", "refit": refit["refit"], "refit_C": refit["chosen_C"],
                       "ensemble_kept": ens["kept"], "pooling": refit["pooling"]}
    save_checkpoint(path, net.cpu(), class_names=loaded.class_names, preprocessing=loaded.preprocessing,
                    budget=loaded.budget, exit_accuracy=val_acc.tolist(), exit_cost=exit_cost,
                    train_config=loaded.train_config, extra=extra,
                    ensemble=spec if any(ens["kept"]) else None)
    with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    log.info("finalize %s: heads refit %s (pooling %s), ensemble rows kept %s; val E[acc] %.2f plain, %.2f with "
             "the ensemble (%.1f s)", path.name, refit["refit"], refit["pooling"], ens["kept"],
             100 * record["val_expected_accuracy"],
             100 * record["val_ensemble_expected_accuracy"], record["seconds"])
    return record


def finalize_run_dir(out: str | Path, cfg: Any, device: str = "cpu") -> dict[str, Any] | None:
    """:func:`finalize` for a finished run folder (``best.pt`` there), outside a training run.

    ``cfg`` is the run's TrainConfig with ``recipe = "impatient"``; the data
    is rebuilt from it. Used where a network trained by the paper recipe is
    exactly what the impatient recipe trains (a backbone without pretrained
    weights: no LP-FT start, the same joint training), so only the post-hoc
    levers differ.
    """
    import torch

    from .trainer import _load_bundle

    run = SimpleNamespace(cfg=cfg, out=Path(out), device=torch.device(device), bundle=_load_bundle(cfg))
    return finalize(run)
