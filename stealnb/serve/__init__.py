"""The secret model behind an HTTP API (``server``), with per-key budgets, logs and defences."""
