"""Specs checked in CI: `--no-host` never fails on facts of the machine it runs on, and the
machine-readable formats (GitHub annotations, SARIF) carry every diagnostic with its place."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import yaml

from conftest import ROOT, probec

SHIPPED = sorted([*ROOT.glob("specs/*.yaml"), *ROOT.glob("examples/*/spec.yaml")])


def test_no_host_ignores_what_only_the_target_host_knows(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LIB"}       # examples/torch_serving uses it
    result = probec("check", "--no-host", *map(str, SHIPPED), env=env)
    assert result.returncode == 0, result.stderr
    assert f"{len(SHIPPED)} spec(s) checked: 0 error(s), 0 warning(s)" in result.stderr
    spec = tmp_path / "elsewhere.yaml"
    spec.write_text("""
name: elsewhere
binaries:
  model: ${PROBEC_UNSET_IN_CI}/libmodel.so
  server: /opt/nowhere/server
spans:
  forward:
    function: model:Inference::Forward
metrics:
  model_forward_seconds:
    histogram: forward.duration
    buckets: exp2(1us, 1s)
  requests_total:
    count: uprobe:server:handle_request
  drops_total:
    count: tracepoint:gpu_vendor:queue_drop
    filter: args.queue == "inference"
""")
    result = probec("check", "--no-host", str(spec), env=env)
    assert result.returncode == 0 and "0 error(s), 0 warning(s)" in result.stderr, result.stderr
    here = probec("check", str(spec), env=env)       # the same spec against this machine: every fact
    assert here.returncode == 1
    for code in ("E303", "E302", "E308"):
        assert f"error[{code}]" in here.stderr, here.stderr


def test_github_annotations_place_each_diagnostic(tmp_path):
    spec = tmp_path / "a,b:100%.yaml"        # ',' ':' and '%' must be escaped in the file property
    spec.write_text("name: odd\nmetrics:\n  x_total:\n    count: tracepoint:sched:sched_swich\n")
    result = probec("check", "--format", "github", "tests/errors/many_errors.yaml", str(spec))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("::error ") for line in lines), result.stdout
    first = re.fullmatch(r"::error file=([^,]+),line=(\d+),col=(\d+),endLine=\d+,endColumn=\d+,title=(E\d+)::(.*)",
                         lines[0])
    assert first and first.group(1) == "tests/errors/many_errors.yaml" and first.group(4) == "E308", lines[0]
    assert "%0Ahelp: did you mean 'syscall:write'?" in first.group(5)
    odd = lines[-1]
    escaped = str(spec).replace("%", "%25").replace(":", "%3A").replace(",", "%2C")
    assert odd.startswith(f"::error file={escaped},line=4,col=12,"), odd
    assert "4 error(s)" in result.stderr


def test_sarif_holds_every_diagnostic_with_its_region():
    text = probec("check", "--format", "json", "tests/errors/many_errors.yaml").stdout
    diagnostics = json.loads(text)
    result = probec("check", "--format", "sarif", "tests/errors/many_errors.yaml")
    assert result.returncode == 1
    sarif = json.loads(result.stdout)
    assert sarif["version"] == "2.1.0"
    [run] = sarif["runs"]
    assert run["tool"]["driver"]["name"] == "probec"
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} == {d["code"] for d in diagnostics}
    assert len(run["results"]) == len(diagnostics)
    for got, want in zip(run["results"], diagnostics):
        assert got["ruleId"] == want["code"] and got["level"] == want["severity"]
        assert got["message"]["text"].startswith(want["message"])
        region = got["locations"][0]["physicalLocation"]["region"]
        assert (region["startLine"], region["startColumn"]) == (want["span"]["line"], want["span"]["col"])
        assert got["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == want["span"]["file"]


def test_the_pre_commit_hook_runs_check_without_the_host():
    [hook] = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "probec-check" and hook["language"] == "python"
    command = shlex.split(hook["entry"])
    assert command[:2] == ["probec", "check"] and "--no-host" in command
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LIB"}
    ok = probec(*command[1:], "examples/torch_serving/spec.yaml", env=env)   # as pre-commit would call it
    assert ok.returncode == 0, ok.stderr
    bad = probec(*command[1:], "tests/errors/unknown_key.yaml", env=env)
    assert bad.returncode == 1 and "error[" in bad.stderr
