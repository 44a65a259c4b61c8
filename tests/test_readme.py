"""README's quick-start commands, run as a new user runs them (in a scratch directory)."""
import os
import re
import subprocess

from tests.conftest import ROOT

SECTIONS = ("## Quick start, step by step", "## Checkpoints and migration")


def readme_commands():
    text = (ROOT / "README.md").read_text()
    cmds = []
    for title in SECTIONS:
        body = text.split(title, 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```bash\n(.*?)```", body, re.S):
            for line in block.splitlines():
                cmd = line.split("  #")[0].strip()
                if cmd and not cmd.startswith("tensorboard"):
                    cmds.append(cmd)
    return cmds


def test_readme_commands_work(tmp_path):
    cmds = readme_commands()
    assert len(cmds) >= 12
    env = dict(os.environ, RUN=str(tmp_path))
    for cmd in cmds:
        r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "hf" / "config.json").exists()


def test_readme_quickstart_commands_match_ci():
    text = (ROOT / "README.md").read_text()
    test_cmd = re.findall(r"```bash\n(.*?)\n```", text, re.S)[1]
    assert test_cmd.split("&& ")[-1].strip() in (ROOT / ".ci" / "run").read_text()
