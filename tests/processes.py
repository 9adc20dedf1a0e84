"""Helpers for tests that start real processes (workers, trainers)."""

import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment(**extra: str) -> dict:
  """This process's environment, without its TF_CONFIG, plus `extra`; the
  repository on PYTHONPATH and TensorFlow's C++ logs quietened."""
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("TF_CONFIG", None)
  env.update(extra)
  return env


def free_ports(count: int) -> list[int]:
  """`count` localhost ports free a moment ago (for a worker cluster)."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports
