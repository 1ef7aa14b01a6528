"""Multi-process torch.distributed tests that do not flake: the launcher and the worker's exit.

Why this exists (issue 23). Under ``torchrun --standalone`` the distributed tests failed now and
then on a loaded machine: a rank died with SIGABRT, "terminate called without an active
exception", *after* its results were written, the barrier passed and ``destroy_process_group()``
returned. The core dumps show the cause, and no barrier or sleep can remove it:

* the main thread is in ``Py_FinalizeEx`` (the script has ended);
* a ``ProcessGroupGloo::runLoop`` worker thread is still running the tail of the last collective:
  it destroys the finished ``AsyncBarrierWork``, which holds the earlier ``AsyncAllgatherWork``
  (``all_gather_object``) and with it tensors owned by Python objects;
* dropping those tensors needs the GIL (``decref_pyobject`` -> ``gil_scoped_acquire``); during
  finalisation CPython's ``take_gil`` ends any other thread with ``pthread_exit``, whose forced
  unwind passes through a ``noexcept`` C++ destructor -> ``std::terminate`` -> SIGABRT.

The work is reported complete before the worker thread releases it, so the main thread can reach
interpreter shutdown first; a loaded CPU only widens that window. ``destroy_process_group()``
does not join gloo's threads while anything still refers to the group (a curvature operator
keeps the group it reduces over), and the barrier adds one more finished work holding the
earlier ones. torch's own attempt to destroy groups at exit (pytorch/pytorch#179291) was
abandoned, so the workers here never run interpreter finalisation with gloo alive:

* worker side, :func:`init` joins a file-store rendezvous (``file://`` in the test's temporary
  directory: no TCP port to choose or race for, whatever the number of pytest workers) with a
  bounded collective timeout; :func:`finish` writes this rank's result file atomically, meets the
  peers at a barrier (no rank closes its sockets while a peer still reads from them), destroys
  the process group, flushes stdout/stderr and leaves with ``os._exit(0)``;
* test side, :func:`launch` starts the ranks as plain subprocesses (no launcher that SIGTERMs the
  survivors and hides their stderr), waits with a generous but bounded deadline, ends every rank
  if one fails, and fails with each rank's exit status and stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

INIT_ENV = "DUALHESS_DIST_INIT"  # file:// rendezvous of this launch
RESULT_ENV = "DUALHESS_DIST_RESULT"  # this rank's result file
COLLECTIVE_TIMEOUT_S = 240  # a collective stuck on a dead peer raises instead of waiting 30 min
LAUNCH_TIMEOUT_S = 420  # whole launch, on a loaded machine (a normal run takes 5-40 s)
GRACE_S = 20  # how long the other ranks may go on after one has failed


# ---------------------------------------------------------------------- worker side
def init() -> int:
    """Join this launch's process group (gloo, file store); returns the rank."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=os.environ[INIT_ENV], rank=rank,
                            world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return rank


def finish(result) -> None:
    """Write this rank's ``result`` (JSON), tear the group down in order and exit; never returns."""
    import torch.distributed as dist

    path = Path(os.environ[RESULT_ENV])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: interpreter finalisation would race gloo's worker threads (see above).
    os._exit(0)


# ---------------------------------------------------------------------- test side
def launch(worker, *args, workdir, world_size: int = 2, timeout: float = LAUNCH_TIMEOUT_S):
    """Run ``python worker *args`` as ``world_size`` ranks; returns each rank's result, by rank."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "dist_store"
    if store.exists():
        store.unlink()  # a reused file store would mix two launches
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "MASTER_", "GROUP_", "ROLE_"))}
    env.update(OMP_NUM_THREADS="1", WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), str(HERE), env.get("PYTHONPATH"))
                                          if p),
               **{INIT_ENV: store.resolve().as_uri()})
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: no hostname lookup, no outside interface
    results = [workdir / f"rank{r}.json" for r in range(world_size)]
    logs = [(workdir / f"rank{r}.stdout", workdir / f"rank{r}.stderr") for r in range(world_size)]
    procs = []
    try:
        for r in range(world_size):
            rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r), RESULT_ENV: str(results[r])}
            with open(logs[r][0], "wb") as out, open(logs[r][1], "wb") as err:
                procs.append(subprocess.Popen([sys.executable, str(worker), *map(str, args)],
                                              cwd=workdir, env=rank_env, stdout=out, stderr=err,
                                              stdin=subprocess.DEVNULL))
        problem = _wait(procs, timeout)
        codes = [p.poll() for p in procs]  # before ending the stragglers
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if problem is None and not all(f.exists() for f in results):
        problem = "a rank exited 0 without writing its result"
    if problem is not None:
        raise AssertionError(_report(problem, codes, logs, worker))
    return [json.loads(f.read_text()) for f in results]


def _wait(procs, timeout):
    """None when every rank exited 0; otherwise what went wrong (the ranks may still run)."""
    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return None
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at, first = now, next(r for r, c in enumerate(codes) if c not in (None, 0))
        if failed_at is not None and (all(c is not None for c in codes) or now > failed_at + GRACE_S):
            return f"rank {first} failed first"
        if now > deadline:
            return f"the launch did not finish within {timeout:.0f} s"
        time.sleep(0.05)


def _report(problem, codes, logs, worker) -> str:
    lines = [f"distributed test {Path(worker).name}: {problem}"]
    for r, (code, (out, err)) in enumerate(zip(codes, logs)):
        if code is None:
            status = "still running (killed)"
        elif code < 0:
            status = f"killed by {signal.Signals(-code).name}"
        else:
            status = f"exit status {code}"
        lines.append(f"---- rank {r}: {status}")
        for name, f in (("stdout", out), ("stderr", err)):
            text = f.read_text(errors="replace") if f.exists() else ""
            if text.strip():
                lines.append(f"[{name}] ...{text[-4000:]}" if len(text) > 4000 else f"[{name}] {text}")
    return "\n".join(lines)
