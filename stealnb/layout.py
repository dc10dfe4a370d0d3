"""Where results live: one function per kind of run, so the CLI, the notebooks, the pipeline and
the book agree on paths.

::

    results/<profile>/secrets/<dataset>-<arch>/{model.keras, metrics.json}
    results/<profile>/extraction/<dataset>-<arch>/<strategy>/seed<N>/{rounds.jsonl, summary.json,
                                                                     ledger.bin, checkpoint/}
    results/<profile>/copycat/<dataset>-<arch>/<variant>/seed<N>/{rounds.jsonl, summary.json, ...}
    results/<profile>/defenses/<dataset>-<arch>/...
"""
from __future__ import annotations

from pathlib import Path


def _safe(part: str) -> str:
    return str(part).replace("/", "_").replace("+", "+")


def profile_dir(results, profile: str) -> Path:
    return Path(results) / _safe(profile)


def secret_dir(results, profile: str, dataset: str, arch: str) -> Path:
    return profile_dir(results, profile) / "secrets" / f"{_safe(dataset)}-{_safe(arch)}"


def extraction_dir(results, profile: str, dataset: str, arch: str, strategy: str, seed: int) -> Path:
    return profile_dir(results, profile) / "extraction" / f"{_safe(dataset)}-{_safe(arch)}" / _safe(strategy) / f"seed{int(seed)}"


def copycat_dir(results, profile: str, dataset: str, arch: str, variant: str, seed: int) -> Path:
    return profile_dir(results, profile) / "copycat" / f"{_safe(dataset)}-{_safe(arch)}" / _safe(variant) / f"seed{int(seed)}"


def defenses_dir(results, profile: str, dataset: str, arch: str) -> Path:
    return profile_dir(results, profile) / "defenses" / f"{_safe(dataset)}-{_safe(arch)}"
