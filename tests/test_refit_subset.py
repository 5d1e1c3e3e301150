"""The impatient recipe's ``refit_train_per_class``: the head-refit probes on a seeded per-class subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import TensorImageDataset
from training.recipe import per_class_subset


def _dataset(per_class: tuple[int, ...]) -> TensorImageDataset:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(per_class)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    images = torch.zeros(labels.numel(), 4, 4, dtype=torch.uint8)
    return TensorImageDataset(images, labels, lambda x: x)


def test_subset_caps_every_class_and_is_seeded() -> None:
    ds = _dataset((30, 5, 12))
    sub = per_class_subset(ds, 10, seed=3)
    labels = np.asarray(ds.targets)[sub.indices]
    assert np.bincount(labels).tolist() == [10, 5, 10]  # a class below the cap keeps all its images
    assert sub.indices == sorted(sub.indices)  # dataset order
    assert per_class_subset(ds, 10, seed=3).indices == sub.indices
    assert per_class_subset(ds, 10, seed=4).indices != sub.indices  # a random choice, not the first 10


def test_subset_without_a_cap_or_above_every_class_is_the_dataset() -> None:
    ds = _dataset((4, 6))
    assert per_class_subset(ds, None) is ds
    assert per_class_subset(ds, 6) is ds


def test_option_parses_and_refuses_non_positive(tmp_path) -> None:
    from training.cli import build_parser
    from training.config import ConfigError, TrainConfig, config_from_args

    def cfg(*argv: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(["--out", str(tmp_path), *argv]))

    assert cfg().refit_train_per_class is None
    assert TrainConfig.from_dict({}).refit_train_per_class is None  # older train_configs load with the default
    assert cfg("--refit-train-per-class", "1000").refit_train_per_class == 1000
    with pytest.raises(ConfigError, match="refit_train_per_class"):
        cfg("--refit-train-per-class", "0")
