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
def test_demo_runs_the_slice_end_to_end():
    out = run("demo", "--requests", "2")
    assert out.returncode == 0, out.stderr
    assert "split outputs match the unsplit model" in out.stdout


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
        with EdgeClient(url, bundle=repository / "democnn", cut=6) as client:
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
