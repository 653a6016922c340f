"""``python -m scheduler`` as a process: a taken port or a stop never waits for model loads."""

import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipecat_nvidia.local_host import read_health
from tests.server_process import ROOT, free_ports, listening_socket

pytestmark = pytest.mark.slow


def host_command(asr: str, tts: str, llm: str, ports: list[int]) -> list[str]:
    return [
        *(sys.executable, "-m", "scheduler", "--device", "cpu", "--llm-gpu-layers", "0"),
        *("--asr-model", asr, "--tts-model", tts, "--llm-model", llm),
        *("--asr-port", str(ports[0]), "--tts-port", str(ports[1]), "--llm-port", str(ports[2])),
    ]


def health(port: int) -> dict | None:
    return read_health(f"http://127.0.0.1:{port}/health")


def test_a_taken_port_ends_the_host_before_any_model_loads(tiny_asr_path, tiny_tts_path, tiny_llm_path):
    asr, llm = free_ports(2)
    with listening_socket() as taken:
        command = host_command(str(tiny_asr_path), str(tiny_tts_path), str(tiny_llm_path), [asr, taken, llm])
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Cannot listen" in result.stderr and str(taken) in result.stderr
    assert "Loading" not in result.stderr


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Answers every request with a body that never ends: a download that stalls, slowly
    enough that no read times out."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(2**30))
        self.end_headers()
        while not self.server.stopping.is_set():
            try:
                self.wfile.write(b" ")
                self.wfile.flush()
            except OSError:
                return
            self.server.stopping.wait(1)

    def log_message(self, *args):
        pass


@pytest.fixture
def stalled_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    server.stopping = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.stopping.set()
    server.shutdown()
    server.server_close()


def test_a_host_stopped_while_a_model_downloads_exits_at_once(tiny_asr_path, tiny_tts_path, stalled_hub, tmp_path):
    """The LLM comes from a Hugging Face mirror that never finishes answering; the ASR and
    TTS load first."""
    ports = free_ports(3)
    log = tmp_path / "host.log"
    env = {**os.environ, "HF_ENDPOINT": stalled_hub, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1"}
    with log.open("w") as stderr:
        command = host_command(str(tiny_asr_path), str(tiny_tts_path), "someone/some-model-GGUF", ports)
        host = subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        report = None
        while time.monotonic() < deadline and host.poll() is None:
            report = health(ports[2])
            if report is not None and report.get("queued") is False:
                break
            time.sleep(0.2)
        assert report is not None and report["status"] == "loading" and report["queued"] is False, report
        assert health(ports[0])["status"] == "ready"
        host.send_signal(signal.SIGTERM)
        assert host.wait(timeout=20) == 0
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    assert "Exiting without waiting for the LLM model load" in log.read_text()
