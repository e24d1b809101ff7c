"""The README's walk-through, run as written: every bash and python block in order, in one working folder
that holds links to the repository's recipes/ and tests/, a small generated corpus/ and chats.txt.

A block preceded by `<!-- readme-test: skip: WHY -->` is skipped with that reason (hub downloads, GPUs, several
machines); `<!-- readme-test: server -->` runs against a `neoxko serve` of the built-in model on port 8000."""

import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import KOREAN_TEXT

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.S)


def readme_blocks() -> list[tuple[str, str, str]]:
    return [(m["lang"], m["code"], m["mark"] or "") for m in BLOCK.finditer((ROOT / "README.md").read_text())]


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    for name in ("recipes", "tests"):
        (work / name).symlink_to(ROOT / name)
    rng = random.Random(0)
    words = [w for w in KOREAN_TEXT.split() if any("가" <= c <= "힣" for c in w)]
    (work / "corpus").mkdir()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(30, 80))) for _ in range(400)]
    (work / "corpus" / "reviews.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (work / "chats.txt").write_text("내 번호는 010-1234-5678 이야\n계좌는 국민 123456-78-901234 입니다\n안녕하세요\n",
                                    encoding="utf-8")
    return work


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_block(lang: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env(), timeout=600)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def serving(cwd: Path):
    """A `neoxko serve` on port 8000, up and answering /health."""
    server = subprocess.Popen([sys.executable, "-m", "neoxko", "serve", "--port", "8000", "--chat-template", "koalpaca",
                               "--lora", "chat=ko-small-chat"], cwd=cwd, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1):
                return server
        except OSError:
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.2)
    server.kill()
    raise AssertionError("neoxko serve did not come up in 120 s")


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}-{b[0]}" for i, b in enumerate(BLOCKS)])
def test_readme_block_runs_as_written(workdir, index):
    lang, code, mark = BLOCKS[index]
    if mark.startswith("skip:"):
        pytest.skip(mark.removeprefix("skip:").strip())
    server = None
    if mark == "server":
        if not port_free(8000):
            pytest.skip("port 8000 is taken on this machine; the block talks to http://127.0.0.1:8000")
        server = serving(workdir)
    try:
        out = run_block(lang, code, workdir)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    assert out.returncode == 0, f"{code}\n--- stderr ---\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def test_the_readme_has_blocks_to_run_and_says_why_it_skips_the_others():
    assert len(BLOCKS) >= 15
    assert sum(not mark.startswith("skip:") for _, _, mark in BLOCKS) >= 8
    for _, _, mark in BLOCKS:
        assert mark in ("", "server") or (mark.startswith("skip:") and len(mark) > 10), mark
