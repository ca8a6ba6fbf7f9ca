"""``modelcheck.check()``: one call through every stage, from a module to a Report.

The command line and the pytest plugin both end here. Arguments are validated once,
on the way in; the stages after that trust their inputs.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from modelcheck import __version__, capture, capture_graph, distributed, progress, rules
from modelcheck.errors import BatchOutOfMemory, CaptureError, ConfigError
from modelcheck.metrics import derive
from modelcheck.probe import (
    Batch,
    Probe,
    infer_input_shape,
    probe_from_data,
    probe_from_spec,
    split_batches,
)
from modelcheck.report import ModelInfo, ProbeInfo, Report
from modelcheck.rules import Finding, Rule
from modelcheck.settings import Settings
from modelcheck.source import LoadedModel, refuse_uninitialised
from modelcheck.stats import NonfiniteCounter, RunStats, StatsCollector


def check(
    model: nn.Module | LoadedModel,
    probe: object = None,
    labels: object = None,
    *,
    settings: Settings | None = None,
    input_shape: Sequence[int] | None = None,
    **options: object,
) -> Report:
    """Check ``model`` on ``probe`` and return what was found.

    ``probe`` is a tensor or array of inputs (``labels`` optional), an ``(x, y)`` pair, a
    DataLoader or any iterable of batches, a probe spec string (a file, ``"iris"``,
    ``"random"``), or None for seeded random inputs shaped by the model's first layer.
    ``options`` are the settings of ``modelcheck.settings`` by name (``select``,
    ``ignore``, ``fail_on``, ``loss``, ``rules={"dead-units": {"error": 0.6}}``, ...).
    The model comes back exactly as it was given.
    """
    settings = (settings or Settings()).updated(options, "check()")
    loaded = model if isinstance(model, LoadedModel) else None
    module = loaded.module if loaded else model
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    if not isinstance(module, nn.Module):
        raise ConfigError(f"check(): model must be a torch.nn.Module, not {type(module).__name__}")
    module, unwrapped = _unwrapped(module)
    refuse_uninitialised(module)
    chosen = select_rules(settings)
    probe_data = probe
    probe = _as_probe(probe, labels, module, settings, input_shape)
    # Read before the run: it syncs with the device, which the batches never do.
    untrained = () if settings.train_mode else _untrained_norms_note(module)
    group = distributed.current_group()
    try:
        measured = _measure(module, probe, probe_data, settings, group)
    except CaptureError as error:
        if not _read_as_pair(probe_data, error):
            raise
        raise CaptureError(
            f"{error}; the probe's two arrays were read as inputs and labels: to give the model "
            "two inputs, group them, check(model, ((x1, x2), labels)), labels None if none"
        ) from error
    run, stats = measured.run, measured.stats

    parameters = _parameter_count(module)
    if group is None:
        findings, checked = _evaluate(chosen, measured, probe, parameters, settings)
    else:  # rank 0 evaluates the rules; every rank returns the same report
        mine = _evaluate(chosen, measured, probe, parameters, settings) if group.rank == 0 else None
        findings, checked = distributed.broadcast(mine, group)
    return Report(
        version=__version__,
        torch_version=torch.__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            source=loaded.source if loaded else "<in-memory module>",
            format=loaded.format if loaded else "module",
            type=getattr(module, "original_name", None) or type(module).__name__,
            parameters=parameters,
            trainable_parameters=sum(p.numel() for p in module.parameters() if p.requires_grad),
            dtype=run.dtype,
            device=run.device,
            description=loaded.description if loaded else f"in-memory {type(module).__name__}",
        ),
        probe=ProbeInfo(
            source=probe.source,
            samples=measured.samples,
            batches=measured.batches,
            labels=probe.has_labels,
            loss=run.loss,
            train_mode=run.train_mode,
            gradients=run.gradients,
            sample_size=measured.sample_size,
            output_key=run.output_key,
            notes=unwrapped + untrained + run.notes + measured.notes,
        ),
        layers=stats.layers,
        input=stats.input,
        output=stats.output,
        findings=tuple(findings),
        rules=chosen,
        fail_on=settings.fail_on,
        checked=checked,
    )


def _parameter_count(module: nn.Module) -> int:
    """The model's parameter values, with the weights a quantized module packs: its weight()
    and bias() are methods, and module.parameters() does not see them."""
    count = sum(p.numel() for p in module.parameters())
    # Only modules with packed params are asked for a weight: reading a parametrized one's
    # would compute it (spectral_norm's power iteration moves its buffers).
    for m in (m for m in module.modules() if hasattr(m, "_packed_params")):
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if callable(weight) and callable(bias):
            count += sum(t.numel() for t in (weight(), bias()) if isinstance(t, torch.Tensor))
    return count


def _untrained_norms_note(model: nn.Module) -> tuple[str, ...]:
    """A note when batch norms have never seen a batch: in eval mode they normalise with
    their initial statistics (mean 0, variance 1), which no data has, so the layers after
    them see activations a training step never would."""
    fresh = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.num_batches_tracked is not None
        and int(m.num_batches_tracked) == 0
        and bool((m.running_mean == 0).all() and (m.running_var == 1).all())
    ]
    if not fresh:
        return ()
    return (
        f"{len(fresh)} batch norm layer{'s' if len(fresh) > 1 else ''} "
        f"({capture.quoted_names(fresh)}) never saw a "
        "batch: in eval mode they normalise with their initial statistics (mean 0, variance "
        "1), so the layers after them see unnormalised activations, unlike in training; for "
        "a model not trained yet, check in train mode (--train-mode, train_mode=True)",
    )


def _read_as_pair(probe: object, error: CaptureError) -> bool:
    """Whether a forward that wanted another argument was given an (inputs, labels) pair of
    two arrays, which may have been meant as two inputs."""
    arrays = isinstance(probe, tuple | list) and len(probe) == 2
    arrays = arrays and all(isinstance(a, torch.Tensor | np.ndarray) for a in probe)
    cause = error.__cause__
    return arrays and isinstance(cause, TypeError) and "required positional" in str(cause)


def _unwrapped(module: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The module inside a wrapper that computes the same function, and notes saying so.

    torch.compile's: hooks do not see into a compiled graph, and TorchDynamo refuses the ones
    modelcheck adds (told by name: importing torch._dynamo to compare types costs a second).
    DataParallel's and DistributedDataParallel's: their layers are named as in the model's
    own state_dict and baselines, without 'module.'.
    """
    notes: list[str] = []
    while True:
        original = getattr(module, "_orig_mod", None)
        if type(module).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
            notes.append(
                "torch.compile'd model: its original module was checked, run eagerly (it "
                "computes the same function; forward hooks do not see into a compiled graph)"
            )
            module = original
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            notes.append(f"{type(module).__name__} wrapper: the module it wraps was checked")
            module = module.module
        else:
            return module, tuple(notes)


def _evaluate(
    chosen: tuple[Rule, ...],
    measured: _Measured,
    probe: Probe,
    parameters: int,
    settings: Settings,
) -> tuple[list[Finding], tuple[tuple[str, str | None], ...]]:
    """The findings, and which (rule, layer) pairs were checked at all."""
    metrics = derive(
        measured.stats,
        parameters=parameters,
        loss=measured.run.loss,
        samples=measured.samples,
        noise=probe.noise,
    )
    found, looked_at = rules.evaluate(chosen, metrics)
    findings = _without_layer_ignores(found, settings)
    slugs = {r.code: r.slug for r in chosen}
    checked = tuple(
        (code, layer)
        for code, layer in looked_at
        if not _ignored_here(code, slugs[code], layer, settings.per_layer_ignores)
    )
    return findings, checked


@dataclass(frozen=True, slots=True)
class _Measured:
    """What running the probe gave: the capture run, the stats, and the probe's totals
    over every rank."""

    run: capture.CaptureRun
    stats: RunStats
    samples: int
    batches: int
    sample_size: int  # values sampled per layer and batch
    notes: tuple[str, ...]


def _measure(
    module: nn.Module,
    probe: Probe,
    probe_data: object,
    settings: Settings,
    group: distributed.Group | None,
) -> _Measured:
    """Run this process's batches (its shard, under torch.distributed) and summarise them;
    with a group, the summaries come back merged over every rank."""
    presharded = _presharded(probe_data)
    run, collector, notes = _observe(module, probe, probe_data, settings, group, presharded)
    sample_size = collector.sampler.sample_size
    if group is None:
        stats = collector.finalize(run.layers)
        return _Measured(run, stats, run.samples, run.batches, sample_size, notes)
    layers = distributed.merge(collector, run.layers, group)
    samples, batch_count = distributed.sum_ints([run.samples, run.batches], group)
    stats = collector.finalize(layers)
    return _Measured(run, stats, samples, batch_count, sample_size, notes)


def _presharded(data: object) -> bool:
    """A DataLoader over a DistributedSampler already gives each rank its own share."""
    sampler = getattr(data, "sampler", None)
    return isinstance(data, torch.utils.data.DataLoader) and isinstance(
        sampler, torch.utils.data.distributed.DistributedSampler
    )


def _batch_count(
    data: object, probe: Probe, batches: object, settings: Settings, rows: int | None = None
) -> int | None:
    """How many of ``batches`` there are, when that is known; ``rows`` is the batch size
    they were re-split to after running out of memory."""
    if rows is not None:
        return None if probe.samples is None else -(-probe.samples // rows)
    for sized in (batches, data if isinstance(data, torch.utils.data.DataLoader) else None):
        try:
            return len(sized)  # type: ignore[arg-type]
        except TypeError:
            continue
    if probe.samples is None:
        return None
    return -(-probe.samples // settings.batch_size)


def _observe(
    module: nn.Module,
    probe: Probe,
    probe_data: object,
    settings: Settings,
    group: distributed.Group | None,
    presharded: bool,
) -> tuple[capture.CaptureRun, StatsCollector, tuple[str, ...]]:
    """Run the probe through the model, in smaller batches if a batch runs out of memory.

    Each attempt starts afresh, so no half-observed batch reaches the statistics, and a
    smaller batch gives the same numbers as asking for that batch size in the first place.
    Under torch.distributed a rank cannot retry alone (the others would wait for it in a
    collective), so there the error ends the check.
    """
    batches, tried = probe.batches, []
    while True:
        mine = batches if group is None else distributed.shard(batches, group, presharded)
        total = _batch_count(probe_data, probe, mine, settings) if not tried else None
        whole = _batch_count(
            probe_data, probe, batches, settings, tried[-1] // 2 if tried else None
        )
        if presharded and group is not None and whole is not None:
            whole *= group.size  # each rank's loader holds its share
        try:
            run, collector = _observe_batches(module, mine, settings, group, total, whole)
        except BatchOutOfMemory as error:
            tried.append(error.rows)
            if error.rows <= 1 or group is not None:
                raise CaptureError(
                    f"{error} (after retrying in batches of {', '.join(map(str, tried))}); "
                    "free memory, or check a smaller model or on a larger device"
                ) from None
            batches = split_batches(probe.batches, error.rows // 2)
            _release_memory(error)
            del error
            continue
        notes = ()
        if tried:
            notes = (
                f"ran out of memory on a batch of {tried[0]} samples, so the probe ran in "
                f"batches of at most {tried[-1] // 2} (as with --batch-size {tried[-1] // 2})",
            )
        return run, collector, notes


def _observe_batches(
    module: nn.Module,
    batches: Iterable[Batch],
    settings: Settings,
    group: distributed.Group | None,
    total: int | None,
    whole: int | None,
) -> tuple[capture.CaptureRun, StatsCollector]:
    """One pass over this process's batches (``total`` of the ``whole`` probe's, when
    known) with a progress bar, then the reruns that precision or non-finite values call
    for, agreed by every rank."""
    options = {
        "loss": settings.loss,
        "train_mode": settings.train_mode,
        "gradients": settings.gradients,
        "seed": settings.seed,
        "output_key": settings.output_key,
        "forward_kwargs": settings.forward_kwargs,
        "unit_axes": settings.unit_axes,
        "recorder_factory": capture_graph.GraphRecorder if capture_graph.handles(module) else None,
    }
    collector = StatsCollector(settings.sample_size, settings.seed, batches=whole)
    show = settings.progress and (group is None or group.rank == 0)
    with progress.bar(batches, show, total) as shown:
        run = capture.run(module, shown, collector, **options)
    if group is not None:
        distributed.check_shards(run.batches, group)
    if _on_any_rank(collector.out_of_square_range(), group):
        collector = StatsCollector(settings.sample_size, settings.seed, precise=True, batches=whole)
        run = capture.run(module, batches, collector, **options)
    if _on_any_rank(collector.saw_nonfinite(), group):
        counter = NonfiniteCounter()
        capture.run(module, batches, counter, **options)
        collector.add_nonfinite_counts(counter)
    return run, collector


def _on_any_rank(flag: bool, group: distributed.Group | None) -> bool:
    return flag if group is None else distributed.any_rank(flag, group)


def _release_memory(error: BaseException) -> None:
    """Free what the failed attempt held before the next one starts.

    The tracebacks' frames hold the attempt's tensors, and each frame that caught an error
    references it in turn: a cycle that only a full (slow) garbage collection would find.
    Clearing the frames frees the tensors at once.
    """
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in chain:
        if link.__traceback__ is not None:
            traceback.clear_frames(link.__traceback__)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def select_rules(settings: Settings) -> tuple[Rule, ...]:
    every = rules.load_rule_set(settings)
    chosen = rules.select(every, settings.select, settings.ignore)
    if settings.extend_select:
        extra = rules.select(every, settings.extend_select, settings.ignore, "extend-select")
        codes = {r.code for r in (*chosen, *extra)}
        chosen = tuple(r for r in every if r.code in codes)
    for glob_rules in settings.per_layer_ignores.values():
        for selector in glob_rules:
            rules.resolve(every, selector, "per-layer-ignores")
    return chosen


def _without_layer_ignores(findings: list[Finding], settings: Settings) -> list[Finding]:
    ignores = settings.per_layer_ignores
    return [f for f in findings if not _ignored_here(f.code, f.rule, f.layer, ignores)]


def _ignored_here(
    code: str, slug: str, layer: str | None, per_layer: Mapping[str, Sequence[str]]
) -> bool:
    if layer is None:
        return False
    return any(
        selector in ("ALL", slug) or code.startswith(selector)
        for pattern, selectors in per_layer.items()
        if fnmatch.fnmatchcase(layer, pattern)
        for selector in selectors
    )


def _as_probe(
    probe: object,
    labels: object,
    module: nn.Module,
    settings: Settings,
    input_shape: Sequence[int] | None,
) -> Probe:
    if isinstance(probe, Probe):
        return probe
    spec = probe if isinstance(probe, str) else (settings.probe if probe is None else None)
    if spec is None and probe is None:
        spec = "random"
    if spec is not None:
        if spec == "random" and input_shape is None:
            input_shape = infer_input_shape(module, option="input_shape")
        return probe_from_spec(
            spec,
            input_shape=input_shape,
            batch_size=settings.batch_size,
            max_samples=settings.max_samples,
            seed=settings.seed,
        )
    return probe_from_data(
        probe, labels, batch_size=settings.batch_size, max_samples=settings.max_samples
    )
