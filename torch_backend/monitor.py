"""Hessian monitoring during training: ``lambda_max`` and the trace, cheaply, every N steps.

:class:`HessianMonitor` fits a plain PyTorch training loop: call :meth:`HessianMonitor.step`
once per iteration. Every ``every`` steps it builds the Hessian operator of the model at its
current parameters on a fixed monitoring set (:func:`torch_backend.hessian`), and measures

* the top eigenvalue by restarted Lanczos, **warm-started from the previous top
  eigenvector** (:func:`dualhess.eigsh` with ``v0=``): while the Hessian changes slowly, a
  few products suffice;
* the trace (:func:`dualhess.trace`) with probes drawn from ``(seed, step)``, so that the
  logged value can be reproduced exactly.

The history is kept (``monitor.history``), saved as JSON and plotted (``monitor.plot()``).

``HessianMonitorCallback`` is the same monitor as a PyTorch Lightning ``Callback`` that logs
to the trainer's loggers, and ``HessianTrainerCallback`` a Hugging Face
``transformers.TrainerCallback`` that logs to the ``Trainer``'s loggers (``report_to``) and
``trainer.state.log_history``. They exist only when ``lightning`` (or ``pytorch_lightning``),
respectively ``transformers``, is installed; this module imports neither otherwise.

Examples
--------
>>> import torch
>>> from torch_backend.examples import load_digits, make_mlp
>>> from torch_backend.monitor import HessianMonitor
>>> X, y = load_digits(n=64, flat=True)
>>> model, loss_fn = make_mlp(hidden=4), torch.nn.CrossEntropyLoss()
>>> monitor = HessianMonitor(model, loss_fn, (X, y), every=5, trace_matvecs=10)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
>>> for step in range(11):
...     _ = monitor.step(step)  # measures the current parameters at steps 0, 5, 10
...     opt.zero_grad()
...     loss_fn(model(X), y).backward()
...     opt.step()
>>> monitor.steps
[0, 5, 10]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from dualhess._docs import fill_doc
from dualhess._tracking import SpectrumTracker, TrackerViews

from ._hessian import HessianOperator
from ._hessian import hessian as _hessian_operator

__all__ = ["HessianMonitor"]  # + HessianMonitorCallback, HessianTrainerCallback when installed


@fill_doc
class HessianMonitor(TrackerViews):
    """Log the Hessian's top eigenvalue and trace every ``every`` training steps.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained. It is put into eval mode while it is measured (BatchNorm
        running statistics, no Dropout) and returned to its previous mode.
    loss_fn : callable or None
        ``(outputs, targets) -> scalar`` (an ``nn`` loss module or any callable); None with
        ``closure``.
    data : (inputs, targets) or iterable of batches
        The fixed monitoring set (e.g. a held-out batch or a loader with ``shuffle=False``).
    every : int
        Measure at steps ``0, every, 2 every, ...``.
    %(monitor_measurement)s
    closure : callable, optional
        ``closure(model, batch) -> scalar`` instead of ``loss_fn`` (e.g.
        ``lambda model, batch: model(**batch).loss`` for a Hugging Face model); see
        :func:`torch_backend.hessian`.
    normalizer : callable, optional
        ``normalizer(batch) -> number``, what a batch's mean loss divides by (e.g.
        ``torch_backend.label_count(shift=True)`` for a causal LM's own ``.loss`` over labels
        padded with -100); see :func:`torch_backend.hessian`.
    params : list of str or callable, optional
        Monitor the Hessian block of these parameters only.
    method : str
        HVP engine (:func:`torch_backend.hessian`); ``"auto"`` is timed once, at the first
        measurement, and its choice is reused.
    dtype : torch.dtype, optional
        Measure a copy of the model in this dtype (e.g. ``torch.float64``).
    log_fn : callable, optional
        Called with each record (a dict), e.g. ``lambda r: wandb.log(r, step=r["step"])``.

    Attributes
    ----------
    history : list of dict
        One record per measurement: ``step``, ``top_eigenvalue``, ``top_residual``,
        ``top_converged``, ``top_matvecs``, ``warm_started``, ``trace``, ``trace_stderr``,
        ``num_matvecs``; with ``"gradient_overlap"`` also ``gradient_overlap``,
        ``overlap_k`` and ``gradient_norm``.
    tracker : dualhess._tracking.SpectrumTracker
        The framework-neutral core.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., Any],
        data: Any,
        *,
        every: int = 100,
        params: Any = None,
        method: str = "auto",
        dtype: torch.dtype | None = None,
        log_fn: Callable[[dict[str, Any]], Any] | None = None,
        closure: Callable[[Any, Any], Any] | None = None,
        normalizer: Callable[[Any], Any] | None = None,
        **measurement: Any,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.closure = closure
        self.normalizer = normalizer
        self.data = data
        self.params = params
        self.method = method
        self.dtype = dtype
        self.log_fn = log_fn
        self.tracker = SpectrumTracker.with_options("HessianMonitor", every=every, **measurement)
        self._count = 0
        self._checked = False

    # ------------------------------------------------------------------ operator
    def operator(self) -> HessianOperator:
        """The Hessian operator at the model's current parameters (on the monitoring set)."""
        was_training = self.model.training
        self.model.eval()
        try:
            op = _hessian_operator(
                self.model,
                self.loss_fn,
                self.data,
                params=self.params,
                method=self.method,
                dtype=self.dtype,
                check_deterministic=not self._checked,
                check_symmetric=not self._checked,
                normalizer=self.normalizer,
                **({} if self.closure is None else {"closure": self.closure}),
            )
        finally:
            self.model.train(was_training)
        self._checked = True
        self.method = op.method  # "auto" is timed once
        return op

    # ------------------------------------------------------------------ logging
    def step(self, step: int | None = None) -> dict[str, Any] | None:
        """Call once per training iteration; measures when ``step % every == 0``.

        Parameters
        ----------
        step : int, optional
            The training step; default: an internal counter (0, 1, 2, ... per call).

        Returns
        -------
        dict or None
            The new record when a measurement was made.
        """
        if step is None:
            step = self._count
        self._count = int(step) + 1
        if not self.tracker.due(step):
            return None
        return self.measure(step)

    def measure(self, step: int) -> dict[str, Any]:
        """Measure now (whatever ``every`` says) and log the record as step ``step``."""
        op = self.operator()
        was_training = self.model.training
        self.model.eval()
        try:
            record = self.tracker.measure(op, int(step))
        finally:
            self.model.train(was_training)
        if self.log_fn is not None:
            self.log_fn(dict(record))
        return record


def _lightning_callback_base() -> type:
    errors = []
    for module in ("lightning.pytorch.callbacks", "pytorch_lightning.callbacks"):
        try:
            return importlib.import_module(module).Callback
        except Exception as err:  # noqa: BLE001 - a broken install (e.g. a torchvision built
            errors.append(f"{module}: {type(err).__name__}: {err}")  # for another torch)
    raise ImportError(
        "HessianMonitorCallback needs a working PyTorch Lightning (pip install lightning); "
        "importing it failed: " + " | ".join(errors) + ". For plain training loops use "
        "torch_backend.HessianMonitor"
    )


def _make_callback_class() -> type:
    Callback = _lightning_callback_base()

    class HessianMonitorCallback(Callback):
        """PyTorch Lightning callback: log ``lambda_max`` and the trace every N global steps.

        Parameters
        ----------
        loss_fn : callable
            ``(outputs, targets) -> scalar``; the model is the ``LightningModule``
            (``pl_module(inputs)``).
        data : (inputs, targets) or iterable of batches
            The fixed monitoring set.
        every : int
            Measure when ``trainer.global_step % every == 0``: at the start of training
            (step 0) and after every ``every``-th optimizer step, once per global step.
        prefix : str
            Metric name prefix for the loggers (default ``"hessian/"``).
        **kwargs
            Passed to :class:`HessianMonitor` (``metrics``, ``tol``, ``trace_matvecs``, ...).

        Attributes
        ----------
        monitor : HessianMonitor or None
            Built at the first measurement; holds the history and ``plot()``.
        """

        def __init__(
            self,
            loss_fn: Callable[..., Any],
            data: Any,
            *,
            every: int = 100,
            prefix: str = "hessian/",
            **kwargs: Any,
        ) -> None:
            super().__init__()
            self.loss_fn = loss_fn
            self.data = data
            self.every = every
            self.prefix = prefix
            self.kwargs = kwargs
            self.monitor: HessianMonitor | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            """Measure the starting point (global step 0, before the first update)."""
            self._maybe_measure(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            """Measure after an optimizer step when ``global_step % every == 0``."""
            self._maybe_measure(trainer, pl_module)

        def _maybe_measure(self, trainer, pl_module) -> None:
            step = int(trainer.global_step)
            if self.monitor is None:
                self.monitor = HessianMonitor(
                    pl_module, self.loss_fn, self.data, every=self.every, **self.kwargs
                )
            if not self.monitor.tracker.due(step) or step in self.monitor.steps:
                return
            record = self.monitor.measure(step)
            metrics = {
                f"{self.prefix}{key}": float(record[key]) for key in LOGGED_KEYS if key in record
            }
            for logger in getattr(trainer, "loggers", []) or []:
                logger.log_metrics(metrics, step=step)

    return HessianMonitorCallback


#: What the callbacks send to the loggers, from each record.
LOGGED_KEYS = ("top_eigenvalue", "trace", "trace_stderr", "gradient_overlap", "num_matvecs")


def _make_trainer_callback_class() -> type:
    try:
        from transformers import TrainerCallback
    except Exception as err:  # noqa: BLE001 - missing or broken install
        raise ImportError(
            "HessianTrainerCallback needs Hugging Face transformers (pip install transformers); "
            f"importing it failed: {type(err).__name__}: {err}. For plain training loops use "
            "torch_backend.HessianMonitor"
        ) from err

    class HessianTrainerCallback(TrainerCallback):
        """Hugging Face ``Trainer`` callback: log sharpness and trace every N global steps.

        At the start of training (step 0) and after every ``every``-th optimizer step it
        measures the Hessian of the model being trained on a fixed monitoring set
        (:class:`HessianMonitor`) and logs ``<prefix>top_eigenvalue``, ``<prefix>trace``,
        ``<prefix>trace_stderr`` (and ``<prefix>gradient_overlap`` when asked for) through
        ``trainer.log``: to every logger of ``report_to`` (TensorBoard, W&B, ...) and to
        ``trainer.state.log_history``. The model's own loss is used by default
        (``closure=lambda model, batch: model(**batch).loss``, batches are dicts as the
        ``Trainer`` feeds them, with ``labels``).

        Parameters
        ----------
        data : dict of tensors, or an iterable of them
            The fixed monitoring set (e.g. one collated batch); with ``loss_fn``, pairs
            ``(inputs, targets)`` instead.
        every : int
            Measure when ``state.global_step % every == 0``.
        trainer : transformers.Trainer, optional
            The trainer to log through; or call :meth:`attach`. Without one the records go
            to ``state.log_history`` only (the loggers are reached through the trainer).
        loss_fn, closure : callable, optional
            The loss (:func:`torch_backend.hessian`); default the model's own ``.loss``.
        prefix : str
            Metric name prefix (default ``"hessian/"``).
        **kwargs
            Passed to :class:`HessianMonitor` (``metrics``, ``tol``, ``trace_matvecs``,
            ``dtype``, ...).

        Attributes
        ----------
        monitor : HessianMonitor or None
            Built at the first measurement; holds the history and ``plot()``.

        Examples
        --------
        >>> callback = HessianTrainerCallback(data=batch, every=50)  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=train)  # doctest: +SKIP
        >>> callback.attach(trainer).train()  # doctest: +SKIP
        """

        def __init__(
            self,
            data: Any,
            *,
            every: int = 100,
            trainer: Any = None,
            loss_fn: Callable[..., Any] | None = None,
            closure: Callable[[Any, Any], Any] | None = None,
            prefix: str = "hessian/",
            **kwargs: Any,
        ) -> None:
            super().__init__()
            if loss_fn is None and closure is None:
                closure = _own_loss
            self.data = data
            self.every = every
            self.trainer = trainer
            self.loss_fn = loss_fn
            self.closure = closure
            self.prefix = prefix
            self.kwargs = kwargs
            self.monitor: HessianMonitor | None = None

        def attach(self, trainer: Any) -> Any:
            """Log through ``trainer`` (added to its callbacks if it is not there); returns it."""
            self.trainer = trainer
            if self not in trainer.callback_handler.callbacks:
                trainer.add_callback(self)
            return trainer

        def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
            """Measure the starting point (global step 0, before the first update)."""
            self._maybe_measure(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
            """Measure after an optimizer step when ``global_step % every == 0``."""
            self._maybe_measure(state, model)

        def _maybe_measure(self, state: Any, model: Any) -> None:
            step = int(state.global_step)
            if model is None:
                return
            if self.monitor is None or self.monitor.model is not model:
                self.monitor = HessianMonitor(model, self.loss_fn, self.data, every=self.every,
                                              closure=self.closure, **self.kwargs)
            if not self.monitor.tracker.due(step) or step in self.monitor.steps:
                return
            record = self.monitor.measure(step)
            metrics = {f"{self.prefix}{key}": float(record[key])
                       for key in LOGGED_KEYS if key in record}
            if self.trainer is not None:
                self.trainer.log(metrics)
            else:
                state.log_history.append({**metrics, "step": step})

    return HessianTrainerCallback


def _own_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The loss a Hugging Face model computes itself from a batch with ``labels``."""
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "HessianTrainerCallback: the model returned no .loss for the monitoring batch; "
            "include 'labels' in the batch, or pass loss_fn= / closure="
        )
    return loss


def __getattr__(name: str) -> Any:
    if name == "HessianMonitorCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    if name == "HessianTrainerCallback":
        cls = _make_trainer_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
