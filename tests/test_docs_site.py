"""
The documentation site builds with no warning, and cannot rot: every page
of docs/ is in the nav of mkdocs.yml, every command-line option is on
docs/usage.md, and C{mkdocs build --strict} fails on a broken link or a
page left out of the nav (checked on a small site of its own).

MkDocs and its theme are in the C{test} extra; in CI (C{CI=true}) a
missing MkDocs fails instead of skipping, like a missing NBD tool.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.interop.helpers import in_ci
from twisted_nbd.tap import Options

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BUILD_TIMEOUT = 120

#: Pages other branches add, with the nav line each needs in mkdocs.yml
#: (they are there already, commented out, in the right section).
PLANNED = {
    "backend-http.md": "- HTTP backend: backend-http.md",
    "backend-nbd.md": "- NBD backend: backend-nbd.md",
    "backend-s3.md": "- S3 backend: backend-s3.md",
    "backend-rbd.md": "- Ceph RBD backend: backend-rbd.md",
    "metrics.md": "- Metrics: metrics.md",
    "admin-api.md": "- Admin API: admin-api.md",
    "restart.md": "- Restarts without dropping clients: restart.md",
    "systemd.md": "- systemd: systemd.md",
    "reliability.md": "- Reliability guarantees: reliability.md",
}


def require_mkdocs() -> None:
    """Skip (fail in CI) if MkDocs or its theme is not installed."""
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            message = f"{module} is not installed (pip install -e '.[test]')"
            if in_ci():
                raise AssertionError(message)
            raise SkipTest(message)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """Run C{mkdocs build --strict} for C{config} into C{site}."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def nav_pages(nav: Any) -> list[str]:
    """Every page named in an MkDocs nav, depth first."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def load_config() -> dict[str, Any]:
    """mkdocs.yml, read with MkDocs' own YAML loader (it has !ENV and friends)."""
    require_mkdocs()
    from mkdocs.utils.yaml import yaml_load

    with open(REPO / "mkdocs.yml", encoding="utf-8") as f:
        config: dict[str, Any] = yaml_load(f)
    return config


class SiteTests(SynchronousTestCase):
    """The real site builds, strictly."""

    def test_build_strict(self) -> None:
        """
        C{mkdocs build --strict} succeeds with no warning; the API reference
        and the copies of repository files linked from the pages are built.
        """
        require_mkdocs()
        site = Path(self.mktemp()).resolve()
        result = mkdocs_build(REPO / "mkdocs.yml", site)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertNotIn("WARNING", output)
        api = (site / "api" / "index.html").read_text(encoding="utf-8")
        self.assertIn("NBDServerFactory", api)
        self.assertIn("json_observer", api)
        self.assertNotIn("<!-- api:", api)
        self.assertTrue((site / "repo" / "bench" / "README.md.txt").is_file())
        self.assertTrue((site / "embedding" / "index.html").is_file())

    def test_strict_fails(self) -> None:
        """
        The same settings fail a site with a link to a missing page, a
        missing anchor, and a page left out of the nav.
        """
        require_mkdocs()
        from mkdocs.utils.yaml import yaml_load

        root = Path(self.mktemp()).resolve()
        docs = root / "docs"
        docs.mkdir(parents=True)
        (docs / "index.md").write_text(
            "# Home\n\n[gone](missing.md) and [no anchor](other.md#nowhere)\n", encoding="utf-8"
        )
        (docs / "other.md").write_text("# Other\n", encoding="utf-8")
        (docs / "orphan.md").write_text("# Orphan\n", encoding="utf-8")
        with open(REPO / "mkdocs.yml", encoding="utf-8") as f:
            text = f.read()
        config = yaml_load(text)
        # The same validation and Markdown; this site's own pages, no hooks,
        # and MkDocs' own theme, quicker to load than Material.
        text = re.sub(r"(?ms)^nav:.*", "nav:\n  - index.md\n  - other.md\n", text)
        text = re.sub(r"(?ms)^hooks:.*?(?=^\S)", "", text)
        text = re.sub(r"(?ms)^theme:.*?(?=^\S)", "theme: mkdocs\n", text)
        self.assertIn("validation", config)
        (root / "mkdocs.yml").write_text(text, encoding="utf-8")
        result = mkdocs_build(root / "mkdocs.yml", root / "site")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn("missing.md", output)
        self.assertIn("nowhere", output)
        self.assertIn("orphan.md", output)


class NavTests(SynchronousTestCase):
    """Every page is in the nav, and the nav names only pages that exist."""

    def test_every_page_in_nav(self) -> None:
        config = load_config()
        listed = nav_pages(config["nav"])
        pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
        for page in pages:
            hint = PLANNED.get(page, f"- TITLE: {page}")
            self.assertIn(page, listed, f"docs/{page} is not in mkdocs.yml's nav: add {hint!r}")
        for page in listed:
            self.assertIn(page, pages, f"mkdocs.yml's nav names {page}, which is not in docs/")
        self.assertEqual(len(listed), len(set(listed)), "a page is twice in the nav")

    def test_planned_pages_ready(self) -> None:
        """Each planned page's nav line is waiting, commented out, in mkdocs.yml."""
        text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
        for page, line in PLANNED.items():
            if not (DOCS / page).exists():
                self.assertIn(f"# {line}\n", text, f"{page}: its nav line is missing")


class OptionsDocumentedTests(SynchronousTestCase):
    """docs/usage.md's options table names every option of twistd nbd."""

    def test_every_option(self) -> None:
        text = (DOCS / "usage.md").read_text(encoding="utf-8")
        table = [line for line in text.splitlines() if line.startswith("| `-")]
        documented = set(re.findall(r"`(--[a-z][a-z0-9-]*)", "\n".join(table)))
        options = {
            "--" + name.rstrip("=") for name in Options().longOpt if name not in ("help", "version")
        }
        self.assertTrue(options)
        self.assertEqual(
            sorted(options - documented), [], "options missing from the table of docs/usage.md"
        )


class APIReferenceTests(SynchronousTestCase):
    """The hook that turns epytext docstrings into the API reference's Markdown."""

    def test_epytext(self) -> None:
        from docs._hooks.api_reference import epytext_to_markdown

        doc = (
            "Serve L{the exports <twisted_nbd.exports.Export>} with C{build}.\n"
            "\n"
            "For example::\n"
            "\n"
            "    build(config)\n"
            "\n"
            "Then I{stop} it.\n"
            "\n"
            "@param config: what to serve,\n"
            "    checked first.\n"
            "@return: a Deferred that fires with C{None}.\n"
            "@raise ConfigError: C{config} is wrong."
        )
        self.assertEqual(
            epytext_to_markdown(doc),
            "Serve the exports with `build`.\n"
            "\n"
            "For example:\n"
            "\n"
            "```python\n"
            "build(config)\n"
            "```\n"
            "\n"
            "Then *stop* it.\n"
            "\n"
            "\n"
            "**Parameters**\n"
            "\n"
            "- `config`: what to serve, checked first.\n"
            "\n"
            "**Returns**\n"
            "\n"
            "- a Deferred that fires with `None`.\n"
            "\n"
            "**Raises**\n"
            "\n"
            "- `ConfigError`: `config` is wrong.",
        )
