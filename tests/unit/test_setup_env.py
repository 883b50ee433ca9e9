"""tools/setup_env.sh picks the torch build for the machine: the CPU wheel index without a GPU when it
answers (no CUDA downloads), the default index with a GPU, and says which and why."""

import http.server
import os
import stat
import subprocess
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _choice(env_extra, path_prefix=None):
    env = {**os.environ, **env_extra}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "setup_env.sh"), "--print-torch-install"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def cpu_index(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html></html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _no_gpu_path(tmp_path):
    """A PATH entry whose nvidia-smi lists no GPU (whatever this machine has)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (fake / "nvidia-smi").chmod(stat.S_IRWXU)
    return str(fake)


def test_without_a_gpu_the_cpu_index_is_used_when_it_answers(tmp_path, cpu_index):
    out = _choice({"TORCH_CPU_INDEX": cpu_index, "TORCH_VERSION": "2.13.0"}, _no_gpu_path(tmp_path))
    assert "no GPU: the CPU build of torch 2.13.0" in out
    assert out.strip().splitlines()[-1] == f"pip install torch==2.13.0 --extra-index-url {cpu_index}"


def test_an_unreachable_cpu_index_falls_back_and_says_so(tmp_path):
    out = _choice({"TORCH_CPU_INDEX": "http://127.0.0.1:9/none"}, _no_gpu_path(tmp_path))
    assert "does not answer" in out and "CUDA build" in out
    assert "--extra-index-url" not in out


def test_with_a_gpu_the_default_index(tmp_path, cpu_index):
    fake = tmp_path / "gpu"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    (fake / "nvidia-smi").chmod(stat.S_IRWXU)
    out = _choice({"TORCH_CPU_INDEX": cpu_index}, str(fake))
    assert "a GPU is present" in out and "--extra-index-url" not in out
