"""`--help` as a new user reads it (issue 19.5): the program named as invoked, the options in groups with their
choices, defaults and variables, then two examples and the exit codes; `--allow-remote-without-key` is a switch
that still takes the older `true`/`false` value."""

import re
import subprocess
import sys

import pytest
from support import ROOT
from support.servers import server_env

from openvino_reranker.config import HELP_GROUPS, OPTIONS, load_config
from openvino_reranker.errors import EXIT_CODES

# What pip writes for [project.scripts] openvino-reranker = "openvino_reranker.startup:main"
CONSOLE_SCRIPT = """import re
import sys
from openvino_reranker.startup import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""


def help_text(*command: str) -> str:
    result = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, timeout=60,
                            env=server_env({"PYTHONPATH": str(ROOT), "COLUMNS": "80"}))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def server_py_help() -> str:
    return help_text(str(ROOT / "server.py"))


def blocks(text: str) -> dict[str, str]:
    """The help's sections by their heading line ('model:', 'examples:', ...)."""
    found, title = {}, None
    for line in text.splitlines():
        if re.fullmatch(r"[A-Za-z][A-Za-z ,]*:", line):
            title = line[:-1]
            found[title] = ""
        elif title is not None:
            found[title] += line + "\n"
    return found


def test_the_program_is_named_as_invoked(server_py_help, tmp_path):
    assert server_py_help.startswith("usage: server.py ")
    script = tmp_path / "openvino-reranker"
    script.write_text(CONSOLE_SCRIPT)
    installed = help_text(str(script))
    assert installed.startswith("usage: openvino-reranker ") and "server.py" not in installed
    assert "  openvino-reranker --device CPU" in installed  # the examples too
    assert "  python server.py --device CPU" in server_py_help


def test_options_are_grouped_in_order(server_py_help):
    sections = blocks(server_py_help)
    titles = [title for title, _ in HELP_GROUPS]
    assert titles == ["model", "device and speed", "HTTP and access", "limits", "operations"]
    assert [t for t in sections if t in titles] == titles
    grouped = [name for _, names in HELP_GROUPS for name in names]
    assert sorted(grouped) == sorted(opt.name for opt in OPTIONS)  # every option in exactly one group
    for title, names in HELP_GROUPS:
        for name in names:
            flag = "--" + name.replace("_", "-")
            assert re.search(rf"^  {flag}\b", sections[title], re.M), f"{flag} is not under {title}"


def test_choices_defaults_and_variables_are_shown(server_py_help):
    flat = " ".join(server_py_help.split())
    for shown in ("--shape-mode {auto,static,dynamic}", "--performance-hint {auto,latency,throughput}",
                  "--inference-precision {default,f32,bf16,f16}", "--on-parity-failure {fallback,refuse}",
                  "--log-level {DEBUG,INFO,WARNING,ERROR}", "--allow-remote-without-key [true|false]",
                  "--strict-env [true|false]"):
        assert shown in flat, shown
    for opt in OPTIONS:
        assert f"(default: {opt.default or 'none'})" in flat, opt.name
    assert "Every option is also an OPENVINO_RERANKER_* variable: --max-length is OPENVINO_RERANKER_MAX_LENGTH" in flat


def test_help_ends_with_two_examples_and_the_exit_codes(server_py_help):
    sections = list(blocks(server_py_help).items())
    assert [title for title, _ in sections[-2:]] == ["examples", "exit codes"]
    examples = [line for line in sections[-2][1].splitlines() if line.startswith("  python server.py")]
    assert len(examples) == 2 and any("demo-model" in line for line in examples)
    codes = [int(m.group(1)) for m in re.finditer(r"^  (\d+)  ", sections[-1][1], re.M)]
    assert codes == [code for code, _ in EXIT_CODES]
    assert " ".join(server_py_help.split()).endswith(EXIT_CODES[-1][1])
    assert len(server_py_help.splitlines()) < 180  # was 196 lines in one block, on 80 columns (now with eval, quantize,
    # five image options and --pad-multiple)


def test_allow_remote_without_key_is_a_switch_and_keeps_its_old_form():
    assert load_config(["--allow-remote-without-key"], {}).allow_remote_without_key is True
    assert load_config(["--allow-remote-without-key", "--port", "1"], {}).allow_remote_without_key is True
    assert load_config(["--allow-remote-without-key", "true"], {}).allow_remote_without_key is True  # the old form
    assert load_config(["--allow-remote-without-key=false"], {}).allow_remote_without_key is False
    env = {"OPENVINO_RERANKER_ALLOW_REMOTE_WITHOUT_KEY": "true"}
    assert load_config([], env).allow_remote_without_key is True
    assert load_config(["--allow-remote-without-key", "false"], env).allow_remote_without_key is False


def test_the_refusal_names_the_switch(capsys):
    import threading

    from support.servers import free_port

    from openvino_reranker.startup import main

    stop = threading.Event()
    stop.set()
    assert main(["--host", "0.0.0.0", "--port", str(free_port()), "--device", "CPU"], {}, stop=stop) == 2
    assert capsys.readouterr().err.rstrip().endswith("or pass --allow-remote-without-key")
