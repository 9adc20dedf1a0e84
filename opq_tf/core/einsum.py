"""What an EinsumDense equation says about its kernel, for both frontends.

An EinsumDense layer computes `einsum(equation, inputs, kernel)`, e.g.
"abc,cde->abde" (MultiHeadAttention's query projection: input [batch, seq,
width], kernel [width, heads, head_dim]). Its *channel axes* (one Laplace
scale and, at "channel" granularity, one step each) are the kernel's
dimensions that survive into the output, as a Dense kernel's last axis does;
its reconstruction treats it as a Dense when it contracts the input's last
dimensions with the kernel's leading ones. Both are read off the equation
here, once, so the tf_keras and Keras 3 frontends plan and reconstruct an
EinsumDense alike.
"""

from __future__ import annotations

from typing import Optional


def _operands(equation: str) -> tuple[str, str, str]:
  """(input, kernel, output) subscripts of "input,kernel->output"."""
  try:
    operands, output = equation.replace(" ", "").split("->")
    source, kernel = operands.split(",")
  except ValueError:
    raise ValueError(
        f"EinsumDense equation {equation!r} is not of the form "
        "'<input>,<kernel>-><output>', e.g. 'abc,cde->abde'.") from None
  return source, kernel, output


def channel_axes(equation: str) -> tuple[int, ...]:
  """The kernel's output dimensions as trailing negative axes, or ().

  "abc,cde->abde" -> (-2, -1); "abcd,cde->abe" -> (-1,); "ab,cb->ac" -> ()
  (its output dim c leads the kernel, so no step broadcasts over it).
  """
  _, kernel, output = _operands(equation)
  axes = tuple(index - len(kernel) for index, letter in enumerate(kernel)
               if letter in output)
  return axes if axes == tuple(range(-len(axes), 0)) else ()


def contracted_dims(equation: str) -> Optional[int]:
  """How many leading kernel dims a Dense-like equation contracts, or None.

  "abc,cde->abde" -> 1 (the input's last dim c against the kernel's first);
  "abcd,cde->abe" -> 2 (c, d). None when the equation is not a Dense over
  the input's last dimensions: the contracted letters are not the kernel's
  leading ones and the input's trailing ones, or a kernel letter also
  indexes the input elsewhere (a batched contraction).
  """
  source, kernel, output = _operands(equation)
  contracted = "".join(c for c in kernel if c not in output)
  kept = "".join(c for c in kernel if c in output)
  if (not contracted or kernel != contracted + kept
      or not source.endswith(contracted)
      or any(c in kernel for c in source[:-len(contracted)])):
    return None
  return len(contracted)
