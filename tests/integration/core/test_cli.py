"""The command line, run as a user runs it: in a subprocess."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import splitinfer
from splitinfer.edge import EdgeClient

CLI = [sys.executable, "-m", "splitinfer"]


def run(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_and_version():
    out = run("--help")
    assert out.returncode == 0
    assert "serve" in out.stdout and "demo" in out.stdout
    out = run("--version")
    assert out.stdout.strip() == f"splitinfer {splitinfer.__version__}"


def test_serve_help_documents_every_option():
    out = run("serve", "--help")
    assert out.returncode == 0
    for option in (
        "--repository",
        "--host",
        "--port",
        "--max-body-bytes",
        "--compute-threads",
        "--torch-threads",
        "SPLITINFER_",
    ):
        assert option in out.stdout


def test_no_command_is_a_usage_error():
    out = run()
    assert out.returncode == 2
    assert "COMMAND" in out.stderr


def test_serve_without_repository_says_how_to_fix(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITINFER_")}
    out = run("serve", env=env)
    assert out.returncode == 2
    assert "--repository" in out.stderr
    out = run("serve", "--repository", str(tmp_path / "missing"), env=env)
    assert out.returncode == 2
    assert "not a directory" in out.stderr


@pytest.mark.slow
def test_serve_answers_real_requests_and_stops_on_sigterm(repository, cnn):
    proc = subprocess.Popen(
        [*CLI, "serve", "--repository", str(repository), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if match:
                url = f"http://127.0.0.1:{match.group(1)}"
            assert line or proc.poll() is None, "server exited before it listened"
        assert url is not None
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        x = torch.rand(1, 3, 32, 32)
        with EdgeClient(url, bundle=repository / "democnn", policy="static", cut=6, codec="f32") as client:
            out = client.infer(x)
        with torch.no_grad():
            assert torch.equal(out, cnn(x))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.slow
def test_compile_and_inspect(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(4 * 6 * 6, 2))\n"
    )
    out = run(
        "compile",
        "mymodels:make",
        "--input-shape",
        "1,3,8,8",
        "--name",
        "tiny",
        "--out",
        str(tmp_path / "tiny"),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout
    shown = run("inspect", str(tmp_path / "tiny"))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("bundle   tiny")
    assert any(re.match(r"\s+0\s+input\s+0\.8\s+f32\S* .*float32\[Bx3x8x8\]", line) for line in lines)
    assert any("output" in line and "float32[Bx2]" in line for line in lines)


def test_compile_reports_bad_arguments(tmp_path):
    out = run("compile", "nomodule", "--input-shape", "1,3", "--name", "x", "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    assert "MODULE:FACTORY" in out.stderr
    out = run("compile", "os:getcwd", "--input-shape", "1,x", "--name", "x", "--out", str(tmp_path / "o"))
    assert out.returncode == 2
    assert "comma-separated ints" in out.stderr
