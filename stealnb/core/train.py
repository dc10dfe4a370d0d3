"""Training: the thesis' secret-model protocol and the shared ``fit`` used for substitutes.

Secret protocol (thesis 000 §4.2 and §5.2): k-fold cross-validation on the training set (5
folds: 80% train / 20% validation per fold), a fresh model per fold, Adam with learning rate
1e-3, batch 256, 20 epochs, no augmentation, no early stopping; every fold's model is
evaluated on the held-out test set and the best one becomes the secret. Folds, epochs and
architecture come from a :mod:`stealnb.core.profiles` profile.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import keras
import numpy as np
from sklearn.model_selection import StratifiedKFold

from . import layout, metrics, models
from ._checks import check_images, check_labels, check_positive_int, check_real
from .progress import progress_bar
from .profiles import Profile, check_profile

_DETERMINISM = False


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a substitute is trained in each round: the keyword arguments of :func:`fit`
    (:meth:`fit_options`). One place for the recipe fields of
    :class:`stealnb.extraction.loop.ExtractionConfig` and :class:`stealnb.extraction.copycat.CopycatConfig`,
    which inherit them (keyword-only); a profile's ``substitute_*`` settings fill them
    (:meth:`stealnb.core.profiles.Profile.substitute_fit`). The defaults are the ones both
    configs had before; the experiments' values are the profiles' (``stealnb/core/profiles.py``)."""

    epochs: int
    patience: int | None = 4
    batch_size: int = 50
    learning_rate: float = 1e-3
    min_steps: int = 0
    stop_loss: float | None = None
    monitor: str = "macro_f1"
    class_weight: bool = False
    augment: bool = False

    def check_recipe(self) -> None:
        """Raise ``ValueError`` for a recipe :func:`fit` cannot run (called by the subclasses' checks)."""
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.min_steps, "min_steps", minimum=0)
        check_real(self.learning_rate, "learning_rate", 0.0, lo_open=True)

    def fit_options(self) -> dict:
        """The recipe as keyword arguments of :func:`fit`."""
        return {f.name: getattr(self, f.name) for f in fields(Recipe)}


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
        super().__init__()
        self.bar = progress_bar(total=epochs, desc=desc, leave=False)

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


class _BestCheckpoint(keras.callbacks.Callback):
    """Keep the weights of the best epoch on a labelled validation split and stop early.

    ``monitor="macro_f1"``: best = highest validation macro-F1, ties broken by lower validation
    loss (ActiveThief ``utils/model.py`` selects the copy's checkpoint on validation F1: a
    near-constant model scores a low macro-F1 however low its loss on a skewed split).
    ``monitor="loss"``: best = lowest validation loss. Training stops after ``patience`` epochs
    without a new best, but never before ``min_epochs`` epochs (the minimum number of optimizer
    steps), nor while the epoch's training loss is above ``stop_loss`` (ActiveThief resets its
    early-stop count while the copy's mean training loss exceeds 1.5); the best weights are
    restored at the end."""

    def __init__(self, model, x_val, y_val, num_classes: int, monitor: str, patience: int | None,
                 min_epochs: int, batch_size: int = 512, stop_loss: float | None = None):
        super().__init__()
        self.stop_loss = stop_loss
        self.net = model  # the model itself, also when Keras trains it behind an augmentation layer
        self.x_val, self.y_val, self.num_classes = x_val, y_val, num_classes
        self.monitor, self.patience, self.min_epochs, self.batch_size = monitor, patience, min_epochs, batch_size
        self.best_key, self.best_weights, self.best_epoch, self.waited = None, None, -1, 0
        self.val_f1: list[float] = []
        self.val_loss: list[float] = []
        self.val_acc: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        logits = models.predict_logits(self.net, self.x_val, batch_size=self.batch_size)
        loss = metrics.cross_entropy(self.y_val, logits)
        f1 = metrics.macro_f1(self.y_val, logits.argmax(axis=1), self.num_classes)
        self.val_f1.append(f1)
        self.val_loss.append(loss)
        self.val_acc.append(metrics.accuracy(self.y_val, logits.argmax(axis=1)))
        key = (f1, -loss) if self.monitor == "macro_f1" else (-loss,)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_weights, self.best_epoch, self.waited = key, self.net.get_weights(), epoch, 0
        else:
            self.waited += 1
        trained = self.stop_loss is None or (logs or {}).get("loss", np.inf) <= self.stop_loss
        if self.patience is not None and self.waited >= self.patience and epoch + 1 >= self.min_epochs and trained:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.net.set_weights(self.best_weights)


def augmenter(seed: int) -> keras.Sequential:
    """Random shifts of up to 2 of 32 pixels and horizontal flips, active only in training."""
    return keras.Sequential([
        keras.layers.RandomTranslation(2 / 32, 2 / 32, fill_mode="reflect", seed=int(seed)),
        keras.layers.RandomFlip("horizontal", seed=int(seed) + 1),
    ], name="augment")


def balanced_class_weight(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """``n / (classes present · count_c)`` for each class present in ``y`` (scikit-learn's
    ``class_weight="balanced"``), 1 for absent classes: each stolen class weighs the same."""
    counts = np.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    return {c: (len(y) / (present * counts[c]) if counts[c] else 1.0) for c in range(num_classes)}


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
    monitor: str | None = None,
    min_steps: int = 0,
    stop_loss: float | None = None,
    class_weight: bool = False,
    augment: bool = False,
    seed: int = 0,
    progress: bool = False,
    desc: str = "train",
) -> dict:
    """Train ``model`` (compiled here) on float32 images and int labels; returns the history dict.

    ``validation`` alone is only evaluated (history ``val_loss``/``val_accuracy``). With a
    ``monitor`` (``"loss"`` or ``"macro_f1"``, see :class:`_BestCheckpoint`) the weights of the
    best epoch on it are restored at the end, and with ``patience`` training stops after that
    many epochs without a new best. ``min_steps``: at
    least that many optimizer steps (``epochs`` is raised to reach them; no early stop before),
    so a small labelled set still gets trained; ``stop_loss``: no early stop while the training
    loss is above it (a near-constant model on skewed labels keeps a high loss). ``class_weight=True`` weighs the loss with
    :func:`balanced_class_weight`. ``augment=True`` trains on random shifts of up to 2 pixels
    and horizontal flips (:func:`augmenter`; free of queries, and label-preserving only as far
    as the secret is shift- and flip-invariant). The history gains ``val_macro_f1``,
    ``best_epoch`` and ``steps``.
    """
    check_images(x, "x")
    num_classes = model.output_shape[-1]
    check_labels(y, "y", n=len(x), num_classes=num_classes)
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(min_steps, "min_steps", minimum=0)
    if monitor not in (None, "loss", "macro_f1"):
        raise ValueError(f"monitor: expected None, 'loss' or 'macro_f1', got {monitor!r}")
    if validation is not None:
        check_images(validation[0], "validation x")
        check_labels(validation[1], "validation y", n=len(validation[0]), num_classes=num_classes)
    if (patience is not None or monitor is not None) and validation is None:
        raise ValueError("patience/monitor: checkpoint selection needs a validation=(x, y) split")
    if patience is not None and monitor is None:
        raise ValueError("patience: early stopping needs a monitor ('loss' or 'macro_f1')")
    steps_per_epoch = -(-len(x) // batch_size)
    min_epochs = -(-min_steps // steps_per_epoch)
    epochs = max(int(epochs), min_epochs)
    callbacks = [_EpochBar(epochs, desc)] if progress else []
    best = None
    if monitor is not None:
        best = _BestCheckpoint(model, validation[0], validation[1], num_classes, monitor,
                               None if patience is None else int(patience), min_epochs, stop_loss=stop_loss)
        callbacks.append(best)
    keras.utils.set_random_seed(int(seed))
    trained = keras.Sequential([augmenter(seed), model]) if augment else model
    compile_model(trained, learning_rate)
    hist = trained.fit(
        x, y, epochs=epochs, batch_size=batch_size, shuffle=True, callbacks=callbacks, verbose=0,
        validation_data=validation if best is None else None,
        class_weight=balanced_class_weight(y, num_classes) if class_weight else None,
    )
    out = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    if best is not None:
        out["val_loss"], out["val_accuracy"], out["val_macro_f1"] = best.val_loss, best.val_acc, best.val_f1
        out["best_epoch"] = best.best_epoch
    out["steps"] = len(out["loss"]) * steps_per_epoch
    return out


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
        (a folder holding files stealnb did not write is refused: :func:`stealnb.core.layout.new_run_dir`);
        returns ``out``."""
        out = layout.new_run_dir(out, "secret")
        self.model.save(out / "model.keras")
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(self.summary(), indent=2))
        tmp.replace(out / "metrics.json")
        return out


def train_secret(dataset, arch: str, profile: Profile, *, seed: int = 0, progress: bool = True) -> SecretResult:
    """Train a secret model with the thesis protocol (k-fold CV, best fold by test accuracy).

    ``dataset`` is a :class:`stealnb.core.data.Dataset`; ``profile`` sets folds, epochs, batch size
    and learning rate (``paper`` = thesis §5.2 exactly).
    """
    prof = check_profile(profile)
    check_images(dataset.x_train, "dataset.x_train")
    check_images(dataset.x_test, "dataset.x_test")
    start = time.perf_counter()
    enable_determinism(seed)
    folds = StratifiedKFold(n_splits=prof.folds, shuffle=True, random_state=seed)
    if prof.folds < 2:
        raise ValueError(f"profile {prof.name}: folds must be >= 2 for cross-validation, got {prof.folds}")
    accs, hists, best_model, best_acc, best_fold, best_pred = [], [], None, -1.0, 0, None
    splits = list(folds.split(np.zeros(len(dataset.y_train)), dataset.y_train))
    for fold, (tr, va) in enumerate(progress_bar(splits, desc=f"{dataset.name}/{arch} folds", disable=not progress)):
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


def ensure_secret(dataset: str, arch: str, profile: Profile, results: str | Path = "results", *,
                  seed: int = 0, data_root=None, progress: bool = False):
    """The secret model for ``dataset``/``arch`` under ``results`` (see :mod:`stealnb.core.layout`):
    loaded when already trained with the same profile and seed, trained and saved otherwise
    (``progress``: a line saying so, then progress bars). Returns ``(model, summary)``."""
    from . import data

    prof = check_profile(profile)
    out = layout.secret_dir(results, prof.name, dataset, arch)
    if (out / "metrics.json").is_file() and (out / "model.keras").is_file():
        model, summary = load_secret(out)
        if summary.get("seed") == seed and summary.get("profile") == prof.name:
            return model, summary
    layout.check_run_dir(out, "secret")  # before the training, not after it
    if progress:  # a long step: say what it is before the bars start
        print(f"training the secret {dataset}/{arch} ({prof.name} profile: {prof.folds} folds x {prof.epochs} "
              f"epochs, seed {seed}); it is saved to {out} and loaded from there next time", flush=True)
    res = train_secret(data.load_dataset(dataset, root=data_root), arch, prof, seed=seed, progress=progress)
    res.save(out)
    return res.model, res.summary()
