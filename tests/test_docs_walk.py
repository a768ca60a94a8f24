"""Every command and example of README.md and docs/*.md, run as the page shows it.

A reader copies these into a shell or a Python prompt; a page whose commands stopped
working is worse than no page. So the snippets are read from the pages at test time
(a changed page is tested as changed) and run in a sandbox that stands in for the
reader's machine, offline:

- collected: each command of a ``sh``/``bash``/``console``/``shell`` fence (one logical
  command: ``\\`` continuations joined, a compound command kept whole, ``$ `` prompts
  stripped and the lines after them taken as output), each ``python`` fence whole, each
  ``yaml`` fence (parsed), and commands in prose (a span such as
  ``.venv/bin/cachefs prefetch "$PWD/docs/"``: a known program, two words of arguments
  at least, no placeholder). A fence of another language fails until it gets a rule.
- the machine: a fresh directory per page, with a copy of the repository as the working
  directory (its ``.venv`` the environment these tests run in), HOME and XDG dirs of its
  own, and the absolute paths the pages name (``/tmp``, ``/run``, ``/etc``, ...) moved
  under it. The internet is an offline origin: S3 is moto's server (the standard AWS
  variables point at it, as README.md says S3 reads them), the Hugging Face hub is an
  HTTP origin on loopback, each holding the objects the pages name (``REWRITES``,
  ``S3_OBJECTS``, ``HUB_FILES``, ``LOCAL_FILES``).
- a daemon (``cachefs node``, ``cachefs csi``) starts in the background and is polled
  until it logs that it serves; later commands of the page reach it where they name it.
  A page whose commands talk to a node the page does not start gets one (``PAGE_NODES``).
- a command runs when every program it calls is in ``RUNNABLE`` and no entry of
  ``SKIPPED`` matches it; anything else fails, so a new command needs a decision.
- the verdict: exit status 0 (or ``EXIT_CODES``), and the first line the page shows as
  output (a ``$ `` block's lines, or a one-word ``# comment`` under the command).
  A command that does not work as written, known and reported, is in
  ``KNOWN_FAILURES`` (xfail; one that passes warns that its entry may be stale).

tests/test_documented_names.py checks the flags and variables of the tables and
prose; this test runs the commands and examples themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import RangeHTTPServer, S3Server, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

SHELL_FENCES = {"sh", "bash", "console", "shell"}
# A shell fence that starts a daemon with `&` is also run whole, as a reader pastes it:
# its later lines then run at once, without waiting for the daemon.
PASTED = "sh, pasted whole"
PYTHON_FENCES = {"python", "py"}
YAML_FENCES = {"yaml", "yml"}
# Fences without a language hold diagrams and file layouts: nothing to run.
PLAIN_FENCE = ""

# -- what the pages may run, and what they may not -------------------------------------

# Programs a command may call. Any other one fails the test until it is added here
# (and made to work offline) or its command is listed in SKIPPED.
RUNNABLE = {
    "cachefs",
    "pip",
    "python",
    "python3",
    "test",
    "export",
    "openssl",
    "head",
    "timeout",  # with sh: a wait for a socket, in the page's own words
    "sh",
    "sleep",
}
SHELL_WORDS = {"until", "while", "do", "done", "if", "then", "else", "fi"}

# Commands not run, by a distinctive substring (first match wins), and why.
SKIPPED: list[tuple[str, str]] = [
    (
        "kubectl ",
        "needs a Kubernetes cluster; tests/test_chart.py renders the chart with Helm's "
        "engine, validates it and runs its containers' commands as processes",
    ),
    ("helm ", "needs a Kubernetes cluster (tests/test_chart.py renders and lints the chart)"),
    ("docker ", "builds and pushes an image: needs a container engine and a registry"),
]

# Exit statuses other than 0 that a page documents, by substring: (statuses, why).
EXIT_CODES: dict[str, tuple[frozenset[int], str]] = {
    "| head -1": (
        frozenset({0, 141}),
        "README.md: 141 as for SIGPIPE when cachefs writes after head has gone; a status "
        "that fits the pipe's buffer is written before, and ends with 0",
    ),
}

# Documented snippets that do not work as written, by (kind, distinctive substring):
# why (the test adds the file:line).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# The reader's world, offline. Each entry: (pattern, replacement, why). Replacements may
# name {root} (the page's machine), {hub} (the hub's stand-in), {port:N} (a free
# loopback port for the page's port N) and {job} (the job id the page's last
# ``--detach`` printed). Applied in order, to commands and Python blocks alike.
REWRITES: list[tuple[str, str, str]] = [
    (
        r"python3 -m venv \.venv",
        "test -x .venv/bin/python",
        "the clone's environment is the one these tests run in: a new one needs the index",
    ),
    (
        r"\bpip install\b",
        "pip install --dry-run --no-index --no-build-isolation",
        "no package index: the install works when what it names is installed already",
    ),
    (
        r"(?m)-m pytest -q$",
        "-m pytest -q --collect-only -p no:cacheprovider",
        "the suite this test belongs to: collected, not run again from inside itself",
    ),
    (
        r"kubectl (?:-n \S+ )?exec \S+ -c node -- ",
        "CACHEFS_ENDPOINT=unix:///run/cachefs/cachefs.sock ",
        "inside the chart's node container (its CACHEFS_ENDPOINT) is the page's node",
    ),
    (r"https://huggingface\.co/", "{hub}/", "the hub is an HTTP origin on loopback"),
    (r"\b0\.0\.0\.0:(\d+)", "127.0.0.1:{port:\\1}", "listeners on loopback, on free ports"),
    (
        r"(?:(?<=unix://)|(?<![\w.$~/:-]))/(tmp|run|etc|csi|var|models)(?=/)",
        "{root}/\\1",
        "the machine's directories are the page's own",
    ),
    (r"\bJOB_ID\b", "{job}", "the id the page's prefetch --detach printed"),
    (r"\"cuda(?::\d+)?\"", '"cpu"', "no GPU here: tests/test_loaders.py checks CUDA copies"),
]

# Pages whose commands talk to a node the page does not start: started before their first
# snippet, where the rewritten commands look for it.
PAGE_NODES: dict[str, str] = {
    "docs/kubernetes.md": "the chart's DaemonSet runs it; kubectl exec goes into its container",
    "docs/csi.md": "the CSI plugin's CACHEFS_ENDPOINT names it",
}
# As the chart runs it: its cache root, and a cluster (of one here) with its token.
PAGE_NODE_COMMAND = (
    "CACHEFS_TOKEN=docs-walk-token cachefs node --socket /run/cachefs/cachefs.sock "
    "--cache-dir /var/cache/cachefs --address 0.0.0.0:7070 --peers 0.0.0.0:7070"
)

# Names a Python example takes from the reader's own code.
READER_NAMES = '''
import os

class _Model:
    """The reader's model: takes each tensor as it lands."""

    def load_param(self, name, tensor):
        assert tensor.numel() > 0, name

model = _Model()

class AutoModel:
    """transformers' loader: reads config.json and the weights from a directory."""

    @staticmethod
    def from_pretrained(path):
        assert os.path.isfile(os.path.join(path, "config.json")), os.listdir(path)
        assert any(n.endswith(".safetensors") for n in os.listdir(path)), os.listdir(path)
'''

RUN_PYTHON = """
import sys
namespace = {"__name__": "__main__"}
exec(sys.argv[3], namespace)
exec(compile(open(sys.argv[1]).read(), sys.argv[2], "exec"), namespace)
"""


def safetensors(tensors: dict[str, list[float]]) -> bytes:
    """A small safetensors file (F32 tensors), written by hand: no torch needed."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, values in tensors.items():
        raw = struct.pack(f"<{len(values)}f", *values)
        header[name] = {
            "dtype": "F32",
            "shape": [len(values)],
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


WEIGHTS = safetensors({"embed.weight": [0.5] * 64, "lm_head.weight": [0.25] * 32})
CONFIG = json.dumps({"model_type": "llama", "hidden_size": 64}).encode()
MODEL_DIR = {"config.json": CONFIG, "model.safetensors": WEIGHTS}

# The objects the pages name, at their origins.
S3_OBJECTS: dict[str, dict[str, bytes]] = {
    "bucket": {"model.safetensors": WEIGHTS},
    "models": {
        **{f"llama-3-8b/{name}": data for name, data in MODEL_DIR.items()},
        **{f"mistral-7b/{name}": data for name, data in MODEL_DIR.items()},
    },
}
HUB_FILES = {"/sentence-transformers/all-MiniLM-L6-v2/resolve/main/model.safetensors": WEIGHTS}
# Files on the reader's machine (under the page's root): a local model, a node's config.
LOCAL_FILES: dict[str, bytes] = {
    **{f"models/llama-3-8b/{name}": data for name, data in MODEL_DIR.items()},
    "etc/cachefs/node.yaml": b"tiers:\n"
    b"  - {name: disk, medium: disk, path: {root}/var/cache/cachefs, quota: 1GiB}\n",
}

# -- reading the pages -------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """One command or example as a page shows it."""

    page: str  # relative to the repository: docs/node.md
    line: int
    kind: str  # sh, python, yaml, or the language of an unknown fence
    text: str
    output: tuple[str, ...] = ()  # what the page shows it prints

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _complete(command: str) -> bool:
    """Whether bash would run ``command`` as it stands (no open quote, loop, `\\`)."""
    if command.rstrip().endswith("\\"):
        return False
    checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, timeout=30)
    return checked.returncode == 0


def _shell_commands(page: str, lines: list[tuple[int, str]]) -> list[Snippet]:
    """The logical commands of a shell fence, each with the output the page shows."""
    prompts = any(line.startswith("$ ") for _, line in lines)
    commands: list[Snippet] = []
    current: list[str] = []
    start = 0
    after_command = False

    def emit() -> None:
        commands.append(Snippet(page, start, "sh", "\n".join(current)))
        current.clear()

    for number, line in lines:
        if current:
            current.append(line)
            if _complete("\n".join(current)):
                emit()
            continue
        stripped = line.strip()
        if prompts and not line.startswith("$ "):
            if commands and stripped:
                commands[-1] = replace(commands[-1], output=(*commands[-1].output, stripped))
            continue
        if not stripped or stripped.startswith("#"):
            shown = stripped.lstrip("#").strip()
            if after_command and shown and " " not in shown:  # `# cachefs.io/a79cd3fa957a`
                commands[-1] = replace(commands[-1], output=(*commands[-1].output, shown))
            after_command = after_command and bool(stripped)
            continue
        current.append(line[2:] if prompts else line)
        start = number
        if _complete(current[0]):
            emit()
        after_command = True
    if current:
        emit()  # incomplete at the fence's end: bash says what is wrong
    return commands


DAEMON = re.compile(r"(?:^|[\s/])cachefs (?:node|csi)(?:\s|$)")
BACKGROUNDED = re.compile(r"(?:^|[\s/])cachefs (?:node|csi)\b.*\s&\s*(?:#.*)?$")
SPAN = re.compile(r"`([^`]+)`")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=\S*")
PROSE_PROGRAMS = {"cachefs", "pip", "pip3", "python", "python3", "kubectl", "helm", "docker"}


def _placeholder(word: str) -> bool:
    """``SOURCE...``, ``JOB_ID``, ``HOST:PORT``, ``<fullname>``, ``[--json]``, ``ls|status``."""
    return (
        "..." in word
        or "<" in word
        or word.startswith("[")
        or ("|" in word and word != "|")
        or re.fullmatch(r"[A-Z][A-Z0-9_:]*[A-Z0-9]", word) is not None
    )


def _prose_command(span: str) -> bool:
    """Whether a prose span is a command to run rather than a name or a synopsis."""
    words = span.split()
    while words and ASSIGNMENT.fullmatch(words[0]):
        words.pop(0)
    if len(words) < 3 or any(_placeholder(word) for word in words):
        return False
    program = words[0].removeprefix(".venv/bin/")
    return program in PROSE_PROGRAMS


def read_page(path: Path) -> list[Snippet]:
    """The snippets of one page, in the page's order."""
    page = path.relative_to(REPO_ROOT).as_posix()
    snippets: list[Snippet] = []
    fence: str | None = None
    fence_line = 0
    body: list[tuple[int, str]] = []
    paragraph: list[tuple[int, str]] = []

    def prose() -> None:
        if not paragraph:
            return
        first = paragraph[0][0]
        text = "\n".join(line for _, line in paragraph)
        for match in SPAN.finditer(text):
            span = match.group(1).replace("\n", " ")
            if _prose_command(span):
                line = first + text[: match.start()].count("\n")
                snippets.append(Snippet(page, line, "sh", span))
        paragraph.clear()

    for number, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                prose()
                fence, fence_line, body = line[3:].strip().lower(), number, []
            elif line.strip() and not line.startswith("#"):
                paragraph.append((number, line))
            else:
                prose()
            continue
        if not line.startswith("```"):
            body.append((number, line))
            continue
        text = "\n".join(line for _, line in body)
        if fence in SHELL_FENCES:
            snippets += _shell_commands(page, body)
            if any(BACKGROUNDED.search(line) for _, line in body):
                snippets.append(Snippet(page, fence_line, PASTED, text))
        elif fence in PYTHON_FENCES:
            snippets.append(Snippet(page, fence_line, "python", text))
        elif fence in YAML_FENCES:
            snippets.append(Snippet(page, fence_line, "yaml", text))
        elif fence != PLAIN_FENCE:
            snippets.append(Snippet(page, fence_line, fence, text))
        fence = None
    prose()
    return snippets


SNIPPETS = [snippet for page in PAGES for snippet in read_page(page)]


def _ids(snippets: list[Snippet]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for snippet in snippets:
        where = f"{snippet.where}-pasted" if snippet.kind == PASTED else snippet.where
        seen[where] = seen.get(where, 0) + 1
        ids.append(where if seen[where] == 1 else f"{where}#{seen[where]}")
    return ids


# -- the reader's machine ----------------------------------------------------------------


def _first_match(text: str, table: Any) -> Any:
    items = table.items() if isinstance(table, dict) else table
    return next(((key, value) for key, value in items if key in text), None)


def _strip_comments(command: str) -> str:
    return re.sub(r"(^|\s)#.*", "", command)


def programs(command: str) -> list[str]:
    """The programs a command calls (the first word of each simple command)."""
    names = []
    text = _strip_comments(command.replace("\\\n", " "))
    text = re.sub(r"\bsh -c '([^']*)'", r"sh ; \1 ;", text)  # sh -c's script is looked into
    pieces = re.split(r"&&|\|\||[;|&\n]|\$\(|`", text)
    for piece in pieces:
        words = piece.split()
        while words and (ASSIGNMENT.fullmatch(words[0]) or words[0] in SHELL_WORDS):
            words.pop(0)
        if words:
            names.append(words[0].removeprefix(".venv/bin/"))
    return names


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Unresolved(Exception):
    """A placeholder of the page that nothing before it filled in."""


@dataclass
class Outcome:
    """What running a snippet gave."""

    command: str  # as run, after the rewrites
    returncode: int = 0
    stdout: str = ""
    stderr: str = ""
    skipped: str | None = None

    def report(self) -> str:
        return (
            f"ran: {self.command}\nexit status {self.returncode}\n"
            f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"
        )


class Daemon:
    """A command a page runs in the background, its stderr collected."""

    def __init__(self, script: str, env: dict[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            ["bash", "-c", script],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_serving(self, timeout: float = 60.0) -> int | None:
        """None once it logs that it serves; its exit status if it exits first."""

        def state() -> tuple[int | None] | None:
            if any('"serving"' in line for line in list(self.lines)):
                return (None,)
            if self.process.poll() is not None:
                self._reader.join(timeout=10)
                return (self.process.returncode,)
            return None

        return wait_for(state, timeout=timeout, message="a documented daemon to serve")[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._reader.join(timeout=10)


@dataclass
class Origins:
    """The offline internet: moto's S3 and the hub's stand-in."""

    s3: S3Server
    hub: RangeHTTPServer
    clone: Path


@dataclass
class PageMachine:
    """One page's sandbox: its root, environment, daemons and what ran so far."""

    page: str
    root: Path
    origins: Origins
    snippets: list[Snippet]
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    job: str = ""

    def __post_init__(self) -> None:
        home = self.root / "home"
        for path in ("home/.cache", "home/.config", "home/.local/share", "home/.local/state"):
            (self.root / path).mkdir(parents=True)
        (self.root / "run/user").mkdir(parents=True, mode=0o700)
        (self.root / "tmp").mkdir()
        for relative, data in LOCAL_FILES.items():
            target = self.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.replace(b"{root}", str(self.root).encode()))
        self.state = self.root / "exported.sh"
        self.state.write_text("")
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("CACHEFS_", "AWS_"))}
        self.env = {
            **inherited,
            **self.origins.s3.env(),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "XDG_STATE_HOME": str(home / ".local/state"),
            "XDG_RUNTIME_DIR": str(self.root / "run/user"),
            "TMPDIR": str(self.root / "tmp"),
            # pip without the machine's configuration: no extra index or wheel directory.
            "PIP_CONFIG_FILE": os.devnull,
            # The CSI plugin's default records directory is a machine path no page names.
            "CACHEFS_CSI__STATE_DIR": str(self.root / "var/lib/cachefs/csi"),
        }

    def rewrite(self, text: str) -> str:
        for pattern, replacement, _ in REWRITES:
            text = re.sub(pattern, lambda match, r=replacement: self._fill(match, r), text)
        return text

    def _fill(self, match: re.Match[str], replacement: str) -> str:
        text = match.expand(replacement)
        text = text.replace("{root}", str(self.root))
        text = text.replace("{hub}", self.origins.hub.base_url)
        if "{job}" in text:
            if not self.job:
                raise Unresolved("JOB_ID, but no prefetch --detach of the page printed an id")
            text = text.replace("{job}", self.job)
        return re.sub(r"\{port:(\d+)\}", lambda m: str(self._port(m.group(1))), text)

    def _port(self, documented: str) -> int:
        return self.ports.setdefault(documented, _free_port())

    def run_through(self, index: int) -> Outcome:
        """Run the page's snippets up to ``index`` in order, each once; its outcome."""
        if not self.outcomes and self.page in PAGE_NODES:
            node = self._start_daemon(self.rewrite(PAGE_NODE_COMMAND))
            assert node.returncode == 0, f"{self.page}'s node: {node.report()}"
        for earlier in range(index + 1):
            if earlier not in self.outcomes:
                self.outcomes[earlier] = self._run(self.snippets[earlier])
        return self.outcomes[index]

    def _run(self, snippet: Snippet) -> Outcome:
        if snippet.kind == "python":
            return self._python(snippet)
        if snippet.kind == PASTED:
            return self._pasted(snippet)
        if snippet.kind != "sh":
            return Outcome(snippet.text, skipped=f"a {snippet.kind!r} fence")
        try:
            command = self.rewrite(snippet.text)
        except Unresolved as exc:
            return Outcome(snippet.text, returncode=-1, stderr=f"names {exc}")
        skip = _first_match(command, SKIPPED)
        if skip is not None:
            return Outcome(command, skipped=skip[1])
        unknown = sorted({name for name in programs(command) if name not in RUNNABLE})
        if unknown:
            return Outcome(
                command,
                returncode=-1,
                stderr=f"calls {', '.join(unknown)}: not in RUNNABLE, and no SKIPPED entry "
                "matches (make it run offline, or list it with the reason it cannot)",
            )
        if DAEMON.search(command):
            return self._start_daemon(command)
        script = f"set -o pipefail\n. {self.state}\n{command}\n__rc=$?\n"
        script += f"export -p > {self.state}\nexit $__rc\n"
        result = subprocess.run(
            ["bash", "-c", script],
            env=self.env,
            cwd=self.origins.clone,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if "--detach" in command and result.returncode == 0 and result.stdout.strip():
            self.job = result.stdout.split()[-1]
        return Outcome(command, result.returncode, result.stdout, result.stderr)

    def _start_daemon(self, command: str) -> Outcome:
        foreground = re.sub(r"\s&\s*(#.*)?$", r" \1", command)  # the harness backgrounds it
        daemon = Daemon(f". {self.state}\n{foreground}\n", self.env, self.origins.clone)
        self.daemons.append(daemon)
        code = daemon.wait_serving()
        log = "\n".join(daemon.lines)
        if code is None:
            return Outcome(command, 0, "", log)
        return Outcome(command, code or -1, "", f"exited with {code} before serving\n{log}")

    def _pasted(self, snippet: Snippet) -> Outcome:
        """The fence as one script; what it left in the background is stopped after."""
        command = self.rewrite(snippet.text)
        out, err = self.root / "pasted.out", self.root / "pasted.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.Popen(
                ["bash", "-c", command],
                env=self.env,
                cwd=self.origins.clone,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            code = process.wait(timeout=180)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        return Outcome(command, code, out.read_text(), err.read_text())

    def _python(self, snippet: Snippet) -> Outcome:
        source = "\n" * snippet.line + self.rewrite(snippet.text)  # tracebacks: page lines
        path = self.root / f"snippet-{snippet.line}.py"
        path.write_text(source)
        exported = subprocess.run(
            ["bash", "-c", f". {self.state}\nenv -0"],
            env=self.env,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.decode()
        env = dict(item.split("=", 1) for item in exported.split("\0") if "=" in item)
        argv = [sys.executable, "-c", RUN_PYTHON, str(path), snippet.page, READER_NAMES]
        result = subprocess.run(
            argv,
            env=env,
            cwd=self.origins.clone,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )
        return Outcome(f"python {snippet.where}", result.returncode, result.stdout, result.stderr)

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


@pytest.fixture(scope="module")
def origins(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origins]:
    """The objects the pages name at their origins, and a clone to run commands in."""
    for bucket, objects in S3_OBJECTS.items():
        s3_server.create_bucket(bucket)
        for key, data in objects.items():
            s3_server.put(bucket, key, data)
    clone = tmp_path_factory.mktemp("docs-walk") / "clone"
    shutil.copytree(
        REPO_ROOT,
        clone,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"
        ),
    )
    (clone / ".venv").symlink_to(sys.prefix)
    with RangeHTTPServer() as hub:
        for path, data in HUB_FILES.items():
            hub.put(path, data)
        yield Origins(s3_server, hub, clone)
    for bucket in S3_OBJECTS:
        s3_server.delete_bucket(bucket)


@pytest.fixture(scope="module")
def machines(
    origins: Origins, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[Snippet], PageMachine]]:
    """One machine per page, made at its first snippet; its daemons stopped at the end."""
    made: dict[str, PageMachine] = {}

    def machine(snippet: Snippet) -> PageMachine:
        """The page's machine; a fresh one of its own for a fence pasted whole."""
        key = snippet.where if snippet.kind == PASTED else snippet.page
        if key not in made:
            root = tmp_path_factory.mktemp(re.sub(r"\W", "-", key))
            if snippet.kind == PASTED:
                snippets = [snippet]
            else:
                snippets = [s for s in SNIPPETS if s.page == key and s.kind != PASTED]
            made[key] = PageMachine(snippet.page, root, origins, snippets)
        return made[key]

    yield machine
    for page in made.values():
        page.close()
    from cachefs.client import close_clients

    close_clients()


# -- the verdicts ------------------------------------------------------------------------


@pytest.mark.parametrize("snippet", SNIPPETS, ids=_ids(SNIPPETS))
def test_the_pages_commands_and_examples_work_as_written(
    snippet: Snippet, machines: Callable[[Snippet], PageMachine]
) -> None:
    if snippet.kind == "yaml":
        yaml.safe_load(snippet.text)  # a configuration or manifest a reader copies
        return
    if snippet.kind not in ("sh", "python", PASTED):
        pytest.fail(
            f"{snippet.where}: a {snippet.kind!r} fence: give its language a rule", pytrace=False
        )
    machine = machines(snippet)
    outcome = machine.run_through(machine.snippets.index(snippet))
    if outcome.skipped is not None:
        pytest.skip(f"{snippet.where}: {outcome.skipped}")
    known = next(
        (
            why
            for (kind, part), why in KNOWN_FAILURES.items()
            if kind == snippet.kind and part in snippet.text
        ),
        None,
    )
    documented = _first_match(snippet.text, EXIT_CODES)
    expected = documented[1][0] if documented else frozenset({0})
    problems = []
    if outcome.returncode not in expected:
        problems.append(f"exit status {outcome.returncode}, expected {sorted(expected)}")
    if outcome.returncode == 141 and outcome.stderr:
        problems.append("a closed pipe is to end the command quietly")
    if snippet.output:
        shown = " ".join(snippet.output[0].split())
        printed = next((line for line in outcome.stdout.splitlines() if line.strip()), "")
        if " ".join(printed.split()) != shown:
            problems.append(f"the page shows {shown!r} as output; it printed {printed!r}")
    if known is not None:
        if problems:
            pytest.xfail(f"{snippet.where}: {known}")
        # Not a failure: a race (a daemon's start) may go the reader's way now and then.
        warnings.warn(
            f"{snippet.where} worked: is its KNOWN_FAILURES entry still due?", stacklevel=1
        )
        return
    if problems:
        pytest.fail(
            f"{snippet.where}: {'; '.join(problems)}\nas written: {snippet.text}\n"
            + outcome.report(),
            pytrace=False,
        )


def test_the_walk_finds_the_commands_and_examples() -> None:
    """A reader that stopped finding snippets would pass vacuously."""
    kinds = {(s.page, s.kind) for s in SNIPPETS}
    assert ("README.md", "sh") in kinds and ("README.md", "python") in kinds
    assert any(s.kind == "sh" and s.page.startswith("docs/") for s in SNIPPETS)
