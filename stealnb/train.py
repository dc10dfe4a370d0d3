"""Training: the thesis' secret-model protocol and the shared ``fit`` used for substitutes.

Secret protocol (thesis 000 §4.2 and §5.2): k-fold cross-validation on the training set (5
folds: 80% train / 20% validation per fold), a fresh model per fold, Adam with learning rate
1e-3, batch 256, 20 epochs, no augmentation, no early stopping; every fold's model is
evaluated on the held-out test set and the best one becomes the secret. Folds, epochs and
architecture come from a :mod:`stealnb.profiles` profile.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from sklearn.model_selection import StratifiedKFold

from . import layout, metrics, models
from ._checks import check_images, check_labels, check_positive_int
from .profiles import Profile, get_profile

_DETERMINISM = False


def enable_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and switch TF to deterministic kernels (same seed ->
    same weights, on the same machine and library versions)."""
    global _DETERMINISM
    import tensorflow as tf

    keras.utils.set_random_seed(int(seed))
    if not _DETERMINISM:
        tf.config.experimental.enable_op_determinism()
        _DETERMINISM = True


class _EpochBar(keras.callbacks.Callback):
    def __init__(self, epochs: int, desc: str):
        from tqdm.auto import tqdm

        super().__init__()
        self.bar = tqdm(total=epochs, desc=desc, leave=False)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if "acc" in k})
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


def compile_model(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Adam + sparse categorical cross-entropy on logits (thesis §5.2)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def fit(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    patience: int | None = None,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> dict:
    """Train ``model`` (compiled here) on float32 images and int labels; returns the history dict.

    With ``patience`` and ``validation``, training stops when validation loss has not improved
    for ``patience`` epochs and the best weights are restored.
    """
    check_images(x, "x")
    check_labels(y, "y", n=len(x), num_classes=model.output_shape[-1])
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if validation is not None:
        check_images(validation[0], "validation x")
        check_labels(validation[1], "validation y", n=len(validation[0]), num_classes=model.output_shape[-1])
    callbacks = [_EpochBar(epochs, desc)] if progress else []
    if patience is not None:
        if validation is None:
            raise ValueError("patience: early stopping needs a validation=(x, y) split")
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(patience), restore_best_weights=True)
        )
    keras.utils.set_random_seed(int(seed))
    compile_model(model, learning_rate)
    hist = model.fit(
        x, y, epochs=epochs, batch_size=batch_size, validation_data=validation, shuffle=True,
        callbacks=callbacks, verbose=0,
    )
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


@dataclass
class SecretResult:
    """Outcome of :func:`train_secret`; ``model`` is the best fold's model."""

    model: keras.Model
    dataset: str
    arch: str
    profile: str
    seed: int
    fold_test_accuracy: list[float]
    histories: list[dict]
    best_fold: int
    confusion: np.ndarray
    class_names: list[str]
    seconds: float
    num_params: tuple[int, int] = field(default=(0, 0))

    @property
    def test_accuracy(self) -> float:
        return self.fold_test_accuracy[self.best_fold]

    def summary(self) -> dict:
        acc = np.asarray(self.fold_test_accuracy)
        return {
            "dataset": self.dataset,
            "arch": self.arch,
            "profile": self.profile,
            "seed": self.seed,
            "folds": len(acc),
            "best_fold": self.best_fold,
            "test_accuracy": float(acc[self.best_fold]),
            "test_accuracy_mean": float(acc.mean()),
            "test_accuracy_std": float(acc.std()),
            "fold_test_accuracy": [float(a) for a in acc],
            "params_total": self.num_params[0],
            "params_trainable": self.num_params[1],
            "confusion_matrix": self.confusion.tolist(),
            "class_names": list(self.class_names),
            "histories": self.histories,
            "seconds": round(self.seconds, 2),
        }

    def save(self, out: str | Path) -> Path:
        """Write ``out/model.keras`` and ``out/metrics.json``, replacing an earlier secret there
        (a folder holding files stealnb did not write is refused: :func:`stealnb.layout.new_run_dir`);
        returns ``out``."""
        out = layout.new_run_dir(out, "secret")
        self.model.save(out / "model.keras")
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.summary(), indent=2))
        tmp.replace(out / "metrics.json")
        return out


def train_secret(dataset, arch: str, profile: str | Profile = "demo", *, seed: int = 0, progress: bool = True) -> SecretResult:
    """Train a secret model with the thesis protocol (k-fold CV, best fold by test accuracy).

    ``dataset`` is a :class:`stealnb.data.Dataset`; ``profile`` sets folds, epochs, batch size
    and learning rate (``paper`` = thesis §5.2 exactly).
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    check_images(dataset.x_train, "dataset.x_train")
    check_images(dataset.x_test, "dataset.x_test")
    start = time.perf_counter()
    enable_determinism(seed)
    folds = StratifiedKFold(n_splits=prof.folds, shuffle=True, random_state=seed)
    if prof.folds < 2:
        raise ValueError(f"profile {prof.name}: folds must be >= 2 for cross-validation, got {prof.folds}")
    accs, hists, best_model, best_acc, best_fold, best_pred = [], [], None, -1.0, 0, None
    from tqdm.auto import tqdm

    splits = list(folds.split(np.zeros(len(dataset.y_train)), dataset.y_train))
    for fold, (tr, va) in enumerate(tqdm(splits, desc=f"{dataset.name}/{arch} folds", disable=not progress)):
        model = models.build(arch, num_classes=dataset.num_classes, seed=seed * 100 + fold)
        hist = fit(
            model, dataset.x_train[tr], dataset.y_train[tr], epochs=prof.epochs, batch_size=prof.batch_size,
            learning_rate=prof.learning_rate, validation=(dataset.x_train[va], dataset.y_train[va]),
            seed=seed * 100 + fold, progress=progress, desc=f"fold {fold + 1}/{prof.folds}",
        )
        pred = models.predict_labels(model, dataset.x_test)
        acc = metrics.accuracy(dataset.y_test, pred)
        accs.append(acc)
        hists.append(hist)
        if acc > best_acc:
            best_model, best_acc, best_fold, best_pred = model, acc, fold, pred
    return SecretResult(
        model=best_model, dataset=dataset.name, arch=arch, profile=prof.name, seed=seed,
        fold_test_accuracy=accs, histories=hists, best_fold=best_fold,
        confusion=metrics.confusion_matrix(dataset.y_test, best_pred, dataset.num_classes),
        class_names=list(dataset.class_names), seconds=time.perf_counter() - start,
        num_params=models.count_params(best_model),
    )


def load_secret(path: str | Path):
    """Load a saved secret (``model.keras`` + ``metrics.json`` written by :meth:`SecretResult.save`).

    Returns ``(model, summary)``; a missing folder gives one error saying how to make it.
    """
    path = Path(path)
    if not (path / "model.keras").is_file() or not (path / "metrics.json").is_file():
        raise FileNotFoundError(
            f"no secret model in {path}: expected {path}/model.keras and {path}/metrics.json "
            f"(make them with `stealnb train-secret --dataset D --arch A --out {path}`)"
        )
    model = keras.models.load_model(path / "model.keras", compile=False)
    return model, json.loads((path / "metrics.json").read_text())


def ensure_secret(dataset: str, arch: str, profile: str | Profile, results: str | Path = "results", *,
                  seed: int = 0, data_root=None, progress: bool = False):
    """The secret model for ``dataset``/``arch`` under ``results`` (see :mod:`stealnb.layout`):
    loaded when already trained with the same profile and seed, trained and saved otherwise.
    Returns ``(model, summary)``."""
    from . import data

    prof = get_profile(profile) if isinstance(profile, str) else profile
    out = layout.secret_dir(results, prof.name, dataset, arch)
    if (out / "metrics.json").is_file() and (out / "model.keras").is_file():
        model, summary = load_secret(out)
        if summary.get("seed") == seed and summary.get("profile") == prof.name:
            return model, summary
    layout.check_run_dir(out, "secret")  # before the training, not after it
    res = train_secret(data.load_dataset(dataset, root=data_root), arch, prof, seed=seed, progress=progress)
    res.save(out)
    return res.model, res.summary()
