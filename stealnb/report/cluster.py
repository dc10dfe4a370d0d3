"""Where ``stealnb run`` executes its notebooks: a Dask ``distributed`` cluster.

With no scheduler address, :func:`connect` starts a :class:`distributed.LocalCluster` on this
machine: ``--jobs`` worker processes of one thread each (every notebook runs in its own papermill
kernel, so TensorFlow stays isolated per task as before). ``--scheduler tcp://HOST:8786`` (or
``$DASK_SCHEDULER_ADDRESS``) connects to a running cluster instead -- ``dask scheduler`` with
``dask worker`` processes, a ``dask_jobqueue.SLURMCluster``, Kubernetes -- whose workers have
stealnb installed and see the results root and the data root at the same paths
(``book/reproduce.md``).

Tasks that train declare the ``GPU`` resource when their profile wants a GPU
(``Profile.gpu``); a worker started with ``--resources GPU=1`` runs them one at a time. The
workers of the local cluster each offer ``GPU=1``, so such tasks also run here, ``--jobs`` at a
time, as before.

A worker that dies mid-task has its task rerun on another worker (the extraction then resumes
from its checkpoint and ledger); the local scheduler allows :data:`ALLOWED_FAILURES` such deaths
per task before it gives the task up (Dask's ``KilledWorker``).

See the Dask documentation: https://distributed.dask.org/en/stable/ (``LocalCluster``,
``Client.submit`` with ``priority``, ``retries`` and ``resources``; worker resources:
https://distributed.dask.org/en/stable/resources.html).
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

from ..core._checks import UsageError

# ``distributed`` is imported in the functions that start or reach a cluster: the CLI builds its
# parser (``stealnb --help``) from this module's constants without loading Dask.

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
# One retry: a task whose worker died twice (or whose notebook failed twice) stops being retried.
ALLOWED_FAILURES = 1
_ADDRESS = re.compile(r"^(tcp|tls|ucx|ws|wss)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-_]*):(\d{1,5})$")
CONNECT_TIMEOUT = 10.0  # seconds to reach an existing scheduler


def scheduler_address(value: str | None) -> str | None:
    """The scheduler address to use: ``value`` (``--scheduler``), else ``$DASK_SCHEDULER_ADDRESS``,
    else ``None`` (a local cluster). A malformed address is a :class:`UsageError`."""
    source = "--scheduler"
    if not value:
        value, source = os.environ.get(SCHEDULER_ENV) or None, f"${SCHEDULER_ENV}"
    if value is None:
        return None
    m = _ADDRESS.match(value.strip())
    if not m or not 0 < int(m.group(3)) < 65536:
        raise UsageError(f"{source}: expected a Dask scheduler address like tcp://HOST:8786, got {value!r}")
    return value.strip()


def local_cluster(jobs: int, **kwargs):
    """A :class:`distributed.LocalCluster` of ``jobs`` worker processes, one thread each, each
    offering one ``GPU`` resource; no dashboard, no memory limit (the notebooks' kernels are
    the workers' children, not their own memory), no log lines (``stealnb run`` reports each
    task's outcome itself)."""
    from distributed import LocalCluster

    opts = dict(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=None,
                memory_limit=0, resources={"GPU": 1}, silence_logs=logging.CRITICAL,
                # dashboard off; its HTTP routes (health, metrics) on a free local port, not 8787
                scheduler_kwargs={"allowed_failures": ALLOWED_FAILURES, "dashboard_address": "127.0.0.1:0"})
    opts.update(kwargs)
    return LocalCluster(**opts)


@contextmanager
def connect(address: str | None, jobs: int = 1, *, need: frozenset = frozenset()):
    """A :class:`distributed.Client` on the scheduler at ``address``, or on a new local cluster of
    ``jobs`` workers (closed on exit). ``need``: resource names some task asks for; a running
    cluster none of whose workers offers one of them is refused (:class:`UsageError`: the
    tasks would wait for ever). An unreachable scheduler is a :class:`UsageError` too."""
    from distributed import Client

    if address is None:
        cluster = local_cluster(jobs)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        raise UsageError(f"cannot reach the Dask scheduler at {address} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no answer'}); start it with `dask scheduler`, "
                         f"or drop --scheduler (and ${SCHEDULER_ENV}) to run on this machine") from None
    try:
        workers = client.scheduler_info().get("workers", {})
        offered = {r for w in workers.values() for r, n in (w.get("resources") or {}).items() if n}
        missing = sorted(set(need) - offered)
        if workers and missing:
            raise UsageError(f"no worker of the Dask cluster at {address} offers the {', '.join(missing)} "
                             f"resource the profile's training tasks ask for; start workers with "
                             f"`dask worker {address} --resources {missing[0]}=1`")
        yield client
    finally:
        client.close()
