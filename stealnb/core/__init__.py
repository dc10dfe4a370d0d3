"""The core every other subpackage builds on: argument checks (``_checks``), registries
(``registry``), run profiles (``profiles``), the results layout (``layout``), notebook parameters
(``params``), datasets and thief pools (``data``), architectures and inference (``models``), pure
metrics (``metrics``), layer-wise relevance propagation (``lrp``), training (``train``) and the
defence seam (``defense_seam``: what an oracle calls, implemented in :mod:`stealnb.defenses`).
Imports nothing from the other subpackages (``[tool.importlinter]`` in pyproject.toml)."""
