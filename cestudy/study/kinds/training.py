"""Training cells: a model trained with one loss on a real data set with induced imbalance (the
models, optimisers and data: ``cestudy.study.training``)."""

from __future__ import annotations

from ... import dtypes
from .. import training
from ..keys import SEED, choice, integer, number
from .accuracy import PROFILES

NAME = "training"
KEYS = {
    "dataset": choice("digits", training.DATASETS),
    "model": choice("logreg", training.MODELS),
    "optimizer": choice("lbfgs", training.OPTIMIZERS),
    "loss": choice("ce", training.LOSSES),
    "dtype": choice("float32", dtypes.DTYPE_NAMES),
    "imbalance": number(1.0, 1.0),
    "profile": choice("step", PROFILES),
    "epochs": integer(30),
    "lr": number(0.5, 0.0),
    "batch": integer(64),
    "C": number(1.0, 0.0),
    **SEED,
}
SEED_FIELDS = ("seed",)  # the split, the initialisation and the batches: np.random(seed)


def normalise(cell: dict) -> dict | None:
    if cell["loss"].startswith("sklearn"):
        cell.update(model="logreg", optimizer="lbfgs", dtype="float64")
    if cell["model"] == "mlp" and cell["optimizer"] == "lbfgs":
        return None
    if cell["optimizer"] == "lbfgs":
        cell.update(lr=KEYS["lr"].default, batch=KEYS["batch"].default)
    if cell["imbalance"] == 1.0:
        cell["profile"] = "step"  # with no imbalance the profiles coincide
    return cell


def estimate_seconds(cell: dict) -> float:
    return 0.3 if cell["optimizer"] == "lbfgs" else 0.02 * cell["epochs"]


def compute(cell: dict) -> dict:
    return training.train_cell(cell)  # Skip without scikit-learn
