"""deploy/local/launch.py: servers run from a private empty directory, not the shared temp dir, because
``python -m`` puts the working directory first on the import path (a stray ``nt.py`` in /tmp once broke the
server's compiled decode step through inductor's vector-ISA probe)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile

from deploy.local.launch import empty_workdir, serve_command


def test_servers_import_nothing_from_the_shared_temp_dir():
    workdir = empty_workdir()
    assert workdir == empty_workdir() and os.path.realpath(workdir) != os.path.realpath(tempfile.gettempdir())
    assert os.listdir(workdir) == [] and stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
    # what `python -m` run there finds first on its path: the empty dir, so a module planted in the temp dir
    # shadows nothing
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=tempfile.gettempdir(), delete=False) as planted:
        planted.write("raise SystemExit('imported from the shared temp dir')\n")
    name = os.path.basename(planted.name)[:-3]
    try:
        code = f"import importlib.util; print(importlib.util.find_spec({name!r}))"
        done = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == "None"
        in_temp = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), capture_output=True,
                                 text=True, check=True)
        assert in_temp.stdout.strip() != "None"  # the hazard is real where the servers used to run
    finally:
        os.unlink(planted.name)
    assert serve_command("m", 1)[1:3] == ["-m", "miras_serve.server.cli"]
