"""The bot's settings, and the local GPU host it starts when no servers are configured."""

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregator

from bench.conversation import agent_transport
from pipecat_nvidia.agent import AgentSettings, build_agent, write_wav
from pipecat_nvidia.local_host import LocalHost, PortTaken, health_urls, read_health
from tests.server_process import ROOT, free_ports, listening_socket, server_process


def test_no_server_urls_means_the_local_host():
    settings = AgentSettings.from_env({"BOT_MAX_TOKENS": "50", "BOT_GREETING": "off"})
    assert settings.uses_local_host and settings.max_tokens == 50 and not settings.greeting


def test_reasoning_is_off_unless_a_thinking_limit_is_set():
    assert AgentSettings.from_env({}).thinking_tokens is None
    assert AgentSettings.from_env({"BOT_THINKING_TOKENS": "0"}).thinking_tokens == 0


def test_the_local_hosts_token_is_the_one_the_bot_sends():
    assert AgentSettings.from_env({"HOST_AUTH_TOKEN": "s3cret"}).auth_token == "s3cret"
    assert AgentSettings.from_env({"HOST_AUTH_TOKEN": "s3cret", "NVIDIA_AUTH_TOKEN": "other"}).auth_token == "other"


def test_any_server_url_means_remote_servers():
    settings = AgentSettings.from_env({"NVIDIA_LLM_URL": "http://gpu-box:8000/v1"})
    assert not settings.uses_local_host and settings.llm_url == "http://gpu-box:8000/v1"


def test_the_local_hosts_own_ports_move_the_bots_urls_to_them():
    settings = AgentSettings.from_env({"HOST_ASR_PORT": "9000", "HOST_LLM_PORT": "9002"})
    assert settings.uses_local_host
    assert (settings.asr_url, settings.tts_url, settings.llm_url) == (
        "ws://127.0.0.1:9000",
        "ws://127.0.0.1:8001",
        "http://127.0.0.1:9002/v1",
    )


HOST_ADDRESSES = pytest.mark.parametrize(
    ("host", "reached_at"),
    [("192.168.1.5", "192.168.1.5"), ("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("fd00::5", "[fd00::5]")],
)


@HOST_ADDRESSES
def test_the_bot_reaches_the_local_host_at_the_address_it_listens_on(host, reached_at):
    settings = AgentSettings.from_env({"HOST_HOST": host, "HOST_TTS_PORT": "9001"})
    assert (settings.asr_url, settings.tts_url, settings.llm_url) == (
        f"ws://{reached_at}:8080",
        f"ws://{reached_at}:9001",
        f"http://{reached_at}:8082/v1",
    )


@HOST_ADDRESSES
def test_the_bot_asks_the_local_host_for_its_health_at_the_address_it_listens_on(host, reached_at):
    settings = AgentSettings.from_env({"HOST_HOST": host, "HOST_TTS_PORT": "9001"})
    assert health_urls(settings) == {
        "ASR": f"http://{reached_at}:8080/health",
        "TTS": f"http://{reached_at}:9001/health",
        "LLM": f"http://{reached_at}:8082/health",
    }


def test_the_local_hosts_address_does_not_move_standalone_servers_beside_a_remote_one():
    settings = AgentSettings.from_env({"HOST_HOST": "192.168.1.5", "NVIDIA_LLM_URL": "http://gpu-box:8000/v1"})
    assert (settings.asr_url, settings.tts_url) == ("ws://127.0.0.1:8080", "ws://127.0.0.1:8001")


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("BOT_MAX_TOKENS", "300tokens"),
        ("BOT_GREETING", "ture"),
        ("BOT_THINKING_TOKENS", "-1"),
        ("BOT_MAX_TOKENS", "0"),
        ("BOT_HISTORY_TOKENS", "1"),
        ("HOST_LLM_PORT", "70000"),
        ("HOST_ASR_PORT", "0"),
        ("BOT_TURN_CPUS", "0"),
    ],
)
def test_a_setting_that_does_not_parse_is_an_error_naming_its_variable(var, raw):
    with pytest.raises(ValueError, match=var):
        AgentSettings.from_env({var: raw})


def test_the_bots_turn_threads_reach_smart_turn():
    def processors(p):
        yield p
        for child in getattr(p, "processors", []):
            yield from processors(child)

    agent = build_agent(agent_transport(free_ports(1)[0]), AgentSettings.from_env({"BOT_TURN_CPUS": "3"}))
    [user] = [p for p in processors(agent.worker.pipeline) if isinstance(p, LLMUserAggregator)]
    [stop] = user._params.user_turn_strategies.stop
    assert stop._turn_analyzer._session.get_session_options().intra_op_num_threads == 3


def _models_status(settings: AgentSettings, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{settings.llm_url}/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_local_host_starts_reports_ready_and_stops(tiny_asr_path, tiny_tts_path, tiny_llm_path):
    asr, tts, llm = free_ports(3)
    settings = AgentSettings(
        asr_url=f"ws://127.0.0.1:{asr}",
        tts_url=f"ws://127.0.0.1:{tts}",
        llm_url=f"http://127.0.0.1:{llm}/v1",
        auth_token="s3cret",
    )
    tiny = ("--asr-model", str(tiny_asr_path), "--tts-model", str(tiny_tts_path), "--llm-model", str(tiny_llm_path))
    host = LocalHost(settings, (*tiny, "--device", "cpu", "--llm-gpu-layers", "0", "--llm-context-size", "1024"))
    host.start()
    try:
        host.wait_ready(timeout_s=300, report_every_s=5)
        assert all(read_health(url)["status"] == "ready" for url in health_urls(settings).values())
        # The host asks for the token the bot sends.
        assert _models_status(settings) == 401
        assert _models_status(settings, "s3cret") == 200
    finally:
        host.stop()
    assert all(read_health(url) is None for url in health_urls(settings).values())


def test_the_host_is_this_projects_scheduler_whatever_folder_the_bot_runs_in(tmp_path, monkeypatch):
    """``python -m`` looks in the working folder first, where a user's project may have a
    ``scheduler.py`` of its own."""
    ran = tmp_path / "the-users-scheduler-ran"
    (tmp_path / "scheduler.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    asr, tts, llm = free_ports(3)
    settings = AgentSettings(
        asr_url=f"ws://127.0.0.1:{asr}", tts_url=f"ws://127.0.0.1:{tts}", llm_url=f"http://127.0.0.1:{llm}/v1"
    )
    host = LocalHost(settings, ("--help",))
    host.start()
    try:
        assert host._process.wait(timeout=60) == 0
    finally:
        host.stop()
    assert not ran.exists()


@pytest.mark.slow
def test_a_host_that_cannot_load_is_reported(tmp_path):
    asr, tts, llm = free_ports(3)
    settings = AgentSettings(
        asr_url=f"ws://127.0.0.1:{asr}", tts_url=f"ws://127.0.0.1:{tts}", llm_url=f"http://127.0.0.1:{llm}/v1"
    )
    missing = str(tmp_path / "missing.gguf")
    host = LocalHost(settings, ("--asr-model", missing, "--tts-model", missing, "--llm-model", missing))
    host.start()
    try:
        with pytest.raises(RuntimeError):
            host.wait_ready(timeout_s=120)
    finally:
        host.stop()


def test_recordings_of_sessions_that_end_together_are_all_kept(tmp_path):
    paths = {write_wav(tmp_path, bytes(400), 16000, 2) for _ in range(3)}
    assert len(paths) == 3 and all(p.exists() for p in paths)


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's")
def test_a_child_the_bot_starts_ends_when_the_bot_is_killed():
    """SIGKILL gives the bot no chance to stop its host: the kernel must."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; from pipecat_nvidia.local_host import spawn_child; "
            "child = spawn_child([sys.executable, '-c', 'import time; time.sleep(60)'], dict(os.environ)); "
            "print(child.pid, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:  # a zombie (dead, not yet reaped) is not alive
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _local_settings(asr: int, tts: int, llm: int) -> AgentSettings:
    return AgentSettings(
        asr_url=f"ws://127.0.0.1:{asr}", tts_url=f"ws://127.0.0.1:{tts}", llm_url=f"http://127.0.0.1:{llm}/v1"
    )


def test_the_bot_refuses_to_start_a_host_on_a_port_another_program_holds():
    asr, llm = free_ports(2)
    with listening_socket() as taken:
        host = LocalHost(_local_settings(asr, taken, llm))
        with pytest.raises(PortTaken, match=f"port {taken} .*HOST_TTS_PORT"):
            host.start()


@pytest.mark.slow
def test_the_bot_refuses_to_start_a_host_where_a_server_already_runs(tiny_asr_path):
    """A host left running by another bot would otherwise answer for the one never started."""
    tts, llm = free_ports(2)
    with server_process("servers.asr", "--model", str(tiny_asr_path), "--device", "cpu") as asr:
        host = LocalHost(_local_settings(asr, tts, llm))
        with pytest.raises(PortTaken, match=f"port {asr} already serves ASR \\(ready.*NVIDIA_ASR_URL"):
            host.start()


_WATCHED_CHILD = """
import os, signal, sys, threading, time
from pipecat_nvidia.local_host import spawn_child, stop_bot_if_it_dies
how, wait_s, interrupts_to_end = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
interrupts = 0
died = threading.Event()

def on_sigint(*_):
    global interrupts
    interrupts += 1
    print("interrupted, the host died" if died.is_set() else "interrupted", flush=True)
    if interrupts == interrupts_to_end:
        sys.exit(0)

signal.signal(signal.SIGINT, on_sigint)
child = spawn_child([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
stopping = threading.Event()
died = stop_bot_if_it_dies(child, stopping, force_after_s=0.5)
if how == "stop":
    stopping.set()
print(child.pid, flush=True)
time.sleep(wait_s)
print("still running", flush=True)
"""


def _watched_bot(how: str, wait_s: float, interrupts_to_end: int = 1) -> tuple[subprocess.Popen, int]:
    """A bot (sleeping, or shutting down over as many SIGINTs) whose host is a sleeping child."""
    bot = subprocess.Popen(
        [sys.executable, "-c", _WATCHED_CHILD, how, str(wait_s), str(interrupts_to_end)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return bot, int(bot.stdout.readline())


@pytest.mark.parametrize(
    ("how", "wait_s", "interrupts_to_end", "expected"),
    [
        ("dies", 30, 1, ["interrupted, the host died"]),
        ("stop", 3, 1, ["still running"]),
        ("dies", 30, 2, ["interrupted, the host died"] * 2),  # a call in progress holds the first one off
    ],
)
def test_the_bot_ends_when_its_host_dies_unasked_only(how, wait_s, interrupts_to_end, expected):
    bot, host = _watched_bot(how, wait_s, interrupts_to_end)
    try:
        os.kill(host, signal.SIGKILL)
        assert bot.stdout.read().splitlines() == expected
    finally:
        bot.kill()
        bot.wait()


def test_ctrl_c_in_the_terminal_reaches_the_bot_not_its_host():
    """The bot stops its host itself; a host that got Ctrl-C too would stop first and look dead."""
    bot, host = _watched_bot("dies", 30, interrupts_to_end=2)  # a bot that takes its time to stop
    try:
        os.killpg(bot.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        assert bot.stdout.readline().strip() == "interrupted"
        time.sleep(1)
        assert _alive(host)
    finally:
        bot.kill()
        bot.wait()
        if _alive(host):
            os.kill(host, signal.SIGKILL)


def test_a_mistyped_argument_is_refused_before_the_host_starts():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVIDIA_", "HOST_"))}
    result = subprocess.run(
        [sys.executable, "bot.py", "-t", "twillio"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "invalid choice: 'twillio'" in result.stderr
    assert "Starting the local GPU host" not in result.stderr


def test_the_bot_has_parameters_for_every_transport_the_runner_serves():
    """Without ``-t`` the runner serves every installed transport; a session on one the bot
    has no parameters for fails (Pipecat: "Missing transport params")."""
    from pipecat.runner.run import TELEPHONY_TRANSPORTS
    from pipecat.runner.utils import _get_eval_transport_params

    from bot import _transport_params

    params = _transport_params()
    for transport in ("webrtc", "websocket", "eval", *TELEPHONY_TRANSPORTS):
        made = params[transport]()
        assert made.audio_in_enabled and made.audio_out_enabled
    assert type(params["websocket"]().serializer).__name__ == "ProtobufFrameSerializer"
    _get_eval_transport_params(params)  # what the runner checks for its eval harness at /ws


def test_the_bot_stops_before_loading_anything_when_its_own_port_is_taken():
    """The runner would find its port taken only after the minutes the models take to load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVIDIA_", "HOST_"))}
    with listening_socket() as taken:
        result = subprocess.run(
            [sys.executable, "bot.py", "--host", "127.0.0.1", "--port", str(taken)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert f"Port {taken} is taken" in result.stderr and "Starting the local GPU host" not in result.stderr


@pytest.mark.parametrize(
    ("transport", "direct", "listens"),
    [(None, False, True), ("twilio", False, True), ("vonage", False, False), ("daily", True, False)],
    ids=["playground", "telephony", "vonage", "daily-direct"],
)
def test_the_bot_checks_its_port_only_where_the_runner_listens(transport, direct, listens):
    """With Vonage or ``--direct`` the runner joins the session itself: a taken port is no
    reason to refuse."""
    import argparse

    from bot import _runner_listens

    assert _runner_listens(argparse.Namespace(transport=transport, direct=direct)) is listens


def test_the_bot_says_what_to_install_before_starting_a_host_that_could_not_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    host = LocalHost(_local_settings(*free_ports(3)))
    with pytest.raises(RuntimeError, match=r"needs llama-cpp-python: pip install '\.\[server\]'.*NVIDIA_ASR_URL"):
        host.start()
    assert host._process is None
