"""Example 6, the demo's workload: a PyTorch CPU model served over HTTP on localhost. Request
spans on the server thread, and uprobes on libtorch_cpu.so operators by demangled name: a
4-layer model makes exactly 4 calls of at::_ops::linear::call per request."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require_backend
from harness import Run, build, per_bucket, buckets, value
from prometheus_server import assert_promtool_finds_nothing, free_port, scrape_text
from test_kernel_paths import BACKENDS

pytestmark = pytest.mark.kernel
# Found, not imported: only the server imports torch (under the kernel matrix's software
# emulation one import of torch takes minutes).
_torch = importlib.util.find_spec("torch")
if _torch is None:
    if os.environ.get("CI") == "true":
        raise ImportError("torch is not installed: `make test` installs it (scripts/setup.sh)")
    pytest.skip("torch is installed by `make test` (scripts/setup.sh)", allow_module_level=True)
TORCH_LIB = os.path.join(_torch.submodule_search_locations[0], "lib")

REQUESTS = 40
SPEC = ROOT / "examples" / "torch_serving" / "spec.yaml"


@pytest.fixture
def server():
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples/torch_serving/server.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("READY"), line
    yield int(line.split()[1])
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requests_and_linear_layers(backend, server, tmp_path, monkeypatch):
    require_backend(backend)
    monkeypatch.setenv("TORCH_LIB", TORCH_LIB)
    bundle = build(SPEC, backend, tmp_path / "bundle")
    port = free_port()
    run = Run(bundle, tmp_path, port=port)
    try:
        subprocess.run([sys.executable, str(ROOT / "examples/torch_serving/client.py"), "--port", str(server),
                        "--requests", str(REQUESTS), "--tail-every", "10"], check=True, timeout=300)
        assert_promtool_finds_nothing(scrape_text(port))
        metrics = run.stop()
    finally:
        run.kill()
    assert value(metrics, "torch_request_duration_seconds_count") == REQUESTS
    assert value(metrics, "torch_linear_duration_seconds_count") == 4 * REQUESTS
    assert value(metrics, "torch_linear_calls_in_request_total") == 4 * REQUESTS
    # Every 10th request carries a batch of 2048 rows (about 0.5 GFLOP): at least those are slow.
    per = per_bucket(buckets(metrics, "torch_request_duration_seconds"))
    assert sum(n for le, n in per.items() if le == "+Inf" or float(le) > 0.008) >= REQUESTS // 10
