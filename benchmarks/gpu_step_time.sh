#!/bin/sh
# The GPU run of benchmarks/gpu_step_time.py on a machine without TensorFlow
# (Python 3.12, JAX with CUDA, numpy, absl-py, h5py, rich, PyYAML, ...):
# installs the wheels of what the Keras 3 path needs and the machine lacks, from
# benchmarks/gpu_wheels/ (no index, nothing fetched), then runs the benchmark
# (ResNet-50 and MobileNet-V1, 224x224, batch 256, bf16, JAX: compiling the
# four train steps is most of its time, planned to fit in 8 minutes) and
# writes its JSON to OUTPUT, after each model (a run cut short keeps the
# models it finished).
#
#   benchmarks/gpu_step_time.sh --fetch        # here, once: download the wheels
#   benchmarks/gpu_step_time.sh OUTPUT [FLAGS]  # there; FLAGS go to the .py
#
# The wheels are the versions this checkout's .venv runs (requirements.txt
# pins keras, ml-collections and constriction; optree and namex are Keras'
# own needs), built for CPython 3.12 on manylinux x86-64. The folder is
# ignored by git, so a device run names it in carry:
#   run(command="benchmarks/gpu_step_time.sh $OUT/gpu_step_time.json",
#       carry=["benchmarks/gpu_wheels"], timeout_s=540)
set -eu
cd "$(dirname "$0")/.."
WHEELS=benchmarks/gpu_wheels
PACKAGES="keras optree namex ml-collections constriction"

if [ "${1:-}" = "--fetch" ]; then
  pins=$(.venv/bin/python -c "import importlib.metadata as m, sys
print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" $PACKAGES)
  rm -rf "$WHEELS"
  .venv/bin/python -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" $pins
  exit 0
fi

OUTPUT=${1:?usage: benchmarks/gpu_step_time.sh OUTPUT.json [FLAGS] or --fetch}
shift
if ! ls "$WHEELS"/keras-*.whl >/dev/null 2>&1; then
  echo "No wheels in $WHEELS: run benchmarks/gpu_step_time.sh --fetch here" \
       "first, and carry $WHEELS." >&2
  exit 2
fi
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$SITE" "$WHEELS"/*.whl
PYTHONPATH="$SITE:$(pwd)" PYTHONUNBUFFERED=1 KERAS_BACKEND=jax \
  exec python3 -m benchmarks.gpu_step_time --output="$OUTPUT" "$@"
