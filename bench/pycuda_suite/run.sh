#!/usr/bin/env bash
# On the GPU machine, from the project root: pycuda's own tests natively and through the shim.
# Needs pycuda 2026.1's test/test_{driver,gpuarray,cumath}.py in .device/pycuda-tests/ (from its
# sdist or its v2026.1 tag; never committed here). Writes junit XML and the comparison to $1.
# NATIVE_XML=path reuses a native run's junit XML (same suite, same GPU) instead of running it.
set -uo pipefail
out=${1:-bench/results}
mkdir -p "$out"
tests=.device/pycuda-tests
export PYTHONPATH=$PWD
gpu=$(python3 -c "import pycuda.driver as d; d.init(); print(d.Device(0).name())")
if [ -n "${NATIVE_XML:-}" ]; then  # a native run of the same suite on the same GPU, kept
  cp "$NATIVE_XML" "$out/native.xml"
  echo "native: taken from $NATIVE_XML"
else
  timeout 280 python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 60 \
    --junitxml="$out/native.xml" "$tests" \
    >"$out/native.log" 2>&1
  tail -3 "$out/native.log"
fi
agents=()
pids=()
for i in $(seq 0 7); do
  python3 -m gpu_agent.cli --listen "tcp://127.0.0.1:0" --executor pycuda \
    --log-level WARNING >"/tmp/harp-agent-$i.log" 2>&1 &
  pids+=($!)
done
for i in $(seq 0 7); do  # each agent prints its endpoint once its first worker is ready
  for _ in $(seq 1 600); do
    grep -q "^harp-agent: serving" "/tmp/harp-agent-$i.log" && break
    sleep 0.1
  done
  agents+=("$(awk '/^harp-agent: serving/ {print $3}' "/tmp/harp-agent-$i.log")")
done
# the same --timeout as the native run: the tests that time out natively (the 8/16 GiB cuRAND
# ones) otherwise run to the project's 120 s here and decide the wall time
HARP_AGENTS=$(IFS=,; echo "${agents[*]}") timeout 280 python3 -m pytest -q -n 8 --timeout 60 \
  -p no:cacheprovider -p harp_jupyter.shim.pytest_plugin --junitxml="$out/shim.xml" "$tests" \
  >"$out/shim.log" 2>&1
tail -3 "$out/shim.log"
kill "${pids[@]}" 2>/dev/null
python3 bench/pycuda_suite/compare.py "$out/native.xml" "$out/shim.xml" \
  "$out/pycuda-suite.md" "$gpu"
