"""Round-robin timing of step functions, and ratios paired by round.

    timings = [Timing("resnet50", True, "fp32"), Timing("resnet50", True, "opq")]
    time_round_robin(timings, {timings[0]: fp32_step, timings[1]: opq_step},
                     warmup=2, steps=5)
    paired_ratio(timings[1], timings[0], "cpu_ms")   # OPQ / FP32, CPU time

Only ratios taken in one run mean something on a shared machine: the step
functions are called in rounds, the order rotated each round, and a ratio is
the median over rounds of one function's time divided by the baseline's time
in the same round. Pure Python (no TensorFlow, no Keras), so the Keras 3
benchmark on a machine without TensorFlow (benchmarks/gpu_step_time.py)
times exactly as benchmarks/step_time.py does.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging


@dataclasses.dataclass(eq=False)
class Timing:
  """Times of one (model, jit setting, variant) step function."""

  model: str
  jit_compile: bool
  variant: str
  first_call_s: Optional[float] = None
  step_ms: list = dataclasses.field(default_factory=list)
  cpu_ms: list = dataclasses.field(default_factory=list)
  error: Optional[str] = None


def error_text(error: Exception) -> str:
  """One line naming the failure: XLA's unsupported-op line, or the innermost
  error of a traced function (e.g. a `merge_call` that XLA cannot hold)."""
  text = str(error)
  found = re.search(r"Detected unsupported operations[^\n]*\n?[^\n]*", text)
  innermost = [line.strip() for line in text.splitlines()
               if re.match(r"\s*\w+Error: ", line)
               and "in user code" not in line
               and "Exception encountered" not in line]
  if found:
    line = found.group(0)
  elif innermost:
    line = innermost[-1].split(". ")[0]
  else:
    line = (text.strip().splitlines() or [""])[0]
  line = " ".join(line.split()).replace("|", "/")
  if not re.match(r"\w+Error: ", line):
    line = f"{type(error).__name__}: {line}"
  return line[:300]


def time_round_robin(timings: Sequence[Timing],
                     functions: Mapping[Timing, Callable[[], Any]],
                     warmup: int, steps: int) -> None:
  """Calls every function of `functions` in rounds, filling its Timing.

  Each function is called once (trace/compile: `first_call_s`), then
  `warmup - 1 + steps` rounds call every working function once in a rotated
  order; the last `steps` rounds are recorded: wall time (`step_ms`) and this
  process's CPU time over all threads (`cpu_ms`, far less sensitive to other
  jobs on the machine). A function must return only when its step has run.
  One that raises gets the error text and is dropped from later rounds.
  """
  functions = dict(functions)

  def call(timing: Timing) -> Optional[tuple[float, float]]:
    start, start_cpu = time.perf_counter(), time.process_time()
    try:
      functions[timing]()
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("%s/%s jit=%s failed: %s", timing.model, timing.variant,
                      timing.jit_compile, error)
      timing.error = error_text(error)
      del functions[timing]
      return None
    return time.perf_counter() - start, time.process_time() - start_cpu

  def active() -> list[Timing]:
    return [timing for timing in timings if timing in functions]

  for timing in active():
    elapsed = call(timing)
    timing.first_call_s = elapsed and elapsed[0]
    logging.info("%s/%s jit=%s first call %s s", timing.model, timing.variant,
                 timing.jit_compile, timing.first_call_s)
  for round_index in range(warmup - 1 + steps):
    order = active()
    shift = round_index % max(len(order), 1)
    for timing in order[shift:] + order[:shift]:
      elapsed = call(timing)
      if elapsed is not None and round_index >= warmup - 1:
        timing.step_ms.append(1e3 * elapsed[0])
        timing.cpu_ms.append(1e3 * elapsed[1])


def paired_ratio(timing: Timing, baseline: Timing,
                 clock: str = "step_ms") -> Optional[float]:
  """Median over rounds of timing / baseline, rounds matched by index.

  `clock` is "step_ms" (wall) or "cpu_ms"; None if either failed.
  """
  if timing.error or baseline.error or not getattr(baseline, clock):
    return None
  return statistics.median(
      t / b for t, b in zip(getattr(timing, clock), getattr(baseline, clock)))


def format_ratio(ratio: Optional[float]) -> str:
  return "n/a" if ratio is None else f"{ratio:.2f}x"


def rows(timings: Sequence[Timing]) -> list[dict]:
  """Each timing as a dict, with its wall and CPU ratios to the FP32 timing
  of the same model and jit setting (for results JSON)."""
  baselines = {(t.model, t.jit_compile): t for t in timings
               if t.variant == "fp32"}
  result = []
  for timing in timings:
    row = dataclasses.asdict(timing)
    baseline = baselines.get((timing.model, timing.jit_compile))
    if baseline is not None:
      row["ratio_wall"] = paired_ratio(timing, baseline)
      row["ratio_cpu"] = paired_ratio(timing, baseline, "cpu_ms")
    result.append(row)
  return result


def from_row(row: Mapping[str, Any]) -> Timing:
  """The Timing of one `rows` entry (ratios dropped: they are recomputed)."""
  return Timing(**{field.name: row[field.name]
                   for field in dataclasses.fields(Timing)})
