"""
Tests for the twistd plugin, C{twisted/plugins/twisted_nbd_dropin.py}.

The checks run in a child process so that they see a fresh
C{twisted.plugins} package (its C{__path__} is fixed when it is first
imported) and a fresh C{sys.modules}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

REPO = Path(__file__).resolve().parent.parent
DROPIN = REPO / "twisted" / "plugins" / "twisted_nbd_dropin.py"

#: Only a guard against a hung child; nothing here depends on speed.
SUBPROCESS_TIMEOUT = 120

_PROBE_IMPORT = """
import json, sys
import twisted.plugins.twisted_nbd_dropin as dropin
from twisted.application.service import IServiceMaker
makers = [value for value in vars(dropin).values() if IServiceMaker.providedBy(value)]
print(json.dumps({
    "makers": len(makers),
    "reactor": "twisted.internet.reactor" in sys.modules,
    "loaded": sorted(name for name in sys.modules if name.startswith("twisted_nbd")),
}))
"""

_PROBE_PLUGINS = """
import json
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
import twisted_nbd.tap
makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "nbd"]
maker = makers[0]
print(json.dumps({
    "count": len(makers),
    "name": maker.name,
    "description": maker.description,
    "options": maker.options is twisted_nbd.tap.Options,
    "makeService": maker.makeService is twisted_nbd.tap.makeService,
}))
"""


_PROBE_INSTALLED = """
import importlib.util, json
found = importlib.util.find_spec("twisted_nbd") is not None
tapnames = []
if found:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    tapnames = [maker.tapname for maker in getPlugins(IServiceMaker)]
print(json.dumps({"installed": found, "tapnames": tapnames}))
"""


def probe(code: str, cwd: Path = REPO, with_repo: bool = True) -> Any:
    """
    Run C{code} in a child Python and return the JSON it printed.

    @param cwd: the directory to run it in.
    @param with_repo: put the repository first on the child's path.
    """
    env = dict(os.environ)
    if with_repo:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    if result.returncode != 0:
        raise AssertionError(f"the probe failed:\n{result.stdout}{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class PluginTests(TestCase):
    """
    The dropin is found by twistd and is cheap to import.
    """

    def test_found(self) -> None:
        """
        C{getPlugins(IServiceMaker)} includes a maker with tapname C{nbd}
        whose options and makeService are those of L{twisted_nbd.tap}.
        """
        found = probe(_PROBE_PLUGINS)
        self.assertGreaterEqual(found["count"], 1)
        self.assertEqual(found["name"], "twisted-nbd")
        self.assertEqual(found["description"], "Serve block devices over NBD.")
        self.assertTrue(found["options"])
        self.assertTrue(found["makeService"])

    def test_lazy(self) -> None:
        """
        Importing the dropin defines exactly one service maker and imports
        neither the reactor nor any of twisted_nbd: twistd imports every
        dropin on every run, before it installs the chosen reactor.
        """
        found = probe(_PROBE_IMPORT)
        self.assertEqual(found["makers"], 1)
        self.assertFalse(found["reactor"])
        self.assertEqual(found["loaded"], [])

    def test_found_when_installed(self) -> None:
        """
        Where twisted-nbd is installed (as C{.ci/test.sh} does, editable),
        twistd finds the plugin from any directory, not only from the
        repository: an editable install must put the plugin directory on
        C{twisted.plugins}' path, not just make C{twisted_nbd} importable.
        """
        elsewhere = Path(tempfile.mkdtemp(prefix="twisted-nbd-plugin-"))
        self.addCleanup(shutil.rmtree, elsewhere, True)
        found = probe(_PROBE_INSTALLED, cwd=elsewhere, with_repo=False)
        if not found["installed"]:
            raise SkipTest("twisted-nbd is not installed in this Python")
        self.assertIn("nbd", found["tapnames"])

    def test_not_a_package(self) -> None:
        """
        Neither C{twisted/} nor C{twisted/plugins/} in the source tree has an
        C{__init__.py}: with one, Twisted would skip the directory (or a
        wheel would overwrite Twisted's own).
        """
        self.assertTrue(DROPIN.is_file())
        self.assertFalse((REPO / "twisted" / "plugins" / "__init__.py").exists())
        self.assertFalse((REPO / "twisted" / "__init__.py").exists())
        python_files = sorted(p.name for p in DROPIN.parent.glob("*.py"))
        self.assertEqual(python_files, [DROPIN.name])
