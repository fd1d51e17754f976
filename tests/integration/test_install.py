"""`make install PREFIX=/usr DESTDIR=...` as a packager runs it: the tree it stages, a venv that
runs from its final place, an operator's config never overwritten."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_make_install_stages_a_self_contained_tree(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    kept = stage / "etc" / "vllmd" / "vllmd.toml"
    kept.parent.mkdir(parents=True)
    kept.write_text("# the operator's own\n")
    done = subprocess.run(
        ["make", "-C", str(ROOT), "install", "PREFIX=/usr", f"DESTDIR={stage}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "ENGINE"},  # no engine unless asked
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    app = stage / "usr" / "lib" / "vllmd"
    for tool in ("vllmd", "vllmctl"):
        link = stage / "usr" / "bin" / tool
        assert link.is_symlink() and os.readlink(link) == f"../lib/vllmd/bin/{tool}"
        # Its scripts name the venv's final place, not the staging directory.
        assert (app / "bin" / tool).read_text().splitlines()[0] == "#!/usr/lib/vllmd/bin/python"
    unit = (stage / "usr" / "lib" / "systemd" / "system" / "vllmd.service").read_text()
    assert "ExecStart=/usr/bin/vllmd serve --config /etc/vllmd/vllmd.toml" in unit
    assert "ExecReload=/usr/bin/vllmctl reload" in unit
    assert (stage / "usr" / "lib" / "sysusers.d" / "vllmd.conf").read_text().count("u vllmd") == 1
    completion = stage / "usr" / "share" / "bash-completion" / "completions" / "vllmctl"
    assert completion.exists()
    assert kept.read_text() == "# the operator's own\n"
    assert "kept the existing" in done.stdout
    assert not list(app.glob("lib/python*/site-packages/vllm/__init__.py"))  # no engine
    version = subprocess.run(
        [str(app / "bin" / "python"), str(app / "bin" / "vllmd"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.returncode == 0 and version.stdout.startswith("vllmd "), version
